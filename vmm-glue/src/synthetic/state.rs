//! The synthetic VM's device state: a versioned little-endian blob carrying the generation of
//! every page the guest has written (pages never written are at generation 0 and are not
//! listed, so the state stays small however large the memory) and the writer counters.

use crate::error::{Error, Result};

const MAGIC: [u8; 4] = *b"SYNV";
const VERSION: u32 = 1;
const HEADER: usize = 4 + 4 + 8 + 8 + 8 + 8;

/// The state carried across a migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticState {
    /// Page size the generations refer to.
    pub page_size: u64,
    /// Pages written by the guest so far.
    pub pages_written: u64,
    /// Number of pages of the VM.
    pub pages: u64,
    /// `(page, generation)` of every page whose generation is not 0, in page order.
    pub gens: Vec<(u64, u64)>,
}

impl SyntheticState {
    /// Serializes: magic, version, page size, pages written, page count, entry count, then
    /// the `(page, generation)` entries.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + self.gens.len() * 16);
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&self.page_size.to_le_bytes());
        v.extend_from_slice(&self.pages_written.to_le_bytes());
        v.extend_from_slice(&self.pages.to_le_bytes());
        v.extend_from_slice(&(self.gens.len() as u64).to_le_bytes());
        for (p, g) in &self.gens {
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&g.to_le_bytes());
        }
        v
    }

    /// Parses, checking magic, version and that the length matches the page count.
    pub fn decode(b: &[u8], expect_pages: u64) -> Result<SyntheticState> {
        if b.len() < HEADER {
            return Err(Error::State(format!(
                "synthetic state truncated at {} bytes",
                b.len()
            )));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if b[..4] != MAGIC {
            return Err(Error::State("not a synthetic VM state (bad magic)".into()));
        }
        let version = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(Error::State(format!(
                "synthetic state version {version}, this build reads {VERSION}"
            )));
        }
        let pages = u64_at(24);
        let count = u64_at(32);
        if pages != expect_pages {
            return Err(Error::State(format!(
                "synthetic state is for {pages} pages; the VM has {expect_pages}"
            )));
        }
        if count > pages || (b.len() - HEADER) as u64 != count * 16 {
            return Err(Error::State(format!(
                "synthetic state announces {count} entries but carries {} bytes",
                b.len() - HEADER
            )));
        }
        let mut gens = Vec::with_capacity(count as usize);
        for e in b[HEADER..].chunks_exact(16) {
            let p = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            let g = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
            if p >= pages || gens.last().is_some_and(|&(q, _)| q >= p) {
                return Err(Error::State(format!(
                    "synthetic state lists page {p} out of order or out of range"
                )));
            }
            gens.push((p, g));
        }
        Ok(SyntheticState {
            page_size: u64_at(8),
            pages_written: u64_at(16),
            pages,
            gens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let s = SyntheticState {
            page_size: 4096,
            pages_written: 9,
            pages: 3,
            gens: vec![(0, 1), (2, 3)],
        };
        let b = s.encode();
        assert_eq!(SyntheticState::decode(&b, 3).unwrap(), s);
        assert!(SyntheticState::decode(&b, 4).is_err());
        assert!(SyntheticState::decode(&b[..b.len() - 1], 3).is_err());
        assert!(SyntheticState::decode(&b[..10], 3).is_err());
        let mut bad = b.clone();
        bad[4] = 9;
        assert!(SyntheticState::decode(&bad, 3).is_err());
        let out_of_order = SyntheticState {
            gens: vec![(2, 1), (0, 3)],
            ..s.clone()
        }
        .encode();
        assert!(SyntheticState::decode(&out_of_order, 3).is_err());
        let out_of_range = SyntheticState {
            gens: vec![(3, 1)],
            ..s
        }
        .encode();
        assert!(SyntheticState::decode(&out_of_range, 3).is_err());
    }
}
