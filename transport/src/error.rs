//! The one error type of the transport crate.

use std::any::Any;
use std::io;
use std::sync::{Arc, Mutex};

/// Errors from the VMM side of the seam are boxed so any VMM can report its own.
pub type VmmError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias for the transport.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a migration, on either end. New variants may come
/// (`#[non_exhaustive]`); [`crate::abort::AbortCode::of`] sorts any of them into the kinds a
/// VMM acts on, and what the peer reported arrives as [`Error::PeerAborted`] with its code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// I/O on the control channel or a data stream failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The peer closed its connection.
    #[error("the peer closed the {channel} connection{detail}")]
    PeerClosed {
        /// Which connection.
        channel: &'static str,
        /// Extra context (empty or starting with ": ").
        detail: String,
    },

    /// A message from the peer broke the wire protocol.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// A message that is well-formed but not valid in the receiver's current state.
    #[error("unexpected {got} while {state}")]
    UnexpectedMessage {
        /// The receiver's state.
        state: &'static str,
        /// The command received.
        got: String,
    },

    /// The peer speaks a protocol version we do not.
    #[error("peer speaks protocol version {peer}, this build speaks {ours}")]
    VersionMismatch {
        /// The peer's version.
        peer: u16,
        /// Ours.
        ours: u16,
    },

    /// Authentication with the pre-shared key failed.
    #[error("authentication failed: {0}")]
    AuthFailed(String),

    /// TLS failed: credentials that cannot be loaded, or a handshake the peer or we refused
    /// (unknown CA, expired certificate, no client certificate, a peer not speaking TLS).
    #[error("TLS: {0}")]
    Tls(String),

    /// A range names a region that does not exist.
    #[error("region {0} is not in the region table")]
    UnknownRegion(u32),

    /// A range reaches outside its region.
    #[error("page range {first_page}+{npages} is outside region {region} ({region_pages} pages)")]
    RangeOutOfBounds {
        /// The region.
        region: u32,
        /// First page of the range.
        first_page: u64,
        /// Pages in the range.
        npages: u64,
        /// Pages in the region.
        region_pages: u64,
    },

    /// The two ends disagree on the guest memory layout.
    #[error("region table mismatch: {0}")]
    RegionMismatch(String),

    /// A VMM operation behind the seam failed.
    #[error("VMM {op} failed: {source}")]
    Vmm {
        /// The operation (pause, resume, dirty log, ...).
        op: &'static str,
        /// The VMM's error.
        #[source]
        source: VmmError,
    },

    /// The peer aborted the migration: its code and reason.
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(crate::abort::PeerAbort),

    /// The memory digests of the two ends differ.
    #[error("memory digest mismatch: source {source_digest:032x}, destination {dest_digest:032x}")]
    DigestMismatch {
        /// The source's digest.
        source_digest: u128,
        /// The destination's digest.
        dest_digest: u128,
    },

    /// Pre-copy did not converge and the policy is to abort.
    #[error("pre-copy did not converge: {0}")]
    NotConverged(String),

    /// The switchover was sent but its outcome is unknown (the destination may be running).
    #[error("switchover outcome unknown, the source VM stays paused: {0}")]
    SwitchoverUnknown(#[source] Box<Error>),

    /// No usable RDMA device, or the RDMA path was requested but cannot be used.
    #[error("RDMA unavailable: {0}")]
    RdmaUnavailable(String),

    /// An RDMA verb or work completion failed.
    #[error("RDMA error: {0}")]
    Rdma(String),

    /// Pinning the guest memory needs a higher RLIMIT_MEMLOCK.
    #[error(
        "RLIMIT_MEMLOCK is {limit} bytes but registering guest memory pins {needed} bytes; \
         raise it (ulimit -l unlimited, or LimitMEMLOCK=infinity for a systemd unit, or memlock in /etc/security/limits.conf)"
    )]
    Memlock {
        /// Bytes that must be pinned.
        needed: u64,
        /// The current soft limit.
        limit: u64,
    },

    /// Post-copy was requested but cannot run here (no userfaultfd, a missing feature, or a
    /// data path that cannot fetch pages on demand).
    #[error("post-copy unavailable: {0}")]
    PostcopyUnavailable(String),

    /// A post-copy fault or prefetch thread stopped (the reason says which and why).
    #[error("post-copy service stopped: {0}")]
    PostcopyService(String),

    /// The source or the link was lost during post-copy: the destination guest is paused and
    /// `missing` of its `total` pages exist only on the source.
    #[error(
        "post-copy interrupted with {missing} of {total} pages still on the source ({reason}); \
         the destination guest is paused: restart the source VM from its paused state, or recover \
         the missing pages before resuming (see docs/postcopy.md)"
    )]
    PostcopyInterrupted {
        /// Pages the destination never received.
        missing: u64,
        /// Pages of the guest.
        total: u64,
        /// What failed.
        reason: String,
        /// The paused guest with what arrived ([`PausedGuest::take`]).
        guest: PausedGuest,
    },

    /// Post-copy's link to the source failed (a fetch failed or no page arrived for the I/O
    /// timeout); with recovery on, post-copy pauses until the source reconnects.
    #[error("post-copy link failed: {0}")]
    PostcopyLink(String),

    /// The guest does not fit what this end accepts or what the host can give.
    #[error("guest too large: {0}")]
    GuestTooLarge(String),

    /// The migration was aborted on this end while work was waiting.
    #[error("aborted: {0}")]
    Aborted(String),

    /// The operation timed out.
    #[error("timed out: {0}")]
    Timeout(String),

    /// The migration was cancelled through its [`crate::session::MigrationControl`]; the
    /// source VM runs on.
    #[error("the migration was cancelled")]
    Cancelled,

    /// A cancel came after the point of no return (the switchover was sent, or the guest
    /// resumed on the destination); the migration goes on.
    #[error("too late to cancel: the switchover has begun")]
    TooLateToCancel,
}

impl Error {
    /// A failure of the connection to the peer (a socket error or close, a timeout, an RDMA
    /// transfer or queue-pair error), which post-copy recovery can outlast; not a refusal, a
    /// protocol violation or a local failure.
    pub fn is_link(&self) -> bool {
        matches!(
            self,
            Error::Io { .. }
                | Error::PeerClosed { .. }
                | Error::Timeout(_)
                | Error::Rdma(_)
                | Error::PostcopyLink(_)
        )
    }

    /// An `Os` error from `errno`.
    pub fn os(op: &'static str) -> Error {
        Error::Os {
            op,
            source: io::Error::last_os_error(),
        }
    }

    /// An `Io` error with context, mapping EOF-like errors to [`Error::PeerClosed`].
    pub fn io(context: impl Into<String>, source: io::Error, channel: &'static str) -> Error {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout(format!(
                "{}: the {channel} made no progress within the I/O timeout",
                context.into()
            )),
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => Error::PeerClosed {
                channel,
                detail: format!(": {}", context.into()),
            },
            _ => Error::Io {
                context: context.into(),
                source,
            },
        }
    }

    /// A VMM error.
    pub fn vmm(op: &'static str, source: impl Into<VmmError>) -> Error {
        Error::Vmm {
            op,
            source: source.into(),
        }
    }
}

/// The paused destination guest after an interrupted post-copy, as
/// [`Error::PostcopyInterrupted`] carries it: a shareable slot (errors must be `Send + Sync`
/// and printable) from which [`PausedGuest::take`] takes the post-copy remnant (the paused VM
/// and the userfaultfd registration that keeps its missing pages missing) once.
///
/// The slot holds the remnant as `dyn Any` so that this module does not depend on the
/// post-copy code; `take` (beside the remnant's type, in the post-copy module) is typed, and
/// only the post-copy module fills the slot.
#[derive(Clone, Default)]
pub struct PausedGuest(pub(crate) Arc<Mutex<Option<Box<dyn Any + Send>>>>);

impl std::fmt::Debug for PausedGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.lock().map(|g| g.is_some()).unwrap_or(false);
        write!(f, "PausedGuest({})", if held { "held" } else { "taken" })
    }
}

/// The first error of several worker threads, kept for the thread that collects them.
#[derive(Debug, Default)]
pub(crate) struct FirstError(Mutex<Option<Error>>);

impl FirstError {
    /// Keeps `e` unless an earlier error is kept already.
    pub(crate) fn record(&self, e: Error) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    /// Hands over the kept error (once), or `Ok`.
    pub(crate) fn take(&self) -> Result<()> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
