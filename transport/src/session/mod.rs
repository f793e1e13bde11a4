//! The migration driver: both ends of the protocol as explicit state machines.

mod config;
mod dest;
mod policy;
mod source;
mod stats;

pub use config::{ConvergencePolicy, MigrationConfig, MigrationMode};
pub use dest::{accept, MAX_GUEST_BYTES};
pub use policy::{Convergence, Decision};
pub use source::migrate;
pub use stats::{DestReport, FaultLatency, MigrationReport, RoundStats};
