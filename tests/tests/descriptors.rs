//! The host bridge at its descriptor limit (issue 16's first part): a failure
//! is never read as "gone", and streams are refused before the descriptors
//! that channels and scans need.
//!
//! One host bridge under `prlimit --nofile=2000` serves a directory of guests
//! (`vios-guests`, one process, libvirt's layout). The guests fill every
//! stream they may open; then more guests appear than descriptors are left.

use std::process::Command;
use std::time::Duration;

use vios_tests::guests::Guests;
use vios_tests::vm::json_num;
use vios_tests::{bin, fd_count, log_lines, wait_path, Proc, TempDir};

const LIMIT: usize = 2000;

/// Starts an echo server (its own process, its own descriptors).
fn echo_server(dir: &TempDir) -> (Proc, String) {
    let ready = dir.join("echo.addr");
    let p = Proc::spawn(
        "echo",
        Command::new(bin("vios-load"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--mode",
                "echo",
                "--timeout",
                "0",
            ])
            .arg("--ready-file")
            .arg(&ready),
        dir.join("echo.log"),
    );
    wait_path(&ready, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(20));
    let addr = std::fs::read_to_string(&ready).unwrap().trim().to_owned();
    (p, addr)
}

#[test]
fn at_the_descriptor_limit_no_established_guest_is_lost() {
    let dir = TempDir::new("fds");
    let guests_dir = dir.join("guests");
    std::fs::create_dir_all(&guests_dir).unwrap();
    let (_echo, echo_addr) = echo_server(&dir);
    let mut first = Guests::start(&guests_dir, 1, 300, &dir.join("guests1.log"));
    let host = Proc::spawn(
        "host-bridge",
        Command::new("prlimit")
            .arg(format!("--nofile={LIMIT}:{LIMIT}"))
            .arg(bin("vios-host-bridge"))
            .arg("--guest-dir")
            .arg(&guests_dir)
            .args(["--rescan", "1s", "--service", &format!("echo={echo_addr}")])
            .args(["--max-streams", "64", "--stream-idle-timeout", "0"]),
        dir.join("host.log"),
    );
    host.wait_log("descriptors: 2000 allowed", 1, Duration::from_secs(5));
    let r = first.command("wait-established 60", Duration::from_secs(70));
    assert_eq!(json_num(&r, "established_now"), 300.0, "{r}");

    // Every guest opens streams until one is refused: the process reaches
    // the stream part of its limit (the premise of the test).
    let r = first.command("fill", Duration::from_secs(120));
    let open = json_num(&r, "open_streams");
    assert!(
        r.contains("RESOURCE_LIMIT") && open > 1500.0,
        "the guests did not reach the descriptor limit: {r}"
    );
    let fds = fd_count(host.pid());
    eprintln!("streams open: {open}; host descriptors: {fds} of {LIMIT}");
    assert!(fds <= LIMIT, "{fds} descriptors");
    let refused = log_lines(&host.log_text(), "refused: RESOURCE_LIMIT").len();
    assert!(refused > 0, "no stream was refused for descriptors");

    // 100 more guests appear: only some of their channels fit in the
    // reserve streams left; the others wait, logged once, retried.
    let mut late = Guests::start(&guests_dir, 301, 100, &dir.join("guests2.log"));
    host.wait_log("no descriptor free", 1, Duration::from_secs(10));
    // Several rescans go by at the limit.
    std::thread::sleep(Duration::from_secs(4));
    let text = host.log_text();
    assert!(
        log_lines(&text, "is gone").is_empty(),
        "a guest was reported gone at the limit:\n{}",
        log_lines(&text, "is gone").join("\n")
    );
    let unserved = log_lines(&text, "no descriptor free");
    let mut names: Vec<&str> = unserved
        .iter()
        .filter_map(|l| l.split("guest ").nth(1)?.split(':').next())
        .collect();
    let lines = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(lines, names.len(), "a guest's failure was logged more than once");
    let r = first.command("report", Duration::from_secs(10));
    assert_eq!(json_num(&r, "established_now"), 300.0, "{r}");
    assert_eq!(json_num(&r, "sessions_ended"), 0.0, "{r}");
    assert_eq!(json_num(&r, "reset"), 0.0, "{r}");
    eprintln!(
        "at the limit: {} late guest(s) could not be served yet, {} established",
        names.len(),
        late.field("established_now")
    );
    assert!(!names.is_empty());

    // The first guests let go of their streams: the late ones are served.
    first.command("close", Duration::from_secs(10));
    let r = late.command("wait-established 30", Duration::from_secs(40));
    assert_eq!(json_num(&r, "established_now"), 100.0, "{r}\n{}", host.log_text());
    let r = late.command("open 1", Duration::from_secs(30));
    assert_eq!(json_num(&r, "echoed"), 100.0, "{r}");
    let r = first.command("report", Duration::from_secs(10));
    assert_eq!(json_num(&r, "sessions_ended"), 0.0, "{r}");
}
