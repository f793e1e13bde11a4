//! The RDMA tests' small VMs: a source with one region, a bitmap dirty log and a writer thread
//! (each page holds a word derived from its index and write generation, so any page can be
//! checked), and a destination that only holds memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdmig_transport::mem::{GuestAddress, GuestMemoryMap, MmapBacking, MmapRegion, PageSize};
use rdmig_transport::pages::PageSet;
use rdmig_transport::vm::{DestinationVm, MemoryLayout, SourceVm};
use rdmig_transport::VmmError;

/// Page size of the test VMs.
pub const PAGE: u64 = 4096;

/// State the source VM shares with its writer thread.
pub struct Shared {
    dirty: Vec<AtomicU64>,
    /// Generation written into each page (the page holds `page_word(page, gen)` everywhere).
    gen: Vec<AtomicU64>,
    /// The writer is held (the VM is paused).
    pub paused: AtomicBool,
    stop: AtomicBool,
    /// Pages written so far.
    pub writes: AtomicU64,
    /// Held by the writer while it writes a page; `pause` takes it to wait out a write.
    write_lock: Mutex<()>,
}

/// The word page `page` holds everywhere at generation `gen`.
pub fn page_word(page: u64, gen: u64) -> u64 {
    (page << 32) ^ gen.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xa5a5
}

/// The source VM.
pub struct TestVm {
    /// Its memory.
    pub map: GuestMemoryMap,
    /// State shared with the writer.
    pub shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    _mem: Arc<MmapRegion>,
}

impl TestVm {
    /// `pages_per_sec` random page writes per second while running.
    pub fn new(bytes: u64, pages_per_sec: u64) -> TestVm {
        let mem = Arc::new(MmapRegion::new(bytes, MmapBacking::Anonymous, true).unwrap());
        // SAFETY: `mem` is kept alive in the TestVm for as long as the map is used.
        let region = unsafe { mem.guest_region(GuestAddress(0)) };
        let map = GuestMemoryMap::new(vec![region], PageSize::KIB4).unwrap();
        let pages = bytes / PAGE;
        let shared = Arc::new(Shared {
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            gen: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            write_lock: Mutex::new(()),
        });
        for p in 0..pages {
            fill_page(&mem, p, page_word(p, 0));
        }
        let (s, m) = (shared.clone(), mem.clone());
        let writer = std::thread::spawn(move || {
            let mut x = 0x1234_5678_u64;
            let mut last = Instant::now();
            while !s.stop.load(Ordering::Relaxed) {
                {
                    let _g = s.write_lock.lock().unwrap();
                    if !s.paused.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let p = x % pages;
                        let g = s.gen[p as usize].load(Ordering::Relaxed) + 1;
                        fill_page(&m, p, page_word(p, g));
                        s.gen[p as usize].store(g, Ordering::Relaxed);
                        // Mark dirty after the write: a write racing a fetch-and-clear is reported later.
                        s.dirty[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::SeqCst);
                        s.writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let period = Duration::from_secs_f64(1.0 / pages_per_sec.max(1) as f64);
                let next = last + period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
                last = Instant::now();
            }
        });
        TestVm {
            map,
            shared,
            writer: Some(writer),
            _mem: mem,
        }
    }

    /// Every page holds what its generation says (nothing but the writer changed memory).
    pub fn check_intact(&self) {
        let r = &self.map.regions()[0];
        for p in 0..r.len() / PAGE {
            let want = page_word(p, self.shared.gen[p as usize].load(Ordering::Relaxed));
            let _g = self.shared.write_lock.lock().unwrap();
            let want2 = page_word(p, self.shared.gen[p as usize].load(Ordering::Relaxed));
            // SAFETY: the page is inside the live mapping; the writer is excluded by the lock.
            let got = unsafe {
                std::ptr::read_volatile(r.host_ptr().add((p * PAGE) as usize) as *const u64)
            };
            assert!(got == want || got == want2, "page {p} corrupted: {got:#x}");
        }
    }
}

pub fn fill_page(m: &MmapRegion, page: u64, word: u64) {
    for i in 0..(PAGE / 8) {
        // SAFETY: page < pages, so the word is inside the mapping.
        unsafe {
            std::ptr::write_volatile(
                m.as_ptr().add((page * PAGE + i * 8) as usize) as *mut u64,
                word,
            )
        };
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl SourceVm for TestVm {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }
    fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        self.shared
            .dirty
            .iter()
            .for_each(|w| w.store(0, Ordering::SeqCst));
        Ok(())
    }
    fn fetch_and_clear_dirty(&mut self, into: &mut PageSet) -> Result<(), VmmError> {
        let words: Vec<u64> = self
            .shared
            .dirty
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect();
        into.or_words(rdmig_transport::mem::RegionId(0), &words);
        Ok(())
    }
    fn pause(&mut self) -> Result<(), VmmError> {
        self.shared.paused.store(true, Ordering::SeqCst);
        drop(self.shared.write_lock.lock().unwrap());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        self.shared.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
        Ok(b"test-vm-state".to_vec())
    }
}

pub struct DestVm {
    map: GuestMemoryMap,
    state: Vec<u8>,
    _mem: Vec<MmapRegion>,
}

impl DestinationVm for DestVm {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmmError> {
        self.state = state.to_vec();
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

pub fn dest_factory() -> rdmig_transport::vm::DestinationFactory<'static> {
    Box::new(|layout: &MemoryLayout| {
        let mut mems = Vec::new();
        let mut regions = Vec::new();
        for &(gpa, len) in &layout.regions {
            let m = MmapRegion::new(len, MmapBacking::Anonymous, false)?;
            // SAFETY: the mapping moves into the DestVm together with the map.
            regions.push(unsafe { m.guest_region(gpa) });
            mems.push(m);
        }
        let map = GuestMemoryMap::new(regions, layout.page_size)?;
        Ok(Box::new(DestVm {
            map,
            state: Vec::new(),
            _mem: mems,
        }) as Box<dyn DestinationVm>)
    })
}

/// The bytes of the first region of `map`.
pub fn region_bytes(map: &GuestMemoryMap) -> &[u8] {
    let r = &map.regions()[0];
    // SAFETY: the region is mapped for its length while the map's owner lives.
    unsafe { std::slice::from_raw_parts(r.host_ptr(), r.len() as usize) }
}
