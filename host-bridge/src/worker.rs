//! One guest: a thread with its own poll loop over the guest's channels.
//!
//! Each guest runs on its own thread so that one guest's load or flood is
//! scheduled by the kernel against the others, and a bug that kills one
//! guest's thread leaves the rest served (the supervisor restarts it).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Events, Poll, Token, Waker};
use vios_common::io::link::{ChannelSpec, Link};
use vios_common::io::mux::{Mux, Opener};
use vios_common::io::random_seed;
use vios_common::io::sock::Sock;
use vios_common::proto::{Code, Config as SessionConfig, Limits, Role, Session, StreamId};

use crate::config::{GuestSpec, ServiceSpec};

/// Tokens of channel `i` start at `i << CHANNEL_SHIFT`.
const CHANNEL_SHIFT: u32 = 32;
const WAKER: Token = Token(usize::MAX);

/// What every guest worker shares.
#[derive(Debug)]
pub struct Settings {
    pub services: Vec<ServiceSpec>,
    pub limits: Limits,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// The handle the supervisor keeps.
pub struct WorkerHandle {
    pub guest: String,
    pub stop: Arc<AtomicBool>,
    pub waker: Arc<Waker>,
    pub thread: std::thread::JoinHandle<()>,
}

impl WorkerHandle {
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

pub fn spawn(guest: GuestSpec, settings: Arc<Settings>) -> io::Result<WorkerHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let stop = Arc::new(AtomicBool::new(false));
    let name = guest.name.clone();
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name(format!("guest-{name}"))
            .spawn(move || Worker::new(guest, settings, poll).run(&stop))?
    };
    Ok(WorkerHandle {
        guest: name,
        stop,
        waker,
        thread,
    })
}

struct Worker {
    guest: GuestSpec,
    settings: Arc<Settings>,
    poll: Poll,
    muxes: Vec<Mux>,
}

impl Worker {
    fn new(guest: GuestSpec, settings: Arc<Settings>, poll: Poll) -> Worker {
        let now = Instant::now();
        let muxes = guest
            .sockets
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let mut cfg = SessionConfig::new(
                    Role::Host,
                    format!("vios-host-bridge {}", env!("CARGO_PKG_VERSION")),
                );
                cfg.limits = settings.limits;
                let link = Link::new(
                    ChannelSpec::Unix(path.clone()),
                    Token(i << CHANNEL_SHIFT),
                    now,
                );
                let label = if guest.sockets.len() == 1 {
                    format!("guest {}: ", guest.name)
                } else {
                    format!("guest {} channel {i}: ", guest.name)
                };
                Mux::new(
                    Session::new(cfg, random_seed()),
                    link,
                    label,
                    settings.connect_timeout,
                )
            })
            .collect();
        Worker {
            guest,
            settings,
            poll,
            muxes,
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        info!(
            "guest {}: serving {} channel(s)",
            self.guest.name,
            self.muxes.len()
        );
        let mut events = Events::with_capacity(1024);
        let mut more_work = true;
        let mut stopping: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let timeout = if more_work {
                Some(Duration::ZERO)
            } else {
                self.next_deadline(stopping)
                    .map(|t| t.saturating_duration_since(now))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("guest {}: poll failed: {e}", self.guest.name);
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            let now = Instant::now();
            let registry = self.poll.registry();
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                let i = ev.token().0 >> CHANNEL_SHIFT;
                if let Some(mux) = self.muxes.get_mut(i) {
                    let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                    mux.ready(ev.token(), readable, writable, registry);
                }
            }
            if stopping.is_none() && stop.load(Ordering::SeqCst) {
                info!(
                    "guest {}: stopping (grace {} ms)",
                    self.guest.name,
                    self.settings.shutdown_grace.as_millis()
                );
                for mux in &mut self.muxes {
                    mux.shutdown(self.settings.shutdown_grace, now);
                }
                stopping = Some(now + self.settings.shutdown_grace);
            }
            more_work = false;
            let streams = self.muxes.iter().map(|m| m.session.stream_count()).sum();
            let mut opener = ServiceOpener {
                guest: &self.guest.name,
                settings: &self.settings,
                streams,
            };
            for mux in &mut self.muxes {
                more_work |= mux.process(now, self.poll.registry(), &mut opener);
            }
            if let Some(deadline) = stopping {
                if now >= deadline || self.muxes.iter().all(Mux::is_shut_down) {
                    for mux in &mut self.muxes {
                        mux.finish_shutdown(now, self.poll.registry());
                    }
                    info!("guest {}: stopped", self.guest.name);
                    return;
                }
            }
        }
    }

    fn next_deadline(&self, stopping: Option<Instant>) -> Option<Instant> {
        self.muxes
            .iter()
            .filter_map(Mux::poll_timeout)
            .chain(stopping)
            .min()
    }
}

/// Connects the streams a guest opens to the services it may use.
struct ServiceOpener<'a> {
    guest: &'a str,
    settings: &'a Settings,
    /// Streams the guest has open on all its channels, this one included.
    streams: usize,
}

impl Opener for ServiceOpener<'_> {
    fn open(&mut self, _stream: StreamId, service: &str) -> Result<(Sock, String), (Code, String)> {
        let Some(spec) = self.settings.services.iter().find(|s| s.name == service) else {
            return Err((
                Code::UnknownService,
                format!("no service named {service:?} for guest {}", self.guest),
            ));
        };
        let limit = self.settings.limits.max_streams as usize;
        // The session counts the new stream already.
        if self.streams > limit {
            return Err((
                Code::ResourceLimit,
                format!("guest {} has its limit of {limit} streams open", self.guest),
            ));
        }
        let addr = spec.addr;
        let sock = TcpStream::connect(addr).map_err(|e| {
            let code = if is_resource_error(&e) {
                Code::ResourceLimit
            } else {
                Code::Unreachable
            };
            (code, format!("connect to {addr}: {e}"))
        })?;
        if let Err(e) = sock.set_nodelay(true) {
            debug!("set TCP_NODELAY on a socket to {addr}: {e}");
        }
        self.streams += 1;
        Ok((Sock::Tcp(sock), addr.to_string()))
    }
}

/// Out of descriptors or memory: a resource limit, not an unreachable service.
fn is_resource_error(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOMEM 12, ENOBUFS 105
    matches!(e.raw_os_error(), Some(24 | 23 | 12 | 105))
}
