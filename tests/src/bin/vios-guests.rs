//! `vios-guests`: many guests in one process, for density and descriptor
//! tests of the host bridge.
//!
//! For each guest it listens on a channel socket in libvirt's layout,
//! `DIR/<id>-<name>/org.qpid.vios.0`, as QEMU would, and speaks the guest
//! side of the protocol over the connection the host bridge makes, with
//! `vios-common`'s own [`Session`]. Streams are opened and checked in
//! process: there are no client sockets.
//!
//! ```text
//! vios-guests --dir DIR --guests N [--first K] [--prefix g]
//! ```
//!
//! Commands on standard input, one per line; each answers with one JSON line
//! on standard output once it is done (or at once for `report`):
//!
//! - `wait-established [SECS]`: until every guest has a session;
//! - `open K [SERVICE]`: every guest opens K streams (default service `echo`),
//!   writes 64 bytes on each and checks the echo; waits until every stream
//!   has been echoed, refused or reset; streams stay open;
//! - `fill [SERVICE]`: every guest opens streams one at a time until one is
//!   refused; they stay open;
//! - `echo [SERVICE] [CONCURRENCY]`: every guest opens one stream, checks a
//!   64-byte echo and closes it, at most CONCURRENCY (default 500) at once;
//!   reports the wall time (`echo_ms`);
//! - `rtt I COUNT`: guest I makes COUNT sequential 64-byte round trips on one
//!   stream (opened for it, then finished); reports p50 and p99;
//! - `close`: finishes every stream;
//! - `report`: counters now;
//! - `quit`.
//!
//! Counters: guests with a session now, sessions established in all,
//! sessions that ended (with their reasons), streams opened, echoed,
//! refused (by code) and reset.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use vios_common::proto::session::{Config, Event, Session};
use vios_common::proto::{Limits, Role, StreamId};
use vios_tests::tool::json::Json;

const WAKER: Token = Token(usize::MAX);
const ECHO_LEN: usize = 64;

#[derive(Parser, Debug)]
#[command(
    name = "vios-guests",
    about = "Many Vios guests in one process (density and descriptor tests)"
)]
struct Cli {
    /// Where the guest directories are made (libvirt's layout).
    #[arg(long)]
    dir: PathBuf,
    /// How many guests.
    #[arg(long)]
    guests: usize,
    /// Number of the first guest (directory `<first>-<prefix><first>`).
    #[arg(long, default_value_t = 1)]
    first: usize,
    /// Guest name prefix.
    #[arg(long, default_value = "g")]
    prefix: String,
}

#[derive(Default)]
struct Probe {
    /// Bytes written, and how many came back.
    sent: Vec<u8>,
    got: usize,
    /// Round trips left, and when the current one started.
    rounds_left: usize,
    started: Option<Instant>,
    /// Record round-trip times and finish the stream when done (rtt).
    timed: bool,
    /// Finish the stream once echoed (echo).
    close: bool,
}

struct Guest {
    listener: UnixListener,
    conn: Option<UnixStream>,
    session: Session,
    readable: bool,
    writable: bool,
    established: bool,
    probes: HashMap<StreamId, Probe>,
    /// fill: keep opening after each accept.
    filling: Option<String>,
}

#[derive(Default)]
struct Counters {
    sessions: u64,
    ended: BTreeMap<String, u64>,
    opened: u64,
    echoed: u64,
    refused: BTreeMap<String, u64>,
    reset: BTreeMap<String, u64>,
    open_errors: u64,
    rtts_us: Vec<f64>,
    /// echo: guests still to start, streams in flight, when it began and
    /// how long it took.
    echo_queue: std::collections::VecDeque<usize>,
    echo_in_flight: usize,
    echo_window: usize,
    echo_service: String,
    echo_started: Option<Instant>,
    echo_ms: Option<u128>,
}

/// A command waiting for its condition.
enum Waiting {
    Established(Instant),
    Streams,
    Echo,
    Fill,
    Rtt,
}

struct Peers {
    poll: Poll,
    guests: Vec<Guest>,
    /// Guests with output queued outside of their own events (a command).
    dirty: Vec<usize>,
    c: Counters,
    started: Instant,
    all_established_ms: Option<u128>,
    /// When every guest had a session, in milliseconds since the epoch.
    all_established_unix_ms: Option<u128>,
}

fn main() {
    env_logger::init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("vios-guests: {e}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> io::Result<()> {
    let poll = Poll::new()?;
    let mut guests = Vec::with_capacity(cli.guests);
    for i in 0..cli.guests {
        let n = cli.first + i;
        let dir = cli.dir.join(format!("{n}-{}{n}", cli.prefix));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("org.qpid.vios.0");
        let _ = std::fs::remove_file(&path);
        let mut listener = UnixListener::bind(&path)?;
        poll.registry()
            .register(&mut listener, Token(2 * i), Interest::READABLE)?;
        let mut cfg = Config::new(Role::Guest, "vios-guests");
        cfg.limits = Limits {
            max_frame_payload: 16 << 10,
            initial_window: 16 << 10,
            max_streams: 1,
            idle_timeout_ms: 15_000,
        };
        cfg.policy = vios_common::proto::session::Policy::unlimited();
        guests.push(Guest {
            listener,
            conn: None,
            session: Session::new(cfg, (n as u64) << 20 | u64::from(std::process::id())),
            readable: false,
            writable: false,
            established: false,
            probes: HashMap::new(),
            filling: None,
        });
    }
    let waker = Waker::new(poll.registry(), WAKER)?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
            let _ = waker.wake();
        }
        let _ = tx.send("quit".into());
        let _ = waker.wake();
    });
    let mut p = Peers {
        poll,
        guests,
        dirty: Vec::new(),
        c: Counters::default(),
        started: Instant::now(),
        all_established_ms: None,
        all_established_unix_ms: None,
    };
    eprintln!(
        "vios-guests: {} guests listening under {}",
        cli.guests,
        cli.dir.display()
    );
    let mut events = Events::with_capacity(4096);
    let mut waiting: Option<Waiting> = None;
    loop {
        let timeout = p
            .guests
            .iter()
            .filter_map(|g| g.session.poll_timeout())
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_millis(100));
        match p.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        let mut touched = Vec::new();
        for ev in events.iter() {
            if ev.token() == WAKER {
                continue;
            }
            let i = ev.token().0 / 2;
            if ev.token().0 % 2 == 0 {
                p.accept(i, now);
            } else {
                let g = &mut p.guests[i];
                g.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                g.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
            }
            touched.push(i);
        }
        // Timers: every guest whose deadline passed.
        for i in 0..p.guests.len() {
            if p.guests[i].session.poll_timeout().is_some_and(|t| now >= t) {
                p.guests[i].session.handle_timeout(now);
                touched.push(i);
            }
        }
        touched.append(&mut p.dirty);
        touched.sort_unstable();
        touched.dedup();
        for i in touched {
            p.serve(i, now);
        }
        if p.all_established_ms.is_none() && p.guests.iter().all(|g| g.established) {
            p.all_established_ms = Some(p.started.elapsed().as_millis());
            p.all_established_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_millis());
        }
        if matches!(waiting, Some(Waiting::Echo)) {
            p.start_echoes();
            if p.c.echo_queue.is_empty() && p.c.echo_in_flight == 0 && p.c.echo_ms.is_none() {
                p.c.echo_ms = p.c.echo_started.map(|t| t.elapsed().as_millis());
            }
        }
        if let Some(w) = &waiting {
            if let Some(done) = p.check(w, now) {
                println!("{done}");
                io::stdout().flush()?;
                waiting = None;
            }
        }
        while waiting.is_none() {
            let Ok(line) = rx.try_recv() else { break };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["quit"] => return Ok(()),
                ["report"] => println!("{}", p.report("report")),
                ["wait-established"] => waiting = Some(Waiting::Established(now + Duration::from_secs(60))),
                ["wait-established", s] => {
                    let secs = s.parse().unwrap_or(60);
                    waiting = Some(Waiting::Established(now + Duration::from_secs(secs)));
                }
                ["open", k, rest @ ..] => {
                    let service = rest.first().copied().unwrap_or("echo");
                    let k: usize = k.parse().unwrap_or(1);
                    for i in 0..p.guests.len() {
                        for _ in 0..k {
                            p.open(i, service, 1, false);
                        }
                    }
                    waiting = Some(Waiting::Streams);
                }
                ["echo", rest @ ..] => {
                    p.c.echo_service = rest.first().copied().unwrap_or("echo").to_owned();
                    p.c.echo_window = rest.get(1).and_then(|w| w.parse().ok()).unwrap_or(500);
                    p.c.echo_queue = (0..p.guests.len()).collect();
                    p.c.echo_started = Some(now);
                    p.c.echo_ms = None;
                    p.start_echoes();
                    waiting = Some(Waiting::Echo);
                }
                ["fill", rest @ ..] => {
                    let service = rest.first().copied().unwrap_or("echo").to_owned();
                    for i in 0..p.guests.len() {
                        if p.guests[i].established {
                            p.guests[i].filling = Some(service.clone());
                            p.open(i, &service, 1, false);
                        }
                    }
                    waiting = Some(Waiting::Fill);
                }
                ["rtt", i, count] => {
                    let i: usize = i.parse().unwrap_or(0);
                    let count: usize = count.parse().unwrap_or(1000);
                    p.c.rtts_us.clear();
                    p.open(i.min(p.guests.len() - 1), "echo", count, true);
                    waiting = Some(Waiting::Rtt);
                }
                ["close"] => {
                    for g in &mut p.guests {
                        for s in g.probes.keys().copied().collect::<Vec<_>>() {
                            g.session.finish(s);
                        }
                        g.probes.clear();
                        g.filling = None;
                    }
                    p.dirty.extend(0..p.guests.len());
                    println!("{}", p.report("close"));
                }
                _ => println!("{{\"error\":\"unknown command\"}}"),
            }
            io::stdout().flush()?;
            for i in std::mem::take(&mut p.dirty) {
                p.serve(i, now);
            }
        }
    }
}

impl Peers {
    /// Starts echo probes while the window has room.
    fn start_echoes(&mut self) {
        while self.c.echo_in_flight < self.c.echo_window {
            let Some(i) = self.c.echo_queue.pop_front() else {
                break;
            };
            let service = self.c.echo_service.clone();
            let g = &mut self.guests[i];
            if !g.established {
                self.c.open_errors += 1;
                continue;
            }
            match g.session.open(&service) {
                Ok(s) => {
                    let mut probe = Probe {
                        rounds_left: 1,
                        close: true,
                        ..Probe::default()
                    };
                    send_probe(&mut g.session, s, &mut probe, i);
                    g.probes.insert(s, probe);
                    self.c.opened += 1;
                    self.c.echo_in_flight += 1;
                    self.dirty.push(i);
                }
                Err(_) => self.c.open_errors += 1,
            }
        }
    }

    fn accept(&mut self, i: usize, now: Instant) {
        let g = &mut self.guests[i];
        loop {
            match g.listener.accept() {
                Ok((mut s, _)) => {
                    // QEMU serves one host at a time; a second connection
                    // replaces the first here (enough for these tests).
                    if let Some(mut old) = g.conn.take() {
                        let _ = self.poll.registry().deregister(&mut old);
                        g.session.link_down(now);
                    }
                    if self
                        .poll
                        .registry()
                        .register(&mut s, Token(2 * i + 1), Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        g.conn = Some(s);
                        g.readable = true;
                        g.writable = true;
                        g.session.link_up(now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("vios-guests: accept: {e}");
                    return;
                }
            }
        }
    }

    fn open(&mut self, i: usize, service: &str, rounds: usize, timed: bool) {
        let g = &mut self.guests[i];
        if !g.established {
            return;
        }
        match g.session.open(service) {
            Ok(s) => {
                let mut probe = Probe {
                    rounds_left: rounds,
                    timed,
                    ..Probe::default()
                };
                send_probe(&mut g.session, s, &mut probe, i);
                g.probes.insert(s, probe);
                self.c.opened += 1;
                self.dirty.push(i);
            }
            Err(_) => self.c.open_errors += 1,
        }
    }

    fn serve(&mut self, i: usize, now: Instant) {
        let g = &mut self.guests[i];
        let Some(conn) = g.conn.as_mut() else { return };
        for _ in 0..16 {
            let mut lost = false;
            while g.readable {
                let space = g.session.recv_space();
                if space.is_empty() {
                    break;
                }
                match conn.read(space) {
                    Ok(0) => {
                        lost = true;
                        break;
                    }
                    Ok(n) => g.session.recv_commit(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => g.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        lost = true;
                        break;
                    }
                }
            }
            while let Some(ev) = g.session.poll_event(now) {
                match ev {
                    Event::Established(_) => {
                        g.established = true;
                        self.c.sessions += 1;
                    }
                    Event::Ended(reason) => {
                        g.established = false;
                        g.probes.clear();
                        g.filling = None;
                        *self.c.ended.entry(reason.to_string()).or_default() += 1;
                    }
                    Event::Data { stream, bytes } => {
                        let n = bytes.len();
                        if let Some(p) = g.probes.get_mut(&stream) {
                            if p.sent[p.got..].starts_with(bytes) {
                                p.got += n;
                            } else {
                                *self.c.reset.entry("bad echo".into()).or_default() += 1;
                            }
                        }
                        g.session.consumed(stream, n);
                        let p = g.probes.get_mut(&stream);
                        if let Some(p) = p.filter(|p| p.got == p.sent.len() && !p.sent.is_empty()) {
                            if let Some(t) = p.started.take().filter(|_| p.timed) {
                                self.c.rtts_us.push(t.elapsed().as_secs_f64() * 1e6);
                            }
                            p.rounds_left -= 1;
                            if p.rounds_left > 0 {
                                send_probe(&mut g.session, stream, p, i);
                            } else {
                                self.c.echoed += 1;
                                p.sent.clear();
                                if p.close {
                                    self.c.echo_in_flight -= 1;
                                }
                                if p.timed || p.close {
                                    g.session.finish(stream);
                                    g.probes.remove(&stream);
                                }
                            }
                        }
                    }
                    Event::Accepted { .. } => {
                        if let Some(service) = g.filling.clone() {
                            if let Ok(s) = g.session.open(&service) {
                                let mut probe = Probe {
                                    rounds_left: 1,
                                    ..Probe::default()
                                };
                                send_probe(&mut g.session, s, &mut probe, i);
                                g.probes.insert(s, probe);
                                self.c.opened += 1;
                            } else {
                                g.filling = None;
                            }
                        }
                    }
                    Event::Refused { stream, code, .. } => {
                        if g.probes.remove(&stream).is_some_and(|p| p.close) {
                            self.c.echo_in_flight -= 1;
                        }
                        g.filling = None;
                        *self.c.refused.entry(code.to_string()).or_default() += 1;
                    }
                    Event::Reset { stream, code, .. } => {
                        if g.probes.remove(&stream).is_some_and(|p| p.close) {
                            self.c.echo_in_flight -= 1;
                        }
                        *self.c.reset.entry(code.to_string()).or_default() += 1;
                    }
                    _ => {}
                }
            }
            let mut wrote = false;
            while g.writable {
                let out = g.session.poll_transmit();
                if out.is_empty() {
                    break;
                }
                match conn.write(out) {
                    Ok(n) => {
                        g.session.advance_transmit(n);
                        wrote = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => g.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        lost = true;
                        break;
                    }
                }
            }
            if lost {
                let mut c = g.conn.take().expect("connected");
                let _ = self.poll.registry().deregister(&mut c);
                g.session.link_down(now);
                g.established = false;
                while let Some(ev) = g.session.poll_event(now) {
                    if let Event::Ended(reason) = ev {
                        *self.c.ended.entry(reason.to_string()).or_default() += 1;
                    }
                }
                g.probes.clear();
                return;
            }
            if !wrote && !g.readable {
                return;
            }
        }
    }

    /// The answer to a waiting command once its condition holds.
    fn check(&self, w: &Waiting, now: Instant) -> Option<String> {
        match w {
            Waiting::Established(deadline) => {
                let all = self.guests.iter().all(|g| g.established);
                (all || now >= *deadline).then(|| self.report("wait-established"))
            }
            Waiting::Streams | Waiting::Rtt => {
                let pending = self
                    .guests
                    .iter()
                    .any(|g| g.probes.values().any(|p| p.rounds_left > 0 && !p.sent.is_empty()));
                (!pending).then(|| self.report(if matches!(w, Waiting::Rtt) { "rtt" } else { "open" }))
            }
            Waiting::Echo => {
                let done = self.c.echo_queue.is_empty() && self.c.echo_in_flight == 0;
                done.then(|| self.report("echo"))
            }
            Waiting::Fill => {
                let busy = self.guests.iter().any(|g| g.filling.is_some());
                (!busy).then(|| self.report("fill"))
            }
        }
    }

    fn report(&self, what: &str) -> String {
        let mut j = Json::new();
        j.str("report", what)
            .u64("guests", self.guests.len() as u64)
            .u64(
                "established_now",
                self.guests.iter().filter(|g| g.established).count() as u64,
            )
            .u64("sessions", self.c.sessions)
            .u64("sessions_ended", self.c.ended.values().sum())
            .counts("ended_reasons", &self.c.ended)
            .opt_u64("all_established_ms", self.all_established_ms.map(|v| v as u64))
            .opt_u64(
                "all_established_unix_ms",
                self.all_established_unix_ms.map(|v| v as u64),
            )
            .opt_u64("echo_ms", self.c.echo_ms.map(|v| v as u64))
            .u64("opened", self.c.opened)
            .u64("echoed", self.c.echoed)
            .u64(
                "open_streams",
                self.guests.iter().map(|g| g.session.stream_count() as u64).sum(),
            )
            .u64("refused", self.c.refused.values().sum())
            .counts("refused_codes", &self.c.refused)
            .u64("reset", self.c.reset.values().sum())
            .counts("reset_codes", &self.c.reset)
            .u64("open_errors", self.c.open_errors);
        let mut r = self.c.rtts_us.clone();
        r.sort_by(f64::total_cmp);
        let pct = |q: f64| (!r.is_empty()).then(|| r[((r.len() - 1) as f64 * q).round() as usize]);
        j.u64("rtt_count", r.len() as u64)
            .opt_f64("rtt_p50_us", pct(0.5))
            .opt_f64("rtt_p99_us", pct(0.99));
        j.finish()
    }
}

fn send_probe(session: &mut Session, stream: StreamId, p: &mut Probe, i: usize) {
    p.sent = vios_tests::pattern(ECHO_LEN, (i as u64) << 32 | stream.0);
    p.got = 0;
    p.started = Some(Instant::now());
    let n = session.send(stream, &p.sent);
    debug_assert_eq!(n, ECHO_LEN, "a new stream has credit for 64 bytes");
}
