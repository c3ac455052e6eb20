//! Socket activation of the guest bridge (issue 10): its listening sockets
//! come from systemd (`LISTEN_PID`/`LISTEN_FDS`, as a `.socket` unit passes
//! them), so a client that connects while no bridge runs waits in the
//! backlog and is served once one starts. Shown with systemd's own
//! `systemd-socket-activate`, and with a holder that keeps the sockets across
//! a restart as the unit `vios-guest-bridge@.socket` does.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};
use vios_tests::servers::{Mode, Server};
use vios_tests::{bin, free_port, host_behind_standin, Proc, TempDir};

/// One test at a time: a held socket is inherited by every child spawned
/// meanwhile, a parallel test's too.
static ONE: Mutex<()> = Mutex::new(());

fn one() -> MutexGuard<'static, ()> {
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A listening socket that children inherit, as systemd holds one.
fn held(addr: &SockAddr) -> Socket {
    let s = Socket::new(addr.domain(), Type::STREAM, None).unwrap();
    if addr.domain() != Domain::UNIX {
        s.set_reuse_address(true).unwrap();
    }
    s.bind(addr).unwrap();
    s.listen(16).unwrap();
    s.set_cloexec(false).unwrap();
    s
}

fn tcp(port: u16) -> SockAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()
}

/// The guest bridge with `fds` passed the way systemd passes them: moved to
/// descriptors 3, 4, … and announced by `LISTEN_PID` and `LISTEN_FDS`.
fn activated(fds: &[&Socket], args: &[String]) -> Command {
    // Out of the way first (a socket may itself be descriptor 3 or 4), then
    // into place; no other copy is left open.
    let (mut aside, mut place) = (String::new(), String::new());
    for (i, s) in fds.iter().enumerate() {
        let (fd, spare) = (s.as_raw_fd(), 200 + i);
        assert!(fd < 200, "descriptor {fd}");
        aside += &format!("{spare}<&{fd} {fd}<&- ");
        place += &format!("{}<&{spare} {spare}<&- ", 3 + i);
    }
    let script = format!(
        "exec {aside}; exec {place}; export LISTEN_PID=$$ LISTEN_FDS={}; exec \"$0\" \"$@\"",
        fds.len()
    );
    let mut c = Command::new("bash");
    c.arg("-c").arg(script).arg(bin("vios-guest-bridge")).args(args);
    c
}

fn echoes<S: Read + Write>(mut s: S, what: &[u8]) {
    s.write_all(what).unwrap();
    let mut back = vec![0; what.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, what);
}

fn with_timeout<S>(s: S, set: impl Fn(&S, Option<Duration>) -> std::io::Result<()>) -> S {
    set(&s, Some(Duration::from_secs(20))).unwrap();
    s
}

#[test]
fn clients_wait_in_the_backlog_while_the_bridge_restarts() {
    let _one = one();
    let dir = TempDir::new("activation");
    let server = Server::start(Mode::Echo);
    let (_standin, _host, gsock) = host_behind_standin(&dir, &server, &[]);
    let port = free_port();
    let path = dir.join("amqp.sock");
    let (t, u) = (held(&tcp(port)), held(&SockAddr::unix(&path).unwrap()));
    let args = [
        "--channel".to_string(),
        format!("unix:{}", gsock.display()),
        "--listen".into(),
        format!("127.0.0.1:{port}=echo"),
        "--listen".into(),
        format!("unix:{}=echo", path.display()),
    ];
    let start = |n: usize| {
        let p = Proc::spawn(
            &format!("guest-bridge-{n}"),
            &mut activated(&[&t, &u], &args),
            dir.join(&format!("guest{n}.log")),
        );
        p.wait_log("session established", 1, Duration::from_secs(15));
        for l in [format!("127.0.0.1:{port}"), format!("unix:{}", path.display())] {
            let line = format!("listening on {l} for service echo (socket passed by systemd)");
            assert!(p.log_text().contains(&line), "no {line:?}:\n{}", p.log_text());
        }
        p
    };

    let mut first = start(1);
    echoes(TcpStream::connect(("127.0.0.1", port)).unwrap(), b"served");
    echoes(UnixStream::connect(&path).unwrap(), b"served");
    let st = first.terminate(Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "the bridge did not stop cleanly: {st:?}"
    );
    assert!(
        Path::new(&path).exists(),
        "the bridge removed a socket path that systemd owns"
    );

    // No bridge runs: the clients connect to the held sockets and wait.
    let c1 = with_timeout(
        TcpStream::connect(("127.0.0.1", port)).unwrap(),
        TcpStream::set_read_timeout,
    );
    let c2 = with_timeout(UnixStream::connect(&path).unwrap(), UnixStream::set_read_timeout);
    let _second = start(2);
    echoes(c1, b"connected while no bridge ran");
    echoes(c2, b"connected while no bridge ran");
}

#[test]
fn systemd_socket_activate_starts_the_bridge_for_its_first_client() {
    let _one = one();
    let dir = TempDir::new("activate");
    let server = Server::start(Mode::Echo);
    let (_standin, _host, gsock) = host_behind_standin(&dir, &server, &[]);
    let port = free_port();
    let p = Proc::spawn(
        "systemd-socket-activate",
        Command::new("systemd-socket-activate")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--fdname=amqp"])
            .arg(bin("vios-guest-bridge"))
            .arg("--channel")
            .arg(format!("unix:{}", gsock.display()))
            .args(["--listen", &format!("127.0.0.1:{port}=echo")]),
        dir.join("activate.log"),
    );
    p.wait_log("Listening on", 1, Duration::from_secs(10));
    // The premise: nothing runs the bridge before a client comes.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !p.log_text().contains("vios_guest_bridge"),
        "the bridge started before any client:\n{}",
        p.log_text()
    );
    let c = with_timeout(
        TcpStream::connect(("127.0.0.1", port)).unwrap(),
        TcpStream::set_read_timeout,
    );
    echoes(c, b"the first client");
    assert!(p.log_text().contains(&format!(
        "listening on 127.0.0.1:{port} for service echo (socket passed by systemd)"
    )));
}

#[test]
fn a_passed_socket_that_no_listener_names_is_a_configuration_error() {
    let _one = one();
    let dir = TempDir::new("activation-bad");
    let (passed, named) = (free_port(), free_port());
    let s = held(&tcp(passed));
    let out = activated(
        &[&s],
        &[
            "--channel".into(),
            format!("unix:{}", dir.join("none.sock").display()),
            "--listen".into(),
            format!("127.0.0.1:{named}=amqp"),
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "systemd passed a socket on 127.0.0.1:{passed} that no --listen names; listeners: 127.0.0.1:{named}"
        )),
        "{err}"
    );
}
