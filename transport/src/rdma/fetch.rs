//! Post-copy over RDMA: a [`PageFetcher`] whose fetches are one-sided READs from the source's
//! registered guest memory, on a QP (and CQ) of its own, landing in memory registered
//! LOCAL_WRITE: a staging buffer that the post-copy service then installs with `UFFDIO_COPY`,
//! or, for memfd guest memory, the second mapping of the guest's memfds
//! ([`crate::postcopy::AliasMap`]) whose pages `UFFDIO_CONTINUE` maps into the guest without a
//! copy.
//!
//! The guest's own mapping is never the READ target: guest pages still missing must stay
//! missing to userfaultfd until they are installed whole, and private memory dropped with
//! `MADV_DONTNEED` would leave a registration pointing at pages the mapping no longer holds.
//!
//! One QP per fetcher means completions come back in posting order, so [`PageFetcher::complete`]
//! only counts them. The source's CPU does no work for a fault: the NIC (or rxe) answers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::{backoff, Read, ReadEngine};
use crate::error::{Error, Result};
use crate::mem::{
    GuestAddress, GuestMemoryMap, GuestRegion, MmapBacking, MmapRegion, PageSize, RegionId,
};
use crate::pace::RateLimiter;
use crate::pages::PageRange;
use crate::postcopy::{AliasMap, PageFetcher};

/// How long the fault fetcher spins for a completion before yielding.
pub const FAULT_SPIN: Duration = Duration::from_millis(5);

/// Where one fetcher's READs land: a staging buffer of its own, or the second mapping of
/// memfd guest memory (zero-copy).
#[derive(Debug)]
pub struct Staging {
    region: Option<MmapRegion>,
    _alias: Option<Arc<AliasMap>>,
    map: GuestMemoryMap,
}

impl Staging {
    /// Maps `bytes` (rounded up to whole pages) of populated anonymous memory.
    pub fn new(bytes: usize, page: PageSize) -> Result<Staging> {
        let len = (bytes as u64).max(1).div_ceil(page.bytes()) * page.bytes();
        let region = MmapRegion::new(len, MmapBacking::Anonymous, true)?;
        // The fetcher owns both the mapping and `map`, and drops its engine first.
        // SAFETY: `region` maps `len` bytes read-write and outlives every user of `map`.
        let g = unsafe { GuestRegion::new(GuestAddress(0), region.as_ptr(), len) };
        let map = GuestMemoryMap::new(vec![g], page)?;
        Ok(Staging {
            region: Some(region),
            _alias: None,
            map,
        })
    }

    /// The second mapping of memfd guest memory (zero-copy post-copy): READs land in the page
    /// cache the guest's mapping shares.
    pub fn alias(alias: Arc<AliasMap>) -> Staging {
        Staging {
            region: None,
            map: alias.map().clone(),
            _alias: Some(alias),
        }
    }

    /// The map the engine registers: one region for a staging buffer, the guest's layout for
    /// a second mapping.
    pub fn map(&self) -> &GuestMemoryMap {
        &self.map
    }
}

/// Fetches pages with RDMA READs into its registered memory ([`Staging`]).
pub struct RdmaPageFetcher {
    // Drop order: the engine (QP, then its registration) before the memory it registered.
    engine: ReadEngine,
    staging: Staging,
    page: u64,
    /// Started fetches and the READs each still needs, oldest first.
    pending: VecDeque<(PageRange, usize)>,
    /// Completions taken but not yet handed to a `complete`.
    landed: usize,
    next_tag: u64,
    done: Vec<u64>,
    abort: Arc<AtomicBool>,
    limiter: Option<Arc<RateLimiter>>,
    /// How long a wait for a completion spins before it starts yielding the CPU.
    spin: Duration,
    label: String,
}

impl std::fmt::Debug for RdmaPageFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaPageFetcher")
            .field("label", &self.label)
            .field("in_flight", &self.pending.len())
            .finish()
    }
}

impl RdmaPageFetcher {
    /// A fetcher on `engine` (made by [`ReadEngine::new_split`] with `staging`'s map) for
    /// guest memory with pages of `page`.
    pub fn new(
        engine: ReadEngine,
        staging: Staging,
        page: PageSize,
        label: impl Into<String>,
    ) -> RdmaPageFetcher {
        RdmaPageFetcher {
            engine,
            staging,
            page: page.bytes(),
            pending: VecDeque::new(),
            landed: 0,
            next_tag: 0,
            done: Vec::with_capacity(64),
            abort: Arc::new(AtomicBool::new(false)),
            limiter: None,
            spin: Duration::ZERO,
            label: label.into(),
        }
    }

    /// Spins for up to `spin` waiting for a completion before yielding the CPU between polls:
    /// the fault fetcher spins (a yield costs a scheduler round trip, which on a busy or
    /// virtualised host is milliseconds against a READ's tens of microseconds); prefetchers
    /// yield at once.
    pub fn with_spin(mut self, spin: Duration) -> RdmaPageFetcher {
        self.spin = spin;
        self
    }

    /// Paces this fetcher's READs (a prefetcher under `--max-bandwidth`; never the faults).
    pub fn with_limiter(mut self, limiter: Option<Arc<RateLimiter>>) -> RdmaPageFetcher {
        self.limiter = limiter;
        self
    }

    /// Setting this flag makes a waiting [`PageFetcher::complete`] give up (post-copy
    /// interrupted).
    pub fn abort_flag(&self) -> Arc<AtomicBool> {
        self.abort.clone()
    }

    /// Takes completions until at least one arrived, the engine failed, the stall timeout
    /// passed or the fetch was aborted.
    fn poll_some(&mut self) -> Result<()> {
        // The clock is read only every CLOCK_EVERY empty polls: on a VM whose clocksource is
        // not the TSC (HPET, say) each read is a system call of microseconds, which would
        // delay noticing the completion it lands next to.
        const CLOCK_EVERY: u32 = 32;
        let t = Instant::now();
        let mut spinning = !self.spin.is_zero();
        let mut empty = 0u32;
        loop {
            self.done.clear();
            if self.engine.poll(&mut self.done)? > 0 {
                self.landed += self.done.len();
                return Ok(());
            }
            empty += 1;
            if spinning {
                std::hint::spin_loop();
            } else {
                backoff(empty);
            }
            if empty.is_multiple_of(CLOCK_EVERY) {
                let waited = t.elapsed();
                spinning &= waited < self.spin;
                if self.abort.load(Ordering::Relaxed) {
                    return Err(Error::Rdma(format!(
                        "{}: post-copy fetch aborted",
                        self.label
                    )));
                }
                if waited > self.engine.stall_timeout() {
                    return Err(Error::Timeout(format!(
                        "{}: {} RDMA READs made no progress for {:?}",
                        self.label,
                        self.engine.in_flight(),
                        self.engine.stall_timeout()
                    )));
                }
            }
        }
    }
}

impl PageFetcher for RdmaPageFetcher {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn staging(&mut self) -> Option<(*mut u8, usize)> {
        self.staging.region.as_ref().map(|r| (r.as_ptr(), r.len()))
    }

    unsafe fn start(&mut self, range: PageRange, dst: *mut u8) -> Result<()> {
        let len = range.npages.checked_mul(self.page).ok_or_else(|| {
            Error::InvalidConfig(format!("fetch of {} pages overflows", range.npages))
        })?;
        let d = dst as u64;
        let (local, off) = self
            .staging
            .map
            .regions()
            .iter()
            .enumerate()
            .find_map(|(i, r)| {
                let base = r.host_ptr() as u64;
                (d >= base && d - base + len <= r.len()).then_some((i as u32, d - base))
            })
            .ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "{}: an RDMA fetch must land in the fetcher's registered memory",
                    self.label
                ))
            })?;
        let rr = *self
            .engine
            .remote_regions()
            .get(range.region.0 as usize)
            .ok_or(Error::UnknownRegion(range.region.0))?;
        let remote_off = range.first.0.checked_mul(self.page);
        if !matches!(remote_off.and_then(|o| o.checked_add(len)), Some(end) if end <= rr.len) {
            return Err(Error::RangeOutOfBounds {
                region: range.region.0,
                first_page: range.first.0,
                npages: range.npages,
                region_pages: rr.len / self.page,
            });
        }
        let remote_off = remote_off.expect("checked above");
        if let Some(l) = &self.limiter {
            l.acquire(len)?;
        }
        let max = self.engine.max_read();
        let mut reads = 0;
        let mut k = 0;
        while k < len {
            let n = (len - k).min(max);
            while self.engine.free() == 0 {
                self.poll_some()?;
            }
            let read = Read {
                region: RegionId(local),
                offset: off + k,
                len: n as u32,
                tag: self.next_tag,
            };
            self.next_tag = (self.next_tag + 1) & ((1 << 40) - 1);
            self.engine
                .post_to(read, rr.addr + remote_off + k, rr.rkey)?;
            reads += 1;
            k += n;
        }
        self.pending.push_back((range, reads));
        Ok(())
    }

    fn complete(&mut self) -> Result<PageRange> {
        let (range, reads) = *self
            .pending
            .front()
            .ok_or_else(|| Error::Rdma(format!("{}: no fetch in flight", self.label)))?;
        while self.landed < reads {
            self.poll_some()?;
        }
        self.landed -= reads;
        self.pending.pop_front();
        Ok(range)
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }
}
