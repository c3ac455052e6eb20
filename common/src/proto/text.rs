//! Text from the peer: REFUSE, RESET and GOAWAY reasons, a HELLO's identity
//! or refusal. The peer is untrusted, so its text is data (PROTOCOL.md §9.1):
//! [`PeerText`] keeps it as received and prints it escaped, so that no line
//! break, control character or terminal sequence it holds can reach a log
//! and forge a line that reads like another guest's.

use std::fmt;

/// A string the peer sent. `Display` escapes it; [`PeerText::as_str`] is the
/// raw text.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PeerText(String);

impl PeerText {
    pub fn new(s: impl Into<String>) -> PeerText {
        PeerText(s.into())
    }

    /// The text exactly as the peer sent it. Never log this.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for PeerText {
    fn from(s: &str) -> PeerText {
        PeerText(s.to_owned())
    }
}

impl From<String> for PeerText {
    fn from(s: String) -> PeerText {
        PeerText(s)
    }
}

impl PartialEq<&str> for PeerText {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Whether `c` must not reach a log as itself: control characters (C0, DEL,
/// C1), line and paragraph separators, and the bidirectional formatting
/// characters that reorder what a terminal shows.
fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// Writes `s` with every character of [`must_escape`] as `\n`, `\r`, `\t` or
/// `\u{XX}`, and `\` as `\\`, so the escaped form is unambiguous.
pub fn write_escaped(f: &mut impl fmt::Write, s: &str) -> fmt::Result {
    for c in s.chars() {
        match c {
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if must_escape(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            c => f.write_char(c)?,
        }
    }
    Ok(())
}

impl fmt::Display for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.0)
    }
}

impl fmt::Debug for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for c in self.0.chars() {
            if c == '"' {
                f.write_str("\\\"")?;
            } else {
                let mut b = [0; 4];
                write_escaped(f, c.encode_utf8(&mut b))?;
            }
        }
        f.write_str("\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_the_peer_sends_breaks_a_line() {
        let forged =
            "bye\nINFO  guest vm2 org.qpid.vios.0: session established\r\x1b[2K\u{85}\u{2028}\u{202e}ok\\";
        let shown = PeerText::from(forged).to_string();
        assert_eq!(
            shown,
            "bye\\nINFO  guest vm2 org.qpid.vios.0: session established\\r\\u{1b}[2K\\u{85}\\u{2028}\\u{202e}ok\\\\"
        );
        assert!(shown.chars().all(|c| !must_escape(c)));
        assert_eq!(format!("{:?}", PeerText::from("a\"b\n")), "\"a\\\"b\\n\"");
        assert_eq!(PeerText::from("plain text, é ü").to_string(), "plain text, é ü");
    }

    #[test]
    fn every_character_escapes_to_printable_text() {
        for c in (0..0x3000u32).filter_map(char::from_u32) {
            let shown = PeerText::from(c.to_string()).to_string();
            assert!(
                !shown.contains('\n') && shown.chars().all(|d| !must_escape(d)),
                "{c:?} -> {shown:?}"
            );
        }
    }
}
