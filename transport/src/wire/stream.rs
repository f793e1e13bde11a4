//! Headers on TCP data streams.
//!
//! A data stream opens with a [`StreamHello`] carrying a token derived from the
//! authenticated handshake (so only the authenticated source can attach streams), then
//! carries [`DataHeader`]s: `DATA_PAGES` followed by exactly the bytes of its page range,
//! or `DATA_END_OF_ROUND` with the count of pages this stream carried for the round.
//!
//! Post-copy streams (a fault stream and prefetch streams, opened beside the pre-copy ones
//! with their own token) carry [`PageRequest`]s from the destination, each answered by a
//! `DATA_POSTCOPY` header and the pages.

use bytemuck::{Pod, Zeroable};

use super::layout::MAC_LEN;
use super::le::{Le16, Le32, Le64};
use crate::error::{Error, Result};
use crate::mem::{PageIndex, RegionId};
use crate::pages::PageRange;

/// Pages follow the header.
pub const DATA_PAGES: u32 = 1;
/// This stream has sent all its pages of the round (`npages` = how many in all).
pub const DATA_END_OF_ROUND: u32 = 2;

/// Post-copy pages follow the header (an answer to a [`PageRequest`]).
pub const DATA_POSTCOPY: u32 = 3;

/// [`PageRequest`] kind: send these pages.
pub const REQ_PAGES: u32 = 1;
/// [`PageRequest`] kind: no more requests on this stream.
pub const REQ_END: u32 = 2;
/// Most pages one [`PageRequest`] may ask for.
pub const MAX_REQUEST_PAGES: u32 = 1024;

/// Destination → source on a post-copy stream: a request for a run of pages, answered by a
/// [`DataHeader`] of kind [`DATA_POSTCOPY`] and the pages.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct PageRequest {
    /// `REQ_*`.
    pub kind: Le32,
    /// Region index.
    pub region: Le32,
    /// Pages requested (1..=[`MAX_REQUEST_PAGES`]).
    pub npages: Le32,
    /// Zero.
    pub reserved: Le32,
    /// First page relative to the region.
    pub first: Le64,
}

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
    assert!(size_of::<PageRequest>() == 24);
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

/// A [`DataHeader`] decoded and checked (kind known, page counts non-zero). Whether the range
/// lies inside a region is checked against the memory map by whoever lands the pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFrame {
    /// `DATA_PAGES`: the range's bytes follow.
    Pages {
        /// Round the pages belong to.
        round: u32,
        /// The pages.
        range: PageRange,
    },
    /// `DATA_END_OF_ROUND`: the stream carried `pages` pages in `round`.
    EndOfRound {
        /// The round that ended.
        round: u32,
        /// Pages the stream says it carried in it.
        pages: u32,
    },
    /// `DATA_POSTCOPY`: the pages of a [`PageRequest`] follow.
    Postcopy {
        /// The pages.
        range: PageRange,
    },
}

impl DataHeader {
    /// Decodes and checks a header read from a data or post-copy stream (untrusted bytes).
    pub fn decode(b: &[u8; size_of::<DataHeader>()]) -> Result<DataFrame> {
        let h: DataHeader = bytemuck::pod_read_unaligned(b);
        let range = || {
            let npages = h.npages.get();
            if npages == 0 {
                return Err(Error::Protocol("a data header announcing 0 pages".into()));
            }
            Ok(PageRange {
                region: RegionId(h.region.get()),
                first: PageIndex(h.first.get()),
                npages: u64::from(npages),
            })
        };
        match h.kind.get() {
            DATA_PAGES => Ok(DataFrame::Pages {
                round: h.round.get(),
                range: range()?,
            }),
            DATA_END_OF_ROUND => {
                if h.region.get() != 0 || h.first.get() != 0 {
                    return Err(Error::Protocol(
                        "an end-of-round header with a region or first page".into(),
                    ));
                }
                Ok(DataFrame::EndOfRound {
                    round: h.round.get(),
                    pages: h.npages.get(),
                })
            }
            DATA_POSTCOPY if h.round.get() != 0 => Err(Error::Protocol(
                "a post-copy data header with a round number".into(),
            )),
            DATA_POSTCOPY => Ok(DataFrame::Postcopy { range: range()? }),
            k => Err(Error::Protocol(format!("unknown data header kind {k}"))),
        }
    }

    /// The answer to a post-copy request for `range` (at most [`MAX_REQUEST_PAGES`] pages).
    pub fn postcopy(range: &PageRange) -> DataHeader {
        DataHeader {
            kind: DATA_POSTCOPY.into(),
            round: 0.into(),
            region: range.region.0.into(),
            npages: (range.npages as u32).into(),
            first: range.first.0.into(),
        }
    }
}

impl PageRequest {
    /// A request for `range` (1..=[`MAX_REQUEST_PAGES`] pages).
    pub fn pages(range: &PageRange) -> PageRequest {
        PageRequest {
            kind: REQ_PAGES.into(),
            region: range.region.0.into(),
            npages: (range.npages as u32).into(),
            reserved: 0.into(),
            first: range.first.0.into(),
        }
    }

    /// The end of requests on a stream.
    pub fn end() -> PageRequest {
        PageRequest {
            kind: REQ_END.into(),
            region: 0.into(),
            npages: 0.into(),
            reserved: 0.into(),
            first: 0.into(),
        }
    }

    /// Decodes and checks a request (untrusted bytes): `Some(range)` for pages (1..=
    /// [`MAX_REQUEST_PAGES`] of them), `None` for the end of requests. The range is checked
    /// against the memory map by the server.
    pub fn decode(b: &[u8; size_of::<PageRequest>()]) -> Result<Option<PageRange>> {
        let r: PageRequest = bytemuck::pod_read_unaligned(b);
        if r.reserved.get() != 0 {
            return Err(Error::Protocol(format!(
                "a page request with reserved field {:#x}",
                r.reserved.get()
            )));
        }
        match r.kind.get() {
            REQ_END => Ok(None),
            REQ_PAGES => {
                let npages = r.npages.get();
                if npages == 0 || npages > MAX_REQUEST_PAGES {
                    return Err(Error::Protocol(format!(
                        "a request for {npages} pages (1..={MAX_REQUEST_PAGES})"
                    )));
                }
                Ok(Some(PageRange {
                    region: RegionId(r.region.get()),
                    first: PageIndex(r.first.get()),
                    npages: u64::from(npages),
                }))
            }
            k => Err(Error::Protocol(format!("unknown page request kind {k}"))),
        }
    }
}

impl StreamHello {
    /// Checks a greeting (untrusted bytes) against the `count` streams expected and their
    /// token (compared in constant time); returns the stream's index.
    pub fn check(
        b: &[u8; size_of::<StreamHello>()],
        count: u16,
        token: &[u8; MAC_LEN],
    ) -> Result<u16> {
        let h: StreamHello = bytemuck::pod_read_unaligned(b);
        if h.magic != STREAM_MAGIC {
            return Err(Error::Protocol(
                "not a data stream greeting (bad magic)".into(),
            ));
        }
        let diff = h.token.iter().zip(token).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(Error::Protocol("a data stream with a wrong token".into()));
        }
        let (i, n) = (h.index.get(), h.count.get());
        if n != count || i >= count {
            return Err(Error::Protocol(format!(
                "data stream {i} of {n}, expected one of {count}"
            )));
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw<T: Pod, const N: usize>(t: &T) -> [u8; N] {
        bytemuck::bytes_of(t).try_into().expect("size")
    }

    fn range(region: u32, first: u64, npages: u64) -> PageRange {
        PageRange {
            region: RegionId(region),
            first: PageIndex(first),
            npages,
        }
    }

    #[test]
    fn headers_decode_back_and_bad_ones_are_refused() {
        let h = DataHeader::pages(3, 1, 7, 5);
        assert_eq!(
            DataHeader::decode(&raw(&h)).unwrap(),
            DataFrame::Pages {
                round: 3,
                range: range(1, 7, 5)
            }
        );
        let h = DataHeader::end_of_round(4, 9);
        assert_eq!(
            DataHeader::decode(&raw(&h)).unwrap(),
            DataFrame::EndOfRound { round: 4, pages: 9 }
        );
        let h = DataHeader::postcopy(&range(2, 8, 3));
        assert_eq!(
            DataHeader::decode(&raw(&h)).unwrap(),
            DataFrame::Postcopy {
                range: range(2, 8, 3)
            }
        );
        assert!(DataHeader::decode(&raw(&DataHeader::pages(0, 0, 0, 0))).is_err());
        assert!(DataHeader::decode(&[0u8; 24]).is_err());
        let mut eor = DataHeader::end_of_round(1, 1);
        eor.first = 5.into();
        assert!(DataHeader::decode(&raw(&eor)).is_err());
    }

    #[test]
    fn requests_decode_back_and_bad_ones_are_refused() {
        let r = PageRequest::pages(&range(1, 2, 3));
        assert_eq!(PageRequest::decode(&raw(&r)).unwrap(), Some(range(1, 2, 3)));
        assert_eq!(
            PageRequest::decode(&raw(&PageRequest::end())).unwrap(),
            None
        );
        let mut big = PageRequest::pages(&range(0, 0, 1));
        big.npages = (MAX_REQUEST_PAGES + 1).into();
        assert!(PageRequest::decode(&raw(&big)).is_err());
        let mut res = PageRequest::pages(&range(0, 0, 1));
        res.reserved = 1.into();
        assert!(PageRequest::decode(&raw(&res)).is_err());
        assert!(PageRequest::decode(&[0u8; 24]).is_err());
    }

    #[test]
    fn greetings_are_checked() {
        let token = [7u8; MAC_LEN];
        let h = StreamHello::new(2, 4, token);
        assert_eq!(StreamHello::check(&raw(&h), 4, &token).unwrap(), 2);
        assert!(StreamHello::check(&raw(&h), 3, &token).is_err());
        assert!(StreamHello::check(&raw(&h), 4, &[6u8; MAC_LEN]).is_err());
        let bad = StreamHello::new(4, 4, token);
        assert!(StreamHello::check(&raw(&bad), 4, &token).is_err());
        assert!(StreamHello::check(&[0u8; 40], 4, &token).is_err());
    }
}
