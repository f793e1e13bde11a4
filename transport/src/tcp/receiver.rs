//! Destination end of the TCP path: one thread per stream reads each header, checks its range
//! against the region table, receives the pages straight into guest memory and hashes them.

use crate::channel::Stream;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cpu::{CpuMeter, ThreadCpu};
use crate::data::{DestDataPath, Landed};
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;
use crate::pages::{total_pages, PageRange};
use crate::wire::{DataFrame, DataHeader};

enum Event {
    EndOfRound {
        round: u32,
        claimed: u64,
        pages: u64,
        bytes: u64,
    },
    Failed(Error),
}

/// The destination's TCP data path.
pub struct TcpDestPath {
    events: Receiver<(usize, Event)>,
    streams: Vec<Stream>,
    handles: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    expected: u64,
    timeout: Duration,
}

impl TcpDestPath {
    /// Starts one receiver thread per stream.
    pub fn new(
        map: GuestMemoryMap,
        streams: Vec<Stream>,
        hashes: Arc<PageHashes>,
        cpu: Arc<CpuMeter>,
        timeout: Duration,
    ) -> Result<Self> {
        let (tx, events) = channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let mut kept = Vec::new();
        for (i, stream) in streams.into_iter().enumerate() {
            kept.push(
                stream
                    .try_clone()
                    .map_err(|e| Error::io("cloning a data stream", e, "data stream"))?,
            );
            let (map, hashes, cpu, tx, stopping) = (
                map.clone(),
                hashes.clone(),
                cpu.clone(),
                tx.clone(),
                stopping.clone(),
            );
            let h = crate::threads::spawn(&format!("rdmig-recv-{i}"), move || {
                let mut meter = ThreadCpu::start(&cpu);
                let emit = |ev| {
                    meter.flush();
                    tx.send((i, ev)).is_ok()
                };
                if let Err(e) = receive_loop(i, stream, &map, &hashes, emit) {
                    if !stopping.load(Ordering::Relaxed) {
                        let _ = tx.send((i, Event::Failed(e)));
                    }
                }
            })
            .map_err(|e| Error::io("spawning a receiver thread", e, "data stream"))?;
            handles.push(h);
        }
        Ok(TcpDestPath {
            events,
            streams: kept,
            handles,
            stopping,
            expected: 0,
            timeout,
        })
    }
}

fn receive_loop(
    i: usize,
    mut s: Stream,
    map: &GuestMemoryMap,
    hashes: &PageHashes,
    mut emit: impl FnMut(Event) -> bool,
) -> Result<()> {
    let mut round = 0u32;
    let (mut pages, mut bytes) = (0u64, 0u64);
    loop {
        let mut b = [0u8; size_of::<DataHeader>()];
        if let Err(e) = s.read_exact(&mut b) {
            return Err(Error::io(
                format!("reading a header on data stream {i}"),
                e,
                "data stream",
            ));
        }
        let frame =
            DataHeader::decode(&b).map_err(|e| Error::Protocol(format!("data stream {i}: {e}")))?;
        let frame_round = match frame {
            DataFrame::Pages { round, .. } | DataFrame::EndOfRound { round, .. } => round,
            DataFrame::Postcopy { .. } => {
                return Err(Error::Protocol(format!(
                    "data stream {i} sent a post-copy header during pre-copy"
                )))
            }
        };
        if frame_round != round {
            return Err(Error::Protocol(format!(
                "data stream {i} sent round {frame_round} while in round {round}"
            )));
        }
        match frame {
            DataFrame::Pages { range, .. } => {
                let (ptr, len) = map.span(range.region, range.first, range.npages)?;
                // Fault the piece in with one call rather than a fault per page in the receive
                // (guest memory need not be populated up front: zero pages never touch it).
                crate::mem::prefault(ptr, len);
                // The memory is mapped for the session and nothing else writes it before resume.
                // SAFETY: `span` checked the range against the destination's region table.
                unsafe { s.recv_exact(ptr, len) }.map_err(|e| {
                    Error::io(
                        format!("receiving pages on data stream {i}"),
                        e,
                        "data stream",
                    )
                })?;
                hashes.update(map, &range)?;
                pages += range.npages;
                bytes += len as u64;
            }
            DataFrame::EndOfRound { pages: claimed, .. } => {
                if !emit(Event::EndOfRound {
                    round,
                    claimed: u64::from(claimed),
                    pages,
                    bytes,
                }) {
                    return Ok(());
                }
                round += 1;
                (pages, bytes) = (0, 0);
            }
            DataFrame::Postcopy { .. } => unreachable!("refused above"),
        }
    }
}

impl DestDataPath for TcpDestPath {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn receive_chunk(&mut self, _round: u32, ranges: &[PageRange]) -> Result<()> {
        self.expected += total_pages(ranges);
        Ok(())
    }

    fn finish_round(&mut self, round: u32) -> Result<Landed> {
        let mut landed = Landed::default();
        let mut done = vec![false; self.streams.len()];
        while done.iter().any(|d| !d) {
            let (i, ev) = self.events.recv_timeout(self.timeout).map_err(|_| {
                Error::Timeout(format!(
                    "round {round}: data streams idle for {:?}",
                    self.timeout
                ))
            })?;
            match ev {
                Event::Failed(e) => return Err(e),
                Event::EndOfRound {
                    round: r,
                    claimed,
                    pages,
                    bytes,
                } => {
                    if r != round || done[i] || claimed != pages {
                        return Err(Error::Protocol(format!(
                            "data stream {i}: end of round {r} claims {claimed} pages, {pages} arrived (expected round {round})"
                        )));
                    }
                    done[i] = true;
                    landed.pages += pages;
                    landed.bytes += bytes;
                }
            }
        }
        let expected = std::mem::take(&mut self.expected);
        if landed.pages != expected {
            return Err(Error::Protocol(format!(
                "round {round}: {} pages arrived, {expected} were announced",
                landed.pages
            )));
        }
        Ok(landed)
    }

    fn close(&mut self) -> Result<()> {
        self.stopping.store(true, Ordering::Relaxed);
        for s in &self.streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for h in self.handles.drain(..) {
            if h.join().is_err() {
                tracing::warn!("a TCP receiver thread panicked");
            }
        }
        Ok(())
    }
}

impl Drop for TcpDestPath {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
