//! Device discovery: the device, its active RoCE port, the RoCE v2 GID of the control
//! channel's address (or the one named with `-d`/`-x`), and the limits the data path obeys.
//!
//! `sideway` loads libibverbs at run time, so on a host without rdma-core every entry point
//! reports a reason instead of failing to start. Some `sideway` conversions panic on values
//! they do not know; discovery reads the raw attributes and runs under `catch_unwind`, so a
//! strange device yields an `Err(reason)`, never a panic.

use std::net::IpAddr;
use std::sync::Arc;

use sideway::ibverbs::device::{DeviceInfo, DeviceList, GetDeviceListErrorKind};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, PortState};

use super::{DeviceSummary, Gid, RdmaOptions};

/// `IBV_PORT_ACTIVE`, compared with the raw attribute (sideway's `From` panics on unknowns).
const PORT_ACTIVE: u32 = PortState::Active as u32;
/// `IBV_LINK_LAYER_ETHERNET`, likewise.
const LINK_ETHERNET: u8 = LinkLayer::Ethernet as u8;
/// `IBV_GID_TYPE_SYSFS_ROCE_V2` as `ibv_query_gid_type` reports it: the sysfs numbering, which
/// is not sideway's `GidType` (there RoCE v2 is 2); sideway documents the value but exports no
/// constant for it.
const GID_TYPE_ROCE_V2: u32 = 1;

/// Limits of the device and port, as the data path uses them.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest message (one READ) the port carries.
    pub max_msg_size: u64,
    /// READs a QP may have outstanding as responder (`max_qp_rd_atom`).
    pub max_qp_rd_atom: u32,
    /// READs a QP may have outstanding as initiator (`max_qp_init_rd_atom`).
    pub max_qp_init_rd_atom: u32,
    /// Scatter/gather entries per work request.
    pub max_sge: u32,
    /// Work requests per queue.
    pub max_qp_wr: u32,
    /// Entries per completion queue.
    pub max_cqe: u32,
    /// Largest memory region.
    pub max_mr_size: u64,
    /// Active MTU of the port (verbs enum, 1 = 256 … 5 = 4096).
    pub active_mtu: u32,
}

/// An opened device with the port and GID chosen for the data path.
#[derive(Clone)]
pub struct Device {
    /// The verbs context (kept alive by every resource made from it).
    pub(crate) ctx: Arc<DeviceContext>,
    /// Summary for reports.
    pub summary: DeviceSummary,
    /// The chosen GID.
    pub gid: Gid,
    /// Limits.
    pub limits: Limits,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("summary", &self.summary)
            .field("gid", &self.gid)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Opens the device `opts` asks for (or the first usable one) and picks port and GID.
pub fn open(opts: &RdmaOptions) -> Result<Device, String> {
    match std::panic::catch_unwind(|| open_inner(opts)) {
        Ok(r) => r,
        Err(_) => Err("the RDMA library reported a value this build does not understand".into()),
    }
}

fn open_inner(opts: &RdmaOptions) -> Result<Device, String> {
    let list = DeviceList::new().map_err(|e| {
        let io = match &e.0 {
            GetDeviceListErrorKind::Ibverbs(io) => Some(io.raw_os_error()),
            _ => None,
        };
        match io.flatten() {
            Some(libc::EOPNOTSUPP) => "libibverbs.so.1 could not be loaded (install rdma-core: libibverbs1 ibverbs-providers)".to_string(),
            Some(libc::ENOSYS) => "this kernel has no RDMA support (no ib_uverbs; load rdma_rxe or a RoCE NIC driver)".to_string(),
            _ => {
                let os = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
                format!("no RDMA device list ({e}: {os})")
            }
        }
    })?;
    if list.is_empty() {
        return Err("no RDMA devices (no RoCE NIC, no rxe/siw device: `rdma link add rxe0 type rxe netdev IFACE`)".into());
    }
    let mut why = Vec::new();
    for dev in list.iter() {
        let name = dev.name();
        if let Some(want) = &opts.device {
            if &name != want {
                continue;
            }
        }
        let ctx = match dev.open() {
            Ok(c) => c,
            Err(e) => {
                why.push(format!("{name}: cannot open ({e})"));
                continue;
            }
        };
        match pick_port(&ctx, &name, opts) {
            Ok(d) => return Ok(d),
            Err(e) => why.push(format!("{name}: {e}")),
        }
    }
    if why.is_empty() {
        if let Some(want) = &opts.device {
            let names: Vec<String> = list.iter().map(|d| d.name()).collect();
            return Err(format!(
                "no RDMA device named {want} (have: {})",
                names.join(", ")
            ));
        }
    }
    Err(why.join("; "))
}

fn pick_port(ctx: &Arc<DeviceContext>, name: &str, opts: &RdmaOptions) -> Result<Device, String> {
    let dev_attr = ctx
        .query_device()
        .map_err(|e| format!("query_device failed: {e}"))?;
    let orig = &dev_attr.attr.orig_attr;
    let nports = orig.phys_port_cnt;
    let ports: Vec<u8> = match opts.port {
        Some(p) if p == 0 || p > nports => {
            return Err(format!("port {p} does not exist (1..={nports})"))
        }
        Some(p) => vec![p],
        None => (1..=nports).collect(),
    };
    let mut why = Vec::new();
    for port in ports {
        let pa = match ctx.query_port(port) {
            Ok(p) => p.attr,
            Err(e) => {
                why.push(format!("port {port}: query failed ({e})"));
                continue;
            }
        };
        if pa.state != PORT_ACTIVE {
            why.push(format!("port {port} is not active (state {})", pa.state));
            continue;
        }
        if pa.link_layer != LINK_ETHERNET {
            why.push(format!(
                "port {port} is not Ethernet (RoCE) but link layer {}",
                pa.link_layer
            ));
            continue;
        }
        let (gid_index, gid) = match pick_gid(ctx, port, opts) {
            Ok(g) => g,
            Err(e) => {
                why.push(format!("port {port}: {e}"));
                continue;
            }
        };
        let limits = Limits {
            max_msg_size: u64::from(pa.max_msg_sz),
            max_qp_rd_atom: orig.max_qp_rd_atom.max(0) as u32,
            max_qp_init_rd_atom: orig.max_qp_init_rd_atom.max(0) as u32,
            max_sge: orig.max_sge.max(0) as u32,
            max_qp_wr: orig.max_qp_wr.max(0) as u32,
            max_cqe: orig.max_cqe.max(0) as u32,
            max_mr_size: orig.max_mr_size,
            active_mtu: pa.active_mtu,
        };
        if limits.max_qp_rd_atom == 0
            || limits.max_qp_init_rd_atom == 0
            || limits.max_msg_size < 4096
        {
            why.push(format!("port {port}: unusable limits {limits:?}"));
            continue;
        }
        return Ok(Device {
            ctx: ctx.clone(),
            summary: DeviceSummary {
                name: name.to_string(),
                port,
                gid_index,
            },
            gid,
            limits,
        });
    }
    Err(why.join("; "))
}

fn pick_gid(ctx: &DeviceContext, port: u8, opts: &RdmaOptions) -> Result<(u8, Gid), String> {
    if let Some(idx) = opts.gid_index {
        let g = ctx
            .query_gid(port, u32::from(idx))
            .map_err(|e| format!("GID index {idx}: {e}"))?;
        if g.is_zero() {
            return Err(format!("GID index {idx} is empty"));
        }
        return Ok((idx, Gid(g.raw)));
    }
    let want = opts.local_addr.map(Gid::from_ip);
    // The whole table in one call; entries of other ports are skipped.
    let entries = ctx
        .query_gid_table()
        .map_err(|e| format!("GID table: {e}"))?;
    let mut fallback = None;
    for e in entries {
        if e.port_num() != u32::from(port) || e.gid_index() > 255 {
            continue;
        }
        let g = Gid(e.gid().raw);
        if g.is_zero() {
            continue;
        }
        let idx = e.gid_index() as u8;
        let v2 = ctx
            .query_gid_type(port, u32::from(idx))
            .map(|t| t == GID_TYPE_ROCE_V2)
            .unwrap_or(false);
        if !v2 {
            continue;
        }
        match want {
            Some(w) if w == g => return Ok((idx, g)),
            Some(_) => {}
            None if g.ipv4().is_some() => return Ok((idx, g)),
            None => {
                fallback.get_or_insert((idx, g));
            }
        }
    }
    if let Some(f) = fallback {
        return Ok(f);
    }
    if let Some(a) = opts
        .local_addr
        .filter(|a| a.is_loopback() || a.is_unspecified())
    {
        // A loopback control channel names no interface: take the first RoCE v2 GID.
        tracing::debug!("control address {a} has no GID; taking the first RoCE v2 GID");
        return pick_gid(
            ctx,
            port,
            &RdmaOptions {
                local_addr: None,
                ..opts.clone()
            },
        );
    }
    match opts.local_addr {
        Some(a) => Err(format!(
            "no RoCE v2 GID for address {a} (is the device on the interface carrying {a}? pass -x GID_INDEX)"
        )),
        None => Err("no RoCE v2 GID (give the interface an IP address)".into()),
    }
}

impl Gid {
    /// The GID RoCE v2 uses for an IP address (IPv4 is mapped to `::ffff:a.b.c.d`).
    pub fn from_ip(a: IpAddr) -> Gid {
        match a {
            IpAddr::V4(v4) => Gid(v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => Gid(v6.octets()),
        }
    }

    /// The IPv4 address of an IPv4-mapped GID.
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        std::net::Ipv6Addr::from(self.0).to_ipv4_mapped()
    }

    /// True for the all-zero (unused) GID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_gid_is_mapped() {
        let g = Gid::from_ip("10.99.0.1".parse().unwrap());
        assert_eq!(g.0[10..], [0xff, 0xff, 10, 99, 0, 1]);
        assert_eq!(g.ipv4(), Some("10.99.0.1".parse().unwrap()));
        assert!(!g.is_zero());
    }

    #[test]
    fn open_without_a_device_is_a_clean_error() {
        // On hosts without RDMA this must be an Err with a reason, never a panic; in the SoftRoCE
        // guest it may succeed.
        if std::env::var_os("RDMIG_RXE_DEV").is_none() {
            let e = open(&RdmaOptions::default()).unwrap_err();
            assert!(!e.is_empty());
        }
    }
}
