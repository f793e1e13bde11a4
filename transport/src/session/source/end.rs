//! How the source ends: the teardown on every outcome (throttle lifted, data path closed,
//! dirty log stopped), and after a failure the error to report and what becomes of the VM
//! (resumed, or kept paused when the destination may be running it).

use super::Source;
use crate::error::Error;

impl Source<'_> {
    pub(super) fn teardown(&mut self) {
        if self.auto.percent() > 0 {
            self.auto.applied(0);
            if let Err(e) = self.vm.throttle(0) {
                tracing::warn!("lifting auto-converge's throttle: {e}");
            }
        }
        if let Some(mut d) = self.data.take() {
            if let Err(e) = d.close() {
                tracing::warn!("closing the data path: {e}");
            }
        }
        if self.logging {
            self.logging = false;
            if let Err(e) = self.vm.stop_dirty_log() {
                tracing::warn!("stopping the dirty log: {e}");
            }
        }
    }

    /// Cleans up after an error and returns the error to report.
    pub(super) fn fail(&mut self, e: Error) -> Error {
        // A cancel ends the migration's waits with whatever error they see (a closed socket,
        // a cancelled pacer): what happened is the cancel.
        let e = match e {
            Error::PeerAborted(_) | Error::SwitchoverUnknown(_) => e,
            _ if self.control.is_cancelled() => Error::Cancelled,
            // A destination that aborted and closed while this end was sending: its reason.
            Error::PeerClosed { .. } | Error::Io { .. } => match self.ctl.pending_abort() {
                Some(abort) => Error::PeerAborted(abort),
                None => e,
            },
            e => e,
        };
        self.limiter.cancel();
        let keep_paused =
            self.guest_moved || (self.switchover_sent && !matches!(e, Error::PeerAborted(_)));
        if !matches!(e, Error::PeerAborted(_)) {
            // A destination that has not proved the key learns nothing of this end.
            self.ctl.send_failure(&e);
        }
        self.teardown();
        if keep_paused {
            return Error::SwitchoverUnknown(Box::new(e));
        }
        if self.paused {
            if let Err(re) = self.vm.resume() {
                tracing::error!("could not resume the source VM after a failed migration: {re}");
            } else {
                self.paused = false;
            }
        }
        e
    }
}
