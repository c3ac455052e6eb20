//! The bridge pair with a real guest: QEMU (TCG) booting a Debian kernel with
//! a busybox initramfs, a real virtio-serial port, `vios-guest-bridge` and
//! the statically linked test clients inside, RabbitMQ and test servers on
//! the host behind `vios-host-bridge`, which finds the guest through
//! `--guest-dir` laid out as libvirt lays it out.
//!
//! One guest life-cycle event per test (issue 3). The image comes from
//! `scripts/vm/build-image` (the test command builds it); without it these
//! tests print why and pass, unless `VIOS_REQUIRE_VM=1`.

use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vios_tests::servers::{Mode, Server};
use vios_tests::vm::{image_or_skip, json_line, json_num, Vm, VmSpec};
use vios_tests::{bin, Proc, TempDir};

/// TCG guests are CPU-bound: one test at a time.
static ONE_VM_TEST: Mutex<()> = Mutex::new(());

/// Every test's start: `None` (the reason printed) without a guest image,
/// else the lock that runs VM tests one at a time.
fn vm_test() -> Option<MutexGuard<'static, ()>> {
    image_or_skip()?;
    Some(ONE_VM_TEST.lock().unwrap_or_else(|e| e.into_inner()))
}

const IDLE: &str = "3s";
/// The guest bridge's listeners: AMQP, and echo and sink test services.
const GUEST_ARGS: &str =
    "--listen,127.0.0.1:5672=amqp,--listen,127.0.0.1:7000=echo,--listen,127.0.0.1:7001=sink,\
     --listen,127.0.0.1:7002=source,--idle-timeout,3s";

/// The host side: servers, a host bridge watching a libvirt-style channel
/// directory, and the broker when the test command started one.
struct Host {
    bridge: Option<Proc>,
    echo: Server,
    sink: Server,
    source: Server,
    broker_port: Option<u16>,
    starts: usize,
    /// Last, so logs outlive the processes for failure reports.
    dir: TempDir,
}

impl Host {
    fn start() -> Host {
        let mut h = Host::without_bridge();
        h.start_bridge();
        h
    }

    fn without_bridge() -> Host {
        let dir = TempDir::new("vm");
        std::fs::create_dir_all(dir.join("channels")).unwrap();
        let broker_port = std::env::var("VIOS_TEST_AMQP_PORT")
            .ok()
            .and_then(|p| p.parse().ok());
        Host {
            dir,
            echo: Server::start(Mode::Echo),
            sink: Server::start(Mode::Sink),
            source: Server::start(Mode::Source),
            bridge: None,
            broker_port,
            starts: 0,
        }
    }

    fn start_bridge(&mut self) {
        self.starts += 1;
        let mut cmd = Command::new(bin("vios-host-bridge"));
        cmd.arg("--guest-dir")
            .arg(self.dir.join("channels"))
            .args(["--rescan", "300ms", "--idle-timeout", IDLE])
            .args(["--service", &format!("echo={}", self.echo.addr)])
            .args(["--service", &format!("sink={}", self.sink.addr)])
            .args(["--service", &format!("source={}", self.source.addr)]);
        if let Some(p) = self.broker_port {
            cmd.args(["--service", &format!("amqp=127.0.0.1:{p}")]);
        }
        let p = Proc::spawn(
            "host-bridge",
            &mut cmd,
            self.dir.join(&format!("host{}.log", self.starts)),
        );
        p.wait_log("watching", 1, Duration::from_secs(5));
        self.bridge = Some(p);
    }

    fn bridge(&self) -> &Proc {
        self.bridge.as_ref().expect("host bridge running")
    }

    fn boot(&self, name: &str) -> Vm {
        let channels = self.dir.join("channels");
        let mut spec = VmSpec::new(name, &channels);
        spec.append = format!("vios.autostart=1 vios.args={GUEST_ARGS}");
        let t = Instant::now();
        let vm = Vm::boot(spec, self.dir.path());
        eprintln!("{name}: booted in {:.1} s", t.elapsed().as_secs_f64());
        vm
    }
}

/// Waits until the guest bridge has logged `needle` `count` times.
fn wait_guest_log(vm: &mut Vm, needle: &str, count: usize, timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        let log = vm.bridge_log();
        if log.matches(needle).count() >= count {
            return;
        }
        assert!(
            Instant::now() < end,
            "guest bridge: {needle:?} ×{count} not logged within {timeout:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Publishes and consumes `messages` AMQP messages from inside the guest;
/// returns the client's JSON report. Skips (returns None) without a broker.
fn amqp_in_guest(vm: &mut Vm, connections: usize, messages: usize, size: usize) -> Option<String> {
    if std::env::var_os("VIOS_TEST_AMQP_PORT").is_none() {
        assert!(
            std::env::var_os("VIOS_REQUIRE_BROKER").is_none(),
            "no broker: VIOS_TEST_AMQP_PORT unset"
        );
        eprintln!("SKIP (AMQP part): VIOS_TEST_AMQP_PORT is not set: no broker");
        return None;
    }
    let cmd = format!(
        "vios-amqp-client --addr 127.0.0.1:5672 --connections {connections} --messages {messages} --size {size} --timeout 240"
    );
    let out = vm.ok(&cmd, Duration::from_secs(300));
    let json = json_line(&out, "\"verified\"");
    assert_eq!(json_num(&json, "verified") as usize, messages, "{json}");
    Some(json)
}

/// Echoes random data of every size from inside the guest, verified byte by
/// byte; asserts that no stream failed and returns the report.
fn echo_in_guest(vm: &mut Vm, streams: usize, bytes: &str) -> String {
    let cmd = format!(
        "vios-load bulk --connect 127.0.0.1:7000 --streams {streams} --bytes {bytes} --direction both"
    );
    let out = vm.ok(&cmd, Duration::from_secs(300));
    let json = json_line(&out, "mb_per_s");
    assert_eq!(json_num(&json, "errors_total"), 0.0, "{json}");
    json
}

/// Starts `streams` long-lived echo streams in the guest, in the background.
fn hold_in_guest(vm: &mut Vm, streams: usize) {
    vm.ok(
        &format!(
            "(vios-load hold --connect 127.0.0.1:7000 --streams {streams} --seconds 600 --ready-file /tmp/hold.ready \
             </dev/null >/tmp/hold.json 2>/tmp/hold.err & echo $! >/tmp/hold.pid)"
        ),
        Duration::from_secs(10),
    );
    let end = Instant::now() + Duration::from_secs(30);
    while vm.run("test -e /tmp/hold.ready", Duration::from_secs(10)).1 != 0 {
        assert!(
            Instant::now() < end,
            "hold streams not established: {}",
            vm.run("cat /tmp/hold.err", Duration::from_secs(5)).0
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every connection the echo server saw ended in a reset, and none carried
/// more than the one byte each held stream sent: no byte of another session
/// was taken for data.
fn assert_held_streams_reset(echo: &Server, streams: usize) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let outcomes = echo.outcomes.lock().unwrap();
        let resets = outcomes
            .iter()
            .filter(|o| matches!(o.end, vios_tests::End::Reset(_)))
            .count();
        if resets >= streams {
            for o in outcomes.iter() {
                assert!(
                    o.bytes_in <= 1,
                    "a held stream carried {} bytes: {outcomes:?}",
                    o.bytes_in
                );
            }
            return;
        }
        assert!(
            Instant::now() < end,
            "expected {streams} resets at the service: {outcomes:?}"
        );
        drop(outcomes);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn guest_bridge_restart_cmd() -> String {
    let args = GUEST_ARGS.replace(',', " ");
    format!("(RUST_LOG=info vios-guest-bridge {args} </dev/null >>/tmp/guest-bridge.log 2>&1 & echo $! >/run/vios-guest-bridge.pid)")
}

#[test]
fn boot_serves_amqp_and_streams() {
    let Some(_one) = vm_test() else { return };
    let host = Host::start();
    let mut vm = host.boot("vm1");
    wait_guest_log(&mut vm, "session established", 1, Duration::from_secs(30));
    host.bridge()
        .wait_log("guest vm1 found in", 1, Duration::from_secs(5));
    if let Some(json) = amqp_in_guest(&mut vm, 4, 2000, 1024) {
        eprintln!("boot: AMQP from the guest: {json}");
    }
    let json = echo_in_guest(&mut vm, 8, "1M");
    eprintln!("boot: echo from the guest: {json}");
}

#[test]
fn guest_bridge_killed_and_restarted_inside_the_guest() {
    let Some(_one) = vm_test() else { return };
    let host = Host::start();
    let mut vm = host.boot("vm1");
    wait_guest_log(&mut vm, "session established", 1, Duration::from_secs(30));
    hold_in_guest(&mut vm, 4);
    vm.ok(
        "kill -9 $(cat /run/vios-guest-bridge.pid)",
        Duration::from_secs(10),
    );
    vm.ok(&guest_bridge_restart_cmd(), Duration::from_secs(10));
    // The host cannot see the old bridge die; the new one's HELLO tells it.
    host.bridge()
        .wait_log("session established", 2, Duration::from_secs(30));
    host.bridge()
        .wait_log("session ended: peer restarted", 1, Duration::from_secs(5));
    assert_held_streams_reset(&host.echo, 4);
    echo_in_guest(&mut vm, 4, "2M");
    amqp_in_guest(&mut vm, 2, 1000, 1024);
}

#[test]
fn guest_reboot_with_streams_open() {
    let Some(_one) = vm_test() else { return };
    let host = Host::start();
    let mut vm = host.boot("vm1");
    wait_guest_log(&mut vm, "session established", 1, Duration::from_secs(30));
    hold_in_guest(&mut vm, 4);
    let t = Instant::now();
    vm.reboot(Duration::from_secs(90));
    // The host notices within its idle timeout (or at once, from the new
    // guest bridge's HELLO) and resets every old stream at the service.
    assert_held_streams_reset(&host.echo, 4);
    let noticed = t.elapsed();
    eprintln!(
        "reboot: old streams reset {:.1} s after the reboot began",
        noticed.as_secs_f64()
    );
    assert!(noticed < Duration::from_secs(3 + 10), "took {noticed:?}");
    wait_guest_log(&mut vm, "session established", 1, Duration::from_secs(30));
    echo_in_guest(&mut vm, 4, "1M");
    amqp_in_guest(&mut vm, 2, 1000, 1024);
}

#[test]
fn host_bridge_killed_and_restarted_while_the_guest_runs() {
    let Some(_one) = vm_test() else { return };
    let mut host = Host::start();
    let mut vm = host.boot("vm1");
    wait_guest_log(&mut vm, "session established", 1, Duration::from_secs(30));
    hold_in_guest(&mut vm, 4);
    host.bridge.as_mut().unwrap().kill();
    // The service sees resets (the host bridge's sockets abort on close).
    assert_held_streams_reset(&host.echo, 4);
    // The guest's clients see resets; the guest bridge is not restarted.
    vm.run("kill -TERM $(cat /tmp/hold.pid)", Duration::from_secs(10));
    let hold = vm.run("sleep 1; cat /tmp/hold.json", Duration::from_secs(20)).0;
    assert!(hold.contains("\"ok\":false"), "held streams must fail: {hold}");
    host.start_bridge();
    wait_guest_log(&mut vm, "session established", 2, Duration::from_secs(30));
    echo_in_guest(&mut vm, 4, "1M");
    let log = vm.bridge_log();
    assert_eq!(
        log.matches("listening on 127.0.0.1:5672").count(),
        1,
        "guest bridge restarted?\n{log}"
    );
}

#[test]
fn qemu_killed_and_started_again_on_the_same_socket_path() {
    let Some(_one) = vm_test() else { return };
    let host = Host::start();
    let channels = host.dir.join("channels");
    let boot = |id| {
        let mut spec = VmSpec::new("vm1", &channels);
        spec.append = format!("vios.autostart=1 vios.args={GUEST_ARGS}");
        spec.id = Some(id);
        Vm::boot(spec, host.dir.path())
    };
    let mut vm = boot(40);
    wait_guest_log(&mut vm, "session established", 1, Duration::from_secs(30));
    let socket = vm.port_socket(0);
    hold_in_guest(&mut vm, 2);
    drop(vm); // QEMU is killed
    assert_held_streams_reset(&host.echo, 2);
    host.bridge()
        .wait_log("lost: end of file", 1, Duration::from_secs(10));
    let mut vm = boot(40);
    assert_eq!(vm.port_socket(0), socket, "same socket path");
    wait_guest_log(&mut vm, "session established", 1, Duration::from_secs(30));
    host.bridge()
        .wait_log("session established", 2, Duration::from_secs(10));
    echo_in_guest(&mut vm, 2, "1M");
}

#[test]
fn two_guests_one_busy_one_stopped() {
    let Some(_one) = vm_test() else { return };
    let host = Host::start();
    let mut a = host.boot("vma");
    let mut b = host.boot("vmb");
    wait_guest_log(&mut a, "session established", 1, Duration::from_secs(30));
    wait_guest_log(&mut b, "session established", 1, Duration::from_secs(30));
    // Guest A floods its channel towards the sink; meanwhile B's traffic
    // proceeds and is verified.
    a.ok(
        "(vios-load bulk --connect 127.0.0.1:7001 --streams 4 --bytes 2G --direction up --no-verify --timeout 600s \
         </dev/null >/tmp/flood.json 2>&1 & echo $! >/tmp/flood.pid)",
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_secs(2));
    let json = echo_in_guest(&mut b, 4, "1M");
    eprintln!("two guests: B's echo beside A's flood: {json}");
    amqp_in_guest(&mut b, 2, 1000, 1024);
    let sunk = host.sink.outcomes.lock().unwrap().len();
    assert_eq!(sunk, 0, "A's flood streams are still running");
    // Stopping A resets its streams only; B goes on.
    drop(a);
    let end = Instant::now() + Duration::from_secs(20);
    while host.sink.outcomes.lock().unwrap().len() < 4 {
        assert!(Instant::now() < end, "A's streams were not reset");
        std::thread::sleep(Duration::from_millis(100));
    }
    echo_in_guest(&mut b, 4, "1M");
    let log = b.bridge_log();
    assert_eq!(
        log.matches("session established").count(),
        1,
        "B's session was disturbed:\n{log}"
    );
}

#[test]
fn guest_started_after_the_host_bridge_then_removed() {
    let Some(_one) = vm_test() else { return };
    let host = Host::start();
    std::thread::sleep(Duration::from_millis(500));
    let mut vm = host.boot("late");
    host.bridge()
        .wait_log("guest late found in", 1, Duration::from_secs(10));
    wait_guest_log(&mut vm, "session established", 1, Duration::from_secs(30));
    hold_in_guest(&mut vm, 2);
    // libvirt removes the guest's channel directory when the VM stops.
    let dir = vm.guest_dir.clone();
    drop(vm);
    std::fs::remove_dir_all(&dir).unwrap();
    host.bridge()
        .wait_log("guest late is gone", 1, Duration::from_secs(10));
    assert_held_streams_reset(&host.echo, 2);
    host.bridge()
        .wait_log("guest late: stopped", 1, Duration::from_secs(10));
}

/// The raw port (plain writes and reads on the device, the host side read
/// and written by the test itself) beside guest clients through the bridge,
/// measured the same way on the same guest.
#[test]
fn figures_raw_port_and_through_the_bridge() {
    use std::io::{Read, Write};
    let Some(_one) = vm_test() else { return };
    let mut host = Host::without_bridge();
    let channels = host.dir.join("channels");
    let mut vm = Vm::boot(VmSpec::new("vm1", &channels), host.dir.path());
    let port = "/dev/virtio-ports/org.qpid.vios.0";
    const RAW: usize = 256 << 20;

    // Guest -> host: dd of 64 KiB writes; the test reads the host socket.
    let mut sock = std::os::unix::net::UnixStream::connect(vm.port_socket(0)).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let (mut n, mut first) = (0usize, None);
        while n < RAW {
            let k = sock.read(&mut buf).unwrap();
            assert!(k > 0, "port closed after {n} bytes");
            first.get_or_insert_with(Instant::now);
            n += k;
        }
        (first.unwrap().elapsed(), sock)
    });
    vm.ok(
        &format!(
            "dd if=/dev/zero of={port} bs=64k count={} 2>/dev/null",
            RAW / 65536
        ),
        Duration::from_secs(120),
    );
    let (took, mut sock) = reader.join().unwrap();
    let raw_up = RAW as f64 / took.as_secs_f64() / 1e6;

    // Host -> guest: the test writes; the guest reads with dd (the device
    // returns at most 4 KiB per read).
    let writer = std::thread::spawn(move || {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..RAW >> 20 {
            sock.write_all(&chunk).unwrap();
        }
        sock
    });
    let t = Instant::now();
    let out = vm.ok(
        &format!(
            "dd if={port} of=/dev/null bs=64k iflag=fullblock count={}",
            RAW / 65536
        ),
        Duration::from_secs(120),
    );
    let raw_down = RAW as f64 / t.elapsed().as_secs_f64() / 1e6;
    assert!(
        out.contains(&format!("{}+0 records in", RAW / 65536)),
        "dd read short: {out}"
    );
    drop(writer.join().unwrap());

    // Through the bridge: the host bridge takes over the channel.
    host.start_bridge();
    vm.ok(&guest_bridge_restart_cmd(), Duration::from_secs(10));
    wait_guest_log(&mut vm, "session established", 1, Duration::from_secs(30));
    let bulk = |vm: &mut Vm, port: u16, dir: &str| {
        let cmd = format!(
            "vios-load bulk --connect 127.0.0.1:{port} --streams 1 --bytes 256M --direction {dir} --no-verify"
        );
        json_num(
            &json_line(&vm.ok(&cmd, Duration::from_secs(180)), "mb_per_s"),
            "mb_per_s",
        )
    };
    let up = bulk(&mut vm, 7001, "up");
    let down = bulk(&mut vm, 7002, "down");
    vios_tests::record_figure(&format!(
        "VM (TCG) raw virtio-serial port: {raw_up:.0} MB/s guest->host (64 KiB writes), {raw_down:.0} MB/s host->guest"
    ));
    vios_tests::record_figure(&format!(
        "VM (TCG) one stream through both bridges: {up:.0} MB/s guest->host ({:.0}% of raw), {down:.0} MB/s host->guest ({:.0}% of raw)",
        100.0 * up / raw_up,
        100.0 * down / raw_down
    ));
    // A round trip from inside the guest, alone and beside a bulk stream
    // on the same channel (the head-of-line case of issue 11).
    let rtt = |vm: &mut Vm| {
        let out = vm.ok(
            "vios-load rtt --connect 127.0.0.1:7000 --count 2000 --warmup 200 --size 64",
            Duration::from_secs(120),
        );
        let us = json_line(&out, "\"us\"");
        let us = us.split("\"us\":").nth(1).unwrap_or_default().to_owned();
        (json_num(&us, "p50"), json_num(&us, "p99"))
    };
    let (idle50, idle99) = rtt(&mut vm);
    vm.ok(
        "(vios-load bulk --connect 127.0.0.1:7001 --streams 1 --bytes 64G --direction up --no-verify \
         --timeout 60s >/tmp/bg.json 2>/tmp/bg.log </dev/null & echo $! >/tmp/bg.pid)",
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_secs(1));
    let (busy50, busy99) = rtt(&mut vm);
    let bg = vm.ok(
        "kill -INT $(cat /tmp/bg.pid); sleep 1; cat /tmp/bg.json",
        Duration::from_secs(20),
    );
    let bg_mb = json_num(&json_line(&bg, "mb_per_s"), "mb_per_s");
    assert!(
        bg_mb > 0.0,
        "the bulk stream did not run beside the round trips: {bg}"
    );
    vios_tests::record_figure(&format!(
        "VM (TCG) round trip from the guest through both bridges: p50 {idle50:.0} us, p99 {idle99:.0} us alone; \
         p50 {busy50:.0} us, p99 {busy99:.0} us beside a bulk stream (which moved {bg_mb:.0} MB/s meanwhile)"
    ));
    if let Some(json) = amqp_in_guest(&mut vm, 8, 10_000, 1024) {
        let rate = json_num(&json, "msgs_per_sec");
        let mb = json_num(&json, "mb_per_sec");
        vios_tests::record_figure(&format!("VM (TCG) AMQP from the guest, 8 connections x 10000 messages (0-1 KiB): {rate:.0} msg/s, {mb:.1} MB/s"));
    }
    if let Some(json) = amqp_in_guest(&mut vm, 4, 2000, 65536) {
        let rate = json_num(&json, "msgs_per_sec");
        let mb = json_num(&json, "mb_per_sec");
        vios_tests::record_figure(&format!("VM (TCG) AMQP from the guest, 4 connections x 2000 messages (0-64 KiB): {rate:.0} msg/s, {mb:.1} MB/s"));
    }
}
