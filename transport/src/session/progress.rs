//! What a running migration reports through its [`super::MigrationControl`]: its phase (QEMU's
//! migration status names) and a snapshot of its figures.

use std::time::Duration;

/// Where a migration is (QEMU's `MigrationStatus`, as far as rdmig has the same phases).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Phase {
    /// Not started.
    #[default]
    None,
    /// Connecting, authenticating, registering memory, opening streams.
    Setup,
    /// Pre-copy rounds while the guest runs.
    Active,
    /// The guest is paused: the final round, device state, digest check (QEMU's `device`).
    Device,
    /// The guest runs on the destination; missing pages are fetched on demand.
    PostcopyActive,
    /// Post-copy's link failed: the guest runs on the destination with what it has (threads
    /// that touch a missing page wait), the source keeps the paused VM and reconnects.
    PostcopyPaused,
    /// Post-copy's link is being rebuilt (reconnected, authenticating, new data path).
    PostcopyRecover,
    /// The guest runs on the destination with all of its memory.
    Completed,
    /// The migration failed; the source guest runs on (or stays paused if the outcome is
    /// unknown).
    Failed,
    /// Cancelled; the source guest runs on.
    Cancelled,
}

impl Phase {
    /// QEMU's name of the status (`query-migrate`'s `status`).
    pub fn name(self) -> &'static str {
        match self {
            Phase::None => "none",
            Phase::Setup => "setup",
            Phase::Active => "active",
            Phase::Device => "device",
            Phase::PostcopyActive => "postcopy-active",
            Phase::PostcopyPaused => "postcopy-paused",
            Phase::PostcopyRecover => "postcopy-recover",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// The migration has ended (either way).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }
}

/// A snapshot of a running migration.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct Progress {
    /// Where it is.
    pub phase: Phase,
    /// The pre-copy round in progress (or last done).
    pub round: u32,
    /// Guest memory size, bytes.
    pub total_bytes: u64,
    /// Page data moved so far, bytes (zero pages move none).
    pub transferred_bytes: u64,
    /// Bytes still to move: the rest of this round's set in pre-copy, the missing pages in
    /// post-copy.
    pub remaining_bytes: u64,
    /// Zero pages announced so far (no bytes moved).
    pub zero_pages: u64,
    /// How fast the guest dirtied memory in the last round, bytes/s.
    pub dirty_bytes_per_sec: u64,
    /// Throughput of the last round, bytes/s.
    pub bandwidth_bytes_per_sec: u64,
    /// Predicted stop-and-copy time if the next round were the last.
    pub expected_downtime: Duration,
    /// Auto-converge's throttle of the source guest, percent.
    pub throttle_percent: u8,
    /// Since the migration started.
    pub elapsed: Duration,
    /// The cap in force, bytes/s (0: none).
    pub max_bandwidth: u64,
    /// The downtime limit in force.
    pub downtime_limit: Duration,
    /// Post-copy link failures recovered so far.
    pub recoveries: u32,
}
