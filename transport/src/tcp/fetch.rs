//! Post-copy page fetches over TCP: a [`PageRequest`] per range on a post-copy stream of
//! its own, answered in order by the source's [`super::PageServer`].

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use crate::channel::Stream;
use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;
use crate::pages::PageRange;
use crate::postcopy::PageFetcher;
use crate::wire::{DataFrame, DataHeader, PageRequest, MAX_REQUEST_PAGES};

/// How long a fetcher polls for an answer before it blocks.
const SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// Fetches pages over one TCP post-copy stream: requests are pipelined, answers come back in
/// order and are received straight into the staging buffer.
#[derive(Debug)]
pub struct TcpPageFetcher {
    stream: Stream,
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
        stream: Stream,
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
        unsafe { self.stream.recv_exact(dst, len) }.map_err(|e| {
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
