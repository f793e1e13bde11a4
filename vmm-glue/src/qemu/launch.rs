//! Starting QEMUs with the project's Linux test guest (built by `ci/qemu-guest-setup`): for the
//! tests and `rdma-bench migrate --vm qemu --loopback`. Real operators start their own QEMU (see
//! `docs/qemu.md`); this is the same command line.
//!
//! The image is found through the environment: `RDMIG_QEMU` (qemu-system-x86_64),
//! `RDMIG_QEMU_KERNEL` and `RDMIG_QEMU_INITRD` (the `QEMU_SYSTEM`, `QEMU_GUEST_KERNEL` and
//! `QEMU_GUEST_INITRD` lines of `ci/qemu-guest-setup`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The QEMU binary and the guest kernel and initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    /// qemu-system-x86_64 (7.2 here).
    pub qemu: PathBuf,
    /// The guest kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs with the workload (`-initrd`).
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The image named by `RDMIG_QEMU`, `RDMIG_QEMU_KERNEL` and `RDMIG_QEMU_INITRD`; the error
    /// says which is missing and how to get it.
    pub fn from_env() -> std::result::Result<GuestImage, String> {
        let var = |k: &str| -> std::result::Result<PathBuf, String> {
            let v = std::env::var_os(k).ok_or_else(|| {
                format!(
                    "{k} is not set (eval \"$(ci/qemu-guest-setup | sed 's/^QEMU_SYSTEM=/RDMIG_QEMU=/; \
                     s/^QEMU_GUEST_/RDMIG_QEMU_/; s/^/export /')\")"
                )
            })?;
            let p = PathBuf::from(v);
            if !p.exists() {
                return Err(format!("{k}={} does not exist", p.display()));
            }
            Ok(p)
        };
        Ok(GuestImage {
            qemu: var("RDMIG_QEMU")?,
            kernel: var("RDMIG_QEMU_KERNEL")?,
            initrd: var("RDMIG_QEMU_INITRD")?,
        })
    }
}

/// What backs the guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamBacking {
    /// `memory-backend-file,share=on` with its file in the run directory (on /dev/shm).
    ShmFile,
    /// `memory-backend-memfd,share=on`.
    Memfd,
    /// `memory-backend-ram` (private; rdmig must refuse it).
    Private,
}

/// The guest to start.
#[derive(Clone, Copy, Debug)]
pub struct GuestSpec {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The workload's working set in MiB.
    pub ws_mib: u64,
    /// The workload's rewrite rate in MiB/s.
    pub rate_mib: u64,
    /// RAM backing.
    pub backing: RamBacking,
    /// Wait for an incoming migration (`-incoming defer -S`) instead of booting.
    pub incoming: bool,
    /// Start paused (`-S`, run state `prelaunch`): no guest code runs until `cont`.
    pub paused: bool,
}

/// A private directory on /dev/shm (tmpfs: it holds sockets and the RAM files, even inside the
/// SoftRoCE guest whose root is 9p); removed in `Drop`.
#[derive(Debug)]
pub struct RunDir(PathBuf);

impl RunDir {
    /// A new directory `/dev/shm/rdmig-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<RunDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let p = base.join(format!(
            "rdmig-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).map_err(|e| Error::QemuIo {
            context: format!("creating {}", p.display()),
            source: e,
        })?;
        Ok(RunDir(p))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("removing {}: {e}", self.0.display());
        }
    }
}

/// A QEMU process this program started; killed in `Drop`.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    name: String,
    qmp: PathBuf,
    console: PathBuf,
    stderr: PathBuf,
}

impl QemuProcess {
    /// Starts QEMU (TCG, one vCPU) with the guest image, files named `<name>.*` in `dir`, and
    /// waits until its QMP socket exists.
    pub fn launch(
        image: &GuestImage,
        spec: &GuestSpec,
        dir: &Path,
        name: &str,
    ) -> Result<QemuProcess> {
        let f = |ext: &str| dir.join(format!("{name}.{ext}"));
        let (qmp, console, stderr) = (f("qmp"), f("console"), f("stderr"));
        let size = format!("size={}M", spec.mem_mib);
        let backend = match spec.backing {
            RamBacking::ShmFile => format!(
                "memory-backend-file,id=ram0,{size},mem-path={},share=on",
                f("ram").display()
            ),
            RamBacking::Memfd => format!("memory-backend-memfd,id=ram0,{size},share=on"),
            RamBacking::Private => format!("memory-backend-ram,id=ram0,{size}"),
        };
        let mut cmd = Command::new(&image.qemu);
        cmd.args(["-accel", "tcg", "-machine", "pc,memory-backend=ram0"])
            .args(["-m", &format!("{}M", spec.mem_mib), "-smp", "1"])
            .args(["-object", &backend])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-name", name])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 tsc=reliable rdmig.ws={} rdmig.rate={}",
                spec.ws_mib, spec.rate_mib
            ));
        if spec.incoming {
            cmd.args(["-incoming", "defer", "-S"]);
        } else if spec.paused {
            cmd.arg("-S");
        }
        let err_file = File::create(&stderr).map_err(|e| Error::QemuIo {
            context: format!("creating {}", stderr.display()),
            source: e,
        })?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file);
        let child = cmd.spawn().map_err(|e| Error::QemuIo {
            context: format!("starting {}", image.qemu.display()),
            source: e,
        })?;
        let mut q = QemuProcess {
            child,
            name: name.to_string(),
            qmp,
            console,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !q.qmp.exists() {
            if let Some(st) = q.child.try_wait().ok().flatten() {
                return Err(Error::QemuExited(format!(
                    "{name} exited at start ({st}): {}",
                    q.stderr_text().trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::QemuTimeout(format!(
                    "{name}: no QMP socket after 20 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(q)
    }

    /// The QMP socket.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// The serial console log.
    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// QEMU's stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the console holds at least `n` `RDMIG-GUEST` reports.
    pub fn wait_reports(&mut self, n: usize, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console();
            if super::console::reports(&text).len() >= n {
                return Ok(text);
            }
            if !self.alive() {
                return Err(Error::QemuExited(format!(
                    "{} exited: {} / console: {}",
                    self.name,
                    self.stderr_text().trim(),
                    tail(&text)
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::QemuTimeout(format!(
                    "{}: {n} guest reports not seen within {timeout:?}; console: {}",
                    self.name,
                    tail(&text)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
