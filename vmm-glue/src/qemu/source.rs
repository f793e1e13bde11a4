//! A running QEMU as a migration source: [`QemuSource`] implements [`SourceVm`] over rdmig's
//! mapping of QEMU's shared RAM, with soft-dirty tracking or (a kernel without soft-dirty) none
//! of its own, so that the transport compares pages by content ([`DirtyLog::Content`]);
//! `stop`/`cont` as pause/resume, and QEMU's own device state (migrated with
//! `x-ignore-shared`) as the blob.
//!
//! Failure contract: rdmig `cont`s QEMU again whenever the transport resumes the source after a
//! failed migration, but only if rdmig was the one that stopped it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdmig_transport::mem::GuestMemoryMap;
use rdmig_transport::pages::PageSet;
use rdmig_transport::vm::{DirtyLog, SourceVm};
use rdmig_transport::VmmError;

use super::dirty::{probe_soft_dirty, DirtyTracking, SoftDirty};
use super::qmp::Qmp;
use super::ram::{discover, SharedRam};
use super::{default_run_dir, relay, TrackingChoice};
use crate::error::{Error, Result};

/// How to attach to a source QEMU.
#[derive(Clone, Debug)]
pub struct QemuSourceOptions {
    /// Which dirty tracking to use.
    pub tracking: TrackingChoice,
    /// Bound on each QMP command and on the device-state migration.
    pub timeout: Duration,
    /// Directory for the device-state socket (default: beside the QMP socket).
    pub run_dir: Option<PathBuf>,
}

impl Default for QemuSourceOptions {
    fn default() -> Self {
        QemuSourceOptions {
            tracking: TrackingChoice::Auto,
            timeout: Duration::from_secs(30),
            run_dir: None,
        }
    }
}

enum Tracker {
    SoftDirty(SoftDirty),
    /// None here: the transport compares pages by content.
    Content,
}

/// A QEMU rdmig migrates away.
pub struct QemuSource {
    qmp: Qmp,
    tracker: Tracker,
    /// QEMU's RAM as rdmig maps it: what the transport reads.
    live: GuestMemoryMap,
    // Declared after the maps that point into it, so it unmaps last.
    ram: SharedRam,
    run_dir: PathBuf,
    timeout: Duration,
    stopped_by_us: bool,
    tracking_reason: String,
    state_bytes: u64,
    /// Time of the last `stop`, and how long the final fetch took after it.
    stopped_at: Option<Instant>,
    final_fetch: Option<Duration>,
}

impl std::fmt::Debug for QemuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuSource")
            .field("qmp", &self.qmp.path())
            .field("tracking", &self.dirty_tracking())
            .finish_non_exhaustive()
    }
}

impl QemuSource {
    /// Attaches to the running (or paused) QEMU whose QMP socket is `qmp_path`: checks its RAM
    /// is shared and `x-ignore-shared` exists, sets the capability, maps the RAM and picks the
    /// dirty tracking.
    pub fn attach(qmp_path: &Path, opts: &QemuSourceOptions) -> Result<QemuSource> {
        let mut qmp = Qmp::connect(qmp_path, opts.timeout)?;
        let state = qmp.run_state()?;
        if !matches!(state.as_str(), "running" | "paused" | "prelaunch") {
            return Err(Error::QemuSetup(format!(
                "the source QEMU is {state}; rdmig migrates a running or paused guest"
            )));
        }
        relay::set_capabilities(&mut qmp)?;
        let ram = SharedRam::map(qmp.pid(), discover(&mut qmp)?)?;
        let live = ram.memory_map()?;
        let (tracker, reason) = match (opts.tracking, probe_soft_dirty()) {
            (TrackingChoice::Content, _) => (Tracker::Content, "requested".to_string()),
            (TrackingChoice::SoftDirty, Err(why)) => {
                return Err(Error::QemuSetup(format!(
                    "soft-dirty tracking was requested but does not work here: {why}"
                )))
            }
            (_, Ok(())) => (
                Tracker::SoftDirty(SoftDirty::new(qmp.pid(), &ram)?),
                "the kernel sets soft-dirty bits".to_string(),
            ),
            (TrackingChoice::Auto, Err(why)) => (Tracker::Content, format!("no soft-dirty: {why}")),
        };
        tracing::info!(
            "attached to QEMU {} (pid {}), {} RAM block(s), {} MiB, dirty tracking {} ({reason})",
            qmp.version(),
            qmp.pid().0,
            ram.blocks().len(),
            live.total_bytes() >> 20,
            match tracker {
                Tracker::SoftDirty(_) => "soft-dirty",
                Tracker::Content => "content",
            }
        );
        Ok(QemuSource {
            run_dir: opts
                .run_dir
                .clone()
                .unwrap_or_else(|| default_run_dir(qmp_path)),
            qmp,
            tracker,
            live,
            ram,
            timeout: opts.timeout,
            stopped_by_us: false,
            tracking_reason: reason,
            state_bytes: 0,
            stopped_at: None,
            final_fetch: None,
        })
    }

    /// The dirty tracking in use.
    pub fn dirty_tracking(&self) -> DirtyTracking {
        match self.tracker {
            Tracker::SoftDirty(_) => DirtyTracking::SoftDirty,
            Tracker::Content => DirtyTracking::Content,
        }
    }

    /// Why that tracking was picked.
    pub fn tracking_reason(&self) -> &str {
        &self.tracking_reason
    }

    /// Bytes of QEMU's device state in the last `save_state` (the blob the transport carries
    /// has rdmig's [`relay::STATE_HEADER_LEN`] bytes more).
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes
    }

    /// How long the fetch after `stop` took (with content comparison, the transport's hash pass
    /// over all RAM, which runs right before this end's fetch).
    pub fn final_fetch_time(&self) -> Option<Duration> {
        self.final_fetch
    }

    /// The QMP connection (for callers that want to query or quit QEMU).
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// The RAM blocks migrated.
    pub fn ram(&self) -> &SharedRam {
        &self.ram
    }

    /// The live guest RAM as rdmig maps it (for digests outside the downtime).
    pub fn live_memory(&self) -> &GuestMemoryMap {
        &self.live
    }

    fn fetch(&mut self, into: &mut PageSet) -> Result<()> {
        if let Tracker::SoftDirty(t) = &mut self.tracker {
            t.fetch(into)?;
        }
        if let Some(t) = self.stopped_at.take() {
            self.final_fetch = Some(t.elapsed());
        }
        Ok(())
    }

    fn do_pause(&mut self) -> Result<()> {
        if self.qmp.run_state()? == "running" {
            self.qmp.execute("stop", None)?;
            self.stopped_by_us = true;
        }
        self.stopped_at = Some(Instant::now());
        Ok(())
    }

    fn do_resume(&mut self) -> Result<()> {
        if self.stopped_by_us {
            self.qmp.execute("cont", None)?;
            self.stopped_by_us = false;
        }
        self.stopped_at = None;
        Ok(())
    }
}

impl SourceVm for QemuSource {
    fn memory(&self) -> &GuestMemoryMap {
        &self.live
    }

    fn descriptor(&self) -> rdmig_transport::vm::VmDescriptor {
        // QEMU's device state is its own migration stream, versioned by QEMU.
        rdmig_transport::vm::VmDescriptor::new(super::KIND, 0)
    }

    fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        if let Tracker::SoftDirty(t) = &mut self.tracker {
            t.start()?;
        }
        Ok(())
    }

    fn dirty_log(&self) -> DirtyLog {
        match self.tracker {
            Tracker::SoftDirty(_) => DirtyLog::Vm,
            Tracker::Content => DirtyLog::Content,
        }
    }

    fn fetch_and_clear_dirty(&mut self, into: &mut PageSet) -> Result<(), VmmError> {
        Ok(self.fetch(into)?)
    }

    fn pause(&mut self) -> Result<(), VmmError> {
        Ok(self.do_pause()?)
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(self.do_resume()?)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
        let stream = relay::save(&mut self.qmp, &self.run_dir, self.timeout)?;
        self.state_bytes = stream.len() as u64;
        // Running before rdmig's `stop`: the destination starts it; paused by its operator: it
        // stays paused there.
        Ok(relay::wrap(&stream, self.stopped_by_us))
    }
}
