//! Process-level pieces the test tools share: a stop flag set by SIGTERM and
//! SIGINT (a second signal exits at once), and this process's CPU time and
//! memory from /proc.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};

fn flag() -> &'static Arc<AtomicBool> {
    static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    STOP.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// SIGTERM and SIGINT set the stop flag instead of killing the process; a
/// second one (flag already set) exits with status 130 without a report.
pub fn install_signal_handlers() {
    for sig in [SIGTERM, SIGINT] {
        // The exit is registered first, so it sees the flag as it was before
        // this very signal set it.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag().clone());
        let _ = signal_hook::flag::register(sig, flag().clone());
    }
}

pub fn stop_requested() -> bool {
    flag().load(Ordering::Relaxed)
}

pub fn request_stop() {
    flag().store(true, Ordering::SeqCst);
}

pub fn clear_stop() {
    flag().store(false, Ordering::SeqCst);
}

/// Clock ticks per second of /proc's CPU times (`sysconf(_SC_CLK_TCK)`, 100
/// on every Linux this runs on).
const TICKS_PER_SEC: f64 = 100.0;

/// User and system CPU seconds used so far by this process (all threads).
pub fn cpu_seconds() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return (f64::NAN, f64::NAN);
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
    (ticks(11) / TICKS_PER_SEC, ticks(12) / TICKS_PER_SEC)
}

/// Resident set size now and at its peak, in KiB, from /proc/self/status.
pub fn rss_kib() -> (Option<u64>, Option<u64>) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_and_memory() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let (user, sys) = cpu_seconds();
        assert!(user >= 0.0 && sys >= 0.0 && user.is_finite());
        let (rss, hwm) = rss_kib();
        assert!(rss.unwrap() > 0 && hwm.unwrap() >= rss.unwrap());
    }

    #[test]
    fn stop_flag() {
        clear_stop();
        assert!(!stop_requested());
        request_stop();
        assert!(stop_requested());
        clear_stop();
    }
}
