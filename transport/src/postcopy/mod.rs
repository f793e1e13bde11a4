//! Post-copy: the guest runs on the destination before all of its memory has arrived.
//!
//! At switchover the source pauses and sends its device state and the post-copy set (pages
//! the destination does not hold validly). The destination drops the stale ones
//! (`MADV_DONTNEED`), registers guest memory with userfaultfd ([`uffd`]) in MISSING mode and
//! resumes the guest at once, so the downtime does not depend on how much memory is left.
//!
//! - [`fault`]: a thread reads fault events in batches, coalesces faults on one page, fetches
//!   the pages through a [`PageFetcher`] of its own (TCP: a dedicated page-request stream, so
//!   a fault never waits behind bulk data) and installs them with `UFFDIO_COPY`.
//! - [`fetch`]: the [`PageFetcher`] seam the transports implement.
//! - [`prefetch`]: threads pull every remaining page over the bulk post-copy streams, nearest
//!   to the latest fault first, so the migration ends in bounded time.
//! - [`missing`]: the shared page state and the installer (EEXIST is a wake: someone else
//!   installed the page first). Installed pages are hashed from the staging buffer into the
//!   digest table, compared with the source's at the end as in pre-copy.
//! - [`service`]: the destination's service as one object with an ordered teardown.
//!
//! - [`alias`]: zero-copy for memfd guest memory: fetches land in a second mapping of the
//!   memfd and `UFFDIO_CONTINUE` maps them (userfaultfd MINOR mode).
//!
//! [`PageFetcher`] is the seam between the service and the transports:
//! [`crate::tcp::TcpPageFetcher`] (a request stream answered by the source's
//! [`crate::tcp::PageServer`]) and [`crate::rdma::RdmaPageFetcher`] (one READ per fault on a
//! QP of its own). This module depends on neither.

pub mod alias;
pub mod fault;
pub mod fetch;
pub mod missing;
pub mod prefetch;
pub mod remnant;
pub mod service;
pub mod uffd;

pub use alias::AliasMap;
pub use fetch::PageFetcher;
pub use missing::{Failure, MissingPages};
pub use remnant::{PausedGuest, PostcopyRemnant};
pub use service::{drop_pages, lower_priority, Fetchers, PostcopyService, PostcopyStats};
pub use uffd::Uffd;

/// Most prefetch streams (beyond the fault stream).
pub const MAX_PREFETCH_STREAMS: u16 = 4;

/// Post-copy streams both ends open for a session with `streams` pre-copy streams: the fault
/// stream plus one prefetch stream per data stream, at most [`MAX_PREFETCH_STREAMS`].
pub fn stream_count(streams: u16) -> u16 {
    1 + streams.clamp(1, MAX_PREFETCH_STREAMS)
}
