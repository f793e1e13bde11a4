//! Tracking a QEMU's writes to guest RAM from outside QEMU (it does not export its dirty
//! bitmap). Two trackers:
//!
//! - **Soft-dirty** ([`SoftDirty`]): `echo 4 > /proc/<pid>/clear_refs` clears the soft-dirty bit
//!   of every page table entry of QEMU and write-protects them; the next write sets bit 55 of
//!   the page's `/proc/<pid>/pagemap` entry again. Reading the bits and clearing them are two
//!   steps with no atomic pair, so a fetch stops QEMU (`SIGSTOP`, waiting until every thread is
//!   stopped) for the read and the clear and continues it right after: no write can fall between
//!   them. rdmig moves the pages straight from its own mapping of QEMU's RAM.
//! - **Content comparison**: for kernels without `CONFIG_MEM_SOFT_DIRTY`. The source says it
//!   has no dirty log ([`rdmig_transport::vm::DirtyLog::Content`]) and the transport compares a
//!   hash of every page of guest RAM with the destination's hash of what it holds (reported after
//!   every round). Comparing with what *landed*, not with what was read, catches a page that
//!   changed X → Y → X while it moved (a lock word, a counter put back). No copy of guest RAM is
//!   kept; the cost is a hash pass over the RAM that holds data per round, and the final one
//!   after `stop` lies inside the downtime.
//!
//! [`probe_soft_dirty`] checks with a real write (in this process) that the kernel sets the bit:
//! kernels without soft-dirty accept the `clear_refs` write and never set it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rdmig_transport::mem::{MmapBacking, MmapRegion, PageIndex, RegionId};
use rdmig_transport::pages::PageSet;

use super::qmp::Pid;
use super::ram::SharedRam;
use crate::error::{Error, Result};

const PAGE: usize = 4096;
/// Soft-dirty bit of a pagemap entry.
const PM_SOFT_DIRTY: u64 = 1 << 55;
/// How long a QEMU may take to stop all its threads on SIGSTOP.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Which dirty tracking a QEMU source uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyTracking {
    /// Soft-dirty bits of QEMU's page tables.
    SoftDirty,
    /// Each page's hash compared with the destination's (by the transport).
    Content,
}

impl DirtyTracking {
    /// The name in reports (`dirty_tracking` in the JSON).
    pub fn name(self) -> &'static str {
        match self {
            DirtyTracking::SoftDirty => "soft-dirty",
            DirtyTracking::Content => "content",
        }
    }
}

/// Checks that soft-dirty works on this kernel: clears this process's bits, writes a page, and
/// reads its bit back. The error says why not.
pub fn probe_soft_dirty() -> std::result::Result<(), String> {
    let page = MmapRegion::new(PAGE as u64, MmapBacking::Anonymous, true)
        .map_err(|e| format!("probe page: {e}"))?;
    let entry = |pm: &File| -> std::result::Result<u64, String> {
        let mut b = [0u8; 8];
        pm.read_exact_at(&mut b, (page.as_ptr() as u64 / PAGE as u64) * 8)
            .map_err(|e| format!("reading /proc/self/pagemap: {e}"))?;
        Ok(u64::from_le_bytes(b))
    };
    let pm = File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    clear_refs("self").map_err(|e| format!("/proc/self/clear_refs: {e}"))?;
    if entry(&pm)? & PM_SOFT_DIRTY != 0 {
        return Err("the soft-dirty bit stays set after clear_refs".into());
    }
    // SAFETY: the first byte of our own live private page.
    unsafe { page.as_ptr().write_volatile(1) };
    if entry(&pm)? & PM_SOFT_DIRTY == 0 {
        return Err(
            "a write does not set the soft-dirty bit (kernel without CONFIG_MEM_SOFT_DIRTY)".into(),
        );
    }
    Ok(())
}

fn clear_refs(pid: &str) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/clear_refs"))?
        .write_all(b"4")
}

/// Soft-dirty tracking of one QEMU process.
#[derive(Debug)]
pub struct SoftDirty {
    pid: Pid,
    pagemap: File,
    /// QEMU's address and the page count of each region.
    regions: Vec<(u64, u64)>,
    buf: Vec<u8>,
}

impl SoftDirty {
    /// Tracks the QEMU `pid` whose RAM `ram` maps.
    pub fn new(pid: Pid, ram: &SharedRam) -> Result<SoftDirty> {
        let pagemap =
            File::open(format!("/proc/{}/pagemap", pid.0)).map_err(|e| Error::QemuIo {
                context: format!("opening /proc/{}/pagemap", pid.0),
                source: e,
            })?;
        Ok(SoftDirty {
            pid,
            pagemap,
            regions: ram
                .blocks()
                .iter()
                .map(|b| (b.qemu_hva, b.size.div_ceil(PAGE as u64)))
                .collect(),
            buf: Vec::new(),
        })
    }

    /// Clears the bits (the start of tracking).
    pub fn start(&mut self) -> Result<()> {
        self.frozen(|_| Ok(()))
    }

    /// Adds the pages QEMU wrote since the last call to `into` and clears the bits.
    pub fn fetch(&mut self, into: &mut PageSet) -> Result<()> {
        let mut hits: Vec<(u32, u64)> = Vec::new();
        self.frozen(|me| {
            for (r, &(hva, pages)) in me.regions.iter().enumerate() {
                me.buf.resize(pages as usize * 8, 0);
                me.pagemap
                    .read_exact_at(&mut me.buf, (hva / PAGE as u64) * 8)
                    .map_err(|e| Error::QemuIo {
                        context: format!("reading /proc/{}/pagemap", me.pid.0),
                        source: e,
                    })?;
                for (i, e) in me.buf.chunks_exact(8).enumerate() {
                    let e = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
                    if e & PM_SOFT_DIRTY != 0 {
                        hits.push((r as u32, i as u64));
                    }
                }
            }
            Ok(())
        })?;
        for (r, p) in hits {
            into.insert(RegionId(r), PageIndex(p));
        }
        Ok(())
    }

    /// Runs `f` and clears the bits with every QEMU thread stopped, then continues QEMU.
    fn frozen(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        signal(self.pid, libc::SIGSTOP)?;
        let r = wait_stopped(self.pid).and_then(|()| {
            f(self)?;
            clear_refs(&self.pid.0.to_string()).map_err(|e| Error::QemuIo {
                context: format!("writing /proc/{}/clear_refs", self.pid.0),
                source: e,
            })
        });
        let c = signal(self.pid, libc::SIGCONT);
        r.and(c)
    }
}

fn signal(pid: Pid, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
    if unsafe { libc::kill(pid.0, sig) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ESRCH) {
            Error::QemuExited(format!("QEMU pid {} is gone", pid.0))
        } else {
            Error::QemuIo {
                context: format!("signalling QEMU pid {}", pid.0),
                source: e,
            }
        });
    }
    Ok(())
}

/// Waits until every thread of `pid` is in the stopped state.
fn wait_stopped(pid: Pid) -> Result<()> {
    let deadline = Instant::now() + STOP_WAIT;
    let dir = format!("/proc/{}/task", pid.0);
    loop {
        let mut all = true;
        let tasks = std::fs::read_dir(&dir).map_err(|e| Error::QemuIo {
            context: format!("listing {dir}"),
            source: e,
        })?;
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // "tid (comm) S ...": the state follows the last ')'.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].trim_start().chars().next());
            if !matches!(state, Some('T' | 't' | 'Z' | 'X') | None) {
                all = false;
                break;
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::QemuTimeout(format!(
                "QEMU pid {} did not stop within {STOP_WAIT:?} of SIGSTOP",
                pid.0
            )));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}
