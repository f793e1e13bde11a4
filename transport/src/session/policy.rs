//! The convergence decision after each pre-copy round: predict the stop-and-copy time from
//! the measured bandwidth and the pages dirtied, and decide whether to switch over.

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
