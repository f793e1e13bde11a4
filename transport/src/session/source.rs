//! The source end of a migration: handshake, pre-copy rounds, stop-and-copy, switchover.
//!
//! States and the messages each accepts:
//!
//! | state | accepts |
//! | --- | --- |
//! | `AwaitHelloAck` | `HelloAck` |
//! | `AwaitAuthOk` | `AuthOk` |
//! | `AwaitSetupAck` | `DataSetupAck` |
//! | `AwaitReady` | `Ready` |
//! | `AwaitRoundDone(n)` | `RoundDone{n}` |
//! | `AwaitComplete` | `Complete` |
//! | `AwaitPostcopyDropped` | `PostcopyDropped` |
//! | `AwaitPostcopyResumed` | `PostcopyResumed` |
//! | `AwaitPostcopyComplete` | `PostcopyComplete` |
//!
//! Post-copy (mode `postcopy`, or `hybrid` once the convergence policy reports
//! [`Decision::NotConverging`]): pause, device state, the post-copy set (every page for
//! `postcopy`, which runs no round; the dirty set after the final fetch-and-clear for
//! `hybrid`), then `AwaitPostcopyResumed`: that answer ends the downtime. In hybrid mode the
//! pages dirtied during the last round go first, while the guest still runs here
//! (`PostcopyMissing` with `POSTCOPY_EARLY`, answered by `PostcopyDropped`), so that the
//! destination's dropping of stale pages stays out of the downtime. The page server
//! ([`crate::postcopy::PageServer`]) answers the destination's page requests from the paused
//! memory while the source re-hashes the post-copy set, sends its digest and waits for
//! `PostcopyComplete`; it stops only then. From `PostcopyResumed` on the guest runs on the
//! destination, so any failure leaves the source paused ([`Error::SwitchoverUnknown`]).
//!
//! `Abort` is accepted in every state and ends the migration. Anything else is refused with
//! [`Error::UnexpectedMessage`]. On any failure before `Switchover` is sent the source VM is
//! resumed (if it was paused) and keeps running with its memory untouched. After `Switchover`
//! an `Abort` from the destination (digest mismatch, restore failure) also resumes it; a lost
//! connection leaves it paused, because the destination may already be running the guest.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{ConvergencePolicy, MigrationConfig, MigrationMode};
use super::handle::MigrationControl;
use super::policy::{AutoConverge, Convergence, Decision};
use super::stats::{mib_s, MigrationReport, RoundStats};
use crate::auth::random_bytes;
use crate::control::Control;
use crate::cpu::{thread_cpu_time, CpuMeter};
use crate::data::SourceDataPath;
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::holes::Holes;
use crate::mem::GuestMemoryMap;
use crate::pace::RateLimiter;
use crate::pages::{PageRange, PageSet};
use crate::postcopy::{self, PageServer};
use crate::rdma::{self, RdmaSourcePath};
use crate::tcp::{connect_streams, TcpSourcePath};
use crate::vm::SourceVm;
use crate::wire::{
    caps, Command, Hello, Message, TransportKind, MAX_RANGES_PER_MSG, PROTOCOL_VERSION,
};

mod postcopy_phase;
mod round;

/// Ranges split into the chunks of one message each (at least one chunk, maybe empty).
fn message_chunks(ranges: &[PageRange]) -> Vec<&[PageRange]> {
    if ranges.is_empty() {
        vec![&[]]
    } else {
        ranges.chunks(MAX_RANGES_PER_MSG).collect()
    }
}

/// Where the source is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceState {
    AwaitHelloAck,
    AwaitAuthOk,
    AwaitSetupAck,
    AwaitReady,
    AwaitRoundDone(u32),
    AwaitComplete,
    AwaitPostcopyDropped,
    AwaitPostcopyResumed,
    AwaitPostcopyComplete,
    Done,
}

impl SourceState {
    fn describe(self) -> &'static str {
        match self {
            SourceState::AwaitHelloAck => "awaiting HelloAck",
            SourceState::AwaitAuthOk => "awaiting AuthOk",
            SourceState::AwaitSetupAck => "awaiting DataSetupAck",
            SourceState::AwaitReady => "awaiting Ready",
            SourceState::AwaitRoundDone(_) => "awaiting RoundDone",
            SourceState::AwaitComplete => "awaiting Complete",
            SourceState::AwaitPostcopyDropped => "awaiting PostcopyDropped",
            SourceState::AwaitPostcopyResumed => "awaiting PostcopyResumed",
            SourceState::AwaitPostcopyComplete => "awaiting PostcopyComplete",
            SourceState::Done => "done",
        }
    }

    /// Whether a message with command `c` may be valid here (from its header alone).
    fn may_receive(self, c: Command) -> bool {
        use Command as C;
        c == match self {
            SourceState::AwaitHelloAck => C::HelloAck,
            SourceState::AwaitAuthOk => C::AuthOk,
            SourceState::AwaitSetupAck => C::DataSetupAck,
            SourceState::AwaitReady => C::Ready,
            SourceState::AwaitRoundDone(_) => C::RoundDone,
            SourceState::AwaitComplete => C::Complete,
            SourceState::AwaitPostcopyDropped => C::PostcopyDropped,
            SourceState::AwaitPostcopyResumed => C::PostcopyResumed,
            SourceState::AwaitPostcopyComplete => C::PostcopyComplete,
            SourceState::Done => return false,
        }
    }

    /// Whether `m` is valid in this state.
    fn accepts(self, m: &Message) -> bool {
        matches!(
            (self, m),
            (SourceState::AwaitHelloAck, Message::HelloAck(_))
                | (SourceState::AwaitAuthOk, Message::AuthOk)
                | (SourceState::AwaitSetupAck, Message::DataSetupAck(_))
                | (SourceState::AwaitReady, Message::Ready)
                | (SourceState::AwaitComplete, Message::Complete(_))
                | (
                    SourceState::AwaitPostcopyDropped,
                    Message::PostcopyDropped { .. }
                )
                | (
                    SourceState::AwaitPostcopyResumed,
                    Message::PostcopyResumed { .. }
                )
                | (
                    SourceState::AwaitPostcopyComplete,
                    Message::PostcopyComplete(_)
                )
        ) || matches!((self, m), (SourceState::AwaitRoundDone(n), Message::RoundDone(d)) if d.round == n)
    }
}

/// Most batches of stale pages a hybrid switchover has the destination drop before the pause.
const MAX_EARLY_BATCHES: u32 = 6;
/// Few enough newly stale pages to drop during the downtime (a few milliseconds' worth).
const EARLY_ENOUGH_PAGES: u64 = 2048;

/// What the pre-copy rounds before a post-copy switchover moved.
struct PrecopyTotals {
    rounds: u32,
    /// Post-copy mode's metadata-only round ran: every page is hashed, and only the pages
    /// dirtied since need hashing again.
    scanned: bool,
    /// Hybrid mode (the pre-copy rounds ran with the guest dirtying pages).
    hybrid: bool,
    bytes: u64,
    round_time: Duration,
    per_round: Vec<RoundStats>,
}

struct Source<'a> {
    vm: &'a mut dyn SourceVm,
    map: GuestMemoryMap,
    config: &'a MigrationConfig,
    ctl: Control,
    state: SourceState,
    data: Option<Box<dyn SourceDataPath>>,
    hashes: PageHashes,
    cpu: Arc<CpuMeter>,
    logging: bool,
    paused: bool,
    switchover_sent: bool,
    server: Option<PageServer>,
    /// The bandwidth cap's pacer, cancelled on failure so no thread sleeps through the abort.
    limiter: Option<Arc<RateLimiter>>,
    /// The destination resumed the guest in post-copy: the source must stay paused whatever happens.
    guest_moved: bool,
    /// Both ends send zero pages as ranges.
    zero_pages: bool,
    /// Zero pages announced so far.
    zero_total: u64,
    /// Finds pages the kernel holds no data for (zero without reading them).
    holes: Holes,
    /// One entry per page of the range being classified: a hole.
    hole_buf: Vec<bool>,
    /// Auto-converge's state; its throttle is lifted again however the migration ends.
    auto: AutoConverge,
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
    config.validate()?;
    control.begin(
        config.mode != MigrationMode::Precopy,
        vm.memory().total_bytes(),
    )?;
    let started = Instant::now();
    let cpu0 = thread_cpu_time();
    let map = vm.memory().clone();
    let rdma_probe = match config.transport {
        TransportKind::Tcp => Err("TCP was requested".to_string()),
        _ => rdma::probe(&config.rdma),
    };
    if config.transport == TransportKind::Rdma {
        if let Err(why) = &rdma_probe {
            return Err(Error::RdmaUnavailable(format!(
                "--transport rdma needs a usable RDMA device here: {why}"
            )));
        }
    }
    let stream = TcpStream::connect_timeout(&dest, config.io_timeout.min(Duration::from_secs(10)))
        .map_err(|e| Error::Io {
            context: format!("connecting to the destination at {dest}"),
            source: e,
        })?;
    let ctl = Control::new(stream, Some(config.io_timeout))?;
    let mut s = Source {
        vm,
        hashes: PageHashes::new(&map),
        map,
        config,
        ctl,
        state: SourceState::AwaitHelloAck,
        data: None,
        cpu: Arc::new(CpuMeter::default()),
        logging: false,
        paused: false,
        switchover_sent: false,
        server: None,
        limiter: None,
        guest_moved: false,
        zero_pages: false,
        zero_total: 0,
        holes: Holes::new(),
        hole_buf: Vec::new(),
        auto: AutoConverge::default(),
    };
    let result = s.run(dest, rdma_probe.is_ok(), started, progress);
    let result = match result {
        Ok(mut report) => {
            s.teardown();
            s.cpu.add(thread_cpu_time().saturating_sub(cpu0));
            report.source_cpu_ms = s.cpu.total().as_secs_f64() * 1e3;
            report.total_ms = started.elapsed().as_secs_f64() * 1e3;
            Ok(report)
        }
        Err(e) => Err(s.fail(e)),
    };
    s.ctl.shutdown();
    result
}

impl Source<'_> {
    fn recv(&mut self) -> Result<Message> {
        let state = self.state;
        let m = self
            .ctl
            .recv_filtered(state.describe(), &|c| state.may_receive(c))?;
        if let (SourceState::AwaitRoundDone(want), Message::RoundDone(d)) = (state, &m) {
            if d.round != want {
                return Err(Error::Protocol(format!(
                    "RoundDone for round {} while awaiting round {want}",
                    d.round
                )));
            }
        }
        if !state.accepts(&m) {
            return Err(Error::UnexpectedMessage {
                state: state.describe(),
                got: m.name(),
            });
        }
        Ok(m)
    }

    fn run(
        &mut self,
        dest: SocketAddr,
        have_rdma: bool,
        started: Instant,
        progress: &mut dyn FnMut(&RoundStats),
    ) -> Result<MigrationReport> {
        // Handshake: versions, capabilities, transport, mutual authentication.
        let nonce_s = random_bytes()?;
        let mut my_caps = caps::TCP;
        if have_rdma {
            my_caps |= caps::RDMA;
        }
        let mode = self.config.mode;
        if mode != MigrationMode::Precopy {
            my_caps |= caps::POSTCOPY;
        }
        if self.config.zero_pages {
            my_caps |= caps::ZERO_PAGES;
        }
        self.ctl.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            transport: self.config.transport,
            mode: mode.to_u8(),
            caps: my_caps,
            streams: self.config.streams,
            qps: self.config.rdma.qps,
            max_bandwidth: self.config.max_bandwidth.unwrap_or(0),
            nonce: nonce_s,
        }))?;
        let Message::HelloAck(ack) = self.recv()? else {
            unreachable!("state checked")
        };
        if !self
            .config
            .psk
            .check_dest_proof(&nonce_s, &ack.nonce, &ack.mac)
        {
            return Err(Error::AuthFailed(
                "the destination did not prove the pre-shared key (not the same key?)".into(),
            ));
        }
        // The destination proved the key: its text may be shown from now on.
        self.ctl.set_authenticated();
        self.zero_pages = self.config.zero_pages && ack.caps & caps::ZERO_PAGES != 0;
        if mode != MigrationMode::Precopy && ack.caps & caps::POSTCOPY == 0 {
            return Err(Error::PostcopyUnavailable(format!(
                "the destination does not offer post-copy (needed for --mode {})",
                mode.name()
            )));
        }
        self.ctl.send(&Message::AuthProof(
            self.config.psk.source_proof(&nonce_s, &ack.nonce),
        ))?;
        self.state = SourceState::AwaitAuthOk;
        self.recv()?;
        tracing::info!(
            "authenticated; transport {} ({})",
            ack.transport.name(),
            ack.reason
        );

        // Memory layout and data path. Keys and addresses go out only now.
        self.ctl.send(&Message::RegionTable {
            page_size: self.map.page_size().bytes() as u32,
            regions: self
                .map
                .regions()
                .iter()
                .map(|r| (r.gpa(), r.len()))
                .collect(),
        })?;
        let limiter = self
            .config
            .max_bandwidth
            .map(|b| Arc::new(RateLimiter::new(b)));
        self.limiter = limiter.clone();
        let mut rdma_path = None;
        let setup = match ack.transport {
            TransportKind::Rdma => {
                let mut opts = self.config.rdma.clone();
                if opts.local_addr.is_none() {
                    // The GID that belongs to the address the control channel uses.
                    opts.local_addr = self.ctl.local().ok().map(|a| a.ip());
                }
                if mode != MigrationMode::Precopy {
                    // QPs of their own for the destination's post-copy fault fetcher and
                    // prefetchers, after the pre-copy ones (none in post-copy mode).
                    let bulk = if mode == MigrationMode::Postcopy {
                        0
                    } else {
                        opts.qps.max(1)
                    };
                    opts.qps = bulk + postcopy::stream_count(self.config.streams);
                }
                let (path, payload) = RdmaSourcePath::new(&self.map, &opts)?;
                rdma_path = Some(path);
                payload
            }
            _ => Vec::new(),
        };
        self.ctl.send(&Message::DataSetup(setup))?;
        self.state = SourceState::AwaitSetupAck;
        let Message::DataSetupAck(ack_payload) = self.recv()? else {
            unreachable!("state checked")
        };
        self.data = Some(match rdma_path {
            Some(mut path) => {
                path.connect(&ack_payload)?;
                Box::new(path)
            }
            None => {
                let token = self.config.psk.stream_token(&nonce_s, &ack.nonce);
                let streams =
                    connect_streams(dest, self.config.streams, token, self.config.io_timeout)?;
                Box::new(TcpSourcePath::new(
                    self.map.clone(),
                    streams,
                    limiter.clone(),
                    self.cpu.clone(),
                )?)
            }
        });
        if mode != MigrationMode::Precopy && ack.transport != TransportKind::Rdma {
            // The page server idles until the destination asks for pages after the switchover
            // (over RDMA the destination READs them instead).
            let token = self.config.psk.postcopy_token(&nonce_s, &ack.nonce);
            let streams = connect_streams(
                dest,
                postcopy::stream_count(self.config.streams),
                token,
                self.config.io_timeout,
            )?;
            self.server = Some(PageServer::start(
                self.map.clone(),
                streams,
                limiter,
                self.cpu.clone(),
            )?);
        }
        self.state = SourceState::AwaitReady;
        self.recv()?;

        // Pre-copy. Post-copy mode runs no round that moves pages: every page is in the
        // post-copy set, except (with zero pages) those a metadata-only round found zero
        // while the guest ran, with the dirty log on to catch the ones written since.
        let scan = mode == MigrationMode::Postcopy && self.zero_pages;
        if mode != MigrationMode::Postcopy || scan {
            self.vm
                .start_dirty_log()
                .map_err(|e| Error::vmm("start dirty log", e))?;
            self.logging = true;
        }
        let page = self.map.page_size().bytes();
        let mut set = PageSet::full(&self.map);
        if scan {
            let t = Instant::now();
            let sent = self.send_round(0, &set, false, true)?;
            self.zero_total += sent.zero_pages;
            tracing::info!(
                "post-copy: {} of {} pages are zero (scanned in {:?})",
                sent.zero_pages,
                set.count(),
                t.elapsed()
            );
            set = sent.data_set.expect("asked for");
        }
        let mut conv = Convergence::from_config(&self.config);
        let mut per_round = Vec::new();
        let (mut total_bytes, mut round_time) = (0u64, Duration::ZERO);
        let mut round = 0u32;
        let mut final_round = false;
        let mut forced = false;
        let mut paused_at = None;
        let mut go_postcopy = mode == MigrationMode::Postcopy;
        while !go_postcopy {
            if final_round {
                self.vm.pause().map_err(|e| Error::vmm("pause", e))?;
                self.paused = true;
                paused_at = Some(Instant::now());
                self.vm
                    .fetch_and_clear_dirty(&mut set)
                    .map_err(|e| Error::vmm("fetch dirty log", e))?;
                tracing::debug!(
                    "paused; final dirty set fetched in {:?}",
                    paused_at.map(|t| t.elapsed())
                );
            }
            let t = Instant::now();
            let sent = self.send_round(round, &set, final_round, false)?;
            let elapsed = t.elapsed();
            let pages = sent.data_pages;
            self.zero_total += sent.zero_pages;
            let bytes = pages * page;
            total_bytes += bytes;
            round_time += elapsed;
            let mut stats = RoundStats {
                round,
                final_round,
                pages,
                zero_pages: sent.zero_pages,
                bytes,
                ms: elapsed.as_secs_f64() * 1e3,
                mib_s: mib_s(bytes, elapsed.as_secs_f64()),
                dirty_rate_mib_s: 0.0,
                dirty_pages: 0,
                predicted_downtime_ms: 0.0,
                throttle_percent: self.auto.percent(),
            };
            if final_round {
                progress(&stats);
                per_round.push(stats);
                break;
            }
            set.clear();
            self.vm
                .fetch_and_clear_dirty(&mut set)
                .map_err(|e| Error::vmm("fetch dirty log", e))?;
            let dirty = set.count();
            let (mut decision, predicted) =
                conv.after_round(round + 1, bytes, elapsed, dirty * page);
            if self.config.auto_converge && decision != Decision::Switchover {
                decision = self.auto_converge(&mut conv, round + 1, bytes, dirty * page, decision);
            }
            stats.dirty_pages = dirty;
            stats.dirty_rate_mib_s = mib_s(dirty * page, t.elapsed().as_secs_f64());
            stats.predicted_downtime_ms = predicted.as_secs_f64() * 1e3;
            progress(&stats);
            per_round.push(stats);
            match decision {
                Decision::Continue => {}
                Decision::Switchover => final_round = true,
                Decision::NotConverging if mode == MigrationMode::Hybrid => {
                    tracing::info!(
                        "pre-copy is not converging after {} rounds; switching over in post-copy",
                        round + 1
                    );
                    go_postcopy = true;
                    continue;
                }
                Decision::NotConverging => match self.config.policy {
                    ConvergencePolicy::Stop => {
                        tracing::warn!(
                            "pre-copy is not converging after {} rounds; switching over anyway",
                            round + 1
                        );
                        final_round = true;
                        forced = true;
                    }
                    ConvergencePolicy::Abort => {
                        return Err(Error::NotConverged(format!(
                        "after {} rounds the predicted downtime is {:.1} ms, over the {:?} limit",
                        round + 1,
                        predicted.as_secs_f64() * 1e3,
                        self.config.downtime_limit
                    )))
                    }
                },
            }
            round += 1;
        }

        if go_postcopy {
            let precopy = PrecopyTotals {
                scanned: scan,
                hybrid: mode == MigrationMode::Hybrid,
                rounds: if mode == MigrationMode::Postcopy {
                    0
                } else {
                    round + 1
                },
                bytes: total_bytes,
                round_time,
                per_round,
            };
            return self.run_postcopy(set, precopy, ack.transport.name(), ack.reason, started);
        }

        // Switchover: device state, digest, and the destination's resume.
        let t_pause = paused_at.unwrap_or_else(Instant::now);
        tracing::debug!("final round landed {:?} after pause", t_pause.elapsed());
        let blob = self
            .vm
            .save_state()
            .map_err(|e| Error::vmm("save device state", e))?;
        tracing::debug!(
            "device state saved ({} bytes) {:?} after pause",
            blob.len(),
            t_pause.elapsed()
        );
        let state_bytes = blob.len() as u64;
        self.ctl.send(&Message::DeviceState(blob))?;
        let digest = self.hashes.digest();
        self.ctl.send(&Message::Switchover {
            digest,
            pages: self.hashes.pages(),
        })?;
        self.switchover_sent = true;
        tracing::debug!("switchover sent {:?} after pause", t_pause.elapsed());
        self.state = SourceState::AwaitComplete;
        let Message::Complete(done) = self.recv()? else {
            unreachable!("state checked")
        };
        let downtime = paused_at.map(|t| t.elapsed()).unwrap_or_default();
        if done.digest != digest {
            // An honest destination compares the digests itself and aborts on a mismatch; one
            // that claims success with another digest is broken or hostile. No Finish: the
            // source VM is kept (paused, the outcome unknown) rather than dropped.
            return Err(Error::DigestMismatch {
                source_digest: digest,
                dest_digest: done.digest,
            });
        }
        self.state = SourceState::Done;
        if let Err(e) = self.ctl.send(&Message::Finish) {
            tracing::warn!("the destination runs the guest, but Finish was not delivered: {e}");
        }
        Ok(MigrationReport {
            transport: ack.transport.name().to_string(),
            transport_reason: ack.reason,
            mem_bytes: self.map.total_bytes(),
            page_size: page,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            rounds: round + 1,
            bytes_transferred: total_bytes,
            zero_pages: self.zero_total,
            throughput_mib_s: mib_s(total_bytes, round_time.as_secs_f64()),
            verified: true,
            digest: format!("{digest:032x}"),
            source_cpu_ms: 0.0,
            dest_cpu_ms: done.cpu_micros as f64 / 1e3,
            forced_switchover: forced,
            device_state_bytes: state_bytes,
            per_round,
            mode: mode.name().into(),
            ..MigrationReport::default()
        })
    }

    /// Auto-converge after a round that did not switch over: throttles the guest (more) when
    /// the round did not shrink, and keeps pre-copy going while the throttle can still rise.
    /// Returns the decision to act on.
    fn auto_converge(
        &mut self,
        conv: &mut Convergence,
        rounds_done: u32,
        moved: u64,
        dirtied: u64,
        decision: Decision,
    ) -> Decision {
        let Some(next) = self.auto.after_round(moved, dirtied, decision) else {
            return decision;
        };
        match self.vm.throttle(next) {
            Ok(()) => {
                tracing::info!(
                    "auto-converge: the guest dirtied {dirtied} bytes in a round that moved {moved}; throttled to {next}%"
                );
                self.auto.applied(next);
                conv.restart_stall();
                if decision == Decision::NotConverging && !conv.out_of_rounds(rounds_done) {
                    Decision::Continue
                } else {
                    decision
                }
            }
            Err(e) => {
                tracing::warn!("auto-converge: the VMM cannot throttle the guest: {e}");
                // Never ask again; the policy applies as without auto-converge.
                self.auto.disable();
                decision
            }
        }
    }

    fn teardown(&mut self) {
        if self.auto.percent() > 0 {
            self.auto.applied(0);
            if let Err(e) = self.vm.throttle(0) {
                tracing::warn!("lifting auto-converge's throttle: {e}");
            }
        }
        if let Some(mut server) = self.server.take() {
            if let Err(e) = server.stop() {
                tracing::debug!("post-copy page server: {e}");
            }
        }
        if let Some(mut d) = self.data.take() {
            if let Err(e) = d.close() {
                tracing::warn!("closing the data path: {e}");
            }
        }
        if self.logging {
            self.logging = false;
            if let Err(e) = self.vm.stop_dirty_log() {
                tracing::warn!("stopping the dirty log: {e}");
            }
        }
    }

    /// Cleans up after an error and returns the error to report.
    fn fail(&mut self, e: Error) -> Error {
        if let Some(l) = &self.limiter {
            l.cancel();
        }
        let keep_paused =
            self.guest_moved || (self.switchover_sent && !matches!(e, Error::PeerAborted(_)));
        if !matches!(e, Error::PeerAborted(_)) {
            // A destination that has not proved the key learns nothing of this end.
            let reason = if self.ctl.authenticated() {
                e.to_string()
            } else {
                crate::control::pre_auth_reason(&e).to_string()
            };
            self.ctl.send_abort(&reason);
        }
        self.teardown();
        if keep_paused {
            return Error::SwitchoverUnknown(e.to_string());
        }
        if self.paused {
            if let Err(re) = self.vm.resume() {
                tracing::error!("could not resume the source VM after a failed migration: {re}");
            } else {
                self.paused = false;
            }
        }
        e
    }
}
