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

/// xxh3-128 of a byte string (device state, tests).
pub fn digest_bytes(b: &[u8]) -> u128 {
    xxh3_128(b)
}
