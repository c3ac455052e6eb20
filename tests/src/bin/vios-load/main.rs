//! `vios-load`: load generator and test servers for the Vios bridge pair.
//!
//! ```text
//! vios-load serve --listen ADDR --mode echo|sink|source [--threads N] [--bytes B] [--ready-file PATH]
//! vios-load bulk  --connect ADDR --streams N --bytes B [--direction up|down|both] [--threads T]
//! vios-load rtt   --connect ADDR [--streams N] [--count K] [--size 64] [--warmup W]
//! vios-load setup --connect ADDR [--count K] [--concurrency C]
//! vios-load hold  --connect ADDR --streams N [--seconds S] [--ready-file PATH]
//! ```
//!
//! ADDR is `HOST:PORT` or `unix:PATH`. Every subcommand takes `--timeout`
//! (default 120s; for `serve`, 0 means none) and prints exactly one JSON line
//! on stdout: its parameters, its results, the process's CPU and memory, `ok`
//! and `errors` (the first 20; `errors_total` counts them all). Notes go to
//! stderr. Exit status: 0 when `ok`, 1 on a failed run, 2 on bad arguments.
//!
//! Everything runs on mio event loops (one per thread, one thread unless
//! `--threads`), so 10,000 streams cost a few MB; the open-file limit is the
//! caller's: `ulimit -n 20000` for 10,000 streams, in the server's shell too.
//!
//! Bytes sent are a fixed pseudo-random pattern with a prime period (stream
//! `i` starts at its own offset), so receivers check them slice by slice with
//! `memcmp`, and shifted, repeated, lost or crossed-over bytes are caught.
//! See README.md next to this file for the JSON fields.

mod bulk;
mod hold;
mod net;
mod rtt;
mod serve;
mod setup;
mod sys;

use vios_tests::tool::json;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vios-load",
    about = "Load generator and echo/sink/source servers for benchmarking and testing the Vios bridge",
    after_help = "Each subcommand prints one JSON line on stdout (notes on stderr) and exits 0 on \
                  success, 1 on failure (see \"errors\"), 2 on bad arguments. 10,000 streams need \
                  `ulimit -n 20000` (client and server)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Echo, sink or source server (runs until SIGTERM/SIGINT or --timeout).
    Serve(serve::Args),
    /// N concurrent streams each moving B bytes; throughput and CPU.
    Bulk(bulk::Args),
    /// Ping-pong round-trip latency against an echo server.
    Rtt(rtt::Args),
    /// Stream set-up latency: connect, 1-byte echo, close.
    Setup(setup::Args),
    /// Open N idle streams, hold them, verify they still answer.
    Hold(hold::Args),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let _ = e.print();
            let cmd = std::env::args().nth(1).unwrap_or_default();
            // The message without the usage and hint that follow it.
            let msg = e.to_string();
            let text: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let mut j = json::Json::new();
            j.str("cmd", &cmd)
                .bool("ok", false)
                .strs("errors", &[text.join(" ")])
                .u64("errors_total", 1);
            println!("{}", j.finish());
            std::process::exit(2);
        }
    };
    sys::install_signal_handlers();
    let mut rep = match &cli.cmd {
        Cmd::Serve(a) => serve::run(a),
        Cmd::Bulk(a) => bulk::run(a),
        Cmd::Rtt(a) => rtt::run(a),
        Cmd::Setup(a) => setup::run(a),
        Cmd::Hold(a) => hold::run(a),
    };
    let (user, sys_s) = sys::cpu_seconds();
    let (rss, peak) = sys::rss_kib();
    let ok = rep.errors.is_empty();
    rep.json
        .f64("cpu_user_s", user, 3)
        .f64("cpu_sys_s", sys_s, 3)
        .f64("cpu_s", user + sys_s, 3)
        .opt_u64("rss_kib", rss)
        .opt_u64("peak_rss_kib", peak)
        .bool("ok", ok)
        .strs("errors", rep.errors.list())
        .u64("errors_total", rep.errors.total());
    for e in rep.errors.list() {
        eprintln!("vios-load: error: {e}");
    }
    println!("{}", rep.json.finish());
    std::process::exit(if ok { 0 } else { 1 });
}
