//! A pacing rate limiter shared by the threads that move data, for the bandwidth cap (TCP
//! senders on the source, RDMA reads on the destination). Its rate can change while it runs
//! (a VMM lowers the cap mid-migration); 0 means no cap.
//!
//! Callers wait in short slices, so a wait of any length (a large batch at a low rate) ends
//! within a slice of [`RateLimiter::cancel`] — called when the migration fails or is torn
//! down — instead of sleeping through the abort.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Longest single sleep of a waiting caller.
const SLICE: Duration = Duration::from_millis(10);

/// Paces callers to at most `rate` bytes per second (with a small burst).
#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0: unlimited.
    rate: AtomicU64,
    next: Mutex<Instant>,
    cancelled: AtomicBool,
}

impl RateLimiter {
    /// A limiter for `bytes_per_sec` (0: no limit until [`RateLimiter::set_rate`]).
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        RateLimiter {
            rate: AtomicU64::new(bytes_per_sec),
            next: Mutex::new(Instant::now()),
            cancelled: AtomicBool::new(false),
        }
    }

    /// Blocks until `bytes` more may be sent; fails at once (within a slice) once the limiter
    /// is cancelled.
    pub fn acquire(&self, bytes: u64) -> Result<()> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return self.check();
        }
        let until = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let burst = Duration::from_millis(2);
            if *next + burst < now {
                *next = now - burst;
            }
            // A wait too long to represent is as good as for ever: only a cancel ends it.
            let wait = Duration::try_from_secs_f64(bytes as f64 / rate as f64)
                .unwrap_or(Duration::from_secs(u32::MAX.into()));
            *next = next.checked_add(wait).unwrap_or(*next);
            *next
        };
        loop {
            self.check()?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(SLICE));
        }
    }

    /// Changes the rate for the waits that begin from now on (0: no limit).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// The rate (0: no limit).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<()> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(Error::Aborted(
                "the migration ended while pacing to the bandwidth limit".into(),
            ));
        }
        Ok(())
    }

    /// Ends every wait, now and later (the migration is over).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn paces_to_the_rate() {
        let l = RateLimiter::new(10 << 20);
        let t = Instant::now();
        for _ in 0..10 {
            l.acquire(256 << 10).unwrap();
        }
        // 2.5 MiB at 10 MiB/s is 250 ms; allow the 2 ms burst.
        assert!(
            t.elapsed() >= Duration::from_millis(240),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_cancel_ends_a_long_wait_at_once() {
        // 256 MiB at 1 byte/s: a wait of 8.5 years, which only a cancel can end.
        let l = Arc::new(RateLimiter::new(1));
        let waiter = {
            let l = l.clone();
            std::thread::spawn(move || l.acquire(256 << 20))
        };
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        l.cancel();
        let r = waiter.join().unwrap();
        assert!(matches!(r, Err(Error::Aborted(_))), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(l.acquire(1).is_err(), "a cancelled limiter stays cancelled");
    }

    #[test]
    fn the_rate_changes_while_it_runs() {
        let l = RateLimiter::new(0);
        let t = Instant::now();
        l.acquire(1 << 40).unwrap();
        assert!(t.elapsed() < Duration::from_millis(50), "no limit");
        l.set_rate(10 << 20);
        let t = Instant::now();
        for _ in 0..4 {
            l.acquire(256 << 10).unwrap();
        }
        assert!(
            t.elapsed() >= Duration::from_millis(90),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(l.rate(), 10 << 20);
    }
}
