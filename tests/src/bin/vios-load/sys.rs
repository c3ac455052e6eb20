//! Process-level pieces: the shared byte pattern, latency summaries and error
//! lists (the stop flag, CPU and memory come from `vios_tests::tool::process`).

use std::sync::OnceLock;
use std::time::Instant;

use mio::Poll;

use crate::json::Json;

// ------------------------------------------------- signals, CPU and memory

pub use vios_tests::tool::process::{
    clear_stop, cpu_seconds, install_signal_handlers, request_stop, rss_kib, stop_requested,
};

// ---------------------------------------------------------------- pattern

/// Largest read or write, in bytes; also the scratch buffer size.
pub const CHUNK: usize = 256 * 1024;
/// The pattern repeats every PERIOD bytes. A prime, so that a stream shifted,
/// repeated or truncated by any whole number of (power-of-two) buffers is
/// caught.
pub const PERIOD: u64 = 65521;

/// The deterministic byte stream every sender writes and every verifier
/// expects: byte `i` of a stream starting at `start` is `pattern[(start + i) %
/// PERIOD]`. Stored with CHUNK bytes of wrap-around so that any slice up to
/// CHUNK long is contiguous: no per-byte work on the hot path.
pub struct Pattern {
    buf: Box<[u8]>,
}

pub fn pattern() -> &'static Pattern {
    static P: OnceLock<Pattern> = OnceLock::new();
    P.get_or_init(Pattern::new)
}

impl Pattern {
    fn new() -> Self {
        let period = PERIOD as usize;
        let mut v = Vec::with_capacity(period + CHUNK);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..period {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push((x >> 32) as u8);
        }
        for i in 0..CHUNK {
            v.push(v[i % period]);
        }
        Pattern {
            buf: v.into_boxed_slice(),
        }
    }

    /// `len` (at most CHUNK) bytes of the stream at position `pos`.
    pub fn slice(&self, pos: u64, len: usize) -> &[u8] {
        let off = (pos % PERIOD) as usize;
        &self.buf[off..off + len]
    }

    /// Checks `data` (at most CHUNK long) against the stream at `pos`; on a
    /// mismatch returns the index in `data` of the first wrong byte.
    pub fn check(&self, pos: u64, data: &[u8]) -> Result<(), usize> {
        let want = self.slice(pos, data.len());
        if want == data {
            return Ok(());
        }
        Err(want.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0))
    }
}

/// Where stream `id` starts in the pattern, so that streams crossed over are
/// caught too.
pub fn stream_start(id: usize) -> u64 {
    (id as u64).wrapping_mul(7919) % PERIOD
}

// ---------------------------------------------------------------- summaries

/// Nearest-rank percentile of sorted samples; `permille` 999 is p99.9.
fn percentile(sorted: &[u64], permille: usize) -> u64 {
    let n = sorted.len();
    let rank = (permille * n).div_ceil(1000);
    sorted[rank.clamp(1, n) - 1]
}

/// Latency summary in microseconds (one decimal) of samples in nanoseconds:
/// `{"min","p50","p90","p99","p99_9","max","mean"}`; all null when empty.
pub fn latency_us(samples: &mut [u64]) -> Json {
    samples.sort_unstable();
    let mut j = Json::new();
    let us = |ns: u64| ns as f64 / 1000.0;
    let keys = [("p50", 500), ("p90", 900), ("p99", 990), ("p99_9", 999)];
    if samples.is_empty() {
        j.null("min");
        for (k, _) in keys {
            j.null(k);
        }
        j.null("max").null("mean");
        return j;
    }
    j.f64("min", us(samples[0]), 1);
    for (k, p) in keys {
        j.f64(k, us(percentile(samples, p)), 1);
    }
    let sum: u128 = samples.iter().map(|&s| s as u128).sum();
    j.f64("max", us(samples[samples.len() - 1]), 1).f64(
        "mean",
        sum as f64 / samples.len() as f64 / 1000.0,
        1,
    );
    j
}

/// Percentiles of a small set of values (e.g. per-stream rates), as is.
pub fn spread(values: &mut [f64], decimals: usize) -> Json {
    values.sort_unstable_by(f64::total_cmp);
    let mut j = Json::new();
    if values.is_empty() {
        j.null("min").null("median").null("max");
        return j;
    }
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    j.f64("min", values[0], decimals)
        .f64("median", median, decimals)
        .f64("max", values[n - 1], decimals);
    j
}

// ---------------------------------------------------------------- errors and reports

/// Errors of a run: the first few verbatim, and how many there were in all.
#[derive(Default)]
pub struct Errors {
    list: Vec<String>,
    total: u64,
}

const ERRORS_LISTED: usize = 20;

impl Errors {
    pub fn push(&mut self, e: impl Into<String>) {
        self.total += 1;
        if self.list.len() < ERRORS_LISTED {
            self.list.push(e.into());
        }
    }

    pub fn append(&mut self, other: Errors) {
        for e in other.list {
            if self.list.len() < ERRORS_LISTED {
                self.list.push(e);
            }
        }
        self.total += other.total;
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn list(&self) -> &[String] {
        &self.list
    }
}

/// Why a run must stop now: a signal asked for it, or its deadline passed.
pub fn stop_reason(deadline: Instant) -> Option<&'static str> {
    if stop_requested() {
        Some("interrupted by a signal")
    } else if Instant::now() >= deadline {
        Some("timed out")
    } else {
        None
    }
}

/// A new `mio::Poll`; when there is none, the error goes to `errors`.
pub fn new_poll(errors: &mut Errors) -> Option<Poll> {
    Poll::new().map_err(|e| errors.push(format!("poll: {e}"))).ok()
}

/// What a subcommand hands back: its JSON fields (parameters and results) and
/// its errors. `main` adds the process figures, `ok` and `errors`.
pub struct Report {
    pub json: Json,
    pub errors: Errors,
}

impl Report {
    pub fn new(cmd: &str) -> Self {
        let mut json = Json::new();
        json.str("cmd", cmd);
        Report {
            json,
            errors: Errors::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_wraps_and_checks() {
        let p = pattern();
        let a = p.slice(PERIOD - 3, 10).to_vec();
        let b = p.slice(0, 7);
        assert_eq!(&a[3..], b);
        assert!(p.check(5 * PERIOD + 17, p.slice(17, CHUNK)).is_ok());
        let mut bad = p.slice(100, 1000).to_vec();
        bad[321] ^= 1;
        assert_eq!(p.check(100, &bad), Err(321));
        // A stream shifted by a power-of-two buffer is caught.
        assert!(p.check(0, p.slice(65536, 4096)).is_err());
    }

    #[test]
    fn percentiles() {
        let mut s: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let j = latency_us(&mut s).finish();
        assert_eq!(
            j,
            r#"{"min":1.0,"p50":500.0,"p90":900.0,"p99":990.0,"p99_9":999.0,"max":1000.0,"mean":500.5}"#
        );
        let mut v = vec![3.0, 1.0, 2.0, 10.0];
        assert_eq!(
            spread(&mut v, 1).finish(),
            r#"{"min":1.0,"median":2.5,"max":10.0}"#
        );
    }

    #[test]
    fn errors_are_capped() {
        let mut e = Errors::default();
        for i in 0..30 {
            e.push(format!("e{i}"));
        }
        assert_eq!(e.total(), 30);
        assert_eq!(e.list().len(), ERRORS_LISTED);
    }
}
