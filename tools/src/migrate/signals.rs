//! SIGINT and SIGTERM during `migrate`: the first one cancels the migration.
//!
//! The handlers only write the signal's number into a pipe (`write(2)` is async-signal-safe);
//! a thread reads the pipe and acts on it:
//!
//! - The first signal calls [`MigrationControl::cancel`]. Accepted, the migration ends with
//!   `Error::Cancelled` (the source VM runs on, the destination discards what it built) and
//!   `migrate` reports it and exits with [`EXIT_CANCELLED`]; the `--loopback` destination child
//!   gets SIGTERM at once. Refused (the switchover has begun), this says so and the migration
//!   finishes.
//! - A signal after a refused cancel exits at once (status 128 + the signal), and so does one
//!   that comes more than [`REPEAT`] after an accepted cancel that has not ended the migration.
//!   Signals within [`REPEAT`] of an accepted cancel count as the same request: Ctrl-C in a
//!   terminal reaches the `--loopback` child both from the terminal and from its parent.
//! - A cancel that has not ended the migration within [`NOTICE`] says that it is under way.
//!
//! The pipe is close-on-exec and exec resets caught signals, so processes `migrate` starts
//! (the destination child, QEMU) keep the default actions.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rdmig_transport::session::MigrationControl;
use rdmig_transport::Error;

use super::End;

/// Exit status of a cancelled migration (128 + SIGINT, as shells report Ctrl-C).
pub const EXIT_CANCELLED: u8 = 130;

/// Signals this close to an accepted cancel are taken as the same request.
pub const REPEAT: Duration = Duration::from_secs(2);

/// How long an accepted cancel may take before the user is told it is under way.
pub const NOTICE: Duration = Duration::from_secs(1);

/// The migration has ended (reported by `Ctl::ended`).
static ENDED: AtomicBool = AtomicBool::new(false);

/// The write end of the pipe, for the handler (-1: none).
static PIPE_WR: AtomicI32 = AtomicI32::new(-1);

/// Files a hard exit removes (the control sockets, the loopback scratch directory).
static REMOVE_ON_EXIT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WR.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    // The handler restores errno so that the interrupted code does not see write's.
    // SAFETY: __errno_location returns this thread's errno, valid for the thread's life.
    let saved = unsafe { *libc::__errno_location() };
    let byte = sig as u8;
    // A full pipe (signals nobody reads yet) drops this one, which is fine: one pending is
    // enough.
    // SAFETY: write(2) is async-signal-safe, and `byte` outlives the call.
    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// The migration ended: a cancel no longer needs a notice.
pub fn migration_ended() {
    ENDED.store(true, Ordering::Release);
}

/// Asks a hard exit to remove `path` (a file or a directory).
pub fn remove_on_exit(path: PathBuf) {
    REMOVE_ON_EXIT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path);
}

/// No longer removes `path` on a hard exit (its owner removed it).
pub fn forget(path: &std::path::Path) {
    REMOVE_ON_EXIT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| p != path);
}

/// The running signal watcher; it lives as long as the process.
#[derive(Clone, Debug)]
pub struct Signals {
    /// A process to pass an accepted cancel on to (the `--loopback` child; 0: none).
    forward: Arc<AtomicI32>,
}

impl Signals {
    /// Installs the SIGINT and SIGTERM handlers and starts the thread that cancels `control`.
    pub fn install(control: &MigrationControl, end: End) -> Result<Signals> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            bail!(
                "creating the signal pipe: {}",
                std::io::Error::last_os_error()
            );
        }
        // The handler must never block: a full pipe drops the signal.
        // SAFETY: fcntl on the write end pipe2 just returned.
        unsafe { libc::fcntl(fds[1], libc::F_SETFL, libc::O_NONBLOCK) };
        // SAFETY: fds[0] is the read end pipe2 returned, owned by nothing else.
        let reader = unsafe { File::from_raw_fd(fds[0]) };
        PIPE_WR.store(fds[1], Ordering::Relaxed);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction is valid (empty mask, no flags) before we fill it.
            let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            // SAFETY: `sa` is initialised; the handler is async-signal-safe (see on_signal).
            if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
                bail!(
                    "installing the signal handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        let signals = Signals {
            forward: Arc::new(AtomicI32::new(0)),
        };
        let forward = signals.forward.clone();
        let control = control.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || watch(reader, &control, end, &forward))?;
        Ok(signals)
    }

    /// Passes an accepted cancel on to `pid` as SIGTERM from now on.
    pub fn forward_to(&self, pid: u32) {
        self.forward
            .store(i32::try_from(pid).unwrap_or(0), Ordering::Relaxed);
    }

    /// Passes a cancel accepted elsewhere (the control socket) on, as a signal's would be.
    pub fn pass_on(&self) {
        terminate(self.forward.load(Ordering::Relaxed));
    }
}

fn signal_name(sig: u8) -> &'static str {
    match i32::from(sig) {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Sends SIGTERM to `pid` (0: nobody).
pub fn terminate(pid: i32) {
    if pid > 0 {
        // SAFETY: kill(2) of our own child's pid; at worst it is already gone (ESRCH).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Waits until the pipe has a signal or `timeout` passed (`None`: for ever); true if it has.
fn wait_readable(reader: &File, timeout: Option<Duration>) -> bool {
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    let mut fd = libc::pollfd {
        fd: reader.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    // An error (EINTR: a signal landed on this thread) means: look at the pipe again.
    n != 0
}

fn watch(mut reader: File, control: &MigrationControl, end: End, forward: &AtomicI32) {
    let mut accepted: Option<(Instant, &'static str)> = None;
    let mut noticed = false;
    let mut refused = false;
    let mut byte = [0u8; 1];
    loop {
        let notice_in = accepted
            .filter(|_| !noticed)
            .map(|(t, _)| NOTICE.saturating_sub(t.elapsed()));
        if !wait_readable(&reader, notice_in) {
            noticed = true;
            if let Some((_, name)) = accepted.filter(|_| !ENDED.load(Ordering::Acquire)) {
                eprintln!(
                    "rdma-bench: {name}: cancelling the migration (signal again to exit at once)"
                );
            }
            continue;
        }
        match reader.read(&mut byte) {
            Ok(1) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => return,
        }
        let name = signal_name(byte[0]);
        if refused || accepted.is_some_and(|(t, _)| t.elapsed() >= REPEAT) {
            hard_exit(name, byte[0]);
        }
        if accepted.is_some() {
            continue;
        }
        match control.cancel() {
            Ok(()) => {
                tracing::info!("{name}: cancelling the migration");
                accepted = Some((Instant::now(), name));
                terminate(forward.load(Ordering::Relaxed));
            }
            Err(e) => {
                refused = true;
                let what = match (end, &e) {
                    (End::Source, Error::TooLateToCancel) => {
                        "too late to cancel, the switchover has begun".to_string()
                    }
                    (End::Destination, Error::TooLateToCancel) => {
                        "too late to cancel, the guest is resuming here".to_string()
                    }
                    (_, e) => format!("cannot cancel: {e}"),
                };
                eprintln!(
                    "rdma-bench: {name}: {what}; the migration goes on to its end (signal again to exit at once)"
                );
            }
        }
    }
}

fn hard_exit(name: &str, sig: u8) -> ! {
    eprintln!("rdma-bench: {name} again: exiting at once");
    for p in REMOVE_ON_EXIT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
    }
    std::process::exit(128 + i32::from(sig))
}
