//! The guest bridge's state machine on the event loop: the listeners, the
//! one [`Channel`] to the host, and the clients waiting for a session.
//!
//! Local users share the host's stream limit and the waiting queue fairly
//! ([`FairShare`], per uid as the kernel reports it; clients whose user the
//! kernel cannot tell share one part): each user present, and one more who
//! may come, is guaranteed an equal part of the streams and of the queue.
//! One user's clients beyond its part wait (or, beyond its part of the
//! queue, are reset) while another user's are served.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::event::Event;
use mio::Registry;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use vios_common::io::channel::{Channel, NoOpener};
use vios_common::io::control::{ControlServer, StatusSource};
use vios_common::io::event_loop::{Handler, Turn};
use vios_common::io::share::FairShare;
use vios_common::io::sock::{would_block, Sock};
use vios_common::status::{GuestStatus, Status};
use vios_common::systemd::{Heartbeat, Notifier};

use crate::config::Cli;
use crate::listener::{Accepted, Listener};

/// The user of clients the kernel could not name.
const UNKNOWN_USER: u32 = u32::MAX;

/// Listener `i` has token `LISTENERS + i`; the channel's tokens are below it.
pub const LISTENERS: usize = 1 << 30;
/// The control socket's tokens.
pub const CONTROL: usize = 1 << 29;
/// After `EMFILE` and friends, accept again after this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A client accepted while there was no session, or beyond its user's part.
struct Waiting {
    deadline: Instant,
    sock: Sock,
    peer: String,
    service: String,
    uid: u32,
    since: Instant,
}

pub struct Bridge {
    cli: Cli,
    channel: Channel,
    pub listeners: Vec<Listener>,
    waiting: VecDeque<Waiting>,
    /// Each user's streams (the room is the host's stream limit) and places
    /// in the waiting queue.
    streams: FairShare<u32>,
    queue: FairShare<u32>,
    /// Listeners with pending clients (edge seen, not yet drained).
    to_accept: Vec<usize>,
    /// Accepting paused until then (descriptor exhaustion).
    accept_paused: Option<Instant>,
    stopping: Option<Instant>,
    more: bool,
    /// Taken out while it asks `self` for the status.
    pub control: Option<ControlServer>,
    /// Readiness, watchdog and status for systemd.
    heartbeat: Heartbeat,
    started: Instant,
}

impl Bridge {
    pub fn new(cli: Cli, channel: Channel, listeners: Vec<Listener>) -> Bridge {
        let newcomers = cli.user_shares;
        let queue = FairShare::with_newcomers(cli.max_waiting, newcomers);
        let streams = FairShare::with_newcomers(0, newcomers);
        Bridge {
            cli,
            channel,
            listeners,
            waiting: VecDeque::new(),
            streams,
            queue,
            to_accept: Vec::new(),
            accept_paused: None,
            stopping: None,
            more: false,
            control: None,
            heartbeat: Heartbeat::new(Notifier::from_env(), Instant::now()),
            started: Instant::now(),
        }
    }

    /// Accepts every pending client of listener `i`.
    fn accept(&mut self, i: usize, registry: &Registry, now: Instant) {
        if self.accept_paused.is_some() {
            return;
        }
        loop {
            let Accepted { sock, peer, uid } = match self.listeners[i].accept() {
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
            let uid = match (self.cli.user_shares, uid) {
                (false, _) => 0,
                (true, Some(u)) => u,
                (true, None) => UNKNOWN_USER,
            };
            let service = self.listeners[i].spec.service.clone();
            // Those already waiting go first, as far as their parts allow.
            self.open_waiting(registry, now);
            if self.channel.can_open() && self.streams.may_take(&uid) {
                self.open(sock, peer, service, uid, registry, now);
            } else if self.queue.try_take(&uid).is_ok() {
                if self.channel.can_open() {
                    info!(
                        "client {peer} ({service}) waits: user {} holds its part of {} streams ({} users)",
                        user(uid),
                        self.streams.share(),
                        self.streams.holders()
                    );
                }
                let deadline = now + self.cli.session_wait;
                self.waiting.push_back(Waiting {
                    deadline,
                    sock,
                    peer,
                    service,
                    uid,
                    since: now,
                });
            } else {
                warn!(
                    "client {peer} ({service}) reset: user {} has its part of the {} places to wait \
                     ({} waiting in all)",
                    user(uid),
                    self.cli.max_waiting,
                    self.waiting.len()
                );
                self.forget_if_idle(uid);
                sock.abort(registry);
            }
        }
    }

    /// Opens waiting clients, oldest first, while the session allows and
    /// their users' parts do; resets those whose wait is over.
    fn open_waiting(&mut self, registry: &Registry, now: Instant) {
        let mut i = 0;
        while i < self.waiting.len() && self.channel.can_open() {
            if !self.streams.may_take(&self.waiting[i].uid) {
                i += 1;
                continue;
            }
            let w = self.waiting.remove(i).expect("in range");
            self.queue.release(&w.uid);
            self.open(w.sock, w.peer, w.service, w.uid, registry, now);
        }
        while self.waiting.front().is_some_and(|w| now >= w.deadline) {
            let w = self.waiting.pop_front().expect("checked");
            let why = if self.channel.is_established() {
                format!(
                    "its user's part of the streams stayed taken for {} ms",
                    (now - w.since).as_millis()
                )
            } else {
                format!(
                    "no session with the host within {} ms",
                    (now - w.since).as_millis()
                )
            };
            warn!("client {} ({}) reset: {why}", w.peer, w.service);
            self.queue.release(&w.uid);
            self.forget_if_idle(w.uid);
            w.sock.abort(registry);
        }
    }

    fn open(
        &mut self,
        sock: Sock,
        peer: String,
        service: String,
        uid: u32,
        registry: &Registry,
        now: Instant,
    ) {
        if let Err(r) = self.streams.try_take(&uid) {
            // Callers check may_take first; should the two ever disagree, the
            // client is reset rather than served beyond its user's part.
            warn!("client {peer} ({service}) reset: {r:?}");
            self.forget_if_idle(uid);
            return sock.abort(registry);
        }
        let opened = self
            .channel
            .open_stream(sock, peer.clone(), service.clone(), uid, now, registry);
        if let Err((e, sock)) = opened {
            warn!("client {peer} ({service}) reset: {e}");
            self.streams.release(&uid);
            self.forget_if_idle(uid);
            sock.abort(registry);
        }
    }

    /// A user with no stream and no waiting client is no longer present:
    /// its part goes back to the others.
    fn forget_if_idle(&mut self, uid: u32) {
        if self.streams.held_by(&uid) == 0 && self.queue.held_by(&uid) == 0 {
            self.streams.leave(&uid);
            self.queue.leave(&uid);
        }
    }

    /// Streams that closed give their users' parts back; a new session's
    /// stream limit becomes the room to share.
    fn settle_streams(&mut self) {
        for uid in self.channel.take_closed() {
            self.streams.release(&uid);
            self.forget_if_idle(uid);
        }
        let room = self
            .channel
            .info()
            .map_or(0, |i| i.peer_limits.max_streams as usize);
        if room != self.streams.room() {
            self.streams.set_room(room);
        }
    }

    fn stop_accepting(&mut self, registry: &Registry) {
        for w in self.waiting.drain(..) {
            self.queue.release(&w.uid);
            w.sock.abort(registry);
        }
    }
}

impl StatusSource for Bridge {
    fn status(&mut self, now: Instant, streams: bool, _: Option<&str>) -> Status {
        let channel = self.channel.status(now, streams);
        let guest = GuestStatus {
            name: "local".into(),
            identity: None,
            buffered: channel.buffered,
            max_buffered: 0,
            streams: channel.streams_open,
            channels: vec![channel],
        };
        Status {
            daemon: "vios-guest-bridge".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: now.saturating_duration_since(self.started).as_secs_f64(),
            guests: vec![guest],
            listeners: self
                .listeners
                .iter()
                .map(|l| format!("{}={}", l.spec.addr, l.spec.service))
                .collect(),
            waiting: Some(self.waiting.len()),
            fds_used: vios_common::sys::open_descriptors().unwrap_or(0),
            fds_limit: vios_common::sys::nofile_limit().map_or(0, |n| n as usize),
            fd_streams: self.streams.total(),
        }
    }
}

impl Handler for Bridge {
    fn ready(&mut self, event: &Event, registry: &Registry, now: Instant) {
        let t = event.token().0;
        if let Some(c) = &mut self.control {
            if c.owns(event.token()) {
                return c.ready(event, registry, now);
            }
        }
        if (LISTENERS..LISTENERS + self.listeners.len()).contains(&t) {
            self.to_accept.push(t - LISTENERS);
        } else if self.channel.owns(event.token()) {
            self.channel.ready(event, registry, now);
        }
    }

    fn signal(&mut self, sig: i32, registry: &Registry, now: Instant) {
        if sig == SIGUSR1 {
            let table = self.status(now, true, None).to_table(true);
            info!("status (SIGUSR1):\n{table}");
        } else if sig == SIGHUP {
            info!("SIGHUP: nothing to reload");
        } else if (sig == SIGTERM || sig == SIGINT) && self.stopping.is_none() {
            let grace = self.cli.shutdown_grace;
            info!("signal {sig}: stopping (grace {} ms)", grace.as_millis());
            self.heartbeat.stopping("stopping");
            self.stopping = Some(now + grace);
            self.stop_accepting(registry);
            self.channel.shutdown(grace, now);
        }
    }

    fn turn(&mut self, registry: &Registry, now: Instant) -> Turn {
        if let Some(mut c) = self.control.take() {
            c.turn(registry, now, self);
            self.control = Some(c);
        }
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
        self.settle_streams();
        self.more = self.channel.process(now, registry, &mut NoOpener);
        self.settle_streams();
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
        if self.heartbeat.due(now) {
            // One thread: that this runs shows the loop is alive.
            let summary = self.status(now, false, None).summary();
            self.heartbeat.beat(now, true, &summary);
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
            self.control.as_ref().and_then(ControlServer::next_deadline),
            self.heartbeat.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

fn user(uid: u32) -> String {
    if uid == UNKNOWN_USER {
        "unknown".into()
    } else {
        uid.to_string()
    }
}
