//! What one guest may hold on the host: buffered bytes (per guest),
//! descriptors (shared by all guests), stream timeouts, and how many stream
//! log lines it may cause per second.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes held for a guest's streams and descriptors held for all guests.
#[derive(Debug)]
pub struct Budget {
    buffered: AtomicUsize,
    max_buffered: usize,
    fds: Arc<AtomicUsize>,
    max_fds: usize,
}

impl Budget {
    /// A budget with room for `max_buffered` bytes, sharing the descriptor
    /// count `fds` (of at most `max_fds`) with other budgets.
    pub fn new(max_buffered: usize, fds: Arc<AtomicUsize>, max_fds: usize) -> Budget {
        Budget {
            buffered: AtomicUsize::new(0),
            max_buffered,
            fds,
            max_fds,
        }
    }

    /// No limits (the guest side, where the peer is the trusted host).
    pub fn unlimited() -> Budget {
        Budget::new(usize::MAX, Arc::new(AtomicUsize::new(0)), usize::MAX)
    }

    /// Reserves `n` more buffered bytes, unless that would pass the limit.
    pub fn try_buffer(&self, n: usize) -> bool {
        let max = self.max_buffered;
        self.buffered
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_add(n).filter(|&t| t <= max)
            })
            .is_ok()
    }

    pub fn release_buffer(&self, n: usize) {
        let prev = self.buffered.fetch_sub(n, Ordering::Relaxed);
        debug_assert!(prev >= n, "released {n} of {prev} buffered bytes");
    }

    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    pub fn max_buffered(&self) -> usize {
        self.max_buffered
    }

    /// Whether a descriptor is free (a hint before creating a socket).
    pub fn fd_available(&self) -> bool {
        self.fds.load(Ordering::Relaxed) < self.max_fds
    }

    /// Counts a descriptor, unless the limit is reached.
    pub fn try_fd(&self) -> bool {
        let max = self.max_fds;
        self.fds
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                (f < max).then_some(f + 1)
            })
            .is_ok()
    }

    pub fn release_fd(&self) {
        self.fds.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn fds(&self) -> usize {
        self.fds.load(Ordering::Relaxed)
    }

    pub fn max_fds(&self) -> usize {
        self.max_fds
    }
}

/// How long a stream may sit without progress. `None` disables a timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamTimeouts {
    /// No byte moved either way for this long.
    pub idle: Option<Duration>,
    /// One direction finished and the stream not done this long after.
    pub half_closed: Option<Duration>,
}

/// Lets through at most `per_sec` lines a second and counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    per_sec: u32,
    window: Option<Instant>,
    count: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(per_sec: u32) -> LogLimiter {
        LogLimiter {
            per_sec,
            window: None,
            count: 0,
            suppressed: 0,
        }
    }

    /// Whether to log a line now. When a new second begins after lines were
    /// dropped, returns how many, for one summary line.
    pub fn allow(&mut self, now: Instant) -> (bool, Option<u64>) {
        let mut dropped = None;
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.count = 0;
            if self.suppressed > 0 {
                dropped = Some(std::mem::take(&mut self.suppressed));
            }
        }
        if self.count < self.per_sec {
            self.count += 1;
            (true, dropped)
        } else {
            self.suppressed += 1;
            (false, dropped)
        }
    }
}

/// The soft limit on open files, from `/proc/self/limits`.
pub fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_budget() {
        let b = Budget::new(100, Arc::new(AtomicUsize::new(0)), 2);
        assert!(b.try_buffer(60));
        assert!(!b.try_buffer(41));
        assert!(b.try_buffer(40));
        b.release_buffer(100);
        assert_eq!(b.buffered(), 0);
        assert!(b.try_fd() && b.try_fd() && !b.try_fd());
        b.release_fd();
        assert!(b.fd_available());
    }

    #[test]
    fn fds_are_shared_between_budgets() {
        let fds = Arc::new(AtomicUsize::new(0));
        let a = Budget::new(10, fds.clone(), 1);
        let b = Budget::new(10, fds, 1);
        assert!(a.try_fd());
        assert!(!b.try_fd());
    }

    #[test]
    fn log_limiter_counts_what_it_drops() {
        let t = Instant::now();
        let mut l = LogLimiter::new(2);
        assert_eq!(l.allow(t), (true, None));
        assert_eq!(l.allow(t), (true, None));
        assert_eq!(l.allow(t), (false, None));
        assert_eq!(l.allow(t), (false, None));
        assert_eq!(l.allow(t + Duration::from_secs(1)), (true, Some(2)));
    }

    #[test]
    fn reads_the_open_files_limit() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
