//! A userfaultfd over raw ioctls: open (syscall, or `/dev/userfaultfd`), the API handshake
//! with a check of what the kernel supports, register/unregister in MISSING mode (private
//! anonymous memory: pages installed with `UFFDIO_COPY`) or MINOR mode (memfd memory: the page
//! is already in the page cache, written through a second mapping, and `UFFDIO_CONTINUE` maps
//! it without a copy), zero pages with `UFFDIO_ZEROPAGE`, batched event reads, typed partial
//! progress, and `UFFDIO_WAKE`. The kernel's definitions (ioctl codes, structs) are in
//! `uffd/sys.rs`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::error::{Error, Result};

mod sys;

pub use sys::UFFD_FEATURE_MINOR_SHMEM;
use sys::{
    UffdMsg, UffdioApi, UffdioContinue, UffdioCopy, UffdioRange, UffdioRegister, UffdioZeropage,
    NEED_API_IOCTLS, NEED_MINOR_IOCTLS, NEED_MISSING_IOCTLS, UFFDIO_API, UFFDIO_CONTINUE,
    UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE, UFFD_API, UFFD_EVENT_PAGEFAULT,
    UFFD_FEATURE_MISSING_SHMEM, USERFAULTFD_IOC_NEW,
};

/// Outcome of one `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Every byte was installed.
    Done,
    /// The first `n` bytes were installed; the page after them needs another look.
    Partial(usize),
    /// The first page is already present (another thread installed it): wake its waiters.
    Exists,
}

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

fn open_fd() -> Result<OwnedFd> {
    // SAFETY: the userfaultfd syscall takes flags only; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: a fresh descriptor owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let sys_err = std::io::Error::last_os_error();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| {
            Error::PostcopyUnavailable(format!(
                "userfaultfd(2) failed ({sys_err}) and /dev/userfaultfd cannot be opened ({e}); \
             run as root, or set vm.unprivileged_userfaultfd=1, or give access to /dev/userfaultfd"
            ))
        })?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument; the result is checked.
    let fd = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW,
            libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(Error::PostcopyUnavailable(format!(
            "USERFAULTFD_IOC_NEW on /dev/userfaultfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Uffd {
    /// Opens a userfaultfd and completes the API handshake, failing with what is missing.
    pub fn open() -> Result<Uffd> {
        Uffd::open_with(0)
    }

    /// Opens a userfaultfd with MINOR mode on shmem enabled (for memfd guest memory), or
    /// fails saying the kernel lacks it.
    pub fn open_minor() -> Result<Uffd> {
        Uffd::open_with(UFFD_FEATURE_MINOR_SHMEM)
    }

    /// True if this kernel offers minor faults on shmem (memfd) memory.
    pub fn minor_supported() -> bool {
        Uffd::open().is_ok_and(|u| u.features & UFFD_FEATURE_MINOR_SHMEM != 0)
    }

    fn open_with(features: u64) -> Result<Uffd> {
        let fd = open_fd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a uffdio_api we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(Error::PostcopyUnavailable(format!(
                "UFFDIO_API handshake (features {features:#x}{}): {}",
                if features & UFFD_FEATURE_MINOR_SHMEM != 0 {
                    ", minor faults on memfd memory: kernel 5.13 or later"
                } else {
                    ""
                },
                std::io::Error::last_os_error()
            )));
        }
        if api.ioctls & NEED_API_IOCTLS != NEED_API_IOCTLS {
            return Err(Error::PostcopyUnavailable(format!(
                "the kernel's userfaultfd lacks register/unregister (ioctls {:#x})",
                api.ioctls
            )));
        }
        Ok(Uffd {
            fd,
            features: api.features,
        })
    }

    /// Checks that userfaultfd is usable here (open + handshake + a test registration).
    pub fn probe() -> Result<()> {
        let u = Uffd::open()?;
        let page = 4096usize;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::os("mmap(userfaultfd probe)"));
        }
        // SAFETY: the range is our own mapping of one page.
        let r = unsafe { u.register(p.cast(), page) };
        // SAFETY: unmapping the page mapped above; nothing else refers to it.
        unsafe { libc::munmap(p, page) };
        r
    }

    /// Features the kernel reported in the handshake.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `len` bytes at `start` in MISSING mode, checking COPY, ZEROPAGE and WAKE are
    /// supported.
    ///
    /// # Safety
    /// `start..start+len` must be a page-aligned range of this process's anonymous private
    /// mappings that stays mapped while registered; accesses to its missing pages block until
    /// this descriptor resolves them (or is closed).
    pub unsafe fn register(&self, start: *mut u8, len: usize) -> Result<()> {
        let shmem = if self.features & UFFD_FEATURE_MISSING_SHMEM != 0 {
            "supported by this kernel but not requested"
        } else {
            "not supported by this kernel"
        };
        let hint = format!(
            "private anonymous guest memory, or memfd memory declared with GuestRegion::with_memfd \
             (shared memory in missing mode needs UFFD_FEATURE_MISSING_SHMEM, {shmem})"
        );
        // SAFETY: the caller's guarantees are this function's.
        unsafe {
            self.register_mode(
                start,
                len,
                UFFDIO_REGISTER_MODE_MISSING,
                &NEED_MISSING_IOCTLS,
                &hint,
            )
        }
    }

    /// UFFDIO_REGISTER of a range in `mode`, checking the range supports the `need` ioctls.
    ///
    /// # Safety
    /// As for [`Uffd::register`] (missing mode) or [`Uffd::register_minor`].
    unsafe fn register_mode(
        &self,
        start: *mut u8,
        len: usize,
        mode: u64,
        need: &[(u64, &str)],
        hint: &str,
    ) -> Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        let what = if mode == UFFDIO_REGISTER_MODE_MINOR {
            "minor"
        } else {
            "missing"
        };
        // The caller vouches for the range.
        // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register we own.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(Error::PostcopyUnavailable(format!(
                "UFFDIO_REGISTER ({what} mode) of {len} bytes at {start:p}: {} (needs {hint})",
                std::io::Error::last_os_error()
            )));
        }
        let missing: Vec<&str> = need
            .iter()
            .filter(|(b, _)| reg.ioctls & b == 0)
            .map(|(_, n)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(Error::PostcopyUnavailable(format!(
                "range registered in {what} mode does not support {}",
                missing.join(", ")
            )));
        }
        Ok(())
    }

    /// Unregisters a range registered before.
    pub fn unregister(&self, start: *mut u8, len: usize) -> Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // Unregistering only makes the range fault normally again.
        // SAFETY: UFFDIO_UNREGISTER reads a uffdio_range we own.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) } != 0 {
            return Err(Error::os("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Waits up to `timeout` for fault events and appends the faulting addresses (at most
    /// `max`) to `out`. Returns how many were read (0 on timeout).
    pub fn read_faults(&self, out: &mut Vec<u64>, max: usize, timeout: Duration) -> Result<usize> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one pollfd we own.
        let n = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as libc::c_int,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(Error::Os {
                op: "poll(userfaultfd)",
                source: e,
            });
        }
        if n == 0 {
            return Ok(0);
        }
        self.try_read_faults(out, max)
    }

    /// Appends pending fault addresses (at most `max`) to `out` without waiting.
    pub fn try_read_faults(&self, out: &mut Vec<u64>, max: usize) -> Result<usize> {
        let mut msgs = [UffdMsg::default(); 64];
        let want = max.clamp(1, msgs.len());
        // SAFETY: reading whole uffd_msg records into our own buffer of `want` records.
        let got = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                want * size_of::<UffdMsg>(),
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::Interrupted
            {
                return Ok(0);
            }
            return Err(Error::Os {
                op: "read(userfaultfd)",
                source: e,
            });
        }
        let mut count = 0;
        for m in &msgs[..got as usize / size_of::<UffdMsg>()] {
            if m.event == UFFD_EVENT_PAGEFAULT {
                out.push(m.address);
                count += 1;
            }
        }
        Ok(count)
    }

    /// Installs `len` bytes from `src` at `dst` (page-aligned) and wakes the waiters.
    ///
    /// # Safety
    /// `dst..dst+len` must lie in a range registered with this descriptor; `src` must be
    /// readable for `len` bytes.
    pub unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<CopyOutcome> {
        loop {
            let mut c = UffdioCopy {
                dst: dst as u64,
                src: src as u64,
                len: len as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `src` and fills `dst`, both vouched for by the caller.
            if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) } == 0 {
                return Ok(CopyOutcome::Done);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                _ if c.copy > 0 => return Ok(CopyOutcome::Partial(c.copy as usize)),
                Some(libc::EEXIST) => return Ok(CopyOutcome::Exists),
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => {
                    return Err(Error::Os {
                        op: "UFFDIO_COPY",
                        source: e,
                    })
                }
            }
        }
    }

    /// Maps zero pages over `len` bytes at `dst` (page-aligned, in a range registered with
    /// this descriptor in MISSING mode) and wakes the waiters: the pages read as zeros, with
    /// nothing copied. The outcomes are [`Uffd::copy`]'s: a page already present at `dst` is
    /// [`CopyOutcome::Exists`] (wake its waiters), one found after some pages were mapped ends a
    /// [`CopyOutcome::Partial`], and an interrupted call (`EAGAIN`/`EINTR` with nothing mapped)
    /// is retried.
    ///
    /// Safe, unlike [`Uffd::copy`]: it reads no caller memory, and it fills only pages of a
    /// registered range that have none yet, so no memory that anything holds changes.
    pub fn zeropage(&self, dst: *mut u8, len: usize) -> Result<CopyOutcome> {
        loop {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: dst as u64,
                    len: len as u64,
                },
                mode: 0,
                zeropage: 0,
            };
            // It maps zero pages only where a range registered with this descriptor has none.
            // SAFETY: UFFDIO_ZEROPAGE reads and writes a uffdio_zeropage we own.
            if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) } == 0 {
                return Ok(CopyOutcome::Done);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                _ if z.zeropage > 0 => return Ok(CopyOutcome::Partial(z.zeropage as usize)),
                Some(libc::EEXIST) => return Ok(CopyOutcome::Exists),
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => {
                    return Err(Error::Os {
                        op: "UFFDIO_ZEROPAGE",
                        source: e,
                    })
                }
            }
        }
    }

    /// Registers `len` bytes of a shared memfd mapping at `start` in MINOR mode: an access to
    /// a page whose page-table entry is absent (never mapped here, or dropped with
    /// `MADV_DONTNEED`) waits until [`Uffd::continue_range`] maps the page-cache page. Needs a
    /// descriptor from [`Uffd::open_minor`].
    ///
    /// # Safety
    /// `start..start+len` must be a page-aligned range of a shared memfd mapping that stays
    /// mapped while registered; every page of it must exist in the page cache (an absent page
    /// would be a MISSING fault, which this registration does not catch).
    pub unsafe fn register_minor(&self, start: *mut u8, len: usize) -> Result<()> {
        // SAFETY: the caller's guarantees are this function's.
        unsafe {
            self.register_mode(
                start,
                len,
                UFFDIO_REGISTER_MODE_MINOR,
                &NEED_MINOR_IOCTLS,
                "memfd guest memory mapped shared, and a kernel with UFFD_FEATURE_MINOR_SHMEM",
            )
        }
    }

    /// Maps the page-cache pages behind `len` bytes at `start` (registered in MINOR mode) and
    /// wakes the waiters: the page's contents are whatever was written through another
    /// mapping of the memfd.
    pub fn continue_range(&self, start: *mut u8, len: usize) -> Result<CopyOutcome> {
        loop {
            let mut c = UffdioContinue {
                range: UffdioRange {
                    start: start as u64,
                    len: len as u64,
                },
                mode: 0,
                mapped: 0,
            };
            // It only maps existing page-cache pages into a range registered with this descriptor.
            // SAFETY: UFFDIO_CONTINUE reads and writes a uffdio_continue we own.
            if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE, &mut c) } == 0 {
                return Ok(CopyOutcome::Done);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                _ if c.mapped > 0 => return Ok(CopyOutcome::Partial(c.mapped as usize)),
                Some(libc::EEXIST) => return Ok(CopyOutcome::Exists),
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => {
                    return Err(Error::Os {
                        op: "UFFDIO_CONTINUE",
                        source: e,
                    })
                }
            }
        }
    }

    /// Wakes threads waiting on `len` bytes at `start`.
    pub fn wake(&self, start: *mut u8, len: usize) -> Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE reads a uffdio_range we own; waking has no memory effect.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r) } != 0 {
            return Err(Error::os("UFFDIO_WAKE"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::require::{skip, Capability};

    #[test]
    fn copy_installs_and_exists_is_reported() {
        if let Err(e) = Uffd::probe() {
            skip(
                Capability::Uffd,
                "copy_installs_and_exists_is_reported",
                format!("userfaultfd unavailable: {e}"),
            );
            return;
        }
        let u = Uffd::open().unwrap();
        let len = 4 * 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        }
        .cast::<u8>();
        // SAFETY: our own mapping.
        unsafe { u.register(p, len) }.unwrap();
        let src = vec![7u8; 2 * 4096];
        // SAFETY: pages 1..3 of the registered range; src is two pages.
        let done = unsafe { u.copy(p.add(4096), src.as_ptr(), 2 * 4096) };
        assert_eq!(done.unwrap(), CopyOutcome::Done);
        // SAFETY: as above; page 1 is now present.
        let exists = unsafe { u.copy(p.add(4096), src.as_ptr(), 4096) };
        assert_eq!(exists.unwrap(), CopyOutcome::Exists);
        // SAFETY: page 0 is missing, page 1 present: a partial copy of one page.
        let partial = unsafe { u.copy(p, src.as_ptr(), 2 * 4096) };
        assert_eq!(partial.unwrap(), CopyOutcome::Partial(4096));
        // SAFETY: page 1 was installed above; reading it does not fault.
        assert_eq!(unsafe { p.add(4096).read_volatile() }, 7);
        u.wake(p, len).unwrap();
        u.unregister(p, len).unwrap();
        // SAFETY: unmapping the mapping created above.
        unsafe { libc::munmap(p.cast(), len) };
    }

    #[test]
    fn zeropage_resolves_a_fault_and_exists_is_reported() {
        if let Err(e) = Uffd::probe() {
            skip(
                Capability::Uffd,
                "zeropage_resolves_a_fault_and_exists_is_reported",
                format!("userfaultfd unavailable: {e}"),
            );
            return;
        }
        let u = Uffd::open().unwrap();
        let len = 2 * 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        }
        .cast::<u8>();
        // SAFETY: our own mapping.
        unsafe { u.register(p, len) }.unwrap();
        // SAFETY: page 1 of the mapping.
        let page1 = unsafe { p.add(4096) };
        let at = page1 as usize + 100;
        // SAFETY: page 1 is mapped for the whole test; the read blocks until it is resolved.
        let reader = std::thread::spawn(move || unsafe { (at as *const u8).read_volatile() });
        let mut faults = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while faults.is_empty() && std::time::Instant::now() < deadline {
            u.read_faults(&mut faults, 8, Duration::from_millis(100))
                .unwrap();
        }
        let first = u.zeropage(page1, 4096);
        if first.as_ref().ok() != Some(&CopyOutcome::Done) {
            // Release the reader (unregistering wakes it) before the asserts below fail.
            u.unregister(p, len).unwrap();
        }
        let read = reader.join().unwrap();
        assert_eq!(faults.first().map(|a| a & !4095), Some(page1 as u64));
        assert_eq!(first.unwrap(), CopyOutcome::Done);
        assert_eq!(read, 0);
        assert_eq!(u.zeropage(page1, 4096).unwrap(), CopyOutcome::Exists);
        // SAFETY: page 1 is present now.
        assert_eq!(unsafe { page1.add(4095).read_volatile() }, 0);
        u.unregister(p, len).unwrap();
        // SAFETY: unmapping the mapping created above.
        unsafe { libc::munmap(p.cast(), len) };
    }

    #[test]
    fn minor_mode_maps_what_the_second_mapping_wrote() {
        if !Uffd::minor_supported() {
            skip(
                Capability::UffdMinor,
                "minor_mode_maps_what_the_second_mapping_wrote",
                "userfaultfd minor faults on shmem unavailable",
            );
            return;
        }
        use crate::mem::{GuestAddress, GuestMemoryMap, MmapBacking, MmapRegion, PageSize};
        let len = 4 * 4096usize;
        let guest = MmapRegion::new(len as u64, MmapBacking::Memfd, false).unwrap();
        // SAFETY: `guest` outlives the map in this test.
        let region = unsafe { guest.guest_region(GuestAddress(0)) };
        let map = GuestMemoryMap::new(vec![region], PageSize::KIB4).unwrap();
        let alias = crate::postcopy::AliasMap::for_guest(&map)
            .unwrap()
            .expect("memfd-backed");
        let view = alias.map().regions()[0].host_ptr();
        let u = Uffd::open_minor().unwrap();
        let p = guest.as_ptr();
        // SAFETY: a shared memfd mapping whose pages for_guest allocated.
        unsafe { u.register_minor(p, len) }.unwrap();
        // SAFETY: page 2 of the second mapping, which is not registered.
        unsafe { view.add(2 * 4096).write_bytes(9, 4096) };
        // SAFETY: page 2 of the registered range.
        let page2 = unsafe { p.add(2 * 4096) };
        assert_eq!(u.continue_range(page2, 4096).unwrap(), CopyOutcome::Done);
        // SAFETY: page 2 is mapped now: the guest sees what the second mapping wrote.
        assert_eq!(unsafe { p.add(2 * 4096 + 17).read_volatile() }, 9);
        let again = u.continue_range(page2, 4096).unwrap();
        assert_eq!(again, CopyOutcome::Exists);
        u.unregister(p, len).unwrap();
    }
}
