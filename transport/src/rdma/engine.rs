//! The read engine: one-sided RDMA READs from the source's registered regions into the
//! destination's, spread over several RC QPs, many in flight per QP, completions polled in
//! batches with the extended verbs (`ibv_wr_rdma_read` posting, `ibv_start_poll` polling).
//!
//! The engine knows regions and byte offsets, not pages: the migration path
//! ([`super::RdmaDestPath`]) turns page ranges into [`Read`]s and hashes what lands, and
//! `rdma-bench read-bw`/`read-lat` drive the very same engine with fixed-size reads.
//!
//! A failed completion (remote access error, retry exceeded, flush, …) poisons the engine:
//! every later call returns the same [`Error::Rdma`] naming the status.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::completion::{PollCompletionQueueError, WorkCompletionStatus};
use sideway::ibverbs::queue_pair::{
    PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
};

use super::device::{self, Device};
use super::mr::{Access, Registration};
use super::qp::{alloc_pd, QpSet, Role};
use super::setup::{RemoteRegion, Setup, KIND_ACK, KIND_SETUP};
use super::{RKey, RdmaOptions};
use crate::error::{Error, Result};
use crate::mem::{GuestMemoryMap, RegionId};

/// Largest single READ the engine posts, whatever the device allows: big enough to amortise
/// per-request costs, small enough to spread a round over QPs and overlap hashing.
pub const MAX_READ_CAP: u64 = 1 << 20;
/// Send-queue slots per QP.
pub const DEFAULT_DEPTH: u32 = 128;
/// Completions taken per poll.
const POLL_BATCH: usize = 64;
/// WRs posted per doorbell.
const POST_BATCH: usize = 32;
/// Bits of a work-request id left for the caller's tag (the top bits name the QP).
const TAG_BITS: u32 = 48;

/// One READ: `len` bytes at `offset` in region `region`, from the source's copy of the
/// region into ours. `tag` comes back on completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    /// Region (same index on both ends).
    pub region: RegionId,
    /// Byte offset inside the region.
    pub offset: u64,
    /// Bytes (at most [`ReadEngine::max_read`]).
    pub len: u32,
    /// Caller's tag, below 2^48.
    pub tag: u64,
}

/// The initiator end of the RDMA data path.
pub struct ReadEngine {
    // Drop order: QPs (and CQ) first, then our registration (shared by the post-copy engines
    // of one split, deregistered with the last of them), then the device; the PD goes with
    // the last QP or memory region that holds it.
    qps: QpSet,
    local: Option<Arc<Registration>>,
    remote: Vec<RemoteRegion>,
    dev: Device,
    in_flight: Vec<u32>,
    total_in_flight: usize,
    next_qp: usize,
    max_read: u64,
    failed: Option<String>,
    stall_timeout: Duration,
}

impl std::fmt::Debug for ReadEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadEngine")
            .field("device", &self.dev)
            .field("qps", &self.qps.len())
            .field("depth", &self.qps.depth)
            .field("max_read", &self.max_read)
            .field("in_flight", &self.total_in_flight)
            .finish()
    }
}

/// `IBV_WC_SUCCESS`.
const WC_SUCCESS: u32 = WorkCompletionStatus::Success as u32;
/// `IBV_WC_WR_FLUSH_ERR`: the QP went to the error state (after an earlier failure).
const WC_FLUSHED: u32 = WorkCompletionStatus::WorkRequestFlushedError as u32;

/// `status` as sideway's [`WorkCompletionStatus`], or `None` for a value this sideway does not
/// know (its `From<u32>` panics on those, and a provider newer than it may report one). The
/// statuses are the contiguous `ibv_wc_status` values up to the last variant.
pub fn wc_status(status: u32) -> Option<WorkCompletionStatus> {
    (status <= WorkCompletionStatus::TagMatchingRendezvousIncomplete as u32)
        .then(|| WorkCompletionStatus::from(status))
}

/// A work-completion status for messages: sideway's variant in words, then the variant and
/// the raw `ibv_wc_status` value, as in "remote access error (RemoteAccessError, ibv_wc_status 10)".
pub fn wc_status_name(status: u32) -> String {
    let Some(s) = wc_status(status) else {
        return format!("unknown work-completion status {status}");
    };
    let variant = format!("{s:?}");
    let mut words = String::with_capacity(variant.len() + 8);
    for (i, c) in variant.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            words.push(' ');
        }
        words.push(c.to_ascii_lowercase());
    }
    format!("{words} ({variant}, ibv_wc_status {status})")
}

/// The destination's device, protection domain and LOCAL_WRITE registration of guest memory,
/// made before the source's `DataSetup` arrives: registering pins every page and is the
/// longest part of the setup, so it runs while the source registers its own memory.
pub struct Prepared {
    dev: Device,
    pd: Arc<sideway::ibverbs::protection_domain::ProtectionDomain>,
    reg: Arc<Registration>,
}

impl Prepared {
    /// Opens the device `opts` selects and registers `map` on it.
    pub fn new(map: &GuestMemoryMap, opts: &RdmaOptions) -> Result<Prepared> {
        let dev = device::open(opts).map_err(Error::RdmaUnavailable)?;
        Prepared::register(&dev, map)
    }

    fn register(dev: &Device, map: &GuestMemoryMap) -> Result<Prepared> {
        let pd = alloc_pd(dev)?;
        let reg = Registration::register(&pd, map, Access::LocalWrite, dev.limits.max_mr_size)?;
        Ok(Prepared {
            dev: dev.clone(),
            pd,
            reg: Arc::new(reg),
        })
    }
}

impl ReadEngine {
    /// Opens the device, registers `map` LOCAL_WRITE, checks the source's `DataSetup`
    /// against `map`'s region table, creates and connects one QP per source QP. Returns the
    /// engine and the `DataSetupAck` payload.
    pub fn new(
        map: &GuestMemoryMap,
        opts: &RdmaOptions,
        setup: &[u8],
    ) -> Result<(ReadEngine, Vec<u8>)> {
        let (bulk, _, ack) = ReadEngine::new_split(map, opts, setup, Vec::new(), None)?;
        let bulk = bulk.ok_or_else(|| Error::Protocol("the source offers no queue pair".into()))?;
        Ok((bulk, ack))
    }

    /// Like [`ReadEngine::new`], but the last `staging.len()` of the source's QPs each get an
    /// engine of their own (own QP, CQ and protection domain) whose READs land in the matching
    /// staging memory (registered LOCAL_WRITE, region 0 of its map; post with
    /// [`ReadEngine::post_to`]). The bulk engine, into `map`, gets the source's other QPs, or
    /// is `None` when none are left. Post-copy uses this: a fault fetcher and prefetchers on
    /// QPs of their own, so a fault never queues behind bulk READs.
    ///
    /// `prepared` is the device and the registration of `map` made beforehand (with the same
    /// `opts`), while the source registered its memory.
    pub fn new_split(
        map: &GuestMemoryMap,
        opts: &RdmaOptions,
        setup: &[u8],
        staging: Vec<GuestMemoryMap>,
        prepared: Option<Prepared>,
    ) -> Result<(Option<ReadEngine>, Vec<ReadEngine>, Vec<u8>)> {
        let peer = Setup::decode(KIND_SETUP, setup)?;
        check_regions(map, &peer.regions)?;
        let mut prepared = prepared;
        let dev = match &prepared {
            Some(p) => p.dev.clone(),
            None => device::open(opts).map_err(Error::RdmaUnavailable)?,
        };
        let nbulk = peer.qps.len().checked_sub(staging.len()).ok_or_else(|| {
            Error::Protocol(format!(
                "the source offers {} queue pairs, fewer than the {} post-copy needs",
                peer.qps.len(),
                staging.len()
            ))
        })?;
        let want_qps = usize::from(opts.qps.max(1));
        if nbulk > 0 && nbulk != want_qps {
            tracing::info!(
                "the source offers {nbulk} queue pairs ({want_qps} requested here); using the source's"
            );
        }
        let rd_atomic = dev
            .limits
            .max_qp_init_rd_atom
            .min(peer.rd_atomic)
            .clamp(1, 255);
        let bulk = (nbulk > 0)
            .then(|| -> Result<ReadEngine> {
                let Prepared { pd, reg, .. } = match prepared.take() {
                    Some(p) => p,
                    None => Prepared::register(&dev, map)?,
                };
                ReadEngine::connect(&dev, pd, reg, &peer, 0..nbulk, rd_atomic)
            })
            .transpose()?;
        // The post-copy engines share one protection domain, and engines landing in the same
        // memory (every fetcher of zero-copy post-copy: the guest's second mapping) share one
        // registration of it: pinned and counted against RLIMIT_MEMLOCK once, not per fetcher.
        let pd = if staging.is_empty() {
            None
        } else {
            Some(alloc_pd(&dev)?)
        };
        let mut regs: Vec<(&GuestMemoryMap, Arc<Registration>)> = Vec::new();
        let mut extra = Vec::with_capacity(staging.len());
        for (i, s) in staging.iter().enumerate() {
            let pd = pd.clone().expect("allocated when there is staging");
            let reg = match regs.iter().find(|(m, _)| same_memory(m, s)) {
                Some((_, r)) => r.clone(),
                None => {
                    let r = Arc::new(Registration::register(
                        &pd,
                        s,
                        Access::LocalWrite,
                        dev.limits.max_mr_size,
                    )?);
                    regs.push((s, r.clone()));
                    r
                }
            };
            extra.push(ReadEngine::connect(
                &dev,
                pd,
                reg,
                &peer,
                nbulk + i..nbulk + i + 1,
                rd_atomic,
            )?);
        }
        let ack = Setup {
            gid: dev.gid,
            mtu: dev.limits.active_mtu,
            rd_atomic,
            qps: bulk
                .iter()
                .chain(&extra)
                .flat_map(|e| e.qps.local().iter().copied())
                .collect(),
            regions: Vec::new(),
        };
        if let Some(b) = &bulk {
            tracing::info!(
                "RDMA read engine on {} port {} GID index {}: {} QPs x {} slots, {} READs in flight per QP, reads up to {} bytes",
                dev.summary.name,
                dev.summary.port,
                dev.summary.gid_index,
                b.qps.len(),
                b.qps.depth,
                rd_atomic,
                b.max_read
            );
        }
        if !extra.is_empty() {
            tracing::info!(
                "RDMA: {} more QPs with staging buffers of their own (post-copy)",
                extra.len()
            );
        }
        Ok((bulk, extra, ack.encode(KIND_ACK)))
    }

    /// One engine on the source's QPs `range`, in `pd`, its READs landing in `local`
    /// (registered in `pd`).
    fn connect(
        dev: &Device,
        pd: Arc<sideway::ibverbs::protection_domain::ProtectionDomain>,
        local: Arc<Registration>,
        peer: &Setup,
        range: std::ops::Range<usize>,
        rd_atomic: u32,
    ) -> Result<ReadEngine> {
        let mut qps = QpSet::create_in(dev, pd, range.len(), DEFAULT_DEPTH, Role::Initiator)?;
        let mtu = dev.limits.active_mtu.min(peer.mtu);
        qps.connect(dev, &peer.qps[range], peer.gid, mtu, rd_atomic as u8)?;
        let n = qps.len();
        Ok(ReadEngine {
            qps,
            local: Some(local),
            remote: peer.regions.clone(),
            dev: dev.clone(),
            in_flight: vec![0; n],
            total_in_flight: 0,
            next_qp: 0,
            max_read: read_size(dev.limits.max_msg_size),
            failed: None,
            stall_timeout: Duration::from_secs(20),
        })
    }

    /// Largest READ this engine posts.
    pub fn max_read(&self) -> u64 {
        self.max_read
    }

    /// Raises or lowers the largest READ (bounded by the port's max message size), for
    /// benchmarks that read in bigger messages than migrations do.
    pub fn set_max_read(&mut self, bytes: u64) -> Result<()> {
        if bytes == 0 || bytes > self.dev.limits.max_msg_size || bytes > u64::from(u32::MAX) {
            return Err(Error::InvalidConfig(format!(
                "READ size {bytes} is outside 1..={} (the port's max message size)",
                self.dev.limits.max_msg_size.min(u64::from(u32::MAX))
            )));
        }
        self.max_read = bytes;
        Ok(())
    }

    /// READs that can be outstanding at once (all QPs).
    pub fn capacity(&self) -> usize {
        self.qps.len() * self.qps.depth as usize
    }

    /// READs outstanding now.
    pub fn in_flight(&self) -> usize {
        self.total_in_flight
    }

    /// Free slots now.
    pub fn free(&self) -> usize {
        self.capacity() - self.total_in_flight
    }

    /// The device in use.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The source's regions, as its `DataSetup` announced them.
    pub fn remote_regions(&self) -> &[RemoteRegion] {
        &self.remote
    }

    /// How long [`ReadEngine::wait_all`] (and the migration's read thread) wait without any
    /// completion before giving up on the READs in flight.
    pub fn set_stall_timeout(&mut self, d: Duration) {
        self.stall_timeout = d;
    }

    /// See [`ReadEngine::set_stall_timeout`] (default 20 s).
    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
    }

    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(e) => Err(Error::Rdma(e.clone())),
            None => Ok(()),
        }
    }

    /// Local address and lkey for `r`, bounds-checked.
    fn local_target(&self, r: &Read) -> Result<(u64, u32)> {
        let reg = self
            .local
            .as_ref()
            .ok_or_else(|| Error::Rdma("the read engine is closed".into()))?;
        let lr = reg
            .regions()
            .get(r.region.0 as usize)
            .ok_or(Error::UnknownRegion(r.region.0))?;
        if r.len == 0
            || u64::from(r.len) > self.max_read
            || !matches!(r.offset.checked_add(u64::from(r.len)), Some(end) if end <= lr.len)
        {
            return Err(Error::Rdma(format!(
                "READ of {} bytes at offset {:#x} does not fit region {} ({} bytes) or the {}-byte read limit",
                r.len, r.offset, r.region.0, lr.len, self.max_read
            )));
        }
        if r.tag >> TAG_BITS != 0 {
            return Err(Error::Rdma(format!("READ tag {:#x} over 48 bits", r.tag)));
        }
        Ok((lr.addr + r.offset, lr.lkey().0))
    }

    /// Posts READs from the front of `queue` while there are free slots, spreading them over
    /// the QPs; returns how many were posted. Each READ's remote end is the same offset in the
    /// source's copy of the region.
    pub fn post(&mut self, queue: &mut VecDeque<Read>) -> Result<usize> {
        self.check()?;
        let mut posted = 0;
        let nqp = self.qps.len();
        let mut idle_qps = 0;
        while !queue.is_empty() && idle_qps < nqp {
            let qi = self.next_qp;
            self.next_qp = (self.next_qp + 1) % nqp;
            let free = (self.qps.depth - self.in_flight[qi]) as usize;
            let n = free.min(queue.len()).min(POST_BATCH);
            if n == 0 {
                idle_qps += 1;
                continue;
            }
            idle_qps = 0;
            let mut batch = Vec::with_capacity(n);
            for r in queue.iter().take(n) {
                let (laddr, lkey) = self.local_target(r)?;
                let rr = &self.remote[r.region.0 as usize];
                // check_regions made the remote region as long as ours, so this is in bounds.
                batch.push((laddr, lkey, rr.addr + r.offset, rr.rkey, r.len, r.tag));
            }
            self.post_on(qi, &batch)?;
            queue.drain(..n);
            posted += n;
        }
        Ok(posted)
    }

    /// Posts one READ of `read.len` bytes from an arbitrary remote address and key into the
    /// local spot `read` names (bounds-checked locally; the peer's device checks the remote
    /// side). For tests and diagnostics; fails with [`Error::Rdma`] when no slot is free.
    pub fn post_to(&mut self, read: Read, remote_addr: u64, rkey: RKey) -> Result<()> {
        self.check()?;
        let (laddr, lkey) = self.local_target(&read)?;
        let qi = (0..self.qps.len())
            .map(|i| (self.next_qp + i) % self.qps.len())
            .find(|&i| self.in_flight[i] < self.qps.depth)
            .ok_or_else(|| Error::Rdma("no free send slot".into()))?;
        self.next_qp = (qi + 1) % self.qps.len();
        self.post_on(qi, &[(laddr, lkey, remote_addr, rkey, read.len, read.tag)])
    }

    fn post_on(&mut self, qi: usize, batch: &[(u64, u32, u64, RKey, u32, u64)]) -> Result<()> {
        let qp = &mut self.qps.qps[qi];
        let mut guard = qp.start_post_send();
        for &(laddr, lkey, raddr, rkey, len, tag) in batch {
            let wr_id = ((qi as u64) << TAG_BITS) | tag;
            let h = guard
                .construct_wr(wr_id, WorkRequestFlags::Signaled)
                .setup_read(rkey.0, raddr);
            // local_target checked the range; the registration outlives the QPs' work because the
            // engine drains or flushes all work before it deregisters (close/drop order).
            // SAFETY: laddr..laddr+len lies inside a region registered LOCAL_WRITE with `lkey`.
            unsafe { h.setup_sge(lkey, laddr, len) };
        }
        guard.post().map_err(|e| {
            let os = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            let msg = format!(
                "posting {} RDMA READs on QP {:#x} failed: {e}{os}",
                batch.len(),
                self.qps.local()[qi].qpn.0
            );
            self.failed = Some(msg.clone());
            Error::Rdma(msg)
        })?;
        self.in_flight[qi] += batch.len() as u32;
        self.total_in_flight += batch.len();
        Ok(())
    }

    /// Takes up to a batch of completions, appending the tags of successful READs to `done`.
    /// Returns how many completions were taken (0 when none were ready).
    pub fn poll(&mut self, done: &mut Vec<u64>) -> Result<usize> {
        self.check()?;
        let mut n = 0;
        let mut failure: Option<(u32, u32, usize, u64)> = None;
        while n < POLL_BATCH {
            let Some((wr_id, status, vendor)) = self.poll_one()? else {
                break;
            };
            n += 1;
            let qi = (wr_id >> TAG_BITS) as usize;
            if let Some(c) = self.in_flight.get_mut(qi) {
                *c = c.saturating_sub(1);
                self.total_in_flight = self.total_in_flight.saturating_sub(1);
            }
            if status == WC_SUCCESS {
                done.push(wr_id & ((1 << TAG_BITS) - 1));
            } else if !matches!(failure, Some((s, ..)) if s != WC_FLUSHED || status == WC_FLUSHED) {
                // Keep the first real error; a flush only says an earlier one happened.
                failure = Some((status, vendor, qi, wr_id & ((1 << TAG_BITS) - 1)));
            }
        }
        if let Some((status, vendor, qi, tag)) = failure {
            let qpn = self.qps.local().get(qi).map(|q| q.qpn.0).unwrap_or(0);
            let msg = format!(
                "RDMA READ (tag {tag}) on QP {qpn:#x} failed: {} [vendor error {vendor:#x}]",
                wc_status_name(status)
            );
            self.failed = Some(msg.clone());
            return Err(Error::Rdma(msg));
        }
        Ok(n)
    }

    /// Takes one completion: `(wr_id, status, vendor_err)`.
    ///
    /// One `ibv_start_poll`/`ibv_end_poll` pair per completion, never `ibv_next_poll`: the
    /// rxe provider ends the poll itself when `ibv_next_poll` finds the queue empty, and the
    /// `ibv_end_poll` that must follow on other providers would then consume a slot that holds
    /// no new completion (stale work completions come back). One per pair is right on all.
    fn poll_one(&mut self) -> Result<Option<(u64, u32, u32)>> {
        let mut poller = match self.qps.cq.start_poll() {
            Ok(p) => p,
            Err(PollCompletionQueueError::CompletionQueueEmpty) => return Ok(None),
            Err(e) => {
                let msg = format!("polling the completion queue failed: {e}");
                self.failed = Some(msg.clone());
                return Err(Error::Rdma(msg));
            }
        };
        // The first item is the completion start_poll found; dropping the poller ends the poll.
        Ok(poller.next().map(|wc| {
            (
                wc.wr_id(),
                wc.status(),
                if wc.status() != WC_SUCCESS {
                    wc.vendor_err()
                } else {
                    0
                },
            )
        }))
    }

    /// Polls until nothing is in flight, appending finished tags to `done`.
    pub fn wait_all(&mut self, done: &mut Vec<u64>) -> Result<()> {
        let mut last = Instant::now();
        let mut empty = 0u32;
        while self.total_in_flight > 0 {
            if self.poll(done)? > 0 {
                last = Instant::now();
                empty = 0;
                continue;
            }
            empty += 1;
            backoff(empty);
            if empty.is_multiple_of(1024) && last.elapsed() > self.stall_timeout {
                let msg = format!(
                    "{} RDMA READs made no progress for {:?}",
                    self.total_in_flight, self.stall_timeout
                );
                self.failed = Some(msg.clone());
                return Err(Error::Timeout(msg));
            }
        }
        Ok(())
    }

    /// Stops the engine: QPs to the error state (flushing what is in flight), then the local
    /// memory is deregistered. Idempotent; also done on drop.
    pub fn close(&mut self) {
        if self.local.is_none() {
            return;
        }
        self.qps.shut();
        // Let flushed completions drain so no work still targets our memory.
        let t = Instant::now();
        while self.total_in_flight > 0 && t.elapsed() < Duration::from_secs(2) {
            match self.poll_one() {
                Ok(Some((wr_id, ..))) => {
                    if let Some(c) = self.in_flight.get_mut((wr_id >> TAG_BITS) as usize) {
                        *c = c.saturating_sub(1);
                    }
                    self.total_in_flight -= 1;
                }
                Ok(None) | Err(_) => std::thread::yield_now(),
            }
        }
        self.local = None;
        if self.failed.is_none() {
            self.failed = Some("the read engine is closed".into());
        }
    }
}

impl Drop for ReadEngine {
    fn drop(&mut self) {
        self.close();
    }
}

/// True when two maps cover the same host memory, region by region.
fn same_memory(a: &GuestMemoryMap, b: &GuestMemoryMap) -> bool {
    a.regions().len() == b.regions().len()
        && a.regions()
            .iter()
            .zip(b.regions())
            .all(|(x, y)| x.host_ptr() == y.host_ptr() && x.len() == y.len())
}

/// Spin briefly, then yield: completions usually arrive within microseconds on hardware, but
/// SoftRoCE needs the CPU we would burn.
pub(crate) fn backoff(empty_polls: u32) {
    if empty_polls < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// The READ size for a device whose port carries messages up to `max_msg`.
pub fn read_size(max_msg: u64) -> u64 {
    let r = max_msg.min(MAX_READ_CAP);
    // Whole 4 KiB units so page-aligned pieces stay page-aligned.
    if r >= 4096 {
        r & !4095
    } else {
        r
    }
}

/// The source's regions must be exactly ours: same count, same lengths.
pub fn check_regions(map: &GuestMemoryMap, remote: &[RemoteRegion]) -> Result<()> {
    let ours = map.regions();
    if remote.len() != ours.len() {
        return Err(Error::RegionMismatch(format!(
            "the source's RDMA setup lists {} regions, the region table {}",
            remote.len(),
            ours.len()
        )));
    }
    for (i, (r, o)) in remote.iter().zip(ours).enumerate() {
        if r.len != o.len() {
            return Err(Error::RegionMismatch(format!(
                "region {i}: the source registered {} bytes, the region table says {}",
                r.len,
                o.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{GuestAddress, MmapBacking, MmapRegion, PageSize};

    #[test]
    fn read_size_is_capped_and_page_aligned() {
        assert_eq!(read_size(1 << 31), MAX_READ_CAP);
        assert_eq!(read_size(65536 + 100), 65536);
        assert_eq!(read_size(1024), 1024);
    }

    #[test]
    fn regions_must_match() {
        let a = MmapRegion::new(8192, MmapBacking::Anonymous, false).unwrap();
        let b = MmapRegion::new(4096, MmapBacking::Anonymous, false).unwrap();
        // SAFETY: a and b outlive the map (dropped at the end of the test).
        let regions = unsafe {
            vec![
                a.guest_region(GuestAddress(0)),
                b.guest_region(GuestAddress(1 << 20)),
            ]
        };
        let map = GuestMemoryMap::new(regions, PageSize::KIB4).unwrap();
        let r = |len| RemoteRegion {
            addr: 0x1000,
            len,
            rkey: RKey(1),
        };
        assert!(check_regions(&map, &[r(8192), r(4096)]).is_ok());
        assert!(check_regions(&map, &[r(8192)])
            .unwrap_err()
            .to_string()
            .contains("lists 1 regions"));
        assert!(check_regions(&map, &[r(8192), r(8192)])
            .unwrap_err()
            .to_string()
            .contains("region 1"));
    }

    #[test]
    fn work_completion_statuses_are_sideways_and_named() {
        // Every value up to the last variant converts without a panic and round-trips.
        for v in 0..=WorkCompletionStatus::TagMatchingRendezvousIncomplete as u32 {
            assert_eq!(wc_status(v).map(|s| s as u32), Some(v));
        }
        assert_eq!(wc_status(9999), None);
        assert_eq!(
            wc_status_name(10),
            "remote access error (RemoteAccessError, ibv_wc_status 10)"
        );
        assert!(wc_status_name(12).starts_with("retry counter exceeded error"));
        assert!(wc_status_name(5).starts_with("work request flushed error"));
        assert_eq!(wc_status_name(9999), "unknown work-completion status 9999");
    }
}
