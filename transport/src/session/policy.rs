//! The convergence decision after each pre-copy round: predict the stop-and-copy time from
//! the measured bandwidth and the pages dirtied, and decide whether to switch over; and
//! auto-converge ([`AutoConverge`]), which slows a guest that dirties faster than the link
//! moves its pages, as QEMU's `auto-converge` capability does.
//!
//! Pre-copy counts as not converging when the round limit is reached, when the prediction has
//! not improved for four rounds, or (the stall rule, with a progress timeout) when
//! no round has left a dirty set smaller than the smallest seen so far for that much wall time.

use std::time::{Duration, Instant};

use super::config::MigrationConfig;

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
    /// The stall rule's timeout (`None`: off).
    progress_timeout: Option<Duration>,
    /// The smallest dirty set after a round so far, bytes, and when it was seen (the last
    /// progress).
    progress: Option<(u64, Instant)>,
    /// The last round ended with the stall rule's timeout passed.
    timed_out: bool,
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
            progress_timeout: None,
            timed_out: false,
            progress: None,
        }
    }

    /// A tracker for `config`'s downtime limit, round limit and progress timeout.
    pub fn from_config(config: &MigrationConfig) -> Self {
        Self::new(config.downtime_limit, config.max_rounds)
            .with_progress_timeout(config.progress_timeout)
    }

    /// Sets the stall rule's timeout: pre-copy is not converging once no round has left a
    /// dirty set smaller than the smallest seen so far for `t` of wall time (`None`: off).
    pub fn with_progress_timeout(mut self, t: Option<Duration>) -> Self {
        self.progress_timeout = t;
        self
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
        self.after_round_at(Instant::now(), rounds_done, bytes, elapsed, dirty_bytes)
    }

    /// [`Convergence::after_round`] for a round whose dirty set was known at `now`.
    fn after_round_at(
        &mut self,
        now: Instant,
        rounds_done: u32,
        bytes: u64,
        elapsed: Duration,
        dirty_bytes: u64,
    ) -> (Decision, Duration) {
        let no_progress_for = match self.progress {
            Some((smallest, since)) if dirty_bytes >= smallest => {
                now.saturating_duration_since(since)
            }
            _ => {
                self.progress = Some((dirty_bytes, now));
                Duration::ZERO
            }
        };
        let timed_out = self.progress_timeout.is_some_and(|t| no_progress_for >= t);
        self.timed_out = timed_out;
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
        } else if rounds_done >= self.max_rounds || self.stalled >= STALL_ROUNDS || timed_out {
            if timed_out {
                tracing::info!(
                    "pre-copy made no progress for {no_progress_for:?} (after {rounds_done} \
                     rounds {dirty_bytes} bytes are dirty, the smallest dirty set was {} bytes)",
                    self.progress.map_or(0, |p| p.0)
                );
            }
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

    /// The guest was slowed down: rounds may shrink again, so the stall count and the stall
    /// rule's clock start over (the next round's dirty set is the smallest seen).
    pub fn restart_stall(&mut self) {
        self.stalled = 0;
        self.best_prediction = None;
        self.progress = None;
    }

    /// True once `rounds_done` reached the round limit.
    pub fn out_of_rounds(&self, rounds_done: u32) -> bool {
        rounds_done >= self.max_rounds
    }

    /// True if the last round's verdict came from the stall rule's timeout.
    pub fn timed_out(&self) -> bool {
        self.timed_out
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
    fn no_progress_for_the_progress_timeout_is_not_converging() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Rounds of 64 MiB, each faster than the last, so that the prediction keeps improving
        // (the four-round rule never fires) while the dirty set never shrinks.
        let round = |c: &mut Convergence, n: u32, now: u64, dirty_mib: u64| {
            let elapsed = Duration::from_millis(1000 - 100 * u64::from(n.min(9)));
            c.after_round_at(at(now), n, 64 << 20, elapsed, dirty_mib << 20)
                .0
        };
        let limit = Duration::from_millis(1);
        let timeout = Some(Duration::from_millis(300));
        let mut c = Convergence::new(limit, 1000).with_progress_timeout(timeout);
        use Decision::{Continue, NotConverging};
        // The first dirty set is progress; as large a set is not, but 300 ms have not passed.
        assert_eq!(round(&mut c, 1, 0, 64), Continue);
        assert_eq!(round(&mut c, 2, 100, 64), Continue);
        assert_eq!(round(&mut c, 3, 250, 70), Continue);
        // A smaller set is progress: the clock starts again from it.
        assert_eq!(round(&mut c, 4, 290, 63), Continue);
        assert_eq!(round(&mut c, 5, 500, 64), Continue);
        // As small as the smallest is no progress: 300 ms after the last progress, it stops.
        assert_eq!(round(&mut c, 6, 590, 63), NotConverging);

        // The same rounds without a progress timeout go on.
        let mut c = Convergence::new(limit, 1000);
        for (n, now, dirty) in [(1, 0, 64), (2, 100, 64), (3, 250, 70), (4, 290, 63)] {
            assert_eq!(round(&mut c, n, now, dirty), Continue);
        }
        assert_eq!(round(&mut c, 5, 500, 64), Continue);
        assert_eq!(round(&mut c, 6, 5000, 63), Continue);

        // A throttle starts the clock over; a round that fits the limit still switches over.
        let mut c = Convergence::new(limit, 1000).with_progress_timeout(timeout);
        assert_eq!(round(&mut c, 1, 0, 64), Continue);
        c.restart_stall();
        assert_eq!(
            round(&mut c, 2, 400, 64),
            Continue,
            "the throttled round is progress"
        );
        assert_eq!(round(&mut c, 3, 600, 64), Continue);
        assert_eq!(round(&mut c, 4, 800, 64), NotConverging);
        let mut c = Convergence::new(Duration::from_secs(1), 1000).with_progress_timeout(timeout);
        assert_eq!(round(&mut c, 1, 0, 64), Decision::Switchover);
        assert_eq!(round(&mut c, 2, 900, 64), Decision::Switchover);
    }

    #[test]
    fn the_config_sets_the_limits() {
        let cfg = MigrationConfig::new(crate::auth::Psk::random().unwrap())
            .with_downtime_limit(Duration::from_millis(7))
            .with_max_rounds(3)
            .with_progress_timeout(Some(Duration::from_millis(300)));
        let c = Convergence::from_config(&cfg);
        assert_eq!(c.limit, Duration::from_millis(7));
        assert_eq!(c.max_rounds, 3);
        assert_eq!(c.progress_timeout, Some(Duration::from_millis(300)));
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
