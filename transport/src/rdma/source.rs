//! The source end of the RDMA data path: guest memory registered REMOTE_READ, responder QPs,
//! and nothing else. The destination pulls; the source CPU does no per-page work, so
//! `send_chunk` and `finish_round` return at once. `close` (and drop) moves the QPs to the
//! error state and deregisters every region, so the keys the destination holds stop working.

use super::device::{self, Device};
use super::mr::{Access, Registration};
use super::qp::{QpSet, Role};
use super::setup::{RemoteRegion, Setup, KIND_ACK, KIND_SETUP};
use super::RdmaOptions;
use crate::data::SourceDataPath;
use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;
use crate::pages::PageRange;

/// Source end: registers guest memory for remote reads; the destination pulls.
pub struct RdmaSourcePath {
    // Drop order: the registration (keys die), then the QPs, then the device.
    reg: Option<Registration>,
    qps: Option<QpSet>,
    dev: Device,
    connected: bool,
}

impl std::fmt::Debug for RdmaSourcePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaSourcePath")
            .field("device", &self.dev)
            .field("connected", &self.connected)
            .finish()
    }
}

impl RdmaSourcePath {
    /// Registers memory and creates queue pairs; returns the `DataSetup` payload.
    pub fn new(map: &GuestMemoryMap, opts: &RdmaOptions) -> Result<(Self, Vec<u8>)> {
        let dev = device::open(opts).map_err(Error::RdmaUnavailable)?;
        let n = usize::from(opts.qps.max(1)).min(super::setup::MAX_QPS);
        let qps = QpSet::create(&dev, n, 1, Role::Responder)?;
        let reg = Registration::register(&qps.pd, map, Access::RemoteRead, dev.limits.max_mr_size)?;
        let setup = Setup {
            gid: dev.gid,
            mtu: dev.limits.active_mtu,
            rd_atomic: dev.limits.max_qp_rd_atom.clamp(1, 255),
            qps: qps.local().to_vec(),
            regions: reg
                .regions()
                .iter()
                .map(|r| RemoteRegion {
                    addr: r.addr,
                    len: r.len,
                    rkey: r.rkey(),
                })
                .collect(),
        };
        tracing::info!(
            "RDMA source on {} port {} GID index {}: {} regions registered REMOTE_READ, {} QPs",
            dev.summary.name,
            dev.summary.port,
            dev.summary.gid_index,
            reg.regions().len(),
            n
        );
        Ok((
            RdmaSourcePath {
                reg: Some(reg),
                qps: Some(qps),
                dev,
                connected: false,
            },
            setup.encode(KIND_SETUP),
        ))
    }

    /// Connects the queue pairs with the destination's `DataSetupAck` payload.
    pub fn connect(&mut self, ack: &[u8]) -> Result<()> {
        let peer = Setup::decode(KIND_ACK, ack)?;
        let qps = self
            .qps
            .as_mut()
            .ok_or_else(|| Error::Rdma("the RDMA source path is closed".into()))?;
        let rd = self.dev.limits.max_qp_rd_atom.clamp(1, 255) as u8;
        let mtu = self.dev.limits.active_mtu.min(peer.mtu);
        qps.connect(&self.dev, &peer.qps, peer.gid, mtu, rd)?;
        self.connected = true;
        Ok(())
    }

    /// The registered regions' remote keys (tests check that they die with the path).
    pub fn rkeys(&self) -> Vec<super::RKey> {
        self.reg
            .as_ref()
            .map(|r| r.regions().iter().map(|x| x.rkey()).collect())
            .unwrap_or_default()
    }

    /// True until `close`.
    pub fn is_open(&self) -> bool {
        self.reg.is_some()
    }

    /// Deregisters the memory (its remote keys stop working) but keeps the queue pairs
    /// connected, so a READ with an old key reaches the device and is refused. `close` does
    /// this and then takes the queue pairs down.
    pub fn deregister_memory(&mut self) {
        if self.reg.take().is_some() {
            tracing::info!("RDMA source: memory deregistered, remote keys invalidated");
        }
    }

    fn shut(&mut self) {
        self.deregister_memory();
        if let Some(mut q) = self.qps.take() {
            q.shut();
        }
    }
}

impl SourceDataPath for RdmaSourcePath {
    fn name(&self) -> &'static str {
        "rdma"
    }
    fn send_chunk(&mut self, _round: u32, _ranges: &[PageRange]) -> Result<()> {
        Ok(())
    }
    fn finish_round(&mut self, _round: u32) -> Result<()> {
        Ok(())
    }
    fn close(&mut self) -> Result<()> {
        self.shut();
        Ok(())
    }
}

impl Drop for RdmaSourcePath {
    fn drop(&mut self) {
        self.shut();
    }
}
