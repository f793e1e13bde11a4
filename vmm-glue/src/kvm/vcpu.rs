//! The vCPU thread: runs `KVM_RUN`, answers the guest's port I/O, paces it, and parks at a
//! clean exit when asked to pause.
//!
//! Pausing: the controller sets `pause_req`, sets `kvm_run.immediate_exit`, wakes a pacing
//! sleep and sends [`kick_signal`] to the thread. Whatever the thread was doing, it returns to
//! the top of its loop (a signal makes `KVM_RUN` return `EINTR`), runs `KVM_RUN` once more with
//! `immediate_exit` set so KVM completes a pending port read without entering the guest (the
//! documented way to reach a state that can be saved), and parks. While parked it serves
//! commands: save or restore the registers, resume, stop. All vCPU ioctls run on this thread.
//!
//! Throttling (vCPU pacing, as QEMU's cpu-throttle): once the guest has run for a time slice
//! of [`THROTTLE_SLICE`] or more, the thread sleeps `percent` % of the slice before it enters
//! the guest again (the slice ends at the next exit to the VMM, about every millisecond for
//! the pacing guest), and the pacer's schedule moves on by the time slept so that the guest
//! does not catch up. A pause or a new throttle cuts the sleep short.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use rdmig_transport::vm::throttle_sleep;

use super::control::{CMD_VERIFY, PORT_BAD, PORT_CHECKED, PORT_CMD};
use super::pacer::{Pace, Pacer};
use super::state::VcpuState;
use crate::error::{Error, Result};

/// Longest wait for the vCPU thread to park or answer a command.
const PARK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the vCPU keeps retrying guest accesses that KVM could not fault in (`EFAULT`)
/// before it gives up on the guest. In post-copy such an access is to a page that is still
/// missing and whose fault was cut short; the faulting instruction did not execute.
const EFAULT_RETRY: Duration = Duration::from_secs(5);
/// The wait between two such retries (cut short by a pause request).
const EFAULT_BACKOFF: Duration = Duration::from_millis(1);
/// The time slice a throttled vCPU runs before it sleeps its share (QEMU's is 10 ms too).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// The signal that kicks a vCPU thread out of `KVM_RUN` (a no-op handler is installed).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The handler does nothing (async-signal-safe); no SA_RESTART, so KVM_RUN returns EINTR.
        // SAFETY: a zeroed sigaction is a valid starting value.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
                tracing::error!(
                    "installing the vCPU kick handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// Pointer to `kvm_run.immediate_exit` of the vCPU's mapped run structure.
struct ImmediateExit(*mut u8);

// SAFETY: the pointer targets the vCPU's kvm_run mapping, which lives as long as the VcpuFd
// owned by the vCPU thread; it is only written while `Ctl::exited` is false (checked under the
// lock that the thread takes to set it before dropping the VcpuFd), and always atomically.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn set(&self, v: u8) {
        // SAFETY: see the Send impl: the byte is mapped and every access is atomic.
        unsafe { AtomicU8::from_ptr(self.0) }.store(v, Ordering::SeqCst);
    }
}

/// A guest's self-check report as it arrives over port I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Data pages checked.
    pub checked: u32,
    /// Bad pages reported.
    pub bad: u32,
    /// The first bad page index.
    pub first_bad: Option<u32>,
}

/// A command for the parked thread.
enum Cmd {
    Resume,
    Save,
    Restore(Box<VcpuState>),
    Stop,
}

/// Shared between the controller and the vCPU thread, under one mutex.
struct Ctl {
    pause_req: bool,
    parked: bool,
    exited: bool,
    fatal: Option<String>,
    verify_req: bool,
    report: CheckReport,
    check: Option<CheckReport>,
    pacer: Pacer,
    /// Percent of each time slice the vCPU sleeps (0: not throttled).
    throttle: u8,
    cmd: Option<Cmd>,
    reply: Option<Result<VcpuState>>,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    immediate_exit: ImmediateExit,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Watches a KVM guest from any thread (for tests and monitoring): whether it runs and how
/// many pages it has been handed to dirty. Holds no VM resources.
#[derive(Clone)]
pub struct GuestProgress(Arc<Shared>);

impl GuestProgress {
    /// True while the guest runs (the vCPU is not parked and no pause is pending).
    pub fn running(&self) -> bool {
        let g = self.0.lock();
        !g.parked && !g.pause_req && !g.exited
    }

    /// Pages the guest has been handed to dirty since it first started (on any host).
    pub fn pages_dirtied(&self) -> u64 {
        self.0.lock().pacer.total()
    }
}

impl std::fmt::Debug for GuestProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestProgress")
            .field("running", &self.running())
            .field("pages_dirtied", &self.pages_dirtied())
            .finish()
    }
}

/// The controller's handle on one vCPU thread. Dropping it stops and joins the thread.
pub struct VcpuHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread for `vcpu`, parked (call [`VcpuHandle::resume`] to run the guest).
    pub fn spawn(mut vcpu: VcpuFd, pacer: Pacer) -> Result<VcpuHandle> {
        install_kick_handler();
        let ie = ImmediateExit(&mut vcpu.get_kvm_run().immediate_exit as *mut u8);
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                pause_req: true,
                parked: false,
                exited: false,
                fatal: None,
                verify_req: false,
                report: CheckReport::default(),
                check: None,
                pacer,
                throttle: 0,
                cmd: None,
                reply: None,
            }),
            cv: Condvar::new(),
            immediate_exit: ie,
        });
        shared.immediate_exit.set(1);
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kvm-vcpu0".into())
            .spawn(move || vcpu_thread(vcpu, sh))
            .map_err(|e| Error::Thread(format!("spawning the vCPU thread: {e}")))?;
        let h = VcpuHandle {
            shared,
            thread: Some(thread),
        };
        h.wait_parked()?;
        Ok(h)
    }

    fn wait_parked(&self) -> Result<()> {
        if self.wait_parked_for(PARK_TIMEOUT)? {
            Ok(())
        } else {
            Err(Error::Thread("the vCPU did not stop within 2 s".into()))
        }
    }

    /// Waits up to `timeout` for the vCPU to park; false if it did not.
    fn wait_parked_for(&self, timeout: Duration) -> Result<bool> {
        let g = self.shared.lock();
        let (g, to) = self
            .shared
            .cv
            .wait_timeout_while(g, timeout, |c| !c.parked && !c.exited)
            .unwrap_or_else(|p| p.into_inner());
        if to.timed_out() {
            return Ok(false);
        }
        match &g.fatal {
            Some(f) => Err(Error::Guest(f.clone())),
            None if g.exited => Err(Error::Thread("the vCPU thread has exited".into())),
            None => Ok(true),
        }
    }

    /// Asks the vCPU to park: `immediate_exit` plus a kick out of `KVM_RUN`.
    fn request_pause(&self) -> Result<()> {
        let mut g = self.shared.lock();
        if g.exited {
            return Err(Error::Thread("the vCPU thread has exited".into()));
        }
        if !g.parked {
            g.pause_req = true;
            self.shared.immediate_exit.set(1);
            self.shared.cv.notify_all();
            if let Some(t) = &self.thread {
                // The signal has a no-op handler installed.
                // SAFETY: not joined yet (we hold its JoinHandle), so its pthread_t is valid.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
        }
        Ok(())
    }

    /// Stops the guest at a clean exit and returns once the vCPU is parked.
    pub fn pause(&self) -> Result<()> {
        self.request_pause()?;
        self.wait_parked()
    }

    /// Stops the guest, waiting at most `timeout` for the vCPU to park; returns whether it
    /// did. A vCPU that does not is inside `KVM_RUN`, blocked on a guest page userfaultfd has
    /// not resolved (on kernels where KVM waits for it without heeding the kick signal): the
    /// pause stays pending, and it parks as soon as `KVM_RUN` returns, without running guest
    /// code (the pending signal makes KVM return before it enters the guest again).
    pub fn pause_within(&self, timeout: Duration) -> Result<bool> {
        self.request_pause()?;
        self.wait_parked_for(timeout)
    }

    /// True while the vCPU thread is parked.
    pub fn is_parked(&self) -> bool {
        self.shared.lock().parked
    }

    /// A handle that watches the guest's progress from another thread.
    pub fn progress(&self) -> GuestProgress {
        GuestProgress(self.shared.clone())
    }

    /// Runs a command on the parked thread and waits for its answer.
    fn command(&self, cmd: Cmd) -> Result<Option<VcpuState>> {
        let expect_reply = matches!(cmd, Cmd::Save | Cmd::Restore(_));
        let mut g = self.shared.lock();
        if g.exited || !g.parked {
            return Err(Error::Thread("the vCPU is not paused".into()));
        }
        if let Some(f) = &g.fatal {
            if matches!(cmd, Cmd::Resume) {
                return Err(Error::Guest(f.clone()));
            }
        }
        g.cmd = Some(cmd);
        g.reply = None;
        self.shared.cv.notify_all();
        if !expect_reply {
            return Ok(None);
        }
        let (mut g, to) = self
            .shared
            .cv
            .wait_timeout_while(g, PARK_TIMEOUT, |c| c.reply.is_none() && !c.exited)
            .unwrap_or_else(|p| p.into_inner());
        if to.timed_out() {
            return Err(Error::Thread(
                "the vCPU thread did not answer within 2 s".into(),
            ));
        }
        match g.reply.take() {
            Some(r) => r.map(Some),
            None => Err(Error::Thread("the vCPU thread exited".into())),
        }
    }

    /// Lets the guest run again.
    pub fn resume(&self) -> Result<()> {
        self.command(Cmd::Resume)?;
        let g = self.shared.lock();
        let (g, to) = self
            .shared
            .cv
            .wait_timeout_while(g, PARK_TIMEOUT, |c| c.parked && !c.exited)
            .unwrap_or_else(|p| p.into_inner());
        if to.timed_out() || g.exited {
            return Err(Error::Thread("the vCPU did not resume".into()));
        }
        Ok(())
    }

    /// Reads the registers of the parked vCPU.
    pub fn save(&self) -> Result<VcpuState> {
        self.command(Cmd::Save)?
            .ok_or_else(|| Error::Thread("no state returned".into()))
    }

    /// Loads registers into the parked vCPU and returns them as KVM reports them back.
    pub fn restore(&self, s: &VcpuState) -> Result<VcpuState> {
        self.command(Cmd::Restore(Box::new(*s)))?
            .ok_or_else(|| Error::Thread("no state returned".into()))
    }

    /// Sets the throttle (percent of each time slice the vCPU sleeps; 0 removes it) and wakes
    /// a vCPU sleeping at the old one. The caller checks the value.
    pub fn set_throttle(&self, percent: u8) {
        let mut g = self.shared.lock();
        g.throttle = percent;
        self.shared.cv.notify_all();
    }

    /// Runs `f` on the pacer.
    pub fn with_pacer<T>(&self, f: impl FnOnce(&mut Pacer) -> T) -> T {
        f(&mut self.shared.lock().pacer)
    }

    /// Asks the running guest to verify its memory.
    pub fn self_check(&self, timeout: Duration) -> Result<CheckReport> {
        let mut g = self.shared.lock();
        if let Some(f) = &g.fatal {
            return Err(Error::Guest(f.clone()));
        }
        if g.parked || g.exited {
            return Err(Error::Guest("cannot self-check a paused guest".into()));
        }
        g.check = None;
        g.verify_req = true;
        self.shared.cv.notify_all();
        let (mut g, to) = self
            .shared
            .cv
            .wait_timeout_while(g, timeout, |c| {
                c.check.is_none() && c.fatal.is_none() && !c.exited
            })
            .unwrap_or_else(|p| p.into_inner());
        if to.timed_out() {
            g.verify_req = false;
            return Err(Error::Guest(format!(
                "the guest did not report its self-check within {timeout:?}"
            )));
        }
        match (g.check.take(), &g.fatal) {
            (Some(c), _) => Ok(c),
            (None, Some(f)) => Err(Error::Guest(f.clone())),
            (None, None) => Err(Error::Guest(
                "the vCPU stopped during the self-check".into(),
            )),
        }
    }

    /// Stops the thread and joins it.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let paused = self.pause();
        if paused.is_ok() || self.shared.lock().parked {
            if let Err(e) = self.command(Cmd::Stop) {
                tracing::warn!("stopping the vCPU thread: {e}");
            }
        }
        t.join()
            .map_err(|_| Error::Thread("the vCPU thread panicked".into()))?;
        match paused {
            Err(Error::Guest(_)) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("vCPU teardown: {e}");
        }
    }
}

/// What a failed `KVM_RUN` means for the vCPU loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunError {
    /// Interrupted (the kick signal, or a signal while KVM waited for a missing guest page):
    /// the guest was stopped between instructions; run again or park.
    Interrupted,
    /// KVM could not fault in a guest page (`EFAULT`): the access did not happen and the
    /// registers are consistent; retry for a while (post-copy: the page is on its way).
    Fault,
    /// Anything else stops the guest.
    Fatal,
}

fn classify_run_error(errno: i32) -> RunError {
    match errno {
        libc::EINTR | libc::EAGAIN => RunError::Interrupted,
        libc::EFAULT => RunError::Fault,
        _ => RunError::Fatal,
    }
}

/// After an `EFAULT`: waits a little (less if a pause comes), or gives up after
/// [`EFAULT_RETRY`] of consecutive faults.
fn retry_after_fault(sh: &Shared, since: Instant, e: &kvm_ioctls::Error) -> Option<String> {
    if since.elapsed() > EFAULT_RETRY {
        return Some(format!(
            "KVM_RUN failed: {e} (a guest page stayed unreachable for {EFAULT_RETRY:?})"
        ));
    }
    tracing::debug!("KVM_RUN: {e}; the guest page is not there yet, retrying");
    let g = sh.lock();
    drop(
        sh.cv
            .wait_timeout_while(g, EFAULT_BACKOFF, |c| !c.pause_req)
            .unwrap_or_else(|p| p.into_inner()),
    );
    None
}

/// The thread body: run until asked to park, serve commands while parked.
fn vcpu_thread(mut vcpu: VcpuFd, sh: Arc<Shared>) {
    let mut efault_since: Option<Instant> = None;
    let mut slice = Instant::now();
    loop {
        let pause = sh.lock().pause_req;
        if pause {
            if !park(&mut vcpu, &sh, true) {
                return;
            }
            slice = Instant::now();
        }
        let ran = slice.elapsed();
        if ran >= THROTTLE_SLICE {
            throttle_pause(&sh, ran);
            slice = Instant::now();
        }
        let run = vcpu.run();
        if run.is_ok() {
            efault_since = None;
        }
        let fatal = match run {
            Ok(VcpuExit::IoIn(PORT_CMD, data)) => {
                let v = next_command(&sh);
                let n = data.len().min(4);
                data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
                None
            }
            Ok(VcpuExit::IoOut(port @ (PORT_CHECKED | PORT_BAD), data)) => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                report(&sh, port, u32::from_le_bytes(b));
                None
            }
            Ok(VcpuExit::IoIn(port, _)) => Some(format!("read from unknown port {port:#x}")),
            Ok(VcpuExit::IoOut(port, _)) => Some(format!("write to unknown port {port:#x}")),
            Ok(other) => Some(format!("unexpected vCPU exit {other:?}")),
            Err(e) => match classify_run_error(e.errno()) {
                RunError::Interrupted => None,
                RunError::Fault => {
                    retry_after_fault(&sh, *efault_since.get_or_insert_with(Instant::now), &e)
                }
                RunError::Fatal => Some(format!("KVM_RUN failed: {e}")),
            },
        };
        if let Some(f) = fatal {
            tracing::error!("guest stopped: {f}");
            sh.lock().fatal = Some(f);
            if !park(&mut vcpu, &sh, false) {
                return;
            }
        }
    }
}

/// After the guest ran for `ran`, sleeps the throttle's share of it (cut short by a pause
/// request or a new throttle), and moves the pacer's schedule on by the time slept.
fn throttle_pause(sh: &Shared, ran: Duration) {
    let g = sh.lock();
    let percent = g.throttle;
    let d = throttle_sleep(ran, percent);
    if d.is_zero() || g.pause_req {
        return;
    }
    let t = Instant::now();
    let (mut g, _) = sh
        .cv
        .wait_timeout_while(g, d, |c| !c.pause_req && c.throttle == percent)
        .unwrap_or_else(|p| p.into_inner());
    g.pacer.delay(t.elapsed());
}

/// Parks the thread; returns false when it must exit.
fn park(vcpu: &mut VcpuFd, sh: &Shared, complete_io: bool) -> bool {
    if complete_io {
        // With immediate_exit set, KVM completes a pending port read and returns EINTR
        // without entering the guest: the registers are now consistent.
        sh.immediate_exit.set(1);
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => tracing::warn!("completing pending I/O before a pause: {e}"),
            Ok(exit) => tracing::warn!("completing pending I/O before a pause returned {exit:?}"),
        }
    }
    let mut g = sh.lock();
    g.parked = true;
    sh.cv.notify_all();
    loop {
        match g.cmd.take() {
            Some(Cmd::Resume) => {
                g.pause_req = false;
                g.parked = false;
                g.pacer.restart();
                sh.immediate_exit.set(0);
                sh.cv.notify_all();
                return true;
            }
            Some(Cmd::Save) => {
                g.reply = Some(read_state(vcpu));
                sh.cv.notify_all();
            }
            Some(Cmd::Restore(s)) => {
                g.reply = Some(write_state(vcpu, &s).and_then(|()| read_state(vcpu)));
                sh.cv.notify_all();
            }
            Some(Cmd::Stop) => {
                g.exited = true;
                sh.cv.notify_all();
                return false;
            }
            None => g = sh.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

/// The answer to the guest's `in PORT_CMD`: pages to dirty, a verify command, or 0 when a
/// pause is pending (the guest just asks again after it resumes).
fn next_command(sh: &Shared) -> u32 {
    let mut g = sh.lock();
    loop {
        if g.pause_req {
            return 0;
        }
        if g.verify_req {
            g.verify_req = false;
            g.report = CheckReport::default();
            return CMD_VERIFY;
        }
        match g.pacer.next(Instant::now()) {
            Pace::Go(n) => return n,
            Pace::Wait(d) => {
                g = sh
                    .cv
                    .wait_timeout(g, d)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        }
    }
}

fn report(sh: &Shared, port: u16, v: u32) {
    let mut g = sh.lock();
    if port == PORT_BAD {
        g.report.bad += 1;
        g.report.first_bad.get_or_insert(v);
    } else {
        g.report.checked = v;
        g.check = Some(g.report);
        sh.cv.notify_all();
    }
}

fn read_state(vcpu: &VcpuFd) -> Result<VcpuState> {
    let kvm = |op| move |source| Error::Kvm { op, source };
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
    })
}

fn write_state(vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    let kvm = |op| move |source| Error::Kvm { op, source };
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_fpu(&s.fpu).map_err(kvm("KVM_SET_FPU"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_errors_are_classified() {
        assert_eq!(classify_run_error(libc::EINTR), RunError::Interrupted);
        assert_eq!(classify_run_error(libc::EAGAIN), RunError::Interrupted);
        assert_eq!(classify_run_error(libc::EFAULT), RunError::Fault);
        assert_eq!(classify_run_error(libc::EINVAL), RunError::Fatal);
        assert_eq!(classify_run_error(libc::ENOEXEC), RunError::Fatal);
    }
}
