//! The attacks: what each mode writes once a session is established, and what
//! it makes of the frames that come back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vios_common::proto::frame::{write_header, Frame, FrameType, StreamId, HEADER_LEN};
use vios_common::proto::hello::{Limits, Nonce};
use vios_common::proto::rng::SplitMix64;
use vios_common::proto::Code;

use crate::json::Json;
use crate::out::Out;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Handshake, answer PINGs, nothing else (a well-behaved idle guest).
    Idle,
    /// PINGs as fast as possible; never read after the handshake.
    PingFlood,
    /// RESETs for streams 1..N (stale: opened and reset first, or with
    /// --never-opened never opened) as fast as possible.
    ResetFlood,
    /// OPEN immediately followed by RESET, ids 1, 2, 3... (rapid reset).
    OpenReset,
    /// OPEN 1..=--count (default 1,000,000), never RESET; count ACCEPT/REFUSE.
    MillionOpens,
    /// DATA far beyond the host's initial window, on stream after stream.
    CreditOverrun,
    /// CREDIT 0xFFFFFFFF, or CREDITs summing past 2^31-1, on stream after stream.
    CreditOverflow,
    /// 1-byte DATA frames as fast as the host's credit allows, on one stream.
    TinyFrames,
    /// 0-length DATA frames at line rate.
    EmptyFrames,
    /// A DATA header with length 0xFFFFFFFF, then random bytes; every session.
    HugeLength,
    /// A valid HELLO, one byte per second (--interval-ms), no real handshake.
    SlowHello,
    /// A fresh HELLO every --interval-ms (0: as soon as re-established).
    SecondHello,
    /// OPENs of addresses, paths, unknown, empty and over-long service names.
    BadNames,
    /// --streams streams to --service (source) with huge credit; never read.
    NoDrain,
    /// Random bytes at full speed after the first handshake.
    Garbage,
    /// GOAWAY(NO_ERROR) right after each establishment, then a new handshake.
    GoawayChurn,
    /// From the first byte: HELLO candidates (magic, the largest length, and
    /// fields that pass every cheap check) every 70 bytes, never a valid one.
    MagicSpray,
    /// Peer text that tries to forge log lines: a HELLO identity, RESET and
    /// GOAWAY texts holding line breaks, escape sequences and a fake log line.
    ForgeLog,
    /// --streams streams to --service, then one byte on each every second:
    /// enough to dodge an idle timeout, far too little to be real traffic.
    Trickle,
}

/// What forge-log writes into every text it controls.
pub const FORGED: &str = "x\nFORGED guest good org.qpid.vios.0: session established\r\x1b[2K\u{2028}FORGED";

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::PingFlood => "ping-flood",
            Mode::ResetFlood => "reset-flood",
            Mode::OpenReset => "open-reset",
            Mode::MillionOpens => "million-opens",
            Mode::CreditOverrun => "credit-overrun",
            Mode::CreditOverflow => "credit-overflow",
            Mode::TinyFrames => "tiny-frames",
            Mode::EmptyFrames => "empty-frames",
            Mode::HugeLength => "huge-length",
            Mode::SlowHello => "slow-hello",
            Mode::SecondHello => "second-hello",
            Mode::BadNames => "bad-names",
            Mode::NoDrain => "no-drain",
            Mode::Garbage => "garbage",
            Mode::GoawayChurn => "goaway-churn",
            Mode::MagicSpray => "magic-spray",
            Mode::ForgeLog => "forge-log",
            Mode::Trickle => "trickle",
        }
    }

    pub fn default_service(self) -> &'static str {
        if self == Mode::NoDrain {
            "source"
        } else {
            "sink"
        }
    }

    pub fn default_streams(self) -> u64 {
        64
    }

    /// Whether the socket is read once the session is established.
    pub fn reads(self) -> bool {
        !matches!(self, Mode::PingFlood | Mode::NoDrain)
    }

    /// Whether the mode never handshakes at all (its bytes from the start).
    pub fn never_handshakes(self) -> bool {
        self == Mode::MagicSpray
    }
}

/// The established session the attack runs in.
pub struct Est {
    pub tag: u16,
    pub limits: Limits,
    pub host_nonce: Nonce,
    pub since: Instant,
}

/// What the driver's credit declares: the window the host starts with on
/// every stream it sends on (our Session's default).
pub const OUR_INITIAL_WINDOW: u32 = 256 * 1024;
/// How long bad-names waits for an answer to one OPEN.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Params {
    pub mode: Mode,
    pub service: String,
    pub streams: u64,
    pub count: u64,
    pub interval: Duration,
    pub never_opened: bool,
}

#[derive(Default)]
struct Totals {
    opens: u64,
    resets: u64,
    data_frames: u64,
    data_bytes: u64,
    credits: u64,
    pings: u64,
    streams: u64,
    headers: u64,
    garbage_bytes: u64,
    rehellos: u64,
    /// Sessions in which the attack ran to its end (million-opens: all opens sent).
    completed: u64,
    goaways: u64,
    candidates: u64,
    trickled: u64,
}

pub struct Attack {
    p: Params,
    rng: SplitMix64,
    /// A pre-encoded run of identical-length frames for this session.
    block: Vec<u8>,
    block_len: usize,
    block_n: u64,
    // per session
    highest: u64,
    setup_done: bool,
    /// The stream being worked on (0: none yet).
    cur: u64,
    /// tiny-frames: credit left on `cur`; credit-overrun: bytes sent on it.
    cur_bytes: u64,
    variant: u64,
    next_hello: Option<Instant>,
    // bad-names
    names: Vec<String>,
    name_idx: usize,
    /// The stream, the name index and when the OPEN went out.
    pending: Option<(u64, usize, Instant)>,
    outcomes: Vec<BTreeMap<String, u64>>,
    // garbage
    sessions_seen: u64,
    /// trickle: when the next byte goes out on every stream.
    next_trickle: Option<Instant>,
    /// The initial window we declared (no-drain tops credit up from it).
    pub our_window: u32,
    t: Totals,
}

impl Attack {
    pub fn new(p: Params, seed: u64) -> Attack {
        let names: Vec<String> = [
            "127.0.0.1:22",
            "[::1]:22",
            "/etc/passwd",
            "../../etc/shadow",
            "nosuch",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(std::iter::once("a".repeat(65)))
        .collect();
        let outcomes = vec![BTreeMap::new(); names.len()];
        Attack {
            p,
            rng: SplitMix64::new(seed),
            block: Vec::new(),
            block_len: 0,
            block_n: 0,
            highest: 0,
            setup_done: false,
            cur: 0,
            cur_bytes: 0,
            variant: 0,
            next_hello: None,
            names,
            name_idx: 0,
            pending: None,
            outcomes,
            sessions_seen: 0,
            next_trickle: None,
            our_window: OUR_INITIAL_WINDOW,
            t: Totals::default(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.p.mode
    }

    /// A new session is established: start over with stream ids.
    pub fn on_established(&mut self, est: &Est) {
        self.sessions_seen += 1;
        self.highest = 0;
        self.setup_done = false;
        self.cur = 0;
        self.cur_bytes = 0;
        self.block.clear();
        self.pending = None;
        self.next_hello = Some(est.since + self.p.interval);
        self.next_trickle = None;
    }

    /// Whether to handshake again once a session has ended.
    pub fn rehandshake(&self) -> bool {
        !(self.p.mode.never_handshakes() || self.p.mode == Mode::Garbage && self.sessions_seen > 0)
    }

    /// second-hello, goaway-churn: whether to send a fresh HELLO now.
    pub fn wants_rehello(&mut self, now: Instant) -> bool {
        if !matches!(self.p.mode, Mode::SecondHello | Mode::GoawayChurn) {
            return false;
        }
        if self.p.mode == Mode::GoawayChurn && !self.setup_done {
            return false;
        }
        if self.next_hello.is_none_or(|t| now < t) {
            return false;
        }
        self.next_hello = None;
        self.t.rehellos += 1;
        true
    }

    /// When the attack needs the loop to come back without I/O.
    pub fn timer(&self) -> Option<Instant> {
        match self.p.mode {
            Mode::SecondHello | Mode::GoawayChurn => self.next_hello,
            Mode::BadNames => self.pending.map(|(_, _, at)| at + ANSWER_TIMEOUT),
            Mode::Trickle => self.next_trickle,
            _ => None,
        }
    }

    /// The identity our HELLOs carry.
    pub fn identity(&self) -> &'static str {
        if self.p.mode == Mode::ForgeLog {
            FORGED
        } else {
            "vios-hostile"
        }
    }

    fn open(&mut self, out: &mut Out, tag: u16, service: &str) -> StreamId {
        self.highest += 1;
        let stream = StreamId(self.highest);
        out.frame(tag, &Frame::Open { stream, service });
        self.t.opens += 1;
        self.t.streams += 1;
        stream
    }

    fn reset(&mut self, out: &mut Out, tag: u16, stream: StreamId) {
        out.frame(
            tag,
            &Frame::Reset {
                stream,
                code: Code::Aborted,
                text: "",
            },
        );
        self.t.resets += 1;
    }

    fn random(&mut self, out: &mut Out, n: usize) {
        let space = out.raw_space(n);
        for chunk in space.chunks_mut(8) {
            let r = self.rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        self.t.garbage_bytes += n as u64;
    }

    /// Appends a run of the session's pre-encoded block.
    fn push_block(&mut self, out: &mut Out) {
        out.frames(&self.block, self.block_len, self.block_n);
    }

    fn build_block(&mut self, frames: impl Iterator<Item = Vec<u8>>) {
        self.block.clear();
        self.block_n = 0;
        for f in frames {
            self.block_len = f.len();
            self.block.extend_from_slice(&f);
            self.block_n += 1;
        }
    }

    /// Appends attack bytes until `out` holds at least `target` bytes or the
    /// attack has nothing more to send now. `est` is `None` once the session
    /// is over for good (garbage after its one handshake).
    pub fn fill(&mut self, out: &mut Out, est: Option<&Est>, now: Instant, target: usize) {
        let Some(est) = est else {
            if self.p.mode == Mode::Garbage {
                let n = target.saturating_sub(out.pending());
                self.random(out, n);
            }
            if self.p.mode == Mode::MagicSpray {
                if self.block.is_empty() {
                    self.build_block(std::iter::repeat_with(spray_candidate).take(1024));
                }
                while out.pending() < target {
                    self.push_block(out);
                    self.t.candidates += self.block_n;
                }
            }
            return;
        };
        let tag = est.tag;
        let service = self.p.service.clone();
        let max_data = (est.limits.max_frame_payload as usize).min(64 * 1024);
        match self.p.mode {
            Mode::Idle | Mode::SlowHello | Mode::SecondHello => {}
            Mode::PingFlood => {
                if self.block.is_empty() {
                    let mut n = 0u64;
                    self.build_block(
                        std::iter::repeat_with(|| {
                            n += 1;
                            encode(
                                tag,
                                &Frame::Ping {
                                    opaque: n.to_be_bytes(),
                                },
                            )
                        })
                        .take(2048),
                    );
                }
                while out.pending() < target {
                    self.push_block(out);
                    self.t.pings += self.block_n;
                }
            }
            Mode::ResetFlood => {
                let n = self.p.streams.max(1);
                if !self.setup_done {
                    self.setup_done = true;
                    if !self.p.never_opened {
                        for _ in 0..n {
                            let s = self.open(out, tag, &service);
                            self.reset(out, tag, s);
                        }
                    }
                    let ids = (1..=n).cycle().take(((2048 / n).max(1) * n) as usize);
                    self.build_block(ids.map(|id| {
                        encode(
                            tag,
                            &Frame::Reset {
                                stream: StreamId(id),
                                code: Code::Aborted,
                                text: "",
                            },
                        )
                    }));
                }
                while out.pending() < target {
                    self.push_block(out);
                    self.t.resets += self.block_n;
                }
            }
            Mode::OpenReset => {
                while out.pending() < target {
                    let s = self.open(out, tag, &service);
                    self.reset(out, tag, s);
                }
            }
            Mode::MillionOpens => {
                while out.pending() < target && self.highest < self.p.count {
                    self.open(out, tag, &service);
                    if self.highest == self.p.count {
                        self.t.completed += 1;
                        log::info!("million-opens: all {} OPENs queued", self.p.count);
                    }
                }
            }
            Mode::CreditOverrun => {
                let window = u64::from(est.limits.initial_window);
                let per_stream = window + window.max(64 * 1024);
                let payload = vec![0x5a; max_data];
                while out.pending() < target {
                    if self.cur == 0 || self.cur_bytes >= per_stream {
                        self.cur = self.open(out, tag, &service).0;
                        self.cur_bytes = 0;
                    }
                    let n = (per_stream - self.cur_bytes).min(max_data as u64) as usize;
                    out.frame(
                        tag,
                        &Frame::Data {
                            stream: StreamId(self.cur),
                            payload: &payload[..n],
                        },
                    );
                    self.cur_bytes += n as u64;
                    self.t.data_frames += 1;
                    self.t.data_bytes += n as u64;
                }
            }
            Mode::CreditOverflow => {
                while out.pending() < target {
                    let stream = self.open(out, tag, &service);
                    let increments: &[u32] = if self.variant % 2 == 0 {
                        &[u32::MAX]
                    } else {
                        // Each legal on its own; the third passes 2^31-1.
                        &[0x3000_0000, 0x3000_0000, 0x3000_0000]
                    };
                    self.variant += 1;
                    for &increment in increments {
                        out.frame(tag, &Frame::Credit { stream, increment });
                        self.t.credits += 1;
                    }
                }
            }
            Mode::TinyFrames => {
                if self.cur == 0 {
                    self.cur = self.open(out, tag, &service).0;
                    self.cur_bytes = u64::from(est.limits.initial_window);
                }
                let stream = StreamId(self.cur);
                while out.pending() < target && self.cur_bytes > 0 {
                    out.frame(
                        tag,
                        &Frame::Data {
                            stream,
                            payload: b"x",
                        },
                    );
                    self.cur_bytes -= 1;
                    self.t.data_frames += 1;
                    self.t.data_bytes += 1;
                }
            }
            Mode::EmptyFrames => {
                if !self.setup_done {
                    self.setup_done = true;
                    let stream = self.open(out, tag, &service);
                    self.build_block(
                        std::iter::repeat_with(|| encode(tag, &Frame::Data { stream, payload: b"" }))
                            .take(4096),
                    );
                }
                while out.pending() < target {
                    self.push_block(out);
                    self.t.data_frames += self.block_n;
                }
            }
            Mode::HugeLength => {
                if !self.setup_done {
                    self.setup_done = true;
                    let stream = self.open(out, tag, &service);
                    let mut h = [0u8; HEADER_LEN];
                    write_header(&mut h, FrameType::Data, tag, 0, stream);
                    h[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
                    out.frames(&h, HEADER_LEN, 1);
                    self.t.headers += 1;
                }
                let n = target.saturating_sub(out.pending());
                self.random(out, n);
            }
            Mode::BadNames => {
                if let Some((_, i, at)) = self.pending {
                    if now < at + ANSWER_TIMEOUT {
                        return;
                    }
                    *self.outcomes[i].entry("no answer".into()).or_default() += 1;
                    self.pending = None;
                }
                let i = self.name_idx % self.names.len();
                self.name_idx += 1;
                let name = self.names[i].clone();
                let s = self.open(out, tag, &name);
                self.pending = Some((s.0, i, now));
            }
            Mode::NoDrain => {
                if !self.setup_done {
                    self.setup_done = true;
                    // Credit just below 2^31-1 in all.
                    let increment = Limits::MAX_WINDOW.saturating_sub(self.our_window + 1);
                    for _ in 0..self.p.streams {
                        let stream = self.open(out, tag, &service);
                        if increment > 0 {
                            out.frame(tag, &Frame::Credit { stream, increment });
                            self.t.credits += 1;
                        }
                    }
                }
            }
            Mode::Garbage => {
                let n = target.saturating_sub(out.pending());
                self.random(out, n);
            }
            Mode::GoawayChurn => {
                if !self.setup_done {
                    self.setup_done = true;
                    out.frame(
                        tag,
                        &Frame::GoAway {
                            code: Code::NoError,
                            drain_ms: 0,
                            text: "bye",
                        },
                    );
                    self.t.goaways += 1;
                    // A new handshake as soon as the GOAWAY is out.
                    self.next_hello = Some(now);
                }
            }
            Mode::MagicSpray => {}
            Mode::ForgeLog => {
                if !self.setup_done {
                    self.setup_done = true;
                    for _ in 0..3 {
                        let s = self.open(out, tag, &service);
                        out.frame(
                            tag,
                            &Frame::Reset {
                                stream: s,
                                code: Code::Aborted,
                                text: FORGED,
                            },
                        );
                        self.t.resets += 1;
                    }
                    out.frame(
                        tag,
                        &Frame::GoAway {
                            code: Code::NoError,
                            drain_ms: 0,
                            text: FORGED,
                        },
                    );
                    self.t.goaways += 1;
                }
            }
            Mode::Trickle => {
                if !self.setup_done {
                    self.setup_done = true;
                    for _ in 0..self.p.streams {
                        self.open(out, tag, &service);
                    }
                    self.next_trickle = Some(now);
                }
                if self.next_trickle.is_some_and(|t| now >= t) {
                    self.next_trickle = Some(now + Duration::from_secs(1));
                    for id in 1..=self.highest {
                        out.frame(
                            tag,
                            &Frame::Data {
                                stream: StreamId(id),
                                payload: b".",
                            },
                        );
                        self.t.trickled += 1;
                    }
                }
            }
        }
    }

    /// A frame from the host (counted already), in an established session.
    pub fn on_frame(&mut self, f: &Frame<'_>, out: &mut Out, tag: u16) {
        match (self.p.mode, f) {
            (Mode::TinyFrames, Frame::Credit { stream, increment }) if stream.0 == self.cur => {
                self.cur_bytes += u64::from(*increment);
            }
            (Mode::TinyFrames, Frame::Reset { stream, .. } | Frame::Refuse { stream, .. })
                if stream.0 == self.cur =>
            {
                self.cur = 0;
            }
            (Mode::BadNames, _) => {
                let Some((s, i, _)) = self.pending else { return };
                let outcome = match *f {
                    Frame::Refuse { stream, code, text } if stream.0 == s => format!("REFUSE {code}: {text}"),
                    Frame::Reset { stream, code, text } if stream.0 == s => format!("RESET {code}: {text}"),
                    Frame::Accept { stream } if stream.0 == s => {
                        self.reset(out, tag, stream);
                        "ACCEPT".to_owned()
                    }
                    _ => return,
                };
                *self.outcomes[i].entry(outcome).or_default() += 1;
                self.pending = None;
            }
            _ => {}
        }
    }

    /// The session ended (GOAWAY, new HELLO, EOF...).
    pub fn on_end(&mut self, how: &str, code: Option<Code>, text: &str) {
        if let Some((_, i, _)) = self.pending.take() {
            let outcome = match code {
                Some(c) => format!("{} {c}: {text}", how.to_ascii_uppercase()),
                None => format!("{}: {text}", how.to_ascii_uppercase()),
            };
            *self.outcomes[i].entry(outcome).or_default() += 1;
        }
        self.next_hello = None;
    }

    pub fn report(&self) -> Json {
        let t = &self.t;
        let mut j = Json::new();
        j.u64("opens_sent", t.opens).u64("streams_used", t.streams);
        match self.p.mode {
            Mode::PingFlood => {
                j.u64("pings_queued", t.pings);
            }
            Mode::ResetFlood | Mode::OpenReset => {
                j.u64("resets_queued", t.resets);
            }
            Mode::MillionOpens => {
                j.u64("count", self.p.count)
                    .u64("sessions_all_opens_queued", t.completed);
            }
            Mode::CreditOverrun | Mode::TinyFrames | Mode::EmptyFrames => {
                j.u64("data_frames_queued", t.data_frames)
                    .u64("data_bytes_queued", t.data_bytes);
            }
            Mode::CreditOverflow | Mode::NoDrain => {
                j.u64("credits_queued", t.credits);
            }
            Mode::HugeLength => {
                j.u64("huge_headers_queued", t.headers)
                    .u64("garbage_bytes_queued", t.garbage_bytes);
            }
            Mode::Garbage => {
                j.u64("garbage_bytes_queued", t.garbage_bytes);
            }
            Mode::SecondHello => {
                j.u64("fresh_hellos", t.rehellos)
                    .u64("interval_ms", self.p.interval.as_millis() as u64);
            }
            Mode::BadNames => {
                let items: Vec<String> = self
                    .names
                    .iter()
                    .zip(&self.outcomes)
                    .map(|(name, o)| {
                        let mut e = Json::new();
                        e.str("name", name)
                            .u64("tries", o.values().sum())
                            .counts("outcomes", o);
                        e.finish()
                    })
                    .collect();
                j.raw_array("names", &items);
            }
            Mode::GoawayChurn => {
                j.u64("goaways_queued", t.goaways).u64("fresh_hellos", t.rehellos);
            }
            Mode::MagicSpray => {
                j.u64("candidates_queued", t.candidates);
            }
            Mode::ForgeLog => {
                j.u64("resets_queued", t.resets).u64("goaways_queued", t.goaways);
            }
            Mode::Trickle => {
                j.u64("trickle_frames_queued", t.trickled);
            }
            Mode::Idle | Mode::SlowHello => {}
        }
        j
    }
}

/// One HELLO candidate of magic-spray: the magic, the largest length, a
/// version range, the guest role, a non-zero nonce and no text, so that only
/// the CRC (over 1030 bytes) can tell it is no HELLO; 70 bytes, so the next
/// candidate starts inside this one's CRC range.
fn spray_candidate() -> Vec<u8> {
    let mut c = vec![0u8; 70];
    c[..8].copy_from_slice(&vios_common::proto::hello::MAGIC);
    c[8..10].copy_from_slice(&1024u16.to_be_bytes());
    c[10] = 1;
    c[11] = 1;
    c[12] = 1;
    c[14..30].fill(0x55);
    c
}

fn encode(tag: u16, f: &Frame<'_>) -> Vec<u8> {
    let mut v = vec![0; f.encoded_len()];
    f.encode(tag, &mut v);
    v
}
