//! A tiny seeded generator for nonces and PING payloads.
//!
//! Nonces must be fresh, not secret: a peer that wants to break its own
//! session can do so anyway. The daemons seed it from `/dev/urandom`; tests
//! seed it with constants and get reproducible runs.

/// SplitMix64 (Steele, Lea, Flood 2014).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// 16 bytes that are never all zero (an all-zero nonce means "none").
    pub fn nonce(&mut self) -> [u8; 16] {
        loop {
            let mut n = [0u8; 16];
            n[..8].copy_from_slice(&self.next_u64().to_be_bytes());
            n[8..].copy_from_slice(&self.next_u64().to_be_bytes());
            if n != [0; 16] {
                return n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_differ() {
        let mut r = SplitMix64::new(0);
        let a = r.nonce();
        let b = r.nonce();
        assert_ne!(a, b);
        assert_ne!(a, [0; 16]);
    }
}
