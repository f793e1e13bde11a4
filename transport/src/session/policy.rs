//! The convergence decision after each pre-copy round: predict the stop-and-copy time from
//! the measured bandwidth and the pages dirtied, and decide whether to switch over; and
//! auto-converge ([`AutoConverge`]), which slows a guest that dirties faster than the link
//! moves its pages, as QEMU's `auto-converge` capability does.

use std::time::Duration;

/// What to do after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run another pre-copy round.
    Continue,
    /// The predicted downtime is within the limit: stop and copy.
    Switchover,
    /// Rounds stopped converging or hit the limit: the policy decides.
    NotConverging,
}

/// Tracks rounds and predicts downtime.
#[derive(Debug)]
pub struct Convergence {
    limit: Duration,
    max_rounds: u32,
    /// Best bandwidth seen over a round big enough to measure it, bytes/s.
    bandwidth: f64,
    /// Smallest time seen for a small round: the fixed cost of any round.
    base: Option<Duration>,
    best_prediction: Option<Duration>,
    stalled: u32,
}

/// Rounds without a better prediction before pre-copy counts as not converging.
const STALL_ROUNDS: u32 = 4;

impl Convergence {
    /// A tracker for a downtime `limit` and at most `max_rounds` rounds.
    pub fn new(limit: Duration, max_rounds: u32) -> Self {
        Convergence {
            limit,
            max_rounds,
            bandwidth: 0.0,
            base: None,
            best_prediction: None,
            stalled: 0,
        }
    }

    /// Records a finished round (`rounds_done` counts it) that moved `bytes` in `elapsed`,
    /// with `dirty_bytes` to move next, and decides. Returns the decision and the prediction.
    pub fn after_round(
        &mut self,
        rounds_done: u32,
        bytes: u64,
        elapsed: Duration,
        dirty_bytes: u64,
    ) -> (Decision, Duration) {
        if bytes >= 4 << 20 || self.bandwidth == 0.0 {
            self.bandwidth = self
                .bandwidth
                .max(bytes as f64 / elapsed.as_secs_f64().max(1e-6));
        }
        if bytes < 4 << 20 {
            self.base = Some(self.base.map_or(elapsed, |b| b.min(elapsed)));
        }
        let base = self.base.unwrap_or(Duration::from_millis(1));
        let predicted =
            base + Duration::from_secs_f64(dirty_bytes as f64 / self.bandwidth.max(1.0));
        if self
            .best_prediction
            .is_none_or(|b| predicted < b.mul_f64(0.95))
        {
            self.best_prediction = Some(predicted);
            self.stalled = 0;
        } else {
            self.stalled += 1;
        }
        let decision = if predicted <= self.limit {
            Decision::Switchover
        } else if rounds_done >= self.max_rounds || self.stalled >= STALL_ROUNDS {
            Decision::NotConverging
        } else {
            Decision::Continue
        };
        (decision, predicted)
    }

    /// The bandwidth estimate, bytes/s.
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// The guest was slowed down: rounds may shrink again, so the stall count starts over.
    pub fn restart_stall(&mut self) {
        self.stalled = 0;
        self.best_prediction = None;
    }

    /// True once `rounds_done` reached the round limit.
    pub fn out_of_rounds(&self, rounds_done: u32) -> bool {
        rounds_done >= self.max_rounds
    }

    /// The downtime limit in force.
    pub fn downtime_limit(&self) -> Duration {
        self.limit
    }

    /// Changes the downtime limit (a VMM's live parameter): the next round is judged by it.
    pub fn set_downtime_limit(&mut self, limit: Duration) {
        self.limit = limit;
        self.best_prediction = None;
    }
}

/// First throttle auto-converge applies (QEMU's `cpu-throttle-initial`).
pub const THROTTLE_INITIAL: u8 = 20;
/// Step up after each further round that did not shrink (QEMU's `cpu-throttle-increment`).
pub const THROTTLE_INCREMENT: u8 = 10;

/// Auto-converge: after two rounds in a row that dirtied more than half of what they moved
/// (QEMU's `throttle-trigger-threshold` of 50 %), throttle the guest, and step the throttle up
/// after each such round, to [`crate::vm::MAX_THROTTLE_PERCENT`].
#[derive(Debug, Default)]
pub struct AutoConverge {
    percent: u8,
    high_rounds: u32,
    disabled: bool,
}

impl AutoConverge {
    /// The throttle now applied (0: none).
    pub fn percent(&self) -> u8 {
        self.percent
    }

    /// After a round that moved `moved` bytes while `dirtied` bytes were dirtied: the throttle
    /// to apply now, if it should change. `decision` is the convergence decision (a round
    /// that can switch over needs no throttle).
    pub fn after_round(&mut self, moved: u64, dirtied: u64, decision: Decision) -> Option<u8> {
        if self.disabled {
            return None;
        }
        if decision == Decision::Switchover || dirtied <= moved / 2 {
            self.high_rounds = 0;
            return None;
        }
        self.high_rounds += 1;
        let next = if self.percent == 0 {
            if self.high_rounds < 2 {
                return None;
            }
            THROTTLE_INITIAL
        } else {
            self.percent
                .saturating_add(THROTTLE_INCREMENT)
                .min(crate::vm::MAX_THROTTLE_PERCENT)
        };
        (next != self.percent).then_some(next)
    }

    /// The throttle was applied.
    pub fn applied(&mut self, percent: u8) {
        self.percent = percent;
    }

    /// The VMM cannot throttle: never ask again.
    pub fn disable(&mut self) {
        self.disabled = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_converge_waits_two_rounds_then_steps_up_to_the_maximum() {
        let mut a = AutoConverge::default();
        let c = Decision::Continue;
        assert_eq!(a.after_round(100, 80, c), None, "first high round waits");
        assert_eq!(a.after_round(100, 80, c), Some(20));
        a.applied(20);
        assert_eq!(
            a.after_round(100, 40, c),
            None,
            "a shrinking round keeps the throttle"
        );
        assert_eq!(a.after_round(100, 80, c), Some(30));
        a.applied(30);
        assert_eq!(a.after_round(100, 80, Decision::Switchover), None);
        for want in [40, 50, 60, 70, 80, 90, 99] {
            assert_eq!(a.after_round(100, 80, Decision::NotConverging), Some(want));
            a.applied(want);
        }
        assert_eq!(a.after_round(100, 80, c), None, "nothing above 99 %");
    }

    #[test]
    fn switches_over_when_the_dirty_set_fits_the_limit() {
        let mut c = Convergence::new(Duration::from_millis(10), 30);
        // 1 GiB at 1 GiB/s, then 64 MiB dirty: 62.5 ms predicted, continue.
        let (d, p) = c.after_round(1, 1 << 30, Duration::from_secs(1), 64 << 20);
        assert_eq!(d, Decision::Continue);
        assert!(p > Duration::from_millis(60));
        // 64 MiB in 62 ms, 4 MiB dirty: ~4 ms + base.
        let (d, _) = c.after_round(2, 64 << 20, Duration::from_millis(62), 4 << 20);
        assert_eq!(d, Decision::Switchover);
    }

    #[test]
    fn a_stall_or_the_round_limit_is_reported() {
        let mut c = Convergence::new(Duration::from_millis(1), 100);
        let mut last = Decision::Continue;
        for r in 1..=10 {
            last = c
                .after_round(r, 512 << 20, Duration::from_millis(500), 512 << 20)
                .0;
            if last != Decision::Continue {
                assert!(r > STALL_ROUNDS, "stalled too early at round {r}");
                break;
            }
        }
        assert_eq!(last, Decision::NotConverging);
        let mut c = Convergence::new(Duration::from_millis(1), 2);
        assert_eq!(
            c.after_round(1, 1 << 30, Duration::from_secs(1), 1 << 29).0,
            Decision::Continue
        );
        assert_eq!(
            c.after_round(2, 1 << 29, Duration::from_millis(500), 1 << 28)
                .0,
            Decision::NotConverging
        );
    }
}
