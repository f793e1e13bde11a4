//! The destination end of a migration.
//!
//! States and the messages each accepts:
//!
//! | state | accepts |
//! | --- | --- |
//! | `AwaitHello` | `Hello` |
//! | `AwaitAuthProof` | `AuthProof` |
//! | `AwaitRegionTable` | `RegionTable` |
//! | `AwaitDataSetup` | `DataSetup` |
//! | `Precopy{round, chunk}` | `Round{round, chunk}` |
//! | `AwaitDeviceState` | `DeviceState` |
//! | `AwaitSwitchover` | `Switchover` |
//! | `AwaitFinish` | `Finish` |
//!
//! `Abort` ends the migration in any state. Until the guest is resumed any failure discards
//! the destination VM; the source keeps running.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Instant;

use super::config::MigrationConfig;
use super::stats::DestReport;
use crate::auth::random_bytes;
use crate::control::Control;
use crate::cpu::{thread_cpu_time, CpuMeter};
use crate::data::DestDataPath;
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::{GuestMemoryMap, PageSize};
use crate::rdma::{self, RdmaDestPath};
use crate::tcp::{accept_streams, RateLimiter, TcpDestPath};
use crate::vm::{DestinationFactory, DestinationVm, MemoryLayout};
use crate::wire::{
    caps, Complete, HelloAck, Message, RoundDone, TransportKind, MAX_REGIONS, PROTOCOL_VERSION,
    ROUND_FINAL, ROUND_LAST_CHUNK,
};

/// Largest guest the destination accepts by default (a malicious table cannot make it map more).
pub const MAX_GUEST_BYTES: u64 = 1 << 40;

/// Where the destination is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DestState {
    AwaitHello,
    AwaitAuthProof,
    AwaitRegionTable,
    AwaitDataSetup,
    Precopy { round: u32, chunk: u32 },
    AwaitDeviceState,
    AwaitSwitchover,
    AwaitFinish,
}

impl DestState {
    fn describe(self) -> &'static str {
        match self {
            DestState::AwaitHello => "awaiting Hello",
            DestState::AwaitAuthProof => "awaiting AuthProof",
            DestState::AwaitRegionTable => "awaiting RegionTable",
            DestState::AwaitDataSetup => "awaiting DataSetup",
            DestState::Precopy { .. } => "in pre-copy",
            DestState::AwaitDeviceState => "awaiting DeviceState",
            DestState::AwaitSwitchover => "awaiting Switchover",
            DestState::AwaitFinish => "awaiting Finish",
        }
    }

    fn accepts(self, m: &Message) -> bool {
        match (self, m) {
            (DestState::AwaitHello, Message::Hello(_))
            | (DestState::AwaitAuthProof, Message::AuthProof(_))
            | (DestState::AwaitRegionTable, Message::RegionTable { .. })
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
}

/// Accepts one incoming migration on `listener` and returns the running guest.
///
/// `factory` builds the destination VM once the source has authenticated and announced its
/// memory layout. On failure nothing of the guest is kept.
pub fn accept(
    listener: &TcpListener,
    config: &MigrationConfig,
    factory: DestinationFactory<'_>,
) -> Result<(Box<dyn DestinationVm>, DestReport)> {
    config.validate()?;
    let (stream, peer) = listener.accept().map_err(|e| Error::Io {
        context: "accepting the control connection".into(),
        source: e,
    })?;
    tracing::info!("incoming migration from {peer}");
    let ctl = Control::new(stream, Some(config.io_timeout))?;
    let mut d = Dest {
        config,
        listener,
        ctl,
        state: DestState::AwaitHello,
        data: None,
        cpu: Arc::new(CpuMeter::default()),
    };
    let mut vm = None;
    let result = d.run(factory, &mut vm);
    if let Some(mut data) = d.data.take() {
        if let Err(e) = data.close() {
            tracing::warn!("closing the data path: {e}");
        }
    }
    match result {
        Ok(report) => Ok((vm.expect("a completed migration has a VM"), report)),
        Err(e) => {
            if !matches!(e, Error::PeerAborted(_)) {
                d.ctl.send_abort(&e.to_string());
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
        let m = self.ctl.recv()?;
        if !self.state.accepts(&m) {
            return Err(Error::UnexpectedMessage {
                state: self.state.describe(),
                got: describe(&m),
            });
        }
        Ok(m)
    }

    fn run(
        &mut self,
        factory: DestinationFactory<'_>,
        vm_out: &mut Option<Box<dyn DestinationVm>>,
    ) -> Result<DestReport> {
        let Message::Hello(hello) = self.recv()? else {
            unreachable!("state checked")
        };
        if hello.version != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                peer: hello.version,
                ours: PROTOCOL_VERSION,
            });
        }
        if hello.streams == 0 || hello.streams > 64 {
            return Err(Error::Protocol(format!(
                "Hello asks for {} data streams (1..=64)",
                hello.streams
            )));
        }
        let (transport, reason, mut rdma_opts) = self.choose_transport(&hello)?;
        let nonce_d = random_bytes()?;
        let psk = &self.config.psk;
        let my_caps = caps::TCP
            | if transport == TransportKind::Rdma {
                caps::RDMA
            } else {
                0
            };
        self.ctl.send(&Message::HelloAck(HelloAck {
            version: PROTOCOL_VERSION,
            transport,
            caps: my_caps,
            nonce: nonce_d,
            mac: psk.dest_proof(&hello.nonce, &nonce_d),
            reason: reason.clone(),
        }))?;
        self.state = DestState::AwaitAuthProof;
        let Message::AuthProof(mac) = self.recv()? else {
            unreachable!("state checked")
        };
        if !psk.check_source_proof(&hello.nonce, &nonce_d, &mac) {
            return Err(Error::AuthFailed(
                "the source did not prove the pre-shared key (different --psk-file?)".into(),
            ));
        }
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
        match transport {
            TransportKind::Rdma => {
                rdma_opts.qps = hello.qps.max(1);
                if rdma_opts.local_addr.is_none() {
                    // The GID that belongs to the address the control channel uses.
                    rdma_opts.local_addr = self.ctl.local().ok().map(|a| a.ip());
                }
                let (path, ack) = RdmaDestPath::new(
                    &map,
                    &rdma_opts,
                    &setup,
                    hashes.clone(),
                    self.cpu.clone(),
                    limiter,
                )?;
                self.data = Some(Box::new(path));
                self.ctl.send(&Message::DataSetupAck(ack))?;
            }
            _ => {
                if !setup.is_empty() {
                    return Err(Error::Protocol("TCP DataSetup carries a payload".into()));
                }
                self.ctl.send(&Message::DataSetupAck(Vec::new()))?;
                let token = psk.stream_token(&hello.nonce, &nonce_d);
                let streams =
                    accept_streams(self.listener, hello.streams, token, self.config.io_timeout)?;
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
        loop {
            let Message::Round(r) = self.recv()? else {
                unreachable!("state checked")
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
            let data = self.data.as_mut().expect("set up above");
            data.receive_chunk(r.round, &r.ranges)?;
            if r.flags & ROUND_LAST_CHUNK == 0 {
                self.state = DestState::Precopy {
                    round: r.round,
                    chunk: r.chunk + 1,
                };
                continue;
            }
            let landed = data.finish_round(r.round)?;
            pages += landed.pages;
            bytes += landed.bytes;
            rounds += 1;
            self.ctl.send(&Message::RoundDone(RoundDone {
                round: r.round,
                pages: landed.pages,
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
        let mine = hashes.digest();
        tracing::debug!("digest computed in {:?}", t.elapsed());
        if total != hashes.pages() || mine != digest {
            return Err(Error::DigestMismatch {
                source_digest: digest,
                dest_digest: mine,
            });
        }
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
        self.state = DestState::AwaitFinish;
        match self.recv() {
            Ok(_) => {}
            Err(e) => tracing::warn!("the guest runs here, but the source did not confirm: {e}"),
        }
        Ok(DestReport {
            transport: transport.name().into(),
            mem_bytes: map.total_bytes(),
            rounds,
            pages,
            bytes,
            digest: format!("{mine:032x}"),
            cpu_ms: cpu.as_secs_f64() * 1e3,
            resume_ms: resume.as_secs_f64() * 1e3,
        })
    }

    fn choose_transport(
        &mut self,
        hello: &crate::wire::Hello,
    ) -> Result<(TransportKind, String, crate::rdma::RdmaOptions)> {
        let opts = self.config.rdma.clone();
        let local = match self.config.transport {
            TransportKind::Tcp => Err("the destination is configured for TCP only".to_string()),
            _ => rdma::probe(&opts),
        };
        let source_rdma = hello.caps & caps::RDMA != 0;
        Ok(match hello.transport {
            TransportKind::Tcp => (TransportKind::Tcp, "the source requested TCP".into(), opts),
            TransportKind::Rdma => match local {
                Ok(dev) => (
                    TransportKind::Rdma,
                    format!("RDMA requested; destination device {}", dev.name),
                    opts,
                ),
                Err(why) => {
                    return Err(Error::RdmaUnavailable(format!(
                        "the source requested RDMA but the destination cannot: {why}"
                    )))
                }
            },
            TransportKind::Auto => match (source_rdma, local) {
                (true, Ok(dev)) => (
                    TransportKind::Rdma,
                    format!(
                        "both ends have a usable RDMA device (destination: {} port {})",
                        dev.name, dev.port
                    ),
                    opts,
                ),
                (false, _) => (
                    TransportKind::Tcp,
                    "the source has no usable RDMA device".into(),
                    opts,
                ),
                (true, Err(why)) => (
                    TransportKind::Tcp,
                    format!("the destination has no usable RDMA device: {why}"),
                    opts,
                ),
            },
        })
    }
}

fn describe(m: &Message) -> String {
    match m {
        Message::Round(r) => format!("Round {{ round: {}, chunk: {} }}", r.round, r.chunk),
        other => other.name(),
    }
}
