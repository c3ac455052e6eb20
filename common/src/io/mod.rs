//! The I/O pieces both bridges share, on mio: a stream's socket and buffers
//! ([`conn`]), the channel ([`link`]), and the per-channel multiplexer that
//! joins them to a session ([`mux`]).

pub mod conn;
pub mod limits;
pub mod link;
pub mod mux;
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
