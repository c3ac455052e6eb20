//! The command line and environment of `vios-host-bridge`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::identity::Prefix;
use crate::policy::AllowRule;
pub use crate::services::ServiceSpec;
use vios_common::cli::{
    parse_duration, parse_frame, parse_idle, parse_inflight, parse_size, parse_window, split_named,
};
use vios_common::proto::session::{
    DEFAULT_CONTROL_RATE, DEFAULT_FRAME_RATE, DEFAULT_OPEN_RATE, DEFAULT_SCAN_BYTES_PER_SEC,
    DEFAULT_SESSIONS_PER_MINUTE, DEFAULT_VIOLATIONS_PER_10S,
};

/// Where the control socket is unless --control says otherwise.
pub const DEFAULT_CONTROL: &str = "/run/vios/vios-host-bridge.sock";

const ABOUT: &str = "Host side of the Vios bridge: serves guests' virtio-serial channels \
and splices every stream a guest opens into a host service such as an AMQP broker.";

const LONG_ABOUT: &str = "Host side of the Vios bridge.

For each guest it connects to the unix sockets QEMU listens on for that guest's \
virtio-serial ports (chardev socket,server=on), negotiates a Vios session with the \
vios-guest-bridge inside the guest, and for every stream the guest opens connects \
to the service the stream names. A guest names services, never addresses: it can \
reach only what --service maps. Channels that are missing or drop are retried with \
backoff; a guest that reboots or restarts its bridge is noticed and served again.";

const AFTER_HELP: &str = "Examples:
  vios-host-bridge --guest vm1=/run/vios/vm1/org.qpid.vios.0 --service amqp=127.0.0.1:5672
  VIOS_GUESTS='vm1=/run/vios/vm1/a.sock,/run/vios/vm1/b.sock;vm2=/run/vios/vm2/a.sock' \\
  VIOS_SERVICES='amqp=127.0.0.1:5672' vios-host-bridge

Status: `vios-host-bridge status [--json] [--guest NAME] [--streams]` asks the
running daemon through its control socket (see `vios-host-bridge status --help`).

systemd: `vios-host-bridge ip-allow [--config FILE] [OPTIONS]` prints a unit drop-in
with IPAddressAllow= for every non-loopback address the configured services map to
(the package's systemd generator installs it; the unit allows only loopback).

Logging: RUST_LOG=info (default), debug or warn. One line per stream at open and
close (guest, service, bytes each way, duration, reason). SIGUSR1 writes the
status to the log.
Signals: SIGTERM or SIGINT sends GOAWAY, waits --shutdown-grace for streams to
finish, resets the rest, and exits 0.";

#[derive(Parser, Debug)]
#[command(name = "vios-host-bridge", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// A guest and its channel sockets (QEMU's virtio-serial chardev sockets).
    /// Repeatable; in the environment, separate guests with ';'.
    #[arg(short, long = "guest", value_name = "NAME=SOCKET[,SOCKET...]", env = "VIOS_GUESTS",
          value_delimiter = ';', value_parser = parse_guest)]
    pub guests: Vec<GuestSpec>,

    /// The control socket `vios-host-bridge status` asks (mode 0660, the
    /// daemon's user and group). `none`: no control socket.
    #[arg(long, value_name = "PATH", env = "VIOS_CONTROL", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,

    /// Serve Prometheus metrics on HOST:PORT (GET /metrics). Off by default;
    /// a loopback address unless --metrics-allow-remote.
    #[arg(long, value_name = "HOST:PORT", env = "VIOS_METRICS")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Allow --metrics on an address other than loopback.
    #[arg(long, env = "VIOS_METRICS_ALLOW_REMOTE", value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_allow_remote: bool,

    /// A file of VIOS_*=value lines (the syntax of /etc/default files),
    /// read at start-up and again on every SIGHUP. With it, VIOS_* variables
    /// in the environment are not read; options on the command line win
    /// over the file. A reload applies services, --allow rules, guest
    /// identities and the guest list; a file with an error is refused and
    /// the running configuration kept.
    #[arg(long, value_name = "FILE", env = "VIOS_CONFIG")]
    pub config: Option<PathBuf>,

    /// Serve every guest found under DIR: each subdirectory is a guest and its
    /// sockets matching --channel-pattern are its channels (vios-proxy's
    /// DIR/<guest>/<socket> layout; libvirt's <id>-<name> directories are
    /// understood too). Rescanned every --rescan and on SIGHUP. Repeatable; in
    /// the environment separate with ';'.
    #[arg(
        long = "guest-dir",
        value_name = "DIR",
        env = "VIOS_GUEST_DIRS",
        value_delimiter = ';'
    )]
    pub guest_dirs: Vec<PathBuf>,

    /// Also scan libvirt's channel directories (/run/libvirt/qemu/channel and
    /// /var/lib/libvirt/qemu/channel/target).
    #[arg(long, env = "VIOS_LIBVIRT", value_parser = clap::builder::BoolishValueParser::new())]
    pub libvirt: bool,

    /// Which socket names in a guest directory are Vios channels (`*` and `?`
    /// wildcards). libvirt keeps other channels, such as the QEMU guest
    /// agent's, in the same directory.
    #[arg(
        long,
        value_name = "GLOB",
        env = "VIOS_CHANNEL_PATTERN",
        default_value = "org.qpid.vios.*"
    )]
    pub channel_pattern: String,

    /// Event-loop threads serving the guests [default: one per core]. Guests
    /// are spread over them; none has a thread of its own.
    #[arg(long, value_name = "N", env = "VIOS_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// How often guest directories are rescanned. With --watch a change is
    /// seen at once; the rescan finds what inotify cannot say (a directory
    /// created later, a lost event, a filesystem without inotify).
    #[arg(long, value_name = "DURATION", env = "VIOS_RESCAN", default_value = "5s", value_parser = parse_duration)]
    pub rescan: Duration,

    /// Watch guest directories with inotify, so that a guest whose channel
    /// socket appears is served, and one whose directory is removed is let
    /// go, within milliseconds. false: rescans only.
    #[arg(long, value_name = "BOOL", env = "VIOS_WATCH", default_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub watch: bool,

    /// A service guests may open, and the address(es) it maps to:
    /// NAME=HOST:PORT[|HOST:PORT...][,proxy=v2][,pick=order|round-robin][,loopback=ok].
    /// Several addresses make a clustered service: new streams go to one that
    /// answers (in order, or round-robin), failed ones are skipped for a
    /// while. proxy=v2 sends a PROXY protocol v2 header with the guest's
    /// identity address before any guest byte. loopback=ok says a loopback
    /// address is intended: a broker that trusts local connections would
    /// trust every guest (docs/OPERATIONS.md, "What the broker sees"). Repeatable; in the
    /// environment, separate services with ';'.
    #[arg(short, long = "service", value_name = "NAME=ADDR[,OPTION...]", env = "VIOS_SERVICES",
          value_delimiter = ';', value_parser = crate::services::parse_service, required = true)]
    pub services: Vec<ServiceSpec>,

    /// Which services guests whose name matches PATTERN may open (`*` and
    /// `?` wildcards; SERVICE `*` for all). Rules add up; without any rule
    /// every guest may open every service. A stream to a service a guest may
    /// not open is refused with NOT_PERMITTED. Repeatable; in the
    /// environment, separate rules with ';'.
    #[arg(long = "allow", value_name = "PATTERN=SERVICE[,SERVICE...]", env = "VIOS_ALLOW",
          value_delimiter = ';', value_parser = crate::policy::parse_allow)]
    pub allow: Vec<AllowRule>,

    /// The identity address of a guest in PROXY headers (never used for
    /// traffic). Repeatable; in the environment, separate with ';'. Guests
    /// without one get an address derived from their name (--identity-prefix).
    #[arg(long = "guest-address", value_name = "NAME=ADDRESS", env = "VIOS_GUEST_ADDRESSES",
          value_delimiter = ';', value_parser = parse_guest_address)]
    pub guest_addresses: Vec<(String, IpAddr)>,

    /// Where guests' identity addresses are derived from: the prefix, then
    /// the 64-bit FNV-1a hash of the guest's name in the low bits. The
    /// default is a unique-local IPv6 prefix, so an identity never looks like
    /// a real host.
    #[arg(long, value_name = "PREFIX/LEN", env = "VIOS_IDENTITY_PREFIX",
          default_value = crate::identity::DEFAULT_PREFIX, value_parser = Prefix::parse)]
    pub identity_prefix: Prefix,

    /// Streams one guest may have open at once (over all its channels).
    #[arg(long, value_name = "N", env = "VIOS_MAX_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams: u32,

    /// Credit each stream starts with: bytes a guest may send before the
    /// service has taken them.
    #[arg(long, value_name = "BYTES", env = "VIOS_WINDOW", default_value = "64K", value_parser = parse_window)]
    pub window: u32,

    /// Largest frame payload accepted from a guest.
    #[arg(long, value_name = "BYTES", env = "VIOS_MAX_FRAME", default_value = "256K", value_parser = parse_frame)]
    pub max_frame: u32,

    /// Bytes written to the channel and not yet acknowledged beyond which
    /// bulk data waits while two or more connections are open (when both
    /// bridges acknowledge, PROTOCOL.md §6.1): small messages never wait
    /// behind more than this much of other connections' data. Lower: less latency beside bulk transfers; higher:
    /// more throughput on a slow or distant channel. 64K..64M.
    #[arg(long, value_name = "BYTES", env = "VIOS_INFLIGHT", default_value = "192K", value_parser = parse_inflight)]
    pub inflight: usize,

    /// End a session when nothing arrived from the guest for this long
    /// (1s..1h); PINGs go out after half of it (the guest bridge pings after a third of its own, so its PINGs usually come first).
    #[arg(long, value_name = "DURATION", env = "VIOS_IDLE_TIMEOUT", default_value = "15s", value_parser = parse_idle)]
    pub idle_timeout: Duration,

    /// Give up connecting to a service after this long and refuse the stream.
    #[arg(long, value_name = "DURATION", env = "VIOS_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// On SIGTERM/SIGINT, how long streams may go on before they are reset.
    #[arg(long, value_name = "DURATION", env = "VIOS_SHUTDOWN_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Bytes the host may hold for one guest's streams (data the service has
    /// not taken yet). A stream that would pass it is reset with RESOURCE_LIMIT.
    #[arg(long, value_name = "BYTES", env = "VIOS_MAX_BUFFERED", default_value = "64M", value_parser = parse_bytes)]
    pub max_buffered: u64,

    /// Kernel send and receive buffer (SO_SNDBUF, SO_RCVBUF) of each socket
    /// to a service. Linux reserves twice this for bookkeeping, so a service
    /// that stops reading parks at most about 2x this in the host's kernel
    /// per stream, besides what the host holds itself. 0: the kernel's
    /// auto-tuning (up to several MiB per socket).
    #[arg(long, value_name = "BYTES", env = "VIOS_SERVICE_BUFFER", default_value = "256K",
          value_parser = parse_u32_size)]
    pub service_buffer: u32,

    /// Stream sockets open at once over all guests [default: as many as the
    /// open-files limit allows once channels, event loops and directory scans
    /// have their reserve: 64 + 1/64 of the limit]. The soft open-files limit
    /// is raised to the hard one at start-up. At the limit streams are
    /// refused with RESOURCE_LIMIT; nothing else fails.
    #[arg(long, value_name = "N", env = "VIOS_MAX_FDS")]
    pub max_fds: Option<usize>,

    /// OPENs a guest may send per second per channel (a burst of --max-streams
    /// is allowed); more are refused with RESOURCE_LIMIT. 0: no limit.
    #[arg(long, value_name = "N", env = "VIOS_OPEN_RATE", default_value_t = DEFAULT_OPEN_RATE)]
    pub open_rate: u32,

    /// Frames other than DATA (and HELLOs) a guest may send per second per
    /// channel; more end the session with ENHANCE_YOUR_CALM. 0: no limit.
    #[arg(long, value_name = "N", env = "VIOS_CONTROL_RATE", default_value_t = DEFAULT_CONTROL_RATE)]
    pub control_rate: u32,

    /// Frames of any kind a guest may send per second per channel; beyond it
    /// the channel is read more slowly (throttled), not served at any CPU cost.
    /// 0: no limit.
    #[arg(long, value_name = "N", env = "VIOS_FRAME_RATE", default_value_t = DEFAULT_FRAME_RATE)]
    pub frame_rate: u32,

    /// Stream-level violations and rate refusals tolerated per 10 s per
    /// channel before the session ends with ENHANCE_YOUR_CALM. 0: no limit.
    #[arg(long, value_name = "N", env = "VIOS_MAX_VIOLATIONS", default_value_t = DEFAULT_VIOLATIONS_PER_10S)]
    pub max_violations: u32,

    /// Sessions a guest may establish per minute per channel (a burst of
    /// twice as many is allowed). Beyond it every session end counts as a
    /// failure, so a guest that ends and restarts sessions in a loop is held
    /// off (1 s doubling to 30 s). 0: no limit.
    #[arg(long, value_name = "N", env = "VIOS_SESSION_RATE", default_value_t = DEFAULT_SESSIONS_PER_MINUTE)]
    pub session_rate: u32,

    /// Bytes per second a handshake may examine looking for a HELLO, CRC
    /// work included, per channel. Beyond it the channel is read more
    /// slowly: stale bytes and garbage cost at most this much CPU. 0: no limit.
    #[arg(long, value_name = "BYTES", env = "VIOS_SCAN_RATE", default_value_t = DEFAULT_SCAN_BYTES_PER_SEC,
          value_parser = parse_u32_size)]
    pub scan_rate: u32,

    /// Reset a stream after this long without a byte either way. 0: never.
    #[arg(long, value_name = "DURATION", env = "VIOS_STREAM_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub stream_idle_timeout: Duration,

    /// Quiet streams one guest may keep: streams that moved fewer than
    /// --quiet-bytes either way in their last --quiet-window. A byte now and
    /// then would otherwise hold a stream (and its service connection)
    /// forever; past this many, the streams quiet longest are reset with
    /// TIMEOUT. 0: no limit.
    #[arg(long, value_name = "N", env = "VIOS_MAX_QUIET_STREAMS", default_value_t = 128)]
    pub max_quiet_streams: u32,

    /// The window of the quiet-stream rule (see --max-quiet-streams).
    #[arg(long, value_name = "DURATION", env = "VIOS_QUIET_WINDOW", default_value = "5m", value_parser = parse_quiet_window)]
    pub quiet_window: Duration,

    /// Bytes a stream must move in a --quiet-window not to count as quiet.
    #[arg(long, value_name = "BYTES", env = "VIOS_QUIET_BYTES", default_value = "1K", value_parser = parse_bytes)]
    pub quiet_bytes: u64,

    /// Reset a stream that stays half-closed this long. 0: never.
    #[arg(long, value_name = "DURATION", env = "VIOS_HALF_CLOSED_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub half_closed_timeout: Duration,

    /// End a session when bytes wait for the guest and it has read none for
    /// this long (a guest that pings or grants credit but never drains its
    /// channel). 0: never.
    #[arg(long, value_name = "DURATION", env = "VIOS_WRITE_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_stall_timeout: Duration,

    /// A HELLO that takes longer than this to arrive is discarded.
    #[arg(long, value_name = "DURATION", env = "VIOS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    pub name: String,
    pub sockets: Vec<PathBuf>,
}

fn parse_guest(s: &str) -> Result<GuestSpec, String> {
    let (name, list) = split_named(s.trim(), "guest", "NAME=SOCKET[,SOCKET...]")?;
    let sockets: Vec<PathBuf> = list.split(',').map(|p| PathBuf::from(p.trim())).collect();
    if let Some(bad) = sockets
        .iter()
        .find(|p| p.as_os_str().is_empty() || p.is_relative())
    {
        return Err(format!("socket path {bad:?} of guest {name} must be absolute"));
    }
    Ok(GuestSpec {
        name: name.to_owned(),
        sockets,
    })
}

fn parse_guest_address(s: &str) -> Result<(String, IpAddr), String> {
    let (name, addr) = s
        .trim()
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ADDRESS, got {s:?} (no '=')"))?;
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} of guest {name} is not an IP address"))?;
    if ip.is_loopback() || ip.is_unspecified() {
        return Err(format!(
            "{ip} for guest {name}: an identity must not look like the host itself"
        ));
    }
    Ok((name.to_owned(), ip))
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size(s)
}

fn parse_quiet_window(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!(
            "{} ms is too short for a quiet window (at least 1s)",
            d.as_millis()
        ));
    }
    Ok(d)
}

fn parse_u32_size(s: &str) -> Result<u32, String> {
    vios_common::cli::parse_size_in(s, 0, u64::from(u32::MAX))
}

impl Cli {
    /// Checks what clap cannot: at least one guest, no name or socket twice.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(m) = self.metrics {
            if !m.ip().is_loopback() && !self.metrics_allow_remote {
                return Err(format!(
                    "refusing to serve metrics on {m}: not a loopback address (add --metrics-allow-remote if you mean it)"
                ));
            }
        }
        if self.guests.is_empty() && self.guest_dirs.is_empty() && !self.libvirt {
            return Err(
                "no guests to serve: give --guest NAME=SOCKET[,SOCKET...], --guest-dir DIR or --libvirt"
                    .into(),
            );
        }
        if let Some(d) = self.guest_dirs.iter().find(|d| d.is_relative()) {
            return Err(format!("guest directory {} must be absolute", d.display()));
        }
        if self.rescan < Duration::from_millis(100) {
            return Err(format!(
                "--rescan {} ms is too short (at least 100ms)",
                self.rescan.as_millis()
            ));
        }
        let mut names = HashSet::new();
        let mut sockets = HashSet::new();
        for g in &self.guests {
            if !names.insert(&g.name) {
                return Err(format!("guest {} is given twice", g.name));
            }
            for s in &g.sockets {
                if !sockets.insert(s) {
                    return Err(format!(
                        "socket {} is given twice (one host process per channel)",
                        s.display()
                    ));
                }
            }
        }
        let mut services = HashSet::new();
        for s in &self.services {
            if !services.insert(&s.name) {
                return Err(format!("service {} is given twice", s.name));
            }
        }
        Ok(())
    }
}

impl Cli {
    /// The directories to scan for guests.
    pub fn scan_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.guest_dirs.clone();
        if self.libvirt {
            dirs.extend(crate::discovery::LIBVIRT_DIRS.iter().map(PathBuf::from));
        }
        dirs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let cli = Cli::try_parse_from(std::iter::once("vios-host-bridge").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.validate()?;
        Ok(cli)
    }

    #[test]
    fn parses_guests_and_services() {
        let cli = parse(&[
            "--guest",
            "vm1=/run/a,/run/b",
            "-g",
            "vm2=/run/c",
            "--service",
            "amqp=127.0.0.1:5672",
        ])
        .unwrap();
        assert_eq!(cli.guests.len(), 2);
        assert_eq!(
            cli.guests[0].sockets,
            vec![PathBuf::from("/run/a"), PathBuf::from("/run/b")]
        );
        assert_eq!(cli.services[0].addrs, vec!["127.0.0.1:5672".parse().unwrap()]);
        assert_eq!(cli.window, 64 * 1024);
        assert_eq!(cli.idle_timeout, Duration::from_secs(15));
    }

    #[test]
    fn errors_name_the_bad_value() {
        let e = parse(&["--guest", "vm1", "--service", "amqp=127.0.0.1:5672"]).unwrap_err();
        assert!(e.contains("vm1") && e.contains("NAME=SOCKET"), "{e}");
        let e = parse(&["--guest", "vm1=relative/path", "--service", "amqp=127.0.0.1:5672"]).unwrap_err();
        assert!(e.contains("must be absolute"), "{e}");
        let e = parse(&["--guest", "vm1=/a", "--service", "amqp=nohost"]).unwrap_err();
        assert!(e.contains("nohost") && e.contains("HOST:PORT"), "{e}");
        let e = parse(&[
            "--guest",
            "vm1=/a",
            "--service",
            "amqp=127.0.0.1:5672",
            "--window",
            "12X",
        ])
        .unwrap_err();
        assert!(e.contains("12X"), "{e}");
        let e = parse(&["--service", "amqp=127.0.0.1:5672"]).unwrap_err();
        assert!(e.contains("no guests"), "{e}");
        assert!(parse(&["--service", "amqp=127.0.0.1:5672", "--guest-dir", "/run/vios"]).is_ok());
        let e = parse(&["--service", "amqp=127.0.0.1:5672", "--guest-dir", "run/vios"]).unwrap_err();
        assert!(e.contains("must be absolute"), "{e}");
        let e = parse(&[
            "--guest",
            "a=/s",
            "--guest",
            "b=/s",
            "--service",
            "amqp=127.0.0.1:1",
        ])
        .unwrap_err();
        assert!(e.contains("given twice"), "{e}");
        let e = parse(&[
            "--guest",
            "a=/s",
            "--service",
            "amqp=127.0.0.1:1",
            "--idle-timeout",
            "10ms",
        ])
        .unwrap_err();
        assert!(e.contains("outside"), "{e}");
    }
}
