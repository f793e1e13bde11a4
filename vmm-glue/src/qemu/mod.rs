//! QEMU as a VMM for rdmig: rdmig moves the guest's RAM (RDMA READs or TCP), QEMU moves only
//! its device state.
//!
//! The guest RAM must be in shared memory backends (`memory-backend-file,share=on` on
//! `/dev/shm` or hugetlbfs, or `memory-backend-memfd,share=on`) on both QEMUs, which rdmig maps
//! into its own process. With the migration capability `x-ignore-shared` set on both, QEMU's own
//! stream leaves those blocks out, so the sequence is: rdmig's pre-copy rounds while the guest
//! runs, QMP `stop`, rdmig's final round, QEMU `migrate` of the device state into a socket of
//! rdmig's, carried over rdmig's authenticated control channel, `migrate-incoming` on the
//! destination, digest check, `cont`.
//!
//! - [`qmp`]: the QMP client.
//! - [`ram`]: finding the RAM blocks and mapping them.
//! - [`dirty`]: soft-dirty and content-comparison tracking of QEMU's writes.
//! - [`relay`]: the device state through rdmig.
//! - [`source`]: [`QemuSource`], a [`rdmig_transport::vm::SourceVm`].
//! - [`dest`]: [`QemuDest`], a [`rdmig_transport::vm::DestinationVm`], and its factory.
//! - [`launch`]: starting a QEMU with the project's Linux test guest (tests, `--loopback`).
//! - [`console`]: the test guest's console reports and the check that it ran on intact.
//! - [`watch`]: noticing a destination QEMU that exits while its migration comes in.
//!
//! Post-copy needs userfaultfd registered inside QEMU's process, which rdmig cannot do from
//! outside: QEMU guests migrate in pre-copy only.

pub mod console;
pub mod dest;
pub mod dirty;
pub mod launch;
pub mod qmp;
pub mod ram;
pub mod relay;
pub mod source;
pub mod watch;

/// A QEMU guest's kind, as its source announces it.
pub const KIND: &str = "qemu";

use std::path::{Path, PathBuf};

pub use dest::{
    accept_into, accept_into_controlled, into_qemu, qemu_destination_factory, QemuDest,
    QemuDestOptions,
};
pub use dirty::DirtyTracking;
pub use source::{QemuSource, QemuSourceOptions};

/// Which dirty tracking a source should use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrackingChoice {
    /// Soft-dirty when a probe write shows it works, content comparison otherwise.
    #[default]
    Auto,
    /// Soft-dirty, or an error.
    SoftDirty,
    /// No tracking here: the transport compares pages by content ([`rdmig_transport::vm::DirtyLog::Content`]).
    Content,
}

/// Where the device-state sockets go when not told: beside the QMP socket (which is on a file
/// system that holds sockets).
fn default_run_dir(qmp_path: &Path) -> PathBuf {
    qmp_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
