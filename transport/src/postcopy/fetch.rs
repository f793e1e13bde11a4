//! The fault-fetch seam, which each transport implements (`crate::tcp::TcpPageFetcher`,
//! `crate::rdma::RdmaPageFetcher`).
//!
//! [`PageFetcher`] has a request/complete shape so that a transport can keep several fetches
//! in flight: [`PageFetcher::start`] issues the fetch of a page range into a staging buffer
//! (TCP: a `PageRequest` on the stream; RDMA: one READ into a registered staging page),
//! [`PageFetcher::complete`] waits for the oldest started fetch. The caller then installs the
//! buffer with `UFFDIO_COPY`; with memfd guest memory `dst` is the page's place in the second
//! mapping ([`super::AliasMap`]) and the caller maps it with `UFFDIO_CONTINUE` (zero-copy).

use crate::error::{Error, Result};
use crate::pages::PageRange;

/// Fetches page ranges from the source on demand.
pub trait PageFetcher: Send {
    /// The transport's name.
    fn name(&self) -> &'static str;

    /// Starts fetching `range` into `dst`.
    ///
    /// # Safety
    /// `dst` must be writable for the range's bytes (pages × page size) until the matching
    /// [`PageFetcher::complete`] returns, and not be read or written by anyone else meanwhile.
    unsafe fn start(&mut self, range: PageRange, dst: *mut u8) -> Result<()>;

    /// Waits for the oldest started fetch and returns its range (its bytes are in its `dst`).
    fn complete(&mut self) -> Result<PageRange>;

    /// Fetches in flight.
    fn in_flight(&self) -> usize;

    /// Memory this fetcher fetches into without a copy (RDMA: its registered staging buffer),
    /// as a pointer and a length: callers place every `dst` inside it. `None` (the default):
    /// any memory will do.
    fn staging(&mut self) -> Option<(*mut u8, usize)> {
        None
    }

    /// No more fetches follow (TCP: tells the source's server to stop). Default: nothing.
    fn close(&mut self) {}

    /// Fetches `ranges` back to back into `buf` (their bytes concatenated), keeping them all
    /// in flight at once.
    fn fetch(&mut self, ranges: &[PageRange], page_bytes: usize, buf: &mut [u8]) -> Result<()> {
        let need: usize = ranges.iter().map(|r| r.npages as usize * page_bytes).sum();
        if buf.len() < need {
            return Err(Error::InvalidConfig(format!(
                "fetch buffer of {} bytes for {need}",
                buf.len()
            )));
        }
        let mut off = 0;
        for r in ranges {
            // SAFETY: buf[off..off+len] is ours, exclusively borrowed until the completes below.
            unsafe { self.start(*r, buf.as_mut_ptr().add(off))? };
            off += r.npages as usize * page_bytes;
        }
        for _ in ranges {
            self.complete()?;
        }
        Ok(())
    }
}
