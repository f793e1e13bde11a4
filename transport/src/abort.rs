//! Why a migration was aborted, as the peer tells it: a code a VMM can act on
//! ([`AbortCode`]) beside the text a human reads ([`PeerAbort`]).
//!
//! After authentication, ends that both offer `caps::ABORT_CODES` abort with a `Fail` message
//! (code and text); otherwise, and always before authentication, with `Abort` (text only,
//! one of the fixed pre-authentication reasons), which arrives as [`AbortCode::Unspecified`].

use crate::error::Error;

/// The kind of failure that made the peer abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u16)]
pub enum AbortCode {
    /// No code (an `Abort` without one, or a code this build does not know).
    Unspecified = 0,
    /// The migration was cancelled through its control.
    Cancelled = 1,
    /// A message broke the protocol.
    Protocol = 2,
    /// Authentication failed.
    Auth = 3,
    /// The protocol versions differ.
    Version = 4,
    /// Something took longer than its timeout.
    Timeout = 5,
    /// RDMA could not be used or failed.
    Rdma = 6,
    /// Post-copy could not be run or failed.
    Postcopy = 7,
    /// The guest is larger than the destination accepts or can hold.
    GuestTooLarge = 8,
    /// The VMM failed (building the VM, device state, pause, resume).
    Vmm = 9,
    /// The memory digests differ.
    DigestMismatch = 10,
    /// Pre-copy did not converge under the abort policy.
    NotConverged = 11,
    /// An I/O or system error, or the connection closed.
    Io = 12,
    /// A configuration or resource limit (e.g. RLIMIT_MEMLOCK) stopped it.
    Config = 13,
}

impl AbortCode {
    /// Every code, in wire order.
    const ALL: [AbortCode; 14] = {
        use AbortCode::*;
        [
            Unspecified,
            Cancelled,
            Protocol,
            Auth,
            Version,
            Timeout,
            Rdma,
            Postcopy,
            GuestTooLarge,
            Vmm,
            DigestMismatch,
            NotConverged,
            Io,
            Config,
        ]
    };

    /// The wire encoding.
    pub fn to_u16(self) -> u16 {
        self as u16
    }

    /// Decodes a code; one this build does not know is [`AbortCode::Unspecified`].
    pub fn from_u16(v: u16) -> AbortCode {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(AbortCode::Unspecified)
    }

    /// The code this end sends for its own error `e`.
    pub fn of(e: &Error) -> AbortCode {
        match e {
            Error::Cancelled | Error::TooLateToCancel => AbortCode::Cancelled,
            Error::Protocol(_)
            | Error::UnexpectedMessage { .. }
            | Error::UnknownRegion(_)
            | Error::RangeOutOfBounds { .. }
            | Error::RegionMismatch(_) => AbortCode::Protocol,
            Error::AuthFailed(_) | Error::Tls(_) => AbortCode::Auth,
            Error::VersionMismatch { .. } => AbortCode::Version,
            Error::Timeout(_) => AbortCode::Timeout,
            Error::RdmaUnavailable(_) | Error::Rdma(_) => AbortCode::Rdma,
            Error::PostcopyUnavailable(_)
            | Error::PostcopyService(_)
            | Error::PostcopyLink(_)
            | Error::PostcopyInterrupted { .. } => AbortCode::Postcopy,
            Error::GuestTooLarge(_) => AbortCode::GuestTooLarge,
            Error::Vmm { .. } => AbortCode::Vmm,
            Error::DigestMismatch { .. } => AbortCode::DigestMismatch,
            Error::NotConverged(_) => AbortCode::NotConverged,
            Error::Os { .. } | Error::Io { .. } | Error::PeerClosed { .. } => AbortCode::Io,
            Error::InvalidConfig(_) | Error::Memlock { .. } => AbortCode::Config,
            Error::SwitchoverUnknown(cause) => AbortCode::of(cause),
            Error::PeerAborted(p) => p.code,
            Error::Aborted(_) => AbortCode::Unspecified,
        }
    }
}

/// What the peer said when it aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAbort {
    /// The kind of failure.
    pub code: AbortCode,
    /// Its text (escaped; before authentication one of the fixed reasons).
    pub reason: String,
}

impl PeerAbort {
    /// An abort without a code.
    pub fn text(reason: impl Into<String>) -> PeerAbort {
        PeerAbort {
            code: AbortCode::Unspecified,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for PeerAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::ops::Deref for PeerAbort {
    type Target = str;
    fn deref(&self) -> &str {
        &self.reason
    }
}

impl PartialEq<&str> for PeerAbort {
    fn eq(&self, other: &&str) -> bool {
        self.reason == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_ones_are_unspecified() {
        for v in 0..14 {
            assert_eq!(AbortCode::from_u16(v).to_u16(), v);
        }
        assert_eq!(AbortCode::from_u16(999), AbortCode::Unspecified);
        assert_eq!(AbortCode::of(&Error::Cancelled), AbortCode::Cancelled);
        let wrapped = Error::SwitchoverUnknown(Box::new(Error::Timeout("t".into())));
        assert_eq!(AbortCode::of(&wrapped), AbortCode::Timeout);
        let p = PeerAbort::text("protocol error");
        assert!(p == "protocol error" && p.contains("error") && format!("{p}") == "protocol error");
    }
}
