use clap::Parser;
use vios_guest_bridge::config::Cli;

fn main() {
    vios_common::daemon::main(Cli::parse, Cli::validate, vios_guest_bridge::run)
}
