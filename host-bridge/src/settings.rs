//! What every loop thread serves by: the settings derived from the command
//! line at start-up.

use std::sync::Arc;
use std::time::Duration;

use vios_common::io::limits::{Descriptors, QuietRule, StreamTimeouts};
use vios_common::proto::session::Policy;
use vios_common::proto::Limits;

use std::collections::HashMap;
use std::net::IpAddr;

use crate::config::Cli;
use crate::identity::Prefix;
use crate::policy::AllowRule;
use crate::services::Service;

#[derive(Debug)]
pub struct Settings {
    pub services: Vec<Service>,
    /// Which guests may open which services (none: all may open all).
    pub allow: Vec<AllowRule>,
    /// Identity addresses the operator assigned, by guest name.
    pub addresses: HashMap<String, IpAddr>,
    /// Where the other guests' identities come from.
    pub identity_prefix: Prefix,
    pub limits: Limits,
    /// The channel in-flight limit (PROTOCOL.md §6.1).
    pub inflight: usize,
    pub policy: Policy,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Bytes buffered for one guest's streams.
    pub max_buffered: usize,
    /// Every descriptor of the process: channels, loops, streams.
    pub fds: Arc<Descriptors>,
    pub timeouts: StreamTimeouts,
    /// End a session whose guest reads nothing for this long.
    pub write_stall: Option<Duration>,
    /// SO_SNDBUF and SO_RCVBUF of service sockets (`None`: the kernel's
    /// auto-tuning).
    pub service_buffer: Option<usize>,
}

impl Settings {
    pub fn new(cli: &Cli, fds: Arc<Descriptors>) -> Settings {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Settings {
            services: cli.services.iter().cloned().map(Service::new).collect(),
            allow: cli.allow.clone(),
            addresses: cli.guest_addresses.iter().cloned().collect(),
            identity_prefix: cli.identity_prefix,
            inflight: cli.inflight,
            limits: Limits {
                max_frame_payload: cli.max_frame,
                initial_window: cli.window,
                max_streams: cli.max_streams,
                idle_timeout_ms: cli.idle_timeout.as_millis() as u32,
            },
            policy: Policy {
                control_rate: cli.control_rate,
                frame_rate: cli.frame_rate,
                open_rate: cli.open_rate,
                open_burst: cli.max_streams,
                violations_per_10s: cli.max_violations,
                sessions_per_minute: cli.session_rate,
                scan_bytes_per_sec: cli.scan_rate,
            },
            handshake_timeout: cli.handshake_timeout,
            connect_timeout: cli.connect_timeout,
            shutdown_grace: cli.shutdown_grace,
            max_buffered: usize::try_from(cli.max_buffered).unwrap_or(usize::MAX),
            fds,
            timeouts: StreamTimeouts {
                idle: nonzero(cli.stream_idle_timeout),
                half_closed: nonzero(cli.half_closed_timeout),
                quiet: (cli.max_quiet_streams > 0).then_some(QuietRule {
                    window: cli.quiet_window,
                    bytes: cli.quiet_bytes,
                    max: cli.max_quiet_streams as usize,
                }),
            },
            write_stall: nonzero(cli.write_stall_timeout),
            service_buffer: (cli.service_buffer > 0).then_some(cli.service_buffer as usize),
        }
    }

    /// The identity address of guest `name`: assigned, or derived.
    pub fn identity(&self, name: &str) -> IpAddr {
        self.addresses
            .get(name)
            .copied()
            .unwrap_or_else(|| self.identity_prefix.derive(name))
    }
}
