//! One guest: a thread with its own poll loop over the guest's channels.
//!
//! Each guest runs on its own thread so that one guest's load or flood is
//! scheduled by the kernel against the others, and a bug that kills one
//! guest's thread leaves the rest served (the supervisor restarts it). The
//! supervisor steers a worker with [`Control`] messages: a new set of channel
//! sockets (found by a rescan), or stop.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Events, Poll, Token, Waker};
use vios_common::io::limits::{Budget, Descriptors, StreamTimeouts};
use vios_common::io::link::{ChannelSpec, Link};
use vios_common::io::mux::{Mux, MuxConfig, Opener};
use vios_common::io::random_seed;
use vios_common::io::sock::Sock;
use vios_common::proto::session::Policy;
use vios_common::proto::{Code, Config as SessionConfig, Limits, Role, Session, StreamId};
use vios_common::sys;

use crate::config::ServiceSpec;

/// Tokens of channel slot `i` start at `i << CHANNEL_SHIFT`.
const CHANNEL_SHIFT: u32 = 32;
const WAKER: Token = Token(usize::MAX);

/// What every guest worker shares.
#[derive(Debug)]
pub struct Settings {
    pub services: Vec<ServiceSpec>,
    pub limits: Limits,
    pub policy: Policy,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Bytes buffered for one guest's streams.
    pub max_buffered: usize,
    /// Every descriptor of the process: channels, worker loops, streams.
    pub fds: Arc<Descriptors>,
    pub timeouts: StreamTimeouts,
    /// End a session whose guest reads nothing for this long.
    pub write_stall: Option<Duration>,
}

/// What the supervisor tells a worker.
#[derive(Debug)]
pub enum Control {
    /// Serve exactly these channel sockets: new ones are connected, channels
    /// no longer listed have their streams reset and are closed.
    Channels(Vec<PathBuf>),
    /// GOAWAY on every channel, then reset what remains after `grace`.
    Stop { grace: Duration },
}

/// The handle the supervisor keeps.
pub struct WorkerHandle {
    pub guest: String,
    pub sockets: Vec<PathBuf>,
    tx: Sender<Control>,
    waker: Arc<Waker>,
    pub thread: std::thread::JoinHandle<()>,
}

impl WorkerHandle {
    pub fn send(&self, c: Control) {
        let _ = self.tx.send(c);
        let _ = self.waker.wake();
    }
}

/// Descriptors a worker holds besides its channels: its poll instance and
/// its waker.
const WORKER_FDS: usize = 2;

/// Why a worker could not start.
#[derive(Debug)]
pub enum SpawnError {
    /// Not enough descriptors left in the process's budget.
    NoDescriptors {
        used: usize,
        limit: usize,
    },
    Io(io::Error),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::NoDescriptors { used, limit } => {
                write!(f, "no descriptors free ({used} of {limit} in use)")
            }
            SpawnError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Descriptors counted for a worker, given back when it ends.
struct Held(Arc<Descriptors>, usize);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.release_infra(self.1);
    }
}

/// Starts a thread serving guest `name` on `sockets`.
pub fn spawn(name: &str, sockets: Vec<PathBuf>, settings: Arc<Settings>) -> Result<WorkerHandle, SpawnError> {
    let fds = &settings.fds;
    if !fds.take_infra(WORKER_FDS) {
        return Err(SpawnError::NoDescriptors {
            used: fds.used(),
            limit: fds.limit(),
        });
    }
    let held = Held(fds.clone(), WORKER_FDS);
    let poll = Poll::new().map_err(SpawnError::Io)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(SpawnError::Io)?);
    let (tx, rx) = mpsc::channel();
    let budget = Arc::new(Budget::new(settings.max_buffered, settings.fds.clone()));
    let mut worker = Worker {
        guest: name.to_owned(),
        settings,
        poll,
        slots: Vec::new(),
        budget,
        control: rx,
        _held: held,
    };
    worker.set_channels(&sockets, Instant::now());
    let thread = std::thread::Builder::new()
        .name(format!("guest-{name}"))
        .spawn(move || worker.run())
        .map_err(SpawnError::Io)?;
    Ok(WorkerHandle {
        guest: name.to_owned(),
        sockets,
        tx,
        waker,
        thread,
    })
}

struct Worker {
    guest: String,
    settings: Arc<Settings>,
    poll: Poll,
    /// One mux per channel; a slot's index fixes its tokens, so removed
    /// channels leave a hole for the next one.
    slots: Vec<Option<Mux>>,
    /// What this guest may hold, shared by its channels.
    budget: Arc<Budget>,
    control: Receiver<Control>,
    /// Last, so it is dropped after the poll instance and the channels.
    _held: Held,
}

fn socket_path(mux: &Mux) -> Option<&Path> {
    match mux.link.spec() {
        ChannelSpec::Unix(p) => Some(p),
        _ => None,
    }
}

impl Worker {
    fn muxes(&mut self) -> impl Iterator<Item = &mut Mux> {
        self.slots.iter_mut().flatten()
    }

    fn set_channels(&mut self, sockets: &[PathBuf], now: Instant) {
        for slot in &mut self.slots {
            let gone = slot
                .as_ref()
                .and_then(socket_path)
                .is_some_and(|p| !sockets.iter().any(|s| s == p));
            if gone {
                let mut mux = slot.take().expect("checked");
                info!("{}channel removed", mux.label());
                mux.finish_shutdown(now, self.poll.registry());
            }
        }
        for path in sockets {
            let known = self.slots.iter().flatten().any(|m| socket_path(m) == Some(path));
            if known {
                continue;
            }
            let i = self.slots.iter().position(Option::is_none).unwrap_or_else(|| {
                self.slots.push(None);
                self.slots.len() - 1
            });
            let version = env!("CARGO_PKG_VERSION");
            let mut cfg = SessionConfig::new(Role::Host, format!("vios-host-bridge {version}"));
            cfg.limits = self.settings.limits;
            cfg.policy = self.settings.policy.clone();
            cfg.hello_deadline = self.settings.handshake_timeout;
            let link = Link::new(ChannelSpec::Unix(path.clone()), Token(i << CHANNEL_SHIFT), now)
                .with_descriptors(self.settings.fds.clone());
            let port = path
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
            let label = format!("guest {} {port}: ", self.guest);
            let session = Session::new(cfg, random_seed());
            let cfg = MuxConfig {
                label,
                connect_timeout: self.settings.connect_timeout,
                budget: self.budget.clone(),
                timeouts: self.settings.timeouts,
                write_stall: self.settings.write_stall,
            };
            self.slots[i] = Some(Mux::new(session, link, cfg));
        }
    }

    fn run(mut self) {
        let n = self.muxes().count();
        info!("guest {}: serving {n} channel(s)", self.guest);
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
                    warn!("guest {}: poll failed: {e}", self.guest);
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            let now = Instant::now();
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                let i = ev.token().0 >> CHANNEL_SHIFT;
                if let Some(Some(mux)) = self.slots.get_mut(i) {
                    mux.ready(ev, self.poll.registry());
                }
            }
            while let Ok(c) = self.control.try_recv() {
                match c {
                    Control::Channels(sockets) => self.set_channels(&sockets, now),
                    Control::Stop { grace } if stopping.is_none() => {
                        info!("guest {}: stopping (grace {} ms)", self.guest, grace.as_millis());
                        for mux in self.muxes() {
                            mux.shutdown(grace, now);
                        }
                        stopping = Some(now + grace);
                    }
                    Control::Stop { .. } => {}
                }
            }
            more_work = false;
            let streams = self.muxes().map(|m| m.session.stream_count()).sum();
            let mut opener = ServiceOpener {
                guest: &self.guest,
                settings: &self.settings,
                streams,
            };
            for mux in self.slots.iter_mut().flatten() {
                more_work |= mux.process(now, self.poll.registry(), &mut opener);
            }
            if let Some(deadline) = stopping {
                if now >= deadline || self.slots.iter().flatten().all(Mux::is_shut_down) {
                    let registry = self.poll.registry();
                    for mux in self.slots.iter_mut().flatten() {
                        mux.finish_shutdown(now, registry);
                    }
                    info!("guest {}: stopped", self.guest);
                    return;
                }
            }
        }
    }

    fn next_deadline(&self, stopping: Option<Instant>) -> Option<Instant> {
        self.slots
            .iter()
            .flatten()
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
            let code = if sys::is_resource_error(&e) {
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
