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
//! them into data and zero runs. A page is zero only if the bytes that were hashed are all
//! zero (a hash alone is never trusted); the check rides on the read, so it costs no second
//! pass. The destination records the zero page's hash for the zero pages it is told of, so the
//! digest covers them exactly as any other page.
//!
//! The guest writes its memory while it is hashed, so no `&[u8]` is ever formed over it: each
//! page is copied into a private 4 KiB buffer with volatile loads
//! ([`crate::mem::volatile::copy_volatile`]), larger pages 4 KiB at a time, and the copy is
//! hashed. The hash is the same xxh3-64 of the same bytes as hashing the page in place.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::{xxh3_128, xxh3_64, Xxh3};

use crate::error::{Error, Result};
use crate::mem::volatile::copy_volatile;
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
        let base = self.base[range.region.0 as usize] + range.first.0 as usize;
        let mut buf = Chunk::new();
        for (i, off) in (0..len).step_by(page).enumerate() {
            if holes.is_some_and(|h| h[i]) {
                self.hashes[base + i].store(self.zero, Ordering::Relaxed);
                push_page(zero, range.region, PageIndex(range.first.0 + i as u64));
                continue;
            }
            // As in `update`: a page torn by a racing write is dirty and moves again.
            // `span` checked that ptr..ptr+len lies inside a region the VMM vouched for
            // (mapped while the migration runs).
            // SAFETY: so does ptr+off..+page.min(len - off), as off + page.min(len - off) <= len.
            let (h, all_zero) = unsafe { hash_guest(ptr.add(off), page.min(len - off), &mut buf) };
            self.hashes[base + i].store(h, Ordering::Relaxed);
            let out = if all_zero {
                debug_assert_eq!(h, self.zero, "zero bytes hash as the zero page");
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
        let base = self.base[range.region.0 as usize] + range.first.0 as usize;
        let mut buf = Chunk::new();
        for (i, off) in (0..len).step_by(page).enumerate() {
            // The guest may write the page meanwhile: a hash computed over a page being written
            // is replaced when the (now dirty) page moves again.
            // `span` checked that ptr..ptr+len lies inside a region the VMM vouched for
            // (mapped while the migration runs).
            // SAFETY: so does ptr+off..+page.min(len - off), as off + page.min(len - off) <= len.
            let (h, _) = unsafe { hash_guest(ptr.add(off), page.min(len - off), &mut buf) };
            self.hashes[base + i].store(h, Ordering::Relaxed);
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
/// downtime, and tests). Read as volatile memory, 4 KiB at a time, as the page hashes are.
pub fn full_digest(map: &GuestMemoryMap) -> u128 {
    let mut h = Xxh3::new();
    let mut buf = Chunk::new();
    for r in map.regions() {
        let (ptr, len) = (r.host_ptr(), r.len() as usize);
        for off in (0..len).step_by(CHUNK) {
            let n = CHUNK.min(len - off);
            // The region is mapped for its whole length (GuestRegion::new's contract).
            // SAFETY: so ptr+off..+n is mapped, as off + n <= len; `buf` is ours.
            unsafe { copy_volatile(ptr.add(off), &mut buf.0[..n]) };
            h.update(&buf.0[..n]);
        }
    }
    h.digest128()
}

/// Bytes of guest memory copied at a time: a 4 KiB page whole, larger pages in pieces.
const CHUNK: usize = 4096;

/// The private buffer guest memory is copied into before it is hashed.
#[repr(C, align(64))]
struct Chunk([u8; CHUNK]);

impl Chunk {
    fn new() -> Chunk {
        Chunk([0; CHUNK])
    }
}

/// xxh3-64 of the `len` bytes of guest memory at `ptr`, read as volatile memory through
/// `buf`, and whether they were all zero. The same value as `xxh3_64` over the bytes read.
///
/// # Safety
/// `ptr..ptr + len` must be mapped readable for the whole call (the guest may write it).
unsafe fn hash_guest(ptr: *const u8, len: usize, buf: &mut Chunk) -> (u64, bool) {
    if len <= CHUNK {
        // SAFETY: the caller's range; `buf` is ours.
        let or = unsafe { copy_volatile(ptr, &mut buf.0[..len]) };
        return (xxh3_64(&buf.0[..len]), or == 0);
    }
    // Streamed xxh3 gives the one-shot value (as `zero_page_hash` relies on too).
    let mut h = Xxh3::new();
    let mut or = 0;
    for off in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - off);
        // SAFETY: off + n <= len, inside the caller's range; `buf` is ours.
        or |= unsafe { copy_volatile(ptr.add(off), &mut buf.0[..n]) };
        h.update(&buf.0[..n]);
    }
    (h.digest(), or == 0)
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

/// True if every byte of `b` is zero. For buffers this process owns; memory the guest may be
/// writing is checked with [`crate::mem::volatile::is_zero_volatile`].
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
    use crate::mem::{GuestAddress, GuestRegion, MmapBacking, MmapRegion, PageSize};
    use std::time::Instant;

    /// Pseudo-random bytes with every fifth 4 KiB piece left zero.
    fn fill(b: &mut [u8]) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (i, c) in b.chunks_mut(8).enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = if (i * 8 / 4096) % 5 == 2 { 0 } else { x };
            c.copy_from_slice(&v.to_le_bytes()[..c.len()]);
        }
    }

    /// The page hashes as they were computed before guest memory was read as volatile
    /// memory: xxh3-64 over a slice of each page (fine here: the buffer is private).
    fn slice_hashes(bytes: &[u8], page: usize) -> Vec<u64> {
        bytes.chunks(page).map(xxh3_64).collect()
    }

    #[test]
    fn volatile_hashing_gives_the_values_slice_hashing_gave() {
        // (page size, misalignment of the host address, region length): whole and partial
        // last pages, aligned and unaligned addresses, pages hashed whole and streamed.
        let cases = [
            (4096usize, 0usize, 16 * 4096usize),
            (4096, 3, 10 * 4096 + 1000),
            (65536, 0, 3 * 65536 + 4096),
            (2 << 20, 5, (2 << 20) + 12345),
        ];
        for (page, skew, len) in cases {
            let mut buf = vec![0u8; len + skew];
            fill(&mut buf[skew..]);
            let want = slice_hashes(&buf[skew..], page);
            let want_zero: Vec<bool> = buf[skew..].chunks(page).map(is_zero).collect();
            let want_full = xxh3_128(&buf[skew..]);
            // SAFETY: `buf` outlives the map and is not touched through references below.
            let region = unsafe {
                GuestRegion::new(GuestAddress(0), buf.as_mut_ptr().add(skew), len as u64)
            };
            let map =
                GuestMemoryMap::new(vec![region], PageSize::new(page as u64).unwrap()).unwrap();
            let all = PageRange {
                region: RegionId(0),
                first: PageIndex(0),
                npages: want.len() as u64,
            };
            let h = PageHashes::new(&map);
            h.update(&map, &all).unwrap();
            let c = PageHashes::new(&map);
            let (mut data, mut zero) = (Vec::new(), Vec::new());
            c.classify(&map, &all, None, &mut data, &mut zero).unwrap();
            let mut is_zero_page = vec![false; want.len()];
            for r in &zero {
                for p in r.first.0..r.end() {
                    is_zero_page[p as usize] = true;
                }
            }
            for (i, w) in want.iter().enumerate() {
                let at = PageIndex(i as u64);
                assert_eq!(
                    h.get(RegionId(0), at),
                    *w,
                    "update: page {i} of {page}+{skew}"
                );
                assert_eq!(
                    c.get(RegionId(0), at),
                    *w,
                    "classify: page {i} of {page}+{skew}"
                );
            }
            assert_eq!(is_zero_page, want_zero, "zero pages of {page}+{skew}");
            assert!(want_zero.contains(&true) || page > 4096);
            assert_eq!(full_digest(&map), want_full, "full digest of {page}+{skew}");
        }
    }

    /// The hashing before guest memory was read as volatile memory (`update` as it was).
    fn update_by_slice(h: &PageHashes, map: &GuestMemoryMap, range: &PageRange) {
        let (ptr, len) = map.span(range.region, range.first, range.npages).unwrap();
        let page = map.page_size().bytes() as usize;
        // SAFETY: the benchmark's private mapping, which nothing writes while it is hashed.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        let base = h.base[range.region.0 as usize] + range.first.0 as usize;
        for (i, chunk) in bytes.chunks(page).enumerate() {
            h.hashes[base + i].store(xxh3_64(chunk), Ordering::Relaxed);
        }
    }

    /// `classify` as it was: a slice hash, and a second read of pages that hash as zero.
    fn classify_by_slice(h: &PageHashes, map: &GuestMemoryMap, range: &PageRange) -> u64 {
        let (ptr, len) = map.span(range.region, range.first, range.npages).unwrap();
        let page = map.page_size().bytes() as usize;
        // SAFETY: the benchmark's private mapping, which nothing writes while it is hashed.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        let base = h.base[range.region.0 as usize] + range.first.0 as usize;
        let mut zero = 0;
        for (i, chunk) in bytes.chunks(page).enumerate() {
            let v = xxh3_64(chunk);
            h.hashes[base + i].store(v, Ordering::Relaxed);
            zero += u64::from(v == h.zero && is_zero(chunk));
        }
        zero
    }

    /// `cargo test --release -p rdmig-transport --lib digest::tests::hashing_throughput --
    /// --ignored --nocapture`: GiB/s of hashing 256 MiB, by slice (before) and volatile (now).
    #[test]
    #[ignore = "a benchmark: run it by name with --ignored --nocapture"]
    fn hashing_throughput() {
        const LEN: usize = 256 << 20;
        let m = MmapRegion::new(LEN as u64, MmapBacking::Anonymous, true).unwrap();
        let map = crate::mem::test_map(&m);
        // SAFETY: the whole of our own mapping; nothing else uses it yet.
        fill(unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), LEN) });
        let all = PageRange {
            region: RegionId(0),
            first: PageIndex(0),
            npages: (LEN / 4096) as u64,
        };
        let gib_s = |f: &mut dyn FnMut()| {
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    LEN as f64 / (1u64 << 30) as f64 / t.elapsed().as_secs_f64()
                })
                .fold(0.0, f64::max)
        };
        let (a, b) = (PageHashes::new(&map), PageHashes::new(&map));
        let before = gib_s(&mut || update_by_slice(&a, &map, &all));
        let after = gib_s(&mut || b.update(&map, &all).unwrap());
        assert_eq!(a.digest(), b.digest(), "the same hashes");
        let classify_before = gib_s(&mut || {
            classify_by_slice(&a, &map, &all);
        });
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        let classify = gib_s(&mut || {
            data.clear();
            zero.clear();
            b.classify(&map, &all, None, &mut data, &mut zero).unwrap();
        });
        let full = gib_s(&mut || {
            full_digest(&map);
        });
        println!(
            "256 MiB, 4 KiB pages, best of 5: update by slice {before:.2} GiB/s, volatile \
             {after:.2} GiB/s ({:+.1} %); classify by slice {classify_before:.2} GiB/s, volatile {classify:.2} \
             GiB/s ({:+.1} %); full_digest {full:.2} GiB/s",
            (after / before - 1.0) * 100.0,
            (classify / classify_before - 1.0) * 100.0
        );
    }

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
