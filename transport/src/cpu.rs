//! CPU time of the calling thread, for the per-migration CPU figures.

use std::time::Duration;

/// CPU time consumed by the calling thread so far.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Accumulates CPU time across the threads of one migration.
#[derive(Debug, Default)]
pub struct CpuMeter {
    micros: std::sync::atomic::AtomicU64,
}

impl CpuMeter {
    /// Adds a thread's CPU time.
    pub fn add(&self, d: Duration) {
        self.micros
            .fetch_add(d.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Total so far.
    pub fn total(&self) -> Duration {
        Duration::from_micros(self.micros.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Measures the CPU a thread spends between its creation and its drop.
pub struct ThreadCpu<'a> {
    meter: &'a CpuMeter,
    start: Duration,
}

impl<'a> ThreadCpu<'a> {
    /// Starts measuring the calling thread.
    pub fn start(meter: &'a CpuMeter) -> Self {
        ThreadCpu {
            meter,
            start: thread_cpu_time(),
        }
    }
}

impl Drop for ThreadCpu<'_> {
    fn drop(&mut self) {
        self.meter.add(thread_cpu_time().saturating_sub(self.start));
    }
}
