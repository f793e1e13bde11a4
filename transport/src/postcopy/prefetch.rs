//! The destination's prefetcher: pulls every page still missing over a bulk post-copy
//! fetcher, in chunks picked from the latest fault onwards (so the pages next to what the
//! guest touches arrive first), several chunks in flight, each installed with `UFFDIO_COPY`
//! (EEXIST means a fault got there first: its waiters are woken and it is skipped); with
//! memfd guest memory each chunk lands in the second mapping and is mapped with
//! `UFFDIO_CONTINUE` instead.

use std::collections::VecDeque;

use super::fetch::PageFetcher;
use super::missing::MissingPages;
use super::uffd::Uffd;
use crate::digest::PageHashes;
use crate::error::Result;

/// Chunks in flight per prefetch stream.
pub const DEPTH: usize = 3;

/// Pages per prefetch chunk for a page size: 256 KiB worth, at least one page.
pub fn chunk_pages(page_bytes: u64) -> u64 {
    ((256u64 << 10) / page_bytes).max(1)
}

/// Staging memory a prefetcher with buffers of its own (RDMA) should have for pages of
/// `page` bytes: [`DEPTH`] chunks.
pub fn staging_bytes(page: usize) -> usize {
    chunk_pages(page as u64) as usize * page * DEPTH
}

/// Prefetches until no missing page is left unrequested (or `pages` says stop). Returns the
/// pages this prefetcher installed.
pub fn prefetch_loop(
    uffd: &Uffd,
    pages: &MissingPages,
    hashes: &PageHashes,
    fetcher: &mut dyn PageFetcher,
) -> Result<u64> {
    let page = pages.page_bytes();
    if pages.is_in_place() {
        return prefetch_in_place(uffd, pages, hashes, fetcher);
    }
    // Chunks go to the fetcher's own staging memory when it has some (RDMA: registered).
    let mut own: Vec<u8> = Vec::new();
    let (base, chunk, depth) = match fetcher.staging() {
        Some((p, len)) if len >= page => {
            let chunk = chunk_pages(page as u64).min((len / page) as u64);
            (p, chunk, (len / (chunk as usize * page)).min(DEPTH))
        }
        Some((_, len)) => {
            return Err(crate::error::Error::InvalidConfig(format!(
                "a staging buffer of {len} bytes cannot hold a {page}-byte page"
            )))
        }
        None => {
            let chunk = chunk_pages(page as u64);
            own.resize(chunk as usize * page * DEPTH, 0);
            (own.as_mut_ptr(), chunk, DEPTH)
        }
    };
    let slot = chunk as usize * page;
    let mut free: VecDeque<usize> = (0..depth).collect();
    let mut inflight: VecDeque<usize> = VecDeque::new();
    let mut installed = 0;
    loop {
        while !pages.stopping() && !free.is_empty() {
            let Some(r) = pages.pick(chunk) else { break };
            let s = free.pop_front().expect("checked non-empty");
            // SAFETY: slot s of the staging memory is free (not in flight) and stays ours until completed.
            unsafe { fetcher.start(r, base.add(s * slot))? };
            inflight.push_back(s);
        }
        let Some(s) = inflight.pop_front() else { break };
        let r = fetcher.complete()?;
        // Staging memory, never guest memory (the guest cannot write it), and no fetch writes
        // slot s until it is handed out again below.
        // SAFETY: slot s was filled by the completed fetch and lies inside the staging memory.
        let bytes = unsafe { std::slice::from_raw_parts(base.add(s * slot), slot) };
        installed += pages.install(uffd, hashes, r, bytes, false)?;
        free.push_back(s);
    }
    Ok(installed)
}

/// Zero-copy prefetching: each chunk is fetched straight into its place in the second mapping
/// and mapped with `UFFDIO_CONTINUE`.
fn prefetch_in_place(
    uffd: &Uffd,
    pages: &MissingPages,
    hashes: &PageHashes,
    fetcher: &mut dyn PageFetcher,
) -> Result<u64> {
    let chunk = chunk_pages(pages.page_bytes() as u64);
    let mut inflight = 0usize;
    let mut installed = 0;
    loop {
        while !pages.stopping() && inflight < DEPTH {
            let Some(r) = pages.pick(chunk) else { break };
            let (dst, _) = pages.alias_span(&r)?;
            // `pick` claimed them: no other fetch writes them, and the guest cannot see them yet.
            // SAFETY: the pages' place in the second mapping, ours until their complete.
            unsafe { fetcher.start(r, dst)? };
            inflight += 1;
        }
        if inflight == 0 {
            break;
        }
        let r = fetcher.complete()?;
        inflight -= 1;
        installed += pages.install_in_place(uffd, hashes, r, false, None)?;
    }
    Ok(installed)
}
