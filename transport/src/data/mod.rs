//! The data-path seam: how a round's pages get from source memory to destination memory.
//!
//! The driver announces each round on the control channel in chunks of ranges. On the
//! source, [`SourceDataPath::send_chunk`] pushes the chunk (TCP) or does nothing (RDMA: the
//! destination pulls). On the destination, [`DestDataPath::receive_chunk`] pulls the chunk
//! (RDMA reads) or notes what to expect (TCP), and [`DestDataPath::finish_round`] returns once
//! every page of the round has landed in guest memory and been hashed into the digest table.

use crate::error::Result;
use crate::pages::PageRange;

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
