//! RC queue pairs: a set of extended QPs sharing one extended CQ, created on the device's
//! protection domain and connected INIT → RTR → RTS with the peer's QPN, PSN and GID.
//!
//! The source's QPs are responders only (REMOTE_READ allowed on the QP, `max_dest_rd_atomic`
//! from the device); the destination's are initiators only (no remote access,
//! `max_rd_atomic` = the smaller of its own limit and the depth the source offers).

use std::sync::Arc;

use sideway::ibverbs::address::{AddressHandleAttribute, Gid as VerbsGid};
use sideway::ibverbs::completion::{
    CreateCompletionQueueWorkCompletionFlags as WcFlags, ExtendedCompletionQueue,
};
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    ExtendedQueuePair, QueuePair, QueuePairAttribute, QueuePairState, SendOperationFlags,
};
use sideway::ibverbs::AccessFlags;

use super::device::Device;
use super::setup::QpInfo;
use super::{Gid, Psn, Qpn};
use crate::error::{Error, Result};

/// Which end of the READs a QP set serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves incoming READs (source).
    Responder,
    /// Issues READs (destination).
    Initiator,
}

/// RC queue pairs on one device, sharing a completion queue.
pub struct QpSet {
    // Field order is drop order: QPs before the CQ before the PD (sideway's Arcs also enforce it).
    pub(crate) qps: Vec<ExtendedQueuePair>,
    pub(crate) cq: Arc<ExtendedCompletionQueue>,
    pub(crate) pd: Arc<ProtectionDomain>,
    local: Vec<QpInfo>,
    role: Role,
    /// Send-queue slots per QP (initiator).
    pub depth: u32,
}

/// A new protection domain on `dev`.
pub fn alloc_pd(dev: &Device) -> Result<Arc<ProtectionDomain>> {
    dev.ctx
        .alloc_pd()
        .map_err(|e| rdma_err("allocating a protection domain", e))
}

fn rdma_err(what: &str, e: impl std::error::Error) -> Error {
    let os = std::error::Error::source(&e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    Error::Rdma(format!("{what}: {e}{os}"))
}

fn random_psn() -> Psn {
    let mut b = [0u8; 4];
    if getrandom::getrandom(&mut b).is_err() {
        b = 0x5eed_u32.to_le_bytes();
    }
    Psn(u32::from_le_bytes(b) & 0xff_ffff)
}

/// Verbs MTU codes sideway's [`Mtu`] knows (its `From<u32>` panics on others).
pub(crate) const MTU_CODES: std::ops::RangeInclusive<u32> =
    Mtu::Mtu256 as u32..=Mtu::Mtu4096 as u32;

/// The verbs MTU `code` as sideway's [`Mtu`]; an unknown code (the setup check rejects them
/// from the peer) means 4096.
fn mtu(code: u32) -> Mtu {
    if MTU_CODES.contains(&code) {
        Mtu::from(code)
    } else {
        Mtu::Mtu4096
    }
}

impl QpSet {
    /// Creates `n` RC QPs with `depth` send slots each (responders get a minimal queue).
    pub fn create(dev: &Device, n: usize, depth: u32, role: Role) -> Result<QpSet> {
        QpSet::create_in(dev, alloc_pd(dev)?, n, depth, role)
    }

    /// Like [`QpSet::create`], in an existing protection domain (QPs that share a
    /// registration: a memory region is usable by every QP of its domain).
    pub fn create_in(
        dev: &Device,
        pd: Arc<ProtectionDomain>,
        n: usize,
        depth: u32,
        role: Role,
    ) -> Result<QpSet> {
        let depth = match role {
            Role::Initiator => depth.clamp(1, dev.limits.max_qp_wr.max(1)),
            Role::Responder => 1,
        };
        let cqe = (depth as u64 * n as u64 + 16).min(u64::from(dev.limits.max_cqe.max(64))) as u32;
        let cq = dev
            .ctx
            .create_cq_builder()
            .setup_cqe(cqe)
            .setup_wc_flags(WcFlags::ByteLength)
            .build_ex()
            .map_err(|e| rdma_err("creating a completion queue", e))?;
        let mut qps = Vec::with_capacity(n);
        let mut local = Vec::with_capacity(n);
        for _ in 0..n {
            let mut b = pd.create_qp_builder();
            b.setup_max_send_wr(depth)
                .setup_max_recv_wr(1)
                .setup_max_send_sge(1)
                .setup_max_recv_sge(1)
                .setup_send_ops_flags(SendOperationFlags::Read)
                .setup_send_cq(cq.clone())
                .setup_recv_cq(cq.clone());
            let mut qp = b
                .build_ex()
                .map_err(|e| rdma_err("creating an RC queue pair", e))?;
            let mut attr = QueuePairAttribute::new();
            let access = match role {
                Role::Responder => AccessFlags::RemoteRead,
                Role::Initiator => AccessFlags::none(),
            };
            attr.setup_state(QueuePairState::Init)
                .setup_pkey_index(0)
                .setup_port(dev.summary.port)
                .setup_access_flags(access);
            qp.modify(&attr)
                .map_err(|e| rdma_err("moving a queue pair to INIT", e))?;
            local.push(QpInfo {
                qpn: Qpn(qp.qp_number()),
                psn: random_psn(),
            });
            qps.push(qp);
        }
        Ok(QpSet {
            qps,
            cq,
            pd,
            local,
            role,
            depth,
        })
    }

    /// This end's QPNs and PSNs, for the peer.
    pub fn local(&self) -> &[QpInfo] {
        &self.local
    }

    /// Number of QPs.
    pub fn len(&self) -> usize {
        self.qps.len()
    }

    /// True when there are no QPs.
    pub fn is_empty(&self) -> bool {
        self.qps.is_empty()
    }

    /// Connects QP i to the peer's QP i: RTR then RTS.
    ///
    /// `rd_atomic` is READs in flight per QP: responder resources for a responder, initiator
    /// depth for an initiator; `mtu_code` the smaller of both ends' active MTUs.
    pub fn connect(
        &mut self,
        dev: &Device,
        remote: &[QpInfo],
        remote_gid: Gid,
        mtu_code: u32,
        rd_atomic: u8,
    ) -> Result<()> {
        if remote.len() != self.qps.len() {
            return Err(Error::Protocol(format!(
                "peer has {} queue pairs, this end {}",
                remote.len(),
                self.qps.len()
            )));
        }
        let rd_atomic = rd_atomic.max(1);
        for ((qp, me), peer) in self.qps.iter_mut().zip(&self.local).zip(remote) {
            let mut ah = AddressHandleAttribute::new();
            ah.setup_port(dev.summary.port).setup_grh(
                &VerbsGid { raw: remote_gid.0 },
                0,
                dev.summary.gid_index,
                64,
                0,
            );
            let mut rtr = QueuePairAttribute::new();
            rtr.setup_state(QueuePairState::ReadyToReceive)
                .setup_path_mtu(mtu(mtu_code))
                .setup_dest_qp_num(peer.qpn.0)
                .setup_rq_psn(peer.psn.0)
                .setup_max_dest_read_atomic(if self.role == Role::Responder {
                    rd_atomic
                } else {
                    1
                })
                .setup_min_rnr_timer(12)
                .setup_address_vector(&ah);
            qp.modify(&rtr).map_err(|e| {
                rdma_err(
                    &format!(
                        "moving QP {:#x} to RTR (peer QP {:#x})",
                        me.qpn.0, peer.qpn.0
                    ),
                    e,
                )
            })?;
            let mut rts = QueuePairAttribute::new();
            rts.setup_state(QueuePairState::ReadyToSend)
                .setup_sq_psn(me.psn.0)
                .setup_timeout(14)
                .setup_retry_cnt(7)
                .setup_rnr_retry(7)
                .setup_max_read_atomic(if self.role == Role::Initiator {
                    rd_atomic
                } else {
                    1
                });
            qp.modify(&rts)
                .map_err(|e| rdma_err(&format!("moving QP {:#x} to RTS", me.qpn.0), e))?;
        }
        Ok(())
    }

    /// Moves every QP to the error state (outstanding work is flushed, the peer's READs fail).
    pub fn shut(&mut self) {
        for qp in &mut self.qps {
            let mut a = QueuePairAttribute::new();
            a.setup_state(QueuePairState::Error);
            if let Err(e) = qp.modify(&a) {
                tracing::warn!("moving QP {:#x} to ERROR: {e}", qp.qp_number());
            }
        }
    }
}
