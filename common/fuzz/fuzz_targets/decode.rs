//! Fuzzes the byte-level decoders: `frame::decode`, `Hello::parse` and
//! `find_magic`.
//!
//! Input layout: bytes 0..2 are the session tag (big-endian), bytes 2..5 the
//! largest DATA payload (`max_data`, 24 bits, so up to 16 MiB), and the rest is
//! the byte stream. The stream is decoded in a loop the way a receiver would
//! (consume a frame or a HELLO, skip one byte on an error), and `Hello::parse`
//! and `find_magic` are run at every offset.
//!
//! Invariants checked besides "no panic":
//! - a decoded frame is never longer than the input, is `encoded_len()` long,
//!   re-encodes to exactly the bytes it was decoded from, respects the payload
//!   limits, and every proper prefix of it decodes as `Incomplete`;
//! - `Incomplete` is only returned while the input is shorter than the frame
//!   the (already validated) header announces, so a peer can never make a
//!   receiver wait for more than `max_data + 18` bytes;
//! - a valid HELLO is never longer than the input nor than `MAX_HELLO_LEN`, and
//!   re-encodes to a HELLO that parses back to the same value;
//! - `find_magic` agrees with a naive scan.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vios_common::proto::frame::{
    self, Decoded, Frame, FRAME_OVERHEAD, HEADER_LEN, HELLO_TYPE, MAX_CONTROL_PAYLOAD,
};
use vios_common::proto::hello::{find_magic, Hello, HelloParse, MAGIC, MAX_HELLO_LEN, MAX_HELLO_TEXT};

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let tag = u16::from_be_bytes([data[0], data[1]]);
    let max_data = u32::from_be_bytes([0, data[2], data[3], data[4]]) as usize;
    let input = &data[5..];

    decode_loop(input, tag, max_data);
    for at in 0..input.len() {
        check_hello(&input[at..]);
    }
    check_find_magic(input);
});

/// Consumes `input` as a receiver would, checking every decode.
fn decode_loop(input: &[u8], tag: u16, max_data: usize) {
    let mut pos = 0;
    while pos < input.len() {
        let rest = &input[pos..];
        match frame::decode(rest, tag, max_data) {
            Ok(Decoded::Frame(f, len)) => {
                check_frame(rest, &f, len, tag, max_data);
                pos += len;
            }
            Ok(Decoded::Hello) => {
                assert_eq!(rest[0], HELLO_TYPE, "Hello reported without its first byte");
                match Hello::parse(rest) {
                    HelloParse::Valid(_, len) => {
                        assert!(
                            len <= rest.len(),
                            "HELLO of {len} bytes from {} bytes",
                            rest.len()
                        );
                        pos += len;
                    }
                    HelloParse::Incomplete => break,
                    HelloParse::Invalid(_) => pos += 1,
                }
            }
            Ok(Decoded::Incomplete) => {
                check_incomplete(rest, max_data);
                break;
            }
            Err(_) => {
                assert_ne!(rest[0], HELLO_TYPE, "a HELLO byte was reported as an error");
                pos += 1;
            }
        }
    }
}

fn check_frame(input: &[u8], f: &Frame<'_>, len: usize, tag: u16, max_data: usize) {
    assert!(
        len <= input.len(),
        "frame of {len} bytes decoded from {} bytes of input",
        input.len()
    );
    assert!(
        len >= FRAME_OVERHEAD,
        "frame of {len} bytes is shorter than its header and trailer"
    );
    assert_eq!(
        len,
        f.encoded_len(),
        "decoded length differs from encoded_len() for {f:?}"
    );
    let payload = f.payload_len();
    match f {
        Frame::Data { payload: p, .. } => {
            assert!(!p.is_empty(), "empty DATA accepted");
            assert!(
                payload <= max_data,
                "DATA of {payload} bytes with max_data {max_data}"
            );
        }
        _ => assert!(
            payload <= MAX_CONTROL_PAYLOAD,
            "control frame of {payload} bytes: {f:?}"
        ),
    }
    // Header and trailer are fully determined by the frame and the tag, so
    // re-encoding must give back exactly the consumed bytes.
    let mut again = vec![0u8; f.encoded_len()];
    f.encode(tag, &mut again);
    assert_eq!(
        &again[..],
        &input[..len],
        "re-encoding {f:?} differs from its input"
    );
    // A frame is delivered only once complete: every proper prefix waits.
    for cut in [1, HEADER_LEN - 1, HEADER_LEN, len - 1] {
        if cut < len {
            let r = frame::decode(&input[..cut], tag, max_data);
            assert_eq!(
                r,
                Ok(Decoded::Incomplete),
                "prefix of {cut} of a {len}-byte frame"
            );
        }
    }
}

/// `Incomplete` must mean "the header so far is fine and more bytes are due",
/// never more than one maximal frame's worth.
fn check_incomplete(input: &[u8], max_data: usize) {
    // Types 0x00 (DATA) to 0x0A (ACK) are defined.
    assert!(
        input[0] <= 0x0A,
        "Incomplete for unknown frame type {:#04x}",
        input[0]
    );
    if input.len() < HEADER_LEN {
        return;
    }
    let len = u32::from_be_bytes(input[4..8].try_into().unwrap()) as usize;
    let max = if input[0] == 0 {
        max_data
    } else {
        MAX_CONTROL_PAYLOAD
    };
    assert!(
        len <= max,
        "waiting for a {len}-byte payload over the limit {max}"
    );
    assert!(
        input.len() < FRAME_OVERHEAD + len,
        "Incomplete with {} bytes for a {}-byte frame",
        input.len(),
        FRAME_OVERHEAD + len
    );
}

fn check_hello(input: &[u8]) {
    match Hello::parse(input) {
        HelloParse::Valid(h, len) => {
            assert!(
                len <= input.len(),
                "HELLO of {len} bytes from {} bytes",
                input.len()
            );
            assert!(len <= MAX_HELLO_LEN, "HELLO of {len} bytes");
            assert!(
                len >= h.encoded_len() - h.text.as_str().len(),
                "HELLO shorter than its fixed part"
            );
            assert_eq!(&input[..MAGIC.len()], &MAGIC[..]);
            assert_ne!(h.nonce, [0; 16], "zero nonce accepted");
            // Lossy UTF-8 decoding can lengthen the text past what encode
            // keeps; only then may a re-encoding differ.
            if h.text.as_str().len() <= MAX_HELLO_TEXT {
                let mut enc = Vec::new();
                h.encode(&mut enc);
                assert_eq!(enc.len(), h.encoded_len());
                let n = enc.len();
                assert_eq!(
                    Hello::parse(&enc),
                    HelloParse::Valid(h, n),
                    "HELLO does not round-trip"
                );
            }
        }
        HelloParse::Incomplete => {
            let have = input.len().min(MAGIC.len());
            assert_eq!(
                &input[..have],
                &MAGIC[..have],
                "Incomplete HELLO without its magic"
            );
            assert!(
                input.len() < MAX_HELLO_LEN,
                "Incomplete HELLO after {} bytes",
                input.len()
            );
        }
        HelloParse::Invalid(_) => {}
    }
}

/// Runs `find_magic` at every offset and compares with a naive scan.
fn check_find_magic(input: &[u8]) {
    let n = input.len();
    // matches[j]: Some(full) when input[j..] starts with the magic (full) or is
    // a proper prefix of it running to the end of the input.
    let matches: Vec<Option<bool>> = (0..n)
        .map(|j| {
            let k = (n - j).min(MAGIC.len());
            (input[j..j + k] == MAGIC[..k]).then_some(k == MAGIC.len())
        })
        .collect();
    let mut next: Option<(usize, bool)> = None;
    for at in (0..=n).rev() {
        if at < n {
            if let Some(full) = matches[at] {
                next = Some((at, full));
            }
        }
        let want = match next {
            Some((j, true)) => Ok(j - at),
            Some((j, false)) => Err(j - at),
            None => Err(n - at),
        };
        assert_eq!(find_magic(&input[at..]), want, "find_magic at offset {at}");
    }
}
