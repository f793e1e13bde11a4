//! A pacing rate limiter shared by the threads that move data, for the bandwidth cap.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Paces callers to at most `rate` bytes per second (with a small burst).
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter for `bytes_per_sec` (> 0).
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        RateLimiter {
            rate: bytes_per_sec.max(1) as f64,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Blocks until `bytes` more may be sent.
    pub fn acquire(&self, bytes: u64) {
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let burst = Duration::from_millis(2);
            if *next + burst < now {
                *next = now - burst;
            }
            *next += Duration::from_secs_f64(bytes as f64 / self.rate);
            next.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_rate() {
        let l = RateLimiter::new(10 << 20);
        let t = Instant::now();
        for _ in 0..10 {
            l.acquire(256 << 10);
        }
        // 2.5 MiB at 10 MiB/s is 250 ms; allow the 2 ms burst.
        assert!(
            t.elapsed() >= Duration::from_millis(240),
            "{:?}",
            t.elapsed()
        );
    }
}
