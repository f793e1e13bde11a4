//! Mutual challenge-response authentication with a pre-shared key (HMAC-SHA256).
//!
//! Each side sends a fresh random nonce; each proves it holds the key by returning an HMAC
//! over both nonces and its role, so a proof cannot be replayed or reflected. Nothing about
//! guest memory (layout, keys, pages) is sent before both proofs check out. The data-stream
//! token is derived from the same key and nonces.
//!
//! With TLS on, the key is optional ([`Psk::tls_only`]): the certificates then authenticate
//! both ends, the exchange runs with a fixed public key (its proofs prove nothing, and the
//! nonces, which the stream tokens bind to, travel only inside TLS), and a connection that is
//! not TLS is refused before anything else is sent.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::wire::{MAC_LEN, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// A pre-shared key (or none: [`Psk::tls_only`]).
#[derive(Clone)]
pub struct Psk(Vec<u8>, bool);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.1 {
            write!(f, "Psk(none: TLS only)")
        } else {
            write!(f, "Psk(<{} bytes>)", self.0.len())
        }
    }
}

impl Psk {
    /// Smallest key accepted.
    pub const MIN_LEN: usize = 16;

    /// A key from bytes (surrounding whitespace of a key file is the caller's business).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Psk> {
        let bytes = bytes.into();
        if bytes.len() < Self::MIN_LEN {
            return Err(Error::InvalidConfig(format!(
                "pre-shared key is {} bytes, at least {} are required",
                bytes.len(),
                Self::MIN_LEN
            )));
        }
        Ok(Psk(bytes, false))
    }

    /// No pre-shared key: TLS alone authenticates (a migration with it over a connection
    /// that is not TLS is refused, on either end).
    pub fn tls_only() -> Psk {
        Psk(
            b"rdmig: no pre-shared key, TLS authenticates".to_vec(),
            true,
        )
    }

    /// Whether this is [`Psk::tls_only`].
    pub fn is_tls_only(&self) -> bool {
        self.1
    }

    /// Refuses [`Psk::tls_only`] on a connection that is not TLS (`tls`: what
    /// [`crate::Stream::tls`] says of it).
    pub fn check_connection(&self, tls: &str) -> Result<()> {
        if self.1 && tls.is_empty() {
            return Err(Error::InvalidConfig(
                "no pre-shared key was given and the control connection is not TLS: give a \
                 key, TLS credentials, or both"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Largest key file [`Psk::from_file`] reads.
    pub const MAX_FILE_LEN: u64 = 4096;

    /// A key from a file: a regular file of at most [`Psk::MAX_FILE_LEN`] bytes, surrounding
    /// ASCII whitespace trimmed. Anything else (a FIFO, a device such as `/dev/zero`, a
    /// directory, a larger file) is refused without reading it: opening does not block on a
    /// FIFO, and no more than the bound is ever read.
    pub fn from_file(path: &std::path::Path) -> Result<Psk> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let what = |e: std::io::Error| Error::Io {
            context: format!("reading the key file {}", path.display()),
            source: e,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(what)?;
        let meta = f.metadata().map_err(what)?;
        if !meta.file_type().is_file() {
            return Err(Error::InvalidConfig(format!(
                "the key file {} is not a regular file",
                path.display()
            )));
        }
        if meta.len() > Self::MAX_FILE_LEN {
            return Err(Error::InvalidConfig(format!(
                "the key file {} is {} bytes, at most {} are read",
                path.display(),
                meta.len(),
                Self::MAX_FILE_LEN
            )));
        }
        let mut bytes = Vec::new();
        // A file that grew since the check is still read only up to the bound (plus one byte,
        // to tell that it did).
        f.take(Self::MAX_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(what)?;
        if bytes.len() as u64 > Self::MAX_FILE_LEN {
            return Err(Error::InvalidConfig(format!(
                "the key file {} is larger than {} bytes",
                path.display(),
                Self::MAX_FILE_LEN
            )));
        }
        Psk::new(bytes.trim_ascii().to_vec()).map_err(|e| match e {
            Error::InvalidConfig(m) => {
                Error::InvalidConfig(format!("the key file {}: {m}", path.display()))
            }
            e => e,
        })
    }

    /// A fresh random 32-byte key.
    pub fn random() -> Result<Psk> {
        Ok(Psk(random_bytes::<32>()?.to_vec(), false))
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    fn verify(&self, parts: &[&[u8]], tag: &[u8; MAC_LEN]) -> bool {
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for p in parts {
            m.update(p);
        }
        m.verify_slice(tag).is_ok()
    }

    /// The destination's proof: over the source nonce, then its own.
    pub fn dest_proof(
        &self,
        nonce_s: &[u8; NONCE_LEN],
        nonce_d: &[u8; NONCE_LEN],
    ) -> [u8; MAC_LEN] {
        self.mac(&[b"rdmig/1/destination", nonce_s, nonce_d])
    }

    /// Checks the destination's proof (constant time).
    pub fn check_dest_proof(
        &self,
        nonce_s: &[u8; NONCE_LEN],
        nonce_d: &[u8; NONCE_LEN],
        tag: &[u8; MAC_LEN],
    ) -> bool {
        self.verify(&[b"rdmig/1/destination", nonce_s, nonce_d], tag)
    }

    /// The source's proof: over the destination nonce, then its own.
    pub fn source_proof(
        &self,
        nonce_s: &[u8; NONCE_LEN],
        nonce_d: &[u8; NONCE_LEN],
    ) -> [u8; MAC_LEN] {
        self.mac(&[b"rdmig/1/source", nonce_d, nonce_s])
    }

    /// Checks the source's proof (constant time).
    pub fn check_source_proof(
        &self,
        nonce_s: &[u8; NONCE_LEN],
        nonce_d: &[u8; NONCE_LEN],
        tag: &[u8; MAC_LEN],
    ) -> bool {
        self.verify(&[b"rdmig/1/source", nonce_d, nonce_s], tag)
    }

    /// The token data streams present, bound to this session's nonces.
    pub fn stream_token(
        &self,
        nonce_s: &[u8; NONCE_LEN],
        nonce_d: &[u8; NONCE_LEN],
    ) -> [u8; MAC_LEN] {
        self.mac(&[b"rdmig/1/stream", nonce_s, nonce_d])
    }
}

impl Psk {
    /// The token post-copy streams present (distinct from the pre-copy streams' token, so the
    /// two sets of streams can never be mistaken for each other).
    pub fn postcopy_token(
        &self,
        nonce_s: &[u8; NONCE_LEN],
        nonce_d: &[u8; NONCE_LEN],
    ) -> [u8; MAC_LEN] {
        self.mac(&[b"rdmig/1/postcopy-stream", nonce_s, nonce_d])
    }

    /// The migration's id, bound to its first handshake's nonces: a reconnection after a
    /// post-copy link failure proves it continues this migration with it.
    pub fn migration_id(
        &self,
        nonce_s: &[u8; NONCE_LEN],
        nonce_d: &[u8; NONCE_LEN],
    ) -> [u8; MAC_LEN] {
        self.mac(&[b"rdmig/1/migration-id", nonce_s, nonce_d])
    }

    /// A reconnection's `Recover` proof: the migration id under this connection's nonces.
    pub fn recover_proof(
        &self,
        id: &[u8; MAC_LEN],
        nonce_s: &[u8; NONCE_LEN],
        nonce_d: &[u8; NONCE_LEN],
    ) -> [u8; MAC_LEN] {
        self.mac(&[b"rdmig/1/recover", id, nonce_s, nonce_d])
    }

    /// Checks a `Recover` proof (constant time).
    pub fn check_recover_proof(
        &self,
        id: &[u8; MAC_LEN],
        nonce_s: &[u8; NONCE_LEN],
        nonce_d: &[u8; NONCE_LEN],
        tag: &[u8; MAC_LEN],
    ) -> bool {
        self.verify(&[b"rdmig/1/recover", id, nonce_s, nonce_d], tag)
    }
}

/// Constant-time comparison of two tags.
pub fn tags_equal(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `N` bytes from the OS random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| Error::InvalidConfig(format!("no OS randomness: {e}")))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_bounded_regular_files() {
        let dir = std::env::temp_dir().join(format!("rdmig-psk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("key");
        std::fs::write(&good, b"  0123456789abcdef0123\n").unwrap();
        assert_eq!(
            Psk::from_file(&good).unwrap().as_bytes(),
            b"0123456789abcdef0123"
        );
        // A device that never ends: refused without reading (no OOM).
        let e = Psk::from_file(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        // A FIFO nobody writes: refused at once, not blocking.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        let e = Psk::from_file(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        let big = dir.join("big");
        std::fs::write(&big, vec![b'k'; 5000]).unwrap();
        let e = Psk::from_file(&big).unwrap_err();
        assert!(e.to_string().contains("at most 4096"), "{e}");
        std::fs::write(&good, b"short").unwrap();
        assert!(Psk::from_file(&good).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proofs_check_and_are_role_bound() {
        let k = Psk::new(*b"0123456789abcdef").unwrap();
        let other = Psk::new(*b"0123456789abcdeX").unwrap();
        let (ns, nd) = ([1u8; 32], [2u8; 32]);
        let d = k.dest_proof(&ns, &nd);
        assert!(k.check_dest_proof(&ns, &nd, &d));
        assert!(!other.check_dest_proof(&ns, &nd, &d));
        assert!(
            !k.check_source_proof(&ns, &nd, &d),
            "a destination proof must not pass as a source proof"
        );
        assert!(!k.check_dest_proof(&nd, &ns, &d), "nonces are ordered");
        assert!(tags_equal(
            &k.stream_token(&ns, &nd),
            &k.stream_token(&ns, &nd)
        ));
        assert!(!tags_equal(
            &k.stream_token(&ns, &nd),
            &k.stream_token(&ns, &[3; 32])
        ));
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Psk::new(b"short".to_vec()).is_err());
    }
}
