//! The fixed little-endian layout of every control message: the frame header and one `Pod`
//! struct per fixed-size payload, their sizes asserted at compile time.

use bytemuck::{Pod, Zeroable};

use super::le::{Le128, Le16, Le32, Le64};

/// Length of the nonces exchanged in `Hello`/`HelloAck`.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag (`HelloAck`, `AuthProof`, a stream's token).
pub const MAC_LEN: usize = 32;

/// Frame header of every control message.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct Header {
    /// [`MAGIC`](super::MAGIC).
    pub magic: [u8; 4],
    /// [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).
    pub version: Le16,
    /// A [`Command`](super::Command).
    pub command: Le16,
    /// Payload bytes that follow.
    pub length: Le32,
    /// Zero.
    pub reserved: Le32,
}

/// `Hello` payload.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct HelloWire {
    /// Protocol version of the source.
    pub version: Le16,
    /// A [`TransportKind`](super::TransportKind) request.
    pub transport: u8,
    /// Migration mode: 0 pre-copy (what a zeroed byte means), 1 post-copy, 2 hybrid.
    pub mode: u8,
    /// [`caps`](super::caps) bits.
    pub caps: Le32,
    /// TCP data streams the source will open.
    pub streams: Le16,
    /// RDMA queue pairs requested.
    pub qps: Le16,
    /// Bandwidth cap in bytes/s (0 = none), applied by whichever end moves data.
    pub max_bandwidth: Le64,
    /// Source nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// `HelloAck` fixed part; followed by the UTF-8 reason for the transport choice.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct HelloAckWire {
    /// Protocol version of the destination.
    pub version: Le16,
    /// The chosen [`TransportKind`](super::TransportKind) (never `Auto`).
    pub transport: u8,
    /// Zero.
    pub reserved0: u8,
    /// [`caps`](super::caps) bits.
    pub caps: Le32,
    /// Destination nonce.
    pub nonce: [u8; NONCE_LEN],
    /// HMAC proving the destination holds the key.
    pub mac: [u8; MAC_LEN],
}

/// `RegionTable` fixed part; followed by `count` [`RegionWire`].
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RegionTableWire {
    /// Page size in bytes.
    pub page_size: Le32,
    /// Number of regions.
    pub count: Le32,
}

/// One region in a `RegionTable`.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RegionWire {
    /// Guest physical address.
    pub gpa: Le64,
    /// Length in bytes.
    pub len: Le64,
}

/// Round flag: the last chunk of this round.
pub const ROUND_LAST_CHUNK: u32 = 1;
/// Round flag: the stop-and-copy round (the source VM is paused).
pub const ROUND_FINAL: u32 = 2;
/// Round flag: this chunk's ranges are zero pages. No page bytes follow on the data path; the
/// destination makes them zero where its copy may not be (only with [`super::caps::ZERO_PAGES`]).
pub const ROUND_ZERO: u32 = 4;

/// `Round` fixed part; followed by `count` [`RangeWire`].
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RoundWire {
    /// Round number (0 = all memory).
    pub round: Le32,
    /// Chunk number within the round.
    pub chunk: Le32,
    /// `ROUND_*` flags.
    pub flags: Le32,
    /// Number of ranges that follow.
    pub count: Le32,
}

/// One page range.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RangeWire {
    /// Region index.
    pub region: Le32,
    /// Pages in the range.
    pub npages: Le32,
    /// First page, relative to the region.
    pub first: Le64,
}

/// `RoundDone` payload.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RoundDoneWire {
    /// Round number.
    pub round: Le32,
    /// Zero.
    pub reserved: Le32,
    /// Pages landed.
    pub pages: Le64,
    /// Bytes landed.
    pub bytes: Le64,
    /// Destination time for the round, µs.
    pub micros: Le64,
}

/// `Switchover` payload.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct SwitchoverWire {
    /// The source's memory digest.
    pub digest: Le128,
    /// Total guest pages covered by the digest.
    pub pages: Le64,
    /// Zero.
    pub reserved: Le64,
}

/// `Complete` payload.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct CompleteWire {
    /// The destination's memory digest.
    pub digest: Le128,
    /// CPU time the destination's migration threads used, µs.
    pub cpu_micros: Le64,
    /// Destination time from `Switchover` received to the VM resumed, µs.
    pub resume_micros: Le64,
    /// Pages the destination received in all.
    pub pages: Le64,
    /// Bytes the destination received in all.
    pub bytes: Le64,
}

/// `PostcopyMissing` flag: the last chunk of the set.
pub const POSTCOPY_LAST_CHUNK: u32 = 1;
/// `PostcopyMissing` flag: sent while the source still runs (hybrid): drop these pages now,
/// answer `PostcopyDropped`; the rest of the set follows the device state.
pub const POSTCOPY_EARLY: u32 = 2;
/// `PostcopyMissing` flag: sent after the destination resumed; these missing pages are zero at
/// the source: resolve them without a fetch (`UFFDIO_ZEROPAGE`, or zeroed in place for memfd
/// memory). Chunks are numbered from 0 and precede the source's digest (`Switchover`).
pub const POSTCOPY_ZERO: u32 = 4;
/// `PostcopyMissing` flag: destination → source after a recovery's `AuthOk`: the pages the
/// destination still lacks (chunks numbered from 0, the last with `POSTCOPY_LAST_CHUNK`).
pub const POSTCOPY_RECOVER: u32 = 8;

/// `PostcopyResumed` payload (also `PostcopyDropped`: µs to drop, pages dropped).
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct PostcopyResumedWire {
    /// Destination time from the last `PostcopyMissing` chunk to the guest resumed, µs.
    pub resume_micros: Le64,
    /// Pages the destination marked missing.
    pub missing: Le64,
}

/// `Params` payload: parameters changed while the migration runs.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct ParamsWire {
    /// The bandwidth cap in bytes/s from the next round on (0: none).
    pub max_bandwidth: Le64,
    /// Zero.
    pub reserved: Le64,
}

/// `Fail` payload, before its text.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct FailWire {
    /// `crate::abort::AbortCode`'s encoding.
    pub code: Le16,
    /// Zero.
    pub reserved: Le16,
}

/// `VmInfo` payload, before the kind's name.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct VmInfoWire {
    /// The device-state format version.
    pub state_version: Le32,
    /// Zero.
    pub reserved: Le32,
}

/// `PostcopyComplete` payload.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct PostcopyCompleteWire {
    /// The destination's memory digest.
    pub digest: Le128,
    /// CPU time of the destination's migration threads, µs.
    pub cpu_micros: Le64,
    /// Pages received in all (pre-copy rounds and post-copy).
    pub pages: Le64,
    /// Bytes received in all.
    pub bytes: Le64,
    /// Fault events served.
    pub faults: Le64,
    /// Pages installed by the fault service (the rest were prefetched).
    pub fault_pages: Le64,
    /// From resume to the last page installed, µs.
    pub postcopy_micros: Le64,
    /// Fault latency percentiles (fault read to `UFFDIO_COPY` done), ns: p50, p90, p99, p99.9, max.
    pub latency_ns: [Le64; 5],
}

const _: () = {
    assert!(size_of::<PostcopyResumedWire>() == 16);
    assert!(size_of::<ParamsWire>() == 16);
    assert!(size_of::<FailWire>() == 4);
    assert!(size_of::<VmInfoWire>() == 8);
    assert!(size_of::<PostcopyCompleteWire>() == 104);
    assert!(size_of::<Header>() == 16);
    assert!(size_of::<HelloWire>() == 52);
    assert!(size_of::<HelloAckWire>() == 72);
    assert!(size_of::<RegionTableWire>() == 8);
    assert!(size_of::<RegionWire>() == 16);
    assert!(size_of::<RoundWire>() == 16);
    assert!(size_of::<RangeWire>() == 16);
    assert!(size_of::<RoundDoneWire>() == 32);
    assert!(size_of::<SwitchoverWire>() == 32);
    assert!(size_of::<CompleteWire>() == 48);
};
