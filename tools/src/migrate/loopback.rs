//! `--loopback`: the destination runs as a child process of this one (`migrate --listen` on
//! an ephemeral port), with a fresh random key shared through a private file.
//!
//! The child ends with this process. A SIGINT or SIGTERM that cancels the migration here is
//! passed on to the child as SIGTERM, which cancels its end (it is a `--listen` process with
//! its own handlers); this process then waits a few seconds for it and kills what is left.
//! As the backstop, the child asks for SIGTERM when its parent dies (`PR_SET_PDEATHSIG`), so
//! a parent killed outright does not leave a destination listening for ever or holding the
//! guest's memory. With `--control-socket PATH` the child serves `PATH.dest`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdmig_transport::auth::{random_bytes, Psk};

use super::{connect, signals, source_cancelled, Args, Ctl, DestOutcome, VmParams};
use rdmig_transport::session::Phase;

/// A private scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let tag: [u8; 8] = random_bytes()?;
        let dir = std::env::temp_dir().join(format!(
            "rdmig-{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(tag)
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        signals::remove_on_exit(dir.clone());
        Ok(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        signals::forget(&self.0);
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("removing {}: {e}", self.0.display());
        }
    }
}

struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Makes the process `cmd` starts get SIGTERM when this one dies. The kernel sends it when the
/// thread that forked the child exits: `run` is called on the main thread, which lives as long
/// as the process.
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    let arm = move || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes the signal number as its only argument.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died between the fork and the prctl: the signal would never come.
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // The closure runs in the forked child before exec.
    // SAFETY: it only makes two async-signal-safe system calls and builds io::Errors from errnos.
    unsafe { cmd.pre_exec(arm) };
}

fn write_key(path: &Path, psk: &Psk) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(psk.as_bytes())?;
    Ok(())
}

/// Runs both ends.
pub fn run(args: &Args, params: &VmParams, ctl: &Ctl) -> Result<ExitCode> {
    if ctl.control.is_cancelled() {
        ctl.ended(Phase::Cancelled);
        return Ok(source_cancelled(args, ctl, args.vm, None, None));
    }
    let scratch = Scratch::new()?;
    let (key, port_file, result_file) = (
        scratch.path("key"),
        scratch.path("port"),
        scratch.path("result.json"),
    );
    // With TLS and no key given, TLS alone authenticates (no key is made).
    let keyed = args.tls_creds.is_none() || args.psk_file.is_some();
    if keyed {
        write_key(&key, &Psk::random()?)?;
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("migrate")
        .arg("--listen")
        .arg(format!("{}:0", fmt_ip(args.bind)))
        .arg("--port-file")
        .arg(&port_file)
        .arg("--result-file")
        .arg(&result_file)
        .args(keyed.then_some("--psk-file"))
        .args(keyed.then_some(&key))
        .args(["--mem", &args.mem.to_string()])
        .args(["--working-set", &params.working_set.to_string()])
        .args(["--dirty-rate", &args.dirty_rate.to_string()])
        .args(["--page-size", &args.page_size.to_string()])
        .args(["--writers", &args.writers.to_string()])
        .args(["--regions", &args.regions.to_string()])
        .args(args.memfd.then_some("--memfd"))
        .args(args.no_zero_pages.then_some("--no-zero-pages"))
        .args(args.prealloc.then_some("--prealloc"))
        .args([
            "--io-timeout",
            &format!("{}ms", args.io_timeout.as_millis()),
        ])
        .args(["--run-after", &format!("{}ms", args.run_after.as_millis())])
        .args([
            "--transport",
            &format!("{:?}", args.transport).to_lowercase(),
        ])
        .args(["--mode", args.migration_mode.mode().name()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(vm) = args.vm {
        cmd.args(["--vm", vm.name()]);
    }
    if let Some(q) = &args.qemu_dest_qmp {
        cmd.arg("--qemu-qmp").arg(q);
    }
    if let Some(c) = &args.qemu_dest_console {
        cmd.arg("--qemu-console").arg(c);
    }
    if let Some(d) = &args.tls_creds {
        cmd.arg("--tls-creds").arg(d);
        cmd.args(args.no_ktls.then_some("--no-ktls"));
    }
    if let Some(d) = &args.ib_dev {
        cmd.args(["--ib-dev", d]);
    }
    if let Some(x) = args.gid_index {
        cmd.args(["--gid-index", &x.to_string()]);
    }
    if let Some(i) = args.ib_port {
        cmd.args(["--ib-port", &i.to_string()]);
    }
    if let Some(p) = &args.control_socket {
        let mut dest = p.clone().into_os_string();
        dest.push(".dest");
        cmd.arg("--control-socket").arg(dest);
    }
    die_with_parent(&mut cmd);
    let spawned = cmd.spawn().context("starting the destination process")?;
    let pid = spawned.id();
    ctl.signals.forward_to(pid);
    let child = std::cell::RefCell::new(KillOnDrop(Some(spawned)));
    // A cancel that came before the child's pid was known.
    if ctl.control.is_cancelled() {
        signals::terminate(pid as i32);
    }
    let port = wait_for_port(
        &port_file,
        child.borrow_mut().0.as_mut().expect("just spawned"),
        ctl,
    )?;
    let Some(port) = port else {
        // Cancelled before the destination listened: no source VM was started.
        signals::terminate(pid as i32);
        ctl.ended(Phase::Cancelled);
        return Ok(source_cancelled(args, ctl, args.vm, None, None));
    };
    let addr = std::net::SocketAddr::new(args.bind, port);

    let mut src_args = args.clone();
    src_args.psk_file = keyed.then(|| key.clone());
    // After the source is done, the destination lets the guest run, checks it, writes its
    // outcome and exits: wait for that (bounded), then read the outcome.
    let wait_child = |limit: Duration| {
        let mut guard = child.borrow_mut();
        if let Some(c) = guard.0.as_mut() {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !matches!(c.try_wait(), Ok(None)) {
                // Reaped: its pid may name another process from now on.
                ctl.signals.forward_to(0);
            }
        }
    };
    // Cancelled: the child is told (it may not have heard from the source) and has a few
    // seconds to write its outcome.
    let read_dest = |cancelled: bool| -> Option<DestOutcome> {
        if cancelled {
            signals::terminate(pid as i32);
        }
        wait_child(Duration::from_secs(if cancelled { 5 } else { 60 }));
        serde_json::from_slice(&std::fs::read(&result_file).ok()?).ok()
    };
    let code = connect(&src_args, params, addr, ctl, Some(&read_dest));
    if code.is_err() {
        wait_child(Duration::from_secs(5));
    }
    code
}

/// The port the child listens on, or `None` if the migration was cancelled meanwhile.
fn wait_for_port(port_file: &Path, child: &mut Child, ctl: &Ctl) -> Result<Option<u16>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ctl.control.is_cancelled() {
            return Ok(None);
        }
        if let Ok(s) = std::fs::read_to_string(port_file) {
            if let Ok(p) = s.trim().parse() {
                return Ok(Some(p));
            }
        }
        if let Some(status) = child.try_wait()? {
            ctl.signals.forward_to(0);
            bail!("the destination process exited before listening ({status})");
        }
        if Instant::now() > deadline {
            bail!("the destination process did not start listening within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn fmt_ip(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}
