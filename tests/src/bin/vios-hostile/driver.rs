//! The event loop: accept the host bridge's connection, handshake with a real
//! [`Session`], then hand the socket to the attack and read (or not) what
//! comes back, until the deadline.
//!
//! The socket is non-blocking and every wait has a timeout, so the deadline
//! holds even when the host stops reading.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use vios_common::proto::frame::{decode, Decoded, Frame};
use vios_common::proto::hello::{find_magic, Hello, HelloParse, Limits, Role, MAGIC, NO_NONCE};
use vios_common::proto::rng::SplitMix64;
use vios_common::proto::session::{Config, Event, Session};
use vios_common::proto::{Code, EndReason};

use crate::attack::{Attack, Est, Mode};
use crate::out::Out;
use crate::stats::Stats;
use crate::sys;

const LISTENER: Token = Token(0);
const CONN: Token = Token(1);
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read per turn before the attack gets to write again.
const READ_BUDGET: usize = 1 << 20;
/// A PING goes out after this long without writing anything (raw sessions).
const KEEPALIVE: Duration = Duration::from_secs(2);
/// Longest sleep of the loop, whatever the timers say.
const MAX_WAIT: Duration = Duration::from_millis(100);
const IDENTITY: &str = "vios-hostile";

enum Phase {
    /// No host connected.
    NoConn,
    /// Handshaking with a real Session, fed one complete HELLO at a time so
    /// that nothing after the establishing HELLO reaches it.
    Hs(Box<Session>),
    /// idle: the Session runs the whole connection.
    Managed(Box<Session>),
    /// Established: the attack writes raw frames; what comes back is parsed here.
    Raw(Est),
    /// No more handshakes (garbage after its one session): discard input.
    Passive,
    /// slow-hello: a HELLO trickling out one byte at a time.
    Slow {
        hello: Vec<u8>,
        sent: usize,
        next: Instant,
    },
}

/// What to do after a frame of a raw session.
enum After {
    Go,
    End {
        how: &'static str,
        code: Option<Code>,
        text: String,
    },
}

pub struct Driver {
    attack: Attack,
    pub stats: Stats,
    pub out: Out,
    listener: UnixListener,
    conn: Option<UnixStream>,
    readable: bool,
    writable: bool,
    inbuf: Vec<u8>,
    in_pos: usize,
    phase: Phase,
    rng: SplitMix64,
    poll: Poll,
    batch: usize,
    /// slow-hello: time between bytes.
    byte_interval: Duration,
    last_tx: Instant,
    /// Inside a run of undecodable bytes (counted once).
    desynced: bool,
    /// The connection failed: how and why (handled at the end of the turn).
    closed: Option<(&'static str, String)>,
    /// Largest DATA payload we declared (what the host may send us).
    our_max_frame: usize,
    /// Stop once this many sessions were established (and their HELLOs written).
    pub max_sessions: Option<u64>,
    /// Declare the largest frame payload and window the protocol allows.
    pub declare_max: bool,
    /// Written once the attack begins (the first session, or the first
    /// connection for modes that never handshake).
    pub started_file: Option<std::path::PathBuf>,
}

impl Driver {
    pub fn new(
        attack: Attack,
        mut listener: UnixListener,
        seed: u64,
        batch: usize,
        byte_interval: Duration,
    ) -> io::Result<Driver> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let now = Instant::now();
        Ok(Driver {
            attack,
            stats: Stats::new(now),
            out: Out::default(),
            listener,
            conn: None,
            readable: false,
            writable: false,
            inbuf: Vec::new(),
            in_pos: 0,
            phase: Phase::NoConn,
            rng: SplitMix64::new(seed),
            poll,
            batch,
            byte_interval,
            last_tx: now,
            desynced: false,
            closed: None,
            our_max_frame: Config::new(Role::Guest, IDENTITY).limits.max_frame_payload as usize,
            max_sessions: None,
            declare_max: false,
            started_file: None,
        })
    }

    pub fn attack(&self) -> &Attack {
        &self.attack
    }

    /// Tells whoever waits that the attack is under way (once).
    fn mark_started(&mut self) {
        if let Some(f) = self.started_file.take() {
            if let Err(e) = std::fs::write(&f, "started\n") {
                warn!("cannot write {}: {e}", f.display());
            }
        }
    }

    /// Runs until `deadline` or SIGTERM/SIGINT.
    pub fn run(&mut self, deadline: Instant) {
        let mut events = Events::with_capacity(16);
        loop {
            let now = Instant::now();
            if now >= deadline || sys::stop_requested() {
                break;
            }
            if self.max_sessions.is_some_and(|m| self.stats.sessions >= m) && self.out.pending() == 0 {
                info!("{} session(s) established: stopping", self.stats.sessions);
                break;
            }
            if self.conn.is_none() {
                match self.listener.accept() {
                    Ok((conn, _)) => self.on_connect(conn, now),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.wait(&mut events, deadline.min(now + MAX_WAIT));
                        continue;
                    }
                    Err(e) => {
                        warn!("accept failed: {e}");
                        self.wait(&mut events, deadline.min(now + MAX_WAIT));
                        continue;
                    }
                }
                if self.conn.is_none() {
                    continue;
                }
            }
            let mut progress = false;
            if self.readable && self.wants_read() {
                progress |= self.do_read(now);
            }
            self.timers(now);
            if self.closed.is_none() && self.writable {
                if self.out.pending() < self.batch / 4 {
                    self.generate(now);
                }
                if self.out.pending() > 0 {
                    progress |= self.do_write(now);
                }
            }
            if let Some((how, text)) = self.closed.take() {
                self.close_conn(now, how, text);
                continue;
            }
            if !progress {
                let wake = self.next_wake(now).min(deadline).min(now + MAX_WAIT);
                self.wait(&mut events, wake);
            }
        }
    }

    fn wait(&mut self, events: &mut Events, until: Instant) {
        let timeout = until.saturating_duration_since(Instant::now());
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                warn!("poll failed: {e}");
            }
            return;
        }
        for ev in events.iter() {
            if ev.token() == CONN {
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.readable = true;
                }
                if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                    self.writable = true;
                }
            }
        }
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let far = now + MAX_WAIT;
        let phase = match &self.phase {
            Phase::Hs(s) | Phase::Managed(s) => s.poll_timeout(),
            Phase::Slow { next, .. } => Some(*next),
            Phase::Raw(_) => Some(self.last_tx + KEEPALIVE),
            Phase::NoConn | Phase::Passive => None,
        };
        [phase, self.attack.timer()]
            .into_iter()
            .flatten()
            .fold(far, Instant::min)
    }

    fn wants_read(&self) -> bool {
        match self.phase {
            Phase::NoConn => false,
            Phase::Raw(_) => self.attack.mode().reads(),
            _ => true,
        }
    }

    // ---- connection ----

    fn on_connect(&mut self, mut conn: UnixStream, now: Instant) {
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut conn, CONN, Interest::READABLE | Interest::WRITABLE)
        {
            warn!("cannot register the connection: {e}");
            return;
        }
        self.stats.connections += 1;
        info!("host connected (connection {})", self.stats.connections);
        self.conn = Some(conn);
        self.readable = true;
        self.writable = true;
        self.last_tx = now;
        self.inbuf.clear();
        self.in_pos = 0;
        match self.attack.mode() {
            Mode::SlowHello => {
                let hello = self.slow_hello();
                self.phase = Phase::Slow {
                    hello,
                    sent: 0,
                    next: now,
                };
                self.mark_started();
            }
            Mode::Idle => {
                let mut s = self.new_session(now);
                drain_tx(&mut s, &mut self.out, &mut self.stats);
                self.phase = Phase::Managed(s);
            }
            _ if self.attack.mode().never_handshakes() || !self.attack.rehandshake() => {
                self.phase = Phase::Passive;
                self.mark_started();
            }
            _ => self.start_handshake(now),
        }
    }

    fn close_conn(&mut self, now: Instant, how: &'static str, text: String) {
        if let Some(mut c) = self.conn.take() {
            let _ = self.poll.registry().deregister(&mut c);
        }
        self.stats.end(now, how, None, text.clone());
        self.attack.on_end(how, None, &text);
        self.out.drop_pending();
        self.inbuf.clear();
        self.in_pos = 0;
        self.phase = Phase::NoConn;
        self.readable = false;
        self.writable = false;
    }

    /// The guest config our sessions run with.
    fn config(&self) -> Config {
        let mut c = Config::new(Role::Guest, self.attack.identity());
        if self.declare_max {
            c.limits.max_frame_payload = Limits::MAX_FRAME_PAYLOAD;
            c.limits.initial_window = Limits::MAX_WINDOW;
        }
        c
    }

    fn new_session(&mut self, now: Instant) -> Box<Session> {
        let cfg = self.config();
        self.our_max_frame = cfg.limits.max_frame_payload as usize;
        self.attack.our_window = cfg.limits.initial_window;
        let mut s = Box::new(Session::new(cfg, self.rng.next_u64()));
        s.link_up(now);
        self.stats.handshakes += 1;
        s
    }

    fn start_handshake(&mut self, now: Instant) {
        let mut s = self.new_session(now);
        drain_tx(&mut s, &mut self.out, &mut self.stats);
        self.phase = Phase::Hs(s);
    }

    fn slow_hello(&mut self) -> Vec<u8> {
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            role: Some(Role::Guest),
            refuse: false,
            nonce: self.rng.nonce(),
            echo: NO_NONCE,
            capabilities: 0,
            limits: Config::new(Role::Guest, IDENTITY).limits,
            code: Code::NoError,
            text: IDENTITY.into(),
        };
        let mut v = Vec::new();
        hello.encode(&mut v);
        v
    }

    /// The raw session is over: drop what was queued for it, and handshake
    /// again (or not, for garbage).
    fn session_over(&mut self, now: Instant, how: &'static str, code: Option<Code>, text: String) {
        self.stats.end(now, how, code, text.clone());
        self.attack.on_end(how, code, &text);
        self.out.drop_pending();
        if self.attack.rehandshake() {
            self.start_handshake(now);
        } else {
            self.phase = Phase::Passive;
        }
    }

    // ---- reading ----

    /// Reads what the socket has (up to a budget) and processes it.
    fn do_read(&mut self, now: Instant) -> bool {
        let mut total = 0;
        while total < READ_BUDGET && self.wants_read() {
            let Some(conn) = self.conn.as_mut() else { break };
            if self.in_pos > 0 {
                self.inbuf.drain(..self.in_pos);
                self.in_pos = 0;
            }
            let start = self.inbuf.len();
            self.inbuf.resize(start + READ_CHUNK, 0);
            let r = conn.read(&mut self.inbuf[start..]);
            match r {
                Ok(0) => {
                    self.inbuf.truncate(start);
                    self.closed = Some(("eof", "the host closed the channel".into()));
                    break;
                }
                Ok(n) => {
                    self.inbuf.truncate(start + n);
                    total += n;
                    self.stats.read(n, now);
                    self.process_input(now);
                }
                Err(e) => {
                    self.inbuf.truncate(start);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => {
                            self.readable = false;
                            break;
                        }
                        io::ErrorKind::Interrupted => {}
                        _ => {
                            self.closed = Some(("read_error", e.to_string()));
                            break;
                        }
                    }
                }
            }
        }
        total > 0
    }

    /// Consumes buffered input according to the phase (which may change on
    /// the way: a handshake completes, a session ends).
    fn process_input(&mut self, now: Instant) {
        let buf = std::mem::take(&mut self.inbuf);
        let mut pos = self.in_pos;
        while pos < buf.len() {
            let avail = &buf[pos..];
            let (used, more) = match self.phase {
                Phase::NoConn => (avail.len(), false),
                Phase::Hs(_) => self.hs_input(avail, now),
                Phase::Managed(_) => self.managed_input(avail, now),
                Phase::Raw(_) if !self.attack.mode().reads() => (0, false),
                Phase::Raw(_) => self.raw_input(avail, now),
                Phase::Passive | Phase::Slow { .. } => self.discard_input(avail),
            };
            pos += used;
            if !more {
                break;
            }
        }
        self.inbuf = buf;
        self.in_pos = pos;
    }

    /// Finds the next HELLO: garbage before it is dropped, a partial one is
    /// kept, a complete valid one goes to the Session.
    fn hs_input(&mut self, avail: &[u8], now: Instant) -> (usize, bool) {
        let p = match find_magic(avail) {
            Err(keep) => return (keep, false),
            Ok(p) => p,
        };
        let (hello, len) = match Hello::parse(&avail[p..]) {
            HelloParse::Incomplete => return (p, false),
            HelloParse::Invalid(_) => return (p + 1, true),
            HelloParse::Valid(h, len) => (h, len),
        };
        self.stats.hellos_read += 1;
        let Phase::Hs(s) = &mut self.phase else {
            unreachable!()
        };
        feed(s, &avail[p..p + len]);
        let mut established = None;
        while let Some(ev) = s.poll_event(now) {
            match ev {
                Event::Established(info) => {
                    established = Some(info);
                    break;
                }
                Event::Rejected { by_peer, code, text } => {
                    let who = if by_peer { "host" } else { "we" };
                    warn!("handshake refused ({who}): {code}: {text}");
                    if self.stats.rejected.len() < 10 {
                        self.stats.rejected.push(format!("{who} refused: {code}: {text}"));
                    }
                }
                _ => {}
            }
        }
        drain_tx(s, &mut self.out, &mut self.stats);
        if let Some(info) = established {
            self.stats.sessions += 1;
            self.stats.first_session.get_or_insert(now - self.stats.start);
            if self.stats.sessions <= 20 {
                info!(
                    "session {} established: tag {:#06x}, host {:?}, limits {:?}",
                    self.stats.sessions, info.tag, info.peer_identity, info.peer_limits
                );
            }
            let est = Est {
                tag: info.tag,
                limits: info.peer_limits,
                host_nonce: hello.nonce,
                since: now,
            };
            self.attack.on_established(&est);
            self.phase = Phase::Raw(est);
            self.desynced = false;
            self.mark_started();
        }
        (p + len, true)
    }

    fn managed_input(&mut self, avail: &[u8], now: Instant) -> (usize, bool) {
        let Phase::Managed(s) = &mut self.phase else {
            unreachable!()
        };
        let used = feed(s, avail);
        pump_managed(s, &mut self.out, &mut self.stats, now);
        if self.stats.sessions > 0 {
            self.mark_started();
        }
        (used, used > 0)
    }

    fn discard_input(&mut self, avail: &[u8]) -> (usize, bool) {
        match find_magic(avail) {
            Err(keep) => (keep, false),
            Ok(p) => match Hello::parse(&avail[p..]) {
                HelloParse::Incomplete => (p, false),
                HelloParse::Invalid(_) => (p + 1, true),
                HelloParse::Valid(_, len) => {
                    self.stats.hellos_read += 1;
                    (p + len, true)
                }
            },
        }
    }

    /// One frame (or undecodable byte) of an established raw session.
    fn raw_input(&mut self, avail: &[u8], now: Instant) -> (usize, bool) {
        let Phase::Raw(est) = &self.phase else {
            unreachable!()
        };
        let (tag, host_nonce) = (est.tag, est.host_nonce);
        let (used, after) = match decode(avail, tag, self.our_max_frame) {
            Ok(Decoded::Incomplete) => return (0, false),
            Ok(Decoded::Frame(f, n)) => {
                self.desynced = false;
                self.stats.frame_in(&f);
                let after = match f {
                    Frame::Ping { opaque } => {
                        self.out.frame(tag, &Frame::Pong { opaque });
                        After::Go
                    }
                    Frame::GoAway {
                        code,
                        drain_ms: 0,
                        text,
                    } => After::End {
                        how: "goaway",
                        code: Some(code),
                        text: text.to_owned(),
                    },
                    Frame::GoAway { code, drain_ms, text } => {
                        info!("host sent GOAWAY {code} with {drain_ms} ms to drain: {text}");
                        After::Go
                    }
                    f => {
                        self.attack.on_frame(&f, &mut self.out, tag);
                        After::Go
                    }
                };
                (n, after)
            }
            Ok(Decoded::Hello) => match Hello::parse(avail) {
                HelloParse::Incomplete => return (0, false),
                HelloParse::Valid(h, n) if h.nonce == host_nonce => {
                    self.stats.hellos_read += 1;
                    (n, After::Go)
                }
                // Left in place for the new handshake to read.
                HelloParse::Valid(..) => (
                    0,
                    After::End {
                        how: "peer_hello",
                        code: None,
                        text: "the host sent a HELLO with a new nonce".into(),
                    },
                ),
                HelloParse::Invalid(why) => {
                    self.undecodable(format!("bad HELLO in session: {why}"));
                    (1, After::Go)
                }
            },
            Err(e) => {
                self.undecodable(e.to_string());
                (1, After::Go)
            }
        };
        if let After::End { how, code, text } = after {
            self.session_over(now, how, code, text);
        }
        (used, true)
    }

    fn undecodable(&mut self, what: String) {
        if !self.desynced {
            self.desynced = true;
            self.stats.decode_error(what);
        }
    }

    // ---- timers and writing ----

    fn timers(&mut self, now: Instant) {
        let mut slow_done = false;
        let mut rehello = false;
        match &mut self.phase {
            Phase::Hs(s) => {
                if s.poll_timeout().is_some_and(|t| now >= t) {
                    s.handle_timeout(now);
                }
                drain_tx(s, &mut self.out, &mut self.stats);
            }
            Phase::Managed(s) => {
                if s.poll_timeout().is_some_and(|t| now >= t) {
                    s.handle_timeout(now);
                }
                pump_managed(s, &mut self.out, &mut self.stats, now);
            }
            Phase::Slow { hello, sent, next } => {
                if now >= *next {
                    self.out.raw(&hello[*sent..*sent + 1]);
                    *sent += 1;
                    *next = now + self.byte_interval;
                    slow_done = *sent == hello.len();
                }
            }
            Phase::Raw(est) => {
                // Only once our last HELLO (the echo) is out: dropping it
                // would leave the host handshaking for ever.
                if self.out.pending() == 0 && self.attack.wants_rehello(now) {
                    rehello = true;
                } else if self.out.pending() == 0 && now >= self.last_tx + KEEPALIVE {
                    let opaque = self.rng.next_u64().to_be_bytes();
                    self.out.frame(est.tag, &Frame::Ping { opaque });
                }
            }
            Phase::NoConn | Phase::Passive => {}
        }
        if slow_done {
            // The whole HELLO is out: start another with a new nonce.
            self.stats.hellos_sent += 1;
            let hello = self.slow_hello();
            self.phase = Phase::Slow {
                hello,
                sent: 0,
                next: now + self.byte_interval,
            };
        }
        if rehello {
            self.attack.on_end("self_hello", None, "");
            self.out.drop_pending();
            self.start_handshake(now);
        }
    }

    fn generate(&mut self, now: Instant) {
        self.out.compact();
        match &self.phase {
            Phase::Raw(est) => self.attack.fill(&mut self.out, Some(est), now, self.batch),
            Phase::Passive => self.attack.fill(&mut self.out, None, now, self.batch),
            _ => {}
        }
    }

    fn do_write(&mut self, now: Instant) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let mut wrote = false;
        while self.out.pending() > 0 {
            match conn.write(self.out.unsent()) {
                Ok(0) => break,
                Ok(n) => {
                    self.out.advance(n);
                    self.stats.wrote(n, now);
                    self.last_tx = now;
                    wrote = true;
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        self.writable = false;
                        self.stats.write_blocked(now);
                        break;
                    }
                    io::ErrorKind::Interrupted => {}
                    _ => {
                        self.closed = Some(("write_error", e.to_string()));
                        break;
                    }
                },
            }
        }
        wrote
    }
}

/// Gives `bytes` to the Session as far as it takes them; returns how many.
fn feed(s: &mut Session, bytes: &[u8]) -> usize {
    let mut used = 0;
    while used < bytes.len() {
        let space = s.recv_space();
        if space.is_empty() {
            break;
        }
        let n = space.len().min(bytes.len() - used);
        space[..n].copy_from_slice(&bytes[used..used + n]);
        s.recv_commit(n);
        used += n;
    }
    used
}

/// Moves what the Session wants written into the output buffer.
fn drain_tx(s: &mut Session, out: &mut Out, stats: &mut Stats) {
    let t = s.poll_transmit();
    if t.is_empty() {
        return;
    }
    let mut rest = t;
    while let Ok(p) = find_magic(rest) {
        stats.hellos_sent += 1;
        rest = &rest[p + MAGIC.len()..];
    }
    out.raw(t);
    let n = t.len();
    s.advance_transmit(n);
}

/// idle mode: act on the Session's events and write what it wants written.
fn pump_managed(s: &mut Session, out: &mut Out, stats: &mut Stats, now: Instant) {
    while let Some(ev) = s.poll_event(now) {
        match ev.into_owned() {
            Ok(Event::Established(info)) => {
                stats.sessions += 1;
                stats.first_session.get_or_insert(now - stats.start);
                info!(
                    "session {} established: tag {:#06x}, host {:?}",
                    stats.sessions, info.tag, info.peer_identity
                );
            }
            Ok(Event::Ended(reason)) => {
                let code = match &reason {
                    EndReason::Violation { code, .. } | EndReason::PeerGoAway { code, .. } => Some(*code),
                    _ => None,
                };
                if let EndReason::PeerGoAway { code, text } = &reason {
                    stats.goaways.add(*code, text.as_str());
                }
                stats.end(now, "session", code, reason.to_string());
            }
            Ok(Event::Rejected { by_peer, code, text }) => {
                let who = if by_peer { "host" } else { "we" };
                if stats.rejected.len() < 10 {
                    stats.rejected.push(format!("{who} refused: {code}: {text}"));
                }
            }
            Ok(_) => {}
            Err((stream, bytes)) => {
                let n = bytes.len();
                s.consumed(stream, n);
            }
        }
    }
    drain_tx(s, out, stats);
}
