//! The migration driver: both ends of the protocol as explicit state machines.
//!
//! `source` and `dest` run the phases (handshake, setup, pre-copy rounds, stop-and-copy or
//! post-copy), one file per phase; `policy` decides when to switch over, `stats` holds the
//! reports. A running migration is driven through its [`MigrationControl`] (`handle`):
//! cancel, progress, live parameters, post-copy on demand. Entry points:
//!
//! - blocking: [`migrate`] / [`accept`] (TCP), [`migrate_controlled`] / [`accept_controlled`]
//!   (with a control), [`migrate_with`] / [`accept_with`] (any [`crate::channel`]);
//! - on a thread of its own: [`Migration::start`] / [`Migration::incoming`], whose handles
//!   deref to the control and hand the VM back on `join`.
//!
//! ```no_run
//! # fn demo(vm: Box<dyn rdmig_transport::vm::SourceVm>) -> rdmig_transport::Result<()> {
//! use rdmig_transport::auth::Psk;
//! use rdmig_transport::channel::UnixChannel;
//! use rdmig_transport::session::{Migration, MigrationConfig};
//!
//! let config = MigrationConfig::new(Psk::from_file("/etc/rdmig/key".as_ref())?);
//! let channel = Box::new(UnixChannel("/run/rdmig/incoming.sock".into()));
//! let migration = Migration::start(vm, channel, config)?;
//! migration.set_max_bandwidth(Some(1 << 30))?; // from the next round on
//! println!("{:?}", migration.progress().phase);
//! let (_vm, outcome) = migration.join();
//! let report = outcome?; // the guest now runs on the destination
//! println!("moved {} bytes, downtime {:.1} ms", report.bytes_transferred, report.downtime_ms);
//! # Ok(())
//! # }
//! ```

mod config;
mod dest;
mod handle;
mod policy;
mod progress;
mod source;
mod stats;
mod threaded;

pub use config::{ConvergencePolicy, MigrationConfig, MigrationMode};
pub use dest::{accept, accept_controlled, accept_with, MAX_GUEST_BYTES};
pub use handle::{MigrationControl, Phase, Progress};
pub use policy::{Convergence, Decision};
pub use source::{migrate, migrate_controlled, migrate_with};
pub use stats::{DestReport, FaultLatency, MigrationReport, RoundStats};
pub use threaded::{IncomingHandle, Migration, MigrationHandle};
