//! The `session` fuzz target's input language and driver.
//!
//! A fuzz input is a [`Setup`] (the host's limits, whether a real in-memory
//! guest completes a handshake first) followed by [`Op`]s, decoded with the
//! `arbitrary` crate. The driver runs a host-role [`Session`] (the one under
//! test) and a guest-role one (a real peer, so the fuzzer gets past the
//! handshake for free) on virtual time, and after every operation checks the
//! invariants listed on [`Harness::check`].
//!
//! Every type here also implements [`Encode`], the inverse of its `Arbitrary`
//! decoding, so that `examples/seeds.rs` can write meaningful seed inputs; the
//! generator checks that each seed decodes back to the operations it meant.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Result, Unstructured};
use vios_common::proto::code::Code;
use vios_common::proto::frame::{self, Frame, FrameType, StreamId, FRAME_OVERHEAD, HEADER_LEN};
use vios_common::proto::hello::{self, Hello, HelloParse, Limits, Nonce, Role};
use vios_common::proto::session::Policy;
use vios_common::proto::{Config, Event, Session};

/// `poll_transmit()` must never hold more than this, whatever the input.
pub const MAX_TX: usize = 2 << 20;
/// More operations than this in one input are ignored.
pub const MAX_OPS: usize = 4096;
/// A `poll_event` loop that yields more events than this without new input
/// is taken for a hang.
const MAX_EVENTS_PER_POLL: usize = 1_000_000;

/// The inverse of `Arbitrary`: bytes that decode to `self`.
pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>);
}

macro_rules! encode_le {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
encode_le!(u8, u16, u32, u64);

impl<const N: usize> Encode for [u8; N] {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
}

/// How `#[derive(Arbitrary)]` picks variant `i` of `n`: from a `u32` `v`,
/// variant `(v * n) >> 32`. The smallest `v` that gives `i`.
fn enum_tag(out: &mut Vec<u8>, i: usize, n: usize) {
    let v = ((i as u64) << 32).div_ceil(n as u64);
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

/// A struct whose `Arbitrary` is derived, with its [`Encode`].
macro_rules! fuzz_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident: $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        impl Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                $(self.$f.encode(out);)*
            }
        }
    };
}

/// An enum whose `Arbitrary` is derived, with its [`Encode`]. Variants are
/// unit-like or have named fields.
macro_rules! fuzz_enum {
    ($(#[$m:meta])* pub enum $name:ident {
        $($(#[$vm:meta])* $var:ident $({ $($f:ident: $t:ty),* $(,)? })?),* $(,)?
    }) => {
        $(#[$m])*
        #[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $var $({ $($f: $t),* })?),* }
        impl Encode for $name {
            #[allow(unused_assignments)]
            fn encode(&self, out: &mut Vec<u8>) {
                const N: usize = [$(stringify!($var)),*].len();
                let mut i = 0usize;
                $(
                    if let $name::$var $({ $($f),* })? = self {
                        enum_tag(out, i, N);
                        $($($f.encode(out);)*)?
                        return;
                    }
                    i += 1;
                )*
                unreachable!("{i} variants");
            }
        }
    };
}

/// Bytes with a `u16` little-endian length in front (clipped to what is left).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl<'a> Arbitrary<'a> for Bytes {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let n = usize::from(u16::arbitrary(u)?).min(u.len());
        Ok(Bytes(u.bytes(n)?.to_vec()))
    }
}

impl Encode for Bytes {
    fn encode(&self, out: &mut Vec<u8>) {
        (self.0.len() as u16).encode(out);
        out.extend_from_slice(&self.0);
    }
}

fuzz_struct! {
    /// The host's configuration and how the run starts.
    pub struct Setup {
        /// Bit 0: complete a handshake with the in-memory guest first. Bit 1:
        /// the host passes DATA on (`consumed`) as soon as it arrives. Bit 2:
        /// tight rate limits (see [`tight_policy`]) instead of the defaults.
        pub mode: u8,
        /// The host's max streams: `1 + max_streams % 8`.
        pub max_streams: u8,
        /// The host's initial window: `1 + window`.
        pub window: u16,
        /// The host's max frame payload: 1 KiB, 4 KiB or 64 KiB.
        pub frame: u8,
        /// The host's transmit high-water mark: 1 KiB, 16 KiB or 256 KiB.
        pub high_water: u8,
        /// The host's idle timeout: 1 s, 15 s (the default) or 60 s.
        pub idle: u8,
        /// The in-memory guest's initial window (what the host may send on
        /// a stream before CREDIT): `1 + guest_window`.
        pub guest_window: u16,
    }
}

fuzz_enum! {
    /// Which stream an operation is about.
    pub enum Sid {
        /// One of the streams the host reported as opened and still live.
        Live { idx: u8 },
        /// One past the highest id the host has seen (what a new OPEN carries).
        Next,
        /// A small id, live or not.
        Id { id: u8 },
        /// Any id.
        Big { id: u64 },
    }
}

fuzz_enum! {
    /// A well-formed frame, encoded with the session's tag.
    pub enum FrameOp {
        Data { stream: Sid, len: u16, byte: u8 },
        Open { stream: Sid, service: u8 },
        Accept { stream: Sid },
        Refuse { stream: Sid, code: u16, text: u8 },
        Credit { stream: Sid, increment: u32 },
        Fin { stream: Sid },
        Reset { stream: Sid, code: u16, text: u8 },
        Ping { opaque: [u8; 8] },
        /// `last`: echo the last PING the host sent, if any; else `opaque`.
        Pong { last: u8, opaque: [u8; 8] },
        GoAway { code: u16, drain_ms: u32, text: u8 },
        /// `valid` odd: a count at most what the host has sent (`back`
        /// bytes less); even: `back` as is.
        Ack { valid: u8, back: u64 },
    }
}

fuzz_struct! {
    /// A HELLO as the guest would send it (fields chosen by the fuzzer).
    pub struct HelloOp {
        pub nonce: [u8; 16],
        /// 0: no echo, 1: the host's current nonce (as seen in its output),
        /// otherwise 16 bytes of this value.
        pub echo: u8,
        /// 1 = guest, 2 = host, anything else: no known role.
        pub role: u8,
        pub min_version: u8,
        pub max_version: u8,
        /// Bit 0: REFUSE. Bit 1: CHANNEL_ACK.
        pub flags: u8,
        /// 0: the reference defaults; 1: small valid limits from the values
        /// below; otherwise the raw values below (mostly out of range).
        pub raw_limits: u8,
        pub max_frame_payload: u32,
        pub initial_window: u32,
        pub max_streams: u32,
        pub idle_timeout_ms: u32,
        pub code: u16,
        pub text: u8,
        /// Non-zero: flip bits of this byte in the CRC.
        pub corrupt: u8,
    }
}

fuzz_enum! {
    /// Something the in-memory guest does. Its bytes reach the host on `Pump`.
    pub enum GuestOp {
        Open { service: u8 },
        Send { idx: u8, len: u16 },
        Finish { idx: u8 },
        Reset { idx: u8, code: u16 },
        GoAway { code: u16, drain_ms: u16 },
        /// Link down and up: the guest starts a new handshake (a restart).
        Restart,
    }
}

fuzz_enum! {
    pub enum Op {
        /// Raw bytes straight into the host's input.
        Raw { bytes: Bytes },
        /// A frame with the session's tag in header and trailer and a correct
        /// length, but any type, flags, stream and payload.
        Tagged { ty: u8, flags: u8, stream: Sid, payload: Bytes },
        /// A well-formed frame into the host's input.
        Frame { frame: FrameOp },
        /// A HELLO into the host's input.
        Hello { hello: HelloOp },
        /// The guest acts.
        Guest { op: GuestOp },
        /// Bytes move both ways between guest and host until quiet.
        Pump,
        /// `n` bytes (0: all) of the host's output are taken and dropped.
        Drain { n: u32 },
        /// Virtual time advances; both sides handle their timeouts.
        Advance { ms: u16 },
        /// Virtual time jumps to the host's next deadline.
        Timeout,
        // The host application.
        Accept { stream: Sid },
        Refuse { stream: Sid, code: u16 },
        Consumed { stream: Sid, n: u16 },
        Send { stream: Sid, len: u16 },
        Finish { stream: Sid },
        Reset { stream: Sid, code: u16 },
        GoAway { code: u16, drain_ms: u16 },
        LinkDown,
        LinkUp,
        Shutdown { grace_ms: u16 },
        Close,
    }
}

/// One fuzz input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub setup: Setup,
    pub ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let setup = Setup::arbitrary(u)?;
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < MAX_OPS {
            ops.push(Op::arbitrary(u)?);
        }
        Ok(Input { setup, ops })
    }
}

impl Encode for Input {
    fn encode(&self, out: &mut Vec<u8>) {
        self.setup.encode(out);
        for op in &self.ops {
            op.encode(out);
        }
    }
}

impl Input {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Rate limits small enough for a short fuzz input to reach.
pub fn tight_policy() -> Policy {
    Policy {
        control_rate: 20,
        frame_rate: 50,
        open_rate: 4,
        open_burst: 3,
        violations_per_10s: 5,
        sessions_per_minute: 2,
        scan_bytes_per_sec: 4096,
    }
}

const SERVICES: [&str; 4] = [
    "amqp",
    "a",
    "x.y-z_0",
    "s123456789s123456789s123456789s123456789s123456789s123456789s123",
];

fn service(i: u8) -> &'static str {
    SERVICES[usize::from(i) % SERVICES.len()]
}

fn text(n: u8) -> String {
    // Multi-byte characters, so clipping must respect boundaries.
    "é".repeat(usize::from(n) / 2) + &"x".repeat(usize::from(n) % 2)
}

/// What the host application knows of one of its streams.
#[derive(Debug, Default)]
struct HostStream {
    /// Bytes delivered and not yet passed on with `consumed`.
    held: u64,
    local_fin: bool,
    remote_fin: bool,
}

/// The host under test, its in-memory guest and what the host app knows.
pub struct Harness {
    now: Instant,
    host: Session,
    guest: Session,
    max_streams: u32,
    window: u32,
    window_max: u32,
    max_frame: u32,
    rx_capacity: usize,
    auto_consume: bool,
    /// The host's live streams, as its events told.
    live: BTreeMap<StreamId, HostStream>,
    /// Highest stream id the host reported (opened or refused) this session.
    highest: u64,
    /// Tag of the host's current (or last) session.
    tag: u16,
    host_nonce: Option<Nonce>,
    last_ping: Option<[u8; 8]>,
    guest_streams: Vec<StreamId>,
    /// What happened, for the seed generator's summary.
    pub counts: Counts,
}

/// Host events seen during a run.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub established: u32,
    pub ended: u32,
    pub rejected: u32,
    pub opened: u32,
    pub refused: u32,
    pub data_bytes: u64,
    pub finished: u32,
    pub resets: u32,
    pub credits: u32,
}

impl Harness {
    pub fn new(setup: &Setup) -> Harness {
        let mut cfg = Config::new(Role::Host, "vios-host-bridge fuzz");
        cfg.limits.max_streams = 1 + u32::from(setup.max_streams % 8);
        cfg.limits.initial_window = 1 + u32::from(setup.window);
        cfg.limits.max_frame_payload = [1024, 4096, 65536][usize::from(setup.frame % 3)];
        cfg.limits.idle_timeout_ms = [1000, 15_000, 60_000][usize::from(setup.idle % 3)];
        cfg.tx_high_water = [1024, 16 * 1024, 256 * 1024][usize::from(setup.high_water % 3)];
        if setup.mode & 4 != 0 {
            cfg.policy = tight_policy();
        }
        assert!(cfg.limits.check().is_ok());
        let mut guest_cfg = Config::new(Role::Guest, "vios-guest-bridge fuzz");
        guest_cfg.limits.initial_window = 1 + u32::from(setup.guest_window);
        // Mirrors Config::rx_capacity, which is private.
        let rx_capacity = (2 * (cfg.limits.max_frame_payload as usize + FRAME_OVERHEAD)).max(256 * 1024);
        let mut h = Harness {
            now: Instant::now(),
            max_streams: cfg.limits.max_streams,
            window: cfg.limits.initial_window,
            window_max: cfg.window_max,
            max_frame: cfg.limits.max_frame_payload,
            rx_capacity,
            host: Session::new(cfg, 2),
            guest: Session::new(guest_cfg, 1),
            auto_consume: setup.mode & 2 != 0,
            live: BTreeMap::new(),
            highest: 0,
            tag: 0,
            host_nonce: None,
            last_ping: None,
            guest_streams: Vec::new(),
            counts: Counts::default(),
        };
        h.host.link_up(h.now);
        if setup.mode & 1 != 0 {
            h.guest.link_up(h.now);
            h.pump();
            assert!(h.host.is_established(), "in-memory handshake failed");
        }
        h.poll_host();
        h
    }

    pub fn run(&mut self, ops: &[Op]) {
        for op in ops {
            self.apply(op);
            self.poll_host();
        }
    }

    fn sid(&self, sid: &Sid) -> StreamId {
        match *sid {
            Sid::Live { idx } => {
                if self.live.is_empty() {
                    StreamId(self.highest.max(1))
                } else {
                    *self.live.keys().nth(usize::from(idx) % self.live.len()).unwrap()
                }
            }
            Sid::Next => StreamId(self.highest.wrapping_add(1)),
            Sid::Id { id } => StreamId(u64::from(id)),
            Sid::Big { id } => StreamId(id),
        }
    }

    fn apply(&mut self, op: &Op) {
        let now = self.now;
        match op {
            Op::Raw { bytes } => self.deliver(&bytes.0),
            Op::Tagged {
                ty,
                flags,
                stream,
                payload,
            } => {
                let stream = self.sid(stream);
                let mut b = vec![0u8; FRAME_OVERHEAD + payload.0.len()];
                b[0] = *ty;
                b[1] = *flags;
                b[2..4].copy_from_slice(&self.tag.to_be_bytes());
                b[4..8].copy_from_slice(&(payload.0.len() as u32).to_be_bytes());
                b[8..16].copy_from_slice(&stream.0.to_be_bytes());
                b[HEADER_LEN..HEADER_LEN + payload.0.len()].copy_from_slice(&payload.0);
                frame::write_trailer(&mut b, self.tag);
                self.deliver(&b);
            }
            Op::Frame { frame } => {
                let b = self.build_frame(frame);
                self.deliver(&b);
            }
            Op::Hello { hello } => {
                let b = self.build_hello(hello);
                self.deliver(&b);
            }
            Op::Guest { op } => self.guest_op(op),
            Op::Pump => self.pump(),
            Op::Drain { n } => {
                let pending = self.host.poll_transmit().len();
                let n = if *n == 0 {
                    pending
                } else {
                    (*n as usize).min(pending)
                };
                let out = self.host.poll_transmit()[..n].to_vec();
                self.observe(&out);
                self.host.advance_transmit(n);
            }
            Op::Advance { ms } => {
                self.now += Duration::from_millis(u64::from(*ms));
                self.timeouts();
            }
            Op::Timeout => {
                if let Some(t) = self.host.poll_timeout() {
                    self.now = self.now.max(t);
                }
                self.timeouts();
            }
            Op::Accept { stream } => {
                let s = self.sid(stream);
                self.host.accept(s);
            }
            Op::Refuse { stream, code } => {
                let s = self.sid(stream);
                self.host.refuse(s, Code::from_u16(*code), &text(200));
                self.live.remove(&s);
            }
            Op::Consumed { stream, n } => {
                let s = self.sid(stream);
                // Only bytes actually delivered may be passed on (API contract).
                let held = self.live.get(&s).map_or(0, |st| st.held);
                let n = u64::from(*n).min(held);
                self.host.consumed(s, n as usize);
                if let Some(st) = self.live.get_mut(&s) {
                    st.held -= n;
                }
            }
            Op::Send { stream, len } => {
                let s = self.sid(stream);
                if let Some(space) = self.host.send_space(s) {
                    let n = usize::from(*len).min(space.len());
                    for (i, b) in space[..n].iter_mut().enumerate() {
                        *b = i as u8;
                    }
                    self.host.send_commit(s, n);
                }
            }
            Op::Finish { stream } => {
                let s = self.sid(stream);
                self.host.finish(s);
                if let Some(st) = self.live.get_mut(&s) {
                    st.local_fin = true;
                    if st.remote_fin {
                        self.live.remove(&s);
                    }
                }
            }
            Op::Reset { stream, code } => {
                let s = self.sid(stream);
                self.host.reset(s, Code::from_u16(*code), "fuzz reset");
                self.live.remove(&s);
            }
            Op::GoAway { code, drain_ms } => {
                let drain = Duration::from_millis(u64::from(*drain_ms));
                self.host
                    .go_away(Code::from_u16(*code), drain, "fuzz goaway", now);
            }
            Op::LinkDown => self.host.link_down(now),
            Op::LinkUp => self.host.link_up(now),
            Op::Shutdown { grace_ms } => self
                .host
                .shutdown(Duration::from_millis(u64::from(*grace_ms)), now),
            Op::Close => self.host.close(now),
        }
    }

    fn timeouts(&mut self) {
        let now = self.now;
        self.host.handle_timeout(now);
        self.guest.handle_timeout(now);
        self.poll_host();
        self.poll_guest();
        // A deadline left in the past would make an event loop spin.
        if let Some(t) = self.host.poll_timeout() {
            assert!(
                t > now,
                "poll_timeout {:?} in the past after handle_timeout",
                now - t
            );
        }
    }

    fn build_frame(&mut self, op: &FrameOp) -> Vec<u8> {
        let payload;
        let reason;
        let f = match op {
            FrameOp::Data { stream, len, byte } => {
                payload = vec![*byte; usize::from(*len).max(1)];
                Frame::Data {
                    stream: self.sid(stream),
                    payload: &payload,
                }
            }
            FrameOp::Open { stream, service: s } => Frame::Open {
                stream: self.sid(stream),
                service: service(*s),
            },
            FrameOp::Accept { stream } => Frame::Accept {
                stream: self.sid(stream),
            },
            FrameOp::Refuse {
                stream,
                code,
                text: t,
            } => {
                reason = text(*t);
                Frame::Refuse {
                    stream: self.sid(stream),
                    code: Code::from_u16(*code),
                    text: frame::clip_text(&reason, frame::MAX_REASON_TEXT),
                }
            }
            FrameOp::Credit { stream, increment } => Frame::Credit {
                stream: self.sid(stream),
                increment: (*increment).max(1),
            },
            FrameOp::Fin { stream } => Frame::Fin {
                stream: self.sid(stream),
            },
            FrameOp::Reset {
                stream,
                code,
                text: t,
            } => {
                reason = text(*t);
                Frame::Reset {
                    stream: self.sid(stream),
                    code: Code::from_u16(*code),
                    text: frame::clip_text(&reason, frame::MAX_REASON_TEXT),
                }
            }
            FrameOp::Ping { opaque } => Frame::Ping { opaque: *opaque },
            FrameOp::Pong { last, opaque } => {
                if *last != 0 {
                    let pending = self.host.poll_transmit().to_vec();
                    self.observe(&pending);
                }
                let opaque = match self.last_ping {
                    Some(p) if *last != 0 => p,
                    _ => *opaque,
                };
                Frame::Pong { opaque }
            }
            FrameOp::GoAway {
                code,
                drain_ms,
                text: t,
            } => {
                reason = text(*t);
                Frame::GoAway {
                    code: Code::from_u16(*code),
                    drain_ms: *drain_ms,
                    text: frame::clip_text(&reason, frame::MAX_GOAWAY_TEXT),
                }
            }
            FrameOp::Ack { valid, back } => {
                let sent = self.host.frames_sent();
                let received = if valid % 2 == 1 {
                    sent - back % (sent + 1)
                } else {
                    *back
                };
                Frame::Ack { received }
            }
        };
        let mut b = vec![0u8; f.encoded_len()];
        f.encode(self.tag, &mut b);
        b
    }

    fn build_hello(&mut self, op: &HelloOp) -> Vec<u8> {
        let echo = match op.echo {
            0 => hello::NO_NONCE,
            1 => {
                // The guest has seen the host's HELLO: look for it in the output.
                let pending = self.host.poll_transmit().to_vec();
                self.observe(&pending);
                self.host_nonce.unwrap_or(hello::NO_NONCE)
            }
            v => [v; 16],
        };
        let limits = if op.raw_limits == 0 {
            Config::new(Role::Guest, "").limits
        } else if op.raw_limits == 1 {
            Limits {
                max_frame_payload: 1024 + op.max_frame_payload % 4096,
                initial_window: 1 + op.initial_window % 65536,
                max_streams: 1 + op.max_streams % 16,
                idle_timeout_ms: 1000 + op.idle_timeout_ms % 60_000,
            }
        } else {
            Limits {
                max_frame_payload: op.max_frame_payload,
                initial_window: op.initial_window,
                max_streams: op.max_streams,
                idle_timeout_ms: op.idle_timeout_ms,
            }
        };
        let h = Hello {
            min_version: op.min_version,
            max_version: op.max_version,
            role: match op.role {
                1 => Some(Role::Guest),
                2 => Some(Role::Host),
                _ => None,
            },
            refuse: op.flags & 1 != 0,
            nonce: op.nonce,
            echo,
            capabilities: if op.flags & 2 != 0 {
                hello::CAP_CHANNEL_ACK
            } else {
                0
            },
            limits,
            code: Code::from_u16(op.code),
            text: text(op.text).into(),
        };
        let mut b = Vec::new();
        h.encode(&mut b);
        let n = b.len();
        b[n - 1] ^= op.corrupt;
        b
    }

    fn guest_op(&mut self, op: &GuestOp) {
        let now = self.now;
        let pick = |v: &Vec<StreamId>, idx: u8| -> Option<StreamId> {
            (!v.is_empty()).then(|| v[usize::from(idx) % v.len()])
        };
        match op {
            GuestOp::Open { service: s } => {
                if let Ok(id) = self.guest.open(service(*s)) {
                    self.guest_streams.push(id);
                }
            }
            GuestOp::Send { idx, len } => {
                if let Some(s) = pick(&self.guest_streams, *idx) {
                    let data: Vec<u8> = (0..*len).map(|i| i as u8).collect();
                    self.guest.send(s, &data);
                }
            }
            GuestOp::Finish { idx } => {
                if let Some(s) = pick(&self.guest_streams, *idx) {
                    self.guest.finish(s);
                }
            }
            GuestOp::Reset { idx, code } => {
                if let Some(s) = pick(&self.guest_streams, *idx) {
                    self.guest.reset(s, Code::from_u16(*code), "guest reset");
                }
            }
            GuestOp::GoAway { code, drain_ms } => {
                let drain = Duration::from_millis(u64::from(*drain_ms));
                self.guest
                    .go_away(Code::from_u16(*code), drain, "guest goaway", now);
            }
            GuestOp::Restart => {
                self.guest.link_down(now);
                self.guest.link_up(now);
            }
        }
        self.poll_guest();
    }

    /// Feeds bytes to the host as a channel would: as much as it has room for,
    /// processing events in between; what does not fit is lost.
    fn deliver(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let space = self.host.recv_space();
            let n = space.len().min(bytes.len());
            if n == 0 {
                break;
            }
            space[..n].copy_from_slice(&bytes[..n]);
            self.host.recv_commit(n);
            bytes = &bytes[n..];
            self.poll_host();
        }
    }

    /// Moves bytes between guest and host until nothing moves (bounded).
    fn pump(&mut self) {
        for _ in 0..64 {
            let mut moved = 0;
            // guest -> host
            loop {
                let out = self.guest.poll_transmit();
                let space = self.host.recv_space();
                let n = out.len().min(space.len());
                if n == 0 {
                    break;
                }
                space[..n].copy_from_slice(&out[..n]);
                self.host.recv_commit(n);
                self.guest.advance_transmit(n);
                moved += n;
                self.poll_host();
            }
            // host -> guest
            loop {
                let out = self.host.poll_transmit().to_vec();
                let space = self.guest.recv_space();
                let n = out.len().min(space.len());
                if n == 0 {
                    break;
                }
                space[..n].copy_from_slice(&out[..n]);
                self.guest.recv_commit(n);
                self.observe(&out[..n]);
                self.host.advance_transmit(n);
                moved += n;
                self.poll_guest();
            }
            self.poll_host();
            self.poll_guest();
            if moved == 0 {
                break;
            }
        }
    }

    /// Learns the host's HELLO nonce and last PING from bytes of its output.
    fn observe(&mut self, out: &[u8]) {
        let mut at = 0;
        while let Ok(pos) = hello::find_magic(&out[at..]) {
            at += pos;
            if let HelloParse::Valid(h, _) = Hello::parse(&out[at..]) {
                if h.role == Some(Role::Host) {
                    self.host_nonce = Some(h.nonce);
                }
            }
            at += 1;
        }
        let mut ping = [0u8; HEADER_LEN];
        ping[0] = FrameType::Ping as u8;
        ping[2..4].copy_from_slice(&self.tag.to_be_bytes());
        ping[7] = 8;
        if let Some(i) = out
            .windows(HEADER_LEN + 10)
            .rposition(|w| w[..HEADER_LEN] == ping && w[HEADER_LEN + 8..] == self.tag.to_be_bytes())
        {
            self.last_ping = Some(out[i + HEADER_LEN..i + HEADER_LEN + 8].try_into().unwrap());
        }
    }

    fn poll_guest(&mut self) {
        let now = self.now;
        for _ in 0..MAX_EVENTS_PER_POLL {
            let Some(ev) = self.guest.poll_event(now) else {
                return;
            };
            match ev.into_owned() {
                Err((stream, bytes)) => {
                    let n = bytes.len();
                    self.guest.consumed(stream, n);
                }
                Ok(Event::Ended(_)) => self.guest_streams.clear(),
                Ok(Event::Refused { stream, .. } | Event::Reset { stream, .. }) => {
                    self.guest_streams.retain(|&s| s != stream)
                }
                Ok(_) => {}
            }
        }
        panic!("guest poll_event does not settle");
    }

    /// Takes every event the host has, checking each against what the
    /// application was told before, then checks the invariants.
    fn poll_host(&mut self) {
        let now = self.now;
        let mut settled = false;
        for _ in 0..MAX_EVENTS_PER_POLL {
            let Some(ev) = self.host.poll_event(now) else {
                settled = true;
                break;
            };
            match ev.into_owned() {
                Err((stream, bytes)) => {
                    let n = bytes.len();
                    self.on_data(stream, n);
                }
                Ok(ev) => self.on_event(ev),
            }
        }
        assert!(settled, "host poll_event does not settle");
        self.check();
    }

    fn on_data(&mut self, stream: StreamId, n: usize) {
        assert!(n > 0, "empty DATA event on stream {stream}");
        assert!(
            n <= self.max_frame as usize,
            "DATA event of {n} bytes, max frame payload {}",
            self.max_frame
        );
        self.counts.data_bytes += n as u64;
        // The window the host granted this stream: the initial one, grown
        // while the application kept up (PROTOCOL.md §6), at most the
        // initial window plus the configured maximum.
        let window = self.host.recv_window(stream);
        assert!(
            window >= self.window && window <= self.window.max(self.window_max),
            "stream {stream}: window {window} outside [{}, {}]",
            self.window,
            self.window.max(self.window_max)
        );
        let Some(s) = self.live.get_mut(&stream) else {
            panic!("DATA event for stream {stream}, which the host never reported open (or already gone)");
        };
        assert!(
            !s.remote_fin,
            "DATA event for stream {stream} after its Finished event"
        );
        s.held += n as u64;
        assert!(
            s.held <= u64::from(window),
            "host holds {} bytes of stream {stream}, more than the window {window} it granted",
            s.held
        );
        if self.auto_consume {
            s.held -= n as u64;
            self.host.consumed(stream, n);
        }
    }

    fn on_event(&mut self, ev: Event<'static>) {
        match ev {
            Event::Established(info) => {
                self.counts.established += 1;
                assert!(self.live.is_empty(), "Established with streams still live");
                assert_eq!(self.host.stream_count(), 0, "new session starts with streams");
                self.tag = info.tag;
                self.highest = 0;
            }
            Event::Ended(_) => {
                self.counts.ended += 1;
                assert_eq!(
                    self.host.stream_count(),
                    0,
                    "streams survive the end of the session"
                );
                self.live.clear();
                self.highest = 0;
            }
            Event::Rejected { .. } => {
                self.counts.rejected += 1;
                assert!(self.live.is_empty(), "handshake rejected while streams are live");
            }
            Event::Opened { stream, service, .. } => {
                self.counts.opened += 1;
                assert!(
                    frame::check_service_name(service.as_bytes()).is_ok(),
                    "Opened with bad service name {service:?}"
                );
                assert_eq!(stream.0, self.highest + 1, "Opened out of order");
                assert!(!self.live.contains_key(&stream), "stream {stream} opened twice");
                self.highest = stream.0;
                self.live.insert(stream, HostStream::default());
                assert!(
                    self.live.len() <= self.max_streams as usize,
                    "{} streams open, limit {}",
                    self.live.len(),
                    self.max_streams
                );
            }
            Event::Refused { stream, by_peer, .. } => {
                self.counts.refused += 1;
                assert!(!by_peer, "the host was refused a stream it cannot open");
                assert_eq!(stream.0, self.highest + 1, "Refused out of order");
                self.highest = stream.0;
            }
            Event::Accepted { stream } => panic!("host got Accepted for stream {stream}"),
            Event::Data { .. } => unreachable!("split off by into_owned"),
            Event::Finished { stream } => {
                self.counts.finished += 1;
                let s = self
                    .live
                    .get_mut(&stream)
                    .unwrap_or_else(|| panic!("Finished for unknown stream {stream}"));
                assert!(!s.remote_fin, "Finished twice for stream {stream}");
                s.remote_fin = true;
                if s.local_fin {
                    self.live.remove(&stream);
                }
            }
            Event::Reset { stream, .. } => {
                self.counts.resets += 1;
                assert!(
                    self.live.remove(&stream).is_some(),
                    "Reset for unknown stream {stream}"
                );
            }
            Event::Credit { stream } => {
                self.counts.credits += 1;
                assert!(
                    self.live.contains_key(&stream),
                    "Credit for unknown stream {stream}"
                );
            }
            Event::GoingAway { .. } => {}
        }
    }

    /// Invariants that hold after every operation, whatever the input:
    /// - the transmit buffer stays below [`MAX_TX`];
    /// - `recv_space()` never exceeds the receive buffer;
    /// - no more streams than the host's declared max streams;
    /// - the session's live streams are exactly those its events announced.
    fn check(&mut self) {
        let tx = self.host.poll_transmit().len().max(self.host.tx_pending());
        assert!(tx <= MAX_TX, "the transmit queue holds {tx} bytes");
        let rx = self.host.recv_space().len();
        assert!(
            rx <= self.rx_capacity,
            "recv_space of {rx} bytes, buffer {}",
            self.rx_capacity
        );
        let n = self.host.stream_count();
        assert!(
            n <= self.max_streams as usize,
            "stream_count {n} above max streams {}",
            self.max_streams
        );
        assert_eq!(
            n,
            self.live.len(),
            "stream_count disagrees with the events: live per events {:?}",
            self.live.keys().collect::<Vec<_>>()
        );
        assert_eq!(self.host.is_established(), self.host.info().is_some());
    }
}

/// The `session` fuzz target's body.
pub fn run(input: &Input) -> Counts {
    let mut h = Harness::new(&input.setup);
    h.run(&input.ops);
    h.counts
}
