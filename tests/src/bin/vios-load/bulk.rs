//! `bulk`: N concurrent streams each moving B bytes, up, down or both ways.

use std::io::{ErrorKind, Read, Write};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use mio::Events;
use vios_common::cli::{parse_duration, parse_size};

use crate::net::{self, SockOpts, Stream, Target};
use crate::sys::{self, pattern, stream_start, Errors, Report, CHUNK};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Server: HOST:PORT or unix:PATH.
    #[arg(long, value_parser = net::parse_target)]
    connect: Target,
    /// Concurrent streams.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Bytes each stream moves (per direction): 1048576, 64K, 64M, 1G.
    #[arg(long, value_parser = parse_size)]
    bytes: u64,
    /// up: send to a sink server, half-close, wait for its EOF. down: read
    /// from a source server. both: send to an echo server and read it all
    /// back, verified.
    #[arg(long, value_enum, default_value_t = Direction::Both)]
    direction: Direction,
    /// Event-loop threads; streams are dealt round-robin.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Connects in flight at once while opening the streams.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Set SO_SNDBUF and SO_RCVBUF to this (default: kernel autotuning).
    #[arg(long, value_parser = parse_size)]
    sock_buf: Option<u64>,
    /// Do not check received bytes against the pattern (down, both).
    #[arg(long)]
    no_verify: bool,
    /// Give up (and fail) after this long, connecting included.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
    Both,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Both => "both",
        }
    }
}

/// One stream's outcome.
struct StreamOut {
    sent: u64,
    received: u64,
    /// When it completed; None if it failed.
    end: Option<Instant>,
}

struct WorkerOut {
    streams: Vec<StreamOut>,
    errors: Errors,
    connected: Instant,
}

pub fn run(a: &Args) -> Report {
    let mut rep = Report::new("bulk");
    let n = a.streams;
    let threads = a.threads.clamp(1, n.max(1));
    rep.json
        .str("connect", &a.connect.to_string())
        .str("direction", a.direction.name())
        .u64("streams", n as u64)
        .u64("bytes_per_stream", a.bytes)
        .u64("threads", threads as u64)
        .u64("connect_concurrency", a.connect_concurrency as u64)
        .opt_u64("sock_buf", a.sock_buf)
        .bool("verify", !a.no_verify && a.direction != Direction::Up)
        .f64("timeout_s", a.timeout.as_secs_f64(), 3);
    if n == 0 {
        rep.errors.push("--streams must be at least 1");
        return rep;
    }
    let start = Instant::now();
    let deadline = start + a.timeout;
    let barrier = Barrier::new(threads + 1);
    let (t0, cpu0, outs) = thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let ids: Vec<usize> = (t..n).step_by(threads).collect();
                let barrier = &barrier;
                sc.spawn(move || worker(a, threads, ids, barrier, deadline))
            })
            .collect();
        // Every worker has its streams open (or failed): start the clock.
        barrier.wait();
        let t0 = Instant::now();
        let cpu0 = sys::cpu_seconds();
        let outs: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        (t0, cpu0, outs)
    });
    let now = Instant::now();
    let cpu1 = sys::cpu_seconds();
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut ok = 0u64;
    let mut last_end = t0;
    let mut connected = start;
    let mut rates = Vec::with_capacity(n);
    let mut all_ok = true;
    for o in outs {
        let Ok(o) = o else {
            rep.errors.push("worker thread panicked");
            continue;
        };
        connected = connected.max(o.connected);
        for s in &o.streams {
            sent += s.sent;
            received += s.received;
            match s.end {
                Some(end) => {
                    ok += 1;
                    last_end = last_end.max(end);
                    let secs = end.saturating_duration_since(t0).as_secs_f64();
                    rates.push((s.sent + s.received) as f64 / secs / 1e6);
                }
                None => all_ok = false,
            }
        }
        rep.errors.append(o.errors);
    }
    // With failures, the run lasted until it gave up.
    let end = if all_ok { last_end } else { now };
    let secs = end.saturating_duration_since(t0).as_secs_f64();
    let total = sent + received;
    let (cu, cs) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    rep.json
        .u64("streams_ok", ok)
        .u64("streams_failed", n as u64 - ok)
        .f64(
            "connect_s",
            connected.saturating_duration_since(start).as_secs_f64(),
            3,
        )
        .f64("seconds", secs, 3)
        .u64("bytes_sent", sent)
        .u64("bytes_received", received)
        .u64("bytes", total)
        .f64("mb_per_s", total as f64 / secs / 1e6, 1)
        .f64("gb_per_s", total as f64 / secs / 1e9, 3)
        .f64("mb_per_s_sent", sent as f64 / secs / 1e6, 1)
        .f64("mb_per_s_received", received as f64 / secs / 1e6, 1)
        .obj("stream_mb_per_s", sys::spread(&mut rates, 1))
        .f64("transfer_cpu_user_s", cu, 3)
        .f64("transfer_cpu_sys_s", cs, 3)
        .f64("transfer_cpu_s", cu + cs, 3);
    rep
}

/// One stream in flight.
struct Bulk {
    s: Stream,
    id: usize,
    /// Pattern position of byte 0 of this stream.
    start: u64,
    to_send: u64,
    sent: u64,
    to_recv: u64,
    received: u64,
    readable: bool,
    writable: bool,
    queued: bool,
    shut: bool,
    eof: bool,
}

enum Step {
    Idle,
    Again,
    Done,
    Failed(String),
}

/// Reads/writes per stream per turn before others get theirs.
const BUDGET: usize = 8;

/// Waits on the start barrier once: explicitly, or when dropped (so that a
/// worker that panics cannot leave the others waiting for ever).
struct Start<'a> {
    barrier: &'a Barrier,
    passed: bool,
}

impl Start<'_> {
    fn wait(&mut self) {
        if !self.passed {
            self.passed = true;
            self.barrier.wait();
        }
    }
}

impl Drop for Start<'_> {
    fn drop(&mut self) {
        self.wait();
    }
}

fn worker(a: &Args, threads: usize, ids: Vec<usize>, barrier: &Barrier, deadline: Instant) -> WorkerOut {
    let mut start = Start {
        barrier,
        passed: false,
    };
    let mut out = WorkerOut {
        streams: Vec::with_capacity(ids.len()),
        errors: Errors::default(),
        connected: Instant::now(),
    };
    let Some(mut poll) = sys::new_poll(&mut out.errors) else {
        start.wait();
        return out;
    };
    let mut events = Events::with_capacity(1024);
    let conc = (a.connect_concurrency / threads).max(1);
    let conns = net::connect_many(
        &mut poll,
        &mut events,
        &a.connect,
        ids.len(),
        conc,
        SockOpts {
            nodelay: true,
            buf: a.sock_buf.map(|b| b as usize),
        },
        deadline,
    );
    out.connected = Instant::now();
    let (to_send, to_recv) = match a.direction {
        Direction::Up => (a.bytes, 0),
        Direction::Down => (0, a.bytes),
        Direction::Both => (a.bytes, a.bytes),
    };
    let mut live: Vec<Option<Bulk>> = Vec::with_capacity(ids.len());
    let mut queue = Vec::new();
    for (k, r) in conns.into_iter().enumerate() {
        let id = ids[k];
        out.streams.push(StreamOut {
            sent: 0,
            received: 0,
            end: None,
        });
        match r {
            Ok(c) => {
                live.push(Some(Bulk {
                    s: c.stream,
                    id,
                    // A source server always starts at pattern position 0.
                    start: if a.direction == Direction::Down {
                        0
                    } else {
                        stream_start(id)
                    },
                    to_send,
                    sent: 0,
                    to_recv,
                    received: 0,
                    readable: true,
                    writable: true,
                    queued: true,
                    shut: false,
                    eof: false,
                }));
                queue.push(k);
            }
            Err(e) => {
                out.errors.push(format!("stream {id}: {e}"));
                live.push(None);
            }
        }
    }
    let mut remaining = queue.len();
    start.wait();
    let mut scratch = vec![0u8; CHUNK];
    let verify = !a.no_verify;
    let mut next = Vec::new();
    let finish = |k: usize, b: &Bulk, out: &mut WorkerOut, r: Result<(), String>| {
        let so = &mut out.streams[k];
        so.sent = b.sent;
        so.received = b.received;
        match r {
            Ok(()) => so.end = Some(Instant::now()),
            Err(e) => out.errors.push(format!(
                "stream {}: {e} (sent {} of {}, received {} of {})",
                b.id, b.sent, b.to_send, b.received, b.to_recv
            )),
        }
    };
    while remaining > 0 {
        for k in queue.drain(..) {
            let Some(b) = live[k].as_mut() else { continue };
            b.queued = false;
            let r = match b.drive(&mut scratch, verify) {
                Step::Idle => continue,
                Step::Again => {
                    b.queued = true;
                    next.push(k);
                    continue;
                }
                Step::Done => Ok(()),
                Step::Failed(e) => Err(e),
            };
            let b = live[k].take().expect("live");
            finish(k, &b, &mut out, r);
            remaining -= 1;
        }
        std::mem::swap(&mut queue, &mut next);
        if remaining == 0 {
            break;
        }
        let why = sys::stop_reason(deadline);
        if let Some(why) = why {
            for (k, b) in live.iter_mut().enumerate() {
                if let Some(b) = b.take() {
                    finish(k, &b, &mut out, Err(why.into()));
                }
            }
            break;
        }
        let wait = if queue.is_empty() {
            net::TICK
        } else {
            Duration::ZERO
        };
        if let Err(e) = net::poll_once(&mut poll, &mut events, Some(deadline), wait) {
            out.errors.push(format!("poll: {e}"));
            for (k, b) in live.iter_mut().enumerate() {
                if let Some(b) = b.take() {
                    finish(k, &b, &mut out, Err("abandoned".into()));
                }
            }
            break;
        }
        for ev in events.iter() {
            let k = ev.token().0;
            let Some(b) = live.get_mut(k).and_then(|b| b.as_mut()) else {
                continue;
            };
            b.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
            b.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
            if !b.queued {
                b.queued = true;
                queue.push(k);
            }
        }
    }
    out
}

impl Bulk {
    fn drive(&mut self, scratch: &mut [u8], verify: bool) -> Step {
        let p = pattern();
        for _ in 0..BUDGET {
            let mut progress = false;
            if self.writable && self.sent < self.to_send {
                let len = (self.to_send - self.sent).min(CHUNK as u64) as usize;
                match self.s.write(p.slice(self.start + self.sent, len)) {
                    Ok(0) => return Step::Failed("write returned 0".into()),
                    Ok(n) => {
                        self.sent += n as u64;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => progress = true,
                    Err(e) => return Step::Failed(format!("write: {e}")),
                }
            }
            if self.sent == self.to_send && self.to_send > 0 && !self.shut {
                if let Err(e) = self.s.shutdown_write() {
                    return Step::Failed(format!("shutdown: {e}"));
                }
                self.shut = true;
            }
            if self.readable && !self.eof {
                // Read no further than expected, so that nothing beyond it is
                // taken for ours; past the end, one byte to see EOF (or excess).
                let want = if self.to_send == 0 || self.to_recv > 0 {
                    ((self.to_recv - self.received).min(CHUNK as u64) as usize).max(1)
                } else {
                    CHUNK
                };
                match self.s.read(&mut scratch[..want]) {
                    Ok(0) => {
                        self.eof = true;
                        progress = true;
                        if self.received < self.to_recv {
                            return Step::Failed("EOF before all bytes arrived".into());
                        }
                    }
                    Ok(n) => {
                        progress = true;
                        if self.to_recv > 0 {
                            if self.received + n as u64 > self.to_recv {
                                return Step::Failed("more bytes than sent came back".into());
                            }
                            if verify {
                                if let Err(j) = pattern().check(self.start + self.received, &scratch[..n]) {
                                    return Step::Failed(format!(
                                        "content differs at byte {}",
                                        self.received + j as u64
                                    ));
                                }
                            }
                        }
                        self.received += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => progress = true,
                    Err(e) => return Step::Failed(format!("read: {e}")),
                }
            }
            let done = if self.to_send == 0 {
                // down: everything read; the rest of an endless source is not ours.
                self.received == self.to_recv
            } else {
                self.shut && self.eof && self.received >= self.to_recv
            };
            if done {
                return Step::Done;
            }
            if !progress {
                return Step::Idle;
            }
        }
        Step::Again
    }
}
