//! Migration channels: where a migration's connections come from.
//!
//! A migration uses one control connection and, over TCP, data streams (pre-copy) and
//! post-copy streams; over RDMA only the control connection. The source *opens* them through
//! a [`MigrationChannel`], the destination *accepts* them through a [`ChannelListener`], and
//! every connection is authenticated by the protocol itself (the handshake on the control
//! connection; a token derived from it on each stream), whatever the channel.
//!
//! | channel | source | destination |
//! | --- | --- | --- |
//! | TCP (today's behaviour) | [`TcpChannel`] | `std::net::TcpListener` |
//! | Unix sockets | [`UnixChannel`] | `std::os::unix::net::UnixListener` |
//! | pre-opened descriptors | [`FdChannel`] (connected sockets, in order) | [`FdListener`] (connected sockets) or [`listener_from_fd`] (a listening socket) |
//!
//! | TLS over any of them | [`tls::TlsChannel`] | [`tls::TlsListener`] |
//!
//! A VMM with connections of its own (a TLS tunnel's socketpair, a socket a management layer
//! passed in) implements [`MigrationChannel`] or [`ChannelListener`] itself.

mod stream;
pub mod tls;

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

pub use stream::{owned_fd, Stream};

use crate::error::{Error, Result};

/// What a connection is for (in the order the source opens them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purpose {
    /// The control connection.
    Control,
    /// Pre-copy data stream `i`.
    Data(u16),
    /// Post-copy stream `i` (0: the fault stream).
    Postcopy(u16),
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Purpose::Control => write!(f, "the control connection"),
            Purpose::Data(i) => write!(f, "data stream {i}"),
            Purpose::Postcopy(i) => write!(f, "post-copy stream {i}"),
        }
    }
}

/// The source's side of a channel: opens connections to the destination.
pub trait MigrationChannel: Send {
    /// Opens the connection for `purpose`, within `timeout`.
    fn open(&mut self, purpose: Purpose, timeout: Duration) -> Result<Stream>;

    /// The destination, for logs and errors.
    fn describe(&self) -> String;

    /// The channel can open new connections for as long as the migration runs (a post-copy
    /// link failure can then be recovered). Default: yes.
    fn reconnects(&self) -> bool {
        true
    }

    /// Points the channel's next connections at `target` (a post-copy recovery to a new
    /// address). Default: refused.
    fn retarget(&mut self, target: &str) -> Result<()> {
        Err(Error::InvalidConfig(format!(
            "{} cannot change its destination (to {target:?})",
            self.describe()
        )))
    }
}

/// The destination's side of a channel: yields incoming connections.
pub trait ChannelListener: Send + Sync {
    /// The next incoming connection and its peer's name, or `WouldBlock` if none is waiting
    /// (the destination polls: it serves several handshakes at once and keeps deadlines).
    fn poll_accept(&self) -> io::Result<(Stream, String)>;

    /// Like [`ChannelListener::poll_accept`], for the streams that follow the control
    /// connection (a listener of pre-connected sockets tells them apart by their order).
    fn poll_accept_stream(&self) -> io::Result<(Stream, String)> {
        self.poll_accept()
    }

    /// What it listens on, for logs.
    fn describe(&self) -> String;
}

/// TCP to one address (each connection a new TCP connection).
#[derive(Clone, Debug)]
pub struct TcpChannel(pub SocketAddr);

impl MigrationChannel for TcpChannel {
    fn open(&mut self, purpose: Purpose, timeout: Duration) -> Result<Stream> {
        let s = TcpStream::connect_timeout(&self.0, timeout).map_err(|e| Error::Io {
            context: match purpose {
                Purpose::Control => format!("connecting to the destination at {}", self.0),
                _ => format!("connecting {purpose} to {}", self.0),
            },
            source: e,
        })?;
        Ok(Stream::Tcp(s))
    }

    fn describe(&self) -> String {
        self.0.to_string()
    }

    fn retarget(&mut self, target: &str) -> Result<()> {
        use std::net::ToSocketAddrs;
        self.0 = target
            .to_socket_addrs()
            .map_err(|e| Error::InvalidConfig(format!("recovery target {target:?}: {e}")))?
            .next()
            .ok_or_else(|| {
                Error::InvalidConfig(format!("recovery target {target:?} has no address"))
            })?;
        Ok(())
    }
}

/// A Unix stream socket at a path (each connection a new connection to it).
#[derive(Clone, Debug)]
pub struct UnixChannel(pub PathBuf);

impl MigrationChannel for UnixChannel {
    fn open(&mut self, purpose: Purpose, _timeout: Duration) -> Result<Stream> {
        // A Unix connect does not wait for the network: it succeeds or fails at once.
        let s = UnixStream::connect(&self.0).map_err(|e| Error::Io {
            context: format!("connecting {purpose} to {}", self.0.display()),
            source: e,
        })?;
        Ok(Stream::Unix(s))
    }

    fn describe(&self) -> String {
        format!("unix:{}", self.0.display())
    }

    fn retarget(&mut self, target: &str) -> Result<()> {
        self.0 = PathBuf::from(target);
        Ok(())
    }
}

/// Connected sockets handed in by the caller, used in order: the control connection first,
/// then (TCP transport) the data streams, then (post-copy, hybrid) the post-copy streams.
#[derive(Debug)]
pub struct FdChannel {
    fds: VecDeque<OwnedFd>,
    given: usize,
}

impl FdChannel {
    /// A channel of the connected sockets `fds`.
    pub fn new(fds: impl IntoIterator<Item = OwnedFd>) -> FdChannel {
        let fds: VecDeque<OwnedFd> = fds.into_iter().collect();
        FdChannel {
            given: fds.len(),
            fds,
        }
    }
}

impl MigrationChannel for FdChannel {
    fn open(&mut self, purpose: Purpose, _timeout: Duration) -> Result<Stream> {
        let fd = self.fds.pop_front().ok_or_else(|| {
            Error::InvalidConfig(format!(
                "the channel's {} pre-opened connections are used up; {purpose} needs one more \
                 (a migration needs 1 control connection, and over TCP one per data stream \
                 and, in post-copy or hybrid mode, one per post-copy stream)",
                self.given
            ))
        })?;
        Stream::from_fd(fd)
    }

    fn describe(&self) -> String {
        format!("{} pre-opened connections", self.given)
    }

    fn reconnects(&self) -> bool {
        false
    }
}

impl ChannelListener for TcpListener {
    fn poll_accept(&self) -> io::Result<(Stream, String)> {
        self.set_nonblocking(true)?;
        let (s, peer) = self.accept()?;
        s.set_nonblocking(false)?;
        Ok((Stream::Tcp(s), peer.to_string()))
    }

    fn describe(&self) -> String {
        self.local_addr()
            .map_or_else(|_| "a TCP listener".into(), |a| a.to_string())
    }
}

impl ChannelListener for UnixListener {
    fn poll_accept(&self) -> io::Result<(Stream, String)> {
        self.set_nonblocking(true)?;
        let (s, _) = self.accept()?;
        s.set_nonblocking(false)?;
        let s = Stream::Unix(s);
        let peer = s.peer();
        Ok((s, peer))
    }

    fn describe(&self) -> String {
        match self
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.to_owned()))
        {
            Some(p) => format!("unix:{}", p.display()),
            None => "a Unix listener".into(),
        }
    }
}

/// Connected sockets handed in by the caller, in the order the source opens them: the first
/// is the control connection, the rest the streams.
#[derive(Debug)]
pub struct FdListener {
    control: Mutex<Option<OwnedFd>>,
    streams: Mutex<VecDeque<OwnedFd>>,
}

impl FdListener {
    /// A listener yielding the connected sockets `fds`.
    pub fn new(fds: impl IntoIterator<Item = OwnedFd>) -> FdListener {
        let mut fds: VecDeque<OwnedFd> = fds.into_iter().collect();
        FdListener {
            control: Mutex::new(fds.pop_front()),
            streams: Mutex::new(fds),
        }
    }

    fn yield_fd(fd: Option<OwnedFd>) -> io::Result<(Stream, String)> {
        let s = Stream::from_fd(fd.ok_or(io::ErrorKind::WouldBlock)?).map_err(io::Error::other)?;
        let peer = s.peer();
        Ok((s, peer))
    }
}

impl ChannelListener for FdListener {
    fn poll_accept(&self) -> io::Result<(Stream, String)> {
        Self::yield_fd(
            self.control
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        )
    }

    fn poll_accept_stream(&self) -> io::Result<(Stream, String)> {
        Self::yield_fd(
            self.streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front(),
        )
    }

    fn describe(&self) -> String {
        "pre-opened connections".into()
    }
}

/// A listening socket handed in as a descriptor (socket activation): TCP or Unix.
pub fn listener_from_fd(fd: OwnedFd) -> Result<Box<dyn ChannelListener>> {
    match stream::socket_kind(fd.as_raw_fd())? {
        (libc::AF_INET | libc::AF_INET6, true) => Ok(Box::new(TcpListener::from(fd))),
        (libc::AF_UNIX, true) => Ok(Box::new(UnixListener::from(fd))),
        (_, false) => Err(Error::InvalidConfig(
            "the descriptor is not a listening socket".into(),
        )),
        (family, true) => Err(Error::InvalidConfig(format!(
            "the descriptor listens on address family {family}, not TCP or Unix"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_channel_yields_its_sockets_in_order_then_says_what_is_missing() {
        let (a, _a2) = UnixStream::pair().unwrap();
        let mut c = FdChannel::new([OwnedFd::from(a)]);
        let s = c.open(Purpose::Control, Duration::from_secs(1)).unwrap();
        assert!(matches!(s, Stream::Unix(_)));
        let e = c
            .open(Purpose::Data(0), Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1 pre-opened") && e.contains("data stream 0"),
            "{e}"
        );
    }

    #[test]
    fn descriptors_of_the_wrong_kind_are_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = Stream::from_fd(OwnedFd::from(l.try_clone().unwrap())).unwrap_err();
        assert!(e.to_string().contains("listening"), "{e}");
        assert!(listener_from_fd(OwnedFd::from(l)).is_ok());
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = Stream::from_fd(OwnedFd::from(f)).unwrap_err();
        assert!(e.to_string().contains("not a usable socket"), "{e}");
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(listener_from_fd(OwnedFd::from(a)).is_err());
    }

    #[test]
    fn a_unix_listener_yields_connections() {
        let dir = std::env::temp_dir().join(format!("rdmig-chan-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let l = UnixListener::bind(&dir).unwrap();
        assert_eq!(
            l.poll_accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mut c = UnixChannel(dir.clone());
        let _s = c.open(Purpose::Control, Duration::from_secs(1)).unwrap();
        let (s, _) = l.poll_accept().unwrap();
        assert!(matches!(s, Stream::Unix(_)));
        let _ = std::fs::remove_file(&dir);
    }
}
