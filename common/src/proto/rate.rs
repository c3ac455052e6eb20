//! Token buckets: how a session limits what a peer may make it do per second.
//! Time is passed in, so tests run on virtual time.

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
/// A rate of 0 means unlimited.
#[derive(Clone, Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    pub fn new(rate_per_sec: u32, burst: u32) -> Bucket {
        let burst = f64::from(burst.max(1));
        Bucket {
            rate: f64::from(rate_per_sec),
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// `rate_per_min` tokens a minute, holding at most `burst`.
    pub fn per_minute(rate_per_min: u32, burst: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate_per_min) / 60.0,
            ..Bucket::new(1, burst)
        }
    }

    pub fn unlimited(&self) -> bool {
        self.rate == 0.0
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.unlimited() {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens whether or not they are there: the bucket may go into
    /// debt, and [`Bucket::ready_at`] then waits until it is paid back. For
    /// costs known only after the work is done (bytes scanned).
    pub fn charge(&mut self, now: Instant, n: usize) {
        if self.unlimited() {
            return;
        }
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// Whether the bucket is in debt (after [`Bucket::charge`]).
    pub fn overdrawn(&mut self, now: Instant) -> bool {
        if self.unlimited() {
            return false;
        }
        self.refill(now);
        self.tokens < 0.0
    }

    /// When the next token will be there (`now` if one is).
    pub fn next_token(&mut self, now: Instant) -> Instant {
        self.ready_at(now, 1)
    }

    /// When `want` tokens (at most the burst) will be there. Waiting for a
    /// batch rather than the next token keeps a throttled consumer from
    /// waking once per token.
    pub fn ready_at(&mut self, now: Instant, want: u32) -> Instant {
        if self.unlimited() {
            return now;
        }
        self.refill(now);
        let want = f64::from(want.max(1)).min(self.burst);
        if self.tokens >= want {
            now
        } else {
            now + Duration::from_secs_f64((want - self.tokens) / self.rate)
        }
    }

    /// Tokens added per `d` (0 when unlimited).
    pub fn per(&self, d: Duration) -> u32 {
        (self.rate * d.as_secs_f64()) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 5);
        assert!((0..5).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert_eq!(b.next_token(t0), t0 + Duration::from_millis(100));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 5);
    }

    #[test]
    fn waits_for_a_batch() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 100);
        assert!((0..100).all(|_| b.take(t0)));
        assert_eq!(b.ready_at(t0, 5), t0 + Duration::from_millis(5));
        // Never more than the burst.
        assert_eq!(b.ready_at(t0, 1_000_000), t0 + Duration::from_millis(100));
        assert_eq!(b.per(Duration::from_millis(5)), 5);
    }

    #[test]
    fn charged_work_is_paid_back_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 1000);
        b.charge(t0, 3000);
        assert!(b.overdrawn(t0));
        // 2000 tokens of debt, then 100 for the batch: 2.1 s.
        assert_eq!(b.ready_at(t0, 100), t0 + Duration::from_millis(2100));
        assert!(!b.overdrawn(t0 + Duration::from_secs(2)));
        let mut m = Bucket::per_minute(6, 2);
        assert!(m.take(t0) && m.take(t0) && !m.take(t0));
        assert!(m.take(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0, 0);
        assert!((0..1_000_000).all(|_| b.take(t0)));
        assert_eq!(b.next_token(t0), t0);
    }
}
