//! One connection of a migration channel: a TCP or Unix stream socket, or TLS over one.
//!
//! The data paths send and receive through [`Stream::writev_all`] and [`Stream::recv_exact`]:
//! `writev`/`recv(MSG_WAITALL)` on the raw fd for TCP, Unix and kernel TLS (zero-copy from and
//! into guest memory), through the rustls session and a bounded bounce buffer for user-space
//! TLS. What differs between the kinds (Nagle, addresses) is handled here.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use super::tls::TlsStream;
use crate::error::{Error, Result};

/// A connected stream socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix stream socket.
    Unix(UnixStream),
    /// TLS over a TCP or Unix stream (shared by the clones of the connection).
    Tls(Arc<TlsStream>),
}

/// Applies `$e` to the socket (under TLS, the one the session runs over).
macro_rules! both {
    ($s:expr, $x:ident => $e:expr) => {
        match $s {
            Stream::Tcp($x) => $e,
            Stream::Unix($x) => $e,
            Stream::Tls(t) => match t.socket() {
                Stream::Tcp($x) => $e,
                Stream::Unix($x) => $e,
                Stream::Tls(_) => unreachable!("TLS runs over a socket"),
            },
        }
    };
}

impl Stream {
    /// A connected stream socket handed in as a file descriptor (TCP or Unix); anything else
    /// is refused.
    pub fn from_fd(fd: OwnedFd) -> Result<Stream> {
        match socket_kind(fd.as_raw_fd())? {
            (libc::AF_INET | libc::AF_INET6, false) => Ok(Stream::Tcp(TcpStream::from(fd))),
            (libc::AF_UNIX, false) => Ok(Stream::Unix(UnixStream::from(fd))),
            (_, true) => Err(Error::InvalidConfig(
                "the descriptor is a listening socket, not a connected one".into(),
            )),
            (family, _) => Err(Error::InvalidConfig(format!(
                "the descriptor is a socket of address family {family}, not TCP or Unix"
            ))),
        }
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(t) => Stream::Tls(t.clone()),
        })
    }

    /// Shuts the connection down (under TLS, telling the peer first when writes end).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if let (Stream::Tls(t), Shutdown::Write | Shutdown::Both) = (self, how) {
            t.close_notify();
        }
        both!(self, s => s.shutdown(how))
    }

    /// Who encrypts the connection: `""` (nobody), `"rustls"` or `"ktls"`.
    pub fn tls(&self) -> &'static str {
        match self {
            Stream::Tls(t) => t.kind(),
            _ => "",
        }
    }

    /// Writes every byte `iov` describes, advancing through partial writes: one `writev`
    /// straight from the memory, or (user-space TLS) through the session. `iov` is consumed.
    ///
    /// # Safety
    /// Every iovec must describe memory readable for its length for the duration of the call.
    pub unsafe fn writev_all(&self, iov: &mut [libc::iovec]) -> io::Result<()> {
        match self {
            // SAFETY: the caller's guarantee, passed on.
            Stream::Tls(t) => unsafe { t.writev_all(iov) },
            // SAFETY: the caller's guarantee, passed on.
            _ => unsafe { crate::tcp::writev_all(self.as_raw_fd(), iov) },
        }
    }

    /// Reads exactly `len` bytes into `ptr` (`recv(MSG_WAITALL)` straight into it, or through
    /// the TLS session).
    ///
    /// # Safety
    /// `ptr` must be writable for `len` bytes for the duration of the call.
    pub unsafe fn recv_exact(&self, ptr: *mut u8, len: usize) -> io::Result<()> {
        match self {
            // SAFETY: the caller's guarantee, passed on.
            Stream::Tls(t) => unsafe { t.recv_exact(ptr, len) },
            // SAFETY: the caller's guarantee, passed on.
            _ => unsafe { crate::tcp::recv_exact(self.as_raw_fd(), ptr, len) },
        }
    }

    /// Bounds each read (`None`: for ever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_read_timeout(t))
    }

    /// Bounds each write (`None`: for ever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_write_timeout(t))
    }

    /// Non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        both!(self, s => s.set_nonblocking(on))
    }

    /// Turns Nagle's algorithm off (TCP; nothing to do on a Unix socket).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(on),
            Stream::Unix(_) => Ok(()),
            Stream::Tls(t) => t.socket().set_nodelay(on),
        }
    }

    /// The peer, for logs and reports.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            Stream::Unix(s) => match s.peer_addr() {
                Ok(a) => a.as_pathname().map_or_else(
                    || "unix:(unnamed)".into(),
                    |p| format!("unix:{}", p.display()),
                ),
                Err(_) => "unix:?".into(),
            },
            Stream::Tls(t) => t.socket().peer(),
        }
    }

    /// The local IP address (TCP only): the RDMA device is picked by it.
    pub fn local_ip(&self) -> Option<IpAddr> {
        match self {
            Stream::Tcp(s) => s.local_addr().ok().map(|a| a.ip()),
            Stream::Unix(_) => None,
            Stream::Tls(t) => t.socket().local_ip(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tls(t) => t.read_plain(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
            // Whole writes: a record once encrypted must go out in full.
            Stream::Tls(t) => t.write_plain(buf).map(|()| buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        both!(self, s => s.as_raw_fd())
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Stream {
        Stream::Unix(s)
    }
}

/// The address family of socket `fd` and whether it listens; an error if `fd` is not a
/// stream socket.
pub(crate) fn socket_kind(fd: RawFd) -> Result<(i32, bool)> {
    let get = |level, opt| -> Result<i32> {
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes of an int-sized option.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(Error::InvalidConfig(format!(
                "descriptor {fd} is not a usable socket: {e}"
            )));
        }
        Ok(v)
    };
    if get(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(Error::InvalidConfig(format!(
            "descriptor {fd} is not a stream socket"
        )));
    }
    let family = get(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let listening = get(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0;
    Ok((family, listening))
}

/// Takes ownership of a raw descriptor number (for callers that got one from a parent
/// process, e.g. on the command line).
///
/// # Safety
/// `fd` must be open and owned by nobody else in this process.
pub unsafe fn owned_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and unowned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
