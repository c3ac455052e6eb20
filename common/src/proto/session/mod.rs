//! The session state machine: handshake, frames, streams, credit, keepalive
//! and the end of a session (PROTOCOL.md §3–§8). It owns no socket and reads
//! no clock: the caller feeds it bytes and the time, and takes from it bytes
//! to write, events and the next deadline.
//!
//! The calls come in four kinds, as in quinn-proto:
//! - inputs: [`Session::link_up`], [`Session::link_down`],
//!   [`Session::recv_space`] + [`Session::recv_commit`], [`Session::handle_timeout`];
//! - mutators: [`Session::open`], [`Session::accept`], [`Session::refuse`],
//!   [`Session::send_space`] + [`Session::send_commit`], [`Session::finish`],
//!   [`Session::reset`], [`Session::consumed`], [`Session::go_away`],
//!   [`Session::shutdown`];
//! - outputs: [`Session::poll_event`], [`Session::poll_transmit`] +
//!   [`Session::advance_transmit`], [`Session::poll_timeout`];
//! - getters.
//!
//! Life of a session, as this module sees it:
//!
//! ```text
//!  Down --link_up--> Handshaking --HELLO echoing our nonce--> Established
//!   ^                  ^   |                                      |
//!   |                  |   +--refused / bad HELLO--> Hold --------+ violation
//!   +--link_down-------+----------------------------- (any) <-----+ idle, restart,
//!                                                                    GOAWAY drained
//! ```
//! After [`Session::shutdown`] a session that ends goes to `Closed` instead.

use std::collections::{HashMap, VecDeque};

use std::time::{Duration, Instant};

mod config;
mod event;
mod frames;
mod input;
#[cfg(test)]
mod tests;

pub use config::*;
pub use event::*;

use super::buf::RxBuf;
use super::code::Code;
use super::flow::{RecvWindow, SendCredit};
use super::frame::{self, Frame, StreamId};
use super::hello::{self, Hello, Nonce, Role, NO_NONCE};
use super::rate::Bucket;
use super::rng::SplitMix64;
use super::txqueue::{push_frame, TxQueue};

#[derive(Debug)]
struct Stream {
    send: SendCredit,
    recv: RecvWindow,
    accepted: bool,
    local_fin: bool,
    remote_fin: bool,
}

#[derive(Debug)]
struct Handshake {
    nonce: Nonce,
    /// The peer nonce we last echoed.
    echoed: Option<Nonce>,
    retry_at: Instant,
    retry_every: Duration,
    /// When the partial HELLO at the front of the input began to arrive.
    partial_since: Option<Instant>,
    /// Bytes discarded while looking for a HELLO in this handshake.
    discarded: u64,
}

/// Stale bytes a handshake may discard before the peer counts as flooding:
/// more than the channel can replay after a restart (about 4.4 MB queued in
/// the guest plus QEMU's buffer).
const MAX_DISCARD_PER_HANDSHAKE: u64 = 8 << 20;
/// A session that ends by a new HELLO sooner than this counts as a failure,
/// so a peer cannot make the receiver run handshakes in a tight loop.
const MIN_SESSION: Duration = Duration::from_secs(1);

/// How long a peer that ran out of frame tokens waits, at least: its input is
/// then taken in batches of this much of its rate.
const THROTTLE_BATCH: Duration = Duration::from_millis(1);
/// The same for a handshake scan that spent its budget: a spray of HELLO
/// candidates is taken in batches of this much of the scan rate (40 KiB at the
/// default), so that it costs the receiver some 200 wake-ups a second, not one
/// per millisecond. The longest pause it puts in the event loop stays tens of
/// microseconds.
const SCAN_BATCH: Duration = Duration::from_millis(5);

#[derive(Debug)]
struct Established {
    info: SessionInfo,
    peer_nonce: Nonce,
    streams: HashMap<StreamId, Stream>,
    /// Highest stream id opened in this session.
    highest: u64,
    since: Instant,
    last_rx: Instant,
    ping: Option<[u8; 8]>,
    pending_pong: Option<[u8; 8]>,
    /// Set once a GOAWAY was sent or received: when the session ends.
    drain_until: Option<Instant>,
    /// Receive window the streams may still draw beyond their base.
    window_pool: u64,
    /// Established beyond the session rate: its end counts as a failure.
    over_rate: bool,
    /// With CHANNEL_ACK: what each side acknowledged.
    acks: Option<Acks>,
}

/// Frame bytes of the session received and acknowledged (PROTOCOL.md §6.1).
#[derive(Debug, Default)]
struct Acks {
    /// What the peer acknowledged of ours.
    peer_acked: u64,
    /// Frame bytes of the peer's received so far, and in the last ACK sent.
    received: u64,
    sent: u64,
}

impl Acks {
    fn due(&self) -> bool {
        self.received - self.sent >= ACK_QUANTUM
    }
}

impl Established {
    /// Forgets a stream, returning what its window drew to the pool.
    fn remove_stream(&mut self, stream: StreamId) -> Option<Stream> {
        let s = self.streams.remove(&stream)?;
        self.window_pool += u64::from(s.recv.extra());
        Some(s)
    }
}

/// Where a session is (see [`Session::phase`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No link.
    Down,
    Handshaking,
    /// Holding off after failures, until then.
    Holding {
        until: Instant,
    },
    Established {
        since: Instant,
    },
    /// Shut down for good.
    Closed,
}

#[derive(Debug)]
enum State {
    Down,
    Hold { until: Instant },
    Handshaking(Handshake),
    Established(Box<Established>),
    Closed,
}

/// What one step of input processing produced.
enum Step {
    /// More input is needed.
    Need,
    /// Something was consumed; go on.
    Continue,
    Event(Event<'static>),
    /// A DATA payload at `rx` offset `from`.
    Data {
        stream: StreamId,
        from: usize,
        len: usize,
    },
}

/// One end of a Vios session over one channel.
#[derive(Debug)]
pub struct Session {
    cfg: Config,
    rng: SplitMix64,
    state: State,
    rx: RxBuf,
    tx: TxQueue,
    queued: VecDeque<Event<'static>>,
    /// Sessions or handshakes that failed in a row.
    failures: u32,
    shutting_down: bool,
    stats: Stats,
    limits: RateLimits,
    /// Input is not read until then: the peer exceeded the frame rate.
    throttled_until: Option<Instant>,
}

/// The token buckets of [`Policy`]. They live as long as the link, so a peer
/// cannot reset them by starting new sessions.
#[derive(Debug)]
struct RateLimits {
    control: Bucket,
    frames: Bucket,
    opens: Bucket,
    violations: Bucket,
    sessions: Bucket,
    /// Bytes of input a handshake examines, CRC work included.
    scan: Bucket,
}

impl RateLimits {
    fn new(p: &Policy) -> RateLimits {
        let sessions = if p.sessions_per_minute == 0 {
            Bucket::new(0, 0)
        } else {
            Bucket::per_minute(p.sessions_per_minute, 2 * p.sessions_per_minute)
        };
        RateLimits {
            control: Bucket::new(p.control_rate, p.control_rate),
            frames: Bucket::new(p.frame_rate, p.frame_rate),
            opens: Bucket::new(p.open_rate, p.open_burst),
            violations: Bucket::new(p.violations_per_10s.div_ceil(10), p.violations_per_10s),
            sessions,
            scan: Bucket::new(p.scan_bytes_per_sec, p.scan_bytes_per_sec),
        }
    }
}

impl Session {
    /// A session whose link is down. `seed` feeds the nonce generator.
    pub fn new(cfg: Config, seed: u64) -> Session {
        debug_assert!(cfg.limits.check().is_ok(), "{:?}", cfg.limits.check());
        // DATA stops at the high-water mark plus one frame; replies stop the
        // parsing of input CONTROL_ALLOWANCE later.
        let frame = cfg.limits.max_frame_payload as usize + frame::FRAME_OVERHEAD;
        let cfg_tx_limit = cfg.tx_high_water + 2 * frame + CONTROL_ALLOWANCE;
        Session {
            rx: RxBuf::with_capacity(cfg.rx_capacity()),
            limits: RateLimits::new(&cfg.policy),
            cfg,
            rng: SplitMix64::new(seed),
            state: State::Down,
            tx: TxQueue::with_soft_limit(cfg_tx_limit),
            queued: VecDeque::new(),
            failures: 0,
            shutting_down: false,
            stats: Stats::default(),
            throttled_until: None,
        }
    }

    // ---- getters ----

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// True once a shut-down session has ended: nothing more will happen.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Where the session is, for status reports.
    pub fn phase(&self) -> Phase {
        match &self.state {
            State::Down => Phase::Down,
            State::Hold { until } => Phase::Holding { until: *until },
            State::Handshaking(_) => Phase::Handshaking,
            State::Established(e) => Phase::Established { since: e.since },
            State::Closed => Phase::Closed,
        }
    }

    pub fn info(&self) -> Option<&SessionInfo> {
        match &self.state {
            State::Established(e) => Some(&e.info),
            _ => None,
        }
    }

    /// Whether new streams may be opened now.
    pub fn can_open(&self) -> bool {
        match &self.state {
            State::Established(e) => {
                e.drain_until.is_none()
                    && (e.streams.len() as u64) < u64::from(e.info.peer_limits.max_streams)
            }
            _ => false,
        }
    }

    /// Whether DATA may be queued now (the transmit buffer is below its
    /// high-water mark). When false, write to the channel first.
    pub fn can_send_data(&self) -> bool {
        self.tx.len() < self.cfg.tx_high_water
    }

    /// Live streams of the current session.
    pub fn stream_count(&self) -> usize {
        match &self.state {
            State::Established(e) => e.streams.len(),
            _ => 0,
        }
    }

    /// Credit left to send on `stream` (0 for an unknown stream).
    pub fn send_credit(&self, stream: StreamId) -> u32 {
        self.est_ref()
            .and_then(|e| e.streams.get(&stream))
            .map_or(0, |s| s.send.available())
    }

    /// The receive window of `stream` as granted so far: the initial window
    /// plus any growth (0 for an unknown stream). The peer may have at most
    /// this many bytes of the stream received and not yet consumed.
    pub fn recv_window(&self, stream: StreamId) -> u32 {
        self.est_ref()
            .and_then(|e| e.streams.get(&stream))
            .map_or(0, |s| s.recv.window())
    }

    // ---- link ----

    /// The channel is connected: start a handshake (or wait out a backoff).
    pub fn link_up(&mut self, now: Instant) {
        if !matches!(self.state, State::Down) {
            return;
        }
        self.rx.clear();
        self.tx.clear();
        self.retry_handshake(now);
    }

    /// The channel is gone. Ends the session (an [`Event::Ended`] follows);
    /// unsent and unparsed bytes are dropped.
    pub fn link_down(&mut self, now: Instant) {
        if let State::Established(_) = self.state {
            let ev = self.end(EndReason::LinkLost, now);
            self.queued.push_back(ev);
        }
        self.rx.clear();
        self.tx.clear();
        if !matches!(self.state, State::Closed) {
            self.state = State::Down;
        }
    }

    // ---- input ----

    /// Where to read channel bytes into. Empty when the caller must not read
    /// now: the input buffer is full, or replies are backed up because the
    /// peer does not read (stop reading until they are written).
    pub fn recv_space(&mut self) -> &mut [u8] {
        if !self.can_receive() {
            return &mut [];
        }
        self.rx.space()
    }

    /// Whether [`Session::recv_space`] would offer room: false while replies
    /// are backed up, while throttled, while holding off after failures (the
    /// channel is then not read at all, so a peer that floods it is blocked by
    /// the channel itself), and when the input buffer is full.
    pub fn can_receive(&self) -> bool {
        !(self.replies_backed_up()
            || self.throttled_until.is_some()
            || matches!(self.state, State::Hold { .. })
            || self.rx.is_full())
    }

    /// `n` bytes were read into [`Session::recv_space`].
    pub fn recv_commit(&mut self, n: usize) {
        self.rx.commit(n);
        self.stats.bytes_in += n as u64;
    }

    /// Gives back the input and output buffers if they hold nothing (the
    /// caller does this once the channel has been quiet for a while); they
    /// are allocated again, small, when bytes flow.
    pub fn release_buffers(&mut self) {
        self.rx.release();
        if self.est_ref().is_none_or(|e| e.pending_pong.is_none()) {
            self.tx.release();
        }
    }

    /// Bytes the input and output buffers hold allocated.
    pub fn buffers_allocated(&self) -> usize {
        self.rx.allocated() + self.tx.allocated()
    }

    /// The next event, parsing buffered input as needed. Call until `None`,
    /// then again after more input, a write to the channel, or a timeout.
    pub fn poll_event(&mut self, now: Instant) -> Option<Event<'_>> {
        if let Some(ev) = self.queued.pop_front() {
            return Some(ev);
        }
        if self.drained() {
            return Some(self.end(EndReason::Drained, now));
        }
        loop {
            if self.rx.is_empty() || self.replies_backed_up() || self.throttled(now) {
                return None;
            }
            let step = match &self.state {
                State::Down | State::Closed => self.discard_input(),
                State::Hold { until } => {
                    if now >= *until {
                        self.start_handshake(now);
                        Step::Continue
                    } else {
                        self.discard_input()
                    }
                }
                State::Handshaking(_) => self.scan_hello(now),
                State::Established(_) => self.next_frame(now),
            };
            match step {
                Step::Need => return None,
                Step::Continue => {}
                Step::Event(ev) => return Some(ev),
                Step::Data { stream, from, len } => {
                    return Some(Event::Data {
                        stream,
                        bytes: self.rx.consumed_slice(from, len),
                    })
                }
            }
        }
    }

    // ---- output ----

    /// Bytes to write to the channel: control frames and small DATA first,
    /// then bulk DATA as far as the in-flight limit allows (§6.1).
    pub fn poll_transmit(&mut self) -> &[u8] {
        if let State::Established(e) = &mut self.state {
            let tag = e.info.tag;
            if let Some(opaque) = e.pending_pong.take() {
                push_frame(&mut self.tx, tag, &Frame::Pong { opaque });
            }
            if let Some(a) = e.acks.as_mut().filter(|a| a.due()) {
                a.sent = a.received;
                push_frame(&mut self.tx, tag, &Frame::Ack { received: a.received });
            }
        }
        let allowed = self.inflight_room();
        self.tx.poll(allowed)
    }

    /// `n` bytes of [`Session::poll_transmit`] were written.
    pub fn advance_transmit(&mut self, n: usize) {
        self.tx.advance(n);
        self.stats.bytes_out += n as u64;
    }

    /// Whether anything waits that may be written now (bulk DATA held back
    /// by the in-flight limit does not count: an ACK will say when).
    pub fn wants_write(&self) -> bool {
        self.tx.has_ready(self.inflight_room())
            || self
                .est_ref()
                .is_some_and(|e| e.pending_pong.is_some() || e.acks.as_ref().is_some_and(Acks::due))
    }

    /// Bulk bytes that may be written before the in-flight limit is reached.
    /// A single open stream has nobody to wait behind it: it goes at the
    /// channel's full speed.
    fn inflight_room(&self) -> usize {
        let est = self.est_ref();
        if est.is_none_or(|e| e.streams.len() < 2) {
            return usize::MAX;
        }
        match est.and_then(|e| e.acks.as_ref()) {
            Some(_) => {
                let in_flight = self.in_flight();
                if in_flight == 0 {
                    // Whatever the frame, it may go (none is larger than the
                    // limit, but nothing must ever wait on an empty channel).
                    return usize::MAX;
                }
                let limit = self.cfg.inflight_limit.max(MIN_INFLIGHT) as u64;
                limit.saturating_sub(in_flight) as usize
            }
            None => usize::MAX,
        }
    }

    /// Bytes queued for the channel, in both lanes.
    pub fn tx_pending(&self) -> usize {
        self.tx.len()
    }

    /// Frames written to the channel so far (what a peer's CHANNEL_ACK counts;
    /// the fuzz harness builds plausible and implausible ACKs from it).
    pub fn frames_sent(&self) -> u64 {
        self.tx.frames_written()
    }

    /// Frame bytes written and not yet acknowledged (0 without CHANNEL_ACK).
    pub fn in_flight(&self) -> u64 {
        self.est_ref()
            .and_then(|e| e.acks.as_ref())
            .map_or(0, |a| self.tx.frames_written() - a.peer_acked)
    }

    /// How far the peer has taken what this side sent: with CHANNEL_ACK the
    /// frame bytes it acknowledged, without it the bytes written to the
    /// channel. A peer that reads nothing stops this count, even while this
    /// side still writes small frames (with CHANNEL_ACK they go ahead of the
    /// held-back bulk).
    pub fn peer_progress(&self) -> u64 {
        match self.est_ref().and_then(|e| e.acks.as_ref()) {
            Some(a) => a.peer_acked,
            None => self.stats.bytes_out,
        }
    }

    /// When [`Session::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let state = self.state_timeout();
        match (state, self.throttled_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn state_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Down | State::Closed => None,
            State::Hold { until } => Some(*until),
            State::Handshaking(h) => {
                let partial = h.partial_since.map(|t| t + self.cfg.hello_deadline);
                Some(partial.map_or(h.retry_at, |p| p.min(h.retry_at)))
            }
            State::Established(e) => {
                let idle = self.cfg.idle_timeout();
                let mut t = e.last_rx + idle;
                if e.ping.is_none() {
                    t = t.min(e.last_rx + self.cfg.ping_after());
                }
                if let Some(d) = e.drain_until {
                    t = t.min(d);
                }
                Some(t)
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.throttled_until.is_some_and(|t| now >= t) {
            self.throttled_until = None;
        }
        let idle = self.cfg.idle_timeout();
        match &mut self.state {
            State::Down | State::Closed => {}
            State::Hold { until } => {
                if now >= *until {
                    self.start_handshake(now);
                }
            }
            State::Handshaking(h) => {
                if h.partial_since
                    .is_some_and(|t| now >= t + self.cfg.hello_deadline)
                {
                    // A HELLO trickling in too slowly: skip it and scan on.
                    h.partial_since = None;
                    self.rx.consume(1);
                    self.stats.hellos_discarded += 1;
                }
                if now >= h.retry_at {
                    h.retry_every = (h.retry_every * 2).min(self.cfg.hello_retry_max);
                    h.retry_at = now + h.retry_every;
                    let (nonce, echo) = (h.nonce, h.echoed.unwrap_or(NO_NONCE));
                    // Never stack HELLOs behind a channel nobody drains.
                    if self.tx.is_empty() {
                        self.queue_hello(nonce, echo, None);
                    }
                }
            }
            State::Established(e) => {
                if e.drain_until.is_some_and(|d| now >= d) {
                    let ev = self.end(EndReason::Drained, now);
                    self.queued.push_back(ev);
                } else if now >= e.last_rx + idle {
                    let ev = self.end(EndReason::IdleTimeout(idle), now);
                    self.queued.push_back(ev);
                } else if e.ping.is_none() && now >= e.last_rx + self.cfg.ping_after() {
                    let opaque = self.rng.next_u64().to_be_bytes();
                    e.ping = Some(opaque);
                    let tag = e.info.tag;
                    push_frame(&mut self.tx, tag, &Frame::Ping { opaque });
                }
            }
        }
    }

    // ---- streams ----

    /// (guest) Opens a stream to `service`. DATA may follow at once.
    pub fn open(&mut self, service: &str) -> Result<StreamId, OpenError> {
        self.open_for(service, None)
    }

    /// (guest) Opens a stream to `service` for a client at `client` (its
    /// address as the guest sees it); the host learns it if both sides set
    /// [`hello::CAP_CLIENT_ADDRESS`]. DATA may follow at once.
    pub fn open_for(&mut self, service: &str, client: Option<&str>) -> Result<StreamId, OpenError> {
        if self.cfg.role != Role::Guest {
            return Err(OpenError::WrongRole);
        }
        frame::check_service_name(service.as_bytes()).map_err(|_| OpenError::BadServiceName)?;
        let window = self.cfg.limits.initial_window;
        let State::Established(e) = &mut self.state else {
            return Err(OpenError::NotEstablished);
        };
        if e.drain_until.is_some() {
            return Err(OpenError::GoingAway);
        }
        if e.streams.len() as u64 >= u64::from(e.info.peer_limits.max_streams) {
            return Err(OpenError::TooManyStreams);
        }
        e.highest += 1;
        let stream = StreamId(e.highest);
        e.streams
            .insert(stream, Stream::new(e.info.peer_limits.initial_window, window));
        let tag = e.info.tag;
        let payload = match client {
            Some(c) if e.info.client_addresses => {
                let c = frame::clip_text(c, hello::MAX_CLIENT_ADDRESS);
                format!("{service}\0{}", c.replace('\0', ""))
            }
            _ => service.to_owned(),
        };
        push_frame(
            &mut self.tx,
            tag,
            &Frame::Open {
                stream,
                service: &payload,
            },
        );
        Ok(stream)
    }

    /// (host) The stream's service is connected: tell the guest.
    pub fn accept(&mut self, stream: StreamId) {
        if let Some((s, tag)) = self.stream_mut(stream) {
            if !s.accepted {
                s.accepted = true;
                push_frame(&mut self.tx, tag, &Frame::Accept { stream });
            }
        }
    }

    /// (host) Refuses an opened stream; it is gone.
    pub fn refuse(&mut self, stream: StreamId, code: Code, text: &str) {
        let Some(e) = self.est_mut() else { return };
        if e.remove_stream(stream).is_some() {
            let text = frame::clip_text(text, frame::MAX_REASON_TEXT);
            let tag = e.info.tag;
            push_frame(&mut self.tx, tag, &Frame::Refuse { stream, code, text });
        }
    }

    /// Room to read stream bytes into, straight into the next DATA frame, or
    /// `None` when the stream cannot send now (no credit, channel backed up,
    /// not accepted yet, already finished, or gone).
    pub fn send_space(&mut self, stream: StreamId) -> Option<&mut [u8]> {
        if self.tx.len() >= self.cfg.tx_high_water {
            return None;
        }
        let guest = self.cfg.role == Role::Guest;
        let State::Established(e) = &mut self.state else {
            return None;
        };
        // Frames are sized by this side's own buffers, never by what the
        // peer declares it could take (up to 16 MiB); with an in-flight
        // limit and another stream to wait behind, by a quarter of it, so
        // that frames interleave (a lone stream writes large frames: fewer
        // system calls, which a guest's emulated CPU feels most).
        let mut max = e
            .info
            .peer_limits
            .max_frame_payload
            .min(self.cfg.limits.max_frame_payload) as usize;
        if e.acks.is_some() && e.streams.len() >= 2 {
            max = max.min(self.cfg.inflight_limit.max(MIN_INFLIGHT) / 4 - frame::FRAME_OVERHEAD);
        }
        let s = e.streams.get(&stream)?;
        if s.local_fin || !(s.accepted || guest) || s.send.available() == 0 {
            return None;
        }
        let n = max.min(s.send.available() as usize);
        Some(self.tx.data_slot(stream, n))
    }

    /// The first `n` bytes of the last [`Session::send_space`] are stream data.
    pub fn send_commit(&mut self, stream: StreamId, n: usize) {
        let State::Established(e) = &mut self.state else {
            panic!("send_commit without an established session");
        };
        let s = e
            .streams
            .get_mut(&stream)
            .expect("send_commit on a stream without send_space");
        s.send.consume(n as u32);
        self.tx.commit_data(stream, n, e.info.tag);
    }

    /// Copies as much of `data` as the stream may send now; returns how much.
    pub fn send(&mut self, stream: StreamId, data: &[u8]) -> usize {
        let mut sent = 0;
        while sent < data.len() {
            let Some(space) = self.send_space(stream) else {
                break;
            };
            let n = space.len().min(data.len() - sent);
            space[..n].copy_from_slice(&data[sent..sent + n]);
            self.send_commit(stream, n);
            sent += n;
        }
        sent
    }

    /// Half-closes the stream: no more data from this side.
    pub fn finish(&mut self, stream: StreamId) {
        let Some((s, tag)) = self.stream_mut(stream) else {
            return;
        };
        if s.local_fin {
            return;
        }
        s.local_fin = true;
        let done = s.remote_fin;
        push_frame(&mut self.tx, tag, &Frame::Fin { stream });
        if done {
            self.forget(stream);
        }
    }

    /// Aborts the stream in both directions; it is gone.
    pub fn reset(&mut self, stream: StreamId, code: Code, text: &str) {
        let Some(e) = self.est_mut() else { return };
        if e.remove_stream(stream).is_some() {
            let text = frame::clip_text(text, frame::MAX_REASON_TEXT);
            let tag = e.info.tag;
            push_frame(&mut self.tx, tag, &Frame::Reset { stream, code, text });
        }
    }

    /// `n` bytes of the stream were passed onward: return credit in due course.
    pub fn consumed(&mut self, stream: StreamId, n: usize) {
        self.consumed_with_backlog(stream, n, 0);
    }

    /// [`Session::consumed`], telling how many bytes of the stream still wait
    /// for its consumer: the receive window grows while that stays zero and
    /// shrinks back while it is large (PROTOCOL.md §6).
    pub fn consumed_with_backlog(&mut self, stream: StreamId, n: usize, backlog: usize) {
        let max = self.cfg.window_max;
        let Some(e) = self.est_mut() else { return };
        let tag = e.info.tag;
        let Some(s) = e.streams.get_mut(&stream) else {
            return;
        };
        if s.remote_fin {
            return; // the peer sends no more: credit would be wasted
        }
        let backlog = u32::try_from(backlog).unwrap_or(u32::MAX);
        if let Some(increment) = s.recv.on_consumed(n as u32, backlog, max, &mut e.window_pool) {
            push_frame(&mut self.tx, tag, &Frame::Credit { stream, increment });
        }
    }

    // ---- session ----

    /// Sends GOAWAY: no new streams; the session ends when no stream is left
    /// or after `drain`.
    pub fn go_away(&mut self, code: Code, drain: Duration, text: &str, now: Instant) {
        let Some(e) = self.est_mut() else { return };
        if e.drain_until.is_some() {
            return;
        }
        e.drain_until = Some(now + drain);
        let tag = e.info.tag;
        let drain_ms = u32::try_from(drain.as_millis()).unwrap_or(u32::MAX);
        let text = frame::clip_text(text, frame::MAX_GOAWAY_TEXT);
        push_frame(&mut self.tx, tag, &Frame::GoAway { code, drain_ms, text });
    }

    /// Stops for good: GOAWAY with `grace`, and no new handshake once the
    /// session has ended. Returns at once; watch [`Session::is_closed`].
    pub fn shutdown(&mut self, grace: Duration, now: Instant) {
        self.shutting_down = true;
        if self.is_established() {
            self.go_away(Code::NoError, grace, "shutting down", now);
        } else {
            self.state = State::Closed;
        }
    }

    /// Ends an established session because the peer misbehaves in a way only
    /// the caller can see (say, it stopped reading): GOAWAY with `code`, an
    /// [`Event::Ended`] follows, then a new handshake after a backoff.
    pub fn abort(&mut self, code: Code, detail: String, now: Instant) {
        if self.is_established() {
            let ev = self.fail(code, detail, now);
            self.queued.push_back(ev);
        }
    }

    /// Ends the session at once (after [`Session::shutdown`]'s grace ran out).
    pub fn close(&mut self, now: Instant) {
        self.shutting_down = true;
        if self.is_established() {
            let ev = self.end(EndReason::Shutdown, now);
            self.queued.push_back(ev);
        }
        self.state = State::Closed;
    }

    // ---- internals: handshake ----

    fn retry_handshake(&mut self, now: Instant) {
        if self.shutting_down {
            self.state = State::Closed;
        } else if self.failures >= 2 {
            let exp = (self.failures - 2).min(16);
            let wait = (self.cfg.backoff_first * 2u32.pow(exp)).min(self.cfg.backoff_max);
            self.stats.holds += 1;
            self.state = State::Hold { until: now + wait };
        } else {
            self.start_handshake(now);
        }
    }

    fn start_handshake(&mut self, now: Instant) {
        let nonce = self.rng.nonce();
        self.state = State::Handshaking(Handshake {
            nonce,
            echoed: None,
            retry_at: now + self.cfg.hello_retry_first,
            retry_every: self.cfg.hello_retry_first,
            partial_since: None,
            discarded: 0,
        });
        self.queue_hello(nonce, NO_NONCE, None);
    }

    fn queue_hello(&mut self, nonce: Nonce, echo: Nonce, refuse: Option<(Code, &str)>) {
        let hello = Hello {
            min_version: hello::VERSION_MIN,
            max_version: hello::VERSION_MAX,
            role: Some(self.cfg.role),
            refuse: refuse.is_some(),
            nonce,
            echo,
            capabilities: self.cfg.capabilities,
            limits: self.cfg.limits,
            code: refuse.map_or(Code::NoError, |r| r.0),
            text: refuse.map_or(self.cfg.identity.as_str(), |r| r.1).into(),
        };
        let mut bytes = Vec::with_capacity(hello.encoded_len());
        hello.encode(&mut bytes);
        self.tx.append_hello(bytes.len()).copy_from_slice(&bytes);
    }

    // ---- internals: ending ----

    fn drained(&self) -> bool {
        matches!(&self.state, State::Established(e) if e.drain_until.is_some() && e.streams.is_empty())
    }

    /// Ends an established session and moves on to a new handshake, a
    /// backoff, or `Closed`. Returns the [`Event::Ended`] to deliver.
    fn end(&mut self, reason: EndReason, now: Instant) -> Event<'static> {
        let State::Established(e) = &self.state else {
            unreachable!("only an established session ends")
        };
        let lasted = now.duration_since(e.since);
        let churn = e.over_rate && !matches!(reason, EndReason::LinkLost | EndReason::Shutdown);
        if lasted >= self.cfg.backoff_reset_after {
            self.failures = 0;
        }
        match &reason {
            // A limit was broken: hold off at once.
            EndReason::Violation {
                code: Code::EnhanceYourCalm,
                ..
            } => self.failures = self.failures.max(1) + 1,
            EndReason::PeerRestarted if lasted < MIN_SESSION => self.failures += 1,
            r if r.is_failure() => self.failures += 1,
            // Sessions made faster than the session rate: whatever ended
            // them, the peer is churning.
            _ if churn => {
                self.stats.churned += 1;
                self.failures += 1;
            }
            _ => {}
        }
        self.tx.drop_bulk();
        self.state = State::Down;
        self.retry_handshake(now);
        Event::Ended(reason)
    }

    /// Whether input must wait because the peer exceeded the frame rate.
    fn throttled(&mut self, now: Instant) -> bool {
        if self.throttled_until.is_some_and(|t| now < t) {
            return true;
        }
        self.throttled_until = None;
        // Once out of tokens, wait for THROTTLE_BATCH worth of them: a flood
        // is then served in a few batches a second, not one wake-up a frame.
        if self.limits.frames.next_token(now) > now {
            let batch = self.limits.frames.per(THROTTLE_BATCH);
            self.stats.throttled += 1;
            self.throttled_until = Some(self.limits.frames.ready_at(now, batch));
            return true;
        }
        false
    }

    fn replies_backed_up(&self) -> bool {
        let max_frame = self.cfg.limits.max_frame_payload as usize;
        self.tx.len() >= self.cfg.tx_high_water + max_frame + CONTROL_ALLOWANCE
    }

    fn est_ref(&self) -> Option<&Established> {
        match &self.state {
            State::Established(e) => Some(e),
            _ => None,
        }
    }

    fn est_mut(&mut self) -> Option<&mut Established> {
        match &mut self.state {
            State::Established(e) => Some(e),
            _ => None,
        }
    }

    /// A live stream and the session tag.
    fn stream_mut(&mut self, stream: StreamId) -> Option<(&mut Stream, u16)> {
        let e = self.est_mut()?;
        let tag = e.info.tag;
        e.streams.get_mut(&stream).map(|s| (s, tag))
    }

    fn forget(&mut self, stream: StreamId) {
        if let Some(e) = self.est_mut() {
            e.remove_stream(stream);
        }
    }
}

impl Stream {
    fn new(send_window: u32, recv_window: u32) -> Stream {
        Stream {
            send: SendCredit::new(send_window),
            recv: RecvWindow::new(recv_window),
            accepted: false,
            local_fin: false,
            remote_fin: false,
        }
    }
}

impl Role {
    fn other(self) -> Role {
        match self {
            Role::Guest => Role::Host,
            Role::Host => Role::Guest,
        }
    }
}
