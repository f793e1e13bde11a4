//! The RDMA payloads of `DataSetup` (source → destination) and `DataSetupAck`
//! (destination → source).
//!
//! ```text
//!  SetupHeader (40 bytes)   kind, version, counts, GID, MTU, read depth
//!  QpWire × nqps            QPN, PSN of each RC queue pair
//!  RegionKeyWire × nregions host address, length and rkey of each source region (DataSetup only)
//! ```
//!
//! Every field is little-endian with a fixed layout whose size is asserted at compile time;
//! parsing is done without `unsafe` (bytemuck) and rejects wrong kinds, unknown versions,
//! counts out of bounds and payloads whose length does not match the counts exactly. Both
//! payloads travel only after mutual authentication (the driver orders it).

use bytemuck::{Pod, Zeroable};

use super::qp::MTU_CODES;
use super::{Gid, Psn, Qpn, RKey};
use crate::error::{Error, Result};
use crate::wire::{Le16, Le32, Le64, MAX_REGIONS, MAX_SETUP};

/// Most queue pairs one data path may use.
pub const MAX_QPS: usize = 64;

/// Version of the RDMA setup payload.
pub const SETUP_VERSION: u16 = 1;

/// `kind` of a `DataSetup` payload.
pub const KIND_SETUP: [u8; 4] = *b"RQSU";
/// `kind` of a `DataSetupAck` payload.
pub const KIND_ACK: [u8; 4] = *b"RQAK";

/// Fixed header of both payloads.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct SetupHeader {
    /// [`KIND_SETUP`] or [`KIND_ACK`].
    pub kind: [u8; 4],
    /// [`SETUP_VERSION`].
    pub version: Le16,
    /// Queue pairs listed after the header.
    pub nqps: Le16,
    /// Regions listed after the queue pairs (0 in an ack).
    pub nregions: Le32,
    /// Active path MTU of the sender's port, as the verbs enum (1 = 256 … 5 = 4096).
    pub mtu: Le32,
    /// RDMA READs the sender handles at once per QP: as responder (setup) or initiator (ack).
    pub rd_atomic: Le32,
    /// Reserved, zero.
    pub reserved: Le32,
    /// The sender's GID (RoCE v2: an IPv4-mapped or IPv6 address).
    pub gid: [u8; 16],
}

/// One queue pair.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct QpWire {
    /// Queue pair number (24 bits).
    pub qpn: Le32,
    /// Initial packet sequence number (24 bits).
    pub psn: Le32,
}

/// One registered source region.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RegionKeyWire {
    /// Host virtual address of the region's first byte in the source process.
    pub addr: Le64,
    /// Length in bytes.
    pub len: Le64,
    /// Remote key of the region (REMOTE_READ only).
    pub rkey: Le32,
    /// Reserved, zero.
    pub reserved: Le32,
}

const _: () = assert!(size_of::<SetupHeader>() == 40);
const _: () = assert!(size_of::<QpWire>() == 8);
const _: () = assert!(size_of::<RegionKeyWire>() == 24);
const _: () = assert!(
    size_of::<SetupHeader>()
        + MAX_QPS * size_of::<QpWire>()
        + MAX_REGIONS * size_of::<RegionKeyWire>()
        <= MAX_SETUP
);

/// A queue pair's connection data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpInfo {
    /// Its number.
    pub qpn: Qpn,
    /// Its initial send PSN.
    pub psn: Psn,
}

/// A source region as the destination reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Host address in the source process.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Its remote key.
    pub rkey: RKey,
}

/// A parsed `DataSetup` or `DataSetupAck` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// The sender's GID.
    pub gid: Gid,
    /// The sender's active MTU (verbs enum, 1..=5).
    pub mtu: u32,
    /// READs in flight per QP the sender handles.
    pub rd_atomic: u32,
    /// Queue pairs.
    pub qps: Vec<QpInfo>,
    /// Regions (empty in an ack).
    pub regions: Vec<RemoteRegion>,
}

impl Setup {
    /// Encodes the payload (a `DataSetup` when `regions` is non-empty, else an ack).
    pub fn encode(&self, kind: [u8; 4]) -> Vec<u8> {
        let h = SetupHeader {
            kind,
            version: Le16::new(SETUP_VERSION),
            nqps: Le16::new(self.qps.len() as u16),
            nregions: Le32::new(self.regions.len() as u32),
            mtu: Le32::new(self.mtu),
            rd_atomic: Le32::new(self.rd_atomic),
            reserved: Le32::new(0),
            gid: self.gid.0,
        };
        let mut out = Vec::with_capacity(
            size_of::<SetupHeader>()
                + self.qps.len() * size_of::<QpWire>()
                + self.regions.len() * size_of::<RegionKeyWire>(),
        );
        out.extend_from_slice(bytemuck::bytes_of(&h));
        for q in &self.qps {
            let w = QpWire {
                qpn: Le32::new(q.qpn.0),
                psn: Le32::new(q.psn.0),
            };
            out.extend_from_slice(bytemuck::bytes_of(&w));
        }
        for r in &self.regions {
            let w = RegionKeyWire {
                addr: Le64::new(r.addr),
                len: Le64::new(r.len),
                rkey: Le32::new(r.rkey.0),
                reserved: Le32::new(0),
            };
            out.extend_from_slice(bytemuck::bytes_of(&w));
        }
        out
    }

    /// Parses and bounds-checks a payload of the given kind.
    pub fn decode(kind: [u8; 4], p: &[u8]) -> Result<Setup> {
        let what = if kind == KIND_SETUP {
            "RDMA DataSetup"
        } else {
            "RDMA DataSetupAck"
        };
        if p.len() > MAX_SETUP {
            return Err(Error::Protocol(format!(
                "{what} is {} bytes, at most {MAX_SETUP}",
                p.len()
            )));
        }
        if p.len() < size_of::<SetupHeader>() {
            return Err(Error::Protocol(format!(
                "{what} truncated: {} bytes, the header alone is {}",
                p.len(),
                size_of::<SetupHeader>()
            )));
        }
        let (head, rest) = p.split_at(size_of::<SetupHeader>());
        let h: SetupHeader = bytemuck::pod_read_unaligned(head);
        if h.kind != kind {
            return Err(Error::Protocol(format!(
                "{what}: wrong payload kind {:02x?}",
                h.kind
            )));
        }
        if h.version.get() != SETUP_VERSION {
            return Err(Error::Protocol(format!(
                "{what}: setup version {}, this build speaks {SETUP_VERSION}",
                h.version.get()
            )));
        }
        let nqps = h.nqps.get() as usize;
        let nregions = h.nregions.get() as usize;
        if nqps == 0 || nqps > MAX_QPS {
            return Err(Error::Protocol(format!(
                "{what} lists {nqps} queue pairs (1..={MAX_QPS})"
            )));
        }
        let max_regions = if kind == KIND_SETUP { MAX_REGIONS } else { 0 };
        if (kind == KIND_SETUP && nregions == 0) || nregions > max_regions {
            return Err(Error::Protocol(format!(
                "{what} lists {nregions} regions (at most {max_regions})"
            )));
        }
        let want = nqps * size_of::<QpWire>() + nregions * size_of::<RegionKeyWire>();
        if rest.len() != want {
            return Err(Error::Protocol(format!(
                "{what} announces {nqps} queue pairs and {nregions} regions ({want} bytes) but carries {} \
                 (truncated or trailing data)",
                rest.len()
            )));
        }
        let mtu = h.mtu.get();
        if !MTU_CODES.contains(&mtu) {
            return Err(Error::Protocol(format!(
                "{what}: MTU code {mtu} ({}..={})",
                MTU_CODES.start(),
                MTU_CODES.end()
            )));
        }
        let rd_atomic = h.rd_atomic.get();
        if rd_atomic == 0 || rd_atomic > 255 {
            return Err(Error::Protocol(format!(
                "{what}: read depth {rd_atomic} (1..=255)"
            )));
        }
        let gid = Gid(h.gid);
        if gid.is_zero() {
            return Err(Error::Protocol(format!("{what}: zero GID")));
        }
        let (qp_bytes, region_bytes) = rest.split_at(nqps * size_of::<QpWire>());
        let mut qps = Vec::with_capacity(nqps);
        for c in qp_bytes.chunks_exact(size_of::<QpWire>()) {
            let w: QpWire = bytemuck::pod_read_unaligned(c);
            let (qpn, psn) = (w.qpn.get(), w.psn.get());
            if qpn == 0 || qpn > 0xff_ffff || psn > 0xff_ffff {
                return Err(Error::Protocol(format!(
                    "{what}: bad queue pair {qpn:#x} / PSN {psn:#x}"
                )));
            }
            qps.push(QpInfo {
                qpn: Qpn(qpn),
                psn: Psn(psn),
            });
        }
        let mut regions = Vec::with_capacity(nregions);
        for c in region_bytes.chunks_exact(size_of::<RegionKeyWire>()) {
            let w: RegionKeyWire = bytemuck::pod_read_unaligned(c);
            let (addr, len) = (w.addr.get(), w.len.get());
            if len == 0 || addr.checked_add(len).is_none() {
                return Err(Error::Protocol(format!(
                    "{what}: bad region at {addr:#x} of {len} bytes"
                )));
            }
            regions.push(RemoteRegion {
                addr,
                len,
                rkey: RKey(w.rkey.get()),
            });
        }
        Ok(Setup {
            gid,
            mtu,
            rd_atomic,
            qps,
            regions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(nqps: usize, nregions: usize) -> Setup {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 99, 0, 1]);
        Setup {
            gid: Gid(gid),
            mtu: 3,
            rd_atomic: 16,
            qps: (0..nqps)
                .map(|i| QpInfo {
                    qpn: Qpn(17 + i as u32),
                    psn: Psn(0x1234 + i as u32),
                })
                .collect(),
            regions: (0..nregions)
                .map(|i| RemoteRegion {
                    addr: 0x7f00_0000_0000 + (i as u64) * (1 << 30),
                    len: 1 << 20,
                    rkey: RKey(i as u32 + 5),
                })
                .collect(),
        }
    }

    #[test]
    fn round_trips() {
        let s = sample(4, 3);
        assert_eq!(Setup::decode(KIND_SETUP, &s.encode(KIND_SETUP)).unwrap(), s);
        let a = sample(2, 0);
        assert_eq!(Setup::decode(KIND_ACK, &a.encode(KIND_ACK)).unwrap(), a);
    }

    #[test]
    fn rejects_truncated_and_trailing() {
        let b = sample(4, 3).encode(KIND_SETUP);
        for cut in [0, 10, 39, 40, 47, b.len() - 1] {
            let e = Setup::decode(KIND_SETUP, &b[..cut])
                .unwrap_err()
                .to_string();
            assert!(e.contains("truncated"), "{cut}: {e}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(Setup::decode(KIND_SETUP, &long)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        let huge = vec![0u8; MAX_SETUP + 1];
        assert!(Setup::decode(KIND_SETUP, &huge)
            .unwrap_err()
            .to_string()
            .contains("at most"));
    }

    #[test]
    fn rejects_bad_counts_and_fields() {
        let b = sample(4, 3).encode(KIND_SETUP);
        let patch = |off: usize, bytes: &[u8]| {
            let mut c = b.clone();
            c[off..off + bytes.len()].copy_from_slice(bytes);
            Setup::decode(KIND_SETUP, &c).unwrap_err().to_string()
        };
        // Count says 5 queue pairs, 4 are there (and vice versa): length mismatch.
        assert!(patch(6, &5u16.to_le_bytes()).contains("announces"));
        assert!(patch(8, &2u32.to_le_bytes()).contains("announces"));
        // Out-of-bounds counts.
        assert!(patch(6, &0u16.to_le_bytes()).contains("queue pairs"));
        assert!(patch(6, &65u16.to_le_bytes()).contains("queue pairs"));
        assert!(patch(8, &0u32.to_le_bytes()).contains("regions"));
        assert!(patch(8, &u32::MAX.to_le_bytes()).contains("regions"));
        // Kind, version, MTU, depth, GID.
        assert!(patch(0, b"RQAK").contains("kind"));
        assert!(patch(4, &2u16.to_le_bytes()).contains("version"));
        assert!(patch(12, &9u32.to_le_bytes()).contains("MTU"));
        assert!(patch(16, &0u32.to_le_bytes()).contains("depth"));
        assert!(patch(24, &[0u8; 16]).contains("GID"));
        // A queue pair number over 24 bits; a region that wraps the address space; a zero length.
        assert!(patch(40, &0x0100_0000u32.to_le_bytes()).contains("queue pair"));
        let r0 = 40 + 4 * 8;
        assert!(patch(r0, &u64::MAX.to_le_bytes()).contains("bad region"));
        assert!(patch(r0 + 8, &0u64.to_le_bytes()).contains("bad region"));
        // An ack must not carry regions.
        let mut ack = sample(1, 1);
        ack.regions.truncate(1);
        assert!(Setup::decode(KIND_ACK, &ack.encode(KIND_ACK))
            .unwrap_err()
            .to_string()
            .contains("regions"));
    }
}
