//! The destination's setup phase: the source's region table is checked against this host's
//! limits, the VMM builds the VM, and the transport the handshake chose answers `DataSetup`
//! and connects; then `Ready` for round 0.

use std::sync::Arc;
use std::time::Instant;

use super::listen::{Handshake, Rejoin};
use super::recover::Recovery;
use super::{Dest, DestState, Landed, Phase};
use crate::cpu::thread_cpu_time;
use crate::data::{self, DestParams};
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::{GuestAddress, GuestMemoryMap, PageSize};
use crate::pages::PageSet;
use crate::postcopy;
use crate::session::config::MigrationMode;
use crate::session::handle::Phase as Status;
use crate::vm::MemoryLayout;
use crate::wire::{caps, Message, MAX_REGIONS, NONCE_LEN};
use crate::zero::DestZero;

/// Largest guest the destination accepts by default (a malicious table cannot make it map more).
pub const MAX_GUEST_BYTES: u64 = 1 << 40;

fn check_layout(page_size: u32, regions: &[(GuestAddress, u64)]) -> Result<MemoryLayout> {
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
        vm: None,
    })
}

impl Dest<'_> {
    /// AuthOk, the region table, the VM, the data setup; returns the pre-copy phase.
    pub(super) fn setup(&mut self, hs: Handshake) -> Result<Phase> {
        let Handshake {
            hello,
            transport,
            detail: reason,
            rdma_opts,
            mode,
            nonce_d,
            zero_pages,
            landed,
        } = hs;
        self.mode = mode;
        self.zero_pages = zero_pages;
        self.landed = landed;
        self.control.allow_postcopy(false);
        self.ctl.set_authenticated();
        self.ctl.send(&Message::AuthOk)?;
        self.state = DestState::AwaitRegionTable;
        tracing::info!(
            "source authenticated; transport {} ({reason})",
            transport.name()
        );

        // The VM the source runs (once, if it says), then the region table.
        let mut vm_info = None;
        let (page_size, regions) = loop {
            match self.recv()? {
                Message::VmInfo(d) if vm_info.is_none() => {
                    tracing::info!(
                        "the source migrates a {} VM (device state version {})",
                        if d.kind.is_empty() {
                            "(unnamed)"
                        } else {
                            &d.kind
                        },
                        d.state_version
                    );
                    vm_info = Some(d);
                }
                Message::VmInfo(_) => {
                    return Err(Error::Protocol("a second VmInfo".into()));
                }
                Message::RegionTable { page_size, regions } => break (page_size, regions),
                _ => unreachable!("state checked"),
            }
        };
        let mut layout = check_layout(page_size, &regions)?;
        layout.vm = vm_info;
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
        self.control.update(|p| {
            p.phase = Status::Setup;
            p.total_bytes = total;
            p.remaining_bytes = total;
        });
        let t = Instant::now();
        let factory = self.factory.take().expect("setup runs once");
        let vm = factory(&layout).map_err(|e| Error::vmm("create destination VM", e))?;
        tracing::debug!(
            "destination VM of {} bytes built in {:?}",
            layout.total_bytes(),
            t.elapsed()
        );
        let map: GuestMemoryMap = vm.memory().clone();
        let starts_zero = vm.memory_starts_zero();
        self.vm = Some(vm);
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
        self.zero = Some(DestZero::new(&map, starts_zero));
        // Building the VM is the VMM's work, not the migration's.
        let cpu0 = thread_cpu_time();
        let hashes = Arc::new(PageHashes::new(&map));

        let rdma = crate::rdma::RdmaOptions {
            qps: hello.qps,
            ..rdma_opts
        };
        if self.mode != MigrationMode::Precopy
            && hello.caps & caps::RECOVER != 0
            && self.config.recover_timeout.is_some()
        {
            self.recovery = Some(Recovery::new(
                Rejoin {
                    id: self.config.psk.migration_id(&hello.nonce, &nonce_d),
                    transport,
                },
                hello.streams,
                rdma.clone(),
            ));
        }
        let params = self.dest_params(
            &map,
            &hashes,
            (hello.streams, rdma),
            self.mode != MigrationMode::Postcopy,
            (&hello.nonce, &nonce_d),
        );
        let mut transport = data::dest_transport(transport, params);
        self.transport = transport.name();
        // While the source sets up its end (RDMA: registers its memory), this end may too.
        transport.prepare();
        self.state = DestState::AwaitDataSetup;
        let Message::DataSetup(setup) = self.recv()? else {
            unreachable!("state checked")
        };
        let ack = transport.setup(&setup)?;
        self.ctl.send(&Message::DataSetupAck(ack))?;
        let links = transport.connect(&Watching {
            inner: self.listener,
            control: self.control,
        })?;
        self.data = links.precopy;
        self.fetchers = links.postcopy;
        self.ctl.send(&Message::Ready)?;
        self.control.update(|p| p.phase = Status::Active);
        self.state = DestState::Precopy { round: 0, chunk: 0 };
        Ok(Phase::Precopy(Landed {
            map,
            hashes,
            cpu0,
            rounds: 0,
            pages: 0,
            bytes: 0,
            early: None,
        }))
    }
}

impl Dest<'_> {
    /// The transport's parameters for this session: its memory and digest table, the
    /// source's streams and RDMA options, whether pre-copy rounds move pages, and the nonces
    /// its streams' tokens are bound to (the first handshake's, or a reconnection's).
    pub(super) fn dest_params(
        &self,
        map: &GuestMemoryMap,
        hashes: &Arc<PageHashes>,
        (streams, rdma): (u16, crate::rdma::RdmaOptions),
        precopy: bool,
        (nonce_s, nonce_d): (&[u8; NONCE_LEN], &[u8; NONCE_LEN]),
    ) -> DestParams {
        let psk = &self.config.psk;
        DestParams {
            map: map.clone(),
            streams,
            rdma,
            precopy,
            postcopy: self.mode != MigrationMode::Precopy,
            alias: self.pc_alias.clone(),
            hashes: hashes.clone(),
            limiter: self.limiter.clone(),
            cpu: self.cpu.clone(),
            io_timeout: self.config.io_timeout,
            tokens: (
                psk.stream_token(nonce_s, nonce_d),
                psk.postcopy_token(nonce_s, nonce_d),
            ),
            local_ip: self.ctl.local_ip(),
            watch: {
                let control = self.control.clone();
                Arc::new(move |s: &crate::channel::Stream| control.watch_fd(s))
            },
        }
    }
}

/// Accepts on the session's listener until the migration is cancelled.
pub(super) struct Watching<'c> {
    pub inner: &'c dyn crate::channel::ChannelListener,
    pub control: &'c crate::session::MigrationControl,
}

impl crate::channel::ChannelListener for Watching<'_> {
    fn poll_accept(&self) -> std::io::Result<(crate::channel::Stream, String)> {
        if self.control.is_cancelled() {
            return Err(std::io::Error::other("the migration was cancelled"));
        }
        // Streams are watched once their greeting proved them (`DestParams::watch`): a
        // refused connection must not be kept open.
        self.inner.poll_accept_stream()
    }

    fn poll_accept_stream(&self) -> std::io::Result<(crate::channel::Stream, String)> {
        self.poll_accept()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
