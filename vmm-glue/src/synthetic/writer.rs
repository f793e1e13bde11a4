//! The synthetic guest's writer threads and the state they share with the VMM side:
//! per-page generations (a seqlock per page), the dirty bitmap, and pause/resume.
//!
//! Write protocol for page `p`: mark its generation busy, write the new content, publish the
//! new generation, then set its dirty bit (release). Because the bit is set after the write,
//! a fetch-and-clear that misses the bit happened before the write started, and the page is
//! reported by the next fetch.
//!
//! Throttling (`SourceVm::throttle`): after each time slice of about [`THROTTLE_SLICE`] a
//! writer sleeps `percent` % of the slice (`ran * percent / (100 - percent)`), and its pacing
//! schedule moves on by the time slept, so that it does not catch the lost writes up.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdmig_transport::vm::throttle_sleep;

use super::content::Scheme;
use crate::GuestCheck;

/// The time slice a throttled writer runs before it sleeps its share (QEMU's cpu-throttle
/// uses 10 ms too).
pub(crate) const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// Generation bit set while a page is being written.
pub(crate) const BUSY: u64 = 1 << 63;

/// One region as the writers see it.
pub(crate) struct RegionInfo {
    pub ptr: *mut u8,
    pub pages: u64,
    pub first: u64,
}

#[derive(Default)]
pub(crate) struct Ctl {
    pub paused: bool,
    pub stop: bool,
    pub parked: usize,
}

/// State shared by the writers and the VMM side.
pub(crate) struct Shared {
    pub regions: Vec<RegionInfo>,
    pub page: u64,
    pub gens: Vec<AtomicU64>,
    /// Pages `0..span` may be at a generation other than 0 (the working set, and what a
    /// restored state listed); later pages are at 0.
    pub span: AtomicU64,
    pub dirty: Vec<Vec<AtomicU64>>,
    pub written: AtomicU64,
    pub pause_req: AtomicBool,
    pub ctl: Mutex<Ctl>,
    pub cv: Condvar,
    pub working_set_pages: u64,
    /// Pages per second per writer.
    pub rate: f64,
    /// [`Scheme::populated`] (restored with the device state on the destination).
    pub populated: AtomicU64,
    /// [`Scheme::zero_share`] (as `populated`).
    pub zero_share: AtomicU64,
    /// Percent of each time slice the writers sleep (0: not throttled).
    pub throttle: AtomicU8,
}

// SAFETY: the raw region pointers refer to guest memory owned by the SyntheticVm, which joins
// every writer before unmapping; all accesses through them are raw, tolerant of concurrency.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which generations are zero pages.
    pub fn scheme(&self) -> Scheme {
        Scheme {
            populated: self.populated.load(Ordering::Relaxed),
            zero_share: self.zero_share.load(Ordering::Relaxed),
        }
    }

    /// Region index, page within it, and host pointer of global page `p`.
    pub fn locate(&self, p: u64) -> (usize, u64, *mut u8) {
        let r = self.regions.partition_point(|r| r.first <= p) - 1;
        let local = p - self.regions[r].first;
        // SAFETY: local < pages of region r, so the offset stays inside its mapping.
        let ptr = unsafe { self.regions[r].ptr.add((local * self.page) as usize) };
        (r, local, ptr)
    }

    /// Writes page `p` at its next generation, then marks it dirty.
    pub fn write_page(&self, p: u64) {
        let (r, local, ptr) = self.locate(p);
        let g = (self.gens[p as usize].load(Ordering::Relaxed) & !BUSY) + 1;
        self.gens[p as usize].store(g | BUSY, Ordering::Relaxed);
        fence(Ordering::Release);
        // SAFETY: ptr is page-aligned inside the region (locate), writable for a page.
        unsafe { self.scheme().fill(ptr, self.page as usize, p, g) };
        self.gens[p as usize].store(g, Ordering::Release);
        self.dirty[r][(local / 64) as usize].fetch_or(1 << (local % 64), Ordering::Release);
        self.written.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks every page against its generation, skipping pages written during the check.
    pub fn verify(&self) -> GuestCheck {
        let mut c = GuestCheck {
            pages_checked: 0,
            pages_skipped: 0,
            pages_bad: 0,
            first_bad: None,
        };
        let scheme = self.scheme();
        for p in 0..self.gens.len() as u64 {
            let g1 = self.gens[p as usize].load(Ordering::Acquire);
            if g1 & BUSY != 0 {
                c.pages_skipped += 1;
                continue;
            }
            let (_, _, ptr) = self.locate(p);
            // SAFETY: ptr is a page inside guest memory (locate), readable.
            let ok = unsafe { scheme.matches(ptr, self.page as usize, p, g1) };
            fence(Ordering::Acquire);
            if self.gens[p as usize].load(Ordering::Relaxed) != g1 {
                c.pages_skipped += 1;
            } else if ok {
                c.pages_checked += 1;
            } else {
                c.pages_bad += 1;
                c.first_bad.get_or_insert(p);
            }
        }
        c
    }

    /// Parks the calling writer while paused; returns false when it must stop.
    fn park(&self) -> bool {
        let mut c = self.lock();
        c.parked += 1;
        self.cv.notify_all();
        while c.paused && !c.stop {
            c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.parked -= 1;
        !c.stop
    }

    /// Sets the throttle and wakes writers sleeping at the old one.
    pub fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent, Ordering::Release);
        let _c = self.lock();
        self.cv.notify_all();
    }

    /// After a slice that `ran`, sleeps the throttle's share of it, waking early on a pause
    /// request or a change of throttle. Returns how long it slept.
    fn throttle_pause(&self, ran: Duration) -> Duration {
        let percent = self.throttle.load(Ordering::Acquire);
        let d = throttle_sleep(ran, percent);
        if d.is_zero() {
            return Duration::ZERO;
        }
        let t = Instant::now();
        let c = self.lock();
        let _ = self.cv.wait_timeout_while(c, d, |_| {
            !self.pause_req.load(Ordering::Acquire)
                && self.throttle.load(Ordering::Acquire) == percent
        });
        t.elapsed()
    }

    /// Sleeps up to `d`, waking early on a pause request.
    fn pace(&self, d: Duration) {
        let c = self.lock();
        if !self.pause_req.load(Ordering::Acquire) {
            let _ = self.cv.wait_timeout(c, d);
        }
    }
}

/// A writer thread's loop: random pages of the working set at the shared rate.
pub(crate) fn writer(shared: &Shared, seed: u64) {
    let mut x = seed | 1;
    let mut start = Instant::now();
    let mut slice = start;
    let mut n = 0u64;
    loop {
        if shared.pause_req.load(Ordering::Acquire) {
            if !shared.park() {
                return;
            }
            start = Instant::now();
            slice = start;
            n = 0;
            continue;
        }
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let p = x.wrapping_mul(0x2545_F491_4F6C_DD1D) % shared.working_set_pages;
        shared.write_page(p);
        n += 1;
        if n.is_multiple_of(16) {
            let ran = slice.elapsed();
            if ran >= THROTTLE_SLICE {
                // The schedule moves on by the sleep: the writes it skipped stay skipped.
                start += shared.throttle_pause(ran);
                slice = Instant::now();
            }
            let due = start + Duration::from_secs_f64(n as f64 / shared.rate);
            let now = Instant::now();
            if due > now {
                shared.pace(due - now);
            }
        }
    }
}
