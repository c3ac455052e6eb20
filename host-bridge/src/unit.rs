//! `vios-host-bridge ip-allow`: the systemd drop-in that lets the daemon
//! reach its services' addresses.
//!
//! The packaged unit says `IPAddressDeny=any` and `IPAddressAllow=localhost`,
//! so the kernel itself keeps the daemon to loopback. The package's systemd
//! generator (`scripts/init/systemd/vios-host-bridge-generator`) runs this
//! subcommand with the unit's configuration file at boot and at every
//! `systemctl daemon-reload`, and installs what it prints: an
//! `IPAddressAllow=` for every address the configured services map to.
//! Guests name services, never addresses; the kernel holds the daemon to the
//! same rule.

use std::ffi::OsString;
use std::net::IpAddr;

use crate::services::ServiceSpec;

/// If the command line is `NAME ip-allow [OPTIONS]`, prints the drop-in for
/// the services those options (and `--config`) configure and exits: 0, or 2
/// with clap's message for a configuration error.
pub fn ip_allow_subcommand(argv: &[OsString]) {
    if argv.get(1).and_then(|a| a.to_str()) != Some("ip-allow") {
        return;
    }
    let args: Vec<OsString> = argv[..1].iter().chain(&argv[2..]).cloned().collect();
    let cli = crate::reload::load(&args).unwrap_or_else(|e| e.exit());
    print!("{}", dropin(&cli.services));
    std::process::exit(0);
}

/// The drop-in: `IPAddressAllow=` with every non-loopback address of
/// `services` (loopback is the unit's own), or comments alone when there is
/// none (an empty `IPAddressAllow=` would reset the unit's list).
pub fn dropin(services: &[ServiceSpec]) -> String {
    let mut addrs: Vec<IpAddr> = services
        .iter()
        .flat_map(|s| s.addrs.iter().map(|a| a.ip()))
        .filter(|ip| !ip.is_loopback())
        .collect();
    addrs.sort();
    addrs.dedup();
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    let mut out = format!(
        "# Written by vios-host-bridge-generator (vios-host-bridge ip-allow) for the\n\
         # services {}: the kernel lets the daemon reach their addresses\n\
         # besides loopback. Regenerated at boot and by `systemctl daemon-reload`.\n",
        if names.is_empty() {
            "(none)".to_owned()
        } else {
            names.join(", ")
        }
    );
    if addrs.is_empty() {
        out.push_str("# Every service is on loopback: nothing to add.\n");
    } else {
        let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
        out.push_str(&format!("[Service]\nIPAddressAllow={}\n", list.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::parse_service;

    #[test]
    fn every_non_loopback_address_once() {
        let services = [
            parse_service("amqp=198.18.0.1:5672|[2001:db8::7]:5672,proxy=v2").unwrap(),
            parse_service("mgmt=198.18.0.1:15672").unwrap(),
            parse_service("local=127.0.0.1:9000").unwrap(),
        ];
        let d = dropin(&services);
        assert!(d.contains("services amqp, mgmt, local:"), "{d}");
        assert!(
            d.ends_with("[Service]\nIPAddressAllow=198.18.0.1 2001:db8::7\n"),
            "{d}"
        );
    }

    #[test]
    fn loopback_only_adds_nothing() {
        let d = dropin(&[parse_service("amqp=127.0.0.1:5672").unwrap()]);
        assert!(!d.contains("IPAddressAllow="), "{d}");
        assert!(d.lines().all(|l| l.starts_with('#')), "{d}");
    }
}
