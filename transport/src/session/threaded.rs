//! Migrations on a thread of their own, driven through a handle: what a VMM whose main loop
//! must not block uses. [`Migration::start`] returns a [`MigrationHandle`] that derefs to the
//! migration's [`MigrationControl`] (cancel, progress, parameters, post-copy) and hands back
//! the VM with the outcome on [`MigrationHandle::join`].

use std::ops::Deref;
use std::thread::JoinHandle;

use super::config::MigrationConfig;
use super::dest::accept_with;
use super::handle::MigrationControl;
use super::source::migrate_with;
use super::stats::{DestReport, MigrationReport};
use crate::channel::{ChannelListener, MigrationChannel};
use crate::error::{Error, Result};
use crate::vm::{DestinationFactory, DestinationVm, SourceVm};

/// Starts migrations on a thread of their own.
pub struct Migration;

/// A source migration running on its own thread.
pub struct MigrationHandle {
    control: MigrationControl,
    thread: JoinHandle<(Box<dyn SourceVm>, Result<MigrationReport>)>,
}

/// A destination migration running on its own thread.
pub struct IncomingHandle {
    control: MigrationControl,
    thread: JoinHandle<Result<(Box<dyn DestinationVm>, DestReport)>>,
}

impl Migration {
    /// Migrates `vm` over `channel` on a new thread (`rdmig-migrate`).
    pub fn start(
        mut vm: Box<dyn SourceVm>,
        mut channel: Box<dyn MigrationChannel>,
        config: MigrationConfig,
    ) -> Result<MigrationHandle> {
        let control = MigrationControl::new();
        let c = control.clone();
        let thread = crate::threads::spawn("rdmig-migrate", move || {
            let r = migrate_with(vm.as_mut(), channel.as_mut(), &config, &c, &mut |_| {});
            (vm, r)
        })
        .map_err(|e| Error::io("spawning the migration thread", e, "control"))?;
        Ok(MigrationHandle { control, thread })
    }

    /// Accepts one migration on `listener` on a new thread (`rdmig-incoming`).
    pub fn incoming(
        listener: Box<dyn ChannelListener>,
        config: MigrationConfig,
        factory: DestinationFactory<'static>,
    ) -> Result<IncomingHandle> {
        let control = MigrationControl::new();
        let c = control.clone();
        let thread = crate::threads::spawn("rdmig-incoming", move || {
            accept_with(listener.as_ref(), &config, factory, &c)
        })
        .map_err(|e| Error::io("spawning the incoming migration thread", e, "control"))?;
        Ok(IncomingHandle { control, thread })
    }
}

impl MigrationHandle {
    /// Waits for the end: the VM back, and the outcome (on success the guest runs on the
    /// destination and the caller should stop this copy; on failure it runs here).
    pub fn join(self) -> (Box<dyn SourceVm>, Result<MigrationReport>) {
        self.thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

impl IncomingHandle {
    /// Waits for the end: the running guest and the report, or why none.
    pub fn join(self) -> Result<(Box<dyn DestinationVm>, DestReport)> {
        self.thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

impl Deref for MigrationHandle {
    type Target = MigrationControl;
    fn deref(&self) -> &MigrationControl {
        &self.control
    }
}

impl Deref for IncomingHandle {
    type Target = MigrationControl;
    fn deref(&self) -> &MigrationControl {
        &self.control
    }
}
