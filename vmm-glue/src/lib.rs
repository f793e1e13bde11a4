//! Adapters from VMMs to the rdmig transport.
//!
//! - [`synthetic`]: an in-process VM for hosts without KVM: guest memory, writer threads that
//!   dirty a working set at a target rate, its own dirty bitmap, and a page content scheme the
//!   destination checks page by page after the migration.
//! - [`kvm`]: a minimal real VMM (kvm-ioctls) running a small protected-mode guest that dirties
//!   memory and checks itself; migrated with KVM's dirty log and its vCPU state.
//! - [`qemu`]: an unmodified QEMU (QMP): rdmig moves the guest RAM of its shared memory
//!   backends, QEMU its device state (`x-ignore-shared`).
//!
//! Both implement [`rdmig_transport::vm::SourceVm`] and [`rdmig_transport::vm::DestinationVm`],
//! and [`GuestCheck`] reports a guest's own verification of its memory.
//!
//! A whole migration with the library, as a VMM embeds it: a synthetic guest that keeps
//! writing moves over a Unix socket to a destination on another thread, driven through the
//! handles, and checks every page on arrival.
//!
//! ```
//! use std::os::unix::net::UnixListener;
//! use rdmig_transport::auth::Psk;
//! use rdmig_transport::channel::UnixChannel;
//! use rdmig_transport::session::{Migration, MigrationConfig, Phase};
//! use rdmig_transport::wire::TransportKind;
//! use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};
//!
//! let mib = 1 << 20;
//! let config = MigrationConfig::new(Psk::random()?).with_transport(TransportKind::Tcp);
//! let path = std::env::temp_dir().join(format!("rdmig-doc-{}.sock", std::process::id()));
//! let _ = std::fs::remove_file(&path);
//!
//! // The destination: builds the VM the source announces once it proved the key.
//! let guest = SyntheticConfig::new(16 * mib).with_dirtying(4 * mib, 8 * mib);
//! let incoming = Migration::incoming(
//!     Box::new(UnixListener::bind(&path)?),
//!     config.clone(),
//!     synthetic_destination_factory(guest.clone(), None),
//! )?;
//!
//! // The source: a running guest, migrated on a thread of its own.
//! let vm = SyntheticVm::start(&guest)?;
//! let migration = Migration::start(Box::new(vm), Box::new(UnixChannel(path.clone())), config)?;
//! migration.set_downtime_limit(std::time::Duration::from_millis(50))?;
//! let (_source_vm, outcome) = migration.join();
//! let report = outcome?;
//! assert!(report.verified);
//! println!("{} rounds, downtime {:?}", report.rounds, report.downtime());
//!
//! let dest_control = (*incoming).clone(); // progress and cancel, from any thread
//! let (vm, _) = incoming.join()?;
//! let vm = vm.into_any().downcast::<SyntheticVm>().expect("a synthetic VM");
//! assert!(vm.verify().ok(), "every page arrived as written");
//! assert_eq!(dest_control.progress().phase, Phase::Completed);
//! let _ = std::fs::remove_file(&path);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
pub mod kvm;
pub mod qemu;
pub mod synthetic;

pub use error::{Error, Result};

/// A guest's own verification of its memory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GuestCheck {
    /// Pages checked against their expected content.
    pub pages_checked: u64,
    /// Pages skipped because the guest rewrote them during the check.
    pub pages_skipped: u64,
    /// Pages whose content did not match.
    pub pages_bad: u64,
    /// First bad page (guest page frame number), if any.
    pub first_bad: Option<u64>,
}

impl GuestCheck {
    /// True when no page was bad and at least one was checked.
    pub fn ok(&self) -> bool {
        self.pages_bad == 0 && self.pages_checked > 0
    }
}
