//! What a migration reports: per-round figures and the totals.

use serde::{Deserialize, Serialize};

/// One pre-copy round as the source saw it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundStats {
    /// Round number.
    pub round: u32,
    /// True for the stop-and-copy round.
    pub final_round: bool,
    /// Pages moved.
    pub pages: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time of the round, ms.
    pub ms: f64,
    /// Throughput of the round, MiB/s.
    pub mib_s: f64,
    /// Pages the guest dirtied during the round, per second, as MiB/s.
    pub dirty_rate_mib_s: f64,
    /// Pages dirtied during the round (what the next round moves).
    pub dirty_pages: u64,
    /// Predicted stop-and-copy time if the next round were the last, ms.
    pub predicted_downtime_ms: f64,
}

/// The outcome of a successful migration, from the source's point of view.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationReport {
    /// Transport used.
    pub transport: String,
    /// Why that transport.
    pub transport_reason: String,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Page size.
    pub page_size: u64,
    /// From connect to completion, ms.
    pub total_ms: f64,
    /// From the source's pause to the destination's acknowledged resume, ms.
    pub downtime_ms: f64,
    /// Pre-copy rounds, the final one included.
    pub rounds: u32,
    /// Bytes of page data moved.
    pub bytes_transferred: u64,
    /// Bytes moved divided by the time spent in rounds, MiB/s.
    pub throughput_mib_s: f64,
    /// Digests of both ends matched.
    pub verified: bool,
    /// The digest, hex.
    pub digest: String,
    /// CPU time of the source's migration threads, ms.
    pub source_cpu_ms: f64,
    /// CPU time of the destination's migration threads, ms.
    pub dest_cpu_ms: f64,
    /// True when the round limit or a stall forced the switchover.
    pub forced_switchover: bool,
    /// Device state bytes.
    pub device_state_bytes: u64,
    /// Per round.
    pub per_round: Vec<RoundStats>,
}

/// The outcome on the destination.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DestReport {
    /// Transport used.
    pub transport: String,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Rounds received.
    pub rounds: u32,
    /// Pages received.
    pub pages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Digest.
    pub digest: String,
    /// CPU time of the migration threads, ms.
    pub cpu_ms: f64,
    /// From `Switchover` received to the VM resumed, ms.
    pub resume_ms: f64,
}

pub(crate) fn mib_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / (1u64 << 20) as f64 / secs
    } else {
        0.0
    }
}
