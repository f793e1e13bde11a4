//! The source end of a migration: handshake, pre-copy rounds, stop-and-copy, switchover.
//!
//! The migration is a sequence of phases, each a value that carries its state ([`Phase`]):
//! `Handshake` → `Setup` → `Precopy` (one round per step) → `StopAndCopy` or `Postcopy` →
//! `Done`. [`Source::step`] runs one phase and returns the next; the phases live in
//! `handshake.rs` (handshake and data setup), `precopy.rs` (rounds and convergence; `round.rs`
//! sends one round), `switchover.rs` (stop-and-copy) and `postcopy.rs`. Between steps the
//! migration's [`MigrationControl`] is checked for a cancel and for new parameters.
//!
//! States and the messages each accepts:
//!
//! | state | accepts |
//! | --- | --- |
//! | `AwaitHelloAck` | `HelloAck` |
//! | `AwaitAuthOk` | `AuthOk` |
//! | `AwaitSetupAck` | `DataSetupAck` |
//! | `AwaitReady` | `Ready` |
//! | `AwaitLanded(n, c)` | `Landed{n, c}` (dirty tracking by content) |
//! | `AwaitRoundDone(n)` | `RoundDone{n}` |
//! | `AwaitComplete` | `Complete` |
//! | `AwaitPostcopyDropped` | `PostcopyDropped` |
//! | `AwaitPostcopyResumed` | `PostcopyResumed` |
//! | `AwaitPostcopyComplete` | `PostcopyComplete` |
//! | `AwaitRecoverMissing(n)` | `PostcopyMissing{n}` with `POSTCOPY_RECOVER` (a recovery) |
//!
//! A post-copy link failure after `PostcopyResumed` (both ends offered `caps::RECOVER`)
//! pauses instead of ending: `recover.rs` reconnects through the channel and rebuilds the
//! link, then the digest goes again and `AwaitPostcopyComplete` resumes.
//!
//! Post-copy (mode `postcopy`, or `hybrid` once the convergence policy reports
//! [`Decision::NotConverging`]): pause, device state, the post-copy set (every page for
//! `postcopy`, which runs no round; the dirty set after the final fetch-and-clear for
//! `hybrid`), then `AwaitPostcopyResumed`: that answer ends the downtime. In hybrid mode the
//! pages dirtied during the last round go first, while the guest still runs here
//! (`PostcopyMissing` with `POSTCOPY_EARLY`, answered by `PostcopyDropped`), so that the
//! destination's dropping of stale pages stays out of the downtime. The page server
//! (page server (TCP; over RDMA the destination READs)) answers the destination's page requests from the paused
//! memory while the source re-hashes the post-copy set, sends its digest and waits for
//! `PostcopyComplete`; it stops only then. From `PostcopyResumed` on the guest runs on the
//! destination, so any failure leaves the source paused ([`Error::SwitchoverUnknown`]).
//!
//! `Abort` is accepted in every state and ends the migration. Anything else is refused with
//! [`Error::UnexpectedMessage`]. On any failure before `Switchover` is sent the source VM is
//! resumed (if it was paused) and keeps running with its memory untouched. After `Switchover`
//! an `Abort` from the destination (digest mismatch, restore failure) also resumes it; a lost
//! connection leaves it paused, because the destination may already be running the guest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{MigrationConfig, MigrationMode};
use super::handle::{MigrationControl, Phase as Status};
use super::policy::{AutoConverge, Convergence};
use super::stats::{MigrationReport, RoundStats};
use crate::channel::{MigrationChannel, TcpChannel};
use crate::control::Control;
use crate::cpu::{thread_cpu_time, CpuMeter};
use crate::data::SourceDataPath;
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::holes::Holes;
use crate::mem::GuestMemoryMap;
use crate::pace::RateLimiter;
use crate::pages::{PageRange, PageSet};
use crate::vm::SourceVm;
use crate::wire::{Message, NONCE_LEN};

mod content;
mod end;
mod handshake;
mod postcopy;
mod precopy;
mod recover;
mod round;
mod state;
mod switchover;

use state::SourceState;

/// Ranges split into the chunks of one message each (at least one chunk, maybe empty).
fn message_chunks(ranges: &[PageRange]) -> Vec<&[PageRange]> {
    if ranges.is_empty() {
        vec![&[]]
    } else {
        ranges.chunks(crate::wire::MAX_RANGES_PER_MSG).collect()
    }
}

/// Most batches of stale pages a hybrid switchover has the destination drop before the pause.
const MAX_EARLY_BATCHES: u32 = 6;
/// Few enough newly stale pages to drop during the downtime (a few milliseconds' worth).
const EARLY_ENOUGH_PAGES: u64 = 2048;

/// What the handshake settled.
struct Negotiated {
    transport: crate::wire::TransportKind,
    reason: String,
    nonces: ([u8; NONCE_LEN], [u8; NONCE_LEN]),
    /// Both ends recover post-copy link failures.
    recover: bool,
}

/// The pre-copy rounds' state, carried from round to round.
struct Precopy {
    /// The pages the next round sends.
    set: PageSet,
    conv: Convergence,
    round: u32,
    /// Post-copy mode's metadata-only round ran: every page is hashed, and only the pages
    /// dirtied since need hashing again.
    scanned: bool,
    forced: bool,
    bytes: u64,
    round_time: Duration,
    per_round: Vec<RoundStats>,
}

/// One phase of the migration, with the state it carries.
enum Phase {
    Handshake,
    Setup(Negotiated),
    Precopy(Precopy),
    /// The guest is paused (`paused_at`); the final round moves what it dirtied last.
    StopAndCopy(Precopy, Instant),
    /// Switch over in post-copy with the post-copy set in `Precopy::set`.
    Postcopy(Precopy),
    Done(Box<MigrationReport>),
}

struct Source<'a> {
    vm: &'a mut dyn SourceVm,
    map: GuestMemoryMap,
    config: &'a MigrationConfig,
    control: &'a MigrationControl,
    channel: &'a mut dyn MigrationChannel,
    ctl: Control,
    state: SourceState,
    data: Option<Box<dyn SourceDataPath>>,
    hashes: PageHashes,
    cpu: Arc<CpuMeter>,
    started: Instant,
    progress: &'a mut dyn FnMut(&RoundStats),
    logging: bool,
    paused: bool,
    switchover_sent: bool,
    /// The bandwidth cap's pacer (rate 0: none), cancelled on failure so no thread sleeps
    /// through the abort.
    limiter: Arc<RateLimiter>,
    /// The guest resumed on the destination in post-copy: the source must stay paused.
    guest_moved: bool,
    /// Both ends send zero pages as ranges.
    zero_pages: bool,
    /// Zero pages announced so far.
    zero_total: u64,
    /// The destination accepts `Params`.
    live_params: bool,
    /// Finds pages the kernel holds no data for (zero without reading them).
    holes: Holes,
    /// One entry per page of the range being classified: a hole.
    hole_buf: Vec<bool>,
    /// Auto-converge's state; its throttle is lifted again however the migration ends.
    auto: AutoConverge,
    transport: &'static str,
    reason: String,
    /// Page data moved so far, bytes (for the progress).
    moved: u64,
    /// This end has a usable RDMA device (offered in Hello).
    rdma_here: bool,
    /// From connect to `Ready`.
    setup_time: Duration,
    /// The transport the handshake chose.
    kind: crate::wire::TransportKind,
    /// The migration's id (bound to the first handshake), which a reconnection proves.
    migration_id: [u8; crate::wire::MAC_LEN],
    /// Both ends recover post-copy link failures (and the channel can reconnect).
    recover: bool,
    /// A post-copy link failure not recovered yet.
    link_down: Option<Error>,
    /// Each recovery's pause, from the failure seen here to the new link ready.
    pauses: Vec<Duration>,
    /// Pages served over post-copy links closed by a recovery.
    served_before: u64,
    /// Dirty tracking by content (a VM without a dirty log), once negotiated.
    content: Option<content::ContentLog>,
}

/// Migrates `vm` to the destination listening at `dest`. Calls `progress` after each round.
///
/// On success the guest is running on the destination and the caller should stop its local
/// copy. On failure the local VM is running (or, only for [`Error::SwitchoverUnknown`], paused).
pub fn migrate(
    vm: &mut dyn SourceVm,
    dest: SocketAddr,
    config: &MigrationConfig,
    progress: &mut dyn FnMut(&RoundStats),
) -> Result<MigrationReport> {
    migrate_controlled(vm, dest, config, &MigrationControl::new(), progress)
}

/// [`migrate`] driven through `control`: another thread can follow its progress, change its
/// bandwidth cap and downtime limit, switch it to post-copy or cancel it.
pub fn migrate_controlled(
    vm: &mut dyn SourceVm,
    dest: SocketAddr,
    config: &MigrationConfig,
    control: &MigrationControl,
    progress: &mut dyn FnMut(&RoundStats),
) -> Result<MigrationReport> {
    migrate_with(vm, &mut TcpChannel(dest), config, control, progress)
}

/// Migrates `vm` over the connections `channel` opens (TCP, a Unix socket, pre-opened
/// descriptors, or the VMM's own), driven through `control`.
pub fn migrate_with(
    vm: &mut dyn SourceVm,
    channel: &mut dyn MigrationChannel,
    config: &MigrationConfig,
    control: &MigrationControl,
    progress: &mut dyn FnMut(&RoundStats),
) -> Result<MigrationReport> {
    config.validate()?;
    control.begin(
        config.mode != MigrationMode::Precopy,
        vm.memory().total_bytes(),
    )?;
    let result = run(vm, channel, config, control, progress);
    control.end(match &result {
        Ok(_) => Status::Completed,
        Err(Error::Cancelled) => Status::Cancelled,
        Err(_) => Status::Failed,
    });
    result
}

fn run(
    vm: &mut dyn SourceVm,
    channel: &mut dyn MigrationChannel,
    config: &MigrationConfig,
    control: &MigrationControl,
    progress: &mut dyn FnMut(&RoundStats),
) -> Result<MigrationReport> {
    let started = Instant::now();
    let cpu0 = thread_cpu_time();
    let map = vm.memory().clone();
    if vm.dirty_log() == crate::vm::DirtyLog::Content && config.mode != MigrationMode::Precopy {
        return Err(Error::InvalidConfig(format!(
            "{} mode is not possible for this VM: it has no dirty log (the transport compares its pages by content), so it migrates in pre-copy only",
            config.mode.name()
        )));
    }
    // RDMA is offered only when this end has a usable device; asked for, it must be there
    // before anything is opened.
    let rdma_probe = match config.transport {
        crate::wire::TransportKind::Tcp => Err("TCP was requested".to_string()),
        _ => crate::data::local_rdma(&config.rdma),
    };
    if config.transport == crate::wire::TransportKind::Rdma {
        if let Err(why) = &rdma_probe {
            return Err(Error::RdmaUnavailable(format!(
                "RDMA was requested and no RDMA device is usable here: {why}"
            )));
        }
    }
    let stream = channel.open(
        crate::channel::Purpose::Control,
        config.io_timeout.min(Duration::from_secs(10)),
    )?;
    control.watch_control(&stream);
    let ctl = Control::new(stream, Some(config.io_timeout))?;
    let limiter = Arc::new(RateLimiter::new(config.max_bandwidth.unwrap_or(0)));
    control.watch_limiter(&limiter);
    let mut s = Source {
        vm,
        hashes: PageHashes::new(&map),
        map,
        config,
        control,
        channel,
        ctl,
        state: SourceState::AwaitHelloAck,
        data: None,
        cpu: Arc::new(CpuMeter::default()),
        started,
        progress,
        logging: false,
        paused: false,
        switchover_sent: false,
        limiter,
        guest_moved: false,
        zero_pages: false,
        zero_total: 0,
        live_params: false,
        holes: Holes::new(),
        hole_buf: Vec::new(),
        auto: AutoConverge::default(),
        transport: "",
        reason: String::new(),
        moved: 0,
        rdma_here: rdma_probe.is_ok(),
        setup_time: Duration::ZERO,
        kind: crate::wire::TransportKind::Tcp,
        migration_id: [0; crate::wire::MAC_LEN],
        recover: false,
        link_down: None,
        pauses: Vec::new(),
        served_before: 0,
        content: None,
    };
    let result = s.run();
    let result = match result {
        Ok(mut report) => {
            s.teardown();
            s.cpu.add(thread_cpu_time().saturating_sub(cpu0));
            report.source_cpu_ms = s.cpu.total().as_secs_f64() * 1e3;
            report.total_ms = started.elapsed().as_secs_f64() * 1e3;
            report.setup_ms = s.setup_time.as_secs_f64() * 1e3;
            report.tls = s.ctl.stream().tls().into();
            Ok(report)
        }
        Err(e) => Err(s.fail(e)),
    };
    s.ctl.shutdown();
    result
}

impl Source<'_> {
    fn run(&mut self) -> Result<MigrationReport> {
        let mut phase = Phase::Handshake;
        loop {
            // A cancel before the point of no return ends the migration here (and wakes the
            // phase's own waits when it comes during one).
            if !self.switchover_sent {
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
            Phase::Handshake => self.handshake().map(Phase::Setup),
            Phase::Setup(n) => self.setup(n),
            Phase::Precopy(p) => self.precopy_round(p),
            Phase::StopAndCopy(p, paused_at) => self.stop_and_copy(p, paused_at),
            Phase::Postcopy(p) => self.run_postcopy(p).map(|r| Phase::Done(Box::new(r))),
            Phase::Done(r) => Ok(Phase::Done(r)),
        }
    }

    fn recv(&mut self) -> Result<Message> {
        let state = self.state;
        let want = state.expects();
        let m = self
            .ctl
            .recv_filtered(state.describe(), &|c| Some(c) == want)?;
        if let (SourceState::AwaitRecoverMissing(want), Message::PostcopyMissing { chunk, .. }) =
            (state, &m)
        {
            if *chunk != want {
                return Err(Error::Protocol(format!(
                    "missing-set chunk {chunk} while awaiting chunk {want}"
                )));
            }
        }
        if let (SourceState::AwaitLanded(round, chunk), Message::Landed(l)) = (state, &m) {
            if (l.round, l.chunk) != (round, chunk) {
                return Err(Error::Protocol(format!(
                    "Landed chunk {} of round {} while awaiting chunk {chunk} of round {round}",
                    l.chunk, l.round
                )));
            }
        }
        if let (SourceState::AwaitRoundDone(want), Message::RoundDone(d)) = (state, &m) {
            if d.round != want {
                return Err(Error::Protocol(format!(
                    "RoundDone for round {} while awaiting round {want}",
                    d.round
                )));
            }
        }
        Ok(m)
    }
}
