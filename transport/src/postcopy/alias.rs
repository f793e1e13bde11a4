//! Zero-copy post-copy for memfd-backed guest memory: a second, shared mapping of each region's
//! memfd. Fetched pages land there (a TCP receive, or an RDMA READ into a registration of this
//! mapping), i.e. straight into the page cache the guest's mapping shares, and
//! `UFFDIO_CONTINUE` then maps them into the guest (a minor fault resolved, no copy).
//!
//! The guest mapping is registered in MINOR mode, so only pages whose page-table entry is
//! absent fault: [`AliasMap::for_guest`] allocates every page of the memfd first
//! (`fallocate`), so that no access can find a hole and read zeroes behind the service's back.

use std::os::fd::RawFd;

use crate::error::{Error, Result};
use crate::mem::{GuestMemoryMap, GuestRegion};

/// Second mappings of a memfd-backed guest's regions, same layout as the guest map.
#[derive(Debug)]
pub struct AliasMap {
    mappings: Vec<(*mut u8, usize)>,
    map: GuestMemoryMap,
}

// SAFETY: the mappings are plain shared memory owned by this struct; every access goes through
// raw pointers by threads that coordinate through the post-copy page state.
unsafe impl Send for AliasMap {}
// SAFETY: as for Send; the struct is immutable after construction.
unsafe impl Sync for AliasMap {}

impl AliasMap {
    /// Maps every region of `guest` a second time from its memfd, allocating every page of it.
    /// `None` when some region is not memfd-backed (post-copy then uses `UFFDIO_COPY`).
    pub fn for_guest(guest: &GuestMemoryMap) -> Result<Option<AliasMap>> {
        let Some(fds) = guest
            .regions()
            .iter()
            .map(GuestRegion::memfd)
            .collect::<Option<Vec<(RawFd, u64)>>>()
        else {
            return Ok(None);
        };
        let mut out = AliasMap {
            mappings: Vec::with_capacity(fds.len()),
            map: guest.clone(),
        };
        let mut regions = Vec::with_capacity(fds.len());
        for (r, (fd, off)) in guest.regions().iter().zip(fds) {
            let len = usize::try_from(r.len())
                .map_err(|_| Error::InvalidConfig("region too large to map".into()))?;
            // fallocate only allocates pages that are holes, never changes data.
            // SAFETY: the VMM's memfd, inside the range it maps as this region.
            if unsafe { libc::fallocate(fd, 0, off as libc::off_t, len as libc::off_t) } != 0 {
                return Err(Error::os(
                    "fallocate of memfd guest memory (zero-copy post-copy)",
                ));
            }
            // Checked below, owned by `out` and unmapped in its Drop.
            // SAFETY: a new shared mapping of the memfd range the region maps.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    off as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(Error::os("mmap of a second view of memfd guest memory"));
            }
            out.mappings.push((p.cast(), len));
            // The map is only handed out through `out`.
            // SAFETY: `p` maps `len` bytes read-write and stays mapped while `out` lives.
            regions.push(unsafe { GuestRegion::new(r.gpa(), p.cast(), r.len()) });
        }
        out.map = GuestMemoryMap::new(regions, guest.page_size())?;
        Ok(Some(out))
    }

    /// The second mappings, laid out as the guest's regions.
    pub fn map(&self) -> &GuestMemoryMap {
        &self.map
    }
}

impl Drop for AliasMap {
    fn drop(&mut self) {
        for &(p, len) in &self.mappings {
            // SAFETY: exactly a mapping created in `for_guest`, unmapped once.
            if unsafe { libc::munmap(p.cast(), len) } != 0 {
                tracing::warn!(
                    "munmap of a second view of guest memory: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
