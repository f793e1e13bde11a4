//! Migration configuration shared by both ends.

use std::time::Duration;

use crate::auth::Psk;
use crate::rdma::RdmaOptions;
use crate::wire::TransportKind;

/// What to do when pre-copy stops converging or hits the round limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvergencePolicy {
    /// Switch over anyway (downtime may exceed the limit).
    Stop,
    /// Abort the migration; the source keeps running.
    Abort,
}

/// How memory moves: before the switchover, after it, or both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Pre-copy rounds, then stop-and-copy.
    #[default]
    Precopy,
    /// Switch over at once; every page is fetched on demand or prefetched afterwards.
    Postcopy,
    /// Pre-copy rounds; post-copy when they stop converging.
    Hybrid,
}

impl MigrationMode {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            MigrationMode::Precopy => "precopy",
            MigrationMode::Postcopy => "postcopy",
            MigrationMode::Hybrid => "hybrid",
        }
    }

    /// The wire encoding (the `mode` byte of `Hello`).
    pub fn to_u8(self) -> u8 {
        match self {
            MigrationMode::Precopy => 0,
            MigrationMode::Postcopy => 1,
            MigrationMode::Hybrid => 2,
        }
    }

    /// Decodes the `mode` byte of `Hello`.
    pub fn from_u8(v: u8) -> crate::Result<MigrationMode> {
        Ok(match v {
            0 => MigrationMode::Precopy,
            1 => MigrationMode::Postcopy,
            2 => MigrationMode::Hybrid,
            _ => {
                return Err(crate::Error::Protocol(format!(
                    "unknown migration mode {v}"
                )))
            }
        })
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" | "pre-copy" => Ok(MigrationMode::Precopy),
            "postcopy" | "post-copy" => Ok(MigrationMode::Postcopy),
            "hybrid" => Ok(MigrationMode::Hybrid),
            _ => Err(format!("unknown mode {s:?} (precopy, postcopy or hybrid)")),
        }
    }
}

/// Configuration of one migration (each end uses the fields that concern it).
#[derive(Clone, Debug)]
pub struct MigrationConfig {
    /// Pre-shared key for authentication.
    pub psk: Psk,
    /// Transport request (source) or what the destination allows (`Auto` = any).
    pub transport: TransportKind,
    /// TCP data streams.
    pub streams: u16,
    /// Downtime limit for the switchover.
    pub downtime_limit: Duration,
    /// Most pre-copy rounds before the policy applies (round 0 included).
    pub max_rounds: u32,
    /// The stall rule: when pre-copy rounds make no progress (the dirty set after a round is
    /// not smaller than the smallest seen so far) for this much wall time, the policy applies
    /// as when rounds stop converging. `None` (the default): no such limit.
    pub progress_timeout: Option<Duration>,
    /// Policy when pre-copy does not converge.
    pub policy: ConvergencePolicy,
    /// Bandwidth cap in bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Longest wait for any single message or round.
    pub io_timeout: Duration,
    /// RDMA device choice.
    pub rdma: RdmaOptions,
    /// Pre-copy, post-copy or hybrid (source); the destination follows the source.
    pub mode: MigrationMode,
    /// Largest guest the destination accepts (and never more than the host can give).
    pub max_guest_bytes: u64,
    /// How long the destination serves its listener for an authenticated migration (`None`:
    /// for ever). When it passes, `accept` returns the last refused handshake's error, or a
    /// timeout if none was refused.
    pub listen_timeout: Option<Duration>,
    /// Post-copy recovery: when the link fails after the guest resumed on the destination,
    /// both ends pause post-copy and the source reconnects (with backoff) for up to this long;
    /// the destination waits as long for it. `None`: no recovery (the failure ends the
    /// migration, as before). Default: 5 minutes.
    pub recover_timeout: Option<Duration>,
    /// Auto-converge: throttle a source guest whose rounds do not shrink (through
    /// [`crate::vm::SourceVm::throttle`]: 20 % after two rounds that dirtied more than half of
    /// what they moved, then 10 % more after each such round, up to 99 %) before the
    /// convergence policy applies; lifted when the migration ends. Off by default, as in QEMU.
    pub auto_converge: bool,
    /// Send zero pages as ranges, never as page bytes (when the peer supports it; on by
    /// default). Off moves every page as data, for comparisons.
    pub zero_pages: bool,
}

impl MigrationConfig {
    /// Defaults: auto transport, 4 streams, 300 ms downtime, 30 rounds, `stop` policy.
    pub fn new(psk: Psk) -> MigrationConfig {
        MigrationConfig {
            psk,
            transport: TransportKind::Auto,
            streams: 4,
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            progress_timeout: None,
            policy: ConvergencePolicy::Stop,
            max_bandwidth: None,
            io_timeout: Duration::from_secs(120),
            rdma: RdmaOptions {
                qps: 4,
                ..RdmaOptions::default()
            },
            mode: MigrationMode::Precopy,
            max_guest_bytes: super::MAX_GUEST_BYTES,
            listen_timeout: None,
            recover_timeout: Some(Duration::from_secs(300)),
            zero_pages: true,
            auto_converge: false,
        }
    }

    /// Sets auto-converge (see [`MigrationConfig::auto_converge`]).
    pub fn with_auto_converge(mut self, on: bool) -> Self {
        self.auto_converge = on;
        self
    }

    /// Sets whether zero pages travel as ranges (see [`MigrationConfig::zero_pages`]).
    pub fn with_zero_pages(mut self, on: bool) -> Self {
        self.zero_pages = on;
        self
    }

    /// Sets how long the destination waits for an authenticated migration.
    pub fn with_listen_timeout(mut self, t: Option<Duration>) -> Self {
        self.listen_timeout = t;
        self
    }

    /// Sets the largest guest the destination accepts.
    pub fn with_max_guest_bytes(mut self, b: u64) -> Self {
        self.max_guest_bytes = b;
        self
    }

    /// Sets the transport request.
    pub fn with_transport(mut self, t: TransportKind) -> Self {
        self.transport = t;
        self
    }

    /// Sets the number of TCP streams.
    pub fn with_streams(mut self, n: u16) -> Self {
        self.streams = n;
        self
    }

    /// Sets the downtime limit.
    pub fn with_downtime_limit(mut self, d: Duration) -> Self {
        self.downtime_limit = d;
        self
    }

    /// Sets the round limit.
    pub fn with_max_rounds(mut self, n: u32) -> Self {
        self.max_rounds = n;
        self
    }

    /// Sets how long a post-copy link failure may last (see
    /// [`MigrationConfig::recover_timeout`]; `None`: no recovery).
    pub fn with_recover_timeout(mut self, t: Option<Duration>) -> Self {
        self.recover_timeout = t;
        self
    }

    /// Sets the stall rule's timeout (see [`MigrationConfig::progress_timeout`]).
    pub fn with_progress_timeout(mut self, t: Option<Duration>) -> Self {
        self.progress_timeout = t;
        self
    }

    /// Sets the non-convergence policy.
    pub fn with_policy(mut self, p: ConvergencePolicy) -> Self {
        self.policy = p;
        self
    }

    /// Sets the bandwidth cap.
    pub fn with_max_bandwidth(mut self, b: Option<u64>) -> Self {
        self.max_bandwidth = b;
        self
    }

    /// Sets the I/O timeout.
    pub fn with_io_timeout(mut self, t: Duration) -> Self {
        self.io_timeout = t;
        self
    }

    /// Sets the migration mode.
    pub fn with_mode(mut self, m: MigrationMode) -> Self {
        self.mode = m;
        self
    }

    /// Sets the RDMA options.
    pub fn with_rdma(mut self, r: RdmaOptions) -> Self {
        self.rdma = r;
        self
    }

    /// Checks every value (as `migrate` and `accept` do first), so a VMM can refuse a bad
    /// configuration before it builds or touches a VM.
    pub fn validate(&self) -> crate::Result<()> {
        if self.io_timeout.is_zero() {
            return Err(crate::Error::InvalidConfig(
                "an I/O timeout of 0 would time out every read".into(),
            ));
        }
        if self.streams == 0 || self.streams > 64 {
            return Err(crate::Error::InvalidConfig(format!(
                "streams must be 1..=64, not {}",
                self.streams
            )));
        }
        if self.max_rounds == 0 {
            return Err(crate::Error::InvalidConfig(
                "max rounds must be at least 1".into(),
            ));
        }
        if self.progress_timeout == Some(Duration::ZERO) {
            return Err(crate::Error::InvalidConfig(
                "a progress timeout of 0 would end pre-copy at the first round that does not \
                 shrink; leave it unset for no limit"
                    .into(),
            ));
        }
        if self.max_bandwidth == Some(0) {
            return Err(crate::Error::InvalidConfig(
                "a bandwidth cap of 0 would never finish".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_timeout_is_off_by_default_and_never_zero() {
        let c = MigrationConfig::new(Psk::random().unwrap());
        assert_eq!(c.progress_timeout, None);
        assert!(c.validate().is_ok());
        let c = c.with_progress_timeout(Some(Duration::from_millis(300)));
        assert_eq!(c.progress_timeout, Some(Duration::from_millis(300)));
        assert!(c.validate().is_ok());
        let e = c
            .with_progress_timeout(Some(Duration::ZERO))
            .validate()
            .unwrap_err();
        assert!(matches!(e, crate::Error::InvalidConfig(_)), "{e}");
    }
}
