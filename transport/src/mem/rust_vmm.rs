//! An adapter from rust-vmm's `vm-memory` (cargo feature `vm-memory`): the
//! `GuestMemoryMmap` that VMMs such as Cloud Hypervisor and Firecracker already hold becomes a
//! [`GuestMemoryMap`], one [`GuestRegion`] per `GuestRegionMmap`, in the collection's order.
//!
//! A region mapped shared from a shmem file (a memfd, or a file on tmpfs) is declared with
//! [`GuestRegion::with_memfd`], so post-copy takes the zero-copy path (a second mapping and
//! `UFFDIO_CONTINUE`) for it; every other region is plain memory.
//!
//! The transport writes guest memory through raw pointers: what a destination receives is not
//! recorded in a `vm-memory` dirty bitmap (`GuestMemoryMmap<B>` with `B != ()`), just as
//! `MmapRegion::as_ptr` documents for every pointer it hands out.

use std::os::fd::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{GuestAddress, GuestMemoryMap, GuestRegion, PageSize};
use crate::error::{Error, Result};

/// `TMPFS_MAGIC`: the `f_type` of shmem files (memfds included), which MINOR mode supports.
const TMPFS_MAGIC: libc::c_long = 0x0102_1994;

impl GuestMemoryMap {
    /// Builds the map of `mem`'s regions with `page` as the migration page size, checking
    /// what [`GuestMemoryMap::new`] checks and that every region is mapped readable and
    /// writable.
    ///
    /// # Safety
    /// The map borrows `mem`'s mappings (and the files behind them) without a lifetime: the
    /// caller must keep `mem`, or a clone of it (clones share the mappings), alive for as long
    /// as the map or any session it is handed to is used.
    pub unsafe fn from_vm_memory<B: Bitmap>(
        mem: &GuestMemoryMmap<B>,
        page: PageSize,
    ) -> Result<GuestMemoryMap> {
        let mut regions = Vec::with_capacity(mem.num_regions());
        for r in mem.iter() {
            let gpa = r.start_addr().0;
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            if r.prot() & rw != rw {
                return Err(Error::InvalidConfig(format!(
                    "vm-memory region at {gpa:#x} is not mapped readable and writable (prot {:#x})",
                    r.prot()
                )));
            }
            // as_ptr/len are the region's live mapping, readable and writable (checked above).
            // SAFETY: the caller keeps `mem`, and so the mapping, alive.
            let region = unsafe { GuestRegion::new(GuestAddress(gpa), r.as_ptr(), r.len()) };
            let region = match r.file_offset() {
                Some(f) if r.flags() & libc::MAP_SHARED != 0 && is_shmem(f.file())? => {
                    // The region is a MAP_SHARED mapping of this file at this offset (vm-memory
                    // maps it so), and the file lives as long as `mem`, which the caller keeps.
                    // SAFETY: the region is exactly that mapping of that fd.
                    unsafe { region.with_memfd(f.file().as_raw_fd(), f.start()) }
                }
                _ => region,
            };
            regions.push(region);
        }
        GuestMemoryMap::new(regions, page)
    }
}

/// True if `file` is a shmem file (memfd or tmpfs).
fn is_shmem(file: &std::fs::File) -> Result<bool> {
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills the statfs we own for an fd we hold open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::os("fstatfs(vm-memory region file)"));
    }
    Ok(st.f_type == TMPFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::FromRawFd;

    use vm_memory::{Bytes, FileOffset, GuestAddress as VmAddress};

    use super::*;

    fn memfd(len: u64) -> File {
        let name = CString::new("rdmig-vm-memory-test").unwrap();
        // SAFETY: memfd_create with a valid name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn regions_pointers_and_memfds_come_from_the_vmm() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([
            (VmAddress(0), 64 << 10, None),
            (
                VmAddress(1 << 20),
                128 << 10,
                Some(FileOffset::new(memfd(192 << 10), 64 << 10)),
            ),
        ])
        .unwrap();
        // SAFETY: `mem` outlives the map (both dropped at the end of the test).
        let map = unsafe { GuestMemoryMap::from_vm_memory(&mem, PageSize::KIB4) }.unwrap();
        let r = map.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].gpa(), r[0].len()), (GuestAddress(0), 64 << 10));
        assert_eq!((r[1].gpa(), r[1].len()), (GuestAddress(1 << 20), 128 << 10));
        assert_eq!(r[0].memfd(), None);
        let (fd, offset) = r[1].memfd().expect("the shared memfd region is declared");
        assert_eq!(offset, 64 << 10);
        let file = mem.iter().nth(1).unwrap().file_offset().unwrap().file();
        assert_eq!(fd, file.as_raw_fd());
        assert_eq!(map.total_pages(), 48);

        // What the VMM writes at a guest address is what the transport sees at the host pointer.
        mem.write_obj(0xA5u8, VmAddress(4096 + 7)).unwrap();
        mem.write_obj(0x5Au8, VmAddress((1 << 20) + 3 * 4096))
            .unwrap();
        // SAFETY: offsets inside the live mappings.
        unsafe {
            assert_eq!(r[0].host_ptr().add(4096 + 7).read_volatile(), 0xA5);
            assert_eq!(r[1].host_ptr().add(3 * 4096).read_volatile(), 0x5A);
        }
    }

    #[test]
    fn misaligned_regions_are_refused_as_for_any_map() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(VmAddress(0x3000), 64 << 10)]).unwrap();
        let page = PageSize::new(64 << 10).unwrap();
        // SAFETY: `mem` outlives the (refused) map.
        let e = unsafe { GuestMemoryMap::from_vm_memory(&mem, page) }.unwrap_err();
        assert!(e.to_string().contains("not aligned"), "{e}");
    }
}
