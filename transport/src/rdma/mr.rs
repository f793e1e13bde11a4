//! Memory registration: every region of a guest memory map pinned and keyed for the device.
//!
//! The source registers with REMOTE_READ only (a peer can read, never write); the destination
//! with LOCAL_WRITE only (its own READs land there; no remote access at all). RLIMIT_MEMLOCK
//! is checked before anything is pinned. Dropping a [`Registration`] deregisters every region,
//! so the keys handed to the peer stop working.

use std::sync::Arc;

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::AccessFlags;

use super::{LKey, RKey};
use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;

/// What the peer may do with the registered memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Source: remote READ only.
    RemoteRead,
    /// Destination: the local device writes READ responses into it.
    LocalWrite,
}

impl Access {
    fn flags(self) -> AccessFlags {
        match self {
            Access::RemoteRead => AccessFlags::RemoteRead,
            Access::LocalWrite => AccessFlags::LocalWrite,
        }
    }
}

/// One registered region.
pub struct RegisteredRegion {
    mr: Arc<MemoryRegion>,
    /// Host address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RegisteredRegion {
    /// Local key.
    pub fn lkey(&self) -> LKey {
        LKey(self.mr.lkey())
    }

    /// Remote key.
    pub fn rkey(&self) -> RKey {
        RKey(self.mr.rkey())
    }
}

/// The registered regions of one map, in region-table order.
pub struct Registration {
    regions: Vec<RegisteredRegion>,
    access: Access,
}

impl Registration {
    /// Checks RLIMIT_MEMLOCK, then registers every region of `map` on `pd`.
    pub fn register(
        pd: &Arc<ProtectionDomain>,
        map: &GuestMemoryMap,
        access: Access,
        max_mr_size: u64,
    ) -> Result<Registration> {
        check_memlock(map.total_bytes())?;
        let mut regions = Vec::with_capacity(map.regions().len());
        for (i, r) in map.regions().iter().enumerate() {
            if r.len() > max_mr_size {
                return Err(Error::Rdma(format!(
                    "region {i} is {} bytes, the device registers at most {max_mr_size}",
                    r.len()
                )));
            }
            // The range stays mapped while any session holding the map lives; the MR is
            // deregistered (dropped) with the path that owns it, before the map's owner unmaps.
            // SAFETY: GuestRegion::new's contract: the range is mapped read/write.
            let mr = unsafe { pd.reg_mr(r.host_ptr() as usize, r.len() as usize, access.flags()) }
                .map_err(|e| {
                    let os = std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    Error::Rdma(format!(
                        "registering region {i} ({} bytes, {access:?}) failed: {e}: {os}",
                        r.len()
                    ))
                })?;
            regions.push(RegisteredRegion {
                mr,
                addr: r.host_ptr() as u64,
                len: r.len(),
            });
        }
        Ok(Registration { regions, access })
    }

    /// The regions.
    pub fn regions(&self) -> &[RegisteredRegion] {
        &self.regions
    }

    /// The access the regions were registered with.
    pub fn access(&self) -> Access {
        self.access
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Each MemoryRegion deregisters itself (ibv_dereg_mr) when its last Arc goes.
        tracing::debug!(
            "deregistering {} regions ({:?})",
            self.regions.len(),
            self.access
        );
    }
}

/// Fails with [`Error::Memlock`] if pinning `needed` more bytes would exceed RLIMIT_MEMLOCK
/// (unless the process has CAP_IPC_LOCK, which the kernel lets pin without limit).
pub fn check_memlock(needed: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(Error::os("getrlimit(RLIMIT_MEMLOCK)"));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    memlock_verdict(
        needed,
        lim.rlim_cur,
        status_kib(&status, "VmPin:") * 1024,
        has_cap_ipc_lock(&status),
    )
}

/// The decision of [`check_memlock`], from its inputs.
pub fn memlock_verdict(
    needed: u64,
    limit: u64,
    already_pinned: u64,
    cap_ipc_lock: bool,
) -> Result<()> {
    if cap_ipc_lock || limit == libc::RLIM_INFINITY {
        return Ok(());
    }
    let total = needed.saturating_add(already_pinned);
    if total > limit {
        return Err(Error::Memlock {
            needed: total,
            limit,
        });
    }
    Ok(())
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn has_cap_ipc_lock(status: &str) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_verdicts() {
        assert!(memlock_verdict(1 << 30, 64 << 10, 0, false).is_err());
        let e = memlock_verdict(1 << 30, 8 << 20, 4096, false).unwrap_err();
        assert!(
            matches!(e, Error::Memlock { needed, limit } if needed == (1 << 30) + 4096 && limit == 8 << 20)
        );
        assert!(e.to_string().contains("ulimit -l"));
        assert!(memlock_verdict(1 << 30, 64 << 10, 0, true).is_ok());
        assert!(memlock_verdict(1 << 30, libc::RLIM_INFINITY, 0, false).is_ok());
        assert!(memlock_verdict(4096, 8192, 0, false).is_ok());
    }

    #[test]
    fn parses_proc_status() {
        let s = "Name:\tx\nVmPin:\t     12 kB\nCapEff:\t0000000000004000\n";
        assert_eq!(status_kib(s, "VmPin:"), 12);
        assert!(has_cap_ipc_lock(s));
        assert!(!has_cap_ipc_lock("CapEff:\t0000000000000000\n"));
    }
}
