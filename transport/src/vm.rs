//! The seam a VMM implements to be migrated: its memory regions, a fetch-and-clear of its
//! dirty log, pause and resume, and its device state as an opaque blob.
//!
//! The source side implements [`SourceVm`]; the destination side hands the transport a
//! [`DestinationFactory`] that builds a [`DestinationVm`] once the source's region table is
//! known (so the destination allocates exactly the layout it is about to receive).
//!
//! Ordering contract for the dirty log: a guest write that completes after
//! [`SourceVm::fetch_and_clear_dirty`] returns must be reported by a later call. The driver
//! fetches-and-clears *before* it announces a round, so a write racing a transfer of the same
//! page is always carried again later.
//!
//! A VMM without a dirty log (QEMU seen from outside, on a kernel without soft-dirty) says so
//! with [`SourceVm::dirty_log`] = [`DirtyLog::Content`]: the transport then finds the written
//! pages itself, by hashing every page of guest memory after each round and comparing the
//! hashes with the ones the destination reports for what it holds (`Landed` messages). The
//! comparison is against what landed, not what was read, so a page the guest changed while the
//! transport moved it is caught however it changed (even back to what it was).
//!
//! Throttling ([`SourceVm::throttle`]) is how a VMM helps a migration converge: the guest runs
//! only part of each time slice, so it dirties less per round.

use crate::error::VmmError;
use crate::mem::{GuestAddress, GuestMemoryMap, PageSize};
use crate::pages::PageSet;

/// A running VM that can be migrated away.
pub trait SourceVm: Send {
    /// The guest memory, with the page size the dirty log tracks.
    fn memory(&self) -> &GuestMemoryMap;

    /// Starts dirty logging (before round 0, which sends everything).
    fn start_dirty_log(&mut self) -> Result<(), VmmError>;

    /// Adds every page written since the last call (or since `start_dirty_log`) to `into`,
    /// and clears the log.
    fn fetch_and_clear_dirty(&mut self, into: &mut PageSet) -> Result<(), VmmError>;

    /// Stops dirty logging (after a migration ends either way). Default: nothing.
    fn stop_dirty_log(&mut self) -> Result<(), VmmError> {
        Ok(())
    }

    /// Pauses the guest: on return no vCPU or device writes guest memory.
    fn pause(&mut self) -> Result<(), VmmError>;

    /// Resumes the guest after a pause (used when a migration fails after switchover began).
    fn resume(&mut self) -> Result<(), VmmError>;

    /// Saves the device state (vCPUs, devices) of the paused guest as an opaque blob.
    fn save_state(&mut self) -> Result<Vec<u8>, VmmError>;

    /// Throttles the running guest so that it dirties memory more slowly, for pre-copy rounds
    /// that stop shrinking (QEMU's `auto-converge`): whatever runs the guest sleeps `percent` %
    /// of each time slice (QEMU's `cpu-throttle`), so the guest's dirty rate falls to about
    /// `100 - percent` % of what it was. 0 removes the throttle; a value above
    /// [`MAX_THROTTLE_PERCENT`] is refused ([`check_throttle`]). The throttle stays set across
    /// pause and resume until changed. Default: an error saying this VMM cannot throttle.
    fn throttle(&mut self, percent: u8) -> Result<(), VmmError> {
        Err(format!("throttling not supported by this VMM (asked for {percent}%)").into())
    }

    /// What kind of VM this is and which device-state version it saves, announced to the
    /// destination before any memory moves, so that it builds the right kind of VM or refuses
    /// at once. Default: [`VmDescriptor::unknown`].
    fn descriptor(&self) -> VmDescriptor {
        VmDescriptor::unknown()
    }

    /// How the transport learns which pages the guest wrote. Default: [`DirtyLog::Vm`].
    fn dirty_log(&self) -> DirtyLog {
        DirtyLog::Vm
    }
}

/// Who finds the pages a running guest wrote between rounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyLog {
    /// The VM's own dirty log: [`SourceVm::fetch_and_clear_dirty`] reports every page written.
    #[default]
    Vm,
    /// The VM has none: the transport compares a hash of every page with what the destination
    /// reports it holds (it needs a destination that offers it, and pre-copy mode).
    /// `start_dirty_log` and `fetch_and_clear_dirty` are still called, the fetch right after
    /// the comparison, and may add pages of their own.
    Content,
}

/// The kind of a VM and its device-state version, as the source announces them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmDescriptor {
    /// The VMM's name for the kind (`synthetic`, `kvm`, `qemu`, or a VMM's own): at most
    /// [`VmDescriptor::MAX_KIND`] bytes of `[a-z0-9._-]`; empty when unknown.
    pub kind: String,
    /// The version of the device-state format [`SourceVm::save_state`] writes.
    pub state_version: u32,
}

impl VmDescriptor {
    /// Longest kind name.
    pub const MAX_KIND: usize = 32;

    /// A descriptor of `kind` whose device state has format version `state_version`.
    pub fn new(kind: &str, state_version: u32) -> VmDescriptor {
        VmDescriptor {
            kind: kind.to_string(),
            state_version,
        }
    }

    /// Nothing announced (a VMM that does not say, or a source that predates descriptors).
    pub fn unknown() -> VmDescriptor {
        VmDescriptor::default()
    }

    /// True if the kind is a valid name (see [`VmDescriptor::kind`]).
    pub fn kind_is_valid(kind: &str) -> bool {
        kind.len() <= Self::MAX_KIND
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    }

    /// For a factory that builds `kind` VMs reading device-state versions `versions`: an
    /// error saying what the source runs when it announced another kind or version. A layout
    /// without a descriptor passes (the source did not say).
    pub fn check(
        layout: &MemoryLayout,
        kind: &str,
        versions: std::ops::RangeInclusive<u32>,
    ) -> Result<(), VmmError> {
        let Some(d) = &layout.vm else {
            return Ok(());
        };
        if d.kind.is_empty() {
            return Ok(());
        }
        if d.kind != kind {
            return Err(format!(
                "the source migrates a {} VM and this destination builds {kind} VMs (start it for a {} VM)",
                d.kind, d.kind
            )
            .into());
        }
        if !versions.contains(&d.state_version) {
            return Err(format!(
                "the source's {kind} device state is version {}, this destination reads versions {}..={}",
                d.state_version,
                versions.start(),
                versions.end()
            )
            .into());
        }
        Ok(())
    }
}

/// The largest throttle [`SourceVm::throttle`] accepts: at 100 % the guest would not run.
pub const MAX_THROTTLE_PERCENT: u8 = 99;

/// Checks a throttle for [`SourceVm::throttle`] implementations: refuses more than
/// [`MAX_THROTTLE_PERCENT`].
pub fn check_throttle(percent: u8) -> Result<(), VmmError> {
    if percent > MAX_THROTTLE_PERCENT {
        return Err(format!(
            "throttle of {percent}% refused: at most {MAX_THROTTLE_PERCENT}% (0 removes it)"
        )
        .into());
    }
    Ok(())
}

/// How long a guest throttled by `percent` % sleeps after running for `ran`: the sleep is
/// `percent` % of the slice that `ran` and the sleep make up together (QEMU's cpu-throttle
/// formula, `ran * percent / (100 - percent)`). Zero for 0 and for values above
/// [`MAX_THROTTLE_PERCENT`] (which [`check_throttle`] refuses).
pub fn throttle_sleep(ran: std::time::Duration, percent: u8) -> std::time::Duration {
    if percent == 0 || percent > MAX_THROTTLE_PERCENT {
        return std::time::Duration::ZERO;
    }
    ran * u32::from(percent) / u32::from(100 - percent)
}

/// The VM being built on the destination.
pub trait DestinationVm: Send {
    /// The guest memory the transport writes into.
    fn memory(&self) -> &GuestMemoryMap;

    /// Restores the device state saved by the source.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmmError>;

    /// Starts the guest.
    fn resume(&mut self) -> Result<(), VmmError>;

    /// Pauses the guest after it was resumed (post-copy lost its source): on return no vCPU
    /// makes progress, except threads blocked on a missing page, which stay blocked. Default:
    /// an error saying the VMM cannot.
    fn pause(&mut self) -> Result<(), VmmError> {
        Err("this VMM cannot pause a destination guest".into())
    }

    /// True if every page of [`DestinationVm::memory`] reads zero until the migration writes
    /// it (fresh anonymous or memfd memory that nothing loaded firmware or images into). Zero
    /// pages the source announces are then left untouched where this end wrote nothing, so
    /// they cost no memory; without the promise (the default) each is checked, and zeroed if
    /// it is not.
    fn memory_starts_zero(&self) -> bool {
        false
    }

    /// The concrete VM, for the VMM that built it (after `session::accept` hands it back).
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}

/// The memory layout announced by the source, and the VM it announced.
///
/// Two layouts are equal when they describe the same memory (page size and regions); the VM
/// descriptor is not compared.
#[derive(Clone, Debug)]
pub struct MemoryLayout {
    /// Page size.
    pub page_size: PageSize,
    /// Regions in table order: guest physical address and length.
    pub regions: Vec<(GuestAddress, u64)>,
    /// The VM the source announced (`None`: it did not, or this layout was not received).
    pub vm: Option<VmDescriptor>,
}

impl PartialEq for MemoryLayout {
    fn eq(&self, other: &Self) -> bool {
        self.page_size == other.page_size && self.regions == other.regions
    }
}

impl Eq for MemoryLayout {}

impl MemoryLayout {
    /// The layout of an existing memory map.
    pub fn of(map: &GuestMemoryMap) -> MemoryLayout {
        MemoryLayout {
            page_size: map.page_size(),
            regions: map.regions().iter().map(|r| (r.gpa(), r.len())).collect(),
            vm: None,
        }
    }

    /// Total bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }
}

/// Builds the destination VM for a layout; called once the source is authenticated.
pub type DestinationFactory<'a> =
    Box<dyn FnOnce(&MemoryLayout) -> Result<Box<dyn DestinationVm>, VmmError> + Send + 'a>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn throttle_checks_and_sleeps() {
        assert!(check_throttle(0).is_ok());
        assert!(check_throttle(99).is_ok());
        let e = check_throttle(100).unwrap_err().to_string();
        assert!(e.contains("at most 99%"), "{e}");
        let ms = Duration::from_millis;
        assert_eq!(throttle_sleep(ms(10), 0), Duration::ZERO);
        assert_eq!(throttle_sleep(ms(10), 50), ms(10));
        assert_eq!(throttle_sleep(ms(10), 90), ms(90));
        assert_eq!(throttle_sleep(ms(10), 99), ms(990));
        assert_eq!(throttle_sleep(ms(10), 100), Duration::ZERO);
    }

    #[test]
    fn descriptors_are_checked_by_kind_and_version() {
        let mut l = MemoryLayout {
            page_size: PageSize::KIB4,
            regions: vec![(GuestAddress(0), 1 << 20)],
            vm: None,
        };
        assert!(
            VmDescriptor::check(&l, "kvm", 1..=2).is_ok(),
            "no descriptor: passes"
        );
        l.vm = Some(VmDescriptor::unknown());
        assert!(
            VmDescriptor::check(&l, "kvm", 1..=2).is_ok(),
            "unnamed: passes"
        );
        l.vm = Some(VmDescriptor::new("synthetic", 3));
        let e = VmDescriptor::check(&l, "kvm", 1..=2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("migrates a synthetic VM") && e.contains("builds kvm VMs"),
            "{e}"
        );
        l.vm = Some(VmDescriptor::new("kvm", 9));
        let e = VmDescriptor::check(&l, "kvm", 1..=2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 9"), "{e}");
        l.vm = Some(VmDescriptor::new("kvm", 2));
        assert!(VmDescriptor::check(&l, "kvm", 1..=2).is_ok());
        assert!(
            l == MemoryLayout {
                vm: None,
                ..l.clone()
            },
            "equal memory, equal layouts"
        );
        assert!(VmDescriptor::kind_is_valid("cloud-hypervisor_1.0"));
        assert!(
            !VmDescriptor::kind_is_valid("Bad Kind")
                && !VmDescriptor::kind_is_valid(&"x".repeat(33))
        );
    }
}
