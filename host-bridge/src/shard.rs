//! A loop thread: one [`EventLoop`] serving many guests, each a group of
//! [`Channel`]s sharing the guest's [`Budget`].
//!
//! The host bridge runs a fixed number of these (one per core by default);
//! the supervisor spreads guests over them and steers them with [`Command`]s.
//! An idle guest costs its channels' descriptors and a few KiB, no thread.
//!
//! Within a loop, fairness between guests is the turn's job: a channel is
//! processed only when readiness or one of its timers says so, and each
//! processing is bounded (reads, frames and bytes per turn, see
//! `vios_common::io::channel`). A channel with work left goes to the back of
//! the next turn, after everything that became ready meanwhile.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::info;
use mio::event::Event;
use mio::{Registry, Token, Waker};
use vios_common::io::channel::{Channel, ChannelConfig, CONN_TOKEN_BITS};
use vios_common::io::event_loop::{EventLoop, Handler, Turn, FIRST_RESERVED};
use vios_common::io::limits::Budget;
use vios_common::io::link::{ChannelSpec, Link};
use vios_common::io::random_seed;
use vios_common::io::slab::Slab;
use vios_common::proto::{Code, Config as SessionConfig, Role, Session};

use crate::discovery::ChannelAt;
use crate::policy;
use crate::services::ServiceOpener;
use crate::settings::Settings;

/// Descriptors a loop thread holds: its poll instance and its waker.
pub const SHARD_FDS: usize = 2;

/// What the supervisor tells a loop thread.
#[derive(Debug)]
pub enum Command {
    /// Serve guest `id` on these channel sockets.
    AddGuest {
        id: u64,
        name: String,
        sockets: Vec<ChannelAt>,
    },
    /// Serve exactly these channel sockets of guest `id`: new ones are
    /// connected, channels no longer listed have their streams reset and are
    /// closed.
    SetChannels { id: u64, sockets: Vec<ChannelAt> },
    /// The guest is gone: reset its streams, close its channels.
    RemoveGuest { id: u64 },
    /// GOAWAY on every channel, then reset what remains after `grace`, and
    /// end the thread.
    Stop { grace: Duration },
    /// A new configuration: streams of removed services, and of services a
    /// guest may no longer open, are reset; everything else goes on.
    Reload(Arc<Settings>),
    /// Report the guests (only `guest` if given), with their streams if
    /// `streams`.
    Status {
        streams: bool,
        guest: Option<String>,
        reply: Sender<Vec<vios_common::status::GuestStatus>>,
    },
}

/// The supervisor's end of a loop thread.
pub struct ShardHandle {
    pub index: usize,
    tx: Sender<Command>,
    waker: Arc<Waker>,
    pub thread: JoinHandle<io::Result<()>>,
}

impl ShardHandle {
    pub fn send(&self, c: Command) {
        let _ = self.tx.send(c);
        let _ = self.waker.wake();
    }
}

/// Starts loop thread `index`.
pub fn spawn(index: usize, settings: Arc<Settings>) -> io::Result<ShardHandle> {
    if !settings.fds.take_infra(SHARD_FDS) {
        return Err(io::Error::other("no descriptors free for a loop thread"));
    }
    let mut el = match EventLoop::new().and_then(|mut el| el.waker().map(|w| (el, w))) {
        Ok((el, w)) => (el, w),
        Err(e) => {
            settings.fds.release_infra(SHARD_FDS);
            return Err(e);
        }
    };
    let waker = el.1.clone();
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("loop-{index}"))
        .spawn(move || {
            let fds = settings.fds.clone();
            let mut shard = Shard {
                settings,
                commands: rx,
                guests: HashMap::new(),
                slots: Slab::default(),
                timers: BTreeSet::new(),
                touched: Vec::new(),
                busy: Vec::new(),
                stopping: None,
                next_trim: Instant::now() + TRIM_EVERY,
            };
            let r = el.0.run(&mut shard);
            drop(shard);
            drop(el);
            fds.release_infra(SHARD_FDS);
            r
        })?;
    Ok(ShardHandle {
        index,
        tx,
        waker,
        thread,
    })
}

struct GuestState {
    name: String,
    /// Its identity address in PROXY headers.
    identity: std::net::IpAddr,
    budget: Arc<Budget>,
    /// Keys of its channels in `slots`.
    slots: Vec<usize>,
}

struct Slot {
    guest: u64,
    at: ChannelAt,
    /// The channel's port name (the socket's file name).
    port: String,
    channel: Channel,
    /// The deadline this slot has in `timers`.
    timer: Option<Instant>,
    /// Already in this turn's list.
    touched: bool,
}

struct Shard {
    settings: Arc<Settings>,
    commands: Receiver<Command>,
    guests: HashMap<u64, GuestState>,
    /// Channel `k` has tokens from `k << CONN_TOKEN_BITS` on.
    slots: Slab<Slot>,
    timers: BTreeSet<(Instant, usize)>,
    /// Channels to process this turn, in the order they became ready.
    touched: Vec<usize>,
    /// Channels that had work left at the end of the last turn.
    busy: Vec<usize>,
    stopping: Option<Instant>,
    /// When free memory is next given back to the kernel.
    next_trim: Instant,
}

/// How often a loop thread gives the memory its quiet channels freed back
/// to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(10);

fn slot_of(token: Token) -> usize {
    token.0 >> CONN_TOKEN_BITS
}

impl Shard {
    fn touch(&mut self, key: usize) {
        if let Some(slot) = self.slots.get_mut(key) {
            if !slot.touched {
                slot.touched = true;
                self.touched.push(key);
            }
        }
    }

    /// Keeps the slot's entry in `timers` at its channel's next deadline.
    fn schedule(&mut self, key: usize) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let t = slot.channel.poll_timeout();
        if t != slot.timer {
            if let Some(old) = slot.timer {
                self.timers.remove(&(old, key));
            }
            if let Some(new) = t {
                self.timers.insert((new, key));
            }
            slot.timer = t;
        }
    }

    fn command(&mut self, c: Command, registry: &Registry, now: Instant) {
        match c {
            Command::AddGuest { id, name, sockets } => {
                let s = &self.settings;
                let budget = Arc::new(Budget::new(
                    id,
                    s.max_buffered,
                    s.limits.max_streams as usize,
                    s.fds.clone(),
                ));
                let identity = s.identity(&name);
                info!(
                    "guest {name}: serving {} channel(s); identity {identity}",
                    sockets.len()
                );
                self.guests.insert(
                    id,
                    GuestState {
                        name,
                        identity,
                        budget,
                        slots: Vec::new(),
                    },
                );
                self.set_channels(id, &sockets, registry, now);
            }
            Command::SetChannels { id, sockets } => self.set_channels(id, &sockets, registry, now),
            Command::RemoveGuest { id } => {
                self.set_channels(id, &[], registry, now);
                if let Some(g) = self.guests.remove(&id) {
                    info!("guest {}: stopped", g.name);
                }
            }
            Command::Reload(settings) => self.reload(settings, registry, now),
            Command::Status {
                streams,
                guest,
                reply,
            } => {
                let _ = reply.send(self.status(now, streams, guest.as_deref()));
            }
            Command::Stop { grace } => {
                if self.stopping.is_none() {
                    for key in self.slots.keys().collect::<Vec<_>>() {
                        let slot = self.slots.get_mut(key).expect("listed");
                        slot.channel.shutdown(grace, now);
                        self.touch(key);
                    }
                    self.stopping = Some(now + grace);
                }
            }
        }
    }

    /// Serves exactly `sockets` for guest `id`. A channel whose socket was
    /// replaced on disk (same path, another inode) is a new channel.
    fn set_channels(&mut self, id: u64, sockets: &[ChannelAt], registry: &Registry, now: Instant) {
        let Some(g) = self.guests.get_mut(&id) else { return };
        let (slots, timers) = (&mut self.slots, &mut self.timers);
        let (keep, gone): (Vec<usize>, Vec<usize>) = g.slots.iter().partition(|&&k| {
            let at = &slots.get(k).expect("guest's slot").at;
            sockets.contains(at)
        });
        g.slots = keep;
        for key in gone {
            let mut slot = slots.remove(key).expect("guest's slot");
            if let Some(t) = slot.timer {
                timers.remove(&(t, key));
            }
            info!("{}channel removed", slot.channel.label());
            slot.channel.finish_shutdown(now, registry);
        }
        let mut added = Vec::new();
        for at in sockets {
            let known = g.slots.iter().any(|&k| slots.get(k).is_some_and(|s| &s.at == at));
            if known {
                continue;
            }
            let path = &at.path;
            let key = slots.next_key();
            if key >= (FIRST_RESERVED >> CONN_TOKEN_BITS) {
                log::error!(
                    "guest {}: no token space left for channel {}",
                    g.name,
                    path.display()
                );
                continue;
            }
            let channel = new_channel(&self.settings, &g.name, &g.budget, at, key, now);
            let port = path
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
            let got = slots.insert(Slot {
                guest: id,
                at: at.clone(),
                port,
                channel,
                timer: None,
                touched: false,
            });
            debug_assert_eq!(got, key);
            g.slots.push(key);
            added.push(key);
        }
        for key in added {
            self.schedule(key);
        }
    }

    fn reload(&mut self, settings: Arc<Settings>, registry: &Registry, now: Instant) {
        for g in self.guests.values_mut() {
            g.identity = settings.identity(&g.name);
            for &key in &g.slots {
                let Some(slot) = self.slots.get_mut(key) else {
                    continue;
                };
                let n = slot.channel.reset_streams(now, registry, |service| {
                    if !settings.services.iter().any(|s| s.spec.name == service) {
                        Some((
                            Code::UnknownService,
                            format!("service {service} was removed from the configuration"),
                        ))
                    } else if !policy::permitted(&settings.allow, &g.name, service) {
                        Some((
                            Code::NotPermitted,
                            format!("guest {} may no longer open {service}", g.name),
                        ))
                    } else {
                        None
                    }
                });
                if n > 0 {
                    info!("{}reload reset {n} stream(s)", slot.channel.label());
                }
            }
        }
        self.settings = settings;
        for key in self.slots.keys().collect::<Vec<_>>() {
            self.touch(key);
        }
    }

    fn status(
        &self,
        now: Instant,
        streams: bool,
        only: Option<&str>,
    ) -> Vec<vios_common::status::GuestStatus> {
        self.guests
            .values()
            .filter(|g| only.is_none_or(|n| n == g.name))
            .map(|g| vios_common::status::GuestStatus {
                name: g.name.clone(),
                identity: Some(g.identity.to_string()),
                buffered: g.budget.buffered(),
                max_buffered: g.budget.max_buffered(),
                streams: g.budget.streams(),
                channels: g
                    .slots
                    .iter()
                    .filter_map(|&k| self.slots.get(k))
                    .map(|s| s.channel.status(now, streams))
                    .collect(),
            })
            .collect()
    }

    fn process(&mut self, key: usize, registry: &Registry, now: Instant) -> bool {
        let Some(slot) = self.slots.get_mut(key) else {
            return false;
        };
        slot.touched = false;
        let Some(g) = self.guests.get(&slot.guest) else {
            return false;
        };
        let mut opener = ServiceOpener {
            guest: &g.name,
            channel: &slot.port,
            identity: g.identity,
            settings: &self.settings,
        };
        let more = slot.channel.process(now, registry, &mut opener);
        self.schedule(key);
        more
    }
}

fn new_channel(
    settings: &Settings,
    guest: &str,
    budget: &Arc<Budget>,
    at: &ChannelAt,
    key: usize,
    now: Instant,
) -> Channel {
    let path = &at.path;
    let version = env!("CARGO_PKG_VERSION");
    let mut cfg = SessionConfig::new(Role::Host, format!("vios-host-bridge {version}"));
    cfg.limits = settings.limits;
    cfg.inflight_limit = settings.inflight;
    cfg.policy = settings.policy.clone();
    cfg.hello_deadline = settings.handshake_timeout;
    let link = Link::new(
        ChannelSpec::Unix(path.to_path_buf()),
        Token(key << CONN_TOKEN_BITS),
        now,
    )
    .with_descriptors(settings.fds.clone());
    let link = match at.id {
        Some(id) => link.expecting(id),
        None => link,
    };
    let port = path
        .file_name()
        .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
    let ccfg = ChannelConfig {
        label: format!("guest {guest} {port}: "),
        connect_timeout: settings.connect_timeout,
        budget: budget.clone(),
        timeouts: settings.timeouts,
        write_stall: settings.write_stall,
    };
    Channel::new(Session::new(cfg, random_seed()), link, ccfg)
}

impl Handler for Shard {
    fn ready(&mut self, event: &Event, registry: &Registry, now: Instant) {
        let key = slot_of(event.token());
        if let Some(slot) = self.slots.get_mut(key) {
            slot.channel.ready(event, registry, now);
            self.touch(key);
        }
    }

    fn woken(&mut self, registry: &Registry, now: Instant) {
        while let Ok(c) = self.commands.try_recv() {
            self.command(c, registry, now);
        }
    }

    fn turn(&mut self, registry: &Registry, now: Instant) -> Turn {
        for key in std::mem::take(&mut self.busy) {
            self.touch(key);
        }
        while let Some(&(t, key)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(slot) = self.slots.get_mut(key) {
                slot.timer = None;
            }
            self.touch(key);
        }
        for key in std::mem::take(&mut self.touched) {
            if self.process(key, registry, now) {
                self.busy.push(key);
            }
        }
        if let Some(deadline) = self.stopping {
            let all_down = self
                .slots
                .keys()
                .all(|k| self.slots.get(k).is_some_and(|s| s.channel.is_shut_down()));
            if now >= deadline || all_down {
                for key in self.slots.keys().collect::<Vec<_>>() {
                    let slot = self.slots.get_mut(key).expect("listed");
                    slot.channel.finish_shutdown(now, registry);
                }
                return Turn::Done;
            }
        }
        if self.busy.is_empty() {
            if now >= self.next_trim {
                self.next_trim = now + TRIM_EVERY;
                vios_common::sys::release_free_memory();
            }
            Turn::Idle
        } else {
            Turn::Busy
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.timers.first().map(|&(t, _)| t),
            self.stopping,
            Some(self.next_trim),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
