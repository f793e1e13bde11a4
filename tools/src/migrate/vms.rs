//! The VMs `migrate` can move: the synthetic VM, and (where /dev/kvm works) a real KVM guest.

use anyhow::Result;
use rdmig_transport::mem::{GuestAddress, PageSize};
use rdmig_transport::vm::{DestinationFactory, DestinationVm, MemoryLayout, SourceVm};
use rdmig_vmm::kvm::control::{GuestParams, GUEST_PAGE};
use rdmig_vmm::kvm::{KvmConfig, KvmDestConfig, KvmVm};
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
    rdmig_vmm::kvm::kvm_available()
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
    /// memfd-backed guest memory (either VM; zero-copy post-copy).
    pub memfd: bool,
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
            memfd: self.memfd,
        }
    }

    fn kvm(&self) -> KvmConfig {
        // The KVM guest's data pages are a little less than its memory (the program, its
        // parameters and the generation table come first): a working set of all memory (the
        // default for --mem 64MiB and below) means all data pages.
        let data = GuestParams::for_memory(self.mem, 0)
            .map_or(self.mem, |p| u64::from(p.data_pages) * GUEST_PAGE);
        KvmConfig {
            mem_bytes: self.mem,
            working_set: self.working_set.min(data),
            dirty_rate: self.dirty_rate,
            page_size: self.page,
            memfd: self.memfd,
        }
    }
}

/// A running VM on this host.
pub enum LocalVm {
    /// Synthetic.
    Synthetic(Box<SyntheticVm>),
    /// A KVM guest.
    Kvm(Box<KvmVm>),
}

impl LocalVm {
    /// Starts a source VM.
    pub fn start(kind: VmKind, p: &VmParams) -> Result<LocalVm> {
        match kind {
            VmKind::Synthetic => Ok(LocalVm::Synthetic(Box::new(SyntheticVm::start(
                &p.synthetic(),
            )?))),
            VmKind::Kvm => Ok(LocalVm::Kvm(Box::new(KvmVm::start(&p.kvm())?))),
        }
    }

    /// The migration seam.
    pub fn source(&mut self) -> &mut dyn SourceVm {
        match self {
            LocalVm::Synthetic(v) => v.as_mut(),
            LocalVm::Kvm(v) => v.as_mut(),
        }
    }

    /// A factory for the destination side, with guest memory allocated now (before the
    /// source connects) for the layout these parameters give.
    pub fn destination_factory(kind: VmKind, p: &VmParams) -> Result<DestinationFactory<'static>> {
        match kind {
            VmKind::Synthetic => {
                let prepared = SyntheticVm::prepare_destination(&p.synthetic())?;
                Ok(synthetic_destination_factory(p.synthetic(), Some(prepared)))
            }
            VmKind::Kvm => {
                // The KVM guest's layout is one region at 0; the guest keeps the source's rate.
                // Its memory is backed as the source's (--memfd is given to both ends).
                let expected = MemoryLayout {
                    page_size: p.page,
                    regions: vec![(GuestAddress(0), p.mem)],
                };
                let cfg = KvmDestConfig::default().with_memfd(p.memfd);
                let prepared = KvmVm::destination(&expected, &cfg)?;
                Ok(Box::new(move |layout: &MemoryLayout| {
                    let vm = if *layout == expected {
                        prepared
                    } else {
                        KvmVm::destination(layout, &cfg)?
                    };
                    Ok(Box::new(vm) as Box<dyn DestinationVm>)
                }))
            }
        }
    }

    /// Recovers the VM that `accept` built.
    pub fn from_destination(kind: VmKind, vm: Box<dyn DestinationVm>) -> Result<LocalVm> {
        let any = vm.into_any();
        match kind {
            VmKind::Synthetic => any
                .downcast::<SyntheticVm>()
                .map(LocalVm::Synthetic)
                .map_err(|_| anyhow::anyhow!("the destination VM is not a synthetic VM")),
            VmKind::Kvm => any
                .downcast::<KvmVm>()
                .map(LocalVm::Kvm)
                .map_err(|_| anyhow::anyhow!("the destination VM is not a KVM VM")),
        }
    }

    /// The guest's own check of its memory.
    pub fn self_check(&mut self) -> Result<GuestCheck> {
        match self {
            LocalVm::Synthetic(v) => Ok(v.verify()),
            LocalVm::Kvm(v) => Ok(v.self_check()?),
        }
    }

    /// True while the guest runs.
    pub fn running(&self) -> bool {
        match self {
            LocalVm::Synthetic(v) => v.running() || v.config().dirty_rate == 0,
            LocalVm::Kvm(v) => !v.is_paused(),
        }
    }

    /// Pages the guest has written.
    pub fn pages_written(&self) -> u64 {
        match self {
            LocalVm::Synthetic(v) => v.pages_written(),
            LocalVm::Kvm(v) => v.pages_dirtied(),
        }
    }
}
