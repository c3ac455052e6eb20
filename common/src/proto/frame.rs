//! Frame layout: a 16-byte header, the payload, and a 2-byte trailer
//! (PROTOCOL.md §4). Decoding borrows the payload from the input.

use std::fmt;

use super::code::Code;

/// Header bytes before the payload.
pub const HEADER_LEN: usize = 16;
/// Trailer bytes after the payload (the session tag again).
pub const TRAILER_LEN: usize = 2;
/// Bytes a frame adds to its payload.
pub const FRAME_OVERHEAD: usize = HEADER_LEN + TRAILER_LEN;
/// Largest payload of any frame other than DATA.
pub const MAX_CONTROL_PAYLOAD: usize = 256;
/// Largest service name in an OPEN.
pub const MAX_SERVICE_NAME: usize = 64;
/// First byte of a HELLO when it appears where a frame header is expected.
pub const HELLO_TYPE: u8 = 0x89;

/// A stream number, chosen by the guest: 1, 2, 3… within one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Data = 0,
    Open = 1,
    Accept = 2,
    Refuse = 3,
    Credit = 4,
    Fin = 5,
    Reset = 6,
    Ping = 7,
    Pong = 8,
    GoAway = 9,
    Ack = 10,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<FrameType> {
        use FrameType::*;
        [
            Data, Open, Accept, Refuse, Credit, Fin, Reset, Ping, Pong, GoAway, Ack,
        ]
        .get(usize::from(b))
        .copied()
    }

    /// Session frames travel on stream 0; all others on a stream.
    fn is_session_frame(self) -> bool {
        matches!(
            self,
            FrameType::Ping | FrameType::Pong | FrameType::GoAway | FrameType::Ack
        )
    }
}

/// A decoded frame. Payloads borrow from the decoder's input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Data {
        stream: StreamId,
        payload: &'a [u8],
    },
    Open {
        stream: StreamId,
        service: &'a str,
    },
    Accept {
        stream: StreamId,
    },
    Refuse {
        stream: StreamId,
        code: Code,
        text: &'a str,
    },
    Credit {
        stream: StreamId,
        increment: u32,
    },
    Fin {
        stream: StreamId,
    },
    Reset {
        stream: StreamId,
        code: Code,
        text: &'a str,
    },
    Ping {
        opaque: [u8; 8],
    },
    Pong {
        opaque: [u8; 8],
    },
    GoAway {
        code: Code,
        drain_ms: u32,
        text: &'a str,
    },
    /// (CHANNEL_ACK) Bytes of this session's frames the sender has received
    /// so far (PROTOCOL.md §6.1).
    Ack {
        received: u64,
    },
}

impl Frame<'_> {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Data { .. } => FrameType::Data,
            Frame::Open { .. } => FrameType::Open,
            Frame::Accept { .. } => FrameType::Accept,
            Frame::Refuse { .. } => FrameType::Refuse,
            Frame::Credit { .. } => FrameType::Credit,
            Frame::Fin { .. } => FrameType::Fin,
            Frame::Reset { .. } => FrameType::Reset,
            Frame::Ping { .. } => FrameType::Ping,
            Frame::Pong { .. } => FrameType::Pong,
            Frame::GoAway { .. } => FrameType::GoAway,
            Frame::Ack { .. } => FrameType::Ack,
        }
    }

    /// The stream the frame belongs to; 0 for session frames.
    pub fn stream(&self) -> StreamId {
        match *self {
            Frame::Data { stream, .. }
            | Frame::Open { stream, .. }
            | Frame::Accept { stream }
            | Frame::Refuse { stream, .. }
            | Frame::Credit { stream, .. }
            | Frame::Fin { stream }
            | Frame::Reset { stream, .. } => stream,
            Frame::Ping { .. } | Frame::Pong { .. } | Frame::GoAway { .. } | Frame::Ack { .. } => StreamId(0),
        }
    }

    /// Bytes of payload this frame encodes to.
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::Data { payload, .. } => payload.len(),
            Frame::Open { service, .. } => service.len(),
            Frame::Accept { .. } | Frame::Fin { .. } => 0,
            Frame::Refuse { text, .. } | Frame::Reset { text, .. } => 2 + text.len(),
            Frame::Credit { .. } => 4,
            Frame::Ping { .. } | Frame::Pong { .. } | Frame::Ack { .. } => 8,
            Frame::GoAway { text, .. } => 6 + text.len(),
        }
    }

    /// Bytes this frame encodes to, header and trailer included.
    pub fn encoded_len(&self) -> usize {
        FRAME_OVERHEAD + self.payload_len()
    }

    /// Writes the frame into `dst`, which must be exactly `encoded_len()` long.
    ///
    /// Texts are the caller's to bound ([`clip_text`]); an over-long control
    /// payload is a bug, caught by a debug assertion.
    pub fn encode(&self, tag: u16, dst: &mut [u8]) {
        debug_assert_eq!(dst.len(), self.encoded_len());
        debug_assert!(self.frame_type() == FrameType::Data || self.payload_len() <= MAX_CONTROL_PAYLOAD);
        let payload_len = self.payload_len();
        write_header(dst, self.frame_type(), tag, payload_len, self.stream());
        let body = &mut dst[HEADER_LEN..HEADER_LEN + payload_len];
        match self {
            Frame::Data { payload, .. } => body.copy_from_slice(payload),
            Frame::Open { service, .. } => body.copy_from_slice(service.as_bytes()),
            Frame::Accept { .. } | Frame::Fin { .. } => {}
            Frame::Refuse { code, text, .. } | Frame::Reset { code, text, .. } => {
                body[..2].copy_from_slice(&code.to_u16().to_be_bytes());
                body[2..].copy_from_slice(text.as_bytes());
            }
            Frame::Credit { increment, .. } => body.copy_from_slice(&increment.to_be_bytes()),
            Frame::Ping { opaque } | Frame::Pong { opaque } => body.copy_from_slice(opaque),
            Frame::GoAway { code, drain_ms, text } => {
                body[..2].copy_from_slice(&code.to_u16().to_be_bytes());
                body[2..6].copy_from_slice(&drain_ms.to_be_bytes());
                body[6..].copy_from_slice(text.as_bytes());
            }
            Frame::Ack { received } => body.copy_from_slice(&received.to_be_bytes()),
        }
        write_trailer(dst, tag);
    }
}

/// Writes a header at the start of `dst` (at least [`HEADER_LEN`] long).
pub fn write_header(dst: &mut [u8], ty: FrameType, tag: u16, payload_len: usize, stream: StreamId) {
    let len = u32::try_from(payload_len).expect("frame payload fits in u32");
    dst[0] = ty as u8;
    dst[1] = 0;
    dst[2..4].copy_from_slice(&tag.to_be_bytes());
    dst[4..8].copy_from_slice(&len.to_be_bytes());
    dst[8..16].copy_from_slice(&stream.0.to_be_bytes());
}

/// Writes the trailer in the last [`TRAILER_LEN`] bytes of `frame`.
pub fn write_trailer(frame: &mut [u8], tag: u16) {
    let n = frame.len();
    frame[n - TRAILER_LEN..].copy_from_slice(&tag.to_be_bytes());
}

/// Why bytes where a frame should start are not a frame of this session.
///
/// Every variant is a desync or a session-level violation (PROTOCOL.md §4.2):
/// the session ends and the receiver scans for a HELLO again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    UnknownType(u8),
    Flags(u8),
    HeaderTag {
        got: u16,
    },
    TrailerTag {
        got: u16,
    },
    TooLong {
        ty: FrameType,
        len: u32,
        max: usize,
    },
    /// A payload whose size or content is wrong for its type.
    Payload {
        ty: FrameType,
        why: &'static str,
    },
    StreamId {
        ty: FrameType,
        stream: StreamId,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::UnknownType(t) => write!(f, "unknown frame type {t:#04x}"),
            DecodeError::Flags(fl) => write!(f, "frame flags {fl:#04x} set (must be 0)"),
            DecodeError::HeaderTag { got } => {
                write!(
                    f,
                    "frame header carries session tag {got:#06x}, not this session's"
                )
            }
            DecodeError::TrailerTag { got } => {
                write!(
                    f,
                    "frame trailer carries session tag {got:#06x}, not this session's"
                )
            }
            DecodeError::TooLong { ty, len, max } => {
                write!(f, "{ty:?} frame of {len} bytes exceeds the limit of {max}")
            }
            DecodeError::Payload { ty, why } => write!(f, "bad {ty:?} payload: {why}"),
            DecodeError::StreamId { ty, stream } => {
                write!(f, "{ty:?} frame on stream {stream} is not allowed")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// What sits at the start of the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A complete frame and the number of bytes it took.
    Frame(Frame<'a>, usize),
    /// A HELLO starts here (first byte `0x89`); the caller parses it.
    Hello,
    /// Not enough bytes yet.
    Incomplete,
}

/// Decodes one frame from the start of `input`.
///
/// `tag` is the session tag, `max_data` the largest DATA payload this side
/// declared. Lengths are checked against the limits before the payload is
/// awaited, so a peer cannot make the receiver hold more than
/// `max_data + FRAME_OVERHEAD` bytes for one frame.
pub fn decode(input: &[u8], tag: u16, max_data: usize) -> Result<Decoded<'_>, DecodeError> {
    let Some(&first) = input.first() else {
        return Ok(Decoded::Incomplete);
    };
    if first == HELLO_TYPE {
        return Ok(Decoded::Hello);
    }
    let ty = FrameType::from_u8(first).ok_or(DecodeError::UnknownType(first))?;
    if input.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete);
    }
    if input[1] != 0 {
        return Err(DecodeError::Flags(input[1]));
    }
    let got = u16::from_be_bytes([input[2], input[3]]);
    if got != tag {
        return Err(DecodeError::HeaderTag { got });
    }
    let len = u32::from_be_bytes(input[4..8].try_into().unwrap());
    let max = if ty == FrameType::Data {
        max_data
    } else {
        MAX_CONTROL_PAYLOAD
    };
    if len as usize > max {
        return Err(DecodeError::TooLong { ty, len, max });
    }
    let stream = StreamId(u64::from_be_bytes(input[8..16].try_into().unwrap()));
    if ty.is_session_frame() != (stream.0 == 0) {
        return Err(DecodeError::StreamId { ty, stream });
    }
    let total = FRAME_OVERHEAD + len as usize;
    if input.len() < total {
        return Ok(Decoded::Incomplete);
    }
    let got = u16::from_be_bytes([input[total - 2], input[total - 1]]);
    if got != tag {
        return Err(DecodeError::TrailerTag { got });
    }
    let body = &input[HEADER_LEN..total - TRAILER_LEN];
    let frame = parse_body(ty, stream, body)?;
    Ok(Decoded::Frame(frame, total))
}

fn parse_body(ty: FrameType, stream: StreamId, body: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let bad = |why| DecodeError::Payload { ty, why };
    let fixed = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(bad("wrong length"))
        }
    };
    Ok(match ty {
        FrameType::Data => {
            if body.is_empty() {
                return Err(bad("empty DATA"));
            }
            Frame::Data {
                stream,
                payload: body,
            }
        }
        // Checked as a name by the session, which refuses a bad one: a
        // malformed name is a stream's problem, not the session's.
        FrameType::Open => Frame::Open {
            stream,
            service: std::str::from_utf8(body).map_err(|_| bad("service name is not UTF-8"))?,
        },
        FrameType::Accept => {
            fixed(0)?;
            Frame::Accept { stream }
        }
        FrameType::Fin => {
            fixed(0)?;
            Frame::Fin { stream }
        }
        FrameType::Refuse | FrameType::Reset => {
            if body.len() < 2 {
                return Err(bad("shorter than its code"));
            }
            let code = Code::from_u16(u16::from_be_bytes([body[0], body[1]]));
            let text = std::str::from_utf8(&body[2..]).map_err(|_| bad("text is not UTF-8"))?;
            if ty == FrameType::Refuse {
                Frame::Refuse { stream, code, text }
            } else {
                Frame::Reset { stream, code, text }
            }
        }
        FrameType::Credit => {
            fixed(4)?;
            let increment = u32::from_be_bytes(body.try_into().unwrap());
            if increment == 0 {
                return Err(bad("zero credit increment"));
            }
            Frame::Credit { stream, increment }
        }
        FrameType::Ping | FrameType::Pong => {
            fixed(8)?;
            let opaque = body.try_into().unwrap();
            if ty == FrameType::Ping {
                Frame::Ping { opaque }
            } else {
                Frame::Pong { opaque }
            }
        }
        FrameType::GoAway => {
            if body.len() < 6 {
                return Err(bad("shorter than its code and drain"));
            }
            let code = Code::from_u16(u16::from_be_bytes([body[0], body[1]]));
            let drain_ms = u32::from_be_bytes(body[2..6].try_into().unwrap());
            let text = std::str::from_utf8(&body[6..]).map_err(|_| bad("text is not UTF-8"))?;
            Frame::GoAway { code, drain_ms, text }
        }
        FrameType::Ack => {
            fixed(8)?;
            Frame::Ack {
                received: u64::from_be_bytes(body.try_into().unwrap()),
            }
        }
    })
}

/// Checks a service name: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`.
pub fn check_service_name(bytes: &[u8]) -> Result<&str, &'static str> {
    if bytes.is_empty() || bytes.len() > MAX_SERVICE_NAME {
        return Err("service name must be 1 to 64 bytes");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
    {
        return Err("service name may hold only A-Z a-z 0-9 . _ -");
    }
    Ok(std::str::from_utf8(bytes).expect("ASCII is UTF-8"))
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn clip_text(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Longest text in a REFUSE or RESET.
pub const MAX_REASON_TEXT: usize = MAX_CONTROL_PAYLOAD - 2;
/// Longest text in a GOAWAY.
pub const MAX_GOAWAY_TEXT: usize = MAX_CONTROL_PAYLOAD - 6;

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: u16 = 0xBEEF;

    fn enc(frame: &Frame<'_>) -> Vec<u8> {
        let mut v = vec![0; frame.encoded_len()];
        frame.encode(TAG, &mut v);
        v
    }

    fn samples() -> Vec<Frame<'static>> {
        let s = StreamId(7);
        vec![
            Frame::Data {
                stream: s,
                payload: b"hello",
            },
            Frame::Open {
                stream: s,
                service: "amqp",
            },
            Frame::Accept { stream: s },
            Frame::Refuse {
                stream: s,
                code: Code::UnknownService,
                text: "no such service",
            },
            Frame::Credit {
                stream: s,
                increment: 65536,
            },
            Frame::Fin { stream: s },
            Frame::Reset {
                stream: StreamId(u64::MAX),
                code: Code::Other(4242),
                text: "",
            },
            Frame::Ping { opaque: *b"12345678" },
            Frame::Pong { opaque: [0xFF; 8] },
            Frame::GoAway {
                code: Code::GoingAway,
                drain_ms: 5000,
                text: "shutting down",
            },
        ]
    }

    #[test]
    fn round_trip_samples() {
        for f in samples() {
            let bytes = enc(&f);
            assert_eq!(
                decode(&bytes, TAG, 1 << 16),
                Ok(Decoded::Frame(f.clone(), bytes.len()))
            );
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for f in samples() {
            let bytes = enc(&f);
            for cut in 0..bytes.len() {
                assert_eq!(
                    decode(&bytes[..cut], TAG, 1 << 16),
                    Ok(Decoded::Incomplete),
                    "{f:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let good = enc(&Frame::Fin { stream: StreamId(1) });
        let mut b = good.clone();
        b[0] = 0x42;
        assert_eq!(decode(&b, TAG, 100), Err(DecodeError::UnknownType(0x42)));
        let mut b = good.clone();
        b[1] = 1;
        assert_eq!(decode(&b, TAG, 100), Err(DecodeError::Flags(1)));
        assert!(matches!(
            decode(&good, 0x1234, 100),
            Err(DecodeError::HeaderTag { .. })
        ));
        let mut b = good.clone();
        *b.last_mut().unwrap() ^= 1;
        assert!(matches!(
            decode(&b, TAG, 100),
            Err(DecodeError::TrailerTag { .. })
        ));
        let ping_on_stream = {
            let mut b = enc(&Frame::Ping { opaque: [0; 8] });
            b[15] = 1;
            b
        };
        assert!(matches!(
            decode(&ping_on_stream, TAG, 100),
            Err(DecodeError::StreamId { .. })
        ));
        let fin_on_zero = enc(&Frame::Fin { stream: StreamId(0) });
        assert!(matches!(
            decode(&fin_on_zero, TAG, 100),
            Err(DecodeError::StreamId { .. })
        ));
    }

    #[test]
    fn length_is_checked_before_the_payload_arrives() {
        // A header claiming 0xFFFFFFFF bytes is refused on its 16 header bytes alone.
        let mut h = [0u8; HEADER_LEN];
        write_header(&mut h, FrameType::Data, TAG, 0, StreamId(1));
        h[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode(&h, TAG, 65536), Err(DecodeError::TooLong { .. })));
        let mut h = [0u8; HEADER_LEN];
        write_header(&mut h, FrameType::Open, TAG, MAX_CONTROL_PAYLOAD + 1, StreamId(1));
        assert!(matches!(decode(&h, TAG, 65536), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn rejects_bad_payloads() {
        let empty_data = enc(&Frame::Data {
            stream: StreamId(1),
            payload: b"",
        });
        assert!(matches!(
            decode(&empty_data, TAG, 100),
            Err(DecodeError::Payload { .. })
        ));
        let zero_credit = enc(&Frame::Credit {
            stream: StreamId(1),
            increment: 0,
        });
        assert!(matches!(
            decode(&zero_credit, TAG, 100),
            Err(DecodeError::Payload { .. })
        ));
        // Names that are not service names still decode: the session refuses
        // the stream (see session tests); bytes that are not UTF-8 do not.
        for name in ["", "127.0.0.1:22", "[::1]:22", "/etc/passwd", "a b"] {
            let f = enc(&Frame::Open {
                stream: StreamId(1),
                service: name,
            });
            assert!(matches!(decode(&f, TAG, 100), Ok(Decoded::Frame(..))), "{name}");
        }
        let mut f = enc(&Frame::Open {
            stream: StreamId(1),
            service: "ab",
        });
        f[HEADER_LEN] = 0xFF;
        assert!(matches!(decode(&f, TAG, 100), Err(DecodeError::Payload { .. })));
        let mut bad_utf8 = enc(&Frame::Reset {
            stream: StreamId(1),
            code: Code::Aborted,
            text: "xy",
        });
        bad_utf8[HEADER_LEN + 2] = 0xC3;
        assert!(matches!(
            decode(&bad_utf8, TAG, 100),
            Err(DecodeError::Payload { .. })
        ));
    }

    /// 10,000 random frames: decode(encode(f)) == f, and every proper prefix
    /// of the encoding is incomplete rather than an error.
    #[test]
    fn random_frames_round_trip() {
        let mut rng = crate::proto::rng::SplitMix64::new(7);
        let mut pool = vec![0u8; 70_000];
        for b in pool.iter_mut() {
            *b = rng.next_u64() as u8;
        }
        let names = ["amqp", "a", "x.y-z_0", &"s".repeat(64)];
        let texts = ["", "why", "é ü", &"t".repeat(200)];
        for case in 0..10_000u64 {
            let r = rng.next_u64();
            let stream = StreamId(rng.next_u64() | 1);
            let text = texts[(r >> 8) as usize % texts.len()];
            let code = Code::from_u16((r >> 16) as u16 % 20);
            let f = match r % 10 {
                0 => {
                    let len = 1 + (rng.next_u64() % 65_535) as usize;
                    let at = (rng.next_u64() % 4000) as usize;
                    Frame::Data {
                        stream,
                        payload: &pool[at..at + len],
                    }
                }
                1 => Frame::Open {
                    stream,
                    service: names[(r >> 8) as usize % names.len()],
                },
                2 => Frame::Accept { stream },
                3 => Frame::Refuse { stream, code, text },
                4 => Frame::Credit {
                    stream,
                    increment: (rng.next_u64() as u32).max(1),
                },
                5 => Frame::Fin { stream },
                6 => Frame::Reset { stream, code, text },
                7 => Frame::Ping {
                    opaque: rng.next_u64().to_be_bytes(),
                },
                8 => Frame::Pong {
                    opaque: rng.next_u64().to_be_bytes(),
                },
                _ => Frame::GoAway {
                    code,
                    drain_ms: rng.next_u64() as u32,
                    text,
                },
            };
            let tag = rng.next_u64() as u16;
            let mut b = vec![0; f.encoded_len()];
            f.encode(tag, &mut b);
            assert_eq!(
                decode(&b, tag, 65_535),
                Ok(Decoded::Frame(f.clone(), b.len())),
                "case {case}"
            );
            let cut = (rng.next_u64() as usize) % b.len();
            assert_eq!(
                decode(&b[..cut], tag, 65_535),
                Ok(Decoded::Incomplete),
                "case {case} cut {cut}"
            );
        }
    }

    #[test]
    fn hello_byte_is_reported() {
        assert_eq!(decode(&[HELLO_TYPE], TAG, 100), Ok(Decoded::Hello));
    }

    #[test]
    fn clip_text_respects_char_boundaries() {
        assert_eq!(clip_text("héllo", 2), "h");
        assert_eq!(clip_text("héllo", 3), "hé");
        assert_eq!(clip_text("abc", 10), "abc");
    }
}
