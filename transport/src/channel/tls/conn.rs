//! An established TLS connection: the kernel's TLS (the socket itself then encrypts, and raw
//! `writev`/`recv` on it stay zero-copy) or the user-space record layer of [`super::record`].
//!
//! In user space, reads and writes go on at once from different threads (a sender and the
//! cancel watcher, a fault thread and its reader): each direction has its own state and lock.
//! A write holds its direction's lock from sealing to the socket, so records go out in order.
//! Guest memory is copied with raw pointers (no `&[u8]` over memory a guest may be writing)
//! into one bounded buffer per direction ([`BOUNCE`]).

use std::io::{self, Read, Write};
use std::sync::{Mutex, MutexGuard};

use super::record::{Opener, Sealer};
use crate::channel::Stream;

/// The buffer between guest memory and the socket, each way (user-space TLS only).
pub const BOUNCE: usize = super::record::BUFFER;

/// A TLS connection over a TCP or Unix stream.
pub struct TlsStream {
    sock: Stream,
    /// `None`: kernel TLS.
    user: Option<User>,
}

struct User {
    tx: Mutex<Sealer>,
    rx: Mutex<Opener>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsStream({}, {:?})", self.kind(), self.sock)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsStream {
    pub(super) fn user(sock: Stream, tx: Sealer, rx: Opener) -> TlsStream {
        TlsStream {
            sock,
            user: Some(User {
                tx: Mutex::new(tx),
                rx: Mutex::new(rx),
            }),
        }
    }

    pub(super) fn kernel(sock: Stream) -> TlsStream {
        TlsStream { sock, user: None }
    }

    /// The socket underneath (options, shutdown, addresses; with kernel TLS, all I/O).
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// `"ktls"` or `"rustls"` (the handshake and keys are rustls's either way): who encrypts.
    pub fn kind(&self) -> &'static str {
        if self.user.is_some() {
            "rustls"
        } else {
            "ktls"
        }
    }

    /// Reads plaintext (at most `buf.len()` bytes; 0 at the end of the stream).
    pub fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(u) = &self.user else {
            return (&self.sock).read(buf);
        };
        // SAFETY: `buf` is writable for its length.
        unsafe { lock(&u.rx).take(&self.sock, buf.as_mut_ptr(), buf.len()) }
    }

    /// Writes all of `data`.
    pub fn write_plain(&self, data: &[u8]) -> io::Result<()> {
        let Some(u) = &self.user else {
            return (&self.sock).write_all(data);
        };
        let mut tx = lock(&u.tx);
        // SAFETY: `data` is readable for its length.
        unsafe { tx.push(&self.sock, data.as_ptr(), data.len()) }?;
        tx.flush(&self.sock)
    }

    /// Writes every byte `iov` describes (sealed into records with the user-space layer;
    /// `writev` straight from the memory with kernel TLS).
    ///
    /// # Safety
    /// Every iovec must describe memory readable for its length for the duration of the call.
    pub unsafe fn writev_all(&self, iov: &mut [libc::iovec]) -> io::Result<()> {
        let Some(u) = &self.user else {
            // SAFETY: the caller's guarantee, passed on.
            return unsafe { self.sock.writev_all(iov) };
        };
        let mut tx = lock(&u.tx);
        for v in iov.iter() {
            // SAFETY: the caller guarantees each iovec is readable for its length.
            unsafe { tx.push(&self.sock, v.iov_base.cast(), v.iov_len) }?;
        }
        tx.flush(&self.sock)
    }

    /// Reads exactly `len` bytes into `ptr`.
    ///
    /// # Safety
    /// `ptr` must be writable for `len` bytes for the duration of the call.
    pub unsafe fn recv_exact(&self, ptr: *mut u8, len: usize) -> io::Result<()> {
        let Some(u) = &self.user else {
            // SAFETY: the caller's guarantee, passed on.
            return unsafe { self.sock.recv_exact(ptr, len) };
        };
        let mut rx = lock(&u.rx);
        let mut done = 0usize;
        while done < len {
            // SAFETY: `ptr + done .. ptr + len` is inside the caller's writable range.
            let n = unsafe { rx.take(&self.sock, ptr.add(done), len - done) }?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("stream closed after {done} of {len} bytes"),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Tells the peer no more data follows (TLS `close_notify`), unless a writer is busy.
    pub(crate) fn close_notify(&self) {
        let Some(u) = &self.user else { return };
        if let Ok(mut tx) = u.tx.try_lock() {
            let _ = tx.close_notify(&self.sock);
        }
    }
}
