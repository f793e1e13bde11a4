//! TLS over any channel: mutual authentication with x509 certificates (QEMU's `tls-creds`
//! layout), on the control connection and every data and post-copy stream.
//!
//! [`TlsChannel`] wraps the source's channel: each connection it opens runs a TLS 1.3
//! handshake as the client, verifying the destination's certificate against the CA and the
//! expected name ([`TlsChannel::tcp`] defaults it to the address's IP, as QEMU does) and
//! presenting the client certificate. [`TlsListener`] wraps the destination's listener: each
//! accepted connection runs the handshake as the server on its own thread (a slow peer does
//! not hold the others up; the oldest pending ones are evicted beyond a bound) and comes out
//! of `poll_accept` only once the client's certificate checked out.
//!
//! After the handshake rustls exports the keys and the connection switches to kernel TLS
//! where the kernel has it ([`ktls`]), else to a user-space TLS 1.3 record layer (ring's
//! AES-GCM, one copy each way: see `record.rs`). [`Stream::tls`] tells which (`"ktls"` or
//! `"rustls"`), and the reports carry it.
//!
//! Over RDMA only the control connection exists, so only it is encrypted: RDMA READs of guest
//! memory are not (that needs IPsec or MACsec on the NIC).

mod conn;
mod creds;
mod handshake;
pub mod ktls;
mod record;

use std::io;
use std::net::SocketAddr;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

pub use conn::{TlsStream, BOUNCE};
pub use creds::{TlsCreds, CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
use handshake::{handshake, Side};

use super::{ChannelListener, MigrationChannel, Purpose, Stream, TcpChannel};
use crate::error::{Error, Result};
use crate::pending::{self, Pending};

/// How long the destination gives a connection's TLS handshake.
pub const ACCEPT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once on a listener (beyond it the oldest is evicted).
const MAX_PENDING: usize = 32;

/// The source's channel `C`, each connection in TLS.
pub struct TlsChannel<C> {
    inner: C,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    ktls: bool,
}

impl<C: MigrationChannel> TlsChannel<C> {
    /// TLS over `inner`, expecting the destination's certificate to name `hostname` (a DNS
    /// name or an IP address).
    pub fn new(inner: C, creds: &TlsCreds, hostname: &str) -> Result<TlsChannel<C>> {
        let name = ServerName::try_from(hostname.to_string())
            .map_err(|e| Error::Tls(format!("{hostname:?} is not a usable TLS hostname: {e}")))?;
        Ok(TlsChannel {
            inner,
            config: creds.client_config()?,
            name,
            ktls: creds.ktls,
        })
    }
}

impl TlsChannel<TcpChannel> {
    /// TLS over TCP to `addr`; the destination's certificate must name `hostname`, by default
    /// `addr`'s IP address.
    pub fn tcp(
        addr: SocketAddr,
        creds: &TlsCreds,
        hostname: Option<&str>,
    ) -> Result<TlsChannel<TcpChannel>> {
        let ip = addr.ip().to_string();
        TlsChannel::new(TcpChannel(addr), creds, hostname.unwrap_or(&ip))
    }
}

impl<C: MigrationChannel> MigrationChannel for TlsChannel<C> {
    fn open(&mut self, purpose: Purpose, timeout: Duration) -> Result<Stream> {
        let s = self.inner.open(purpose, timeout)?;
        let conn = ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|e| Error::Tls(format!("starting TLS for {purpose}: {e}")))?;
        let t =
            handshake(s, conn.into(), Side::Client, self.ktls, timeout).map_err(|e| match e {
                Error::Tls(m) => Error::Tls(format!("{purpose}: {m}")),
                e => e,
            })?;
        Ok(Stream::Tls(Arc::new(t)))
    }

    fn describe(&self) -> String {
        format!("{} (TLS)", self.inner.describe())
    }
}

type Accepted = (Stream, String);

struct Queue {
    tx: Mutex<Sender<Accepted>>,
    rx: Mutex<Receiver<Accepted>>,
}

impl Queue {
    fn new() -> Queue {
        let (tx, rx) = channel();
        Queue {
            tx: Mutex::new(tx),
            rx: Mutex::new(rx),
        }
    }
}

/// The destination's listener `L`, each connection in TLS.
pub struct TlsListener<L> {
    inner: L,
    config: Arc<ServerConfig>,
    ktls: bool,
    control: Queue,
    streams: Queue,
    pending: Mutex<Pending>,
}

impl<L: ChannelListener> TlsListener<L> {
    /// TLS over `inner`'s connections, with the server certificate of `creds`.
    pub fn new(inner: L, creds: &TlsCreds) -> Result<TlsListener<L>> {
        Ok(TlsListener {
            inner,
            config: creds.server_config()?,
            ktls: creds.ktls,
            control: Queue::new(),
            streams: Queue::new(),
            pending: Mutex::new(Pending::new(MAX_PENDING)),
        })
    }

    /// Starts the handshake of each waiting connection, then yields one that completed.
    fn poll(&self, accept: impl Fn(&L) -> io::Result<Accepted>, q: &Queue) -> io::Result<Accepted> {
        loop {
            match accept(&self.inner) {
                Ok((s, peer)) => self.start(s, peer, q)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let rx = q.rx.lock().unwrap_or_else(|p| p.into_inner());
        rx.try_recv().map_err(|_| io::ErrorKind::WouldBlock.into())
    }

    fn start(&self, s: Stream, peer: String, q: &Queue) -> io::Result<()> {
        let Some(done) = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(&s, "TLS handshakes")
        else {
            tracing::warn!("refused a connection from {peer}: cannot track its socket");
            return Ok(());
        };
        let conn = ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        let tx = q.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let ktls = self.ktls;
        crate::threads::spawn("rdmig-tls-accept", move || {
            match handshake(s, conn.into(), Side::Server, ktls, ACCEPT_HANDSHAKE_TIMEOUT) {
                Ok(t) => {
                    let _ = tx.send((Stream::Tls(Arc::new(t)), peer));
                }
                Err(e) => tracing::warn!("refused a connection from {peer}: {e}"),
            }
            pending::done(&done);
        })?;
        Ok(())
    }
}

impl<L: ChannelListener> ChannelListener for TlsListener<L> {
    fn poll_accept(&self) -> io::Result<Accepted> {
        self.poll(L::poll_accept, &self.control)
    }

    fn poll_accept_stream(&self) -> io::Result<Accepted> {
        self.poll(L::poll_accept_stream, &self.streams)
    }

    fn describe(&self) -> String {
        format!("{} (TLS)", self.inner.describe())
    }
}

/// Test credentials made by `ci/make-test-certs` (once per process), for this crate's tests
/// and those of the crates above it.
#[doc(hidden)]
pub fn test_creds_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rdmig-test-certs-{}", std::process::id()));
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/make-test-certs");
        let st = std::process::Command::new(&script)
            .arg(&dir)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {}: {e} (is openssl installed? ci/setup installs it)",
                    script.display()
                )
            });
        assert!(
            st.success(),
            "{} failed (is openssl installed? ci/setup installs it)",
            script.display()
        );
        dir
    })
    .clone()
}

#[cfg(test)]
mod tests;
