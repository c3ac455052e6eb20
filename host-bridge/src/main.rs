use vios_host_bridge::config::Cli;

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    vios_host_bridge::unit::ip_allow_subcommand(&argv);
    vios_common::daemon::status_subcommand(&argv, |_| vios_host_bridge::config::DEFAULT_CONTROL.into());
    vios_common::daemon::main(
        || vios_host_bridge::reload::load(&argv).unwrap_or_else(|e| e.exit()),
        Cli::validate,
        vios_host_bridge::run,
    )
}
