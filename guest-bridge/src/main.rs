use clap::Parser;
use vios_guest_bridge::config::Cli;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Err(e) = cli.validate() {
        eprintln!("error: {e}\n\nFor more information, try '--help'.");
        std::process::exit(2);
    }
    if let Err(e) = vios_guest_bridge::run(cli) {
        log::error!("{e}");
        std::process::exit(1);
    }
}
