//! Test harness for the bridge pair: the two daemons as real processes, the
//! QEMU stand-in between them, and small servers with known behaviour.
//!
//! Everything a test starts is stopped when its handle drops, and lives in a
//! [`TempDir`] of its own, so tests can run in parallel.
#![forbid(unsafe_code)]

pub mod guests;
pub mod libvirt;
pub mod servers;
pub mod systemd_vm;
pub mod tool;
pub mod vm;

use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Directory holding the workspace's binaries for the profile the tests were
/// built with (`target/<profile>`), found from the test executable itself.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VIOS_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Path of one of the workspace's binaries; panics with a hint if it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace first (cargo build --workspace, same profile as the tests)",
        p.display()
    );
    p
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("vios-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("VIOS_KEEP_TEMP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A free loopback TCP port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process with its standard error in a log file, stopped on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    stdin: Option<ChildStdin>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let file = fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(file)
            .env(
                "RUST_LOG",
                std::env::var("VIOS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let mut p = Proc {
            name: name.into(),
            child: Some(child),
            log,
            stdin: None,
        };
        p.stdin = p.child.as_mut().and_then(|c| c.stdin.take());
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a line to the process's standard input.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write command");
        stdin.flush().unwrap();
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times; panics with the log
    /// after `timeout`.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.log_text().matches(needle).count() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{}: {needle:?} ×{count} not logged within {timeout:?}; log:\n{}",
            self.name,
            self.log_text()
        );
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.terminate(Duration::from_secs(3));
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}) ----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 60)
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The QEMU stand-in, the two bridges, and the paths joining them.
pub struct Rig {
    pub guest: Option<Proc>,
    pub host: Option<Proc>,
    pub standin: Proc,
    pub guest_port: u16,
    host_args: Vec<String>,
    guest_args: Vec<String>,
    /// Last, so the logs are still there when the processes drop.
    pub dir: TempDir,
}

/// What a [`Rig`] is built with.
pub struct RigSpec {
    /// `NAME=HOST:PORT` for the host bridge.
    pub services: Vec<String>,
    /// The service the guest's TCP listener maps to.
    pub listen_service: String,
    pub host_extra: Vec<String>,
    pub guest_extra: Vec<String>,
}

impl RigSpec {
    pub fn new(service: &str, addr: SocketAddr) -> RigSpec {
        RigSpec {
            services: vec![format!("{service}={addr}")],
            listen_service: service.into(),
            host_extra: vec![],
            guest_extra: vec![],
        }
    }
}

impl Rig {
    /// Starts the stand-in and both bridges and waits for the session.
    pub fn start(spec: RigSpec) -> Rig {
        let dir = TempDir::new("rig");
        let standin = spawn_standin(&dir, 1);
        let guest_port = free_port();
        let mut host_args = vec![
            "--guest".into(),
            format!("vm1={}", dir.join("host.sock").display()),
        ];
        for s in &spec.services {
            host_args.push("--service".into());
            host_args.push(s.clone());
        }
        host_args.extend(spec.host_extra);
        let mut guest_args = vec![
            "--channel".into(),
            format!("unix:{}", dir.join("guest.sock").display()),
            "--listen".into(),
            format!("127.0.0.1:{guest_port}={}", spec.listen_service),
        ];
        guest_args.extend(spec.guest_extra);
        let mut rig = Rig {
            dir,
            standin,
            host: None,
            guest: None,
            guest_port,
            host_args,
            guest_args,
        };
        rig.start_host();
        rig.start_guest();
        rig.wait_session(1);
        rig
    }

    /// Kills the stand-in (QEMU dies) and, after `down`, starts a new one on
    /// the same socket paths.
    pub fn restart_standin(&mut self, down: Duration) {
        self.standin.kill();
        std::thread::sleep(down);
        let n = self.count_logs("standin");
        self.standin = spawn_standin(&self.dir, n);
    }

    pub fn start_host(&mut self) {
        let n = self.host_starts();
        let mut cmd = Command::new(bin("vios-host-bridge"));
        cmd.args(&self.host_args);
        self.host = Some(Proc::spawn(
            "host-bridge",
            &mut cmd,
            self.dir.join(&format!("host{n}.log")),
        ));
    }

    pub fn start_guest(&mut self) {
        let n = self.guest_starts();
        let mut cmd = Command::new(bin("vios-guest-bridge"));
        cmd.args(&self.guest_args);
        let guest = Proc::spawn("guest-bridge", &mut cmd, self.dir.join(&format!("guest{n}.log")));
        // Not a probe connection: it would become a stream of its own.
        guest.wait_log("listening on", 1, Duration::from_secs(5));
        self.guest = Some(guest);
    }

    fn host_starts(&self) -> usize {
        self.count_logs("host")
    }

    fn guest_starts(&self) -> usize {
        self.count_logs("guest")
    }

    fn count_logs(&self, prefix: &str) -> usize {
        let names = fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name());
        names
            .filter(|n| n.to_string_lossy().starts_with(prefix) && n.to_string_lossy().ends_with(".log"))
            .count()
            + 1
    }

    pub fn host(&self) -> &Proc {
        self.host.as_ref().expect("host bridge running")
    }

    pub fn guest(&self) -> &Proc {
        self.guest.as_ref().expect("guest bridge running")
    }

    /// Waits until both bridges have logged `n` established sessions.
    pub fn wait_session(&self, n: usize) {
        self.host()
            .wait_log("session established", n, Duration::from_secs(15));
        self.guest()
            .wait_log("session established", n, Duration::from_secs(15));
    }

    pub fn guest_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.guest_port))
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.guest_addr()).expect("connect to the guest bridge");
        s.set_nodelay(true).unwrap();
        s
    }

    /// A command for the stand-in (`cut`, `pause`, `split 7`, …).
    pub fn standin(&mut self, cmd: &str) {
        self.standin.send_line(cmd);
        // The stand-in applies commands on its next loop turn.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_standin(dir: &TempDir, n: usize) -> Proc {
    standin_at(
        &dir.join("host.sock"),
        &dir.join("guest.sock"),
        dir.join(&format!("standin{n}.log")),
    )
}

/// Starts a QEMU stand-in with its host-side socket at `host` and its
/// guest-side socket at `guest`; returns once the host socket exists.
pub fn standin_at(host: &Path, guest: &Path, log: PathBuf) -> Proc {
    let _ = fs::remove_file(host);
    let p = Proc::spawn(
        "standin",
        Command::new(bin("vios-qemu-standin"))
            .arg("--host")
            .arg(host)
            .arg("--guest")
            .arg(guest),
        log,
    );
    wait_path(host, Duration::from_secs(5));
    p
}

/// The QEMU stand-in in `dir` and a host bridge serving its host side with
/// the service `echo` (`server`); returns them and the stand-in's guest-side
/// socket, for guest bridges to connect to.
pub fn host_behind_standin(
    dir: &TempDir,
    server: &servers::Server,
    host_args: &[&str],
) -> (Proc, Proc, PathBuf) {
    let hsock = dir.join("host.sock");
    let gsock = dir.join("guest.sock");
    let standin = standin_at(&hsock, &gsock, dir.join("standin.log"));
    let host = Proc::spawn(
        "host-bridge",
        Command::new(bin("vios-host-bridge"))
            .arg("--guest")
            .arg(format!("vm={}", hsock.display()))
            .args(["--service", &format!("echo={}", server.addr)])
            .args(host_args),
        dir.join("host.log"),
    );
    (standin, host, gsock)
}

/// Starts a guest bridge on the channel socket `channel` (a stand-in's guest
/// side) serving `service` on `127.0.0.1:port`.
pub fn guest_bridge_at(name: &str, channel: &Path, port: u16, service: &str, log: PathBuf) -> Proc {
    Proc::spawn(
        name,
        Command::new(bin("vios-guest-bridge"))
            .arg("--channel")
            .arg(format!("unix:{}", channel.display()))
            .args(["--listen", &format!("127.0.0.1:{port}={service}")]),
        log,
    )
}

pub fn wait_path(p: &Path, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !p.exists() {
        assert!(
            Instant::now() < end,
            "{} did not appear within {timeout:?}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn wait_port(port: u16, timeout: Duration) {
    let end = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < end,
            "port {port} did not open within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How a read side ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// A clean end of file.
    Eof,
    /// `ECONNRESET` (or another error: the text).
    Reset(String),
    /// Nothing within the time allowed.
    TimedOut,
}

/// Reads until the end, collecting bytes; reports how it ended.
pub fn read_to_end(s: &mut impl Read, timeout: Duration, out: &mut Vec<u8>) -> End {
    let end = Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if Instant::now() >= end {
            return End::TimedOut;
        }
        match s.read(&mut buf) {
            Ok(0) => return End::Eof,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return End::Reset(e.to_string()),
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), cheap to generate and check.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Prints a measured figure and appends it to `vios-figures.txt` beside the
/// binaries, which the test command prints at the end.
pub fn record_figure(line: &str) {
    eprintln!("{line}");
    let path = bin_dir().join("vios-figures.txt");
    let mut text = fs::read_to_string(&path).unwrap_or_default();
    text.push_str(line);
    text.push('\n');
    let _ = fs::write(path, text);
}

/// Reads lines of a log for assertions.
pub fn log_lines(text: &str, needle: &str) -> Vec<String> {
    io::Cursor::new(text)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.contains(needle))
        .collect()
}
