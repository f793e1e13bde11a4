//! The synthetic VM's device state: a versioned little-endian blob carrying every page's
//! generation and the writer counters.

use crate::error::{Error, Result};

const MAGIC: [u8; 4] = *b"SYNV";
const VERSION: u32 = 1;
const HEADER: usize = 4 + 4 + 8 + 8 + 8;

/// The state carried across a migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticState {
    /// Page size the generations refer to.
    pub page_size: u64,
    /// Pages written by the guest so far.
    pub pages_written: u64,
    /// Generation of every page.
    pub gens: Vec<u64>,
}

impl SyntheticState {
    /// Serializes: magic, version, page size, pages written, count, then the generations.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + self.gens.len() * 8);
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&self.page_size.to_le_bytes());
        v.extend_from_slice(&self.pages_written.to_le_bytes());
        v.extend_from_slice(&(self.gens.len() as u64).to_le_bytes());
        for g in &self.gens {
            v.extend_from_slice(&g.to_le_bytes());
        }
        v
    }

    /// Parses, checking magic, version and that the length matches the page count.
    pub fn decode(b: &[u8], expect_pages: u64) -> Result<SyntheticState> {
        if b.len() < HEADER {
            return Err(Error::State(format!("synthetic state truncated at {} bytes", b.len())));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if b[..4] != MAGIC {
            return Err(Error::State("not a synthetic VM state (bad magic)".into()));
        }
        let version = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(Error::State(format!("synthetic state version {version}, this build reads {VERSION}")));
        }
        let count = u64_at(24);
        if count != expect_pages || (b.len() - HEADER) as u64 != count * 8 {
            return Err(Error::State(format!(
                "synthetic state has {count} pages and {} bytes of generations; the VM has {expect_pages} pages",
                b.len() - HEADER
            )));
        }
        Ok(SyntheticState {
            page_size: u64_at(8),
            pages_written: u64_at(16),
            gens: b[HEADER..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let s = SyntheticState { page_size: 4096, pages_written: 9, gens: vec![1, 2, 3] };
        let b = s.encode();
        assert_eq!(SyntheticState::decode(&b, 3).unwrap(), s);
        assert!(SyntheticState::decode(&b, 4).is_err());
        assert!(SyntheticState::decode(&b[..b.len() - 1], 3).is_err());
        assert!(SyntheticState::decode(&b[..10], 3).is_err());
        let mut bad = b.clone();
        bad[4] = 9;
        assert!(SyntheticState::decode(&bad, 3).is_err());
    }
}
