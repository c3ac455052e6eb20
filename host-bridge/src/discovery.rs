//! Finding guests on disk.
//!
//! Two layouts, both `DIR/<guest directory>/<channel socket>`:
//! - vios-proxy's: `DIR/<guest>/<socket>`; the guest is the directory name;
//! - libvirt's: `/run/libvirt/qemu/channel/<id>-<name>/<port>` and, in older
//!   libvirt, `/var/lib/libvirt/qemu/channel/target/domain-<id>-<name>/<port>`;
//!   the guest is `<name>` (the `<id>` changes at every start).
//!
//! A guest directory may hold other channels (libvirt puts the QEMU guest
//! agent's socket beside ours), so only sockets whose file name matches the
//! channel pattern are taken. A guest is identified by its directory path: a
//! VM that restarts under libvirt gets a new directory and is a new guest.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// libvirt's channel directories, newer then older.
pub const LIBVIRT_DIRS: [&str; 2] = [
    "/run/libvirt/qemu/channel",
    "/var/lib/libvirt/qemu/channel/target",
];

/// A guest found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Name for logs: the directory name without a libvirt `<id>-` prefix.
    pub name: String,
    /// Channel sockets, sorted.
    pub sockets: Vec<PathBuf>,
}

/// Every guest directory under `dirs` with at least one matching socket,
/// keyed by its path. Unreadable or missing directories are skipped: a
/// libvirt directory appears only once libvirt runs.
pub fn scan(dirs: &[PathBuf], pattern: &str) -> BTreeMap<PathBuf, Found> {
    let mut found = BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let guest_dir = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let sockets = channel_sockets(&guest_dir, pattern);
            if sockets.is_empty() {
                continue;
            }
            let dir_name = entry.file_name().to_string_lossy().into_owned();
            found.insert(
                guest_dir,
                Found {
                    name: guest_name(&dir_name),
                    sockets,
                },
            );
        }
    }
    found
}

fn channel_sockets(dir: &Path, pattern: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .filter(|e| glob_match(pattern, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
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
        let found = scan(
            &[libvirt.clone(), proxy.clone(), root.join("missing")],
            "org.qpid.vios.*",
        );
        assert_eq!(found.len(), 2, "{found:?}");
        let vm1 = &found[&libvirt.join("7-vm1")];
        assert_eq!(vm1.name, "vm1");
        assert_eq!(vm1.sockets, vec![libvirt.join("7-vm1/org.qpid.vios.0")]);
        assert_eq!(
            found[&proxy.join("vm2")].sockets,
            vec![proxy.join("vm2/org.qpid.vios.1")]
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
