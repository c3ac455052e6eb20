//! `vios-guest-bridge`: accepts local clients and carries them over one
//! virtio-serial port to `vios-host-bridge`.
//!
//! # Layout
//!
//! - [`config`]: command line and environment.
//! - [`listener`]: loopback TCP and unix-socket listeners.
//! - [`run`] (here): the one mio loop: listeners, the channel's
//!   [`vios_common::io::mux::Mux`], clients waiting for a session, signals.
#![forbid(unsafe_code)]

pub mod config;
pub mod listener;

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::{Events, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use vios_common::io::conn::{Conn, Phase};
use vios_common::io::link::Link;
use vios_common::io::mux::{Mux, MuxConfig, NoOpener};
use vios_common::io::random_seed;
use vios_common::io::sock::{would_block, Sock};
use vios_common::proto::session::Policy;
use vios_common::proto::{Config as SessionConfig, Limits, Role, Session};

use config::Cli;
use listener::Listener;

const LINK: Token = Token(0);
/// Listener `i` has token `LISTENERS + i`; connections count up from 1.
const LISTENERS: usize = 1 << 40;
const SIGNALS: Token = Token(usize::MAX);
/// After `EMFILE` and friends, accept again after this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A client accepted while there was no session.
struct Waiting {
    deadline: Instant,
    sock: Sock,
    peer: String,
    service: String,
    since: Instant,
}

struct Bridge {
    cli: Cli,
    poll: Poll,
    mux: Mux,
    listeners: Vec<Listener>,
    waiting: VecDeque<Waiting>,
    /// Accepting paused until then (descriptor exhaustion).
    accept_paused: Option<Instant>,
}

/// Runs until SIGTERM or SIGINT.
pub fn run(cli: Cli) -> io::Result<()> {
    let poll = Poll::new()?;
    let mut listeners = Vec::new();
    for (i, spec) in cli.listen.iter().enumerate() {
        let mut l = Listener::bind(spec)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", spec.addr)))?;
        l.register(poll.registry(), Token(LISTENERS + i))?;
        info!("listening on {} for service {}", spec.addr, spec.service);
        listeners.push(l);
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
    // The host is the trusted side: no rate limits on what it sends.
    cfg.policy = Policy::unlimited();
    let now = Instant::now();
    let link = Link::new(cli.channel.clone(), LINK, now);

    let mux = Mux::new(
        Session::new(cfg, random_seed()),
        link,
        MuxConfig::unlimited(String::new()),
    );
    let mut bridge = Bridge {
        cli,
        poll,
        mux,
        listeners,
        waiting: VecDeque::new(),
        accept_paused: None,
    };
    let result = bridge.run();
    for l in &bridge.listeners {
        l.cleanup();
    }
    result
}

impl Bridge {
    fn run(&mut self) -> io::Result<()> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, mio::Interest::READABLE)?;
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
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            let mut accept_from = Vec::new();
            for ev in events.iter() {
                let t = ev.token();
                if t == SIGNALS {
                    for sig in signals.pending() {
                        if sig == SIGHUP {
                            info!("SIGHUP: nothing to reload");
                        } else if stopping.is_none() {
                            info!(
                                "signal {sig}: stopping (grace {} ms)",
                                self.cli.shutdown_grace.as_millis()
                            );
                            stopping = Some(now + self.cli.shutdown_grace);
                            self.stop_accepting(now);
                            self.mux.shutdown(self.cli.shutdown_grace, now);
                        }
                    }
                } else if t.0 >= LISTENERS {
                    accept_from.push(t.0 - LISTENERS);
                } else {
                    self.mux.ready(ev, self.poll.registry());
                }
            }
            if stopping.is_none() {
                if self.accept_paused.is_some_and(|t| now >= t) {
                    self.accept_paused = None;
                    accept_from.extend(0..self.listeners.len());
                }
                for i in accept_from {
                    self.accept(i, now);
                }
                self.open_waiting(now);
            }
            more_work = self.mux.process(now, self.poll.registry(), &mut NoOpener);
            if stopping.is_none() {
                self.open_waiting(now);
            }
            if let Some(deadline) = stopping {
                if now >= deadline || self.mux.is_shut_down() {
                    self.mux.finish_shutdown(now, self.poll.registry());
                    info!("stopped");
                    return Ok(());
                }
            }
        }
    }

    fn next_deadline(&self, stopping: Option<Instant>) -> Option<Instant> {
        [
            self.mux.poll_timeout(),
            self.waiting.front().map(|w| w.deadline),
            self.accept_paused,
            stopping,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Accepts every pending client of listener `i`.
    fn accept(&mut self, i: usize, now: Instant) {
        if self.accept_paused.is_some() {
            return;
        }
        loop {
            let (sock, peer) = match self.listeners[i].accept() {
                Ok(c) => c,
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors: the pending client stays in the
                    // backlog; try again shortly instead of spinning.
                    warn!(
                        "accept on {}: {e}; pausing accepts for {} ms",
                        self.listeners[i].spec.addr,
                        ACCEPT_PAUSE.as_millis()
                    );
                    self.accept_paused = Some(now + ACCEPT_PAUSE);
                    return;
                }
            };
            let service = self.listeners[i].spec.service.clone();
            if self.mux.session.can_open() && self.waiting.is_empty() {
                self.open(sock, peer, service, now);
            } else if self.waiting.len() < self.cli.max_waiting {
                let deadline = now + self.cli.session_wait;
                self.waiting.push_back(Waiting {
                    deadline,
                    sock,
                    peer,
                    service,
                    since: now,
                });
            } else {
                warn!(
                    "client {peer} ({service}) reset: {} clients already wait for a session",
                    self.waiting.len()
                );
                sock.abort(self.poll.registry());
            }
        }
    }

    /// Opens waiting clients while the session allows; resets those whose wait is over.
    fn open_waiting(&mut self, now: Instant) {
        while self.mux.session.can_open() {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.open(w.sock, w.peer, w.service, now);
        }
        while self.waiting.front().is_some_and(|w| now >= w.deadline) {
            let w = self.waiting.pop_front().expect("checked");
            warn!(
                "client {} ({}) reset: no session with the host within {} ms",
                w.peer,
                w.service,
                (now - w.since).as_millis()
            );
            w.sock.abort(self.poll.registry());
        }
    }

    fn open(&mut self, sock: Sock, peer: String, service: String, now: Instant) {
        let stream = match self.mux.session.open(&service) {
            Ok(s) => s,
            Err(e) => {
                warn!("client {peer} ({service}) reset: cannot open a stream: {e}");
                return sock.abort(self.poll.registry());
            }
        };
        info!(
            "{}stream {stream} ({service}) opened for client {peer}",
            self.mux.label()
        );
        let conn = Conn::new(stream, service, peer, sock, Phase::Open, now);
        if let Err(e) = self.mux.add_conn(self.poll.registry(), conn, now) {
            warn!("stream {stream}: cannot register client socket: {e}");
            self.mux.session.reset(
                stream,
                vios_common::proto::Code::ResourceLimit,
                "guest could not register the socket",
            );
        }
    }

    fn stop_accepting(&mut self, _now: Instant) {
        for w in self.waiting.drain(..) {
            w.sock.abort(self.poll.registry());
        }
    }
}
