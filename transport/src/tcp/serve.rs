//! The source's post-copy page server: one thread per post-copy stream reads
//! [`PageRequest`]s and answers each with a header and the pages, written straight from the
//! (paused, so stable) source guest memory with `writev`.

use crate::channel::Stream;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::cpu::{CpuMeter, ThreadCpu};
use crate::error::{Error, FirstError, Result};
use crate::mem::GuestMemoryMap;
use crate::pace::RateLimiter;
use crate::wire::{DataHeader, PageRequest};

/// Serves page requests until the destination ends every stream.
pub struct PageServer {
    streams: Vec<Stream>,
    handles: Vec<JoinHandle<()>>,
    failure: Arc<FirstError>,
    pages: Arc<AtomicU64>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("streams", &self.streams.len())
            .field("pages", &self.pages_served())
            .finish()
    }
}

impl PageServer {
    /// Starts one server thread per stream (stream 0 is the fault stream). The bandwidth cap,
    /// if any, paces the prefetch streams only: faults are never held back.
    pub fn start(
        map: GuestMemoryMap,
        streams: Vec<Stream>,
        limiter: Option<Arc<RateLimiter>>,
        cpu: Arc<CpuMeter>,
    ) -> Result<PageServer> {
        let failure = Arc::new(FirstError::default());
        let pages = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        let mut kept = Vec::new();
        for (i, s) in streams.into_iter().enumerate() {
            s.set_nodelay(true).map_err(|e| {
                Error::io("TCP_NODELAY on a post-copy stream", e, "post-copy stream")
            })?;
            kept.push(
                s.try_clone()
                    .map_err(|e| Error::io("cloning a post-copy stream", e, "post-copy stream"))?,
            );
            let (map, failure, pages, cpu) =
                (map.clone(), failure.clone(), pages.clone(), cpu.clone());
            let limiter = if i > 0 { limiter.clone() } else { None };
            let h = crate::threads::spawn(&format!("rdmig-pcserve-{i}"), move || {
                let _cpu = ThreadCpu::start(&cpu);
                if i > 0 {
                    // Prefetch streams: leave the CPU to the fault stream first.
                    crate::postcopy::lower_priority();
                }
                let mut s = s;
                if let Err(e) = serve(i, &mut s, &map, &pages, limiter.as_deref()) {
                    // Close the stream so the destination sees the failure at once.
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    failure.record(e);
                }
            })
            .map_err(|e| Error::io("spawning a page server thread", e, "post-copy stream"))?;
            handles.push(h);
        }
        Ok(PageServer {
            streams: kept,
            handles,
            failure,
            pages,
        })
    }

    /// Pages sent so far.
    pub fn pages_served(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// Stops serving: closes the streams and joins the threads; returns the first failure.
    pub fn stop(&mut self) -> Result<()> {
        for s in &self.streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for h in self.handles.drain(..) {
            if h.join().is_err() {
                tracing::warn!("a post-copy page server thread panicked");
            }
        }
        self.failure.take()
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::debug!("post-copy page server: {e}");
        }
    }
}

fn serve(
    i: usize,
    s: &mut Stream,
    map: &GuestMemoryMap,
    served: &AtomicU64,
    limiter: Option<&RateLimiter>,
) -> Result<()> {
    loop {
        let mut b = [0u8; size_of::<PageRequest>()];
        match s.read_exact(&mut b) {
            Ok(()) => {}
            // The destination closing the stream ends the service, as REQ_END does.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => {
                return Err(Error::io(
                    format!("reading a page request on post-copy stream {i}"),
                    e,
                    "post-copy stream",
                ))
            }
        }
        let range = match PageRequest::decode(&b) {
            Ok(Some(range)) => range,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(Error::Protocol(format!("post-copy stream {i}: {e}")));
            }
        };
        let (ptr, len) = map.span(range.region, range.first, range.npages)?;
        if let Some(l) = limiter {
            l.acquire(len as u64)?;
        }
        let h = DataHeader::postcopy(&range);
        let mut iov = [
            libc::iovec {
                iov_base: (&h as *const DataHeader).cast_mut().cast(),
                iov_len: size_of::<DataHeader>(),
            },
            libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
        ];
        // ptr..ptr+len was checked against the region table by `span`.
        // SAFETY: the header lives on our stack for the call; guest memory stays mapped.
        unsafe { s.writev_all(&mut iov) }.map_err(|e| {
            Error::io(
                format!("answering a page request on post-copy stream {i}"),
                e,
                "post-copy stream",
            )
        })?;
        served.fetch_add(range.npages, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::mem::{GuestAddress, MmapBacking, MmapRegion, PageIndex, PageSize, RegionId};
    use crate::pages::PageRange;
    use crate::postcopy::PageFetcher;
    use crate::tcp::TcpPageFetcher;
    use crate::wire::REQ_PAGES;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (c, l.accept().unwrap().0)
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_and_out_of_range_ones_are_refused_before_sending() {
        let mem = MmapRegion::new(16 * 4096, MmapBacking::Anonymous, true).unwrap();
        for p in 0..16 {
            // SAFETY: page p of our own mapping.
            unsafe { mem.as_ptr().add(p * 4096).write_bytes(p as u8 + 1, 4096) };
        }
        // SAFETY: `mem` outlives the map and the server (dropped at the end of the test).
        let region = unsafe { mem.guest_region(GuestAddress(0)) };
        let map = GuestMemoryMap::new(vec![region], PageSize::KIB4).unwrap();
        let (client, served) = pair();
        let mut server = PageServer::start(
            map.clone(),
            vec![served.into()],
            None,
            Arc::new(CpuMeter::default()),
        )
        .unwrap();
        let mut f = TcpPageFetcher::new(client.into(), map.clone(), "test").unwrap();
        let ranges = [
            PageRange {
                region: RegionId(0),
                first: PageIndex(3),
                npages: 2,
            },
            PageRange {
                region: RegionId(0),
                first: PageIndex(15),
                npages: 1,
            },
        ];
        let mut buf = vec![0u8; 3 * 4096];
        f.fetch(&ranges, 4096, &mut buf).unwrap();
        assert!(
            buf[..4096].iter().all(|&b| b == 4)
                && buf[4096..8192].iter().all(|&b| b == 5)
                && buf[8192..].iter().all(|&b| b == 16)
        );
        // Out of range: refused by the fetcher before sending.
        let mut one = vec![0u8; 4096];
        // SAFETY: `one` is a page of ours.
        assert!(unsafe {
            f.start(
                PageRange {
                    region: RegionId(0),
                    first: PageIndex(16),
                    npages: 1,
                },
                one.as_mut_ptr(),
            )
        }
        .is_err());
        assert_eq!(f.in_flight(), 0);
        f.close();
        server.stop().unwrap();
        assert_eq!(server.pages_served(), 3);
    }

    #[test]
    fn the_server_refuses_out_of_range_requests() {
        let mem = MmapRegion::new(4 * 4096, MmapBacking::Anonymous, true).unwrap();
        // SAFETY: `mem` outlives the map and the server.
        let region = unsafe { mem.guest_region(GuestAddress(0)) };
        let map = GuestMemoryMap::new(vec![region], PageSize::KIB4).unwrap();
        let (mut client, served) = pair();
        let mut server = PageServer::start(
            map,
            vec![served.into()],
            None,
            Arc::new(CpuMeter::default()),
        )
        .unwrap();
        let req = PageRequest {
            kind: REQ_PAGES.into(),
            region: 0.into(),
            npages: 2.into(),
            reserved: 0.into(),
            first: 3.into(),
        };
        std::io::Write::write_all(&mut client, bytemuck::bytes_of(&req)).unwrap();
        let mut b = [0u8; 1];
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        // The server closes the stream instead of answering.
        assert_eq!(std::io::Read::read(&mut client, &mut b).unwrap(), 0);
        assert!(matches!(server.stop(), Err(Error::RangeOutOfBounds { .. })));
    }
}
