//! `vios-hostile`: a compromised guest, for testing `vios-host-bridge`.
//!
//! ```text
//! vios-hostile --listen PATH --mode MODE [--seconds S] [--service NAME] [--streams N]
//!              [--count N] [--interval-ms MS] [--never-opened] [--batch BYTES] [--seed N]
//!              [--max-sessions N] [--ready-file PATH]
//! ```
//!
//! It plays QEMU's side of the channel: it listens on the unix socket the
//! host bridge connects to (`--guest NAME=PATH`), accepts the bridge's
//! connection (again whenever the bridge reconnects), handshakes as the guest
//! with a real `Session`, and then writes raw frames, well-formed or not, as
//! fast as the socket takes them (see `--mode`). Every wait has a timeout and
//! the socket is non-blocking, so `--seconds` holds even when the host stops
//! reading. SIGTERM/SIGINT end the run early; SIGSTOP/SIGCONT just freeze it.
//!
//! At the end it prints one JSON line on stdout: what was sent and read, the
//! sessions, how they ended as seen from here (GOAWAY code and text, EOF, a
//! new HELLO), and per-mode counters under `attack`. Notes go to stderr
//! (`RUST_LOG`, default `info`). Exit status 0, also when the host misbehaves
//! or never connects; 1 when the socket cannot be set up; 2 on bad arguments.
//!
//! # The JSON line
//!
//! - parameters: `tool`, `mode`, `listen`, `service`, `streams`, `seconds`, `seed`;
//! - `elapsed_s`; `connections` accepted; `handshakes` started; `sessions`
//!   established (`first_session_s`: when the first was); `rejected`:
//!   handshakes refused by a REFUSE HELLO (either side);
//! - writing: `frames_sent` (frames completely written), `bytes_sent` (all
//!   bytes the socket took, HELLOs and garbage included), `hellos_sent`,
//!   `write_calls`, `write_blocked_s` (time output waited while the socket
//!   took nothing: the host not reading; a SIGSTOP freeze counts too),
//!   `write_blocked_at_end`, `last_write_s`, `sent_per_s` (bytes per second of
//!   the run), `frames_dropped_unsent`/`bytes_dropped_unsent` (queued for a
//!   session that ended before they were written);
//! - reading (raw sessions; `idle` leaves frames to its Session): `bytes_read`,
//!   `last_read_s`, `read_per_s`, `frames_read` (by type), `hellos_read`,
//!   `decode_errors` (runs of undecodable bytes, resynchronised by skipping)
//!   and `decode_error_texts`, `credit_received` (sum of CREDIT increments);
//! - answers: `refuse`, `reset`, `goaway`, each `{total, codes: {CODE: n},
//!   texts: ["CODE: text", ...up to 10 distinct]}`;
//! - ends: `ends_total`, `end_kinds` (`goaway`: GOAWAY with drain 0,
//!   `peer_hello`: a HELLO with a new nonce, `eof`, `read_error`,
//!   `write_error`, `session`: idle's Session ended) and `ends`, the first 20
//!   as `{at_s, how, code, text}`;
//! - `attack`: per-mode counters (`opens_sent`, `streams_used`, and e.g.
//!   `pings_queued`, `resets_queued`, `data_frames_queued`, `credits_queued`,
//!   `fresh_hellos`, `huge_headers_queued`, `garbage_bytes_queued`;
//!   bad-names: `names: [{name, tries, outcomes: {"REFUSE CODE: text": n,
//!   "GOAWAY CODE: text": n, "no answer": n}}]`);
//! - `cpu_s`: this process's CPU time.

mod attack;
mod driver;
mod out;
mod stats;

use vios_tests::tool::json;
use vios_tests::tool::process as sys;

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use mio::net::UnixListener;

use attack::{Attack, Mode, Params};
use driver::Driver;
use json::Json;

#[derive(Parser, Debug)]
#[command(
    name = "vios-hostile",
    about = "A compromised guest for testing vios-host-bridge: listens where QEMU's chardev socket would \
             be, handshakes as the guest, then attacks the host bridge with well-formed or malformed \
             frames at full speed",
    after_help = "Example:\n  vios-hostile --listen /tmp/bad.sock --mode open-reset --seconds 5\n  \
                  vios-host-bridge --guest bad=/tmp/bad.sock --service sink=127.0.0.1:9000\n\n\
                  Prints one JSON line on stdout at the end (notes on stderr) and exits 0; 1 if the \
                  socket cannot be set up, 2 on bad arguments."
)]
struct Cli {
    /// Unix socket to listen on: the path the host bridge is given as
    /// `--guest NAME=PATH`. A stale socket file there is removed first.
    #[arg(long, value_name = "PATH")]
    listen: PathBuf,

    /// The attack.
    #[arg(long, value_enum)]
    mode: Mode,

    /// How long to run, in seconds (fractions allowed); 0 = until SIGTERM/SIGINT.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    seconds: f64,

    /// Service the attack opens streams to (default: source for no-drain, sink otherwise).
    #[arg(long, value_name = "NAME")]
    service: Option<String>,

    /// reset-flood: stream ids 1..=N to RESET; no-drain: streams to open (default 64).
    #[arg(long, value_name = "N")]
    streams: Option<u64>,

    /// million-opens: OPENs per session.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    count: u64,

    /// second-hello: milliseconds between fresh HELLOs (0: as soon as the
    /// previous one re-established the session). slow-hello: milliseconds
    /// between bytes (0: 1000).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    interval_ms: u64,

    /// reset-flood: RESET stream ids that were never opened (a session-level
    /// violation) instead of stale ones (opened and reset first: ignored).
    #[arg(long)]
    never_opened: bool,

    /// Bytes of frames queued per write batch.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=(64 << 20)))]
    batch: u64,

    /// Seed for nonces and random bytes (default: from /dev/urandom).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,

    /// Stop once this many sessions have been established (e.g. `--mode idle
    /// --max-sessions 1` checks that the host still serves a guest).
    #[arg(long, value_name = "N")]
    max_sessions: Option<u64>,

    /// Declare the largest frame payload (16 MiB) and initial window
    /// (2^31-1) the protocol allows, as a guest trying to make the host
    /// allocate would.
    #[arg(long)]
    declare_max: bool,

    /// Write "started" to this file once the attack begins: the first
    /// session, or the first connection for modes that never handshake.
    #[arg(long, value_name = "PATH")]
    started_file: Option<PathBuf>,

    /// Write the socket path (one line) to this file once listening.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
}

fn listen(path: &Path) -> io::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if !cli.seconds.is_finite() || cli.seconds < 0.0 {
        eprintln!("vios-hostile: --seconds must be a number >= 0");
        std::process::exit(2);
    }
    sys::install_signal_handlers();
    let mode = cli.mode;
    let service = cli
        .service
        .clone()
        .unwrap_or_else(|| mode.default_service().to_owned());
    let streams = cli.streams.unwrap_or_else(|| mode.default_streams());
    let seed = cli.seed.unwrap_or_else(vios_common::io::random_seed);
    let listener = match listen(&cli.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vios-hostile: cannot listen on {}: {e}", cli.listen.display());
            std::process::exit(1);
        }
    };
    if let Some(f) = &cli.ready_file {
        if let Err(e) = fs::write(f, format!("{}\n", cli.listen.display())) {
            eprintln!("vios-hostile: cannot write {}: {e}", f.display());
            std::process::exit(1);
        }
    }
    log::info!(
        "{}: listening on {} for {} s",
        mode.name(),
        cli.listen.display(),
        cli.seconds
    );
    let interval = Duration::from_millis(cli.interval_ms);
    let byte_interval = if cli.interval_ms == 0 {
        Duration::from_secs(1)
    } else {
        interval
    };
    let attack = Attack::new(
        Params {
            mode,
            service: service.clone(),
            streams,
            count: cli.count,
            interval,
            never_opened: cli.never_opened,
        },
        seed ^ 0x5eed,
    );
    let mut driver = match Driver::new(attack, listener, seed, cli.batch as usize, byte_interval) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vios-hostile: cannot set up the event loop: {e}");
            std::process::exit(1);
        }
    };
    driver.max_sessions = cli.max_sessions;
    driver.declare_max = cli.declare_max;
    driver.started_file = cli.started_file.clone();
    let start = driver.stats.start;
    let deadline = if cli.seconds == 0.0 {
        start + Duration::from_secs(100 * 365 * 86400)
    } else {
        start + Duration::from_secs_f64(cli.seconds)
    };
    driver.run(deadline);
    let _ = fs::remove_file(&cli.listen);

    let now = Instant::now();
    let mut j = Json::new();
    j.str("tool", "vios-hostile")
        .str("mode", mode.name())
        .str("listen", &cli.listen.display().to_string())
        .str("service", &service)
        .u64("streams", streams)
        .f64("seconds", cli.seconds, 3)
        .u64("seed", seed);
    driver.stats.frames_sent = driver.out.frames_sent;
    driver.stats.report(&mut j, now);
    j.u64("frames_dropped_unsent", driver.out.frames_dropped)
        .u64("bytes_dropped_unsent", driver.out.bytes_dropped)
        .obj("attack", driver.attack().report())
        .f64(
            "cpu_s",
            {
                let (user, system) = sys::cpu_seconds();
                user + system
            },
            3,
        );
    println!("{}", j.finish());
}
