//! `rdma-bench migrate`: a live migration, as two processes on this host (`--loopback`) or one
//! end each on two hosts (`--listen` / `--connect`).
//!
//! Either end can be driven while it runs: SIGINT or SIGTERM cancels it ([`signals`]), and
//! `--control-socket PATH` serves QEMU's QMP migration commands ([`control_socket`]). A
//! cancelled migration exits with status 130 ([`signals::EXIT_CANCELLED`]).

mod control_socket;
mod loopback;
mod qemu;
mod report;
mod signals;
mod vms;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdmig_transport::auth::Psk;
use rdmig_transport::channel::tls::{TlsChannel, TlsCreds, TlsListener};
use rdmig_transport::mem::PageSize;
use rdmig_transport::rdma::RdmaOptions;
use rdmig_transport::session::{
    self, ConvergencePolicy, MigrationConfig, MigrationControl, MigrationMode, Phase,
};
use rdmig_transport::wire::TransportKind;

use crate::units::{parse_duration, parse_rate, parse_size};
use control_socket::ControlSocket;
use rdmig_vmm::GuestCheck;
pub use report::DestOutcome;
use signals::{Signals, EXIT_CANCELLED};
use vms::{LocalVm, VmKind, VmParams};

/// Which end of the migration this process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// `--connect`, or the parent of `--loopback`.
    Source,
    /// `--listen`, or the child of `--loopback`.
    Destination,
}

/// What drives the running migration from outside: the control the signal handler and the
/// control socket share with the session.
pub struct Ctl {
    control: MigrationControl,
    signals: Signals,
    socket: Mutex<Option<ControlSocket>>,
}

impl Ctl {
    /// The migration ended with `phase`: the control socket says so and closes.
    fn ended(&self, phase: Phase) {
        signals::migration_ended();
        let socket = self.socket.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(s) = socket {
            s.finish(phase);
        }
    }

    /// The phase a migration ended in: `error` is its error (`None`: it completed). Any
    /// failure after an accepted cancel counts as the cancel (shutting its connections down may
    /// surface as an I/O error first).
    fn outcome(&self, error: Option<&anyhow::Error>) -> Phase {
        let cancelled = |e: &anyhow::Error| {
            e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<rdmig_transport::Error>(),
                    Some(rdmig_transport::Error::Cancelled)
                )
            })
        };
        match error {
            None => Phase::Completed,
            Some(e) if self.control.is_cancelled() || cancelled(e) => Phase::Cancelled,
            Some(_) => Phase::Failed,
        }
    }
}

/// Transport choice on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TransportArg {
    /// RDMA when both ends have a usable device, else TCP.
    Auto,
    /// TCP data streams.
    Tcp,
    /// One-sided RDMA reads (fails if no device).
    Rdma,
}

/// Migration mode on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Pre-copy rounds, then stop-and-copy.
    Precopy,
    /// Switch over at once; pages are fetched on demand (userfaultfd) and prefetched.
    Postcopy,
    /// Pre-copy rounds; post-copy when they stop converging.
    Hybrid,
}

impl ModeArg {
    /// The transport's mode.
    pub fn mode(self) -> MigrationMode {
        match self {
            ModeArg::Precopy => MigrationMode::Precopy,
            ModeArg::Postcopy => MigrationMode::Postcopy,
            ModeArg::Hybrid => MigrationMode::Hybrid,
        }
    }
}

/// Dirty tracking of a QEMU source on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TrackingArg {
    /// Soft-dirty where it works, else content comparison.
    Auto,
    /// Soft-dirty bits of QEMU's page tables (needs CONFIG_MEM_SOFT_DIRTY).
    SoftDirty,
    /// Compare every page's hash with what the destination holds (any kernel; the final pass
    /// hashes all RAM that holds data).
    Content,
}

/// Non-convergence policy on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PolicyArg {
    /// Switch over anyway.
    Stop,
    /// Abort; the source keeps running.
    Abort,
}

/// Arguments of `migrate`.
#[derive(clap::Args, Debug, Clone)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["loopback", "listen", "connect"]))]
pub struct Args {
    /// Run source and destination as two processes on this host.
    #[arg(long)]
    pub loopback: bool,
    /// Be the destination: listen on ADDR (host:port) for one incoming migration.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Be the source: migrate to the destination listening at ADDR (host:port).
    #[arg(long, value_name = "ADDR")]
    pub connect: Option<SocketAddr>,
    /// Data transport.
    #[arg(long, value_enum, default_value = "auto")]
    pub transport: TransportArg,
    /// Pre-copy, post-copy (switch over at once, fetch pages on demand) or hybrid (post-copy
    /// when pre-copy stops converging). Post-copy needs userfaultfd on the destination.
    #[arg(long = "mode", value_enum, default_value = "precopy")]
    pub migration_mode: ModeArg,
    /// VM to migrate [default: kvm where /dev/kvm works, synthetic otherwise].
    #[arg(long, value_enum)]
    pub vm: Option<VmKind>,
    /// Guest memory size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub mem: u64,
    /// Part of guest memory the guest keeps writing [default: 64MiB, or all of --mem if less].
    #[arg(long = "working-set", value_parser = parse_size)]
    pub working_set: Option<u64>,
    /// How fast the guest dirties its working set (e.g. 128MiB/s; 0 = idle).
    #[arg(long = "dirty-rate", default_value = "64MiB/s", value_parser = parse_rate)]
    pub dirty_rate: u64,
    /// Part of guest memory the guest has written when it starts (synthetic VM, KVM guest)
    /// [default: all of it]. The rest stays zero and untouched, as in a freshly booted guest.
    #[arg(long, value_parser = parse_size)]
    pub populated: Option<u64>,
    /// Percent of the synthetic guest's writes that write a zero page (a guest freeing and
    /// zeroing memory), so that pages turn zero and non-zero between rounds.
    #[arg(long = "zero-writes", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub zero_writes: u8,
    /// On the destination (synthetic VM, KVM guest): allocate all guest memory before the
    /// migration, as QEMU's -mem-prealloc does. Pages then need no allocation while they
    /// arrive, but every page costs memory, zero or not.
    #[arg(long)]
    pub prealloc: bool,
    /// Move zero pages as page data too (by default they travel as ranges, never as bytes).
    #[arg(long = "no-zero-pages")]
    pub no_zero_pages: bool,
    /// Page size for dirty tracking and transfer.
    #[arg(long = "page-size", default_value = "4KiB", value_parser = parse_size)]
    pub page_size: u64,
    /// Longest acceptable switchover downtime.
    #[arg(long = "downtime-limit", default_value = "300ms", value_parser = parse_duration)]
    pub downtime_limit: Duration,
    /// Most pre-copy rounds (round 0 included) before --policy applies.
    #[arg(long = "max-rounds", default_value_t = 30)]
    pub max_rounds: u32,
    /// Apply --policy when pre-copy makes no progress (no round leaves a dirty set smaller
    /// than the smallest yet) for this long (default: no such limit).
    #[arg(long = "progress-timeout", value_name = "DURATION", value_parser = parse_duration)]
    pub progress_timeout: Option<Duration>,
    /// Post-copy recovery: how long a link failure after the switchover may last (the source
    /// reconnects, the destination waits); 0 turns recovery off.
    #[arg(long = "recover-timeout", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub recover_timeout: Duration,
    /// What to do when pre-copy does not converge.
    #[arg(long, value_enum, default_value = "stop")]
    pub policy: PolicyArg,
    /// Throttle a guest whose rounds do not shrink (20 %, then 10 % more each such round, up to
    /// 99 %) before --policy applies, as QEMU's auto-converge; lifted when the migration ends.
    #[arg(long = "auto-converge")]
    pub auto_converge: bool,
    /// Bandwidth cap (e.g. 500MiB/s).
    #[arg(long = "max-bandwidth", value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// TCP data streams.
    #[arg(long, default_value_t = 4)]
    pub streams: u16,
    /// RDMA queue pairs.
    #[arg(short = 'q', long, default_value_t = 4)]
    pub qps: u16,
    /// RDMA device (default: the one whose RoCE v2 GID matches the control address).
    #[arg(short = 'd', long = "ib-dev")]
    pub ib_dev: Option<String>,
    /// RDMA GID index.
    #[arg(short = 'x', long = "gid-index")]
    pub gid_index: Option<u8>,
    /// RDMA port number.
    #[arg(short = 'i', long = "ib-port")]
    pub ib_port: Option<u8>,
    /// File holding the pre-shared key (at least 16 bytes; required with --listen/--connect
    /// unless --tls-creds is given: then TLS alone authenticates, or both do).
    #[arg(long = "psk-file")]
    pub psk_file: Option<PathBuf>,
    /// Run every connection in mutual TLS with the x509 credentials in DIR (QEMU's layout:
    /// ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem; see
    /// docs/tls.md). Give it to both ends. With RDMA only the control connection is in TLS.
    #[arg(long = "tls-creds", value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the --connect address's
    /// IP, as QEMU does).
    #[arg(long = "tls-hostname", value_name = "NAME", requires = "tls_creds")]
    pub tls_hostname: Option<String>,
    /// With --tls-creds: stay with user-space rustls even where the kernel has kernel TLS
    /// (the `tls` module), e.g. to compare the two.
    #[arg(long = "no-ktls", requires = "tls_creds")]
    pub no_ktls: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Serve QEMU's QMP migration commands on a Unix socket at PATH while the migration runs
    /// (query-migrate, migrate-set-parameters, migrate_cancel, migrate-start-postcopy, and
    /// MIGRATION events); removed at exit. With --loopback this is the source's; the
    /// destination child serves PATH.dest. SIGINT or SIGTERM cancels the migration too (exit
    /// status 130).
    #[arg(long = "control-socket", value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Address --loopback listens on (use the RDMA interface's address for RDMA).
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Memory regions of the synthetic VM.
    #[arg(long, default_value_t = 1)]
    pub regions: u32,
    /// Writer threads of the synthetic VM.
    #[arg(long, default_value_t = 1)]
    pub writers: u32,
    /// Back the guest's memory (synthetic VM or KVM guest) with memfds mapped shared, so that
    /// post-copy installs pages in place with UFFDIO_CONTINUE (zero-copy, minor faults; needs
    /// Linux 5.13+) instead of UFFDIO_COPY. Give it to both ends (--listen and --connect).
    #[arg(long)]
    pub memfd: bool,
    /// Longest wait for any message (a whole message, not one read) or round.
    #[arg(long = "io-timeout", default_value = "120s", value_parser = parse_duration)]
    pub io_timeout: Duration,
    /// How long --listen serves for an authenticated migration (default: for ever). Refused
    /// connections (wrong key, silent, malformed) do not end it; when it passes, the last
    /// refusal is reported.
    #[arg(long = "listen-timeout", value_parser = parse_duration)]
    pub listen_timeout: Option<Duration>,
    /// Largest guest a --listen destination accepts (never more than the host can give).
    #[arg(long = "max-guest-mem", default_value = "1TiB", value_parser = parse_size)]
    pub max_guest_mem: u64,
    /// How long the destination lets the guest run after resume before its self-check.
    #[arg(long = "run-after", default_value = "200ms", value_parser = parse_duration)]
    pub run_after: Duration,
    /// The QMP socket of this end's QEMU (--vm qemu with --listen or --connect): on the source
    /// the running QEMU, on the destination one started with -incoming defer -S and the same
    /// RAM backends (share=on). See docs/qemu.md.
    #[arg(long = "qemu-qmp", value_name = "PATH")]
    pub qemu_qmp: Option<PathBuf>,
    /// Dirty tracking of a QEMU source: soft-dirty when a probe write shows it works, else
    /// content comparison (each page's hash against the destination's hash of what it holds).
    #[arg(long = "dirty-tracking", value_enum, default_value = "auto")]
    pub dirty_tracking: TrackingArg,
    /// The file the destination QEMU's serial console goes to (-serial file:PATH; --vm qemu
    /// with --listen): the test guest's own verdict after the resume is read from it and
    /// reported as guest_verified (QMP does not tell a file chardev's path).
    #[arg(long = "qemu-console", value_name = "PATH")]
    pub qemu_console: Option<PathBuf>,
    /// (internal) the destination QEMU's QMP socket for the --loopback child.
    #[arg(long = "qemu-dest-qmp", hide = true)]
    pub qemu_dest_qmp: Option<PathBuf>,
    /// (internal) the destination QEMU's console file for the --loopback child.
    #[arg(long = "qemu-dest-console", hide = true)]
    pub qemu_dest_console: Option<PathBuf>,
    /// (internal) write the listening port here.
    #[arg(long = "port-file", hide = true)]
    pub port_file: Option<PathBuf>,
    /// (internal) write the destination's outcome here as JSON.
    #[arg(long = "result-file", hide = true)]
    pub result_file: Option<PathBuf>,
}

impl Args {
    fn params(&self) -> Result<VmParams> {
        let page = PageSize::new(self.page_size).context("--page-size")?;
        if self.mem == 0 || !self.mem.is_multiple_of(page.bytes()) {
            bail!(
                "--mem must be a positive multiple of the page size ({} bytes)",
                page.bytes()
            );
        }
        let working_set = self.working_set.unwrap_or(self.mem.min(64 << 20));
        if self.dirty_rate > 0 && working_set < page.bytes() {
            bail!("--working-set must be at least one page when --dirty-rate is not 0");
        }
        if working_set > self.mem {
            bail!(
                "--working-set ({working_set}) is larger than --mem ({})",
                self.mem
            );
        }
        if let Some(p) = self.populated {
            if p > self.mem {
                bail!("--populated ({p}) is larger than --mem ({})", self.mem);
            }
        }
        // Guest memory is populated up front: refuse what this host cannot give, before the
        // OOM killer does it halfway (--loopback runs both ends here, so twice the memory).
        let copies = if self.loopback { 2 } else { 1 };
        let what = if self.loopback {
            "--mem (twice: --loopback runs both ends on this host)"
        } else {
            "--mem"
        };
        if let Err(why) =
            rdmig_transport::mem::HostMemory::now().check(self.mem.saturating_mul(copies), what)
        {
            bail!("{why}");
        }
        Ok(VmParams {
            mem: self.mem,
            working_set,
            dirty_rate: self.dirty_rate,
            page,
            regions: self.regions.max(1),
            writers: self.writers.max(1),
            memfd: self.memfd,
            populated: self.populated,
            zero_share: self.zero_writes,
            prealloc: self.prealloc,
            qemu_qmp: self.qemu_qmp.clone(),
            tracking: match self.dirty_tracking {
                TrackingArg::Auto => rdmig_vmm::qemu::TrackingChoice::Auto,
                TrackingArg::SoftDirty => rdmig_vmm::qemu::TrackingChoice::SoftDirty,
                TrackingArg::Content => rdmig_vmm::qemu::TrackingChoice::Content,
            },
            qemu_consoles: None,
        })
    }

    fn config(&self, psk: Psk, local: Option<IpAddr>) -> MigrationConfig {
        MigrationConfig::new(psk)
            .with_transport(match self.transport {
                TransportArg::Auto => TransportKind::Auto,
                TransportArg::Tcp => TransportKind::Tcp,
                TransportArg::Rdma => TransportKind::Rdma,
            })
            .with_streams(self.streams)
            .with_mode(self.migration_mode.mode())
            .with_downtime_limit(self.downtime_limit)
            .with_max_rounds(self.max_rounds)
            .with_progress_timeout(self.progress_timeout)
            .with_recover_timeout((!self.recover_timeout.is_zero()).then_some(self.recover_timeout))
            .with_policy(match self.policy {
                PolicyArg::Stop => ConvergencePolicy::Stop,
                PolicyArg::Abort => ConvergencePolicy::Abort,
            })
            .with_max_bandwidth(self.max_bandwidth)
            .with_io_timeout(self.io_timeout)
            .with_max_guest_bytes(self.max_guest_mem)
            .with_listen_timeout(self.listen_timeout)
            .with_zero_pages(!self.no_zero_pages)
            .with_auto_converge(self.auto_converge)
            .with_rdma(RdmaOptions {
                device: self.ib_dev.clone(),
                gid_index: self.gid_index,
                port: self.ib_port,
                qps: self.qps,
                local_addr: local.filter(|a| !a.is_loopback()),
            })
    }

    fn psk(&self) -> Result<Psk> {
        let Some(path) = &self.psk_file else {
            if self.tls_creds.is_some() {
                return Ok(Psk::tls_only());
            }
            bail!("--psk-file is required with --listen/--connect unless --tls-creds is given: both ends need the same key of at least 16 bytes (e.g. head -c 32 /dev/urandom > key), or TLS credentials (see docs/tls.md), or both");
        };
        Psk::from_file(path).context("--psk-file")
    }

    /// The TLS credentials, checked for what this end needs (`None`: no TLS).
    fn tls(&self) -> Result<Option<TlsCreds>> {
        let Some(dir) = &self.tls_creds else {
            return Ok(None);
        };
        if self.vm == Some(VmKind::Qemu) {
            bail!("--tls-creds is not supported with --vm qemu yet");
        }
        let mut creds = TlsCreds::from_dir(dir).context("--tls-creds")?;
        creds.ktls = !self.no_ktls;
        if self.listen.is_some() || self.loopback {
            creds.server_config().context("--tls-creds")?;
        }
        if self.connect.is_some() || self.loopback {
            creds.client_config().context("--tls-creds")?;
        }
        Ok(Some(creds))
    }
}

/// Runs `migrate`.
pub fn run(args: Args) -> Result<ExitCode> {
    if args.streams == 0 || args.streams > 64 {
        bail!("--streams must be between 1 and 64");
    }
    if args.qps == 0 || args.qps > 64 {
        bail!("--qps must be between 1 and 64");
    }
    let params = args.params()?;
    // Every value is checked before any VM is built or memory is touched.
    let checked = args.config(Psk::random()?, None);
    checked.validate().context("invalid arguments")?;
    args.tls()?;
    if matches!(args.transport, TransportArg::Rdma) {
        if let Err(why) = rdmig_transport::rdma::probe(&checked.rdma) {
            bail!("RDMA unavailable: --transport rdma needs a usable RDMA device here: {why}");
        }
    }
    if args.vm == Some(VmKind::Qemu) {
        qemu::check_mode(args.migration_mode.mode())?;
    }
    let end = if args.listen.is_some() {
        End::Destination
    } else {
        End::Source
    };
    let control = MigrationControl::new();
    let signals = Signals::install(&control, end)?;
    let socket = match &args.control_socket {
        Some(p) => {
            // A cancel at the --loopback source reaches the child at once, as a signal's does.
            let s = signals.clone();
            let on_cancel = Box::new(move || s.pass_on());
            let page = args.page_size;
            Some(ControlSocket::start(p, &control, end, page, on_cancel)?)
        }
        None => None,
    };
    let ctl = Ctl {
        control,
        signals,
        socket: Mutex::new(socket),
    };
    let code = if args.vm == Some(VmKind::Qemu) && args.loopback && args.qemu_qmp.is_none() {
        qemu::loopback(&args, &params, &ctl)
    } else if args.loopback {
        loopback::run(&args, &params, &ctl)
    } else if let Some(addr) = args.listen {
        listen(&args, &params, addr, &ctl)
    } else if let Some(addr) = args.connect {
        connect(&args, &params, addr, &ctl, None)
    } else {
        bail!("one of --loopback, --listen or --connect is required")
    };
    // Whatever ended it (a setup error too), the socket goes.
    ctl.ended(if code.is_ok() {
        Phase::Completed
    } else {
        Phase::Failed
    });
    code
}

/// Tells the user that the migration was cancelled at the source (one line on stderr, and the
/// JSON object with --json); `running`: the source VM's state (`None`: none was started).
fn source_cancelled(
    args: &Args,
    ctl: &Ctl,
    kind: Option<VmKind>,
    running: Option<bool>,
    dest: Option<&DestOutcome>,
) -> ExitCode {
    let p = ctl.control.progress();
    let state = match running {
        Some(true) => "; the source VM keeps running",
        Some(false) => "; the source VM is NOT running",
        None => ", before the source VM started",
    };
    eprintln!(
        "rdma-bench: migration cancelled after {:.1} s{state}",
        p.elapsed.as_secs_f64()
    );
    if args.json {
        report::print_cancelled(&p, kind, args.migration_mode.mode(), running, dest);
    }
    ExitCode::from(EXIT_CANCELLED)
}

/// The destination end.
fn listen(args: &Args, params: &VmParams, addr: SocketAddr, ctl: &Ctl) -> Result<ExitCode> {
    let (mut kind, mut why) = VmKind::resolve(args.vm)?;
    let psk = args.psk()?;
    // Without --vm the destination builds what the source announces (the default kind if it
    // does not say); with --vm it builds that kind, prepared now, and refuses another.
    let built = std::sync::Arc::new(std::sync::Mutex::new(kind));
    // A QEMU is attached now and watched while the migration comes in (qemu::accept).
    let (factory, qemu_dest) = if kind == VmKind::Qemu {
        (None, Some(qemu::attach_destination(args, params)?))
    } else if args.vm.is_none() {
        why = format!(
            "the kind the source announces; {} if it does not say ({why})",
            kind.name()
        );
        (
            Some(LocalVm::announced_destination_factory(
                kind,
                params,
                built.clone(),
            )),
            None,
        )
    } else {
        (Some(LocalVm::destination_factory(kind, params)?), None)
    };
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    let local = listener.local_addr()?;
    if let Some(f) = &args.port_file {
        std::fs::write(f, local.port().to_string())
            .with_context(|| format!("writing {}", f.display()))?;
    } else {
        eprintln!(
            "rdma-bench: waiting for a migration on {local} ({} VM: {why})",
            kind.name()
        );
    }
    let config = args.config(psk, Some(local.ip()));
    let tls = match args.tls()? {
        Some(creds) => Some(TlsListener::new(
            listener.try_clone().context("the listening socket")?,
            &creds,
        )?),
        None => None,
    };
    let channel: &dyn rdmig_transport::ChannelListener = match &tls {
        Some(t) => t,
        None => &listener,
    };
    let result = match (factory, qemu_dest) {
        (Some(factory), _) => session::accept_with(channel, &config, factory, &ctl.control)
            .map_err(anyhow::Error::new)
            .and_then(|(vm, dest)| {
                kind = *built.lock().unwrap_or_else(|e| e.into_inner());
                Ok((LocalVm::from_destination(kind, vm)?, dest))
            }),
        (None, Some(q)) => {
            rdmig_vmm::qemu::accept_into_controlled(q, &listener, &config, &ctl.control)
                .map(|(vm, dest)| (LocalVm::QemuDest(vm), dest))
                .map_err(anyhow::Error::new)
        }
        (None, None) => unreachable!("one of the two is prepared"),
    };
    let phase = ctl.outcome(result.as_ref().err());
    ctl.ended(phase);
    let outcome = match result {
        Ok((mut vm, dest)) => {
            std::thread::sleep(args.run_after);
            let check: Option<report::GuestCheckWire> = vm.self_check()?.map(Into::into);
            let qemu = vm.qemu_dest().map(qemu::destination_facts);
            let running = vm.running();
            DestOutcome {
                ok: true,
                outcome: Phase::Completed.name().into(),
                error: None,
                vm: kind.name().into(),
                dest: Some(dest),
                guest_verified: qemu
                    .as_ref()
                    .map_or(check.as_ref().map(|c| c.ok()), |q| q.guest_verified),
                guest_check: check,
                guest_running: running,
                qemu,
            }
        }
        Err(e) => DestOutcome {
            ok: false,
            outcome: phase.name().into(),
            error: Some(crate::errors::describe(&e)),
            vm: kind.name().into(),
            dest: None,
            guest_check: None,
            guest_running: false,
            guest_verified: None,
            qemu: None,
        },
    };
    if let Some(f) = &args.result_file {
        std::fs::write(f, serde_json::to_vec(&outcome)?)
            .with_context(|| format!("writing {}", f.display()))?;
    } else if phase == Phase::Cancelled {
        eprintln!("rdma-bench: incoming migration cancelled; the incoming guest was discarded");
        if args.json {
            report::print_destination(&outcome, true);
        }
    } else {
        report::print_destination(&outcome, args.json);
    }
    if phase == Phase::Cancelled {
        return Ok(ExitCode::from(EXIT_CANCELLED));
    }
    if let Some(e) = &outcome.error {
        bail!("incoming migration failed: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The source end; `dest_result` reads the destination's outcome (loopback; `true`: the
/// migration was cancelled, end the destination first).
fn connect(
    args: &Args,
    params: &VmParams,
    addr: SocketAddr,
    ctl: &Ctl,
    dest_result: Option<&dyn Fn(bool) -> Option<DestOutcome>>,
) -> Result<ExitCode> {
    let (kind, why) = VmKind::resolve(args.vm)?;
    let psk = args.psk()?;
    let config = args.config(psk, None);
    let mut channel: Box<dyn rdmig_transport::MigrationChannel> = match args.tls()? {
        Some(creds) => Box::new(TlsChannel::tcp(addr, &creds, args.tls_hostname.as_deref())?),
        None => Box::new(rdmig_transport::channel::TcpChannel(addr)),
    };
    let mut vm =
        LocalVm::start(kind, params).with_context(|| format!("starting the {} VM", kind.name()))?;
    let mut progress = report::Progress::new(!args.json);
    progress.start(kind, &why, params);
    let result = session::migrate_with(
        vm.source(),
        &mut *channel,
        &config,
        &ctl.control,
        &mut |r| progress.round(r),
    );
    progress.finish();
    let result = result.map_err(anyhow::Error::new);
    let phase = ctl.outcome(result.as_ref().err());
    ctl.ended(phase);
    if phase == Phase::Cancelled {
        let running = vm.running();
        let dest = dest_result.and_then(|f| f(true));
        return Ok(source_cancelled(
            args,
            ctl,
            Some(kind),
            Some(running),
            dest.as_ref(),
        ));
    }
    match result {
        Ok(rep) => {
            let qemu = vm
                .qemu_source()
                .map(|s| qemu::facts(s, params.qemu_consoles.as_ref()));
            drop(vm);
            let dest = dest_result.and_then(|f| f(false));
            report::print_migration(&rep, kind, dest.as_ref(), qemu.as_ref(), args.json);
            let guest_ok = dest
                .as_ref()
                .and_then(|d| d.guest_check.as_ref())
                .is_none_or(|c| c.ok())
                && qemu.as_ref().and_then(|q| q.guest_verified) != Some(false)
                && dest.as_ref().and_then(|d| d.guest_verified) != Some(false);
            Ok(if rep.verified && guest_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(e) if kind == VmKind::Qemu => {
            let state = if vm.running() {
                "running"
            } else {
                "NOT running"
            };
            eprintln!("rdma-bench: migration failed; the source QEMU is {state}");
            Err(e.context("migration failed"))
        }
        Err(e) => {
            let before = vm.pages_written();
            std::thread::sleep(Duration::from_millis(100));
            let wrote = vm.pages_written() - before;
            let check = vm.self_check()?.unwrap_or(GuestCheck {
                pages_checked: 0,
                pages_skipped: 0,
                pages_bad: 0,
                first_bad: None,
            });
            let state = if vm.running() { "running" } else { "paused" };
            eprintln!(
                "rdma-bench: migration failed; the source VM is {state} (wrote {wrote} pages in the last 100 ms), its self-check {} ({} pages checked, {} bad)",
                if check.ok() { "passed" } else { "FAILED" },
                check.pages_checked,
                check.pages_bad
            );
            Err(e.context("migration failed"))
        }
    }
}
