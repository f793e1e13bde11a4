//! Owned host mappings for guest memory: anonymous private memory, or a memfd mapped
//! shared (so a second mapping of the same pages can exist, as post-copy's zero-copy
//! path needs). Unmapped in `Drop`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{GuestAddress, GuestRegion};
use crate::error::{Error, Result};

/// What backs an [`MmapRegion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmapBacking {
    /// Private anonymous memory.
    Anonymous,
    /// A memfd, mapped shared.
    Memfd,
}

/// An owned mapping of host memory to use as guest memory.
#[derive(Debug)]
pub struct MmapRegion {
    ptr: *mut u8,
    len: usize,
    memfd: Option<OwnedFd>,
}

// SAFETY: the mapping is process-wide memory; MmapRegion hands out only raw pointers.
unsafe impl Send for MmapRegion {}
// SAFETY: as above; no interior state is mutated through &self.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// Maps `len` bytes (rounded up to 4 KiB). `populate` faults every page in now, so that
    /// later writes (a migration receiving into it) do not pay for page faults.
    pub fn new(len: u64, backing: MmapBacking, populate: bool) -> Result<MmapRegion> {
        let len = usize::try_from(len.div_ceil(4096) * 4096).map_err(|_| {
            Error::InvalidConfig(format!("region of {len} bytes does not fit in memory"))
        })?;
        if len == 0 {
            return Err(Error::InvalidConfig("cannot map an empty region".into()));
        }
        let memfd = match backing {
            MmapBacking::Anonymous => None,
            MmapBacking::Memfd => {
                let name = CString::new("rdmig-guest").expect("static name has no NUL");
                // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked.
                let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(Error::os("memfd_create"));
                }
                // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: ftruncate on a valid fd with a non-negative length.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
                    return Err(Error::os("ftruncate(memfd)"));
                }
                Some(fd)
            }
        };
        let (flags, fd) = match &memfd {
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
        };
        // SAFETY: a fresh mapping at an address the kernel chooses; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::os("mmap(guest memory)"));
        }
        let region = MmapRegion {
            ptr: ptr.cast(),
            len,
            memfd,
        };
        if populate {
            region.populate();
        }
        Ok(region)
    }

    /// Faults every page in, so that later writes into it do not pay for page faults.
    /// (Transparent huge pages are not requested: on the paravirtual hosts this runs on,
    /// populating with THP measured twice as slow as with 4 KiB pages.)
    fn populate(&self) {
        if prefault(self.ptr, self.len) {
            return;
        }
        // Kernels without MADV_POPULATE_WRITE (before 5.14): touch the pages.
        for off in (0..self.len).step_by(4096) {
            // Writing zero to fresh memory changes nothing but faults the page in.
            // SAFETY: off < len, inside our writable mapping.
            unsafe { self.ptr.add(off).write_volatile(0) };
        }
    }

    /// Host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings are refused at construction.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd behind a [`MmapBacking::Memfd`] mapping.
    pub fn memfd(&self) -> Option<&OwnedFd> {
        self.memfd.as_ref()
    }

    /// Describes this mapping as a guest region at `gpa`.
    ///
    /// # Safety
    /// The returned region borrows this mapping without a lifetime: the caller must keep
    /// `self` alive for as long as the region (or any session it is handed to) is used.
    pub unsafe fn guest_region(&self, gpa: GuestAddress) -> GuestRegion {
        // SAFETY: ptr/len describe our live mapping; the caller upholds the lifetime.
        let r = unsafe { GuestRegion::new(gpa, self.ptr, self.len as u64) };
        match &self.memfd {
            // A memfd-backed MmapRegion maps the whole memfd shared at offset 0, and the fd lives
            // as long as the mapping, which the caller keeps alive.
            // SAFETY: the region is exactly that mapping of that fd.
            Some(fd) => unsafe { r.with_memfd(fd.as_raw_fd(), 0) },
            // SAFETY: without a memfd the mapping is MAP_PRIVATE | MAP_ANONYMOUS (`new`).
            None => unsafe { r.with_anonymous() },
        }
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping created in `new`, unmapped once.
        if unsafe { libc::munmap(self.ptr.cast(), self.len) } != 0 {
            tracing::warn!(
                "munmap of guest memory failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// A one-region map at GPA 0 over `m`, 4 KiB pages (tests).
#[cfg(test)]
pub(crate) fn test_map(m: &MmapRegion) -> crate::mem::GuestMemoryMap {
    // SAFETY: every test keeps `m` alive while it uses the map.
    let region = unsafe { m.guest_region(GuestAddress(0)) };
    crate::mem::GuestMemoryMap::new(vec![region], crate::mem::PageSize::KIB4).expect("one region")
}

/// Faults `len` bytes of writable memory at `ptr` in (`MADV_POPULATE_WRITE`, Linux 5.14+)
/// without changing a byte. Returns false where the kernel cannot (the pages then fault on
/// first use, as without it).
pub fn prefault(ptr: *mut u8, len: usize) -> bool {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // Advice only: populating never changes memory contents; a bad range fails with an error.
    // SAFETY: madvise validates the range itself and writes no byte of it.
    unsafe { libc::madvise(ptr.cast(), len, MADV_POPULATE_WRITE) == 0 }
}
