//! Shared core of the Vios bridge pair.
//!
//! # Layout
//!
//! - [`proto`]: the wire protocol, sans IO (`docs/PROTOCOL.md`): frames and
//!   HELLO codec, credit flow control, and the [`proto::Session`] state
//!   machine. No sockets, no clock; fully testable in memory.
#![forbid(unsafe_code)]

pub mod proto;
