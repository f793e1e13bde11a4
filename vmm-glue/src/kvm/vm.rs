//! [`KvmVm`]: a KVM VM with its memory in dirty-logged slots and one vCPU running the guest
//! program: building it, loading the guest, asking the guest to check itself.

use std::time::Duration;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use rdmig_transport::mem::{
    GuestAddress, GuestMemoryMap, MmapBacking, MmapRegion, PageIndex, PageSize, RegionId,
};
use rdmig_transport::pages::PageSet;
use rdmig_transport::vm::MemoryLayout;

use super::control::{
    page_value, GuestParams, CODE_GPA, GDT_GPA, GUEST_PAGE, MAX_MEM_BYTES, PARAMS_GPA, TSS_GPA,
};
use super::guest::{gdt_bytes, initial_regs, setup_sregs, GUEST_CODE};
use super::pacer::Pacer;
use super::state::{encode_vcpus, DeviceState};
use super::vcpu::{GuestProgress, VcpuHandle};
use super::{KvmConfig, KvmDestConfig};
use crate::error::{Error, Result};
use crate::GuestCheck;

/// Most memory slots (regions) a destination accepts.
const MAX_SLOTS: usize = 8;
/// Longest a self-check may take (a 3 GiB guest scans in well under this).
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// A KVM guest running the rdmig test program. Fields drop in order: the vCPU thread is
/// stopped before the VM fd closes, and the VM before its memory is unmapped.
pub struct KvmVm {
    pub(super) vcpu: VcpuHandle,
    pub(super) vm: VmFd,
    pub(super) map: GuestMemoryMap,
    /// Keeps the guest memory mapped (the map and KVM's slots point into it).
    _regions: Vec<MmapRegion>,
    pub(super) vmm_dirty: PageSet,
    pub(super) params: Option<GuestParams>,
    pub(super) paused: bool,
    pub(super) last_state: Option<Vec<u8>>,
    pub(super) rate_override: Option<u64>,
}

impl KvmVm {
    /// Creates the VM, loads and fills the guest, and starts it running.
    pub fn start(cfg: &KvmConfig) -> Result<KvmVm> {
        cfg.validate()?;
        let params = GuestParams::for_populated(cfg.mem_bytes, cfg.working_set, cfg.populated)
            .map_err(Error::InvalidConfig)?;
        let layout = MemoryLayout {
            page_size: cfg.page_size,
            regions: vec![(GuestAddress(0), cfg.mem_bytes)],
            vm: None,
        };
        let mut vm = KvmVm::build(
            &layout,
            Pacer::new(cfg.dirty_rate, params.ws_pages),
            backing(cfg.memfd),
            cfg.populated.is_none(),
        )?;
        vm.load_guest(&params)?;
        vm.params = Some(params);
        vm.vcpu.with_pacer(|p| p.set_ws_pages(params.ws_pages));
        vm.vcpu.resume()?;
        vm.paused = false;
        Ok(vm)
    }

    /// Builds the destination VM for `layout`: empty memory, a parked vCPU.
    pub fn destination(layout: &MemoryLayout, cfg: &KvmDestConfig) -> Result<KvmVm> {
        super::check_descriptor(layout)?;
        if layout.regions.is_empty() || layout.regions.len() > MAX_SLOTS {
            return Err(Error::InvalidConfig(format!(
                "{} memory regions, this VMM takes 1..={MAX_SLOTS}",
                layout.regions.len()
            )));
        }
        let end = layout
            .regions
            .iter()
            .map(|r| r.0 .0.saturating_add(r.1))
            .max()
            .unwrap_or(0);
        if end > MAX_MEM_BYTES {
            return Err(Error::InvalidConfig(format!(
                "guest memory reaches {end:#x}, past this VMM's {MAX_MEM_BYTES:#x}"
            )));
        }
        // Unless preallocated, the migration faults in only the pages it lands data in, and
        // the zero pages it is told of stay untouched.
        let mut vm = KvmVm::build(
            layout,
            Pacer::new(cfg.dirty_rate.unwrap_or(0), 0),
            backing(cfg.memfd),
            cfg.prealloc,
        )?;
        vm.rate_override = cfg.dirty_rate;
        Ok(vm)
    }

    fn build(
        layout: &MemoryLayout,
        pacer: Pacer,
        backing: MmapBacking,
        populate: bool,
    ) -> Result<KvmVm> {
        // SAFETY: sysconf with a valid name has no preconditions.
        let host_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if host_page != GUEST_PAGE as libc::c_long {
            return Err(Error::KvmUnavailable(format!(
                "host page size is {host_page}, this VMM needs 4096"
            )));
        }
        let kvm =
            Kvm::new().map_err(|e| Error::KvmUnavailable(format!("opening /dev/kvm: {e}")))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if let Err(e) = vm.set_tss_address(TSS_GPA) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e} (not needed for a protected-mode guest)");
        }
        let mut regions = Vec::with_capacity(layout.regions.len());
        let mut guest_regions = Vec::with_capacity(layout.regions.len());
        for (slot, &(gpa, len)) in layout.regions.iter().enumerate() {
            if gpa.0 % GUEST_PAGE != 0 || len % GUEST_PAGE != 0 {
                return Err(Error::InvalidConfig(format!(
                    "region at {:#x} of {len} bytes is not 4 KiB aligned",
                    gpa.0
                )));
            }
            // A fully written source is populated up front: filling 1 GiB costs ~2 s of page
            // faults otherwise, against ~0.3 s for MAP_POPULATE. A memfd is
            // mapped shared, which KVM slots accept like private memory (KVM faults the pages
            // in through the mapping, and its MMU notifier follows MADV_DONTNEED on it).
            let mem = MmapRegion::new(len, backing, populate).map_err(Error::Memory)?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: gpa.0,
                memory_size: len,
                userspace_addr: mem.as_ptr() as u64,
            };
            // It lives in `regions` until after the VM fd is closed (field order of KvmVm), and
            // does not overlap another slot (the memory map rejects overlapping layouts).
            // SAFETY: the mapping is `len` bytes.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            // SAFETY: `mem` is kept in `regions` for as long as the map is used (KvmVm owns both).
            guest_regions.push(unsafe { mem.guest_region(gpa) });
            regions.push(mem);
        }
        let map = GuestMemoryMap::new(guest_regions, layout.page_size).map_err(Error::Memory)?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        match kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
            Ok(cpuid) => {
                if let Err(e) = vcpu.set_cpuid2(&cpuid) {
                    tracing::debug!("KVM_SET_CPUID2: {e}");
                }
            }
            Err(e) => tracing::debug!("KVM_GET_SUPPORTED_CPUID: {e}"),
        }
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        setup_sregs(&mut sregs);
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&initial_regs())
            .map_err(kvm_err("KVM_SET_REGS"))?;
        let vmm_dirty = PageSet::empty(&map);
        let vcpu = VcpuHandle::spawn(vcpu, pacer)?;
        Ok(KvmVm {
            vcpu,
            vm,
            map,
            _regions: regions,
            vmm_dirty,
            params: None,
            paused: true,
            last_state: None,
            rate_override: None,
        })
    }

    /// Host pointer of `len` bytes at `gpa`, if they lie inside one region.
    fn host_range(&self, gpa: u64, len: u64) -> Result<*mut u8> {
        for r in self.map.regions() {
            if gpa >= r.gpa().0
                && gpa
                    .checked_add(len)
                    .is_some_and(|end| end <= r.gpa().0 + r.len())
            {
                // SAFETY: the offset is inside the region's mapping, checked just above.
                return Ok(unsafe { r.host_ptr().add((gpa - r.gpa().0) as usize) });
            }
        }
        Err(Error::Guest(format!(
            "guest range {gpa:#x}+{len} is not in guest memory"
        )))
    }

    /// Copies `bytes` into guest memory at `gpa` and records the pages as dirty (the VMM's own
    /// writes are part of the dirty log).
    fn write_guest(&mut self, gpa: u64, bytes: &[u8]) -> Result<()> {
        let dst = self.host_range(gpa, bytes.len() as u64)?;
        // `bytes` is a separate Rust allocation, so the ranges do not overlap.
        // SAFETY: `dst` has room for `bytes.len()` bytes (host_range).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
        self.mark_dirty(gpa, bytes.len() as u64);
        Ok(())
    }

    fn mark_dirty(&mut self, gpa: u64, len: u64) {
        let shift = self.map.page_size().shift();
        for (i, r) in self.map.regions().iter().enumerate() {
            let (start, end) = (gpa.max(r.gpa().0), (gpa + len).min(r.gpa().0 + r.len()));
            if start < end {
                for p in ((start - r.gpa().0) >> shift)..=((end - 1 - r.gpa().0) >> shift) {
                    self.vmm_dirty.insert(RegionId(i as u32), PageIndex(p));
                }
            }
        }
    }

    /// Writes the GDT, program, parameters and the initial content of every data page.
    fn load_guest(&mut self, p: &GuestParams) -> Result<()> {
        self.write_guest(GDT_GPA, &gdt_bytes())?;
        self.write_guest(CODE_GPA, &GUEST_CODE)?;
        self.write_guest(PARAMS_GPA, &p.encode())?;
        // The generation table starts all zero, which fresh memory (anonymous or memfd) is.
        self.mark_dirty(u64::from(p.gen_base), u64::from(p.data_pages) * 4);
        let bytes = u64::from(p.data_pages) * GUEST_PAGE;
        let base = self.host_range(u64::from(p.data_base), bytes)?;
        for i in 0..p.data_pages {
            // The vCPU is parked, so nothing else accesses guest memory while this slice exists;
            // the mapping is page aligned, so u32 alignment holds.
            // SAFETY: page i lies inside the data area checked by host_range.
            let page = unsafe {
                std::slice::from_raw_parts_mut(
                    base.add(i as usize * GUEST_PAGE as usize).cast::<u32>(),
                    1024,
                )
            };
            page.fill(page_value(i, 0));
        }
        self.mark_dirty(u64::from(p.data_base), bytes);
        Ok(())
    }

    /// Reads and checks the parameter page (on the destination, after memory arrived).
    pub(super) fn read_params(&self) -> Result<GuestParams> {
        let src = self.host_range(PARAMS_GPA, GuestParams::BYTES as u64)?;
        let mut b = [0u8; GuestParams::BYTES];
        // SAFETY: `src` has GuestParams::BYTES readable bytes (host_range); `b` is ours.
        unsafe { std::ptr::copy_nonoverlapping(src, b.as_mut_ptr(), b.len()) };
        GuestParams::decode(&b, self.map.total_bytes()).map_err(Error::Guest)
    }

    /// Asks the running guest to verify every data page against its generation counter.
    pub fn self_check(&mut self) -> Result<GuestCheck> {
        let params = self
            .params
            .ok_or_else(|| Error::Guest("the guest has not started".into()))?;
        let r = self.vcpu.self_check(CHECK_TIMEOUT)?;
        Ok(GuestCheck {
            pages_checked: u64::from(r.checked),
            pages_skipped: 0,
            pages_bad: u64::from(r.bad),
            first_bad: r
                .first_bad
                .map(|i| u64::from(params.data_base) / GUEST_PAGE + u64::from(i)),
        })
    }

    /// xxh3-128 of the vCPU registers as last saved (source, at switchover) or restored
    /// (destination, read back from KVM after loading them); `None` before either.
    pub fn vcpu_state_digest(&self) -> Option<u128> {
        let blob = self.last_state.as_deref()?;
        let state = DeviceState::decode(blob).ok()?;
        Some(xxhash_rust::xxh3::xxh3_128(&encode_vcpus(&state.vcpus)))
    }

    /// Pages the guest has been handed to dirty since it first started (on any host).
    pub fn pages_dirtied(&self) -> u64 {
        self.vcpu.with_pacer(|p| p.total())
    }

    /// The guest's parameters (working set, data pages), once known.
    pub fn params(&self) -> Option<GuestParams> {
        self.params
    }

    /// True while the vCPU is paused (or, on the destination, a pause is pending: see
    /// [`KvmVm::vcpu_parked`]).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// True while the vCPU thread is parked outside `KVM_RUN` (its registers can be saved).
    /// After a destination pause this is false only while the vCPU is still blocked on a
    /// missing post-copy page.
    pub fn vcpu_parked(&self) -> bool {
        self.vcpu.is_parked()
    }

    /// A handle that watches the guest from another thread (e.g. while `session::accept` owns
    /// the VM): whether it runs and how many pages it has been handed to dirty.
    pub fn progress(&self) -> GuestProgress {
        self.vcpu.progress()
    }

    /// Stops the guest and releases the VM (errors are logged).
    pub fn stop(self) {
        let KvmVm { vcpu, .. } = self;
        if let Err(e) = vcpu.stop() {
            tracing::warn!("stopping the KVM guest: {e}");
        }
    }
}

/// What backs guest memory: a memfd mapped shared, or private anonymous memory.
fn backing(memfd: bool) -> MmapBacking {
    if memfd {
        MmapBacking::Memfd
    } else {
        MmapBacking::Anonymous
    }
}

/// The page size a [`KvmConfig`] asks for must be at least KVM's 4 KiB.
pub(super) fn check_page_size(p: PageSize) -> Result<()> {
    if p.bytes() < GUEST_PAGE {
        return Err(Error::InvalidConfig(format!(
            "page size {} is below KVM's 4096",
            p.bytes()
        )));
    }
    Ok(())
}
