//! How much memory this host (and the cgroup this process runs in) can still give, so that a
//! guest too large for it is refused with a clear error before anything is allocated — not
//! found out by the OOM killer halfway through populating it.

use std::path::Path;

/// What the host can give, from `/proc/meminfo` and the process's memory cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMemory {
    /// `MemAvailable` of `/proc/meminfo`, bytes.
    pub mem_available: Option<u64>,
    /// The cgroup's limit less its usage (v2 `memory.max` − `memory.current`, or v1
    /// `memory.limit_in_bytes` − `memory.usage_in_bytes`), bytes; `None` without a limit.
    pub cgroup_left: Option<u64>,
}

impl HostMemory {
    /// Reads the current figures (missing files are `None`, never an error).
    pub fn now() -> HostMemory {
        HostMemory {
            mem_available: mem_available(Path::new("/proc/meminfo")),
            cgroup_left: cgroup_left(),
        }
    }

    /// The smaller of the two limits, if any is known.
    pub fn available(&self) -> Option<u64> {
        match (self.mem_available, self.cgroup_left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// `Err` with a sentence saying why when `bytes` more do not fit.
    pub fn check(&self, bytes: u64, what: &str) -> Result<(), String> {
        let Some(avail) = self.available() else {
            return Ok(());
        };
        if bytes <= avail {
            return Ok(());
        }
        let mib = |b: u64| b >> 20;
        let mut why = format!(
            "{what} needs {} MiB but this host can give {} MiB",
            mib(bytes),
            mib(avail)
        );
        if let Some(a) = self.mem_available {
            why += &format!(" (MemAvailable {} MiB", mib(a));
            match self.cgroup_left {
                Some(c) => {
                    why += &format!(", left in this process's memory cgroup {} MiB)", mib(c))
                }
                None => why += ")",
            }
        }
        Err(why)
    }
}

fn mem_available(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The memory cgroup's folder for this process, v2 first.
fn cgroup_left() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in own.lines() {
        // v2: "0::/path"; v1: "N:memory:/path" (or with other controllers joined by commas).
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, rel) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = rel.trim_start_matches('/');
        if ctrl.is_empty() {
            let dir = Path::new("/sys/fs/cgroup").join(rel);
            let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
            if max.trim() == "max" {
                return None;
            }
            let max: u64 = max.trim().parse().ok()?;
            let cur = read_u64(&dir.join("memory.current")).unwrap_or(0);
            return Some(max.saturating_sub(cur));
        }
        if ctrl.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(rel);
            let max = read_u64(&dir.join("memory.limit_in_bytes"))?;
            // v1 reports "no limit" as a huge page-aligned number.
            if max >= 1 << 62 {
                return None;
            }
            let cur = read_u64(&dir.join("memory.usage_in_bytes")).unwrap_or(0);
            return Some(max.saturating_sub(cur));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host_and_refuses_what_does_not_fit() {
        let h = HostMemory::now();
        let avail = h
            .available()
            .expect("/proc/meminfo has MemAvailable on Linux");
        assert!(avail > 0);
        assert!(h.check(avail / 2, "a guest").is_ok());
        let e = h
            .check(avail.saturating_add(1 << 40), "a guest of 1 TiB more")
            .unwrap_err();
        assert!(e.contains("this host can give"), "{e}");
    }

    #[test]
    fn the_smaller_limit_wins() {
        let h = HostMemory {
            mem_available: Some(8 << 30),
            cgroup_left: Some(1 << 30),
        };
        assert_eq!(h.available(), Some(1 << 30));
        let e = h.check(2 << 30, "the guest").unwrap_err();
        assert!(e.contains("memory cgroup 1024 MiB"), "{e}");
    }
}
