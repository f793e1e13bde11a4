//! One pre-copy round on the source: hash the round's pages in pieces, sort out the zero pages
//! (with [`caps::ZERO_PAGES`](crate::wire::caps::ZERO_PAGES) they travel as ranges in a
//! `ROUND_ZERO` chunk, never as bytes), announce each piece's data pages and hand them to the
//! data path while the next piece is hashed, then wait for the destination's `RoundDone`.

use super::{Source, SourceState};
use crate::error::{Error, Result};
use crate::pages::{PageRange, PageSet};
use crate::wire::{Message, Round, ROUND_FINAL, ROUND_LAST_CHUNK, ROUND_ZERO};

/// Pages hashed and announced at a time: small enough that the first piece's hashing adds
/// well under a millisecond before the data path starts, large enough that a round of
/// gigabytes is a few hundred messages.
pub(super) const PIECE_PAGES: u64 = 1024;

/// What one round moved.
#[derive(Debug, Default)]
pub(super) struct RoundSent {
    /// Pages moved as data.
    pub data_pages: u64,
    /// Pages announced as zero.
    pub zero_pages: u64,
    /// The data pages, when asked for (a metadata-only round keeps them for post-copy).
    pub data_set: Option<PageSet>,
}

/// Splits `ranges` (each at most [`PIECE_PAGES`] long) into pieces of at most that many pages.
fn pieces(ranges: &[PageRange]) -> Vec<&[PageRange]> {
    let mut out = Vec::new();
    let (mut start, mut pages) = (0, 0);
    for (i, r) in ranges.iter().enumerate() {
        if pages + r.npages > PIECE_PAGES && i > start {
            out.push(&ranges[start..i]);
            (start, pages) = (i, 0);
        }
        pages += r.npages;
    }
    out.push(&ranges[start..]);
    out
}

impl Source<'_> {
    /// Sends round `round` of `set`: every page hashed into the digest table, zero pages
    /// announced as ranges, the rest moved by the data path. `metadata_only` moves no page
    /// bytes at all (post-copy mode's scan: the data pages go to the post-copy set, returned in
    /// [`RoundSent::data_set`]).
    pub(super) fn send_round(
        &mut self,
        round: u32,
        set: &PageSet,
        final_round: bool,
        metadata_only: bool,
    ) -> Result<RoundSent> {
        let ranges: Vec<PageRange> = set.ranges(PIECE_PAGES).collect();
        let base = if final_round { ROUND_FINAL } else { 0 };
        let mut sent = RoundSent {
            data_set: metadata_only.then(|| PageSet::empty(&self.map)),
            ..RoundSent::default()
        };
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        let mut chunk = 0u32;
        let mut moved_data = false;
        let all = pieces(&ranges);
        let n = all.len();
        for (i, piece) in all.into_iter().enumerate() {
            data.clear();
            zero.clear();
            for r in piece {
                if self.zero_pages {
                    let known = self.holes.find(&self.map, r, &mut self.hole_buf);
                    let holes = known.then_some(&self.hole_buf[..]);
                    self.hashes
                        .classify(&self.map, r, holes, &mut data, &mut zero)?;
                } else {
                    self.hashes.update(&self.map, r)?;
                    data.push(*r);
                }
            }
            let last = i + 1 == n;
            sent.zero_pages += crate::pages::total_pages(&zero);
            if let Some(s) = sent.data_set.as_mut() {
                data.iter().for_each(|r| s.insert_range(r));
                data.clear();
            }
            sent.data_pages += crate::pages::total_pages(&data);
            // The data chunk (the last piece always sends one, maybe empty, unless a zero chunk
            // closes the round), then the zero chunk.
            if !data.is_empty() || (last && zero.is_empty()) {
                let flags = base
                    | if last && zero.is_empty() {
                        ROUND_LAST_CHUNK
                    } else {
                        0
                    };
                self.ctl.send(&Message::Round(Round {
                    round,
                    chunk,
                    flags,
                    ranges: data.clone(),
                }))?;
                chunk += 1;
                if !data.is_empty() {
                    moved_data = true;
                    self.data
                        .as_mut()
                        .expect("data path is set up before rounds")
                        .send_chunk(round, &data)?;
                }
            }
            if !zero.is_empty() {
                let flags = base | ROUND_ZERO | if last { ROUND_LAST_CHUNK } else { 0 };
                self.ctl.send(&Message::Round(Round {
                    round,
                    chunk,
                    flags,
                    ranges: zero.clone(),
                }))?;
                chunk += 1;
            }
        }
        // A round without data pages needs nothing of the data path on either end.
        if moved_data {
            self.data
                .as_mut()
                .expect("data path is set up before rounds")
                .finish_round(round)?;
        }
        self.state = SourceState::AwaitRoundDone(round);
        let Message::RoundDone(done) = self.recv()? else {
            unreachable!("state checked")
        };
        if done.pages != sent.data_pages + sent.zero_pages {
            return Err(Error::Protocol(format!(
                "round {round}: destination landed {} pages, {} were sent ({} zero)",
                done.pages,
                sent.data_pages + sent.zero_pages,
                sent.zero_pages
            )));
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{PageIndex, RegionId};

    fn r(first: u64, npages: u64) -> PageRange {
        PageRange {
            region: RegionId(0),
            first: PageIndex(first),
            npages,
        }
    }

    #[test]
    fn pieces_stay_within_the_page_budget_and_cover_every_range_once() {
        let ranges = vec![
            r(0, 1000),
            r(2000, 100),
            r(3000, 1024),
            r(5000, 1),
            r(6000, 1),
        ];
        let p = pieces(&ranges);
        assert_eq!(p.len(), 4);
        for piece in &p {
            assert!(crate::pages::total_pages(piece) <= PIECE_PAGES);
        }
        assert_eq!(p.concat(), ranges);
        assert_eq!(pieces(&[]), vec![&[] as &[PageRange]]);
    }
}
