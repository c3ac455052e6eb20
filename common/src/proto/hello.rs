//! The HELLO: the self-delimiting, CRC-checked message that starts a session
//! (PROTOCOL.md §3.1), and the scanner that finds one anywhere in a byte stream.

use std::fmt;

use super::code::Code;
use super::crc32c::crc32c;
use super::text::PeerText;

/// The first 8 bytes of every HELLO. The high first byte catches 7-bit paths,
/// CR LF catches line-ending translation, and `0x1a` stops `type`-like tools.
pub const MAGIC: [u8; 8] = *b"\x89VIOS\r\n\x1a";
/// Offset of the first byte the length field counts.
const BODY_START: usize = 10;
/// Fixed fields after the length field, CRC included, without text.
const MIN_BODY_LEN: usize = 64;
/// Largest value of the length field.
pub const MAX_BODY_LEN: usize = 1024;
/// Largest HELLO on the wire.
pub const MAX_HELLO_LEN: usize = BODY_START + MAX_BODY_LEN;
/// Longest text in a HELLO.
pub const MAX_HELLO_TEXT: usize = 256;

/// Capability bit 0: OPEN may carry the guest client's address after the
/// service name (PROTOCOL.md §5.2), when both sides set it.
pub const CAP_CLIENT_ADDRESS: u32 = 1;
/// Capability bit 1: each side acknowledges the frame bytes it received
/// (ACK frames), so the other can keep the bytes in flight on the channel
/// small (PROTOCOL.md §6.1), when both sides set it.
pub const CAP_CHANNEL_ACK: u32 = 2;
/// The capabilities this implementation sets.
pub const CAPABILITIES: u32 = CAP_CLIENT_ADDRESS | CAP_CHANNEL_ACK;
/// Longest client address an OPEN may carry.
pub const MAX_CLIENT_ADDRESS: usize = 128;

/// Protocol versions this implementation speaks.
pub const VERSION_MIN: u8 = 1;
pub const VERSION_MAX: u8 = 1;

pub type Nonce = [u8; 16];
/// The echo of a side that has not heard its peer yet.
pub const NO_NONCE: Nonce = [0; 16];

/// Which end of the channel a side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Guest,
    Host,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Guest => 1,
            Role::Host => 2,
        }
    }

    fn from_u8(b: u8) -> Option<Role> {
        match b {
            1 => Some(Role::Guest),
            2 => Some(Role::Host),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Guest => "guest",
            Role::Host => "host",
        })
    }
}

/// What a side is prepared to receive (PROTOCOL.md §3.1). Each side's limits
/// bind what its peer sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_frame_payload: u32,
    pub initial_window: u32,
    pub max_streams: u32,
    pub idle_timeout_ms: u32,
}

impl Limits {
    pub const MIN_FRAME_PAYLOAD: u32 = 1024;
    pub const MAX_FRAME_PAYLOAD: u32 = 16 << 20;
    pub const MAX_WINDOW: u32 = (1 << 31) - 1;
    pub const MIN_IDLE_TIMEOUT_MS: u32 = 1000;
    pub const MAX_IDLE_TIMEOUT_MS: u32 = 3_600_000;

    /// Checks every field against its range; the error names the first bad one.
    pub fn check(&self) -> Result<(), String> {
        let range = |name: &str, v: u32, lo: u32, hi: u32| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} {v} is outside {lo}..={hi}"))
            }
        };
        range(
            "max frame payload",
            self.max_frame_payload,
            Self::MIN_FRAME_PAYLOAD,
            Self::MAX_FRAME_PAYLOAD,
        )?;
        range("initial window", self.initial_window, 1, Self::MAX_WINDOW)?;
        range("max streams", self.max_streams, 1, u32::MAX)?;
        range(
            "idle timeout",
            self.idle_timeout_ms,
            Self::MIN_IDLE_TIMEOUT_MS,
            Self::MAX_IDLE_TIMEOUT_MS,
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u8,
    pub max_version: u8,
    /// `None` when the peer sent a role number this version does not know.
    pub role: Option<Role>,
    pub refuse: bool,
    pub nonce: Nonce,
    pub echo: Nonce,
    pub capabilities: u32,
    pub limits: Limits,
    pub code: Code,
    pub text: PeerText,
}

/// The outcome of parsing bytes that start with [`MAGIC`].
#[derive(Debug, PartialEq, Eq)]
pub enum HelloParse {
    /// A valid HELLO and its length on the wire.
    Valid(Hello, usize),
    /// Not enough bytes yet.
    Incomplete,
    /// Not a HELLO after all; skip the magic's first byte and scan on.
    Invalid(&'static str),
}

impl Hello {
    /// Bytes this HELLO encodes to.
    pub fn encoded_len(&self) -> usize {
        BODY_START + MIN_BODY_LEN + super::frame::clip_text(self.text.as_str(), MAX_HELLO_TEXT).len()
    }

    /// Appends the encoded HELLO to `out`. The text is clipped to
    /// [`MAX_HELLO_TEXT`] bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let text = super::frame::clip_text(self.text.as_str(), MAX_HELLO_TEXT);
        let start = out.len();
        let body_len = MIN_BODY_LEN + text.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        out.push(self.min_version);
        out.push(self.max_version);
        out.push(self.role.map_or(0, Role::to_u8));
        out.push(u8::from(self.refuse));
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.echo);
        out.extend_from_slice(&self.capabilities.to_be_bytes());
        out.extend_from_slice(&self.limits.max_frame_payload.to_be_bytes());
        out.extend_from_slice(&self.limits.initial_window.to_be_bytes());
        out.extend_from_slice(&self.limits.max_streams.to_be_bytes());
        out.extend_from_slice(&self.limits.idle_timeout_ms.to_be_bytes());
        out.extend_from_slice(&self.code.to_u16().to_be_bytes());
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
        let crc = crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
        debug_assert_eq!(out.len() - start, BODY_START + body_len);
    }

    /// Parses a HELLO at the start of `input`, which must begin with [`MAGIC`]
    /// (or a prefix of it, reported as incomplete).
    pub fn parse(input: &[u8]) -> HelloParse {
        Hello::parse_costed(input).0
    }

    /// [`Hello::parse`], and how many bytes it ran the CRC over: what a
    /// scanner is charged for (0 when a cheaper check decided first).
    pub fn parse_costed(input: &[u8]) -> (HelloParse, usize) {
        let mut crc_bytes = 0;
        let r = Hello::parse_inner(input, &mut crc_bytes);
        (r, crc_bytes)
    }

    fn parse_inner(input: &[u8], crc_bytes: &mut usize) -> HelloParse {
        let have = input.len().min(MAGIC.len());
        if input[..have] != MAGIC[..have] {
            return HelloParse::Invalid("no magic");
        }
        if input.len() < BODY_START {
            return HelloParse::Incomplete;
        }
        let body_len = usize::from(u16::from_be_bytes([input[8], input[9]]));
        if !(MIN_BODY_LEN..=MAX_BODY_LEN).contains(&body_len) {
            return HelloParse::Invalid("length out of range");
        }
        let total = BODY_START + body_len;
        if input.len() < total {
            return HelloParse::Incomplete;
        }
        let msg = &input[..total];
        // The fields that cost nothing to check come before the CRC, so a
        // peer spraying magics with plausible lengths costs a CRC only when
        // every one of them holds (PROTOCOL.md §3.2).
        let text_len = usize::from(u16::from_be_bytes([msg[68], msg[69]]));
        if text_len > MAX_HELLO_TEXT || 70 + text_len > total - 4 {
            return HelloParse::Invalid("text length out of range");
        }
        let nonce: Nonce = msg[14..30].try_into().unwrap();
        if nonce == NO_NONCE {
            return HelloParse::Invalid("zero nonce");
        }
        let crc = u32::from_be_bytes(msg[total - 4..].try_into().unwrap());
        *crc_bytes = total - 4;
        if crc32c(&msg[..total - 4]) != crc {
            return HelloParse::Invalid("CRC mismatch");
        }
        let u32_at = |o: usize| u32::from_be_bytes(msg[o..o + 4].try_into().unwrap());
        let hello = Hello {
            min_version: msg[10],
            max_version: msg[11],
            role: Role::from_u8(msg[12]),
            refuse: msg[13] & 1 == 1,
            nonce,
            echo: msg[30..46].try_into().unwrap(),
            capabilities: u32_at(46),
            limits: Limits {
                max_frame_payload: u32_at(50),
                initial_window: u32_at(54),
                max_streams: u32_at(58),
                idle_timeout_ms: u32_at(62),
            },
            code: Code::from_u16(u16::from_be_bytes([msg[66], msg[67]])),
            text: String::from_utf8_lossy(&msg[70..70 + text_len])
                .into_owned()
                .into(),
        };
        HelloParse::Valid(hello, total)
    }
}

/// Finds the first [`MAGIC`] in `input`.
///
/// `Ok(pos)`: a whole magic starts at `pos`. `Err(keep)`: there is none, and
/// only `input[keep..]` (a prefix of the magic at the very end) can still
/// become one; everything before `keep` can be discarded.
pub fn find_magic(input: &[u8]) -> Result<usize, usize> {
    let mut from = 0;
    while let Some(i) = input[from..].iter().position(|&b| b == MAGIC[0]) {
        let at = from + i;
        let tail = &input[at..];
        let n = tail.len().min(MAGIC.len());
        if tail[..n] == MAGIC[..n] {
            return if n == MAGIC.len() { Ok(at) } else { Err(at) };
        }
        from = at + 1;
    }
    Err(input.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Hello {
        Hello {
            min_version: 1,
            max_version: 1,
            role: Some(Role::Guest),
            refuse: false,
            nonce: [7; 16],
            echo: NO_NONCE,
            capabilities: 0,
            limits: Limits {
                max_frame_payload: 65536,
                initial_window: 262_144,
                max_streams: 1024,
                idle_timeout_ms: 15_000,
            },
            code: Code::NoError,
            text: "vios-guest-bridge test".into(),
        }
    }

    fn bytes(h: &Hello) -> Vec<u8> {
        let mut v = Vec::new();
        h.encode(&mut v);
        v
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = bytes(&h);
        assert_eq!(b.len(), h.encoded_len());
        assert_eq!(Hello::parse(&b), HelloParse::Valid(h, b.len()));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let b = bytes(&sample());
        for cut in 1..b.len() {
            assert_eq!(Hello::parse(&b[..cut]), HelloParse::Incomplete, "cut {cut}");
        }
    }

    #[test]
    fn any_flipped_bit_is_caught() {
        let b = bytes(&sample());
        for i in MAGIC.len()..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                match Hello::parse(&c) {
                    HelloParse::Valid(..) => panic!("flip at {i}.{bit} accepted"),
                    HelloParse::Incomplete => assert!(i == 8 || i == 9, "flip at {i}"),
                    HelloParse::Invalid(_) => {}
                }
            }
        }
    }

    #[test]
    fn extension_bytes_are_ignored() {
        let mut b = bytes(&sample());
        // Grow the length by 3, add 3 bytes before the CRC, recompute the CRC.
        b.truncate(b.len() - 4);
        let len = u16::from_be_bytes([b[8], b[9]]) + 3;
        b[8..10].copy_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&[1, 2, 3]);
        let crc = crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        assert!(matches!(Hello::parse(&b), HelloParse::Valid(h, _) if h == sample()));
    }

    #[test]
    fn rejects_zero_nonce_and_long_text() {
        let mut h = sample();
        h.nonce = NO_NONCE;
        assert_eq!(Hello::parse(&bytes(&h)), HelloParse::Invalid("zero nonce"));
        let mut h = sample();
        h.text = "x".repeat(1000).into();
        // Encoding clips the text, so the result is still valid.
        assert!(matches!(Hello::parse(&bytes(&h)), HelloParse::Valid(p, _) if p.text.as_str().len() == 256));
    }

    #[test]
    fn find_magic_cases() {
        assert_eq!(find_magic(b""), Err(0));
        assert_eq!(find_magic(b"abc"), Err(3));
        let mut v = b"xx\x89yy".to_vec();
        assert_eq!(find_magic(&v), Err(v.len()));
        v.extend_from_slice(&MAGIC[..3]);
        assert_eq!(find_magic(&v), Err(5));
        v.extend_from_slice(&MAGIC[3..]);
        assert_eq!(find_magic(&v), Ok(5));
    }

    #[test]
    fn limits_ranges() {
        assert!(sample().limits.check().is_ok());
        let mut l = sample().limits;
        l.max_frame_payload = 10;
        assert!(l.check().unwrap_err().contains("max frame payload"));
        let mut l = sample().limits;
        l.initial_window = 0;
        assert!(l.check().is_err());
        let mut l = sample().limits;
        l.idle_timeout_ms = 10;
        assert!(l.check().is_err());
    }
}
