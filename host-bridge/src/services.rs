//! The services guests may reach, and connecting a stream to one: the host
//! side's [`Opener`].
//!
//! A service is a name and one or more addresses (a clustered broker):
//! `NAME=ADDR[|ADDR...][,proxy=v2][,pick=order|round-robin][,loopback=ok]`.
//! A new stream goes to an address that answers: in the order given
//! (`pick=order`, the default: the first is the primary) or rotating over
//! them (`pick=round-robin`). An address whose connect fails or times out is
//! skipped by later streams and tried again after a backoff (1 s, doubling
//! to 30 s); the stream that met the failure tries the next address at once.
//! A stream is never moved once connected: the broker connection is the
//! stream, and when it fails the guest sees a reset and reconnects.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::TcpStream;
use socket2::{Domain, Socket, Type};
use vios_common::cli::split_named;
use vios_common::io::channel::{Opener, Opening};
use vios_common::io::sock::Sock;
use vios_common::proto::{Code, StreamId};
use vios_common::sys;

use crate::identity::{self, ProxyInfo};
use crate::policy;
use crate::settings::Settings;

/// How a service's addresses are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    Order,
    RoundRobin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    /// Send a PROXY v2 header with the guest's identity first.
    pub proxy: bool,
    pub pick: Pick,
    /// The operator says a loopback address is intended (no warning).
    pub loopback_ok: bool,
}

const SERVICE_FORM: &str = "NAME=HOST:PORT[|HOST:PORT...][,proxy=v2][,pick=order|round-robin][,loopback=ok]";

pub fn parse_service(s: &str) -> Result<ServiceSpec, String> {
    let (name, rest) = split_named(s.trim(), "service", SERVICE_FORM)?;
    let mut parts = rest.split(',');
    let addrs_text = parts.next().unwrap_or_default();
    let mut addrs = Vec::new();
    for a in addrs_text.split('|') {
        let a = a.trim();
        let addr = a
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {a:?} of service {name} (expected HOST:PORT): {e}"))?
            .next()
            .ok_or_else(|| format!("{a:?} of service {name} resolves to no address"))?;
        if addrs.contains(&addr) {
            return Err(format!("{addr} is given twice for service {name}"));
        }
        addrs.push(addr);
    }
    let mut spec = ServiceSpec {
        name: name.to_owned(),
        addrs,
        proxy: false,
        pick: Pick::Order,
        loopback_ok: false,
    };
    for opt in parts {
        match opt.trim() {
            "proxy=v2" => spec.proxy = true,
            "pick=order" => spec.pick = Pick::Order,
            "pick=round-robin" => spec.pick = Pick::RoundRobin,
            "loopback=ok" => spec.loopback_ok = true,
            other => {
                return Err(format!(
                    "unknown option {other:?} of service {name} (expected {SERVICE_FORM})"
                ))
            }
        }
    }
    Ok(spec)
}

/// The first backoff of an address that failed, and the longest.
const DOWN_FIRST: Duration = Duration::from_secs(1);
const DOWN_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Health {
    down_until: Option<Instant>,
    backoff: Duration,
}

/// A service at run time: its spec and what its addresses did lately.
/// Shared by every loop thread.
#[derive(Debug)]
pub struct Service {
    pub spec: ServiceSpec,
    health: Mutex<Vec<Health>>,
    next: AtomicUsize,
}

impl Service {
    pub fn new(spec: ServiceSpec) -> Service {
        let n = spec.addrs.len();
        Service {
            spec,
            health: Mutex::new((0..n).map(|_| Health::default()).collect()),
            next: AtomicUsize::new(0),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Vec<Health>> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The addresses in the order a new stream tries them: those up first
    /// (in order, or rotated by one per stream), then those down, soonest
    /// due first.
    pub fn candidates(&self, now: Instant) -> Vec<SocketAddr> {
        let n = self.spec.addrs.len();
        let start = match self.spec.pick {
            Pick::Order => 0,
            Pick::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let h = self.health();
        let rotated = (0..n).map(|i| (start + i) % n);
        let mut up: Vec<usize> = rotated
            .clone()
            .filter(|&i| h[i].down_until.is_none_or(|t| now >= t))
            .collect();
        let mut down: Vec<usize> = rotated.filter(|i| !up.contains(i)).collect();
        down.sort_by_key(|&i| h[i].down_until);
        up.append(&mut down);
        up.into_iter().map(|i| self.spec.addrs[i]).collect()
    }

    /// A connect to `addr` succeeded or failed.
    pub fn report(&self, addr: SocketAddr, ok: bool, now: Instant) {
        let Some(i) = self.spec.addrs.iter().position(|&a| a == addr) else {
            return;
        };
        let mut h = self.health();
        let e = &mut h[i];
        if ok {
            if e.down_until.take().is_some() {
                info!("service {}: {addr} answers again", self.spec.name);
            }
            e.backoff = Duration::ZERO;
        } else if self.spec.addrs.len() > 1 {
            e.backoff = if e.backoff.is_zero() {
                DOWN_FIRST
            } else {
                (e.backoff * 2).min(DOWN_MAX)
            };
            if e.down_until.replace(now + e.backoff).is_none() {
                warn!(
                    "service {}: {addr} failed; skipped by new streams, tried again in {} ms",
                    self.spec.name,
                    e.backoff.as_millis()
                );
            }
        }
    }
}

/// What opens the streams of one guest's channel.
pub struct ServiceOpener<'a> {
    pub guest: &'a str,
    /// The channel (port) name, for PROXY headers.
    pub channel: &'a str,
    /// The guest's identity address.
    pub identity: std::net::IpAddr,
    pub settings: &'a Settings,
}

impl ServiceOpener<'_> {
    fn service(&self, name: &str) -> Option<&Service> {
        self.settings.services.iter().find(|s| s.spec.name == name)
    }
}

impl Opener for ServiceOpener<'_> {
    fn open(
        &mut self,
        stream: StreamId,
        service: &str,
        tried: &[SocketAddr],
        now: Instant,
    ) -> Result<Opening, (Code, String)> {
        let Some(svc) = self.service(service) else {
            return Err((
                Code::UnknownService,
                format!("no service named {service:?} for guest {}", self.guest),
            ));
        };
        if !policy::permitted(&self.settings.allow, self.guest, service) {
            return Err((
                Code::NotPermitted,
                format!("guest {} may not open {service:?}", self.guest),
            ));
        }
        // Not by position: a failed address moves to the end of the list.
        // A connect that fails at once (not in progress) goes on to the next.
        let mut last = None;
        let mut sock_addr = None;
        for addr in svc.candidates(now).into_iter().filter(|a| !tried.contains(a)) {
            match connect(addr, self.settings.service_buffer) {
                Ok(sock) => {
                    sock_addr = Some((sock, addr));
                    break;
                }
                Err(e) => {
                    svc.report(addr, false, now);
                    if sys::is_resource_error(&e) {
                        return Err((Code::ResourceLimit, format!("connect to {addr}: {e}")));
                    }
                    last = Some(format!("connect to {addr}: {e}"));
                }
            }
        }
        let Some((sock, addr)) = sock_addr else {
            let list: Vec<String> = svc.spec.addrs.iter().map(ToString::to_string).collect();
            let last = last.map(|l| format!("; last: {l}")).unwrap_or_default();
            return Err((
                Code::Unreachable,
                format!(
                    "no address of service {service} answered ({}){last}",
                    list.join(", ")
                ),
            ));
        };
        if let Err(e) = sock.set_nodelay(true) {
            debug!("set TCP_NODELAY on a socket to {addr}: {e}");
        }
        let preamble = if svc.spec.proxy {
            identity::proxy_v2(&ProxyInfo {
                source: self.identity,
                stream: stream.0,
                dest: addr,
                guest: self.guest,
                channel: self.channel,
            })
        } else {
            Vec::new()
        };
        Ok(Opening {
            sock: Sock::Tcp(sock),
            addr: Some(addr),
            preamble,
        })
    }

    fn connected(&mut self, service: &str, addr: SocketAddr, ok: bool, now: Instant) {
        if let Some(svc) = self.service(service) {
            svc.report(addr, ok, now);
        }
    }
}

/// Starts a non-blocking connect to `addr`. With `buffer`, the socket's
/// kernel send and receive buffers are capped at it (before the connect, so
/// that the TCP window is sized by it): a service that stops reading parks at
/// most that much in the host's kernel per stream, and one that floods holds
/// at most that much before the host reads it.
fn connect(addr: SocketAddr, buffer: Option<usize>) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    if let Some(n) = buffer {
        s.set_send_buffer_size(n)?;
        s.set_recv_buffer_size(n)?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_forms() {
        let s = parse_service("amqp=127.0.0.1:5672").unwrap();
        assert_eq!(s.addrs, vec!["127.0.0.1:5672".parse().unwrap()]);
        assert!(!s.proxy && s.pick == Pick::Order && !s.loopback_ok);
        let s =
            parse_service("amqp=10.0.0.1:5672|10.0.0.2:5672,proxy=v2,pick=round-robin,loopback=ok").unwrap();
        assert_eq!(s.addrs.len(), 2);
        assert!(s.proxy && s.pick == Pick::RoundRobin && s.loopback_ok);
        assert!(parse_service("amqp=127.0.0.1:1,proxy=v1")
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse_service("amqp=127.0.0.1:1|127.0.0.1:1")
            .unwrap_err()
            .contains("twice"));
        assert!(parse_service("amqp=nohost").unwrap_err().contains("HOST:PORT"));
    }

    #[test]
    fn failed_addresses_are_skipped_then_tried_again() {
        let svc = Service::new(parse_service("amqp=10.0.0.1:1|10.0.0.2:1|10.0.0.3:1").unwrap());
        let a: Vec<SocketAddr> = svc.spec.addrs.clone();
        let t0 = Instant::now();
        assert_eq!(svc.candidates(t0), a);
        svc.report(a[0], false, t0);
        // Down for 1 s: the others first, then it.
        assert_eq!(svc.candidates(t0), vec![a[1], a[2], a[0]]);
        assert_eq!(svc.candidates(t0 + Duration::from_secs(1)), a);
        // Failing again doubles the wait; succeeding clears it.
        svc.report(a[0], false, t0 + Duration::from_secs(1));
        assert_eq!(svc.candidates(t0 + Duration::from_millis(2500))[0], a[1]);
        svc.report(a[0], true, t0 + Duration::from_millis(2500));
        assert_eq!(svc.candidates(t0 + Duration::from_millis(2500)), a);
    }

    /// The stream that finds an address dead goes on to the next one, not
    /// to whatever is now at its attempt's position (the dead address moved
    /// to the end of the list).
    #[test]
    fn a_stream_never_tries_an_address_twice() {
        use clap::Parser;
        let cli = crate::config::Cli::try_parse_from([
            "vios-host-bridge",
            "--guest",
            "g=/nonexistent",
            "--service",
            "amqp=127.0.0.1:9|127.0.0.1:10|127.0.0.1:11",
        ])
        .unwrap();
        let settings = Settings::new(
            &cli,
            std::sync::Arc::new(vios_common::io::limits::Descriptors::unlimited()),
        );
        let mut opener = ServiceOpener {
            guest: "g",
            channel: "c",
            identity: "fd56:696f:7300::1".parse().unwrap(),
            settings: &settings,
        };
        let now = Instant::now();
        let mut tried = Vec::new();
        for _ in 0..3 {
            let o = opener.open(StreamId(1), "amqp", &tried, now).unwrap();
            let addr = o.addr.unwrap();
            assert!(!tried.contains(&addr), "{addr} tried twice: {tried:?}");
            opener.connected("amqp", addr, false, now);
            tried.push(addr);
        }
        let (code, text) = opener.open(StreamId(1), "amqp", &tried, now).err().unwrap();
        assert_eq!(code, Code::Unreachable);
        assert!(text.contains("no address of service amqp answered"), "{text}");
    }

    #[test]
    fn round_robin_rotates_over_the_addresses() {
        let svc = Service::new(parse_service("amqp=10.0.0.1:1|10.0.0.2:1,pick=round-robin").unwrap());
        let t0 = Instant::now();
        let firsts: Vec<SocketAddr> = (0..4).map(|_| svc.candidates(t0)[0]).collect();
        assert_eq!(firsts[0], firsts[2]);
        assert_ne!(firsts[0], firsts[1]);
    }
}
