//! One pre-copy round on the source: hash the round's pages in pieces, sort out the zero pages
//! (with [`caps::ZERO_PAGES`](crate::wire::caps::ZERO_PAGES) they travel as ranges in a
//! `ROUND_ZERO` chunk, never as bytes), announce each piece's data pages and hand them to the
//! data path while the next piece is hashed, then wait for the destination's `RoundDone`.

use super::{Source, SourceState};
use crate::error::{Error, Result};
use crate::pages::{PageRange, PageSet};
use crate::wire::{Message, Round, ROUND_FINAL, ROUND_LAST_CHUNK, ROUND_ZERO};

/// Pages hashed and announced at a time, at most: large enough that a round of gigabytes is a
/// few hundred messages.
pub(super) const PIECE_PAGES: u64 = 1024;
/// The first piece of a round: the data path waits for its hashing (tens of microseconds, not
/// a millisecond, which counts in the stop-and-copy round); later pieces double up to
/// [`PIECE_PAGES`], hashed while the data path moves the ones before.
const FIRST_PIECE_PAGES: u64 = 64;
/// Runs shorter than this are hashed without asking the kernel for holes first.
pub(super) const MIN_HOLE_RUN: u64 = 16;

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

/// Splits `ranges` into pieces of [`FIRST_PIECE_PAGES`] pages, then twice as many each time
/// up to [`PIECE_PAGES`], splitting a range where a piece ends.
fn pieces(ranges: &[PageRange]) -> Vec<Vec<PageRange>> {
    let mut out = vec![Vec::new()];
    let (mut pages, mut budget) = (0, FIRST_PIECE_PAGES);
    for r in ranges {
        let mut r = *r;
        while r.npages > 0 {
            if pages == budget {
                out.push(Vec::new());
                pages = 0;
                budget = (budget * 2).min(PIECE_PAGES);
            }
            let take = r.npages.min(budget - pages);
            out.last_mut()
                .expect("never empty")
                .push(PageRange { npages: take, ..r });
            pages += take;
            r.first.0 += take;
            r.npages -= take;
        }
    }
    out
}

impl Source<'_> {
    /// Sends round `p.round` of `p.set` and adds it to the totals; the figures of the round,
    /// without what only the next dirty-log fetch knows (dirty pages and rate, prediction).
    pub(super) fn run_round(
        &mut self,
        p: &mut super::Precopy,
        final_round: bool,
    ) -> Result<crate::session::stats::RoundStats> {
        let t = std::time::Instant::now();
        let sent = self.send_round(p.round, &p.set, final_round, false)?;
        let elapsed = t.elapsed();
        self.zero_total += sent.zero_pages;
        let bytes = sent.data_pages * self.map.page_size().bytes();
        p.bytes += bytes;
        p.round_time += elapsed;
        Ok(crate::session::stats::RoundStats {
            round: p.round,
            final_round,
            pages: sent.data_pages,
            zero_pages: sent.zero_pages,
            bytes,
            ms: elapsed.as_secs_f64() * 1e3,
            mib_s: crate::session::stats::mib_s(bytes, elapsed.as_secs_f64()),
            dirty_rate_mib_s: 0.0,
            dirty_pages: 0,
            predicted_downtime_ms: 0.0,
            throttle_percent: self.auto.percent(),
        })
    }

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
        for (i, piece) in all.iter().enumerate() {
            data.clear();
            zero.clear();
            for r in piece {
                if self.zero_pages {
                    // Short runs are pages just written (dirty), never holes: one pagemap
                    // read per run would cost more than hashing them.
                    let known = r.npages >= MIN_HOLE_RUN
                        && self.holes.find(&self.map, r, &mut self.hole_buf);
                    let holes = known.then_some(&self.hole_buf[..]);
                    self.hashes
                        .classify(&self.map, r, holes, &mut data, &mut zero)?;
                } else {
                    self.hashes.update(&self.map, r)?;
                    data.push(*r);
                }
            }
            let last = i + 1 == n;
            // A cancel lands between pieces; the progress moves piece by piece.
            self.control.check()?;
            let (piece_pages, data_pages) = (
                crate::pages::total_pages(piece),
                crate::pages::total_pages(&data),
            );
            let page = self.map.page_size().bytes();
            if !metadata_only {
                self.moved += data_pages * page;
            }
            let moved = self.moved;
            self.control.update(|p| {
                p.transferred_bytes = moved;
                p.remaining_bytes = p.remaining_bytes.saturating_sub(piece_pages * page);
                p.zero_pages += crate::pages::total_pages(&zero);
            });
            sent.zero_pages += crate::pages::total_pages(&zero);
            if let Some(c) = &self.content {
                c.zeroed(&zero);
            }
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
        if self.content.is_some() {
            self.receive_landed(round, sent.data_pages)?;
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
    fn pieces_grow_to_the_budget_and_cover_every_page_once() {
        let ranges = vec![r(0, 1000), r(2000, 100), r(3000, 5000), r(9000, 1)];
        let p = pieces(&ranges);
        let sizes: Vec<u64> = p.iter().map(|x| crate::pages::total_pages(x)).collect();
        assert_eq!(&sizes[..5], &[64, 128, 256, 512, 1024]);
        assert!(sizes.iter().all(|&n| n <= PIECE_PAGES));
        assert_eq!(sizes.iter().sum::<u64>(), 6101);
        // Every page once, in order, runs split only where a piece ends.
        let mut pages = Vec::new();
        for r in p.concat() {
            pages.extend(r.first.0..r.end());
        }
        let want: Vec<u64> = ranges.iter().flat_map(|r| r.first.0..r.end()).collect();
        assert_eq!(pages, want);
        assert_eq!(pieces(&[]), vec![Vec::<PageRange>::new()]);
    }
}
