//! The memory digest compared at switchover.
//!
//! Hashing all of guest memory while the VM is paused would put a full memory scan into the
//! downtime. Instead both ends keep a table of per-page xxh3-64 hashes, updated for exactly
//! the pages each round moves (the source hashes what it announces after fetching its dirty
//! log, the destination what it receives). A page torn by a racing guest write is dirty again
//! and is moved and re-hashed in a later round, so once the final round lands both tables
//! describe the paused guest. The digest is xxh3-128 over the table, so it covers every page
//! of guest memory while costing only the pages of the final round in the downtime.
//! [`full_digest`] hashes the memory itself, for checks outside the downtime.
//!
//! Zero pages ride on the same pass: [`PageHashes::classify`] hashes a round's pages and sorts
//! them into data and zero runs. A page is zero only if its hash is the zero page's *and* a
//! check of its bytes finds nothing but zeroes (a hash alone is never trusted), so the check
//! costs a second read of zero pages only. The destination records the zero page's hash for
//! the zero pages it is told of, so the digest covers them exactly as any other page.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::{xxh3_128, xxh3_64, Xxh3};

use crate::error::{Error, Result};
use crate::mem::{GuestMemoryMap, PageIndex, RegionId};
use crate::pages::PageRange;

/// Per-page hashes of one end's guest memory.
#[derive(Debug)]
pub struct PageHashes {
    base: Vec<usize>,
    hashes: Vec<AtomicU64>,
    /// xxh3-64 of an all-zero page.
    zero: u64,
}

impl PageHashes {
    /// A table for `map`, every entry the hash of a page never written (all zeroes hashes
    /// differently from any real content only by chance, so entries start as 0 and every page
    /// is hashed when round 0 moves it).
    pub fn new(map: &GuestMemoryMap) -> PageHashes {
        let mut base = Vec::with_capacity(map.regions().len());
        let mut n = 0usize;
        for r in map.regions() {
            base.push(n);
            n += r.pages(map.page_size()) as usize;
        }
        PageHashes {
            base,
            hashes: (0..n).map(|_| AtomicU64::new(0)).collect(),
            zero: zero_page_hash(map.page_size().bytes() as usize),
        }
    }

    /// The hash of an all-zero page.
    pub fn zero_hash(&self) -> u64 {
        self.zero
    }

    /// Hashes the pages of `range` into the table (as [`PageHashes::update`]) and appends them
    /// to `data` or `zero` as coalesced runs: a page goes to `zero` when its hash is the zero
    /// page's and its bytes are all zero, or (not read at all) when `holes` (one entry per page
    /// of `range`, from [`crate::mem::holes`]) says the kernel holds no data for it.
    pub fn classify(
        &self,
        map: &GuestMemoryMap,
        range: &PageRange,
        holes: Option<&[bool]>,
        data: &mut Vec<PageRange>,
        zero: &mut Vec<PageRange>,
    ) -> Result<()> {
        let (ptr, len) = map.span(range.region, range.first, range.npages)?;
        let page = map.page_size().bytes() as usize;
        // As in `update`: a page torn by a racing write is dirty and moves again.
        // SAFETY: `span` checked that ptr..ptr+len lies inside a region the VMM vouched for.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        let base = self.base[range.region.0 as usize] + range.first.0 as usize;
        for (i, chunk) in bytes.chunks(page).enumerate() {
            if holes.is_some_and(|h| h[i]) {
                self.hashes[base + i].store(self.zero, Ordering::Relaxed);
                push_page(zero, range.region, PageIndex(range.first.0 + i as u64));
                continue;
            }
            let h = xxh3_64(chunk);
            self.hashes[base + i].store(h, Ordering::Relaxed);
            let out = if h == self.zero && is_zero(chunk) {
                &mut *zero
            } else {
                &mut *data
            };
            push_page(out, range.region, PageIndex(range.first.0 + i as u64));
        }
        Ok(())
    }

    /// Records the zero page's hash for every page of `range` (pages known to be zero).
    pub fn set_zero(&self, range: &PageRange) {
        let base = self.base[range.region.0 as usize] + range.first.0 as usize;
        for h in &self.hashes[base..base + range.npages as usize] {
            h.store(self.zero, Ordering::Relaxed);
        }
    }

    /// Hashes the pages of `range` from `map`'s memory into the table.
    pub fn update(&self, map: &GuestMemoryMap, range: &PageRange) -> Result<()> {
        let (ptr, len) = map.span(range.region, range.first, range.npages)?;
        let page = map.page_size().bytes() as usize;
        // The guest may write it concurrently; u8 has no invalid values, and a hash computed
        // over a page being written is replaced when the (now dirty) page moves again.
        // SAFETY: `span` checked that ptr..ptr+len lies inside a region the VMM vouched for.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        let base = self.base[range.region.0 as usize] + range.first.0 as usize;
        for (i, chunk) in bytes.chunks(page).enumerate() {
            self.hashes[base + i].store(xxh3_64(chunk), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Records the hash of one page computed elsewhere (post-copy hashes the staging buffer it
    /// installs from, never the guest page).
    pub fn set(&self, region: RegionId, page: PageIndex, hash: u64) {
        self.hashes[self.base[region.0 as usize] + page.0 as usize].store(hash, Ordering::Relaxed);
    }

    /// The hash recorded for one page.
    pub fn get(&self, region: RegionId, page: PageIndex) -> u64 {
        self.hashes[self.base[region.0 as usize] + page.0 as usize].load(Ordering::Relaxed)
    }

    /// xxh3-128 over the whole table.
    pub fn digest(&self) -> u128 {
        let mut h = Xxh3::new();
        let mut buf = [0u8; 8 * 512];
        for chunk in self.hashes.chunks(512) {
            for (i, v) in chunk.iter().enumerate() {
                buf[i * 8..i * 8 + 8].copy_from_slice(&v.load(Ordering::Relaxed).to_le_bytes());
            }
            h.update(&buf[..chunk.len() * 8]);
        }
        h.digest128()
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// This end's digest, checked against the source's `digest` over its `pages` pages.
    pub fn check(&self, digest: u128, pages: u64) -> Result<u128> {
        let mine = self.digest();
        if pages != self.pages() || mine != digest {
            return Err(Error::DigestMismatch {
                source_digest: digest,
                dest_digest: mine,
            });
        }
        Ok(mine)
    }
}

/// xxh3-128 over every byte of guest memory, region by region (for checks outside the
/// downtime, and tests).
pub fn full_digest(map: &GuestMemoryMap) -> u128 {
    let mut h = Xxh3::new();
    for r in map.regions() {
        // SAFETY: the region is mapped for its whole length (GuestRegion::new's contract).
        let bytes = unsafe { std::slice::from_raw_parts(r.host_ptr(), r.len() as usize) };
        h.update(bytes);
    }
    h.digest128()
}

/// Appends page `page` of `region` to `runs`, extending the last run when it is contiguous.
pub fn push_page(runs: &mut Vec<PageRange>, region: RegionId, page: PageIndex) {
    if let Some(last) = runs.last_mut() {
        if last.region == region && last.end() == page.0 && last.npages < u64::from(u32::MAX) {
            last.npages += 1;
            return;
        }
    }
    runs.push(PageRange {
        region,
        first: page,
        npages: 1,
    });
}

/// True if every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (head, mid, tail) = bytemuck::pod_align_to::<u8, u128>(b);
    head.iter().all(|&x| x == 0)
        && tail.iter().all(|&x| x == 0)
        && mid.chunks(8).all(|c| c.iter().fold(0, |a, &x| a | x) == 0)
}

/// xxh3-64 of an all-zero page of `bytes` bytes (streamed, no page-sized buffer).
pub fn zero_page_hash(bytes: usize) -> u64 {
    if bytes <= 1 << 16 {
        return xxh3_64(&ZEROES[..bytes]);
    }
    let mut h = Xxh3::new();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(ZEROES.len());
        h.update(&ZEROES[..n]);
        left -= n;
    }
    h.digest()
}

static ZEROES: [u8; 1 << 16] = [0; 1 << 16];

/// xxh3-128 of a byte string (device state, tests).
pub fn digest_bytes(b: &[u8]) -> u128 {
    xxh3_128(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{MmapBacking, MmapRegion};

    #[test]
    fn the_zero_hash_streamed_matches_a_zero_page() {
        for n in [4096usize, 1 << 16, 2 << 20] {
            assert_eq!(zero_page_hash(n), xxh3_64(&vec![0u8; n]), "{n} bytes");
        }
        assert!(is_zero(&[0u8; 4096]));
        let mut p = vec![0u8; 4099];
        assert!(is_zero(&p[1..4097]));
        for i in [0, 1, 2048, 4098] {
            p[i] = 1;
            assert!(!is_zero(&p), "byte {i}");
            p[i] = 0;
        }
    }

    #[test]
    fn classify_sorts_pages_into_runs_and_hashes_every_one() {
        let m = MmapRegion::new(8 * 4096, MmapBacking::Anonymous, false).unwrap();
        let map = crate::mem::test_map(&m);
        for p in [1u64, 2, 6] {
            // SAFETY: page p of our own mapping.
            unsafe { m.as_ptr().add(p as usize * 4096 + 17).write(9) };
        }
        let h = PageHashes::new(&map);
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        let all = PageRange {
            region: RegionId(0),
            first: PageIndex(0),
            npages: 8,
        };
        h.classify(&map, &all, None, &mut data, &mut zero).unwrap();
        let runs = |v: &[PageRange]| v.iter().map(|r| (r.first.0, r.npages)).collect::<Vec<_>>();
        assert_eq!(runs(&data), [(1, 2), (6, 1)]);
        assert_eq!(runs(&zero), [(0, 1), (3, 3), (7, 1)]);
        let other = PageHashes::new(&map);
        other.update(&map, &all).unwrap();
        assert_eq!(h.digest(), other.digest(), "classify hashes as update does");
        let z = PageHashes::new(&map);
        z.update(&map, &all).unwrap();
        for r in &zero {
            z.set_zero(r);
        }
        assert_eq!(
            z.digest(),
            h.digest(),
            "set_zero records what hashing finds"
        );
    }
}
