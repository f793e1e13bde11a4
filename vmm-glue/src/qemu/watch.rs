//! Watching the destination QEMU while a migration comes in, so that its death ends the
//! migration at once instead of at the switchover.
//!
//! During pre-copy rdmig writes guest RAM into its own mapping of QEMU's shared backends and
//! does not talk to QEMU: a destination QEMU killed then would go unnoticed until rdmig hands it
//! the device state, after the source has paused its guest for the switchover. [`ExitWatch`]
//! polls a second handle on the QMP socket for the hang-up QEMU's exit causes, and then calls a
//! hook; [`accept_into`](super::dest::accept_into) uses [`shut_down_tcp_port`] there to shut
//! down the migration's TCP connections (control and data streams, all accepted on the one
//! listener), which fails the destination's transport at its next read or write and the source
//! at its next one: the source resumes its guest (`cont` if rdmig stopped it) while its rounds
//! are still running.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::qmp::Pid;
use crate::error::{Error, Result};

/// How often the watcher looks at its stop flag.
const TICK: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    exited: Mutex<Option<String>>,
}

/// A thread that notices when a QEMU closes its QMP socket (it exited or was killed); stopped
/// and joined in `Drop`.
#[derive(Debug)]
pub struct ExitWatch {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl ExitWatch {
    /// Watches `socket` (a clone of a QMP connection to QEMU `pid`, see
    /// [`Qmp::try_clone_socket`](super::qmp::Qmp::try_clone_socket)); when QEMU hangs up, records
    /// why and calls `on_exit` once, on the watcher's thread.
    pub fn start(
        socket: UnixStream,
        pid: Pid,
        on_exit: impl FnOnce(&str) + Send + 'static,
    ) -> Result<ExitWatch> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("rdmig-qemu-watch".into())
            .spawn(move || {
                if let Some(why) = wait_hangup(&socket, &s.stop) {
                    let why = format!("the destination QEMU (pid {}) {why}", pid.0);
                    tracing::warn!("{why}: stopping the incoming migration");
                    *s.exited.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                    on_exit(&why);
                }
            })
            .map_err(|e| Error::QemuIo {
                context: "spawning the QEMU watcher".into(),
                source: e,
            })?;
        Ok(ExitWatch {
            shared,
            handle: Some(handle),
        })
    }

    /// Why QEMU is gone, once the watcher has seen it go.
    pub fn exited(&self) -> Option<String> {
        self.shared
            .exited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops watching (joins the thread) and returns what it saw.
    pub fn stop(mut self) -> Option<String> {
        self.halt();
        self.exited()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::warn!("the QEMU watcher panicked");
            }
        }
    }
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Polls `socket` for a hang-up (only that: QMP events waiting to be read do not wake it) until
/// `stop` is set; returns what happened, or `None` when stopped.
fn wait_hangup(socket: &UnixStream, stop: &AtomicBool) -> Option<String> {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        pfd.revents = 0;
        // SAFETY: one pollfd, a live local, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, TICK.as_millis() as libc::c_int) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Some(format!("cannot be watched any more (poll: {e})"));
        }
        if n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Some("closed its QMP socket (it exited or was killed)".into());
        }
    }
    None
}

/// Shuts down (both directions) every TCP socket of this process whose local port is `port`
/// (the connections accepted on a listener bound there), and the listening socket `listener`
/// itself, so that blocked reads, writes and accepts on them fail. Returns how many connections
/// it shut down.
///
/// The sockets belong to the transport; they are only shut down, never closed here, so no
/// descriptor changes hands. A descriptor that is closed and reused between the look and the
/// shutdown would have to be another connection accepted on the same port to be hit.
pub fn shut_down_tcp_port(listener: RawFd, port: u16) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        tracing::warn!("cannot list /proc/self/fd: the migration's connections stay open");
        return 0;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut n = 0;
    for fd in fds {
        if fd == listener || local_tcp_port(fd) != Some(port) || is_listening(fd) {
            continue;
        }
        // The socket stays open (its owner closes it).
        // SAFETY: shutdown takes a descriptor number and touches no memory of ours.
        if unsafe { libc::shutdown(fd, libc::SHUT_RDWR) } == 0 {
            n += 1;
        }
    }
    if local_tcp_port(listener) == Some(port) {
        // A listening socket shut down for reading makes accept fail (EINVAL on Linux).
        // SAFETY: as above.
        unsafe { libc::shutdown(listener, libc::SHUT_RD) };
    }
    n
}

/// The local port of `fd` if it is an IPv4 or IPv6 socket.
fn local_tcp_port(fd: RawFd) -> Option<u16> {
    // SAFETY: sockaddr_storage is plain data; all zero is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // On a descriptor that is not a socket getsockname fails with ENOTSOCK.
    // SAFETY: it writes at most `len` bytes into `addr`, a live local of that size.
    let rc = unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 || !is_stream(fd) {
        return None;
    }
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            let sin = (&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
            // SAFETY: the family says the storage (large and aligned enough) holds a sockaddr_in.
            let a = unsafe { &*sin };
            Some(u16::from_be(a.sin_port))
        }
        libc::AF_INET6 => {
            let sin6 = (&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*sin6 };
            Some(u16::from_be(a.sin6_port))
        }
        _ => None,
    }
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a live local of that size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

fn is_stream(fd: RawFd) -> bool {
    sockopt_int(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

fn is_listening(fd: RawFd) -> bool {
    sockopt_int(fd, libc::SO_ACCEPTCONN) == Some(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn shutting_down_a_port_ends_its_connections_and_the_listener() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c1 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s1, _) = l.accept().unwrap();
        let mut c2 = TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let (_s2, _) = other.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            s1.read(&mut b)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(shut_down_tcp_port(l.as_raw_fd(), port), 1);
        // The blocked read on the accepted connection returns; its peer sees the end.
        assert_eq!(reader.join().unwrap().unwrap(), 0);
        let mut b = [0u8; 1];
        assert_eq!(c1.read(&mut b).unwrap(), 0);
        // The listener accepts no more (an error, not "nothing pending"); the other port's
        // connection is untouched.
        l.set_nonblocking(true).unwrap();
        let e = l.accept().unwrap_err();
        assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        c2.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        assert!(c2.read(&mut b).is_err(), "a timeout, not an end");
    }

    #[test]
    fn a_hang_up_fires_the_watch_once() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let w = ExitWatch::start(a, Pid(42), move |why| tx.send(why.to_string()).unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(120));
        assert!(w.exited().is_none());
        drop(b);
        let why = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            why.contains("pid 42") && why.contains("QMP socket"),
            "{why}"
        );
        assert_eq!(w.stop(), Some(why));
        // Stopped before any hang-up: nothing seen.
        let (a, _b) = UnixStream::pair().unwrap();
        let w = ExitWatch::start(a, Pid(1), |_| panic!("no hang-up")).unwrap();
        assert_eq!(w.stop(), None);
    }
}
