//! The fault-fetch seam and its TCP implementation.
//!
//! [`PageFetcher`] has a request/complete shape so that a transport can keep several fetches
//! in flight: [`PageFetcher::start`] issues the fetch of a page range into a staging buffer
//! (TCP: a [`PageRequest`] on the stream; RDMA: one READ into a registered staging page),
//! [`PageFetcher::complete`] waits for the oldest started fetch. The caller then installs the
//! buffer with `UFFDIO_COPY`; with memfd guest memory `dst` is the page's place in the second
//! mapping ([`super::AliasMap`]) and the caller maps it with `UFFDIO_CONTINUE` (zero-copy).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;
use crate::pages::PageRange;
use crate::tcp::recv_exact;
use crate::wire::{DataFrame, DataHeader, PageRequest, MAX_REQUEST_PAGES};

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

/// How long a fetcher polls for an answer before it blocks.
const SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// Fetches pages over one TCP post-copy stream: requests are pipelined, answers come back in
/// order and are received straight into the staging buffer.
#[derive(Debug)]
pub struct TcpPageFetcher {
    stream: TcpStream,
    map: GuestMemoryMap,
    pending: VecDeque<(PageRange, *mut u8)>,
    label: String,
}

// SAFETY: the raw pointers in `pending` are staging buffers whose exclusive use the caller of
// `start` handed over until `complete`; the fetcher is used by one thread at a time.
unsafe impl Send for TcpPageFetcher {}

impl TcpPageFetcher {
    /// A fetcher on `stream` for memory laid out as `map` (used to size and check ranges).
    pub fn new(
        stream: TcpStream,
        map: GuestMemoryMap,
        label: impl Into<String>,
    ) -> Result<TcpPageFetcher> {
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io("TCP_NODELAY on a post-copy stream", e, "post-copy stream"))?;
        Ok(TcpPageFetcher {
            stream,
            map,
            pending: VecDeque::new(),
            label: label.into(),
        })
    }

    /// Polls the socket without sleeping for a short while: an answer on loopback or a fast
    /// link arrives within tens of microseconds, sooner than a sleep and a wake-up.
    fn spin_until_readable(&self) {
        let t = std::time::Instant::now();
        let mut byte = 0u8;
        while t.elapsed() < SPIN {
            // SAFETY: peeking at most one byte into a local without blocking.
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    (&mut byte as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n != -1 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Tells the source no more requests follow on this stream (best effort).
    pub fn end(&mut self) {
        let _ = self
            .stream
            .write_all(bytemuck::bytes_of(&PageRequest::end()));
    }
}

impl PageFetcher for TcpPageFetcher {
    fn name(&self) -> &'static str {
        "tcp"
    }

    unsafe fn start(&mut self, range: PageRange, dst: *mut u8) -> Result<()> {
        let npages = u32::try_from(range.npages)
            .ok()
            .filter(|&n| n > 0 && n <= MAX_REQUEST_PAGES);
        let Some(_) = npages else {
            return Err(Error::InvalidConfig(format!(
                "a page request of {} pages (1..={MAX_REQUEST_PAGES})",
                range.npages
            )));
        };
        self.map.span(range.region, range.first, range.npages)?;
        let req = PageRequest::pages(&range);
        self.stream
            .write_all(bytemuck::bytes_of(&req))
            .map_err(|e| {
                Error::io(
                    format!("requesting pages on the {} stream", self.label),
                    e,
                    "post-copy stream",
                )
            })?;
        self.pending.push_back((range, dst));
        Ok(())
    }

    fn complete(&mut self) -> Result<PageRange> {
        let Some((range, dst)) = self.pending.pop_front() else {
            return Err(Error::InvalidConfig(
                "complete() with no fetch in flight".into(),
            ));
        };
        self.spin_until_readable();
        let mut b = [0u8; size_of::<DataHeader>()];
        self.stream.read_exact(&mut b).map_err(|e| {
            Error::io(
                format!("reading a page answer on the {} stream", self.label),
                e,
                "post-copy stream",
            )
        })?;
        let got = DataHeader::decode(&b)
            .map_err(|e| Error::Protocol(format!("the {} stream answered: {e}", self.label)))?;
        if got != (DataFrame::Postcopy { range }) {
            return Err(Error::Protocol(format!(
                "the {} stream answered {got:?} to a request for {range:?}",
                self.label
            )));
        }
        let len = (range.npages << self.map.page_size().shift()) as usize;
        // SAFETY: `start`'s contract: dst is writable for the range's bytes and ours until now.
        unsafe { recv_exact(self.stream.as_raw_fd(), dst, len) }.map_err(|e| {
            Error::io(
                format!("receiving pages on the {} stream", self.label),
                e,
                "post-copy stream",
            )
        })?;
        Ok(range)
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn close(&mut self) {
        self.end();
    }
}
