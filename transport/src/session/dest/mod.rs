//! The destination end of a migration.
//!
//! Its phases carry their state ([`Phase`]): `Setup` (region table, the VM, the transport)
//! → `Precopy` (rounds; or, in post-copy sessions, the switch to post-copy) → `Switchover`
//! or `Postcopy` → `Done`; [`Dest::step`] runs one. `listen.rs` holds the handshake, `setup.rs`,
//! `precopy.rs` and `postcopy.rs` the phases. A [`MigrationControl`] can cancel it until the
//! guest resumes here, and shows its progress.
//!
//! States and the messages each accepts:
//!
//! | state | accepts |
//! | --- | --- |
//! | (handshake, `listen.rs`) | `Hello`, then `AuthProof` |
//! | `AwaitRegionTable` | `RegionTable` |
//! | `AwaitDataSetup` | `DataSetup` |
//! | `Precopy{round, chunk}` | `Round{round, chunk}` |
//! | `AwaitDeviceState` | `DeviceState` |
//! | `AwaitSwitchover` | `Switchover` |
//! | `EarlyDrop{chunk}` | `PostcopyMissing{chunk, early}` |
//! | `AwaitPostcopyMissing{chunk}` | `PostcopyMissing{chunk}` (not early) |
//! | `Postcopy{chunk}` | `PostcopyMissing{chunk, zero}`, `Switchover` |
//! | `AwaitFinish` | `Finish` |
//!
//! In post-copy and hybrid sessions `Precopy{round, 0}` also accepts `DeviceState`: the source
//! switches over in post-copy; and (hybrid) an early `PostcopyMissing`: stale pages to drop
//! while the source still runs, answered by `PostcopyDropped` (`EarlyDrop{0}` then accepts
//! another early batch or `DeviceState`). The destination then collects the post-copy set, drops the
//! stale pages, registers guest memory with userfaultfd, restores and resumes the guest, and
//! answers `PostcopyResumed`; its fault and prefetch threads fetch the rest while it waits for
//! the source's digest (`Switchover`) and for the last page, then compares the digests.
//!
//! `Abort` ends the migration in any state. Until the guest is resumed any failure discards
//! the destination VM; the source keeps running. A link failure after a post-copy resume
//! pauses post-copy when both ends recover (`recover.rs`: the listener takes the source's
//! reconnection, `AuthOk`, this end's missing set, `AwaitDataSetup` for the new link, then
//! `Postcopy{0}` again); any other failure after the resume, or a source that does not come
//! back within the recover timeout, pauses the guest and reports how many pages are still
//! missing ([`Error::PostcopyInterrupted`]).

use std::sync::Arc;
use std::time::Duration;

use super::config::{MigrationConfig, MigrationMode};
use super::handle::{MigrationControl, Phase as Status};
use super::stats::DestReport;
use crate::channel::ChannelListener;
use crate::control::Control;
use crate::cpu::CpuMeter;
use crate::data::DestDataPath;
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;
use crate::pace::RateLimiter;
use crate::pages::PageSet;
use crate::postcopy::{AliasMap, Fetchers, PostcopyService};
use crate::vm::{DestinationFactory, DestinationVm};
use crate::wire::Message;
use crate::zero::DestZero;

mod listen;
mod postcopy;
mod precopy;
mod recover;
mod setup;
mod state;

use state::DestState;

use listen::{authenticate, Handshake};
pub use setup::MAX_GUEST_BYTES;

/// What the rounds so far brought, carried from phase to phase.
struct Landed {
    map: GuestMemoryMap,
    hashes: Arc<PageHashes>,
    /// This thread's CPU time when the migration's own work began (after the VM was built).
    cpu0: Duration,
    rounds: u32,
    pages: u64,
    bytes: u64,
    /// Hybrid: the stale pages dropped while the source still ran.
    early: Option<PageSet>,
}

/// One phase of the migration, with the state it carries.
enum Phase {
    Setup(Handshake),
    Precopy(Landed),
    /// The final round landed: device state, digest, resume.
    Switchover(Landed),
    /// The source switched over in post-copy with this device state.
    Postcopy(Landed, Vec<u8>),
    Done(Box<DestReport>),
}

struct Dest<'a> {
    config: &'a MigrationConfig,
    control: &'a MigrationControl,
    listener: &'a dyn ChannelListener,
    factory: Option<DestinationFactory<'a>>,
    vm: Option<Box<dyn DestinationVm>>,
    ctl: Control,
    state: DestState,
    data: Option<Box<dyn DestDataPath>>,
    cpu: Arc<CpuMeter>,
    mode: MigrationMode,
    transport: &'static str,
    /// Post-copy sessions: the fault fetcher and prefetchers, until the switchover.
    fetchers: Option<Fetchers>,
    /// memfd guest memory: the second mapping post-copy fetches into (zero-copy).
    pc_alias: Option<Arc<AliasMap>>,
    postcopy: Option<PostcopyService>,
    /// The bandwidth cap's pacer, cancelled on failure so no thread sleeps through the abort.
    limiter: Arc<RateLimiter>,
    /// The guest was resumed here in post-copy: a failure now must not discard it.
    resumed_in_postcopy: bool,
    /// Both ends send zero pages as ranges.
    zero_pages: bool,
    /// The source tracks dirty pages by content: it gets `Landed` before every `RoundDone`.
    landed: bool,
    /// Which pages may hold data, for installing announced zero pages.
    zero: Option<DestZero>,
    /// Both ends recover post-copy link failures: what a reconnection must prove and the
    /// link it rebuilds.
    recovery: Option<recover::Recovery>,
}

/// Accepts one incoming migration on `listener` and returns the running guest.
///
/// `factory` builds the destination VM once the source has authenticated and announced its
/// memory layout. On failure nothing of the guest is kept.
///
/// Connections that fail the handshake (wrong key, silence, garbage) are refused and logged
/// while `accept` keeps serving `listener`, until a source authenticates or
/// [`MigrationConfig::listen_timeout`] passes; it then returns the last refusal (or a timeout).
pub fn accept(
    listener: &std::net::TcpListener,
    config: &MigrationConfig,
    factory: DestinationFactory<'_>,
) -> Result<(Box<dyn DestinationVm>, DestReport)> {
    accept_with(listener, config, factory, &MigrationControl::new())
}

/// [`accept`] driven through `control`: another thread can follow its progress or cancel it
/// (until the guest is resumed here).
pub fn accept_controlled(
    listener: &std::net::TcpListener,
    config: &MigrationConfig,
    factory: DestinationFactory<'_>,
    control: &MigrationControl,
) -> Result<(Box<dyn DestinationVm>, DestReport)> {
    accept_with(listener, config, factory, control)
}

/// [`accept`] on any [`ChannelListener`] (TCP, a Unix socket, pre-opened descriptors, or the
/// VMM's own), driven through `control`.
pub fn accept_with<'a>(
    listener: &'a dyn ChannelListener,
    config: &'a MigrationConfig,
    factory: DestinationFactory<'a>,
    control: &'a MigrationControl,
) -> Result<(Box<dyn DestinationVm>, DestReport)> {
    config.validate()?;
    control.begin(false, 0)?;
    let result = serve(listener, config, factory, control);
    control.end(match &result {
        Ok(_) => Status::Completed,
        Err(Error::Cancelled) => Status::Cancelled,
        Err(_) => Status::Failed,
    });
    result
}

fn serve<'a>(
    listener: &'a dyn ChannelListener,
    config: &'a MigrationConfig,
    factory: DestinationFactory<'a>,
    control: &'a MigrationControl,
) -> Result<(Box<dyn DestinationVm>, DestReport)> {
    let (ctl, hs) = authenticate(listener, config, control, None)?;
    control.watch_control(ctl.stream());
    tracing::info!("incoming migration from {}", ctl.peer());
    let limiter = Arc::new(RateLimiter::new(hs.hello.max_bandwidth));
    control.watch_limiter(&limiter);
    let mut d = Dest {
        config,
        control,
        listener,
        factory: Some(factory),
        vm: None,
        ctl,
        state: DestState::AwaitRegionTable,
        data: None,
        cpu: Arc::new(CpuMeter::default()),
        mode: MigrationMode::Precopy,
        transport: "",
        fetchers: None,
        pc_alias: None,
        postcopy: None,
        limiter,
        resumed_in_postcopy: false,
        zero_pages: false,
        landed: false,
        zero: None,
        recovery: None,
    };
    let result = match d.run(hs) {
        // A cancel ends the waits with whatever error they see: what happened is the cancel.
        Err(e) if control.is_cancelled() && !matches!(e, Error::PeerAborted(_)) => {
            Err(Error::Cancelled)
        }
        r => r,
    };
    if result.is_err() {
        d.limiter.cancel();
    }
    let result = match result {
        Err(e) if d.resumed_in_postcopy => {
            let vm = d.vm.take();
            Err(d.postcopy_failed(vm, e))
        }
        r => r,
    };
    // Any service left (none after a post-copy failure: the remnant holds it) goes before the
    // VM: closing the userfaultfd releases threads blocked on missing pages, which the VM's
    // teardown joins. (A failure before the resume discards both: the source resumes.)
    drop(d.postcopy.take());
    drop(d.fetchers.take());
    if let Some(mut data) = d.data.take() {
        match data.close() {
            Err(e) if result.is_ok() => tracing::warn!("closing the data path: {e}"),
            // After a failure the path's own errors only echo it (a cancelled pacer).
            Err(e) => tracing::debug!("closing the data path: {e}"),
            Ok(()) => {}
        }
    }
    match result {
        Ok(report) => Ok((d.vm.take().expect("a completed migration has a VM"), report)),
        Err(e) => {
            if !matches!(e, Error::PeerAborted(_)) {
                // Before the source proved the key it learns nothing of this end's internals.
                d.ctl.send_failure(&e);
            }
            d.ctl.shutdown();
            Err(e)
        }
    }
}

impl Dest<'_> {
    fn run(&mut self, hs: Handshake) -> Result<DestReport> {
        let mut phase = Phase::Setup(hs);
        loop {
            if !self.resumed_in_postcopy {
                self.control.check()?;
            }
            phase = match self.step(phase)? {
                Phase::Done(report) => return Ok(*report),
                next => next,
            };
        }
    }

    /// Runs one phase; returns the next.
    fn step(&mut self, phase: Phase) -> Result<Phase> {
        match phase {
            Phase::Setup(hs) => self.setup(hs),
            Phase::Precopy(l) => self.precopy(l),
            Phase::Switchover(l) => self.switchover(l),
            Phase::Postcopy(l, blob) => self.run_postcopy(l, blob),
            Phase::Done(r) => Ok(Phase::Done(r)),
        }
    }

    fn recv(&mut self) -> Result<Message> {
        let (state, postcopy) = (self.state, self.mode != MigrationMode::Precopy);
        let m = self
            .ctl
            .recv_filtered(state.describe(), &|c| state.may_receive(c, postcopy))?;
        if !self.state.accepts(&m, postcopy) {
            return Err(Error::UnexpectedMessage {
                state: self.state.describe(),
                got: describe(&m),
            });
        }
        Ok(m)
    }

    /// Waits for the source's `Finish`; the guest runs here whatever comes.
    fn await_finish(&mut self) {
        self.state = DestState::AwaitFinish;
        if let Err(e) = self.recv() {
            tracing::warn!("the guest runs here, but the source did not confirm: {e}");
        }
    }

    /// The report of a migration whose guest now runs here; the post-copy fields at zero.
    fn report(&self, l: &Landed, digest: u128, cpu: Duration, resume: Duration) -> DestReport {
        DestReport {
            transport: self.transport.into(),
            tls: self.ctl.stream().tls().into(),
            mem_bytes: l.map.total_bytes(),
            rounds: l.rounds,
            pages: l.pages,
            bytes: l.bytes,
            digest: format!("{digest:032x}"),
            cpu_ms: cpu.as_secs_f64() * 1e3,
            resume_ms: resume.as_secs_f64() * 1e3,
            mode: self.mode.name().into(),
            zero_pages: self.zero.as_ref().map_or(0, DestZero::announced),
            zeroed_pages: self.zero.as_ref().map_or(0, DestZero::zeroed),
            ..DestReport::default()
        }
    }
}

fn describe(m: &Message) -> String {
    match m {
        Message::Round(r) => format!("Round {{ round: {}, chunk: {} }}", r.round, r.chunk),
        other => other.name(),
    }
}
