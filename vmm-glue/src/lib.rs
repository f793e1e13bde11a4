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
