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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvWindow {
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
            window,
            avail: window,
            unacked: 0,
        }
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

    /// Accounts for `n` bytes passed onward. Returns the increment to send in a
    /// CREDIT once at least half the window is owed, so credit goes out in a
    /// few large frames rather than one per write.
    pub fn on_consumed(&mut self, n: u32) -> Option<u32> {
        // Never owe more than was received: a confused caller must not be able
        // to grant credit the peer has not used.
        let held = self.window - self.avail - self.unacked;
        debug_assert!(n <= held, "consumed {n} bytes but only {held} are held");
        self.unacked += n.min(held);
        if self.unacked >= (self.window / 2).max(1) {
            let inc = self.unacked;
            self.avail += inc;
            self.unacked = 0;
            debug_assert!(self.avail <= self.window);
            Some(inc)
        } else {
            None
        }
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
    fn receive_window_grants_at_half() {
        let mut w = RecvWindow::new(100);
        assert_eq!(w.on_data(60), Ok(()));
        assert_eq!(w.on_data(41), Err(CreditOverrun { len: 41, avail: 40 }));
        assert_eq!(w.on_consumed(30), None);
        assert_eq!(w.on_consumed(20), Some(50));
        assert_eq!(w.on_data(90), Ok(()));
        assert_eq!(w.on_data(1), Err(CreditOverrun { len: 1, avail: 0 }));
    }

    #[test]
    fn window_of_one() {
        let mut w = RecvWindow::new(1);
        w.on_data(1).unwrap();
        assert_eq!(w.on_consumed(1), Some(1));
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
            for _ in 0..500 {
                if next() % 2 == 0 && s.available() > 0 {
                    let n = (next() as u32 % s.available()) + 1;
                    s.consume(n);
                    r.on_data(n).unwrap();
                    held += n;
                } else if held > 0 {
                    let n = (next() as u32 % held) + 1;
                    held -= n;
                    if let Some(inc) = r.on_consumed(n) {
                        s.grant(inc).unwrap();
                    }
                }
                assert!(held <= window);
                assert!(s.available() + held <= window);
            }
        }
    }
}
