//! What a migration reports: per-round figures and the totals.

use serde::{Deserialize, Serialize};

/// One pre-copy round as the source saw it.
#[derive(Clone, Debug, Serialize)]
pub struct RoundStats {
    /// Round number.
    pub round: u32,
    /// True for the stop-and-copy round.
    pub final_round: bool,
    /// Pages moved as data.
    pub pages: u64,
    /// Pages found zero, announced as ranges (no bytes moved).
    pub zero_pages: u64,
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
    /// Auto-converge's throttle of the guest during the round, percent (0: none).
    pub throttle_percent: u8,
}

/// The outcome of a successful migration, from the source's point of view (`Default`: the
/// post-copy fields of a pre-copy migration).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationReport {
    /// Transport used.
    pub transport: String,
    /// Why that transport.
    pub transport_reason: String,
    /// Who encrypted the connections: `""` (no TLS), `"rustls"` or `"ktls"` (the control
    /// connection's; over RDMA only it is encrypted).
    pub tls: String,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Page size.
    pub page_size: u64,
    /// From connect to completion, ms.
    pub total_ms: f64,
    /// Of that, from connect to the destination's `Ready` (handshake, the VM built on the
    /// destination, memory registered, streams open), ms.
    pub setup_ms: f64,
    /// Of the downtime, from the final round's end to the destination's resume acknowledged
    /// (device state saved and moved, digest checked, restore, resume), ms; 0 for post-copy.
    pub switchover_ms: f64,
    /// From the source's pause to the destination's acknowledged resume, ms.
    pub downtime_ms: f64,
    /// Pre-copy rounds, the final one included.
    pub rounds: u32,
    /// Bytes of page data moved.
    pub bytes_transferred: u64,
    /// Zero pages announced as ranges instead of moved (every round, and post-copy).
    pub zero_pages: u64,
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
    /// `precopy`, `postcopy` or `hybrid` (what was asked for).
    pub mode: String,
    /// True when the guest switched over in post-copy (always in post-copy mode; in hybrid
    /// mode when pre-copy did not converge).
    pub postcopy: bool,
    /// Pages the destination did not hold at switchover (fetched in post-copy).
    pub postcopy_pages: u64,
    /// Guest faults on missing pages the destination served.
    pub postcopy_faults: u64,
    /// Missing pages installed by the fault service (the rest were prefetched).
    pub postcopy_fault_pages: u64,
    /// From the destination's resume to its last page installed, ms.
    pub postcopy_ms: f64,
    /// Fault latency on the destination, from fault read to `UFFDIO_COPY` done.
    pub fault_latency_us: FaultLatency,
    /// Post-copy link failures recovered (the source reconnected and post-copy went on).
    pub recoveries: u32,
    /// How long post-copy was paused for each recovery: from the failure seen here to the
    /// data path rebuilt, ms.
    pub recovery_pauses_ms: Vec<f64>,
}

/// Fault latency percentiles, µs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct FaultLatency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl FaultLatency {
    /// From p50, p90, p99, p99.9 and max in ns.
    pub fn from_ns(ns: [u64; 5]) -> FaultLatency {
        let us = |v: u64| v as f64 / 1e3;
        FaultLatency {
            p50: us(ns[0]),
            p90: us(ns[1]),
            p99: us(ns[2]),
            p999: us(ns[3]),
            max: us(ns[4]),
        }
    }
}

/// The outcome on the destination (`Default`: the post-copy fields of a pre-copy migration).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DestReport {
    /// Transport used.
    pub transport: String,
    /// Who encrypted the connections: `""` (no TLS), `"rustls"` or `"ktls"`.
    #[serde(default)]
    pub tls: String,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Rounds received.
    pub rounds: u32,
    /// Pages received as data.
    pub pages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Zero pages announced by the source (installed without page bytes).
    #[serde(default)]
    pub zero_pages: u64,
    /// Of those, pages this end had to zero (its copy held data); the others were untouched.
    #[serde(default)]
    pub zeroed_pages: u64,
    /// Digest.
    pub digest: String,
    /// CPU time of the migration threads, ms.
    pub cpu_ms: f64,
    /// From `Switchover` received (post-copy: the post-copy set received) to the VM resumed, ms.
    pub resume_ms: f64,
    /// `precopy`, `postcopy` or `hybrid`.
    pub mode: String,
    /// Pages that were missing at resume (0 without post-copy).
    pub postcopy_pages: u64,
    /// Guest faults served.
    pub postcopy_faults: u64,
    /// From resume to the last page installed, ms.
    pub postcopy_ms: f64,
    /// Fault latency, µs.
    pub fault_latency_us: FaultLatency,
    /// Post-copy installed pages in place with `UFFDIO_CONTINUE` (memfd guest memory), not
    /// with `UFFDIO_COPY` from a staging buffer.
    #[serde(default)]
    pub postcopy_zero_copy: bool,
    /// Missing pages resolved as zero without a fetch (`UFFDIO_ZEROPAGE`, or zeroed in place).
    #[serde(default)]
    pub postcopy_zero_pages: u64,
    /// Post-copy link failures recovered.
    #[serde(default)]
    pub recoveries: u32,
    /// How long post-copy was paused for each recovery, ms (from the failure seen here to
    /// the fetchers running again).
    #[serde(default)]
    pub recovery_pauses_ms: Vec<f64>,
}

pub(crate) fn mib_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / (1u64 << 20) as f64 / secs
    } else {
        0.0
    }
}

fn ms(v: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(v / 1e3).unwrap_or_default()
}

fn transport_of(name: &str) -> crate::wire::TransportKind {
    match name {
        "rdma" => crate::wire::TransportKind::Rdma,
        _ => crate::wire::TransportKind::Tcp,
    }
}

fn mode_of(name: &str) -> super::MigrationMode {
    name.parse().unwrap_or_default()
}

/// Typed views of the figures (the fields keep the units of the JSON reports: ms, strings).
impl MigrationReport {
    /// The transport that moved the pages.
    pub fn transport_kind(&self) -> crate::wire::TransportKind {
        transport_of(&self.transport)
    }
    /// The migration mode.
    pub fn migration_mode(&self) -> super::MigrationMode {
        mode_of(&self.mode)
    }
    /// From connect to completion.
    pub fn total(&self) -> std::time::Duration {
        ms(self.total_ms)
    }
    /// From the source's pause to the destination's acknowledged resume.
    pub fn downtime(&self) -> std::time::Duration {
        ms(self.downtime_ms)
    }
    /// CPU time of the source's migration threads.
    pub fn source_cpu(&self) -> std::time::Duration {
        ms(self.source_cpu_ms)
    }
    /// CPU time of the destination's migration threads.
    pub fn dest_cpu(&self) -> std::time::Duration {
        ms(self.dest_cpu_ms)
    }
}

/// Typed views of the figures (the fields keep the units of the JSON reports: ms, strings).
impl DestReport {
    /// The transport that moved the pages.
    pub fn transport_kind(&self) -> crate::wire::TransportKind {
        transport_of(&self.transport)
    }
    /// The migration mode.
    pub fn migration_mode(&self) -> super::MigrationMode {
        mode_of(&self.mode)
    }
    /// CPU time of this end's migration threads.
    pub fn cpu(&self) -> std::time::Duration {
        ms(self.cpu_ms)
    }
    /// From the switchover message to the guest resumed.
    pub fn resume(&self) -> std::time::Duration {
        ms(self.resume_ms)
    }
}
