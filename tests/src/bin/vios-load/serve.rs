//! `serve`: echo, sink or source server on mio, one event loop per thread.

use std::io::{self, ErrorKind, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use vios_common::cli::{parse_duration, parse_size};

use crate::net::{self, Listener, Stream, Target};
use crate::sys::{self, pattern, Errors, Report, CHUNK};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on: HOST:PORT (port 0 picks one) or unix:PATH.
    #[arg(long, value_parser = net::parse_target)]
    listen: Target,
    /// echo: send back everything, half-close after the client's EOF once all
    /// is echoed. sink: read and discard, half-close after EOF. source: send the
    /// pattern endlessly (or --bytes), then half-close.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Event-loop threads (TCP: one SO_REUSEPORT listener each).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// source: bytes to send per connection before half-closing (default: endless).
    #[arg(long, value_parser = parse_size)]
    bytes: Option<u64>,
    /// Set SO_SNDBUF and SO_RCVBUF of accepted sockets to this (default:
    /// kernel autotuning).
    #[arg(long, value_parser = parse_size)]
    sock_buf: Option<u64>,
    /// Write the bound address (one line) to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Stop and report after this long; 0 = run until SIGTERM/SIGINT.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Sink,
    Source,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Sink => "sink",
            Mode::Source => "source",
        }
    }
}

/// Counters shared by the threads.
#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    closed: AtomicU64,
    resets: AtomicU64,
    open: AtomicU64,
    peak: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    echo_deferred: AtomicU64,
}

pub fn run(a: &Args) -> Report {
    let mut rep = Report::new("serve");
    let threads = a.threads.max(1);
    rep.json
        .str("listen", &a.listen.to_string())
        .str("mode", a.mode.name())
        .u64("threads", threads as u64)
        .opt_u64("bytes_limit", a.bytes)
        .opt_u64("sock_buf", a.sock_buf)
        .f64("timeout_s", a.timeout.as_secs_f64(), 3);
    let (listeners, bound) = match Listener::bind(&a.listen, threads, a.sock_buf.map(|b| b as usize)) {
        Ok(l) => l,
        Err(e) => {
            rep.json.null("bound");
            rep.errors.push(format!("listen on {}: {e}", a.listen));
            return rep;
        }
    };
    rep.json.str("bound", &bound.to_string());
    eprintln!(
        "vios-load serve: {} on {bound} ({threads} thread(s)); SIGTERM/SIGINT stops and reports",
        a.mode.name()
    );
    if let Some(p) = &a.ready_file {
        if let Err(e) = write_atomically(p, &format!("{bound}\n")) {
            rep.errors.push(format!("ready file {}: {e}", p.display()));
            return rep;
        }
    }
    let start = Instant::now();
    let stats = Stats::default();
    let mode = a.mode;
    let limit = a.bytes;
    let mut errors = Errors::default();
    let mut stop = "signal";
    thread::scope(|sc| {
        let handles: Vec<_> = listeners
            .into_iter()
            .map(|l| {
                let stats = &stats;
                sc.spawn(move || serve_loop(l, mode, limit, stats))
            })
            .collect();
        while !sys::stop_requested() {
            if !a.timeout.is_zero() && start.elapsed() >= a.timeout {
                stop = "timeout";
                eprintln!("vios-load serve: --timeout {:?} reached, stopping", a.timeout);
                sys::request_stop();
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("server thread panicked"),
            }
        }
    });
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    rep.json
        .str("stop", stop)
        .f64("seconds", start.elapsed().as_secs_f64(), 3)
        .u64("accepted", g(&stats.accepted))
        .u64("closed", g(&stats.closed))
        .u64("resets", g(&stats.resets))
        .u64("open_connections", g(&stats.open))
        .u64("peak_connections", g(&stats.peak))
        .u64("bytes_received", g(&stats.bytes_in))
        .u64("bytes_sent", g(&stats.bytes_out))
        .u64("echo_deferred_bytes", g(&stats.echo_deferred));
    rep.errors.append(errors);
    rep
}

pub fn write_atomically(p: &std::path::Path, text: &str) -> io::Result<()> {
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, p)
}

/// One served connection.
struct Conn {
    s: Stream,
    readable: bool,
    writable: bool,
    queued: bool,
    rd_eof: bool,
    wr_shut: bool,
    /// echo: bytes read but not yet written back, `pending[pend_off..pend_end]`.
    pending: Vec<u8>,
    pend_off: usize,
    pend_end: usize,
    /// source: bytes sent so far.
    sent: u64,
    /// Since when it has been waiting, shut down, for its last bytes to be
    /// delivered before it is closed.
    draining: Option<Instant>,
}

enum Step {
    /// Waiting for readiness.
    Idle,
    /// Budget used up with work left: run again without waiting.
    Again,
    /// Shut down both ways; close once the last bytes written are delivered.
    Drain,
    /// Finished (cleanly, or with the error that ended it).
    Close(Option<io::Error>),
}

/// Reads/writes per connection per turn before others get theirs.
const BUDGET: usize = 16;
/// echo: leftovers up to this size are copied aside; larger ones keep the
/// read buffer.
const SMALL: usize = 16 * 1024;
/// echo: spare read buffers kept per thread.
const POOL_MAX: usize = 64;
/// echo: read buffers held by connections, at most; past this, reads are
/// SMALL, so that many stalled readers cannot take much memory.
const BIG_MAX: usize = 256;
/// How often connections draining are checked, and for how long at most.
const DRAIN_CHECK: Duration = Duration::from_millis(20);
const DRAIN_MAX: Duration = Duration::from_secs(60);
const LISTENER: Token = Token(usize::MAX);

struct Local {
    mode: Mode,
    limit: Option<u64>,
    scratch: Vec<u8>,
    bytes_in: u64,
    bytes_out: u64,
    /// echo: bytes that could not be written back at once.
    deferred: u64,
    /// echo: spare CHUNK-sized buffers.
    pool: Vec<Vec<u8>>,
    /// echo: CHUNK-sized buffers held by connections.
    big_out: usize,
}

fn serve_loop(mut l: Listener, mode: Mode, limit: Option<u64>, stats: &Stats) -> Result<(), String> {
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    poll.registry()
        .register(l.source(), LISTENER, Interest::READABLE)
        .map_err(|e| format!("register listener: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut queue: Vec<usize> = Vec::new();
    let mut next_queue: Vec<usize> = Vec::new();
    let mut lo = Local {
        mode,
        limit,
        scratch: vec![0; CHUNK],
        bytes_in: 0,
        bytes_out: 0,
        deferred: 0,
        pool: Vec::new(),
        big_out: 0,
    };
    let mut draining: Vec<usize> = Vec::new();
    let mut last_drain_check = Instant::now();
    let mut accept_blocked = false;
    let mut last_accept_note: Option<Instant> = None;
    let mut try_accept = true;
    let result = loop {
        if sys::stop_requested() {
            break Ok(());
        }
        if try_accept || accept_blocked {
            try_accept = false;
            accept_blocked = false;
            loop {
                match l.accept() {
                    Ok(mut s) => {
                        let _ = s.set_nodelay();
                        let i = free.pop().unwrap_or_else(|| {
                            conns.push(None);
                            conns.len() - 1
                        });
                        if let Err(e) = poll.registry().register(
                            &mut s,
                            Token(i),
                            Interest::READABLE | Interest::WRITABLE,
                        ) {
                            eprintln!("vios-load serve: register: {e}");
                            free.push(i);
                            continue;
                        }
                        conns[i] = Some(Conn {
                            s,
                            readable: true,
                            writable: true,
                            queued: true,
                            rd_eof: false,
                            wr_shut: false,
                            pending: Vec::new(),
                            pend_off: 0,
                            pend_end: 0,
                            sent: 0,
                            draining: None,
                        });
                        queue.push(i);
                        stats.accepted.fetch_add(1, Ordering::Relaxed);
                        let open = stats.open.fetch_add(1, Ordering::Relaxed) + 1;
                        stats.peak.fetch_max(open, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                    Err(e) => {
                        // EMFILE and friends: the connection stays queued in
                        // the kernel; try again shortly.
                        accept_blocked = true;
                        if last_accept_note.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                            eprintln!(
                                "vios-load serve: accept: {e} ({} open; raise `ulimit -n`?)",
                                stats.open.load(Ordering::Relaxed)
                            );
                            last_accept_note = Some(Instant::now());
                        }
                        break;
                    }
                }
            }
        }
        // Drive whatever is ready; what used its budget goes round again
        // after the next (non-waiting) poll.
        let mut close = |conns: &mut Vec<Option<Conn>>, lo: &mut Local, i: usize, err: Option<io::Error>| {
            if err.is_some() {
                stats.resets.fetch_add(1, Ordering::Relaxed);
            }
            stats.closed.fetch_add(1, Ordering::Relaxed);
            stats.open.fetch_sub(1, Ordering::Relaxed);
            if let Some(c) = conns[i].take() {
                lo.release(c.pending);
            }
            free.push(i);
        };
        if !queue.is_empty() {
            for i in queue.drain(..) {
                let Some(c) = conns[i].as_mut() else { continue };
                c.queued = false;
                match lo.drive(c) {
                    Step::Idle => {}
                    Step::Again => {
                        c.queued = true;
                        next_queue.push(i);
                    }
                    Step::Drain => {
                        if c.draining.is_none() {
                            c.draining = Some(Instant::now());
                            draining.push(i);
                        }
                    }
                    Step::Close(err) => {
                        if c.draining.is_some() {
                            draining.retain(|&d| d != i);
                        }
                        close(&mut conns, &mut lo, i, err);
                    }
                }
            }
            std::mem::swap(&mut queue, &mut next_queue);
        }
        // Close the connections whose last bytes have been delivered.
        if !draining.is_empty() && last_drain_check.elapsed() >= DRAIN_CHECK {
            last_drain_check = Instant::now();
            draining.retain(|&i| {
                let Some(c) = conns[i].as_ref() else { return false };
                let r = match c.s.unsent() {
                    Ok(0) => Some(None),
                    Ok(_) if c.draining.is_some_and(|t| t.elapsed() > DRAIN_MAX) => Some(None),
                    Ok(_) => None,
                    Err(e) => Some(Some(e)),
                };
                match r {
                    Some(err) => {
                        close(&mut conns, &mut lo, i, err);
                        false
                    }
                    None => true,
                }
            });
        }
        let wait = if !queue.is_empty() {
            Duration::ZERO
        } else if accept_blocked {
            Duration::from_millis(10)
        } else if !draining.is_empty() {
            DRAIN_CHECK
        } else {
            net::TICK
        };
        if let Err(e) = net::poll_once(&mut poll, &mut events, None, wait) {
            break Err(format!("poll: {e}"));
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                try_accept = true;
                continue;
            }
            let i = ev.token().0;
            let Some(c) = conns.get_mut(i).and_then(|c| c.as_mut()) else {
                continue;
            };
            c.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
            c.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
            if !c.queued {
                c.queued = true;
                queue.push(i);
            }
        }
    };
    stats.bytes_in.fetch_add(lo.bytes_in, Ordering::Relaxed);
    stats.bytes_out.fetch_add(lo.bytes_out, Ordering::Relaxed);
    stats.echo_deferred.fetch_add(lo.deferred, Ordering::Relaxed);
    result
}

/// After the peer's EOF, with everything written: half-close (if not done
/// yet), then close at once if all is delivered, else drain first. Closing
/// with bytes undelivered would leave them to an orphaned socket, which the
/// kernel resets under memory pressure.
fn finish(c: &mut Conn) -> Step {
    if !c.wr_shut {
        if let Err(e) = c.s.shutdown_write() {
            return Step::Close(Some(e));
        }
        c.wr_shut = true;
    }
    match c.s.unsent() {
        Ok(0) => Step::Close(None),
        Ok(_) => Step::Drain,
        Err(e) => Step::Close(Some(e)),
    }
}

impl Local {
    /// Takes back a connection's echo buffer.
    fn release(&mut self, buf: Vec<u8>) {
        if buf.len() == CHUNK {
            self.big_out -= 1;
            if self.pool.len() < POOL_MAX {
                self.pool.push(buf);
            }
        }
    }

    fn drive(&mut self, c: &mut Conn) -> Step {
        match self.mode {
            Mode::Echo => self.echo(c),
            Mode::Sink => self.sink(c),
            Mode::Source => self.source(c),
        }
    }

    fn echo(&mut self, c: &mut Conn) -> Step {
        for _ in 0..BUDGET {
            if c.pend_off < c.pend_end {
                // Back-pressure: read nothing more until this is written.
                if !c.writable {
                    return Step::Idle;
                }
                match c.s.write(&c.pending[c.pend_off..c.pend_end]) {
                    Ok(n) => {
                        self.bytes_out += n as u64;
                        c.pend_off += n;
                        if c.pend_off == c.pend_end {
                            let buf = std::mem::take(&mut c.pending);
                            c.pend_off = 0;
                            c.pend_end = 0;
                            self.release(buf);
                        }
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        c.writable = false;
                        return Step::Idle;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Step::Close(Some(e)),
                }
            }
            if c.rd_eof {
                return finish(c);
            }
            // Back-pressure: nothing is read while nothing can be written.
            if !c.readable || !c.writable {
                return Step::Idle;
            }
            let want = if self.big_out >= BIG_MAX { SMALL } else { CHUNK };
            match c.s.read(&mut self.scratch[..want]) {
                Ok(0) => c.rd_eof = true,
                Ok(n) => {
                    self.bytes_in += n as u64;
                    let mut w = 0;
                    if c.writable {
                        match c.s.write(&self.scratch[..n]) {
                            Ok(m) => w = m,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => c.writable = false,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => return Step::Close(Some(e)),
                        }
                    }
                    self.bytes_out += w as u64;
                    if w < n {
                        // Keep the rest for when the socket can take it:
                        // a little is copied, a lot keeps the whole buffer
                        // (the loop goes on with a spare one).
                        self.deferred += (n - w) as u64;
                        if n - w <= SMALL {
                            c.pending = self.scratch[w..n].to_vec();
                            (c.pend_off, c.pend_end) = (0, n - w);
                        } else {
                            let spare = self.pool.pop().unwrap_or_else(|| vec![0; CHUNK]);
                            c.pending = std::mem::replace(&mut self.scratch, spare);
                            self.big_out += 1;
                            (c.pend_off, c.pend_end) = (w, n);
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.readable = false;
                    return Step::Idle;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Step::Close(Some(e)),
            }
        }
        Step::Again
    }

    fn sink(&mut self, c: &mut Conn) -> Step {
        for _ in 0..BUDGET {
            if !c.readable {
                return Step::Idle;
            }
            match c.s.read(&mut self.scratch) {
                Ok(0) => {
                    c.rd_eof = true;
                    return finish(c);
                }
                Ok(n) => self.bytes_in += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.readable = false;
                    return Step::Idle;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Step::Close(Some(e)),
            }
        }
        Step::Again
    }

    fn source(&mut self, c: &mut Conn) -> Step {
        let p = pattern();
        for _ in 0..BUDGET {
            let mut progress = false;
            let left = self.limit.map_or(u64::MAX, |l| l - c.sent.min(l));
            if left == 0 && !c.wr_shut {
                if let Err(e) = c.s.shutdown_write() {
                    return Step::Close(Some(e));
                }
                c.wr_shut = true;
            }
            if !c.wr_shut && c.writable {
                let len = left.min(CHUNK as u64) as usize;
                match c.s.write(p.slice(c.sent, len)) {
                    Ok(n) => {
                        c.sent += n as u64;
                        self.bytes_out += n as u64;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => c.writable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => progress = true,
                    Err(e) => return Step::Close(Some(e)),
                }
            }
            if c.readable && !c.rd_eof {
                match c.s.read(&mut self.scratch) {
                    Ok(0) => {
                        c.rd_eof = true;
                        progress = true;
                    }
                    Ok(n) => {
                        self.bytes_in += n as u64;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => progress = true,
                    Err(e) => return Step::Close(Some(e)),
                }
            }
            if c.wr_shut && c.rd_eof {
                return finish(c);
            }
            if !progress {
                return Step::Idle;
            }
        }
        Step::Again
    }
}
