//! The RDMA data path: one-sided READs over RC queue pairs, via `sideway`.
//!
//! The destination pulls every page of every round from the source's registered memory; the
//! source CPU does no per-page work. Layers, one file each:
//!
//! | file | concern |
//! | --- | --- |
//! | [`device`] | device, port and RoCE v2 GID discovery; device limits |
//! | [`mr`] | registration (REMOTE_READ on the source, LOCAL_WRITE on the destination), RLIMIT_MEMLOCK |
//! | [`qp`] | RC queue pairs on a shared CQ, INIT → RTR → RTS |
//! | [`setup`] | the `DataSetup` / `DataSetupAck` payloads (QPN, PSN, GID, region keys) |
//! | [`engine`] | the read engine: READs spread over QPs, batched posting and polling |
//! | [`fetch`] | post-copy: page fetches as READs into a registered staging buffer |
//! | [`source`] / [`dest`] | the two [`crate::data`] path ends the migration driver uses |
//! | `transport` | [`RdmaSource`] / [`RdmaDest`]: the transport plug-in ([`crate::data`]) |
//!
//! Keys and QP numbers travel only in `DataSetup`/`DataSetupAck`, after authentication.
//! `sideway` loads libibverbs at run time, so [`probe`] on a host without rdma-core returns a
//! reason, and `auto` falls back to TCP.

use std::net::IpAddr;

pub mod dest;
pub mod device;
pub mod engine;
pub mod fetch;
pub mod mr;
pub mod qp;
pub mod setup;
pub mod source;
mod transport;

pub use dest::RdmaDestPath;
pub use engine::{Read, ReadEngine};
pub use fetch::{RdmaPageFetcher, Staging};
pub use source::RdmaSourcePath;
pub use transport::{RdmaDest, RdmaSource};

/// How to pick and use the RDMA device.
#[derive(Clone, Debug, Default)]
pub struct RdmaOptions {
    /// Device name (`-d`), or the one whose RoCE v2 GID matches `local_addr`.
    pub device: Option<String>,
    /// GID index (`-x`), or the RoCE v2 GID of `local_addr`.
    pub gid_index: Option<u8>,
    /// Port number (1-based); default: the first active RoCE port.
    pub port: Option<u8>,
    /// Queue pairs.
    pub qps: u16,
    /// The address the control channel uses on this host.
    pub local_addr: Option<IpAddr>,
}

/// A usable device, as found by [`probe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSummary {
    /// Device name.
    pub name: String,
    /// Port.
    pub port: u8,
    /// GID index.
    pub gid_index: u8,
}

/// A remote key (what the peer names our memory with).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RKey(pub u32);

/// A local key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LKey(pub u32);

/// A queue pair number (24 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Qpn(pub u32);

/// A packet sequence number (24 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Psn(pub u32);

/// A global identifier (RoCE v2: an IPv6 or IPv4-mapped address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gid(pub [u8; 16]);

impl std::fmt::Display for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::net::Ipv6Addr::from(self.0))
    }
}

/// Finds a usable device (active RoCE port with a RoCE v2 GID), or says why there is none.
pub fn probe(opts: &RdmaOptions) -> std::result::Result<DeviceSummary, String> {
    device::open(opts).map(|d| d.summary)
}
