//! Real broker, unmodified clients: RabbitMQ behind the host bridge, the
//! pika (AMQP 0-9-1) and qpid-proton (AMQP 1.0) client libraries in front of
//! the guest bridge, exactly as they would connect to a local broker.
//!
//! The broker is started by the test command (`scripts/test`), which sets
//! `VIOS_TEST_AMQP_PORT`. Without it these tests print why and pass, unless
//! `VIOS_REQUIRE_BROKER=1` (set by the test command) makes that a failure.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use vios_tests::{Rig, RigSpec};

const PYTHON: &str = "/usr/bin/python3";
const CONNECTIONS: usize = 8;
const MESSAGES: usize = 10_000;

static SERIAL: Mutex<()> = Mutex::new(());

fn broker_port() -> Option<u16> {
    match std::env::var("VIOS_TEST_AMQP_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        Some(p) => Some(p),
        None => {
            let why = "VIOS_TEST_AMQP_PORT is not set: no broker (run scripts/test, which starts RabbitMQ)";
            assert!(std::env::var_os("VIOS_REQUIRE_BROKER").is_none(), "{why}");
            eprintln!("SKIP: {why}");
            None
        }
    }
}

fn client(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("amqp").join(name)
}

/// One load run; returns messages per second. Panics unless every message
/// was verified by content hash.
fn load(script: &str, port: u16, run: &str) -> f64 {
    let prefix = format!("{}-{run}", script.trim_end_matches(".py"));
    let out = Command::new(PYTHON)
        .arg(client(script))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--connections",
            &CONNECTIONS.to_string(),
            "--messages",
            &MESSAGES.to_string(),
        ])
        .args(["--queue-prefix", &prefix, "--timeout", "240"])
        .output()
        .unwrap_or_else(|e| panic!("run {PYTHON} {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} via port {port} failed: {stdout}\n{stderr}"
    );
    let field = |name: &str| -> f64 {
        let at = stdout
            .find(&format!("\"{name}\":"))
            .unwrap_or_else(|| panic!("no {name} in {stdout}"));
        let rest = &stdout[at + name.len() + 3..];
        let end = rest.find([',', '}']).unwrap();
        rest[..end].trim().parse().unwrap()
    };
    assert_eq!(field("verified") as usize, MESSAGES, "{stdout}");
    assert_eq!(field("messages") as usize, MESSAGES, "{stdout}");
    field("msgs_per_sec")
}

fn run_client(script: &str, label: &str) {
    let Some(port) = broker_port() else { return };
    let rig = Rig::start(RigSpec::new("amqp", ([127, 0, 0, 1], port).into()));
    // One client run at a time over the whole binary, in the order
    // direct, bridged, bridged, direct, so drift hits both paths alike.
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut direct = load(script, port, "direct-a");
    let mut bridged = load(script, rig.guest_port, "bridged-a");
    bridged += load(script, rig.guest_port, "bridged-b");
    direct += load(script, port, "direct-b");
    let (direct, bridged) = (direct / 2.0, bridged / 2.0);
    vios_tests::record_figure(&format!(
        "{label}: {CONNECTIONS} connections x {MESSAGES} messages per run, every message verified; \
         mean of 2 interleaved runs each: {bridged:.0} msg/s through the bridge, \
         {direct:.0} msg/s direct ({:.0}%)",
        100.0 * bridged / direct
    ));
    // Every connection went through the bridge, on one session, and was
    // closed. (RabbitMQ closes its sockets with linger 0, so after the AMQP
    // close handshake the broker's reset reaches the client as a reset.)
    let host_log = rig.host().log_text();
    let opened = host_log.matches("connected to 127.0.0.1").count();
    assert!(opened >= CONNECTIONS, "only {opened} streams reached the broker");
    assert!(
        !host_log.contains("session ended"),
        "the session must survive the load:\n{host_log}"
    );
    rig.host().wait_log("closed:", opened, Duration::from_secs(10));
}

#[test]
fn pika_amqp_0_9_1_through_the_bridge() {
    run_client("pika_load.py", "pika (AMQP 0-9-1)");
}

#[test]
fn proton_amqp_1_0_through_the_bridge() {
    run_client("proton_load.py", "qpid-proton (AMQP 1.0)");
}
