//! Writes the committed seed corpora under `corpus/<target>/`:
//!
//!     cd common/fuzz && cargo run --example seeds
//!
//! Each session seed is checked to decode back (through `Arbitrary`) to the
//! operations it was written from, and to run without a panic.

use std::fs;
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use vios_common::proto::code::Code;
use vios_common::proto::frame::{Frame, StreamId};
use vios_common::proto::hello::{Hello, Limits, Role, NO_NONCE};
use vios_common_fuzz::*;

fn setup(mode: u8) -> Setup {
    Setup {
        mode,
        max_streams: 3,     // 4 streams
        window: 4095,       // 4 KiB
        frame: 0,           // 1 KiB frames
        high_water: 1,      // 16 KiB
        idle: 1,            // 15 s
        guest_window: 8191, // the host may send 8 KiB before CREDIT
    }
}

fn live(idx: u8) -> Sid {
    Sid::Live { idx }
}

fn guest_hello() -> HelloOp {
    HelloOp {
        nonce: [0x47; 16],
        echo: 1,
        role: 1,
        min_version: 1,
        max_version: 1,
        flags: 0,
        raw_limits: 1,
        max_frame_payload: 0,    // 1 KiB frames
        initial_window: 2047,    // 2 KiB window
        max_streams: 7,          // 8 streams
        idle_timeout_ms: 14_000, // 15 s
        code: 0,
        text: 10,
        corrupt: 0,
    }
}

fn frame(f: FrameOp) -> Op {
    Op::Frame { frame: f }
}

fn guest(op: GuestOp) -> Op {
    Op::Guest { op }
}

fn session_seeds() -> Vec<(&'static str, Input)> {
    vec![
        (
            "handshake",
            Input {
                setup: setup(1),
                ops: vec![],
            },
        ),
        (
            "stream-lifecycle",
            Input {
                setup: setup(1),
                ops: vec![
                    guest(GuestOp::Open { service: 0 }),
                    guest(GuestOp::Send { idx: 0, len: 100 }),
                    Op::Pump,
                    Op::Accept { stream: live(0) },
                    Op::Consumed {
                        stream: live(0),
                        n: 100,
                    },
                    Op::Send {
                        stream: live(0),
                        len: 3000,
                    },
                    Op::Pump,
                    guest(GuestOp::Send { idx: 0, len: 5000 }),
                    Op::Pump,
                    Op::Consumed {
                        stream: live(0),
                        n: 4096,
                    },
                    Op::Pump,
                    guest(GuestOp::Finish { idx: 0 }),
                    Op::Pump,
                    Op::Finish { stream: live(0) },
                    Op::Pump,
                ],
            },
        ),
        (
            "stream-limit-and-refuse",
            Input {
                setup: setup(3),
                ops: vec![
                    guest(GuestOp::Open { service: 0 }),
                    guest(GuestOp::Open { service: 1 }),
                    guest(GuestOp::Open { service: 2 }),
                    guest(GuestOp::Open { service: 3 }),
                    Op::Pump,
                    Op::Refuse {
                        stream: live(1),
                        code: 3,
                    },
                    Op::Reset {
                        stream: live(0),
                        code: 8,
                    },
                    frame(FrameOp::Open {
                        stream: Sid::Next,
                        service: 0,
                    }),
                    frame(FrameOp::Open {
                        stream: Sid::Next,
                        service: 0,
                    }),
                    frame(FrameOp::Open {
                        stream: Sid::Next,
                        service: 0,
                    }),
                    Op::Drain { n: 0 },
                ],
            },
        ),
        (
            "hello-then-frames",
            Input {
                setup: setup(0),
                ops: vec![
                    Op::Hello { hello: guest_hello() },
                    Op::Drain { n: 0 },
                    frame(FrameOp::Open {
                        stream: Sid::Next,
                        service: 0,
                    }),
                    frame(FrameOp::Data {
                        stream: live(0),
                        len: 1000,
                        byte: b'd',
                    }),
                    Op::Accept { stream: live(0) },
                    Op::Send {
                        stream: live(0),
                        len: 1024,
                    },
                    Op::Send {
                        stream: live(0),
                        len: 1024,
                    },
                    frame(FrameOp::Credit {
                        stream: live(0),
                        increment: 1000,
                    }),
                    Op::Send {
                        stream: live(0),
                        len: 3000,
                    },
                    frame(FrameOp::Ping { opaque: *b"pingpong" }),
                    frame(FrameOp::Data {
                        stream: live(0),
                        len: 1024,
                        byte: b'e',
                    }),
                    frame(FrameOp::Data {
                        stream: live(0),
                        len: 1024,
                        byte: b'f',
                    }),
                    Op::Consumed {
                        stream: live(0),
                        n: 2048,
                    },
                    frame(FrameOp::Data {
                        stream: live(0),
                        len: 1024,
                        byte: b'g',
                    }),
                    frame(FrameOp::Data {
                        stream: live(0),
                        len: 1024,
                        byte: b'h',
                    }),
                    frame(FrameOp::Fin { stream: live(0) }),
                    Op::Finish { stream: live(0) },
                    frame(FrameOp::Reset {
                        stream: Sid::Id { id: 1 },
                        code: 8,
                        text: 5,
                    }),
                    frame(FrameOp::GoAway {
                        code: 0,
                        drain_ms: 0,
                        text: 13,
                    }),
                    Op::Drain { n: 0 },
                ],
            },
        ),
        (
            "keepalive-and-idle",
            Input {
                setup: setup(1),
                ops: vec![
                    Op::Timeout,
                    Op::Drain { n: 0 },
                    frame(FrameOp::Pong {
                        last: 1,
                        opaque: [0; 8],
                    }),
                    Op::Timeout,
                    Op::Timeout,
                    Op::Advance { ms: 20_000 },
                    Op::Pump,
                    Op::Advance { ms: 5000 },
                    Op::Pump,
                ],
            },
        ),
        (
            "restart-and-garbage",
            Input {
                setup: setup(1),
                ops: vec![
                    guest(GuestOp::Open { service: 0 }),
                    Op::Pump,
                    Op::Raw {
                        bytes: Bytes(b"\x00\x00garbage\x89VIOS\r\n\x1a\x00\x40".to_vec()),
                    },
                    Op::Pump,
                    guest(GuestOp::Restart),
                    Op::Pump,
                    Op::Tagged {
                        ty: 0x0a,
                        flags: 0,
                        stream: Sid::Id { id: 0 },
                        payload: Bytes(b"??".to_vec()),
                    },
                    Op::Advance { ms: 2000 },
                    Op::Pump,
                    guest(GuestOp::GoAway {
                        code: 0,
                        drain_ms: 100,
                    }),
                    Op::Pump,
                    Op::LinkDown,
                    Op::LinkUp,
                    Op::Pump,
                    Op::Shutdown { grace_ms: 10 },
                    Op::Pump,
                    Op::Advance { ms: 20 },
                ],
            },
        ),
        (
            "rate-limits",
            Input {
                setup: setup(1 | 4),
                ops: vec![
                    guest(GuestOp::Open { service: 0 }),
                    guest(GuestOp::Open { service: 0 }),
                    guest(GuestOp::Open { service: 0 }),
                    guest(GuestOp::Open { service: 0 }),
                    guest(GuestOp::Open { service: 0 }),
                    Op::Pump,
                    frame(FrameOp::Ping { opaque: [1; 8] }),
                    frame(FrameOp::Ping { opaque: [2; 8] }),
                    frame(FrameOp::Ping { opaque: [3; 8] }),
                    Op::Advance { ms: 1000 },
                    Op::Pump,
                ],
            },
        ),
        (
            "flow-control-violation",
            Input {
                setup: Setup {
                    window: 99,
                    ..setup(1)
                },
                ops: vec![
                    guest(GuestOp::Open { service: 0 }),
                    Op::Pump,
                    frame(FrameOp::Data {
                        stream: live(0),
                        len: 101,
                        byte: 0,
                    }),
                    frame(FrameOp::Credit {
                        stream: live(0),
                        increment: u32::MAX,
                    }),
                    Op::Tagged {
                        ty: 4,
                        flags: 0,
                        stream: Sid::Next,
                        payload: Bytes(vec![0, 0, 0, 1]),
                    },
                    Op::Pump,
                ],
            },
        ),
    ]
}

fn hello_bytes(role: Role, nonce: u8, echo: u8) -> Vec<u8> {
    let h = Hello {
        min_version: 1,
        max_version: 1,
        role: Some(role),
        refuse: false,
        nonce: [nonce; 16],
        echo: if echo == 0 { NO_NONCE } else { [echo; 16] },
        capabilities: 0,
        limits: Limits {
            max_frame_payload: 65536,
            initial_window: 262_144,
            max_streams: 1024,
            idle_timeout_ms: 15_000,
        },
        code: Code::NoError,
        text: "vios-guest-bridge 0.1.0".into(),
    };
    let mut v = Vec::new();
    h.encode(&mut v);
    v
}

fn frame_bytes(tag: u16, f: &Frame<'_>) -> Vec<u8> {
    let mut b = vec![0; f.encoded_len()];
    f.encode(tag, &mut b);
    b
}

fn decode_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const TAG: u16 = 0xBEEF;
    // tag, then max_data (24 bits): 64 KiB
    let prefix = [0xBE, 0xEF, 0x01, 0x00, 0x00];
    let s = StreamId(1);
    let frames: Vec<Vec<u8>> = vec![
        frame_bytes(
            TAG,
            &Frame::Open {
                stream: s,
                service: "amqp",
            },
        ),
        frame_bytes(
            TAG,
            &Frame::Data {
                stream: s,
                payload: b"AMQP\x00\x00\x09\x01",
            },
        ),
        frame_bytes(TAG, &Frame::Accept { stream: s }),
        frame_bytes(
            TAG,
            &Frame::Credit {
                stream: s,
                increment: 131_072,
            },
        ),
        frame_bytes(TAG, &Frame::Fin { stream: s }),
        frame_bytes(
            TAG,
            &Frame::Reset {
                stream: s,
                code: Code::Aborted,
                text: "socket aborted",
            },
        ),
        frame_bytes(
            TAG,
            &Frame::Refuse {
                stream: s,
                code: Code::Unreachable,
                text: "connect: refused",
            },
        ),
        frame_bytes(TAG, &Frame::Ping { opaque: *b"12345678" }),
        frame_bytes(TAG, &Frame::Pong { opaque: *b"12345678" }),
        frame_bytes(
            TAG,
            &Frame::GoAway {
                code: Code::NoError,
                drain_ms: 5000,
                text: "shutting down",
            },
        ),
    ];
    let cat = |parts: &[&[u8]]| -> Vec<u8> {
        let mut v = prefix.to_vec();
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let mut all: Vec<u8> = Vec::new();
    for f in &frames {
        all.extend_from_slice(f);
    }
    let hello = hello_bytes(Role::Guest, 7, 0);
    let hello_echo = hello_bytes(Role::Host, 9, 7);
    vec![
        ("hello", cat(&[&hello])),
        (
            "hello-pair-then-frames",
            cat(&[b"stale bytes", &hello, &hello_echo, &all]),
        ),
        ("all-frames", cat(&[&all])),
        ("truncated-hello", cat(&[&hello[..40]])),
        (
            "frame-then-garbage",
            cat(&[&frames[1], b"\x00\x01\xbe\xef\xff\xff\xff\xff", &frames[7][..10]]),
        ),
    ]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let dir = root.join("session");
    fs::create_dir_all(&dir).unwrap();
    for (name, input) in session_seeds() {
        let bytes = input.to_bytes();
        let back = Input::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
        assert_eq!(back, input, "seed {name} does not decode to what it encodes");
        let counts = run(&input);
        fs::write(dir.join(name), &bytes).unwrap();
        println!(
            "session/{name}: {} bytes, {} ops: {counts:?}",
            bytes.len(),
            input.ops.len()
        );
    }
    let dir = root.join("decode");
    fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in decode_seeds() {
        fs::write(dir.join(name), &bytes).unwrap();
        println!("decode/{name}: {} bytes", bytes.len());
    }
}
