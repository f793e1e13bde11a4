//! A QEMU waiting for an incoming migration (`-incoming defer`, same RAM backends, `share=on`)
//! as a migration destination: rdmig writes guest RAM into its shared mapping of the backends,
//! then feeds QEMU the device state (`migrate-incoming`) and starts it (`cont`).
//!
//! [`accept_into`] runs the incoming migration with the QEMU watched ([`super::watch`]): a
//! destination QEMU that exits during pre-copy ends the migration at once, and the source
//! resumes its guest. With the test guest's serial console known
//! ([`QemuDestOptions::console`]), [`QemuDest::guest_verdict`] reads the guest's own verdict
//! on itself after the resume.

use std::any::Any;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdmig_transport::mem::GuestMemoryMap;
use rdmig_transport::session::{self, DestReport, MigrationConfig, MigrationControl};
use rdmig_transport::vm::{DestinationFactory, DestinationVm, MemoryLayout};
use rdmig_transport::VmmError;

use super::console::{check_resumed, reports, Resumed};
use super::qmp::Qmp;
use super::ram::{check_layout, discover, SharedRam};
use super::watch::{shut_down_tcp_port, ExitWatch};
use super::{default_run_dir, relay};
use crate::error::{Error, Result};

/// How to attach to a destination QEMU.
#[derive(Clone, Debug)]
pub struct QemuDestOptions {
    /// Bound on each QMP command and on loading the device state.
    pub timeout: Duration,
    /// Directory for the device-state socket (default: beside the QMP socket).
    pub run_dir: Option<PathBuf>,
    /// The file the guest's serial console goes to (`-serial file:PATH`), for the test guest's
    /// own verdict after the resume ([`QemuDest::guest_verdict`]). QMP does not tell a file
    /// chardev's path (`query-chardev` says only `file`), so it is given here.
    pub console: Option<PathBuf>,
}

impl Default for QemuDestOptions {
    fn default() -> Self {
        QemuDestOptions {
            timeout: Duration::from_secs(30),
            run_dir: None,
            console: None,
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
    /// The console file and its length at attach (what came before is not this guest's run here).
    console: Option<(PathBuf, u64)>,
    /// From the device state's header.
    source_was_running: Option<bool>,
    /// The RAM backends held no data when attached (see `memory_starts_zero`).
    starts_zero: bool,
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
        let console = match &opts.console {
            None => None,
            Some(p) => {
                let len = std::fs::metadata(p)
                    .map_err(|e| Error::QemuIo {
                        context: format!(
                            "reading the console file {} (QEMU's -serial file:PATH)",
                            p.display()
                        ),
                        source: e,
                    })?
                    .len();
                Some((p.clone(), len))
            }
        };
        relay::set_capabilities(&mut qmp)?;
        let ram = SharedRam::map(qmp.pid(), discover(&mut qmp)?)?;
        let map = ram.memory_map()?;
        // A fresh backend is all holes; an existing mem-path file keeps what it held (QEMU
        // neither truncates nor clears it), so look rather than assume.
        let starts_zero = rdmig_transport::mem::holes::Holes::new().all_zero(&map);
        Ok(QemuDest {
            starts_zero,
            console,
            source_was_running: None,
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

    /// Bytes of QEMU's device state loaded (without rdmig's header).
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes
    }

    /// The guest memory as rdmig maps it (for checks before the migration).
    pub fn guest_memory(&self) -> &GuestMemoryMap {
        &self.map
    }

    /// The console file given in the options.
    pub fn console_path(&self) -> Option<&Path> {
        self.console.as_ref().map(|c| c.0.as_path())
    }

    /// What the guest printed on its console since [`QemuDest::attach`].
    pub fn console_text(&self) -> Option<String> {
        let (path, from) = self.console.as_ref()?;
        let bytes = std::fs::read(path).unwrap_or_default();
        let from = usize::try_from(*from)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        Some(String::from_utf8_lossy(&bytes[from..]).into_owned())
    }

    /// The test guest's verdict on itself after the resume: waits (at most `timeout`) for
    /// `min_reports` `RDMIG-GUEST` reports on the console, then checks them with
    /// [`check_resumed`]. `None` when no console file was given.
    pub fn guest_verdict(
        &self,
        min_reports: usize,
        timeout: Duration,
    ) -> Option<std::result::Result<Resumed, String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console_text()?;
            if reports(&text).len() >= min_reports || Instant::now() >= deadline {
                return Some(check_resumed(&text, min_reports));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn do_restore(&mut self, blob: &[u8]) -> Result<()> {
        let (was_running, stream) = relay::unwrap(blob)?;
        relay::restore(&mut self.qmp, &self.run_dir, stream, self.timeout)?;
        self.state_bytes = stream.len() as u64;
        self.source_was_running = Some(was_running);
        Ok(())
    }

    fn do_resume(&mut self) -> Result<()> {
        if self.source_was_running == Some(false) {
            tracing::info!(
                "the source guest was paused before the migration: it stays paused here ({}); \
                 `cont` starts it",
                self.qmp.run_state()?
            );
            return Ok(());
        }
        // Without -S QEMU starts the guest by itself once the state is loaded.
        if self.qmp.run_state()? != "running" {
            self.qmp.execute("cont", None)?;
        }
        Ok(())
    }

    /// Whether the source guest was running before the migration (known once the device
    /// state is loaded); a paused one stays paused here.
    pub fn source_was_running(&self) -> Option<bool> {
        self.source_was_running
    }
}

impl DestinationVm for QemuDest {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }

    fn memory_starts_zero(&self) -> bool {
        self.starts_zero
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

/// Accepts one incoming migration on `listener` into `dest`, watching the QEMU meanwhile: if
/// it exits (its QMP socket closes) before the migration completes, the migration's
/// connections and `listener` are shut down ([`shut_down_tcp_port`]), so both ends fail at once
/// (the source resumes its guest) and this returns a [`Error::QemuExited`] that says so,
/// instead of the transport's view of a closed connection. Otherwise as
/// [`session::accept`] with [`qemu_destination_factory`].
pub fn accept_into(
    dest: QemuDest,
    listener: &TcpListener,
    config: &MigrationConfig,
) -> rdmig_transport::Result<(Box<QemuDest>, DestReport)> {
    accept_into_controlled(dest, listener, config, &MigrationControl::new())
}

/// [`accept_into`] driven through `control` ([`session::accept_controlled`]): another thread
/// can follow its progress or cancel it until the guest resumes.
pub fn accept_into_controlled(
    dest: QemuDest,
    listener: &TcpListener,
    config: &MigrationConfig,
    control: &MigrationControl,
) -> rdmig_transport::Result<(Box<QemuDest>, DestReport)> {
    let port = listener
        .local_addr()
        .map_err(|e| rdmig_transport::Error::io("listener address", e, "control"))?
        .port();
    let listener_fd = listener.as_raw_fd();
    let watched = dest
        .qmp
        .try_clone_socket()
        .map_err(|e| rdmig_transport::Error::vmm("watch the destination QEMU", e))?;
    // The hook runs on the watcher's thread, which `stop` below joins before `listener` (and
    // with it `listener_fd`) can go away.
    let watch = ExitWatch::start(watched, dest.qmp.pid(), move |_| {
        let n = shut_down_tcp_port(listener_fd, port);
        tracing::info!("shut down {n} connection(s) of the incoming migration on port {port}");
    })
    .map_err(|e| rdmig_transport::Error::vmm("watch the destination QEMU", e))?;
    let mut dest = dest;
    let factory: DestinationFactory<'static> = Box::new(move |layout: &MemoryLayout| {
        check_layout(&dest.layout(), layout)?;
        // A QEMU that went away while the listener waited is refused here (QemuExited).
        let state = dest.qmp.run_state()?;
        if state != "inmigrate" {
            return Err(Error::QemuSetup(format!(
                "the destination QEMU is {state}, no longer waiting for a migration"
            ))
            .into());
        }
        Ok(Box::new(dest) as Box<dyn DestinationVm>)
    });
    let result = session::accept_controlled(listener, config, factory, control);
    let exited = watch.stop();
    match (result, exited) {
        (Ok((vm, report)), None) => Ok((into_qemu(vm).expect("built by this factory"), report)),
        (Ok(_), Some(why)) => Err(rdmig_transport::Error::vmm(
            "incoming migration",
            Error::QemuExited(format!("{why} as the migration completed")),
        )),
        (Err(e), Some(why)) => Err(rdmig_transport::Error::vmm(
            "incoming migration",
            Error::QemuExited(format!(
                "{why}; the incoming migration was stopped (the transport then saw: {e})"
            )),
        )),
        (Err(e), None) => Err(e),
    }
}

/// The [`QemuDest`] behind a destination VM returned by `accept`, if it is one.
pub fn into_qemu(vm: Box<dyn DestinationVm>) -> Option<Box<QemuDest>> {
    vm.into_any().downcast::<QemuDest>().ok()
}
