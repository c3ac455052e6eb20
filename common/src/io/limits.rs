//! What one guest may hold on the host: buffered bytes and streams (per
//! guest), descriptors (one ledger for the whole process, with a fair share
//! per guest), stream timeouts, and how many stream log lines it may cause
//! per second.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::share::{FairShare, ShareRefusal};

/// Every descriptor the process holds, counted against its open-files limit.
///
/// Two kinds of holder draw from it. Infrastructure (channels, event loops,
/// wakers, watches) may use everything but [`Descriptors::SCAN_ROOM`], which
/// stays free for directory scans. Streams may use everything but the
/// reserve, so a guest's streams can never take the descriptor a new
/// channel, or the next scan, needs: at the limit streams are refused with
/// `RESOURCE_LIMIT`, nothing else fails.
///
/// Stream descriptors are shared fairly between guests ([`FairShare`]): a
/// part is kept for a guest yet to come (an eighth of the room, or an equal
/// part if that is less) and each of the `G` guests present is guaranteed an
/// equal part of the rest. A guest may use more while others do not need
/// theirs, but never what others are still owed.
#[derive(Debug)]
pub struct Descriptors {
    limit: usize,
    reserve: usize,
    /// Most stream descriptors at once (`--max-fds`), within the limit.
    max_streams: usize,
    used: AtomicUsize,
    shares: Mutex<FairShare<u64>>,
}

/// Why a stream descriptor was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdRefusal {
    /// Streams of all guests reached `--max-fds` or the reserve.
    Exhausted { max: usize },
    /// The guest holds its share and the rest is owed to other guests.
    Share { share: usize, guests: usize },
}

impl std::fmt::Display for FdRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FdRefusal::Exhausted { max } => write!(f, "descriptor limit of {max} streams reached"),
            FdRefusal::Share { share, guests } => write!(
                f,
                "guest holds its share of {share} stream descriptors ({guests} guests and room for one more) \
                 and the rest is owed to others"
            ),
        }
    }
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
            shares: Mutex::new(FairShare::new(max_streams.map_or(room, |m| m.min(room)))),
        }
    }

    /// No limit at all (the guest side, whose peer is the trusted host).
    pub fn unlimited() -> Descriptors {
        Descriptors {
            limit: usize::MAX,
            reserve: 0,
            max_streams: usize::MAX,
            used: AtomicUsize::new(0),
            shares: Mutex::new(FairShare::new(usize::MAX)),
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

    fn shares(&self) -> std::sync::MutexGuard<'_, FairShare<u64>> {
        self.shares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A guest that will hold stream descriptors: from now on its share is
    /// guaranteed.
    pub fn add_guest(&self, guest: u64) {
        self.shares().join(guest);
    }

    /// A guest that is gone (its streams were released first).
    pub fn remove_guest(&self, guest: u64) {
        let mut sh = self.shares();
        debug_assert_eq!(sh.held_by(&guest), 0, "guest {guest} removed holding streams");
        sh.leave(&guest);
    }

    /// Counts one stream descriptor for `guest`, unless that would touch the
    /// reserve, pass `--max-fds`, or take what other guests are owed.
    pub fn take_stream(&self, guest: u64) -> Result<(), FdRefusal> {
        let mut sh = self.shares();
        sh.try_take(&guest).map_err(|r| match r {
            ShareRefusal::Full { room } => FdRefusal::Exhausted { max: room },
            ShareRefusal::Share { share, holders } => FdRefusal::Share {
                share,
                guests: holders,
            },
        })?;
        if !self.take(1, self.limit.saturating_sub(self.reserve)) {
            sh.release(&guest);
            return Err(FdRefusal::Exhausted {
                max: self.max_streams,
            });
        }
        Ok(())
    }

    pub fn release_stream(&self, guest: u64) {
        self.shares().release(&guest);
        self.release_infra(1);
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

    /// Stream descriptors held by all guests.
    pub fn streams(&self) -> usize {
        self.shares().total()
    }

    /// Stream descriptors `guest` holds.
    pub fn streams_of(&self, guest: u64) -> usize {
        self.shares().held_by(&guest)
    }
}

/// Why a guest may not open another stream now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamRefusal {
    /// The guest has its `--max-streams` open, over all its channels.
    GuestLimit(usize),
    Descriptors(FdRefusal),
}

impl std::fmt::Display for StreamRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamRefusal::GuestLimit(n) => write!(f, "guest has its limit of {n} streams open"),
            StreamRefusal::Descriptors(r) => r.fmt(f),
        }
    }
}

/// What one guest holds on the host: bytes buffered for its streams, its
/// streams over all its channels, and its stream descriptors in the
/// process's ledger.
#[derive(Debug)]
pub struct Budget {
    guest: u64,
    buffered: AtomicUsize,
    max_buffered: usize,
    streams: AtomicUsize,
    max_streams: usize,
    /// Streams of the guest that are quiet now (see [`QuietRule`]).
    quiet: AtomicUsize,
    fds: Arc<Descriptors>,
}

impl Budget {
    /// The budget of `guest`: at most `max_buffered` bytes and `max_streams`
    /// streams, drawing stream descriptors from `fds` (where the guest is
    /// registered until the budget is dropped).
    pub fn new(guest: u64, max_buffered: usize, max_streams: usize, fds: Arc<Descriptors>) -> Budget {
        fds.add_guest(guest);
        Budget {
            guest,
            buffered: AtomicUsize::new(0),
            max_buffered,
            streams: AtomicUsize::new(0),
            max_streams,
            quiet: AtomicUsize::new(0),
            fds,
        }
    }

    /// A stream of the guest became quiet (`true`) or active again.
    pub fn set_quiet(&self, quiet: bool) {
        if quiet {
            self.quiet.fetch_add(1, Ordering::Relaxed);
        } else {
            self.quiet.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Quiet streams of the guest over all its channels.
    pub fn quiet(&self) -> usize {
        self.quiet.load(Ordering::Relaxed)
    }

    /// No limits (the guest side, where the peer is the trusted host).
    pub fn unlimited() -> Budget {
        Budget::new(0, usize::MAX, usize::MAX, Arc::new(Descriptors::unlimited()))
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

    /// Counts a stream and its descriptor, unless the guest has its
    /// `max_streams` open or no descriptor is free for it.
    pub fn try_stream(&self) -> Result<(), StreamRefusal> {
        let max = self.max_streams;
        self.streams
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s < max).then_some(s + 1)
            })
            .map_err(|_| StreamRefusal::GuestLimit(max))?;
        if let Err(r) = self.fds.take_stream(self.guest) {
            self.streams.fetch_sub(1, Ordering::Relaxed);
            return Err(StreamRefusal::Descriptors(r));
        }
        Ok(())
    }

    pub fn release_stream(&self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
        self.fds.release_stream(self.guest);
    }

    /// Streams the guest has open over all its channels.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    pub fn fds(&self) -> &Arc<Descriptors> {
        &self.fds
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.fds.remove_guest(self.guest);
    }
}

/// How long a stream may sit without progress. `None` disables a timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamTimeouts {
    /// No byte moved either way for this long.
    pub idle: Option<Duration>,
    /// One direction finished and the stream not done this long after.
    pub half_closed: Option<Duration>,
    /// How many quiet streams a guest may keep.
    pub quiet: Option<QuietRule>,
}

/// Quiet streams: a byte now and then keeps a stream from the idle timeout,
/// so a guest could hold its streams (and the services' connections) forever
/// at almost no cost. A stream is *quiet* while fewer than `bytes` moved
/// either way in its last `window`; a guest may keep `max` quiet streams,
/// and past that the ones quiet longest are reset with `TIMEOUT`. Quiet
/// streams that are legitimate (an AMQP connection between heartbeats) are
/// kept up to the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuietRule {
    pub window: Duration,
    pub bytes: u64,
    pub max: usize,
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

    fn ledger(limit: usize, max_streams: Option<usize>) -> Arc<Descriptors> {
        Arc::new(Descriptors::new(limit, 0, max_streams))
    }

    #[test]
    fn buffer_budget_and_streams_over_all_channels() {
        let b = Budget::new(1, 100, 2, ledger(1000, None));
        assert!(b.try_buffer(60));
        assert!(!b.try_buffer(41));
        assert!(b.try_buffer(40));
        b.release_buffer(100);
        assert_eq!(b.buffered(), 0);
        // Exactly max_streams, whichever channel asks.
        assert!(b.try_stream().is_ok() && b.try_stream().is_ok());
        assert_eq!(b.try_stream(), Err(StreamRefusal::GuestLimit(2)));
        b.release_stream();
        assert!(b.try_stream().is_ok());
        assert_eq!(b.fds().streams_of(1), 2);
        b.release_stream();
        b.release_stream();
    }

    #[test]
    fn streams_stop_at_the_reserve_and_infrastructure_at_the_scan_room() {
        // 2000 descriptors, 10 open: a reserve of 64 + 31 is kept from streams.
        let d = Descriptors::new(2000, 10, None);
        assert_eq!(d.reserve(), 95);
        // A stream each for ever more guests: only the limit stops them.
        let mut streams = 0;
        while d.take_stream(streams as u64).is_ok() {
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
        d.release_stream(1);
        assert!(d.take_stream(1).is_err());
        // Once the channels are gone, streams may use what they left.
        d.release_infra(95 - Descriptors::SCAN_ROOM);
        assert!(d.take_stream(1).is_ok());
        assert!(d.take_stream(1).is_err());
    }

    #[test]
    fn a_hogging_guest_leaves_its_neighbours_their_share() {
        let d = ledger(100_000, Some(300));
        d.add_guest(1);
        d.add_guest(2);
        let hog = (0..300).filter(|_| d.take_stream(1).is_ok()).count();
        // An eighth (38) is kept for a newcomer, guest 2 is owed its half of
        // the rest.
        assert_eq!(hog, 131, "guest 2's part and a newcomer's stay free");
        assert!(matches!(
            d.take_stream(1),
            Err(FdRefusal::Share {
                share: 131,
                guests: 2
            })
        ));
        assert_eq!((0..300).filter(|_| d.take_stream(2).is_ok()).count(), 131);
        // A guest arriving later still finds the part kept for it.
        d.add_guest(3);
        assert_eq!((0..300).filter(|_| d.take_stream(3).is_ok()).count(), 38);
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
