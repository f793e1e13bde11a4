//! Guest memory as the transport sees it: regions of guest physical address space
//! backed by host memory, with the page size as a parameter.
//!
//! The transport never owns a VMM's memory. A VMM describes each region with a
//! [`GuestRegion`] (guest physical address, host address, length); the constructor is
//! `unsafe` because the VMM vouches that the host range stays mapped while the
//! migration runs. [`MmapRegion`] is an owned anonymous or memfd-backed mapping that
//! VMMs without their own allocator (and the tests) can use. With the cargo feature
//! `vm-memory`, `GuestMemoryMap::from_vm_memory` builds the map from the `GuestMemoryMmap`
//! that rust-vmm VMMs hold. Memory the guest may be writing is read through [`volatile`],
//! never as a `&[u8]`.

pub mod holes;
mod host;
mod mmap;
#[cfg(feature = "vm-memory")]
mod rust_vmm;
pub mod volatile;

pub use host::HostMemory;
#[cfg(test)]
pub(crate) use mmap::test_map;
pub use mmap::{prefault, MmapBacking, MmapRegion};

use crate::error::{Error, Result};
use std::os::fd::RawFd;

/// A guest physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestAddress(pub u64);

impl GuestAddress {
    /// The address `off` bytes further on, or `None` on overflow.
    pub fn checked_add(self, off: u64) -> Option<GuestAddress> {
        self.0.checked_add(off).map(GuestAddress)
    }
}

/// The page size used for dirty tracking and transfer: a power of two between 4 KiB and 1 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageSize(u32);

impl PageSize {
    /// 4 KiB, the default.
    pub const KIB4: PageSize = PageSize(4096);

    /// A page size, checked to be a power of two in 4 KiB..=1 GiB.
    pub fn new(bytes: u64) -> Result<PageSize> {
        if !bytes.is_power_of_two() || !(4096..=1 << 30).contains(&bytes) {
            return Err(Error::InvalidConfig(format!(
                "page size {bytes} is not a power of two between 4096 and 1073741824"
            )));
        }
        Ok(PageSize(bytes as u32))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// log2 of the size.
    pub fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// Number of pages needed to cover `len` bytes.
    pub fn pages_in(self, len: u64) -> u64 {
        len.div_ceil(self.bytes())
    }
}

impl Default for PageSize {
    fn default() -> Self {
        PageSize::KIB4
    }
}

/// Index of a page inside one region (0 is the region's first page).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageIndex(pub u64);

/// Index of a region in the region table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RegionId(pub u32);

/// One region of guest memory: where the guest sees it and where the host mapped it.
#[derive(Clone, Copy, Debug)]
pub struct GuestRegion {
    gpa: GuestAddress,
    host: *mut u8,
    len: u64,
    /// The memfd and offset behind a shared mapping, when the VMM says so.
    memfd: Option<(RawFd, u64)>,
    /// A private anonymous mapping, when the VMM says so.
    anonymous: bool,
}

// SAFETY: a GuestRegion is a description of memory whose validity the VMM vouched for in
// `GuestRegion::new`; the memory is shared with the guest anyway, and every access through it
// goes through raw-pointer reads and writes that tolerate concurrent guest writes.
unsafe impl Send for GuestRegion {}
// SAFETY: as for Send; the struct itself is immutable.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Describes a region of guest memory.
    ///
    /// # Safety
    /// `host` must point to `len` bytes mapped readable and writable in this process, and they
    /// must stay mapped until every migration session that was handed this region has been
    /// dropped. The guest (or other threads) may write the memory concurrently; the transport
    /// only touches it through raw pointers and system calls.
    pub unsafe fn new(gpa: GuestAddress, host: *mut u8, len: u64) -> GuestRegion {
        GuestRegion {
            gpa,
            host,
            len,
            memfd: None,
            anonymous: false,
        }
    }

    /// Says that the region is a private anonymous mapping: a page that is neither mapped
    /// (`/proc/self/pagemap`) nor swapped out reads zero, so the source finds such pages zero
    /// without reading them ([`holes`]).
    ///
    /// # Safety
    /// The region must be part of a `MAP_PRIVATE | MAP_ANONYMOUS` mapping.
    pub unsafe fn with_anonymous(self) -> GuestRegion {
        GuestRegion {
            anonymous: true,
            ..self
        }
    }

    /// True if [`GuestRegion::with_anonymous`] said so.
    pub fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// Says that the region is a shared mapping of `fd` at `offset`. Post-copy then maps the
    /// memfd a second time, lands fetched pages there and maps them into the guest with
    /// `UFFDIO_CONTINUE` (no copy).
    ///
    /// # Safety
    /// The region must be a `MAP_SHARED` mapping of `len` bytes of `fd` at `offset`, and `fd`
    /// must stay open as long as the region is used.
    pub unsafe fn with_memfd(self, fd: RawFd, offset: u64) -> GuestRegion {
        GuestRegion {
            memfd: Some((fd, offset)),
            ..self
        }
    }

    /// The memfd and offset behind the region, if [`GuestRegion::with_memfd`] said so.
    pub fn memfd(&self) -> Option<(RawFd, u64)> {
        self.memfd
    }

    /// Guest physical start address.
    pub fn gpa(&self) -> GuestAddress {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-length region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the first byte.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host
    }

    /// Number of pages of `page` size covering the region.
    pub fn pages(&self, page: PageSize) -> u64 {
        page.pages_in(self.len)
    }

    /// Host pointer and byte length of `npages` pages from `first`, clipped to the region's end
    /// (its last page may be partial), or an error if the range is not inside the region.
    pub fn page_span(
        &self,
        page: PageSize,
        first: PageIndex,
        npages: u64,
    ) -> Result<(*mut u8, usize)> {
        let total = self.pages(page);
        let end = first.0.checked_add(npages);
        match end {
            Some(end) if npages > 0 && end <= total => {
                let off = first.0 << page.shift();
                let len = (end << page.shift()).min(self.len) - off;
                // off < self.len because first < total.
                // SAFETY: the pointer stays inside the mapping described by `new`'s contract.
                let ptr = unsafe { self.host.add(off as usize) };
                Ok((ptr, len as usize))
            }
            _ => Err(Error::RangeOutOfBounds {
                region: u32::MAX,
                first_page: first.0,
                npages,
                region_pages: total,
            }),
        }
    }
}

/// The ordered set of regions of one VM, with the page size used to migrate it.
#[derive(Clone, Debug)]
pub struct GuestMemoryMap {
    regions: Vec<GuestRegion>,
    page: PageSize,
}

impl GuestMemoryMap {
    /// Builds the map, checking that regions are non-empty, page-aligned and do not overlap.
    pub fn new(regions: Vec<GuestRegion>, page: PageSize) -> Result<GuestMemoryMap> {
        if regions.is_empty() {
            return Err(Error::InvalidConfig(
                "a VM must have at least one memory region".into(),
            ));
        }
        let mut sorted: Vec<_> = regions.iter().map(|r| (r.gpa.0, r.len)).collect();
        sorted.sort_unstable();
        for (i, &(gpa, len)) in sorted.iter().enumerate() {
            if len == 0 || gpa % page.bytes() != 0 {
                return Err(Error::InvalidConfig(format!(
                    "region at {gpa:#x} (len {len}) is empty or not aligned to the {} byte page size",
                    page.bytes()
                )));
            }
            if let Some(&(next, _)) = sorted.get(i + 1) {
                if gpa.checked_add(len).is_none_or(|end| end > next) {
                    return Err(Error::InvalidConfig(format!(
                        "regions at {gpa:#x} and {next:#x} overlap"
                    )));
                }
            }
        }
        Ok(GuestMemoryMap { regions, page })
    }

    /// The regions, in table order.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// The region with this id.
    pub fn region(&self, id: RegionId) -> Result<&GuestRegion> {
        self.regions
            .get(id.0 as usize)
            .ok_or(Error::UnknownRegion(id.0))
    }

    /// The page size.
    pub fn page_size(&self) -> PageSize {
        self.page
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Total pages of guest memory.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.pages(self.page)).sum()
    }

    /// Host pointer and byte length of a page range, checked against the region table.
    pub fn span(
        &self,
        region: RegionId,
        first: PageIndex,
        npages: u64,
    ) -> Result<(*mut u8, usize)> {
        let r = self.region(region)?;
        r.page_span(self.page, first, npages).map_err(|e| match e {
            Error::RangeOutOfBounds {
                first_page,
                npages,
                region_pages,
                ..
            } => Error::RangeOutOfBounds {
                region: region.0,
                first_page,
                npages,
                region_pages,
            },
            other => other,
        })
    }
}
