//! The destination's fault service: reads userfaultfd fault events in batches, coalesces
//! faults on the same page, fetches the missing pages over its own fetcher (on TCP a stream
//! of its own, so faults never queue behind prefetch data), installs them and records the
//! latency of each fault from its event read to its `UFFDIO_COPY` done.
//!
//! This thread never touches guest memory: a missing page would fault on itself.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::fetch::PageFetcher;
use super::missing::MissingPages;
use super::uffd::{CopyOutcome, Uffd};
use crate::digest::PageHashes;
use crate::error::Result;
use crate::pages::PageRange;

/// Most fault events read per batch.
const BATCH: usize = 64;

/// Staging memory a fault fetcher with buffers of its own (RDMA) should have for pages of
/// `page` bytes: a batch of pages, or at least one page and at most 4 MiB.
pub fn staging_bytes(page: usize) -> usize {
    (BATCH * page).min((4 << 20).max(page))
}
/// How long the fault thread polls without sleeping after a fault.
const SPIN: Duration = Duration::from_micros(50);

/// What the fault service measured.
#[derive(Clone, Debug)]
pub struct FaultStats {
    /// Fault events read.
    pub faults: u64,
    /// Latency from event read to page installed, ns.
    pub latency: Histogram<u64>,
}

impl FaultStats {
    /// Empty statistics.
    pub fn new() -> FaultStats {
        FaultStats {
            faults: 0,
            latency: Histogram::new_with_bounds(1, 600_000_000_000, 3)
                .expect("static histogram bounds are valid"),
        }
    }

    /// p50, p90, p99, p99.9 and max, ns (all 0 without faults).
    pub fn percentiles_ns(&self) -> [u64; 5] {
        if self.latency.is_empty() {
            return [0; 5];
        }
        let h = &self.latency;
        [
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
        ]
    }
}

impl Default for FaultStats {
    fn default() -> Self {
        FaultStats::new()
    }
}

/// Serves faults until `pages` says stop. Returns on the first fetch or install error.
pub fn fault_loop(
    uffd: &Uffd,
    pages: &MissingPages,
    hashes: &PageHashes,
    fetcher: &mut dyn PageFetcher,
    stats: &mut FaultStats,
) -> Result<()> {
    let page = pages.page_bytes();
    let in_place = pages.is_in_place();
    let mut addrs = Vec::with_capacity(BATCH);
    let mut keys = Vec::with_capacity(BATCH);
    let mut fetch: Vec<(PageRange, u64)> = Vec::with_capacity(BATCH);
    // Fetch into the fetcher's own staging memory when it has some (RDMA: registered),
    // else into a buffer of ours; `slots` pages at a time.
    let mut own: Vec<u8> = Vec::new();
    // Zero-copy: where fetched pages are copied to be hashed after they are mapped.
    let mut aside: Vec<u8> = Vec::new();
    let (base, slots) = match fetcher.staging() {
        Some((p, len)) if len >= page => (p, len / page),
        Some((_, len)) => {
            return Err(crate::error::Error::InvalidConfig(format!(
                "a staging buffer of {len} bytes cannot hold a {page}-byte page"
            )))
        }
        None => {
            own.resize(BATCH * page, 0);
            (own.as_mut_ptr(), BATCH)
        }
    };
    // Set when a batch was served: the spin window then starts when the loop comes back.
    let mut served = false;
    let mut spin_until = Instant::now();
    while !pages.stopping() {
        addrs.clear();
        // Right after a fault is served the next one usually follows within microseconds (the
        // woken thread goes on to its next access): spin on non-blocking reads for a while,
        // counted from the end of the service, rather than pay a sleep and a wake-up per fault.
        if std::mem::take(&mut served) {
            spin_until = Instant::now() + SPIN;
        }
        let n = if Instant::now() < spin_until {
            std::hint::spin_loop();
            uffd.try_read_faults(&mut addrs, BATCH)?
        } else {
            uffd.read_faults(&mut addrs, BATCH, Duration::from_millis(10))?
        };
        if n == 0 {
            continue;
        }
        let t0 = Instant::now();
        served = true;
        stats.faults += addrs.len() as u64;
        keys.clear();
        keys.extend(addrs.iter().filter_map(|&a| pages.locate(a)));
        keys.sort_unstable();
        fetch.clear();
        for k in &keys {
            match fetch.last_mut() {
                Some((r, n)) if r.region == k.0 && r.first == k.1 => *n += 1,
                _ => fetch.push((
                    PageRange {
                        region: k.0,
                        first: k.1,
                        npages: 1,
                    },
                    1,
                )),
            }
        }
        if let Some((r, _)) = fetch.last() {
            pages.note_fault(r.region, r.first);
        }
        // Pages installed by the prefetcher since the fault only need their waiters woken.
        // Zero-copy: a page a prefetcher is fetching is left to it (its UFFDIO_CONTINUE wakes
        // the fault; a second fetch could land after the guest wrote the page), and a valid
        // page whose entry is absent is mapped as it is.
        fetch.retain(|(r, n)| {
            if pages.page_missing(r.region, r.first) {
                return !in_place || pages.claim(r.region, r.first);
            }
            if let Ok((ptr, len)) = pages.span(r) {
                if in_place {
                    if let Err(e) = uffd.continue_range(ptr, len) {
                        tracing::warn!("mapping a valid page on a fault: {e}");
                    }
                } else {
                    // Not missing and absent: a page no round wrote (zero pages stay
                    // untouched) gets the zero page; an installed one reports EEXIST.
                    match uffd.zeropage(ptr, len) {
                        Ok(CopyOutcome::Exists) => {}
                        Ok(_) => return false,
                        Err(e) => tracing::warn!("zero page on a fault: {e}"),
                    }
                }
                if let Err(e) = uffd.wake(ptr, len) {
                    tracing::warn!("waking a fault on a present page: {e}");
                }
            }
            for _ in 0..*n {
                stats
                    .latency
                    .saturating_record(t0.elapsed().as_nanos() as u64);
            }
            false
        });
        if in_place {
            for (r, _) in &fetch {
                let (dst, _) = pages.alias_span(r)?;
                // Claimed above: no other fetch writes it; the guest cannot see it until installed.
                // SAFETY: the page's place in the second mapping, ours until its complete.
                unsafe { fetcher.start(*r, dst)? };
            }
            for (r, n) in &fetch {
                let got = fetcher.complete()?;
                debug_assert_eq!(got, *r);
                pages.install_in_place(uffd, hashes, *r, true, Some(&mut aside))?;
                let ns = t0.elapsed().as_nanos() as u64;
                for _ in 0..*n {
                    stats.latency.saturating_record(ns);
                }
            }
            continue;
        }
        for group in fetch.chunks(slots) {
            for (i, (r, _)) in group.iter().enumerate() {
                // SAFETY: slot i (< slots) of the staging memory is ours until its complete.
                unsafe { fetcher.start(*r, base.add(i * page))? };
            }
            for (i, (r, n)) in group.iter().enumerate() {
                let got = fetcher.complete()?;
                debug_assert_eq!(got, *r);
                // Staging memory, never guest memory (the guest cannot write it), and
                // nothing writes slot i until the next group starts.
                // SAFETY: slot i holds the page the completed fetch wrote.
                let bytes = unsafe { std::slice::from_raw_parts(base.add(i * page), page) };
                pages.install(uffd, hashes, *r, bytes, true)?;
                let ns = t0.elapsed().as_nanos() as u64;
                for _ in 0..*n {
                    stats.latency.saturating_record(ns);
                }
            }
        }
    }
    Ok(())
}
