//! What both daemons' `main` does: logging, the command line, exit codes.
//!
//! Exit codes: 0 after an orderly stop, 1 when the daemon failed while
//! running (its supervisor should restart it), 2 for a configuration error
//! (restarting would fail the same way: units say `RestartPreventExitStatus=2`).

use std::io;

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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = parse();
    if let Err(e) = validate(&cli) {
        eprintln!("error: {e}\n\nFor more information, try '--help'.");
        std::process::exit(EXIT_CONFIG);
    }
    match run(cli) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            log::error!("{e}");
            std::process::exit(EXIT_FAILED);
        }
    }
}
