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
}

pub const DEFAULT_MAX_FRAME_PAYLOAD: u32 = 64 * 1024;
pub const DEFAULT_INITIAL_WINDOW: u32 = 256 * 1024;
pub const DEFAULT_MAX_STREAMS: u32 = 1024;
pub const DEFAULT_IDLE_TIMEOUT_MS: u32 = 15_000;
pub const DEFAULT_TX_HIGH_WATER: usize = 256 * 1024;
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
        }
    }

    pub(super) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.limits.idle_timeout_ms))
    }

    pub(super) fn rx_capacity(&self) -> usize {
        let frame = self.limits.max_frame_payload as usize + FRAME_OVERHEAD;
        (2 * frame).max(256 * 1024)
    }
}
