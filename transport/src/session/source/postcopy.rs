//! The source's post-copy phase: pause, device state and the post-copy set (the destination's
//! resume ends the downtime), then the digest of the paused memory, the page server (TCP) or
//! nothing at all (RDMA: the destination READs) until the destination holds every page.

use std::time::Instant;

use super::round::{MIN_HOLE_RUN, PIECE_PAGES};
use super::{message_chunks, Precopy, Source, SourceState, EARLY_ENOUGH_PAGES, MAX_EARLY_BATCHES};
use crate::error::{Error, Result};
use crate::pages::{PageRange, PageSet};
use crate::session::config::MigrationMode;
use crate::session::handle::Phase as Status;
use crate::session::stats::{mib_s, FaultLatency, MigrationReport};
use crate::wire::{
    Message, PostcopyComplete, MAX_RANGES_PER_MSG, POSTCOPY_EARLY, POSTCOPY_LAST_CHUNK,
    POSTCOPY_ZERO,
};

impl Source<'_> {
    /// Post-copy switchover: pause, device state, the post-copy set; the destination's resume
    /// ends the downtime. Then re-hash the set while the destination runs, send the digest,
    /// serve pages until the destination holds all of them, and compare its digest.
    pub(super) fn run_postcopy(&mut self, pre: Precopy) -> Result<MigrationReport> {
        let hybrid = self.config.mode == MigrationMode::Hybrid;
        let rounds = pre.round;
        let mut set = pre.set.clone();
        // Hybrid: the pages dirtied during the last round are stale on the destination; have
        // it drop them while the guest still runs here, so that only the pages dirtied since
        // are dropped during the downtime. Pages re-dirtied after being dropped stay missing
        // and need nothing more, so each batch carries only newly stale pages and the batches
        // shrink quickly.
        let mut early: Option<PageSet> = None;
        for batch in 0..MAX_EARLY_BATCHES {
            if !hybrid || set.count() <= EARLY_ENOUGH_PAGES {
                break;
            }
            let t = Instant::now();
            self.send_missing(&set, POSTCOPY_EARLY)?;
            self.state = SourceState::AwaitPostcopyDropped;
            let Message::PostcopyDropped { micros, pages } = self.recv()? else {
                unreachable!("state checked")
            };
            if pages != set.count() {
                return Err(Error::Protocol(format!(
                    "destination dropped {pages} pages, {} were sent",
                    set.count()
                )));
            }
            tracing::debug!("post-copy: early batch {batch}: {pages} stale pages dropped in {micros} µs ({:?} round trip)", t.elapsed());
            let dropped = early.get_or_insert_with(|| PageSet::empty(&self.map));
            dropped.union_with(&set);
            let mut dirty = PageSet::empty(&self.map);
            self.vm
                .fetch_and_clear_dirty(&mut dirty)
                .map_err(|e| Error::vmm("fetch dirty log", e))?;
            set = dirty.difference(dropped);
        }
        self.vm.pause().map_err(|e| Error::vmm("pause", e))?;
        self.paused = true;
        let paused_at = Instant::now();
        self.control.update(|p| p.phase = Status::Device);
        // What needs hashing again after the resume: everything in the set, or after post-copy
        // mode's scan only what the guest wrote since.
        let mut dirty = PageSet::empty(&self.map);
        if self.logging {
            self.vm
                .fetch_and_clear_dirty(&mut dirty)
                .map_err(|e| Error::vmm("fetch dirty log", e))?;
            set.union_with(&dirty);
        }
        tracing::debug!(
            "post-copy: paused, dirty set fetched in {:?}",
            paused_at.elapsed()
        );
        let blob = self
            .vm
            .save_state()
            .map_err(|e| Error::vmm("save device state", e))?;
        let state_bytes = blob.len() as u64;
        self.ctl.send(&Message::DeviceState(blob))?;
        tracing::debug!(
            "post-copy: device state ({state_bytes} bytes) sent {:?} after pause",
            paused_at.elapsed()
        );
        // The point of no return: with the whole set the destination resumes the guest.
        self.control.commit()?;
        self.send_missing(&set, 0)?;
        // From here the destination may resume the guest at any moment: if the answer is lost
        // the outcome is unknown and the source stays paused; an Abort still resumes it.
        self.switchover_sent = true;
        tracing::debug!(
            "post-copy: final set of {} pages sent {:?} after pause",
            set.count(),
            paused_at.elapsed()
        );
        if let Some(early) = &early {
            set.union_with(early);
        }
        let ranges: Vec<PageRange> = set.ranges(u64::from(u32::MAX)).collect();
        self.state = SourceState::AwaitPostcopyResumed;
        let Message::PostcopyResumed {
            missing,
            resume_micros,
        } = self.recv()?
        else {
            unreachable!("state checked")
        };
        let downtime = paused_at.elapsed();
        // The guest runs on the destination from here: never resume it here.
        self.guest_moved = true;
        self.control.update(|p| {
            p.phase = Status::PostcopyActive;
            p.remaining_bytes = missing * self.map.page_size().bytes();
        });
        tracing::info!("post-copy: destination resumed in {resume_micros} µs; downtime {downtime:?}; {missing} pages to fetch");
        if missing != set.count() {
            return Err(Error::Protocol(format!(
                "destination marked {missing} pages missing, the post-copy set has {}",
                set.count()
            )));
        }
        let rehash = if pre.scanned {
            dirty.ranges(u64::from(u32::MAX)).collect()
        } else {
            ranges
        };
        // A link failure from here on pauses post-copy (when both ends recover): the source
        // finishes hashing, reconnects, and sends its digest over the new link.
        self.hash_postcopy_set(&rehash)?;
        let digest = self.hashes.digest();
        let done = loop {
            if let Some(e) = self.link_down.take() {
                self.recover(&e)?;
            }
            match self.await_postcopy_complete(digest) {
                Ok(done) => break done,
                Err(e) if self.recoverable(&e) => self.link_down = Some(e),
                Err(e) => return Err(e),
            }
        };
        let PostcopyComplete {
            complete,
            faults,
            fault_pages,
            postcopy_micros,
            latency_ns,
        } = done;
        if complete.digest != digest {
            // The guest runs on the destination (it resumed there): the source stays paused.
            return Err(Error::DigestMismatch {
                source_digest: digest,
                dest_digest: complete.digest,
            });
        }
        self.state = SourceState::Done;
        if let Err(e) = self.ctl.send(&Message::Finish) {
            tracing::warn!("the destination runs the guest, but Finish was not delivered: {e}");
        }
        let data = self.data.as_mut().expect("set up before post-copy");
        let served = data.pages_served().map(|n| n + self.served_before);
        if let Err(e) = data.stop_serving() {
            tracing::warn!("post-copy page server: {e}");
        }
        let page = self.map.page_size().bytes();
        // Over RDMA the destination READ the pages without this end seeing it: its count.
        let bytes = match served {
            Some(served) => pre.bytes + served * page,
            None => complete.bytes,
        };
        let started = self.started;
        Ok(MigrationReport {
            transport: self.transport.to_string(),
            transport_reason: self.reason.clone(),
            mem_bytes: self.map.total_bytes(),
            page_size: page,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            rounds,
            bytes_transferred: bytes,
            zero_pages: self.zero_total,
            throughput_mib_s: mib_s(pre.bytes, pre.round_time.as_secs_f64()),
            verified: true,
            digest: format!("{digest:032x}"),
            source_cpu_ms: 0.0,
            dest_cpu_ms: complete.cpu_micros as f64 / 1e3,
            forced_switchover: false,
            device_state_bytes: state_bytes,
            per_round: pre.per_round,
            mode: self.config.mode.name().into(),
            postcopy: true,
            postcopy_pages: missing,
            postcopy_faults: faults,
            postcopy_fault_pages: fault_pages,
            postcopy_ms: postcopy_micros as f64 / 1e3,
            fault_latency_us: FaultLatency::from_ns(latency_ns),
            recoveries: self.pauses.len() as u32,
            recovery_pauses_ms: self.pauses.iter().map(|d| d.as_secs_f64() * 1e3).collect(),
            ..MigrationReport::default()
        })
    }

    /// Sends the digest of the paused memory and waits for the destination's last page.
    fn await_postcopy_complete(&mut self, digest: u128) -> Result<PostcopyComplete> {
        self.ctl.send(&Message::Switchover {
            digest,
            pages: self.hashes.pages(),
        })?;
        self.state = SourceState::AwaitPostcopyComplete;
        // Post-copy may take longer than one I/O timeout: keep waiting while pages are served.
        let mut served = self.data.as_ref().and_then(|d| d.pages_served());
        loop {
            match self.recv() {
                Ok(Message::PostcopyComplete(done)) => return Ok(done),
                Ok(_) => unreachable!("state checked"),
                Err(Error::Timeout(why)) => {
                    let now = self.data.as_ref().and_then(|d| d.pages_served());
                    // Over RDMA the destination READs without this end seeing it: it bounds
                    // its own stalls (the READ engine's timeout) and reports or aborts.
                    if now.is_some() && now == served {
                        return Err(Error::Timeout(format!(
                            "{why}; no page requested meanwhile"
                        )));
                    }
                    served = now;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Hashes the post-copy pages of `ranges` into the digest table while the destination
    /// runs; with zero pages, tells it which of them are zero (`POSTCOPY_ZERO` chunks, sent
    /// piece by piece so that its fetchers skip them as early as possible).
    fn hash_postcopy_set(&mut self, ranges: &[PageRange]) -> Result<()> {
        if !self.zero_pages {
            for r in ranges {
                self.hashes.update(&self.map, r)?;
            }
            return Ok(());
        }
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        let mut chunk = 0u32;
        let mut pending = 0u64;
        for r in ranges {
            let mut first = r.first.0;
            while first < r.end() {
                let piece = PageRange {
                    region: r.region,
                    first: crate::mem::PageIndex(first),
                    npages: (r.end() - first).min(PIECE_PAGES),
                };
                first += piece.npages;
                let known = piece.npages >= MIN_HOLE_RUN
                    && self.holes.find(&self.map, &piece, &mut self.hole_buf);
                let holes = known.then_some(&self.hole_buf[..]);
                self.hashes
                    .classify(&self.map, &piece, holes, &mut data, &mut zero)?;
                data.clear();
                pending += piece.npages;
                if pending >= PIECE_PAGES || zero.len() >= MAX_RANGES_PER_MSG / 2 {
                    pending = 0;
                    self.send_zero(&mut chunk, &mut zero)?;
                }
            }
        }
        self.send_zero(&mut chunk, &mut zero)
    }

    /// Sends `zero` (if any) as the next `POSTCOPY_ZERO` chunk and empties it.
    fn send_zero(&mut self, chunk: &mut u32, zero: &mut Vec<PageRange>) -> Result<()> {
        if zero.is_empty() {
            return Ok(());
        }
        if self.link_down.is_some() {
            // The link is down: the destination fetches these pages instead.
            zero.clear();
            return Ok(());
        }
        let n = crate::pages::total_pages(zero);
        match self.ctl.send(&Message::PostcopyMissing {
            chunk: *chunk,
            flags: POSTCOPY_ZERO,
            ranges: std::mem::take(zero),
        }) {
            Ok(()) => {
                self.zero_total += n;
                *chunk += 1;
                Ok(())
            }
            Err(e) if self.recoverable(&e) => {
                self.link_down = Some(e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a post-copy set in chunks (`flags` added to each; the last also carries
    /// `POSTCOPY_LAST_CHUNK`).
    pub(super) fn send_missing(&mut self, set: &PageSet, flags: u32) -> Result<()> {
        let ranges: Vec<PageRange> = set.ranges(u64::from(u32::MAX)).collect();
        let chunks = message_chunks(&ranges);
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let last = if i + 1 == n { POSTCOPY_LAST_CHUNK } else { 0 };
            self.ctl.send(&Message::PostcopyMissing {
                chunk: i as u32,
                flags: flags | last,
                ranges: chunk.to_vec(),
            })?;
        }
        Ok(())
    }
}
