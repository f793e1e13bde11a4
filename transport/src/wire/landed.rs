//! `Landed`: the destination's per-page hashes of what a pre-copy round landed, for sources
//! whose VM has no dirty log (`caps::LANDED`): the source finds the pages the guest wrote by
//! comparing its memory with these hashes. Encoded as a `Round` chunk's header and ranges,
//! then one little-endian xxh3-64 hash per page of the ranges, in order.

use super::layout::{RangeWire, RoundWire};
use super::le::Le64;
use crate::error::{Error, Result};
use crate::mem::{PageIndex, RegionId};
use crate::pages::PageRange;

/// Most pages (hashes) one `Landed` message may carry.
pub const MAX_LANDED_PAGES: usize = 65536;

/// `Landed`, decoded: one chunk of a round's hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Landed {
    /// Round.
    pub round: u32,
    /// Chunk number within the round's hashes.
    pub chunk: u32,
    /// `ROUND_LAST_CHUNK` on the round's last chunk.
    pub flags: u32,
    /// The pages these hashes are of (bounds checked by the receiver against its map).
    pub ranges: Vec<PageRange>,
    /// One hash per page of `ranges`, range after range.
    pub hashes: Vec<u64>,
}

/// The largest `Landed` payload.
pub(super) const MAX_PAYLOAD: usize = size_of::<RoundWire>()
    + MAX_LANDED_PAGES * size_of::<RangeWire>()
    + MAX_LANDED_PAGES * size_of::<Le64>();

fn pages_of(ranges: &[PageRange]) -> Option<usize> {
    ranges.iter().try_fold(0usize, |n, r| {
        n.checked_add(usize::try_from(r.npages).ok()?)
    })
}

/// Appends `l`'s payload to `out`.
pub(super) fn encode(out: &mut Vec<u8>, l: &Landed) -> Result<()> {
    let pages = pages_of(&l.ranges).filter(|&n| n <= MAX_LANDED_PAGES);
    if pages != Some(l.hashes.len()) || l.ranges.iter().any(|r| r.npages == 0) {
        return Err(Error::InvalidConfig(format!(
            "Landed: {} hashes for {} ranges of {:?} pages (at most {MAX_LANDED_PAGES}, none empty)",
            l.hashes.len(),
            l.ranges.len(),
            pages_of(&l.ranges)
        )));
    }
    out.reserve(MAX_PAYLOAD.min(16 + l.ranges.len() * 16 + l.hashes.len() * 8));
    out.extend_from_slice(bytemuck::bytes_of(&RoundWire {
        round: l.round.into(),
        chunk: l.chunk.into(),
        flags: l.flags.into(),
        count: (l.ranges.len() as u32).into(),
    }));
    for r in &l.ranges {
        out.extend_from_slice(bytemuck::bytes_of(&RangeWire {
            region: r.region.0.into(),
            // At most MAX_LANDED_PAGES, checked above.
            npages: (r.npages as u32).into(),
            first: r.first.0.into(),
        }));
    }
    for h in &l.hashes {
        out.extend_from_slice(&h.to_le_bytes());
    }
    Ok(())
}

/// Decodes a `Landed` payload: the ranges, then exactly one hash per page of them.
pub(super) fn decode(p: &[u8]) -> Result<Landed> {
    let bad = |why: String| Error::Protocol(format!("Landed: {why}"));
    let (head, rest) = p
        .split_at_checked(size_of::<RoundWire>())
        .ok_or_else(|| bad(format!("{} bytes, shorter than its header", p.len())))?;
    let w: RoundWire = bytemuck::pod_read_unaligned(head);
    let count = w.count.get() as usize;
    if count > MAX_LANDED_PAGES {
        return Err(bad(format!("{count} ranges, at most {MAX_LANDED_PAGES}")));
    }
    let (ranges_b, hashes_b) = rest
        .split_at_checked(count * size_of::<RangeWire>())
        .ok_or_else(|| {
            bad(format!(
                "{count} ranges announced, {} bytes carried",
                rest.len()
            ))
        })?;
    let mut ranges = Vec::with_capacity(count);
    let mut pages = 0usize;
    for c in ranges_b.chunks_exact(size_of::<RangeWire>()) {
        let r: RangeWire = bytemuck::pod_read_unaligned(c);
        let n = r.npages.get() as usize;
        if n == 0 {
            return Err(bad("an empty range".into()));
        }
        pages += n;
        if pages > MAX_LANDED_PAGES {
            return Err(bad(format!("more than {MAX_LANDED_PAGES} pages")));
        }
        ranges.push(PageRange {
            region: RegionId(r.region.get()),
            first: PageIndex(r.first.get()),
            npages: n as u64,
        });
    }
    if hashes_b.len() != pages * size_of::<Le64>() {
        return Err(bad(format!(
            "{pages} pages but {} bytes of hashes",
            hashes_b.len()
        )));
    }
    let hashes = hashes_b
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    Ok(Landed {
        round: w.round.get(),
        chunk: w.chunk.get(),
        flags: w.flags.get(),
        ranges,
        hashes,
    })
}

/// Splits a round's landed `ranges` and their `hashes` (one per page, in order) into the
/// chunks of one message each: at least one chunk (maybe empty), the last flagged
/// `ROUND_LAST_CHUNK`. A range longer than a message is split.
pub fn landed_chunks(round: u32, ranges: &[PageRange], hashes: &[u64]) -> Vec<Landed> {
    let mut out = Vec::new();
    let mut cur = Landed {
        round,
        chunk: 0,
        flags: 0,
        ranges: Vec::new(),
        hashes: Vec::new(),
    };
    let mut at = 0usize;
    for r in ranges {
        let mut first = r.first.0;
        let mut left = r.npages as usize;
        while left > 0 {
            let room = MAX_LANDED_PAGES - cur.hashes.len();
            if room == 0 {
                let next = cur.chunk + 1;
                out.push(std::mem::replace(
                    &mut cur,
                    Landed {
                        round,
                        chunk: next,
                        flags: 0,
                        ranges: Vec::new(),
                        hashes: Vec::new(),
                    },
                ));
                continue;
            }
            let n = left.min(room);
            cur.ranges.push(PageRange {
                region: r.region,
                first: PageIndex(first),
                npages: n as u64,
            });
            cur.hashes.extend_from_slice(&hashes[at..at + n]);
            (at, first, left) = (at + n, first + n as u64, left - n);
        }
    }
    cur.flags = super::ROUND_LAST_CHUNK;
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u64, npages: u64) -> PageRange {
        PageRange {
            region: RegionId(1),
            first: PageIndex(first),
            npages,
        }
    }

    #[test]
    fn round_trips_and_refuses_a_hash_count_that_does_not_match() {
        let l = Landed {
            round: 3,
            chunk: 1,
            flags: 0,
            ranges: vec![r(5, 2), r(100, 1)],
            hashes: vec![7, 8, 9],
        };
        let mut b = Vec::new();
        encode(&mut b, &l).unwrap();
        assert_eq!(decode(&b).unwrap(), l);
        // One hash short, one too many, a truncated header.
        assert!(decode(&b[..b.len() - 8]).is_err());
        let mut more = b.clone();
        more.extend_from_slice(&[0; 8]);
        assert!(decode(&more).is_err());
        assert!(decode(&b[..10]).is_err());
        // The encoder refuses what the decoder would.
        let wrong = Landed {
            hashes: vec![1],
            ..l
        };
        assert!(encode(&mut Vec::new(), &wrong).is_err());
    }

    #[test]
    fn refuses_more_pages_than_a_message_holds_before_reading_hashes() {
        let mut b = Vec::new();
        b.extend_from_slice(bytemuck::bytes_of(&RoundWire {
            round: 0.into(),
            chunk: 0.into(),
            flags: 0.into(),
            count: 2.into(),
        }));
        for _ in 0..2 {
            b.extend_from_slice(bytemuck::bytes_of(&RangeWire {
                region: 0.into(),
                npages: (MAX_LANDED_PAGES as u32).into(),
                first: 0.into(),
            }));
        }
        let e = decode(&b).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }

    #[test]
    fn chunks_split_long_ranges_and_flag_the_last() {
        let n = MAX_LANDED_PAGES as u64;
        let ranges = [r(0, n + 10), r(n + 20, 5)];
        let hashes: Vec<u64> = (0..n + 15).collect();
        let c = landed_chunks(4, &ranges, &hashes);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].hashes.len(), MAX_LANDED_PAGES);
        assert_eq!(
            (c[0].flags, c[1].flags),
            (0, super::super::ROUND_LAST_CHUNK)
        );
        assert_eq!(c[1].ranges, vec![r(n, 10), r(n + 20, 5)]);
        assert_eq!(c[1].hashes, (n..n + 15).collect::<Vec<_>>());
        assert_eq!((c[0].chunk, c[1].chunk), (0, 1));
        let empty = landed_chunks(0, &[], &[]);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].ranges.is_empty());
        for l in c.iter().chain(&empty) {
            let mut b = Vec::new();
            encode(&mut b, l).unwrap();
            assert_eq!(&decode(&b).unwrap(), l);
        }
    }
}
