//! Dirty tracking by content, for a VM without a dirty log ([`DirtyLog::Content`]): after
//! every round the destination reports its hash of each page the round landed (`Landed`), and
//! a fetch hashes every page of guest memory and compares it with what the destination holds.
//! A page differs exactly when the destination's copy is not the guest's page now, however the
//! page changed while it moved (a lock word set and put back is caught too), and no copy of
//! guest memory is kept: the cost is one hash pass over the pages that hold data per fetch.
//! Holes of the memory's backing (pages that read zero and are never read) cost nothing.
//!
//! The live hashes also go into the source's digest table, so that the digest at switchover
//! describes the paused guest as the final fetch saw it, and the destination's check still
//! compares both ends' memory.
//!
//! [`DirtyLog::Content`]: crate::vm::DirtyLog::Content

use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::holes::Holes;
use crate::mem::{GuestMemoryMap, PageIndex, RegionId};
use crate::pages::{PageRange, PageSet};
use crate::wire::Landed;

/// What the destination holds, page by page, and the buffers a fetch reuses.
#[derive(Debug)]
pub(super) struct ContentLog {
    /// The destination's hash of each page (0 until a round lands the page: never equal to
    /// a page's hash but by chance, so such a page counts as written).
    landed: PageHashes,
    holes: Holes,
    hole_buf: Vec<bool>,
}

impl ContentLog {
    pub(super) fn new(map: &GuestMemoryMap) -> ContentLog {
        ContentLog {
            landed: PageHashes::new(map),
            holes: Holes::new(),
            hole_buf: Vec::new(),
        }
    }

    /// Zero pages announced in a round: the destination holds zeroes there.
    pub(super) fn zeroed(&self, ranges: &[PageRange]) {
        ranges.iter().for_each(|r| self.landed.set_zero(r));
    }

    /// One chunk of the destination's hashes for a round (its ranges checked against `map`).
    pub(super) fn landed(&self, map: &GuestMemoryMap, l: &Landed) -> Result<()> {
        let mut hashes = l.hashes.iter();
        for r in &l.ranges {
            map.span(r.region, r.first, r.npages)
                .map_err(|e| Error::Protocol(format!("Landed: {e}")))?;
            for p in r.first.0..r.first.0 + r.npages {
                let h = hashes
                    .next()
                    .expect("the decoder checked one hash per page");
                self.landed.set(r.region, PageIndex(p), *h);
            }
        }
        Ok(())
    }

    /// Adds to `into` every page of `map` whose content is not what the destination holds,
    /// and records every page's current hash in `table` (the source's digest table). Large
    /// regions are hashed by several threads: the last fetch runs while the guest is paused,
    /// inside the downtime, when its cores are idle.
    pub(super) fn fetch(
        &mut self,
        map: &GuestMemoryMap,
        table: &PageHashes,
        into: &mut PageSet,
    ) -> Result<()> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS) as u64;
        for (i, r) in map.regions().iter().enumerate() {
            let region = RegionId(i as u32);
            let n = r.pages(map.page_size());
            let whole = PageRange {
                region,
                first: PageIndex(0),
                npages: n,
            };
            let known = self.holes.find(map, &whole, &mut self.hole_buf);
            let holes = known.then_some(&self.hole_buf[..]);
            let landed = &self.landed;
            let slices = if n >= PAGES_PER_THREAD * 2 {
                threads
            } else {
                1
            };
            let per = n.div_ceil(slices);
            let dirty: Vec<Result<Vec<u64>>> = if slices == 1 {
                vec![compare(map, table, landed, region, holes, 0..n)]
            } else {
                std::thread::scope(|s| {
                    let parts: Vec<_> = (0..slices)
                        .map(|k| {
                            let pages = k * per..((k + 1) * per).min(n);
                            s.spawn(move || compare(map, table, landed, region, holes, pages))
                        })
                        .collect();
                    parts
                        .into_iter()
                        .map(|h| h.join().expect("a comparison thread panicked"))
                        .collect()
                })
            };
            for part in dirty {
                for p in part? {
                    into.insert(region, PageIndex(p));
                }
            }
        }
        Ok(())
    }
}

/// Threads a fetch hashes with, at most.
const MAX_THREADS: usize = 4;
/// Pages (4 KiB: 64 MiB) below which one more thread is not worth starting.
const PAGES_PER_THREAD: u64 = 16384;

/// Pages `pages` of `region`: hashes the ones that hold data into `table` and returns those
/// (and the holes) that differ from `landed`.
fn compare(
    map: &GuestMemoryMap,
    table: &PageHashes,
    landed: &PageHashes,
    region: RegionId,
    holes: Option<&[bool]>,
    pages: std::ops::Range<u64>,
) -> Result<Vec<u64>> {
    let zero = table.zero_hash();
    let hole = |p: u64| holes.is_some_and(|h| h[p as usize]);
    let mut dirty = Vec::new();
    let mut p = pages.start;
    while p < pages.end {
        if hole(p) {
            // Reads zero without being read (nor allocated in a shared file).
            if landed.get(region, PageIndex(p)) != zero {
                dirty.push(p);
            }
            table.set(region, PageIndex(p), zero);
            p += 1;
            continue;
        }
        let start = p;
        while p < pages.end && !hole(p) {
            p += 1;
        }
        table.update(
            map,
            &PageRange {
                region,
                first: PageIndex(start),
                npages: p - start,
            },
        )?;
        dirty.extend(
            (start..p)
                .filter(|&q| table.get(region, PageIndex(q)) != landed.get(region, PageIndex(q))),
        );
    }
    Ok(dirty)
}

impl super::Source<'_> {
    /// Takes round `round`'s `Landed` chunks, which must cover its `data_pages`.
    pub(super) fn receive_landed(&mut self, round: u32, data_pages: u64) -> Result<()> {
        let mut pages = 0u64;
        for chunk in 0.. {
            self.state = super::SourceState::AwaitLanded(round, chunk);
            let crate::wire::Message::Landed(l) = self.recv()? else {
                unreachable!("state checked")
            };
            let c = self.content.as_ref().expect("content tracking negotiated");
            c.landed(&self.map, &l)?;
            pages += l.hashes.len() as u64;
            if l.flags & crate::wire::ROUND_LAST_CHUNK != 0 {
                break;
            }
        }
        if pages != data_pages {
            return Err(Error::Protocol(format!(
                "round {round}: the destination reported hashes of {pages} pages, {data_pages} were sent"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{test_map, MmapBacking, MmapRegion};

    fn range(first: u64, npages: u64) -> PageRange {
        PageRange {
            region: RegionId(0),
            first: PageIndex(first),
            npages,
        }
    }

    /// The hashes a destination holding `map`'s pages `ranges` would report.
    fn landed_of(map: &GuestMemoryMap, ranges: &[PageRange]) -> Landed {
        let t = PageHashes::new(map);
        let mut hashes = Vec::new();
        for r in ranges {
            t.update(map, r).unwrap();
            hashes.extend((r.first.0..r.first.0 + r.npages).map(|p| t.get(r.region, PageIndex(p))));
        }
        Landed {
            round: 0,
            chunk: 0,
            flags: crate::wire::ROUND_LAST_CHUNK,
            ranges: ranges.to_vec(),
            hashes,
        }
    }

    #[test]
    fn finds_exactly_the_pages_that_differ_from_what_landed() {
        let m = MmapRegion::new(8 * 4096, MmapBacking::Memfd, false).unwrap();
        let map = test_map(&m);
        let page = |i: usize| {
            // SAFETY: page i < 8 of the test's own mapping.
            unsafe { std::slice::from_raw_parts_mut(m.as_ptr().add(i * 4096), 4096) }
        };
        page(1).fill(1);
        page(2).fill(2);
        page(5).fill(5);
        let mut log = ContentLog::new(&map);
        let table = PageHashes::new(&map);
        // Round 0 landed pages 1, 2 and 5 as data and the rest as zero.
        log.landed(&map, &landed_of(&map, &[range(1, 2), range(5, 1)]))
            .unwrap();
        log.zeroed(&[range(0, 1), range(3, 2), range(6, 2)]);
        let mut set = PageSet::empty(&map);
        log.fetch(&map, &table, &mut set).unwrap();
        assert_eq!(set.count(), 0, "nothing written since");
        // Written: page 2 changed and put back (what landed still matches), page 5 changed,
        // page 6 (a hole until now) written, page 1 zeroed.
        page(2)[7] = 9;
        page(2)[7] = 2;
        page(5)[0] = 6;
        page(6)[100] = 1;
        page(1).fill(0);
        let mut set = PageSet::empty(&map);
        log.fetch(&map, &table, &mut set).unwrap();
        let got: Vec<u64> = set
            .ranges(64)
            .flat_map(|r| r.first.0..r.first.0 + r.npages)
            .collect();
        assert_eq!(got, vec![1, 5, 6]);
        // The digest table now holds every page's current hash.
        let fresh = PageHashes::new(&map);
        fresh.update(&map, &range(0, 8)).unwrap();
        assert_eq!(table.digest(), fresh.digest());
    }

    #[test]
    fn a_region_split_across_threads_finds_the_writes_in_every_part() {
        let n = 2 * PAGES_PER_THREAD + 3;
        let m = MmapRegion::new(n * 4096, MmapBacking::Memfd, false).unwrap();
        let map = test_map(&m);
        let mut log = ContentLog::new(&map);
        log.zeroed(&[range(0, n)]);
        let table = PageHashes::new(&map);
        let mut set = PageSet::empty(&map);
        log.fetch(&map, &table, &mut set).unwrap();
        assert_eq!(set.count(), 0);
        let written = [0, PAGES_PER_THREAD - 1, PAGES_PER_THREAD, n - 1];
        for p in written {
            // SAFETY: page p < n of the test's own mapping.
            unsafe { m.as_ptr().add(p as usize * 4096 + 9).write(1) };
        }
        log.fetch(&map, &table, &mut set).unwrap();
        let got: Vec<u64> = set
            .ranges(64)
            .flat_map(|r| r.first.0..r.first.0 + r.npages)
            .collect();
        assert_eq!(got, written);
    }

    #[test]
    fn a_page_that_never_landed_counts_as_written_and_bad_ranges_are_refused() {
        let m = MmapRegion::new(4 * 4096, MmapBacking::Anonymous, false).unwrap();
        let map = test_map(&m);
        // SAFETY: page 0 of the test's own mapping.
        unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), 4096) }.fill(3);
        let mut log = ContentLog::new(&map);
        let table = PageHashes::new(&map);
        let mut set = PageSet::empty(&map);
        log.fetch(&map, &table, &mut set).unwrap();
        assert!(set.contains(RegionId(0), PageIndex(0)));
        let mut bad = landed_of(&map, &[range(0, 1)]);
        bad.ranges = vec![range(4, 1)];
        let e = log.landed(&map, &bad).unwrap_err().to_string();
        assert!(e.contains("Landed"), "{e}");
    }
}
