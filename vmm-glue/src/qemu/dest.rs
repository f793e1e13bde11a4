//! A QEMU waiting for an incoming migration (`-incoming defer`, same RAM backends, `share=on`)
//! as a migration destination: rdmig writes guest RAM into its shared mapping of the backends,
//! then feeds QEMU the device state (`migrate-incoming`) and starts it (`cont`).

use std::any::Any;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdmig_transport::mem::GuestMemoryMap;
use rdmig_transport::vm::{DestinationFactory, DestinationVm, MemoryLayout};
use rdmig_transport::VmmError;

use super::qmp::Qmp;
use super::ram::{check_layout, discover, SharedRam};
use super::{default_run_dir, relay};
use crate::error::{Error, Result};

/// How to attach to a destination QEMU.
#[derive(Clone, Debug)]
pub struct QemuDestOptions {
    /// Bound on each QMP command and on loading the device state.
    pub timeout: Duration,
    /// Directory for the device-state socket (default: beside the QMP socket).
    pub run_dir: Option<PathBuf>,
}

impl Default for QemuDestOptions {
    fn default() -> Self {
        QemuDestOptions {
            timeout: Duration::from_secs(30),
            run_dir: None,
        }
    }
}

/// The destination QEMU.
pub struct QemuDest {
    qmp: Qmp,
    map: GuestMemoryMap,
    // After the map that points into it, so it unmaps last.
    ram: SharedRam,
    run_dir: PathBuf,
    timeout: Duration,
    state_bytes: u64,
}

impl std::fmt::Debug for QemuDest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuDest")
            .field("qmp", &self.qmp.path())
            .finish_non_exhaustive()
    }
}

impl QemuDest {
    /// Attaches to the QEMU whose QMP socket is `qmp_path`; it must be waiting for an incoming
    /// migration with its RAM in shared backends.
    pub fn attach(qmp_path: &Path, opts: &QemuDestOptions) -> Result<QemuDest> {
        let mut qmp = Qmp::connect(qmp_path, opts.timeout)?;
        let state = qmp.run_state()?;
        if state != "inmigrate" {
            return Err(Error::QemuSetup(format!(
                "the destination QEMU is {state}, not waiting for a migration: start it with \
                 -incoming defer (and -S)"
            )));
        }
        relay::set_capabilities(&mut qmp)?;
        let ram = SharedRam::map(qmp.pid(), discover(&mut qmp)?)?;
        let map = ram.memory_map()?;
        Ok(QemuDest {
            run_dir: opts
                .run_dir
                .clone()
                .unwrap_or_else(|| default_run_dir(qmp_path)),
            qmp,
            map,
            ram,
            timeout: opts.timeout,
            state_bytes: 0,
        })
    }

    /// The layout of this QEMU's RAM.
    pub fn layout(&self) -> MemoryLayout {
        self.ram.layout()
    }

    /// The QMP connection.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Bytes of device state loaded.
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes
    }

    fn do_restore(&mut self, state: &[u8]) -> Result<()> {
        relay::restore(&mut self.qmp, &self.run_dir, state, self.timeout)?;
        self.state_bytes = state.len() as u64;
        Ok(())
    }

    fn do_resume(&mut self) -> Result<()> {
        // Without -S QEMU starts the guest by itself once the state is loaded.
        if self.qmp.run_state()? != "running" {
            self.qmp.execute("cont", None)?;
        }
        Ok(())
    }
}

impl DestinationVm for QemuDest {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmmError> {
        Ok(self.do_restore(state)?)
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(self.do_resume()?)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// A factory for [`rdmig_transport::session::accept`] over a QEMU attached now (so setup
/// mistakes show before the source connects); it checks the source's layout against this QEMU's.
pub fn qemu_destination_factory(
    qmp_path: &Path,
    opts: &QemuDestOptions,
) -> Result<DestinationFactory<'static>> {
    let dest = QemuDest::attach(qmp_path, opts)?;
    Ok(Box::new(move |layout: &MemoryLayout| {
        check_layout(&dest.layout(), layout)?;
        Ok(Box::new(dest) as Box<dyn DestinationVm>)
    }))
}

/// The [`QemuDest`] behind a destination VM returned by `accept`, if it is one.
pub fn into_qemu(vm: Box<dyn DestinationVm>) -> Option<Box<QemuDest>> {
    vm.into_any().downcast::<QemuDest>().ok()
}
