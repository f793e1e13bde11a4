//! The VMs `migrate` can move: the synthetic VM, (where /dev/kvm works) a real KVM guest, and
//! an unmodified QEMU reached through its QMP socket.

use std::path::PathBuf;

use anyhow::{Context, Result};
use rdmig_transport::mem::{GuestAddress, PageSize};
use rdmig_transport::vm::{DestinationFactory, DestinationVm, MemoryLayout, SourceVm};
use rdmig_vmm::kvm::control::{GuestParams, GUEST_PAGE};
use rdmig_vmm::kvm::{KvmConfig, KvmDestConfig, KvmVm};
use rdmig_vmm::qemu::{
    qemu_destination_factory, QemuDest, QemuDestOptions, QemuSource, QemuSourceOptions,
    TrackingChoice,
};
use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};
use rdmig_vmm::GuestCheck;

/// Which VM to migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VmKind {
    /// A real KVM guest (needs /dev/kvm).
    Kvm,
    /// An in-process synthetic VM with writer threads.
    Synthetic,
    /// A QEMU (its QMP socket with --qemu-qmp; --loopback starts two with the test guest).
    Qemu,
}

impl VmKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            VmKind::Kvm => "kvm",
            VmKind::Synthetic => "synthetic",
            VmKind::Qemu => "qemu",
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
            Some(VmKind::Qemu) => Ok((VmKind::Qemu, "requested".into())),
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
    /// Bytes the guest wrote at start (`None`: all; synthetic and KVM).
    pub populated: Option<u64>,
    /// Percent of writes that write a zero page (synthetic).
    pub zero_share: u8,
    /// A destination allocates all guest memory before the migration.
    pub prealloc: bool,
    /// The QMP socket of this end's QEMU (`--vm qemu`).
    pub qemu_qmp: Option<PathBuf>,
    /// Dirty tracking of a QEMU source.
    pub tracking: TrackingChoice,
    /// The two QEMUs' consoles, when this program started them (`--loopback`): the source then
    /// checks the test guest's own verdict after the move.
    pub qemu_consoles: Option<(PathBuf, PathBuf)>,
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
            populated: self.populated,
            zero_share: self.zero_share,
            prealloc: self.prealloc,
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
            populated: self.populated,
        }
    }
}

/// A running VM on this host.
pub enum LocalVm {
    /// Synthetic.
    Synthetic(Box<SyntheticVm>),
    /// A KVM guest.
    Kvm(Box<KvmVm>),
    /// A source QEMU.
    Qemu(Box<QemuSource>),
    /// A destination QEMU (after the migration).
    QemuDest(Box<QemuDest>),
}

fn qmp_path(p: &VmParams) -> Result<&PathBuf> {
    p.qemu_qmp.as_ref().context(
        "--vm qemu needs --qemu-qmp PATH (this end's QEMU QMP socket; see docs/qemu.md), or --loopback",
    )
}

impl LocalVm {
    /// Starts a source VM.
    pub fn start(kind: VmKind, p: &VmParams) -> Result<LocalVm> {
        match kind {
            VmKind::Synthetic => Ok(LocalVm::Synthetic(Box::new(SyntheticVm::start(
                &p.synthetic(),
            )?))),
            VmKind::Kvm => Ok(LocalVm::Kvm(Box::new(KvmVm::start(&p.kvm())?))),
            VmKind::Qemu => {
                let opts = QemuSourceOptions {
                    tracking: p.tracking,
                    ..QemuSourceOptions::default()
                };
                Ok(LocalVm::Qemu(Box::new(QemuSource::attach(
                    qmp_path(p)?,
                    &opts,
                )?)))
            }
        }
    }

    /// The migration seam.
    pub fn source(&mut self) -> &mut dyn SourceVm {
        match self {
            LocalVm::Synthetic(v) => v.as_mut(),
            LocalVm::Kvm(v) => v.as_mut(),
            LocalVm::Qemu(v) => v.as_mut(),
            LocalVm::QemuDest(_) => unreachable!("only LocalVm::start makes a source"),
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
                    vm: None,
                };
                let cfg = KvmDestConfig::default()
                    .with_memfd(p.memfd)
                    .with_prealloc(p.prealloc);
                let prepared = KvmVm::destination(&expected, &cfg)?;
                Ok(Box::new(move |layout: &MemoryLayout| {
                    rdmig_vmm::kvm::check_descriptor(layout)?;
                    let vm = if *layout == expected {
                        prepared
                    } else {
                        KvmVm::destination(layout, &cfg)?
                    };
                    Ok(Box::new(vm) as Box<dyn DestinationVm>)
                }))
            }
            VmKind::Qemu => Ok(qemu_destination_factory(
                qmp_path(p)?,
                &QemuDestOptions::default(),
            )?),
        }
    }

    /// A factory for a destination started without `--vm`: it builds the kind of VM the source
    /// announces (synthetic, or KVM where /dev/kvm works), or `fallback` when the source does
    /// not say, and records the kind it built in `built`. A QEMU source is refused at once (this
    /// end must attach to a QEMU with `--vm qemu --qemu-qmp`).
    pub fn announced_destination_factory(
        fallback: VmKind,
        p: &VmParams,
        built: std::sync::Arc<std::sync::Mutex<VmKind>>,
    ) -> DestinationFactory<'static> {
        let p = p.clone();
        Box::new(move |layout: &MemoryLayout| {
            let announced = layout.vm.as_ref().map(|d| d.kind.as_str()).unwrap_or("");
            let kind = match announced {
                rdmig_vmm::synthetic::KIND => VmKind::Synthetic,
                rdmig_vmm::kvm::KIND => {
                    kvm_available().map_err(|why| {
                        format!("the source migrates a KVM guest and this host cannot run one: {why}")
                    })?;
                    VmKind::Kvm
                }
                rdmig_vmm::qemu::KIND => {
                    return Err("the source migrates a QEMU guest: start this end with --vm qemu and --qemu-qmp".into())
                }
                "" => fallback,
                other => {
                    return Err(format!("the source migrates a {other} VM, which rdma-bench cannot build").into())
                }
            };
            tracing::info!("building a {} VM, as the source announced", kind.name());
            *built.lock().unwrap_or_else(|e| e.into_inner()) = kind;
            match kind {
                VmKind::Synthetic => synthetic_destination_factory(p.synthetic(), None)(layout),
                VmKind::Kvm => {
                    let cfg = KvmDestConfig::default()
                        .with_memfd(p.memfd)
                        .with_prealloc(p.prealloc);
                    Ok(Box::new(KvmVm::destination(layout, &cfg)?) as Box<dyn DestinationVm>)
                }
                VmKind::Qemu => unreachable!("refused above"),
            }
        })
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
            VmKind::Qemu => any
                .downcast::<QemuDest>()
                .map(LocalVm::QemuDest)
                .map_err(|_| anyhow::anyhow!("the destination VM is not a QEMU")),
        }
    }

    /// The guest's own check of its memory (`None` for QEMU: its test guest checks itself and
    /// says so on its console, see `--vm qemu --loopback`).
    pub fn self_check(&mut self) -> Result<Option<GuestCheck>> {
        match self {
            LocalVm::Synthetic(v) => Ok(Some(v.verify())),
            LocalVm::Kvm(v) => Ok(Some(v.self_check()?)),
            LocalVm::Qemu(_) | LocalVm::QemuDest(_) => Ok(None),
        }
    }

    /// True while the guest runs.
    pub fn running(&mut self) -> bool {
        match self {
            LocalVm::Synthetic(v) => v.running() || v.config().dirty_rate == 0,
            LocalVm::Kvm(v) => !v.is_paused(),
            LocalVm::Qemu(v) => v.qmp().run_state().is_ok_and(|s| s == "running"),
            LocalVm::QemuDest(v) => v.qmp().run_state().is_ok_and(|s| s == "running"),
        }
    }

    /// Pages the guest has written (0 where the VMM does not count them).
    pub fn pages_written(&self) -> u64 {
        match self {
            LocalVm::Synthetic(v) => v.pages_written(),
            LocalVm::Kvm(v) => v.pages_dirtied(),
            LocalVm::Qemu(_) | LocalVm::QemuDest(_) => 0,
        }
    }

    /// The destination QEMU, if this is one.
    pub fn qemu_dest(&mut self) -> Option<&mut QemuDest> {
        match self {
            LocalVm::QemuDest(v) => Some(v.as_mut()),
            _ => None,
        }
    }

    /// The QEMU source, if this is one.
    pub fn qemu_source(&mut self) -> Option<&mut QemuSource> {
        match self {
            LocalVm::Qemu(v) => Some(v.as_mut()),
            _ => None,
        }
    }
}
