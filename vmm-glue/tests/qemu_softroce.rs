//! QEMU tests for inside the SoftRoCE guest (ci/test-rdma), whose kernel has soft-dirty and an
//! rxe device, and where a nested TCG Linux guest boots slowly; two also run on the host.
//!
//! - soft-dirty catches every page QEMU changes: with QEMU stopped, clear the bits and copy RAM,
//!   let the guest run a second, stop, fetch, copy again: every page that differs must be in the
//!   fetched set (`Capability::SoftDirty`);
//! - a running guest migrated over TCP with soft-dirty tracking (`SoftDirty`): digest verified,
//!   destination running; and over RDMA with content comparison (the destination reports the
//!   hashes of what its READs landed);
//! - a **paused** guest (`-S`) whose RAM holds known content written by the test, migrated over
//!   TCP (host) and over RDMA (`Capability::Rdma`, `RDMIG_RXE_DEV`/`RDMIG_RXE_ADDR`): the source
//!   RAM still holds the pattern and the digest (per-page hashes of what the destination received,
//!   compared before it resumed) matches; over RDMA with either tracking.
//!
//! Needs `RDMIG_QEMU`, `RDMIG_QEMU_KERNEL`, `RDMIG_QEMU_INITRD` (`Capability::Qemu`).

mod support;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use rdmig_transport::auth::Psk;
use rdmig_transport::digest::full_digest;
use rdmig_transport::mem::{GuestMemoryMap, PageIndex, RegionId};
use rdmig_transport::pages::PageSet;
use rdmig_transport::require::{skip, Capability};
use rdmig_transport::session::{accept, migrate, MigrationConfig, MigrationReport};
use rdmig_transport::vm::SourceVm;
use rdmig_transport::wire::TransportKind;
use rdmig_vmm::qemu::dirty::probe_soft_dirty;

use rdmig_vmm::qemu::launch::{GuestImage, GuestSpec, QemuProcess, RamBacking, RunDir};
use rdmig_vmm::qemu::{
    into_qemu, qemu_destination_factory, DirtyTracking, QemuDestOptions, QemuSource,
    QemuSourceOptions, TrackingChoice,
};
use support::rxe::rxe;

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

fn soft_dirty_or_skip(test: &str) -> bool {
    match probe_soft_dirty() {
        Ok(()) => true,
        Err(why) => {
            skip(Capability::SoftDirty, test, why);
            false
        }
    }
}

fn spec(incoming: bool, paused: bool) -> GuestSpec {
    GuestSpec {
        mem_mib: 128,
        ws_mib: 8,
        rate_mib: 4,
        backing: RamBacking::ShmFile,
        incoming,
        paused,
    }
}

fn source(q: &QemuProcess, tracking: TrackingChoice) -> QemuSource {
    let opts = QemuSourceOptions {
        tracking,
        ..QemuSourceOptions::default()
    };
    QemuSource::attach(q.qmp_path(), &opts).unwrap()
}

/// A copy of guest RAM (taken while QEMU is stopped).
fn snapshot(map: &GuestMemoryMap) -> Vec<u8> {
    let r = &map.regions()[0];
    let mut v = vec![0u8; r.len() as usize];
    // SAFETY: the region is mapped for its length; QEMU is stopped, so nothing writes it.
    unsafe { std::ptr::copy_nonoverlapping(r.host_ptr(), v.as_mut_ptr(), v.len()) };
    v
}

#[test]
fn soft_dirty_catches_every_page_qemu_changes() {
    let test = "soft_dirty_catches_every_page_qemu_changes";
    let Some((img, _one)) = image_or_skip(test) else {
        return;
    };
    if !soft_dirty_or_skip(test) {
        return;
    }
    let dir = RunDir::new("qemu-sd").unwrap();
    let q = QemuProcess::launch(&img, &spec(false, false), dir.path(), "src").unwrap();
    thread::sleep(Duration::from_secs(1)); // firmware and kernel loading are writing RAM
    let mut vm = source(&q, TrackingChoice::SoftDirty);
    assert_eq!(vm.dirty_tracking(), DirtyTracking::SoftDirty);
    let mut changed_total = 0;
    for _ in 0..3 {
        vm.pause().unwrap();
        vm.start_dirty_log().unwrap();
        let before = snapshot(vm.live_memory());
        vm.resume().unwrap();
        thread::sleep(Duration::from_secs(1));
        vm.pause().unwrap();
        let mut set = PageSet::empty(vm.memory());
        vm.fetch_and_clear_dirty(&mut set).unwrap();
        let after = snapshot(vm.live_memory());
        vm.resume().unwrap();
        let changed: Vec<u64> = before
            .chunks(4096)
            .zip(after.chunks(4096))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64)
            .collect();
        eprintln!(
            "soft-dirty: {} pages marked, {} changed",
            set.count(),
            changed.len()
        );
        for p in &changed {
            assert!(
                set.contains(RegionId(0), PageIndex(*p)),
                "page {p} changed but soft-dirty missed it"
            );
        }
        changed_total += changed.len();
    }
    assert!(changed_total > 0, "the guest wrote nothing in 3 s");
}

fn migrate_pair(
    src: &QemuProcess,
    dst: &QemuProcess,
    vm: &mut QemuSource,
    cfg: MigrationConfig,
    ip: IpAddr,
) -> (MigrationReport, String) {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let factory = qemu_destination_factory(dst.qmp_path(), &QemuDestOptions::default()).unwrap();
    let dcfg = cfg.clone();
    let dh = thread::spawn(move || {
        let (vm, r) = accept(&listener, &dcfg, factory)?;
        let mut vm = into_qemu(vm).expect("a QemuDest");
        let state = vm.qmp().run_state().unwrap_or_default();
        Ok::<_, rdmig_transport::Error>((r, state))
    });
    let report = migrate(vm, addr, &cfg, &mut |r| eprintln!("{r:?}")).unwrap();
    let (dreport, state) = dh.join().unwrap().unwrap();
    assert!(report.verified);
    assert_eq!(report.digest, dreport.digest);
    eprintln!(
        "{} over {}: total {:.0} ms, downtime {:.1} ms, {} rounds, QEMU state {} bytes",
        vm.dirty_tracking().name(),
        report.transport,
        report.total_ms,
        report.downtime_ms,
        report.rounds,
        vm.state_bytes()
    );
    assert!(vm.state_bytes() > 10_000, "QEMU sent no device state");
    let _ = src;
    (report, state)
}

fn tcp() -> MigrationConfig {
    MigrationConfig::new(Psk::new(vec![5; 32]).unwrap())
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_io_timeout(Duration::from_secs(120))
        .with_downtime_limit(Duration::from_millis(1000))
}

#[test]
fn running_guest_migrates_with_soft_dirty_tracking() {
    let test = "running_guest_migrates_with_soft_dirty_tracking";
    let Some((img, _one)) = image_or_skip(test) else {
        return;
    };
    if !soft_dirty_or_skip(test) {
        return;
    }
    let dir = RunDir::new("qemu-sd").unwrap();
    let src = QemuProcess::launch(&img, &spec(false, false), dir.path(), "src").unwrap();
    let dst = QemuProcess::launch(&img, &spec(true, false), dir.path(), "dst").unwrap();
    thread::sleep(Duration::from_secs(2));
    let mut vm = source(&src, TrackingChoice::SoftDirty);
    let ip = IpAddr::from([127, 0, 0, 1]);
    let (_, state) = migrate_pair(&src, &dst, &mut vm, tcp(), ip);
    assert_eq!(state, "running");
    assert_eq!(vm.qmp().run_state().unwrap(), "postmigrate");
}

/// Writes a pattern into the paused source's RAM (through rdmig's mapping), migrates it, and
/// checks the source still holds exactly the pattern the verified digest covered.
fn paused_with_known_content(cfg: MigrationConfig, ip: IpAddr, tracking: TrackingChoice) {
    let img = GuestImage::from_env().unwrap();
    let dir = RunDir::new("qemu-known").unwrap();
    let src = QemuProcess::launch(&img, &spec(false, true), dir.path(), "src").unwrap();
    let dst = QemuProcess::launch(&img, &spec(true, false), dir.path(), "dst").unwrap();
    let mut vm = source(&src, tracking);
    assert_eq!(vm.qmp().run_state().unwrap(), "prelaunch");
    let r = vm.live_memory().regions()[0];
    let words = r.len() as usize / 8;
    let pattern = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0052_444d_4947;
    for i in 0..words {
        // SAFETY: inside the mapped region; the guest is paused (prelaunch) and never ran.
        unsafe { r.host_ptr().cast::<u64>().add(i).write_volatile(pattern(i)) };
    }
    let expected = full_digest(vm.live_memory());
    let (report, state) = migrate_pair(&src, &dst, &mut vm, cfg, ip);
    assert_eq!(report.bytes_transferred, r.len(), "one round of all RAM");
    assert_eq!(
        full_digest(vm.live_memory()),
        expected,
        "source RAM changed"
    );
    // The guest never ran on the source: it does not start on the destination either (as
    // QEMU's own migration leaves it), it waits there in the run state the source had.
    assert_eq!(state, "prelaunch", "destination QEMU is {state}");
}

#[test]
fn paused_guest_with_known_content_over_tcp() {
    let Some((_img, _one)) = image_or_skip("paused_guest_with_known_content_over_tcp") else {
        return;
    };
    paused_with_known_content(tcp(), IpAddr::from([127, 0, 0, 1]), TrackingChoice::Auto);
}

#[test]
fn paused_guest_with_known_content_over_rdma() {
    let test = "paused_guest_with_known_content_over_rdma";
    let Some((_img, _one)) = image_or_skip(test) else {
        return;
    };
    let Some((rdma, ip)) = rxe(test) else {
        return;
    };
    let cfg = tcp().with_transport(TransportKind::Rdma).with_rdma(rdma);
    paused_with_known_content(cfg.clone(), ip, TrackingChoice::Auto);
    // And by content: the destination reports the hashes of what its READs landed.
    paused_with_known_content(cfg, ip, TrackingChoice::Content);
}

#[test]
fn running_guest_migrates_by_content_over_rdma() {
    let test = "running_guest_migrates_by_content_over_rdma";
    let Some((img, _one)) = image_or_skip(test) else {
        return;
    };
    let Some((rdma, ip)) = rxe(test) else {
        return;
    };
    let dir = RunDir::new("qemu-content").unwrap();
    let src = QemuProcess::launch(&img, &spec(false, false), dir.path(), "src").unwrap();
    let dst = QemuProcess::launch(&img, &spec(true, false), dir.path(), "dst").unwrap();
    thread::sleep(Duration::from_secs(2));
    let mut vm = source(&src, TrackingChoice::Content);
    assert_eq!(vm.dirty_tracking(), DirtyTracking::Content);
    let cfg = tcp().with_transport(TransportKind::Rdma).with_rdma(rdma);
    let (report, state) = migrate_pair(&src, &dst, &mut vm, cfg, ip);
    assert_eq!(report.transport, "rdma");
    assert_eq!(state, "running");
    assert_eq!(vm.qmp().run_state().unwrap(), "postmigrate");
}
