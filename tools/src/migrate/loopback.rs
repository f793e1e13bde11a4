//! `--loopback`: the destination runs as a child process of this one (`migrate --listen` on
//! an ephemeral port), with a fresh random key shared through a private file.
//!
//! The child dies with this process: it asks for SIGTERM when its parent dies
//! (`PR_SET_PDEATHSIG`), so a signal sent to this process alone (a supervisor's SIGTERM)
//! does not leave a destination listening for ever or holding the guest's memory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdmig_transport::auth::{random_bytes, Psk};

use super::{connect, Args, DestOutcome, VmParams};

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
        Ok(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
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
pub fn run(args: &Args, params: &VmParams) -> Result<ExitCode> {
    let scratch = Scratch::new()?;
    let (key, port_file, result_file) = (
        scratch.path("key"),
        scratch.path("port"),
        scratch.path("result.json"),
    );
    write_key(&key, &Psk::random()?)?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("migrate")
        .arg("--listen")
        .arg(format!("{}:0", fmt_ip(args.bind)))
        .arg("--port-file")
        .arg(&port_file)
        .arg("--result-file")
        .arg(&result_file)
        .arg("--psk-file")
        .arg(&key)
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
    if let Some(d) = &args.ib_dev {
        cmd.args(["--ib-dev", d]);
    }
    if let Some(x) = args.gid_index {
        cmd.args(["--gid-index", &x.to_string()]);
    }
    if let Some(i) = args.ib_port {
        cmd.args(["--ib-port", &i.to_string()]);
    }
    die_with_parent(&mut cmd);
    let child = std::cell::RefCell::new(KillOnDrop(Some(
        cmd.spawn().context("starting the destination process")?,
    )));
    let port = wait_for_port(
        &port_file,
        child.borrow_mut().0.as_mut().expect("just spawned"),
    )?;
    let addr = std::net::SocketAddr::new(args.bind, port);

    let mut src_args = args.clone();
    src_args.psk_file = Some(key.clone());
    // After the source is done, the destination lets the guest run, checks it, writes its
    // outcome and exits: wait for that (bounded), then read the outcome.
    let wait_child = |limit: Duration| {
        let mut guard = child.borrow_mut();
        if let Some(c) = guard.0.as_mut() {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    let read_dest = || -> Option<DestOutcome> {
        wait_child(Duration::from_secs(60));
        serde_json::from_slice(&std::fs::read(&result_file).ok()?).ok()
    };
    let code = connect(&src_args, params, addr, Some(&read_dest));
    if code.is_err() {
        wait_child(Duration::from_secs(5));
    }
    code
}

fn wait_for_port(port_file: &Path, child: &mut Child) -> Result<u16> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = std::fs::read_to_string(port_file) {
            if let Ok(p) = s.trim().parse() {
                return Ok(p);
            }
        }
        if let Some(status) = child.try_wait()? {
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
