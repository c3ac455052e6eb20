//! Stock libvirt for the tests: Debian's `libvirtd` and `virtlogd`
//! (`libvirt-daemon-system`, installed by `scripts/deps`), started by the test
//! as its own children and stopped by pid, never through systemd.
//!
//! They run in a private mount and network namespace held by a `sleep`
//! process, so the machine is left as it was:
//!
//! - `/run`, `/var/lib/libvirt`, `/var/log/libvirt` and `/var/cache/libvirt`
//!   are scratch copies of the package's directories (same owners and modes,
//!   none of their files), so domains, logs and capability caches vanish with
//!   the namespace;
//! - `/dev/kvm` is a node of our own, `root:kvm 0660`, as a distribution
//!   ships it: this container's is `root:root 0600`, which makes stock
//!   libvirt (QEMU as `libvirt-qemu`) probe QEMU again on every call, ~56 s
//!   per `virsh create`. Domains still run under TCG (`type='qemu'`);
//! - `/etc/libvirt/qemu/networks/autostart` is empty: the default NAT
//!   network is not started (and would only be in the private network
//!   namespace, where QEMU's guests have no interface anyway).
//!
//! `qemu.conf` and every other file under `/etc/libvirt` stay as shipped.
//! Processes that must see libvirt's files (virsh, the host bridge) enter the
//! mount namespace with `nsenter`; the test itself reads them through
//! `/proc/<holder>/root`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::Proc;

/// Sets the namespace up, then holds it (`$1`: a scratch directory).
const HOLDER: &str = r#"
set -euo pipefail
s=$1
mknod "$s/kvm" c 10 232
chown root:kvm "$s/kvm"
chmod 0660 "$s/kvm"
mount --bind "$s/kvm" /dev/kvm
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -m 0755 /run/libvirt
for d in /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do
    [ -d "$d" ] || continue
    (cd "$d" && find . -type d) | while read -r p; do
        mkdir -p "$s/state$d/$p"
        chown --reference="$d/$p" "$s/state$d/$p"
        chmod --reference="$d/$p" "$s/state$d/$p"
    done
    mount --bind "$s/state$d" "$d"
done
autostart=/etc/libvirt/qemu/networks/autostart
if [ -d "$autostart" ]; then
    mount -t tmpfs -o mode=0755 tmpfs "$autostart"
fi
touch "$s/ready"
exec sleep infinity
"#;

/// Whether libvirt is installed and we are root; `false` after printing
/// why the test is skipped. With `VIOS_REQUIRE_LIBVIRT=1` (set by the test command) a
/// missing libvirt fails.
pub fn available_or_skip() -> bool {
    let missing: Vec<&str> = ["/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/bin/virsh"]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    let why = if !missing.is_empty() {
        format!(
            "no libvirt here ({} missing): run scripts/deps",
            missing.join(", ")
        )
    } else if !root {
        "the libvirt test needs root (namespaces, libvirtd)".to_owned()
    } else {
        return true;
    };
    assert!(std::env::var_os("VIOS_REQUIRE_LIBVIRT").is_none(), "{why}");
    eprintln!("SKIP: {why}");
    false
}

/// libvirtd and virtlogd in their namespace.
pub struct Libvirt {
    libvirtd: Option<Proc>,
    virtlogd: Option<Proc>,
    holder: Proc,
    dir: PathBuf,
}

impl Libvirt {
    /// Sets up the namespace in `dir` (scratch) and starts both daemons;
    /// returns once libvirtd answers.
    pub fn start(dir: &Path) -> Libvirt {
        let scratch = dir.join("ns");
        std::fs::create_dir_all(&scratch).unwrap();
        let holder = Proc::spawn(
            "namespace",
            Command::new("unshare")
                .args(["--mount", "--net", "--propagation", "private", "--", "bash", "-c"])
                .arg(HOLDER)
                .arg("bash")
                .arg(&scratch),
            dir.join("namespace.log"),
        );
        // On failure the holder's log is printed as it is dropped.
        crate::wait_path(&scratch.join("ready"), Duration::from_secs(10));
        let mut lv = Libvirt {
            libvirtd: None,
            virtlogd: None,
            holder,
            dir: dir.to_path_buf(),
        };
        lv.virtlogd = Some(lv.daemon("virtlogd"));
        lv.libvirtd = Some(lv.daemon("libvirtd"));
        // libvirtd probes QEMU's capabilities before it answers (seconds).
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let out = lv.virsh_output(&["version"]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < end,
                "libvirtd did not answer within 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        lv
    }

    fn daemon(&self, name: &str) -> Proc {
        let mut cmd = self.enter(true);
        // Warnings and errors to standard error (the log file), not the
        // journal.
        cmd.arg(name).env("LIBVIRT_LOG_OUTPUTS", "3:stderr");
        Proc::spawn(name, &mut cmd, self.dir.join(format!("{name}.log")))
    }

    /// `nsenter` into the mount namespace (and the network namespace, for
    /// libvirt's daemons); the program and its arguments follow.
    pub fn enter(&self, net: bool) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder.pid().to_string(), "-m"]);
        if net {
            cmd.arg("-n");
        }
        cmd.arg("--");
        cmd
    }

    /// A path inside the namespace, as this process sees it.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.holder.pid()))
    }

    /// virsh, given 60 s (a libvirtd that hangs fails the test, not hangs it).
    fn virsh_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.enter(false);
        cmd.args(["timeout", "60", "virsh", "-q", "-c", "qemu:///system"])
            .args(args);
        cmd
    }

    fn virsh_output(&self, args: &[&str]) -> Output {
        self.virsh_command(args).output().expect("run virsh")
    }

    /// Runs virsh; panics with its error unless it succeeds.
    pub fn virsh(&self, args: &[&str]) -> String {
        let out = self.virsh_output(args);
        assert!(
            out.status.success(),
            "virsh {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts virsh without waiting for it (to watch what happens meanwhile).
    pub fn virsh_spawn(&self, args: &[&str]) -> Child {
        self.virsh_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run virsh")
    }

    /// QEMU's log of a domain (virtlogd's file).
    pub fn domain_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("/var/log/libvirt/qemu/{name}.log"))).unwrap_or_default()
    }

    fn running_domains(&self) -> Vec<String> {
        let out = self.virsh_output(&["list", "--name"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// Waits for `virsh` started with [`Libvirt::virsh_spawn`]; panics with its
/// error unless it succeeded.
pub fn wait_virsh(child: Child, what: &str) -> String {
    let out = child.wait_with_output().expect("wait for virsh");
    assert!(
        out.status.success(),
        "virsh {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Libvirt {
    /// Domains first (libvirtd's QEMU processes outlive libvirtd), then the
    /// daemons, then the namespace. On failure, each domain's QEMU log.
    fn drop(&mut self) {
        if self.libvirtd.is_some() {
            for name in self.running_domains() {
                if std::thread::panicking() {
                    eprintln!("---- QEMU log of {name} ----\n{}", self.domain_log(&name));
                }
                let _ = self.virsh_output(&["destroy", &name]);
            }
        }
        for d in [self.libvirtd.take(), self.virtlogd.take()].into_iter().flatten() {
            let mut d = d;
            d.terminate(Duration::from_secs(10));
        }
        // Whatever is left in the namespace (a QEMU that virsh could not
        // destroy) goes with it.
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let ours = ns(&self.holder.pid().to_string());
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if pid.bytes().all(|b| b.is_ascii_digit())
                && pid != self.holder.pid().to_string()
                && ours.is_some()
                && ns(&pid) == ours
            {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
        self.holder.terminate(Duration::from_secs(5));
    }
}
