//! The data-path seam: how a round's pages get from source memory to destination memory.
//!
//! The driver announces each round on the control channel in chunks of ranges. On the
//! source, [`SourceDataPath::send_chunk`] pushes the chunk (TCP) or does nothing (RDMA: the
//! destination pulls). On the destination, [`DestDataPath::receive_chunk`] pulls the chunk
//! (RDMA reads) or notes what to expect (TCP), and [`DestDataPath::finish_round`] returns once
//! every page of the round has landed in guest memory and been hashed into the digest table.
//!
//! A transport plugs in with [`SourceTransport`] and [`DestTransport`] (implemented by
//! `crate::tcp` and `crate::rdma`; [`source_transport`] and [`dest_transport`] build the one a
//! handshake chose): each sizes
//! its own resources from [`SourceParams`] / [`DestParams`], exchanges the `DataSetup` /
//! `DataSetupAck` payloads, and returns what each phase needs — the pre-copy data path, and
//! for post-copy the destination's page fetchers. The session knows nothing else of it.

mod select;

use std::sync::Arc;
use std::time::Duration;

use crate::channel::{ChannelListener, MigrationChannel};
use crate::cpu::CpuMeter;
use crate::digest::PageHashes;
use crate::error::Result;
use crate::mem::GuestMemoryMap;
use crate::pace::RateLimiter;
use crate::pages::PageRange;
use crate::postcopy::{AliasMap, Fetchers};
use crate::rdma::RdmaOptions;
use crate::wire::MAC_LEN;

pub use select::{dest_transport, local_rdma, source_transport};

/// What the session needs of a migration's transport on the source.
#[derive(Clone)]
pub struct SourceParams {
    /// Guest memory.
    pub map: GuestMemoryMap,
    /// TCP data streams asked for.
    pub streams: u16,
    /// RDMA device choice and queue pairs for pre-copy.
    pub rdma: RdmaOptions,
    /// Pre-copy rounds move pages (not post-copy mode).
    pub precopy: bool,
    /// The session may switch over in post-copy (post-copy and hybrid modes).
    pub postcopy: bool,
    /// The bandwidth cap's pacer (rate 0: none).
    pub limiter: Arc<RateLimiter>,
    /// Where the data threads' CPU time goes.
    pub cpu: Arc<CpuMeter>,
    /// Bounds each stream's writes and connects.
    pub io_timeout: Duration,
    /// The tokens each stream proves the handshake with: pre-copy, post-copy.
    pub tokens: ([u8; MAC_LEN], [u8; MAC_LEN]),
    /// The control connection's local IP (picks the RDMA GID when no device is named).
    pub local_ip: Option<std::net::IpAddr>,
}

/// The source's links once the data path is connected.
pub struct SourceLinks {
    /// The pre-copy data path (also there in post-copy mode: it may carry no round).
    pub precopy: Box<dyn SourceDataPath>,
}

/// A transport's source end, between its `DataSetup` and its connected links.
pub trait SourceTransport: Send {
    /// The transport's name for reports.
    fn name(&self) -> &'static str;

    /// The `DataSetup` payload (what the destination needs to reach this end's memory).
    fn setup(&mut self) -> Result<Vec<u8>>;

    /// Connects with the destination's `DataSetupAck` payload, opening what streams it needs
    /// through `channel`.
    fn connect(
        self: Box<Self>,
        ack: &[u8],
        channel: &mut dyn MigrationChannel,
    ) -> Result<SourceLinks>;
}

/// What the session needs of a migration's transport on the destination.
#[derive(Clone)]
pub struct DestParams {
    /// Guest memory.
    pub map: GuestMemoryMap,
    /// The source's TCP data streams.
    pub streams: u16,
    /// RDMA device choice and the source's pre-copy queue pairs.
    pub rdma: RdmaOptions,
    /// Pre-copy rounds move pages (not post-copy mode).
    pub precopy: bool,
    /// The session may switch over in post-copy.
    pub postcopy: bool,
    /// memfd guest memory: the second mapping post-copy fetches into (zero-copy).
    pub alias: Option<Arc<AliasMap>>,
    /// The digest table landed pages are hashed into.
    pub hashes: Arc<PageHashes>,
    /// The bandwidth cap's pacer (rate 0: none).
    pub limiter: Arc<RateLimiter>,
    /// Where the data threads' CPU time goes.
    pub cpu: Arc<CpuMeter>,
    /// Bounds accepting the streams and each read.
    pub io_timeout: Duration,
    /// The tokens each stream proves the handshake with: pre-copy, post-copy.
    pub tokens: ([u8; MAC_LEN], [u8; MAC_LEN]),
    /// The control connection's local IP (picks the RDMA GID when no device is named).
    pub local_ip: Option<std::net::IpAddr>,
    /// Called with each stream accepted for this session (the session watches it for a
    /// cancel).
    pub watch: StreamWatch,
}

/// Sees each stream a transport accepts for the session.
pub type StreamWatch = Arc<dyn Fn(&crate::channel::Stream) + Send + Sync>;

/// The destination's links once the data path is connected.
pub struct DestLinks {
    /// The pre-copy data path (`None` when the transport needs none: RDMA in post-copy mode).
    pub precopy: Option<Box<dyn DestDataPath>>,
    /// Post-copy sessions: the fault fetcher and the prefetchers.
    pub postcopy: Option<Fetchers>,
}

/// A transport's destination end, between the source's `DataSetup` and the connected links.
pub trait DestTransport: Send {
    /// The transport's name for reports.
    fn name(&self) -> &'static str;

    /// Called once the VM is built, before the source's `DataSetup` arrives: work that needs
    /// nothing from the source may start now, in the background (RDMA registers guest memory
    /// while the source registers its own). Default: nothing.
    fn prepare(&mut self) {}

    /// Answers the source's `DataSetup` payload with the `DataSetupAck` payload.
    fn setup(&mut self, setup: &[u8]) -> Result<Vec<u8>>;

    /// Once the ack is sent: accepts what streams it needs on `listener`.
    fn connect(self: Box<Self>, listener: &dyn ChannelListener) -> Result<DestLinks>;
}

/// What landed in one round on the destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Landed {
    /// Pages.
    pub pages: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Source end of a data path.
pub trait SourceDataPath: Send {
    /// The transport's name for reports.
    fn name(&self) -> &'static str;

    /// Pages of `ranges` (already announced on the control channel) go to the destination.
    fn send_chunk(&mut self, round: u32, ranges: &[PageRange]) -> Result<()>;

    /// Every chunk of `round` has been handed over.
    fn finish_round(&mut self, round: u32) -> Result<()>;

    /// Tears the path down (deregisters memory, closes streams); called on success and failure.
    fn close(&mut self) -> Result<()>;

    /// Post-copy: pages this end served to the destination, or `None` where the destination
    /// fetches without this end seeing it (RDMA READs).
    fn pages_served(&self) -> Option<u64> {
        None
    }

    /// Post-copy is over: stops serving pages (and returns a failure of the server).
    fn stop_serving(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Destination end of a data path.
pub trait DestDataPath: Send {
    /// The transport's name for reports.
    fn name(&self) -> &'static str;

    /// A chunk of `round` was announced; its ranges are already checked against the region table.
    fn receive_chunk(&mut self, round: u32, ranges: &[PageRange]) -> Result<()>;

    /// Waits until every page of `round` has landed and been hashed into the digest table the
    /// path was built with.
    fn finish_round(&mut self, round: u32) -> Result<Landed>;

    /// Tears the path down; called on success and failure.
    fn close(&mut self) -> Result<()>;
}
