//! The source's pre-copy phase, one round per step: send the round, fetch the dirty log, ask
//! the convergence policy (and auto-converge) what next: another round, the stop-and-copy,
//! or (hybrid, or when asked through the control) post-copy. Parameters changed through the
//! [`crate::session::MigrationControl`] take effect here, before the next round.

use std::time::Instant;

use super::{Phase, Precopy, Source};
use crate::error::{Error, Result};
use crate::session::config::{ConvergencePolicy, MigrationMode};
use crate::session::handle::Phase as Status;
use crate::session::policy::{Convergence, Decision};
use crate::session::stats::mib_s;
use crate::wire::Message;

impl Source<'_> {
    /// Runs round `p.round` with the guest running; returns the next phase.
    pub(super) fn precopy_round(&mut self, mut p: Precopy) -> Result<Phase> {
        self.apply_parameters(&mut p.conv)?;
        let page = self.map.page_size().bytes();
        let round = p.round;
        let t = Instant::now();
        let mut stats = self.run_round(&mut p, false)?;
        let (elapsed, bytes) = (
            std::time::Duration::from_secs_f64(stats.ms / 1e3),
            stats.bytes,
        );
        p.set.clear();
        self.fetch_dirty(&mut p.set)?;
        let dirty = p.set.count();
        let (mut decision, predicted) = p.conv.after_round(round + 1, bytes, elapsed, dirty * page);
        if self.config.auto_converge && decision != Decision::Switchover {
            decision = self.auto_converge(&mut p.conv, round + 1, bytes, dirty * page, decision);
        }
        stats.dirty_rate_mib_s = mib_s(dirty * page, t.elapsed().as_secs_f64());
        stats.dirty_pages = dirty;
        stats.predicted_downtime_ms = predicted.as_secs_f64() * 1e3;
        stats.throttle_percent = self.auto.percent();
        self.control.update(|pr| {
            pr.round = round + 1;
            pr.remaining_bytes = dirty * page;
            pr.dirty_bytes_per_sec =
                (dirty * page) * 1_000_000 / (t.elapsed().as_micros().max(1) as u64);
            pr.bandwidth_bytes_per_sec = bytes * 1_000_000 / (elapsed.as_micros().max(1) as u64);
            pr.expected_downtime = predicted;
            pr.throttle_percent = stats.throttle_percent;
        });
        (self.progress)(&stats);
        p.per_round.push(stats);
        p.round += 1;
        if self.control.take_start_postcopy() && self.config.mode != MigrationMode::Precopy {
            tracing::info!(
                "post-copy requested after {} rounds; switching over",
                round + 1
            );
            return Ok(Phase::Postcopy(p));
        }
        match decision {
            Decision::Continue => Ok(Phase::Precopy(p)),
            Decision::Switchover => self.pause_for_final_round(p),
            Decision::NotConverging if self.config.mode == MigrationMode::Hybrid => {
                tracing::info!(
                    "pre-copy is not converging after {} rounds; switching over in post-copy",
                    round + 1
                );
                Ok(Phase::Postcopy(p))
            }
            Decision::NotConverging => match self.config.policy {
                ConvergencePolicy::Stop => {
                    tracing::warn!(
                        "pre-copy is not converging after {} rounds; switching over anyway",
                        round + 1
                    );
                    p.forced = true;
                    self.pause_for_final_round(p)
                }
                ConvergencePolicy::Abort if p.conv.timed_out() => Err(Error::NotConverged(format!(
                    "no round shrank the dirty set for the progress timeout ({:?}); after {} rounds the predicted downtime is {:.1} ms, over the {:?} limit",
                    self.config.progress_timeout.unwrap_or_default(),
                    round + 1,
                    predicted.as_secs_f64() * 1e3,
                    p.conv.downtime_limit()
                ))),
                ConvergencePolicy::Abort => Err(Error::NotConverged(format!(
                    "after {} rounds the predicted downtime is {:.1} ms, over the {:?} limit",
                    round + 1,
                    predicted.as_secs_f64() * 1e3,
                    p.conv.downtime_limit()
                ))),
            },
        }
    }

    /// Pauses the guest and takes what it dirtied last: the stop-and-copy round's set.
    fn pause_for_final_round(&mut self, mut p: Precopy) -> Result<Phase> {
        self.vm.pause().map_err(|e| Error::vmm("pause", e))?;
        self.paused = true;
        let paused_at = Instant::now();
        self.control.update(|pr| pr.phase = Status::Device);
        self.fetch_dirty(&mut p.set)?;
        tracing::debug!(
            "paused; final dirty set fetched in {:?}",
            paused_at.elapsed()
        );
        Ok(Phase::StopAndCopy(p, paused_at))
    }

    /// Adds the pages written since the last fetch to `set`: the content comparison first
    /// (a VM without a dirty log), then the VM's own fetch.
    fn fetch_dirty(&mut self, set: &mut crate::pages::PageSet) -> Result<()> {
        if let Some(c) = self.content.as_mut() {
            c.fetch(&self.map, &self.hashes, set)?;
        }
        self.vm
            .fetch_and_clear_dirty(set)
            .map_err(|e| Error::vmm("fetch dirty log", e))
    }

    /// New parameters from the control: the downtime limit goes to the policy, a new
    /// bandwidth cap to this end's pacer and, announced, to the destination's.
    fn apply_parameters(&mut self, conv: &mut Convergence) -> Result<()> {
        if let Some(limit) = self.control.take_downtime_limit() {
            tracing::info!("downtime limit changed to {limit:?}");
            conv.set_downtime_limit(limit);
            self.control.update(|p| p.downtime_limit = limit);
        }
        if let Some(cap) = self.control.take_bandwidth() {
            let rate = cap.unwrap_or(0);
            tracing::info!(
                "bandwidth cap changed to {}",
                cap.map_or("none".to_string(), |b| format!("{b} bytes/s"))
            );
            self.limiter.set_rate(rate);
            if self.live_params {
                self.ctl.send(&Message::Params {
                    max_bandwidth: rate,
                })?;
            } else {
                tracing::warn!("the destination takes no live parameters: RDMA reads keep the cap they started with");
            }
            self.control.update(|p| p.max_bandwidth = rate);
        }
        Ok(())
    }

    /// Auto-converge after a round that did not switch over: throttles the guest (more) when
    /// the round did not shrink, and keeps pre-copy going while the throttle can still rise.
    /// Returns the decision to act on.
    fn auto_converge(
        &mut self,
        conv: &mut Convergence,
        rounds_done: u32,
        moved: u64,
        dirtied: u64,
        decision: Decision,
    ) -> Decision {
        let Some(next) = self.auto.after_round(moved, dirtied, decision) else {
            return decision;
        };
        match self.vm.throttle(next) {
            Ok(()) => {
                tracing::info!(
                    "auto-converge: the guest dirtied {dirtied} bytes in a round that moved {moved}; throttled to {next}%"
                );
                self.auto.applied(next);
                conv.restart_stall();
                if decision == Decision::NotConverging && !conv.out_of_rounds(rounds_done) {
                    Decision::Continue
                } else {
                    decision
                }
            }
            Err(e) => {
                tracing::warn!("auto-converge: the VMM cannot throttle the guest: {e}");
                // Never ask again; the policy applies as without auto-converge.
                self.auto.disable();
                decision
            }
        }
    }
}
