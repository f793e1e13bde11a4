//! The destination end of the RDMA data path: a thread that owns the [`ReadEngine`], turns
//! announced page ranges into READs as chunks arrive (pipelined with the control channel),
//! hashes each piece into the digest table once its READ completes, and answers
//! `finish_round` when every READ of the round has landed.
//!
//! The thread busy-polls while READs are in flight (backing off to `yield` so SoftRoCE keeps
//! its CPU) and blocks on its command channel when idle. Its CPU time goes into the
//! migration's [`CpuMeter`] at the end of every round.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::engine::{backoff, Prepared, Read, ReadEngine};
use super::fetch::{RdmaPageFetcher, Staging};
use super::RdmaOptions;
use crate::cpu::{thread_cpu_time, CpuMeter};
use crate::data::{DestDataPath, Landed};
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::{GuestMemoryMap, PageIndex};
use crate::pace::RateLimiter;
use crate::pages::PageRange;

enum Cmd {
    Chunk(Vec<PageRange>),
    Finish(Sender<Result<Landed>>),
}

/// Destination end: reads each announced range from the source's memory.
pub struct RdmaDestPath {
    tx: Option<Sender<Cmd>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RdmaDestPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaDestPath")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl RdmaDestPath {
    /// Registers memory, creates and connects queue pairs to the source's; returns the
    /// `DataSetupAck` payload.
    pub fn new(
        map: &GuestMemoryMap,
        opts: &RdmaOptions,
        setup: &[u8],
        hashes: Arc<PageHashes>,
        cpu: Arc<CpuMeter>,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Result<(Self, Vec<u8>)> {
        let (engine, ack) = ReadEngine::new(map, opts, setup)?;
        Ok((RdmaDestPath::start(engine, map, hashes, cpu, limiter)?, ack))
    }

    /// Like [`RdmaDestPath::new`] for a session that may switch to post-copy: the last
    /// `fetch.len()` of the source's QPs become [`RdmaPageFetcher`]s (the first for faults,
    /// the others for prefetching), each READing into its [`Staging`] memory. The pre-copy path
    /// gets the other QPs, and is `None` when there are none (post-copy mode: no rounds).
    #[allow(clippy::too_many_arguments)]
    pub fn with_postcopy(
        map: &GuestMemoryMap,
        opts: &RdmaOptions,
        setup: &[u8],
        hashes: Arc<PageHashes>,
        cpu: Arc<CpuMeter>,
        limiter: Option<Arc<RateLimiter>>,
        buffers: Vec<Staging>,
        prepared: Option<Prepared>,
    ) -> Result<(Option<Self>, Vec<RdmaPageFetcher>, Vec<u8>)> {
        let maps = buffers.iter().map(|b| b.map().clone()).collect();
        let (bulk, engines, ack) = ReadEngine::new_split(map, opts, setup, maps, prepared)?;
        let fetchers = engines
            .into_iter()
            .zip(buffers)
            .enumerate()
            .map(|(i, (e, b))| {
                let label = if i == 0 {
                    "RDMA fault fetcher".to_string()
                } else {
                    format!("RDMA prefetcher {i}")
                };
                // The fault fetcher spins and is never paced; prefetchers share the cap.
                let f = RdmaPageFetcher::new(e, b, map.page_size(), label);
                if i == 0 {
                    f.with_spin(super::fetch::FAULT_SPIN)
                } else {
                    f.with_limiter(limiter.clone())
                }
            })
            .collect();
        let path = bulk
            .map(|e| RdmaDestPath::start(e, map, hashes, cpu, limiter))
            .transpose()?;
        Ok((path, fetchers, ack))
    }

    fn start(
        engine: ReadEngine,
        map: &GuestMemoryMap,
        hashes: Arc<PageHashes>,
        cpu: Arc<CpuMeter>,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            engine,
            map: map.clone(),
            hashes,
            cpu,
            limiter,
            slots: Vec::new(),
            free: Vec::new(),
        };
        let thread =
            crate::threads::spawn("rdmig-rdma-read", move || worker.run(rx)).map_err(|e| {
                Error::Io {
                    context: "spawning the RDMA read thread".into(),
                    source: e,
                }
            })?;
        Ok(RdmaDestPath {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, c: Cmd) -> Result<()> {
        self.tx
            .as_ref()
            .ok_or_else(|| Error::Rdma("the RDMA data path is closed".into()))?
            .send(c)
            .map_err(|_| Error::Rdma("the RDMA read thread has stopped".into()))
    }

    fn shut(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the RDMA read thread panicked");
            }
        }
    }
}

impl DestDataPath for RdmaDestPath {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn receive_chunk(&mut self, _round: u32, ranges: &[PageRange]) -> Result<()> {
        self.send(Cmd::Chunk(ranges.to_vec()))
    }

    fn finish_round(&mut self, _round: u32) -> Result<Landed> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Finish(tx))?;
        rx.recv()
            .map_err(|_| Error::Rdma("the RDMA read thread stopped during the round".into()))?
    }

    fn close(&mut self) -> Result<()> {
        self.shut();
        Ok(())
    }
}

impl Drop for RdmaDestPath {
    fn drop(&mut self) {
        self.shut();
    }
}

/// A piece of a round in flight: a page range and the READs still outstanding for it.
struct Slot {
    range: PageRange,
    bytes: u64,
    pieces_left: u32,
}

struct Worker {
    engine: ReadEngine,
    map: GuestMemoryMap,
    hashes: Arc<PageHashes>,
    cpu: Arc<CpuMeter>,
    limiter: Option<Arc<RateLimiter>>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Cmd>) {
        let mut queue: VecDeque<Read> = VecDeque::new();
        let mut done = Vec::with_capacity(64);
        let mut finish: Option<Sender<Result<Landed>>> = None;
        let mut landed = Landed::default();
        let mut failed: Option<Error> = None;
        let mut cpu_mark = thread_cpu_time();
        let mut empty = 0u32;
        let mut last_progress = std::time::Instant::now();
        loop {
            let busy = failed.is_none() && (!queue.is_empty() || self.engine.in_flight() > 0);
            let cmd = if busy || finish.is_some() {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            };
            let mut progress = cmd.is_some();
            match cmd {
                Some(Cmd::Chunk(ranges)) if failed.is_none() => {
                    if let Err(e) = self.split(&ranges, &mut queue) {
                        failed = Some(e);
                    }
                }
                Some(Cmd::Chunk(_)) | None => {}
                Some(Cmd::Finish(tx)) => finish = Some(tx),
            }
            if failed.is_none() {
                if let Err(e) = self.pump(&mut queue, &mut done, &mut landed, &mut progress) {
                    failed = Some(e);
                }
            }
            let round_over = failed.is_some() || (queue.is_empty() && self.engine.in_flight() == 0);
            if round_over {
                if let Some(tx) = finish.take() {
                    let now = thread_cpu_time();
                    self.cpu.add(now.saturating_sub(cpu_mark));
                    cpu_mark = now;
                    let r = match &failed {
                        Some(e) => Err(Error::Rdma(format!(
                            "the round's RDMA READs failed: {}",
                            strip(e)
                        ))),
                        None => Ok(std::mem::take(&mut landed)),
                    };
                    let _ = tx.send(r);
                    progress = true;
                }
            }
            if progress {
                empty = 0;
                last_progress = std::time::Instant::now();
            } else {
                empty = empty.saturating_add(1);
                backoff(empty);
                // A peer that vanished may never answer (SoftRoCE does not always report
                // retry-exceeded): give up on READs that make no progress at all.
                if failed.is_none()
                    && self.engine.in_flight() > 0
                    && empty.is_multiple_of(1024)
                    && last_progress.elapsed() > self.engine.stall_timeout()
                {
                    failed = Some(Error::Timeout(format!(
                        "{} RDMA READs made no progress for {:?} (is the source gone?)",
                        self.engine.in_flight(),
                        self.engine.stall_timeout()
                    )));
                }
            }
        }
        self.cpu.add(thread_cpu_time().saturating_sub(cpu_mark));
        self.engine.close();
    }

    /// Posts what fits, polls a batch, hashes what landed.
    fn pump(
        &mut self,
        queue: &mut VecDeque<Read>,
        done: &mut Vec<u64>,
        landed: &mut Landed,
        progress: &mut bool,
    ) -> Result<()> {
        if !queue.is_empty() && self.engine.free() > 0 {
            let posted = match &self.limiter {
                // Capped: one READ per turn, paced, so completions keep being polled meanwhile.
                Some(l) if l.rate() > 0 => {
                    let mut one: VecDeque<Read> = queue.pop_front().into_iter().collect();
                    l.acquire(one.iter().map(|r| u64::from(r.len)).sum())?;
                    let n = self.engine.post(&mut one)?;
                    if let Some(r) = one.pop_front() {
                        queue.push_front(r);
                    }
                    n
                }
                _ => self.engine.post(queue)?,
            };
            if posted > 0 {
                *progress = true;
            }
        }
        if self.engine.in_flight() > 0 {
            done.clear();
            if self.engine.poll(done)? > 0 {
                *progress = true;
            }
            for &tag in done.iter() {
                let idx = tag as usize;
                let Some(Some(slot)) = self.slots.get_mut(idx) else {
                    return Err(Error::Rdma(format!(
                        "completion for unknown READ tag {tag}"
                    )));
                };
                slot.pieces_left = slot.pieces_left.checked_sub(1).ok_or_else(|| {
                    Error::Rdma(format!("duplicate completion for READ tag {tag}"))
                })?;
                if slot.pieces_left == 0 {
                    let slot = self.slots[idx].take().expect("checked above");
                    self.free.push(idx);
                    self.hashes.update(&self.map, &slot.range)?;
                    landed.pages += slot.range.npages;
                    landed.bytes += slot.bytes;
                }
            }
        }
        Ok(())
    }

    fn slot(&mut self, s: Slot) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(s);
                i as u64
            }
            None => {
                self.slots.push(Some(s));
                (self.slots.len() - 1) as u64
            }
        }
    }

    /// Splits ranges into READs of at most `max_read` bytes along page boundaries (pages
    /// larger than that are read in several pieces and hashed when the last one lands).
    fn split(&mut self, ranges: &[PageRange], queue: &mut VecDeque<Read>) -> Result<()> {
        let page = self.map.page_size();
        let max_read = self.engine.max_read();
        let pages_per_read = (max_read >> page.shift()).max(1);
        for r in ranges {
            let mut first = r.first.0;
            while first < r.end() {
                let n = pages_per_read.min(r.end() - first);
                let sub = PageRange {
                    region: r.region,
                    first: PageIndex(first),
                    npages: n,
                };
                let (_, len) = self.map.span(sub.region, sub.first, sub.npages)?;
                let offset = first << page.shift();
                let len = len as u64;
                let pieces = len.div_ceil(max_read) as u32;
                let tag = self.slot(Slot {
                    range: sub,
                    bytes: len,
                    pieces_left: pieces,
                });
                let mut off = 0;
                while off < len {
                    let l = (len - off).min(max_read);
                    queue.push_back(Read {
                        region: sub.region,
                        offset: offset + off,
                        len: l as u32,
                        tag,
                    });
                    off += l;
                }
                first += n;
            }
        }
        Ok(())
    }
}

fn strip(e: &Error) -> String {
    match e {
        Error::Rdma(s) => s.clone(),
        other => other.to_string(),
    }
}
