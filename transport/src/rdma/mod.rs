//! The RDMA data path (one-sided READs over RC queue pairs, via `sideway`).
//!
//! Placeholder interface: the verbs layer lands with the RDMA issue. Until then every entry
//! point reports RDMA as unavailable, so `auto` falls back to TCP and `rdma` fails clearly.

use std::net::IpAddr;
use std::sync::Arc;

use crate::cpu::CpuMeter;
use crate::data::{DestDataPath, Landed, SourceDataPath};
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;
use crate::pages::PageRange;
use crate::tcp::RateLimiter;

/// How to pick and use the RDMA device.
#[derive(Clone, Debug, Default)]
pub struct RdmaOptions {
    /// Device name (`-d`), or the one whose RoCE v2 GID matches `local_addr`.
    pub device: Option<String>,
    /// GID index (`-x`), or the RoCE v2 GID of `local_addr`.
    pub gid_index: Option<u8>,
    /// Port number (1-based); default 1.
    pub port: Option<u8>,
    /// Queue pairs.
    pub qps: u16,
    /// The address the control channel uses on this host.
    pub local_addr: Option<IpAddr>,
}

/// A usable device, as found by [`probe`].
#[derive(Clone, Debug)]
pub struct DeviceSummary {
    /// Device name.
    pub name: String,
    /// Port.
    pub port: u8,
    /// GID index.
    pub gid_index: u8,
}

/// Finds a usable device, or says why there is none.
pub fn probe(_opts: &RdmaOptions) -> std::result::Result<DeviceSummary, String> {
    Err("this build has no RDMA data path yet".into())
}

/// Source end: registers guest memory for remote reads; the destination pulls.
pub struct RdmaSourcePath {
    _private: (),
}

impl RdmaSourcePath {
    /// Registers memory and creates queue pairs; returns the `DataSetup` payload.
    pub fn new(_map: &GuestMemoryMap, _opts: &RdmaOptions) -> Result<(Self, Vec<u8>)> {
        Err(Error::RdmaUnavailable(
            "this build has no RDMA data path yet".into(),
        ))
    }

    /// Connects the queue pairs with the destination's `DataSetupAck` payload.
    pub fn connect(&mut self, _ack: &[u8]) -> Result<()> {
        Err(Error::RdmaUnavailable(
            "this build has no RDMA data path yet".into(),
        ))
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
        Ok(())
    }
}

/// Destination end: reads each announced range from the source's memory.
pub struct RdmaDestPath {
    _private: (),
}

impl RdmaDestPath {
    /// Registers memory, creates and connects queue pairs to the source's; returns the
    /// `DataSetupAck` payload.
    pub fn new(
        _map: &GuestMemoryMap,
        _opts: &RdmaOptions,
        _setup: &[u8],
        _hashes: Arc<PageHashes>,
        _cpu: Arc<CpuMeter>,
        _limiter: Option<Arc<RateLimiter>>,
    ) -> Result<(Self, Vec<u8>)> {
        Err(Error::RdmaUnavailable(
            "this build has no RDMA data path yet".into(),
        ))
    }
}

impl DestDataPath for RdmaDestPath {
    fn name(&self) -> &'static str {
        "rdma"
    }
    fn receive_chunk(&mut self, _round: u32, _ranges: &[PageRange]) -> Result<()> {
        Ok(())
    }
    fn finish_round(&mut self, _round: u32) -> Result<Landed> {
        Ok(Landed::default())
    }
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}
