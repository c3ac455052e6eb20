//! Real guests: QEMU (TCG) booting the image `scripts/vm/build-image` makes,
//! with virtio-serial ports whose chardevs are unix sockets placed as libvirt
//! places them, driven through the serial console.
//!
//! The console protocol is specified at the top of `scripts/vm/init`: wait for
//! `VIOS-GUEST-READY`, then send a command line followed by
//! `echo __VIOS_RC_<token>=$?__` and read until that marker with its status.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{wait_path, Proc};

/// Repository root (the tests crate's parent).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The guest image, if it has been built; otherwise why not.
pub fn image_dir() -> Result<PathBuf, String> {
    let dir = std::env::var_os("VIOS_VM_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/vm/image"));
    for f in ["vmlinuz", "initrd.gz"] {
        if !dir.join(f).exists() {
            return Err(format!(
                "no guest image at {} (run scripts/vm/build-image)",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// The image, or `None` after printing why the test is skipped. With
/// `VIOS_REQUIRE_VM=1` (set by the test command) a missing image fails.
pub fn image_or_skip() -> Option<PathBuf> {
    match image_dir() {
        Ok(d) => Some(d),
        Err(why) => {
            assert!(std::env::var_os("VIOS_REQUIRE_VM").is_none(), "{why}");
            eprintln!("SKIP: {why}");
            None
        }
    }
}

/// One guest under QEMU: started by this harness ([`Vm::boot`]) or by
/// libvirt ([`Vm::attach`]).
pub struct Vm {
    pub name: String,
    /// QEMU, when this harness started it.
    pub qemu: Option<Proc>,
    console: UnixStream,
    console_path: PathBuf,
    /// Bytes received from the console not yet consumed.
    pending: Vec<u8>,
    /// The guest directory holding the channel sockets (`<id>-<name>`).
    pub guest_dir: PathBuf,
    /// Everything the console printed, for failure reports.
    pub transcript: String,
    /// Where the guest bridge's log is saved when the VM goes (failure or
    /// `VIOS_KEEP_TEMP`).
    log_dir: PathBuf,
}

/// How to boot a guest.
pub struct VmSpec<'a> {
    pub name: &'a str,
    /// Where guest directories go (the host bridge's `--guest-dir`).
    pub channel_dir: &'a Path,
    /// Extra kernel command line (`vios.autostart=1`, `vios.args=…`).
    pub append: String,
    pub ports: usize,
    /// Reuse this libvirt-style id (the same socket paths as an earlier boot).
    pub id: Option<u32>,
}

impl<'a> VmSpec<'a> {
    pub fn new(name: &'a str, channel_dir: &'a Path) -> VmSpec<'a> {
        VmSpec {
            name,
            channel_dir,
            append: String::new(),
            ports: 1,
            id: None,
        }
    }
}

impl Vm {
    /// Boots a guest and waits for its console to be ready.
    pub fn boot(spec: VmSpec<'_>, log_dir: &Path) -> Vm {
        let image = image_dir().expect("guest image");
        let console_path = log_dir.join(format!("{}.console.sock", spec.name));
        let _ = std::fs::remove_file(&console_path);
        let mut cmd = Command::new(repo_root().join("scripts/vm/run-vm"));
        cmd.args(["--name", spec.name])
            .arg("--channel-dir")
            .arg(spec.channel_dir)
            .arg("--image")
            .arg(&image)
            .arg("--console")
            .arg(&console_path)
            .args(["--ports", &spec.ports.to_string()])
            .args(["--append", &spec.append]);
        if let Some(id) = spec.id {
            cmd.args(["--id", &id.to_string()]);
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let qemu = Proc::spawn(
            &format!("qemu-{}", spec.name),
            &mut cmd,
            log_dir.join(format!("qemu-{}-{n}.log", spec.name)),
        );
        wait_path(&console_path, Duration::from_secs(20));
        let console = connect_retry(&console_path, Duration::from_secs(10));
        let mut vm = Vm {
            name: spec.name.to_owned(),
            qemu: Some(qemu),
            console,
            console_path,
            pending: Vec::new(),
            guest_dir: PathBuf::new(),
            transcript: String::new(),
            log_dir: log_dir.to_path_buf(),
        };
        vm.wait_for("VIOS-GUEST-READY\n", Duration::from_secs(90));
        vm.guest_dir = vm.find_guest_dir(spec.channel_dir);
        vm
    }

    /// Takes over the console of a guest somebody else started (libvirt):
    /// connects to its unix socket and synchronises with the console shell,
    /// whether or not the guest is still booting. `guest_dir` is where the
    /// guest's channel sockets are.
    pub fn attach(name: &str, console_path: &Path, guest_dir: PathBuf, log_dir: &Path) -> Vm {
        let console = connect_retry(console_path, Duration::from_secs(10));
        let mut vm = Vm {
            name: name.to_owned(),
            qemu: None,
            console,
            console_path: console_path.to_path_buf(),
            pending: Vec::new(),
            guest_dir,
            transcript: String::new(),
            log_dir: log_dir.to_path_buf(),
        };
        vm.sync(Duration::from_secs(90));
        vm
    }

    /// The console protocol's synchronisation (`scripts/vm/init`): a sync
    /// line every second until its answer comes back after `VIOS-GUEST-READY`
    /// (or from a shell that was ready before we connected); everything
    /// before the answer is dropped.
    pub fn sync(&mut self, timeout: Duration) {
        static TOKEN: AtomicUsize = AtomicUsize::new(0);
        let end = Instant::now() + timeout;
        loop {
            let token = format!("s{}", TOKEN.fetch_add(1, Ordering::SeqCst));
            let answer = format!("__VIOS_SYNC_{token}__\n");
            self.console
                .write_all(format!("echo __VIOS_SYNC_\"\"{token}__\n").as_bytes())
                .expect("console write");
            let wait = Instant::now() + Duration::from_secs(1);
            while Instant::now() < wait {
                if let Some(pos) = find(&self.pending, answer.as_bytes()) {
                    let ready = find(&self.pending[..pos], b"VIOS-GUEST-READY\n").is_some();
                    self.pending.drain(..pos + answer.len());
                    if ready {
                        // Answered after READY: sync once more to drop the
                        // echo of lines sent while the guest was booting.
                        return self.sync(end.saturating_duration_since(Instant::now()));
                    }
                    return;
                }
                self.read_some(Duration::from_millis(50));
            }
            assert!(
                Instant::now() < end,
                "{}: the console did not answer within {timeout:?}; console so far:\n{}",
                self.name,
                tail(&self.transcript, 4000)
            );
        }
    }

    fn find_guest_dir(&self, channel_dir: &Path) -> PathBuf {
        let suffix = format!("-{}", self.name);
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(entries) = std::fs::read_dir(channel_dir) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().ends_with(&suffix) && e.path().is_dir() {
                        return e.path();
                    }
                }
            }
            assert!(
                Instant::now() < end,
                "no guest directory *{suffix} in {}",
                channel_dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
                "{}: {needle:?} not seen within {timeout:?}; console so far:\n{}",
                self.name,
                tail(&self.transcript, 4000)
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
            Ok(0) => {
                // QEMU went away or restarted its chardev: reconnect.
                std::thread::sleep(Duration::from_millis(50));
                if let Ok(c) = UnixStream::connect(&self.console_path) {
                    self.console = c;
                }
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.transcript.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{}: console read: {e}", self.name),
        }
    }

    /// Runs a shell command in the guest; returns its output and exit status.
    pub fn run(&mut self, command: &str, timeout: Duration) -> (String, i32) {
        static TOKEN: AtomicUsize = AtomicUsize::new(0);
        let token = format!("t{}", TOKEN.fetch_add(1, Ordering::SeqCst));
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

    /// `reboot -f` and wait until the guest is ready again.
    pub fn reboot(&mut self, timeout: Duration) {
        self.console.write_all(b"reboot -f\n").expect("console write");
        self.wait_for("VIOS-GUEST-BOOT", timeout);
        self.wait_for("VIOS-GUEST-READY\n", timeout);
    }

    /// The guest bridge's log (autostarted with `vios.autostart=1`).
    pub fn bridge_log(&mut self) -> String {
        self.run("cat /tmp/guest-bridge.log", Duration::from_secs(10)).0
    }
}

impl Drop for Vm {
    /// Keeps the guest bridge's log beside the host's logs when a test failed
    /// or `VIOS_KEEP_TEMP` is set, and prints its tail on failure.
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if !failing && std::env::var_os("VIOS_KEEP_TEMP").is_none() {
            return;
        }
        static SAVED: AtomicUsize = AtomicUsize::new(0);
        let log = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run("cat /tmp/guest-bridge.log", Duration::from_secs(3)).0
        }));
        let text = log.unwrap_or_else(|_| "(guest did not answer)".into());
        let n = SAVED.fetch_add(1, Ordering::SeqCst);
        let _ = std::fs::write(self.log_dir.join(format!("guest-{}-{n}.log", self.name)), &text);
        if failing {
            eprintln!("---- {} guest bridge log ----\n{}", self.name, tail(&text, 4000));
            eprintln!(
                "---- {} console ----\n{}",
                self.name,
                tail(&self.transcript, 2000)
            );
        }
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

/// Drops the shell's background-job reports (`[1]+  Done  cmd`).
fn strip_job_notices(out: &str) -> String {
    out.lines()
        .filter(|l| {
            let l = l.trim_start();
            !(l.starts_with('[')
                && l.contains(']')
                && (l.contains("Done")
                    || l.contains("Killed")
                    || l.contains("Terminated")
                    || l.contains("Exit")))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Extracts the single JSON line a test tool printed, by key prefix.
pub fn json_line(out: &str, key: &str) -> String {
    out.lines()
        .find(|l| l.starts_with('{') && l.contains(key))
        .unwrap_or_else(|| panic!("no JSON with {key} in:\n{out}"))
        .to_owned()
}

/// A number field of a flat JSON object.
pub fn json_num(json: &str, field: &str) -> f64 {
    let at = json
        .find(&format!("\"{field}\":"))
        .unwrap_or_else(|| panic!("no {field} in {json}"));
    let rest = &json[at + field.len() + 3..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{field} is not a number in {json}"))
}
