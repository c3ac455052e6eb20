//! The test vectors of PROTOCOL.md's appendix, checked byte for byte against
//! the codec in both directions: encoding the values gives the bytes in the
//! document, and decoding those bytes gives the values. The document is read
//! at compile time, so it cannot drift from the code unnoticed.

use super::crc32c::crc32c;
use super::frame::{decode, Decoded, Frame, StreamId};
use super::hello::{Hello, HelloParse, Limits, Role, NO_NONCE};
use super::Code;

const SPEC: &str = include_str!("../../../docs/PROTOCOL.md");

/// The hex block named `name` in the spec (a fenced block whose info string
/// is `hex NAME`), as bytes.
fn vector(name: &str) -> Vec<u8> {
    let fence = format!("```hex {name}\n");
    let start = SPEC
        .find(&fence)
        .unwrap_or_else(|| panic!("no test vector {name} in PROTOCOL.md"))
        + fence.len();
    let end = start + SPEC[start..].find("```").expect("closed block");
    let digits: String = SPEC[start..end].split_whitespace().collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex"))
        .collect()
}

fn guest_nonce() -> [u8; 16] {
    std::array::from_fn(|i| i as u8 + 1)
}

fn host_nonce() -> [u8; 16] {
    std::array::from_fn(|i| 0xa1 + i as u8)
}

fn hellos() -> Vec<(&'static str, Hello)> {
    let guest = Hello {
        min_version: 1,
        max_version: 1,
        role: Some(Role::Guest),
        refuse: false,
        nonce: guest_nonce(),
        echo: NO_NONCE,
        capabilities: super::hello::CAP_CLIENT_ADDRESS,
        limits: Limits {
            max_frame_payload: 262_144,
            initial_window: 65_536,
            max_streams: 1,
            idle_timeout_ms: 15_000,
        },
        code: Code::NoError,
        text: "guest".into(),
    };
    let host = Hello {
        role: Some(Role::Host),
        nonce: host_nonce(),
        echo: guest_nonce(),
        limits: Limits {
            max_streams: 1024,
            ..guest.limits
        },
        text: "host".into(),
        ..guest.clone()
    };
    let refusal = Hello {
        refuse: true,
        code: Code::VersionMismatch,
        text: "no common version".into(),
        ..host.clone()
    };
    vec![
        ("hello-guest", guest),
        ("hello-host", host),
        ("hello-refuse", refusal),
    ]
}

/// The session tag of the guest and host HELLOs above.
fn tag() -> u16 {
    let mut both = [0u8; 32];
    both[..16].copy_from_slice(&guest_nonce());
    both[16..].copy_from_slice(&host_nonce());
    crc32c(&both) as u16
}

fn frames() -> Vec<(&'static str, Frame<'static>)> {
    let s = StreamId(1);
    vec![
        (
            "frame-data",
            Frame::Data {
                stream: s,
                payload: b"hi",
            },
        ),
        (
            "frame-open",
            Frame::Open {
                stream: s,
                service: "amqp",
            },
        ),
        (
            "frame-open-client",
            Frame::Open {
                stream: StreamId(2),
                service: "amqp\x00127.0.0.1:40000",
            },
        ),
        ("frame-accept", Frame::Accept { stream: s }),
        (
            "frame-refuse",
            Frame::Refuse {
                stream: s,
                code: Code::UnknownService,
                text: "no",
            },
        ),
        (
            "frame-credit",
            Frame::Credit {
                stream: s,
                increment: 16_384,
            },
        ),
        ("frame-fin", Frame::Fin { stream: s }),
        (
            "frame-reset",
            Frame::Reset {
                stream: s,
                code: Code::Aborted,
                text: "x",
            },
        ),
        (
            "frame-ping",
            Frame::Ping {
                opaque: *b"\x01\x02\x03\x04\x05\x06\x07\x08",
            },
        ),
        (
            "frame-pong",
            Frame::Pong {
                opaque: *b"\x01\x02\x03\x04\x05\x06\x07\x08",
            },
        ),
        (
            "frame-goaway",
            Frame::GoAway {
                code: Code::NoError,
                drain_ms: 2000,
                text: "bye",
            },
        ),
        ("frame-ack", Frame::Ack { received: 65536 }),
    ]
}

#[test]
fn hellos_match_the_spec_byte_for_byte() {
    for (name, h) in hellos() {
        let mut bytes = Vec::new();
        h.encode(&mut bytes);
        assert_eq!(bytes, vector(name), "{name}: encoding differs from PROTOCOL.md");
        match Hello::parse(&vector(name)) {
            HelloParse::Valid(parsed, len) => {
                assert_eq!(parsed, h, "{name}");
                assert_eq!(len, bytes.len());
            }
            other => panic!("{name}: {other:?}"),
        }
        // The CRC is the last four bytes, big-endian, over all before them.
        let n = bytes.len();
        let crc = u32::from_be_bytes(bytes[n - 4..].try_into().unwrap());
        assert_eq!(crc, crc32c(&bytes[..n - 4]));
    }
}

#[test]
fn the_session_tag_matches_the_spec() {
    let t = vector("session-tag");
    assert_eq!(u16::from_be_bytes([t[0], t[1]]), tag());
}

#[test]
fn frames_match_the_spec_byte_for_byte() {
    let tag = tag();
    for (name, f) in frames() {
        let mut bytes = vec![0; f.encoded_len()];
        f.encode(tag, &mut bytes);
        assert_eq!(bytes, vector(name), "{name}: encoding differs from PROTOCOL.md");
        let doc = vector(name);
        match decode(&doc, tag, 1 << 20) {
            Ok(Decoded::Frame(parsed, len)) => {
                assert_eq!(parsed, f, "{name}");
                assert_eq!(len, doc.len());
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// Prints the vectors in the spec's format (`cargo test -p vios-common
/// print_vectors -- --ignored --nocapture`), for when the spec gains one.
#[test]
#[ignore]
fn print_vectors() {
    let block = |name: &str, b: &[u8]| {
        println!("```hex {name}");
        for line in b.chunks(16) {
            let hex: Vec<String> = line.iter().map(|x| format!("{x:02x}")).collect();
            println!("{}", hex.join(" "));
        }
        println!("```");
    };
    for (name, h) in hellos() {
        let mut v = Vec::new();
        h.encode(&mut v);
        block(name, &v);
    }
    block("session-tag", &tag().to_be_bytes());
    for (name, f) in frames() {
        let mut v = vec![0; f.encoded_len()];
        f.encode(tag(), &mut v);
        block(name, &v);
    }
}
