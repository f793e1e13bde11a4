//! Page sets and page ranges: what a round moves.
//!
//! A [`PageSet`] is one bitmap per region (a bit per page). VMMs fill it from their dirty
//! logs; the driver turns it into coalesced [`PageRange`]s (runs of contiguous set pages,
//! optionally split at a maximum length) and those into bounded chunks for the wire.

use crate::mem::{GuestMemoryMap, PageIndex, PageSize, RegionId};

/// A run of contiguous pages inside one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRange {
    /// The region.
    pub region: RegionId,
    /// First page, relative to the region's start.
    pub first: PageIndex,
    /// Number of pages (at least 1).
    pub npages: u64,
}

impl PageRange {
    /// The page after the last one.
    pub fn end(&self) -> u64 {
        self.first.0 + self.npages
    }

    /// Bytes covered, counting every page as full.
    pub fn bytes(&self, page: PageSize) -> u64 {
        self.npages << page.shift()
    }
}

/// A set of pages: one bitmap per region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSet {
    bitmaps: Vec<Vec<u64>>,
    pages: Vec<u64>,
}

impl PageSet {
    /// An empty set shaped like `map`.
    pub fn empty(map: &GuestMemoryMap) -> PageSet {
        let pages: Vec<u64> = map
            .regions()
            .iter()
            .map(|r| r.pages(map.page_size()))
            .collect();
        Self::with_pages(pages)
    }

    /// An empty set for regions of these page counts.
    pub fn with_pages(pages: Vec<u64>) -> PageSet {
        let bitmaps = pages
            .iter()
            .map(|&n| vec![0u64; n.div_ceil(64) as usize])
            .collect();
        PageSet { bitmaps, pages }
    }

    /// The set of every page of `map`.
    pub fn full(map: &GuestMemoryMap) -> PageSet {
        let mut s = Self::empty(map);
        s.fill();
        s
    }

    /// Adds every page.
    pub fn fill(&mut self) {
        for (bm, &n) in self.bitmaps.iter_mut().zip(&self.pages) {
            bm.fill(u64::MAX);
            if n % 64 != 0 {
                if let Some(last) = bm.last_mut() {
                    *last = (1u64 << (n % 64)) - 1;
                }
            }
        }
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        self.bitmaps.iter_mut().for_each(|bm| bm.fill(0));
    }

    /// Number of regions.
    pub fn regions(&self) -> usize {
        self.bitmaps.len()
    }

    /// Pages in region `r`.
    pub fn region_pages(&self, r: usize) -> u64 {
        self.pages[r]
    }

    /// Adds one page; out-of-range pages are ignored (they cannot be migrated anyway).
    pub fn insert(&mut self, region: RegionId, page: PageIndex) {
        let r = region.0 as usize;
        if r < self.bitmaps.len() && page.0 < self.pages[r] {
            self.bitmaps[r][(page.0 / 64) as usize] |= 1 << (page.0 % 64);
        }
    }

    /// Adds a range of pages, clipped to the region.
    pub fn insert_range(&mut self, range: &PageRange) {
        for p in range.first.0..range.end() {
            self.insert(range.region, PageIndex(p));
        }
    }

    /// Removes one page; returns whether it was in the set.
    pub fn take(&mut self, region: RegionId, page: PageIndex) -> bool {
        let r = region.0 as usize;
        if r >= self.bitmaps.len() || page.0 >= self.pages[r] {
            return false;
        }
        let (w, bit) = ((page.0 / 64) as usize, 1u64 << (page.0 % 64));
        let was = self.bitmaps[r][w] & bit != 0;
        self.bitmaps[r][w] &= !bit;
        was
    }

    /// True if the page is in the set.
    pub fn contains(&self, region: RegionId, page: PageIndex) -> bool {
        let r = region.0 as usize;
        r < self.bitmaps.len()
            && page.0 < self.pages[r]
            && self.bitmaps[r][(page.0 / 64) as usize] & (1 << (page.0 % 64)) != 0
    }

    /// ORs a bitmap of 64-page words (bit i of word w = page 64*w+i) into region `r`,
    /// ignoring bits past the region's end. This is the shape of KVM's dirty log.
    pub fn or_words(&mut self, region: RegionId, words: &[u64]) {
        let r = region.0 as usize;
        let Some(bm) = self.bitmaps.get_mut(r) else {
            return;
        };
        for (dst, src) in bm.iter_mut().zip(words) {
            *dst |= *src;
        }
        let n = self.pages[r];
        if !n.is_multiple_of(64) {
            if let Some(last) = bm.last_mut() {
                *last &= (1u64 << (n % 64)) - 1;
            }
        }
    }

    /// ORs another set of the same shape into this one.
    pub fn union_with(&mut self, other: &PageSet) {
        for (a, b) in self.bitmaps.iter_mut().zip(&other.bitmaps) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= *y;
            }
        }
    }

    /// The pages of this set that are not in `other`, a set of the same shape (pages of
    /// regions or words `other` lacks stay).
    pub fn difference(&self, other: &PageSet) -> PageSet {
        let mut out = self.clone();
        for (a, b) in out.bitmaps.iter_mut().zip(&other.bitmaps) {
            for (x, y) in a.iter_mut().zip(b) {
                *x &= !*y;
            }
        }
        out
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.bitmaps
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// True when no page is set.
    pub fn is_empty(&self) -> bool {
        self.bitmaps.iter().flatten().all(|&w| w == 0)
    }

    /// The raw words of region `r`.
    pub fn words(&self, r: usize) -> &[u64] {
        &self.bitmaps[r]
    }

    /// Coalesced runs of set pages, in region then page order, each at most `max_pages` long.
    pub fn ranges(&self, max_pages: u64) -> Ranges<'_> {
        Ranges {
            set: self,
            region: 0,
            page: 0,
            max_pages: max_pages.max(1),
        }
    }
}

/// Iterator over the coalesced ranges of a [`PageSet`].
pub struct Ranges<'a> {
    set: &'a PageSet,
    region: usize,
    page: u64,
    max_pages: u64,
}

impl Ranges<'_> {
    fn bit(&self, p: u64) -> bool {
        self.set.bitmaps[self.region][(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// The next set page at or after `self.page` in the current region.
    fn next_set(&self) -> Option<u64> {
        let bm = &self.set.bitmaps[self.region];
        let n = self.set.pages[self.region];
        let mut p = self.page;
        while p < n {
            let w = bm[(p / 64) as usize] >> (p % 64);
            if w != 0 {
                let q = p + u64::from(w.trailing_zeros());
                return (q < n).then_some(q);
            }
            p = (p / 64 + 1) * 64;
        }
        None
    }
}

impl Iterator for Ranges<'_> {
    type Item = PageRange;

    fn next(&mut self) -> Option<PageRange> {
        while self.region < self.set.bitmaps.len() {
            let Some(start) = self.next_set() else {
                self.region += 1;
                self.page = 0;
                continue;
            };
            let n = self.set.pages[self.region];
            let mut end = start + 1;
            while end < n && end - start < self.max_pages {
                if end % 64 == 0
                    && end + 64 <= n
                    && end - start + 64 <= self.max_pages
                    && self.set.bitmaps[self.region][(end / 64) as usize] == u64::MAX
                {
                    end += 64;
                    continue;
                }
                if !self.bit(end) {
                    break;
                }
                end += 1;
            }
            self.page = end;
            return Some(PageRange {
                region: RegionId(self.region as u32),
                first: PageIndex(start),
                npages: end - start,
            });
        }
        None
    }
}

/// Splits ranges into chunks of at most `max_ranges` ranges each.
pub fn chunks(ranges: &[PageRange], max_ranges: usize) -> impl Iterator<Item = &[PageRange]> {
    ranges.chunks(max_ranges.max(1))
}

/// Total pages in a list of ranges.
pub fn total_pages(ranges: &[PageRange]) -> u64 {
    ranges.iter().map(|r| r.npages).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(pages: u64, bits: &[u64]) -> PageSet {
        let mut s = PageSet::with_pages(vec![pages]);
        for &b in bits {
            s.insert(RegionId(0), PageIndex(b));
        }
        s
    }

    #[test]
    fn coalesces_runs_and_splits_at_max() {
        let s = set_of(300, &[0, 1, 2, 5, 63, 64, 65, 200, 299]);
        let r: Vec<_> = s.ranges(2).map(|r| (r.first.0, r.npages)).collect();
        assert_eq!(
            r,
            vec![(0, 2), (2, 1), (5, 1), (63, 2), (65, 1), (200, 1), (299, 1)]
        );
        let r: Vec<_> = s.ranges(1000).map(|r| (r.first.0, r.npages)).collect();
        assert_eq!(r, vec![(0, 3), (5, 1), (63, 3), (200, 1), (299, 1)]);
    }

    #[test]
    fn full_set_is_one_range_per_region_and_respects_partial_words() {
        let mut s = PageSet::with_pages(vec![130, 64, 1]);
        s.fill();
        assert_eq!(s.count(), 195);
        let r: Vec<_> = s
            .ranges(u64::MAX)
            .map(|r| (r.region.0, r.first.0, r.npages))
            .collect();
        assert_eq!(r, vec![(0, 0, 130), (1, 0, 64), (2, 0, 1)]);
        let r: Vec<_> = s.ranges(50).map(|r| r.npages).collect();
        assert_eq!(r, vec![50, 50, 30, 50, 14, 1]);
    }

    #[test]
    fn or_words_clips_to_region() {
        let mut s = PageSet::with_pages(vec![70]);
        s.or_words(RegionId(0), &[1, u64::MAX]);
        assert_eq!(s.count(), 1 + 6);
        assert!(s.contains(RegionId(0), PageIndex(69)));
        assert!(!s.contains(RegionId(0), PageIndex(70)));
    }

    #[test]
    fn difference_keeps_the_pages_the_other_set_lacks() {
        let mut a = PageSet::with_pages(vec![130, 70]);
        for (r, p) in [(0, 0), (0, 1), (0, 63), (0, 64), (0, 129), (1, 5), (1, 69)] {
            a.insert(RegionId(r), PageIndex(p));
        }
        let mut b = PageSet::with_pages(vec![130, 70]);
        for (r, p) in [(0, 1), (0, 64), (0, 100), (1, 69)] {
            b.insert(RegionId(r), PageIndex(p));
        }
        let d = a.difference(&b);
        let pages: Vec<_> = d.ranges(1).map(|r| (r.region.0, r.first.0)).collect();
        assert_eq!(pages, [(0, 0), (0, 63), (0, 129), (1, 5)]);
        assert_eq!(d.count() + 3, a.count(), "three pages of a are in b");
        assert_eq!(a.difference(&a).count(), 0);
        assert_eq!(a.difference(&PageSet::with_pages(vec![130, 70])), a);
        assert_eq!(
            b.difference(&a).count(),
            1,
            "only page 100 of b is not in a"
        );
        let mut full = PageSet::with_pages(vec![130, 70]);
        full.fill();
        assert!(a.difference(&full).is_empty());
        assert_eq!(full.difference(&a).count(), 200 - 7);
        // A union of the difference and the other set covers the first set.
        let mut u = d.clone();
        u.union_with(&b);
        assert_eq!(a.difference(&u).count(), 0);
    }

    #[test]
    fn insert_out_of_range_is_ignored_and_union_works() {
        let mut a = set_of(10, &[1]);
        a.insert(RegionId(0), PageIndex(10));
        a.insert(RegionId(3), PageIndex(0));
        let b = set_of(10, &[9]);
        a.union_with(&b);
        assert_eq!(a.ranges(10).count(), 2);
        assert_eq!(total_pages(&a.ranges(10).collect::<Vec<_>>()), 2);
    }
}
