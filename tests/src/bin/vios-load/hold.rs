//! `hold`: open N idle streams, prove each live with a one-byte echo, hold
//! them, then prove each still answers and close them cleanly.

use std::io::{ErrorKind, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::{Events, Poll};
use vios_common::cli::parse_duration;

use crate::net::{self, SockOpts, Stream, Target};
use crate::serve::write_atomically;
use crate::sys::{self, Errors, Report};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Echo server: HOST:PORT or unix:PATH.
    #[arg(long, value_parser = net::parse_target)]
    connect: Target,
    /// Streams to open and hold (10,000 need `ulimit -n` above 10,000 here and
    /// in the server).
    #[arg(long)]
    streams: usize,
    /// How long to hold them; SIGTERM/SIGINT ends the hold early (then they
    /// are still verified and the report printed).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    seconds: Duration,
    /// Write "ready" here once all streams are open and echoed ("failed" if
    /// some could not be).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Connects in flight at once while opening.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Limit for opening, and separately for verifying (the hold is --seconds).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
}

struct Held {
    s: Stream,
    id: usize,
}

#[derive(Clone, Copy, Default)]
struct Round {
    wrote: bool,
    got: bool,
    eof: bool,
    done: bool,
}

enum Step {
    Idle,
    Done,
    Failed(String),
}

pub fn run(a: &Args) -> Report {
    let mut rep = Report::new("hold");
    let n = a.streams;
    rep.json
        .str("connect", &a.connect.to_string())
        .u64("streams", n as u64)
        .f64("hold_s_requested", a.seconds.as_secs_f64(), 3)
        .opt_str("ready_file", a.ready_file.as_ref().and_then(|p| p.to_str()))
        .u64("concurrency", a.concurrency as u64)
        .f64("timeout_s", a.timeout.as_secs_f64(), 3);
    let Some(mut poll) = sys::new_poll(&mut rep.errors) else {
        return rep;
    };
    let mut events = Events::with_capacity(1024);

    // Open.
    let t_open = Instant::now();
    let deadline = t_open + a.timeout;
    let conns = net::connect_many(
        &mut poll,
        &mut events,
        &a.connect,
        n,
        a.concurrency,
        SockOpts {
            nodelay: true,
            buf: None,
        },
        deadline,
    );
    let mut held: Vec<Option<Held>> = Vec::with_capacity(n);
    for (id, r) in conns.into_iter().enumerate() {
        match r {
            Ok(c) => held.push(Some(Held { s: c.stream, id })),
            Err(e) => {
                rep.errors.push(format!("stream {id}: {e}"));
                held.push(None);
            }
        }
    }
    let connected = held.iter().filter(|h| h.is_some()).count();
    let (opened, _) = echo_round(
        &mut poll,
        &mut events,
        &mut held,
        0,
        false,
        deadline,
        &mut rep.errors,
        "open",
    );
    let open_s = t_open.elapsed().as_secs_f64();
    eprintln!("vios-load hold: {opened} of {n} streams open and echoing ({open_s:.3} s)");
    rep.json
        .u64("connected", connected as u64)
        .u64("opened", opened)
        .f64("open_s", open_s, 3);

    // Hold.
    let all_open = opened == n as u64;
    if let Some(p) = &a.ready_file {
        let text = if all_open {
            "ready\n".to_string()
        } else {
            format!("failed: {opened} of {n} opened\n")
        };
        if let Err(e) = write_atomically(p, &text) {
            rep.errors.push(format!("ready file {}: {e}", p.display()));
        }
    }
    let rss_held = sys::rss_kib().0;
    let t_hold = Instant::now();
    let mut ended_by = "time";
    if all_open {
        let hold_end = t_hold + a.seconds;
        loop {
            if sys::stop_requested() {
                ended_by = "signal";
                sys::clear_stop();
                break;
            }
            if Instant::now() >= hold_end {
                break;
            }
            if let Err(e) = net::poll_once(&mut poll, &mut events, Some(hold_end), net::TICK) {
                rep.errors.push(format!("poll: {e}"));
                break;
            }
            for ev in events.iter() {
                let i = ev.token().0;
                let Some(h) = held.get_mut(i).and_then(|h| h.as_mut()) else {
                    continue;
                };
                let mut b = [0u8; 1];
                let why = match h.s.read(&mut b) {
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => continue,
                    Ok(0) => "closed by the server during the hold".to_string(),
                    Ok(_) => "unexpected bytes during the hold".to_string(),
                    Err(e) => format!("error during the hold: {e}"),
                };
                rep.errors.push(format!("stream {}: {why}", h.id));
                held[i] = None;
            }
        }
    } else {
        ended_by = "not_all_opened";
    }
    let held_s = t_hold.elapsed().as_secs_f64();
    let still = held.iter().filter(|h| h.is_some()).count();
    eprintln!("vios-load hold: held {still} streams {held_s:.3} s; verifying");

    // Verify and close.
    let t_verify = Instant::now();
    let deadline = t_verify + a.timeout;
    let (verified, closed) = echo_round(
        &mut poll,
        &mut events,
        &mut held,
        128,
        true,
        deadline,
        &mut rep.errors,
        "verify",
    );
    rep.json
        .u64("held", still as u64)
        .f64("held_s", held_s, 3)
        .str("hold_ended_by", ended_by)
        .opt_u64("rss_kib_held", rss_held)
        .u64("verified", verified)
        .u64("closed_clean", closed)
        .f64("verify_s", t_verify.elapsed().as_secs_f64(), 3);
    if rep.errors.is_empty() && (verified != n as u64 || closed != n as u64) {
        rep.errors
            .push(format!("{verified} of {n} verified, {closed} closed cleanly"));
    }
    rep
}

/// Every stream in `held` sends one byte and waits for its echo; with `close`,
/// it then half-closes, waits for the server's EOF and is closed. Streams that
/// fail are dropped. Returns (echoed, closed cleanly).
#[allow(clippy::too_many_arguments)]
fn echo_round(
    poll: &mut Poll,
    events: &mut Events,
    held: &mut [Option<Held>],
    salt: usize,
    close: bool,
    deadline: Instant,
    errors: &mut Errors,
    phase: &str,
) -> (u64, u64) {
    let mut st = vec![Round::default(); held.len()];
    let mut queue: Vec<usize> = (0..held.len()).filter(|&i| held[i].is_some()).collect();
    let mut remaining = queue.len();
    while remaining > 0 {
        for i in queue.drain(..) {
            let Some(h) = held[i].as_mut() else { continue };
            if st[i].done {
                continue;
            }
            let byte = ((h.id + salt) % 251) as u8 + 1;
            match step(h, &mut st[i], byte, close) {
                Step::Idle => continue,
                Step::Done => {
                    if close {
                        held[i] = None;
                    }
                }
                Step::Failed(e) => {
                    errors.push(format!("stream {}: {phase}: {e}", h.id));
                    held[i] = None;
                }
            }
            st[i].done = true;
            remaining -= 1;
        }
        if remaining == 0 {
            break;
        }
        let why = sys::stop_reason(deadline);
        if let Some(why) = why {
            for (i, h) in held.iter_mut().enumerate() {
                if !st[i].done {
                    if let Some(h) = h.take() {
                        errors.push(format!("stream {}: {phase}: {why}", h.id));
                    }
                }
            }
            break;
        }
        if let Err(e) = net::poll_once(poll, events, Some(deadline), net::TICK) {
            errors.push(format!("poll: {e}"));
            break;
        }
        queue.extend(events.iter().map(|ev| ev.token().0));
    }
    let echoed = st.iter().filter(|r| r.got).count() as u64;
    let closed = st.iter().filter(|r| r.eof).count() as u64;
    (echoed, closed)
}

fn step(h: &mut Held, r: &mut Round, byte: u8, close: bool) -> Step {
    let mut b = [0u8; 2];
    if !r.wrote {
        match h.s.write(&[byte]) {
            Ok(1) => r.wrote = true,
            Ok(_) => return Step::Failed("write returned 0".into()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Idle,
            Err(e) => return Step::Failed(format!("write: {e}")),
        }
    }
    if !r.got {
        match h.s.read(&mut b) {
            Ok(1) if b[0] == byte => r.got = true,
            Ok(0) => return Step::Failed("closed by the server before the echo".into()),
            Ok(_) => return Step::Failed("wrong echo".into()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Idle,
            Err(e) => return Step::Failed(format!("read: {e}")),
        }
        if !close {
            return Step::Done;
        }
        if let Err(e) = h.s.shutdown_write() {
            return Step::Failed(format!("shutdown: {e}"));
        }
    }
    match h.s.read(&mut b) {
        Ok(0) => {
            r.eof = true;
            Step::Done
        }
        Ok(_) => Step::Failed("bytes after the echo".into()),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Step::Idle,
        Err(e) => Step::Failed(format!("read: {e}")),
    }
}
