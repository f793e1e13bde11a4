//! A minimal real VMM on KVM (kvm-ioctls) running a small protected-mode guest that dirties
//! memory at a set rate and verifies itself, migrated with KVM's dirty log and its vCPU state.
//!
//! - [`control`]: guest physical layout, parameter page, I/O ports.
//! - [`guest`]: the guest program (documented machine code), GDT, initial registers.
//! - [`pacer`]: paces the guest to the dirty rate.
//! - [`state`]: the versioned device-state blob.
//! - `vcpu`: the vCPU thread (run loop, port I/O, fast pause, [`GuestProgress`]).
//! - `vm`: [`KvmVm`]: building the VM, loading the guest, self-check.
//! - `seam`: [`KvmVm`] as a migration source and destination (pre-copy, post-copy and
//!   hybrid: on the destination the guest's accesses to missing pages fault through
//!   userfaultfd inside `KVM_RUN`, and the VMM itself never reads guest memory before the
//!   guest runs).
//! - `dirty`: KVM's 4 KiB dirty log folded into larger migration pages.
//!
//! ```no_run
//! use rdmig_vmm::kvm::{KvmConfig, KvmVm};
//! use rdmig_transport::mem::PageSize;
//! let cfg = KvmConfig { mem_bytes: 64 << 20, working_set: 8 << 20, dirty_rate: 32 << 20, page_size: PageSize::KIB4, memfd: false, populated: None };
//! let mut vm = KvmVm::start(&cfg)?;
//! assert!(vm.self_check()?.ok());
//! vm.stop();
//! # Ok::<(), rdmig_vmm::Error>(())
//! ```

pub mod control;
mod dirty;
pub mod guest;
pub mod pacer;
mod seam;
pub mod state;
mod vcpu;
mod vm;

use rdmig_transport::mem::PageSize;
use rdmig_transport::vm::{DestinationFactory, DestinationVm};

pub use vcpu::GuestProgress;
pub use vm::KvmVm;

use crate::error::{Error, Result};

/// What guest to run on the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmConfig {
    /// Guest memory in bytes (1 MiB..=3 GiB, a multiple of 4 KiB).
    pub mem_bytes: u64,
    /// Bytes the guest keeps rewriting (the start of its data pages).
    pub working_set: u64,
    /// Bytes per second the guest dirties; 0 = idle.
    pub dirty_rate: u64,
    /// Page size the migration tracks and moves (KVM logs 4 KiB pages; larger sizes fold).
    pub page_size: PageSize,
    /// Back guest memory with a memfd mapped shared instead of private anonymous memory (KVM
    /// slots take either). Post-copy then installs pages in place: the destination fetches
    /// them into a second mapping of the memfd and maps them with `UFFDIO_CONTINUE`, so a
    /// vCPU fault is a minor fault (zero-copy). The destination picks its own backing
    /// ([`KvmDestConfig::memfd`]); give both ends the same.
    pub memfd: bool,
    /// About how many bytes of guest memory hold data when the guest starts (`None`: all of
    /// it): the guest's data pages end there, and the rest of memory stays zero and
    /// untouched, as in a freshly booted guest.
    pub populated: Option<u64>,
}

/// How the destination runs the guest it receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmDestConfig {
    /// Dirty rate after the switchover; `None` keeps the source's (carried in the device state).
    pub dirty_rate: Option<u64>,
    /// Back the received guest memory with a memfd (see [`KvmConfig::memfd`]); post-copy
    /// then takes the zero-copy path (`UFFDIO_CONTINUE`), which needs userfaultfd minor
    /// faults on shmem (Linux 5.13+).
    pub memfd: bool,
    /// Allocate all guest memory before the migration (QEMU's `-mem-prealloc`): no page
    /// allocation during the transfer, but memory for every page, zero or not.
    pub prealloc: bool,
}

impl KvmDestConfig {
    /// Allocates guest memory up front (see [`KvmDestConfig::prealloc`]).
    pub fn with_prealloc(mut self, on: bool) -> Self {
        self.prealloc = on;
        self
    }

    /// Backs the received guest memory with a memfd (see [`KvmDestConfig::memfd`]).
    pub fn with_memfd(mut self, memfd: bool) -> Self {
        self.memfd = memfd;
        self
    }
}

/// Checks that KVM can run this guest here; the error says why not.
pub fn kvm_available() -> std::result::Result<(), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    if kvm.get_api_version() != 12 {
        return Err(format!(
            "KVM API version {} (12 expected)",
            kvm.get_api_version()
        ));
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    for (cap, name) in [
        (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (
            kvm_ioctls::Cap::ImmediateExit,
            "KVM_CAP_IMMEDIATE_EXIT (needed for a fast pause)",
        ),
    ] {
        if !vm.check_extension(cap) {
            return Err(format!("KVM lacks {name}"));
        }
    }
    vm.create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    Ok(())
}

/// The KVM guest's kind, as its source announces it.
pub const KIND: &str = "kvm";

/// Refuses a layout whose source announced another kind of VM or a device-state version this
/// build cannot read (before any memory moves).
pub fn check_descriptor(layout: &rdmig_transport::vm::MemoryLayout) -> Result<()> {
    rdmig_transport::vm::VmDescriptor::check(layout, KIND, 1..=state::VERSION.into())
        .map_err(|e| Error::InvalidConfig(e.to_string()))
}

/// A factory for [`rdmig_transport::session::accept`] that builds a [`KvmVm`] with the
/// announced layout; the guest resumes where the source left it. A source that announces
/// another kind of VM is refused before any memory moves.
pub fn kvm_destination_factory(cfg: KvmDestConfig) -> DestinationFactory<'static> {
    Box::new(move |layout| {
        let vm = KvmVm::destination(layout, &cfg)?;
        Ok(Box::new(vm) as Box<dyn DestinationVm>)
    })
}

/// The [`KvmVm`] behind a destination VM returned by `accept`, if it is one.
pub fn into_kvm(vm: Box<dyn DestinationVm>) -> Option<Box<KvmVm>> {
    vm.into_any().downcast::<KvmVm>().ok()
}

impl KvmConfig {
    /// Backs guest memory with a memfd (see [`KvmConfig::memfd`]).
    pub fn with_memfd(mut self, memfd: bool) -> Self {
        self.memfd = memfd;
        self
    }

    /// Checks the values before anything is created.
    pub fn validate(&self) -> Result<()> {
        vm::check_page_size(self.page_size)?;
        control::GuestParams::for_populated(self.mem_bytes, self.working_set, self.populated)
            .map_err(Error::InvalidConfig)?;
        Ok(())
    }
}
