//! The synthetic VM itself: memory, writers, and both sides of the migration seam.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rdmig_transport::mem::{
    GuestAddress, GuestMemoryMap, MmapBacking, MmapRegion, PageSize, RegionId,
};
use rdmig_transport::pages::PageSet;
use rdmig_transport::vm::{
    check_throttle, DestinationFactory, DestinationVm, MemoryLayout, SourceVm, VmDescriptor,
};
use rdmig_transport::VmmError;

use super::content::fill_page;
use super::state::{self, StateHeader};
use super::writer::{writer, Ctl, RegionInfo, Shared};
use crate::error::{Error, Result};
use crate::GuestCheck;

/// How to build a synthetic VM.
#[derive(Clone, Debug)]
pub struct SyntheticConfig {
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// Bytes at the start of guest memory the writers dirty.
    pub working_set: u64,
    /// Bytes per second the writers dirty (0 = an idle guest).
    pub dirty_rate: u64,
    /// Page size of the dirty log and the content scheme.
    pub page_size: PageSize,
    /// Memory regions to split guest memory into (with gaps between them).
    pub regions: u32,
    /// Writer threads (when `dirty_rate` > 0).
    pub writers: u32,
    /// Back guest memory with memfds mapped shared (post-copy then installs pages in place,
    /// zero-copy) instead of private anonymous memory.
    pub memfd: bool,
    /// Bytes at the start of guest memory written when the VM starts (`None`: all of it). The
    /// rest stays zero and untouched, as in a freshly booted guest.
    pub populated: Option<u64>,
    /// Percent (0..=100) of the writers' writes that write a zero page (a guest freeing and
    /// zeroing memory).
    pub zero_share: u8,
    /// A destination allocates all of its memory before the migration (QEMU's
    /// `-mem-prealloc`): no page allocation during the transfer, at the cost of memory for
    /// every page, zero or not. Off: only the pages that receive data are ever allocated.
    pub prealloc: bool,
}

impl SyntheticConfig {
    /// A VM of `mem_bytes`, idle, one region, 4 KiB pages, one writer.
    pub fn new(mem_bytes: u64) -> SyntheticConfig {
        SyntheticConfig {
            mem_bytes,
            working_set: 0,
            dirty_rate: 0,
            page_size: PageSize::KIB4,
            regions: 1,
            writers: 1,
            memfd: false,
            populated: None,
            zero_share: 0,
            prealloc: false,
        }
    }

    /// Sets whether a destination allocates its memory up front (see
    /// [`SyntheticConfig::prealloc`]).
    pub fn with_prealloc(mut self, on: bool) -> Self {
        self.prealloc = on;
        self
    }

    /// Sets how much memory the guest wrote at start (see [`SyntheticConfig::populated`]).
    pub fn with_populated(mut self, bytes: Option<u64>) -> Self {
        self.populated = bytes;
        self
    }

    /// Sets the share of writes that write zero pages (see [`SyntheticConfig::zero_share`]).
    pub fn with_zero_share(mut self, percent: u8) -> Self {
        self.zero_share = percent;
        self
    }

    /// Pages written at start, for `pages` pages of memory.
    fn populated_pages(&self, pages: u64) -> u64 {
        self.populated
            .map_or(pages, |b| (b / self.page_size.bytes()).min(pages))
    }

    /// Backs guest memory with memfds (see [`SyntheticConfig::memfd`]).
    pub fn with_memfd(mut self, memfd: bool) -> Self {
        self.memfd = memfd;
        self
    }

    /// Sets the working set and dirty rate.
    pub fn with_dirtying(mut self, working_set: u64, dirty_rate: u64) -> Self {
        self.working_set = working_set;
        self.dirty_rate = dirty_rate;
        self
    }

    /// Sets the page size.
    pub fn with_page_size(mut self, p: PageSize) -> Self {
        self.page_size = p;
        self
    }

    /// Sets the number of regions.
    pub fn with_regions(mut self, n: u32) -> Self {
        self.regions = n;
        self
    }

    /// The region layout this config produces: `regions` pieces, 1 MiB-aligned gaps between.
    fn layout(&self) -> Result<MemoryLayout> {
        let page = self.page_size.bytes();
        if self.mem_bytes < page || !self.mem_bytes.is_multiple_of(page) {
            return Err(Error::InvalidConfig(format!(
                "memory size {} is not a positive multiple of the {page} byte page",
                self.mem_bytes
            )));
        }
        let pages = self.mem_bytes / page;
        let n = u64::from(self.regions.max(1)).min(pages);
        let mut regions = Vec::new();
        let mut gpa = 0u64;
        for i in 0..n {
            let len = (pages / n + u64::from(i < pages % n)) * page;
            regions.push((GuestAddress(gpa), len));
            gpa = (gpa + len + (1 << 20)).next_multiple_of(page.max(1 << 20));
        }
        Ok(MemoryLayout {
            page_size: self.page_size,
            regions,
            vm: None,
        })
    }
}

/// A synthetic VM (source or destination).
pub struct SyntheticVm {
    cfg: SyntheticConfig,
    _mem: Vec<MmapRegion>,
    map: GuestMemoryMap,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for SyntheticVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticVm")
            .field("cfg", &self.cfg)
            .field("running", &self.running())
            .finish()
    }
}

impl SyntheticVm {
    /// Builds a source VM: memory filled with generation-0 content, writers running.
    pub fn start(cfg: &SyntheticConfig) -> Result<SyntheticVm> {
        let layout = cfg.layout()?;
        if cfg.zero_share > 100 {
            return Err(Error::InvalidConfig(format!(
                "a zero-page share of {} %: at most 100",
                cfg.zero_share
            )));
        }
        let pages = layout.total_bytes() / layout.page_size.bytes();
        let populated = cfg.populated_pages(pages);
        // A fully populated guest is faulted in up front (cheaper than page by page); a sparse
        // one writes only its populated prefix, the rest never touched.
        let mut vm = Self::build(cfg, &layout, populated == pages)?;
        vm.shared.populated.store(populated, Ordering::Relaxed);
        vm.shared
            .zero_share
            .store(u64::from(cfg.zero_share), Ordering::Relaxed);
        for p in 0..populated {
            let (_, _, ptr) = vm.shared.locate(p);
            // SAFETY: ptr is a page of our own guest memory; no writer runs yet.
            unsafe { fill_page(ptr, vm.shared.page as usize, p, 0) };
        }
        vm.start_writers()?;
        Ok(vm)
    }

    fn build(cfg: &SyntheticConfig, layout: &MemoryLayout, populate: bool) -> Result<SyntheticVm> {
        let page = layout.page_size.bytes();
        let total: u64 = layout.total_bytes();
        if cfg.dirty_rate > 0 && (cfg.working_set < page || cfg.working_set > total) {
            return Err(Error::InvalidConfig(format!(
                "working set of {} bytes must be between one page and the {total} bytes of memory",
                cfg.working_set
            )));
        }
        let mut mem = Vec::new();
        let mut regions = Vec::new();
        let mut infos = Vec::new();
        let mut first = 0u64;
        for &(gpa, len) in &layout.regions {
            if len % page != 0 {
                return Err(Error::InvalidConfig(format!(
                    "region of {len} bytes is not a multiple of the page size"
                )));
            }
            let backing = if cfg.memfd {
                MmapBacking::Memfd
            } else {
                MmapBacking::Anonymous
            };
            let m = MmapRegion::new(len, backing, populate).map_err(Error::Memory)?;
            // The VM outlives any session it is handed to (the session borrows it).
            // SAFETY: `m` is kept in `_mem` for the VM's lifetime.
            regions.push(unsafe { m.guest_region(gpa) });
            let pages = len / page;
            infos.push(RegionInfo {
                ptr: m.as_ptr(),
                pages,
                first,
            });
            first += pages;
            mem.push(m);
        }
        let map = GuestMemoryMap::new(regions, layout.page_size).map_err(Error::Memory)?;
        let writers = if cfg.dirty_rate > 0 {
            cfg.writers.max(1)
        } else {
            0
        };
        let shared = Arc::new(Shared {
            dirty: infos
                .iter()
                .map(|r| {
                    (0..r.pages.div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
            regions: infos,
            page,
            gens: (0..first).map(|_| AtomicU64::new(0)).collect(),
            span: AtomicU64::new(0),
            written: AtomicU64::new(0),
            pause_req: AtomicBool::new(false),
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            working_set_pages: (cfg.working_set / page).max(1),
            rate: cfg.dirty_rate as f64 / page as f64 / f64::from(writers.max(1)),
            populated: AtomicU64::new(first),
            zero_share: AtomicU64::new(0),
            throttle: AtomicU8::new(0),
        });
        Ok(SyntheticVm {
            cfg: cfg.clone(),
            _mem: mem,
            map,
            shared,
            threads: Vec::new(),
        })
    }

    fn start_writers(&mut self) -> Result<()> {
        if self.cfg.dirty_rate == 0 || !self.threads.is_empty() {
            return Ok(());
        }
        {
            let mut c = self.shared.lock();
            c.paused = false;
            c.stop = false;
        }
        self.shared.pause_req.store(false, Ordering::Release);
        self.shared
            .span
            .fetch_max(self.shared.working_set_pages, Ordering::AcqRel);
        for i in 0..self.cfg.writers.max(1) {
            let shared = self.shared.clone();
            let seed =
                0x1234_5678_9abc_def1u64.wrapping_mul(u64::from(i) + 1) ^ std::process::id() as u64;
            let h = std::thread::Builder::new()
                .name(format!("synthetic-writer-{i}"))
                .spawn(move || writer(&shared, seed))
                .map_err(|e| Error::Thread(format!("spawning a writer: {e}")))?;
            self.threads.push(h);
        }
        Ok(())
    }

    /// True while writer threads exist and are not paused.
    pub fn running(&self) -> bool {
        !self.threads.is_empty() && !self.shared.lock().paused
    }

    /// Pages the guest has written (carried across a migration).
    pub fn pages_written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Checks every page against its generation (safe while the writers run).
    pub fn verify(&self) -> GuestCheck {
        self.shared.verify()
    }

    /// The guest memory.
    pub fn memory_map(&self) -> &GuestMemoryMap {
        &self.map
    }

    /// The configuration.
    pub fn config(&self) -> &SyntheticConfig {
        &self.cfg
    }

    fn pause_writers(&mut self) {
        self.shared.pause_req.store(true, Ordering::SeqCst);
        let mut c = self.shared.lock();
        c.paused = true;
        self.shared.cv.notify_all();
        while c.parked < self.threads.len() {
            c = self.shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Pauses the writers, waiting at most `timeout` for them to park; returns how many did
    /// not (blocked on a missing post-copy page: they stay blocked until it is resolved or
    /// the userfaultfd is closed, and park right after).
    fn pause_writers_within(&mut self, timeout: std::time::Duration) -> usize {
        self.shared.pause_req.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + timeout;
        let mut c = self.shared.lock();
        c.paused = true;
        self.shared.cv.notify_all();
        while c.parked < self.threads.len() {
            let now = std::time::Instant::now();
            if now >= deadline {
                return self.threads.len() - c.parked;
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        0
    }

    fn resume_writers(&mut self) {
        let mut c = self.shared.lock();
        c.paused = false;
        self.shared.pause_req.store(false, Ordering::Release);
        self.shared.cv.notify_all();
    }

    /// Stops the writers for good.
    pub fn stop(&mut self) {
        {
            let mut c = self.shared.lock();
            c.stop = true;
            self.shared.pause_req.store(true, Ordering::Release);
            self.shared.cv.notify_all();
        }
        for h in self.threads.drain(..) {
            if h.join().is_err() {
                tracing::warn!("a synthetic writer panicked");
            }
        }
    }

    /// The device state: the writer counters and the generations of pages `0..span` (the
    /// writers are paused, so none is mid-write).
    fn save(&self) -> Vec<u8> {
        let span = self.shared.span.load(Ordering::Acquire);
        let h = StateHeader {
            page_size: self.shared.page,
            pages_written: self.pages_written(),
            pages: self.shared.gens.len() as u64,
            span,
            populated: self.shared.populated.load(Ordering::Relaxed),
            zero_share: self.shared.zero_share.load(Ordering::Relaxed),
        };
        let gens = self.shared.gens[..span as usize]
            .iter()
            .map(|g| g.load(Ordering::Acquire));
        state::encode(&h, gens)
    }
}

impl Drop for SyntheticVm {
    fn drop(&mut self) {
        self.stop();
    }
}

impl SourceVm for SyntheticVm {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }

    fn descriptor(&self) -> VmDescriptor {
        VmDescriptor::new(KIND, super::state::VERSION)
    }

    fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        for w in self.shared.dirty.iter().flatten() {
            w.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    fn fetch_and_clear_dirty(&mut self, into: &mut PageSet) -> Result<(), VmmError> {
        let mut words = Vec::new();
        for (r, bm) in self.shared.dirty.iter().enumerate() {
            words.clear();
            words.extend(bm.iter().map(|w| w.swap(0, Ordering::Acquire)));
            into.or_words(RegionId(r as u32), &words);
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        self.pause_writers();
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        self.resume_writers();
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
        Ok(self.save())
    }

    /// The writers sleep `percent` % of each time slice (see the writer module).
    fn throttle(&mut self, percent: u8) -> Result<(), VmmError> {
        check_throttle(percent)?;
        self.shared.set_throttle(percent);
        Ok(())
    }
}

impl DestinationVm for SyntheticVm {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmmError> {
        let (h, gens) = state::decode(state, self.shared.gens.len() as u64)?;
        if h.page_size != self.shared.page {
            return Err(Error::State(format!(
                "state for {} byte pages, VM has {}",
                h.page_size, self.shared.page
            ))
            .into());
        }
        // Pages past both spans are at 0 already.
        let old = self.shared.span.load(Ordering::Acquire);
        for g in &self.shared.gens[h.span as usize..old.max(h.span) as usize] {
            g.store(0, Ordering::Relaxed);
        }
        for (slot, g) in self.shared.gens.iter().zip(gens) {
            slot.store(g, Ordering::Release);
        }
        self.shared.span.store(h.span, Ordering::Release);
        self.shared
            .written
            .store(h.pages_written, Ordering::Relaxed);
        self.shared.populated.store(h.populated, Ordering::Relaxed);
        self.shared
            .zero_share
            .store(h.zero_share, Ordering::Relaxed);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        self.start_writers()?;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        let stuck = self.pause_writers_within(std::time::Duration::from_millis(500));
        if stuck > 0 {
            tracing::warn!(
                "{stuck} synthetic writers are blocked on missing pages; they stay stopped"
            );
        }
        Ok(())
    }

    fn memory_starts_zero(&self) -> bool {
        // Fresh mappings, never written before the migration (preallocating faults zero pages
        // in, and without it pages the source announces as zero cost no memory here).
        true
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

impl SyntheticVm {
    /// Builds an empty destination VM ahead of an incoming migration, as a VMM started for an
    /// incoming migration allocates guest memory from its own configuration before the source
    /// connects. Pass it to [`synthetic_destination_factory`].
    pub fn prepare_destination(cfg: &SyntheticConfig) -> Result<SyntheticVm> {
        Self::build(cfg, &cfg.layout()?, cfg.prealloc)
    }
}

/// The synthetic VM's kind, as its source announces it.
pub const KIND: &str = "synthetic";

/// A factory that hands over `prepared` if its layout is the announced one, and otherwise
/// builds a synthetic destination VM for the announced layout; its writers (rate and working
/// set from `cfg`) start when the migration resumes it. A source that announces another kind
/// of VM, or another device-state version, is refused before any memory moves.
pub fn synthetic_destination_factory(
    cfg: SyntheticConfig,
    prepared: Option<SyntheticVm>,
) -> DestinationFactory<'static> {
    Box::new(move |layout: &MemoryLayout| {
        VmDescriptor::check(layout, KIND, super::state::VERSION..=super::state::VERSION)?;
        if let Some(vm) = prepared {
            if MemoryLayout::of(&vm.map) == *layout {
                return Ok(Box::new(vm) as Box<dyn DestinationVm>);
            }
            tracing::info!("the incoming layout differs from the prepared VM; building a new one");
        }
        let cfg = SyntheticConfig {
            mem_bytes: layout.total_bytes(),
            page_size: layout.page_size,
            ..cfg
        };
        let vm = SyntheticVm::build(&cfg, layout, cfg.prealloc)?;
        Ok(Box::new(vm) as Box<dyn DestinationVm>)
    })
}
