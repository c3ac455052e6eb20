//! `vios-host-bridge`: serves guests' Vios channels and splices their streams
//! into host services.
//!
//! # Layout
//!
//! - [`config`]: command line and environment; [`settings`]: what the loops
//!   serve by, derived from it.
//! - [`discovery`]: finding guests in `--guest-dir` and libvirt directories.
//! - [`supervisor`]: the main thread: discovery, signals, spreading guests
//!   over the loop threads, watching them.
//! - [`shard`]: a loop thread: one event loop for many guests, each a group
//!   of `vios_common::io::channel::Channel`s sharing the guest's budget.
//! - [`services`]: connects a stream to the service it names.
//! - [`unit`]: `vios-host-bridge ip-allow`, for the systemd unit's address filter.
//!
//! A byte from a guest's client travels: the guest bridge → QEMU → the
//! channel's socket, read by the loop thread serving that guest
//! (`Link::read`) → its `Session` → `Channel::dispatch` → the stream's
//! `Conn`, written to the service's socket. `vios_common::io::channel`
//! describes each step.
#![forbid(unsafe_code)]

pub mod config;
pub mod discovery;
pub mod identity;
pub mod policy;
pub mod reload;
pub mod services;
pub mod settings;
pub mod shard;
pub mod supervisor;
pub mod unit;
pub mod watch;

use std::io;
use std::sync::Arc;

use log::{info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use vios_common::io::event_loop::EventLoop;
use vios_common::io::limits::Descriptors;
use vios_common::sys;

use config::Cli;
use settings::Settings;
use supervisor::Supervisor;

/// Runs until SIGTERM or SIGINT; returns after every guest has stopped.
pub fn run(cli: Cli) -> io::Result<()> {
    let nofile = sys::raise_nofile_limit()?;
    let mut el = EventLoop::new()?.with_signals(&[SIGTERM, SIGINT, SIGHUP, SIGUSR1])?;
    let limit = usize::try_from(nofile.soft).unwrap_or(usize::MAX);
    let fds = Arc::new(Descriptors::new(limit, sys::open_descriptors()?, cli.max_fds));
    info!(
        "descriptors: {} allowed (soft limit raised from {}; hard limit {}), {} in use, \
         {} kept from streams for channels and scans; at most {} stream sockets",
        nofile.soft,
        nofile.soft_before,
        nofile.hard,
        fds.used(),
        fds.reserve(),
        fds.max_streams()
    );
    let settings = Arc::new(Settings::new(&cli, fds));
    info!(
        "limits per guest: {} streams, {} bytes buffered",
        settings.limits.max_streams, settings.max_buffered
    );
    for s in &settings.services {
        let spec = &s.spec;
        let addrs: Vec<String> = spec.addrs.iter().map(ToString::to_string).collect();
        let proxy = if spec.proxy { " with PROXY v2 headers" } else { "" };
        info!("service {} -> {}{proxy}", spec.name, addrs.join(" | "));
        if let Some(a) = spec.addrs.iter().find(|a| a.ip().is_loopback()) {
            if !spec.loopback_ok {
                warn!(
                    "service {} maps to {a}, a loopback address: a broker that trusts local \
                     connections (RabbitMQ's loopback_users, its guest account) trusts every guest \
                     as local. Give guests a listener on a non-loopback host address, or add \
                     ,loopback=ok to the service if this is intended (see docs/OPERATIONS.md)",
                    spec.name
                );
            }
        }
    }
    for r in &settings.allow {
        info!("guests {:?} may open {}", r.guests, r.services.join(", "));
    }
    for d in cli.scan_dirs() {
        info!(
            "watching {} for guests (channels matching {:?})",
            d.display(),
            cli.channel_pattern
        );
    }
    let threads = cli.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let mut sup = Supervisor::start(cli, settings, threads)?;
    sup.start_control(el.registry())?;
    sup.start_watch(el.registry());
    el.run(&mut sup)?;
    match sup.failure.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
