//! The supervisor: the main thread's loop. It finds guests (on the command
//! line, in guest directories), spreads them over the loop threads, turns
//! directory changes into commands for them, turns SIGTERM and SIGINT into an
//! orderly stop and SIGHUP into a rescan, and watches the loop threads.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::event::Event;
use mio::Registry;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use vios_common::io::control::{ControlServer, StatusSource};
use vios_common::io::event_loop::{Handler, Turn};
use vios_common::io::link::REPORT_AGAIN;
use vios_common::status::{GuestStatus, Status};
use vios_common::sys;
use vios_common::systemd::{Heartbeat, Notifier};

use crate::config::Cli;
use crate::discovery::{self, ChannelAt};
use crate::settings::Settings;
use crate::shard::{self, Command, ShardHandle};
use crate::watch::DirWatch;

/// How often the loop threads' health is looked at.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// Tokens of the control socket and its clients.
pub const CONTROL_TOKENS: usize = 1 << 16;
/// How long a loop thread may take to report its guests.
const STATUS_WAIT: Duration = Duration::from_secs(1);
/// Token of the guest directories' inotify watch.
const WATCH: mio::Token = mio::Token(1);
/// After a directory changed: the rescan waits this long for the rest of
/// the change (QEMU creates a directory, then its sockets) ...
const WATCH_SETTLE: Duration = Duration::from_millis(10);
/// ... and comes at most this often, whatever the rate of changes.
const WATCH_MIN_GAP: Duration = Duration::from_millis(20);
/// How long a channel socket may stay closed to this process before it is
/// reported: libvirt hands its sockets over within milliseconds.
const BARRED_GRACE: Duration = Duration::from_secs(2);

/// Where a guest comes from: the command line, or a directory on disk.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Origin {
    Static(String),
    Dir(PathBuf),
}

struct Guest {
    id: u64,
    name: String,
    sockets: Vec<ChannelAt>,
    shard: usize,
}

pub struct Supervisor {
    /// The command line, read again with the configuration file on SIGHUP.
    argv: Vec<std::ffi::OsString>,
    cli: Cli,
    settings: Arc<Settings>,
    shards: Vec<Option<ShardHandle>>,
    guests: BTreeMap<Origin, Guest>,
    next_id: u64,
    next_scan: Option<Instant>,
    next_health: Instant,
    /// The last failure to read each directory, and when it was logged.
    scan_failures: BTreeMap<PathBuf, (String, Instant)>,
    /// Channel sockets this process may not connect to: since when, and
    /// whether that was reported.
    barred: BTreeMap<PathBuf, (Instant, bool)>,
    /// Why the daemon must exit with an error.
    pub failure: Option<io::Error>,
    done: bool,
    /// The control socket and metrics listener (taken out while it asks
    /// `self` for the status).
    control: Option<ControlServer>,
    /// inotify on the guest directories (None: rescans only).
    watch: Option<DirWatch>,
    last_scan: Option<Instant>,
    /// Readiness, watchdog and status for systemd.
    heartbeat: Heartbeat,
    /// Whether every loop thread answered the last status request.
    all_answered: bool,
    started: Instant,
}

impl Supervisor {
    /// Starts the loop threads and serves the command line's guests.
    pub fn start(cli: Cli, settings: Arc<Settings>, threads: usize) -> io::Result<Supervisor> {
        let mut shards = Vec::with_capacity(threads);
        for i in 0..threads {
            shards.push(Some(shard::spawn(i, settings.clone())?));
        }
        info!("{threads} loop thread(s)");
        let now = Instant::now();
        let mut sup = Supervisor {
            argv: std::env::args_os().collect(),
            next_scan: (!cli.scan_dirs().is_empty()).then_some(now),
            cli,
            settings,
            shards,
            guests: BTreeMap::new(),
            next_id: 1,
            next_health: now + HEALTH_EVERY,
            scan_failures: BTreeMap::new(),
            barred: BTreeMap::new(),
            failure: None,
            done: false,
            control: None,
            watch: None,
            last_scan: None,
            heartbeat: Heartbeat::new(Notifier::from_env(), now),
            all_answered: true,
            started: now,
        };
        for g in sup.cli.guests.clone() {
            let sockets = g
                .sockets
                .into_iter()
                .map(|path| ChannelAt { path, id: None })
                .collect();
            sup.add(Origin::Static(g.name.clone()), g.name, sockets);
        }
        Ok(sup)
    }

    /// Opens the control socket and the metrics listener.
    pub fn start_control(&mut self, registry: &Registry) -> io::Result<()> {
        // The listeners and their clients, counted like a loop thread's.
        if !self
            .settings
            .fds
            .take_infra(vios_common::io::control::MAX_DESCRIPTORS)
        {
            warn!("no descriptors left for the control socket's clients");
        }
        let mut c = ControlServer::new(CONTROL_TOKENS);
        let path = (self.cli.control.as_os_str() != "none").then_some(self.cli.control.as_path());
        let explicit = self.cli.control.as_os_str() != crate::config::DEFAULT_CONTROL;
        vios_common::daemon::start_control(&mut c, registry, path, explicit, self.cli.metrics)?;
        self.control = Some(c);
        Ok(())
    }

    /// Watches the guest directories, so that a guest is served (or let go)
    /// as soon as its directory changes, not at the next rescan.
    pub fn start_watch(&mut self, registry: &Registry) {
        if self.cli.scan_dirs().is_empty() || !self.cli.watch {
            return;
        }
        if !self.settings.fds.take_infra(1) {
            warn!("no descriptor left for an inotify watch; guests are found by the rescan only");
            return;
        }
        match DirWatch::new(registry, WATCH) {
            Ok(w) => self.watch = Some(w),
            Err(e) => {
                self.settings.fds.release_infra(1);
                warn!(
                    "cannot watch guest directories (inotify: {e}); guests are found by the \
                     rescan every {} ms only",
                    self.cli.rescan.as_millis()
                );
            }
        }
    }

    /// The loop thread with the fewest guests.
    fn least_loaded(&self) -> usize {
        let mut counts = vec![0usize; self.shards.len()];
        for g in self.guests.values() {
            counts[g.shard] += 1;
        }
        (0..counts.len())
            .filter(|&i| self.shards[i].is_some())
            .min_by_key(|&i| counts[i])
            .unwrap_or(0)
    }

    fn send(&self, shard: usize, c: Command) {
        if let Some(h) = &self.shards[shard] {
            h.send(c);
        }
    }

    fn add(&mut self, origin: Origin, name: String, sockets: Vec<ChannelAt>) {
        let id = self.next_id;
        self.next_id += 1;
        let shard = self.least_loaded();
        self.send(
            shard,
            Command::AddGuest {
                id,
                name: name.clone(),
                sockets: sockets.clone(),
            },
        );
        self.guests.insert(
            origin,
            Guest {
                id,
                name,
                sockets,
                shard,
            },
        );
    }

    /// Brings the guests of guest directories in line with what is on disk.
    /// A directory that cannot be read changes nothing: its guests keep their
    /// sessions until a successful scan says they are gone.
    pub fn rescan(&mut self, now: Instant) {
        let dirs = self.cli.scan_dirs();
        if dirs.is_empty() {
            return;
        }
        self.next_scan = Some(now + self.cli.rescan);
        self.last_scan = Some(now);
        let scan = discovery::scan(&dirs, &self.cli.channel_pattern);
        self.log_scan_failures(&scan, now);
        self.log_barred(&scan, now);
        if let Some(w) = &mut self.watch {
            let mut watch: Vec<PathBuf> = dirs.clone();
            watch.extend(scan.guest_dirs.iter().cloned());
            w.set(&watch);
        }
        for (dir, f) in &scan.found {
            let origin = Origin::Dir(dir.clone());
            // A channel whose socket is now barred to us (its owner or mode
            // changed) keeps its connection, as the kernel does.
            let kept: Vec<ChannelAt> = self.guests.get(&origin).map_or_else(Vec::new, |g| {
                g.sockets
                    .iter()
                    .filter(|k| scan.is_barred(&k.path))
                    .cloned()
                    .collect()
            });
            let sockets: Cow<'_, [ChannelAt]> = if kept.is_empty() {
                Cow::Borrowed(&f.sockets)
            } else {
                let mut all = [f.sockets.as_slice(), &kept].concat();
                all.sort();
                Cow::Owned(all)
            };
            match self.guests.get_mut(&origin) {
                Some(g) if *g.sockets != *sockets => {
                    let paths: Vec<_> = sockets.iter().map(|c| c.path.display().to_string()).collect();
                    info!("guest {}: channels now {paths:?}", f.name);
                    g.sockets = sockets.to_vec();
                    let (shard, id) = (g.shard, g.id);
                    self.send(
                        shard,
                        Command::SetChannels {
                            id,
                            sockets: sockets.to_vec(),
                        },
                    );
                }
                Some(_) => {}
                None => {
                    info!(
                        "guest {} found in {} ({} channel(s))",
                        f.name,
                        dir.display(),
                        f.sockets.len()
                    );
                    self.add(origin, f.name.clone(), f.sockets.clone());
                }
            }
        }
        let gone: Vec<Origin> = self
            .guests
            .keys()
            .filter(|o| matches!(o, Origin::Dir(d) if scan.is_gone(d)))
            .cloned()
            .collect();
        for origin in gone {
            let g = self.guests.remove(&origin).expect("listed");
            info!(
                "guest {} is gone: resetting its streams and freeing its channels",
                g.name
            );
            self.send(g.shard, Command::RemoveGuest { id: g.id });
        }
    }

    /// Logs each directory that could not be read: a new failure at once,
    /// the same one again once a minute.
    fn log_scan_failures(&mut self, scan: &discovery::Scan, now: Instant) {
        for (dir, e) in &scan.failed {
            let text = e.to_string();
            let kept = self
                .guests
                .keys()
                .filter(|o| matches!(o, Origin::Dir(d) if d == dir || d.parent() == Some(dir.as_path())))
                .count();
            // A directory that does not exist (yet: libvirt not started, or
            // one of its two layouts unused) is said once, quietly.
            let missing = e.kind() == io::ErrorKind::NotFound;
            let repeated = self.scan_failures.get(dir).is_some_and(|(last, at)| {
                *last == text && (missing || now.duration_since(*at) < REPORT_AGAIN)
            });
            if repeated {
                continue;
            }
            self.scan_failures.insert(dir.clone(), (text.clone(), now));
            if missing && kept == 0 {
                info!(
                    "{} does not exist (yet); looking again at every scan",
                    dir.display()
                );
            } else {
                let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                    " (the bridge's user needs the directory's group: docs/OPERATIONS.md)"
                } else {
                    ""
                };
                warn!(
                    "cannot read {}: {text}{hint}; its {kept} known guest(s) keep their sessions; \
                     retrying at the next scan",
                    dir.display()
                );
            }
        }
        for dir in &scan.complete {
            if self.scan_failures.remove(dir).is_some() {
                info!("{} can be read again", dir.display());
            }
        }
    }

    /// Reports each channel socket that has stayed closed to this process
    /// for [`BARRED_GRACE`] (once; again if it opens and closes again).
    fn log_barred(&mut self, scan: &discovery::Scan, now: Instant) {
        self.barred.retain(|p, _| scan.is_barred(p));
        for (path, id) in &scan.barred {
            let (since, reported) = self.barred.entry(path.clone()).or_insert((now, false));
            if *reported {
                continue;
            }
            if now.duration_since(*since) < BARRED_GRACE {
                debug!(
                    "{}: not ours to connect to yet (owner uid {})",
                    path.display(),
                    id.uid
                );
                continue;
            }
            *reported = true;
            let mode = std::fs::symlink_metadata(path)
                .map(|m| {
                    format!(
                        "{:o}",
                        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777
                    )
                })
                .unwrap_or_else(|_| "?".into());
            warn!(
                "{}: this user (uid {}) may not connect to it (owner uid {}, mode {mode}): the \
                 bridge's user needs the socket's group (docs/OPERATIONS.md); looking again at \
                 every scan",
                path.display(),
                sys::effective_uid(),
                id.uid
            );
        }
    }

    /// A loop thread that ended unasked: one whose poll kept failing ends the
    /// daemon (its supervisor restarts it); one that panicked is restarted
    /// with its guests, whose sessions start over.
    fn check_shards(&mut self) {
        for i in 0..self.shards.len() {
            if !self.shards[i].as_ref().is_some_and(|h| h.thread.is_finished()) {
                continue;
            }
            let h = self.shards[i].take().expect("checked");
            match h.thread.join() {
                Ok(Err(e)) => {
                    error!("loop thread {i} failed: {e}; stopping");
                    self.failure = Some(e);
                    return;
                }
                Ok(Ok(())) => error!("loop thread {i} ended unasked; restarting it"),
                Err(_) => error!("loop thread {i} panicked; restarting it with its guests"),
            }
            match shard::spawn(i, self.settings.clone()) {
                Ok(h) => self.shards[i] = Some(h),
                Err(e) => {
                    error!("cannot restart loop thread {i}: {e}; stopping");
                    self.failure = Some(e);
                    return;
                }
            }
            for g in self.guests.values().filter(|g| g.shard == i) {
                self.send(
                    i,
                    Command::AddGuest {
                        id: g.id,
                        name: g.name.clone(),
                        sockets: g.sockets.clone(),
                    },
                );
            }
        }
    }

    /// Reads the configuration again (SIGHUP) and applies what changed. A
    /// configuration with an error changes nothing.
    fn reload(&mut self, now: Instant) {
        let new = match crate::reload::load(&self.argv).map_err(|e| e.to_string()) {
            Ok(cli) => match cli.validate() {
                Ok(()) => cli,
                Err(e) => return warn!("reload refused, keeping the running configuration: {e}"),
            },
            Err(e) => {
                let e = e
                    .trim_start_matches("error: ")
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                return warn!("reload refused, keeping the running configuration: {e}");
            }
        };
        let fixed = [
            ("--threads", self.cli.threads != new.threads),
            ("--max-fds", self.cli.max_fds != new.max_fds),
            ("--max-streams", self.cli.max_streams != new.max_streams),
            ("--max-buffered", self.cli.max_buffered != new.max_buffered),
        ];
        for (opt, changed) in fixed {
            if changed {
                warn!("reload: {opt} changed; it takes effect at the next start");
            }
        }
        let settings = Arc::new(Settings::new(&new, self.settings.fds.clone()));
        for h in self.shards.iter().flatten() {
            h.send(Command::Reload(settings.clone()));
        }
        // Guests on the command line (or in the file): added, changed, gone.
        let wanted: BTreeMap<Origin, Vec<ChannelAt>> = new
            .guests
            .iter()
            .map(|g| {
                let at = g
                    .sockets
                    .iter()
                    .map(|p| ChannelAt {
                        path: p.clone(),
                        id: None,
                    })
                    .collect();
                (Origin::Static(g.name.clone()), at)
            })
            .collect();
        let gone: Vec<Origin> = self
            .guests
            .keys()
            .filter(|o| matches!(o, Origin::Static(_)) && !wanted.contains_key(o))
            .cloned()
            .collect();
        for origin in gone {
            let g = self.guests.remove(&origin).expect("listed");
            info!("guest {} is no longer configured: resetting its streams", g.name);
            self.send(g.shard, Command::RemoveGuest { id: g.id });
        }
        for (origin, sockets) in wanted {
            let Origin::Static(name) = &origin else {
                unreachable!()
            };
            match self.guests.get_mut(&origin) {
                Some(g) if g.sockets != sockets => {
                    g.sockets = sockets.clone();
                    let (shard, id) = (g.shard, g.id);
                    self.send(shard, Command::SetChannels { id, sockets });
                }
                Some(_) => {}
                None => {
                    info!("guest {name} added by the configuration");
                    self.add(origin.clone(), name.clone(), sockets);
                }
            }
        }
        let services: Vec<&str> = settings.services.iter().map(|s| s.spec.name.as_str()).collect();
        info!(
            "configuration reloaded: services {}, {} --allow rule(s)",
            services.join(", "),
            settings.allow.len()
        );
        self.settings = settings;
        self.cli = new;
        self.next_scan = (!self.cli.scan_dirs().is_empty()).then_some(now);
    }

    /// Stops every loop thread (GOAWAY, the grace period, resets) and waits
    /// for them.
    fn stop_all(&mut self) {
        let grace = self.settings.shutdown_grace;
        for h in self.shards.iter().flatten() {
            h.send(Command::Stop { grace });
        }
        for (i, h) in self.shards.iter_mut().enumerate() {
            let Some(h) = h.take() else { continue };
            match h.thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!("loop thread {i} failed while stopping: {e}"),
                Err(_) => error!("loop thread {i} panicked while stopping"),
            }
        }
        info!("stopped");
        self.done = true;
    }
}

impl StatusSource for Supervisor {
    fn status(&mut self, now: Instant, streams: bool, guest: Option<&str>) -> Status {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<GuestStatus>>();
        let mut asked = 0;
        for h in self.shards.iter().flatten() {
            h.send(Command::Status {
                streams,
                guest: guest.map(str::to_owned),
                reply: tx.clone(),
            });
            asked += 1;
        }
        drop(tx);
        let mut guests = Vec::new();
        let end = Instant::now() + STATUS_WAIT;
        self.all_answered = asked == self.shards.len();
        for _ in 0..asked {
            let wait = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(g) => guests.extend(g),
                Err(_) => {
                    self.all_answered = false;
                    warn!(
                        "status: a loop thread did not answer within {} ms",
                        STATUS_WAIT.as_millis()
                    );
                    break;
                }
            }
        }
        guests.sort_by(|a, b| a.name.cmp(&b.name));
        let fds = &self.settings.fds;
        Status {
            daemon: "vios-host-bridge".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: now.saturating_duration_since(self.started).as_secs_f64(),
            guests,
            fds_used: fds.used(),
            fds_limit: fds.limit(),
            fd_streams: fds.streams(),
            ..Status::default()
        }
    }
}

impl Handler for Supervisor {
    fn ready(&mut self, ev: &Event, registry: &Registry, now: Instant) {
        if ev.token() == WATCH {
            if self.watch.as_mut().is_some_and(DirWatch::drain) {
                let soon = (now + WATCH_SETTLE).max(self.last_scan.map_or(now, |t| t + WATCH_MIN_GAP));
                self.next_scan = Some(self.next_scan.map_or(soon, |t| t.min(soon)));
            }
            return;
        }
        if let Some(c) = &mut self.control {
            if c.owns(ev.token()) {
                c.ready(ev, registry, now);
            }
        }
    }

    fn signal(&mut self, signal: i32, _: &Registry, now: Instant) {
        if signal == SIGHUP {
            if self.cli.config.is_some() {
                self.reload(now);
            }
            info!("SIGHUP: rescanning guest directories");
            self.rescan(now);
        } else if signal == SIGUSR1 {
            let table = self.status(now, true, None).to_table(true);
            info!("status (SIGUSR1):\n{table}");
        } else if signal == SIGTERM || signal == SIGINT {
            info!("signal {signal}: stopping");
            self.heartbeat.stopping("stopping");
            self.stop_all();
        }
    }

    fn turn(&mut self, registry: &Registry, now: Instant) -> Turn {
        if self.done {
            if let Some(c) = &self.control {
                c.cleanup();
            }
            return Turn::Done;
        }
        if let Some(mut c) = self.control.take() {
            c.turn(registry, now, self);
            self.control = Some(c);
        }
        if self.next_scan.is_some_and(|t| now >= t) {
            self.rescan(now);
        }
        if now >= self.next_health {
            self.next_health = now + HEALTH_EVERY;
            self.check_shards();
        }
        if self.heartbeat.due(now) {
            // WATCHDOG=1 only if every loop thread answered: a stuck one
            // gets the daemon restarted.
            let summary = self.status(now, false, None).summary();
            let whole = self.all_answered && self.failure.is_none();
            self.heartbeat.beat(now, whole, &summary);
        }
        if self.failure.is_some() {
            self.stop_all();
            if let Some(c) = &self.control {
                c.cleanup();
            }
            return Turn::Done;
        }
        Turn::Idle
    }

    fn next_deadline(&self) -> Option<Instant> {
        [self.next_scan, self.heartbeat.next_deadline()]
            .into_iter()
            .flatten()
            .fold(self.next_health, Instant::min)
            .into()
    }
}
