//! The host bridge's service features against real RabbitMQ nodes:
//! PROXY v2 identities, trust (loopback_users), per-guest policy, a clustered
//! service failing over, and configuration reloads while traffic flows.
//!
//! Each test runs one scenario of `tests/amqp/broker_scenarios.py` (under
//! Debian's /usr/bin/python3: pika, qpid-proton), which starts its own
//! private brokers through `scripts/lib/cluster.sh` and `scripts/lib/netns.sh`,
//! the QEMU stand-ins, both bridges and the clients, asserts everything
//! itself, stops all it started and prints one JSON line. The test checks
//! `"ok":true` and a few key fields and records the measurements.
//!
//! Like the AMQP tests, these need a broker: RabbitMQ's server, pika and
//! qpid-proton for /usr/bin/python3, and root (network namespaces). Without
//! them a test prints why and passes, unless `VIOS_REQUIRE_BROKER=1` (set by
//! the test command) makes that a failure. The scenarios run one at a time
//! (they share a 2-core machine).
//!

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vios_tests::TempDir;

const PYTHON: &str = "/usr/bin/python3";
const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

static SERIAL: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("amqp")
        .join("broker_scenarios.py")
}

/// Why the scenarios cannot run on this machine, if they cannot.
fn missing() -> Option<String> {
    if !Path::new(RABBITMQ_SERVER).exists() {
        return Some(format!("{RABBITMQ_SERVER} is missing (run scripts/deps)"));
    }
    let imports = Command::new(PYTHON)
        .args(["-c", "import pika, proton"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(imports, Ok(s) if s.success()) {
        return Some(format!(
            "{PYTHON} cannot import pika and proton (run scripts/deps)"
        ));
    }
    let uid = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned));
    if uid.as_deref() != Some("0") {
        return Some("not root: the scenarios need network namespaces".into());
    }
    None
}

/// Whether to run; a missing broker is a failure under VIOS_REQUIRE_BROKER.
fn broker_available() -> bool {
    match missing() {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("VIOS_REQUIRE_BROKER").is_none(),
                "no broker for the scenarios: {why}"
            );
            eprintln!("SKIP: no broker for the scenarios: {why}");
            false
        }
    }
}

/// The scenario's result line.
struct Outcome {
    json: String,
}

impl Outcome {
    /// The JSON text after the first `"key":` (keys checked here are unique
    /// in the document).
    fn after(&self, key: &str) -> &str {
        let pat = format!("\"{key}\":");
        let at = self
            .json
            .find(&pat)
            .unwrap_or_else(|| panic!("no {key} in {}", self.json));
        &self.json[at + pat.len()..]
    }

    fn num(&self, key: &str) -> f64 {
        let rest = self.after(key);
        let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
        rest[..end]
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number in {}", self.json))
    }

    /// A string value, unescaped.
    fn str(&self, key: &str) -> String {
        let rest = self
            .after(key)
            .strip_prefix('"')
            .unwrap_or_else(|| panic!("{key} is not a string in {}", self.json));
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return out,
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('u') => {
                        let hex: String = chars.by_ref().take(4).collect();
                        let code = u32::from_str_radix(&hex, 16).unwrap_or(0xfffd);
                        out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                    }
                    Some(other) => out.push(other),
                    None => break,
                },
                c => out.push(c),
            }
        }
        panic!("unterminated string {key} in {}", self.json)
    }
}

/// Runs one scenario to its end (SIGTERM after `limit`, which makes it clean
/// up and report) and returns its result; panics unless it was ok.
fn run(scenario: &str, limit: Duration) -> Outcome {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new(&format!("broker-{scenario}"));
    let notes = dir.join("notes.log");
    let mut cmd = Command::new(PYTHON);
    cmd.arg(script())
        .arg(scenario)
        .arg("--bin")
        .arg(vios_tests::bin_dir())
        .arg("--repo")
        .arg(repo())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Notes to a file: nothing the scenario starts can hold our pipe open.
        .stderr(fs::File::create(&notes).expect("notes file"));
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run {PYTHON} {}: {e}", script().display()));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut stopped = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the scenario") {
            break st;
        }
        if !stopped && start.elapsed() > limit {
            // SIGTERM: the scenario stops what it started and reports.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            stopped = true;
        }
        if start.elapsed() > limit + Duration::from_secs(120) {
            let _ = child.kill();
            break child.wait().expect("reap the scenario");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().unwrap_or_default();
    let notes_text = fs::read_to_string(&notes).unwrap_or_default();
    let json = out.lines().rev().find(|l| l.starts_with('{')).map(str::to_owned);
    let tail: Vec<&str> = notes_text.lines().rev().take(80).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let Some(json) = json else {
        panic!(
            "scenario {scenario} printed no result ({status}); notes:\n{}",
            tail.join("\n")
        );
    };
    assert!(
        status.success() && json.contains("\"ok\":true"),
        "scenario {scenario} failed ({status}, {:.0?}):\n{json}\nnotes:\n{}",
        start.elapsed(),
        tail.join("\n")
    );
    eprintln!("{scenario}: {json}");
    Outcome { json }
}

#[test]
fn broker_proxy_v2_gives_each_guest_its_identity() {
    if !broker_available() {
        return;
    }
    let o = run("proxy", Duration::from_secs(150));
    assert_eq!(o.num("proxy_connections") as u64, 8, "{}", o.json);
    assert_eq!(o.num("proxy_distinct_identities") as u64, 2, "{}", o.json);
    assert_eq!(o.num("broker_log_accepts_with_identity") as u64, 8, "{}", o.json);
    let a = o.str("identity_vm_a");
    assert!(a.starts_with("fd56:696f:7300:"), "vm-a's identity {a}");
    assert_eq!(o.str("identity_vm_b"), "198.51.100.7");
    // rabbitmqctl list_connections peer_host peer_port user protocol: every
    // row is a guest's identity with its own user; peer ports are stream ids.
    let rows = o.str("list_connections");
    let rows: Vec<Vec<&str>> = rows.lines().skip(1).map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 4, "list_connections: {rows:?}");
    for r in &rows {
        let who = if r[0] == a { "vm-a" } else { "vm-b" };
        assert!(r[0] == a || r[0] == "198.51.100.7", "peer {r:?}");
        assert_eq!(r[2], who, "user of {r:?}");
        assert!(r[1].parse::<u16>().is_ok(), "peer port of {r:?}");
    }
    let split = o.num("proxy_header_split") as u64;
    let streams = o.num("proxy_header_streams") as u64;
    assert_eq!(split, 0, "PROXY headers split over two reads: {}", o.json);
    vios_tests::record_figure(&format!(
        "broker proxy: RabbitMQ (proxy_protocol = true) sees each guest's identity and the stream id as \
         peer: vm-a {a}, vm-b 198.51.100.7 (assigned), 4 AMQP 0-9-1 + 4 AMQP 1.0 connections \
         (list_connections / list_channels); {streams} headers decoded: source = identity, \
         source port = stream id, each header in the service's first read"
    ));
}

#[test]
fn broker_trust_guest_account_refused_through_the_bridge() {
    if !broker_available() {
        return;
    }
    let o = run("trust", Duration::from_secs(150));
    assert_eq!(o.str("bridge_guest_login"), "refused", "{}", o.json);
    assert!(
        o.str("bridge_guest_error").contains("ACCESS_REFUSED"),
        "{}",
        o.json
    );
    assert!(
        o.str("broker_refusal_log")
            .contains("user 'guest' can only connect via localhost"),
        "{}",
        o.json
    );
    assert_eq!(o.str("direct_guest_127_0_0_1"), "accepted", "{}", o.json);
    assert_eq!(o.str("bridge_vm_a_login"), "accepted", "{}", o.json);
    assert_eq!(o.num("nonloopback_bridge_warnings") as u64, 0, "{}", o.json);
    assert!(
        o.str("loopback_warning").contains("a loopback address"),
        "{}",
        o.json
    );
    vios_tests::record_figure(
        "broker trust: service on 198.18.0.1 (namespace): guest/guest through the bridge refused \
         (403 ACCESS_REFUSED, broker: \"user 'guest' can only connect via localhost\"), guest/guest \
         host-local on 127.0.0.1 accepted, the guest's own user vm-a accepted through the bridge; \
         loopback warning only for a 127.0.0.1 service without loopback=ok (through which guest/guest \
         is accepted)",
    );
}

#[test]
fn broker_policy_refuses_services_a_guest_may_not_open() {
    if !broker_available() {
        return;
    }
    let o = run("policy", Duration::from_secs(150));
    let max_ms = o.num("not_permitted_reset_max_ms");
    assert!(max_ms < 1000.0, "{}", o.json);
    assert!(o.json.contains("\"vm-a\":\"UNKNOWN_SERVICE\""), "{}", o.json);
    assert_eq!(o.num("vm_a_amqp_messages") as u64, 10, "{}", o.json);
    assert_eq!(o.num("vm_b_amqp_messages") as u64, 10, "{}", o.json);
    assert_eq!(o.num("vm_b_echo_bytes") as u64, 256 * 1024, "{}", o.json);
    vios_tests::record_figure(&format!(
        "broker policy: --allow vm-a=amqp, vm-b=amqp,echo: vm-a's echo client reset with NOT_PERMITTED \
         within {max_ms:.2} ms (max of 5), nothing reached the echo server; vm-a AMQP, vm-b echo and \
         AMQP work; an unknown name gives UNKNOWN_SERVICE"
    ));
}

#[test]
fn broker_failover_to_the_surviving_cluster_node() {
    if !broker_available() {
        return;
    }
    let o = run("failover", Duration::from_secs(300));
    let trials = o.num("trials") as u64;
    assert!(trials >= 20, "{}", o.json);
    assert_eq!(o.num("resets_seen") as u64, trials, "{}", o.json);
    assert_eq!(o.num("messages_lost") as u64, 0, "{}", o.json);
    assert_eq!(o.num("killed_node1") as u64, trials / 2, "{}", o.json);
    let p50 = o.num("recovery_p50_s");
    let max = o.num("recovery_max_s");
    let reset = o.num("reset_after_kill_p50_s");
    let restart = o.num("restart_p50_s");
    let msgs = o.num("messages_confirmed_before_kills") as u64;
    let retried = o.num("streams_retried_to_survivor") as u64;
    vios_tests::record_figure(&format!(
        "broker failover: 2-node cluster, {trials} kills of the node the client was on (alternating): \
         client saw a reset every time ({reset:.3} s after the kill command, p50); new AMQP connection \
         with a confirmed publish through the bridge after {p50:.3} s p50, {max:.3} s max; {msgs} \
         confirmed messages all on the survivor; node restart {restart:.1} s p50, then new streams \
         use node 1 again; {retried} stream(s) that found the dead node went on to the survivor"
    ));
}

#[test]
fn broker_reload_resets_exactly_what_changed() {
    if !broker_available() {
        return;
    }
    let o = run("reload", Duration::from_secs(150));
    assert!(
        o.json.contains(
            "\"reset_by_step\":{\"a\":[],\"b\":[\"vm-a.echo2\"],\"c\":[\"vm-b.echo1\"],\"d\":[],\"d2\":[]}"
        ),
        "{}",
        o.json
    );
    let b = o.num("step_b_reset_after_sighup_ms");
    let c = o.num("step_c_reset_after_sighup_ms");
    vios_tests::record_figure(&format!(
        "broker reload (SIGHUP, 5 streams with traffic): add echo3: nothing reset; remove echo2: only \
         vm-a's echo2 stream reset ({b:.0} ms after SIGHUP); vm-b only amqp: only vm-b's echo1 reset \
         ({c:.0} ms); broken file: refused, nothing reset"
    ));
}
