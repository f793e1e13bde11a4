//! Post-copy and hybrid migrations of a running KVM guest over TCP loopback with real
//! userfaultfd: on the destination the vCPU's accesses to pages still on the source fault
//! through userfaultfd inside `KVM_RUN`. Checked: the guest runs (and dirties memory) on the
//! destination before the last page arrives, the digest, the guest's own check of every data
//! page after the move, identical vCPU registers across the switchover, and that a link cut
//! during post-copy leaves the destination guest paused and handed back with the count of
//! missing pages while the source stays paused. The same with memfd-backed guest memory, where
//! the vCPU's faults are minor faults resolved with `UFFDIO_CONTINUE` (zero-copy). Skipped, with
//! the reason, where `/dev/kvm` or userfaultfd (or, for memfd memory, its minor faults on shmem)
//! is not usable.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rdmig_transport::auth::Psk;
use rdmig_transport::mem::PageSize;
use rdmig_transport::postcopy::Uffd;
use rdmig_transport::require::{skip, Capability};
use rdmig_transport::session::{
    accept, migrate, DestReport, MigrationConfig, MigrationMode, MigrationReport,
};
use rdmig_transport::vm::{DestinationFactory, DestinationVm, MemoryLayout, SourceVm};
use rdmig_transport::wire::TransportKind;
use rdmig_transport::Error;
use rdmig_vmm::kvm::{into_kvm, kvm_available, GuestProgress, KvmConfig, KvmDestConfig, KvmVm};

use support::interrupted::expect_remnant;
use support::relay::Relay;

const MIB: u64 = 1 << 20;

/// KVM tests run one at a time (two shared cores); skipped visibly without KVM or userfaultfd.
fn kvm_and_uffd_or_skip() -> Option<MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let test = std::thread::current()
        .name()
        .unwrap_or("kvm post-copy")
        .to_string();
    match (kvm_available(), Uffd::probe()) {
        (Err(why), _) => skip(
            Capability::Kvm,
            &test,
            format!("/dev/kvm not usable: {why}"),
        ),
        (Ok(()), Err(e)) => skip(
            Capability::Uffd,
            &test,
            format!("userfaultfd unavailable: {e}"),
        ),
        (Ok(()), Ok(())) => return Some(ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())),
    }
    None
}

fn guest(mem_mib: u64, ws_mib: u64, rate_mib_s: u64) -> KvmConfig {
    KvmConfig {
        mem_bytes: mem_mib * MIB,
        working_set: ws_mib * MIB,
        dirty_rate: rate_mib_s * MIB,
        page_size: PageSize::KIB4,
        memfd: false,
        populated: None,
    }
}

fn config(psk: &Psk, mode: MigrationMode) -> MigrationConfig {
    MigrationConfig::new(psk.clone())
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_mode(mode)
        .with_downtime_limit(Duration::from_millis(50))
        .with_io_timeout(Duration::from_secs(30))
}

type DestOutcome = Result<(Box<KvmVm>, DestReport), Error>;

/// The destination side of one migration, with a probe on its guest.
struct Dest {
    addr: SocketAddr,
    handle: thread::JoinHandle<DestOutcome>,
    probe: mpsc::Receiver<GuestProgress>,
}

/// Accepts one migration on a thread; the factory hands out a progress probe of the VM it
/// builds, so that the test can watch the guest while `accept` still owns it.
fn destination(cfg: MigrationConfig) -> Dest {
    destination_with(cfg, KvmDestConfig::default())
}

/// [`destination`] with a destination VM built from `dest_cfg`.
fn destination_with(cfg: MigrationConfig, dest_cfg: KvmDestConfig) -> Dest {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, probe) = mpsc::channel();
    let handle = thread::spawn(move || {
        let factory: DestinationFactory<'static> = Box::new(move |layout: &MemoryLayout| {
            let vm = KvmVm::destination(layout, &dest_cfg)?;
            let _ = tx.send(vm.progress());
            Ok(Box::new(vm) as Box<dyn DestinationVm>)
        });
        let (vm, rep) = accept(&listener, &cfg, factory)?;
        Ok((into_kvm(vm).expect("a KVM guest"), rep))
    });
    Dest {
        addr,
        handle,
        probe,
    }
}

/// What the probe saw of the destination guest while `accept` ran.
#[derive(Debug, Default)]
struct Watched {
    /// When the guest was first seen running, and its page count then.
    resumed: Option<(Instant, u64)>,
    /// Samples (time, pages dirtied) taken while it ran.
    samples: Vec<(Instant, u64)>,
}

impl Watched {
    /// Pages the guest was handed to dirty on the destination before `until`.
    fn dirtied_before(&self, until: Instant) -> u64 {
        let Some((_, p0)) = self.resumed else {
            return 0;
        };
        self.samples
            .iter()
            .filter(|(t, _)| *t <= until)
            .map(|&(_, p)| p - p0)
            .max()
            .unwrap_or(0)
    }
}

/// Samples the destination guest every 2 ms until `done` is finished.
fn watch(probe: &mpsc::Receiver<GuestProgress>, done: &thread::JoinHandle<DestOutcome>) -> Watched {
    let mut w = Watched::default();
    let Ok(p) = probe.recv_timeout(Duration::from_secs(30)) else {
        return w;
    };
    while !done.is_finished() {
        if p.running() {
            let now = (Instant::now(), p.pages_dirtied());
            w.resumed.get_or_insert(now);
            w.samples.push(now);
        }
        thread::sleep(Duration::from_millis(2));
    }
    w
}

fn run(
    source: &mut KvmVm,
    cfg: MigrationConfig,
) -> (Result<MigrationReport, Error>, DestOutcome, Watched) {
    run_with(source, cfg, KvmDestConfig::default())
}

/// [`run`] into a destination VM built from `dest_cfg`.
fn run_with(
    source: &mut KvmVm,
    cfg: MigrationConfig,
    dest_cfg: KvmDestConfig,
) -> (Result<MigrationReport, Error>, DestOutcome, Watched) {
    let d = destination_with(cfg.clone(), dest_cfg);
    let (r, watched) = thread::scope(|s| {
        let src = s.spawn(|| migrate(source, d.addr, &cfg, &mut |_| {}));
        let watched = watch(&d.probe, &d.handle);
        (src.join().unwrap(), watched)
    });
    (r, d.handle.join().unwrap(), watched)
}

/// The checks every successful post-copy run must pass.
fn check_moved(
    src: &KvmVm,
    rep: &MigrationReport,
    dest: &mut KvmVm,
    drep: &DestReport,
    watched: &Watched,
    mode: &str,
) {
    assert!(rep.verified && rep.postcopy, "{rep:?}");
    assert_eq!((rep.mode.as_str(), drep.mode.as_str()), (mode, mode));
    assert_eq!(drep.postcopy_pages, rep.postcopy_pages);
    assert_eq!(rep.digest, drep.digest);
    // The source stays paused for good; the destination runs.
    assert!(
        src.is_paused(),
        "the source must not run after a post-copy switchover"
    );
    assert!(!dest.is_paused() && !dest.vcpu_parked());
    // Identical vCPU registers across the switchover (what the source saved paused, as KVM
    // reports them back after the destination loaded them).
    let (s, d) = (src.vcpu_state_digest(), dest.vcpu_state_digest());
    assert!(
        s.is_some() && s == d,
        "vCPU state differs: {s:x?} vs {d:x?}"
    );
    // Only the guest touches destination memory before the last page arrives (the VMM takes
    // its parameters from the device state), so faults mean the vCPU ran on remote pages.
    assert!(
        rep.postcopy_faults > 0,
        "the destination vCPU never faulted on a remote page: {rep:?}"
    );
    // And it made progress: pages handed to the guest on the destination before post-copy
    // ended (the window ends a sampling period early, so a late first sample cannot stretch it).
    let (t0, _) = watched
        .resumed
        .expect("the destination guest was never seen running");
    let window =
        Duration::from_secs_f64(drep.postcopy_ms / 1e3).saturating_sub(Duration::from_millis(10));
    let early = watched.dirtied_before(t0 + window);
    assert!(
        early > 0,
        "the guest dirtied nothing during {:.1} ms of post-copy ({} samples)",
        drep.postcopy_ms,
        watched.samples.len()
    );
    assert!(
        dest.pages_dirtied() > src.pages_dirtied(),
        "the guest runs on the destination"
    );
    // The guest checks every data page after the move.
    let c = dest.self_check().unwrap();
    let params = dest.params().expect("parameters known after the restore");
    assert!(c.ok(), "destination self-check: {c:?}");
    assert_eq!(c.pages_checked, u64::from(params.data_pages));
    assert_eq!(
        Some(params),
        src.params(),
        "parameters carried in the device state"
    );
    eprintln!(
        "{mode}: {} rounds, downtime {:.3} ms, {} pages in post-copy over {:.1} ms, {} faults \
         (p50 {:.1} µs), {early} pages dirtied by the guest during post-copy",
        rep.rounds,
        rep.downtime_ms,
        rep.postcopy_pages,
        drep.postcopy_ms,
        rep.postcopy_faults,
        rep.fault_latency_us.p50
    );
}

#[test]
fn postcopy_of_a_running_guest() {
    let Some(_one) = kvm_and_uffd_or_skip() else {
        return;
    };
    let g = guest(128, 32, 256);
    let mut src = KvmVm::start(&g).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert!(src.pages_dirtied() > 0, "the source guest runs");
    let psk = Psk::random().unwrap();
    // Prefetch paced to 128 MiB/s: about a second of post-copy, with the guest running.
    let cfg = config(&psk, MigrationMode::Postcopy).with_max_bandwidth(Some(128 * MIB));
    let (r, d, watched) = run(&mut src, cfg);
    let rep = r.unwrap();
    let (mut dest, drep) = d.unwrap();
    assert_postcopy_set_is_all_but_zero(&rep, g.mem_bytes / 4096);
    check_moved(&src, &rep, &mut dest, &drep, &watched, "postcopy");
    dest.stop();
    src.stop();
}

/// Every page is in the post-copy set, but for the zero pages the scan left out (those the
/// guest wrote since are in it too).
fn assert_postcopy_set_is_all_but_zero(rep: &MigrationReport, all: u64) {
    assert_eq!(rep.rounds, 0);
    assert!(
        rep.postcopy_pages <= all && rep.postcopy_pages + rep.zero_pages >= all,
        "{} pages fetched, {} zero, of {all}",
        rep.postcopy_pages,
        rep.zero_pages
    );
}

#[test]
fn postcopy_of_an_idle_guest() {
    let Some(_one) = kvm_and_uffd_or_skip() else {
        return;
    };
    let mut src = KvmVm::start(&guest(32, 8, 0)).unwrap();
    let psk = Psk::random().unwrap();
    let (r, d, _) = run(&mut src, config(&psk, MigrationMode::Postcopy));
    let rep = r.unwrap();
    let (mut dest, _) = d.unwrap();
    assert!(rep.verified && rep.postcopy, "{rep:?}");
    // (Faults are not asserted here: an idle guest touches three pages, which the prefetch
    // may install before the vCPU thread is scheduled.)
    // An idle guest: the pages the scan found zero, and every other page fetched.
    assert!(rep.zero_pages > 0);
    assert_eq!(rep.postcopy_pages + rep.zero_pages, 32 * 256);
    assert_eq!(src.vcpu_state_digest(), dest.vcpu_state_digest());
    assert_eq!(
        dest.pages_dirtied(),
        src.pages_dirtied(),
        "an idle guest dirties nothing"
    );
    assert!(dest.self_check().unwrap().ok());
    dest.stop();
    src.stop();
}

#[test]
fn hybrid_of_a_guest_precopy_cannot_converge_on() {
    let Some(_one) = kvm_and_uffd_or_skip() else {
        return;
    };
    // A 32 MiB working set rewritten at 512 MiB/s over a link paced to 128 MiB/s: pre-copy
    // cannot converge, and the post-copy phase lasts long enough to watch the guest in it.
    let g = guest(64, 32, 512);
    let mut src = KvmVm::start(&g).unwrap();
    thread::sleep(Duration::from_millis(50));
    let psk = Psk::random().unwrap();
    let cfg = config(&psk, MigrationMode::Hybrid)
        .with_downtime_limit(Duration::from_millis(5))
        .with_max_rounds(3)
        .with_max_bandwidth(Some(128 * MIB));
    let (r, d, watched) = run(&mut src, cfg);
    let rep = r.unwrap();
    let (mut dest, drep) = d.unwrap();
    assert!(
        (1..=3).contains(&rep.rounds),
        "{} rounds: {rep:#?}",
        rep.rounds
    );
    assert!(
        rep.postcopy_pages > 0 && rep.postcopy_pages < g.mem_bytes / 4096,
        "{} pages left for post-copy",
        rep.postcopy_pages
    );
    assert_eq!(drep.rounds, rep.rounds);
    check_moved(&src, &rep, &mut dest, &drep, &watched, "hybrid");
    dest.stop();
    src.stop();
}

#[test]
fn source_lost_during_postcopy_leaves_the_destination_guest_paused() {
    let Some(_one) = kvm_and_uffd_or_skip() else {
        return;
    };
    let g = guest(64, 32, 128);
    let mut src = KvmVm::start(&g).unwrap();
    let psk = Psk::random().unwrap();
    // Without recovery (recovery.rs covers the link that comes back).
    let cfg = config(&psk, MigrationMode::Postcopy).with_recover_timeout(None);
    let d = destination(cfg.clone());
    // 8 MiB/s per connection: post-copy of 64 MiB takes seconds, so the cut lands inside it.
    let relay = Relay::new(8 * MIB);
    relay.target(d.addr);
    let (r, watched) = thread::scope(|s| {
        let source = s.spawn(|| migrate(&mut src, relay.addr, &cfg, &mut |_| {}));
        let probe = d.probe.recv_timeout(Duration::from_secs(30)).unwrap();
        // Cut once the guest has run on the destination for a while.
        let t = Instant::now();
        while !probe.running() && t.elapsed() < Duration::from_secs(20) {
            thread::sleep(Duration::from_millis(2));
        }
        assert!(probe.running(), "the destination guest never resumed");
        let p0 = probe.pages_dirtied();
        thread::sleep(Duration::from_millis(700));
        let ran = probe.pages_dirtied() - p0;
        relay.cut();
        (source.join().unwrap(), (probe, ran))
    });
    let (probe, ran) = watched;
    assert!(
        ran > 0,
        "the guest did not run on the destination before the cut"
    );
    let e = r.expect_err("the source cannot complete over a cut link");
    assert!(
        matches!(e, Error::SwitchoverUnknown(_)),
        "the guest moved: the source must stay paused: {e}"
    );
    assert!(
        src.is_paused(),
        "the source must not resume a guest that ran on the destination"
    );
    let Err(de) = d.handle.join().unwrap() else {
        panic!("the destination cannot complete over a cut link")
    };
    let remnant = expect_remnant(de, g.mem_bytes);
    // Paused: the guest makes no progress, and (its vCPU parked) its registers hold still.
    assert!(!probe.running(), "the destination guest must be paused");
    let p0 = probe.pages_dirtied();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(probe.pages_dirtied(), p0, "a paused guest was handed work");
    let mut vm = into_kvm(remnant.release()).expect("a KVM guest");
    assert!(vm.is_paused());
    if vm.vcpu_parked() {
        let a = vm.save_state().unwrap();
        thread::sleep(Duration::from_millis(50));
        assert_eq!(a, vm.save_state().unwrap(), "a paused vCPU changed state");
    } else {
        eprintln!("the vCPU is still blocked in KVM_RUN on a page that never arrived");
    }
    vm.stop();
    src.stop();
}

/// Like [`kvm_and_uffd_or_skip`], also skipped where userfaultfd has no minor faults on shmem
/// (memfd guest memory needs them for zero-copy post-copy).
fn kvm_and_minor_faults_or_skip() -> Option<MutexGuard<'static, ()>> {
    let one = kvm_and_uffd_or_skip()?;
    if !Uffd::minor_supported() {
        let test = std::thread::current()
            .name()
            .unwrap_or("kvm post-copy")
            .to_string();
        skip(
            Capability::UffdMinor,
            &test,
            "userfaultfd minor faults on shmem (memfd) unavailable",
        );
        return None;
    }
    Some(one)
}

#[test]
fn zero_copy_postcopy_of_a_running_guest_with_memfd_memory() {
    let Some(_one) = kvm_and_minor_faults_or_skip() else {
        return;
    };
    let g = guest(128, 32, 256).with_memfd(true);
    let mut src = KvmVm::start(&g).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert!(
        src.pages_dirtied() > 0,
        "the source guest runs on memfd memory"
    );
    let psk = Psk::random().unwrap();
    let cfg = config(&psk, MigrationMode::Postcopy).with_max_bandwidth(Some(128 * MIB));
    let (r, d, watched) = run_with(&mut src, cfg, KvmDestConfig::default().with_memfd(true));
    let rep = r.unwrap();
    let (mut dest, drep) = d.unwrap();
    assert_postcopy_set_is_all_but_zero(&rep, g.mem_bytes / 4096);
    assert!(
        drep.postcopy_zero_copy,
        "memfd guest memory is installed in place with UFFDIO_CONTINUE: {drep:?}"
    );
    // vCPU faults inside KVM_RUN are minor faults here, resolved without a copy.
    check_moved(&src, &rep, &mut dest, &drep, &watched, "postcopy");
    dest.stop();
    src.stop();
}

#[test]
fn zero_copy_hybrid_of_a_guest_with_memfd_memory() {
    let Some(_one) = kvm_and_minor_faults_or_skip() else {
        return;
    };
    // As hybrid_of_a_guest_precopy_cannot_converge_on, with memfd memory on both ends: the
    // destination drops the stale pages (their page-table entries; the memfd keeps the
    // content) and maps the refetched ones with UFFDIO_CONTINUE.
    let g = guest(64, 32, 512).with_memfd(true);
    let mut src = KvmVm::start(&g).unwrap();
    thread::sleep(Duration::from_millis(50));
    let psk = Psk::random().unwrap();
    let cfg = config(&psk, MigrationMode::Hybrid)
        .with_downtime_limit(Duration::from_millis(5))
        .with_max_rounds(3)
        .with_max_bandwidth(Some(128 * MIB));
    let (r, d, watched) = run_with(&mut src, cfg, KvmDestConfig::default().with_memfd(true));
    let rep = r.unwrap();
    let (mut dest, drep) = d.unwrap();
    assert!(
        (1..=3).contains(&rep.rounds),
        "{} rounds: {rep:#?}",
        rep.rounds
    );
    assert!(
        rep.postcopy_pages > 0 && rep.postcopy_pages < g.mem_bytes / 4096,
        "{} pages left for post-copy",
        rep.postcopy_pages
    );
    assert_eq!(drep.rounds, rep.rounds);
    assert!(
        drep.postcopy_zero_copy,
        "memfd guest memory is installed in place with UFFDIO_CONTINUE: {drep:?}"
    );
    check_moved(&src, &rep, &mut dest, &drep, &watched, "hybrid");
    dest.stop();
    src.stop();
}
