//! The Debian packages (issue 10): `scripts/package` builds both from this
//! tree into a temporary directory, and the tests read them as an installer
//! and an operator would, without installing anything on this machine
//! (never `dpkg -i` here): the files and conffiles each package holds, its
//! control fields, the guest daemon statically linked, the systemd units
//! checked by `systemd-analyze verify` and `security` in a scratch root the
//! package was extracted into (`dpkg-deb -x`), the man pages rendered by
//! `man` without warnings and naming every long option `--help` names, the
//! sysvinit scripts and maintainer scripts parsed by `sh -n`, and lintian
//! where it is installed.
//!
//! The packages are built once for all tests here (the release build the
//! test command made is reused; cargo only checks it is fresh). Without
//! dpkg-deb, systemd-analyze or man, a test prints why and passes, unless
//! `VIOS_REQUIRE_VM=1` (set by the test command, whose `scripts/deps`
//! installs them).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use vios_tests::vm::repo_root;
use vios_tests::{record_figure, TempDir};

const HOST: &str = "vios-host-bridge";
const GUEST: &str = "vios-guest-bridge";
/// systemd-analyze security's exposure (0 best, 10 worst) the units must
/// not exceed.
const MAX_EXPOSURE: f64 = 2.0;

/// Both packages, built once (into `target/<profile>/package-test/`, which
/// each run empties: a static is never dropped, so no temporary directory).
struct Built {
    host: PathBuf,
    guest: PathBuf,
    version: String,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("utf-8 output")
}

/// Whether every tool is here; if not, prints why (a failure under
/// `VIOS_REQUIRE_VM=1`).
fn tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} not installed (scripts/deps installs it): the packages cannot be checked",
        missing.join(", ")
    );
    assert!(std::env::var_os("VIOS_REQUIRE_VM").is_none(), "{why}");
    eprintln!("SKIP: {why}");
    false
}

/// The workspace version, read as scripts/package reads it.
fn workspace_version() -> String {
    let toml = fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let section = toml
        .split("[workspace.package]")
        .nth(1)
        .expect("[workspace.package]");
    let line = section
        .lines()
        .find(|l| l.trim_start().starts_with("version"))
        .expect("version");
    line.split('"').nth(1).expect("quoted version").to_owned()
}

fn built() -> Option<&'static Built> {
    static BUILT: OnceLock<Option<Built>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if !tools(&["dpkg-deb", "dpkg-shlibdeps", "readelf", "strip", "cargo"]) {
                return None;
            }
            let out = vios_tests::bin_dir().join("package-test");
            let _ = fs::remove_dir_all(&out);
            let started = std::time::Instant::now();
            run(Command::new(repo_root().join("scripts/package"))
                .arg("--out")
                .arg(&out)
                .current_dir(repo_root()));
            eprintln!("scripts/package: {:.1} s", started.elapsed().as_secs_f64());
            let version = format!("{}-1", workspace_version());
            let host = out.join(format!("{HOST}_{version}_{}.deb", host_arch()));
            let guest = out.join(format!("{GUEST}_{version}_amd64.deb"));
            for deb in [&host, &guest] {
                assert!(deb.exists(), "{} was not built", deb.display());
            }
            Some(Built { host, guest, version })
        })
        .as_ref()
}

fn host_arch() -> String {
    stdout(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_owned()
}

/// `dpkg-deb -c`: (path, "mode owner[ -> target]").
fn contents(deb: &Path) -> Vec<(String, String)> {
    stdout(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .map(|l| {
            // -rwxr-xr-x root/root 123 2026-01-01 00:00 ./usr/sbin/x
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f[5].trim_start_matches('.').to_owned();
            let mut what = format!("{} {}", f[0], f[1]);
            if let Some(target) = f.get(7) {
                what.push_str(" -> ");
                what.push_str(target);
            }
            (path, what)
        })
        .collect()
}

fn field(deb: &Path, name: &str) -> String {
    stdout(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
        .trim()
        .to_owned()
}

/// A control file of the package (conffiles, postinst...).
fn control_file(deb: &Path, name: &str) -> String {
    let dir = TempDir::new("package-control");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(dir.path()));
    fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The package extracted into a scratch root that also holds systemd's own
/// units from this machine (the units' dependencies, as on a host with
/// systemd installed) and `/bin/kill` (the host unit's reload).
fn scratch_root(deb: &Path) -> TempDir {
    let root = TempDir::new("package-root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    fs::create_dir_all(root.join("lib/systemd/system")).unwrap();
    for dir in ["/lib/systemd/system", "/usr/lib/systemd/system"] {
        if Path::new(dir).is_dir() {
            // -n: the package's own units stay as the package has them.
            run(Command::new("cp")
                .args(["-a", "-n", "-T"])
                .arg(dir)
                .arg(root.join("lib/systemd/system")));
            break;
        }
    }
    fs::create_dir_all(root.join("bin")).unwrap();
    let kill = ["/bin/kill", "/usr/bin/kill"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    fs::copy(kill.expect("kill(1) on this machine"), root.join("bin/kill")).unwrap();
    root
}

#[test]
fn packages_hold_the_daemon_its_man_page_units_and_conffiles() {
    let Some(b) = built() else { return };
    let host = contents(&b.host);
    let guest = contents(&b.guest);
    let has = |list: &[(String, String)], path: &str, mode: &str| {
        let entry = list.iter().find(|(p, _)| p == path);
        let (_, m) = entry.unwrap_or_else(|| panic!("{path} not in the package: {list:#?}"));
        assert!(m.starts_with(mode), "{path}: {m}, expected {mode}");
        assert!(m.contains("root/root"), "{path}: {m}, expected root/root");
    };
    for (list, pkg) in [(&host, HOST), (&guest, GUEST)] {
        has(list, &format!("/usr/sbin/{pkg}"), "-rwxr-xr-x");
        has(list, &format!("/usr/share/man/man8/{pkg}.8.gz"), "-rw-r--r--");
        has(list, &format!("/etc/default/{pkg}"), "-rw-r--r--");
        has(list, &format!("/etc/init.d/{pkg}"), "-rwxr-xr-x");
        has(list, &format!("/etc/logrotate.d/{pkg}"), "-rw-r--r--");
        has(list, &format!("/usr/lib/tmpfiles.d/{pkg}.conf"), "-rw-r--r--");
        for doc in [
            "copyright",
            "changelog.Debian.gz",
            "README.md",
            "OPERATIONS.md",
            "PROTOCOL.md",
            "LIFECYCLE.md",
        ] {
            has(list, &format!("/usr/share/doc/{pkg}/{doc}"), "-rw-r--r--");
        }
        // Everything under /etc is a conffile, and only that.
        let deb = if pkg == HOST { &b.host } else { &b.guest };
        let conffiles: BTreeSet<String> = control_file(deb, "conffiles")
            .lines()
            .map(str::to_owned)
            .collect();
        let etc: BTreeSet<String> = list
            .iter()
            .filter(|(p, m)| p.starts_with("/etc/") && m.starts_with('-'))
            .map(|(p, _)| p.clone())
            .collect();
        assert_eq!(conffiles, etc, "{pkg}: conffiles");
        assert_eq!(conffiles.len(), 3, "{pkg}: {conffiles:?}");
        assert_eq!(field(deb, "Version"), b.version);
        assert!(
            field(deb, "Depends").contains("adduser"),
            "{pkg}: postinst uses adduser"
        );
        for script in ["postinst", "prerm", "postrm"] {
            let text = control_file(deb, script);
            assert!(text.starts_with("#!/bin/sh\n"), "{pkg} {script}");
            assert!(text.contains("\nset -e\n"), "{pkg} {script}: set -e");
        }
    }
    has(
        &host,
        "/lib/systemd/system/vios-host-bridge.service",
        "-rw-r--r--",
    );
    has(
        &host,
        "/lib/systemd/system-generators/vios-host-bridge-generator",
        "-rwxr-xr-x",
    );
    has(
        &guest,
        "/lib/systemd/system/vios-guest-bridge@.service",
        "-rw-r--r--",
    );
    has(
        &guest,
        "/lib/systemd/system/vios-guest-bridge@.socket",
        "-rw-r--r--",
    );
    has(
        &guest,
        "/lib/udev/rules.d/90-vios-guest-bridge.rules",
        "-rw-r--r--",
    );
    // The plain guest unit name is masked: systemd must not also run the
    // init script (which serves one port) beside the udev-started instances.
    has(
        &guest,
        "/lib/systemd/system/vios-guest-bridge.service",
        "lrwxrwxrwx",
    );
    let mask = guest
        .iter()
        .find(|(p, _)| p == "/lib/systemd/system/vios-guest-bridge.service")
        .unwrap();
    assert!(mask.1.ends_with("-> /dev/null"), "{mask:?}");
    // The host binary links glibc dynamically, so the package depends on it;
    // the guest's is static and depends on no library.
    assert!(
        field(&b.host, "Depends").contains("libc6 (>="),
        "{}",
        field(&b.host, "Depends")
    );
    assert!(
        !field(&b.guest, "Depends").contains("libc6"),
        "{}",
        field(&b.guest, "Depends")
    );
    assert!(field(&b.guest, "Built-Using").starts_with("glibc (= "));
    assert_eq!(field(&b.guest, "Architecture"), "amd64");
    for deb in [&b.host, &b.guest] {
        let size = fs::metadata(deb).unwrap().len();
        record_figure(&format!(
            "package {}: {} KiB",
            deb.file_name().unwrap().to_string_lossy(),
            size / 1024
        ));
    }
}

/// Program headers of a 64-bit little-endian ELF file: (type, offset, size).
fn program_headers(elf: &[u8]) -> Vec<(u32, u64, u64)> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not 64-bit");
    assert_eq!(elf[5], 1, "not little-endian");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (
        u64_at(0x20) as usize,
        u16_at(0x36) as usize,
        u16_at(0x38) as usize,
    );
    (0..phnum)
        .map(|i| {
            let p = phoff + i * phentsize;
            (u32_at(p), u64_at(p + 8), u64_at(p + 32))
        })
        .collect()
}

/// (has a PT_INTERP, DT_NEEDED entries).
fn linkage(elf: &[u8]) -> (bool, usize) {
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NEEDED: u64 = 1;
    let ph = program_headers(elf);
    let interp = ph.iter().any(|h| h.0 == PT_INTERP);
    let mut needed = 0;
    for &(_, off, size) in ph.iter().filter(|h| h.0 == PT_DYNAMIC) {
        for e in elf[off as usize..(off + size) as usize].chunks_exact(16) {
            if u64::from_le_bytes(e[..8].try_into().unwrap()) == DT_NEEDED {
                needed += 1;
            }
        }
    }
    (interp, needed)
}

#[test]
fn the_guest_daemon_is_statically_linked() {
    let Some(b) = built() else { return };
    let host_root = TempDir::new("package-x");
    let guest_root = TempDir::new("package-x");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&b.host)
        .arg(host_root.path()));
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&b.guest)
        .arg(guest_root.path()));
    // The reading tells the two kinds apart: the host daemon has an
    // interpreter and libraries...
    let (interp, needed) = linkage(&fs::read(host_root.join("usr/sbin/vios-host-bridge")).unwrap());
    assert!(
        interp && needed > 0,
        "host: interpreter {interp}, {needed} libraries"
    );
    // ...the guest daemon neither.
    let guest_bin = guest_root.join("usr/sbin/vios-guest-bridge");
    let (interp, needed) = linkage(&fs::read(&guest_bin).unwrap());
    assert!(
        !interp && needed == 0,
        "guest: interpreter {interp}, {needed} libraries"
    );
    // And it runs.
    let v = stdout(Command::new(&guest_bin).arg("--version"));
    assert!(v.contains(&workspace_version()), "{v}");
}

/// The units, as installed, in a scratch root: `systemd-analyze verify`
/// (syntax, dependencies, the binaries and man pages they name) and
/// `systemd-analyze security` (exposure ≤ 2.0).
#[test]
fn units_pass_systemd_analyze_verify_and_security_in_a_scratch_root() {
    let Some(b) = built() else { return };
    if !tools(&["systemd-analyze", "man"]) {
        return;
    }
    for (deb, unit) in [
        (&b.host, "vios-host-bridge.service"),
        (&b.guest, "vios-guest-bridge@org.qpid.vios.0.service"),
    ] {
        let root = scratch_root(deb);
        let rootarg = format!("--root={}", root.path().display());
        verify_clean(&root, unit);
        if deb == &b.host {
            generated_ip_allow_passes_verify(&root);
        } else {
            // The optional socket unit, and the service it activates.
            verify_clean(&root, "vios-guest-bridge@org.qpid.vios.0.socket");
        }
        // The premise: verify does look at the binary in the root.
        let exec = root.join(&format!("usr/sbin/{}", unit.split(['@', '.']).next().unwrap()));
        fs::remove_file(&exec).unwrap();
        let broken = Command::new("systemd-analyze")
            .args(["verify", "--man=no", &rootarg, unit])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&broken.stderr);
        assert!(
            !broken.status.success() && said.contains("not executable"),
            "{said}"
        );

        let security =
            stdout(Command::new("systemd-analyze").args(["security", "--offline=yes", &rootarg, unit]));
        let exposure: f64 = security
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure in:\n{security}"));
        record_figure(&format!(
            "systemd-analyze security --offline=yes {unit}: exposure {exposure:.1}"
        ));
        assert!(
            exposure <= MAX_EXPOSURE,
            "{unit}: exposure {exposure} > {MAX_EXPOSURE}:\n{security}"
        );
    }
}

/// `systemd-analyze verify` of `unit` in `root` says nothing and succeeds;
/// Documentation=man:… is checked with man(1) on the root's pages.
fn verify_clean(root: &TempDir, unit: &str) {
    let verify = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=yes",
            &format!("--root={}", root.path().display()),
            unit,
        ])
        .env("MANPATH", root.join("usr/share/man"))
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&verify.stdout).into_owned() + &String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "verify {unit}: {}\n{said}",
        verify.status
    );
}

/// The host package's generator, run on its binary and a configuration with
/// services off loopback, writes an `IPAddressAllow=` drop-in with their
/// addresses; the unit with that drop-in passes `systemd-analyze verify`.
fn generated_ip_allow_passes_verify(root: &TempDir) {
    let conf = root.join("etc/default/vios-host-bridge");
    let shipped = fs::read_to_string(&conf).unwrap();
    fs::write(
        &conf,
        shipped.replace(
            "VIOS_SERVICES=\"amqp=127.0.0.1:5672\"",
            "VIOS_SERVICES=\"amqp=198.18.0.1:5672,proxy=v2;mgmt=192.0.2.11:15672;local=127.0.0.1:9\"",
        ),
    )
    .unwrap();
    assert_ne!(
        fs::read_to_string(&conf).unwrap(),
        shipped,
        "the premise: services changed"
    );
    // As systemd runs it (normal, early and late directories), on the
    // root's binary and configuration file.
    let generate = |out: &Path| {
        run(
            Command::new(root.join("lib/systemd/system-generators/vios-host-bridge-generator"))
                .arg(out)
                .arg(out.with_extension("early"))
                .arg(out.with_extension("late"))
                .env("VIOS_HOST_BRIDGE", root.join("usr/sbin/vios-host-bridge"))
                .env("VIOS_HOST_DEFAULTS", &conf),
        )
    };
    let out = root.join("run/systemd/generator");
    generate(&out);
    let dropin = fs::read_to_string(out.join("vios-host-bridge.service.d/50-ip-allow.conf")).unwrap();
    eprintln!("generated drop-in:\n{dropin}");
    assert!(
        dropin.ends_with("[Service]\nIPAddressAllow=192.0.2.11 198.18.0.1\n"),
        "{dropin}"
    );
    // As systemd would load it (the generator directory is not searched
    // under --root): a drop-in beside the unit.
    let d = root.join("etc/systemd/system/vios-host-bridge.service.d");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("50-ip-allow.conf"), &dropin).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .arg("vios-host-bridge.service")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
    // A configuration error leaves the unit as shipped (systemd empties the
    // generator directory before each run): no drop-in, and no failure.
    fs::write(&conf, "VIOS_SERVICES=\"amqp=no-port-given\"\n").unwrap();
    let fresh = root.join("run/systemd/generator-2");
    generate(&fresh);
    let left: Vec<_> = fs::read_dir(fresh.join("vios-host-bridge.service.d"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    fs::remove_dir_all(&d).unwrap();
}

/// Long options (`--name`) a text names.
fn long_options(text: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let start = i + at;
        let mut end = start + 2;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'-')
        {
            end += 1;
        }
        let before_ok = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'-');
        let name = &text[start + 2..end];
        if before_ok && name.len() > 1 && name.as_bytes()[0].is_ascii_lowercase() && !name.ends_with('-') {
            set.insert(text[start..end].to_owned());
        }
        i = end.max(start + 2);
    }
    set
}

#[test]
fn man_pages_render_cleanly_and_name_every_option_of_help() {
    let Some(b) = built() else { return };
    if !tools(&["man"]) {
        return;
    }
    for (deb, pkg) in [(&b.host, HOST), (&b.guest, GUEST)] {
        let root = TempDir::new("package-man");
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
        let page = root.join(&format!("usr/share/man/man8/{pkg}.8.gz"));
        // As lintian checks pages: groff's warnings on standard error.
        let render = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(&page)
            .env("LC_ALL", "C.UTF-8")
            .env("MANROFFSEQ", "")
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let warnings = String::from_utf8_lossy(&render.stderr);
        assert!(
            render.status.success() && warnings.trim().is_empty(),
            "{pkg}: man said:\n{warnings}"
        );
        // The page as read: wide lines, so nothing is hyphenated.
        let text = stdout(
            Command::new("man")
                .args(["-E", "ascii", "-l"])
                .arg(&page)
                .env("LC_ALL", "C.UTF-8")
                .env("MANWIDTH", "1000"),
        );
        for section in [
            "SYNOPSIS",
            "OPTIONS",
            "STATUS",
            "ENVIRONMENT",
            "FILES",
            "SIGNALS",
            "EXIT STATUS",
            "SEE ALSO",
        ] {
            assert!(
                text.lines().any(|l| l == section),
                "{pkg}: no {section} section:\n{text}"
            );
        }
        assert!(
            text.contains(&format!("{pkg} status")),
            "{pkg}: the status subcommand"
        );
        // Every long option of --help and of `status --help`, from the
        // packaged binary itself.
        let bin = root.join(&format!("usr/sbin/{pkg}"));
        let help = stdout(Command::new(&bin).arg("--help"));
        let status_help = stdout(Command::new(&bin).args(["status", "--help"]));
        let mut options = long_options(&help);
        options.extend(long_options(&status_help));
        assert!(
            options.len() > 15 && options.contains("--window"),
            "{pkg}: {options:?}"
        );
        let on_page = long_options(&text);
        let missing: Vec<&String> = options.difference(&on_page).collect();
        assert!(
            missing.is_empty(),
            "{pkg}: --help names {missing:?}, the man page does not:\n{text}"
        );
    }
}

/// The shell the packages run: maintainer scripts and init scripts parse
/// with sh (dash on Debian), and the udev rule starts units on "change" too.
#[test]
fn scripts_parse_and_the_udev_rule_matches_hot_plug() {
    let Some(b) = built() else { return };
    for (deb, pkg) in [(&b.host, HOST), (&b.guest, GUEST)] {
        let dir = TempDir::new("package-scripts");
        run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(dir.path()));
        for script in [
            "DEBIAN/postinst",
            "DEBIAN/prerm",
            "DEBIAN/postrm",
            &format!("etc/init.d/{pkg}"),
        ] {
            run(Command::new("sh").arg("-n").arg(dir.join(script)));
        }
        let init = fs::read_to_string(dir.join(&format!("etc/init.d/{pkg}"))).unwrap();
        // A second start finds the first daemon by its pid file and binary.
        assert!(
            init.contains("--pidfile \"$PIDFILE\" --exec \"$DAEMON\" --test"),
            "{pkg}"
        );
        assert!(init.contains("--chuid \"$USER\""), "{pkg}");
        assert!(init.contains("status_of_proc"), "{pkg}");
    }
    let dir = TempDir::new("package-udev");
    run(Command::new("dpkg-deb").arg("-x").arg(&b.guest).arg(dir.path()));
    let rule = fs::read_to_string(dir.join("lib/udev/rules.d/90-vios-guest-bridge.rules")).unwrap();
    let start = rule
        .replace("\\\n", " ")
        .lines()
        .find(|l| !l.starts_with('#') && l.contains("SYSTEMD_WANTS"))
        .map(str::to_owned)
        .expect("a SYSTEMD_WANTS rule");
    assert!(start.contains("ACTION==\"add|change\""), "{start}");
    assert!(start.contains("GROUP=\"vios-bridge\""), "{start}");
}

/// lintian (`scripts/deps` installs it; required under `VIOS_REQUIRE_VM=1`):
/// no errors.
#[test]
fn lintian_finds_no_errors() {
    let Some(b) = built() else { return };
    if !Command::new("sh")
        .args(["-c", "command -v lintian"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let why = "lintian not installed: not run here (scripts/deps and scripts/package --lint install it)";
        eprintln!("{why}");
        assert!(std::env::var_os("VIOS_REQUIRE_VM").is_none(), "{why}");
        return;
    }
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--display-info"])
        .arg(&b.host)
        .arg(&b.guest)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("lintian:\n{said}");
    assert!(out.status.success(), "lintian: {}\n{said}", out.status);
    assert!(!said.lines().any(|l| l.starts_with("E: ")), "{said}");
}

/// A Debian 12 minbase root (with adduser and procps, the packages'
/// dependencies beyond it), made once with mmdebstrap and kept as a tarball
/// in `target/package-chroot/`.
fn chroot_tarball() -> Option<PathBuf> {
    static TARBALL: OnceLock<Option<PathBuf>> = OnceLock::new();
    TARBALL
        .get_or_init(|| {
            let uid = stdout(Command::new("id").arg("-u"));
            if uid.trim() != "0" {
                let why = "not root: the chroot for the maintainer scripts cannot be made";
                assert!(std::env::var_os("VIOS_REQUIRE_VM").is_none(), "{why}");
                eprintln!("SKIP: {why}");
                return None;
            }
            if !tools(&["mmdebstrap", "unshare", "chroot", "ip"]) {
                return None;
            }
            let dir = repo_root().join("target/package-chroot");
            let tar = dir.join("bookworm-minbase.tar");
            if !tar.exists() {
                fs::create_dir_all(&dir).unwrap();
                let partial = dir.join("bookworm-minbase.partial.tar");
                let started = std::time::Instant::now();
                run(Command::new("mmdebstrap")
                    .args([
                        "--quiet",
                        "--variant=minbase",
                        "--include=adduser,procps",
                        "bookworm",
                    ])
                    .arg(&partial)
                    .arg("http://deb.debian.org/debian"));
                fs::rename(&partial, &tar).unwrap();
                eprintln!("mmdebstrap: {:.0} s", started.elapsed().as_secs_f64());
            }
            Some(tar)
        })
        .clone()
}

/// A fresh chroot from the tarball, with a mount and network namespace of
/// its own (its /proc and /dev; only `lo`), held by a `sleep` so that every
/// command run in it, and every daemon those start, share one namespace
/// that touches neither this machine's mounts nor its network.
struct Chroot {
    holder: std::process::Child,
    dir: TempDir,
}

impl Chroot {
    fn new(tar: &Path) -> Chroot {
        use std::io::BufRead;
        let dir = TempDir::new("package-chroot");
        run(Command::new("tar").arg("-xf").arg(tar).arg("-C").arg(dir.path()));
        let mut holder = Command::new("unshare")
            .args(["--mount", "--net", "--propagation", "private", "--", "sh", "-ec"])
            .arg(
                "ip link set lo up; mount -t proc proc \"$1/proc\"; mount --rbind /dev \"$1/dev\"; \
                 echo ready; exec sleep 1d",
            )
            .arg("sh")
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare");
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the chroot's namespace was not set up");
        Chroot { holder, dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }

    /// Runs `script` (sh, `set -e`) in the chroot, in its namespace, with a
    /// clean environment. Returns its output.
    fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .arg(format!("--target={}", self.holder.id()))
            .args(["--mount", "--net", "--", "chroot"])
            .arg(self.dir.path())
            .args([
                "/usr/bin/env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "sh",
                "-ec",
                script,
            ])
            .output()
            .unwrap()
    }

    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "in the chroot: {script}\n{}\n{text}",
            out.status
        );
        text
    }

    /// Processes running `/usr/sbin/NAME` in this chroot.
    fn daemons(&self, name: &str) -> Vec<u32> {
        let root = fs::canonicalize(self.dir.path()).unwrap();
        let mut pids: Vec<u32> = fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid: &u32| {
                fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|r| r == root)
                    && fs::read_link(format!("/proc/{pid}/exe"))
                        .is_ok_and(|e| e.to_string_lossy().ends_with(&format!("/usr/sbin/{name}")))
            })
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Every process whose root is this chroot.
    fn processes(&self) -> Vec<u32> {
        let root = fs::canonicalize(self.dir.path()).unwrap();
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid: &u32| fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|r| r == root))
            .collect()
    }

    /// Every path in the chroot but those dpkg, apt and adduser keep for
    /// themselves.
    fn files(&self) -> BTreeSet<String> {
        let out = stdout(
            Command::new("find")
                .arg(self.dir.path())
                .args(["-mount", "-printf", "/%P\\n"]),
        );
        out.lines()
            .filter(|p| {
                !(p.starts_with("/var/lib/dpkg/")
                    || p.starts_with("/var/cache/debconf/")
                    || p.starts_with("/proc/")
                    || p.starts_with("/dev/")
                    || p.starts_with("/tmp/")
                    || [
                        "/var/log/dpkg.log",
                        "/var/log/alternatives.log",
                        "/etc/passwd-",
                        "/etc/group-",
                        "/etc/shadow-",
                        "/etc/gshadow-",
                        "/etc/.pwd.lock",
                        // adduser's lock file (in /run: gone at boot)
                        "/run/adduser",
                    ]
                    .contains(p))
            })
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Chroot {
    /// Whatever a failed test left running in the chroot, then the holder.
    fn drop(&mut self) {
        for pid in self.processes() {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The pid in a pid file, and that process's user id.
fn daemon_uid(pidfile: &Path) -> (u32, u32) {
    let pid: u32 = fs::read_to_string(pidfile)
        .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()))
        .trim()
        .parse()
        .unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap();
    (pid, uid)
}

/// Each package in a Debian 12 chroot without systemd or udev running, as
/// dpkg runs its scripts there: `dpkg -i` creates the user and enables the
/// service; the init script started twice runs one daemon, as that user,
/// which `status` sees and `stop` ends; `dpkg --purge` removes the user and
/// leaves no file behind.
#[test]
fn maintainer_and_init_scripts_run_clean_in_a_chroot() {
    let Some(b) = built() else { return };
    let Some(tar) = chroot_tarball() else { return };
    for (deb, pkg) in [(&b.host, HOST), (&b.guest, GUEST)] {
        let root = Chroot::new(&tar);
        let before = root.files();
        fs::copy(deb, root.path("/tmp/pkg.deb")).unwrap();
        let said = root.ok("dpkg -i /tmp/pkg.deb");
        eprintln!("{pkg}: dpkg -i in the chroot said:\n{said}");
        let passwd = fs::read_to_string(root.path("/etc/passwd")).unwrap();
        let user = passwd
            .lines()
            .find(|l| l.starts_with("vios-bridge:"))
            .unwrap_or_else(|| panic!("{pkg}: no user vios-bridge:\n{passwd}"));
        let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
        assert!(user.ends_with(":/nonexistent:/usr/sbin/nologin"), "{user}");
        assert!(
            fs::read_dir(root.path("/etc/rc2.d")).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(pkg)),
            "{pkg}: no rc2.d link"
        );
        if pkg == HOST {
            let wants = root.path("/etc/systemd/system/multi-user.target.wants/vios-host-bridge.service");
            assert!(wants.is_symlink(), "{pkg}: the unit is not enabled");
        }

        // sysvinit: a second start does not start a second daemon.
        let init = format!("/etc/init.d/{pkg}");
        root.ok(&format!("{init} start"));
        let pidfile = root.path(&format!("/run/{pkg}.pid"));
        std::thread::sleep(std::time::Duration::from_millis(500));
        let (pid, runs_as) = daemon_uid(&pidfile);
        assert_eq!(
            runs_as, uid,
            "{pkg}: the daemon runs as uid {runs_as}, not vios-bridge"
        );
        root.ok(&format!("{init} start"));
        let (again, _) = daemon_uid(&pidfile);
        assert_eq!(again, pid, "{pkg}: a second start replaced the pid file");
        let running = root.daemons(pkg);
        assert_eq!(
            running,
            vec![pid],
            "{pkg}: daemons in the chroot after two starts"
        );
        let status = root.ok(&format!("{init} status"));
        assert!(status.contains("is running"), "{pkg}: {status}");
        let log = fs::read_to_string(root.path(&format!("/var/log/{pkg}.log"))).unwrap();
        assert!(!log.is_empty(), "{pkg}: nothing in the log");
        root.ok(&format!("{init} stop"));
        assert!(root.daemons(pkg).is_empty(), "{pkg}: still running after stop");
        let stopped = root.sh(&format!("{init} status"));
        assert_eq!(stopped.status.code(), Some(3), "{pkg}: status after stop");

        // Purge: the user and every file go.
        root.ok(&format!("dpkg --purge {pkg}"));
        let passwd = fs::read_to_string(root.path("/etc/passwd")).unwrap();
        assert!(!passwd.contains("vios-bridge"), "{pkg}: the user stayed");
        let group = fs::read_to_string(root.path("/etc/group")).unwrap();
        assert!(!group.contains("vios-bridge"), "{pkg}: the group stayed");
        let after = root.files();
        let left: Vec<&String> = after
            .difference(&before)
            .filter(|p| *p != "/tmp/pkg.deb")
            .collect();
        let gone: Vec<&String> = before.difference(&after).collect();
        assert!(
            left.is_empty() && gone.is_empty(),
            "{pkg}: left behind {left:#?}, removed {gone:#?}"
        );
        eprintln!("{pkg}: installed, started twice (one daemon, uid {uid}), stopped, purged: nothing left");
    }
}
