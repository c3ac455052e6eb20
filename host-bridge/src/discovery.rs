//! Finding guests on disk.
//!
//! Two layouts, both `DIR/<guest directory>/<channel socket>`:
//! - vios-proxy's: `DIR/<guest>/<socket>`; the guest is the directory name;
//! - libvirt's: `/var/lib/libvirt/qemu/channel/target/domain-<id>-<name>/<port>`
//!   (Debian 12, Ubuntu, RHEL-family hosts) and
//!   `/run/libvirt/qemu/channel/<id>-<name>/<port>` (other versions);
//!   the guest is `<name>` (the `<id>` changes at every start).
//!
//! A guest directory may hold other channels (libvirt puts the QEMU guest
//! agent's socket beside ours), so only sockets whose file name matches the
//! channel pattern are taken. A guest is identified by its directory path: a
//! VM that restarts under libvirt gets a new directory and is a new guest.
//!
//! A matching socket this process may not connect to is not a channel yet:
//! libvirt creates each channel socket as root and hands it to QEMU's user
//! (whose group the bridge is in) a moment later. The scan lists it apart
//! ([`Scan::barred`]); the watch sees the hand-over (a change of owner or
//! mode) and the next scan finds the channel.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use vios_common::io::link::SocketId;
use vios_common::sys;

/// libvirt's channel directories: the layout some libvirt versions and
/// session libvirt use, and the one of Debian 12, Ubuntu and RHEL-family
/// hosts (libvirt 9).
pub const LIBVIRT_DIRS: [&str; 2] = [
    "/run/libvirt/qemu/channel",
    "/var/lib/libvirt/qemu/channel/target",
];

/// A channel socket: where it is and, when found on disk, which socket it
/// is (the host reconnects to the path only while it is that socket).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChannelAt {
    pub path: PathBuf,
    pub id: Option<SocketId>,
}

/// A guest found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Name for logs: the directory name without a libvirt `<id>-` prefix.
    pub name: String,
    /// Channel sockets, sorted.
    pub sockets: Vec<ChannelAt>,
}

/// What one scan saw. A directory that could not be read (out of
/// descriptors, permission, I/O error, briefly missing) says nothing about
/// the guests under it: they are neither found nor gone.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every guest directory with at least one matching socket, by path.
    pub found: BTreeMap<PathBuf, Found>,
    /// Directories read completely: a guest directory under one of these
    /// that is not in `found` is gone.
    pub complete: BTreeSet<PathBuf>,
    /// Directories that could not be read, and why.
    pub failed: Vec<(PathBuf, io::Error)>,
    /// Every guest directory listed, with channel sockets or not yet.
    pub guest_dirs: Vec<PathBuf>,
    /// Matching sockets this process may not connect to (yet), left out of
    /// `found`.
    pub barred: Vec<(PathBuf, SocketId)>,
}

impl Scan {
    /// Whether the scan shows that `guest_dir` (a guest found earlier) has
    /// gone: its parent was read completely and it was not found there, it
    /// was not itself unreadable, and it holds no channel socket barred to
    /// this process (a socket whose owner or mode changed is still there).
    pub fn is_gone(&self, guest_dir: &Path) -> bool {
        !self.found.contains_key(guest_dir)
            && !self.barred.iter().any(|(p, _)| p.parent() == Some(guest_dir))
            && guest_dir.parent().is_some_and(|p| self.complete.contains(p))
            && !self.failed.iter().any(|(d, _)| d == guest_dir)
    }

    /// Whether the socket at `path` is there but barred to this process.
    pub fn is_barred(&self, path: &Path) -> bool {
        self.barred.iter().any(|(p, _)| p == path)
    }
}

/// What a directory entry is, as far as discovery cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    Socket(SocketId),
    /// A socket this process may not write, so not connect to.
    Barred(SocketId),
    Other,
}

/// Lists a directory: entry names and kinds.
type Lister<'a> = dyn Fn(&Path) -> io::Result<Vec<(OsString, Kind)>> + 'a;

/// Scans every directory in `dirs` for guest directories and their channel
/// sockets (those whose name matches `pattern`).
pub fn scan(dirs: &[PathBuf], pattern: &str) -> Scan {
    scan_with(dirs, pattern, &list)
}

fn scan_with(dirs: &[PathBuf], pattern: &str, list: &Lister) -> Scan {
    let mut scan = Scan::default();
    for dir in dirs {
        let entries = match list(dir) {
            Ok(e) => e,
            Err(e) => {
                scan.failed.push((dir.clone(), e));
                continue;
            }
        };
        scan.complete.insert(dir.clone());
        for (name, kind) in entries {
            if kind != Kind::Dir {
                continue;
            }
            let guest_dir = dir.join(&name);
            scan.guest_dirs.push(guest_dir.clone());
            let sockets = match channel_sockets(&guest_dir, pattern, list) {
                Ok((s, barred)) => {
                    scan.barred.extend(barred);
                    s
                }
                // Removed between the two listings: gone like any other.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    scan.failed.push((guest_dir, e));
                    continue;
                }
            };
            if sockets.is_empty() {
                continue;
            }
            let dir_name = name.to_string_lossy().into_owned();
            scan.found.insert(
                guest_dir,
                Found {
                    name: guest_name(&dir_name),
                    sockets,
                },
            );
        }
    }
    scan
}

/// A directory's entries and their types; any error on the way fails the
/// whole listing (a partial listing would make the missing entries look gone).
fn list(dir: &Path) -> io::Result<Vec<(OsString, Kind)>> {
    let mut v = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let t = entry.file_type()?;
        let kind = if t.is_dir() {
            Kind::Dir
        } else if t.is_socket() {
            let path = entry.path();
            // Gone or replaced since the listing: not a channel now. When
            // access cannot be judged, connecting says what is wrong.
            match (SocketId::of(&path), sys::may_write(&path)) {
                (Ok(id), Ok(false)) => Kind::Barred(id),
                (Ok(id), _) => Kind::Socket(id),
                (Err(_), _) => Kind::Other,
            }
        } else {
            Kind::Other
        };
        v.push((entry.file_name(), kind));
    }
    Ok(v)
}

/// A guest directory's channel sockets, sorted, and the matching sockets
/// this process may not connect to.
type Channels = (Vec<ChannelAt>, Vec<(PathBuf, SocketId)>);

fn channel_sockets(dir: &Path, pattern: &str, list: &Lister) -> io::Result<Channels> {
    let (mut ready, mut barred) = (Vec::new(), Vec::new());
    for (name, kind) in list(dir)? {
        if !glob_match(pattern, &name.to_string_lossy()) {
            continue;
        }
        match kind {
            Kind::Socket(id) => ready.push(ChannelAt {
                path: dir.join(name),
                id: Some(id),
            }),
            Kind::Barred(id) => barred.push((dir.join(name), id)),
            Kind::Dir | Kind::Other => {}
        }
    }
    ready.sort();
    Ok((ready, barred))
}

/// `12-vm1` and `domain-12-vm1` (libvirt) name the guest `vm1`; anything else
/// is the guest's name as it stands.
pub fn guest_name(dir_name: &str) -> String {
    let rest = dir_name.strip_prefix("domain-").unwrap_or(dir_name);
    match rest.split_once('-') {
        Some((id, name)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() => {
            name.to_owned()
        }
        _ => dir_name.to_owned(),
    }
}

/// Shell-style match with `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn names() {
        assert_eq!(guest_name("12-vm1"), "vm1");
        assert_eq!(guest_name("domain-3-web-01"), "web-01");
        assert_eq!(guest_name("vm1"), "vm1");
        assert_eq!(guest_name("vm-1"), "vm-1");
        assert_eq!(guest_name("12-"), "12-");
    }

    #[test]
    fn globs() {
        assert!(glob_match("org.qpid.vios.*", "org.qpid.vios.0"));
        assert!(!glob_match("org.qpid.vios.*", "org.qemu.guest_agent.0"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a?c*", "abcdef"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*.0", "org.qpid.vios.0"));
    }

    #[test]
    fn scans_both_layouts_and_ignores_other_files() {
        let root = std::env::temp_dir().join(format!("vios-scan-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let libvirt = root.join("libvirt");
        let proxy = root.join("proxy");
        for d in [libvirt.join("7-vm1"), libvirt.join("8-empty"), proxy.join("vm2")] {
            fs::create_dir_all(d).unwrap();
        }
        let _a = UnixListener::bind(libvirt.join("7-vm1/org.qpid.vios.0")).unwrap();
        let _b = UnixListener::bind(libvirt.join("7-vm1/org.qemu.guest_agent.0")).unwrap();
        let _c = UnixListener::bind(proxy.join("vm2/org.qpid.vios.1")).unwrap();
        fs::write(proxy.join("vm2/org.qpid.vios.9"), "not a socket").unwrap();
        let scan = scan(
            &[libvirt.clone(), proxy.clone(), root.join("missing")],
            "org.qpid.vios.*",
        );
        let found = &scan.found;
        assert_eq!(found.len(), 2, "{found:?}");
        let vm1 = &found[&libvirt.join("7-vm1")];
        assert_eq!(vm1.name, "vm1");
        let paths = |f: &Found| f.sockets.iter().map(|c| c.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(vm1), vec![libvirt.join("7-vm1/org.qpid.vios.0")]);
        assert_eq!(
            vm1.sockets[0].id,
            Some(SocketId::of(&libvirt.join("7-vm1/org.qpid.vios.0")).unwrap())
        );
        assert_eq!(
            paths(&found[&proxy.join("vm2")]),
            vec![proxy.join("vm2/org.qpid.vios.1")]
        );
        // A missing top-level directory is a failure, not an empty one.
        assert_eq!(scan.failed.len(), 1);
        assert_eq!(scan.failed[0].0, root.join("missing"));
        assert!(!scan.is_gone(&root.join("missing/9-vm9")));
        // A directory read completely without the guest says it is gone.
        assert!(scan.is_gone(&libvirt.join("8-empty")));
        assert!(scan.is_gone(&proxy.join("vm3")));
        assert!(!scan.is_gone(&libvirt.join("7-vm1")));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_failed_listing_is_never_read_as_gone() {
        let root = PathBuf::from("/guests");
        let dirs = [root.clone()];
        let vm1 = root.join("1-vm1");
        let vm2 = root.join("2-vm2");
        let ok = |dir: &Path| -> io::Result<Vec<(OsString, Kind)>> {
            Ok(if dir == Path::new("/guests") {
                vec![("1-vm1".into(), Kind::Dir), ("2-vm2".into(), Kind::Dir)]
            } else {
                vec![(
                    "org.qpid.vios.0".into(),
                    Kind::Socket(SocketId {
                        dev: 1,
                        ino: 2,
                        uid: 0,
                    }),
                )]
            })
        };
        let s = scan_with(&dirs, "org.qpid.vios.*", &ok);
        assert_eq!(s.found.len(), 2);
        // Out of descriptors: the top-level listing fails. Nothing is gone.
        let emfile = |_: &Path| -> io::Result<Vec<(OsString, Kind)>> {
            Err(io::Error::from_raw_os_error(libc::EMFILE))
        };
        let s = scan_with(&dirs, "org.qpid.vios.*", &emfile);
        assert!(
            s.found.is_empty() && !s.is_gone(&vm1) && !s.is_gone(&vm2),
            "{s:?}"
        );
        assert_eq!(s.failed[0].1.raw_os_error(), Some(libc::EMFILE));
        // One guest directory unreadable (EIO), the other readable and empty:
        // the first keeps what it had, the second is gone.
        let partial = |dir: &Path| -> io::Result<Vec<(OsString, Kind)>> {
            match dir.file_name().and_then(|n| n.to_str()) {
                Some("1-vm1") => Err(io::Error::from_raw_os_error(libc::EIO)),
                Some("2-vm2") => Ok(vec![]),
                _ => ok(dir),
            }
        };
        let s = scan_with(&dirs, "org.qpid.vios.*", &partial);
        assert!(!s.is_gone(&vm1), "{s:?}");
        assert!(s.is_gone(&vm2), "{s:?}");
        // Removed between the two listings: gone.
        let raced = |dir: &Path| -> io::Result<Vec<(OsString, Kind)>> {
            if dir.ends_with("1-vm1") {
                Err(io::Error::from_raw_os_error(libc::ENOENT))
            } else {
                ok(dir)
            }
        };
        let s = scan_with(&dirs, "org.qpid.vios.*", &raced);
        assert!(s.is_gone(&vm1) && !s.is_gone(&vm2), "{s:?}");
    }

    #[test]
    fn a_socket_we_may_not_connect_to_is_no_channel_yet() {
        let root = PathBuf::from("/guests");
        let id = SocketId {
            dev: 1,
            ino: 2,
            uid: 0,
        };
        // As libvirt leaves it for a moment: created by root, not yet
        // handed to QEMU's user; the guest agent's socket beside it.
        let handed_over = std::cell::Cell::new(false);
        let list = |dir: &Path| -> io::Result<Vec<(OsString, Kind)>> {
            Ok(if dir == root {
                vec![("domain-1-vm1".into(), Kind::Dir)]
            } else {
                let ours = if handed_over.get() {
                    Kind::Socket(SocketId { uid: 64055, ..id })
                } else {
                    Kind::Barred(id)
                };
                vec![
                    ("org.qpid.vios.0".into(), ours),
                    ("org.qemu.guest_agent.0".into(), Kind::Barred(id)),
                ]
            })
        };
        let dirs = [root.clone()];
        let s = scan_with(&dirs, "org.qpid.vios.*", &list);
        assert!(s.found.is_empty(), "{s:?}");
        assert!(
            !s.is_gone(&root.join("domain-1-vm1")),
            "a barred socket is still there"
        );
        assert_eq!(s.barred, vec![(root.join("domain-1-vm1/org.qpid.vios.0"), id)]);
        assert_eq!(s.guest_dirs, vec![root.join("domain-1-vm1")], "watched meanwhile");
        handed_over.set(true);
        let s = scan_with(&dirs, "org.qpid.vios.*", &list);
        assert!(s.barred.is_empty(), "{s:?}");
        assert_eq!(s.found[&root.join("domain-1-vm1")].sockets.len(), 1);
    }
}
