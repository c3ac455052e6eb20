//! The one code table shared by REFUSE, RESET, GOAWAY and a refusing HELLO.

use std::fmt;

/// Why a stream was refused or reset, or why a session ended (PROTOCOL.md §9).
///
/// Codes this version does not know are kept as [`Code::Other`] so that the
/// number still reaches the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    NoError,
    ProtocolError,
    FlowControlError,
    UnknownService,
    NotPermitted,
    Unreachable,
    ResourceLimit,
    GoingAway,
    Aborted,
    Timeout,
    VersionMismatch,
    RoleMismatch,
    BadLimits,
    EnhanceYourCalm,
    InternalError,
    Other(u16),
}

impl Code {
    const KNOWN: [Code; 15] = [
        Code::NoError,
        Code::ProtocolError,
        Code::FlowControlError,
        Code::UnknownService,
        Code::NotPermitted,
        Code::Unreachable,
        Code::ResourceLimit,
        Code::GoingAway,
        Code::Aborted,
        Code::Timeout,
        Code::VersionMismatch,
        Code::RoleMismatch,
        Code::BadLimits,
        Code::EnhanceYourCalm,
        Code::InternalError,
    ];

    pub fn from_u16(v: u16) -> Code {
        Self::KNOWN.get(usize::from(v)).copied().unwrap_or(Code::Other(v))
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Code::Other(v) => v,
            known => Self::KNOWN
                .iter()
                .position(|&c| c == known)
                .map_or(14, |i| i as u16),
        }
    }

    /// The name used in PROTOCOL.md and in log lines.
    pub fn name(self) -> &'static str {
        match self {
            Code::NoError => "NO_ERROR",
            Code::ProtocolError => "PROTOCOL_ERROR",
            Code::FlowControlError => "FLOW_CONTROL_ERROR",
            Code::UnknownService => "UNKNOWN_SERVICE",
            Code::NotPermitted => "NOT_PERMITTED",
            Code::Unreachable => "UNREACHABLE",
            Code::ResourceLimit => "RESOURCE_LIMIT",
            Code::GoingAway => "GOING_AWAY",
            Code::Aborted => "ABORTED",
            Code::Timeout => "TIMEOUT",
            Code::VersionMismatch => "VERSION_MISMATCH",
            Code::RoleMismatch => "ROLE_MISMATCH",
            Code::BadLimits => "BAD_LIMITS",
            Code::EnhanceYourCalm => "ENHANCE_YOUR_CALM",
            Code::InternalError => "INTERNAL_ERROR",
            Code::Other(_) => "UNKNOWN_CODE",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::Other(v) => write!(f, "UNKNOWN_CODE({v})"),
            known => f.write_str(known.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_u16() {
        for v in 0..=u16::MAX {
            assert_eq!(Code::from_u16(v).to_u16(), v);
        }
        assert_eq!(Code::from_u16(8), Code::Aborted);
        assert_eq!(Code::from_u16(999), Code::Other(999));
        assert_eq!(Code::Other(999).to_string(), "UNKNOWN_CODE(999)");
    }
}
