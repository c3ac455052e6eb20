//! The host bridge under libvirt as Debian ships it (issue 15): stock
//! `libvirtd` (see `vios_tests::libvirt` for the namespace it runs in and
//! why), transient domains defined from `docs/examples/libvirt-domain.xml`
//! with two vios ports and no network interface, booting the test guest
//! image under TCG, and `vios-host-bridge --libvirt` started before any
//! domain, as an unprivileged user whose only access is the group
//! `libvirt-qemu`, never restarted.
//!
//! What it shows: each domain's channels are connected within 100 ms of
//! their sockets appearing and let go within 100 ms of libvirt removing the
//! directory (the rescan is a minute apart, so a missed inotify event
//! fails); AMQP messages verified from inside the guests through both ports;
//! `virsh reset`, `virsh destroy`, a second domain whose name libvirt cuts,
//! a third whose cut name is the same (two guests, nothing mixed), and a
//! re-created first domain.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vios_common::io::control::{query, StatusQuery};
use vios_tests::libvirt::{available_or_skip, wait_virsh, Libvirt};
use vios_tests::vm::{image_or_skip, json_line, json_num, repo_root, Vm};
use vios_tests::{bin, record_figure, Proc, TempDir};

/// Where Debian's libvirt 9 puts channel sockets (inside the namespace).
const CHANNELS: &str = "/var/lib/libvirt/qemu/channel/target";
/// The unprivileged user the host bridge runs as (no passwd entry needed).
const BRIDGE_UID: u32 = 64_970;
/// The latency target of issue 15.
const TARGET: Duration = Duration::from_millis(100);

fn libvirt_qemu_gid() -> u32 {
    vios_common::sys::group_id("libvirt-qemu")
        .unwrap_or_else(|e| panic!("{e} (libvirt-daemon-system creates it)"))
}

/// The host bridge as user [`BRIDGE_UID`] with `groups` (`--groups=…` or
/// `--clear-groups`), no capabilities, in libvirt's mount namespace (to see
/// its directories); `args` follow the binary.
fn unprivileged_bridge(lv: &Libvirt, dir: &TempDir, groups: &str, args: &[&str]) -> Command {
    let mut cmd = lv.enter(false);
    cmd.arg("setpriv")
        .arg(format!("--reuid={BRIDGE_UID}"))
        .arg(format!("--regid={BRIDGE_UID}"))
        .args([
            groups,
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(dir.join("bin/vios-host-bridge"))
        .args(args);
    cmd
}

/// The channels of every guest named `guest` as the host bridge's status
/// shows them, (channel, link, session) each: one entry per domain
/// directory (two domains whose names libvirt cuts alike are two guests of
/// the same name).
fn guests(control: &Path, guest: &str) -> Vec<Vec<(String, String, String)>> {
    let q = StatusQuery {
        json: true,
        streams: false,
        guest: None,
    };
    let json = query(control, &q).expect("status").body;
    let field = |s: &str, name: &str| -> String {
        let key = format!("\"{name}\":\"");
        let at = s.find(&key).unwrap_or_else(|| panic!("no {name} in {s}")) + key.len();
        s[at..][..s[at..].find('"').unwrap()].to_owned()
    };
    json.split("{\"name\":\"")
        .skip(1)
        .filter(|g| g[..g.find('"').unwrap()] == *guest)
        .map(|g| {
            g.split("{\"channel\":\"")
                .skip(1)
                .map(|c| {
                    let channel = c[..c.find('"').unwrap()].to_owned();
                    (channel, field(c, "link"), field(c, "session"))
                })
                .collect()
        })
        .collect()
}

/// Polls every millisecond until `cond` holds; returns when it first did.
fn poll_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Instant {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return Instant::now();
        }
        assert!(Instant::now() < end, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Setup {
    lv: Libvirt,
    bridge: Proc,
    control: PathBuf,
    broker_port: Option<u16>,
    /// Latencies measured: (event, ms).
    figures: Vec<(String, f64)>,
    dir: TempDir,
}

/// A running domain and its console.
struct Domain {
    name: String,
    /// The name libvirt uses in the directory (cut to 20 characters).
    short: String,
    vm: Vm,
}

impl Setup {
    fn start() -> Setup {
        let dir = TempDir::new("libvirt");
        let lv = Libvirt::start(dir.path());
        // The image and the bridge where the unprivileged users (QEMU as
        // libvirt-qemu, the bridge) can read them whatever the checkout's
        // permissions.
        let image = image_or_skip().expect("guest image");
        for d in ["image", "bin", "run", "consoles"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for f in ["vmlinux", "initrd.gz"] {
            std::fs::copy(image.join(f), dir.join("image").join(f)).unwrap();
        }
        std::fs::copy(bin("vios-host-bridge"), dir.join("bin/vios-host-bridge")).unwrap();
        chmod(&dir.join("consoles"), 0o777);
        chown(&dir.join("run"), BRIDGE_UID);
        let broker_port = std::env::var("VIOS_TEST_AMQP_PORT")
            .ok()
            .and_then(|p| p.parse().ok());
        if broker_port.is_none() {
            assert!(
                std::env::var_os("VIOS_REQUIRE_BROKER").is_none(),
                "no broker: VIOS_TEST_AMQP_PORT unset"
            );
            eprintln!("SKIP (AMQP parts): VIOS_TEST_AMQP_PORT is not set: no broker");
        }
        let control = dir.join("run/host.sock");
        // The bridge: its own uid and group, plus libvirt-qemu's group.
        let service = format!("amqp=127.0.0.1:{},loopback=ok", broker_port.unwrap_or(9));
        let mut cmd = unprivileged_bridge(
            &lv,
            &dir,
            &format!("--groups={}", libvirt_qemu_gid()),
            &[
                "--libvirt",
                "--rescan",
                "60s",
                "--idle-timeout",
                "3s",
                "--service",
                &service,
            ],
        );
        cmd.arg("--control").arg(&control);
        let bridge = Proc::spawn("host-bridge", &mut cmd, dir.join("host.log"));
        bridge.wait_log("control socket", 1, Duration::from_secs(10));
        Setup {
            lv,
            bridge,
            control,
            broker_port,
            figures: Vec::new(),
            dir,
        }
    }

    /// The bridge's uid, gid, groups and capabilities, from /proc.
    fn assert_unprivileged(&self) {
        let pid = self.bridge_pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .unwrap_or_default()
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let uid = BRIDGE_UID.to_string();
        assert_eq!(line("Uid:"), [&*uid; 4].join(" "), "{status}");
        assert_eq!(line("Gid:"), [&*uid; 4].join(" "), "{status}");
        assert_eq!(line("Groups:"), libvirt_qemu_gid().to_string(), "{status}");
        assert_eq!(line("CapEff:"), "0000000000000000", "{status}");
        assert_eq!(line("CapBnd:"), "0000000000000000", "{status}");
        eprintln!(
            "libvirt: host bridge pid {pid}: Uid {}, Groups {} (libvirt-qemu), CapEff {}",
            line("Uid:"),
            line("Groups:"),
            line("CapEff:")
        );
    }

    /// The premise of the group: the same bridge without libvirt-qemu's
    /// group cannot even read libvirt's channel directory, and says why.
    fn without_the_group_nothing_is_reachable(&self) {
        let mut cmd = unprivileged_bridge(
            &self.lv,
            &self.dir,
            "--clear-groups",
            &["--libvirt", "--service", "amqp=127.0.0.1:9,loopback=ok"],
        );
        cmd.arg("--control").arg(self.dir.join("run/nogroup.sock"));
        let p = Proc::spawn(
            "host-bridge-without-group",
            &mut cmd,
            self.dir.join("nogroup.log"),
        );
        let warning = format!("cannot read {CHANNELS}: Permission denied");
        p.wait_log(&warning, 1, Duration::from_secs(10));
        let line = p
            .log_text()
            .lines()
            .find(|l| l.contains(&warning))
            .unwrap()
            .to_owned();
        eprintln!("libvirt: without the group libvirt-qemu: {line}");
        assert!(line.contains("needs the directory's group"), "{line}");
    }

    /// The bridge itself, not the nsenter/setpriv that exec'd it.
    fn bridge_pid(&self) -> u32 {
        let pid = self.bridge.pid();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(exe.ends_with("vios-host-bridge"), "{}", exe.display());
        pid
    }

    /// Starts a domain from the documented XML; measures how long after its
    /// channel sockets appeared the bridge had both connected; attaches to
    /// its console.
    fn create(&mut self, name: &str) -> Domain {
        let short: String = name.chars().take(20).collect();
        let console = self.dir.join(&format!("consoles/{name}.sock"));
        let cmdline = format!(
            "console=ttyS0 panic=-1 quiet loglevel=0 vios.name={short} vios.ports=2 \
             vios.autostart=1 vios.args=--channel,org.qpid.vios.0,--listen,127.0.0.1:5672=amqp"
        );
        let image = self.dir.join("image");
        let xml = std::fs::read_to_string(repo_root().join("docs/examples/libvirt-domain.xml"))
            .unwrap()
            .replace("@NAME@", name)
            .replace("@KERNEL@", &image.join("vmlinux").to_string_lossy())
            .replace("@INITRD@", &image.join("initrd.gz").to_string_lossy())
            .replace("@CMDLINE@", &cmdline)
            .replace("@CONSOLE@", &console.to_string_lossy());
        assert!(!xml.contains('@'), "a placeholder is left: {xml}");
        let file = self.dir.join(&format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();

        let channels_dir = self.lv.path(CHANNELS);
        let before: Vec<PathBuf> = dirs_of(&channels_dir, &short);
        let served_before = guests(&self.control, &short).len();
        let t = Instant::now();
        let virsh = self.lv.virsh_spawn(&["create", &file.to_string_lossy()]);
        // The sockets appear while virsh runs (QEMU creates them at start).
        let mut guest_dir = PathBuf::new();
        let appeared = poll_until(
            &format!("{name}: channel sockets"),
            Duration::from_secs(60),
            || match dirs_of(&channels_dir, &short)
                .into_iter()
                .find(|d| !before.contains(d))
            {
                Some(d) if d.join("org.qpid.vios.0").exists() && d.join("org.qpid.vios.1").exists() => {
                    guest_dir = d;
                    true
                }
                _ => false,
            },
        );
        // libvirt creates the sockets as root and hands them to QEMU's user
        // (whose group the bridge is in) a little later.
        let handed_over = poll_until(
            &format!("{name}: sockets handed over"),
            Duration::from_secs(60),
            || {
                ["org.qpid.vios.0", "org.qpid.vios.1"].iter().all(|p| {
                    std::fs::metadata(guest_dir.join(p))
                        .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) != 0)
                })
            },
        );
        let connected = poll_until(
            &format!("{name}: both channels connected"),
            Duration::from_secs(60),
            || {
                let g = guests(&self.control, &short);
                g.len() == served_before + 1
                    && g.iter()
                        .all(|c| c.len() == 2 && c.iter().all(|(_, link, _)| link == "connected"))
            },
        );
        wait_virsh(virsh, &format!("create {name}"));
        let ms = millis(connected - appeared);
        eprintln!(
            "libvirt: {name}: sockets in {} {:.0} ms after virsh create, handed over to QEMU's user {:.1} ms \
             later; both channels connected {ms:.1} ms after they appeared",
            guest_dir.display(),
            millis(appeared - t),
            millis(handed_over - appeared),
        );
        self.figures.push((format!("{name} start"), ms));
        // The premise of the group: only libvirt-qemu's members may look in.
        let meta = std::fs::metadata(&guest_dir).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7,
            0,
            "{} is open to every user",
            guest_dir.display()
        );
        let vm = Vm::attach(&short, &console, guest_dir, self.dir.path());
        Domain {
            name: name.to_owned(),
            short,
            vm,
        }
    }

    /// `ports` sessions established (on every guest of the domain's name).
    fn wait_sessions(&self, d: &Domain, ports: usize, timeout: Duration) {
        poll_until(&format!("{}: {ports} session(s)", d.name), timeout, || {
            let g = guests(&self.control, &d.short);
            !g.is_empty()
                && g.iter().all(|c| {
                    c.iter()
                        .filter(|(_, _, session)| session == "established")
                        .count()
                        >= ports
                })
        });
    }

    /// `virsh destroy`: measures how long after libvirt removed the
    /// domain's directory the bridge stopped serving it.
    fn destroy(&mut self, d: Domain) {
        let dir = d.vm.guest_dir.clone();
        let served_before = guests(&self.control, &d.short).len();
        assert!(served_before > 0, "{} is not served", d.name);
        drop(d.vm);
        let virsh = self.lv.virsh_spawn(&["destroy", &d.name]);
        let removed = poll_until(
            &format!("{}: directory removed", d.name),
            Duration::from_secs(30),
            || !dir.exists(),
        );
        let stopped = poll_until(&format!("{}: let go", d.name), Duration::from_secs(30), || {
            guests(&self.control, &d.short).len() == served_before - 1
        });
        wait_virsh(virsh, &format!("destroy {}", d.name));
        let ms = millis(stopped - removed);
        eprintln!(
            "libvirt: {}: destroyed; let go {ms:.1} ms after its directory went",
            d.name
        );
        self.figures.push((format!("{} destroy", d.name), ms));
    }

    /// Publishes and consumes AMQP messages from inside the guest through
    /// the listener on `port`.
    fn amqp(&self, d: &mut Domain, port: u16, messages: usize) {
        if self.broker_port.is_none() {
            return;
        }
        let out = d.vm.ok(
            &format!(
                "vios-amqp-client --addr 127.0.0.1:{port} --connections 2 --messages {messages} \
                 --size 1024 --timeout 120 </dev/null"
            ),
            Duration::from_secs(150),
        );
        let json = json_line(&out, "\"verified\"");
        assert_eq!(json_num(&json, "verified") as usize, messages, "{json}");
        eprintln!("libvirt: {}: AMQP through 127.0.0.1:{port}: {json}", d.name);
    }
}

fn dirs_of(dir: &Path, short: &str) -> Vec<PathBuf> {
    let suffix = format!("-{short}");
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
}

/// The guest bridge for port 1, started by hand (the image autostarts one
/// for port 0 only), with a listener of its own.
fn start_second_bridge(d: &mut Domain) {
    d.vm.ok(
        "(vios-guest-bridge --channel org.qpid.vios.1 --listen 127.0.0.1:5673=amqp \
         </dev/null >/tmp/guest-bridge.1.log 2>&1 &)",
        Duration::from_secs(10),
    );
}

#[test]
fn domains_are_served_the_moment_they_start_by_an_unprivileged_host_bridge() {
    if !available_or_skip() || image_or_skip().is_none() {
        return;
    }
    let started = Instant::now();
    let mut s = Setup::start();
    s.assert_unprivileged();
    s.without_the_group_nothing_is_reachable();

    // A domain with two ports: both connected at once; AMQP through each.
    let mut a = s.create("vm-a");
    s.wait_sessions(&a, 1, Duration::from_secs(60));
    start_second_bridge(&mut a);
    s.wait_sessions(&a, 2, Duration::from_secs(30));
    s.amqp(&mut a, 5672, 400);
    s.amqp(&mut a, 5673, 400);

    // virsh reset: the same QEMU, the same sockets; the guest boots again.
    let t = Instant::now();
    s.lv.virsh(&["reset", &a.name]);
    a.vm.wait_for("VIOS-GUEST-BOOT", Duration::from_secs(90));
    a.vm.wait_for("VIOS-GUEST-READY\n", Duration::from_secs(90));
    s.wait_sessions(&a, 1, Duration::from_secs(30));
    eprintln!(
        "libvirt: vm-a: virsh reset -> session established again after {:.1} s (a guest boot)",
        t.elapsed().as_secs_f64()
    );
    s.amqp(&mut a, 5672, 200);

    // A second domain whose name libvirt cuts to 20 characters, beside the
    // first one.
    let mut b = s.create("vios-test-domain-with-a-long-name");
    assert_eq!(b.short, "vios-test-domain-wit");
    s.wait_sessions(&b, 1, Duration::from_secs(60));
    s.amqp(&mut b, 5672, 200);

    // A third domain whose name libvirt cuts to the same 20 characters, while
    // the second runs: a guest of its own (its own directory and channels),
    // both carrying traffic, nothing mixed.
    let mut c = s.create("vios-test-domain-with-another-name");
    assert_eq!(c.short, b.short);
    s.wait_sessions(&c, 1, Duration::from_secs(60));
    assert_ne!(c.vm.guest_dir, b.vm.guest_dir);
    assert_eq!(guests(&s.control, &c.short).len(), 2, "two guests of one name");
    s.amqp(&mut c, 5672, 200);
    s.amqp(&mut b, 5672, 200);
    s.destroy(c);
    s.amqp(&mut b, 5672, 100);

    // Destroy the first, then create it again: a new id, a new directory.
    s.destroy(a);
    let mut a = s.create("vm-a");
    s.wait_sessions(&a, 1, Duration::from_secs(60));
    start_second_bridge(&mut a);
    s.wait_sessions(&a, 2, Duration::from_secs(30));
    s.amqp(&mut a, 5673, 200);
    s.destroy(b);
    s.destroy(a);

    // The bridge was never restarted and never failed.
    assert!(s.bridge.log_text().matches("control socket").count() == 1);
    let log = s.bridge.log_text();
    assert!(!log.contains("ERROR"), "{log}");
    let figures = s
        .figures
        .iter()
        .map(|(what, ms)| format!("{what} {ms:.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    record_figure(&format!(
        "libvirt: socket appears -> connected, directory removed -> let go (ms): {figures}"
    ));
    eprintln!("libvirt: whole test {:.0} s", started.elapsed().as_secs_f64());
    let late: Vec<_> = s.figures.iter().filter(|(_, ms)| *ms >= millis(TARGET)).collect();
    assert!(late.is_empty(), "over {TARGET:?}: {late:?} (all: {figures})");
}
