//! rdmig's transport: moves a running VM's memory to another host.
//!
//! A VMM implements the [`vm::SourceVm`] seam on the source and hands a
//! [`vm::DestinationFactory`] to the destination; [`session::migrate`] and
//! [`session::accept`] run the two ends of the [`wire`] protocol over a control connection,
//! moving pages with one-sided RDMA reads ([`rdma`]) or TCP streams ([`tcp`]).
//!
//! **The API a VMM uses** is re-exported here: [`Migration`] (a migration on a thread of its
//! own, driven through its [`MigrationControl`]), the blocking [`migrate_with`] /
//! [`accept_with`], [`MigrationConfig`], the seam ([`SourceVm`], [`DestinationVm`],
//! [`DestinationFactory`], [`VmDescriptor`]), guest memory ([`GuestMemoryMap`]), the key
//! ([`Psk`]), the channels ([`MigrationChannel`], [`ChannelListener`]), [`Error`] with the
//! peer's [`AbortCode`], and [`set_thread_hook`]. The other modules are public for the
//! benchmarks (`rdma-bench`), the fuzzers and the tests, which drive the layers one by one;
//! they follow the code, not a stability promise. A runnable example of a whole migration is
//! in the `rdmig-vmm` crate's documentation.

pub mod abort;
pub mod auth;
pub mod channel;
pub mod control;
pub mod cpu;
pub mod data;
pub mod digest;
mod error;
pub mod mem;
pub mod pace;
pub mod pages;
mod pending;
pub mod postcopy;
pub mod rdma;
pub mod require;
pub mod session;
pub mod tcp;
mod threads;
pub mod vm;
pub mod wire;
pub mod zero;

pub use abort::{AbortCode, PeerAbort};
pub use auth::Psk;
pub use channel::{ChannelListener, MigrationChannel, Stream};
pub use error::{Error, Result, VmmError};
pub use mem::GuestMemoryMap;
pub use session::{
    accept_with, migrate_with, DestReport, IncomingHandle, Migration, MigrationConfig,
    MigrationControl, MigrationHandle, MigrationMode, MigrationReport, Phase, Progress,
};
pub use threads::{set_thread_hook, ThreadHook};
pub use vm::{DestinationFactory, DestinationVm, DirtyLog, MemoryLayout, SourceVm, VmDescriptor};
