//! One channel's multiplexer: a [`Session`], its [`Link`], and the local
//! sockets of the streams it carries. Both bridges use it; what differs is who
//! creates streams: the guest's listeners call [`Mux::add_conn`], the host's
//! [`Opener`] connects to the service a stream names.
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
//! Limits (host side, [`MuxConfig`]): bytes buffered per guest and
//! descriptors for all guests ([`Budget`]), idle and half-closed stream
//! timeouts, and at most [`STREAM_LOG_PER_SEC`] stream log lines a second.
//!
//! `streams.rs` holds the socket side (flush, read, timeouts, close).

mod streams;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::{Registry, Token};

use super::conn::{Conn, Phase};
use super::limits::{Budget, LogLimiter, StreamTimeouts};
use super::link::{Link, LinkNews};
use super::slab::Slab;
use super::sock::Sock;
use crate::proto::{Code, Event, Session, StreamId};

/// Rounds of read-channel / dispatch / write-channel per turn.
const ROUNDS: usize = 8;
/// DATA payloads smaller than this are gathered and written once per dispatch.
const GATHER_BELOW: usize = 4096;
/// Stream open/close lines logged per second per channel; the rest are counted.
pub const STREAM_LOG_PER_SEC: u32 = 1000;
/// Session and channel lines logged per second per channel.
pub const SESSION_LOG_PER_SEC: u32 = 20;
/// Default of [`MuxConfig::write_stall`].
pub const DEFAULT_WRITE_STALL: Duration = Duration::from_secs(30);

/// How the host side turns a stream the guest opened into a socket.
pub trait Opener {
    /// Starts connecting `stream` to `service`. Returns the socket (its
    /// connect may still be in progress) and where it leads, or why the open
    /// is refused.
    fn open(&mut self, stream: StreamId, service: &str) -> Result<(Sock, String), (Code, String)>;
}

/// The guest side's [`Opener`]: the host opens no streams in version 1 (the
/// session treats an OPEN from the host as a violation before it gets here).
pub struct NoOpener;

impl Opener for NoOpener {
    fn open(&mut self, _: StreamId, _: &str) -> Result<(Sock, String), (Code, String)> {
        Err((Code::NotPermitted, "the guest accepts no streams".into()))
    }
}

/// How a [`Mux`] is set up.
#[derive(Debug)]
pub struct MuxConfig {
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

impl MuxConfig {
    /// No limits: the guest side, whose peer is the trusted host.
    pub fn unlimited(label: String) -> MuxConfig {
        MuxConfig {
            label,
            connect_timeout: Duration::from_secs(5),
            budget: Arc::new(Budget::unlimited()),
            timeouts: StreamTimeouts::default(),
            write_stall: Some(DEFAULT_WRITE_STALL),
        }
    }
}

#[derive(Debug)]
pub struct Mux {
    pub session: Session,
    pub link: Link,
    cfg: MuxConfig,
    conns: Slab<Conn>,
    by_stream: HashMap<StreamId, usize>,
    ready: VecDeque<usize>,
    /// Connections with gathered small DATA to write at the end of dispatch.
    dirty: Vec<usize>,
    /// Token of the link; connection `k` has `token_base + 1 + k`.
    token_base: usize,
    /// Connects in progress in start order, hence in deadline order.
    connecting: VecDeque<(Instant, usize, StreamId)>,
    /// When stream timeouts are next checked.
    next_sweep: Option<Instant>,
    log: LogLimiter,
    session_log: LogLimiter,
    /// Since when bytes wait to be written and none could be, and the
    /// session's output counter then.
    stalled: Option<(Instant, u64)>,
}

impl Mux {
    pub fn new(session: Session, link: Link, cfg: MuxConfig) -> Mux {
        let token_base = link.token().0;
        Mux {
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
        }
    }

    pub fn label(&self) -> &str {
        &self.cfg.label
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.cfg.budget
    }

    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Adds a stream's socket: a guest client (`Phase::Open`) or a host
    /// connect in progress (`Phase::Connecting`). Fails when the descriptor
    /// budget is spent or the socket cannot be registered.
    pub fn add_conn(&mut self, registry: &Registry, mut conn: Conn, now: Instant) -> std::io::Result<()> {
        if !self.cfg.budget.try_fd() {
            let max = self.cfg.budget.max_fds();
            return Err(std::io::Error::other(format!(
                "descriptor limit of {max} reached"
            )));
        }
        let stream = conn.stream;
        let phase = conn.phase;
        let base = self.token_base;
        let added = self.conns.insert_with(|key| {
            let r = conn.sock.register(registry, Token(base + 1 + key));
            (conn, r)
        });
        let key = match added {
            Ok(key) => key,
            Err(e) => {
                self.cfg.budget.release_fd();
                return Err(e);
            }
        };
        self.by_stream.insert(stream, key);
        if phase == Phase::Connecting {
            self.connecting
                .push_back((now + self.cfg.connect_timeout, key, stream));
        }
        let timeouts = self.cfg.timeouts;
        if (timeouts.idle.is_some() || timeouts.half_closed.is_some()) && self.next_sweep.is_none() {
            self.next_sweep = Some(now + streams::SWEEP_EVERY);
        }
        Ok(())
    }

    /// A readiness event for the link or one of this mux's connections.
    pub fn ready(&mut self, ev: &mio::event::Event, registry: &Registry) {
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
                Ok(true) => self.connected(key),
                Err(e) => {
                    let text = format!("connect to {}: {e}", conn.peer);
                    self.session.refuse(conn.stream, Code::Unreachable, &text);
                    self.drop_conn(key, registry, &format!("refused: {text}"), false);
                    return;
                }
            }
        }
        if writable {
            self.flush_conn(key, registry);
        }
        if readable {
            self.enqueue(key);
        }
    }

    fn connected(&mut self, key: usize) {
        let conn = self.conns.get_mut(key).expect("live key");
        conn.phase = Phase::Open;
        self.session.accept(conn.stream);
        let line = format!(
            "stream {} ({}) connected to {}",
            conn.stream, conn.service, conn.peer
        );
        self.stream_log(&line);
    }

    /// Runs everything due: link and session timers, channel input, events,
    /// socket reads, channel output. Streams the peer opens go to `opener`.
    /// Returns whether work is left over for another turn.
    pub fn process(&mut self, now: Instant, registry: &Registry, opener: &mut dyn Opener) -> bool {
        if let Some(news) = self.link.handle_timeout(now, registry, &mut self.session) {
            self.log_link(news);
        }
        if self.session.poll_timeout().is_some_and(|t| now >= t) {
            self.session.handle_timeout(now);
        }
        self.expire_connects(now, registry);
        self.sweep(now, registry);
        for _ in 0..ROUNDS {
            if let Some(news) = self.link.read(now, registry, &mut self.session) {
                self.log_link(news);
            }
            self.dispatch(now, registry, opener);
            self.serve_ready(now, registry);
            let before = self.session.poll_transmit().len();
            if let Some(news) = self.link.write(now, registry, &mut self.session) {
                self.log_link(news);
            }
            let wrote = before != self.session.poll_transmit().len();
            if !wrote && !self.link.may_read() {
                break;
            }
        }
        self.dispatch(now, registry, opener);
        self.check_stall(now);
        self.has_work()
    }

    /// Ends the session if the peer has read nothing for the write-stall
    /// timeout while bytes wait for it.
    fn check_stall(&mut self, now: Instant) {
        let Some(limit) = self.cfg.write_stall else { return };
        let out = self.session.stats().bytes_out;
        if !self.session.is_established() || !self.session.wants_write() {
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

    fn log_link(&mut self, news: LinkNews) {
        let spec = self.link.spec().to_string();
        match news {
            LinkNews::Connected => self.session_log(false, format!("channel {spec} connected")),
            LinkNews::Opened(path) => self.session_log(
                false,
                format!("channel {spec} opened ({}); waiting for the host", path.display()),
            ),
            LinkNews::HostPresent => self.session_log(false, format!("channel {spec}: host connected")),
            LinkNews::Lost(why) => self.session_log(true, format!("channel {spec} lost: {why}")),
            LinkNews::HostAbsent => self.session_log(true, format!("channel {spec}: host disconnected")),
            LinkNews::Failed {
                error,
                retry_in,
                repeated,
            } => {
                // The same failure again: quietly, so a stopped VM does not
                // flood the log; loudly once a minute.
                let ms = retry_in.as_millis();
                if repeated {
                    debug!("{}channel {spec}: {error}; retrying in {ms} ms", self.cfg.label);
                } else {
                    let line =
                        format!("channel {spec}: {error}; retrying in {ms} ms (repeats logged at debug)");
                    self.session_log(true, line);
                }
            }
        }
    }

    /// Logs a session or channel line, within [`SESSION_LOG_PER_SEC`]: a peer
    /// restarting sessions in a loop cannot flood the log.
    fn session_log(&mut self, warning: bool, line: String) {
        let (allowed, dropped) = self.session_log.allow(Instant::now());
        if let Some(n) = dropped {
            warn!(
                "{}{n} session log lines suppressed in the last second",
                self.cfg.label
            );
        }
        if allowed && warning {
            warn!("{}{line}", self.cfg.label);
        } else if allowed {
            info!("{}{line}", self.cfg.label);
        }
    }

    /// Logs a stream line, within [`STREAM_LOG_PER_SEC`]: a guest opening and
    /// closing streams in a loop cannot flood the log.
    fn stream_log(&mut self, line: &str) {
        let (allowed, dropped) = self.log.allow(Instant::now());
        if let Some(n) = dropped {
            warn!(
                "{}{n} stream log lines suppressed in the last second",
                self.cfg.label
            );
        }
        if allowed {
            info!("{}{line}", self.cfg.label);
        }
    }

    fn has_work(&self) -> bool {
        let channel_input = self.link.may_read() && self.session.can_receive();
        let stream_input = !self.ready.is_empty() && self.session.can_send_data();
        channel_input || stream_input
    }

    /// The next time [`Mux::process`] must run without readiness.
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
                    let Some(&key) = self.by_stream.get(&stream) else {
                        // The session knows a stream the mux has not added or
                        // just dropped: nothing can take the bytes.
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
                        self.after_write(key, stream, w, registry);
                    }
                }
            }
        }
        for key in std::mem::take(&mut self.dirty) {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.dirty = false;
                self.flush_conn(key, registry);
            }
        }
    }

    fn on_event(&mut self, ev: Event<'static>, now: Instant, registry: &Registry, opener: &mut dyn Opener) {
        match ev {
            Event::Data { .. } => unreachable!("split off by dispatch"),
            Event::Established(info) => self.session_log(
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
                if n > 0 || reason.is_failure() {
                    self.session_log(
                        true,
                        format!("session ended: {reason}; resetting {n} stream(s) ({counters})"),
                    );
                } else {
                    self.session_log(false, format!("session ended: {reason} ({counters})"));
                }
                let why = format!("session ended: {reason}");
                for key in self.conns.keys().collect::<Vec<_>>() {
                    self.drop_conn(key, registry, &why, false);
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
                self.session_log(true, format!("{who}: {code}: {text}"));
            }
            Event::GoingAway { code, drain, text } => {
                let ms = drain.as_millis();
                self.session_log(
                    false,
                    format!("peer is going away ({code}: {text}); draining for {ms} ms"),
                );
            }
            Event::Opened { stream, service } => self.opened(stream, service, now, registry, opener),
            Event::Accepted { stream } => debug!("{}stream {stream} accepted", self.cfg.label),
            Event::Refused {
                stream,
                code,
                text,
                by_peer,
            } => {
                if let Some(&key) = self.by_stream.get(&stream) {
                    self.drop_conn(key, registry, &format!("refused by host: {code}: {text}"), false);
                } else if !by_peer {
                    self.stream_log(&format!("stream {stream} refused: {code}: {text}"));
                }
            }
            Event::Finished { stream } => {
                if let Some(&key) = self.by_stream.get(&stream) {
                    let conn = self.conns.get_mut(key).expect("mapped key");
                    conn.peer_fin = true;
                    conn.note_half_close(now);
                    self.flush_conn(key, registry);
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
                    self.drop_conn(key, registry, &format!("{who}: {code}: {text}"), false);
                }
            }
            Event::Credit { stream } => {
                if let Some(&key) = self.by_stream.get(&stream) {
                    self.enqueue(key);
                }
            }
        }
    }

    /// The peer opened a stream: add its socket at once, before any DATA that
    /// follows the OPEN is dispatched.
    fn opened(
        &mut self,
        stream: StreamId,
        service: String,
        now: Instant,
        registry: &Registry,
        opener: &mut dyn Opener,
    ) {
        if !self.cfg.budget.fd_available() {
            let text = format!("descriptor limit of {} reached", self.cfg.budget.max_fds());
            self.stream_log(&format!(
                "stream {stream} ({service}) refused: RESOURCE_LIMIT: {text}"
            ));
            self.session.refuse(stream, Code::ResourceLimit, &text);
            return;
        }
        let (sock, peer) = match opener.open(stream, &service) {
            Ok(s) => s,
            Err((code, text)) => {
                self.stream_log(&format!("stream {stream} ({service}) refused: {code}: {text}"));
                self.session.refuse(stream, code, &text);
                return;
            }
        };
        let conn = Conn::new(stream, service.clone(), peer, sock, Phase::Connecting, now);
        if let Err(e) = self.add_conn(registry, conn, now) {
            let text = format!("cannot add the socket: {e}");
            self.stream_log(&format!(
                "stream {stream} ({service}) refused: RESOURCE_LIMIT: {text}"
            ));
            self.session.refuse(stream, Code::ResourceLimit, &text);
        }
    }

    /// Stops for good: GOAWAY now; the caller calls [`Mux::finish_shutdown`]
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
    /// (Dropping a mux gives back what its streams hold too, without the
    /// resets.)
    pub fn finish_shutdown(&mut self, now: Instant, registry: &Registry) {
        self.session.close(now);
        self.dispatch(now, registry, &mut NoOpener);
        let _ = self.link.write(now, registry, &mut self.session);
        self.link.close(registry);
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        for key in self.conns.keys().collect::<Vec<_>>() {
            let conn = self.conns.remove(key).expect("listed");
            self.cfg.budget.release_buffer(conn.reserved);
            self.cfg.budget.release_fd();
        }
    }
}
