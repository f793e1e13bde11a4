//! Zero pages on the destination: the pages the source announced as zero are made zero here
//! without any page bytes, and without touching pages this end never wrote.
//!
//! [`DestZero`] keeps the set of pages whose local copy may hold data: every page a round
//! landed, and, when the VMM did not promise that guest memory starts zeroed
//! ([`crate::vm::DestinationVm::memory_starts_zero`]), every page not yet looked at. An
//! announced zero page outside that set is left alone (it was never written, so it reads zero
//! and costs no memory); one inside it is zeroed in place (checked first when the VMM made no
//! promise, so that a page that is zero already is not written). Plain zeroing was chosen over
//! `MADV_DONTNEED`/`fallocate(PUNCH_HOLE)`: it is right for every kind of mapping (private,
//! memfd, a file), needs no system call, and the pages it writes are resident already.
//! Either way the page's entry in the digest table becomes the zero page's hash.

use crate::digest::PageHashes;
use crate::error::Result;
use crate::mem::volatile::is_zero_volatile;
use crate::mem::{GuestMemoryMap, PageIndex};
use crate::pages::{PageRange, PageSet};

/// The destination's view of which pages may hold data.
#[derive(Debug)]
pub struct DestZero {
    maybe_data: PageSet,
    /// Pages of `maybe_data` were never looked at (the VMM made no promise): check first.
    check: bool,
    announced: u64,
    zeroed: u64,
}

impl DestZero {
    /// For guest memory `map`; `starts_zero` is the VMM's promise that every page reads zero
    /// before the migration writes it.
    pub fn new(map: &GuestMemoryMap, starts_zero: bool) -> DestZero {
        DestZero {
            maybe_data: if starts_zero {
                PageSet::empty(map)
            } else {
                PageSet::full(map)
            },
            check: !starts_zero,
            announced: 0,
            zeroed: 0,
        }
    }

    /// A round will land data in `ranges` (checked against the region table): they may hold
    /// data from now on.
    pub fn landed(&mut self, ranges: &[PageRange]) {
        for r in ranges {
            self.maybe_data.insert_range(r);
        }
    }

    /// Makes the pages of `ranges` (checked against the region table) zero and records the
    /// zero page's hash for them in `hashes`. Returns the pages announced.
    pub fn install(
        &mut self,
        map: &GuestMemoryMap,
        hashes: &PageHashes,
        ranges: &[PageRange],
    ) -> Result<u64> {
        let page = map.page_size().bytes() as usize;
        let mut n = 0;
        for r in ranges {
            let (base, _) = map.span(r.region, r.first, r.npages)?;
            for i in 0..r.npages {
                if !self.maybe_data.take(r.region, PageIndex(r.first.0 + i)) {
                    continue;
                }
                // SAFETY: page i of a span `map.span` checked lies in guest memory.
                let p = unsafe { base.add(i as usize * page) };
                // Read as volatile memory, as all guest memory is, though nothing else should
                // write these pages during the rounds (the guest runs only after the
                // switchover, the data path writes announced data pages only).
                // SAFETY: p..p+page lies in guest memory (above), mapped while the migration runs.
                if self.check && unsafe { is_zero_volatile(p, page) } {
                    continue;
                }
                // SAFETY: as above; writing zeroes is what the source's page holds.
                unsafe { std::ptr::write_bytes(p, 0, page) };
                self.zeroed += 1;
            }
            hashes.set_zero(r);
            n += r.npages;
        }
        self.announced += n;
        Ok(n)
    }

    /// Zero pages announced so far.
    pub fn announced(&self) -> u64 {
        self.announced
    }

    /// Of those, pages this end wrote zeroes to.
    pub fn zeroed(&self) -> u64 {
        self.zeroed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{MmapBacking, MmapRegion, RegionId};

    fn range(first: u64, npages: u64) -> PageRange {
        PageRange {
            region: RegionId(0),
            first: PageIndex(first),
            npages,
        }
    }

    #[test]
    fn only_pages_that_may_hold_data_are_written() {
        let m = MmapRegion::new(16 * 4096, MmapBacking::Anonymous, false).unwrap();
        let map = crate::mem::test_map(&m);
        let hashes = PageHashes::new(&map);
        let mut z = DestZero::new(&map, true);
        // Page 3 landed data, then became zero at the source.
        // SAFETY: page 3 of our own mapping.
        unsafe { std::ptr::write_bytes(m.as_ptr().add(3 * 4096), 0xab, 4096) };
        z.landed(&[range(3, 1)]);
        assert_eq!(z.install(&map, &hashes, &[range(0, 8)]).unwrap(), 8);
        assert_eq!(z.zeroed(), 1, "only the page that landed data is written");
        // SAFETY: page 3 of our own mapping, readable.
        assert!(unsafe { is_zero_volatile(m.as_ptr().add(3 * 4096), 4096) });
        for p in 0..8 {
            assert_eq!(hashes.get(RegionId(0), PageIndex(p)), hashes.zero_hash());
        }
        assert_ne!(hashes.get(RegionId(0), PageIndex(8)), hashes.zero_hash());
    }

    #[test]
    fn without_the_vmm_s_promise_every_page_is_checked_and_non_zero_ones_zeroed() {
        let m = MmapRegion::new(8 * 4096, MmapBacking::Anonymous, false).unwrap();
        let map = crate::mem::test_map(&m);
        // The VMM left firmware in page 5 before the migration.
        // SAFETY: page 5 of our own mapping.
        unsafe { std::ptr::write_bytes(m.as_ptr().add(5 * 4096 + 100), 1, 10) };
        let hashes = PageHashes::new(&map);
        let mut z = DestZero::new(&map, false);
        z.install(&map, &hashes, &[range(0, 8)]).unwrap();
        assert_eq!(z.zeroed(), 1);
        // SAFETY: the whole of our own mapping, readable.
        assert!(unsafe { is_zero_volatile(m.as_ptr(), 8 * 4096) });
        // A second announcement writes nothing.
        z.install(&map, &hashes, &[range(5, 1)]).unwrap();
        assert_eq!(z.zeroed(), 1);
    }
}
