//! `vios-guest-bridge`: accepts local clients and carries them over one
//! virtio-serial port to `vios-host-bridge`.
//!
//! # Layout
//!
//! - [`config`]: command line and environment.
//! - [`listener`]: loopback TCP and unix-socket listeners.
//! - [`bridge`]: the state machine on the event loop: listeners, the one
//!   `vios_common::io::channel::Channel` to the host, clients waiting for a
//!   session.
//! - [`run`] (here): set-up, then the loop until SIGTERM or SIGINT.
//!
//! A client's byte travels: its socket, accepted by a [`listener`] and handed
//! to `Channel::open_stream` → read into a DATA frame of the `Session` →
//! written to the virtio-serial port by the channel's `Link`. The way back is
//! the same in reverse; `vios_common::io::channel` describes each step.
#![forbid(unsafe_code)]

pub mod bridge;
pub mod config;
pub mod listener;

use std::io;
use std::time::Instant;

use log::{info, warn};
use mio::Token;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use vios_common::daemon::config_error;
use vios_common::io::channel::{Channel, ChannelConfig};
use vios_common::io::control::ControlServer;
use vios_common::io::event_loop::EventLoop;
use vios_common::io::link::Link;
use vios_common::io::random_seed;
use vios_common::proto::session::Policy;
use vios_common::proto::{Config as SessionConfig, Limits, Role, Session};
use vios_common::{sys, systemd};

use bridge::{Bridge, CONTROL, LISTENERS};
use config::Cli;
use listener::{Listener, SocketAccess};

/// The channel's link; its connections count up from 1.
const LINK: Token = Token(0);

/// Runs until SIGTERM or SIGINT.
pub fn run(cli: Cli) -> io::Result<()> {
    let mut el = EventLoop::new()?.with_signals(&[SIGTERM, SIGINT, SIGHUP, SIGUSR1])?;
    let access = SocketAccess {
        mode: cli.socket_mode,
        owner: cli.socket_owner.as_deref().map(sys::user_id).transpose()?,
        group: cli.socket_group.as_deref().map(sys::group_id).transpose()?,
    };
    let Some(specs) = cli.listeners() else {
        warn!(
            "port {} has no listeners: the default {} belongs to {}; give this port its own \
             (--listen, or VIOS_LISTEN in /etc/default/vios-guest-bridge.{}). Nothing to do: exiting",
            cli.channel.name(),
            config::DEFAULT_LISTEN,
            config::FIRST_PORT,
            cli.channel.name()
        );
        // Under a Type=notify unit an exit before READY=1 is a failure
        // ("protocol") that Restart= acts on: say ready (alone: in one
        // message with STOPPING=1, systemd takes only the latter), wait until
        // systemd has read it, then end cleanly.
        vios_common::systemd::Notifier::from_env().notify_and_wait(
            "READY=1\nSTATUS=no listeners on this port: nothing to do",
            std::time::Duration::from_secs(5),
        );
        return Ok(());
    };
    let mut listeners = Vec::new();
    let mut passed = systemd::listen_fds().map_err(|e| config_error(format!("socket activation: {e}")))?;
    for (i, spec) in specs.iter().enumerate() {
        let mut l = match Listener::adopt(spec, &mut passed)? {
            Some(l) => l,
            None => Listener::bind(spec, &access)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", spec.addr)))?,
        };
        l.register(el.registry(), Token(LISTENERS + i))?;
        let how = if l.is_passed() {
            " (socket passed by systemd)"
        } else {
            ""
        };
        info!("listening on {} for service {}{how}", spec.addr, spec.service);
        listeners.push(l);
    }
    if let Some(s) = passed.first() {
        // Its clients would wait in a backlog nobody accepts from.
        return Err(config_error(format!(
            "systemd passed a socket on {} that no --listen names; listeners: {}",
            listener::passed_addr(s),
            specs
                .iter()
                .map(|l| l.addr.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut cfg = SessionConfig::new(
        Role::Guest,
        format!("vios-guest-bridge {}", env!("CARGO_PKG_VERSION")),
    );
    cfg.limits = Limits {
        max_frame_payload: cli.max_frame,
        initial_window: cli.window,
        // The host opens no streams in protocol version 1.
        max_streams: 1,
        idle_timeout_ms: cli.idle_timeout.as_millis() as u32,
    };
    cfg.inflight_limit = cli.inflight;
    // The host is the trusted side: no rate limits on what it sends.
    cfg.policy = Policy::unlimited();
    let link = Link::new(cli.channel.clone(), LINK, Instant::now());
    let channel = Channel::new(
        Session::new(cfg, random_seed()),
        link,
        ChannelConfig::unlimited(String::new()),
    );
    let (control_path, explicit) = cli.control_path();
    let mut control = ControlServer::new(CONTROL);
    vios_common::daemon::start_control(
        &mut control,
        el.registry(),
        control_path.as_deref(),
        explicit,
        cli.metrics,
    )?;
    let mut bridge = Bridge::new(cli, channel, listeners);
    bridge.control = Some(control);
    let result = el.run(&mut bridge);
    for l in &bridge.listeners {
        l.cleanup();
    }
    if let Some(c) = &bridge.control {
        c.cleanup();
    }
    result
}
