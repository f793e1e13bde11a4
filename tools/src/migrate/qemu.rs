//! `migrate --vm qemu`: refusing post-copy, starting two QEMUs with the project's test guest for
//! `--loopback`, attaching to the destination QEMU (watched while the migration comes in), and
//! the QEMU facts of the reports: on the source dirty tracking, QEMU's device-state bytes and the
//! test guest's verdict read from both consoles (when this host has both); on the destination the
//! guest's verdict read from its own console (`--qemu-console`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdmig_transport::session::MigrationMode;
use rdmig_vmm::qemu::console::{check_continuation, reports, Continuation, Resumed};
use rdmig_vmm::qemu::launch::{GuestImage, GuestSpec, QemuProcess, RamBacking, RunDir};
use rdmig_vmm::qemu::{QemuDest, QemuDestOptions, QemuSource};
use serde::{Deserialize, Serialize};

use super::vms::VmParams;
use super::{Args, Ctl};

/// Reports the destination guest must print after the move before it counts as verified.
const GUEST_REPORTS: usize = 4;

/// Post-copy needs userfaultfd inside QEMU's process.
pub fn check_mode(mode: MigrationMode) -> Result<()> {
    if mode != MigrationMode::Precopy {
        bail!(
            "--vm qemu migrates in pre-copy only: --mode {} needs userfaultfd registered inside \
             QEMU's own process, which rdmig cannot do from outside (use QEMU's postcopy-ram \
             for that)",
            mode.name()
        );
    }
    Ok(())
}

fn mib(what: &str, bytes: u64) -> Result<u64> {
    if !bytes.is_multiple_of(1 << 20) {
        bail!("--vm qemu needs {what} in whole MiB, not {bytes} bytes");
    }
    Ok(bytes >> 20)
}

/// `--loopback --vm qemu`: boots the source QEMU, starts the destination QEMU with
/// `-incoming defer`, and runs the usual loopback between them.
pub fn loopback(args: &Args, params: &VmParams, ctl: &Ctl) -> Result<ExitCode> {
    let image = GuestImage::from_env()
        .map_err(|why| anyhow::anyhow!("--vm qemu --loopback needs the test guest: {why}"))?;
    let spec = GuestSpec {
        mem_mib: mib("--mem", params.mem)?,
        ws_mib: mib("--working-set", params.working_set)?,
        rate_mib: mib("--dirty-rate", params.dirty_rate)?,
        backing: RamBacking::ShmFile,
        incoming: false,
        paused: false,
    };
    let dir = RunDir::new("qemu-loopback")?;
    let mut src = QemuProcess::launch(&image, &spec, dir.path(), "src")?;
    let dst = QemuProcess::launch(
        &image,
        &GuestSpec {
            incoming: true,
            ..spec
        },
        dir.path(),
        "dst",
    )?;
    let t = Instant::now();
    src.wait_reports(2, Duration::from_secs(90))
        .context("booting the source guest")?;
    eprintln!(
        "rdma-bench: source guest up in {:.1} s (QEMU pid {}), destination QEMU waiting (pid {})",
        t.elapsed().as_secs_f64(),
        src.pid(),
        dst.pid()
    );
    let mut args = args.clone();
    args.qemu_qmp = Some(src.qmp_path().to_path_buf());
    args.qemu_dest_qmp = Some(dst.qmp_path().to_path_buf());
    args.qemu_dest_console = Some(dst.console_path().to_path_buf());
    let mut params = params.clone();
    params.qemu_qmp = args.qemu_qmp.clone();
    params.qemu_consoles = Some((
        src.console_path().to_path_buf(),
        dst.console_path().to_path_buf(),
    ));
    super::loopback::run(&args, &params, ctl)
}

/// What a QEMU migration adds to the report.
#[derive(Debug, Serialize)]
pub struct QemuFacts {
    /// `soft-dirty` or `content`.
    pub dirty_tracking: &'static str,
    /// Why that one.
    pub tracking_reason: String,
    /// Bytes of QEMU's own stream (device state, ROMs).
    pub qemu_state_bytes: u64,
    /// Time of the fetch after `stop` (content comparison scans all memory there).
    pub final_fetch_ms: Option<f64>,
    /// The test guest's verdict after the move (`None`: this end cannot see its console).
    pub guest_verified: Option<bool>,
    /// What its console showed.
    pub guest: Option<Continuation>,
    /// Why it is not verified.
    pub guest_error: Option<String>,
}

fn read(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The facts of a finished migration from `src`; with the consoles known, waits (bounded) for
/// the destination guest's reports and checks them.
pub fn facts(src: &QemuSource, consoles: Option<&(PathBuf, PathBuf)>) -> QemuFacts {
    let mut f = QemuFacts {
        dirty_tracking: src.dirty_tracking().name(),
        tracking_reason: src.tracking_reason().to_string(),
        qemu_state_bytes: src.state_bytes(),
        final_fetch_ms: src.final_fetch_time().map(|d| d.as_secs_f64() * 1e3),
        guest_verified: None,
        guest: None,
        guest_error: None,
    };
    let Some((s, d)) = consoles else { return f };
    let deadline = Instant::now() + Duration::from_secs(30);
    while reports(&read(d)).len() < GUEST_REPORTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    match check_continuation(&read(s), &read(d), GUEST_REPORTS) {
        Ok(c) => {
            f.guest_verified = Some(true);
            f.guest = Some(c);
        }
        Err(e) => {
            f.guest_verified = Some(false);
            f.guest_error = Some(e);
        }
    }
    f
}

/// The destination QEMU of `--listen --vm qemu`, attached before the listener opens (so setup
/// mistakes show at once).
pub fn attach_destination(args: &Args, params: &VmParams) -> Result<QemuDest> {
    let qmp = params.qemu_qmp.as_ref().context(
        "--vm qemu needs --qemu-qmp PATH (this end's QEMU QMP socket; see docs/qemu.md), or --loopback",
    )?;
    let opts = QemuDestOptions {
        console: args.qemu_console.clone(),
        ..QemuDestOptions::default()
    };
    QemuDest::attach(qmp, &opts)
        .with_context(|| format!("attaching to the destination QEMU at {}", qmp.display()))
}

/// What a destination QEMU adds to the destination's report.
#[derive(Debug, Serialize, Deserialize)]
pub struct DestQemuFacts {
    /// Bytes of QEMU's own stream loaded (device state, ROMs).
    pub qemu_state_bytes: u64,
    /// The console file read (`--qemu-console`).
    pub console: Option<PathBuf>,
    /// The test guest's verdict from this end's console alone (`None`: no console given).
    pub guest_verified: Option<bool>,
    /// What the console showed.
    pub guest: Option<Resumed>,
    /// Why it is not verified.
    pub guest_error: Option<String>,
}

/// The facts of a finished incoming migration; with a console, waits (bounded) for the
/// guest's reports and checks them.
pub fn destination_facts(d: &mut QemuDest) -> DestQemuFacts {
    let verdict = d.guest_verdict(GUEST_REPORTS, Duration::from_secs(30));
    DestQemuFacts {
        qemu_state_bytes: d.state_bytes(),
        console: d.console_path().map(Path::to_path_buf),
        guest_verified: verdict.as_ref().map(Result::is_ok),
        guest: verdict.as_ref().and_then(|v| v.as_ref().ok().copied()),
        guest_error: verdict.and_then(Result::err),
    }
}
