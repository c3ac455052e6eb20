//! What one guest may hold on the host: buffered bytes (per guest),
//! descriptors (one ledger for the whole process), stream timeouts, and how
//! many stream log lines it may cause per second.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every descriptor the process holds, counted against its open-files limit.
///
/// Two kinds of holder draw from it. Infrastructure (channels, event loops,
/// wakers, watches) may use everything but [`Descriptors::SCAN_ROOM`], which
/// stays free for directory scans. Streams may use everything but the
/// reserve, so a guest's streams can never take the descriptor a new
/// channel, or the next scan, needs: at the limit streams are refused with
/// `RESOURCE_LIMIT`, nothing else fails.
#[derive(Debug)]
pub struct Descriptors {
    limit: usize,
    reserve: usize,
    /// Most stream descriptors at once (`--max-fds`), within the limit.
    max_streams: usize,
    used: AtomicUsize,
    streams: AtomicUsize,
}

impl Descriptors {
    /// Kept free of every holder: room for a scan's `opendir` calls and the
    /// odd log or `/proc` read.
    pub const SCAN_ROOM: usize = 16;

    /// A ledger for a process allowed `limit` descriptors that has `base`
    /// open already (standard streams, the log, the main loop). The reserve
    /// kept from streams grows with the limit: 64 plus 1/64 of it.
    pub fn new(limit: usize, base: usize, max_streams: Option<usize>) -> Descriptors {
        let reserve = (64 + limit / 64).min(limit / 2).max(Self::SCAN_ROOM);
        let room = limit.saturating_sub(base + reserve);
        Descriptors {
            limit,
            reserve,
            max_streams: max_streams.map_or(room, |m| m.min(room)),
            used: AtomicUsize::new(base),
            streams: AtomicUsize::new(0),
        }
    }

    /// No limit at all (the guest side, whose peer is the trusted host).
    pub fn unlimited() -> Descriptors {
        Descriptors {
            limit: usize::MAX,
            reserve: 0,
            max_streams: usize::MAX,
            used: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
        }
    }

    fn take(&self, n: usize, ceiling: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(n).filter(|&t| t <= ceiling)
            })
            .is_ok()
    }

    /// Counts `n` descriptors of infrastructure, unless only the scan room
    /// would be left.
    pub fn take_infra(&self, n: usize) -> bool {
        self.take(n, self.limit.saturating_sub(Self::SCAN_ROOM))
    }

    pub fn release_infra(&self, n: usize) {
        let prev = self.used.fetch_sub(n, Ordering::Relaxed);
        debug_assert!(prev >= n, "released {n} of {prev} descriptors");
    }

    /// Counts one stream descriptor, unless that would touch the reserve or
    /// pass `--max-fds`.
    pub fn take_stream(&self) -> bool {
        let max = self.max_streams;
        let counted = self
            .streams
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s < max).then_some(s + 1)
            })
            .is_ok();
        if !counted {
            return false;
        }
        if self.take(1, self.limit.saturating_sub(self.reserve)) {
            return true;
        }
        self.streams.fetch_sub(1, Ordering::Relaxed);
        false
    }

    pub fn release_stream(&self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
        self.release_infra(1);
    }

    /// Whether a stream descriptor is free now (a hint before connecting).
    pub fn stream_available(&self) -> bool {
        self.streams.load(Ordering::Relaxed) < self.max_streams
            && self.used.load(Ordering::Relaxed) < self.limit.saturating_sub(self.reserve)
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn reserve(&self) -> usize {
        self.reserve
    }

    pub fn max_streams(&self) -> usize {
        self.max_streams
    }

    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }
}

/// Bytes held for one guest's streams, and the process's descriptor ledger.
#[derive(Debug)]
pub struct Budget {
    buffered: AtomicUsize,
    max_buffered: usize,
    fds: Arc<Descriptors>,
}

impl Budget {
    /// A budget with room for `max_buffered` bytes, drawing stream
    /// descriptors from `fds`.
    pub fn new(max_buffered: usize, fds: Arc<Descriptors>) -> Budget {
        Budget {
            buffered: AtomicUsize::new(0),
            max_buffered,
            fds,
        }
    }

    /// No limits (the guest side, where the peer is the trusted host).
    pub fn unlimited() -> Budget {
        Budget::new(usize::MAX, Arc::new(Descriptors::unlimited()))
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

    /// Whether a stream descriptor is free (a hint before creating a socket).
    pub fn fd_available(&self) -> bool {
        self.fds.stream_available()
    }

    /// Counts a stream descriptor, unless the limit is reached.
    pub fn try_fd(&self) -> bool {
        self.fds.take_stream()
    }

    pub fn release_fd(&self) {
        self.fds.release_stream();
    }

    pub fn max_fds(&self) -> usize {
        self.fds.max_streams()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_budget() {
        let b = Budget::new(100, Arc::new(Descriptors::new(1000, 0, Some(2))));
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
        let fds = Arc::new(Descriptors::new(1000, 0, Some(1)));
        let a = Budget::new(10, fds.clone());
        let b = Budget::new(10, fds);
        assert!(a.try_fd());
        assert!(!b.try_fd());
    }

    #[test]
    fn streams_stop_at_the_reserve_and_infrastructure_at_the_scan_room() {
        // 2000 descriptors, 10 open: a reserve of 64 + 31 is kept from streams.
        let d = Descriptors::new(2000, 10, None);
        assert_eq!(d.reserve(), 95);
        let mut streams = 0;
        while d.take_stream() {
            streams += 1;
        }
        assert_eq!(streams, 2000 - 95 - 10);
        assert_eq!(d.max_streams(), streams);
        // Channels and loops may still use the reserve, all but the scan room.
        let mut infra = 0;
        while d.take_infra(1) {
            infra += 1;
        }
        assert_eq!(infra, 95 - Descriptors::SCAN_ROOM);
        assert_eq!(d.used(), 2000 - Descriptors::SCAN_ROOM);
        // Streams never enter the reserve, even when one of theirs is freed
        // while channels use it.
        d.release_stream();
        assert!(!d.take_stream());
        // Once the channels are gone, streams may use what they left.
        d.release_infra(95 - Descriptors::SCAN_ROOM);
        assert!(d.take_stream());
        assert!(!d.take_stream());
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
}
