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
    /// Policy when pre-copy does not converge.
    pub policy: ConvergencePolicy,
    /// Bandwidth cap in bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Longest wait for any single message or round.
    pub io_timeout: Duration,
    /// RDMA device choice.
    pub rdma: RdmaOptions,
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
            policy: ConvergencePolicy::Stop,
            max_bandwidth: None,
            io_timeout: Duration::from_secs(120),
            rdma: RdmaOptions {
                qps: 4,
                ..RdmaOptions::default()
            },
        }
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

    /// Sets the RDMA options.
    pub fn with_rdma(mut self, r: RdmaOptions) -> Self {
        self.rdma = r;
        self
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
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
        if self.max_bandwidth == Some(0) {
            return Err(crate::Error::InvalidConfig(
                "a bandwidth cap of 0 would never finish".into(),
            ));
        }
        Ok(())
    }
}
