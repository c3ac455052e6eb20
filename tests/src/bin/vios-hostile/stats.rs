//! What the driver counts, and the JSON it prints.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vios_common::proto::frame::Frame;
use vios_common::proto::Code;

use crate::json::Json;

/// Ends kept in detail in the report; the rest are only counted.
const MAX_ENDS: usize = 20;
/// Distinct texts kept per kind of answer.
const MAX_TEXTS: usize = 10;

/// Codes seen in one kind of answer (REFUSE, RESET, GOAWAY), with a few texts.
#[derive(Default)]
pub struct Answers {
    pub codes: BTreeMap<String, u64>,
    pub texts: Vec<String>,
}

impl Answers {
    pub fn add(&mut self, code: Code, text: &str) {
        *self.codes.entry(code.to_string()).or_default() += 1;
        let t = format!("{code}: {text}");
        if self.texts.len() < MAX_TEXTS && !self.texts.contains(&t) {
            self.texts.push(t);
        }
    }

    pub fn total(&self) -> u64 {
        self.codes.values().sum()
    }

    fn report(&self) -> Json {
        let mut j = Json::new();
        j.u64("total", self.total())
            .counts("codes", &self.codes)
            .strs("texts", &self.texts);
        j
    }
}

/// One end of a session or connection, as the driver saw it.
pub struct End {
    pub at: Duration,
    /// `goaway`, `eof`, `read_error`, `write_error`, `peer_hello` (the host
    /// sent a HELLO with a new nonce), `self_hello` (we sent one),
    /// `session` (the Session of `idle` mode ended; `text` says why).
    pub how: &'static str,
    pub code: Option<Code>,
    pub text: String,
}

pub struct Stats {
    pub start: Instant,
    pub connections: u64,
    pub sessions: u64,
    pub handshakes: u64,
    /// When the first session was established.
    pub first_session: Option<Duration>,
    /// Handshakes refused (by the host, or by our Session).
    pub rejected: Vec<String>,
    pub bytes_sent: u64,
    pub frames_sent: u64,
    pub hellos_sent: u64,
    pub write_calls: u64,
    pub bytes_read: u64,
    pub frames_read: BTreeMap<String, u64>,
    pub hellos_read: u64,
    pub decode_errors: u64,
    pub decode_error_texts: Vec<String>,
    pub credit_received: u64,
    pub refuses: Answers,
    pub resets: Answers,
    pub goaways: Answers,
    pub ends: Vec<End>,
    pub end_kinds: BTreeMap<String, u64>,
    /// Time output was waiting and the socket took none of it.
    pub blocked: Duration,
    pub blocked_since: Option<Instant>,
    pub last_write: Option<Instant>,
    pub last_read: Option<Instant>,
    /// Bytes written and read in each second of the run.
    pub sent_per_s: Vec<u64>,
    pub read_per_s: Vec<u64>,
}

impl Stats {
    pub fn new(start: Instant) -> Stats {
        Stats {
            start,
            connections: 0,
            sessions: 0,
            handshakes: 0,
            first_session: None,
            rejected: Vec::new(),
            bytes_sent: 0,
            frames_sent: 0,
            hellos_sent: 0,
            write_calls: 0,
            bytes_read: 0,
            frames_read: BTreeMap::new(),
            hellos_read: 0,
            decode_errors: 0,
            decode_error_texts: Vec::new(),
            credit_received: 0,
            refuses: Answers::default(),
            resets: Answers::default(),
            goaways: Answers::default(),
            ends: Vec::new(),
            end_kinds: BTreeMap::new(),
            blocked: Duration::ZERO,
            blocked_since: None,
            last_write: None,
            last_read: None,
            sent_per_s: Vec::new(),
            read_per_s: Vec::new(),
        }
    }

    fn second(&self, now: Instant) -> usize {
        now.duration_since(self.start).as_secs() as usize
    }

    pub fn wrote(&mut self, n: usize, now: Instant) {
        self.bytes_sent += n as u64;
        self.write_calls += 1;
        self.last_write = Some(now);
        if let Some(since) = self.blocked_since.take() {
            self.blocked += now.duration_since(since);
        }
        let s = self.second(now);
        if self.sent_per_s.len() <= s {
            self.sent_per_s.resize(s + 1, 0);
        }
        self.sent_per_s[s] += n as u64;
    }

    pub fn write_blocked(&mut self, now: Instant) {
        self.blocked_since.get_or_insert(now);
    }

    pub fn read(&mut self, n: usize, now: Instant) {
        self.bytes_read += n as u64;
        self.last_read = Some(now);
        let s = self.second(now);
        if self.read_per_s.len() <= s {
            self.read_per_s.resize(s + 1, 0);
        }
        self.read_per_s[s] += n as u64;
    }

    pub fn frame_in(&mut self, f: &Frame<'_>) {
        let name = format!("{:?}", f.frame_type()).to_ascii_lowercase();
        *self.frames_read.entry(name).or_default() += 1;
        match *f {
            Frame::Refuse { code, text, .. } => self.refuses.add(code, text),
            Frame::Reset { code, text, .. } => self.resets.add(code, text),
            Frame::GoAway { code, text, .. } => self.goaways.add(code, text),
            Frame::Credit { increment, .. } => self.credit_received += u64::from(increment),
            _ => {}
        }
    }

    pub fn decode_error(&mut self, what: String) {
        self.decode_errors += 1;
        if self.decode_error_texts.len() < MAX_TEXTS && !self.decode_error_texts.contains(&what) {
            self.decode_error_texts.push(what);
        }
    }

    pub fn end(&mut self, now: Instant, how: &'static str, code: Option<Code>, text: String) {
        *self.end_kinds.entry(how.to_owned()).or_default() += 1;
        let at = now.duration_since(self.start);
        let n = self.end_kinds.values().sum::<u64>();
        if n <= 20 {
            match code {
                Some(c) => log::info!("session/connection ended ({how}): {c}: {text}"),
                None => log::info!("session/connection ended ({how}): {text}"),
            }
        } else {
            log::debug!("session/connection ended ({how}): {text}");
        }
        if self.ends.len() < MAX_ENDS {
            self.ends.push(End { at, how, code, text });
        }
    }

    /// The common part of the report.
    pub fn report(&mut self, j: &mut Json, now: Instant) {
        if let Some(since) = self.blocked_since.take() {
            self.blocked += now.duration_since(since);
            self.blocked_since = Some(since);
        }
        let secs = |t: Option<Instant>| t.map(|t| t.duration_since(self.start).as_secs_f64());
        let ends: Vec<String> = self
            .ends
            .iter()
            .map(|e| {
                let mut o = Json::new();
                o.f64("at_s", e.at.as_secs_f64(), 3)
                    .str("how", e.how)
                    .opt_str("code", e.code.map(|c| c.to_string()).as_deref())
                    .str("text", &e.text);
                o.finish()
            })
            .collect();
        j.f64("elapsed_s", now.duration_since(self.start).as_secs_f64(), 3)
            .u64("connections", self.connections)
            .u64("handshakes", self.handshakes)
            .u64("sessions", self.sessions)
            .opt_f64("first_session_s", self.first_session.map(|d| d.as_secs_f64()))
            .strs("rejected", &self.rejected)
            .u64("frames_sent", self.frames_sent)
            .u64("bytes_sent", self.bytes_sent)
            .u64("hellos_sent", self.hellos_sent)
            .u64("write_calls", self.write_calls)
            .f64("write_blocked_s", self.blocked.as_secs_f64(), 3)
            .bool("write_blocked_at_end", self.blocked_since.is_some())
            .opt_f64("last_write_s", secs(self.last_write))
            .u64("bytes_read", self.bytes_read)
            .opt_f64("last_read_s", secs(self.last_read))
            .counts("frames_read", &self.frames_read)
            .u64("hellos_read", self.hellos_read)
            .u64("decode_errors", self.decode_errors)
            .strs("decode_error_texts", &self.decode_error_texts)
            .u64("credit_received", self.credit_received)
            .obj("refuse", self.refuses.report())
            .obj("reset", self.resets.report())
            .obj("goaway", self.goaways.report())
            .u64("ends_total", self.end_kinds.values().sum())
            .counts("end_kinds", &self.end_kinds)
            .raw_array("ends", &ends)
            .u64s("sent_per_s", &self.sent_per_s)
            .u64s("read_per_s", &self.read_per_s);
    }
}
