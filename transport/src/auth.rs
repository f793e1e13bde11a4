//! Mutual challenge-response authentication with a pre-shared key (HMAC-SHA256).
//!
//! Each side sends a fresh random nonce; each proves it holds the key by returning an HMAC
//! over both nonces and its role, so a proof cannot be replayed or reflected. Nothing about
//! guest memory (layout, keys, pages) is sent before both proofs check out. The data-stream
//! token is derived from the same key and nonces.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::wire::{MAC_LEN, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// A pre-shared key.
#[derive(Clone)]
pub struct Psk(Vec<u8>);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk(<{} bytes>)", self.0.len())
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
        Ok(Psk(bytes))
    }

    /// A fresh random 32-byte key.
    pub fn random() -> Result<Psk> {
        Ok(Psk(random_bytes::<32>()?.to_vec()))
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
