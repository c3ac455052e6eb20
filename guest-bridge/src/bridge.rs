//! The guest bridge's state machine on the event loop: the listeners, the
//! one [`Channel`] to the host, and the clients waiting for a session.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::event::Event;
use mio::Registry;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use vios_common::io::channel::{Channel, NoOpener};
use vios_common::io::event_loop::{Handler, Turn};
use vios_common::io::sock::{would_block, Sock};

use crate::config::Cli;
use crate::listener::Listener;

/// Listener `i` has token `LISTENERS + i`; the channel's tokens are below it.
pub const LISTENERS: usize = 1 << 30;
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

pub struct Bridge {
    cli: Cli,
    channel: Channel,
    pub listeners: Vec<Listener>,
    waiting: VecDeque<Waiting>,
    /// Listeners with pending clients (edge seen, not yet drained).
    to_accept: Vec<usize>,
    /// Accepting paused until then (descriptor exhaustion).
    accept_paused: Option<Instant>,
    stopping: Option<Instant>,
    more: bool,
}

impl Bridge {
    pub fn new(cli: Cli, channel: Channel, listeners: Vec<Listener>) -> Bridge {
        Bridge {
            cli,
            channel,
            listeners,
            waiting: VecDeque::new(),
            to_accept: Vec::new(),
            accept_paused: None,
            stopping: None,
            more: false,
        }
    }

    /// Accepts every pending client of listener `i`.
    fn accept(&mut self, i: usize, registry: &Registry, now: Instant) {
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
            if self.channel.can_open() && self.waiting.is_empty() {
                self.open(sock, peer, service, registry, now);
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
                sock.abort(registry);
            }
        }
    }

    /// Opens waiting clients while the session allows; resets those whose wait is over.
    fn open_waiting(&mut self, registry: &Registry, now: Instant) {
        while self.channel.can_open() {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.open(w.sock, w.peer, w.service, registry, now);
        }
        while self.waiting.front().is_some_and(|w| now >= w.deadline) {
            let w = self.waiting.pop_front().expect("checked");
            warn!(
                "client {} ({}) reset: no session with the host within {} ms",
                w.peer,
                w.service,
                (now - w.since).as_millis()
            );
            w.sock.abort(registry);
        }
    }

    fn open(&mut self, sock: Sock, peer: String, service: String, registry: &Registry, now: Instant) {
        if let Err((e, sock)) = self
            .channel
            .open_stream(sock, peer.clone(), service.clone(), now, registry)
        {
            warn!("client {peer} ({service}) reset: {e}");
            sock.abort(registry);
        }
    }

    fn stop_accepting(&mut self, registry: &Registry) {
        for w in self.waiting.drain(..) {
            w.sock.abort(registry);
        }
    }
}

impl Handler for Bridge {
    fn ready(&mut self, event: &Event, registry: &Registry, now: Instant) {
        let t = event.token().0;
        if (LISTENERS..LISTENERS + self.listeners.len()).contains(&t) {
            self.to_accept.push(t - LISTENERS);
        } else if self.channel.owns(event.token()) {
            self.channel.ready(event, registry, now);
        }
    }

    fn signal(&mut self, sig: i32, registry: &Registry, now: Instant) {
        if sig == SIGHUP {
            info!("SIGHUP: nothing to reload");
        } else if (sig == SIGTERM || sig == SIGINT) && self.stopping.is_none() {
            let grace = self.cli.shutdown_grace;
            info!("signal {sig}: stopping (grace {} ms)", grace.as_millis());
            self.stopping = Some(now + grace);
            self.stop_accepting(registry);
            self.channel.shutdown(grace, now);
        }
    }

    fn turn(&mut self, registry: &Registry, now: Instant) -> Turn {
        if self.stopping.is_none() {
            if self.accept_paused.is_some_and(|t| now >= t) {
                self.accept_paused = None;
                self.to_accept.extend(0..self.listeners.len());
            }
            let mut todo = std::mem::take(&mut self.to_accept);
            todo.sort_unstable();
            todo.dedup();
            for i in todo {
                self.accept(i, registry, now);
            }
            self.open_waiting(registry, now);
        }
        self.more = self.channel.process(now, registry, &mut NoOpener);
        if self.stopping.is_none() {
            self.open_waiting(registry, now);
        }
        if let Some(deadline) = self.stopping {
            if now >= deadline || self.channel.is_shut_down() {
                self.channel.finish_shutdown(now, registry);
                info!("stopped");
                return Turn::Done;
            }
        }
        if self.more {
            Turn::Busy
        } else {
            Turn::Idle
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.channel.poll_timeout(),
            self.waiting.front().map(|w| w.deadline),
            self.accept_paused,
            self.stopping,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
