//! The destination's post-copy phase: the post-copy set, the resume with userfaultfd in place,
//! the fault and prefetch service until the last page, and what a failure after the resume
//! leaves (the paused guest and the count of missing pages).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Dest, DestState, Landed, Phase};
use crate::cpu::thread_cpu_time;
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;
use crate::pages::PageSet;
use crate::postcopy::{PausedGuest, PostcopyRemnant, PostcopyService, PostcopyStats};
use crate::session::handle::Phase as Status;
use crate::session::stats::{DestReport, FaultLatency};
use crate::vm::DestinationVm;
use crate::wire::{Complete, Message, PostcopyComplete, POSTCOPY_LAST_CHUNK};

impl Dest<'_> {
    /// Post-copy switchover and service: the set, the resume, then the rest of memory.
    pub(super) fn run_postcopy(&mut self, l: Landed, blob: Vec<u8>) -> Result<Phase> {
        let (map, hashes, early) = (&l.map.clone(), l.hashes.clone(), l.early.clone());
        let (rounds, pages, bytes, cpu0) = (l.rounds, l.pages, l.bytes, l.cpu0);
        self.control.update(|p| p.phase = Status::Device);
        let mut missing = PageSet::empty(map);
        self.state = DestState::AwaitPostcopyMissing { chunk: 0 };
        loop {
            let Message::PostcopyMissing {
                chunk,
                flags,
                ranges,
            } = self.recv()?
            else {
                unreachable!("state checked")
            };
            for r in &ranges {
                map.span(r.region, r.first, r.npages)?;
                missing.insert_range(r);
            }
            if flags & POSTCOPY_LAST_CHUNK != 0 {
                break;
            }
            self.state = DestState::AwaitPostcopyMissing { chunk: chunk + 1 };
        }
        let t = Instant::now();
        // Pages received in a round are stale now, except those dropped early; in post-copy
        // mode nothing was received and memory was dropped before the rounds.
        let stale = match &early {
            Some(e) => missing.difference(e),
            None => missing.clone(),
        };
        if let Some(e) = &early {
            missing.union_with(e);
        }
        let fetchers = self.fetchers.take().ok_or_else(|| {
            Error::PostcopyUnavailable("the transport set up no post-copy fetchers".into())
        })?;
        let svc = PostcopyService::start(
            map,
            &missing,
            (rounds > 0).then_some(&stale),
            fetchers,
            hashes.clone(),
            self.cpu.clone(),
            self.pc_alias.clone(),
        )?;
        let svc = self.postcopy.insert(svc);
        let t_service = t.elapsed();
        // The point of no return: the guest runs here from now on.
        self.control.commit()?;
        let vm = self.vm.as_mut().expect("built in setup");
        vm.restore_state(&blob)
            .map_err(|e| Error::vmm("restore device state", e))?;
        let t_restored = t.elapsed();
        vm.resume().map_err(|e| Error::vmm("resume", e))?;
        self.resumed_in_postcopy = true;
        svc.mark_resumed();
        let resume = t.elapsed();
        tracing::debug!(
            "post-copy: service up {t_service:?}, device state restored {t_restored:?}, guest resumed {resume:?} after the set"
        );
        let initial = missing.count();
        let page = map.page_size().bytes();
        self.control.update(|p| {
            p.phase = Status::PostcopyActive;
            p.remaining_bytes = initial * page;
        });
        self.ctl.send(&Message::PostcopyResumed {
            resume_micros: resume.as_micros() as u64,
            missing: initial,
        })?;
        tracing::debug!("post-copy: resumed in {resume:?} with {initial} pages missing");
        self.postcopy
            .as_mut()
            .expect("set above")
            .start_prefetch(hashes.clone(), self.cpu.clone())?;
        if let Some(mut d) = self.data.take() {
            // Rounds are over: release the pre-copy path (over RDMA, its QPs and the pinning
            // registration of guest memory) now that the guest runs, outside the downtime.
            if let Err(e) = d.close() {
                tracing::warn!("closing the pre-copy data path: {e}");
            }
        }
        // The rest of post-copy, over the link of the switchover or, after a link failure,
        // over the one a recovery rebuilt (the source then sends its digest again).
        let mut rest = Rest {
            pages,
            bytes,
            ..Rest::default()
        };
        let (mine, cpu, stats) = loop {
            match self.postcopy_rest(map, &hashes, cpu0, &mut rest) {
                Ok(done) => break done,
                Err(e) if self.recoverable(&e) => {
                    self.recover(&e, map, &hashes)?;
                    rest.digest = None;
                }
                Err(e) => return Err(e),
            }
        };
        tracing::debug!(
            "post-copy: {} zero pages announced, {} resolved without a fetch",
            rest.announced,
            rest.zero_installed
        );
        let (pages, bytes) = (pages + stats.missing, bytes + stats.missing * page);
        self.await_finish();
        let landed = Landed {
            rounds,
            pages,
            bytes,
            ..l
        };
        let base = self.report(&landed, mine, cpu, resume);
        let pauses = self.recovery.as_ref().map_or(&[][..], |r| &r.pauses[..]);
        Ok(Phase::Done(Box::new(DestReport {
            zero_pages: base.zero_pages + rest.announced,
            recoveries: pauses.len() as u32,
            recovery_pauses_ms: pauses.iter().map(|d| d.as_secs_f64() * 1e3).collect(),
            postcopy_pages: stats.missing,
            postcopy_faults: stats.faults,
            postcopy_ms: stats.duration.as_secs_f64() * 1e3,
            fault_latency_us: FaultLatency::from_ns(stats.latency_ns),
            postcopy_zero_copy: self.pc_alias.is_some(),
            postcopy_zero_pages: rest.zero_installed,
            ..base
        })))
    }

    /// From the guest's resume (or a recovery) to `PostcopyComplete` sent: the zero pages the
    /// source announces and its digest (unless they came over an earlier link), the last
    /// page, the digest check. Returns the digest, the CPU time and post-copy's figures.
    fn postcopy_rest(
        &mut self,
        map: &GuestMemoryMap,
        hashes: &Arc<PageHashes>,
        cpu0: Duration,
        rest: &mut Rest,
    ) -> Result<(u128, Duration, PostcopyStats)> {
        let (digest, total) = match rest.digest {
            Some(d) => d,
            None => {
                let d = self.await_digest(map, hashes, rest)?;
                rest.digest = Some(d);
                d
            }
        };
        let page = map.page_size().bytes();
        if rest.stats.is_none() {
            let svc = self.postcopy.as_mut().expect("set up at the switchover");
            let (control, ctl) = (self.control, &self.ctl);
            // The source sends nothing until the last page is in; a closed control connection
            // means it lost the link (or paused post-copy): do not wait for the fetchers to see it.
            svc.wait(self.config.io_timeout, &|left| {
                control.update(|p| p.remaining_bytes = left * page);
                ctl.peer_gone()
                    .then(|| "the source closed the control connection".to_string())
            })
            .map_err(|f| {
                if f.link {
                    Error::PostcopyLink(f.why)
                } else {
                    Error::PostcopyService(f.why)
                }
            })?;
            rest.stats = Some(self.postcopy.take().expect("set above").finish()?);
        }
        let stats = rest.stats.clone().expect("set above");
        let mine = hashes.check(digest, total)?;
        if rest.cpu.is_none() {
            self.cpu.add(thread_cpu_time().saturating_sub(cpu0));
            rest.cpu = Some(self.cpu.total());
        }
        let cpu = rest.cpu.expect("set above");
        let (pages, bytes) = (
            rest.pages + stats.missing,
            rest.bytes + stats.missing * page,
        );
        self.ctl.send(&Message::PostcopyComplete(PostcopyComplete {
            complete: Complete {
                digest: mine,
                cpu_micros: cpu.as_micros() as u64,
                resume_micros: 0,
                pages,
                bytes,
            },
            faults: stats.faults,
            fault_pages: stats.fault_pages,
            postcopy_micros: stats.duration.as_micros() as u64,
            latency_ns: stats.latency_ns,
        }))?;
        Ok((mine, cpu, stats))
    }

    /// Zero pages of the missing set, as the source finds them re-hashing it, then its digest.
    fn await_digest(
        &mut self,
        map: &GuestMemoryMap,
        hashes: &Arc<PageHashes>,
        rest: &mut Rest,
    ) -> Result<(u128, u64)> {
        self.state = DestState::Postcopy { chunk: 0 };
        loop {
            match self.recv()? {
                Message::PostcopyMissing { chunk, ranges, .. } => {
                    if !self.zero_pages {
                        return Err(Error::Protocol(
                            "zero pages announced without the zero-page capability".into(),
                        ));
                    }
                    for r in &ranges {
                        map.span(r.region, r.first, r.npages)?;
                    }
                    if let Some(svc) = self.postcopy.as_ref() {
                        rest.zero_installed += svc.install_zero(hashes, &ranges)?;
                    }
                    rest.announced += crate::pages::total_pages(&ranges);
                    self.state = DestState::Postcopy { chunk: chunk + 1 };
                }
                Message::Switchover { digest, pages } => return Ok((digest, pages)),
                _ => unreachable!("state checked"),
            }
        }
    }

    /// After a failure once the guest runs here in post-copy: stop fetching, pause the guest,
    /// and hand it back with its memory (missing pages stay registered) and the count of
    /// missing pages.
    pub(super) fn postcopy_failed(
        &mut self,
        vm: Option<Box<dyn DestinationVm>>,
        e: Error,
    ) -> Error {
        let mut svc = self.postcopy.take();
        // After the last page (a digest mismatch) nothing is missing.
        let missing = svc.as_mut().map_or(0, PostcopyService::interrupt);
        let total = vm.as_ref().map_or(0, |vm| vm.memory().total_pages());
        tracing::error!("post-copy failed with {missing} of {total} pages missing: {e}");
        let guest = match vm {
            Some(mut vm) => {
                if let Err(pe) = vm.pause() {
                    tracing::error!(
                        "could not pause the destination guest after post-copy failed: {pe}"
                    );
                }
                PausedGuest::new(PostcopyRemnant::new(svc, vm))
            }
            None => PausedGuest::default(),
        };
        Error::PostcopyInterrupted {
            missing,
            total,
            reason: e.to_string(),
            guest,
        }
    }
}

/// What post-copy has done so far, kept across recoveries.
#[derive(Default)]
struct Rest {
    /// The source's digest and page count, once received over the current link.
    digest: Option<(u128, u64)>,
    /// Post-copy's figures, once the last page is in.
    stats: Option<PostcopyStats>,
    /// The session's CPU time, once the last page is in.
    cpu: Option<Duration>,
    /// Pages and bytes received before post-copy.
    pages: u64,
    bytes: u64,
    zero_installed: u64,
    announced: u64,
}
