//! The event loop both daemons run: one mio [`Poll`], signals (on the
//! thread that wants them), a [`Waker`] for commands from other threads, and
//! the handler's timers. What the daemon does plugs in through [`Handler`];
//! the loop itself knows nothing of channels or guests.
//!
//! A turn: wait for readiness or the handler's next deadline, read the clock
//! once, hand every event to the handler, then let it do its work with that
//! `now`. A handler with work left (a bounded turn ran out) is called again
//! without waiting, after the loop has collected whatever became ready
//! meanwhile, so no source waits behind another's backlog.
//!
//! A poll that fails (other than by a signal) is retried with a short pause;
//! one that keeps failing ends the loop with the error, and the daemon exits
//! non-zero so that its supervisor restarts it.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, warn};
use mio::event::Event;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use signal_hook_mio::v1_0::Signals;

/// Token of the signal source.
pub const SIGNALS: Token = Token(usize::MAX);
/// Token of the waker.
pub const WAKER: Token = Token(usize::MAX - 1);
/// Handlers' own tokens stay below this.
pub const FIRST_RESERVED: usize = usize::MAX - 1;

/// Consecutive poll failures after which the loop gives up.
const MAX_POLL_FAILURES: u32 = 10;
/// Pause after the first failure, doubled after each further one (about 5 s
/// in all before the loop gives up).
const POLL_RETRY_FIRST: Duration = Duration::from_millis(10);

/// What the handler says at the end of a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Nothing left to do until readiness or the next deadline.
    Idle,
    /// Work is left that needs no readiness: call again soon.
    Busy,
    /// The handler is finished: the loop returns.
    Done,
}

/// A daemon's state machine as the loop sees it.
pub trait Handler {
    /// Readiness of one of the handler's own tokens.
    fn ready(&mut self, event: &Event, registry: &Registry, now: Instant);

    /// A signal arrived (see [`EventLoop::with_signals`]).
    fn signal(&mut self, _signal: i32, _registry: &Registry, _now: Instant) {}

    /// The waker was woken: commands may be waiting.
    fn woken(&mut self, _registry: &Registry, _now: Instant) {}

    /// Everything due now, after this turn's events.
    fn turn(&mut self, registry: &Registry, now: Instant) -> Turn;

    /// When [`Handler::turn`] must next run without readiness.
    fn next_deadline(&self) -> Option<Instant>;
}

pub struct EventLoop {
    poll: Poll,
    events: Events,
    signals: Option<Signals>,
    waker: Option<Arc<Waker>>,
}

impl EventLoop {
    pub fn new() -> io::Result<EventLoop> {
        Ok(EventLoop {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            signals: None,
            waker: None,
        })
    }

    /// Delivers these signals to [`Handler::signal`] instead of their default
    /// action.
    pub fn with_signals(mut self, signals: &[i32]) -> io::Result<EventLoop> {
        let mut s = Signals::new(signals)?;
        self.poll
            .registry()
            .register(&mut s, SIGNALS, Interest::READABLE)?;
        self.signals = Some(s);
        Ok(self)
    }

    /// The loop's waker (made at the first call): other threads wake the loop
    /// with it after queueing a command.
    pub fn waker(&mut self) -> io::Result<Arc<Waker>> {
        if let Some(w) = &self.waker {
            return Ok(w.clone());
        }
        let w = Arc::new(Waker::new(self.poll.registry(), WAKER)?);
        self.waker = Some(w.clone());
        Ok(w)
    }

    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// Runs until the handler is [`Turn::Done`], or the poll keeps failing.
    pub fn run(&mut self, h: &mut dyn Handler) -> io::Result<()> {
        let mut busy = false;
        let mut failures = 0u32;
        loop {
            let timeout = if busy {
                Some(Duration::ZERO)
            } else {
                let now = Instant::now();
                h.next_deadline().map(|t| t.saturating_duration_since(now))
            };
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => failures = 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    failures += 1;
                    if failures >= MAX_POLL_FAILURES {
                        error!("poll failed {failures} times in a row: {e}; giving up");
                        return Err(e);
                    }
                    let pause = POLL_RETRY_FIRST * 2u32.pow(failures - 1);
                    warn!("poll failed: {e}; retrying in {} ms", pause.as_millis());
                    std::thread::sleep(pause);
                    continue;
                }
            }
            let now = Instant::now();
            let registry = self.poll.registry();
            for ev in self.events.iter() {
                match ev.token() {
                    SIGNALS => {
                        if let Some(signals) = &mut self.signals {
                            for sig in signals.pending() {
                                h.signal(sig, registry, now);
                            }
                        }
                    }
                    WAKER => h.woken(registry, now),
                    _ => h.ready(ev, registry, now),
                }
            }
            match h.turn(registry, now) {
                Turn::Done => return Ok(()),
                Turn::Busy => busy = true,
                Turn::Idle => busy = false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counter {
        stream: mio::net::UnixStream,
        readable: usize,
        turns: usize,
        woken: Arc<AtomicUsize>,
        deadline: Option<Instant>,
        timer_fired: bool,
    }

    impl Handler for Counter {
        fn ready(&mut self, event: &Event, _: &Registry, _: Instant) {
            if event.token() == Token(1) && event.is_readable() {
                self.readable += 1;
            }
        }
        fn woken(&mut self, _: &Registry, _: Instant) {
            self.woken.fetch_add(1, Ordering::SeqCst);
        }
        fn turn(&mut self, _: &Registry, now: Instant) -> Turn {
            self.turns += 1;
            if self.deadline.is_some_and(|d| now >= d) {
                self.timer_fired = true;
                self.deadline = None;
            }
            let _ = &self.stream;
            if self.readable > 0 && self.woken.load(Ordering::SeqCst) > 0 && self.timer_fired {
                Turn::Done
            } else {
                Turn::Idle
            }
        }
        fn next_deadline(&self) -> Option<Instant> {
            self.deadline
        }
    }

    #[test]
    fn readiness_wakes_and_timers_reach_the_handler() {
        let mut el = EventLoop::new().unwrap();
        let (mut a, mut b) = mio::net::UnixStream::pair().unwrap();
        el.registry()
            .register(&mut a, Token(1), Interest::READABLE)
            .unwrap();
        let waker = el.waker().unwrap();
        let woken = Arc::new(AtomicUsize::new(0));
        let mut h = Counter {
            stream: a,
            readable: 0,
            turns: 0,
            woken: woken.clone(),
            deadline: Some(Instant::now() + Duration::from_millis(30)),
            timer_fired: false,
        };
        b.write_all(b"x").unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            waker.wake().unwrap();
        });
        let start = Instant::now();
        el.run(&mut h).unwrap();
        t.join().unwrap();
        assert!(h.readable >= 1 && woken.load(Ordering::SeqCst) >= 1 && h.timer_fired);
        assert!(
            start.elapsed() >= Duration::from_millis(25),
            "the deadline was kept"
        );
        assert!(h.turns < 20, "{} turns: the loop must not spin", h.turns);
    }
}
