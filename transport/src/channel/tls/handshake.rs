//! The TLS handshake on a freshly opened or accepted connection, and what its failures mean.
//!
//! Records are read one at a time (a 5-byte header, then exactly its length), so that nothing
//! after the handshake sits in rustls's buffers: kernel TLS can then take the connection
//! over. A first byte that is no TLS record type means the peer is not speaking TLS. After
//! the handshake the server sends one confirmation byte (encrypted) and the client waits for
//! it: in TLS 1.3 the client finishes before the server has checked the client's
//! certificate, and this is where a refusal reaches it, as a clear error at open. rustls then
//! hands the keys over: to the kernel (kernel TLS) or to the user-space record layer.

use std::io::{Read, Write};
use std::time::Duration;

use rustls::{AlertDescription, CertificateError, Connection};

use super::conn::TlsStream;
use super::record::{Keys, Opener, Sealer};
use crate::channel::Stream;
use crate::error::{Error, Result};

/// Largest TLS 1.3 record on the wire (2^14 plaintext + 256).
const MAX_RECORD: usize = (1 << 14) + 256 + 5;
/// What the server sends when the handshake (and its check of the client) succeeded.
const CONFIRM: u8 = 0x52;

/// Which end of the handshake we are, for the messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// The source: it opened the connection.
    Client,
    /// The destination: it accepted it.
    Server,
}

impl Side {
    fn peer(self) -> &'static str {
        match self {
            Side::Client => "the destination",
            Side::Server => "the source",
        }
    }
}

/// Runs the handshake on `sock` within `timeout` and returns the TLS stream (kernel TLS if
/// `ktls` and the kernel takes it, user-space rustls otherwise).
pub(super) fn handshake(
    sock: Stream,
    mut conn: Connection,
    side: Side,
    ktls: bool,
    timeout: Duration,
) -> Result<TlsStream> {
    let io = |e: std::io::Error| Error::Tls(format!("handshake with {}: {e}", side.peer()));
    sock.set_read_timeout(Some(timeout)).map_err(io)?;
    sock.set_write_timeout(Some(timeout)).map_err(io)?;
    conn.set_buffer_limit(None);
    while conn.is_handshaking() {
        flush(&mut conn, &sock).map_err(io)?;
        if conn.is_handshaking() {
            let rec = read_record(&sock, side)?;
            feed(&mut conn, &rec, &sock, side)?;
        }
    }
    match side {
        Side::Server => {
            conn.writer().write_all(&[CONFIRM]).map_err(io)?;
            flush(&mut conn, &sock).map_err(io)?;
        }
        Side::Client => {
            flush(&mut conn, &sock).map_err(io)?;
            let mut b = [0u8; 1];
            loop {
                match conn.reader().read(&mut b) {
                    Ok(1) if b[0] == CONFIRM => break,
                    Ok(_) => {
                        return Err(Error::Tls(format!(
                            "{} sent no TLS confirmation (not rdmig?)",
                            side.peer()
                        )))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(io(e)),
                }
                let rec = read_record(&sock, side)?;
                feed(&mut conn, &rec, &sock, side)?;
            }
        }
    }
    sock.set_read_timeout(None).map_err(io)?;
    sock.set_write_timeout(None).map_err(io)?;
    let in_kernel = ktls
        && match super::ktls::attach(&sock) {
            Ok(()) => true,
            Err(why) => {
                tracing::debug!("kernel TLS not used: {why}");
                false
            }
        };
    // Nothing follows the confirmation unread (records were read one at a time), so the keys
    // and sequence numbers are all the connection's state from here on.
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| Error::Tls(format!("exporting the TLS keys: {e}")))?;
    if in_kernel {
        return super::ktls::install(sock, secrets);
    }
    let keys = |(seq, secret)| {
        Keys::new(seq, secret)
            .map_err(|e| Error::Tls(format!("handshake with {}: {e}", side.peer())))
    };
    let tx = Sealer::new(keys(secrets.tx)?);
    let rx = Opener::new(keys(secrets.rx)?);
    Ok(TlsStream::user(sock, tx, rx))
}

/// Writes out whatever rustls has queued.
fn flush(conn: &mut Connection, mut sock: &Stream) -> std::io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    Ok(())
}

/// One whole TLS record.
fn read_record(mut sock: &Stream, side: Side) -> Result<Vec<u8>> {
    let eof = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Tls(format!(
            "{} closed the connection during the TLS handshake (it refused us, or it is not \
             speaking TLS)",
            side.peer()
        )),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Tls(format!(
            "the TLS handshake with {} timed out (is it speaking TLS?)",
            side.peer()
        )),
        _ => Error::Tls(format!("handshake with {}: {e}", side.peer())),
    };
    let mut rec = vec![0u8; 5];
    sock.read_exact(&mut rec).map_err(eof)?;
    if !(20..=23).contains(&rec[0]) || rec[1] != 3 {
        return Err(Error::Tls(format!(
            "{} is not speaking TLS (is TLS configured on both ends?)",
            side.peer()
        )));
    }
    let len = usize::from(u16::from_be_bytes([rec[3], rec[4]]));
    if len + 5 > MAX_RECORD {
        return Err(Error::Tls(format!(
            "{} sent a {len}-byte TLS record",
            side.peer()
        )));
    }
    rec.resize(5 + len, 0);
    sock.read_exact(&mut rec[5..]).map_err(eof)?;
    Ok(rec)
}

/// Hands one record to rustls; on a failure sends rustls's alert (best effort) and explains.
fn feed(conn: &mut Connection, rec: &[u8], sock: &Stream, side: Side) -> Result<()> {
    let mut r = rec;
    while !r.is_empty() {
        conn.read_tls(&mut r)
            .map_err(|e| Error::Tls(format!("handshake with {}: {e}", side.peer())))?;
        if let Err(e) = conn.process_new_packets() {
            let _ = flush(conn, sock);
            return Err(Error::Tls(explain(&e, side)));
        }
    }
    Ok(())
}

/// A rustls error as the operator should read it.
pub(super) fn explain(e: &rustls::Error, side: Side) -> String {
    let peer = side.peer();
    let ours = match side {
        Side::Client => "client",
        Side::Server => "server",
    };
    let theirs = match side {
        Side::Client => "server",
        Side::Server => "client",
    };
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                format!("{peer}'s certificate is not signed by our CA (ca-cert.pem): wrong CA?")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("{peer}'s certificate has expired")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("{peer}'s certificate is not valid yet")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "{peer}'s certificate does not name the host we connected to (set the \
                     expected name with the TLS hostname): {c:?}"
                )
            }
            other => format!("{peer}'s certificate was refused: {other:?}"),
        },
        E::NoCertificatesPresented => {
            format!("{peer} presented no {theirs} certificate (mutual TLS requires one)")
        }
        E::AlertReceived(a) => match a {
            AlertDescription::UnknownCA | AlertDescription::BadCertificate => {
                format!("{peer} refused our {ours} certificate: not signed by its CA (wrong CA?)")
            }
            AlertDescription::CertificateExpired => {
                format!("{peer} refused our {ours} certificate: it has expired")
            }
            AlertDescription::CertificateRequired => {
                format!("{peer} requires a {ours} certificate and we presented none")
            }
            other => format!("{peer} ended the TLS handshake: {other:?}"),
        },
        E::InvalidMessage(m) => format!("{peer} is not speaking TLS properly: {m:?}"),
        other => format!("handshake with {peer}: {other}"),
    }
}
