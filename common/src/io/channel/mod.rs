//! One channel: its [`Link`], the [`Session`] over it, and the local sockets
//! of the streams it carries. A [`Channel`] is the only owner of its session:
//! the link's ups and downs, the frames, the streams and the timers all go
//! through it. Both bridges use it; what differs is who creates streams: the
//! guest's listeners hand accepted clients to [`Channel::open_stream`], and
//! on the host an [`Opener`] connects to the service each stream names.
//!
//! Where a byte goes, guest client to broker:
//!
//! ```text
//! guest: client socket --(streams::serve_ready: read straight into a DATA slot)--> Session tx
//!        Session tx --(Link::write)--> virtio-serial port
//! host:  QEMU socket --(Link::read)--> Session rx --(dispatch: Event::Data)--> Conn::deliver
//!        Conn::deliver --(write, or Conn's pending ring until writable)--> broker socket
//! ```
//! and the same way back. Credit is returned as [`Conn`] writes bytes on
//! (`after_write`), never when they arrive.
//!
//! Back-pressure, sozu-style, but per stream:
//! - channel → socket: DATA is written straight to the socket; the rest waits
//!   in the stream's own buffer and credit comes back only as it is written,
//!   so a slow socket closes only its own stream's window. Small DATA frames
//!   are gathered and written once per dispatch, so tiny frames cost a copy,
//!   not a system call each;
//! - socket → channel: a socket is read only while its stream has credit and
//!   the session's transmit buffer is below its high-water mark. Readable
//!   streams wait in a FIFO and get one read (one frame) per turn each, so a
//!   busy stream cannot starve the others.
//!
//! Limits (host side, [`ChannelConfig`]): bytes buffered per guest and
//! descriptors ([`Budget`]), idle and half-closed stream timeouts, and at most
//! [`STREAM_LOG_PER_SEC`] stream log lines a second.
//!
//! `streams.rs` holds the socket side (flush, read, timeouts, close);
//! `log.rs` the rate-limited log lines.

mod log;
mod streams;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Registry, Token};

use super::conn::{Conn, Phase};
use super::limits::{Budget, LogLimiter, StreamTimeouts};
use super::link::Link;
use super::slab::Slab;
use super::sock::Sock;
use crate::proto::session::Stats;
use crate::proto::{Code, Event, OpenError, Session, SessionInfo, StreamId};

/// Rounds of read-channel / dispatch / write-channel per turn.
const ROUNDS: usize = 8;
/// A channel quiet this long gives its session's buffers back (an idle
/// guest then costs no buffer; they come back, small, with the next byte).
const RELEASE_AFTER: Duration = Duration::from_secs(2);
/// DATA payloads smaller than this are gathered and written once per dispatch.
const GATHER_BELOW: usize = 4096;
/// Stream open/close lines logged per second per channel; the rest are counted.
pub const STREAM_LOG_PER_SEC: u32 = 1000;
/// Session and channel lines logged per second per channel.
pub const SESSION_LOG_PER_SEC: u32 = 20;
/// Default of [`ChannelConfig::write_stall`].
pub const DEFAULT_WRITE_STALL: Duration = Duration::from_secs(30);
/// Bits of a token that number a channel's connections: a channel's tokens
/// are `base` (the link) and `base + 1 + k` for connection `k`.
pub const CONN_TOKEN_BITS: u32 = 20;
/// Most connections one channel can have.
pub const MAX_CONNS: usize = (1 << CONN_TOKEN_BITS) - 1;

/// How the host side turns a stream the guest opened into a socket.
pub trait Opener {
    /// Starts connecting `stream` to `service`. `tried` lists the addresses
    /// this stream's connects already failed at (empty the first time): the
    /// opener picks one not among them, or refuses when none is left. The
    /// connect may still be in progress.
    fn open(
        &mut self,
        stream: StreamId,
        service: &str,
        tried: &[SocketAddr],
        now: Instant,
    ) -> Result<Opening, (Code, String)>;

    /// A connect `open` started has finished (`ok`), or failed or timed out.
    fn connected(&mut self, _service: &str, _addr: SocketAddr, _ok: bool, _now: Instant) {}
}

/// A connect [`Opener::open`] started.
#[derive(Debug)]
pub struct Opening {
    pub sock: Sock,
    /// Where it leads (for logs, health and retries).
    pub addr: Option<SocketAddr>,
    /// Bytes the service gets before any stream byte (a PROXY header).
    pub preamble: Vec<u8>,
}

/// The guest side's [`Opener`]: the host opens no streams in version 1 (the
/// session treats an OPEN from the host as a violation before it gets here).
pub struct NoOpener;

impl Opener for NoOpener {
    fn open(
        &mut self,
        _: StreamId,
        _: &str,
        _: &[SocketAddr],
        _: Instant,
    ) -> Result<Opening, (Code, String)> {
        Err((Code::NotPermitted, "the guest accepts no streams".into()))
    }
}

/// How a [`Channel`] is set up.
#[derive(Debug)]
pub struct ChannelConfig {
    /// Prefix of every log line: empty, or e.g. `guest vm1 org.qpid.vios.0: `.
    pub label: String,
    /// (host) Give up a service connect after this long.
    pub connect_timeout: Duration,
    pub budget: Arc<Budget>,
    pub timeouts: StreamTimeouts,
    /// End the session when bytes wait to be written and the peer has read
    /// none for this long (it grants credit, or pings, but never drains).
    pub write_stall: Option<Duration>,
}

impl ChannelConfig {
    /// No limits: the guest side, whose peer is the trusted host.
    pub fn unlimited(label: String) -> ChannelConfig {
        ChannelConfig {
            label,
            connect_timeout: Duration::from_secs(5),
            budget: Arc::new(Budget::unlimited()),
            timeouts: StreamTimeouts::default(),
            write_stall: Some(DEFAULT_WRITE_STALL),
        }
    }
}

/// Why a local client could not become a stream (guest side).
#[derive(Debug)]
pub enum OpenStreamError {
    /// The session cannot open a stream now.
    Session(OpenError),
    /// The socket could not be registered or made to abort on close.
    Socket(std::io::Error),
}

impl std::fmt::Display for OpenStreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenStreamError::Session(e) => write!(f, "cannot open a stream: {e}"),
            OpenStreamError::Socket(e) => write!(f, "cannot use the client socket: {e}"),
        }
    }
}

#[derive(Debug)]
pub struct Channel {
    session: Session,
    link: Link,
    cfg: ChannelConfig,
    conns: Slab<Conn>,
    by_stream: HashMap<StreamId, usize>,
    ready: VecDeque<usize>,
    /// Connections with gathered small DATA to write at the end of dispatch.
    dirty: Vec<usize>,
    /// Token of the link; connection `k` has `token_base + 1 + k`.
    token_base: usize,
    /// Connects in progress in start order, hence in deadline order, with
    /// the attempt each deadline is for.
    connecting: VecDeque<(Instant, usize, StreamId, usize)>,
    /// When stream timeouts are next checked.
    next_sweep: Option<Instant>,
    log: LogLimiter,
    session_log: LogLimiter,
    /// Since when bytes wait to be written and none could be, and the
    /// session's output counter then.
    stalled: Option<(Instant, u64)>,
    /// Streams carried over the channel's life, and opens refused by code.
    pub counters: Counters,
    /// Owners of streams closed since the last [`Channel::take_closed`].
    closed: Vec<u32>,
    /// Stale refusals already logged.
    stale_refusals: u64,
    /// (host) Connects that finished since the last turn, for the opener:
    /// the service, the address, and whether it worked.
    connects_done: Vec<(String, SocketAddr, bool)>,
    /// (host) Connections whose connect failed, with why: the opener tries
    /// the next address or the stream is refused.
    connects_failed: Vec<(usize, StreamId, String)>,
    /// When bytes last moved on the link, and the counters then.
    last_io: Instant,
    io_seen: (u64, u64),
}

/// What a channel counts over its life (for status and metrics).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub streams_total: u64,
    pub bytes_to_peer: u64,
    pub bytes_from_peer: u64,
    pub refused: HashMap<Code, u64>,
    pub sessions_ended: HashMap<String, u64>,
}

impl Channel {
    /// A channel over `link`; its tokens start at the link's.
    pub fn new(session: Session, link: Link, cfg: ChannelConfig) -> Channel {
        let token_base = link.token().0;
        Channel {
            session,
            link,
            cfg,
            conns: Slab::default(),
            by_stream: HashMap::new(),
            ready: VecDeque::new(),
            dirty: Vec::new(),
            token_base,
            connecting: VecDeque::new(),
            next_sweep: None,
            log: LogLimiter::new(STREAM_LOG_PER_SEC),
            session_log: LogLimiter::new(SESSION_LOG_PER_SEC),
            stalled: None,
            counters: Counters::default(),
            closed: Vec::new(),
            stale_refusals: 0,
            connects_done: Vec::new(),
            connects_failed: Vec::new(),
            last_io: Instant::now(),
            io_seen: (0, 0),
        }
    }

    /// (guest) The owners of the streams that closed since the last call,
    /// one entry per stream.
    pub fn take_closed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.closed)
    }

    // ---- getters ----

    pub fn label(&self) -> &str {
        &self.cfg.label
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    pub fn is_established(&self) -> bool {
        self.session.is_established()
    }

    pub fn info(&self) -> Option<&SessionInfo> {
        self.session.info()
    }

    pub fn stats(&self) -> &Stats {
        self.session.stats()
    }

    pub fn stream_count(&self) -> usize {
        self.conns.len()
    }

    /// What the channel looks like now, for status reports (with every
    /// stream when `streams`).
    pub fn status(&self, now: Instant, streams: bool) -> crate::status::ChannelStatus {
        use crate::proto::session::Phase;
        let (session, holding_s, age) = match self.session.phase() {
            Phase::Down => ("down", None, None),
            Phase::Handshaking => ("handshaking", None, None),
            Phase::Holding { until } => (
                "holding off",
                Some(until.saturating_duration_since(now).as_secs_f64()),
                None,
            ),
            Phase::Established { since } => (
                "established",
                None,
                Some(now.saturating_duration_since(since).as_secs_f64()),
            ),
            Phase::Closed => ("closed", None, None),
        };
        let stats = self.session.stats();
        let streams = if streams {
            self.conns
                .keys()
                .filter_map(|k| self.conns.get(k))
                .map(|c| crate::status::StreamStatus {
                    id: c.stream.0,
                    service: c.service.clone(),
                    client: c.client.clone(),
                    peer: c.peer.clone(),
                    local: c.sock.local_addr().map(|a| a.to_string()),
                    age_s: now.saturating_duration_since(c.opened).as_secs_f64(),
                    bytes_out: c.bytes_out,
                    bytes_in: c.bytes_in,
                })
                .collect()
        } else {
            Vec::new()
        };
        crate::status::ChannelStatus {
            channel: self.link.spec().name(),
            link: self.link.state(now),
            session: session.into(),
            holding_s,
            session_age_s: age,
            peer: self.session.info().map(|i| i.peer_identity.as_str().to_owned()),
            sessions: stats.sessions,
            streams_open: self.conns.len(),
            streams_total: self.counters.streams_total,
            bytes_to_peer: self.counters.bytes_to_peer,
            bytes_from_peer: self.counters.bytes_from_peer,
            refused: self
                .counters
                .refused
                .iter()
                .map(|(c, n)| (c.to_string(), *n))
                .collect(),
            ended: self
                .counters
                .sessions_ended
                .iter()
                .map(|(k, n)| (k.clone(), *n))
                .collect(),
            violations: stats.stream_violations,
            throttled: stats.throttled,
            holds: stats.holds,
            buffered: self.buffered(),
            streams,
        }
    }

    /// Bytes this channel's streams hold against the guest's budget.
    pub fn buffered(&self) -> usize {
        self.conns
            .keys()
            .filter_map(|k| self.conns.get(k))
            .map(|c| c.reserved)
            .sum()
    }

    /// Whether a new stream may be opened now (guest side).
    pub fn can_open(&self) -> bool {
        self.session.can_open()
    }

    /// Whether `token` is one of this channel's.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.token_base && token.0 - self.token_base <= MAX_CONNS
    }

    // ---- streams ----

    /// (guest) Opens a stream to `service` for an accepted client socket of
    /// local user `owner`; [`Channel::take_closed`] reports it when it closes.
    pub fn open_stream(
        &mut self,
        sock: Sock,
        peer: String,
        service: String,
        owner: u32,
        now: Instant,
        registry: &Registry,
    ) -> Result<StreamId, (OpenStreamError, Sock)> {
        if let Err(e) = sock.abort_on_close() {
            return Err((OpenStreamError::Socket(e), sock));
        }
        if let Err(r) = self.cfg.budget.try_stream() {
            let e = std::io::Error::other(r.to_string());
            return Err((OpenStreamError::Socket(e), sock));
        }
        let stream = match self.session.open_for(&service, Some(&peer)) {
            Ok(s) => s,
            Err(e) => {
                self.cfg.budget.release_stream();
                return Err((OpenStreamError::Session(e), sock));
            }
        };
        let mut conn =
            Conn::new(stream, service, peer, sock, Phase::Open, now).expect("abort_on_close succeeded above");
        // Reported by take_closed when the stream ends, so that its user's
        // part of the streams is given back.
        conn.owner = Some(owner);
        let line = format!(
            "stream {stream} ({}) opened for client {}",
            conn.service, conn.peer
        );
        if let Err(e) = self.add_conn(registry, conn, now) {
            self.cfg.budget.release_stream();
            self.closed.push(owner);
            self.session
                .reset(stream, Code::ResourceLimit, "guest could not register the socket");
            self.stream_log(
                now,
                &format!("stream {stream} reset: cannot register the client socket: {e}"),
            );
            return Ok(stream);
        }
        self.stream_log(now, &line);
        Ok(stream)
    }

    /// Adds a stream's socket, whose stream the budget already counts: a
    /// guest client (`Phase::Open`) or a host connect in progress
    /// (`Phase::Connecting`). Fails when the socket cannot be registered; the
    /// caller then gives the budget back.
    fn add_conn(&mut self, registry: &Registry, mut conn: Conn, now: Instant) -> std::io::Result<()> {
        if self.conns.len() >= MAX_CONNS {
            return Err(std::io::Error::other(format!(
                "{MAX_CONNS} streams on one channel"
            )));
        }
        let stream = conn.stream;
        let phase = conn.phase;
        let base = self.token_base;
        let key = self.conns.insert_with(|key| {
            let r = conn.sync_interest(registry, Token(base + 1 + key));
            (conn, r)
        })?;
        self.by_stream.insert(stream, key);
        self.counters.streams_total += 1;
        if phase == Phase::Connecting {
            self.connecting
                .push_back((now + self.cfg.connect_timeout, key, stream, 0));
        }
        let t = self.cfg.timeouts;
        let first = [t.idle, t.half_closed, t.quiet.map(|q| q.window)]
            .into_iter()
            .flatten()
            .min();
        if let Some(d) = first {
            self.sweep_by(now + d);
        }
        Ok(())
    }

    // ---- readiness and work ----

    /// A readiness event for the link or one of this channel's connections.
    pub fn ready(&mut self, ev: &mio::event::Event, registry: &Registry, now: Instant) {
        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
        let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
        // End of file (or an error) is already queued: it must be read, so a
        // short read must not be taken as "drained" (see serve_ready).
        let closing = ev.is_read_closed() || ev.is_error();
        if ev.token() == self.link.token() {
            self.link.ready(readable, writable, closing);
            return;
        }
        let key = ev.token().0 - self.token_base - 1;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.readable |= readable;
        conn.writable |= writable;
        conn.closing |= closing;
        if conn.phase == Phase::Connecting {
            match conn.sock.connect_result() {
                Ok(false) => return,
                Ok(true) => self.connected(key, registry, now),
                Err(e) => {
                    // Tried again with the next address, or refused, in
                    // `process` where the opener is.
                    let why = format!("connect to {}: {e}", conn.peer);
                    self.connects_failed.push((key, conn.stream, why));
                    return;
                }
            }
        }
        if writable {
            self.flush_conn(key, registry, now);
        }
        if readable {
            self.enqueue(key);
        }
    }

    fn connected(&mut self, key: usize, registry: &Registry, now: Instant) {
        let conn = self.conns.get_mut(key).expect("live key");
        conn.phase = Phase::Open;
        if let Some(addr) = conn.addr {
            self.connects_done.push((conn.service.clone(), addr, true));
        }
        self.session.accept(conn.stream);
        let local = conn
            .sock
            .local_addr()
            .map_or_else(String::new, |a| format!(" from {a}"));
        let line = format!(
            "stream {} ({}) connected to {}{local}",
            conn.stream, conn.service, conn.peer
        );
        self.sync_interest(key, registry, now);
        self.stream_log(now, &line);
    }

    /// Runs everything due: link and session timers, channel input, events,
    /// socket reads, channel output. Streams the peer opens go to `opener`.
    /// Returns whether work is left over for another turn.
    pub fn process(&mut self, now: Instant, registry: &Registry, opener: &mut dyn Opener) -> bool {
        if let Some(news) = self.link.handle_timeout(now, registry, &mut self.session) {
            self.log_link(news, now);
        }
        if self.session.poll_timeout().is_some_and(|t| now >= t) {
            self.session.handle_timeout(now);
        }
        self.expire_connects(now);
        self.retry_connects(now, registry, opener);
        self.sweep(now, registry);
        for _ in 0..ROUNDS {
            if let Some(news) = self.link.read(now, registry, &mut self.session) {
                self.log_link(news, now);
            }
            self.dispatch(now, registry, opener);
            self.serve_ready(now, registry);
            let before = self.session.stats().bytes_out;
            if let Some(news) = self.link.write(now, registry, &mut self.session) {
                self.log_link(news, now);
            }
            let wrote = before != self.session.stats().bytes_out;
            if !wrote && !self.link.may_read() {
                break;
            }
        }
        self.dispatch(now, registry, opener);
        self.check_stall(now);
        self.release_when_quiet(now);
        let stale = self.session.stats().stale_refusals;
        if stale > self.stale_refusals {
            let n = stale - self.stale_refusals;
            self.stale_refusals = stale;
            self.session_log(
                now,
                false,
                format!("ignored {n} refusal(s) that did not echo this side's nonce (stale bytes from before a restart)"),
            );
        }
        self.has_work()
    }

    /// Gives the session's buffers back once the link has been quiet for
    /// [`RELEASE_AFTER`].
    fn release_when_quiet(&mut self, now: Instant) {
        let st = self.session.stats();
        let seen = (st.bytes_in, st.bytes_out);
        if seen != self.io_seen {
            self.io_seen = seen;
            self.last_io = now;
        } else if now.saturating_duration_since(self.last_io) >= RELEASE_AFTER
            && self.session.buffers_allocated() > 0
            && !self.link.may_read()
        {
            self.session.release_buffers();
            if self.conns.is_empty() {
                // What held streams keeps its capacity otherwise.
                self.conns = Slab::default();
                self.by_stream = HashMap::new();
                self.ready = VecDeque::new();
                self.dirty = Vec::new();
                self.connecting = VecDeque::new();
                self.closed = Vec::new();
            }
        }
    }

    /// Ends the session if the peer has read nothing for the write-stall
    /// timeout while bytes wait for it: the channel did not take them, or
    /// (with CHANNEL_ACK) the peer acknowledged nothing, so bulk stays held
    /// back though the channel would take more.
    fn check_stall(&mut self, now: Instant) {
        let Some(limit) = self.cfg.write_stall else { return };
        let out = self.session.peer_progress();
        if !self.session.is_established() || self.session.tx_pending() == 0 {
            self.stalled = None;
            return;
        }
        match self.stalled {
            Some((_, seen)) if seen != out => self.stalled = Some((now, out)),
            Some((since, _)) if now.duration_since(since) >= limit => {
                self.stalled = None;
                let detail = format!("peer read nothing for {} s", limit.as_secs());
                self.session.abort(Code::Timeout, detail, now);
            }
            Some(_) => {}
            None => self.stalled = Some((now, out)),
        }
    }

    fn has_work(&self) -> bool {
        let channel_input = self.link.may_read() && self.session.can_receive();
        let stream_input = !self.ready.is_empty() && self.session.can_send_data();
        channel_input || stream_input
    }

    /// The next time [`Channel::process`] must run without readiness.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = [
            self.link.poll_timeout(),
            self.session.poll_timeout(),
            self.connecting.front().map(|c| c.0),
            self.next_sweep,
            self.stalled
                .and_then(|(since, _)| self.cfg.write_stall.map(|l| since + l)),
        ];
        t.into_iter().flatten().min()
    }

    /// Handles session events until none is left, then writes gathered DATA.
    fn dispatch(&mut self, now: Instant, registry: &Registry, opener: &mut dyn Opener) {
        while let Some(ev) = self.session.poll_event(now) {
            match ev.into_owned() {
                Ok(ev) => self.on_event(ev, now, registry, opener),
                Err((stream, bytes)) => {
                    self.counters.bytes_from_peer += bytes.len() as u64;
                    let Some(&key) = self.by_stream.get(&stream) else {
                        // The session knows a stream the channel has not added
                        // or just dropped: nothing can take the bytes.
                        continue;
                    };
                    let conn = self.conns.get_mut(key).expect("mapped key");
                    conn.last_active = now;
                    if bytes.len() < GATHER_BELOW {
                        // Accounted against the budget when flushed, below:
                        // what one dispatch gathers is bounded by the input
                        // buffer.
                        conn.buffer(bytes);
                        if !conn.dirty {
                            conn.dirty = true;
                            self.dirty.push(key);
                        }
                    } else {
                        let w = conn.deliver(bytes);
                        self.after_write(key, stream, w, registry, now);
                    }
                }
            }
        }
        for key in std::mem::take(&mut self.dirty) {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.dirty = false;
                self.flush_conn(key, registry, now);
            }
        }
    }

    fn on_event(&mut self, ev: Event<'static>, now: Instant, registry: &Registry, opener: &mut dyn Opener) {
        match ev {
            Event::Data { .. } => unreachable!("split off by dispatch"),
            Event::Established(info) => self.session_log(
                now,
                false,
                format!(
                    "session established (version {}, peer {:?}, session tag {:04x})",
                    info.version, info.peer_identity, info.tag
                ),
            ),
            Event::Ended(reason) => {
                let n = self.conns.len();
                let stats = self.session.stats();
                let counters = format!(
                    "frames {}, stream violations {}, opens refused for rate {}, throttled {}x",
                    stats.frames_in, stats.stream_violations, stats.opens_refused_for_rate, stats.throttled
                );
                *self.counters.sessions_ended.entry(reason.kind()).or_default() += 1;
                if n > 0 || reason.is_failure() {
                    self.session_log(
                        now,
                        true,
                        format!("session ended: {reason}; resetting {n} stream(s) ({counters})"),
                    );
                } else {
                    self.session_log(now, false, format!("session ended: {reason} ({counters})"));
                }
                let why = format!("session ended: {reason}");
                for key in self.conns.keys().collect::<Vec<_>>() {
                    self.drop_conn(key, registry, &why, false, now);
                }
                self.ready.clear();
                self.connecting.clear();
            }
            Event::Rejected { by_peer, code, text } => {
                let who = if by_peer {
                    "peer refused the handshake"
                } else {
                    "refused the peer's handshake"
                };
                self.session_log(now, true, format!("{who}: {code}: {text}"));
            }
            Event::GoingAway { code, drain, text } => {
                let ms = drain.as_millis();
                self.session_log(
                    now,
                    false,
                    format!("peer is going away ({code}: {text}); draining for {ms} ms"),
                );
            }
            Event::Opened {
                stream,
                service,
                client,
            } => self.opened(stream, service, client, now, registry, opener),
            Event::Accepted { stream } => ::log::debug!("{}stream {stream} accepted", self.cfg.label),
            Event::Refused {
                stream,
                code,
                text,
                by_peer,
            } => {
                *self.counters.refused.entry(code).or_default() += 1;
                if let Some(&key) = self.by_stream.get(&stream) {
                    self.drop_conn(
                        key,
                        registry,
                        &format!("refused by host: {code}: {text}"),
                        false,
                        now,
                    );
                } else if !by_peer {
                    self.stream_log(now, &format!("stream {stream} refused: {code}: {text}"));
                }
            }
            Event::Finished { stream } => {
                if let Some(&key) = self.by_stream.get(&stream) {
                    let conn = self.conns.get_mut(key).expect("mapped key");
                    conn.peer_fin = true;
                    conn.note_half_close(now);
                    self.half_closed(now);
                    self.flush_conn(key, registry, now);
                }
            }
            Event::Reset {
                stream,
                code,
                text,
                by_peer,
            } => {
                if let Some(&key) = self.by_stream.get(&stream) {
                    let who = if by_peer {
                        "reset by peer"
                    } else {
                        "reset (peer broke stream rules)"
                    };
                    self.drop_conn(key, registry, &format!("{who}: {code}: {text}"), false, now);
                }
            }
            Event::Credit { stream } => {
                if let Some(&key) = self.by_stream.get(&stream) {
                    self.enqueue(key);
                }
            }
        }
    }

    /// Refuses a stream the peer opened, counting the code.
    fn refuse(&mut self, stream: StreamId, code: Code, text: &str) {
        *self.counters.refused.entry(code).or_default() += 1;
        self.session.refuse(stream, code, text);
    }

    /// The peer opened a stream: add its socket at once, before any DATA that
    /// follows the OPEN is dispatched.
    fn opened(
        &mut self,
        stream: StreamId,
        service: String,
        client: Option<crate::proto::PeerText>,
        now: Instant,
        registry: &Registry,
        opener: &mut dyn Opener,
    ) {
        // Counted before connecting, so that a guest at its limit costs the
        // service nothing.
        if let Err(r) = self.cfg.budget.try_stream() {
            let text = r.to_string();
            self.stream_log(
                now,
                &format!("stream {stream} ({service}) refused: RESOURCE_LIMIT: {text}"),
            );
            self.refuse(stream, Code::ResourceLimit, &text);
            return;
        }
        let opening = match opener.open(stream, &service, &[], now) {
            Ok(o) => o,
            Err((code, text)) => {
                self.cfg.budget.release_stream();
                self.stream_log(
                    now,
                    &format!("stream {stream} ({service}) refused: {code}: {text}"),
                );
                self.refuse(stream, code, &text);
                return;
            }
        };
        let peer = opening.addr.map_or_else(|| service.clone(), |a| a.to_string());
        let added = Conn::new(
            stream,
            service.clone(),
            peer,
            opening.sock,
            Phase::Connecting,
            now,
        )
        .and_then(|mut conn| {
            conn.addr = opening.addr;
            conn.client = client.map(|c| c.to_string());
            conn.set_preamble(&opening.preamble);
            self.add_conn(registry, conn, now)
        });
        if let Err(e) = added {
            self.cfg.budget.release_stream();
            let text = format!("cannot use the socket: {e}");
            self.stream_log(
                now,
                &format!("stream {stream} ({service}) refused: RESOURCE_LIMIT: {text}"),
            );
            self.refuse(stream, Code::ResourceLimit, &text);
        }
    }

    /// Connects that failed: the next address of the service, or the
    /// refusal. The stream keeps what the guest sent meanwhile.
    fn retry_connects(&mut self, now: Instant, registry: &Registry, opener: &mut dyn Opener) {
        for (service, addr, ok) in self.connects_done.drain(..) {
            opener.connected(&service, addr, ok, now);
        }
        for (key, stream, why) in std::mem::take(&mut self.connects_failed) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.phase != Phase::Connecting || conn.stream != stream {
                continue;
            }
            if let Some(addr) = conn.addr {
                opener.connected(&conn.service, addr, false, now);
                conn.tried.push(addr);
            }
            let (stream, attempt) = (conn.stream, conn.attempt + 1);
            let service = conn.service.clone();
            match opener.open(stream, &service, &conn.tried, now) {
                Ok(o) => {
                    let token = Token(self.token_base + 1 + key);
                    let conn = self.conns.get_mut(key).expect("live key");
                    let old = std::mem::replace(&mut conn.sock, o.sock);
                    old.abort(registry);
                    conn.addr = o.addr;
                    conn.peer = o.addr.map_or_else(|| service.clone(), |a| a.to_string());
                    conn.attempt = attempt;
                    conn.set_preamble(&o.preamble);
                    let r = conn
                        .sock
                        .abort_on_close()
                        .and_then(|()| conn.register_anew(registry, token));
                    let line = format!("stream {stream} ({service}): {why}; trying {}", conn.peer);
                    self.stream_log(now, &line);
                    self.connecting
                        .push_back((now + self.cfg.connect_timeout, key, stream, attempt));
                    if let Err(e) = r {
                        let text = format!("cannot use the socket: {e}");
                        self.refuse(stream, Code::ResourceLimit, &text);
                        self.drop_conn(key, registry, &format!("refused: {text}"), false, now);
                    }
                }
                Err((code, text)) => {
                    let text = if attempt == 1 {
                        why.clone()
                    } else {
                        format!("{text}; last: {why}")
                    };
                    self.refuse(stream, code, &text);
                    self.drop_conn(key, registry, &format!("refused: {code}: {text}"), false, now);
                }
            }
        }
    }

    /// (host) Resets every stream for which `why` gives a code and a reason
    /// (say, its service was removed, or the guest may no longer open it);
    /// returns how many.
    pub fn reset_streams(
        &mut self,
        now: Instant,
        registry: &Registry,
        why: impl Fn(&str) -> Option<(Code, String)>,
    ) -> usize {
        let mut n = 0;
        for key in self.conns.keys().collect::<Vec<_>>() {
            let conn = self.conns.get(key).expect("listed");
            if let Some((code, text)) = why(&conn.service) {
                let stream = conn.stream;
                self.session.reset(stream, code, &text);
                self.drop_conn(key, registry, &format!("reset: {code}: {text}"), false, now);
                n += 1;
            }
        }
        n
    }

    // ---- shutdown ----

    /// Stops for good: GOAWAY now; the caller calls [`Channel::finish_shutdown`]
    /// when the grace period is over.
    pub fn shutdown(&mut self, grace: Duration, now: Instant) {
        self.session.shutdown(grace, now);
    }

    /// True once the session is closed and everything was written (or the
    /// link is gone).
    pub fn is_shut_down(&self) -> bool {
        self.session.is_closed() && (!self.session.wants_write() || !self.link.is_connected())
    }

    /// After the grace period: reset what remains and close the link.
    /// (Dropping a channel gives back what its streams hold too, without the
    /// resets.)
    pub fn finish_shutdown(&mut self, now: Instant, registry: &Registry) {
        self.session.close(now);
        self.dispatch(now, registry, &mut NoOpener);
        let _ = self.link.write(now, registry, &mut self.session);
        self.link.close(registry);
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        for key in self.conns.keys().collect::<Vec<_>>() {
            let conn = self.conns.remove(key).expect("listed");
            if conn.quiet_since.is_some() {
                self.cfg.budget.set_quiet(false);
            }
            self.cfg.budget.release_buffer(conn.reserved);
            self.cfg.budget.release_stream();
        }
    }
}
