//! A hostile guest against the host bridge (issues 4 and 8).
//!
//! One host bridge serves two guests: `bad`, played by `vios-hostile` (a
//! compromised guest writing raw protocol, well-formed or not, at full
//! speed, straight into the socket(s) the host bridge connects to; one
//! driver per channel), and `good`, a real guest bridge behind the QEMU
//! stand-in. For each attack the test measures the good guest's echo
//! throughput and round-trip p99 with the bad guest idle (the baseline,
//! before the attack) and under attack, and asserts:
//! - the attack happened: the driver's own counters (bytes and frames it
//!   sent, sessions it made) say so;
//! - the good guest keeps at least 80% of its throughput and a p99 within 2x;
//! - the host bridge's peak memory and descriptors stay within bounds;
//! - the offending session ends with the expected code (from the host log and
//!   from what the driver received), and the host keeps serving.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vios_tests::vm::{json_line, json_num};
use vios_tests::{bin, fd_count, proc_status_kib, standin_at, wait_path, Proc, TempDir};

/// The host bridge's memory may not pass this (VmHWM), whatever the guest does.
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// Streams per guest; descriptors stay within this plus a few for channels.
const MAX_STREAMS: u32 = 256;
const FD_BOUND: usize = 2 * MAX_STREAMS as usize + 32;
/// How long each attack runs; the measurements must fit in it.
const ATTACK_SECONDS: u64 = 13;
/// Measurements of the good guest before and during each attack: single
/// runs on a busy 2-core machine vary by ±20%; the medians of 7 hold still
/// enough for the 80% bound.
const SAMPLES: usize = 7;

/// The arenas share the machine's two cores: one attack at a time.
static ONE_ARENA: Mutex<()> = Mutex::new(());

/// How an arena is set up.
struct Opts {
    /// Channels of the bad guest, one driver each.
    bad_channels: usize,
    /// More host-bridge options.
    host_extra: Vec<String>,
    /// Run the host bridge under `prlimit --nofile=N:N`.
    nofile: Option<usize>,
    /// How long the attack lasts; the measurements must end before it does.
    attack_seconds: u64,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            bad_channels: 1,
            host_extra: vec![],
            nofile: None,
            attack_seconds: ATTACK_SECONDS,
        }
    }
}

struct Arena {
    host: Proc,
    _good_guest: Proc,
    _good_standin: Proc,
    _servers: Vec<Proc>,
    good_port: u16,
    bad_socks: Vec<PathBuf>,
    dir: TempDir,
}

/// Starts `vios-load serve` in `mode` and returns it with its address.
fn serve(dir: &Path, mode: &str) -> (Proc, String) {
    let ready = dir.join(format!("{mode}.addr"));
    let p = Proc::spawn(
        &format!("serve-{mode}"),
        Command::new(bin("vios-load"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--mode",
                mode,
                "--timeout",
                "0",
            ])
            .arg("--ready-file")
            .arg(&ready),
        dir.join(format!("serve-{mode}.log")),
    );
    wait_path(&ready, Duration::from_secs(5));
    let addr = wait_content(&ready);
    (p, addr)
}

/// The first line of a file another process writes, once it is complete.
fn wait_content(p: &Path) -> String {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let s = std::fs::read_to_string(p).unwrap_or_default();
        if s.ends_with('\n') {
            return s.trim().to_owned();
        }
        assert!(Instant::now() < end, "{} stayed incomplete", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Host log lines of the bad guest's sessions, on any of its channels.
fn bad_sessions(log: &str, what: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("guest bad ") && l.contains(what))
        .count()
}

impl Arena {
    fn start(opts: &Opts) -> Arena {
        let dir = TempDir::new("hostile");
        let (echo, echo_addr) = serve(dir.path(), "echo");
        let (sink, sink_addr) = serve(dir.path(), "sink");
        let (source, source_addr) = serve(dir.path(), "source");
        let bad_socks: Vec<PathBuf> = (0..opts.bad_channels)
            .map(|i| dir.join(&format!("bad-{i}.sock")))
            .collect();
        let bad_list = bad_socks
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let good_host = dir.join("good-host.sock");
        let good_guest_sock = dir.join("good-guest.sock");
        let standin = standin_at(&good_host, &good_guest_sock, dir.join("standin.log"));
        let mut cmd = match opts.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(bin("vios-host-bridge"));
                c
            }
            None => Command::new(bin("vios-host-bridge")),
        };
        cmd.arg("--guest")
            .arg(format!("bad={bad_list}"))
            .arg("--guest")
            .arg(format!("good={}", good_host.display()))
            .args(["--service", &format!("echo={echo_addr}")])
            .args(["--service", &format!("sink={sink_addr}")])
            .args(["--service", &format!("source={source_addr}")])
            .args(["--max-streams", &MAX_STREAMS.to_string()])
            .args(["--idle-timeout", "3s", "--write-stall-timeout", "4s"])
            .args(&opts.host_extra);
        let host = Proc::spawn("host-bridge", &mut cmd, dir.join("host.log"));
        let good_port = vios_tests::free_port();
        // One local user runs every client here: it may have all the streams.
        let guest = Proc::spawn(
            "good-guest-bridge",
            Command::new(bin("vios-guest-bridge"))
                .arg("--channel")
                .arg(format!("unix:{}", good_guest_sock.display()))
                .args(["--listen", &format!("127.0.0.1:{good_port}=echo")])
                .args(["--user-shares", "false"]),
            dir.join("good-guest.log"),
        );
        guest.wait_log("session established", 1, Duration::from_secs(10));
        Arena {
            host,
            _good_guest: guest,
            _good_standin: standin,
            _servers: vec![echo, sink, source],
            good_port,
            bad_socks,
            dir,
        }
    }

    /// Starts one driver per bad channel (in the background); they write
    /// `<mode>-<i>.started` once their attack is under way.
    fn attack(&self, mode: &str, seconds: u64, extra: &[&str]) -> Vec<Proc> {
        let mut drivers = Vec::new();
        for (i, sock) in self.bad_socks.iter().enumerate() {
            let mut cmd = Command::new(bin("vios-hostile"));
            cmd.arg("--listen")
                .arg(sock)
                .args(["--mode", mode, "--seconds", &seconds.to_string()])
                .arg("--started-file")
                .arg(self.dir.join(&format!("{mode}-{i}.started")))
                .args(extra);
            let log = self.dir.join(&format!("hostile-{mode}-{i}.log"));
            // Proc sends stdout to /dev/null; the JSON report goes to a file.
            let report = self.dir.join(&format!("hostile-{mode}-{i}.json"));
            let _ = std::fs::remove_file(&report);
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(format!("exec \"$0\" \"$@\" >{}", report.display()));
            sh.arg(cmd.get_program()).args(cmd.get_args());
            drivers.push(Proc::spawn(&format!("hostile-{mode}-{i}"), &mut sh, log));
        }
        drivers
    }

    /// Waits until every driver of `mode` says its attack began.
    fn wait_started(&self, mode: &str) {
        for i in 0..self.bad_socks.len() {
            wait_path(
                &self.dir.join(&format!("{mode}-{i}.started")),
                Duration::from_secs(30),
            );
        }
    }

    /// The drivers' reports, once all are written.
    fn reports(&self, mode: &str, within: Duration) -> Vec<String> {
        let end = Instant::now() + within;
        (0..self.bad_socks.len())
            .map(|i| {
                let p = self.dir.join(&format!("hostile-{mode}-{i}.json"));
                loop {
                    let r = std::fs::read_to_string(&p).unwrap_or_default();
                    if r.ends_with('\n') {
                        return r;
                    }
                    assert!(Instant::now() < end, "vios-hostile --mode {mode} did not report");
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .collect()
    }

    /// The good guest's echo throughput (MB/s, both directions) and round-trip
    /// p99 (µs), measured back to back.
    fn measure(&self) -> (f64, f64) {
        let addr = format!("127.0.0.1:{}", self.good_port);
        let bulk = run_load(&[
            "bulk",
            "--connect",
            &addr,
            "--streams",
            "4",
            "--bytes",
            "32M",
            "--direction",
            "both",
        ]);
        let rtt = run_load(&["rtt", "--connect", &addr, "--count", "2000", "--warmup", "200"]);
        let mb = json_num(&bulk, "mb_per_s");
        let us = rtt.split("\"us\":").nth(1).map(|r| json_num(r, "p99")).unwrap();
        (mb, us)
    }

    fn host_pid(&self) -> u32 {
        self.host.pid()
    }
}

fn run_load(args: &[&str]) -> String {
    let out = Command::new(bin("vios-load"))
        .args(args)
        .output()
        .expect("run vios-load");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vios-load {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_line(&stdout, "\"cmd\"")
}

/// `n` measurements of throughput and p99.
fn measure_n(a: &Arena, n: usize) -> Vec<(f64, f64)> {
    (0..n).map(|_| a.measure()).collect()
}

/// The medians of throughput and of p99, taken separately. One run is short
/// and single runs on a busy 2-core machine vary by ±15%, more than the
/// margin the bounds leave; medians of several do not.
fn medians(m: &[(f64, f64)]) -> (f64, f64) {
    let mut t: Vec<f64> = m.iter().map(|x| x.0).collect();
    let mut p: Vec<f64> = m.iter().map(|x| x.1).collect();
    t.sort_by(f64::total_cmp);
    p.sort_by(f64::total_cmp);
    (t[t.len() / 2], p[p.len() / 2])
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// A number inside one object of a driver's report, e.g. the count of
/// `TIMEOUT` among the RESETs: `field_in(r, "reset", "TIMEOUT")`.
fn field_in(report: &str, object: &str, field: &str) -> f64 {
    let Some(at) = report.find(&format!("\"{object}\":{{")) else {
        return 0.0;
    };
    let inner = &report[at..];
    let end = inner.find("},\"").map_or(inner.len(), |e| e + 1);
    let inner = &inner[..end];
    if inner.contains(&format!("\"{field}\":")) {
        json_num(inner, field)
    } else {
        0.0
    }
}

/// What an attack left for the test to check.
struct Outcome {
    reports: Vec<String>,
    log: String,
    /// Host CPU seconds per second in the first 2 s of the attack.
    host_cpu: f64,
    /// The host bridge's peak RSS (KiB).
    hwm: u64,
}

impl Outcome {
    /// A counter summed over the drivers' reports.
    fn sum(&self, field: &str) -> f64 {
        self.reports
            .iter()
            .filter(|r| r.contains(&format!("\"{field}\":")))
            .map(|r| json_num(r, field))
            .sum()
    }

    fn sum_in(&self, object: &str, field: &str) -> f64 {
        self.reports.iter().map(|r| field_in(r, object, field)).sum()
    }
}

/// Runs one attack with the default arena and checks every bound; `expect`
/// must appear in the host's log.
fn attack(mode: &str, extra: &[&str], expect: &[&str]) -> Outcome {
    attack_in(&Opts::default(), mode, extra, expect, |_, _| {})
}

/// [`attack`] in an arena set up by `opts`, calling `during` once the
/// drivers' attacks are under way (to freeze one, say).
fn attack_in(
    opts: &Opts,
    mode: &str,
    extra: &[&str],
    expect: &[&str],
    during: impl Fn(&Arena, &[Proc]),
) -> Outcome {
    let _one = ONE_ARENA.lock().unwrap_or_else(|e| e.into_inner());
    let a = Arena::start(opts);
    let channels = a.bad_socks.len();
    // Baseline, before the attack: the bad guest connected but idle.
    let idle = a.attack("idle", 600, &[]);
    a.host
        .wait_log("session established", 1 + channels, Duration::from_secs(10));
    let mut baseline = measure_n(&a, SAMPLES);
    drop(idle);
    a.host
        .wait_log("session ended", channels, Duration::from_secs(10));

    let drivers = a.attack(mode, opts.attack_seconds, extra);
    let t = Instant::now();
    a.wait_started(mode);
    let cpu0 = cpu_seconds(a.host_pid());
    let c0 = Instant::now();
    // A first look at what the attack alone costs the host.
    std::thread::sleep(Duration::from_secs(2));
    let host_cpu = (cpu_seconds(a.host_pid()) - cpu0) / c0.elapsed().as_secs_f64();
    during(&a, &drivers);
    let (mb, p99) = medians(&measure_n(&a, SAMPLES));
    let took = t.elapsed();
    let hwm = proc_status_kib(a.host_pid(), "VmHWM:");
    let fds = fd_count(a.host_pid());
    let reports = a.reports(mode, Duration::from_secs(opts.attack_seconds + 15));
    drop(drivers);
    // The host keeps serving: a new session with a well-behaved bad guest.
    let n = bad_sessions(&a.host.log_text(), "session established");
    let _again = a.attack("idle", 60, &[]);
    let end = Instant::now() + Duration::from_secs(40);
    while bad_sessions(&a.host.log_text(), "session established") < n + channels {
        assert!(Instant::now() < end, "the host did not serve the bad guest again");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The baseline is measured before and again after the attack (the bad
    // guest idle both times): one stretch of machine noise before it cannot
    // set the bar.
    baseline.extend(measure_n(&a, SAMPLES));
    let (base_mb, base_p99) = medians(&baseline);
    let line = format!(
        "attack {mode}: good guest {mb:.0} MB/s (baseline {base_mb:.0}, {:.0}%), rtt p99 {p99:.0} us \
         (baseline {base_p99:.0}, {:.2}x); host peak RSS {} KiB, {fds} fds, {:.2} core during the attack",
        100.0 * mb / base_mb,
        p99 / base_p99,
        hwm,
        host_cpu
    );
    vios_tests::record_figure(&line);
    assert!(
        took < Duration::from_secs(opts.attack_seconds - 1),
        "measurements outlasted the attack: {took:?}"
    );
    assert!(hwm <= RSS_BOUND_KIB, "{line}");
    assert!(fds <= FD_BOUND, "{line}");
    assert!(
        mb >= 0.8 * base_mb,
        "good guest throughput fell below 80%: {line}"
    );
    assert!(p99 <= 2.0 * base_p99, "good guest p99 more than doubled: {line}");
    let log = a.host.log_text();
    for e in expect {
        assert!(
            log.contains(e),
            "host log lacks {e:?} after {mode}; drivers: {reports:?}\nlog tail:\n{}",
            tail(&log)
        );
    }
    Outcome {
        reports,
        log,
        host_cpu,
        hwm,
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The attack reached the host: the driver made a session and sent at
/// least `bytes` and `frames`.
fn sent(o: &Outcome, bytes: f64, frames: f64) {
    assert!(o.sum("sessions") >= 1.0, "no session: {:?}", o.reports);
    assert!(
        o.sum("bytes_sent") >= bytes && o.sum("frames_sent") >= frames,
        "the attack was not sent ({bytes} bytes, {frames} frames expected): {:?}",
        o.reports
    );
}

#[test]
fn control_frame_flood_while_never_reading() {
    let o = attack(
        "ping-flood",
        &[],
        &["ENHANCE_YOUR_CALM: more than 100000 control frames per second"],
    );
    sent(&o, 2e6, 100_000.0);
    assert!(o.sum("pings_queued") >= 100_000.0);
}

#[test]
fn reset_flood() {
    let o = attack("reset-flood", &[], &["ENHANCE_YOUR_CALM"]);
    sent(&o, 1e6, 100_000.0);
    assert!(o.sum("resets_queued") >= 100_000.0);
    assert!(o.sum_in("goaway", "ENHANCE_YOUR_CALM") >= 1.0, "{:?}", o.reports);
}

#[test]
fn open_reset_churn() {
    let o = attack("open-reset", &[], &["ENHANCE_YOUR_CALM"]);
    sent(&o, 1e5, 4000.0);
    assert!(o.sum("opens_sent") >= 2000.0);
}

#[test]
fn a_million_opens() {
    let o = attack(
        "million-opens",
        &["--service", "sink"],
        &["RESOURCE_LIMIT", "ENHANCE_YOUR_CALM"],
    );
    sent(&o, 1e5, 5000.0);
    assert!(o.sum_in("refuse", "RESOURCE_LIMIT") >= 1.0, "{:?}", o.reports);
}

#[test]
fn credit_overrun() {
    let o = attack(
        "credit-overrun",
        &["--service", "sink"],
        &["FLOW_CONTROL_ERROR: DATA of"],
    );
    sent(&o, 1e6, 10.0);
    assert!(o.sum_in("reset", "FLOW_CONTROL_ERROR") >= 1.0, "{:?}", o.reports);
}

#[test]
fn credit_overflow() {
    let o = attack(
        "credit-overflow",
        &["--service", "sink"],
        &["FLOW_CONTROL_ERROR: credit overflow"],
    );
    sent(&o, 1e4, 100.0);
    assert!(o.sum("credits_queued") >= 100.0);
}

#[test]
fn one_byte_frames_at_line_rate() {
    let o = attack("tiny-frames", &["--service", "sink"], &[]);
    sent(&o, 1e6, 100_000.0);
    assert!(o.sum("data_frames_queued") >= 100_000.0);
}

#[test]
fn empty_frames() {
    let o = attack(
        "empty-frames",
        &["--service", "sink"],
        &["PROTOCOL_ERROR: bad Data payload: empty DATA"],
    );
    sent(&o, 1e4, 100.0);
}

#[test]
fn length_field_of_all_ones() {
    let o = attack(
        "huge-length",
        &["--service", "sink"],
        &["Data frame of 4294967295 bytes exceeds the limit"],
    );
    assert!(o.sum("huge_headers_queued") >= 1.0, "{:?}", o.reports);
}

#[test]
fn handshake_one_byte_per_second() {
    let o = attack("slow-hello", &[], &[]);
    assert_eq!(
        o.sum("sessions"),
        0.0,
        "a HELLO trickling in must never establish"
    );
    assert!(
        o.sum("bytes_sent") >= 5.0,
        "the HELLO was not sent: {:?}",
        o.reports
    );
}

#[test]
fn second_handshake_in_a_loop() {
    let o = attack("second-hello", &[], &["peer restarted"]);
    assert!(o.sum("fresh_hellos") >= 2.0, "{:?}", o.reports);
}

#[test]
fn address_like_and_unknown_service_names() {
    let o = attack("bad-names", &[], &["UNKNOWN_SERVICE: not a service name"]);
    let r = &o.reports[0];
    for name in ["127.0.0.1:22", "[::1]:22", "/etc/passwd"] {
        assert!(r.contains(name), "{name} not tried: {r}");
    }
    assert!(!r.contains("ACCEPT"), "an address-like name was accepted: {r}");
}

#[test]
fn grants_credit_but_never_drains() {
    let o = attack(
        "no-drain",
        &["--service", "source", "--streams", "64"],
        &["TIMEOUT: peer read nothing for 4 s"],
    );
    assert!(
        o.sum("opens_sent") >= 64.0 && o.sum("credits_queued") >= 64.0,
        "{:?}",
        o.reports
    );
}

#[test]
fn garbage_at_line_rate() {
    let o = attack("garbage", &[], &["PROTOCOL_ERROR"]);
    assert!(o.sum("garbage_bytes_queued") >= 1e6, "{:?}", o.reports);
}

#[test]
fn frozen_guest() {
    // A guest that stops dead (SIGSTOP) with its session up: the host notices
    // within its idle timeout (3 s here), resets and frees what the guest had.
    // The attack lasts the idle timeout longer: `during` waits for it.
    let opts = Opts {
        attack_seconds: ATTACK_SECONDS + 4,
        ..Opts::default()
    };
    attack_in(
        &opts,
        "idle",
        &[],
        &["session ended: nothing received for 3000 ms"],
        |a, drivers| {
            drivers[0].signal("STOP");
            a.host.wait_log(
                "session ended: nothing received for 3000 ms",
                1,
                Duration::from_secs(10),
            );
            drivers[0].signal("CONT");
        },
    );
}

/// Memory follows the host's settings, never what the guest declares: a
/// guest declaring the largest frame (16 MiB) and window (2^31-1) on every
/// channel, opening 64 streams to a service that sends and never reading.
fn declared_maximum_on(channels: usize) {
    let opts = Opts {
        bad_channels: channels,
        ..Opts::default()
    };
    let o = attack_in(
        &opts,
        "no-drain",
        &["--declare-max", "--service", "source", "--streams", "64"],
        &["TIMEOUT: peer read nothing for 4 s"],
        |_, _| {},
    );
    assert!(o.sum("sessions") >= channels as f64, "{:?}", o.reports);
    assert!(o.sum("opens_sent") >= 64.0 * channels as f64, "{:?}", o.reports);
    // The README's bound: 16 MiB for the process, the good guest's traffic
    // and its streams, plus at most 2.2 MiB per channel of the bad guest
    // (its receive buffer, at most twice the host's 256 KiB frame, and its
    // transmit buffer, at most 1 MiB of DATA, one frame and 64 KiB of
    // replies), whatever the guest declares.
    let bound = 16 * 1024 + channels as u64 * 2253;
    assert!(o.hwm <= bound, "peak RSS {} KiB, bound {bound} KiB", o.hwm);
}

#[test]
fn a_guest_declaring_the_maximum_on_one_channel() {
    declared_maximum_on(1);
}

#[test]
fn a_guest_declaring_the_maximum_on_three_channels() {
    declared_maximum_on(3);
}

#[test]
fn a_guest_declaring_the_maximum_on_eight_channels() {
    declared_maximum_on(8);
}

#[test]
fn goaway_churn_is_held_off_like_any_failure() {
    let o = attack("goaway-churn", &[], &[]);
    let sessions = o.sum("sessions");
    // 12 at once (twice the rate of 6 a minute), then failures: at once,
    // then holds of 1, 2, 4 and 8 s. Without the rule: thousands.
    assert!(o.sum("goaways_queued") >= 12.0, "{:?}", o.reports);
    assert!(
        (12.0..=19.0).contains(&sessions),
        "{sessions} sessions in {ATTACK_SECONDS} s of GOAWAY churn: {:?}",
        o.reports
    );
}

#[test]
fn a_magic_spray_costs_little_cpu() {
    let o = attack("magic-spray", &[], &[]);
    assert!(
        o.sum("candidates_queued") >= 100_000.0 && o.sum("bytes_sent") >= 5e6,
        "the spray was not sent: {:?}",
        o.reports
    );
    assert_eq!(o.sum("sessions"), 0.0);
    assert!(
        o.host_cpu <= 0.15,
        "the host spent {:.2} core on the spray",
        o.host_cpu
    );
}

#[test]
fn exactly_max_streams_across_channels() {
    let opts = Opts {
        bad_channels: 3,
        ..Opts::default()
    };
    let o = attack_in(
        &opts,
        "million-opens",
        &["--service", "sink", "--count", "200"],
        &["guest has its limit of 256 streams open"],
        |_, _| {},
    );
    let accepted = o.sum_in("frames_read", "accept");
    assert_eq!(accepted, f64::from(MAX_STREAMS), "{:?}", o.reports);
    assert_eq!(o.sum("opens_sent"), 600.0);
}

#[test]
fn forged_log_lines_never_start_a_line() {
    let o = attack("forge-log", &["--service", "sink"], &["FORGED"]);
    assert!(o.sum("resets_queued") >= 3.0 && o.sum("goaways_queued") >= 1.0);
    for line in o.log.lines() {
        assert!(
            line.starts_with('[') && !line.contains('\x1b') && !line.contains('\u{2028}'),
            "a peer made this line: {line:?}"
        );
    }
    assert!(o.log.contains("x\\nFORGED"), "the text is logged, escaped");
}

#[test]
fn a_descriptor_hogging_guest_leaves_the_neighbour_its_streams() {
    // 500 descriptors: about 360 for streams after the reserve. Without
    // shares the bad guest would take its 256 and leave the good one too
    // few; with them it gets a third (room for the good guest and one more).
    let opts = Opts {
        nofile: Some(500),
        ..Opts::default()
    };
    let o = attack_in(
        &opts,
        "million-opens",
        &["--service", "sink", "--count", "400"],
        &["share of"],
        |a, _| {
            let addr = format!("127.0.0.1:{}", a.good_port);
            let r = run_load(&["hold", "--connect", &addr, "--streams", "100", "--seconds", "1"]);
            assert!(
                r.contains("\"ok\":true"),
                "the good guest could not open 100 streams: {r}"
            );
        },
    );
    let accepted = o.sum_in("frames_read", "accept");
    assert!(
        accepted < 256.0 && accepted > 50.0,
        "the hog got {accepted}: {:?}",
        o.reports
    );
}

#[test]
fn trickled_streams_are_reset_by_the_quiet_rule() {
    let opts = Opts {
        host_extra: [
            "--max-quiet-streams",
            "16",
            "--quiet-window",
            "2s",
            "--quiet-bytes",
            "64",
        ]
        .map(String::from)
        .to_vec(),
        ..Opts::default()
    };
    let o = attack_in(
        &opts,
        "trickle",
        &["--service", "sink", "--streams", "64"],
        &["beyond the guest's 16 quiet streams"],
        |_, _| {},
    );
    assert!(o.sum("trickle_frames_queued") >= 64.0 * 4.0, "{:?}", o.reports);
    let reset = o.sum_in("reset", "TIMEOUT");
    assert_eq!(reset, 48.0, "64 trickled streams, 16 may stay: {:?}", o.reports);
}
