//! The migration driver: both ends of the protocol as explicit state machines.
//!
//! `source` and `dest` drive the handshake, the data setup, the pre-copy rounds and the
//! stop-and-copy switchover; their `postcopy_phase` submodules hold the post-copy switchover
//! and service (post-copy and hybrid modes). `policy` decides when to switch over, `stats`
//! holds the reports.

mod config;
mod dest;
mod handle;
mod policy;
mod source;
mod stats;

pub use config::{ConvergencePolicy, MigrationConfig, MigrationMode};
pub use dest::{accept, accept_controlled, MAX_GUEST_BYTES};
pub use handle::{MigrationControl, Phase, Progress};
pub use policy::{Convergence, Decision};
pub use source::{migrate, migrate_controlled};
pub use stats::{DestReport, FaultLatency, MigrationReport, RoundStats};
