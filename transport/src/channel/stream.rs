//! One connection of a migration channel: a TCP or Unix stream socket.
//!
//! The data paths send and receive with `writev`/`recv(MSG_WAITALL)` on the raw fd, which
//! work the same on both kinds; what differs (Nagle, addresses) is handled here.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::error::{Error, Result};

/// A connected stream socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix stream socket.
    Unix(UnixStream),
}

macro_rules! both {
    ($s:expr, $x:ident => $e:expr) => {
        match $s {
            Stream::Tcp($x) => $e,
            Stream::Unix($x) => $e,
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
        })
    }

    /// Shuts the connection down.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        both!(self, s => s.shutdown(how))
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
        }
    }

    /// The local IP address (TCP only): the RDMA device is picked by it.
    pub fn local_ip(&self) -> Option<IpAddr> {
        match self {
            Stream::Tcp(s) => s.local_addr().ok().map(|a| a.ip()),
            Stream::Unix(_) => None,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        both!(self, s => s.read(buf))
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        both!(self, s => s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        both!(self, s => s.flush())
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
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
