//! What the daemons say about themselves (issue 12): the control socket and
//! `status` subcommand, the Prometheus metrics, SIGUSR1, with two guests
//! and live traffic, a hostile guest, and a real broker connection mapped to
//! its guest stream.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vios_tests::servers::{Mode, Server};
use vios_tests::vm::json_num;
use vios_tests::{bin, free_port, standin_at, Proc, TempDir};

/// A guest: its stand-in, its guest bridge and the port its clients use.
struct Guest {
    _standin: Proc,
    bridge: Proc,
    port: u16,
    control: std::path::PathBuf,
}

fn guest(dir: &TempDir, name: &str, service: &str) -> Guest {
    let h = dir.join(&format!("{name}-host.sock"));
    let g = dir.join(&format!("{name}-guest.sock"));
    let standin = standin_at(&h, &g, dir.join(&format!("{name}-standin.log")));
    let port = free_port();
    let control = dir.join(&format!("{name}-guest-control.sock"));
    let bridge = Proc::spawn(
        &format!("{name}-guest-bridge"),
        Command::new(bin("vios-guest-bridge"))
            .arg("--channel")
            .arg(format!("unix:{}", g.display()))
            .args(["--listen", &format!("127.0.0.1:{port}={service}")])
            .arg("--control")
            .arg(&control),
        dir.join(&format!("{name}-guest.log")),
    );
    Guest {
        _standin: standin,
        bridge,
        port,
        control,
    }
}

fn status(daemon: &str, control: &Path, args: &[&str]) -> Output {
    Command::new(bin(daemon))
        .arg("status")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run status")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// An echo stream that has moved `n` bytes each way and stays open.
fn echo_stream(port: u16, n: usize) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let data = vios_tests::pattern(n, n as u64);
    s.write_all(&data).unwrap();
    let mut back = vec![0; n];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    s
}

/// The channel object of `guest` in a status JSON (the text between its
/// name and the next guest).
fn guest_json<'a>(json: &'a str, guest: &str) -> &'a str {
    let at = json
        .find(&format!("{{\"name\":\"{guest}\""))
        .unwrap_or_else(|| panic!("no guest {guest} in {json}"));
    let rest = &json[at..];
    let end = rest[1..].find("{\"name\":").map_or(rest.len(), |e| e + 1);
    &rest[..end]
}

#[test]
fn status_counts_what_happened_and_metrics_parse() {
    let dir = TempDir::new("status");
    let echo = Server::start(Mode::Echo);
    let a = guest(&dir, "vm-a", "echo");
    let b = guest(&dir, "vm-b", "echo");
    let bad = dir.join("bad.sock");
    let control = dir.join("host-control.sock");
    let metrics_port = free_port();
    let mut host = Proc::spawn(
        "host-bridge",
        Command::new(bin("vios-host-bridge"))
            .arg("--guest")
            .arg(format!("vm-a={}", dir.join("vm-a-host.sock").display()))
            .arg("--guest")
            .arg(format!("vm-b={}", dir.join("vm-b-host.sock").display()))
            .arg("--guest")
            .arg(format!("bad={}", bad.display()))
            .args(["--service", &format!("echo={}", echo.addr)])
            .arg("--control")
            .arg(&control)
            .args(["--metrics", &format!("127.0.0.1:{metrics_port}")]),
        dir.join("host.log"),
    );
    a.bridge
        .wait_log("session established", 1, Duration::from_secs(15));
    b.bridge
        .wait_log("session established", 1, Duration::from_secs(15));
    // A guest that sends garbage once its session is up.
    let hostile = Proc::spawn(
        "hostile",
        Command::new(bin("vios-hostile")).arg("--listen").arg(&bad).args([
            "--mode",
            "garbage",
            "--seconds",
            "2",
        ]),
        dir.join("hostile.log"),
    );
    host.wait_log(
        "guest bad bad.sock: session ended: PROTOCOL_ERROR",
        1,
        Duration::from_secs(15),
    );
    drop(hostile);
    // Live traffic: three streams on vm-a, one on vm-b, open while asked.
    let _a1 = echo_stream(a.port, 1000);
    let _a2 = echo_stream(a.port, 2000);
    let _a3 = echo_stream(a.port, 300_000);
    let _b1 = echo_stream(b.port, 500);

    let out = status("vios-host-bridge", &control, &["--json"]);
    let json = text(&out);
    // bad has no session: not all are established (exit 1).
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert!(json.starts_with("{\"version\":1,"), "{json}");
    let va = guest_json(&json, "vm-a");
    assert_eq!(json_num(va, "streams_open"), 3.0, "{va}");
    assert_eq!(json_num(va, "streams_total"), 3.0, "{va}");
    // Bytes each way: exactly what the clients sent and got back.
    assert_eq!(json_num(va, "bytes_from_peer"), 303_000.0, "{va}");
    assert_eq!(json_num(va, "bytes_to_peer"), 303_000.0, "{va}");
    let vb = guest_json(&json, "vm-b");
    assert_eq!(json_num(vb, "streams_open"), 1.0, "{vb}");
    let bad_json = guest_json(&json, "bad");
    assert!(
        bad_json.contains("\"violation:PROTOCOL_ERROR\":"),
        "the hostile guest's end is counted: {bad_json}"
    );

    // One guest only; the table lists streams with the guest clients.
    let out = status("vios-host-bridge", &control, &["--guest", "vm-a", "--streams"]);
    let table = text(&out);
    assert!(table.contains("vm-a") && !table.contains("vm-b"), "{table}");
    let client = _a1.local_addr().unwrap().to_string();
    assert!(
        table.contains(&format!("client {client}")),
        "the guest client's address reaches the host: {table}"
    );

    // The guest bridge answers too.
    let out = status("vios-guest-bridge", &a.control, &["--json"]);
    let gj = text(&out);
    assert_eq!(out.status.code(), Some(0), "{gj}");
    assert!(gj.contains("\"listeners\":[\"127.0.0.1:"), "{gj}");
    assert_eq!(json_num(&gj, "streams_open"), 3.0, "{gj}");

    // Metrics: Prometheus text that promtool accepts.
    let mut m = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    m.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body.contains("vios_streams_open{guest=\"vm-a\",channel=\"vm-a-host.sock\"} 3"),
        "{body}"
    );
    match std::env::var("VIOS_PROMTOOL") {
        Ok(promtool) => {
            let mut p = Command::new(&promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("promtool");
            p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
            let o = p.wait_with_output().unwrap();
            assert!(o.status.success(), "promtool check metrics: {}", text(&o));
        }
        Err(_) => {
            assert!(
                std::env::var_os("VIOS_REQUIRE_BROKER").is_none(),
                "VIOS_PROMTOOL is not set (scripts/test fetches promtool)"
            );
            eprintln!("SKIP promtool check: VIOS_PROMTOOL not set");
        }
    }

    // SIGUSR1 writes the status to the log.
    host.signal("USR1");
    host.wait_log("status (SIGUSR1):", 1, Duration::from_secs(5));

    // A stopped daemon: exit 2, naming the socket tried.
    host.terminate(Duration::from_secs(10));
    let out = status("vios-host-bridge", &control, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains(&control.display().to_string()),
        "{}",
        text(&out)
    );
}

#[test]
fn a_broker_connection_maps_to_its_guest_stream() {
    let Some(port) = std::env::var("VIOS_TEST_AMQP_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
    else {
        let why = "VIOS_TEST_AMQP_PORT is not set: no broker (run scripts/test, which starts RabbitMQ)";
        assert!(std::env::var_os("VIOS_REQUIRE_BROKER").is_none(), "{why}");
        eprintln!("SKIP: {why}");
        return;
    };
    let broker_dir = std::env::var("VIOS_TEST_BROKER_DIR").expect("scripts/test sets VIOS_TEST_BROKER_DIR");
    let dir = TempDir::new("status-amqp");
    let vm = guest(&dir, "vm", "amqp");
    let control = dir.join("host-control.sock");
    let _host = Proc::spawn(
        "host-bridge",
        Command::new(bin("vios-host-bridge"))
            .arg("--guest")
            .arg(format!("vm={}", dir.join("vm-host.sock").display()))
            .args(["--service", &format!("amqp=127.0.0.1:{port},loopback=ok")])
            .arg("--control")
            .arg(&control),
        dir.join("host.log"),
    );
    vm.bridge
        .wait_log("session established", 1, Duration::from_secs(15));
    // An AMQP connection through the bridge, held open; it prints its own
    // local address (the guest client's address).
    let mut client = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import pika,sys; c=pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1', int(sys.argv[1]))); \
             print('%s:%d' % c._impl._transport._sock.getsockname(), flush=True); sys.stdin.read()",
            &vm.port.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 pika");
    let mut line = String::new();
    let mut out = client.stdout.take().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 64];
    while !line.contains('\n') {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0 && Instant::now() < end, "the AMQP client did not connect");
        line.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let client_addr = line.trim().to_owned();
    // The broker's view: the peer port of each connection.
    let ctl = Command::new("bash")
        .args([
            "-c",
            "source scripts/lib/broker.sh && broker_ctl \"$1\" list_connections -q peer_host peer_port",
            "-",
            &broker_dir,
        ])
        .current_dir(vios_tests::vm::repo_root())
        .output()
        .unwrap();
    let listing = text(&ctl);
    let st = text(&status("vios-host-bridge", &control, &["--streams", "--json"]));
    // The stream whose client is ours: its local port is a broker peer port.
    let at = st
        .find(&format!("\"client\":\"{client_addr}\""))
        .unwrap_or_else(|| panic!("no stream for client {client_addr} in {st}"));
    let local = &st[at..];
    let local = local
        .split("\"local\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let local_port = local.rsplit(':').next().unwrap();
    assert!(
        listing
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(local_port)),
        "rabbitmqctl list_connections:\n{listing}\nhas no peer port {local_port} (stream {local})"
    );
    vios_tests::record_figure(&format!(
        "status --streams maps broker peer port {local_port} to the guest client {client_addr}"
    ));
    drop(client.stdin.take());
    let _ = client.wait();
}

/// A `--control` given explicitly that cannot be bound is a configuration
/// error: exit status 2 (which the units do not restart on), for both
/// daemons; the default path failing only costs the control socket.
#[test]
fn an_explicit_control_socket_that_cannot_be_bound_exits_with_status_2() {
    // A path below a regular file: no directory can be made there.
    let dir = TempDir::new("control-bad");
    let file = dir.join("a-file");
    std::fs::write(&file, b"").unwrap();
    let control = file.join("ctl.sock");
    for (daemon, args) in [
        (
            "vios-host-bridge",
            vec![
                "--guest",
                "vm1=/nonexistent/vios.sock",
                "--service",
                "x=127.0.0.1:9",
            ],
        ),
        (
            "vios-guest-bridge",
            vec![
                "--channel",
                "unix:/nonexistent/vios.sock",
                "--listen",
                "127.0.0.1:0=x",
            ],
        ),
    ] {
        let out = Command::new(bin(daemon))
            .args(&args)
            .arg("--control")
            .arg(&control)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{daemon}: {stderr}");
        assert!(
            stderr.contains(&format!("control socket {}", control.display())),
            "{daemon}: {stderr}"
        );
    }
}
