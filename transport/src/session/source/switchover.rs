//! The source's stop-and-copy phase: the final round with the guest paused, the device
//! state, the digest (`Switchover`, the point of no return: no cancel after it), the
//! destination's `Complete` and this end's `Finish`.

use std::time::Instant;

use super::{Phase, Precopy, Source, SourceState};
use crate::error::{Error, Result};
use crate::session::stats::{mib_s, MigrationReport};
use crate::wire::Message;

impl Source<'_> {
    /// The final round and the switchover; `paused_at` starts the downtime.
    pub(super) fn stop_and_copy(&mut self, mut p: Precopy, paused_at: Instant) -> Result<Phase> {
        let page = self.map.page_size().bytes();
        let round = p.round;
        let stats = self.run_round(&mut p, true)?;
        (self.progress)(&stats);
        p.per_round.push(stats);
        self.control.update(|pr| {
            pr.round = round + 1;
            pr.remaining_bytes = 0;
        });
        tracing::debug!("final round landed {:?} after pause", paused_at.elapsed());
        let final_landed = Instant::now();

        let blob = self
            .vm
            .save_state()
            .map_err(|e| Error::vmm("save device state", e))?;
        tracing::debug!(
            "device state saved ({} bytes) {:?} after pause",
            blob.len(),
            paused_at.elapsed()
        );
        let state_bytes = blob.len() as u64;
        self.ctl.send(&Message::DeviceState(blob))?;
        let digest = self.hashes.digest();
        // The point of no return: once Switchover is out the destination may run the guest.
        self.control.commit()?;
        self.ctl.send(&Message::Switchover {
            digest,
            pages: self.hashes.pages(),
        })?;
        self.switchover_sent = true;
        tracing::debug!("switchover sent {:?} after pause", paused_at.elapsed());
        self.state = SourceState::AwaitComplete;
        let Message::Complete(done) = self.recv()? else {
            unreachable!("state checked")
        };
        let downtime = paused_at.elapsed();
        let switchover = final_landed.elapsed();
        if done.digest != digest {
            // An honest destination compares the digests itself and aborts on a mismatch; one
            // that claims success with another digest is broken or hostile. No Finish: the
            // source VM is kept (paused, the outcome unknown) rather than dropped.
            return Err(Error::DigestMismatch {
                source_digest: digest,
                dest_digest: done.digest,
            });
        }
        self.state = SourceState::Done;
        if let Err(e) = self.ctl.send(&Message::Finish) {
            tracing::warn!("the destination runs the guest, but Finish was not delivered: {e}");
        }
        Ok(Phase::Done(Box::new(MigrationReport {
            transport: self.transport.to_string(),
            transport_reason: self.reason.clone(),
            mem_bytes: self.map.total_bytes(),
            page_size: page,
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            rounds: round + 1,
            bytes_transferred: p.bytes,
            zero_pages: self.zero_total,
            throughput_mib_s: mib_s(p.bytes, p.round_time.as_secs_f64()),
            verified: true,
            digest: format!("{digest:032x}"),
            source_cpu_ms: 0.0,
            dest_cpu_ms: done.cpu_micros as f64 / 1e3,
            forced_switchover: p.forced,
            device_state_bytes: state_bytes,
            switchover_ms: switchover.as_secs_f64() * 1e3,
            per_round: p.per_round,
            mode: self.config.mode.name().into(),
            ..MigrationReport::default()
        })))
    }
}
