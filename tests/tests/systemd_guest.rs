//! The shipped boot path in a real systemd guest (issue 10): a Debian 12
//! guest with systemd as PID 1 and udev, no NIC, under QEMU (TCG); the guest
//! package installed with `dpkg -i` inside it, as an operator would; then
//! udev and systemd, not the test, start and supervise the guest bridge.
//!
//! One guest, one test, in steps (a boot costs ~20 s under TCG): install,
//! reboot, the unit at boot as its unprivileged user, clients of an
//! unprivileged guest user over TCP and unix listeners, the journal's
//! priorities, hot-plug and unplug of a second port, `kill -9`, a
//! SIGSTOPped bridge caught by the watchdog, and the optional socket unit.
//!
//! The image comes from `scripts/vm/build-systemd-image` (the test command
//! builds it); without it this test prints why and passes, unless
//! `VIOS_REQUIRE_VM=1`.

use std::process::Command;
use std::time::{Duration, Instant};

use vios_tests::servers::{Mode, Server};
use vios_tests::systemd_vm::{image_or_skip, Image, SystemdVm};
use vios_tests::vm::{json_line, json_num};
use vios_tests::{bin, Proc, TempDir};

const UNIT0: &str = "vios-guest-bridge@org.qpid.vios.0.service";
const UNIT1: &str = "vios-guest-bridge@org.qpid.vios.1.service";
/// Port 0's optional socket unit.
const SOCKET0: &str = "vios-guest-bridge@org.qpid.vios.0.socket";
/// A port with no configuration of its own.
const UNIT2: &str = "vios-guest-bridge@org.qpid.vios.2.service";
/// The watchdog of the test's drop-in (the package ships 30 s).
const WATCHDOG: &str = "6s";

/// Port 0's listeners: AMQP and echo on TCP, echo on a unix socket; the
/// hot-plugged port 1 has listeners of its own (AMQP and echo); port 2 has
/// none: the shipped defaults give the default listener to port 0 only. The drop-in's WatchdogSec
/// is [`WATCHDOG`].
const CONFIG: &str = r#"cat >/etc/default/vios-guest-bridge.org.qpid.vios.0 <<'EOF'
VIOS_LISTEN="127.0.0.1:5672=amqp;127.0.0.1:7000=echo;unix:/run/vios/echo.sock=echo"
VIOS_IDLE_TIMEOUT=3s
EOF
cat >/etc/default/vios-guest-bridge.org.qpid.vios.1 <<'EOF'
VIOS_LISTEN="127.0.0.1:5673=amqp;127.0.0.1:7100=echo"
VIOS_IDLE_TIMEOUT=3s
EOF
mkdir -p /etc/systemd/system/vios-guest-bridge@.service.d
cat >/etc/systemd/system/vios-guest-bridge@.service.d/test.conf <<'EOF'
[Service]
WatchdogSec=6s
EOF"#;

/// The host side: an echo server, the broker when the test command started
/// one, and a host bridge watching the guest directories.
struct Host {
    bridge: Option<Proc>,
    echo: Server,
    broker_port: Option<u16>,
    starts: usize,
    /// Last, so logs outlive the processes for failure reports.
    dir: TempDir,
}

impl Host {
    fn start() -> Host {
        let dir = TempDir::new("sdvm");
        std::fs::create_dir_all(dir.join("channels")).unwrap();
        let broker_port = std::env::var("VIOS_TEST_AMQP_PORT")
            .ok()
            .and_then(|p| p.parse().ok());
        let mut h = Host {
            bridge: None,
            echo: Server::start(Mode::Echo),
            broker_port,
            starts: 0,
            dir,
        };
        h.start_bridge();
        h
    }

    fn start_bridge(&mut self) {
        self.starts += 1;
        let mut cmd = Command::new(bin("vios-host-bridge"));
        cmd.arg("--guest-dir")
            .arg(self.dir.join("channels"))
            .arg("--control")
            .arg(self.dir.join("host.sock"))
            .args(["--rescan", "300ms", "--idle-timeout", "3s"])
            .args(["--service", &format!("echo={}", self.echo.addr)]);
        if let Some(p) = self.broker_port {
            cmd.args(["--service", &format!("amqp=127.0.0.1:{p},loopback=ok")]);
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

    fn sessions(&self) -> usize {
        self.bridge().log_text().matches("session established").count()
    }
}

/// Prints a step's evidence.
fn show(what: &str, out: &str) {
    eprintln!(
        "systemd guest: {what}:\n    {}",
        out.trim().replace('\n', "\n    ")
    );
}

fn main_pid(vm: &mut SystemdVm, unit: &str) -> u32 {
    let out = vm.ok(
        &format!("systemctl show -p MainPID --value {unit}"),
        Duration::from_secs(10),
    );
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("MainPID of {unit}: {out:?}"))
}

/// Waits until `unit` is active (for `Type=notify`: it sent READY=1) with a
/// main process other than `old`; returns its pid.
fn wait_active(vm: &mut SystemdVm, unit: &str, old: u32, timeout: Duration) -> u32 {
    vm.wait_until(
        &format!(
            "[ \"$(systemctl is-active {unit})\" = active ] && \
             p=$(systemctl show -p MainPID --value {unit}) && [ \"$p\" != 0 ] && [ \"$p\" != {old} ]"
        ),
        timeout,
    );
    main_pid(vm, unit)
}

/// Echo through the guest bridge as the unprivileged user vios-client,
/// verified byte by byte.
fn echo_as_client(vm: &mut SystemdVm, target: &str) -> String {
    let out = vm.ok(
        &format!(
            "runuser -u vios-client -- vios-load bulk --connect {target} --streams 2 --bytes 512K \
             --direction both --timeout 60s </dev/null"
        ),
        Duration::from_secs(90),
    );
    let json = json_line(&out, "mb_per_s");
    assert_eq!(json_num(&json, "errors_total"), 0.0, "{target}: {json}");
    json
}

/// AMQP from the guest as vios-client; skipped (None) without a broker.
fn amqp_as_client(vm: &mut SystemdVm, addr: &str) -> Option<String> {
    if std::env::var_os("VIOS_TEST_AMQP_PORT").is_none() {
        assert!(
            std::env::var_os("VIOS_REQUIRE_BROKER").is_none(),
            "no broker: VIOS_TEST_AMQP_PORT unset"
        );
        eprintln!("SKIP (AMQP part): VIOS_TEST_AMQP_PORT is not set: no broker");
        return None;
    }
    let out = vm.ok(
        &format!(
            "runuser -u vios-client -- vios-amqp-client --addr {addr} --connections 2 \
             --messages 400 --size 1024 --timeout 120 </dev/null"
        ),
        Duration::from_secs(150),
    );
    let json = json_line(&out, "\"verified\"");
    assert_eq!(json_num(&json, "verified"), 400.0, "{json}");
    Some(json)
}

/// Traffic through port 0 after a (re)start: TCP and unix echo, and AMQP.
fn traffic(vm: &mut SystemdVm, when: &str) {
    let tcp = echo_as_client(vm, "127.0.0.1:7000");
    let unix = echo_as_client(vm, "unix:/run/vios/echo.sock");
    eprintln!("systemd guest: {when}: echo as vios-client over TCP {tcp}");
    eprintln!("systemd guest: {when}: echo as vios-client over unix {unix}");
    if let Some(json) = amqp_as_client(vm, "127.0.0.1:5672") {
        eprintln!("systemd guest: {when}: AMQP as vios-client over TCP {json}");
    }
}

#[test]
fn packaged_guest_bridge_under_systemd_and_udev() {
    let Some(image) = image_or_skip() else { return };
    let started = Instant::now();
    let mut host = Host::start();
    let channels = host.dir.join("channels");
    let t = Instant::now();
    let mut vm = SystemdVm::boot(&image, "sd1", &channels, host.dir.path());
    eprintln!(
        "systemd guest: booted to the console in {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        image.info.lines().next().unwrap_or_default()
    );

    // The premise: systemd is PID 1, udev runs, there is no network device
    // but lo, and the port is there.
    let premise = vm.ok(
        "cat /proc/1/comm; systemctl is-active systemd-udevd; ls /sys/class/net; \
         readlink -f /dev/virtio-ports/org.qpid.vios.0",
        Duration::from_secs(20),
    );
    let lines: Vec<&str> = premise.lines().map(str::trim).collect();
    assert!(
        lines.len() == 4
            && lines[..3] == ["systemd", "active", "lo"]
            && lines[3].starts_with("/dev/vport")
            && lines[3].ends_with("p1"),
        "systemd as PID 1, udev, no NIC, the port: {premise}"
    );

    // Install as an operator would. The per-port configuration and the
    // test's watchdog drop-in are there first (the package starts the unit
    // for ports already present).
    vm.ok(CONFIG, Duration::from_secs(10));
    dpkg_install(&mut vm, &image.deb);
    let id = vm.ok("id vios-bridge", Duration::from_secs(10));
    show("id vios-bridge", &id);
    wait_active(&mut vm, UNIT0, 0, Duration::from_secs(60));
    host.bridge()
        .wait_log("session established", 1, Duration::from_secs(30));

    // Reboot: from now on only udev and systemd start the bridge.
    let t = Instant::now();
    vm.reboot(Duration::from_secs(240));
    eprintln!("systemd guest: rebooted in {:.1} s", t.elapsed().as_secs_f64());
    let pid = wait_active(&mut vm, UNIT0, 0, Duration::from_secs(60));
    let how = vm.ok(
        &format!(
            "systemctl is-active {UNIT0}; systemctl is-enabled {UNIT0} || true; \
             systemctl show -p WantedBy -p User -p WatchdogUSec -p NRestarts {UNIT0}; \
             udevadm info -q property /dev/virtio-ports/org.qpid.vios.0 | grep -E '^(SYSTEMD_WANTS|DEVNAME)='; \
             ps -o user:20=,group:20=,pid=,args= -p {pid}; grep -E '^(Uid|Gid|CapEff|CapPrm):' /proc/{pid}/status; \
             stat -L -c '%U:%G %a %n' /dev/virtio-ports/org.qpid.vios.0 /run/vios/echo.sock"
        ),
        Duration::from_secs(20),
    );
    show("at boot", &how);
    assert!(how.starts_with("active\n"), "{how}");
    let wanted_by = how
        .lines()
        .find(|l| l.starts_with("WantedBy="))
        .unwrap_or_default();
    assert!(
        wanted_by.contains(".device"),
        "udev's device unit wants the instance: {how}"
    );
    assert!(
        how.contains("SYSTEMD_WANTS=vios-guest-bridge@org.qpid.vios.0.service"),
        "{how}"
    );
    let ps = how
        .lines()
        .find(|l| l.contains("/usr/sbin/vios-guest-bridge"))
        .unwrap_or_else(|| panic!("no ps line for {pid}: {how}"));
    let ps: Vec<&str> = ps.split_whitespace().collect();
    assert_eq!(ps[..2], ["vios-bridge", "vios-bridge"], "{ps:?}");
    assert!(how.contains("CapEff:\t0000000000000000"), "{how}");
    assert!(
        how.contains("root:vios-bridge 660 /dev/virtio-ports/org.qpid.vios.0"),
        "{how}"
    );
    host.bridge()
        .wait_log("session established", 2, Duration::from_secs(30));

    // What the package installed, the units as this systemd reads them, and
    // the running instance's exposure.
    let files = vm.ok(
        "dpkg -L vios-guest-bridge | grep -E 'sbin/|systemd/system/|rules.d/|tmpfiles.d/|man8/' | sort",
        Duration::from_secs(20),
    );
    show("dpkg -L vios-guest-bridge (selected)", &files);
    for f in [
        "/usr/sbin/vios-guest-bridge",
        "/lib/systemd/system/vios-guest-bridge@.service",
        "/lib/udev/rules.d/90-vios-guest-bridge.rules",
    ] {
        assert!(files.lines().any(|l| l.trim() == f), "{f} not installed: {files}");
    }
    let verify = vm.ok(
        &format!("systemd-analyze verify --man=no {UNIT0} 2>&1"),
        Duration::from_secs(60),
    );
    show(&format!("systemd-analyze verify {UNIT0}"), &verify);
    let security = vm.ok(
        &format!("systemd-analyze security --no-pager {UNIT0} | tail -n 1"),
        Duration::from_secs(60),
    );
    show("systemd-analyze security (the running instance)", &security);

    // Clients of an unprivileged user, over TCP and the unix listener.
    show(
        "client user",
        &vm.ok("runuser -u vios-client -- id", Duration::from_secs(10)),
    );
    traffic(&mut vm, "at boot");

    // The journal: the daemon's lines carry their priorities. A host bridge
    // restart makes the guest bridge warn ("host disconnected").
    host.bridge.as_mut().unwrap().kill();
    std::thread::sleep(Duration::from_secs(2));
    host.start_bridge();
    vm.wait_until(
        &format!("journalctl -b -q -p warning -u {UNIT0} -o cat | grep -q 'host disconnected'"),
        Duration::from_secs(30),
    );
    host.bridge()
        .wait_log("session established", 1, Duration::from_secs(30));
    let warnings = vm.ok(
        &format!("journalctl -b -q -p warning -u {UNIT0} --no-pager"),
        Duration::from_secs(20),
    );
    show(&format!("journalctl -b -p warning -u {UNIT0}"), &warnings);
    let info = vm.ok(
        &format!("journalctl -b -q -p info -u {UNIT0} -o cat --no-pager"),
        Duration::from_secs(20),
    );
    let priorities = vm.ok(
        &format!(
            "journalctl -b -q _SYSTEMD_UNIT={UNIT0} -o export | \
             grep -a '^PRIORITY=' | sort | uniq -c"
        ),
        Duration::from_secs(20),
    );
    show("the daemon's lines by PRIORITY", &priorities);
    assert!(warnings.contains("host disconnected"), "{warnings}");
    for info_line in ["session established", "listening on"] {
        assert!(info.contains(info_line), "no {info_line:?} at info: {info}");
        assert!(
            !warnings.contains(info_line),
            "{info_line:?} (info) shown at -p warning: {warnings}"
        );
    }
    assert!(priorities.contains("PRIORITY=4"), "{priorities}");
    assert!(priorities.contains("PRIORITY=6"), "{priorities}");
    for l in info.lines() {
        let l = l.trim_start();
        assert!(
            !(l.starts_with('<') || (l.starts_with("20") && l.chars().nth(4) == Some('-'))),
            "a priority prefix or a timestamp of the daemon's own reached the journal: {l}"
        );
    }

    // Hot-plug: a second port appears at run time; udev starts a second
    // instance; unplugging it stops that instance only.
    let sessions = host.sessions();
    vm.add_port(1);
    let pid1 = wait_active(&mut vm, UNIT1, 0, Duration::from_secs(60));
    host.bridge()
        .wait_log("session established", sessions + 1, Duration::from_secs(30));
    let units = vm.ok(
        "systemctl list-units --no-legend --plain 'vios-guest-bridge@*'",
        Duration::from_secs(20),
    );
    show("after device_add (org.qpid.vios.1)", &units);
    assert!(units.contains(UNIT0) && units.contains(UNIT1), "{units}");
    let user1 = vm.ok(&format!("ps -o user:20= -p {pid1}"), Duration::from_secs(10));
    assert_eq!(user1.trim(), "vios-bridge");
    let json = echo_as_client(&mut vm, "127.0.0.1:7100");
    eprintln!("systemd guest: echo as vios-client through the hot-plugged port: {json}");
    if let Some(json) = amqp_as_client(&mut vm, "127.0.0.1:5673") {
        eprintln!("systemd guest: AMQP as vios-client through the hot-plugged port: {json}");
    }
    vm.remove_port(1);
    vm.wait_until(
        &format!("s=$(systemctl is-active {UNIT1}); [ \"$s\" = inactive ] || [ \"$s\" = failed ]"),
        Duration::from_secs(30),
    );
    let units = vm.ok(
        &format!(
            "systemctl is-active {UNIT1} || true; \
             systemctl list-units --all --no-legend --plain 'vios-guest-bridge@*'; ls /dev/virtio-ports"
        ),
        Duration::from_secs(20),
    );
    show("after device_del (org.qpid.vios.1)", &units);
    assert!(units.starts_with("inactive\n"), "stopped, not failed: {units}");
    assert!(
        !units.lines().any(|l| l.trim() == "org.qpid.vios.1"),
        "the port is gone: {units}"
    );
    // A port nobody configured: with the shipped defaults its instance says
    // why it has nothing to do and stops cleanly; systemd does not restart it.
    vm.add_port(2);
    vm.wait_until(
        &format!("journalctl -b -q -o cat -u {UNIT2} | grep -q 'has no listeners'"),
        Duration::from_secs(60),
    );
    vm.wait_until(
        &format!("[ \"$(systemctl is-active {UNIT2})\" = inactive ]"),
        Duration::from_secs(30),
    );
    // RestartSec is 2 s: a restart would have come by now.
    std::thread::sleep(Duration::from_secs(3));
    let state = vm.ok(
        &format!(
            "systemctl is-active {UNIT2} || true; \
             systemctl show -p NRestarts -p Result -p ExecMainStatus {UNIT2}; \
             journalctl -b -q -o cat -u {UNIT2} | grep 'has no listeners'"
        ),
        Duration::from_secs(20),
    );
    show("org.qpid.vios.2 plugged with no configuration of its own", &state);
    assert!(state.starts_with("inactive\n"), "{state}");
    for want in ["NRestarts=0", "Result=success", "ExecMainStatus=0"] {
        assert!(state.contains(want), "{want}: {state}");
    }
    vm.remove_port(2);

    let pid0 = main_pid(&mut vm, UNIT0);
    assert_eq!(pid0, pid, "port 0's bridge was disturbed by the hot-plug");

    // kill -9: systemd restarts the bridge; traffic resumes.
    let sessions = host.sessions();
    vm.ok(&format!("kill -9 {pid0}"), Duration::from_secs(10));
    let t = Instant::now();
    let pid = wait_active(&mut vm, UNIT0, pid0, Duration::from_secs(60));
    eprintln!(
        "systemd guest: kill -9 {pid0}: active again as pid {pid} after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    host.bridge()
        .wait_log("session established", sessions + 1, Duration::from_secs(30));
    let evidence = vm.ok(
        &format!(
            "systemctl show -p NRestarts -p MainPID {UNIT0}; \
             journalctl -b -q -o cat _PID=1 UNIT={UNIT0} | grep -E 'status=9/KILL|Scheduled restart|Failed with result'"
        ),
        Duration::from_secs(20),
    );
    show("after kill -9", &evidence);
    assert!(evidence.contains("NRestarts=1"), "{evidence}");
    traffic(&mut vm, "after kill -9");

    // The watchdog: a bridge alive past WatchdogSec is not restarted (it
    // sends WATCHDOG=1); a SIGSTOPped one is.
    std::thread::sleep(Duration::from_secs(8));
    let alive = vm.ok(
        &format!("systemctl show -p WatchdogUSec -p NRestarts -p MainPID {UNIT0}"),
        Duration::from_secs(10),
    );
    show(&format!("{WATCHDOG} watchdog, 8 s later"), &alive);
    assert!(alive.contains(&format!("WatchdogUSec={WATCHDOG}")), "{alive}");
    assert!(alive.contains("NRestarts=1"), "{alive}");
    assert!(alive.contains(&format!("MainPID={pid}")), "{alive}");
    let sessions = host.sessions();
    vm.ok(&format!("kill -STOP {pid}"), Duration::from_secs(10));
    let t = Instant::now();
    let stopped = pid;
    let pid = wait_active(&mut vm, UNIT0, stopped, Duration::from_secs(60));
    eprintln!(
        "systemd guest: kill -STOP {stopped}: active again as pid {pid} after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    host.bridge()
        .wait_log("session established", sessions + 1, Duration::from_secs(30));
    let evidence = vm.ok(
        &format!(
            "systemctl show -p NRestarts {UNIT0}; \
             journalctl -b -q -o cat _PID=1 UNIT={UNIT0} | grep -iE 'watchdog'"
        ),
        Duration::from_secs(20),
    );
    show("after kill -STOP", &evidence);
    assert!(evidence.contains("NRestarts=2"), "{evidence}");
    assert!(evidence.contains("Watchdog timeout"), "{evidence}");
    traffic(&mut vm, "after the watchdog");

    socket_unit_holds_the_listeners(&mut vm, &host);
    host_unit_under_systemd(&mut vm, &image);

    eprintln!(
        "systemd guest: the whole test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The optional socket unit, as OPERATIONS.md tells an operator to use it:
/// a drop-in names port 0's echo listeners (its AMQP listener stays the
/// bridge's own). With the bridge stopped, a client's connection starts it
/// and is served; a client that connects while it restarts waits in the
/// backlog and is served by the new bridge.
fn socket_unit_holds_the_listeners(vm: &mut SystemdVm, host: &Host) {
    let how = vm.ok(
        &format!(
            "mkdir -p /etc/systemd/system/{SOCKET0}.d && \
             printf '[Socket]\\nListenStream=\\nListenStream=127.0.0.1:7000\\nListenStream=/run/vios/echo.sock\\nSocketMode=0666\\n' \
               >/etc/systemd/system/{SOCKET0}.d/listeners.conf && \
             systemctl daemon-reload && systemctl stop {UNIT0} && systemctl start {SOCKET0} && \
             systemctl is-active {SOCKET0}; systemctl is-active {UNIT0} || true"
        ),
        Duration::from_secs(30),
    );
    show("socket unit started, bridge stopped", &how);
    assert_eq!(how.lines().collect::<Vec<_>>(), ["active", "inactive"], "{how}");
    let sessions = host.sessions();
    let json = echo_as_client(vm, "127.0.0.1:7000");
    eprintln!("systemd guest: the first client, through the socket unit: {json}");
    host.bridge()
        .wait_log("session established", sessions + 1, Duration::from_secs(30));
    let pid = main_pid(vm, UNIT0);
    let said = vm.ok(
        &format!(
            "systemctl show -p TriggeredBy {UNIT0}; \
             journalctl -b -q -o cat _PID={pid} | grep 'listening on'"
        ),
        Duration::from_secs(20),
    );
    show("the bridge the socket unit started", &said);
    for want in [
        format!("TriggeredBy={SOCKET0}"),
        "listening on 127.0.0.1:7000 for service echo (socket passed by systemd)".into(),
        "listening on unix:/run/vios/echo.sock for service echo (socket passed by systemd)".into(),
        "listening on 127.0.0.1:5672 for service amqp\n".into(),
    ] {
        assert!(said.contains(&want), "{want:?}: {said}");
    }
    // A restart: the client connects while the old bridge stops (it no
    // longer accepts) or before the new one runs; it is served all the same.
    let sessions = host.sessions();
    let out = vm.ok(
        &format!(
            "systemctl restart --no-block {UNIT0}; sleep 0.2; \
             runuser -u vios-client -- vios-load bulk --connect unix:/run/vios/echo.sock --streams 1 \
               --bytes 64K --direction both --timeout 60s </dev/null"
        ),
        Duration::from_secs(90),
    );
    let json = json_line(&out, "mb_per_s");
    assert_eq!(json_num(&json, "errors_total"), 0.0, "{json}");
    let new = wait_active(vm, UNIT0, pid, Duration::from_secs(60));
    eprintln!("systemd guest: a client during a restart (pid {pid} -> {new}): {json}");
    // The premise: the old bridge was stopping, and the new one served it.
    let said = vm.ok(
        &format!(
            "journalctl -b -q -o cat _PID={pid} | grep -E 'stopping|opened for client unix'; \
             echo --; journalctl -b -q -o cat _PID={new} | grep 'opened for client unix'"
        ),
        Duration::from_secs(20),
    );
    show("the stopping bridge, then the new one", &said);
    let (old_said, new_said) = said.split_once("--").unwrap();
    assert!(
        old_said.contains("stopping") && !old_said.contains("opened for client unix"),
        "{said}"
    );
    assert!(
        new_said.contains("opened for client unix:/run/vios/echo.sock"),
        "{said}"
    );
    host.bridge()
        .wait_log("session established", sessions + 1, Duration::from_secs(30));
    traffic(vm, "under the socket unit");
}

/// `dpkg -i` of a package the image holds in /root/vios, as an operator
/// would; shows what dpkg said and how long it took.
fn dpkg_install(vm: &mut SystemdVm, deb: &str) {
    let t = Instant::now();
    let said = vm.ok(
        &format!(
            "(DEBIAN_FRONTEND=noninteractive dpkg -i /root/vios/{deb} </dev/null >/tmp/dpkg.log 2>&1; rc=$?; \
             tr '\\r' '\\n' </tmp/dpkg.log | grep -v '^(Reading database'; exit $rc)"
        ),
        Duration::from_secs(180),
    );
    show(
        &format!("dpkg -i {deb} ({:.1} s)", t.elapsed().as_secs_f64()),
        &said,
    );
}

const HOST_UNIT: &str = "vios-host-bridge.service";

/// The host package under the same booted systemd (this machine cannot boot
/// one of its own): installed with `dpkg -i`, the unit is started by the
/// maintainer script and becomes active only once the daemon says READY=1;
/// it runs as vios-bridge without capabilities, reports STATUS=, answers
/// `status` and `systemctl reload`; the generator turns the configured
/// services into the unit's IPAddressAllow=; a configuration error stops it
/// with status 2 and no restarts.
fn host_unit_under_systemd(vm: &mut SystemdVm, image: &Image) {
    let Some(deb) = &image.host_deb else {
        assert!(
            std::env::var_os("VIOS_REQUIRE_VM").is_none(),
            "the systemd image has no host package (built with --deb alone)"
        );
        eprintln!("SKIP (host unit): the systemd image has no host package");
        return;
    };
    dpkg_install(vm, deb);
    let pid = wait_active(vm, HOST_UNIT, 0, Duration::from_secs(60));
    let how = vm.ok(
        &format!(
            "systemctl show -p Type -p User -p NRestarts -p StatusText -p IPAddressDeny -p IPAddressAllow {HOST_UNIT}; \
             ps -o user:20=,group:20= -p {pid}; grep -E '^(CapEff|Groups):' /proc/{pid}/status; \
             vios-host-bridge status; echo \"status exit $?\""
        ),
        Duration::from_secs(20),
    );
    show("host unit as installed", &how);
    for want in [
        "Type=notify",
        "User=vios-bridge",
        "NRestarts=0",
        "StatusText=",
        "CapEff:\t0000000000000000",
        &format!("vios-host-bridge {}, up", env!("CARGO_PKG_VERSION")),
        "status exit 0",
    ] {
        assert!(how.contains(want), "{want}: {how}");
    }
    assert!(
        how.lines()
            .any(|l| l.starts_with("vios-bridge") && l.trim_end().ends_with("vios-bridge")),
        "{how}"
    );
    // systemctl show's line: the last one (a drop-in printed before it has
    // one too).
    let allow = |how: &str| {
        how.lines()
            .rev()
            .find_map(|l| l.strip_prefix("IPAddressAllow="))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        how.lines()
            .any(|l| l.starts_with("IPAddressDeny=") && l.contains("0.0.0.0/0")),
        "{how}"
    );
    assert!(
        !allow(&how).contains("198.18.0.1"),
        "loopback only as shipped: {how}"
    );

    // Services off loopback: daemon-reload runs the generator; the restarted
    // unit carries their addresses in its kernel filter.
    let t = Instant::now();
    let how = vm.ok(
        &format!(
            "sed -i 's|^VIOS_SERVICES=.*|VIOS_SERVICES=\"amqp=198.18.0.1:5672,proxy=v2;mgmt=192.0.2.11:15672\"|' \
             /etc/default/vios-host-bridge && systemctl daemon-reload && systemctl restart {HOST_UNIT} && \
             cat /run/systemd/generator/vios-host-bridge.service.d/50-ip-allow.conf && \
             systemctl show -p IPAddressAllow -p ActiveState {HOST_UNIT} && \
             systemctl reload {HOST_UNIT} && \
             for i in $(seq 50); do journalctl -q -o cat -u {HOST_UNIT} | grep -q 'SIGHUP: rescanning' && break; sleep 0.2; done; \
             journalctl -q -o cat -u {HOST_UNIT} | grep -E 'SIGHUP: rescanning|configuration reloaded|reload refused'"
        ),
        Duration::from_secs(60),
    );
    show(
        &format!(
            "generated IPAddressAllow, restart, reload ({:.1} s)",
            t.elapsed().as_secs_f64()
        ),
        &how,
    );
    let allowed = allow(&how);
    assert!(
        allowed.contains("198.18.0.1") && allowed.contains("192.0.2.11") && allowed.contains("127.0.0.0/8"),
        "{how}"
    );
    assert!(how.contains("ActiveState=active"), "{how}");
    assert!(
        how.contains("configuration reloaded") && how.contains("SIGHUP: rescanning"),
        "{how}"
    );
    assert!(!how.contains("reload refused"), "{how}");

    // A configuration error: exit status 2, and systemd does not restart it.
    let how = vm.ok(
        &format!(
            "echo 'VIOS_NO_SUCH_OPTION=1' >>/etc/default/vios-host-bridge; systemctl restart {HOST_UNIT}; \
             sleep 3; systemctl show -p ActiveState -p Result -p ExecMainStatus -p NRestarts {HOST_UNIT}; \
             journalctl -q -o cat -u {HOST_UNIT} -n 20 | grep -i VIOS_NO_SUCH_OPTION"
        ),
        Duration::from_secs(60),
    );
    show("a configuration error", &how);
    for want in [
        "ActiveState=failed",
        "Result=exit-code",
        "ExecMainStatus=2",
        "NRestarts=0",
    ] {
        assert!(how.contains(want), "{want}: {how}");
    }
}
