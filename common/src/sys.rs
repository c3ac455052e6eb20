//! The few system calls std does not wrap, each behind a safe function.
//!
//! This is the only module of the crate with `unsafe` code: every block is a
//! single libc call on plain integers or on a value owned by the caller, with
//! its result checked.
#![allow(unsafe_code)]

use std::io;

/// The open-files limit before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit the process started with.
    pub soft_before: u64,
    /// The soft limit now: what the process may really open.
    pub soft: u64,
    /// The hard limit (the most the soft limit may be raised to without
    /// privilege).
    pub hard: u64,
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (many systems start
/// daemons at a soft 1024 with a much higher hard limit). If raising fails the
/// soft limit stays as it was; the result says what holds.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let lim = get_nofile()?;
    let before = lim.rlim_cur;
    // An unlimited hard limit still stops at the kernel's fs.nr_open.
    let target = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .map_or(lim.rlim_max, |n| n.min(lim.rlim_max));
    if lim.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit read-only for the call.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    }
    let now = get_nofile()?;
    Ok(NofileLimit {
        soft_before: before as u64,
        soft: now.rlim_cur as u64,
        hard: now.rlim_max as u64,
    })
}

/// The soft open-files limit.
pub fn nofile_limit() -> io::Result<u64> {
    Ok(get_nofile()?.rlim_cur as u64)
}

/// Descriptors the process has open now (from `/proc/self/fd`, less the one
/// the listing itself uses).
pub fn open_descriptors() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count().saturating_sub(1))
}

/// Whether `e` means the process or the system ran out of descriptors or
/// memory: a resource limit, not a failure of what was being opened.
pub fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let l = raise_nofile_limit().unwrap();
        assert!(l.soft_before <= l.soft && l.soft <= l.hard, "{l:?}");
        assert_eq!(nofile_limit().unwrap(), l.soft);
    }

    #[test]
    fn counts_open_descriptors() {
        let before = open_descriptors().unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(open_descriptors().unwrap(), before + 1);
        drop(f);
        assert!(is_resource_error(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!is_resource_error(&io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
    }
}
