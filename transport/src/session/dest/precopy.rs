//! The destination's pre-copy phase: rounds chunk by chunk until the final one (or, in
//! post-copy sessions, the source's switch to post-copy; in hybrid, the early drops of stale
//! pages before it), then the stop-and-copy switchover: device state, digest, resume.

use std::time::Instant;

use super::{Dest, DestState, Landed, Phase};
use crate::cpu::thread_cpu_time;
use crate::data::Landed as RoundLanded;
use crate::error::{Error, Result};
use crate::pages::PageSet;
use crate::postcopy;
use crate::session::config::MigrationMode;
use crate::session::handle::Phase as Status;
use crate::wire::{
    landed_chunks, Complete, Message, RoundDone, POSTCOPY_LAST_CHUNK, ROUND_FINAL,
    ROUND_LAST_CHUNK, ROUND_ZERO,
};

impl Dest<'_> {
    /// Receives rounds until the final one lands; returns the switchover (or post-copy).
    pub(super) fn precopy(&mut self, mut l: Landed) -> Result<Phase> {
        let map = l.map.clone();
        let mut round_start = Instant::now();
        let mut final_flag = None;
        let (mut early_pages, mut early_micros) = (0u64, 0u64);
        let (mut round_zero, mut round_data) = (0u64, false);
        // The data ranges of the round being received (for `Landed`).
        let mut round_ranges = Vec::new();
        loop {
            let r = match self.recv()? {
                Message::Round(r) => r,
                Message::Params { max_bandwidth } => {
                    tracing::info!(
                        "the source changed the bandwidth cap to {max_bandwidth} bytes/s (0: none)"
                    );
                    self.limiter.set_rate(max_bandwidth);
                    self.control.update(|p| p.max_bandwidth = max_bandwidth);
                    continue;
                }
                Message::DeviceState(blob) => return Ok(Phase::Postcopy(l, blob)),
                Message::PostcopyMissing {
                    chunk,
                    flags,
                    ranges,
                } => {
                    let t = Instant::now();
                    let set = l.early.get_or_insert_with(|| PageSet::empty(&map));
                    let mut chunk_set = PageSet::empty(&map);
                    for r in &ranges {
                        map.span(r.region, r.first, r.npages)?;
                        chunk_set.insert_range(r);
                    }
                    postcopy::drop_pages(&map, &chunk_set)?;
                    set.union_with(&chunk_set);
                    early_pages += chunk_set.count();
                    early_micros += t.elapsed().as_micros() as u64;
                    if flags & POSTCOPY_LAST_CHUNK != 0 {
                        let (micros, pages) = (
                            std::mem::take(&mut early_micros),
                            std::mem::take(&mut early_pages),
                        );
                        self.ctl.send(&Message::PostcopyDropped { micros, pages })?;
                        // Another early batch, or the device state.
                        self.state = DestState::EarlyDrop { chunk: 0 };
                    } else {
                        self.state = DestState::EarlyDrop { chunk: chunk + 1 };
                    }
                    continue;
                }
                _ => unreachable!("state checked"),
            };
            let is_final = r.flags & ROUND_FINAL != 0;
            if *final_flag.get_or_insert(is_final) != is_final {
                return Err(Error::Protocol(format!(
                    "round {}: chunks disagree on the final flag",
                    r.round
                )));
            }
            if r.chunk == 0 {
                round_start = Instant::now();
                self.control.check()?;
            }
            for range in &r.ranges {
                map.span(range.region, range.first, range.npages)?;
            }
            let zero = self.zero.as_mut().expect("set with the VM");
            if r.flags & ROUND_ZERO != 0 {
                if !self.zero_pages {
                    return Err(Error::Protocol(
                        "zero pages announced without the zero-page capability".into(),
                    ));
                }
                round_zero += zero.install(&map, &l.hashes, &r.ranges)?;
            } else if !r.ranges.is_empty() {
                let data = self.data.as_mut().ok_or_else(|| {
                    Error::Protocol("a pre-copy round in a session without a pre-copy path".into())
                })?;
                zero.landed(&r.ranges);
                data.receive_chunk(r.round, &r.ranges)?;
                round_data = true;
                if self.landed {
                    round_ranges.extend_from_slice(&r.ranges);
                }
            }
            if r.flags & ROUND_LAST_CHUNK == 0 {
                self.state = DestState::Precopy {
                    round: r.round,
                    chunk: r.chunk + 1,
                };
                continue;
            }
            // A round without data pages needs nothing of the data path on either end.
            let landed = match self.data.as_mut() {
                Some(data) if std::mem::take(&mut round_data) => data.finish_round(r.round)?,
                _ => RoundLanded::default(),
            };
            l.pages += landed.pages;
            l.bytes += landed.bytes;
            // Post-copy mode's only round is the source's zero-page scan, not a pre-copy round.
            if self.mode != MigrationMode::Postcopy {
                l.rounds += 1;
            }
            let (rounds, bytes) = (l.rounds, l.bytes);
            self.control.update(|p| {
                p.round = rounds;
                p.transferred_bytes = bytes;
            });
            if self.landed {
                // What landed, page by page: the source compares its memory with it.
                let ranges = std::mem::take(&mut round_ranges);
                let mut hashes = Vec::with_capacity(crate::pages::total_pages(&ranges) as usize);
                for g in &ranges {
                    hashes.extend(
                        (g.first.0..g.first.0 + g.npages)
                            .map(|p| l.hashes.get(g.region, crate::mem::PageIndex(p))),
                    );
                }
                for chunk in landed_chunks(r.round, &ranges, &hashes) {
                    self.ctl.send(&Message::Landed(chunk))?;
                }
            }
            self.ctl.send(&Message::RoundDone(RoundDone {
                round: r.round,
                pages: landed.pages + std::mem::take(&mut round_zero),
                bytes: landed.bytes,
                micros: round_start.elapsed().as_micros() as u64,
            }))?;
            final_flag = None;
            if is_final {
                return Ok(Phase::Switchover(l));
            }
            self.state = DestState::Precopy {
                round: r.round + 1,
                chunk: 0,
            };
        }
    }

    /// Device state, the digest check, restore and resume; `Complete`, then `Finish`.
    pub(super) fn switchover(&mut self, l: Landed) -> Result<Phase> {
        self.control.update(|p| p.phase = Status::Device);
        self.state = DestState::AwaitDeviceState;
        let Message::DeviceState(blob) = self.recv()? else {
            unreachable!("state checked")
        };
        self.state = DestState::AwaitSwitchover;
        let Message::Switchover {
            digest,
            pages: total,
        } = self.recv()?
        else {
            unreachable!("state checked")
        };
        let t = Instant::now();
        let mine = l.hashes.check(digest, total)?;
        tracing::debug!("digest computed in {:?}", t.elapsed());
        // The point of no return: the guest runs here from now on.
        self.control.commit()?;
        let vm = self.vm.as_mut().expect("built in setup");
        vm.restore_state(&blob)
            .map_err(|e| Error::vmm("restore device state", e))?;
        vm.resume().map_err(|e| Error::vmm("resume", e))?;
        let resume = t.elapsed();
        tracing::debug!("restored and resumed in {resume:?}");
        self.cpu.add(thread_cpu_time().saturating_sub(l.cpu0));
        let cpu = self.cpu.total();
        self.ctl.send(&Message::Complete(Complete {
            digest: mine,
            cpu_micros: cpu.as_micros() as u64,
            resume_micros: resume.as_micros() as u64,
            pages: l.pages,
            bytes: l.bytes,
        }))?;
        self.await_finish();
        Ok(Phase::Done(Box::new(self.report(&l, mine, cpu, resume))))
    }
}
