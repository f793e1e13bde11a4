//! The synthetic VM's device state: a versioned little-endian blob carrying the writer
//! counters and the generation of every page the guest may have written.
//!
//! The writers only touch a prefix of memory (the working set), so the blob lists the
//! generations of the first `span` pages, densely and in page order, as LEB128 varints; every
//! later page is at generation 0. A guest that rewrites each page of a 64 MiB working set a
//! few dozen times saves about 16 KiB: the state is saved, sent and restored inside the
//! downtime, so its size is part of it.
//!
//! Layout (version 3): magic `SYNV`, version u32, page size u64, pages written u64, page count
//! u64, span u64, populated pages u64, zero share u64, then `span` varints and nothing after
//! them. The content scheme needs the last two (which pages start zero, which generations are
//! zero pages) to check the guest on the destination.

use crate::error::{Error, Result};

const MAGIC: [u8; 4] = *b"SYNV";
/// The device-state format version this build writes and reads.
pub const VERSION: u32 = 3;
const HEADER: usize = 4 + 4 + 8 + 8 + 8 + 8 + 8 + 8;
/// Longest LEB128 encoding of a u64.
const MAX_VARINT: usize = 10;

/// The fixed part of the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateHeader {
    /// Page size the generations refer to.
    pub page_size: u64,
    /// Pages written by the guest so far.
    pub pages_written: u64,
    /// Number of pages of the VM.
    pub pages: u64,
    /// Pages whose generations the state lists (pages `0..span`); later pages are at 0.
    pub span: u64,
    /// Pages the guest wrote at start (generation 0 of later pages is a zero page).
    pub populated: u64,
    /// Percent of writes that write a zero page.
    pub zero_share: u64,
}

/// Serializes `h` and the `h.span` generations `gens` yields (checked).
pub fn encode(h: &StateHeader, gens: impl Iterator<Item = u64>) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + h.span as usize);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    for x in [
        h.page_size,
        h.pages_written,
        h.pages,
        h.span,
        h.populated,
        h.zero_share,
    ] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    let mut n = 0u64;
    for mut g in gens {
        while g >= 0x80 {
            v.push(g as u8 | 0x80);
            g >>= 7;
        }
        v.push(g as u8);
        n += 1;
    }
    assert_eq!(n, h.span, "synthetic state: span and generations disagree");
    v
}

/// Parses and fully validates a state for a VM of `expect_pages` pages: magic, version, page
/// count, a span within it, exactly `span` well-formed varints and nothing after them.
pub fn decode(b: &[u8], expect_pages: u64) -> Result<(StateHeader, Gens<'_>)> {
    if b.len() < HEADER {
        return Err(Error::State(format!(
            "synthetic state truncated at {} bytes",
            b.len()
        )));
    }
    if b[..4] != MAGIC {
        return Err(Error::State("not a synthetic VM state (bad magic)".into()));
    }
    let version = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Error::State(format!(
            "synthetic state version {version}, this build reads {VERSION}"
        )));
    }
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let h = StateHeader {
        page_size: u64_at(8),
        pages_written: u64_at(16),
        pages: u64_at(24),
        span: u64_at(32),
        populated: u64_at(40),
        zero_share: u64_at(48),
    };
    if h.populated > h.pages || h.zero_share > 100 {
        return Err(Error::State(format!(
            "synthetic state: {} populated of {} pages, zero share {}",
            h.populated, h.pages, h.zero_share
        )));
    }
    if h.pages != expect_pages {
        return Err(Error::State(format!(
            "synthetic state is for {} pages; the VM has {expect_pages}",
            h.pages
        )));
    }
    if h.span > h.pages {
        return Err(Error::State(format!(
            "synthetic state lists {} generations for {} pages",
            h.span, h.pages
        )));
    }
    let gens = Gens {
        bytes: &b[HEADER..],
        left: h.span,
    };
    let mut check = gens.clone();
    while check.left > 0 {
        check.try_next()?;
    }
    if !check.bytes.is_empty() {
        return Err(Error::State(format!(
            "synthetic state has {} bytes after its {} generations",
            check.bytes.len(),
            h.span
        )));
    }
    Ok((h, gens))
}

/// The generations of pages `0..span` of a validated state, in page order.
#[derive(Clone, Debug)]
pub struct Gens<'a> {
    bytes: &'a [u8],
    left: u64,
}

impl Gens<'_> {
    fn try_next(&mut self) -> Result<u64> {
        let mut g = 0u64;
        for (i, &byte) in self.bytes.iter().take(MAX_VARINT).enumerate() {
            // The tenth byte carries the top bit of a u64 only.
            if i == MAX_VARINT - 1 && byte > 1 {
                break;
            }
            g |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.bytes = &self.bytes[i + 1..];
                self.left -= 1;
                return Ok(g);
            }
        }
        Err(Error::State(format!(
            "synthetic state: generation {} left of the span is truncated or overlong",
            self.left
        )))
    }
}

impl Iterator for Gens<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        (self.left > 0).then(|| self.try_next().expect("validated by decode"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(span: u64) -> StateHeader {
        StateHeader {
            page_size: 4096,
            pages_written: 9,
            pages: 5,
            span,
            populated: 5,
            zero_share: 0,
        }
    }

    #[test]
    fn round_trip() {
        let gens = [0, 1, 127, 128, u64::MAX];
        let b = encode(&header(5), gens.iter().copied());
        assert_eq!(b.len(), HEADER + 1 + 1 + 1 + 2 + 10);
        let (h, g) = decode(&b, 5).unwrap();
        assert_eq!(h, header(5));
        assert_eq!(g.collect::<Vec<_>>(), gens);
        let empty = encode(&header(0), std::iter::empty());
        let (h, g) = decode(&empty, 5).unwrap();
        assert_eq!((h.span, g.count()), (0, 0));
    }

    #[test]
    fn rejects_bad_blobs() {
        let b = encode(&header(3), [1, 300, 2].into_iter());
        assert!(decode(&b, 4).is_err(), "page count");
        assert!(decode(&b[..b.len() - 1], 5).is_err(), "truncated");
        assert!(decode(&b[..10], 5).is_err(), "header truncated");
        let mut bad = b.clone();
        bad[4] = 1;
        assert!(decode(&bad, 5).is_err(), "version");
        bad = b.clone();
        bad[0] = b'X';
        assert!(decode(&bad, 5).is_err(), "magic");
        bad = b.clone();
        bad.push(0);
        assert!(decode(&bad, 5).is_err(), "trailing byte");
        bad = b.clone();
        bad[32] = 6;
        assert!(decode(&bad, 5).is_err(), "span over the page count");
        let mut overlong = encode(&header(1), [0].into_iter());
        overlong.pop();
        overlong.extend_from_slice(&[0xff; 9]);
        overlong.push(2);
        assert!(decode(&overlong, 5).is_err(), "varint over 64 bits");
        overlong.truncate(overlong.len() - 1);
        overlong.push(0x81);
        assert!(decode(&overlong, 5).is_err(), "varint over ten bytes");
    }
}
