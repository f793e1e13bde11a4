//! A migration seen from outside while it runs: progress, live parameters, cancel.
//!
//! [`MigrationControl`] is the shared state between a running migration (either end) and
//! whoever drives it: a VMM, the CLI's control socket, a signal handler. It is cheap to clone
//! and every method may be called from any thread at any time.
//!
//! - **Cancel** is accepted until the point of no return (the source sent its switchover, or
//!   the destination resumed the guest): it wakes every blocking wait of the migration at
//!   once (the control connection's and data streams' reads return, pacing ends, hashing and
//!   polling loops stop at their next check), the peer is told, and the migration ends with
//!   [`Error::Cancelled`]: the source VM runs on with its memory untouched, the destination
//!   discards what it built. After the point of no return [`MigrationControl::cancel`] fails
//!   with [`Error::TooLateToCancel`] and the migration goes on.
//! - **Parameters** (`set_max_bandwidth`, `set_downtime_limit`) take effect at the next round
//!   (the source announces a new bandwidth cap to the destination, which paces RDMA reads).
//! - **`start_postcopy`** switches a session that negotiated post-copy (mode `hybrid` or
//!   `postcopy`) over to post-copy after the current round, like QEMU's
//!   `migrate-start-postcopy`.
//! - **Progress** is updated by the migration at every piece of a round, every round and
//!   during post-copy, on both ends.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::pace::RateLimiter;

pub use super::progress::{Phase, Progress};

/// Cancel's state machine: running → cancelled, or running → committed (point of no return).
const RUNNING: u8 = 0;
const CANCELLED: u8 = 1;
const COMMITTED: u8 = 2;

#[derive(Debug)]
struct Shared {
    started: Mutex<Option<Instant>>,
    progress: Mutex<Progress>,
    cancel: AtomicU8,
    /// `u64::MAX`: no change asked; 0: no cap; else bytes/s.
    new_bandwidth: AtomicU64,
    /// `u64::MAX`: no change asked; else microseconds.
    new_downtime_us: AtomicU64,
    start_postcopy: AtomicBool,
    postcopy_allowed: AtomicBool,
    /// Where a post-copy recovery reconnects to, when not the address migrated to.
    recover_to: Mutex<Option<String>>,
    /// Sockets to shut down on cancel (duplicates, dropped when the migration ends), and
    /// the pacer to cancel.
    wake: Mutex<Wakers>,
}

#[derive(Debug, Default)]
struct Wakers {
    /// A duplicate of each socket and how to shut it down.
    fds: Vec<(OwnedFd, libc::c_int)>,
    limiters: Vec<Arc<RateLimiter>>,
}

/// The shared handle on one migration (either end). See the module documentation.
#[derive(Clone, Debug)]
pub struct MigrationControl(Arc<Shared>);

impl Default for MigrationControl {
    fn default() -> Self {
        MigrationControl::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MigrationControl {
    /// A control for a migration that has not started.
    pub fn new() -> MigrationControl {
        MigrationControl(Arc::new(Shared {
            started: Mutex::new(None),
            progress: Mutex::new(Progress::default()),
            cancel: AtomicU8::new(RUNNING),
            new_bandwidth: AtomicU64::new(u64::MAX),
            new_downtime_us: AtomicU64::new(u64::MAX),
            start_postcopy: AtomicBool::new(false),
            recover_to: Mutex::new(None),
            postcopy_allowed: AtomicBool::new(false),
            wake: Mutex::new(Wakers::default()),
        }))
    }

    /// Cancels the migration: see the module documentation. Idempotent; fails with
    /// [`Error::TooLateToCancel`] once the migration passed its point of no return.
    pub fn cancel(&self) -> Result<()> {
        match self.0.cancel.compare_exchange(
            RUNNING,
            CANCELLED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {}
            Err(CANCELLED) => return Ok(()),
            Err(_) => return Err(Error::TooLateToCancel),
        }
        let w = lock(&self.0.wake);
        for l in &w.limiters {
            l.cancel();
        }
        for (fd, how) in &w.fds {
            // Shutdown only ends reads (and, for data streams, writes) of the connection.
            // SAFETY: `fd` is an open socket we own a duplicate of.
            unsafe { libc::shutdown(fd.as_raw_fd(), *how) };
        }
        Ok(())
    }

    /// True once [`MigrationControl::cancel`] succeeded.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancel.load(Ordering::Acquire) == CANCELLED
    }

    /// The latest snapshot.
    pub fn progress(&self) -> Progress {
        let mut p = lock(&self.0.progress).clone();
        if let Some(t) = *lock(&self.0.started) {
            if !p.phase.is_final() {
                p.elapsed = t.elapsed();
            }
        }
        p
    }

    /// Sets the bandwidth cap (`None`: none) from the next round on.
    pub fn set_max_bandwidth(&self, bytes_per_sec: Option<u64>) -> Result<()> {
        let b = match bytes_per_sec {
            Some(0) => {
                return Err(Error::InvalidConfig(
                    "a bandwidth cap of 0 would never finish".into(),
                ))
            }
            Some(b) => b.min(u64::MAX - 1),
            None => 0,
        };
        self.0.new_bandwidth.store(b, Ordering::Release);
        Ok(())
    }

    /// Sets the downtime limit from the next round on.
    pub fn set_downtime_limit(&self, limit: Duration) -> Result<()> {
        if limit.is_zero() {
            return Err(Error::InvalidConfig(
                "a downtime limit of 0 can never be met".into(),
            ));
        }
        let us = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX - 1);
        self.0
            .new_downtime_us
            .store(us.min(u64::MAX - 1), Ordering::Release);
        Ok(())
    }

    /// Switches to post-copy after the current pre-copy round (QEMU's
    /// `migrate-start-postcopy`). Only a source whose session negotiated post-copy (mode
    /// `hybrid` or `postcopy`) can.
    pub fn start_postcopy(&self) -> Result<()> {
        if !self.0.postcopy_allowed.load(Ordering::Acquire) {
            return Err(Error::PostcopyUnavailable(
                "this migration was not started in hybrid or post-copy mode (set before it starts, as QEMU's postcopy-ram capability)".into(),
            ));
        }
        self.0.start_postcopy.store(true, Ordering::Release);
        Ok(())
    }

    /// Source: the next post-copy recovery reconnects to `target` (in the channel's terms:
    /// `host:port` for TCP, a path for a Unix socket) instead of the address migrated to; the
    /// destination may have moved to a new listener (QEMU's `migrate … resume=true` with a
    /// new URI). Checked before each reconnection attempt; refused by channels that cannot
    /// change their destination.
    pub fn recover_to(&self, target: impl Into<String>) {
        *lock(&self.0.recover_to) = Some(target.into());
    }

    // ---- for the migration itself ----

    /// A new target set with [`MigrationControl::recover_to`] (taken once).
    pub(crate) fn take_recover_target(&self) -> Option<String> {
        lock(&self.0.recover_to).take()
    }

    /// Resets the control for a new migration (a control can drive one migration at a time).
    pub(crate) fn begin(&self, postcopy_allowed: bool, total_bytes: u64) -> Result<()> {
        if self.is_cancelled() {
            return Err(Error::Cancelled);
        }
        *lock(&self.0.started) = Some(Instant::now());
        self.0
            .postcopy_allowed
            .store(postcopy_allowed, Ordering::Release);
        self.update(|p| {
            *p = Progress {
                phase: Phase::Setup,
                total_bytes,
                max_bandwidth: p.max_bandwidth,
                downtime_limit: p.downtime_limit,
                ..Progress::default()
            }
        });
        Ok(())
    }

    /// Allows or refuses post-copy (known once the handshake is done).
    pub(crate) fn allow_postcopy(&self, on: bool) {
        self.0.postcopy_allowed.store(on, Ordering::Release);
    }

    /// Fails with [`Error::Cancelled`] once cancelled (checked at every step).
    pub(crate) fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Passes the point of no return: cancel is refused from now on. Fails if it was
    /// cancelled first.
    pub(crate) fn commit(&self) -> Result<()> {
        match self.0.cancel.compare_exchange(
            RUNNING,
            COMMITTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) | Err(COMMITTED) => Ok(()),
            Err(_) => Err(Error::Cancelled),
        }
    }

    /// Shuts `socket` down (a duplicate of it) if the migration is cancelled; the duplicate
    /// is dropped when the migration ends ([`MigrationControl::end`]). Data streams are shut
    /// down both ways (a sender blocked on a full socket wakes too).
    pub(crate) fn watch_fd(&self, socket: &impl AsRawFd) {
        self.watch(socket, libc::SHUT_RDWR);
    }

    /// Like [`MigrationControl::watch_fd`] for the control connection: only its reads end,
    /// so that the peer can still be told why.
    pub(crate) fn watch_control(&self, socket: &impl AsRawFd) {
        self.watch(socket, libc::SHUT_RD);
    }

    fn watch(&self, socket: &impl AsRawFd, how: libc::c_int) {
        // SAFETY: F_DUPFD_CLOEXEC on an fd the caller holds open returns a new fd we own.
        let fd = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            tracing::warn!(
                "cannot watch a socket for cancel: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: `fd` was just returned by fcntl and nothing else owns it.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        if self.is_cancelled() {
            // SAFETY: as in `cancel`.
            unsafe { libc::shutdown(fd.as_raw_fd(), how) };
        }
        lock(&self.0.wake).fds.push((fd, how));
    }

    /// Cancels `limiter` if the migration is cancelled.
    pub(crate) fn watch_limiter(&self, limiter: &Arc<RateLimiter>) {
        if self.is_cancelled() {
            limiter.cancel();
        }
        lock(&self.0.wake).limiters.push(limiter.clone());
    }

    /// The migration ended with `phase`: drops the watched sockets.
    pub(crate) fn end(&self, phase: Phase) {
        let started = *lock(&self.0.started);
        self.update(|p| {
            p.phase = phase;
            if let Some(t) = started {
                p.elapsed = t.elapsed();
            }
        });
        *lock(&self.0.wake) = Wakers::default();
    }

    /// Changes the snapshot.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.0.progress));
    }

    /// A bandwidth cap asked for since the last call: `Some(None)` to lift it.
    pub(crate) fn take_bandwidth(&self) -> Option<Option<u64>> {
        match self.0.new_bandwidth.swap(u64::MAX, Ordering::AcqRel) {
            u64::MAX => None,
            0 => Some(None),
            b => Some(Some(b)),
        }
    }

    /// A downtime limit asked for since the last call.
    pub(crate) fn take_downtime_limit(&self) -> Option<Duration> {
        match self.0.new_downtime_us.swap(u64::MAX, Ordering::AcqRel) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// True (once) if post-copy was asked for.
    pub(crate) fn take_start_postcopy(&self) -> bool {
        self.0.start_postcopy.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn cancel_wakes_a_blocked_read_and_is_refused_after_commit() {
        let c = MigrationControl::new();
        c.begin(false, 1 << 20).unwrap();
        let (mut a, _b) = UnixStream::pair().unwrap();
        c.watch_fd(&a);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            a.read(&mut buf)
        });
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        c.cancel().unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), 0, "the read ends at EOF");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(c.is_cancelled() && c.check().is_err() && c.commit().is_err());
        c.cancel().unwrap();

        let c = MigrationControl::new();
        c.commit().unwrap();
        assert!(matches!(c.cancel(), Err(Error::TooLateToCancel)));
        assert!(!c.is_cancelled());
    }

    #[test]
    fn parameters_are_taken_once() {
        let c = MigrationControl::new();
        assert_eq!(c.take_bandwidth(), None);
        c.set_max_bandwidth(Some(5 << 20)).unwrap();
        assert_eq!(c.take_bandwidth(), Some(Some(5 << 20)));
        assert_eq!(c.take_bandwidth(), None);
        c.set_max_bandwidth(None).unwrap();
        assert_eq!(c.take_bandwidth(), Some(None));
        assert!(c.set_max_bandwidth(Some(0)).is_err());
        c.set_downtime_limit(Duration::from_millis(7)).unwrap();
        assert_eq!(c.take_downtime_limit(), Some(Duration::from_millis(7)));
        assert!(c.set_downtime_limit(Duration::ZERO).is_err());
        assert!(c.start_postcopy().is_err(), "not a post-copy session");
        c.allow_postcopy(true);
        c.start_postcopy().unwrap();
        assert!(c.take_start_postcopy() && !c.take_start_postcopy());
    }
}
