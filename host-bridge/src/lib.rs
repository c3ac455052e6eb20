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
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use vios_common::io::limits::{open_files_limit, StreamTimeouts};
use vios_common::proto::session::Policy;
use vios_common::proto::Limits;

use config::Cli;
use worker::{Control, Settings, WorkerHandle};

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
}

/// Runs until SIGTERM or SIGINT; returns after every guest has stopped.
pub fn run(cli: Cli) -> io::Result<()> {
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
        },
        handshake_timeout: cli.handshake_timeout,
        connect_timeout: cli.connect_timeout,
        shutdown_grace: cli.shutdown_grace,
        max_buffered: usize::try_from(cli.max_buffered).unwrap_or(usize::MAX),
        fds: Arc::new(AtomicUsize::new(0)),
        max_fds: cli.max_fds.unwrap_or_else(default_max_fds),
        timeouts: StreamTimeouts {
            idle: (!cli.stream_idle_timeout.is_zero()).then_some(cli.stream_idle_timeout),
            half_closed: (!cli.half_closed_timeout.is_zero()).then_some(cli.half_closed_timeout),
        },
        write_stall: (!cli.write_stall_timeout.is_zero()).then_some(cli.write_stall_timeout),
    });
    info!(
        "limits per guest: {} streams, {} bytes buffered; {} stream sockets in all",
        settings.limits.max_streams, settings.max_buffered, settings.max_fds
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
    let mut poll = Poll::new()?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;

    let mut sup = Supervisor {
        cli,
        settings,
        workers: BTreeMap::new(),
        stopping: Vec::new(),
    };
    for g in sup.cli.guests.clone() {
        sup.start(Origin::Static(g.name.clone()), &g.name, g.sockets)?;
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
    fn start(&mut self, origin: Origin, name: &str, sockets: Vec<PathBuf>) -> io::Result<()> {
        let w = worker::spawn(name, sockets, self.settings.clone())?;
        self.workers.insert(origin, w);
        Ok(())
    }

    /// Brings the workers for guest directories in line with what is on disk.
    fn rescan(&mut self) {
        let dirs = self.cli.scan_dirs();
        if dirs.is_empty() {
            return;
        }
        let found = discovery::scan(&dirs, &self.cli.channel_pattern);
        for (dir, f) in &found {
            let origin = Origin::Dir(dir.clone());
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
                    if let Err(e) = self.start(origin, &f.name, f.sockets.clone()) {
                        warn!("guest {}: cannot start a worker: {e}", f.name);
                    }
                }
            }
        }
        let gone: Vec<Origin> = self
            .workers
            .keys()
            .filter(|o| matches!(o, Origin::Dir(d) if !found.contains_key(d)))
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
            if let Err(e) = self.start(origin, &name, sockets) {
                warn!("guest {name}: cannot restart worker: {e}");
            }
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

/// Stream sockets allowed when `--max-fds` is not given: the open-files limit
/// less room for channels, the poll instances and the log.
fn default_max_fds() -> usize {
    open_files_limit().unwrap_or(1024).saturating_sub(128).max(16)
}
