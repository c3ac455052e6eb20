//! [`Config`]: the tunables of a session and the reference defaults.

use std::time::Duration;

use crate::proto::frame::FRAME_OVERHEAD;
use crate::proto::hello::{Limits, Role};

/// Tunables of one session. [`Config::new`] gives the reference defaults
/// (PROTOCOL.md §10).
#[derive(Clone, Debug)]
pub struct Config {
    pub role: Role,
    /// What this side declares it will receive.
    pub limits: Limits,
    /// Free-form identity sent in the HELLO, e.g. `vios-host-bridge 0.1.0`.
    pub identity: String,
    /// DATA is queued only while fewer than this many bytes wait to be written.
    pub tx_high_water: usize,
    pub hello_retry_first: Duration,
    pub hello_retry_max: Duration,
    /// A HELLO that has not completed this long after its magic arrived is skipped.
    pub hello_deadline: Duration,
    pub backoff_first: Duration,
    pub backoff_max: Duration,
    /// A session that lasted this long forgives earlier failures.
    pub backoff_reset_after: Duration,
    /// What a peer may make this side do per second (PROTOCOL.md §8.2).
    pub policy: Policy,
    /// How far a stream's receive window may grow beyond the declared initial
    /// window while its consumer keeps up (PROTOCOL.md §6).
    pub window_max: u32,
    /// Extra window all streams of a session may draw, together.
    pub window_pool: u32,
    /// With CHANNEL_ACK: frame bytes written to the channel and not yet
    /// acknowledged beyond which no bulk DATA is written (PROTOCOL.md §6.1).
    /// Bytes past the channel cannot be reordered: the fewer there are, the
    /// less a small frame waits behind another stream's bulk. At least
    /// [`MIN_INFLIGHT`].
    pub inflight_limit: usize,
    /// The capability bits this side sets in its HELLO (PROTOCOL.md §3.1).
    pub capabilities: u32,
}

/// The smallest in-flight limit a sender may use (PROTOCOL.md §6.1): four
/// acknowledgement quanta, so that the peer always has one to send.
pub const MIN_INFLIGHT: usize = 64 * 1024;
/// A receiver with CHANNEL_ACK acknowledges at least every this many bytes
/// of frames (PROTOCOL.md §6.1).
pub const ACK_QUANTUM: u64 = 16 * 1024;
/// The reference in-flight limit: see docs/BENCH.md for how it was chosen.
pub const DEFAULT_INFLIGHT_LIMIT: usize = 192 * 1024;

/// The window a stream may grow to: enough for one stream to use the path,
/// small enough that a bulk stream does not queue more than about 0.4 ms of
/// data (at 1.4 GB/s) in front of other streams (see docs/BENCH.md).
pub const DEFAULT_WINDOW_MAX: u32 = 512 << 10;
pub const DEFAULT_WINDOW_POOL: u32 = 12 << 20;

/// Rate limits on what the peer sends. A rate of 0 means unlimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Frames other than DATA (HELLOs included) per second, with a burst of
    /// as many. Beyond it the session ends with `ENHANCE_YOUR_CALM`.
    pub control_rate: u32,
    /// Frames of any kind per second, with a burst of as many. Beyond it the
    /// session stops reading input until the bucket refills: a peer sending
    /// tiny frames at line rate gets throttled, not served at any CPU cost.
    pub frame_rate: u32,
    /// OPENs per second, with a burst of `open_burst`. Beyond it opens are
    /// refused with `RESOURCE_LIMIT` (and count as violations).
    pub open_rate: u32,
    pub open_burst: u32,
    /// Stream-level violations and refusals for rate tolerated per 10 s
    /// (with a burst of as many); beyond it the session ends with
    /// `ENHANCE_YOUR_CALM`.
    pub violations_per_10s: u32,
    /// Sessions established per minute, with a burst of twice as many.
    /// Beyond it the end of a session counts as a failure whatever its
    /// reason, so a peer that ends sessions as fast as it makes them is held
    /// off like one that breaks the rules.
    pub sessions_per_minute: u32,
    /// Input bytes a handshake may examine per second, CRC work included
    /// (a burst of as many). Beyond it the channel is not read until the
    /// work is paid back: scanning costs at most this much per second.
    pub scan_bytes_per_sec: u32,
}

pub const DEFAULT_CONTROL_RATE: u32 = 100_000;
pub const DEFAULT_FRAME_RATE: u32 = 500_000;
pub const DEFAULT_OPEN_RATE: u32 = 2_000;
pub const DEFAULT_VIOLATIONS_PER_10S: u32 = 1_000;
pub const DEFAULT_SESSIONS_PER_MINUTE: u32 = 6;
/// 8 MiB a second, with a burst of as much: a handshake after a restart
/// discards at most a few MB of stale bytes (the channel's buffers), which
/// fits in the burst; a peer spraying magics costs the host at most this much
/// CRC work, about 2% of a core with the table-driven CRC.
pub const DEFAULT_SCAN_BYTES_PER_SEC: u32 = 8 << 20;

impl Policy {
    /// No limits at all (tests, and peers that are trusted).
    pub fn unlimited() -> Policy {
        Policy {
            control_rate: 0,
            frame_rate: 0,
            open_rate: 0,
            open_burst: 0,
            violations_per_10s: 0,
            sessions_per_minute: 0,
            scan_bytes_per_sec: 0,
        }
    }
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            control_rate: DEFAULT_CONTROL_RATE,
            frame_rate: DEFAULT_FRAME_RATE,
            open_rate: DEFAULT_OPEN_RATE,
            open_burst: DEFAULT_MAX_STREAMS,
            violations_per_10s: DEFAULT_VIOLATIONS_PER_10S,
            sessions_per_minute: DEFAULT_SESSIONS_PER_MINUTE,
            scan_bytes_per_sec: DEFAULT_SCAN_BYTES_PER_SEC,
        }
    }
}

pub const DEFAULT_MAX_FRAME_PAYLOAD: u32 = 256 * 1024;
pub const DEFAULT_INITIAL_WINDOW: u32 = 64 * 1024;
pub const DEFAULT_MAX_STREAMS: u32 = 1024;
pub const DEFAULT_IDLE_TIMEOUT_MS: u32 = 15_000;
pub const DEFAULT_TX_HIGH_WATER: usize = 1024 * 1024;
/// Beyond the DATA high-water mark and one frame, how many bytes of replies
/// (credit, refusals, resets, pongs) may wait before input is no longer parsed.
pub(super) const CONTROL_ALLOWANCE: usize = 64 * 1024;

impl Config {
    pub fn new(role: Role, identity: impl Into<String>) -> Config {
        Config {
            role,
            limits: Limits {
                max_frame_payload: DEFAULT_MAX_FRAME_PAYLOAD,
                initial_window: DEFAULT_INITIAL_WINDOW,
                max_streams: DEFAULT_MAX_STREAMS,
                idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            },
            identity: identity.into(),
            tx_high_water: DEFAULT_TX_HIGH_WATER,
            hello_retry_first: Duration::from_secs(1),
            hello_retry_max: Duration::from_secs(8),
            hello_deadline: Duration::from_secs(10),
            backoff_first: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            backoff_reset_after: Duration::from_secs(60),
            policy: Policy::default(),
            window_max: DEFAULT_WINDOW_MAX,
            window_pool: DEFAULT_WINDOW_POOL,
            inflight_limit: DEFAULT_INFLIGHT_LIMIT,
            capabilities: crate::proto::hello::CAPABILITIES,
        }
    }

    pub(super) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.limits.idle_timeout_ms))
    }

    /// When a PING goes out without input (PROTOCOL.md §7): the guest after
    /// a third of its idle timeout, the host after half of its own, so that
    /// with equal timeouts the guest's PINGs come first and the host only
    /// answers them (one wake-up per keepalive for an idle guest, not two).
    pub(super) fn ping_after(&self) -> Duration {
        match self.role {
            Role::Guest => self.idle_timeout() / 3,
            Role::Host => self.idle_timeout() / 2,
        }
    }

    pub(super) fn rx_capacity(&self) -> usize {
        let frame = self.limits.max_frame_payload as usize + FRAME_OVERHEAD;
        (2 * frame).max(256 * 1024)
    }
}
