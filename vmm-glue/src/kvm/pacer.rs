//! Paces the guest to a dirty rate: the VMM hands out page batches of about a millisecond
//! each and tells the vCPU thread how long to wait before the next one.

use std::time::{Duration, Instant};

use super::control::{GUEST_PAGE, MAX_BATCH};

/// If the guest falls further behind than this (the vCPU thread was descheduled on a busy
/// host), the schedule restarts instead of bursting; shorter lags are caught up.
const MAX_LAG: Duration = Duration::from_millis(100);

/// The pacing schedule.
#[derive(Clone, Debug)]
pub struct Pacer {
    rate: u64,
    ws_pages: u32,
    base: Instant,
    handed: u64,
    total: u64,
}

/// What to answer the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Dirty this many pages now.
    Go(u32),
    /// Ask again after this long.
    Wait(Duration),
}

impl Pacer {
    /// A pacer for `rate` bytes/s over a working set of `ws_pages` pages.
    pub fn new(rate: u64, ws_pages: u32) -> Pacer {
        Pacer {
            rate,
            ws_pages,
            base: Instant::now(),
            handed: 0,
            total: 0,
        }
    }

    /// The rate in bytes/s.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Changes the working set (the destination learns it from guest memory).
    pub fn set_ws_pages(&mut self, ws_pages: u32) {
        self.ws_pages = ws_pages;
        self.restart();
    }

    /// Pages handed out since the guest started (carried across migrations).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Sets the carried total (on the destination).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
    }

    /// Starts the schedule afresh (after a pause, so the pause does not cause a burst).
    pub fn restart(&mut self) {
        self.base = Instant::now();
        self.handed = 0;
    }

    /// Moves the schedule on by `d` (the guest was throttled for that long): the pages it
    /// would have been handed meanwhile are not caught up.
    pub fn delay(&mut self, d: Duration) {
        self.base += d;
    }

    /// Pages per batch: about one millisecond's worth.
    fn batch(&self) -> u32 {
        let per_ms = self.rate / GUEST_PAGE / 1000;
        per_ms.clamp(1, u64::from(MAX_BATCH)) as u32
    }

    /// The answer for a guest asking for work at `now`.
    pub fn next(&mut self, now: Instant) -> Pace {
        let pages_per_s = self.rate / GUEST_PAGE;
        if pages_per_s == 0 || self.ws_pages == 0 {
            return Pace::Wait(Duration::from_millis(50));
        }
        let due = self.base + Duration::from_secs_f64(self.handed as f64 / pages_per_s as f64);
        if now < due {
            return Pace::Wait(due - now);
        }
        if now - due > MAX_LAG {
            self.base = now;
            self.handed = 0;
        }
        let n = self.batch();
        self.handed += u64::from(n);
        self.total += u64::from(n);
        Pace::Go(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_the_rate() {
        let mut p = Pacer::new(64 << 20, 1000); // 16384 pages/s, batches of 16
        let t0 = p.base;
        let mut pages = 0u64;
        let mut now = t0;
        while now < t0 + Duration::from_secs(1) {
            match p.next(now) {
                Pace::Go(n) => pages += u64::from(n),
                Pace::Wait(d) => now += d,
            }
        }
        assert!((16384..=16384 + 32).contains(&pages), "{pages}");
        assert_eq!(p.total(), pages);
    }

    #[test]
    fn idle_and_empty_working_set_wait() {
        assert!(matches!(
            Pacer::new(0, 10).next(Instant::now()),
            Pace::Wait(_)
        ));
        assert!(matches!(
            Pacer::new(1 << 30, 0).next(Instant::now()),
            Pace::Wait(_)
        ));
    }

    #[test]
    fn a_delay_is_not_caught_up() {
        let mut p = Pacer::new(4096 * 1000, 10); // 1000 pages/s, batches of 1
        let t0 = p.base;
        assert_eq!(p.next(t0), Pace::Go(1));
        p.delay(Duration::from_millis(50));
        // Due again 1 ms after the start plus the delay, not at once.
        assert_eq!(
            p.next(t0 + Duration::from_millis(40)),
            Pace::Wait(Duration::from_millis(11))
        );
        assert_eq!(p.next(t0 + Duration::from_millis(51)), Pace::Go(1));
    }

    #[test]
    fn falling_behind_restarts_instead_of_bursting() {
        let mut p = Pacer::new(4096 * 1000, 10);
        let later = p.base + Duration::from_secs(5);
        assert_eq!(p.next(later), Pace::Go(1));
        assert!(matches!(p.next(later), Pace::Wait(_)));
    }
}
