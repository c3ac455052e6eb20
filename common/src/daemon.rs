//! What both daemons' `main` does: logging, the command line, exit codes.
//!
//! Exit codes: 0 after an orderly stop, 1 when the daemon failed while
//! running (its supervisor should restart it), 2 for a configuration error
//! (restarting would fail the same way: units say `RestartPreventExitStatus=2`).

use std::io;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::io::control::{self, ControlServer, StatusQuery};

/// Exit status of a configuration error.
pub const EXIT_CONFIG: i32 = 2;
/// Exit status of a failure while running.
pub const EXIT_FAILED: i32 = 1;

/// Sets up logging (`RUST_LOG`, `info` by default), parses and checks the
/// command line, runs the daemon, and exits with the status it earned.
pub fn main<C>(
    parse: impl FnOnce() -> C,
    validate: impl FnOnce(&C) -> Result<(), String>,
    run: impl FnOnce(C) -> io::Result<()>,
) -> ! {
    init_logging();
    let cli = parse();
    if crate::sys::effective_uid() == 0 {
        // A choice (docs/OPERATIONS.md): the daemon never changes user
        // itself; the packaged units start it as the unprivileged
        // vios-bridge user, which needs nothing root has.
        log::warn!(
            "running as root: nothing here needs it; the packaged unit runs the bridge as the \
             unprivileged user vios-bridge (see docs/OPERATIONS.md)"
        );
    }
    if let Err(e) = validate(&cli) {
        eprintln!("error: {e}\n\nFor more information, try '--help'.");
        std::process::exit(EXIT_CONFIG);
    }
    match run(cli) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            log::error!("{e}");
            std::process::exit(exit_status(&e));
        }
    }
}

/// What the operator configured cannot work, found only while starting (a
/// `--control` path that cannot be bound): the daemon ends with
/// [`EXIT_CONFIG`] as for a bad command line, so that its unit does not
/// restart it into the same failure.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// An [`io::Error`] carrying a [`ConfigError`].
pub fn config_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, ConfigError(message))
}

/// The exit status a failed run earns: [`EXIT_CONFIG`] for a
/// [`ConfigError`], [`EXIT_FAILED`] for anything else.
pub fn exit_status(e: &io::Error) -> i32 {
    if e.get_ref().is_some_and(|inner| inner.is::<ConfigError>()) {
        EXIT_CONFIG
    } else {
        EXIT_FAILED
    }
}

/// `RUST_LOG` (`info` by default) to standard error. When that is the
/// journal, each line starts with its syslog priority (so `journalctl -p
/// warning` shows warnings and errors only) and carries no timestamp of its
/// own (the journal has one).
fn init_logging() {
    use std::io::Write;
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if crate::systemd::stderr_is_journal() {
        b.format(|buf, r| {
            let prefix = crate::systemd::priority_prefix(r.level());
            writeln!(buf, "{prefix}{}: {}", r.target(), r.args())
        });
    }
    b.init();
}

/// `vios-*-bridge status`: asks a running daemon through its control socket.
#[derive(Parser, Debug)]
#[command(
    about = "Show what a running bridge is doing: its guests, channels, sessions and streams",
    after_help = "Exit status: 0 when every channel has a session, 1 when some have not, \
                  2 when the daemon cannot be reached (the message names the socket tried)."
)]
pub struct StatusCli {
    /// Print the versioned JSON status instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only this guest (host bridge).
    #[arg(long, value_name = "NAME")]
    pub guest: Option<String>,
    /// List every open stream: id, service, the guest client's address, the
    /// service connection's local address, age and bytes.
    #[arg(long)]
    pub streams: bool,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", env = "VIOS_CONTROL")]
    pub control: Option<PathBuf>,
    /// (guest bridge) The channel whose bridge to ask, when --control is not
    /// given: its socket is /run/vios/vios-guest-bridge.CHANNEL.sock.
    #[arg(long, value_name = "NAME", default_value = "org.qpid.vios.0")]
    pub channel: String,
}

/// If the command line is `NAME status ...`, runs the status client and
/// exits; otherwise returns.
pub fn status_subcommand(argv: &[std::ffi::OsString], default_control: impl Fn(&StatusCli) -> PathBuf) {
    if argv.get(1).and_then(|a| a.to_str()) != Some("status") {
        return;
    }
    let name = argv[0]
        .to_string_lossy()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let args = std::iter::once(format!("{name} status").into()).chain(argv[2..].iter().cloned());
    let cli = StatusCli::parse_from(args);
    let path = cli.control.clone().unwrap_or_else(|| default_control(&cli));
    let q = StatusQuery {
        json: cli.json,
        streams: cli.streams,
        guest: cli.guest.clone(),
    };
    match control::query(&path, &q) {
        Ok(a) => {
            print!("{}", a.body);
            std::process::exit(if a.established { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("{name} status: {e}");
            std::process::exit(2);
        }
    }
}

/// Sets up a daemon's control socket and metrics listener. `explicit` says
/// the operator chose the control path: failing to use it is then an error;
/// the default path is skipped with a warning when it cannot be used (say,
/// another daemon holds it, or /run/vios is not writable).
pub fn start_control(
    server: &mut ControlServer,
    registry: &mio::Registry,
    path: Option<&Path>,
    explicit: bool,
    metrics: Option<std::net::SocketAddr>,
) -> io::Result<()> {
    if let Some(path) = path {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = server.bind_control(path, registry) {
            let message = format!("control socket {}: {e}", path.display());
            if explicit {
                return Err(config_error(message));
            }
            log::warn!("{message}; running without a control socket (give --control to choose one)");
        }
    }
    if let Some(addr) = metrics {
        server
            .bind_metrics(addr, registry)
            .map_err(|e| io::Error::new(e.kind(), format!("metrics on {addr}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configuration_error_exits_with_the_configuration_status() {
        assert_eq!(
            exit_status(&config_error("control socket /x: EACCES".into())),
            EXIT_CONFIG
        );
        assert_eq!(exit_status(&io::Error::other("poll failed")), EXIT_FAILED);
        // The kind alone says nothing.
        let plain = io::Error::new(io::ErrorKind::InvalidInput, "bad frame");
        assert_eq!(exit_status(&plain), EXIT_FAILED);
    }
}
