//! An established TLS connection: user-space rustls, or kernel TLS (the socket itself then
//! encrypts, and raw `writev`/`recv` on it stay zero-copy).
//!
//! With rustls, reads and writes go on at once from different threads (a sender and the
//! cancel watcher, a fault thread and its reader): the session's state is locked only to hand
//! bytes to and from rustls, never across socket I/O. Writes hold the write side's lock from
//! encryption to the socket, so records go out in order. Guest memory is copied through a
//! bounded bounce buffer with raw pointers (no `&[u8]` over memory a guest may be writing).

use std::io::{self, Read, Write};
use std::sync::{Mutex, MutexGuard};

use rustls::Connection;

use super::handshake::{explain, Side};
use crate::channel::Stream;

/// The bounce buffer between guest memory and rustls, each way.
pub const BOUNCE: usize = 256 << 10;
/// Ciphertext read from the socket at once.
const RAW: usize = 64 << 10;

/// A TLS connection over a TCP or Unix stream.
pub struct TlsStream {
    sock: Stream,
    /// `None`: kernel TLS.
    user: Option<User>,
    side: Side,
}

struct User {
    conn: Mutex<Connection>,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
}

struct Rx {
    raw: Vec<u8>,
    start: usize,
    end: usize,
    bounce: Vec<u8>,
}

struct Tx {
    out: Vec<u8>,
    bounce: Vec<u8>,
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
    pub(super) fn user(sock: Stream, conn: Connection, side: Side) -> TlsStream {
        TlsStream {
            sock,
            user: Some(User {
                conn: Mutex::new(conn),
                rx: Mutex::new(Rx {
                    raw: vec![0; RAW],
                    start: 0,
                    end: 0,
                    bounce: Vec::new(),
                }),
                tx: Mutex::new(Tx {
                    out: Vec::new(),
                    bounce: Vec::new(),
                }),
            }),
            side,
        }
    }

    pub(super) fn kernel(sock: Stream, side: Side) -> TlsStream {
        TlsStream {
            sock,
            user: None,
            side,
        }
    }

    /// The socket underneath (options, shutdown, addresses; with kernel TLS, all I/O).
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// `"ktls"` or `"rustls"`: who encrypts.
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
        let mut rx = lock(&u.rx);
        read_into(u, &mut rx, &self.sock, self.side, buf)
    }

    /// Writes all of `data`.
    pub fn write_plain(&self, data: &[u8]) -> io::Result<()> {
        let Some(u) = &self.user else {
            return (&self.sock).write_all(data);
        };
        let mut tx = lock(&u.tx);
        encrypt_and_send(u, &mut tx.out, &self.sock, data)
    }

    /// Writes every byte `iov` describes (through the bounce buffer with rustls; `writev`
    /// straight from the memory with kernel TLS).
    ///
    /// # Safety
    /// Every iovec must describe memory readable for its length for the duration of the call.
    pub unsafe fn writev_all(&self, iov: &mut [libc::iovec]) -> io::Result<()> {
        let Some(u) = &self.user else {
            // SAFETY: the caller's guarantee, passed on.
            return unsafe { self.sock.writev_all(iov) };
        };
        let mut tx = lock(&u.tx);
        let Tx { out, bounce } = &mut *tx;
        bounce.clear();
        bounce.reserve(BOUNCE);
        for v in iov.iter() {
            let mut done = 0usize;
            while done < v.iov_len {
                let n = (v.iov_len - done).min(BOUNCE - bounce.len());
                let at = bounce.len();
                bounce.resize(at + n, 0);
                // Copied with a raw pointer: the source may be guest memory being written.
                // SAFETY: `v` is readable for its length (the caller's guarantee) and
                // `bounce[at..at + n]` was just sized; the two do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.iov_base.cast::<u8>().add(done),
                        bounce.as_mut_ptr().add(at),
                        n,
                    )
                };
                done += n;
                if bounce.len() == BOUNCE {
                    encrypt_and_send(u, out, &self.sock, bounce)?;
                    bounce.clear();
                }
            }
        }
        if !bounce.is_empty() {
            encrypt_and_send(u, out, &self.sock, bounce)?;
        }
        Ok(())
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
        let mut bounce = std::mem::take(&mut rx.bounce);
        bounce.resize(BOUNCE.min(len.max(1)), 0);
        let mut done = 0usize;
        let r = (|| {
            while done < len {
                let want = (len - done).min(bounce.len());
                let n = read_into(u, &mut rx, &self.sock, self.side, &mut bounce[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("stream closed after {done} of {len} bytes"),
                    ));
                }
                // SAFETY: `ptr + done .. ptr + done + n` is inside the caller's writable
                // `len` bytes; `bounce` is our own buffer and does not overlap it.
                unsafe { std::ptr::copy_nonoverlapping(bounce.as_ptr(), ptr.add(done), n) };
                done += n;
            }
            Ok(())
        })();
        rx.bounce = bounce;
        r
    }

    /// Tells the peer no more data follows (TLS `close_notify`), unless a writer is busy.
    pub(crate) fn close_notify(&self) {
        let Some(u) = &self.user else { return };
        let Ok(mut tx) = u.tx.try_lock() else { return };
        let mut c = lock(&u.conn);
        c.send_close_notify();
        tx.out.clear();
        while c.wants_write() {
            if c.write_tls(&mut tx.out).is_err() {
                return;
            }
        }
        drop(c);
        let _ = (&self.sock).write_all(&tx.out);
    }
}

/// Encrypts `data` (the caller holds the write side) and writes it to the socket.
fn encrypt_and_send(u: &User, out: &mut Vec<u8>, mut sock: &Stream, data: &[u8]) -> io::Result<()> {
    out.clear();
    {
        let mut c = lock(&u.conn);
        c.writer().write_all(data)?;
        while c.wants_write() {
            c.write_tls(out)?;
        }
    }
    sock.write_all(out)
}

/// Plaintext into `buf`: what rustls holds, else ciphertext from the socket (read without
/// holding the session, so writers go on meanwhile).
fn read_into(
    u: &User,
    rx: &mut Rx,
    mut sock: &Stream,
    side: Side,
    buf: &mut [u8],
) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    loop {
        {
            let mut c = lock(&u.conn);
            match c.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if rx.start < rx.end {
                let mut r = &rx.raw[rx.start..rx.end];
                let before = r.len();
                c.read_tls(&mut r)?;
                rx.start += before - r.len();
                c.process_new_packets().map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("TLS: {}", explain(&e, side)),
                    )
                })?;
                continue;
            }
        }
        let n = loop {
            match sock.read(&mut rx.raw) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            // The end of the stream: rustls tells a clean close (close_notify) from a cut one.
            let mut c = lock(&u.conn);
            c.read_tls(&mut &[][..])?;
            return match c.reader().read(buf) {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                Err(e) => Err(e),
            };
        }
        (rx.start, rx.end) = (0, n);
    }
}
