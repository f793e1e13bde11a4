//! The VMs `migrate` can move: the synthetic VM, and (where /dev/kvm works) a real KVM guest.

use anyhow::Result;
use rdmig_transport::mem::PageSize;
use rdmig_transport::vm::{DestinationFactory, DestinationVm, SourceVm};
use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};
use rdmig_vmm::GuestCheck;

/// Which VM to migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VmKind {
    /// A real KVM guest (needs /dev/kvm).
    Kvm,
    /// An in-process synthetic VM with writer threads.
    Synthetic,
}

impl VmKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            VmKind::Kvm => "kvm",
            VmKind::Synthetic => "synthetic",
        }
    }

    /// The explicit choice, or KVM where it works and synthetic otherwise, with the reason.
    pub fn resolve(choice: Option<VmKind>) -> Result<(VmKind, String)> {
        match choice {
            Some(VmKind::Kvm) => {
                kvm_available().map_err(|why| anyhow::anyhow!("--vm kvm: {why}"))?;
                Ok((VmKind::Kvm, "requested".into()))
            }
            Some(VmKind::Synthetic) => Ok((VmKind::Synthetic, "requested".into())),
            None => match kvm_available() {
                Ok(()) => Ok((VmKind::Kvm, "/dev/kvm works here".into())),
                Err(why) => Ok((VmKind::Synthetic, format!("no KVM guest: {why}"))),
            },
        }
    }
}

fn kvm_available() -> Result<(), String> {
    Err("this build has no KVM guest yet".into())
}

/// What shapes the guest's memory and its writing.
#[derive(Clone, Debug)]
pub struct VmParams {
    /// Memory bytes.
    pub mem: u64,
    /// Working set bytes.
    pub working_set: u64,
    /// Dirty rate bytes/s.
    pub dirty_rate: u64,
    /// Page size.
    pub page: PageSize,
    /// Regions (synthetic).
    pub regions: u32,
    /// Writer threads (synthetic).
    pub writers: u32,
}

impl VmParams {
    fn synthetic(&self) -> SyntheticConfig {
        SyntheticConfig {
            mem_bytes: self.mem,
            working_set: self.working_set.min(self.mem),
            dirty_rate: self.dirty_rate,
            page_size: self.page,
            regions: self.regions,
            writers: self.writers,
        }
    }
}

/// A running VM on this host.
pub enum LocalVm {
    /// Synthetic.
    Synthetic(Box<SyntheticVm>),
}

impl LocalVm {
    /// Starts a source VM.
    pub fn start(kind: VmKind, p: &VmParams) -> Result<LocalVm> {
        match kind {
            VmKind::Synthetic => Ok(LocalVm::Synthetic(Box::new(SyntheticVm::start(
                &p.synthetic(),
            )?))),
            VmKind::Kvm => anyhow::bail!("--vm kvm: this build has no KVM guest yet"),
        }
    }

    /// The migration seam.
    pub fn source(&mut self) -> &mut dyn SourceVm {
        match self {
            LocalVm::Synthetic(v) => v.as_mut(),
        }
    }

    /// A factory for the destination side, with guest memory allocated now (before the
    /// source connects) for the layout these parameters give.
    pub fn destination_factory(kind: VmKind, p: &VmParams) -> Result<DestinationFactory<'static>> {
        match kind {
            VmKind::Synthetic | VmKind::Kvm => {
                let prepared = SyntheticVm::prepare_destination(&p.synthetic())?;
                Ok(synthetic_destination_factory(p.synthetic(), Some(prepared)))
            }
        }
    }

    /// Recovers the VM that `accept` built.
    pub fn from_destination(kind: VmKind, vm: Box<dyn DestinationVm>) -> Result<LocalVm> {
        let any = vm.into_any();
        match kind {
            VmKind::Synthetic | VmKind::Kvm => any
                .downcast::<SyntheticVm>()
                .map(LocalVm::Synthetic)
                .map_err(|_| anyhow::anyhow!("the destination VM is not a synthetic VM")),
        }
    }

    /// The guest's own check of its memory.
    pub fn self_check(&mut self) -> Result<GuestCheck> {
        match self {
            LocalVm::Synthetic(v) => Ok(v.verify()),
        }
    }

    /// True while the guest runs.
    pub fn running(&self) -> bool {
        match self {
            LocalVm::Synthetic(v) => v.running() || v.config().dirty_rate == 0,
        }
    }

    /// Pages the guest has written.
    pub fn pages_written(&self) -> u64 {
        match self {
            LocalVm::Synthetic(v) => v.pages_written(),
        }
    }
}
