//! Process-level pieces: the stop flag set by SIGTERM/SIGINT and the CPU
//! time of this process.

use std::ffi::{c_int, c_long};
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" {
    fn signal(signum: c_int, handler: extern "C" fn(c_int)) -> usize;
    fn _exit(status: c_int) -> !;
    fn getrusage(who: c_int, usage: *mut Rusage) -> c_int;
}

const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;

extern "C" fn on_signal(_sig: c_int) {
    // First signal: stop the attack and report. A second one: leave now.
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { _exit(130) }
    }
}

/// SIGTERM and SIGINT end the run early (with the report) instead of killing
/// the process. SIGSTOP/SIGCONT need nothing: a frozen driver simply resumes.
pub fn install_signal_handlers() {
    // SAFETY: the handler only touches an atomic and calls _exit.
    unsafe {
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

#[repr(C)]
#[derive(Default)]
struct Timeval {
    sec: c_long,
    usec: c_long,
}

#[repr(C)]
#[derive(Default)]
struct Rusage {
    utime: Timeval,
    stime: Timeval,
    rest: [c_long; 14],
}

/// CPU seconds (user + system) used so far by this process.
pub fn cpu_seconds() -> f64 {
    let mut r = Rusage::default();
    // SAFETY: RUSAGE_SELF (0) fills a struct rusage, which `Rusage` lays out.
    if unsafe { getrusage(0, &mut r) } != 0 {
        return f64::NAN;
    }
    let t = |tv: &Timeval| tv.sec as f64 + tv.usec as f64 / 1e6;
    t(&r.utime) + t(&r.stime)
}
