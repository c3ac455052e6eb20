//! The command line and environment of `vios-guest-bridge`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vios_common::cli::{parse_duration, parse_frame, parse_idle, parse_inflight, parse_window};
use vios_common::io::link::ChannelSpec;
use vios_common::proto::frame::check_service_name;

const ABOUT: &str = "Guest side of the Vios bridge: accepts local clients (TCP on loopback, \
unix sockets) and carries all of them over one virtio-serial port to vios-host-bridge.";

const LONG_ABOUT: &str = "Guest side of the Vios bridge.

Unmodified clients connect to a local listener as if the service ran in the guest; \
each connection becomes a stream, multiplexed with all others over one virtio-serial \
port, and comes out on the host as an ordinary connection to the service the \
listener names. The guest needs no network interface.

When no host is connected the bridge waits, without spinning, and negotiates again \
when the host comes back. Clients that connect while there is no session wait up to \
--session-wait, then are reset. Every failure reaches the client as a reset (TCP RST), \
never as a clean close of a truncated stream.";

const AFTER_HELP: &str = "Channel forms:
  org.qpid.vios.0          a virtio-serial port name (found under /sys/class/virtio-ports)
  /dev/vport0p1            a device path (also /dev/virtio-ports/NAME)
  unix:/run/vios/g1.sock   a unix socket to connect to (development and tests)

Examples:
  vios-guest-bridge
  vios-guest-bridge --channel org.qpid.vios.0 --listen 127.0.0.1:5672=amqp \\
      --listen unix:/run/vios/amqp.sock=amqp

Socket activation: listening sockets passed by systemd (LISTEN_FDS, e.g. from
vios-guest-bridge@PORT.socket) are taken for the --listen addresses they are bound to;
a passed socket that no --listen names is a configuration error (exit 2).

Status: `vios-guest-bridge status [--json] [--streams] [--channel NAME]` asks the
running bridge through its control socket.

Logging: RUST_LOG=info (default), debug or warn. SIGUSR1 writes the status to the log.
Signals: SIGTERM or SIGINT sends GOAWAY, waits --shutdown-grace, resets the rest, exits 0.";

/// The port the default listener belongs to.
pub const FIRST_PORT: &str = "org.qpid.vios.0";
/// The first port's listener when none is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5672=amqp";

#[derive(Parser, Debug)]
#[command(name = "vios-guest-bridge", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// The virtio-serial port: a port name, a device path, or unix:PATH.
    #[arg(short, long, value_name = "CHANNEL", env = "VIOS_CHANNEL", default_value = "org.qpid.vios.0",
          value_parser = parse_channel)]
    pub channel: ChannelSpec,

    /// A local listener and the service its clients reach: HOST:PORT=SERVICE or
    /// unix:PATH=SERVICE. Repeatable; in the environment separate with ';'.
    /// [default: 127.0.0.1:5672=amqp, on the first port (org.qpid.vios.0, a
    /// device path or unix:PATH) only; any other port needs listeners of its
    /// own, and without them the bridge says so and exits 0]
    #[arg(short, long = "listen", value_name = "ADDR=SERVICE", env = "VIOS_LISTEN",
          value_delimiter = ';', value_parser = parse_listen)]
    pub listen: Vec<ListenSpec>,

    /// Permissions of unix-socket listeners (octal). Connecting needs write
    /// permission, so the default lets every local user connect, as every
    /// local user can reach a loopback TCP listener.
    #[arg(long, value_name = "MODE", env = "VIOS_SOCKET_MODE", default_value = "0666", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Owner of unix-socket listeners (a user name or uid) [default: the
    /// bridge's own user]. Changing it needs privilege.
    #[arg(long, value_name = "USER", env = "VIOS_SOCKET_OWNER")]
    pub socket_owner: Option<String>,

    /// Group of unix-socket listeners (a group name or gid) [default: the
    /// bridge's own group]; with --socket-mode 0660, only its members (and the
    /// owner) may connect.
    #[arg(long, value_name = "GROUP", env = "VIOS_SOCKET_GROUP")]
    pub socket_group: Option<String>,

    /// Share streams and the waiting queue fairly between local users (by
    /// uid, as the kernel reports it): an eighth is kept for a user who may
    /// yet come, and each user present is guaranteed an equal part of the
    /// rest, so one user cannot take every stream. Set to false where every
    /// client runs as one user and should have the host's whole stream
    /// limit.
    #[arg(long, value_name = "BOOL", env = "VIOS_USER_SHARES", default_value = "true",
          value_parser = vios_common::cli::parse_bool, action = clap::ArgAction::Set)]
    pub user_shares: bool,

    /// The control socket `vios-guest-bridge status` asks (mode 0660)
    /// [default: /run/vios/vios-guest-bridge.CHANNEL.sock, CHANNEL the port
    /// or socket name]. `none`: no control socket.
    #[arg(long, value_name = "PATH", env = "VIOS_CONTROL")]
    pub control: Option<PathBuf>,

    /// Serve Prometheus metrics on HOST:PORT (GET /metrics). Off by default;
    /// a loopback address unless --metrics-allow-remote.
    #[arg(long, value_name = "HOST:PORT", env = "VIOS_METRICS")]
    pub metrics: Option<SocketAddr>,

    /// Allow --metrics on an address other than loopback.
    #[arg(long, env = "VIOS_METRICS_ALLOW_REMOTE", value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_allow_remote: bool,

    /// Allow TCP listeners on addresses other than loopback.
    #[arg(long, env = "VIOS_ALLOW_REMOTE", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_remote: bool,

    /// How long a client accepted while there is no session waits for one
    /// before it is reset.
    #[arg(long, value_name = "DURATION", env = "VIOS_SESSION_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub session_wait: Duration,

    /// Clients that may wait for a session at once; more are reset at once.
    #[arg(long, value_name = "N", env = "VIOS_MAX_WAITING", default_value_t = 1024)]
    pub max_waiting: usize,

    /// Credit each stream starts with: bytes the host may send before the
    /// client has read them.
    #[arg(long, value_name = "BYTES", env = "VIOS_WINDOW", default_value = "64K", value_parser = parse_window)]
    pub window: u32,

    /// Largest frame payload accepted from the host.
    #[arg(long, value_name = "BYTES", env = "VIOS_MAX_FRAME", default_value = "256K", value_parser = parse_frame)]
    pub max_frame: u32,

    /// Bytes written to the channel and not yet acknowledged beyond which
    /// bulk data waits while two or more connections are open (when both
    /// bridges acknowledge, PROTOCOL.md §6.1): small messages never wait
    /// behind more than this much of other connections' data. Lower: less latency beside bulk transfers; higher:
    /// more throughput on a slow or distant channel. 64K..64M.
    #[arg(long, value_name = "BYTES", env = "VIOS_INFLIGHT", default_value = "192K", value_parser = parse_inflight)]
    pub inflight: usize,

    /// End a session when nothing arrived from the host for this long (1s..1h).
    #[arg(long, value_name = "DURATION", env = "VIOS_IDLE_TIMEOUT", default_value = "15s", value_parser = parse_idle)]
    pub idle_timeout: Duration,

    /// On SIGTERM/SIGINT, how long streams may go on before they are reset.
    #[arg(long, value_name = "DURATION", env = "VIOS_SHUTDOWN_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: ListenAddr,
    pub service: String,
}

fn parse_channel(s: &str) -> Result<ChannelSpec, String> {
    let s = s.trim();
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("expected unix:/ABSOLUTE/PATH, got {s:?}"));
        }
        return Ok(ChannelSpec::Unix(path.into()));
    }
    if s.starts_with('/') {
        return Ok(ChannelSpec::Device(s.into()));
    }
    check_service_name(s.as_bytes()).map_err(|_| {
        format!("expected a port name (like org.qpid.vios.0), a /dev path or unix:PATH, got {s:?}")
    })?;
    Ok(ChannelSpec::Named(s.to_owned()))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim().trim_start_matches("0o"), 8)
        .map_err(|_| format!("expected an octal mode such as 0660, got {s:?}"))?;
    if m > 0o7777 {
        return Err(format!("mode {s} is out of range (at most 07777)"));
    }
    Ok(m)
}

fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    let s = s.trim();
    let (addr, service) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("expected HOST:PORT=SERVICE or unix:PATH=SERVICE, got {s:?} (no '=')"))?;
    check_service_name(service.as_bytes())
        .map_err(|_| format!("service name {service:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"))?;
    let addr = if let Some(path) = addr.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("expected unix:/ABSOLUTE/PATH, got {addr:?}"));
        }
        ListenAddr::Unix(path.into())
    } else {
        ListenAddr::Tcp(addr.parse().map_err(|_| {
            format!("expected an IP address and port such as 127.0.0.1:5672 or [::1]:5672, got {addr:?}")
        })?)
    };
    Ok(ListenSpec {
        addr,
        service: service.to_owned(),
    })
}

/// The control socket of the bridge on `channel` when --control is not given.
pub fn default_control(channel: &str) -> PathBuf {
    PathBuf::from(format!("/run/vios/vios-guest-bridge.{channel}.sock"))
}

impl Cli {
    /// The control socket, and whether the operator chose it.
    pub fn control_path(&self) -> (Option<PathBuf>, bool) {
        match &self.control {
            Some(p) if p.as_os_str() == "none" => (None, true),
            Some(p) => (Some(p.clone()), true),
            None => (Some(default_control(&self.channel.name())), false),
        }
    }

    /// Checks what clap cannot: loopback-only TCP unless allowed, no
    /// duplicates, socket owner and group that exist.
    /// The listeners to open: those given, or the default on the first
    /// port. None for another port without listeners of its own: the
    /// default address belongs to the first port, and a second bridge on it
    /// would only fail with "address in use".
    pub fn listeners(&self) -> Option<Vec<ListenSpec>> {
        if !self.listen.is_empty() {
            return Some(self.listen.clone());
        }
        match &self.channel {
            ChannelSpec::Named(n) if n != FIRST_PORT => None,
            _ => Some(vec![parse_listen(DEFAULT_LISTEN).expect("a valid default")]),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(m) = self.metrics {
            if !m.ip().is_loopback() && !self.metrics_allow_remote {
                return Err(format!(
                    "refusing to serve metrics on {m}: not a loopback address (add --metrics-allow-remote if you mean it)"
                ));
            }
        }
        if let Some(u) = &self.socket_owner {
            vios_common::sys::user_id(u).map_err(|e| format!("--socket-owner: {e}"))?;
        }
        if let Some(g) = &self.socket_group {
            vios_common::sys::group_id(g).map_err(|e| format!("--socket-group: {e}"))?;
        }
        for (i, l) in self.listen.iter().enumerate() {
            if let ListenAddr::Tcp(a) = &l.addr {
                if !a.ip().is_loopback() && !self.allow_remote {
                    return Err(format!(
                        "refusing to listen on {a}: not a loopback address (add --allow-remote if you mean it)"
                    ));
                }
            }
            if self.listen[..i].iter().any(|o| o.addr == l.addr) {
                return Err(format!("listener {} is given twice", l.addr));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let cli = Cli::try_parse_from(std::iter::once("vios-guest-bridge").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.validate()?;
        Ok(cli)
    }

    #[test]
    fn defaults() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.channel, ChannelSpec::Named("org.qpid.vios.0".into()));
        let default = vec![ListenSpec {
            addr: ListenAddr::Tcp("127.0.0.1:5672".parse().unwrap()),
            service: "amqp".into(),
        }];
        assert_eq!(cli.listeners(), Some(default.clone()));
        // The default listener is the first port's: a second port without
        // listeners of its own has none (and would only collide).
        let second = parse(&["--channel", "org.qpid.vios.1"]).unwrap();
        assert_eq!(second.listeners(), None);
        let own = parse(&["-c", "org.qpid.vios.1", "-l", "127.0.0.1:5673=amqp"]).unwrap();
        assert_eq!(own.listeners().unwrap().len(), 1);
        let dev = parse(&["--channel", "/dev/vport0p2"]).unwrap();
        assert_eq!(dev.listeners(), Some(default));
    }

    #[test]
    fn channel_forms() {
        let c = |s| parse(&["--channel", s]).map(|c| c.channel);
        assert_eq!(c("unix:/tmp/x"), Ok(ChannelSpec::Unix("/tmp/x".into())));
        assert_eq!(
            c("/dev/vport0p1"),
            Ok(ChannelSpec::Device("/dev/vport0p1".into()))
        );
        assert!(c("unix:rel").unwrap_err().contains("ABSOLUTE"));
        assert!(c("bad name").unwrap_err().contains("port name"));
    }

    #[test]
    fn listeners() {
        let cli = parse(&[
            "--listen",
            "127.0.0.1:5673=amqp",
            "--listen",
            "unix:/run/x.sock=amqp",
            "-l",
            "[::1]:1=other",
        ])
        .unwrap();
        assert_eq!(cli.listen.len(), 3);
        assert_eq!(cli.listen[1].addr, ListenAddr::Unix("/run/x.sock".into()));
        let e = parse(&["--listen", "0.0.0.0:5672=amqp"]).unwrap_err();
        assert!(
            e.contains("not a loopback") && e.contains("--allow-remote"),
            "{e}"
        );
        assert!(parse(&["--listen", "0.0.0.0:5672=amqp", "--allow-remote"]).is_ok());
        let e = parse(&["--listen", "localhost:5672=amqp"]).unwrap_err();
        assert!(e.contains("localhost:5672"), "{e}");
        let e = parse(&["--listen", "127.0.0.1:5672"]).unwrap_err();
        assert!(e.contains("no '='"), "{e}");
        let e = parse(&["-l", "127.0.0.1:1=a", "-l", "127.0.0.1:1=b"]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }
}
