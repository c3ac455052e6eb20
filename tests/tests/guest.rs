//! The guest bridge's own defences (issue 8): stale refusals from before a
//! restart, local users' fair shares, and who may connect to a unix listener.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use vios_common::proto::hello::{Hello, Limits, Role};
use vios_common::proto::Code;
use vios_tests::servers::{Mode, Server};
use vios_tests::{bin, free_port, host_behind_standin, standin_at, Proc, TempDir};

fn refusing_hello(nonce: u8) -> Vec<u8> {
    let h = Hello {
        min_version: 1,
        max_version: 1,
        role: Some(Role::Host),
        refuse: true,
        nonce: [nonce; 16],
        // The nonce of some earlier handshake: not the guest's current one.
        echo: [0x77; 16],
        capabilities: 0,
        limits: Limits {
            max_frame_payload: 1 << 18,
            initial_window: 1 << 16,
            max_streams: 1024,
            idle_timeout_ms: 15_000,
        },
        code: Code::EnhanceYourCalm,
        text: "stale".into(),
    };
    let mut v = Vec::new();
    h.encode(&mut v);
    v
}

#[test]
fn stale_refusals_do_not_delay_a_restarted_guest_bridge() {
    let dir = TempDir::new("stale");
    let server = Server::start(Mode::Echo);
    let hsock = dir.join("host.sock");
    let gsock = dir.join("guest.sock");
    let _standin = standin_at(&hsock, &gsock, dir.join("standin.log"));
    let port = free_port();
    let guest = Proc::spawn(
        "guest-bridge",
        Command::new(bin("vios-guest-bridge"))
            .arg("--channel")
            .arg(format!("unix:{}", gsock.display()))
            .args(["--listen", &format!("127.0.0.1:{port}=echo")]),
        dir.join("guest.log"),
    );
    guest.wait_log("connected", 1, Duration::from_secs(5));
    // What the channel kept from before: five refusals of earlier handshakes.
    // Obeyed, they would hold the guest off for 1 + 2 + 4 + 8 s.
    {
        let mut old_host = UnixStream::connect(&hsock).unwrap();
        for i in 0..5 {
            old_host.write_all(&refusing_hello(i + 1)).unwrap();
        }
        guest.wait_log("ignored", 1, Duration::from_secs(5));
    }
    let ignored = guest.log_text();
    assert!(
        ignored.contains("did not echo this side's nonce"),
        "the stale refusals never reached the guest: {ignored}"
    );
    assert!(!ignored.contains("peer refused the handshake"), "{ignored}");
    // The real host starts: the session comes as fast as after a clean start.
    let t = Instant::now();
    let host = Proc::spawn(
        "host-bridge",
        Command::new(bin("vios-host-bridge"))
            .arg("--guest")
            .arg(format!("vm={}", hsock.display()))
            .args(["--service", &format!("echo={}", server.addr)]),
        dir.join("host.log"),
    );
    guest.wait_log("session established", 1, Duration::from_secs(15));
    let took = t.elapsed();
    vios_tests::record_figure(&format!(
        "guest bridge after 5 stale refusals: session {} ms after the host bridge started",
        took.as_millis()
    ));
    assert!(
        took < Duration::from_secs(1),
        "the stale refusals delayed the session: {took:?}"
    );
    drop(host);
}

/// Runs `args` of vios-load as user nobody (uid and gid 65534).
fn load_as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("vios-load"))
        .args(args)
        .output()
        .expect("setpriv")
}

/// An echo server, a host bridge and a guest bridge joined by the QEMU
/// stand-in; the guest listens on `port` for the echo service.
struct EchoPair {
    guest: Proc,
    port: u16,
    _host: Proc,
    _standin: Proc,
    _server: Server,
    _dir: TempDir,
}

impl EchoPair {
    fn start(name: &str, host_args: &[&str], guest_args: &[&str]) -> EchoPair {
        let dir = TempDir::new(name);
        let server = Server::start(Mode::Echo);
        let (standin, host, gsock) = host_behind_standin(&dir, &server, host_args);
        let port = free_port();
        let guest = Proc::spawn(
            "guest-bridge",
            Command::new(bin("vios-guest-bridge"))
                .arg("--channel")
                .arg(format!("unix:{}", gsock.display()))
                .args(["--listen", &format!("127.0.0.1:{port}=echo")])
                .args(guest_args),
            dir.join("guest.log"),
        );
        guest.wait_log("session established", 1, Duration::from_secs(15));
        EchoPair {
            guest,
            port,
            _host: host,
            _standin: standin,
            _server: server,
            _dir: dir,
        }
    }
}

#[test]
fn a_second_user_is_served_while_another_holds_its_share() {
    // The host allows 10 streams: one user alone may have 8 (a part of 2,
    // an eighth rounded up, is kept for one more user).
    let pair = EchoPair::start("users", &["--max-streams", "10"], &["--session-wait", "20s"]);
    let (guest, port) = (&pair.guest, pair.port);
    // root opens 11 connections; 8 become streams, 3 wait.
    let mut held: Vec<TcpStream> = (0..11)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut served = 0;
    for c in &mut held {
        c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        if c.read_exact(&mut b).is_ok() {
            served += 1;
        }
    }
    assert_eq!(served, 8, "root's part of 10 streams (one more user may come)");
    guest.wait_log(
        "waits: user 0 holds its part of 8 streams",
        1,
        Duration::from_secs(5),
    );
    // Another user is served at once, while root's clients wait.
    let t = Instant::now();
    let out = load_as_nobody(&["rtt", "--connect", &format!("127.0.0.1:{port}"), "--count", "100"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"ok\":true"),
        "user nobody was not served: {stdout}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    let log = guest.log_text();
    assert!(
        log.contains("(uid 65534)") || log.contains("opened for client"),
        "{log}"
    );
    drop(held);
}

#[test]
fn closed_streams_give_their_users_part_back() {
    // The host allows 10 streams; 100 connections one after the other must
    // all be served (a stream that closes gives its place back, with or
    // without fair shares between users).
    for shares in ["true", "false"] {
        // (100 opens in well under a second: beyond the default open rate.)
        let pair = EchoPair::start(
            "reuse",
            &["--max-streams", "10", "--open-rate", "0"],
            &["--session-wait", "2s", "--user-shares", shares],
        );
        let (guest, port) = (&pair.guest, pair.port);
        for i in 0..100 {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            assert!(
                c.read_exact(&mut b).is_ok() && &b == b"ping",
                "connection {i} (user shares {shares}) was not served; guest log:\n{}",
                guest.log_text()
            );
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        }
        // Every stream is closed and accounted for.
        guest.wait_log("closed: finished", 100, Duration::from_secs(5));
    }
}

#[test]
fn unix_listeners_have_the_configured_mode_and_group() {
    let dir = TempDir::new("unixperm");
    let server = Server::start(Mode::Echo);
    let (_standin, _host, gsock) = host_behind_standin(&dir, &server, &[]);
    // The temp dir must be searchable for user nobody.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let open = dir.join("open.sock");
    let closed = dir.join("closed.sock");
    let listen = |path: &std::path::Path, extra: &[&str], name: &str| {
        let p = Proc::spawn(
            name,
            Command::new(bin("vios-guest-bridge"))
                .arg("--channel")
                .arg(format!("unix:{}", gsock.display()))
                .args(["--listen", &format!("unix:{}=echo", path.display())])
                .args(extra),
            dir.join(&format!("{name}.log")),
        );
        p.wait_log("listening on", 1, Duration::from_secs(5));
        p
    };
    // The default: every local user may connect (mode 0666).
    let guest = listen(&open, &[], "guest-open");
    assert_eq!(
        std::fs::metadata(&open).unwrap().permissions().mode() & 0o7777,
        0o666
    );
    guest.wait_log("session established", 1, Duration::from_secs(15));
    let out = load_as_nobody(&[
        "rtt",
        "--connect",
        &format!("unix:{}", open.display()),
        "--count",
        "10",
    ]);
    assert!(
        out.status.success(),
        "nobody could not use the default listener: {:?}",
        out
    );
    drop(guest);
    // Only group root (and the owner) with 0660 and --socket-group root.
    let guest = listen(
        &closed,
        &["--socket-mode", "0660", "--socket-group", "root"],
        "guest-closed",
    );
    let m = std::fs::metadata(&closed).unwrap();
    assert_eq!((m.permissions().mode() & 0o7777, m.gid()), (0o660, 0));
    let out = load_as_nobody(&[
        "rtt",
        "--connect",
        &format!("unix:{}", closed.display()),
        "--count",
        "10",
    ]);
    let err = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Permission denied"),
        "{err}"
    );
    guest.wait_log("session established", 1, Duration::from_secs(15));
    let mut c = UnixStream::connect(&closed).expect("root may connect");
    c.write_all(b"x").unwrap();
    drop(guest);
}
