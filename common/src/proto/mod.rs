//! The Vios protocol, sans IO: no sockets, no clock. See `docs/PROTOCOL.md`.

pub mod buf;
pub mod code;
pub mod crc32c;
pub mod flow;
pub mod frame;
pub mod hello;
pub mod rate;
pub mod rng;
pub mod session;
pub mod text;
pub mod txqueue;
#[cfg(test)]
mod vectors;

pub use code::Code;
pub use frame::StreamId;
pub use hello::{Limits, Role};
pub use session::{Config, EndReason, Event, OpenError, Session, SessionInfo};
pub use text::PeerText;
