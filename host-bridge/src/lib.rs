//! `vios-host-bridge`: serves guests' Vios channels and splices their streams
//! into host services.
//!
//! # Layout
//!
//! - [`config`]: command line and environment.
//! - [`worker`]: one thread per guest, a mio loop over that guest's channels
//!   (one [`vios_common::io::mux::Mux`] each); opens service connections.
//! - [`run`] (here): the supervisor. It starts the workers, turns SIGTERM and
//!   SIGINT into an orderly stop, and restarts a worker that died.
#![forbid(unsafe_code)]

pub mod config;
pub mod worker;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use vios_common::proto::Limits;

use config::Cli;
use worker::{Settings, WorkerHandle};

const SIGNALS: Token = Token(0);

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
        connect_timeout: cli.connect_timeout,
        shutdown_grace: cli.shutdown_grace,
    });
    for s in &settings.services {
        info!("service {} -> {}", s.name, s.addr);
    }
    let mut poll = Poll::new()?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;

    let mut workers = Vec::new();
    for g in &cli.guests {
        workers.push(worker::spawn(g.clone(), settings.clone())?);
    }
    let mut events = Events::with_capacity(8);
    loop {
        match poll.poll(&mut events, Some(Duration::from_secs(1))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for signal in signals.pending() {
            match signal {
                SIGHUP => {
                    info!("SIGHUP: the guest list comes from the command line; nothing to reload")
                }
                _ => {
                    info!("signal {signal}: stopping");
                    return stop_all(workers);
                }
            }
        }
        restart_dead(&mut workers, &cli, &settings);
    }
}

fn stop_all(workers: Vec<WorkerHandle>) -> io::Result<()> {
    for w in &workers {
        w.request_stop();
    }
    for w in workers {
        if w.thread.join().is_err() {
            error!("guest {}: worker panicked while stopping", w.guest);
        }
    }
    info!("stopped");
    Ok(())
}

/// A worker thread that ended without being asked had a bug; serve its guest again.
fn restart_dead(workers: &mut [WorkerHandle], cli: &Cli, settings: &Arc<Settings>) {
    for w in workers.iter_mut() {
        if !w.thread.is_finished() {
            continue;
        }
        let Some(spec) = cli.guests.iter().find(|g| g.name == w.guest) else {
            continue;
        };
        error!("guest {}: worker thread died; restarting it", w.guest);
        match worker::spawn(spec.clone(), settings.clone()) {
            Ok(new) => {
                let old = std::mem::replace(w, new);
                let _ = old.thread.join();
            }
            Err(e) => warn!("guest {}: cannot restart worker: {e}", w.guest),
        }
    }
}
