//! QEMU tests with a real Linux guest under TCG (the project's guest image, `ci/qemu-guest-setup`):
//! a running guest migrated over loopback TCP with content-comparison tracking, checked by the
//! memory digest and by the guest's own console (bad=0 after the move, its counters going on
//! from where the source stopped), and by the destination's console alone (what the destination
//! host reports); failures that must leave the source QEMU running with its guest intact: a
//! destination QEMU killed mid-round (noticed at once, not at the switchover) or before any
//! source connected (the listener ends), a wrong key, RAM that is not shared; and what a fresh
//! destination QEMU's RAM holds before any migration (all zero for a new file or memfd backend;
//! a file that existed keeps its bytes).
//!
//! Needs `RDMIG_QEMU`, `RDMIG_QEMU_KERNEL`, `RDMIG_QEMU_INITRD`; skipped visibly without them
//! (`Capability::Qemu`; a failure where `RDMIG_REQUIRE` names qemu).

use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rdmig_transport::auth::Psk;
use rdmig_transport::mem::GuestMemoryMap;
use rdmig_transport::require::{skip, Capability};
use rdmig_transport::session::{migrate, DestReport, MigrationConfig, MigrationReport};
use rdmig_transport::wire::TransportKind;
use rdmig_vmm::qemu::console::{check_continuation, reports};
use rdmig_vmm::qemu::launch::{GuestImage, GuestSpec, QemuProcess, RamBacking, RunDir};
use rdmig_vmm::qemu::qmp::Qmp;
use rdmig_vmm::qemu::relay::STATE_HEADER_LEN;
use rdmig_vmm::qemu::{
    accept_into, DirtyTracking, QemuDest, QemuDestOptions, QemuSource, QemuSourceOptions,
    TrackingChoice,
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

/// Accepts one migration into the QEMU `dst` on a thread (watched: [`accept_into`]).
fn destination(dst: &QemuProcess, key: Psk) -> (SocketAddr, thread::JoinHandle<DestResult>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = QemuDestOptions {
        console: Some(dst.console_path().to_path_buf()),
        ..QemuDestOptions::default()
    };
    let vm = QemuDest::attach(dst.qmp_path(), &opts).unwrap();
    let h = thread::spawn(move || {
        // A refused handshake does not end the listener; the listen timeout does.
        let cfg = tcp(key).with_listen_timeout(Some(Duration::from_secs(10)));
        accept_into(vm, &listener, &cfg)
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
    let (addr, dh) = destination(&dst, psk(7));
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
    // Round 0 covers all RAM: the pages holding data as bytes, the zero ones as ranges.
    let r0 = &report.per_round[0];
    assert_eq!(
        r0.pages + r0.zero_pages,
        256 << 20 >> 12,
        "round 0 covers all RAM"
    );
    assert!(
        r0.zero_pages > 0,
        "a booted Linux guest's free memory is zero"
    );
    // QEMU's own stream held only device state and ROMs.
    assert!(
        (10_000..4 << 20).contains(&vm.state_bytes()),
        "QEMU state {} bytes",
        vm.state_bytes()
    );
    assert_eq!(
        report.device_state_bytes,
        vm.state_bytes() + STATE_HEADER_LEN as u64
    );
    assert_eq!(dvm.source_was_running(), Some(true));
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
    // What the destination host can tell alone, from its own console: the same verdict.
    let r = dvm
        .guest_verdict(4, Duration::from_secs(30))
        .expect("a console was given")
        .unwrap_or_else(|e| panic!("{e}\ndest: {dest_console}"));
    eprintln!("destination's own verdict: {r:?}");
    assert!(
        r.first_ok >= c.source_ok && r.first_gen >= c.source_gen,
        "{r:?} vs {c:?}"
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
    let dst = QemuProcess::launch(&img, &spec(true), dir.path(), "dst").unwrap();
    let mut vm = QemuSource::attach(src.qmp_path(), &content()).unwrap();
    let (addr, dh) = destination(&dst, psk(1));
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
fn destination_qemu_killed_mid_round_fails_the_migration_at_once() {
    let Some((img, _one)) =
        image_or_skip("destination_qemu_killed_mid_round_fails_the_migration_at_once")
    else {
        return;
    };
    let dir = RunDir::new("qemu-test").unwrap();
    let mut src = boot_source(&img, &dir, spec(false));
    let mut dst = QemuProcess::launch(&img, &spec(true), dir.path(), "dst").unwrap();
    let mut vm = QemuSource::attach(src.qmp_path(), &content()).unwrap();
    let (addr, dh) = destination(&dst, psk(3));
    // 16 MiB/s: round 0 of 256 MiB takes 16 s; the destination QEMU dies 2 s into it. Before
    // the destination watched its QEMU, the source noticed only at the switchover, after it
    // had sent every round and stopped its guest.
    let cfg = tcp(psk(3)).with_max_bandwidth(Some(16 << 20));
    let t = Instant::now();
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_secs(2));
        dst.kill();
        (dst, Instant::now())
    });
    let mut rounds = 0;
    let err = migrate(&mut vm, addr, &cfg, &mut |_| rounds += 1).unwrap_err();
    let (_dst, killed) = killer.join().unwrap();
    let noticed = killed.elapsed();
    eprintln!(
        "source failed {:?} after the start, {noticed:?} after the kill: {err}",
        t.elapsed()
    );
    let derr = dh.join().unwrap().unwrap_err();
    eprintln!("destination: {derr}");
    assert!(
        derr.to_string().contains("QEMU exited") && derr.to_string().contains("stopped"),
        "the destination's error does not name the dead QEMU: {derr}"
    );
    assert!(
        !matches!(err, rdmig_transport::Error::SwitchoverUnknown(_)),
        "{err}"
    );
    assert_eq!(
        rounds, 0,
        "round 0 finished: the death was not noticed in it"
    );
    assert!(
        noticed < Duration::from_secs(5),
        "the source learnt of the dead destination {noticed:?} after the kill"
    );
    // The source never stopped its guest (no switchover began), and it runs on intact.
    assert_eq!(vm.final_fetch_time(), None);
    assert_runs_on_intact(&mut src, Some(vm.qmp()));
}

#[test]
fn destination_qemu_dying_before_the_source_connects_ends_the_listener() {
    let Some((img, _one)) =
        image_or_skip("destination_qemu_dying_before_the_source_connects_ends_the_listener")
    else {
        return;
    };
    let dir = RunDir::new("qemu-test").unwrap();
    let mut dst = QemuProcess::launch(&img, &spec(true), dir.path(), "dst").unwrap();
    let vm = QemuDest::attach(dst.qmp_path(), &QemuDestOptions::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // No listen timeout: only the dead QEMU can end this accept.
    let h =
        thread::spawn(move || accept_into(vm, &listener, &tcp(psk(4)).with_listen_timeout(None)));
    thread::sleep(Duration::from_millis(500));
    dst.kill();
    let killed = Instant::now();
    let err = h.join().unwrap().unwrap_err();
    eprintln!("{:?} after the kill: {err}", killed.elapsed());
    assert!(err.to_string().contains("QEMU exited"), "{err}");
    assert!(killed.elapsed() < Duration::from_secs(5));
}

/// Offsets of the non-zero 4 KiB pages of `map`.
fn nonzero_pages(map: &GuestMemoryMap) -> Vec<u64> {
    let mut out = Vec::new();
    for r in map.regions() {
        for off in (0..r.len()).step_by(4096) {
            // The destination QEMU is waiting (-incoming defer -S): no guest code runs and
            // nothing writes its RAM while this reads it.
            // SAFETY: off + 4096 <= r.len(), inside the live mapping of the region.
            let page = unsafe { std::slice::from_raw_parts(r.host_ptr().add(off as usize), 4096) };
            if page.iter().any(|&b| b != 0) {
                out.push(r.gpa().0 + off);
            }
        }
    }
    out
}

#[test]
fn fresh_destination_ram_is_zero_unless_its_file_held_data() {
    let Some((img, _one)) =
        image_or_skip("fresh_destination_ram_is_zero_unless_its_file_held_data")
    else {
        return;
    };
    let dir = RunDir::new("qemu-test").unwrap();
    for (backing, name) in [(RamBacking::ShmFile, "shm"), (RamBacking::Memfd, "memfd")] {
        let fresh = GuestSpec {
            backing,
            ..spec(true)
        };
        let dst = QemuProcess::launch(&img, &fresh, dir.path(), name).unwrap();
        let vm = QemuDest::attach(dst.qmp_path(), &QemuDestOptions::default()).unwrap();
        let map = vm.guest_memory();
        assert_eq!(map.total_bytes(), 256 << 20);
        let nz = nonzero_pages(map);
        eprintln!(
            "{backing:?}: {} non-zero pages of {} in a fresh -incoming defer QEMU: {:x?}",
            nz.len(),
            map.total_bytes() / 4096,
            &nz[..nz.len().min(16)]
        );
        assert!(nz.is_empty(), "{backing:?}: non-zero pages at {nz:x?}");
    }
    // A mem-path file that already exists is used as it is: QEMU neither truncates nor clears
    // it, so "fresh" RAM is only zero when the file is new.
    let ram = dir.path().join("old.ram");
    let f = std::fs::File::create(&ram).unwrap();
    f.set_len(256 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"left over", 5 << 20).unwrap();
    drop(f);
    let dst = QemuProcess::launch(&img, &spec(true), dir.path(), "old").unwrap();
    let vm = QemuDest::attach(dst.qmp_path(), &QemuDestOptions::default()).unwrap();
    let nz = nonzero_pages(vm.guest_memory());
    eprintln!("an existing file: non-zero pages {nz:x?}");
    assert_eq!(
        nz,
        vec![5 << 20],
        "the old file's bytes are the guest's RAM"
    );
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
