//! Who a guest is to the services: its identity address, and the PROXY
//! protocol version 2 header that carries it (haproxy's
//! `proxy-protocol.txt`, section 2.2).
//!
//! The identity address is only ever written into headers, never used for
//! traffic. An operator assigns one per guest (`--guest-address`), or it is
//! derived from the guest's name out of `--identity-prefix`: the prefix's
//! bits, then the low bits of the 64-bit FNV-1a hash of the name (UTF-8).
//! The default prefix is the IPv6 unique-local `fd56:696f:7300::/48`
//! ("Vios" in its global ID), so a derived address can never be mistaken
//! for a real host, and the same name always gets the same address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The default prefix guest identities are derived from.
pub const DEFAULT_PREFIX: &str = "fd56:696f:7300::/48";

/// An address prefix: `ADDR/LEN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn parse(s: &str) -> Result<Prefix, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("expected ADDRESS/LENGTH such as {DEFAULT_PREFIX}, got {s:?}"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} in {s:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = l
            .parse()
            .ok()
            .filter(|&n: &u8| u32::from(n) <= max)
            .ok_or_else(|| format!("prefix length {l:?} in {s:?} is not 0..={max}"))?;
        if addr.is_loopback() {
            return Err(format!(
                "{s} is a loopback prefix: identities must not look like the host itself"
            ));
        }
        Ok(Prefix { addr, len })
    }

    /// The identity of guest `name`: the prefix, then the low bits of the
    /// name's FNV-1a hash.
    pub fn derive(&self, name: &str) -> IpAddr {
        let h = fnv1a64(name.as_bytes());
        match self.addr {
            IpAddr::V4(a) => {
                let host_bits = 32 - u32::from(self.len);
                let mask = if host_bits == 0 {
                    0
                } else {
                    u32::MAX >> (32 - host_bits)
                };
                let v = (u32::from(a) & !mask) | (h as u32 & mask);
                IpAddr::V4(Ipv4Addr::from(v))
            }
            IpAddr::V6(a) => {
                let host_bits = 128 - u32::from(self.len);
                let mask = if host_bits == 0 {
                    0
                } else {
                    u128::MAX >> (128 - host_bits)
                };
                let v = (u128::from(a) & !mask) | (u128::from(h) & mask);
                IpAddr::V6(Ipv6Addr::from(v))
            }
        }
    }
}

/// 64-bit FNV-1a: small, fixed, and the same in every implementation.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// PROXY v2's signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// `PP2_TYPE_AUTHORITY`: the guest's name.
pub const TLV_AUTHORITY: u8 = 0x02;
/// Custom TLV (0xE0..=0xEF are for applications): the channel (port) name.
pub const TLV_VIOS_CHANNEL: u8 = 0xE0;
/// Custom TLV: the stream id, 8 bytes big-endian.
pub const TLV_VIOS_STREAM: u8 = 0xE1;

/// What a PROXY v2 header says about one stream.
pub struct ProxyInfo<'a> {
    /// The guest's identity address; the source port is the stream id's low
    /// 16 bits, so a broker's `peer_port` names the stream.
    pub source: IpAddr,
    pub stream: u64,
    /// The service address the header is sent to.
    pub dest: SocketAddr,
    pub guest: &'a str,
    pub channel: &'a str,
}

/// Encodes a PROXY v2 header (command PROXY, TCP) with the guest's name,
/// channel and stream in TLVs. An IPv4 address is written as IPv4-mapped
/// IPv6 when the other one is IPv6 (both must be of one family).
pub fn proxy_v2(info: &ProxyInfo<'_>) -> Vec<u8> {
    let sport = (info.stream & 0xffff) as u16;
    let mut addrs = Vec::with_capacity(36);
    let family = match (info.source, info.dest.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            addrs.extend_from_slice(&v6(s).octets());
            addrs.extend_from_slice(&v6(d).octets());
            0x21
        }
    };
    addrs.extend_from_slice(&sport.to_be_bytes());
    addrs.extend_from_slice(&info.dest.port().to_be_bytes());
    let mut tlvs = Vec::new();
    let mut tlv = |t: u8, v: &[u8]| {
        // A TLV value is at most 65535 bytes; names are far shorter.
        let v = &v[..v.len().min(255)];
        tlvs.push(t);
        tlvs.extend_from_slice(&(v.len() as u16).to_be_bytes());
        tlvs.extend_from_slice(v);
    };
    tlv(TLV_AUTHORITY, info.guest.as_bytes());
    tlv(TLV_VIOS_CHANNEL, info.channel.as_bytes());
    tlv(TLV_VIOS_STREAM, &info.stream.to_be_bytes());
    let mut h = Vec::with_capacity(16 + addrs.len() + tlvs.len());
    h.extend_from_slice(&SIGNATURE);
    h.push(0x21); // version 2, command PROXY
    h.push(family);
    h.extend_from_slice(&((addrs.len() + tlvs.len()) as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h.extend_from_slice(&tlvs);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_identities_are_stable_and_inside_the_prefix() {
        let p = Prefix::parse(DEFAULT_PREFIX).unwrap();
        let a = p.derive("vm1");
        assert_eq!(a, p.derive("vm1"));
        assert_ne!(a, p.derive("vm2"));
        let IpAddr::V6(v6) = a else { panic!() };
        assert_eq!(&v6.octets()[..6], &[0xfd, 0x56, 0x69, 0x6f, 0x73, 0x00]);
        // FNV-1a 64 of "vm1", its low 80 bits... of which a u64 has 64.
        assert_eq!(
            u64::from_be_bytes(v6.octets()[8..].try_into().unwrap()),
            fnv1a64(b"vm1")
        );
        let p4 = Prefix::parse("198.18.0.0/15").unwrap();
        let IpAddr::V4(v4) = p4.derive("vm1") else {
            panic!()
        };
        assert_eq!(v4.octets()[0], 198);
        assert!(v4.octets()[1] == 18 || v4.octets()[1] == 19);
        assert!(Prefix::parse("127.0.0.0/8").unwrap_err().contains("loopback"));
        assert!(Prefix::parse("fd00::/129").is_err());
        assert!(Prefix::parse("fd00::").is_err());
    }

    #[test]
    fn fnv1a64_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn a_proxy_v2_header_byte_for_byte() {
        let h = proxy_v2(&ProxyInfo {
            source: "198.18.0.7".parse().unwrap(),
            stream: 0x1_0005,
            dest: "198.18.0.1:5672".parse().unwrap(),
            guest: "vm1",
            channel: "org.qpid.vios.0",
        });
        let mut want = Vec::new();
        want.extend_from_slice(b"\r\n\r\n\0\r\nQUIT\n");
        want.extend_from_slice(&[0x21, 0x11]);
        let tlvs = (3 + 3) + (3 + 15) + (3 + 8);
        want.extend_from_slice(&((12 + tlvs) as u16).to_be_bytes());
        want.extend_from_slice(&[198, 18, 0, 7, 198, 18, 0, 1, 0x00, 0x05, 0x16, 0x28]);
        want.extend_from_slice(&[0x02, 0, 3]);
        want.extend_from_slice(b"vm1");
        want.extend_from_slice(&[0xE0, 0, 15]);
        want.extend_from_slice(b"org.qpid.vios.0");
        want.extend_from_slice(&[0xE1, 0, 8, 0, 0, 0, 0, 0, 1, 0, 5]);
        assert_eq!(h, want);
        // IPv6 source, IPv4 service: both written as IPv6.
        let h = proxy_v2(&ProxyInfo {
            source: "fd56:696f:7300::1".parse().unwrap(),
            stream: 1,
            dest: "127.0.0.1:5672".parse().unwrap(),
            guest: "g",
            channel: "c",
        });
        assert_eq!(h[13], 0x21);
        assert_eq!(
            &h[16 + 16..16 + 32],
            &Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets()
        );
    }
}
