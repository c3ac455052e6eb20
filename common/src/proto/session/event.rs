//! What a [`super::Session`] reports: events, why a session ended, why an
//! open failed, and counters.

use std::fmt;
use std::time::Duration;

use crate::proto::code::Code;
use crate::proto::frame::StreamId;
use crate::proto::hello::Limits;
use crate::proto::text::PeerText;

/// What both sides agreed on, for logs and for sizing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub version: u8,
    pub tag: u16,
    /// The identity text of the peer's HELLO.
    pub peer_identity: PeerText,
    pub peer_limits: Limits,
    /// Both sides set [`crate::proto::hello::CAP_CLIENT_ADDRESS`]: OPEN
    /// carries the guest client's address.
    pub client_addresses: bool,
    /// Both sides set [`crate::proto::hello::CAP_CHANNEL_ACK`]: each
    /// acknowledges what it received, and each keeps what it has in flight
    /// within its limit.
    pub channel_acks: bool,
}

/// Why a session ended. Every stream it carried is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The channel went away (socket closed, device reports no host).
    LinkLost,
    /// Nothing arrived for the idle timeout.
    IdleTimeout(Duration),
    /// The peer sent a HELLO with a new nonce: it restarted.
    PeerRestarted,
    /// The peer broke the protocol; a GOAWAY with `code` was sent.
    Violation { code: Code, detail: String },
    /// The peer sent GOAWAY with no drain period.
    PeerGoAway { code: Code, text: PeerText },
    /// A GOAWAY's drain period is over or no stream is left.
    Drained,
    /// This side stopped (see [`Session::shutdown`]) before the session drained.
    Shutdown,
}

impl EndReason {
    /// The peer misbehaved (as opposed to going away or restarting).
    pub fn is_failure(&self) -> bool {
        matches!(self, EndReason::Violation { .. })
            || matches!(self, EndReason::PeerGoAway { code, .. } if *code != Code::NoError && *code != Code::GoingAway)
    }
}

impl EndReason {
    /// A short fixed name for counters and metrics labels, e.g. `link_lost`
    /// or `violation:ENHANCE_YOUR_CALM`.
    pub fn kind(&self) -> String {
        match self {
            EndReason::LinkLost => "link_lost".into(),
            EndReason::IdleTimeout(_) => "idle_timeout".into(),
            EndReason::PeerRestarted => "peer_restarted".into(),
            EndReason::Violation { code, .. } => format!("violation:{code}"),
            EndReason::PeerGoAway { code, .. } => format!("peer_goaway:{code}"),
            EndReason::Drained => "drained".into(),
            EndReason::Shutdown => "shutdown".into(),
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::LinkLost => f.write_str("link lost"),
            EndReason::IdleTimeout(d) => write!(f, "nothing received for {} ms", d.as_millis()),
            EndReason::PeerRestarted => f.write_str("peer restarted (new HELLO)"),
            EndReason::Violation { code, detail } => write!(f, "{code}: {detail}"),
            EndReason::PeerGoAway { code, text } => write!(f, "peer sent GOAWAY {code}: {text}"),
            EndReason::Drained => f.write_str("drained after GOAWAY"),
            EndReason::Shutdown => f.write_str("shut down"),
        }
    }
}

/// What the caller must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The handshake completed; the guest may open streams.
    Established(SessionInfo),
    /// The session ended: abort every stream it carried.
    Ended(EndReason),
    /// The handshake failed: the peer refused us (`by_peer`) or we refused it.
    Rejected {
        by_peer: bool,
        code: Code,
        text: PeerText,
    },
    /// (host) The guest opened a stream: connect, then [`Session::accept`] or
    /// [`Session::refuse`]. DATA may arrive before that.
    Opened {
        stream: StreamId,
        service: String,
        /// The guest client's address, as the guest reported it.
        client: Option<PeerText>,
    },
    /// (guest) The host accepted a stream.
    Accepted { stream: StreamId },
    /// An open was refused: by the host (`by_peer`, guest side) or by this
    /// session on its own (host side: stream limit, going away). The stream is gone.
    Refused {
        stream: StreamId,
        code: Code,
        text: PeerText,
        by_peer: bool,
    },
    /// Stream bytes, in order. Pass them on, then call [`Session::consumed`].
    Data { stream: StreamId, bytes: &'a [u8] },
    /// The peer will send no more data on the stream (half-close).
    Finished { stream: StreamId },
    /// The stream is gone: reset by the peer (`by_peer`) or here because the
    /// peer broke its rules. Abort the socket.
    Reset {
        stream: StreamId,
        code: Code,
        text: PeerText,
        by_peer: bool,
    },
    /// The stream had no credit and has some again.
    Credit { stream: StreamId },
    /// The peer sent GOAWAY: open no new streams.
    GoingAway {
        code: Code,
        drain: Duration,
        text: PeerText,
    },
}

impl<'a> Event<'a> {
    /// Every event but DATA owns its contents: this splits DATA off so the
    /// rest can outlive the borrow of the session.
    pub fn into_owned(self) -> Result<Event<'static>, (StreamId, &'a [u8])> {
        Ok(match self {
            Event::Data { stream, bytes } => return Err((stream, bytes)),
            Event::Established(i) => Event::Established(i),
            Event::Ended(r) => Event::Ended(r),
            Event::Rejected { by_peer, code, text } => Event::Rejected { by_peer, code, text },
            Event::Opened {
                stream,
                service,
                client,
            } => Event::Opened {
                stream,
                service,
                client,
            },
            Event::Accepted { stream } => Event::Accepted { stream },
            Event::Refused {
                stream,
                code,
                text,
                by_peer,
            } => Event::Refused {
                stream,
                code,
                text,
                by_peer,
            },
            Event::Finished { stream } => Event::Finished { stream },
            Event::Reset {
                stream,
                code,
                text,
                by_peer,
            } => Event::Reset {
                stream,
                code,
                text,
                by_peer,
            },
            Event::Credit { stream } => Event::Credit { stream },
            Event::GoingAway { code, drain, text } => Event::GoingAway { code, drain, text },
        })
    }
}

/// Why [`Session::open`] could not open a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    NotEstablished,
    GoingAway,
    /// The peer's `max streams` is reached.
    TooManyStreams,
    BadServiceName,
    /// Only the guest opens streams.
    WrongRole,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpenError::NotEstablished => "no session",
            OpenError::GoingAway => "session is going away",
            OpenError::TooManyStreams => "peer's stream limit reached",
            OpenError::BadServiceName => "bad service name",
            OpenError::WrongRole => "only the guest opens streams",
        })
    }
}

/// Counters over the life of the [`Session`] (all sessions on the link).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub sessions: u64,
    pub frames_in: u64,
    pub stale_frames: u64,
    pub hellos_discarded: u64,
    pub bytes_discarded: u64,
    pub stream_violations: u64,
    /// Times input was paused because the peer exceeded the frame rate.
    pub throttled: u64,
    /// OPENs refused for the open rate.
    pub opens_refused_for_rate: u64,
    /// Bytes written to the channel, and read from it.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Sessions that ended beyond the session rate (counted as failures).
    pub churned: u64,
    /// REFUSE HELLOs ignored because they did not echo this side's nonce.
    pub stale_refusals: u64,
    /// Bytes of work handshakes did looking for a HELLO: bytes scanned and
    /// bytes run through the CRC.
    pub scan_work: u64,
    /// Times the side held off after failures.
    pub holds: u64,
}
