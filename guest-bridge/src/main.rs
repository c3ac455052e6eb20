use clap::Parser;
use vios_guest_bridge::config::Cli;

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    vios_common::daemon::status_subcommand(&argv, |s| vios_guest_bridge::config::default_control(&s.channel));
    vios_common::daemon::main(Cli::parse, Cli::validate, vios_guest_bridge::run)
}
