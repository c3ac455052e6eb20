//! Noticing guest directories change at once: inotify on the scanned
//! directories and on every guest directory in them.
//!
//! An event only says "look again": what changed is read by the next scan
//! (`discovery::scan`), which stays the one source of truth. So a lost event
//! (queue overflow), a directory that did not exist yet, or a filesystem
//! without inotify cost nothing but time: the periodic rescan finds what the
//! watch missed.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use vios_common::sys;

/// Entries appearing, going or renamed; an entry's owner or mode changing
/// (libvirt hands each channel socket it created as root to QEMU's user);
/// the directory itself going.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_ATTRIB
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

pub struct DirWatch {
    inotify: File,
    /// Directories watched (a directory removed drops its watch by itself;
    /// it is forgotten here when the scan no longer lists it).
    watched: BTreeSet<PathBuf>,
    /// Set once adding a watch failed for want of watches (ENOSPC): said
    /// once, and from then on the rescan covers what is not watched.
    exhausted: bool,
}

impl DirWatch {
    pub fn new(registry: &Registry, token: Token) -> io::Result<DirWatch> {
        let inotify = sys::inotify_init()?;
        registry.register(&mut SourceFd(&inotify.as_raw_fd()), token, Interest::READABLE)?;
        Ok(DirWatch {
            inotify,
            watched: BTreeSet::new(),
            exhausted: false,
        })
    }

    /// Watches exactly `dirs` from now on (those that exist); returns the
    /// number watched.
    pub fn set(&mut self, dirs: &[PathBuf]) -> usize {
        self.watched.retain(|d| dirs.contains(d));
        for d in dirs {
            if self.watched.contains(d) {
                continue;
            }
            match self.add(d) {
                Ok(()) => {
                    self.watched.insert(d.clone());
                }
                // Not there (yet), or gone meanwhile: the rescan looks again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    if !self.exhausted {
                        self.exhausted = true;
                        log::warn!(
                            "cannot watch {}: no inotify watches left (fs.inotify.max_user_watches); \
                             directories beyond {} are found by the periodic rescan only",
                            d.display(),
                            self.watched.len()
                        );
                    }
                }
                Err(e) => log::debug!("cannot watch {}: {e}", d.display()),
            }
        }
        self.watched.len()
    }

    fn add(&self, dir: &Path) -> io::Result<()> {
        sys::inotify_add_watch(&self.inotify, dir, MASK).map(|_| ())
    }

    /// Reads every pending event; true if there was any (a queue overflow
    /// counts: something changed that was not said).
    pub fn drain(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            match self.inotify.read(&mut buf) {
                Ok(0) => return any,
                Ok(_) => any = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return any,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn events_within(w: &mut DirWatch, poll: &mut mio::Poll, d: Duration) -> bool {
        let mut events = mio::Events::with_capacity(8);
        poll.poll(&mut events, Some(d)).unwrap();
        !events.is_empty() && w.drain()
    }

    #[test]
    fn a_new_guest_directory_and_a_socket_in_it_are_seen() {
        let top = std::env::temp_dir().join(format!("vios-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        std::fs::create_dir_all(&top).unwrap();
        let mut poll = mio::Poll::new().unwrap();
        let mut w = DirWatch::new(poll.registry(), Token(1)).unwrap();
        let missing = top.join("not-yet");
        assert_eq!(w.set(&[top.clone(), missing.clone()]), 1);
        let short = Duration::from_millis(200);
        assert!(!events_within(&mut w, &mut poll, short), "nothing happened yet");
        // A guest directory appears.
        let guest = top.join("vm1");
        std::fs::create_dir(&guest).unwrap();
        assert!(events_within(&mut w, &mut poll, short));
        // Once watched, a socket created in it is seen too.
        assert_eq!(w.set(&[top.clone(), guest.clone()]), 2);
        let sock = std::os::unix::net::UnixListener::bind(guest.join("org.qpid.vios.0")).unwrap();
        assert!(events_within(&mut w, &mut poll, short));
        // Its mode changing (as an owner changing, when libvirt hands it over).
        use std::os::unix::fs::PermissionsExt;
        let perms = std::fs::Permissions::from_mode(0o770);
        std::fs::set_permissions(guest.join("org.qpid.vios.0"), perms).unwrap();
        assert!(events_within(&mut w, &mut poll, short));
        // And its removal.
        drop(sock);
        std::fs::remove_dir_all(&guest).unwrap();
        assert!(events_within(&mut w, &mut poll, short));
        assert_eq!(w.set(std::slice::from_ref(&top)), 1);
        std::fs::remove_dir_all(&top).unwrap();
    }
}
