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
use super::uffd::Uffd;
use crate::digest::PageHashes;
use crate::error::Result;
use crate::pages::PageRange;

/// Most fault events read per batch.
const BATCH: usize = 64;
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
    let mut addrs = Vec::with_capacity(BATCH);
    let mut keys = Vec::with_capacity(BATCH);
    let mut fetch: Vec<(PageRange, u64)> = Vec::with_capacity(BATCH);
    let mut buf: Vec<u8> = Vec::new();
    let mut last_event = Instant::now();
    while !pages.stopping() {
        addrs.clear();
        // Right after a fault the next one usually follows within microseconds: spin on
        // non-blocking reads for a while rather than pay a sleep and a wake-up per fault.
        let n = if last_event.elapsed() < SPIN {
            std::hint::spin_loop();
            uffd.try_read_faults(&mut addrs, BATCH)?
        } else {
            uffd.read_faults(&mut addrs, BATCH, Duration::from_millis(10))?
        };
        if n == 0 {
            continue;
        }
        let t0 = Instant::now();
        last_event = t0;
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
        fetch.retain(|(r, n)| {
            if pages.page_missing(r.region, r.first) {
                return true;
            }
            if let Ok((ptr, len)) = pages.span(r) {
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
        if buf.len() < fetch.len() * page {
            buf.resize(fetch.len() * page, 0);
        }
        for (i, (r, _)) in fetch.iter().enumerate() {
            // SAFETY: slot i of `buf` is a page of ours, untouched until its complete below.
            unsafe { fetcher.start(*r, buf.as_mut_ptr().add(i * page))? };
        }
        for (i, (r, n)) in fetch.iter().enumerate() {
            let got = fetcher.complete()?;
            debug_assert_eq!(got, *r);
            pages.install(uffd, hashes, *r, &buf[i * page..(i + 1) * page], true)?;
            let ns = t0.elapsed().as_nanos() as u64;
            for _ in 0..*n {
                stats.latency.saturating_record(ns);
            }
        }
    }
    Ok(())
}
