//! The destination's post-copy page state: which pages are still missing, which a fetcher
//! has asked for, where the guest last faulted, and the installer shared by the fault service
//! and the prefetcher: `UFFDIO_COPY` from a staging buffer, or with memfd guest memory
//! (zero-copy, [`MissingPages::in_place`]) `UFFDIO_CONTINUE` of the page fetched into the
//! second mapping; EEXIST is handled by a wake; the installed page is hashed into the digest
//! table from the buffer or the second mapping, never from guest memory.
//!
//! In zero-copy mode a page is fetched at most once: a fetch writes the page the guest will
//! see, so a second one landing after the first was installed would overwrite the guest's
//! writes. Both the fault service ([`MissingPages::claim`]) and the prefetchers
//! ([`MissingPages::pick`]) claim pages in the same bitmap before fetching them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64;

use super::alias::AliasMap;
use super::uffd::{CopyOutcome, Uffd};
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::{GuestMemoryMap, PageIndex, RegionId};
use crate::pages::{PageRange, PageSet};

/// Why the service stopped before the last page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What failed.
    pub why: String,
    /// The link to the source failed (a fetch's transport, or no page for the timeout):
    /// recovery can outlast it. Otherwise a local failure (userfaultfd, memory).
    pub link: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// A page numbered across all regions (region 0's pages first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GlobalPage(pub u64);

struct Picker {
    requested: Vec<u64>,
    cursor: u64,
    seen_fault: u64,
}

/// Post-copy state of the destination's memory.
pub struct MissingPages {
    map: GuestMemoryMap,
    base: Vec<u64>,
    total: u64,
    missing: Vec<AtomicU64>,
    picker: Mutex<Picker>,
    last_fault: AtomicU64,
    remaining: AtomicU64,
    initial: u64,
    fault_pages: AtomicU64,
    stop: AtomicBool,
    state: Mutex<Option<Failure>>,
    cv: Condvar,
    alias: Option<Arc<AliasMap>>,
}

impl std::fmt::Debug for MissingPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MissingPages")
            .field("initial", &self.initial)
            .field("remaining", &self.remaining())
            .finish()
    }
}

impl MissingPages {
    /// State for `map` with the pages of `set` missing.
    pub fn new(map: &GuestMemoryMap, set: &PageSet) -> MissingPages {
        let mut base = Vec::new();
        let mut total = 0u64;
        for r in map.regions() {
            base.push(total);
            total += r.pages(map.page_size());
        }
        let words = total.div_ceil(64) as usize;
        let missing: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let mut initial = 0;
        for range in set.ranges(u64::MAX) {
            let (mut p, end) = (
                base[range.region.0 as usize] + range.first.0,
                base[range.region.0 as usize] + range.end(),
            );
            while p < end {
                // Whole words at once where the run covers them.
                let n = (64 - p % 64).min(end - p);
                let bits = if n == 64 {
                    u64::MAX
                } else {
                    ((1u64 << n) - 1) << (p % 64)
                };
                missing[(p / 64) as usize].fetch_or(bits, Ordering::Relaxed);
                p += n;
            }
            initial += range.npages;
        }
        MissingPages {
            map: map.clone(),
            base,
            total,
            missing,
            picker: Mutex::new(Picker {
                requested: vec![0; words],
                cursor: 0,
                seen_fault: u64::MAX,
            }),
            last_fault: AtomicU64::new(u64::MAX),
            remaining: AtomicU64::new(initial),
            initial,
            fault_pages: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            state: Mutex::new(None),
            cv: Condvar::new(),
            alias: None,
        }
    }

    /// Zero-copy mode: pages are fetched into `alias` (second mappings of the guest's memfds)
    /// and installed with [`MissingPages::install_in_place`].
    pub fn in_place(mut self, alias: Arc<AliasMap>) -> MissingPages {
        self.alias = Some(alias);
        self
    }

    /// True in zero-copy mode.
    pub fn is_in_place(&self) -> bool {
        self.alias.is_some()
    }

    /// Where a range is fetched to in zero-copy mode: its span in the second mapping.
    pub fn alias_span(&self, r: &PageRange) -> Result<(*mut u8, usize)> {
        self.alias
            .as_ref()
            .ok_or_else(|| Error::InvalidConfig("not in zero-copy mode".into()))?
            .map()
            .span(r.region, r.first, r.npages)
    }

    /// Claims a missing page for a fetch (zero-copy mode): false if a fetcher already has it.
    pub fn claim(&self, region: RegionId, page: PageIndex) -> bool {
        let g = self.global(region, page);
        let mut p = self.picker.lock().unwrap_or_else(|p| p.into_inner());
        let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
        if p.requested[w] & bit != 0 {
            return false;
        }
        p.requested[w] |= bit;
        true
    }

    /// Zero-copy mode: maps the pages of `range`, fetched into the second mapping, with
    /// `UFFDIO_CONTINUE` (waking their waiters), and hashes what was fetched. Once mapped, the
    /// guest may write a page (it is the same page), so the hash must be taken from the
    /// content before that. With `aside` (the fault path) the pages are copied into it,
    /// mapped, and the copy is hashed: the faulting thread resumes sooner, as a page copy
    /// costs less than its hash. Without (prefetch) they are hashed in place, then mapped.
    /// Returns the pages this call installed that were missing.
    pub fn install_in_place(
        &self,
        uffd: &Uffd,
        hashes: &PageHashes,
        range: PageRange,
        by_fault: bool,
        mut aside: Option<&mut Vec<u8>>,
    ) -> Result<u64> {
        let (dst, len) = self.map.span(range.region, range.first, range.npages)?;
        let (src, _) = self.alias_span(&range)?;
        let page = self.map.page_size().bytes() as usize;
        let sums: Vec<u64> = {
            // A slice over guest memory, but not over memory the guest can write: every page
            // of `range` was claimed by this caller (`pick`, `claim`), so nothing else fetches
            // into it, and the guest cannot reach it, as its entries stay absent until the
            // UFFDIO_CONTINUE below (a claimed page is missing, and missing pages were
            // dropped or never mapped). The slice ends before that.
            // The range lies in the second mapping (checked by `alias_span`).
            // SAFETY: written by the completed fetch, and by nothing while the slice lives.
            let fetched = unsafe { std::slice::from_raw_parts(src, len) };
            match aside.as_deref_mut() {
                Some(buf) => {
                    buf.clear();
                    buf.extend_from_slice(fetched);
                    Vec::new()
                }
                None => fetched.chunks(page).map(xxh3_64).collect(),
            }
        };
        let aside = aside.as_deref();
        let sum_of = |i: usize| match aside {
            Some(buf) => xxh3_64(&buf[i * page..(i + 1) * page]),
            None => sums[i],
        };
        let mut installed = 0;
        let mut off = 0usize;
        while off < len {
            // SAFETY: dst+off..dst+len lies in the checked span, registered in minor mode.
            let outcome = uffd.continue_range(unsafe { dst.add(off) }, len - off)?;
            let (done, skip) = match outcome {
                CopyOutcome::Done => (len - off, 0),
                CopyOutcome::Partial(n) => (n.min(len - off) / page * page, 0),
                CopyOutcome::Exists => (0, page),
            };
            let first = off / page;
            for i in first..first + done / page {
                installed += self.mark_hashed(
                    hashes,
                    range.region,
                    PageIndex(range.first.0 + i as u64),
                    sum_of(i),
                );
            }
            if skip > 0 {
                // SAFETY: as above; the page lies inside the checked span.
                uffd.wake(unsafe { dst.add(off) }, page)?;
            }
            off += done + skip;
        }
        self.installed(installed, by_fault);
        Ok(installed)
    }

    /// Pages still missing.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Pages missing at the start.
    pub fn initial(&self) -> u64 {
        self.initial
    }

    /// Pages of the guest.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Missing pages the fault service installed.
    pub fn fault_pages(&self) -> u64 {
        self.fault_pages.load(Ordering::Relaxed)
    }

    /// True once the service threads should stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Asks the service threads to stop.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    /// Records the first failure of a service thread and wakes the waiter.
    pub fn fail(&self, why: String) {
        self.record(Failure { why, link: false });
    }

    /// Records a failure of the link to the source (see [`Failure::link`]).
    pub fn fail_link(&self, why: String) {
        self.record(Failure { why, link: true });
    }

    fn record(&self, f: Failure) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.get_or_insert(f);
        self.cv.notify_all();
    }

    /// After the service threads were stopped and joined on a link failure: forgets the
    /// failure and the stop, and makes every page still missing pickable again (no fetch is
    /// in flight, so none can land twice), with prefetching resuming at the latest fault.
    pub fn reset_after_pause(&self) {
        let mut p = self.picker.lock().unwrap_or_else(|p| p.into_inner());
        p.requested.iter_mut().for_each(|w| *w = 0);
        p.seen_fault = u64::MAX;
        p.cursor = match self.last_fault.load(Ordering::Relaxed) {
            u64::MAX => 0,
            f => f,
        };
        drop(p);
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.stop.store(false, Ordering::Release);
    }

    /// The pages still missing, as a set over `map`.
    pub fn missing_set(&self) -> PageSet {
        let mut set = PageSet::empty(&self.map);
        for (w, word) in self.missing.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let g = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let region = self.base.partition_point(|&b| b <= g) - 1;
                set.insert(RegionId(region as u32), PageIndex(g - self.base[region]));
            }
        }
        set
    }

    /// Waits until every page is installed (Ok), a service thread failed, or no page arrived
    /// for `timeout` (the reason); tells `progress` the pages still missing every 50 ms or so,
    /// and fails with a link failure when it answers why the link is gone.
    pub fn wait(
        &self,
        timeout: Duration,
        progress: &dyn Fn(u64) -> Option<String>,
    ) -> std::result::Result<(), Failure> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut deadline = std::time::Instant::now() + timeout;
        let mut last = self.remaining();
        loop {
            if let Some(why) = s.as_ref() {
                return Err(why.clone());
            }
            let remaining = self.remaining();
            if remaining == 0 {
                progress(0);
                return Ok(());
            }
            if let Some(why) = progress(remaining) {
                return Err(Failure { why, link: true });
            }
            let now = std::time::Instant::now();
            if remaining != last {
                // Progress: the timeout bounds a stall, not the whole post-copy.
                last = remaining;
                deadline = now + timeout;
            }
            if now >= deadline {
                return Err(Failure {
                    why: format!("no page arrived for {timeout:?} ({remaining} missing)"),
                    link: true,
                });
            }
            s = self
                .cv
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Bytes per page.
    pub fn page_bytes(&self) -> usize {
        self.map.page_size().bytes() as usize
    }

    /// Host pointer and length of a range (checked against the region table).
    pub fn span(&self, r: &PageRange) -> Result<(*mut u8, usize)> {
        self.map.span(r.region, r.first, r.npages)
    }

    /// The global page and its region and page of a faulting host address.
    pub fn locate(&self, addr: u64) -> Option<(RegionId, PageIndex)> {
        let shift = self.map.page_size().shift();
        self.map.regions().iter().enumerate().find_map(|(i, r)| {
            let start = r.host_ptr() as u64;
            (addr >= start && addr < start + r.len())
                .then(|| (RegionId(i as u32), PageIndex((addr - start) >> shift)))
        })
    }

    fn global(&self, region: RegionId, page: PageIndex) -> u64 {
        self.base[region.0 as usize] + page.0
    }

    fn is_missing(&self, g: u64) -> bool {
        self.missing[(g / 64) as usize].load(Ordering::Acquire) & (1 << (g % 64)) != 0
    }

    /// True if the page is still missing.
    pub fn page_missing(&self, region: RegionId, page: PageIndex) -> bool {
        self.is_missing(self.global(region, page))
    }

    /// Notes a guest fault on a page, steering the prefetcher next to it.
    pub fn note_fault(&self, region: RegionId, page: PageIndex) {
        self.last_fault
            .store(self.global(region, page), Ordering::Relaxed);
    }

    /// The next run of at most `max` missing pages nobody asked for yet, from the page after
    /// the latest fault onwards (wrapping round), marked as requested. `None` when every
    /// missing page has been asked for.
    pub fn pick(&self, max: u64) -> Option<PageRange> {
        let mut p = self.picker.lock().unwrap_or_else(|p| p.into_inner());
        let fault = self.last_fault.load(Ordering::Relaxed);
        if fault != p.seen_fault && fault != u64::MAX {
            p.seen_fault = fault;
            p.cursor = fault;
        }
        self.pick_locked(p, max)
    }

    fn pick_locked(&self, mut p: std::sync::MutexGuard<'_, Picker>, max: u64) -> Option<PageRange> {
        let words = self.missing.len() as u64;
        let start_word = p.cursor / 64;
        for step in 0..=words {
            let w = (start_word + step) % words;
            let mut cand =
                self.missing[w as usize].load(Ordering::Acquire) & !p.requested[w as usize];
            if step == 0 {
                cand &= !0u64 << (p.cursor % 64);
            }
            if cand == 0 {
                continue;
            }
            let first = w * 64 + u64::from(cand.trailing_zeros());
            let region = self.base.partition_point(|&b| b <= first) - 1;
            let region_end = self.base.get(region + 1).copied().unwrap_or(self.total);
            let mut end = first;
            while end < region_end
                && end - first < max
                && self.is_missing(end)
                && p.requested[(end / 64) as usize] & (1 << (end % 64)) == 0
            {
                p.requested[(end / 64) as usize] |= 1 << (end % 64);
                end += 1;
            }
            if end == first {
                // Installed by a fault since the bitmap was read: nothing to ask for here.
                p.requested[(first / 64) as usize] |= 1 << (first % 64);
                return self.pick_locked(p, max);
            }
            p.cursor = end;
            return Some(PageRange {
                region: RegionId(region as u32),
                first: PageIndex(first - self.base[region]),
                npages: end - first,
            });
        }
        None
    }

    /// Installs the pages of `range` from `buf` (their bytes, in order) with `UFFDIO_COPY`,
    /// waking instead where a page is already present, and hashes each page it installed.
    /// Returns the pages this call installed that were missing.
    pub fn install(
        &self,
        uffd: &Uffd,
        hashes: &PageHashes,
        range: PageRange,
        buf: &[u8],
        by_fault: bool,
    ) -> Result<u64> {
        let (dst, len) = self.map.span(range.region, range.first, range.npages)?;
        let page = self.map.page_size().bytes() as usize;
        if buf.len() < len {
            return Err(Error::InvalidConfig(format!(
                "staging buffer of {} bytes for {len} bytes of pages",
                buf.len()
            )));
        }
        let mut installed = 0;
        let mut off = 0usize;
        while off < len {
            // The span is registered with `uffd` for the whole post-copy.
            // SAFETY: dst+off..dst+len lies in the span checked above; buf holds len bytes.
            let outcome = unsafe { uffd.copy(dst.add(off), buf.as_ptr().add(off), len - off) }?;
            let (done, skip) = match outcome {
                CopyOutcome::Done => (len - off, 0),
                CopyOutcome::Partial(n) => (n.min(len - off) / page * page, 0),
                CopyOutcome::Exists => (0, page),
            };
            for i in (off / page)..((off + done) / page) {
                installed += self.mark_installed(
                    hashes,
                    range.region,
                    PageIndex(range.first.0 + i as u64),
                    &buf[i * page..(i + 1) * page],
                );
            }
            if skip > 0 {
                // SAFETY: as above; the page lies inside the checked span.
                uffd.wake(unsafe { dst.add(off) }, page)?;
            }
            off += done + skip;
            if done == 0 && skip == 0 {
                // A partial copy of less than a page: retry the rest from this page on.
                continue;
            }
        }
        self.installed(installed, by_fault);
        Ok(installed)
    }

    /// Resolves the missing pages of `range`, zero at the source, without a fetch: with
    /// `UFFDIO_ZEROPAGE` (the shared zero page is mapped; a write later allocates as for any
    /// fresh page), or in zero-copy mode by zeroing the page in the second mapping and mapping
    /// it with `UFFDIO_CONTINUE`. Pages no longer missing, or claimed by a fetcher, are left to
    /// it. Returns the pages this call installed.
    pub fn install_zero(&self, uffd: &Uffd, hashes: &PageHashes, range: PageRange) -> Result<u64> {
        let (dst, _) = self.map.span(range.region, range.first, range.npages)?;
        let page = self.map.page_size().bytes() as usize;
        let mut installed = 0;
        let mut i = 0u64;
        while i < range.npages {
            // The next run of pages still missing (and, zero-copy, claimed for this call).
            let take = |p: u64| {
                let pi = PageIndex(range.first.0 + p);
                self.page_missing(range.region, pi)
                    && (!self.is_in_place() || self.claim(range.region, pi))
            };
            if !take(i) {
                i += 1;
                continue;
            }
            let start = i;
            i += 1;
            while i < range.npages && take(i) {
                i += 1;
            }
            let run = PageRange {
                region: range.region,
                first: PageIndex(range.first.0 + start),
                npages: i - start,
            };
            if self.is_in_place() {
                let (src, len) = self.alias_span(&run)?;
                // Claimed above: no fetch writes these pages, and the guest cannot see them
                // until they are mapped.
                // SAFETY: the run's span in the second mapping.
                unsafe { std::ptr::write_bytes(src, 0, len) };
                installed += self.install_in_place(uffd, hashes, run, false, None)?;
                continue;
            }
            let len = run.npages as usize * page;
            let mut off = 0usize;
            while off < len {
                // SAFETY: the run lies in the span checked above, registered for the post-copy.
                let at = unsafe { dst.add(start as usize * page + off) };
                let (done, skip) = match uffd.zeropage(at, len - off)? {
                    CopyOutcome::Done => (len - off, 0),
                    CopyOutcome::Partial(n) => (n.min(len - off) / page * page, 0),
                    // Someone installed it first and hashes it; wake any waiter.
                    CopyOutcome::Exists => (0, page),
                };
                for k in (off / page)..((off + done) / page) {
                    installed += self.mark_hashed(
                        hashes,
                        range.region,
                        PageIndex(run.first.0 + k as u64),
                        hashes.zero_hash(),
                    );
                }
                if skip > 0 {
                    uffd.wake(at, page)?;
                }
                off += done + skip;
            }
        }
        self.installed(installed, false);
        Ok(installed)
    }

    /// Counts pages a fault installed and wakes the waiter after the last page.
    fn installed(&self, installed: u64, by_fault: bool) {
        if by_fault {
            self.fault_pages.fetch_add(installed, Ordering::Relaxed);
        }
        if installed > 0 && self.remaining() == 0 {
            let _g = self.state.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_all();
        }
    }

    fn mark_installed(
        &self,
        hashes: &PageHashes,
        region: RegionId,
        page: PageIndex,
        bytes: &[u8],
    ) -> u64 {
        self.mark_hashed(hashes, region, page, xxh3_64(bytes))
    }

    fn mark_hashed(&self, hashes: &PageHashes, region: RegionId, page: PageIndex, sum: u64) -> u64 {
        hashes.set(region, page, sum);
        let g = self.global(region, page);
        let bit = 1u64 << (g % 64);
        if self.missing[(g / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
            1
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{GuestAddress, GuestRegion, PageSize};

    #[test]
    fn pick_starts_after_the_latest_fault_and_covers_everything_once() {
        let mut mem = vec![0u8; 4096 * 300];
        // SAFETY: the vector outlives the map in this test.
        let regions = unsafe {
            vec![
                GuestRegion::new(GuestAddress(0), mem.as_mut_ptr(), 4096 * 100),
                GuestRegion::new(
                    GuestAddress(1 << 30),
                    mem.as_mut_ptr().add(4096 * 100),
                    4096 * 200,
                ),
            ]
        };
        let map = GuestMemoryMap::new(regions, PageSize::KIB4).unwrap();
        let mut set = PageSet::empty(&map);
        set.fill();
        let m = MissingPages::new(&map, &set);
        assert_eq!(m.initial(), 300);
        m.note_fault(RegionId(1), PageIndex(50));
        let r = m.pick(16).unwrap();
        assert_eq!(
            r,
            PageRange {
                region: RegionId(1),
                first: PageIndex(50),
                npages: 16
            }
        );
        let mut n = r.npages;
        while let Some(r) = m.pick(64) {
            assert!(r.npages <= 64);
            n += r.npages;
        }
        assert_eq!(
            n, 300,
            "every page picked exactly once, never across a region end"
        );
        assert_eq!(m.pick(1), None);
        // A pause stopped the fetchers: every page still missing is picked again, from the
        // latest fault on.
        m.fail_link("link cut".into());
        m.request_stop();
        m.reset_after_pause();
        assert!(!m.stopping());
        assert_eq!(m.missing_set().count(), 300);
        let r = m.pick(8).unwrap();
        assert_eq!((r.region, r.first), (RegionId(1), PageIndex(50)));
        assert!(
            m.wait(Duration::from_millis(1), &|_| None)
                .unwrap_err()
                .link
        );
        let f = m.wait(Duration::from_secs(60), &|_| Some("gone".into()));
        assert_eq!(f.unwrap_err().why, "gone");
    }
}
