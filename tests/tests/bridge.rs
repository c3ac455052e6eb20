//! The bridge pair end to end: both daemons as real processes, joined by the
//! QEMU stand-in, in front of test servers with known behaviour.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vios_tests::servers::{Mode, Server};
use vios_tests::{log_lines, pattern, read_to_end, End, Rig, RigSpec};

/// Sends `data` on a stream and reads the echo back on another thread;
/// returns the echoed bytes, how the read side ended, and the elapsed time.
fn echo_round(mut s: TcpStream, data: Arc<Vec<u8>>, timeout: Duration) -> (Vec<u8>, End, Duration) {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let r = w.write_all(&data);
        let _ = w.shutdown(Shutdown::Write);
        r
    });
    let mut out = Vec::new();
    let end = read_to_end(&mut s, timeout, &mut out);
    let _ = writer.join();
    (out, end, start.elapsed())
}

fn echo_rig() -> (Server, Rig) {
    let server = Server::start(Mode::Echo);
    let rig = Rig::start(RigSpec::new("echo", server.addr));
    (server, rig)
}

#[test]
fn many_concurrent_streams_are_byte_exact() {
    let (_server, rig) = echo_rig();
    let streams = 128;
    let start = Barrier::new(streams);
    let start = Arc::new(start);
    let mut handles = Vec::new();
    let mut total = 0usize;
    for i in 0..streams {
        // Random sizes up to 4 MiB, a few empty and tiny ones.
        let len = match i % 16 {
            0 => 0,
            1 => 1,
            _ => (pattern(8, i as u64)[0] as usize * 16411 + i * 977) % (4 << 20),
        };
        total += len;
        let data = Arc::new(pattern(len, 1000 + i as u64));
        let s = rig.connect();
        let start = start.clone();
        handles.push(std::thread::spawn(move || {
            start.wait();
            let (out, end, _) = echo_round(s, data.clone(), Duration::from_secs(120));
            (i, out == *data, out.len(), data.len(), end)
        }));
    }
    let t = Instant::now();
    for h in handles {
        let (i, same, got, want, end) = h.join().unwrap();
        assert_eq!(end, End::Eof, "stream {i}");
        assert!(same, "stream {i}: {got} of {want} bytes, content differs");
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{streams} streams, {total} bytes each way in {secs:.2} s ({:.0} MB/s)",
        total as f64 / secs / 1e6
    );
    let host_log = rig.host().log_text();
    assert_eq!(
        log_lines(&host_log, "closed: finished").len(),
        streams,
        "one close line per stream"
    );
}

#[test]
fn a_stalled_reader_does_not_hold_up_the_others() {
    let (_server, rig) = echo_rig();
    // One client writes 64 MiB and never reads: its echo fills its window
    // and the socket buffers, then stops.
    let mut stalled = rig.connect();
    let big = pattern(64 << 20, 7);
    let stall_writer = std::thread::spawn(move || {
        stalled.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = stalled.write_all(&big);
        stalled
    });
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile 16 other streams move 2 MiB each, both ways.
    let t = Instant::now();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let s = rig.connect();
            let data = Arc::new(pattern(2 << 20, 50 + i));
            std::thread::spawn(move || {
                let (out, end, took) = echo_round(s, data.clone(), Duration::from_secs(30));
                assert_eq!(end, End::Eof);
                assert!(out == *data, "stream {i} corrupted");
                took
            })
        })
        .collect();
    let slowest = handles.into_iter().map(|h| h.join().unwrap()).max().unwrap();
    eprintln!(
        "16 × 2 MiB echoes beside a stalled stream: slowest {slowest:?}, all {:?}",
        t.elapsed()
    );
    assert!(
        slowest < Duration::from_secs(10),
        "others were held up: {slowest:?}"
    );
    // The stalled stream is still alive: it drains completely once read.
    let mut stalled = stall_writer.join().unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut first = [0u8; 4096];
    stalled
        .read_exact(&mut first)
        .expect("stalled stream still delivers");
    assert_eq!(&first[..], &pattern(4096, 7)[..]);
}

#[test]
fn half_close_still_receives_the_whole_reply() {
    let server = Server::start(Mode::EchoAfterEof);
    let rig = Rig::start(RigSpec::new("svc", server.addr));
    let request = Arc::new(pattern(3 << 20, 3));
    let (reply, end, _) = echo_round(rig.connect(), request.clone(), Duration::from_secs(30));
    assert_eq!(end, End::Eof);
    assert_eq!(reply.len(), request.len());
    assert!(reply == *request);
    assert!(server.wait_outcomes(1, Duration::from_secs(5))[0].starts_with("Eof"));
}

#[test]
fn client_reset_reaches_the_server_as_a_reset() {
    let server = Server::start(Mode::Sink);
    let rig = Rig::start(RigSpec::new("svc", server.addr));
    let mut s = rig.connect();
    s.write_all(&pattern(100_000, 1)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    let outcomes = server.wait_outcomes(1, Duration::from_secs(5));
    assert!(outcomes[0].starts_with("Reset"), "server saw {outcomes:?}");
    rig.host()
        .wait_log("reset by peer: ABORTED", 1, Duration::from_secs(5));
}

#[test]
fn server_reset_reaches_the_client_as_a_reset() {
    let server = Server::start(Mode::ResetAfter(50_000));
    let rig = Rig::start(RigSpec::new("svc", server.addr));
    let mut s = rig.connect();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let _ = s.write_all(&pattern(60_000, 2));
    let mut out = Vec::new();
    let end = read_to_end(&mut s, Duration::from_secs(10), &mut out);
    assert!(matches!(end, End::Reset(_)), "client saw {end:?}");
}

#[test]
fn unknown_service_is_refused_at_once_with_a_reason() {
    let server = Server::start(Mode::Echo);
    let mut spec = RigSpec::new("echo", server.addr);
    spec.listen_service = "nosuch".into();
    let rig = Rig::start(spec);
    let t = Instant::now();
    let mut s = rig.connect();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let _ = s.write_all(b"AMQP\x00\x00\x09\x01");
    let mut out = Vec::new();
    let end = read_to_end(&mut s, Duration::from_secs(5), &mut out);
    assert!(matches!(end, End::Reset(_)), "client saw {end:?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "refusal took {:?}",
        t.elapsed()
    );
    rig.guest()
        .wait_log("refused by host: UNKNOWN_SERVICE", 1, Duration::from_secs(2));
    rig.host().wait_log(
        "UNKNOWN_SERVICE: no service named \"nosuch\"",
        1,
        Duration::from_secs(2),
    );
    assert!(
        server.outcomes.lock().unwrap().is_empty(),
        "nothing may reach the server"
    );
}

#[test]
fn service_down_is_refused_at_once_with_a_reason() {
    // A port nothing listens on.
    let port = vios_tests::free_port();
    let rig = Rig::start(RigSpec::new("amqp", ([127, 0, 0, 1], port).into()));
    let t = Instant::now();
    let mut s = rig.connect();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut out = Vec::new();
    let end = read_to_end(&mut s, Duration::from_secs(5), &mut out);
    assert!(matches!(end, End::Reset(_)), "client saw {end:?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "refusal took {:?}",
        t.elapsed()
    );
    rig.guest()
        .wait_log("refused by host: UNREACHABLE", 1, Duration::from_secs(2));
    assert!(rig.guest().log_text().contains("Connection refused"));
}

/// Streams in mid-transfer; returns their client sockets.
fn busy_streams(rig: &Rig, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = rig.connect();
            s.write_all(&pattern(200_000, i as u64)).unwrap();
            s
        })
        .collect()
}

/// Every client sees a reset, never a clean end, however much it received.
fn assert_clients_reset(clients: Vec<TcpStream>) {
    for (i, mut s) in clients.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut out = Vec::new();
        let end = read_to_end(&mut s, Duration::from_secs(30), &mut out);
        assert!(
            matches!(end, End::Reset(_)),
            "client {i} saw {end:?} after {} bytes",
            out.len()
        );
    }
}

fn assert_server_resets(server: &Server, n: usize) {
    let outcomes = server.wait_outcomes(n, Duration::from_secs(30));
    assert_eq!(outcomes.len(), n, "{outcomes:?}");
    for o in &outcomes {
        assert!(o.starts_with("Reset"), "server side ended cleanly: {outcomes:?}");
    }
}

#[test]
fn link_cut_mid_transfer_resets_both_ends_and_recovers() {
    let (server, mut rig) = echo_rig();
    let clients = busy_streams(&rig, 8);
    std::thread::sleep(Duration::from_millis(300));
    rig.standin("cut");
    assert_clients_reset(clients);
    assert_server_resets(&server, 8);
    // Both bridges negotiate again by themselves; traffic flows.
    rig.wait_session(2);
    let data = Arc::new(pattern(1 << 20, 99));
    let (out, end, _) = echo_round(rig.connect(), data.clone(), Duration::from_secs(20));
    assert_eq!(end, End::Eof);
    assert!(out == *data);
}

#[test]
fn host_bridge_restart() {
    let (server, mut rig) = echo_rig();
    let clients = busy_streams(&rig, 4);
    std::thread::sleep(Duration::from_millis(300));
    rig.host.as_mut().unwrap().kill();
    // The host died: its service sockets abort (linger 0), the stand-in drops
    // the guest, and the guest resets its clients.
    assert_clients_reset(clients);
    assert_server_resets(&server, 4);
    rig.start_host();
    rig.host()
        .wait_log("session established", 1, Duration::from_secs(15));
    rig.guest()
        .wait_log("session established", 2, Duration::from_secs(15));
    let data = Arc::new(pattern(1 << 20, 98));
    let (out, end, _) = echo_round(rig.connect(), data.clone(), Duration::from_secs(20));
    assert_eq!(end, End::Eof);
    assert!(out == *data);
}

#[test]
fn guest_bridge_restart() {
    let (server, mut rig) = echo_rig();
    let clients = busy_streams(&rig, 4);
    std::thread::sleep(Duration::from_millis(300));
    rig.guest.as_mut().unwrap().kill();
    // The guest's clients see resets from the kernel (linger 0).
    assert_clients_reset(clients);
    // The host cannot see the guest die; it learns from the new HELLO.
    rig.start_guest();
    rig.guest()
        .wait_log("session established", 1, Duration::from_secs(15));
    rig.host()
        .wait_log("session established", 2, Duration::from_secs(15));
    assert_server_resets(&server, 4);
    let data = Arc::new(pattern(1 << 20, 97));
    let (out, end, _) = echo_round(rig.connect(), data.clone(), Duration::from_secs(20));
    assert_eq!(end, End::Eof);
    assert!(out == *data);
}

#[test]
fn qemu_restart_both_bridges_reconnect_by_themselves() {
    let (server, mut rig) = echo_rig();
    let clients = busy_streams(&rig, 4);
    std::thread::sleep(Duration::from_millis(300));
    // QEMU dies; its socket is gone for 3 s (the host retries with backoff),
    // then a new QEMU listens on the same path.
    rig.restart_standin(Duration::from_secs(3));
    assert_clients_reset(clients);
    assert_server_resets(&server, 4);
    rig.wait_session(2);
    let host_log = rig.host().log_text();
    assert!(
        host_log.contains("retrying in"),
        "host should report the missing socket:\n{host_log}"
    );
    let data = Arc::new(pattern(1 << 20, 96));
    let (out, end, _) = echo_round(rig.connect(), data.clone(), Duration::from_secs(20));
    assert_eq!(end, End::Eof);
    assert!(out == *data);
}

#[test]
fn small_writes_and_delays_on_the_channel_lose_nothing() {
    let (_server, mut rig) = echo_rig();
    rig.standin("split 7");
    let data = Arc::new(pattern(300_000, 5));
    let (out, end, _) = echo_round(rig.connect(), data.clone(), Duration::from_secs(60));
    assert_eq!(end, End::Eof);
    assert!(out == *data);
    rig.standin("split 1000000");
    rig.standin("delay 20");
    let data = Arc::new(pattern(100_000, 6));
    let (out, end, _) = echo_round(rig.connect(), data.clone(), Duration::from_secs(60));
    assert_eq!(end, End::Eof);
    assert!(out == *data);
}

#[test]
fn clients_wait_for_a_late_host_then_flow() {
    let server = Server::start(Mode::Echo);
    let mut rig = Rig::start(RigSpec::new("echo", server.addr));
    rig.host.as_mut().unwrap().kill();
    rig.guest().wait_log("session ended", 1, Duration::from_secs(10));
    // A client arrives while there is no host; the host comes back in time.
    let s = rig.connect();
    rig.start_host();
    let data = Arc::new(pattern(10_000, 4));
    let (out, end, _) = echo_round(s, data.clone(), Duration::from_secs(20));
    assert_eq!(end, End::Eof);
    assert!(out == *data);
}

#[test]
fn clients_are_reset_when_no_session_comes() {
    let server = Server::start(Mode::Echo);
    let mut spec = RigSpec::new("echo", server.addr);
    spec.guest_extra = vec!["--session-wait".into(), "500ms".into()];
    let mut rig = Rig::start(spec);
    rig.host.as_mut().unwrap().kill();
    rig.guest().wait_log("session ended", 1, Duration::from_secs(10));
    let t = Instant::now();
    let mut s = rig.connect();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut out = Vec::new();
    let end = read_to_end(&mut s, Duration::from_secs(5), &mut out);
    assert!(matches!(end, End::Reset(_)), "client saw {end:?}");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
        "waited {waited:?}"
    );
    rig.guest()
        .wait_log("no session with the host within", 1, Duration::from_secs(2));
}

#[test]
fn sigterm_stops_both_cleanly() {
    let (_server, mut rig) = echo_rig();
    let mut held = rig.connect();
    held.write_all(b"x").unwrap();
    let st = rig.guest.as_mut().unwrap().terminate(Duration::from_secs(10));
    assert_eq!(st.map(|s| s.code()), Some(Some(0)), "guest bridge exit status");
    held.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut out = Vec::new();
    let end = read_to_end(&mut held, Duration::from_secs(5), &mut out);
    assert!(matches!(end, End::Reset(_)), "held client saw {end:?}");
    let st = rig.host.as_mut().unwrap().terminate(Duration::from_secs(10));
    assert_eq!(st.map(|s| s.code()), Some(Some(0)), "host bridge exit status");
}

#[test]
fn unix_socket_listener_carries_streams() {
    let server = Server::start(Mode::Echo);
    let mut spec = RigSpec::new("echo", server.addr);
    let path = std::env::temp_dir().join(format!("vios-unix-listener-{}.sock", std::process::id()));
    spec.guest_extra = vec!["--listen".into(), format!("unix:{}=echo", path.display())];
    let rig = Rig::start(spec);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
                let data = pattern(500_000, 300 + i);
                let mut w = s.try_clone().unwrap();
                let d2 = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&d2).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                let mut out = Vec::new();
                let end = read_to_end(&mut s, Duration::from_secs(20), &mut out);
                writer.join().unwrap();
                assert_eq!(end, End::Eof);
                assert!(out == data, "unix stream {i} corrupted");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let opened = log_lines(&rig.guest().log_text(), "opened for client unix:");
    assert_eq!(opened.len(), 4, "{opened:?}");
    drop(rig);
    assert!(!path.exists(), "the guest bridge removes its socket on exit");
}

#[test]
fn guests_found_in_a_guest_dir_come_and_go() {
    use std::process::Command;
    use vios_tests::{bin, guest_bridge_at, standin_at, Proc, TempDir};
    let server = Server::start(Mode::Echo);
    let dir = TempDir::new("guestdir");
    let guests = dir.join("channels");
    std::fs::create_dir_all(&guests).unwrap();
    let host = Proc::spawn(
        "host-bridge",
        Command::new(bin("vios-host-bridge"))
            .arg("--guest-dir")
            .arg(&guests)
            .args(["--rescan", "200ms", "--service", &format!("echo={}", server.addr)]),
        dir.join("host.log"),
    );
    host.wait_log("watching", 1, Duration::from_secs(5));
    // A guest appears, laid out as libvirt lays it out: <id>-<name>/<port>.
    let vm_dir = guests.join("7-vm1");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let _standin = standin_at(
        &vm_dir.join("org.qpid.vios.0"),
        &dir.join("g.sock"),
        dir.join("standin.log"),
    );
    let port = vios_tests::free_port();
    let guest = guest_bridge_at(
        "guest-bridge",
        &dir.join("g.sock"),
        port,
        "echo",
        dir.join("guest.log"),
    );
    host.wait_log("guest vm1 found in", 1, Duration::from_secs(5));
    guest.wait_log("session established", 1, Duration::from_secs(10));
    let connect = || TcpStream::connect(("127.0.0.1", port)).unwrap();
    let data = Arc::new(pattern(100_000, 1));
    let (out, end, _) = echo_round(connect(), data.clone(), Duration::from_secs(10));
    assert_eq!((end, out == *data), (End::Eof, true));
    // Streams open when the guest goes away are reset at both ends.
    let mut held = connect();
    held.write_all(b"hello").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_dir_all(&vm_dir).unwrap();
    host.wait_log("guest vm1 is gone", 1, Duration::from_secs(5));
    let outcomes = server.wait_outcomes(2, Duration::from_secs(5));
    assert!(outcomes.iter().any(|o| o.starts_with("Reset")), "{outcomes:?}");
    held.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut rest = Vec::new();
    let end = read_to_end(&mut held, Duration::from_secs(10), &mut rest);
    assert!(matches!(end, End::Reset(_)), "held client saw {end:?}");
}

/// Accepts the host bridge's connection on `l` (standing for QEMU's
/// chardev socket) within `within`.
fn accept_within(
    l: &std::os::unix::net::UnixListener,
    within: Duration,
) -> Option<std::os::unix::net::UnixStream> {
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Ok((s, _)) = l.accept() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

#[test]
fn a_guest_is_served_within_100_ms_of_its_socket_appearing_and_let_go_as_fast() {
    use std::os::unix::net::UnixListener;
    use std::process::Command;
    use vios_tests::{bin, Proc, TempDir};
    let dir = TempDir::new("watch");
    let guests = dir.join("channels");
    std::fs::create_dir_all(&guests).unwrap();
    // A rescan an hour apart: only the watch can find the guests in time.
    let host = Proc::spawn(
        "host-bridge",
        Command::new(bin("vios-host-bridge"))
            .arg("--guest-dir")
            .arg(&guests)
            .args(["--rescan", "1h", "--service", "echo=127.0.0.1:9"]),
        dir.join("host.log"),
    );
    host.wait_log("watching", 1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    let mut found = vec![];
    let mut gone = vec![];
    for i in 0..5 {
        // As libvirt does it: the domain's directory, then QEMU's socket.
        let vm_dir = guests.join(format!("domain-{i}-vm{i}"));
        std::fs::create_dir(&vm_dir).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let l = UnixListener::bind(vm_dir.join("org.qpid.vios.0")).unwrap();
        let t = Instant::now();
        let mut s = accept_within(&l, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("the host did not connect within 3 s; log:\n{}", host.log_text()));
        found.push(t.elapsed());
        // The domain ends: libvirt removes the directory; the host lets go
        // of the channel (its connection ends).
        std::fs::remove_dir_all(&vm_dir).unwrap();
        let t = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // the host's HELLO
            }
        }
        gone.push(t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(3), "the host kept the channel");
    }
    host.wait_log("is gone", 5, Duration::from_secs(1));
    let ms = |v: &[Duration]| v.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
    vios_tests::record_figure(&format!(
        "inotify: socket appears -> host connects {:?} ms; directory removed -> channel closed {:?} ms",
        ms(&found),
        ms(&gone)
    ));
    assert!(
        found.iter().all(|d| *d < Duration::from_millis(100)),
        "{:?}",
        ms(&found)
    );
    assert!(
        gone.iter().all(|d| *d < Duration::from_millis(100)),
        "{:?}",
        ms(&gone)
    );
}

#[test]
fn sighup_rescans_at_once() {
    use std::process::Command;
    use vios_tests::{bin, standin_at, Proc, TempDir};
    let dir = TempDir::new("sighup");
    let guests = dir.join("channels");
    std::fs::create_dir_all(guests.join("vm2")).unwrap();
    let host = Proc::spawn(
        "host-bridge",
        Command::new(bin("vios-host-bridge"))
            .arg("--guest-dir")
            .arg(&guests)
            .args([
                "--rescan",
                "1h",
                "--watch",
                "false",
                "--service",
                "echo=127.0.0.1:9",
            ]),
        dir.join("host.log"),
    );
    host.wait_log("watching", 1, Duration::from_secs(5));
    let _standin = standin_at(
        &guests.join("vm2/org.qpid.vios.0"),
        &dir.join("g.sock"),
        dir.join("standin.log"),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!host.log_text().contains("guest vm2 found"));
    host.signal("HUP");
    host.wait_log("guest vm2 found in", 1, Duration::from_secs(5));
    host.wait_log("channel unix:", 1, Duration::from_secs(5));
}
