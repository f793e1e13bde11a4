//! The rdmig wire protocol: every message on the control channel and every header on a
//! TCP data stream.
//!
//! ```text
//!  source                                             destination
//!    │ Hello{version, caps, transport, nonce_s} ────────► │
//!    │ ◄──────── HelloAck{version, caps, transport, nonce_d, mac_d}
//!    │ AuthProof{mac_s} ─────────────────────────────────► │   (nothing about memory before this)
//!    │ ◄──────────────────────────────────────────── AuthOk │
//!    │ RegionTable{page size, regions} ──────────────────► │   builds the destination VM
//!    │ DataSetup{transport payload: rkeys, QPs} ─────────► │
//!    │ ◄─────────────────────── DataSetupAck{payload, e.g. QPs}
//!    │   (TCP: N data streams connect, each StreamHello{token, index})
//!    │ ◄───────────────────────────────────────────── Ready │
//!    │ Round{n, chunk, last, final, ranges} … ───────────► │   RDMA: READ ranges; TCP: receive them
//!    │ ◄─────── Landed{n, ranges, hashes} … (caps::LANDED) │   what the round landed, per page
//!    │ ◄──────────────────── RoundDone{n, pages, bytes, µs} │
//!    │   … more rounds; then pause, final round …          │
//!    │ DeviceState{blob} ────────────────────────────────► │
//!    │ Switchover{digest_s} ─────────────────────────────► │   digest compared, state restored, resumed
//!    │ ◄──────────── Complete{digest_d, destination stats} │
//!    │ Finish ───────────────────────────────────────────► │
//!    │ Abort{reason} ◄────────── either way, at any time ─► │
//!
//!   post-copy / hybrid (mode in Hello; caps::POSTCOPY from both ends; 1 + P post-copy streams
//!   connect after the data setup, each StreamHello carrying the post-copy token):
//!    │   … zero (post-copy) or more (hybrid) rounds …
//!    │ PostcopyMissing{early, ranges} … (hybrid only) ───► │   stale pages dropped, source runs
//!    │ ◄──────────────────────── PostcopyDropped{µs, pages} │
//!    │   … pause …
//!    │ DeviceState{blob} ────────────────────────────────► │
//!    │ PostcopyMissing{chunk, last, ranges} … ───────────► │   missing marked, guest resumed
//!    │ ◄──────────────── PostcopyResumed{µs, missing pages} │   faults: PageRequest on stream 0,
//!    │ Switchover{digest_s} (after re-hashing the set) ──► │   prefetch: PageRequest on 1..=P
//!    │ ◄── PostcopyComplete{digest_d, faults, latencies} ── │   every page is here
//!    │ Finish ───────────────────────────────────────────► │
//! ```
//!
//! Framing: a 16-byte [`Header`] (magic `RDMG`, version, command, payload length), then the
//! payload. Every integer is little-endian; every struct has a fixed layout whose size is
//! asserted at compile time and is parsed without `unsafe` (bytemuck). Every length is bounded
//! per command ([`Command::max_payload`]) before anything is allocated.
//!
//! Versioning: [`PROTOCOL_VERSION`] is bumped on any incompatible change; both ends must speak
//! the same version (checked in `Hello`, refused with a clear error otherwise). Optional
//! features are capability bits ([`caps`]) negotiated in `Hello`/`HelloAck`; unknown bits are
//! ignored, so adding a capability is compatible. Command numbers are never reused, and `0`
//! is `Invalid` so a zeroed buffer means nothing.

mod command;
mod landed;
mod layout;
mod le;
mod message;
mod negotiate;
mod stream;

pub use command::Command;
pub use landed::{landed_chunks, Landed, MAX_LANDED_PAGES};
pub use layout::*;
pub use le::{Le128, Le16, Le32, Le64};
pub use message::*;
pub use negotiate::{caps, TransportKind};
pub use stream::{
    DataFrame, DataHeader, PageRequest, StreamHello, DATA_END_OF_ROUND, DATA_PAGES, DATA_POSTCOPY,
    MAX_REQUEST_PAGES, REQ_END, REQ_PAGES, STREAM_MAGIC,
};
