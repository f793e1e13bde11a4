//! The destination end of a migration.
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
//! the destination VM; the source keeps running. A failure after a post-copy resume (source
//! or link lost) pauses the guest and reports how many pages are still missing
//! ([`Error::PostcopyInterrupted`]).

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{MigrationConfig, MigrationMode};
use super::handle::MigrationControl;
use super::stats::DestReport;
use crate::control::Control;
use crate::cpu::{thread_cpu_time, CpuMeter};
use crate::data::{DestDataPath, Landed};
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::{GuestMemoryMap, PageSize};
use crate::pace::RateLimiter;
use crate::pages::PageSet;
use crate::postcopy::{self, PostcopyService};
use crate::rdma::{self, RdmaDestPath, RdmaPageFetcher};
use crate::tcp::{accept_stream_sets, TcpDestPath};
use crate::vm::{DestinationFactory, DestinationVm, MemoryLayout};
use crate::wire::{
    Command, Complete, Message, RoundDone, TransportKind, MAX_REGIONS, POSTCOPY_EARLY,
    POSTCOPY_LAST_CHUNK, POSTCOPY_ZERO, ROUND_FINAL, ROUND_LAST_CHUNK, ROUND_ZERO,
};
use crate::zero::DestZero;

mod listen;
mod postcopy_phase;

use crate::control::pre_auth_reason;
use listen::{authenticate, Handshake};

/// Largest guest the destination accepts by default (a malicious table cannot make it map more).
pub const MAX_GUEST_BYTES: u64 = 1 << 40;

/// Where the destination is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DestState {
    AwaitRegionTable,
    AwaitDataSetup,
    Precopy {
        round: u32,
        chunk: u32,
    },
    AwaitDeviceState,
    AwaitSwitchover,
    EarlyDrop {
        chunk: u32,
    },
    AwaitPostcopyMissing {
        chunk: u32,
    },
    /// The guest runs here; `chunk` is the next `POSTCOPY_ZERO` chunk's number.
    Postcopy {
        chunk: u32,
    },
    AwaitFinish,
}

impl DestState {
    fn describe(self) -> &'static str {
        match self {
            DestState::AwaitRegionTable => "awaiting RegionTable",
            DestState::AwaitDataSetup => "awaiting DataSetup",
            DestState::Precopy { .. } => "in pre-copy",
            DestState::AwaitDeviceState => "awaiting DeviceState",
            DestState::AwaitSwitchover => "awaiting Switchover",
            DestState::EarlyDrop { .. } => "dropping stale pages early",
            DestState::AwaitPostcopyMissing { .. } => "awaiting PostcopyMissing",
            DestState::Postcopy { .. } => "in post-copy",
            DestState::AwaitFinish => "awaiting Finish",
        }
    }

    /// Whether a message with command `c` may be valid here (checked from its header, before
    /// its payload is read; [`DestState::accepts`] then checks the decoded message).
    fn may_receive(self, c: Command, postcopy: bool) -> bool {
        use Command as C;
        match self {
            DestState::AwaitRegionTable => c == C::RegionTable,
            DestState::AwaitDataSetup => c == C::DataSetup,
            DestState::Precopy { chunk: 0, .. } if postcopy => {
                matches!(c, C::Round | C::DeviceState | C::PostcopyMissing)
            }
            DestState::Precopy { .. } => c == C::Round,
            DestState::AwaitDeviceState => c == C::DeviceState,
            DestState::AwaitSwitchover => c == C::Switchover,
            DestState::Postcopy { .. } => matches!(c, C::Switchover | C::PostcopyMissing),
            DestState::EarlyDrop { chunk: 0 } => matches!(c, C::DeviceState | C::PostcopyMissing),
            DestState::EarlyDrop { .. } | DestState::AwaitPostcopyMissing { .. } => {
                c == C::PostcopyMissing
            }
            DestState::AwaitFinish => c == C::Finish,
        }
    }

    fn accepts(self, m: &Message, postcopy: bool) -> bool {
        match (self, m) {
            (DestState::Precopy { chunk: 0, .. }, Message::DeviceState(_)) => postcopy,
            (
                DestState::Precopy { chunk: 0, .. },
                Message::PostcopyMissing {
                    chunk: 0, flags, ..
                },
            ) => postcopy && flags & POSTCOPY_EARLY != 0,
            (DestState::EarlyDrop { chunk: 0 }, Message::DeviceState(_)) => true,
            (
                DestState::EarlyDrop { chunk },
                Message::PostcopyMissing {
                    chunk: c, flags, ..
                },
            ) => *c == chunk && flags & POSTCOPY_EARLY != 0,
            (
                DestState::AwaitPostcopyMissing { chunk },
                Message::PostcopyMissing {
                    chunk: c, flags, ..
                },
            ) => *c == chunk && flags & POSTCOPY_EARLY == 0,
            (DestState::Postcopy { .. }, Message::Switchover { .. }) => true,
            (
                DestState::Postcopy { chunk },
                Message::PostcopyMissing {
                    chunk: c, flags, ..
                },
            ) => *c == chunk && flags & POSTCOPY_ZERO != 0,
            (DestState::AwaitRegionTable, Message::RegionTable { .. })
            | (DestState::AwaitDataSetup, Message::DataSetup(_))
            | (DestState::AwaitDeviceState, Message::DeviceState(_))
            | (DestState::AwaitSwitchover, Message::Switchover { .. })
            | (DestState::AwaitFinish, Message::Finish) => true,
            (DestState::Precopy { round, chunk }, Message::Round(r)) => {
                r.round == round && r.chunk == chunk
            }
            _ => false,
        }
    }
}

struct Dest<'a> {
    config: &'a MigrationConfig,
    listener: &'a TcpListener,
    ctl: Control,
    state: DestState,
    data: Option<Box<dyn DestDataPath>>,
    cpu: Arc<CpuMeter>,
    mode: MigrationMode,
    pc_streams: Vec<TcpStream>,
    /// RDMA transport: the post-copy fetchers (fault first), on QPs of their own.
    pc_rdma: Vec<RdmaPageFetcher>,
    /// memfd guest memory: the second mapping post-copy fetches into (zero-copy).
    pc_alias: Option<Arc<postcopy::AliasMap>>,
    postcopy: Option<PostcopyService>,
    /// The bandwidth cap's pacer, cancelled on failure so no thread sleeps through the abort.
    limiter: Option<Arc<RateLimiter>>,
    /// The guest was resumed here in post-copy: a failure now must not discard it.
    resumed_in_postcopy: bool,
    /// Both ends send zero pages as ranges.
    zero_pages: bool,
    /// Which pages may hold data, for installing announced zero pages.
    zero: Option<DestZero>,
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
    listener: &TcpListener,
    config: &MigrationConfig,
    factory: DestinationFactory<'_>,
) -> Result<(Box<dyn DestinationVm>, DestReport)> {
    accept_controlled(listener, config, factory, &MigrationControl::new())
}

/// [`accept`] driven through `control`: another thread can follow its progress or cancel it
/// (until the guest is resumed here).
pub fn accept_controlled(
    listener: &TcpListener,
    config: &MigrationConfig,
    factory: DestinationFactory<'_>,
    control: &MigrationControl,
) -> Result<(Box<dyn DestinationVm>, DestReport)> {
    config.validate()?;
    control.begin(true, 0)?;
    let (ctl, hs) = authenticate(listener, config)?;
    tracing::info!("incoming migration from {}", ctl.peer());
    let mut d = Dest {
        config,
        listener,
        ctl,
        state: DestState::AwaitRegionTable,
        data: None,
        cpu: Arc::new(CpuMeter::default()),
        mode: MigrationMode::Precopy,
        pc_streams: Vec::new(),
        pc_rdma: Vec::new(),
        pc_alias: None,
        postcopy: None,
        limiter: None,
        resumed_in_postcopy: false,
        zero_pages: false,
        zero: None,
    };
    let mut vm = None;
    let result = d.run(hs, factory, &mut vm);
    if result.is_err() {
        if let Some(l) = &d.limiter {
            l.cancel();
        }
    }
    let result = match result {
        Err(e) if d.resumed_in_postcopy => Err(d.postcopy_failed(vm.take(), e)),
        r => r,
    };
    // Any service left (none after a post-copy failure: the remnant holds it) goes before the
    // VM: closing the userfaultfd releases threads blocked on missing pages, which the VM's
    // teardown joins. (A failure before the resume discards both: the source resumes.)
    drop(d.postcopy.take());
    if let Some(mut data) = d.data.take() {
        if let Err(e) = data.close() {
            tracing::warn!("closing the data path: {e}");
        }
    }
    match result {
        Ok(report) => Ok((vm.expect("a completed migration has a VM"), report)),
        Err(e) => {
            if !matches!(e, Error::PeerAborted(_)) {
                // Before the source proved the key it learns nothing of this end's internals.
                let reason = if d.ctl.authenticated() {
                    e.to_string()
                } else {
                    pre_auth_reason(&e).to_string()
                };
                d.ctl.send_abort(&reason);
            }
            d.ctl.shutdown();
            Err(e)
        }
    }
}

fn check_layout(
    page_size: u32,
    regions: &[(crate::mem::GuestAddress, u64)],
) -> Result<MemoryLayout> {
    let page = PageSize::new(u64::from(page_size))
        .map_err(|e| Error::Protocol(format!("region table: {e}")))?;
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(Error::Protocol(format!(
            "region table has {} regions",
            regions.len()
        )));
    }
    let mut total = 0u64;
    for &(gpa, len) in regions {
        if len == 0 || gpa.0 % page.bytes() != 0 || gpa.checked_add(len).is_none() {
            return Err(Error::Protocol(format!(
                "region table: bad region at {:#x} of {len} bytes",
                gpa.0
            )));
        }
        total = total.saturating_add(len);
    }
    if total > MAX_GUEST_BYTES {
        return Err(Error::Protocol(format!(
            "region table announces {total} bytes, more than {MAX_GUEST_BYTES}"
        )));
    }
    Ok(MemoryLayout {
        page_size: page,
        regions: regions.to_vec(),
    })
}

impl Dest<'_> {
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

    fn run(
        &mut self,
        hs: Handshake,
        factory: DestinationFactory<'_>,
        vm_out: &mut Option<Box<dyn DestinationVm>>,
    ) -> Result<DestReport> {
        let Handshake {
            hello,
            transport,
            detail: reason,
            mut rdma_opts,
            mode,
            nonce_d,
            zero_pages,
        } = hs;
        self.mode = mode;
        self.zero_pages = zero_pages;
        let psk = &self.config.psk;
        self.ctl.set_authenticated();
        self.ctl.send(&Message::AuthOk)?;
        self.state = DestState::AwaitRegionTable;
        tracing::info!(
            "source authenticated; transport {} ({reason})",
            transport.name()
        );

        let Message::RegionTable { page_size, regions } = self.recv()? else {
            unreachable!("state checked")
        };
        let layout = check_layout(page_size, &regions)?;
        let total = layout.total_bytes();
        if total > self.config.max_guest_bytes {
            return Err(Error::GuestTooLarge(format!(
                "the source announces a guest of {total} bytes, more than the {} this destination accepts",
                self.config.max_guest_bytes
            )));
        }
        crate::mem::HostMemory::now()
            .check(total, "the announced guest")
            .map_err(Error::GuestTooLarge)?;
        let t = Instant::now();
        let vm = factory(&layout).map_err(|e| Error::vmm("create destination VM", e))?;
        tracing::debug!(
            "destination VM of {} bytes built in {:?}",
            layout.total_bytes(),
            t.elapsed()
        );
        let map: GuestMemoryMap = vm.memory().clone();
        if MemoryLayout::of(&map) != layout {
            return Err(Error::RegionMismatch(
                "the destination VM's memory does not match the announced layout".into(),
            ));
        }
        if self.mode != MigrationMode::Precopy {
            // memfd guest memory: post-copy fetches into a second mapping and maps the pages
            // with UFFDIO_CONTINUE (zero-copy); private memory: UFFDIO_COPY.
            self.pc_alias = postcopy::AliasMap::for_guest(&map)?.map(Arc::new);
            if self.pc_alias.is_some() && !postcopy::Uffd::minor_supported() {
                return Err(Error::PostcopyUnavailable(
                    "the guest memory is memfd-backed, and post-copy of memfd memory needs \
                     userfaultfd minor faults on shmem (UFFD_FEATURE_MINOR_SHMEM, Linux 5.13+)"
                        .into(),
                ));
            }
            tracing::info!(
                "post-copy will install pages {}",
                if self.pc_alias.is_some() {
                    "in place with UFFDIO_CONTINUE (memfd guest memory: zero-copy)"
                } else {
                    "with UFFDIO_COPY from staging buffers (guest memory is not memfd-backed)"
                }
            );
        }
        if self.mode == MigrationMode::Postcopy {
            // Every page comes after the switchover: drop what the VMM populated now, so that
            // neither this nor the stale-page drop of hybrid mode falls into the downtime.
            let mut all = PageSet::empty(&map);
            all.fill();
            postcopy::drop_pages(&map, &all)?;
        }
        self.zero = Some(DestZero::new(&map, vm.memory_starts_zero()));
        *vm_out = Some(vm);
        // Building the VM is the VMM's work, not the migration's.
        let cpu0 = thread_cpu_time();
        let hashes = Arc::new(PageHashes::new(&map));

        self.state = DestState::AwaitDataSetup;
        let Message::DataSetup(setup) = self.recv()? else {
            unreachable!("state checked")
        };
        let limiter =
            (hello.max_bandwidth > 0).then(|| Arc::new(RateLimiter::new(hello.max_bandwidth)));
        self.limiter = limiter.clone();
        match transport {
            TransportKind::Rdma => {
                rdma_opts.qps = hello.qps.max(1);
                if rdma_opts.local_addr.is_none() {
                    // The GID that belongs to the address the control channel uses.
                    rdma_opts.local_addr = self.ctl.local().ok().map(|a| a.ip());
                }
                // Post-copy faults and prefetches READ on QPs of their own, into staging
                // buffers of their own (or the second mapping of memfd guest memory); the
                // pre-copy rounds (none in post-copy mode) on the rest.
                let page = map.page_size().bytes() as usize;
                let mut staging = Vec::new();
                if self.mode != MigrationMode::Precopy {
                    let fetchers = usize::from(postcopy::stream_count(hello.streams));
                    for i in 0..fetchers {
                        staging.push(match &self.pc_alias {
                            Some(a) => rdma::Staging::alias(a.clone()),
                            None if i == 0 => rdma::Staging::new(
                                postcopy::fault::staging_bytes(page),
                                map.page_size(),
                            )?,
                            None => rdma::Staging::new(
                                postcopy::prefetch::staging_bytes(page),
                                map.page_size(),
                            )?,
                        });
                    }
                }
                let (path, fetchers, ack) = RdmaDestPath::with_postcopy(
                    &map,
                    &rdma_opts,
                    &setup,
                    hashes.clone(),
                    self.cpu.clone(),
                    limiter,
                    staging,
                )?;
                if path.is_none() != (self.mode == MigrationMode::Postcopy) {
                    return Err(Error::Protocol(if path.is_none() {
                        format!(
                            "the source offers no queue pair for the pre-copy rounds of {} mode",
                            self.mode.name()
                        )
                    } else {
                        "the source offers queue pairs for pre-copy rounds in post-copy mode".into()
                    }));
                }
                self.data = path.map(|p| Box::new(p) as Box<dyn DestDataPath>);
                self.pc_rdma = fetchers;
                self.ctl.send(&Message::DataSetupAck(ack))?;
            }
            _ => {
                if !setup.is_empty() {
                    return Err(Error::Protocol("TCP DataSetup carries a payload".into()));
                }
                self.ctl.send(&Message::DataSetupAck(Vec::new()))?;
                // The pre-copy and (post-copy, hybrid) the post-copy streams, accepted together:
                // the source opens them back to back.
                let mut sets = vec![(hello.streams, psk.stream_token(&hello.nonce, &nonce_d))];
                if self.mode != MigrationMode::Precopy {
                    sets.push((
                        postcopy::stream_count(hello.streams),
                        psk.postcopy_token(&hello.nonce, &nonce_d),
                    ));
                }
                let mut got = accept_stream_sets(self.listener, &sets, self.config.io_timeout)?;
                if self.mode != MigrationMode::Precopy {
                    self.pc_streams = got.pop().expect("the post-copy set");
                }
                let streams = got.pop().expect("the pre-copy set");
                self.data = Some(Box::new(TcpDestPath::new(
                    map.clone(),
                    streams,
                    hashes.clone(),
                    self.cpu.clone(),
                    self.config.io_timeout,
                )?));
            }
        }
        self.ctl.send(&Message::Ready)?;

        // Pre-copy rounds until the final one.
        let (mut pages, mut bytes, mut rounds) = (0u64, 0u64, 0u32);
        self.state = DestState::Precopy { round: 0, chunk: 0 };
        let mut round_start = Instant::now();
        let mut final_flag = None;
        let mut early: Option<PageSet> = None;
        let (mut early_pages, mut early_micros) = (0u64, 0u64);
        let (mut round_zero, mut round_data) = (0u64, false);
        loop {
            let r = match self.recv()? {
                Message::Round(r) => r,
                Message::DeviceState(blob) => {
                    let vm = vm_out.as_mut().expect("built above");
                    return self.run_postcopy(
                        vm.as_mut(),
                        &map,
                        blob,
                        hashes,
                        early,
                        (rounds, pages, bytes),
                        cpu0,
                        transport,
                    );
                }
                Message::PostcopyMissing {
                    chunk,
                    flags,
                    ranges,
                } => {
                    let t = Instant::now();
                    let set = early.get_or_insert_with(|| PageSet::empty(&map));
                    let mut chunk_set = PageSet::empty(&map);
                    for r in &ranges {
                        map.span(r.region, r.first, r.npages)?;
                        chunk_set.insert_range(r);
                    }
                    postcopy::drop_pages(&map, &chunk_set)?;
                    set.union_with(&chunk_set);
                    early_pages += chunk_set.count();
                    early_micros += t.elapsed().as_micros() as u64;
                    if flags & POSTCOPY_LAST_CHUNK != 0 {
                        let (micros, pages) = (
                            std::mem::take(&mut early_micros),
                            std::mem::take(&mut early_pages),
                        );
                        self.ctl.send(&Message::PostcopyDropped { micros, pages })?;
                        // Another early batch, or the device state.
                        self.state = DestState::EarlyDrop { chunk: 0 };
                    } else {
                        self.state = DestState::EarlyDrop { chunk: chunk + 1 };
                    }
                    continue;
                }
                _ => unreachable!("state checked"),
            };
            let is_final = r.flags & ROUND_FINAL != 0;
            if *final_flag.get_or_insert(is_final) != is_final {
                return Err(Error::Protocol(format!(
                    "round {}: chunks disagree on the final flag",
                    r.round
                )));
            }
            if r.chunk == 0 {
                round_start = Instant::now();
            }
            for range in &r.ranges {
                map.span(range.region, range.first, range.npages)?;
            }
            let zero = self.zero.as_mut().expect("set with the VM");
            if r.flags & ROUND_ZERO != 0 {
                if !self.zero_pages {
                    return Err(Error::Protocol(
                        "zero pages announced without the zero-page capability".into(),
                    ));
                }
                round_zero += zero.install(&map, &hashes, &r.ranges)?;
            } else if !r.ranges.is_empty() {
                let data = self.data.as_mut().ok_or_else(|| {
                    Error::Protocol("a pre-copy round in a session without a pre-copy path".into())
                })?;
                zero.landed(&r.ranges);
                data.receive_chunk(r.round, &r.ranges)?;
                round_data = true;
            }
            if r.flags & ROUND_LAST_CHUNK == 0 {
                self.state = DestState::Precopy {
                    round: r.round,
                    chunk: r.chunk + 1,
                };
                continue;
            }
            // A round without data pages needs nothing of the data path on either end.
            let landed = match self.data.as_mut() {
                Some(data) if std::mem::take(&mut round_data) => data.finish_round(r.round)?,
                _ => Landed::default(),
            };
            pages += landed.pages;
            bytes += landed.bytes;
            // Post-copy mode's only round is the source's zero-page scan, not a pre-copy round.
            if self.mode != MigrationMode::Postcopy {
                rounds += 1;
            }
            self.ctl.send(&Message::RoundDone(RoundDone {
                round: r.round,
                pages: landed.pages + std::mem::take(&mut round_zero),
                bytes: landed.bytes,
                micros: round_start.elapsed().as_micros() as u64,
            }))?;
            final_flag = None;
            if is_final {
                break;
            }
            self.state = DestState::Precopy {
                round: r.round + 1,
                chunk: 0,
            };
        }

        // Switchover.
        self.state = DestState::AwaitDeviceState;
        let Message::DeviceState(blob) = self.recv()? else {
            unreachable!("state checked")
        };
        self.state = DestState::AwaitSwitchover;
        let Message::Switchover {
            digest,
            pages: total,
        } = self.recv()?
        else {
            unreachable!("state checked")
        };
        let t = Instant::now();
        let mine = hashes.check(digest, total)?;
        tracing::debug!("digest computed in {:?}", t.elapsed());
        let vm = vm_out.as_mut().expect("built above");
        vm.restore_state(&blob)
            .map_err(|e| Error::vmm("restore device state", e))?;
        vm.resume().map_err(|e| Error::vmm("resume", e))?;
        let resume = t.elapsed();
        tracing::debug!("restored and resumed in {resume:?}");
        self.cpu.add(thread_cpu_time().saturating_sub(cpu0));
        let cpu = self.cpu.total();
        self.ctl.send(&Message::Complete(Complete {
            digest: mine,
            cpu_micros: cpu.as_micros() as u64,
            resume_micros: resume.as_micros() as u64,
            pages,
            bytes,
        }))?;
        self.await_finish();
        Ok(self.report(transport, &map, (rounds, pages, bytes), mine, cpu, resume))
    }

    /// Waits for the source's `Finish`; the guest runs here whatever comes.
    fn await_finish(&mut self) {
        self.state = DestState::AwaitFinish;
        if let Err(e) = self.recv() {
            tracing::warn!("the guest runs here, but the source did not confirm: {e}");
        }
    }

    /// The report of a migration whose guest now runs here; the post-copy fields at zero.
    fn report(
        &self,
        transport: TransportKind,
        map: &GuestMemoryMap,
        (rounds, pages, bytes): (u32, u64, u64),
        digest: u128,
        cpu: Duration,
        resume: Duration,
    ) -> DestReport {
        DestReport {
            transport: transport.name().into(),
            mem_bytes: map.total_bytes(),
            rounds,
            pages,
            bytes,
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
