//! What the two ends negotiate in `Hello`/`HelloAck`: the capability bits and the transport.

use crate::error::{Error, Result};

/// Capability bits exchanged in `Hello`/`HelloAck`.
pub mod caps {
    /// TCP data streams.
    pub const TCP: u32 = 1 << 0;
    /// One-sided RDMA reads (a usable device is present).
    pub const RDMA: u32 = 1 << 1;
    /// Post-copy page requests.
    pub const POSTCOPY: u32 = 1 << 2;
    /// Zero pages travel as ranges ([`crate::wire::ROUND_ZERO`], [`crate::wire::POSTCOPY_ZERO`]), never as
    /// page bytes.
    pub const ZERO_PAGES: u32 = 1 << 3;
    /// The end accepts `Params` (parameters changed while the migration runs).
    pub const LIVE_PARAMS: u32 = 1 << 4;
    /// The end understands `Fail` (an abort with a code).
    pub const ABORT_CODES: u32 = 1 << 5;
    /// The destination takes `VmInfo` before the region table.
    pub const VM_INFO: u32 = 1 << 6;
    /// Post-copy recovery: the end can pause post-copy when its link fails and continue over
    /// a reconnection ([`RECONNECT`]).
    pub const RECOVER: u32 = 1 << 7;
    /// In `Hello` only: this connection continues a migration paused in post-copy (a
    /// `Recover` follows `AuthProof`), it does not start one.
    pub const RECONNECT: u32 = 1 << 8;
    /// Dirty tracking by content: the destination sends `Landed` (its hash of every page a
    /// round landed) before each `RoundDone`. A source offers it only for a VM without a dirty
    /// log ([`crate::vm::DirtyLog::Content`]), and refuses a destination that does not.
    pub const LANDED: u32 = 1 << 9;
}

/// Transport request (in `Hello`) or choice (in `HelloAck`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TransportKind {
    /// Let the ends decide (request only).
    Auto = 0,
    /// TCP data streams.
    Tcp = 1,
    /// One-sided RDMA reads.
    Rdma = 2,
}

impl TransportKind {
    pub(super) fn from_u8(v: u8) -> Result<TransportKind> {
        Ok(match v {
            0 => TransportKind::Auto,
            1 => TransportKind::Tcp,
            2 => TransportKind::Rdma,
            _ => return Err(Error::Protocol(format!("unknown transport {v}"))),
        })
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
        }
    }
}
