//! QEMU tests with a real Linux guest under TCG (the project's guest image, `ci/qemu-guest-setup`):
//! a running guest migrated over loopback TCP with content-comparison tracking, checked by the
//! memory digest and by the guest's own console (bad=0 after the move, its counters going on
//! from where the source stopped); and failures that must leave the source QEMU running with its
//! guest intact: a destination QEMU killed mid-round, a wrong key, RAM that is not shared.
//!
//! Needs `RDMIG_QEMU`, `RDMIG_QEMU_KERNEL`, `RDMIG_QEMU_INITRD`; skipped visibly without them
//! (`Capability::Qemu`; a failure where `RDMIG_REQUIRE` names qemu).

use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rdmig_transport::auth::Psk;
use rdmig_transport::require::{skip, Capability};
use rdmig_transport::session::{accept, migrate, DestReport, MigrationConfig, MigrationReport};
use rdmig_transport::wire::TransportKind;
use rdmig_vmm::qemu::console::{check_continuation, reports};
use rdmig_vmm::qemu::launch::{GuestImage, GuestSpec, QemuProcess, RamBacking, RunDir};
use rdmig_vmm::qemu::qmp::Qmp;
use rdmig_vmm::qemu::{
    into_qemu, qemu_destination_factory, DirtyTracking, QemuDest, QemuDestOptions, QemuSource,
    QemuSourceOptions, TrackingChoice,
};
use rdmig_vmm::Error;

/// One QEMU test at a time: each runs one or two TCG guests on a 2-core machine.
fn image_or_skip(test: &str) -> Option<(GuestImage, MutexGuard<'static, ()>)> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    match GuestImage::from_env() {
        Ok(img) => Some((img, ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner()))),
        Err(why) => {
            skip(Capability::Qemu, test, why);
            None
        }
    }
}

const BOOT: Duration = Duration::from_secs(60);

fn spec(incoming: bool) -> GuestSpec {
    // 256 MiB guest; the workload rewrites 16 MiB at 8 MiB/s: a new generation every 2 s.
    GuestSpec {
        mem_mib: 256,
        ws_mib: 16,
        rate_mib: 8,
        backing: RamBacking::ShmFile,
        incoming,
        paused: false,
    }
}

fn psk(b: u8) -> Psk {
    Psk::new(vec![b; 32]).unwrap()
}

fn tcp(key: Psk) -> MigrationConfig {
    MigrationConfig::new(key)
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_io_timeout(Duration::from_secs(30))
        .with_downtime_limit(Duration::from_millis(300))
}

/// Boots the source guest and waits until the workload reports.
fn boot_source(img: &GuestImage, dir: &RunDir, spec: GuestSpec) -> QemuProcess {
    let mut q = QemuProcess::launch(img, &spec, dir.path(), "src").unwrap();
    q.wait_reports(2, BOOT).unwrap();
    q
}

fn content() -> QemuSourceOptions {
    QemuSourceOptions {
        tracking: TrackingChoice::Content,
        ..QemuSourceOptions::default()
    }
}

type DestResult = rdmig_transport::Result<(Box<QemuDest>, DestReport)>;

/// Accepts one migration into the QEMU at `qmp` on a thread.
fn destination(qmp: &std::path::Path, key: Psk) -> (SocketAddr, thread::JoinHandle<DestResult>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let factory = qemu_destination_factory(qmp, &QemuDestOptions::default()).unwrap();
    let h = thread::spawn(move || {
        // A refused handshake does not end the listener; the listen timeout does.
        let cfg = tcp(key).with_listen_timeout(Some(Duration::from_secs(10)));
        let (vm, report) = accept(&listener, &cfg, factory)?;
        Ok((into_qemu(vm).expect("a QemuDest"), report))
    });
    (addr, h)
}

/// The source guest runs on after a failed migration: QEMU says running (asked on `qmp`, or on
/// a new connection: QEMU serves one QMP client per socket at a time), and the workload keeps
/// verifying pages with bad=0.
fn assert_runs_on_intact(src: &mut QemuProcess, qmp: Option<&mut Qmp>) {
    let state = match qmp {
        Some(q) => q.run_state().unwrap(),
        None => Qmp::connect(src.qmp_path(), Duration::from_secs(5))
            .unwrap()
            .run_state()
            .unwrap(),
    };
    assert_eq!(state, "running", "the source QEMU does not run");
    let before = reports(&src.console());
    let n = before.len();
    let text = src.wait_reports(n + 2, Duration::from_secs(20)).unwrap();
    let after = reports(&text);
    let (b, a) = (before[n - 1], after[after.len() - 1]);
    assert!(
        a.ok > b.ok,
        "the source guest verified nothing more: {b:?} -> {a:?}"
    );
    assert_eq!(a.bad, 0, "the source guest found bad pages: {text}");
}

#[test]
fn running_linux_guest_migrates_over_tcp_with_content_comparison() {
    let Some((img, _one)) =
        image_or_skip("running_linux_guest_migrates_over_tcp_with_content_comparison")
    else {
        return;
    };
    let dir = RunDir::new("qemu-test").unwrap();
    let mut src = boot_source(&img, &dir, spec(false));
    let mut dst = QemuProcess::launch(&img, &spec(true), dir.path(), "dst").unwrap();

    let mut vm = QemuSource::attach(src.qmp_path(), &content()).unwrap();
    assert_eq!(vm.dirty_tracking(), DirtyTracking::Content);
    assert_eq!(vm.ram().blocks().len(), 1);
    assert_eq!(vm.live_memory().total_bytes(), 256 << 20);
    let (addr, dh) = destination(dst.qmp_path(), psk(7));
    let report: MigrationReport = migrate(&mut vm, addr, &tcp(psk(7)), &mut |r| {
        eprintln!("round {:?}", r);
    })
    .unwrap();
    let (mut dvm, dreport) = dh.join().unwrap().unwrap();
    eprintln!(
        "QEMU migration: total {:.0} ms, downtime {:.1} ms (final compare {:?}), {} rounds, {} MiB, \
         QEMU state {} bytes",
        report.total_ms,
        report.downtime_ms,
        vm.final_fetch_time(),
        report.rounds,
        report.bytes_transferred >> 20,
        vm.state_bytes()
    );
    assert!(report.verified, "digest not verified");
    assert_eq!(report.digest, dreport.digest);
    assert!(
        report.bytes_transferred >= 256 << 20,
        "round 0 moves all RAM"
    );
    // QEMU's own stream held only device state and ROMs.
    assert!(
        (10_000..4 << 20).contains(&vm.state_bytes()),
        "QEMU state {} bytes",
        vm.state_bytes()
    );
    assert_eq!(report.device_state_bytes, vm.state_bytes());
    assert_eq!(dvm.state_bytes(), vm.state_bytes());
    assert_eq!(vm.qmp().run_state().unwrap(), "postmigrate");
    assert_eq!(dvm.qmp().run_state().unwrap(), "running");

    // The guest's own verdict: it goes on on the destination, intact, where it stopped.
    let source_console = src.console();
    let dest_console = dst.wait_reports(4, Duration::from_secs(30)).unwrap();
    let c = check_continuation(&source_console, &dest_console, 4)
        .unwrap_or_else(|e| panic!("{e}\nsource: {source_console}\ndest: {dest_console}"));
    eprintln!("guest continued: {c:?}");
    assert!(
        c.dest_last_gen > c.source_gen,
        "no new generation on the destination: {c:?}"
    );
    src.kill();
}

#[test]
fn wrong_key_leaves_the_source_qemu_running() {
    let Some((img, _one)) = image_or_skip("wrong_key_leaves_the_source_qemu_running") else {
        return;
    };
    let dir = RunDir::new("qemu-test").unwrap();
    let mut src = boot_source(&img, &dir, spec(false));
    let _dst = QemuProcess::launch(&img, &spec(true), dir.path(), "dst").unwrap();
    let mut vm = QemuSource::attach(src.qmp_path(), &content()).unwrap();
    let (addr, dh) = destination(_dst.qmp_path(), psk(1));
    let err = migrate(&mut vm, addr, &tcp(psk(2)), &mut |_| {}).unwrap_err();
    eprintln!("source: {err}");
    assert!(
        matches!(err, rdmig_transport::Error::AuthFailed(_)),
        "{err}"
    );
    assert!(dh.join().unwrap().is_err());
    assert_runs_on_intact(&mut src, Some(vm.qmp()));
}

#[test]
fn destination_qemu_killed_mid_round_leaves_the_source_running() {
    let Some((img, _one)) =
        image_or_skip("destination_qemu_killed_mid_round_leaves_the_source_running")
    else {
        return;
    };
    let dir = RunDir::new("qemu-test").unwrap();
    let mut src = boot_source(&img, &dir, spec(false));
    let mut dst = QemuProcess::launch(&img, &spec(true), dir.path(), "dst").unwrap();
    let mut vm = QemuSource::attach(src.qmp_path(), &content()).unwrap();
    let (addr, dh) = destination(dst.qmp_path(), psk(3));
    // 64 MiB/s: round 0 of 256 MiB takes 4 s; the destination QEMU dies 1 s into it.
    let cfg = tcp(psk(3)).with_max_bandwidth(Some(64 << 20));
    let t = Instant::now();
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_secs(1));
        dst.kill();
        dst
    });
    let err = migrate(&mut vm, addr, &cfg, &mut |_| {}).unwrap_err();
    let _dst = killer.join().unwrap();
    eprintln!("source after {:?}: {err}", t.elapsed());
    let derr = dh.join().unwrap().unwrap_err();
    eprintln!("destination: {derr}");
    assert!(
        derr.to_string().contains("QEMU exited"),
        "the destination's error does not name the dead QEMU: {derr}"
    );
    assert!(
        !matches!(err, rdmig_transport::Error::SwitchoverUnknown(_)),
        "{err}"
    );
    assert_runs_on_intact(&mut src, Some(vm.qmp()));
}

#[test]
fn ram_not_shared_is_refused_and_qemu_runs_on() {
    let Some((img, _one)) = image_or_skip("ram_not_shared_is_refused_and_qemu_runs_on") else {
        return;
    };
    let dir = RunDir::new("qemu-test").unwrap();
    let mut src = boot_source(
        &img,
        &dir,
        GuestSpec {
            backing: RamBacking::Private,
            ..spec(false)
        },
    );
    let err = QemuSource::attach(src.qmp_path(), &content()).unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(&err, Error::QemuSetup(m) if m.contains("not shared") && m.contains("share=on")),
        "{err}"
    );
    assert_runs_on_intact(&mut src, None);
}
