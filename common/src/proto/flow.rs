//! Per-stream credit flow control (PROTOCOL.md §6), one struct per direction.
//!
//! Credit is returned when bytes are *passed onward* (written to the stream's
//! socket), not when they arrive, so the bytes a receiver holds for a stream
//! never exceed the window it granted.

use super::hello::Limits;

/// How much a sender may still send on one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendCredit {
    credit: u32,
}

/// A CREDIT that would raise the credit above `2^31-1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditOverflow;

impl SendCredit {
    pub fn new(initial_window: u32) -> SendCredit {
        SendCredit {
            credit: initial_window,
        }
    }

    pub fn available(&self) -> u32 {
        self.credit
    }

    /// Accounts for `n` bytes sent; the caller never sends beyond the credit.
    pub fn consume(&mut self, n: u32) {
        debug_assert!(n <= self.credit, "sent {n} bytes with {} credit", self.credit);
        self.credit -= n;
    }

    /// Adds a CREDIT increment. Returns whether the credit was exhausted before,
    /// which is when a paused sender should resume.
    pub fn grant(&mut self, increment: u32) -> Result<bool, CreditOverflow> {
        let was_empty = self.credit == 0;
        match self.credit.checked_add(increment) {
            Some(c) if c <= Limits::MAX_WINDOW => {
                self.credit = c;
                Ok(was_empty)
            }
            _ => Err(CreditOverflow),
        }
    }
}

/// What a receiver has granted on one stream and what it owes back.
///
/// The window starts at the declared initial window (the *base*, always
/// honoured) and is tuned as bytes are passed on: it doubles, up to a
/// ceiling, while the stream's consumer keeps up (nothing left waiting when
/// credit is due), drawing the extra from a pool the session shares among its
/// streams; it shrinks back towards the base, returning the extra, while the
/// consumer lags. A single fast stream so gets a window big enough for the
/// path, and many streams together cannot make the receiver hold more than
/// `streams × base + pool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvWindow {
    base: u32,
    window: u32,
    /// Bytes the peer may still send.
    avail: u32,
    /// Bytes passed onward since the last CREDIT.
    unacked: u32,
}

/// DATA beyond the credit granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditOverrun {
    pub len: u32,
    pub avail: u32,
}

impl RecvWindow {
    pub fn new(window: u32) -> RecvWindow {
        RecvWindow {
            base: window,
            window,
            avail: window,
            unacked: 0,
        }
    }

    /// The current window (base plus what it drew from the pool).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// What this stream holds of the session's pool.
    pub fn extra(&self) -> u32 {
        self.window - self.base
    }

    /// Accounts for an arriving DATA payload.
    pub fn on_data(&mut self, len: u32) -> Result<(), CreditOverrun> {
        if len > self.avail {
            return Err(CreditOverrun {
                len,
                avail: self.avail,
            });
        }
        self.avail -= len;
        Ok(())
    }

    /// Accounts for `n` bytes passed onward, with `backlog` bytes still
    /// waiting for the consumer. Returns the increment to send in a CREDIT
    /// once at least a quarter of the window is owed (so credit goes out in a few
    /// large frames rather than one per write), tuning the window at that
    /// moment: growth up to `max` comes out of `pool`, shrinking goes back in.
    pub fn on_consumed(&mut self, n: u32, backlog: u32, max: u32, pool: &mut u64) -> Option<u32> {
        // Never owe more than was received: a confused caller must not be able
        // to grant credit the peer has not used.
        let held = self.window - self.avail - self.unacked;
        debug_assert!(n <= held, "consumed {n} bytes but only {held} are held");
        self.unacked += n.min(held);
        if self.unacked < (self.window / 4).max(1) {
            return None;
        }
        let mut inc = self.unacked;
        if backlog == 0 && self.window < max {
            // The consumer keeps up: the window is what limits the stream.
            let grow = u64::from(self.window.min(max - self.window)).min(*pool) as u32;
            self.window += grow;
            *pool -= u64::from(grow);
            inc += grow;
        } else if backlog > self.window / 2 && self.window > self.base {
            // The consumer lags: give back what the stream drew, as it drains.
            let shrink = (self.window - self.base).min(self.unacked);
            self.window -= shrink;
            *pool += u64::from(shrink);
            inc -= shrink;
        }
        self.unacked = 0;
        self.avail += inc;
        debug_assert!(self.avail <= self.window);
        (inc > 0).then_some(inc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_credit_overflow_and_resume() {
        let mut c = SendCredit::new(10);
        c.consume(10);
        assert_eq!(c.available(), 0);
        assert_eq!(c.grant(5), Ok(true));
        assert_eq!(c.grant(5), Ok(false));
        assert_eq!(c.grant(u32::MAX), Err(CreditOverflow));
        assert_eq!(c.grant(Limits::MAX_WINDOW - 10), Ok(false));
        assert_eq!(c.grant(1), Err(CreditOverflow));
        assert_eq!(c.available(), Limits::MAX_WINDOW);
    }

    #[test]
    fn receive_window_grants_at_a_quarter() {
        let mut w = RecvWindow::new(100);
        assert_eq!(w.on_data(60), Ok(()));
        assert_eq!(w.on_data(41), Err(CreditOverrun { len: 41, avail: 40 }));
        let mut pool = 0;
        assert_eq!(w.on_consumed(24, 0, 100, &mut pool), None);
        assert_eq!(w.on_consumed(1, 0, 100, &mut pool), Some(25));
        assert_eq!(w.on_consumed(25, 0, 100, &mut pool), Some(25));
        assert_eq!(w.on_data(90), Ok(()));
        assert_eq!(w.on_data(1), Err(CreditOverrun { len: 1, avail: 0 }));
    }

    #[test]
    fn window_grows_while_the_consumer_keeps_up_and_shrinks_when_it_lags() {
        let mut pool = 1000;
        let mut w = RecvWindow::new(100);
        w.on_data(100).unwrap();
        assert_eq!(w.on_consumed(100, 0, 400, &mut pool), Some(200));
        assert_eq!((w.window(), pool), (200, 900));
        w.on_data(200).unwrap();
        assert_eq!(w.on_consumed(200, 0, 400, &mut pool), Some(400));
        assert_eq!((w.window(), pool), (400, 700));
        // Lagging consumer: credit is withheld until the window is back at base.
        w.on_data(400).unwrap();
        assert_eq!(w.on_consumed(200, 300, 400, &mut pool), None);
        assert_eq!(w.window(), 200);
        assert_eq!(pool, 900);
        assert_eq!(w.on_consumed(100, 300, 400, &mut pool), None);
        assert_eq!((w.window(), pool, w.extra()), (100, 1000, 0));
        // Caught up: it grows again.
        assert_eq!(w.on_consumed(100, 0, 400, &mut pool), Some(200));
    }

    #[test]
    fn growth_is_bounded_by_the_pool() {
        let mut pool = 50;
        let mut w = RecvWindow::new(100);
        w.on_data(100).unwrap();
        assert_eq!(w.on_consumed(100, 0, 1000, &mut pool), Some(150));
        assert_eq!((w.window(), pool), (150, 0));
    }

    #[test]
    fn window_of_one() {
        let mut w = RecvWindow::new(1);
        w.on_data(1).unwrap();
        assert_eq!(w.on_consumed(1, 0, 1, &mut 0), Some(1));
    }

    /// Over any sequence of arrivals and hand-offs, a sender that respects the
    /// credit never overruns, and the receiver never holds more than its window.
    #[test]
    fn window_conservation() {
        let mut rng = 0x1234_5678_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..200 {
            let window = (next() % 5000 + 1) as u32;
            let mut s = SendCredit::new(window);
            let mut r = RecvWindow::new(window);
            let mut held = 0u32;
            let total_pool = u64::from(window) * 2;
            let mut pool = total_pool;
            for _ in 0..500 {
                if next() % 2 == 0 && s.available() > 0 {
                    let n = (next() as u32 % s.available()) + 1;
                    s.consume(n);
                    r.on_data(n).unwrap();
                    held += n;
                } else if held > 0 {
                    let n = (next() as u32 % held) + 1;
                    held -= n;
                    let backlog = (next() % 2 * u64::from(held)) as u32;
                    if let Some(inc) = r.on_consumed(n, backlog, 4 * window, &mut pool) {
                        s.grant(inc).unwrap();
                    }
                }
                // The receiver never holds more than its base plus the pool,
                // and the pool is conserved.
                assert!(held <= window + total_pool as u32);
                assert!(s.available() + held <= r.window());
                assert_eq!(pool + u64::from(r.extra()), total_pool);
            }
        }
    }
}
