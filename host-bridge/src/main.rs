use clap::Parser;
use vios_host_bridge::config::Cli;

fn main() {
    vios_common::daemon::main(Cli::parse, Cli::validate, vios_host_bridge::run)
}
