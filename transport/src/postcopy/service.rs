//! The destination's post-copy service as one object: marks the post-copy set missing,
//! registers guest memory with userfaultfd, runs the fault thread and the prefetchers, waits
//! for the last page, and tears down in order (threads stopped, memory unregistered, the
//! descriptor closed last, which releases any thread still blocked on a missing page).

use crate::channel::Stream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::alias::AliasMap;
use super::fault::{fault_loop, FaultStats};
use super::fetch::PageFetcher;
use super::missing::{Failure, MissingPages};
use super::prefetch::prefetch_loop;
use super::uffd::Uffd;
use crate::cpu::{CpuMeter, ThreadCpu};
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;
use crate::pages::{PageRange, PageSet};

/// What post-copy measured on the destination.
#[derive(Clone, Debug, Default)]
pub struct PostcopyStats {
    /// Pages that were missing at resume.
    pub missing: u64,
    /// Fault events served.
    pub faults: u64,
    /// Missing pages installed by the fault service.
    pub fault_pages: u64,
    /// Missing pages installed by the prefetchers.
    pub prefetched_pages: u64,
    /// From resume to the last page installed.
    pub duration: Duration,
    /// Fault latency p50, p90, p99, p99.9, max, ns.
    pub latency_ns: [u64; 5],
}

/// Drops every page of `set` from `map` (`MADV_DONTNEED`) so that the next access faults.
pub fn drop_pages(map: &GuestMemoryMap, set: &PageSet) -> Result<()> {
    for r in set.ranges(u64::MAX) {
        let (ptr, len) = map.span(r.region, r.first, r.npages)?;
        // Dropping pages only makes them read back as missing (userfaultfd) or zero (intended).
        // SAFETY: the span lies in guest memory (checked).
        if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) } != 0 {
            return Err(Error::os("madvise(MADV_DONTNEED) of stale guest pages"));
        }
    }
    Ok(())
}

/// Where the service fetches pages from.
pub struct Fetchers {
    /// The fault service's fetcher (its own stream on TCP).
    pub fault: Box<dyn PageFetcher>,
    /// One per prefetch thread.
    pub prefetch: Vec<Box<dyn PageFetcher>>,
    /// Shut down to unblock the threads when stopping after a failure.
    pub streams: Vec<Stream>,
    /// Set to make fetchers that poll (RDMA) give up when stopping after a failure.
    pub aborts: Vec<Arc<AtomicBool>>,
}

/// Records a service thread's failure: a link failure (recoverable) or a local one.
fn report(pages: &MissingPages, why: String, e: &Error) {
    if e.is_link() {
        pages.fail_link(why);
    } else {
        pages.fail(why);
    }
}

/// Lowers the calling thread's priority (nice 10), so that bulk prefetching yields the CPU to
/// the fault path and the guest. Best effort.
pub fn lower_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id; failure only leaves the priority as it was.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) } != 0 {
        tracing::debug!(
            "could not lower a prefetch thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The running post-copy service.
pub struct PostcopyService {
    uffd: Arc<Uffd>,
    pages: Arc<MissingPages>,
    map: GuestMemoryMap,
    registered: bool,
    streams: Vec<Stream>,
    aborts: Vec<Arc<AtomicBool>>,
    fault: Option<JoinHandle<FaultStats>>,
    prefetch: Vec<JoinHandle<u64>>,
    pending_prefetch: Vec<Box<dyn PageFetcher>>,
    started: Instant,
    finished: Option<Duration>,
    /// What the fault threads of earlier links measured (a recovery replaces them).
    past_faults: FaultStats,
    past_prefetched: u64,
}

impl std::fmt::Debug for PostcopyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyService")
            .field("pages", &self.pages)
            .finish()
    }
}

impl PostcopyService {
    /// Marks `missing` missing (dropping the pages of `stale` first: those received in earlier
    /// rounds and not dropped yet), registers every region with userfaultfd and starts
    /// the fault thread; [`PostcopyService::start_prefetch`] starts one prefetcher per prefetch
    /// fetcher. Call before the guest resumes. With `alias` (memfd guest memory, second
    /// mappings) the regions are registered in MINOR mode and pages are fetched into `alias`
    /// and mapped with `UFFDIO_CONTINUE` (zero-copy); without, MISSING mode and `UFFDIO_COPY`.
    pub fn start(
        map: &GuestMemoryMap,
        missing: &PageSet,
        stale: Option<&PageSet>,
        fetchers: Fetchers,
        hashes: Arc<PageHashes>,
        cpu: Arc<CpuMeter>,
        alias: Option<Arc<AliasMap>>,
    ) -> Result<PostcopyService> {
        let Fetchers {
            fault,
            prefetch,
            streams,
            aborts,
        } = fetchers;
        let page = map.page_size().bytes();
        if let Some(r) = map
            .regions()
            .iter()
            .find(|r| r.len() % page != 0 || !(r.host_ptr() as u64).is_multiple_of(4096))
        {
            return Err(Error::PostcopyUnavailable(format!(
                "region at {:#x} is not page-aligned for userfaultfd",
                r.gpa().0
            )));
        }
        let t = Instant::now();
        if let Some(stale) = stale {
            drop_pages(map, stale)?;
        }
        tracing::debug!(
            "post-copy: {} stale pages dropped in {:?}",
            stale.map_or(0, PageSet::count),
            t.elapsed()
        );
        let uffd = Arc::new(if alias.is_some() {
            Uffd::open_minor()?
        } else {
            Uffd::open()?
        });
        let mut state = MissingPages::new(map, missing);
        if let Some(a) = &alias {
            state = state.in_place(a.clone());
        }
        let pages = Arc::new(state);
        tracing::debug!(
            "post-copy: userfaultfd opened, missing pages marked {:?} after the drop",
            t.elapsed()
        );
        let mut svc = PostcopyService {
            uffd: uffd.clone(),
            pages: pages.clone(),
            map: map.clone(),
            registered: false,
            streams,
            aborts,
            fault: None,
            prefetch: Vec::new(),
            pending_prefetch: Vec::new(),
            started: Instant::now(),
            finished: None,
            past_faults: FaultStats::new(),
            past_prefetched: 0,
        };
        for r in map.regions() {
            // In zero-copy mode it is a shared memfd mapping whose pages AliasMap allocated.
            // The service unregisters it before the session ends.
            // SAFETY: guest memory the VMM vouched for, mapped while the session runs.
            unsafe {
                if alias.is_some() {
                    uffd.register_minor(r.host_ptr(), r.len() as usize)?
                } else {
                    uffd.register(r.host_ptr(), r.len() as usize)?
                }
            };
            svc.registered = true;
        }
        tracing::debug!(
            "post-copy: memory registered {:?} after the drop",
            t.elapsed()
        );
        svc.spawn_fault(fault, hashes, cpu)?;
        svc.pending_prefetch = prefetch;
        svc.started = Instant::now();
        tracing::debug!(
            "post-copy: service started {:?} after the drop",
            t.elapsed()
        );
        Ok(svc)
    }

    /// Starts the fault thread over `fault`.
    fn spawn_fault(
        &mut self,
        mut fault: Box<dyn PageFetcher>,
        hashes: Arc<PageHashes>,
        cpu: Arc<CpuMeter>,
    ) -> Result<()> {
        let (u, p) = (self.uffd.clone(), self.pages.clone());
        self.fault = Some(
            crate::threads::spawn("rdmig-pcfault", move || {
                let _cpu = ThreadCpu::start(&cpu);
                let mut stats = FaultStats::new();
                if let Err(e) = fault_loop(&u, &p, &hashes, fault.as_mut(), &mut stats) {
                    report(&p, format!("fault service: {e}"), &e);
                }
                fault.close();
                stats
            })
            .map_err(|e| Error::io("spawning the fault thread", e, "post-copy stream"))?,
        );
        Ok(())
    }

    /// Pauses after a link failure: stops the fault thread and the prefetchers (their
    /// streams shut down), keeps memory registered, so threads of the guest that touch a
    /// missing page wait for it, and keeps what they measured. Returns the pages still
    /// missing; [`PostcopyService::resume_with`] goes on over new fetchers.
    pub fn pause(&mut self) -> u64 {
        let missing = self.interrupt();
        self.pages.reset_after_pause();
        missing
    }

    /// The pages still missing, as a set.
    pub fn missing_set(&self) -> PageSet {
        self.pages.missing_set()
    }

    /// Goes on after [`PostcopyService::pause`] with the fetchers of a new link: a new fault
    /// thread and new prefetchers.
    pub fn resume_with(
        &mut self,
        fetchers: Fetchers,
        hashes: Arc<PageHashes>,
        cpu: Arc<CpuMeter>,
    ) -> Result<()> {
        let Fetchers {
            fault,
            prefetch,
            streams,
            aborts,
        } = fetchers;
        self.streams = streams;
        self.aborts = aborts;
        self.spawn_fault(fault, hashes.clone(), cpu.clone())?;
        // Guest threads blocked on a missing page when the link failed had their fault read
        // by the old fault thread: wake them all, so that each touches its page again and the
        // new fault thread gets the fault (a thread on a page that arrived meanwhile just runs).
        for r in self.map.regions() {
            self.uffd.wake(r.host_ptr(), r.len() as usize)?;
        }
        self.pending_prefetch = prefetch;
        self.start_prefetch(hashes, cpu)
    }

    /// Restarts the post-copy clock (call at resume).
    pub fn mark_resumed(&mut self) {
        self.started = Instant::now();
    }

    /// Starts the prefetchers (after the resume is acknowledged, so that their bulk traffic
    /// does not compete with the switchover messages for the CPUs).
    pub fn start_prefetch(&mut self, hashes: Arc<PageHashes>, cpu: Arc<CpuMeter>) -> Result<()> {
        for (i, mut f) in std::mem::take(&mut self.pending_prefetch)
            .into_iter()
            .enumerate()
        {
            let (u, p, h, c) = (
                self.uffd.clone(),
                self.pages.clone(),
                hashes.clone(),
                cpu.clone(),
            );
            self.prefetch.push(
                crate::threads::spawn(&format!("rdmig-prefetch-{i}"), move || {
                    let _cpu = ThreadCpu::start(&c);
                    lower_priority();
                    let n = prefetch_loop(&u, &p, &h, f.as_mut()).unwrap_or_else(|e| {
                        report(&p, format!("prefetcher {i}: {e}"), &e);
                        0
                    });
                    f.close();
                    n
                })
                .map_err(|e| Error::io("spawning a prefetch thread", e, "post-copy stream"))?,
            );
        }
        Ok(())
    }

    /// Pages still missing.
    pub fn remaining(&self) -> u64 {
        self.pages.remaining()
    }

    /// Resolves the missing pages of `ranges` (checked against the region table), zero at
    /// the source, without fetching them. Returns the pages installed (the rest were present
    /// already or being fetched).
    pub fn install_zero(&self, hashes: &PageHashes, ranges: &[PageRange]) -> Result<u64> {
        let mut n = 0;
        for r in ranges {
            n += self.pages.install_zero(&self.uffd, hashes, *r)?;
        }
        Ok(n)
    }

    /// Pages of the guest.
    pub fn total(&self) -> u64 {
        self.pages.total()
    }

    /// Waits for the last page, or fails with why the service stopped.
    pub fn wait(
        &mut self,
        stall_timeout: Duration,
        progress: &dyn Fn(u64) -> Option<String>,
    ) -> std::result::Result<(), Failure> {
        self.pages.wait(stall_timeout, progress)?;
        self.finished.get_or_insert_with(|| self.started.elapsed());
        Ok(())
    }

    fn stop_threads(&mut self) -> (FaultStats, u64) {
        self.pages.request_stop();
        let mut prefetched = std::mem::take(&mut self.past_prefetched);
        for h in self.prefetch.drain(..) {
            match h.join() {
                Ok(n) => prefetched += n,
                Err(_) => tracing::warn!("a prefetch thread panicked"),
            }
        }
        let mut stats = std::mem::take(&mut self.past_faults);
        if let Some(h) = self.fault.take() {
            match h.join() {
                Ok(s) => {
                    stats.faults += s.faults;
                    if let Err(e) = stats.latency.add(&s.latency) {
                        tracing::warn!("merging fault latencies: {e}");
                    }
                }
                Err(_) => tracing::warn!("the fault thread panicked"),
            }
        }
        (stats, prefetched)
    }

    /// Stops the threads after the last page arrived, unregisters memory and returns the figures.
    pub fn finish(mut self) -> Result<PostcopyStats> {
        let (stats, prefetched) = self.stop_threads();
        self.unregister()?;
        Ok(PostcopyStats {
            missing: self.pages.initial(),
            faults: stats.faults,
            fault_pages: self.pages.fault_pages(),
            prefetched_pages: prefetched,
            duration: self.finished.unwrap_or_else(|| self.started.elapsed()),
            latency_ns: stats.percentiles_ns(),
        })
    }

    /// Stops the threads after a failure (the streams are shut down to unblock them) and
    /// keeps memory registered, so missing pages stay missing until the service is dropped.
    /// Returns the pages still missing.
    pub fn interrupt(&mut self) -> u64 {
        for s in &self.streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for a in &self.aborts {
            a.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let (faults, prefetched) = self.stop_threads();
        self.past_faults = faults;
        self.past_prefetched = prefetched;
        self.pages.remaining()
    }

    fn unregister(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.registered) {
            return Ok(());
        }
        for r in self.map.regions() {
            self.uffd.unregister(r.host_ptr(), r.len() as usize)?;
        }
        Ok(())
    }
}

impl Drop for PostcopyService {
    fn drop(&mut self) {
        if self.fault.is_some() || !self.prefetch.is_empty() {
            self.interrupt();
        }
        if let Err(e) = self.unregister() {
            tracing::warn!("unregistering guest memory from userfaultfd: {e}");
        }
    }
}
