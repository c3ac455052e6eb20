//! A Debian guest with systemd as PID 1 and udev, booted under QEMU (TCG,
//! no NIC) from the image `scripts/vm/build-systemd-image` makes; driven
//! through a root shell on its first serial port, and through QEMU's monitor
//! (QMP) to hot-plug virtio-serial ports.
//!
//! The shell speaks the console protocol of `scripts/vm/init` (echo off, no
//! prompt, `echo __VIOS_RC_<token>=$?__` after each command); it is a
//! systemd service of the image (`scripts/vm/systemd-guest-setup`) and
//! prints `VIOS-GUEST-BOOT boot_id=<uuid>` and `VIOS-GUEST-READY` once
//! multi-user.target is reached. The kernel and systemd write to the second
//! serial port, kept in `<name>.boot.log` beside the test's other logs.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::vm::repo_root;
use crate::{wait_path, Proc};

/// The files of a built image.
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub root: PathBuf,
    /// The guest package's file name in the guest's `/root/vios/`.
    pub deb: String,
    /// The host package's file name beside it (images built with
    /// `--deb` alone have none).
    pub host_deb: Option<String>,
    /// `image-info`: kernel, package, cache key, build time.
    pub info: String,
}

/// The image, if it has been built; otherwise why not.
pub fn image() -> Result<Image, String> {
    let dir = std::env::var_os("VIOS_VM_SYSTEMD_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/vm/systemd-image"));
    let why = |what: &str| {
        format!(
            "no systemd guest image at {} ({what}; run scripts/vm/build-systemd-image)",
            dir.display()
        )
    };
    for f in ["vmlinuz", "initrd.img", "root.raw", "image-info"] {
        if !dir.join(f).exists() {
            return Err(why(&format!("{f} is missing")));
        }
    }
    let info = std::fs::read_to_string(dir.join("image-info")).map_err(|e| why(&e.to_string()))?;
    let deb = info
        .lines()
        .find_map(|l| l.strip_prefix("guest_package="))
        .ok_or_else(|| why("image-info names no guest_package"))?
        .to_owned();
    let host_deb = info
        .lines()
        .find_map(|l| l.strip_prefix("host_package="))
        .filter(|d| !d.is_empty())
        .map(str::to_owned);
    // The uncompressed kernel with a PVH entry boots seconds faster.
    let kernel = if dir.join("vmlinux").exists() {
        dir.join("vmlinux")
    } else {
        dir.join("vmlinuz")
    };
    Ok(Image {
        kernel,
        initrd: dir.join("initrd.img"),
        root: dir.join("root.raw"),
        deb,
        host_deb,
        info,
    })
}

/// The image, or `None` after printing why the test is skipped. With
/// `VIOS_REQUIRE_VM=1` (set by the test command) a missing image fails.
pub fn image_or_skip() -> Option<Image> {
    match image() {
        Ok(i) => Some(i),
        Err(why) => {
            assert!(std::env::var_os("VIOS_REQUIRE_VM").is_none(), "{why}");
            eprintln!("SKIP: {why}");
            None
        }
    }
}

/// QEMU's monitor, in its JSON form.
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events read while waiting for replies, not yet looked at.
    pub events: Vec<String>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let s = connect_retry(path, Duration::from_secs(10));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp {
            writer: s.try_clone().expect("clone QMP socket"),
            reader: BufReader::new(s),
            events: Vec::new(),
        };
        let greeting = q.line();
        assert!(greeting.contains("\"QMP\""), "QMP greeting: {greeting}");
        q.execute("qmp_capabilities", "{}");
        q
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(0) => panic!("QMP: QEMU closed the monitor"),
            Ok(_) => l.trim_end().to_owned(),
            Err(e) => panic!("QMP read: {e}"),
        }
    }

    /// Runs a command (`arguments` a JSON object); returns QEMU's reply
    /// line, panicking on an error reply.
    pub fn execute(&mut self, command: &str, arguments: &str) -> String {
        let msg = format!("{{\"execute\":\"{command}\",\"arguments\":{arguments}}}\n");
        self.writer.write_all(msg.as_bytes()).expect("QMP write");
        loop {
            let l = self.line();
            if l.contains("\"event\"") && !l.contains("\"return\"") {
                self.events.push(l);
            } else if l.contains("\"error\"") {
                panic!("QMP {command} {arguments}: {l}");
            } else if l.contains("\"return\"") {
                return l;
            }
        }
    }

    /// Waits for an event named `name` whose line contains `needle`.
    pub fn wait_event(&mut self, name: &str, needle: &str, timeout: Duration) -> String {
        let pat = format!("\"event\": \"{name}\"");
        let pat2 = format!("\"event\":\"{name}\"");
        let end = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| (e.contains(&pat) || e.contains(&pat2)) && e.contains(needle))
            {
                return self.events.remove(i);
            }
            assert!(
                Instant::now() < end,
                "QMP event {name} ({needle}) not seen within {timeout:?}; events: {:?}",
                self.events
            );
            let l = self.line();
            self.events.push(l);
        }
    }
}

/// One systemd guest under QEMU.
pub struct SystemdVm {
    pub name: String,
    pub qemu: Proc,
    console: UnixStream,
    /// Bytes received from the console not yet consumed.
    pending: Vec<u8>,
    /// Everything the console printed, for failure reports.
    pub transcript: String,
    pub qmp: Qmp,
    /// The guest directory holding the channel sockets (`1-<name>`).
    pub guest_dir: PathBuf,
    /// What the kernel and systemd printed (the second serial port).
    pub boot_log: PathBuf,
    /// The current boot's id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
}

impl SystemdVm {
    /// Boots the image with one virtio-serial port, `org.qpid.vios.0`, whose
    /// chardev socket is `channel_dir/1-<name>/org.qpid.vios.0` (the layout
    /// of the host bridge's `--guest-dir`); waits for the console.
    pub fn boot(image: &Image, name: &str, channel_dir: &Path, work: &Path) -> SystemdVm {
        let guest_dir = channel_dir.join(format!("1-{name}"));
        std::fs::create_dir_all(&guest_dir).expect("guest directory");
        let console_path = work.join(format!("{name}.console.sock"));
        let qmp_path = work.join(format!("{name}.qmp.sock"));
        let boot_log = work.join(format!("{name}.boot.log"));
        let port0 = guest_dir.join("org.qpid.vios.0");
        for p in [&console_path, &qmp_path, &port0] {
            assert!(
                p.as_os_str().len() <= 107 && !p.to_string_lossy().contains([',', '"', '\\']),
                "unusable socket path {}",
                p.display()
            );
            let _ = std::fs::remove_file(p);
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-name", name, "-accel", "tcg", "-nodefaults", "-no-user-config"])
            .args(["-m", "1024", "-smp", "1", "-nic", "none", "-display", "none"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args([
                "-append",
                "root=/dev/vda rw rootfstype=ext4 console=ttyS1 quiet loglevel=4 \
                 systemd.show_status=0 fsck.mode=skip",
            ])
            // The image stays as built: writes go to a temporary overlay
            // that lives as long as this QEMU (so across guest reboots).
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,snapshot=on,cache=unsafe",
                image.root.display()
            ))
            .arg("-chardev")
            .arg(format!(
                "socket,id=con0,path={},server=on,wait=off",
                console_path.display()
            ))
            .args(["-serial", "chardev:con0"])
            .arg("-chardev")
            .arg(format!("file,id=log0,path={}", boot_log.display()))
            .args(["-serial", "chardev:log0"])
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=vios0,path={},server=on,wait=off",
                port0.display()
            ))
            .args([
                "-device",
                "virtserialport,bus=vser0.0,chardev=vios0,name=org.qpid.vios.0,id=vsp0",
            ])
            // Entropy at once (the guest's pool is otherwise slow under TCG).
            .args(["-object", "rng-random,id=rng0,filename=/dev/urandom"])
            .args(["-device", "virtio-rng-pci,rng=rng0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let qemu = Proc::spawn(
            &format!("qemu-{name}"),
            &mut cmd,
            work.join(format!("qemu-{name}-{n}.log")),
        );
        wait_path(&console_path, Duration::from_secs(20));
        let console = connect_retry(&console_path, Duration::from_secs(10));
        let qmp = Qmp::connect(&qmp_path);
        let mut vm = SystemdVm {
            name: name.to_owned(),
            qemu,
            console,
            pending: Vec::new(),
            transcript: String::new(),
            qmp,
            guest_dir,
            boot_log,
            boot_id: String::new(),
        };
        vm.boot_id = vm.wait_ready(Duration::from_secs(240));
        vm
    }

    /// Waits for the console's `VIOS-GUEST-BOOT` and `VIOS-GUEST-READY`
    /// lines; returns the boot id.
    fn wait_ready(&mut self, timeout: Duration) -> String {
        self.wait_for("VIOS-GUEST-BOOT boot_id=", timeout);
        let id = self.wait_for("\n", Duration::from_secs(5)).trim().to_owned();
        self.wait_for("VIOS-GUEST-READY\n", Duration::from_secs(10));
        id
    }

    /// The host-side socket of port `i` (`org.qpid.vios.<i>`).
    pub fn port_socket(&self, i: usize) -> PathBuf {
        self.guest_dir.join(format!("org.qpid.vios.{i}"))
    }

    /// Reads console output until `needle`; returns what came before it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            if let Some(pos) = find(&self.pending, needle.as_bytes()) {
                let before = String::from_utf8_lossy(&self.pending[..pos]).into_owned();
                self.pending.drain(..pos + needle.len());
                return before;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: {needle:?} not seen within {timeout:?}; console so far:\n{}\n---- boot log ----\n{}",
                self.name,
                tail(&self.transcript, 3000),
                tail(&std::fs::read_to_string(&self.boot_log).unwrap_or_default(), 3000)
            );
            self.read_some(left.min(Duration::from_millis(200)));
        }
    }

    fn read_some(&mut self, wait: Duration) {
        let _ = self
            .console
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        let mut buf = [0u8; 8192];
        match self.console.read(&mut buf) {
            Ok(0) => panic!("{}: the console closed (QEMU exited?)", self.name),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.transcript.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{}: console read: {e}", self.name),
        }
    }

    /// Runs a shell command (bash, as root) in the guest; returns its output
    /// and exit status.
    pub fn run(&mut self, command: &str, timeout: Duration) -> (String, i32) {
        static TOKEN: AtomicUsize = AtomicUsize::new(0);
        let token = format!("s{}", TOKEN.fetch_add(1, Ordering::SeqCst));
        let line = format!("{command}\necho __VIOS_RC_{token}=$?__\n");
        self.console.write_all(line.as_bytes()).expect("console write");
        let marker = format!("__VIOS_RC_{token}=");
        let out = self.wait_for(&marker, timeout);
        let status = self.wait_for("__\n", Duration::from_secs(5));
        let rc = status.trim().parse().unwrap_or(-1);
        (strip_job_notices(&out), rc)
    }

    /// Runs a command that must succeed; returns its output.
    pub fn ok(&mut self, command: &str, timeout: Duration) -> String {
        let (out, rc) = self.run(command, timeout);
        assert_eq!(
            rc, 0,
            "{}: `{command}` failed with status {rc}:\n{out}",
            self.name
        );
        out
    }

    /// Runs `command` every 300 ms until it succeeds; returns its output.
    pub fn wait_until(&mut self, command: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let (out, rc) = self.run(command, Duration::from_secs(30));
            if rc == 0 {
                return out;
            }
            assert!(
                Instant::now() < end,
                "{}: `{command}` did not succeed within {timeout:?}; last status {rc}:\n{out}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `systemctl reboot`, and waits until the console is ready again in a
    /// new boot (same QEMU, same disk overlay).
    pub fn reboot(&mut self, timeout: Duration) {
        self.console
            .write_all(b"systemctl reboot\n")
            .expect("console write");
        let old = std::mem::take(&mut self.boot_id);
        let end = Instant::now() + timeout;
        loop {
            let id = self.wait_ready(end.saturating_duration_since(Instant::now()));
            if id != old {
                self.boot_id = id;
                return;
            }
        }
    }

    /// Hot-plugs port `i` (`org.qpid.vios.<i>`): a chardev socket beside
    /// port 0's, then the port on the running virtio-serial bus.
    pub fn add_port(&mut self, i: usize) -> PathBuf {
        let sock = self.port_socket(i);
        let _ = std::fs::remove_file(&sock);
        self.qmp.execute(
            "chardev-add",
            &format!(
                "{{\"id\":\"vios{i}\",\"backend\":{{\"type\":\"socket\",\"data\":{{\
                 \"addr\":{{\"type\":\"unix\",\"data\":{{\"path\":\"{}\"}}}},\
                 \"server\":true,\"wait\":false}}}}}}",
                sock.display()
            ),
        );
        self.qmp.execute(
            "device_add",
            &format!(
                "{{\"driver\":\"virtserialport\",\"bus\":\"vser0.0\",\"chardev\":\"vios{i}\",\
                 \"name\":\"org.qpid.vios.{i}\",\"id\":\"vsp{i}\"}}"
            ),
        );
        sock
    }

    /// Unplugs port `i` and removes its chardev.
    pub fn remove_port(&mut self, i: usize) {
        self.qmp.execute("device_del", &format!("{{\"id\":\"vsp{i}\"}}"));
        self.qmp
            .wait_event("DEVICE_DELETED", &format!("vsp{i}"), Duration::from_secs(30));
        self.qmp
            .execute("chardev-remove", &format!("{{\"id\":\"vios{i}\"}}"));
    }
}

impl Drop for SystemdVm {
    /// On failure: the tails of the console and the boot log, and the guest's
    /// journal when the guest still answers.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let journal = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run(
                "journalctl -b --no-pager -o short-monotonic -n 150",
                Duration::from_secs(10),
            )
            .0
        }));
        eprintln!(
            "---- {} console ----\n{}",
            self.name,
            tail(&self.transcript, 3000)
        );
        eprintln!(
            "---- {} boot log ({}) ----\n{}",
            self.name,
            self.boot_log.display(),
            tail(&std::fs::read_to_string(&self.boot_log).unwrap_or_default(), 3000)
        );
        eprintln!(
            "---- {} journal ----\n{}",
            self.name,
            journal.unwrap_or_else(|_| "(the guest did not answer)".into())
        );
    }
}

fn connect_retry(path: &Path, timeout: Duration) -> UnixStream {
    let end = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < end, "connect {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Drops bash's job reports (`[1]+  Done  cmd`, `[1]+  Killed ...`).
fn strip_job_notices(out: &str) -> String {
    out.lines()
        .filter(|l| {
            let l = l.trim_start();
            !(l.starts_with('[')
                && l.contains(']')
                && ["Done", "Killed", "Terminated", "Exit", "Stopped"]
                    .iter()
                    .any(|w| l.contains(w)))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
