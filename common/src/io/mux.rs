//! One channel's multiplexer: a [`Session`], its [`Link`], and the local
//! sockets of the streams it carries. Both bridges use it; what differs is who
//! creates streams (the guest's listeners, the host's service connects),
//! which the caller does with [`Mux::add_conn`] and the `opened` list.
//!
//! Back-pressure, sozu-style, but per stream:
//! - channel → socket: DATA is written straight to the socket; the rest waits
//!   in the stream's own buffer and credit comes back only as it is written,
//!   so a slow socket closes only its own stream's window;
//! - socket → channel: a socket is read only while its stream has credit and
//!   the session's transmit buffer is below its high-water mark. Readable
//!   streams wait in a FIFO and get one read (one frame) per turn each, so a
//!   busy stream cannot starve the others.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::{Registry, Token};

use super::conn::{Conn, Phase, Written};
use super::link::{Link, LinkNews};
use super::slab::Slab;
use super::sock::{interrupted, would_block, Sock};
use crate::proto::{Code, Event, Role, Session, StreamId};

/// Reads from sockets per turn before the loop looks at other work.
const READ_BUDGET: usize = 512;
/// Rounds of read-channel / dispatch / write-channel per turn.
const ROUNDS: usize = 8;

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

#[derive(Debug)]
pub struct Mux {
    pub session: Session,
    pub link: Link,
    /// Prefix of every log line: empty, or e.g. `guest vm1 channel 0: `.
    label: String,
    conns: Slab<Conn>,
    by_stream: HashMap<StreamId, usize>,
    ready: VecDeque<usize>,
    /// Token of the link; connection `k` has `token_base + 1 + k`.
    token_base: usize,
    connect_timeout: Duration,
    /// Connects in progress in start order, hence in deadline order.
    connecting: VecDeque<(Instant, usize, StreamId)>,
}

impl Mux {
    pub fn new(session: Session, link: Link, label: String, connect_timeout: Duration) -> Mux {
        let token_base = link.token().0;
        Mux {
            session,
            link,
            label,
            conns: Slab::default(),
            by_stream: HashMap::new(),
            ready: VecDeque::new(),
            token_base,
            connect_timeout,
            connecting: VecDeque::new(),
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether `token` belongs to this mux (tokens from `token_base` to
    /// `token_base + span`).
    pub fn owns(&self, token: Token, span: usize) -> bool {
        token.0 >= self.token_base && token.0 - self.token_base < span
    }

    /// Adds a stream's socket: a guest client (`Phase::Open`) or a host
    /// connect in progress (`Phase::Connecting`).
    pub fn add_conn(&mut self, registry: &Registry, mut conn: Conn, now: Instant) -> std::io::Result<()> {
        let stream = conn.stream;
        let phase = conn.phase;
        let key = self.conns.insert_with(|key| {
            let r = conn.sock.register(registry, Token(self.token_base + 1 + key));
            (conn, r)
        })?;
        self.by_stream.insert(stream, key);
        if phase == Phase::Connecting {
            self.connecting
                .push_back((now + self.connect_timeout, key, stream));
        }
        Ok(())
    }

    /// Readiness for `token` (the link or one of this mux's connections).
    pub fn ready(&mut self, token: Token, readable: bool, writable: bool, registry: &Registry) {
        if token == self.link.token() {
            self.link.ready(readable, writable);
            return;
        }
        let key = token.0 - self.token_base - 1;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.readable |= readable;
        conn.writable |= writable;
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
        info!(
            "{}stream {} ({}) connected to {}",
            self.label, conn.stream, conn.service, conn.peer
        );
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
        for _ in 0..ROUNDS {
            if let Some(news) = self.link.read(now, registry, &mut self.session) {
                self.log_link(news);
            }
            self.dispatch(now, registry, opener);
            self.serve_ready(registry);
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
        self.has_work()
    }

    fn log_link(&self, news: LinkNews) {
        let spec = self.link.spec();
        match news {
            LinkNews::Connected => info!("{}channel {spec} connected", self.label),
            LinkNews::Opened(path) => {
                info!(
                    "{}channel {spec} opened ({}); waiting for the host",
                    self.label,
                    path.display()
                )
            }
            LinkNews::HostPresent => info!("{}channel {spec}: host connected", self.label),
            LinkNews::Lost(why) => warn!("{}channel {spec} lost: {why}", self.label),
            LinkNews::HostAbsent => warn!("{}channel {spec}: host disconnected", self.label),
            LinkNews::Failed {
                error,
                retry_in,
                repeated,
            } => {
                // The same failure again: quietly, so a stopped VM does not
                // flood the log; loudly once a minute.
                let ms = retry_in.as_millis();
                if repeated {
                    debug!("{}channel {spec}: {error}; retrying in {ms} ms", self.label);
                } else {
                    warn!(
                        "{}channel {spec}: {error}; retrying in {ms} ms (repeats logged at debug)",
                        self.label
                    );
                }
            }
        }
    }

    fn has_work(&self) -> bool {
        let channel_input = self.link.may_read();
        let stream_input = !self.ready.is_empty() && self.session.can_send_data();
        channel_input || stream_input
    }

    /// The next time [`Mux::process`] must run without readiness.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = [
            self.link.poll_timeout(),
            self.session.poll_timeout(),
            self.connecting.front().map(|c| c.0),
        ];
        t.into_iter().flatten().min()
    }

    /// Handles session events until none is left.
    fn dispatch(&mut self, now: Instant, registry: &Registry, opener: &mut dyn Opener) {
        while let Some(ev) = self.session.poll_event(now) {
            let ev = match ev.into_owned() {
                Ok(ev) => ev,
                Err((stream, bytes)) => {
                    let Some(&key) = self.by_stream.get(&stream) else {
                        // The session knows a stream the mux has not added yet
                        // or just dropped: nothing can take the bytes.
                        continue;
                    };
                    let conn = self.conns.get_mut(key).expect("mapped key");
                    let w = conn.deliver(bytes);
                    self.after_write(key, stream, w, registry);
                    continue;
                }
            };
            self.on_event(ev, now, registry, opener);
        }
    }

    fn on_event(&mut self, ev: Event<'static>, now: Instant, registry: &Registry, opener: &mut dyn Opener) {
        match ev {
            Event::Data { .. } => unreachable!("split off by dispatch"),
            Event::Established(info) => info!(
                "{}session established (version {}, peer {:?}, session tag {:04x})",
                self.label, info.version, info.peer_identity, info.tag
            ),
            Event::Ended(reason) => {
                let n = self.conns.len();
                if n > 0 || reason.is_failure() {
                    warn!("{}session ended: {reason}; resetting {n} stream(s)", self.label);
                } else {
                    info!("{}session ended: {reason}", self.label);
                }
                let why = format!("session ended: {reason}");
                for key in self.conns.keys().collect::<Vec<_>>() {
                    self.drop_conn(key, registry, &why, false);
                }
                self.ready.clear();
                self.connecting.clear();
            }
            Event::Rejected { by_peer, code, text } => {
                if by_peer {
                    warn!("{}peer refused the handshake: {code}: {text}", self.label);
                } else {
                    warn!("{}refused the peer's handshake: {code}: {text}", self.label);
                }
            }
            Event::GoingAway { code, drain, text } => {
                info!(
                    "{}peer is going away ({code}: {text}); draining for {} ms",
                    self.label,
                    drain.as_millis()
                );
            }
            Event::Opened { stream, service } => self.opened(stream, service, now, registry, opener),
            Event::Accepted { stream } => debug!("{}stream {stream} accepted", self.label),
            Event::Refused {
                stream,
                code,
                text,
                by_peer,
            } => {
                if let Some(&key) = self.by_stream.get(&stream) {
                    self.drop_conn(key, registry, &format!("refused by host: {code}: {text}"), false);
                } else if !by_peer {
                    info!("{}stream {stream} refused: {code}: {text}", self.label);
                }
            }
            Event::Finished { stream } => {
                if let Some(&key) = self.by_stream.get(&stream) {
                    self.conns.get_mut(key).expect("mapped key").peer_fin = true;
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
        let (sock, peer) = match opener.open(stream, &service) {
            Ok(s) => s,
            Err((code, text)) => {
                info!(
                    "{}stream {stream} ({service}) refused: {code}: {text}",
                    self.label
                );
                self.session.refuse(stream, code, &text);
                return;
            }
        };
        let conn = Conn::new(stream, service, peer, sock, Phase::Connecting, now);
        if let Err(e) = self.add_conn(registry, conn, now) {
            let text = format!("cannot register socket: {e}");
            warn!("{}stream {stream} refused: {text}", self.label);
            self.session.refuse(stream, Code::ResourceLimit, &text);
        }
    }

    /// Writes a connection's pending bytes (and half-close) and settles the result.
    fn flush_conn(&mut self, key: usize, registry: &Registry) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let stream = conn.stream;
        let w = conn.flush();
        self.after_write(key, stream, w, registry);
    }

    fn after_write(&mut self, key: usize, stream: StreamId, w: Written, registry: &Registry) {
        if w.n > 0 {
            self.session.consumed(stream, w.n);
        }
        if let Some(e) = w.error {
            let peer = self.conns.get(key).map_or("", |c| c.peer.as_str());
            let why = socket_failure("write", &e, peer);
            self.session.reset(stream, Code::Aborted, &why);
            self.drop_conn(key, registry, &why, false);
            return;
        }
        let conn = self.conns.get_mut(key).expect("live key");
        if conn.is_done() {
            self.drop_conn(key, registry, "finished", true);
        }
    }

    fn enqueue(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.queued && conn.readable && !conn.read_eof && conn.phase == Phase::Open {
                conn.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Reads readable sockets into DATA frames, one read per stream per pass.
    fn serve_ready(&mut self, registry: &Registry) {
        let mut budget = READ_BUDGET;
        while budget > 0 && self.session.can_send_data() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            budget -= 1;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.queued = false;
            if !conn.readable || conn.read_eof {
                continue;
            }
            let stream = conn.stream;
            // No space: no credit yet (an Event::Credit requeues the stream).
            let Some(space) = self.session.send_space(stream) else {
                continue;
            };
            let r = conn.sock.read(space);
            let n = *r.as_ref().unwrap_or(&0);
            self.session.send_commit(stream, n);
            match r {
                Ok(0) => {
                    conn.read_eof = true;
                    self.session.finish(stream);
                    if conn.is_done() {
                        self.drop_conn(key, registry, "finished", true);
                    }
                }
                Ok(n) => {
                    conn.bytes_in += n as u64;
                    self.enqueue(key);
                }
                Err(e) if would_block(&e) => conn.readable = false,
                Err(e) if interrupted(&e) => self.enqueue(key),
                Err(e) => {
                    let why = socket_failure("read", &e, &conn.peer);
                    self.session.reset(stream, Code::Aborted, &why);
                    self.drop_conn(key, registry, &why, false);
                }
            }
        }
    }

    fn expire_connects(&mut self, now: Instant, registry: &Registry) {
        while let Some(&(deadline, key, stream)) = self.connecting.front() {
            if now < deadline {
                break;
            }
            self.connecting.pop_front();
            let still = self
                .conns
                .get(key)
                .is_some_and(|c| c.stream == stream && c.phase == Phase::Connecting);
            if still {
                let conn = self.conns.get(key).expect("checked");
                let text = format!(
                    "connect to {}: timed out after {} ms",
                    conn.peer,
                    self.connect_timeout.as_millis()
                );
                self.session.refuse(stream, Code::Unreachable, &text);
                self.drop_conn(key, registry, &format!("refused: {text}"), false);
            }
        }
    }

    /// Removes a connection and logs its one closing line.
    fn drop_conn(&mut self, key: usize, registry: &Registry, why: &str, clean: bool) {
        let Some(conn) = self.conns.remove(key) else {
            return;
        };
        self.by_stream.remove(&conn.stream);
        let secs = conn.opened.elapsed().as_secs_f64();
        let (bin, bout) = (conn.bytes_in, conn.bytes_out);
        let (stream, service, peer) = (conn.stream, conn.service.clone(), conn.peer.clone());
        conn.close(registry, clean);
        let flow = match self.session.config().role {
            Role::Guest => format!("{bin} B from client, {bout} B to client"),
            Role::Host => format!("{bout} B to {peer}, {bin} B from it"),
        };
        info!(
            "{}stream {stream} ({service}) closed: {why}; {flow}; {secs:.3} s",
            self.label
        );
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
    pub fn finish_shutdown(&mut self, now: Instant, registry: &Registry) {
        self.session.close(now);
        self.dispatch(now, registry, &mut NoOpener);
        let _ = self.link.write(now, registry, &mut self.session);
        self.link.close(registry);
    }
}

/// Why a socket failed, in words for the log and the RESET text.
fn socket_failure(op: &str, e: &std::io::Error, peer: &str) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => format!("{peer} reset the connection"),
        std::io::ErrorKind::BrokenPipe => {
            format!("{peer} closed the connection while data was due")
        }
        _ => format!("{op} failed: {e}"),
    }
}
