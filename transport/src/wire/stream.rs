//! Headers on TCP data streams.
//!
//! A data stream opens with a [`StreamHello`] carrying a token derived from the
//! authenticated handshake (so only the authenticated source can attach streams), then
//! carries [`DataHeader`]s: `DATA_PAGES` followed by exactly the bytes of its page range,
//! or `DATA_END_OF_ROUND` with the count of pages this stream carried for the round.

use bytemuck::{Pod, Zeroable};

use super::le::{Le16, Le32, Le64};
use super::message::MAC_LEN;

/// Pages follow the header.
pub const DATA_PAGES: u32 = 1;
/// This stream has sent all its pages of the round (`npages` = how many in all).
pub const DATA_END_OF_ROUND: u32 = 2;

/// First message on a data stream.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct StreamHello {
    /// `RDMS`.
    pub magic: [u8; 4],
    /// Stream index (0-based).
    pub index: Le16,
    /// Number of streams the source opens.
    pub count: Le16,
    /// Token derived from the handshake.
    pub token: [u8; MAC_LEN],
}

/// Magic of a [`StreamHello`].
pub const STREAM_MAGIC: [u8; 4] = *b"RDMS";

/// Header before each run of pages on a data stream.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct DataHeader {
    /// `DATA_*`.
    pub kind: Le32,
    /// Round number.
    pub round: Le32,
    /// Region index.
    pub region: Le32,
    /// Pages that follow (or, for end-of-round, pages carried in the round).
    pub npages: Le32,
    /// First page relative to the region.
    pub first: Le64,
}

const _: () = {
    assert!(size_of::<StreamHello>() == 40);
    assert!(size_of::<DataHeader>() == 24);
};

impl DataHeader {
    /// A header for pages.
    pub fn pages(round: u32, region: u32, first: u64, npages: u32) -> DataHeader {
        DataHeader {
            kind: DATA_PAGES.into(),
            round: round.into(),
            region: region.into(),
            npages: npages.into(),
            first: first.into(),
        }
    }

    /// An end-of-round marker.
    pub fn end_of_round(round: u32, pages: u32) -> DataHeader {
        DataHeader {
            kind: DATA_END_OF_ROUND.into(),
            round: round.into(),
            region: 0.into(),
            npages: pages.into(),
            first: 0.into(),
        }
    }
}

impl StreamHello {
    /// A hello for stream `index` of `count`.
    pub fn new(index: u16, count: u16, token: [u8; MAC_LEN]) -> StreamHello {
        StreamHello {
            magic: STREAM_MAGIC,
            index: index.into(),
            count: count.into(),
            token,
        }
    }
}
