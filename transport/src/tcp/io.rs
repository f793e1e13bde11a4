//! Raw-pointer socket I/O into and out of guest memory (no Rust references to memory the
//! guest may be writing).

use std::os::fd::RawFd;

/// Writes every byte described by `iov`, advancing through partial writes. `iov` is consumed.
///
/// # Safety
/// Every iovec must describe memory readable for its length for the duration of the call.
pub unsafe fn writev_all(fd: RawFd, mut iov: &mut [libc::iovec]) -> std::io::Result<()> {
    while !iov.is_empty() {
        let cnt = iov.len().min(libc::UIO_MAXIOV as usize);
        // SAFETY: the caller guarantees the iovecs are readable; cnt is within the slice.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), cnt as libc::c_int) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n as usize;
        while n > 0 {
            let first = &mut iov[0];
            if n >= first.iov_len {
                n -= first.iov_len;
                iov = &mut iov[1..];
            } else {
                // SAFETY: advancing inside the same buffer by fewer bytes than its length.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
                first.iov_len -= n;
                n = 0;
            }
        }
        while iov.first().is_some_and(|v| v.iov_len == 0) {
            iov = &mut iov[1..];
        }
    }
    Ok(())
}

/// Reads exactly `len` bytes into `ptr`.
///
/// # Safety
/// `ptr` must be writable for `len` bytes for the duration of the call.
pub unsafe fn recv_exact(fd: RawFd, ptr: *mut u8, len: usize) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: ptr+done..ptr+len is writable by the caller's guarantee.
        let n = unsafe { libc::recv(fd, ptr.add(done).cast(), len - done, libc::MSG_WAITALL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("stream closed after {done} of {len} bytes"),
            ));
        }
        done += n as usize;
    }
    Ok(())
}
