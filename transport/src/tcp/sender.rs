//! Source end of the TCP path: one thread per stream writes page runs straight from guest
//! memory (`writev` of header + guest pages), pieces spread round-robin over the streams.

use crate::channel::Stream;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::MAX_PIECE_BYTES;
use crate::cpu::{CpuMeter, ThreadCpu};
use crate::data::SourceDataPath;
use crate::error::{Error, FirstError, Result};
use crate::mem::{GuestMemoryMap, PageIndex};
use crate::pace::RateLimiter;
use crate::pages::PageRange;
use crate::wire::DataHeader;

/// Pieces written with one `writev` at most (two iovecs each).
const BATCH: usize = 256;

enum Job {
    Pieces(u32, Vec<PageRange>),
    End(u32),
}

struct Worker {
    tx: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    stream: Stream,
}

/// The source's TCP data path.
pub struct TcpSourcePath {
    workers: Vec<Worker>,
    failure: Arc<FirstError>,
    piece_pages: u64,
    next: usize,
}

impl TcpSourcePath {
    /// Starts one sender thread per stream.
    pub fn new(
        map: GuestMemoryMap,
        streams: Vec<Stream>,
        limiter: Option<Arc<RateLimiter>>,
        cpu: Arc<CpuMeter>,
    ) -> Result<Self> {
        let failure = Arc::new(FirstError::default());
        let piece_pages = (MAX_PIECE_BYTES >> map.page_size().shift()).max(1);
        let mut workers = Vec::new();
        for (i, stream) in streams.into_iter().enumerate() {
            let (tx, rx) = channel::<Job>();
            let fd_stream = stream
                .try_clone()
                .map_err(|e| Error::io("cloning a data stream", e, "data stream"))?;
            let (map, failure, limiter, cpu) =
                (map.clone(), failure.clone(), limiter.clone(), cpu.clone());
            let handle = crate::threads::spawn(&format!("rdmig-send-{i}"), move || {
                let _cpu = ThreadCpu::start(&cpu);
                let mut sent: u64 = 0;
                for job in rx {
                    let r = match job {
                        Job::Pieces(round, pieces) => {
                            sent += pieces.iter().map(|p| p.npages).sum::<u64>();
                            send_pieces(&fd_stream, &map, round, &pieces, limiter.as_deref())
                        }
                        Job::End(round) => {
                            let h = DataHeader::end_of_round(round, sent as u32);
                            sent = 0;
                            let mut iov = [libc::iovec {
                                iov_base: (&h as *const DataHeader).cast_mut().cast(),
                                iov_len: size_of::<DataHeader>(),
                            }];
                            // SAFETY: the iovec points at `h`, alive for the call.
                            unsafe { fd_stream.writev_all(&mut iov) }.map_err(|e| {
                                Error::io(
                                    format!("end of round {round} on data stream {i}"),
                                    e,
                                    "data stream",
                                )
                            })
                        }
                    };
                    if let Err(e) = r {
                        failure.record(e);
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("spawning a sender thread", e, "data stream"))?;
            workers.push(Worker {
                tx: Some(tx),
                handle: Some(handle),
                stream,
            });
        }
        Ok(TcpSourcePath {
            workers,
            failure,
            piece_pages,
            next: 0,
        })
    }

    fn check(&self) -> Result<()> {
        self.failure.take()
    }

    fn dispatch(&mut self, i: usize, job: Job) -> Result<()> {
        let sent = self.workers[i]
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(job).is_ok());
        if sent {
            Ok(())
        } else {
            self.check()?;
            Err(Error::PeerClosed {
                channel: "data stream",
                detail: format!(": sender {i} stopped"),
            })
        }
    }
}

fn send_pieces(
    stream: &Stream,
    map: &GuestMemoryMap,
    round: u32,
    pieces: &[PageRange],
    limiter: Option<&RateLimiter>,
) -> Result<()> {
    let mut headers = Vec::with_capacity(BATCH);
    let mut iov = Vec::with_capacity(2 * BATCH);
    for batch in pieces.chunks(BATCH) {
        headers.clear();
        iov.clear();
        let mut spans = Vec::with_capacity(batch.len());
        let mut bytes = 0u64;
        for p in batch {
            let (ptr, len) = map.span(p.region, p.first, p.npages)?;
            headers.push(DataHeader::pages(
                round,
                p.region.0,
                p.first.0,
                p.npages as u32,
            ));
            spans.push((ptr, len));
            bytes += len as u64;
        }
        for (h, (ptr, len)) in headers.iter().zip(&spans) {
            iov.push(libc::iovec {
                iov_base: (h as *const DataHeader).cast_mut().cast(),
                iov_len: size_of::<DataHeader>(),
            });
            iov.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: *len,
            });
        }
        if let Some(l) = limiter {
            l.acquire(bytes)?;
        }
        // Page spans were checked against the region table by `span`.
        // SAFETY: headers live in `headers` for the call; guest memory stays mapped.
        unsafe { stream.writev_all(&mut iov) }
            .map_err(|e| Error::io(format!("sending round {round} pages"), e, "data stream"))?;
    }
    Ok(())
}

impl SourceDataPath for TcpSourcePath {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn send_chunk(&mut self, round: u32, ranges: &[PageRange]) -> Result<()> {
        self.check()?;
        let n = self.workers.len();
        let mut per: Vec<Vec<PageRange>> = vec![Vec::new(); n];
        for r in ranges {
            let mut first = r.first.0;
            while first < r.end() {
                let npages = (r.end() - first).min(self.piece_pages);
                per[self.next % n].push(PageRange {
                    region: r.region,
                    first: PageIndex(first),
                    npages,
                });
                self.next += 1;
                first += npages;
            }
        }
        for (i, pieces) in per.into_iter().enumerate() {
            if !pieces.is_empty() {
                self.dispatch(i, Job::Pieces(round, pieces))?;
            }
        }
        Ok(())
    }

    fn finish_round(&mut self, round: u32) -> Result<()> {
        for i in 0..self.workers.len() {
            self.dispatch(i, Job::End(round))?;
        }
        self.check()
    }

    fn close(&mut self) -> Result<()> {
        // Called once the destination confirmed every round (nothing is left in flight) or
        // after a failure: either way shut the streams first, so a sender blocked on a peer
        // that stopped reading is released before it is joined.
        for w in &mut self.workers {
            w.tx.take();
            let _ = w.stream.shutdown(std::net::Shutdown::Both);
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                if h.join().is_err() {
                    tracing::warn!("a TCP sender thread panicked");
                }
            }
        }
        self.check()
    }
}

impl Drop for TcpSourcePath {
    fn drop(&mut self) {
        for w in &mut self.workers {
            // Unblock a sender stuck in writev on a dead peer, then let it exit.
            let _ = w.stream.shutdown(std::net::Shutdown::Both);
            w.tx.take();
        }
        if let Err(e) = self.close() {
            tracing::debug!("TCP sender teardown: {e}");
        }
    }
}
