//! Kernel TLS: after the handshake, the kernel's `tls` ULP takes the connection's keys and
//! sequence numbers (exported by rustls) and encrypts and decrypts in the socket, so that the
//! data paths keep writing straight from guest memory.
//!
//! The ULP is attached first: where the kernel lacks it (`CONFIG_TLS` unset, the module not
//! loaded) that fails before anything is consumed and the connection stays with rustls. Only
//! TLS 1.3 AES-GCM is negotiated (see `creds.rs`), which every kernel TLS has.

use std::os::fd::AsRawFd;

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

use super::conn::TlsStream;
use crate::channel::Stream;
use crate::error::{Error, Result};

const SOL_TLS: libc::c_int = 282;
const TCP_ULP: libc::c_int = 31;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;

/// `struct tls12_crypto_info_aes_gcm_128` / `_256` of `<linux/tls.h>` (the key length is
/// the only difference).
#[repr(C)]
struct CryptoInfo<const K: usize> {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; K],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

const _: () = assert!(size_of::<CryptoInfo<16>>() == 40);
const _: () = assert!(size_of::<CryptoInfo<32>>() == 56);

fn setsockopt<T>(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    v: &T,
) -> std::io::Result<()> {
    let len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `v` points at a live `T` of `len` readable bytes.
    let r = unsafe { libc::setsockopt(fd, level, opt, (v as *const T).cast(), len) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Attaches the `tls` ULP to a TCP socket; an error says why kernel TLS cannot be used.
pub(super) fn attach(sock: &Stream) -> std::result::Result<(), String> {
    let Stream::Tcp(s) = sock else {
        return Err("not a TCP connection".into());
    };
    setsockopt(s.as_raw_fd(), libc::SOL_TCP, TCP_ULP, b"tls")
        .map_err(|e| format!("the kernel has no `tls` ULP ({e}); modprobe tls"))
}

/// Hands the keys to the kernel (the ULP is attached). A failure here ends the connection.
pub(super) fn install(sock: Stream, secrets: ExtractedSecrets) -> Result<TlsStream> {
    let fd = sock.as_raw_fd();
    for (opt, (seq, secret)) in [(TLS_TX, secrets.tx), (TLS_RX, secrets.rx)] {
        let r = match secret {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                let c = info::<16>(TLS_CIPHER_AES_GCM_128, key.as_ref(), iv.as_ref(), seq);
                setsockopt(fd, SOL_TLS, opt, &c)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                let c = info::<32>(TLS_CIPHER_AES_GCM_256, key.as_ref(), iv.as_ref(), seq);
                setsockopt(fd, SOL_TLS, opt, &c)
            }
            _ => {
                return Err(Error::Tls(
                    "kernel TLS: a cipher other than AES-GCM was negotiated".into(),
                ))
            }
        };
        r.map_err(|e| {
            Error::Tls(format!(
                "kernel TLS refused the {} keys: {e}",
                if opt == TLS_TX { "send" } else { "receive" }
            ))
        })?;
    }
    tracing::debug!("kernel TLS on {}", sock.peer());
    Ok(TlsStream::kernel(sock))
}

/// The kernel's record of one direction's keys. rustls's 12-byte IV is the 4-byte salt
/// followed by the 8-byte implicit IV.
fn info<const K: usize>(cipher: u16, key: &[u8], iv: &[u8], seq: u64) -> CryptoInfo<K> {
    let mut c = CryptoInfo {
        version: TLS_1_3_VERSION,
        cipher_type: cipher,
        iv: [0; 8],
        key: [0; K],
        salt: [0; 4],
        rec_seq: seq.to_be_bytes(),
    };
    c.key.copy_from_slice(&key[..K]);
    c.salt.copy_from_slice(&iv[..4]);
    c.iv.copy_from_slice(&iv[4..12]);
    c
}

/// Whether this kernel offers the `tls` ULP (for reports and test skips).
pub fn available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"))
}
