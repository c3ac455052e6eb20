//! `setup`: stream set-up latency: connect, send one byte, time until its
//! echo arrives, close; K times, at most C at once.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Token};
use vios_common::cli::parse_duration;

use crate::net::{self, SockOpts, Stream, Target};
use crate::sys::{self, Report};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Echo server: HOST:PORT or unix:PATH.
    #[arg(long, value_parser = net::parse_target)]
    connect: Target,
    /// Streams to set up in all.
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Set-ups in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Give up (and fail) after this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
}

struct Attempt {
    s: Stream,
    n: u64,
    start: Instant,
    connected: Option<Instant>,
    wrote: bool,
}

enum Step {
    Idle,
    Done,
    Failed(String),
}

impl Attempt {
    fn byte(&self) -> u8 {
        (self.n % 251) as u8 + 1
    }

    fn drive(&mut self, connect_ns: &mut Vec<u64>, total_ns: &mut Vec<u64>) -> Step {
        if self.connected.is_none() {
            match self.s.connect_state() {
                Ok(true) => {
                    let now = Instant::now();
                    self.connected = Some(now);
                    connect_ns.push((now - self.start).as_nanos() as u64);
                }
                Ok(false) => return Step::Idle,
                Err(e) => return Step::Failed(format!("connect: {e}")),
            }
        }
        if !self.wrote {
            match self.s.write(&[self.byte()]) {
                Ok(1) => self.wrote = true,
                Ok(_) => return Step::Failed("write returned 0".into()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Idle,
                Err(e) => return Step::Failed(format!("write: {e}")),
            }
        }
        let mut b = [0u8; 2];
        match self.s.read(&mut b) {
            Ok(1) if b[0] == self.byte() => {
                total_ns.push(self.start.elapsed().as_nanos() as u64);
                Step::Done
            }
            Ok(0) => Step::Failed("EOF before the echo".into()),
            Ok(_) => Step::Failed("wrong echo".into()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Step::Idle,
            Err(e) => Step::Failed(format!("read: {e}")),
        }
    }
}

pub fn run(a: &Args) -> Report {
    let mut rep = Report::new("setup");
    let conc = a.concurrency.max(1);
    rep.json
        .str("connect", &a.connect.to_string())
        .u64("count", a.count)
        .u64("concurrency", conc as u64)
        .f64("timeout_s", a.timeout.as_secs_f64(), 3);
    let Some(mut poll) = sys::new_poll(&mut rep.errors) else {
        return rep;
    };
    let mut events = Events::with_capacity(1024);
    let start = Instant::now();
    let deadline = start + a.timeout;
    let mut slots: Vec<Option<Attempt>> = (0..conc).map(|_| None).collect();
    let mut free: Vec<usize> = (0..conc).rev().collect();
    let mut started = 0u64;
    let (mut completed, mut failed) = (0u64, 0u64);
    let mut connect_ns = Vec::with_capacity(a.count as usize);
    let mut total_ns = Vec::with_capacity(a.count as usize);
    let fail = |rep: &mut Report, failed: &mut u64, n: u64, e: String| {
        *failed += 1;
        rep.errors.push(format!("set-up {n}: {e}"));
    };
    while completed + failed < a.count {
        while started < a.count {
            let Some(i) = free.pop() else { break };
            let n = started;
            started += 1;
            let t = Instant::now();
            let opts = SockOpts {
                nodelay: true,
                buf: None,
            };
            let r = Stream::connect(&a.connect, opts).and_then(|mut s| {
                poll.registry()
                    .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)?;
                Ok(s)
            });
            match r {
                Ok(s) => {
                    slots[i] = Some(Attempt {
                        s,
                        n,
                        start: t,
                        connected: None,
                        wrote: false,
                    })
                }
                Err(e) => {
                    fail(&mut rep, &mut failed, n, format!("connect: {e}"));
                    free.push(i);
                }
            }
        }
        if completed + failed >= a.count {
            break;
        }
        let why = sys::stop_reason(deadline);
        if let Some(why) = why {
            for at in slots.iter_mut().filter_map(|s| s.take()) {
                fail(&mut rep, &mut failed, at.n, why.to_string());
            }
            rep.errors.push(format!(
                "{why} with {} of {} set-ups done",
                completed + failed,
                a.count
            ));
            break;
        }
        if let Err(e) = net::poll_once(&mut poll, &mut events, Some(deadline), net::TICK) {
            rep.errors.push(format!("poll: {e}"));
            break;
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(at) = slots.get_mut(i).and_then(|s| s.as_mut()) else {
                continue;
            };
            match at.drive(&mut connect_ns, &mut total_ns) {
                Step::Idle => continue,
                Step::Done => completed += 1,
                Step::Failed(e) => {
                    let n = at.n;
                    fail(&mut rep, &mut failed, n, e);
                }
            }
            // Closing frees the slot; new attempts start after this batch.
            slots[i] = None;
            free.push(i);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    rep.json
        .u64("completed", completed)
        .u64("failed", failed)
        .f64("seconds", secs, 3)
        .f64("setups_per_s", completed as f64 / secs, 1)
        .obj("us", sys::latency_us(&mut total_ns))
        .obj("connect_us", sys::latency_us(&mut connect_ns));
    rep
}
