//! Shared core of the Vios bridge pair.
//!
//! # Layout
//!
//! - [`proto`]: the wire protocol, sans IO (`docs/PROTOCOL.md`): frames and
//!   HELLO codec, credit flow control, and the [`proto::Session`] state
//!   machine. No sockets, no clock; fully testable in memory.
//! - [`cli`]: value parsers shared by both daemons' command lines;
//!   [`daemon`]: what both daemons' `main` does (logging, exit codes);
//!   [`json`]: a small JSON writer; [`status`]: what a daemon reports about
//!   itself (control socket, metrics, SIGUSR1).
//! - [`io`]: the mio glue both daemons share: a stream's socket and buffers,
//!   the channel (unix socket or virtio-serial device), and the multiplexer
//!   that joins them to a session.
//! - [`sys`]: the few system calls std does not wrap (the only `unsafe`).
//! - [`systemd`]: readiness, watchdog and status notifications, and log
//!   priorities for the journal.
#![deny(unsafe_code)]

pub mod cli;
pub mod daemon;
pub mod io;
pub mod json;
pub mod proto;
pub mod status;
pub mod sys;
pub mod systemd;
