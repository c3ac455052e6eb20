//! The I/O pieces both bridges share, on mio. From the bottom up:
//!
//! - [`sock`]: one stream's local socket (TCP or unix) and how it ends: an
//!   abort shows the far end a reset, never a clean close.
//! - [`conn`]: a stream's local end: its socket, what the socket has not
//!   taken yet, half-close state, and the readiness it waits for.
//! - [`link`]: the channel's byte pipe: QEMU's unix socket (host) or the
//!   virtio-serial device (guest), with reconnects and backoff.
//! - [`channel`]: the one owner of a link, its [`crate::proto::Session`] and
//!   its streams' connections; `channel/mod.rs` shows where a byte goes from a
//!   client socket to the broker socket.
//! - [`control`]: the control socket and the metrics listener, and the
//!   `status` client.
//! - [`event_loop`]: the poll loop both daemons run (signals, waker, timers);
//!   a daemon plugs in a [`event_loop::Handler`].
//! - [`limits`]: what a guest may hold (bytes, descriptors), the descriptor
//!   ledger of the process, stream timeouts, log rate limits.
//! - [`share`]: fair shares of a limited room between holders that come and
//!   go (descriptors per guest, stream slots per local user).
//! - [`slab`]: stable keys for connections, so a key is a token.

pub mod channel;
pub mod conn;
pub mod control;
pub mod event_loop;
pub mod limits;
pub mod link;
pub mod share;
pub mod slab;
pub mod sock;

/// A seed for nonces from the kernel's generator, or from time and pid if
/// `/dev/urandom` cannot be read.
pub fn random_seed() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}
