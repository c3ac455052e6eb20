//! `rtt`: ping-pong latency against an echo server.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use mio::Events;
use vios_common::cli::{parse_duration, parse_size};

use crate::net::{self, SockOpts, Stream, Target};
use crate::sys::{self, pattern, stream_start, Report, CHUNK};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Echo server: HOST:PORT or unix:PATH.
    #[arg(long, value_parser = net::parse_target)]
    connect: Target,
    /// Concurrent streams, each ping-ponging on its own.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Measured round trips per stream.
    #[arg(long, default_value_t = 10000)]
    count: u64,
    /// Message size in bytes (at most 256K).
    #[arg(long, default_value = "64", value_parser = parse_size)]
    size: u64,
    /// Unmeasured round trips per stream first.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Spin on the event queue instead of sleeping in it: takes a core, but
    /// leaves the client's own wake-up out of the figures.
    #[arg(long)]
    busy_poll: bool,
    /// Give up (and fail) after this long, connecting included.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
}

struct Pinger {
    s: Stream,
    id: usize,
    round: u64,
    sent: usize,
    received: usize,
    t: Instant,
    readable: bool,
    writable: bool,
    shut: bool,
}

enum Step {
    Idle,
    Done,
    Failed(String),
}

pub fn run(a: &Args) -> Report {
    let mut rep = Report::new("rtt");
    rep.json
        .str("connect", &a.connect.to_string())
        .u64("streams", a.streams as u64)
        .u64("count", a.count)
        .u64("size", a.size)
        .u64("warmup", a.warmup)
        .bool("busy_poll", a.busy_poll)
        .f64("timeout_s", a.timeout.as_secs_f64(), 3);
    if a.streams == 0 || a.size == 0 || a.size > CHUNK as u64 {
        rep.errors
            .push(format!("need --streams >= 1 and 1 <= --size <= {CHUNK}"));
        return rep;
    }
    let size = a.size as usize;
    let deadline = Instant::now() + a.timeout;
    let Some(mut poll) = sys::new_poll(&mut rep.errors) else {
        return rep;
    };
    let mut events = Events::with_capacity(1024);
    let opts = SockOpts {
        nodelay: true,
        buf: None,
    };
    let conns = net::connect_many(&mut poll, &mut events, &a.connect, a.streams, 256, opts, deadline);
    let mut live: Vec<Option<Pinger>> = Vec::with_capacity(a.streams);
    let now = Instant::now();
    for (id, r) in conns.into_iter().enumerate() {
        match r {
            Ok(c) => live.push(Some(Pinger {
                s: c.stream,
                id,
                round: 0,
                sent: 0,
                received: 0,
                t: now,
                readable: true,
                writable: true,
                shut: false,
            })),
            Err(e) => {
                rep.errors.push(format!("stream {id}: {e}"));
                live.push(None);
            }
        }
    }
    let rounds = a.warmup + a.count;
    let mut samples: Vec<u64> = Vec::with_capacity((a.count as usize).saturating_mul(a.streams));
    let mut scratch = vec![0u8; CHUNK];
    let mut remaining = live.iter().filter(|p| p.is_some()).count();
    let mut queue: Vec<usize> = (0..live.len()).collect();
    let t_start = Instant::now();
    // Round trips done, warm-up included.
    let mut round_trips = 0u64;
    while remaining > 0 {
        for k in queue.drain(..) {
            let Some(p) = live[k].as_mut() else { continue };
            match p.drive(size, rounds, a.warmup, &mut samples, &mut scratch) {
                Step::Idle => {}
                Step::Done => {
                    round_trips += p.round;
                    live[k] = None;
                    remaining -= 1;
                }
                Step::Failed(e) => {
                    round_trips += p.round;
                    rep.errors
                        .push(format!("stream {}: {e} (round {} of {rounds})", p.id, p.round));
                    live[k] = None;
                    remaining -= 1;
                }
            }
        }
        if remaining == 0 {
            break;
        }
        let why = sys::stop_reason(deadline);
        if let Some(why) = why {
            for p in live.iter_mut().filter_map(|p| p.take()) {
                round_trips += p.round;
                rep.errors
                    .push(format!("stream {}: {why} (round {} of {rounds})", p.id, p.round));
            }
            break;
        }
        let wait = if a.busy_poll { Duration::ZERO } else { net::TICK };
        if let Err(e) = net::poll_once(&mut poll, &mut events, Some(deadline), wait) {
            rep.errors.push(format!("poll: {e}"));
            break;
        }
        for ev in events.iter() {
            let k = ev.token().0;
            let Some(p) = live.get_mut(k).and_then(|p| p.as_mut()) else {
                continue;
            };
            p.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
            p.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
            queue.push(k);
        }
    }
    let secs = t_start.elapsed().as_secs_f64();
    let n = samples.len();
    rep.json
        .u64("samples", n as u64)
        .f64("seconds", secs, 3)
        .f64("round_trips_per_s", round_trips as f64 / secs, 1)
        .obj("us", sys::latency_us(&mut samples));
    if rep.errors.is_empty() && (n as u64) < a.count * a.streams as u64 {
        rep.errors.push(format!("only {n} samples"));
    }
    rep
}

impl Pinger {
    fn drive(
        &mut self,
        size: usize,
        rounds: u64,
        warmup: u64,
        samples: &mut Vec<u64>,
        scratch: &mut [u8],
    ) -> Step {
        let p = pattern();
        let pos = |id: usize, round: u64| stream_start(id) + round * size as u64;
        loop {
            if self.round == rounds {
                if !self.shut {
                    if let Err(e) = self.s.shutdown_write() {
                        return Step::Failed(format!("shutdown: {e}"));
                    }
                    self.shut = true;
                }
                return match self.s.read(&mut scratch[..1]) {
                    Ok(0) => Step::Done,
                    Ok(_) => Step::Failed("unexpected bytes after the last echo".into()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => Step::Idle,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => Step::Failed(format!("read: {e}")),
                };
            }
            let mut progress = false;
            if self.sent < size && self.writable {
                if self.sent == 0 {
                    self.t = Instant::now();
                }
                let msg = p.slice(pos(self.id, self.round) + self.sent as u64, size - self.sent);
                match self.s.write(msg) {
                    Ok(n) => {
                        self.sent += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => progress = true,
                    Err(e) => return Step::Failed(format!("write: {e}")),
                }
            }
            if self.received < self.sent && self.readable {
                let want = self.sent - self.received;
                match self.s.read(&mut scratch[..want]) {
                    Ok(0) => return Step::Failed("EOF before the echo".into()),
                    Ok(n) => {
                        let at = pos(self.id, self.round) + self.received as u64;
                        if let Err(j) = p.check(at, &scratch[..n]) {
                            return Step::Failed(format!("echo differs at byte {}", self.received + j));
                        }
                        self.received += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => progress = true,
                    Err(e) => return Step::Failed(format!("read: {e}")),
                }
            }
            if self.received == size {
                if self.round >= warmup {
                    samples.push(self.t.elapsed().as_nanos() as u64);
                }
                self.round += 1;
                self.sent = 0;
                self.received = 0;
                continue;
            }
            if !progress {
                return Step::Idle;
            }
        }
    }
}
