//! Pages known to be zero without reading them: the holes of a guest's memory.
//!
//! A freshly booted guest has written a small part of its RAM; the rest was never touched.
//! Reading an untouched page costs a page fault (private anonymous memory maps the shared zero
//! page) or, worse, allocates it (a shared tmpfs or memfd page), so the source asks the kernel
//! instead of reading:
//! - a **memfd or file** region ([`GuestRegion::memfd`]): `lseek(SEEK_DATA / SEEK_HOLE)` over the
//!   file range finds the holes, which read zero;
//! - a **private anonymous** region ([`GuestRegion::is_anonymous`]): `/proc/self/pagemap` says
//!   which pages are neither present nor swapped, which read zero.
//!
//! A page found here may be written the next moment; the dirty log reports it then, as it
//! reports any page written after the source looked at it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::mem::{GuestMemoryMap, GuestRegion};
use crate::pages::PageRange;

/// Bit 63 of a pagemap entry: the page is present.
const PM_PRESENT: u64 = 1 << 63;
/// Bit 62: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// Host page size that pagemap entries describe.
const HOST_PAGE: u64 = 4096;

/// Finds holes for one session (keeps `/proc/self/pagemap` open).
#[derive(Debug)]
pub struct Holes {
    pagemap: Option<File>,
    buf: Vec<u64>,
}

impl Holes {
    /// Opens what the lookups need; a host without `/proc/self/pagemap` finds no holes in
    /// anonymous memory (its pages are then read and hashed, as any page).
    pub fn new() -> Holes {
        Holes {
            pagemap: File::open("/proc/self/pagemap").ok(),
            buf: Vec::new(),
        }
    }

    /// Marks in `out` (one entry per page of `range`, cleared first) the pages known to read
    /// zero. Returns false when nothing can be known for this region (then `out` is all false).
    pub fn find(&mut self, map: &GuestMemoryMap, range: &PageRange, out: &mut Vec<bool>) -> bool {
        out.clear();
        out.resize(range.npages as usize, false);
        let Ok(region) = map.region(range.region) else {
            return false;
        };
        let page = map.page_size().bytes();
        if let Some((fd, offset)) = region.memfd() {
            return file_holes(fd, offset + range.first.0 * page, page, out);
        }
        if region.is_anonymous() && page.is_multiple_of(HOST_PAGE) {
            return self.anon_holes(region, range, page, out);
        }
        false
    }

    fn anon_holes(
        &mut self,
        region: &GuestRegion,
        range: &PageRange,
        page: u64,
        out: &mut [bool],
    ) -> bool {
        let Some(pm) = &self.pagemap else {
            return false;
        };
        let per = (page / HOST_PAGE) as usize;
        let start = region.host_ptr() as u64 + range.first.0 * page;
        let n = out.len() * per;
        self.buf.clear();
        self.buf.resize(n, 0);
        let bytes = bytemuck::cast_slice_mut::<u64, u8>(&mut self.buf);
        if pm.read_exact_at(bytes, start / HOST_PAGE * 8).is_err() {
            return false;
        }
        for (i, hole) in out.iter_mut().enumerate() {
            *hole = self.buf[i * per..(i + 1) * per]
                .iter()
                .all(|&e| e & (PM_PRESENT | PM_SWAPPED) == 0);
        }
        true
    }
}

impl Holes {
    /// True if the kernel holds no data for any page of `map` (a destination's memory that
    /// nothing wrote yet: see [`crate::vm::DestinationVm::memory_starts_zero`]). False when
    /// some page holds data or when it cannot be known.
    pub fn all_zero(&mut self, map: &GuestMemoryMap) -> bool {
        let mut out = Vec::new();
        map.regions().iter().enumerate().all(|(i, r)| {
            let range = PageRange {
                region: crate::mem::RegionId(i as u32),
                first: crate::mem::PageIndex(0),
                npages: r.pages(map.page_size()),
            };
            self.find(map, &range, &mut out) && out.iter().all(|&h| h)
        })
    }
}

impl Default for Holes {
    fn default() -> Self {
        Self::new()
    }
}

/// Marks the pages of `out.len()` pages of `page` bytes from file offset `start` of `fd` that
/// lie entirely in holes.
fn file_holes(fd: std::os::fd::RawFd, start: u64, page: u64, out: &mut [bool]) -> bool {
    let end = start + out.len() as u64 * page;
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a descriptor the VMM keeps open for the region; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        let data = if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                return false; // SEEK_DATA unsupported here: know nothing
            }
            end // no data past pos: a hole to the end
        } else {
            (data as u64).min(end)
        };
        // Pages wholly inside the hole pos..data.
        let first = (pos - start).div_ceil(page);
        let last = (data - start) / page;
        for hole in out.iter_mut().take(last as usize).skip(first as usize) {
            *hole = true;
        }
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let next = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if next < 0 {
            return true;
        }
        pos = next as u64;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{MmapBacking, MmapRegion, PageIndex, RegionId};

    fn check(backing: MmapBacking) {
        let m = MmapRegion::new(64 * 4096, backing, false).unwrap();
        let map = crate::mem::test_map(&m);
        for p in [0usize, 5, 6, 63] {
            // SAFETY: page p of our own mapping.
            unsafe { m.as_ptr().add(p * 4096 + 8).write_volatile(1) };
        }
        let mut h = Holes::new();
        let mut out = Vec::new();
        let all = PageRange {
            region: RegionId(0),
            first: PageIndex(0),
            npages: 64,
        };
        assert!(h.find(&map, &all, &mut out), "{backing:?}: nothing known");
        let holes: Vec<usize> = (0..64).filter(|&i| out[i]).collect();
        let expect: Vec<usize> = (0..64).filter(|i| ![0, 5, 6, 63].contains(i)).collect();
        assert_eq!(holes, expect, "{backing:?}");
        let part = PageRange {
            region: RegionId(0),
            first: PageIndex(4),
            npages: 4,
        };
        assert!(h.find(&map, &part, &mut out));
        assert_eq!(out, [true, false, false, true], "{backing:?}");
    }

    #[test]
    fn all_zero_only_while_nothing_was_written() {
        for backing in [MmapBacking::Anonymous, MmapBacking::Memfd] {
            let m = MmapRegion::new(32 * 4096, backing, false).unwrap();
            let map = crate::mem::test_map(&m);
            assert!(Holes::new().all_zero(&map), "{backing:?}");
            // SAFETY: page 20 of our own mapping.
            unsafe { m.as_ptr().add(20 * 4096).write_volatile(1) };
            assert!(!Holes::new().all_zero(&map), "{backing:?}");
        }
    }

    #[test]
    fn untouched_pages_are_holes_in_anonymous_and_memfd_memory() {
        check(MmapBacking::Anonymous);
        check(MmapBacking::Memfd);
    }
}
