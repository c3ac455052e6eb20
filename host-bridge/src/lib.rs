//! `vios-host-bridge`: serves guests' Vios channels and splices their streams
//! into host services.
//!
//! # Layout
//!
//! - [`config`]: command line and environment.
//! - [`discovery`]: finding guests in `--guest-dir` and libvirt directories.
//! - [`worker`]: one thread per guest, a mio loop over that guest's channels
//!   (one [`vios_common::io::mux::Mux`] each); opens service connections.
//! - [`run`] (here): the supervisor. It starts a worker per guest, rescans
//!   guest directories (periodically and on SIGHUP) to start, update and stop
//!   workers, turns SIGTERM and SIGINT into an orderly stop, and restarts a
//!   worker that died.
#![forbid(unsafe_code)]

pub mod config;
pub mod discovery;
pub mod worker;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use vios_common::io::limits::{Descriptors, StreamTimeouts};
use vios_common::io::link::REPORT_AGAIN;
use vios_common::proto::session::Policy;
use vios_common::proto::Limits;
use vios_common::sys;

use config::Cli;
use worker::{Control, Settings, SpawnError, WorkerHandle};

const SIGNALS: Token = Token(0);

/// Where a guest comes from: the command line, or a directory on disk.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Origin {
    Static(String),
    Dir(PathBuf),
}

struct Supervisor {
    cli: Cli,
    settings: Arc<Settings>,
    workers: BTreeMap<Origin, WorkerHandle>,
    /// Workers told to stop (their guest disappeared), joined once done.
    stopping: Vec<WorkerHandle>,
    /// Guests that could not be started (out of descriptors), retried at
    /// every scan; logged once until they start.
    unserved: BTreeMap<Origin, (String, Vec<PathBuf>)>,
    /// The last failure to read each directory, and when it was logged.
    scan_failures: BTreeMap<PathBuf, (String, Instant)>,
}

/// Runs until SIGTERM or SIGINT; returns after every guest has stopped.
pub fn run(cli: Cli) -> io::Result<()> {
    let nofile = sys::raise_nofile_limit()?;
    let mut poll = Poll::new()?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    let limit = usize::try_from(nofile.soft).unwrap_or(usize::MAX);
    let fds = Arc::new(Descriptors::new(limit, sys::open_descriptors()?, cli.max_fds));
    info!(
        "descriptors: {} allowed (soft limit raised from {}; hard limit {}), {} in use, \
         {} kept from streams for channels and scans; at most {} stream sockets",
        nofile.soft,
        nofile.soft_before,
        nofile.hard,
        fds.used(),
        fds.reserve(),
        fds.max_streams()
    );
    let settings = Arc::new(Settings {
        services: cli.services.clone(),
        limits: Limits {
            max_frame_payload: cli.max_frame,
            initial_window: cli.window,
            max_streams: cli.max_streams,
            idle_timeout_ms: cli.idle_timeout.as_millis() as u32,
        },
        policy: Policy {
            control_rate: cli.control_rate,
            frame_rate: cli.frame_rate,
            open_rate: cli.open_rate,
            open_burst: cli.max_streams,
            violations_per_10s: cli.max_violations,
            sessions_per_minute: cli.session_rate,
            scan_bytes_per_sec: cli.scan_rate,
        },
        handshake_timeout: cli.handshake_timeout,
        connect_timeout: cli.connect_timeout,
        shutdown_grace: cli.shutdown_grace,
        max_buffered: usize::try_from(cli.max_buffered).unwrap_or(usize::MAX),
        fds,
        timeouts: StreamTimeouts {
            idle: (!cli.stream_idle_timeout.is_zero()).then_some(cli.stream_idle_timeout),
            half_closed: (!cli.half_closed_timeout.is_zero()).then_some(cli.half_closed_timeout),
        },
        write_stall: (!cli.write_stall_timeout.is_zero()).then_some(cli.write_stall_timeout),
    });
    info!(
        "limits per guest: {} streams, {} bytes buffered",
        settings.limits.max_streams, settings.max_buffered
    );
    for s in &settings.services {
        info!("service {} -> {}", s.name, s.addr);
    }
    for d in cli.scan_dirs() {
        info!(
            "watching {} for guests (channels matching {:?})",
            d.display(),
            cli.channel_pattern
        );
    }

    let mut sup = Supervisor {
        cli,
        settings,
        workers: BTreeMap::new(),
        stopping: Vec::new(),
        unserved: BTreeMap::new(),
        scan_failures: BTreeMap::new(),
    };
    for g in sup.cli.guests.clone() {
        sup.start(Origin::Static(g.name.clone()), &g.name, g.sockets);
    }
    sup.rescan();
    let mut next_scan = Instant::now() + sup.cli.rescan;
    let mut events = Events::with_capacity(8);
    loop {
        let timeout = next_scan
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for signal in signals.pending() {
            if signal == SIGHUP {
                info!("SIGHUP: rescanning guest directories");
                sup.rescan();
                next_scan = Instant::now() + sup.cli.rescan;
            } else {
                info!("signal {signal}: stopping");
                sup.stop_all();
                return Ok(());
            }
        }
        if Instant::now() >= next_scan {
            sup.rescan();
            next_scan = Instant::now() + sup.cli.rescan;
        }
        sup.reap();
    }
}

impl Supervisor {
    /// Starts a worker for a guest. Without descriptors to spare the guest
    /// waits in `unserved` and is tried again at every scan; the failure is
    /// logged once.
    fn start(&mut self, origin: Origin, name: &str, sockets: Vec<PathBuf>) {
        match worker::spawn(name, sockets.clone(), self.settings.clone()) {
            Ok(w) => {
                if self.unserved.remove(&origin).is_some() {
                    info!("guest {name}: descriptors free again; serving it");
                }
                self.workers.insert(origin, w);
            }
            Err(e) => {
                let first = self.unserved.insert(origin, (name.to_owned(), sockets)).is_none();
                if first {
                    let retry = match e {
                        SpawnError::NoDescriptors { .. } => "at every scan",
                        SpawnError::Io(_) => "at every scan (further failures not logged)",
                    };
                    warn!("guest {name}: cannot be served: {e}; retrying {retry}");
                }
            }
        }
    }

    /// Retries the guests that could not be started.
    fn retry_unserved(&mut self) {
        for (origin, (name, sockets)) in std::mem::take(&mut self.unserved) {
            // Put back first so that start() knows it was waiting.
            self.unserved
                .insert(origin.clone(), (name.clone(), sockets.clone()));
            self.start(origin, &name, sockets);
        }
    }

    /// Brings the workers for guest directories in line with what is on disk.
    /// A directory that cannot be read changes nothing: its guests keep their
    /// workers and sessions until a successful scan says they are gone.
    fn rescan(&mut self) {
        self.retry_unserved();
        let dirs = self.cli.scan_dirs();
        if dirs.is_empty() {
            return;
        }
        let scan = discovery::scan(&dirs, &self.cli.channel_pattern);
        self.log_scan_failures(&scan);
        for (dir, f) in &scan.found {
            let origin = Origin::Dir(dir.clone());
            if let Some(waiting) = self.unserved.get_mut(&origin) {
                *waiting = (f.name.clone(), f.sockets.clone());
                continue;
            }
            match self.workers.get_mut(&origin) {
                Some(w) if w.sockets != f.sockets => {
                    info!("guest {}: channels now {:?}", f.name, f.sockets);
                    w.sockets = f.sockets.clone();
                    w.send(Control::Channels(f.sockets.clone()));
                }
                Some(_) => {}
                None => {
                    info!(
                        "guest {} found in {} ({} channel(s))",
                        f.name,
                        dir.display(),
                        f.sockets.len()
                    );
                    self.start(origin, &f.name, f.sockets.clone());
                }
            }
        }
        self.unserved
            .retain(|o, _| !matches!(o, Origin::Dir(d) if scan.is_gone(d)));
        let gone: Vec<Origin> = self
            .workers
            .keys()
            .filter(|o| matches!(o, Origin::Dir(d) if scan.is_gone(d)))
            .cloned()
            .collect();
        for origin in gone {
            let w = self.workers.remove(&origin).expect("listed");
            info!(
                "guest {} is gone: resetting its streams and freeing its channels",
                w.guest
            );
            w.send(Control::Stop {
                grace: Duration::ZERO,
            });
            self.stopping.push(w);
        }
    }

    /// Logs each directory that could not be read: a new failure at once,
    /// the same one again once a minute.
    fn log_scan_failures(&mut self, scan: &discovery::Scan) {
        let now = Instant::now();
        for (dir, e) in &scan.failed {
            let text = e.to_string();
            let known = self.workers.keys().chain(self.unserved.keys());
            let kept = known
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
                warn!(
                    "cannot read {}: {text}; its {kept} known guest(s) keep their sessions; \
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

    /// Joins stopped workers; restarts any that died without being asked.
    fn reap(&mut self) {
        let (done, still): (Vec<_>, Vec<_>) = self.stopping.drain(..).partition(|w| w.thread.is_finished());
        self.stopping = still;
        for w in done {
            let _ = w.thread.join();
        }
        let dead: Vec<Origin> = self
            .workers
            .iter()
            .filter(|(_, w)| w.thread.is_finished())
            .map(|(o, _)| o.clone())
            .collect();
        for origin in dead {
            let w = self.workers.remove(&origin).expect("listed");
            let (name, sockets) = (w.guest.clone(), w.sockets.clone());
            if w.thread.join().is_err() {
                error!("guest {name}: worker thread panicked; restarting it");
            } else {
                error!("guest {name}: worker thread ended unasked; restarting it");
            }
            self.start(origin, &name, sockets);
        }
    }

    fn stop_all(self) {
        let grace = self.settings.shutdown_grace;
        for w in self.workers.values() {
            w.send(Control::Stop { grace });
        }
        for w in self.workers.into_values().chain(self.stopping) {
            if w.thread.join().is_err() {
                error!("guest {}: worker panicked while stopping", w.guest);
            }
        }
        info!("stopped");
    }
}
