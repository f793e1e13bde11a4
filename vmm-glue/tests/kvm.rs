//! KVM guest tests: dirty rate seen by the dirty log, loopback migrations over TCP with the
//! guest checking itself on the destination, and failures before switchover that must leave
//! the source guest running and intact. Skipped, visibly, where `/dev/kvm` is not usable.

use rdmig_transport::require::{skip, Capability};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rdmig_transport::auth::Psk;
use rdmig_transport::mem::PageSize;
use rdmig_transport::pages::PageSet;
use rdmig_transport::session::{
    accept, migrate, ConvergencePolicy, DestReport, MigrationConfig, MigrationReport,
};
use rdmig_transport::vm::SourceVm;
use rdmig_transport::wire::TransportKind;
use rdmig_vmm::kvm::{
    into_kvm, kvm_available, kvm_destination_factory, KvmConfig, KvmDestConfig, KvmVm,
};

/// KVM tests run one at a time: they share two cores and the rate test measures time.
fn kvm_or_skip() -> Option<MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    if let Err(why) = kvm_available() {
        let test = std::thread::current().name().unwrap_or("kvm").to_string();
        skip(
            Capability::Kvm,
            &test,
            format!("/dev/kvm not usable: {why}"),
        );
        return None;
    }
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner()))
}

fn config(mem_mib: u64, ws_mib: u64, rate_mib_s: u64) -> KvmConfig {
    KvmConfig {
        mem_bytes: mem_mib << 20,
        working_set: ws_mib << 20,
        dirty_rate: rate_mib_s << 20,
        page_size: PageSize::KIB4,
        memfd: false,
        populated: None,
    }
}

fn tcp(psk: Psk) -> MigrationConfig {
    MigrationConfig::new(psk)
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_io_timeout(Duration::from_secs(30))
}

type DestResult = rdmig_transport::Result<(Box<KvmVm>, DestReport)>;

/// Listens on a loopback port and accepts one migration into a KVM destination on a thread.
fn destination(psk: Psk) -> (SocketAddr, thread::JoinHandle<DestResult>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = thread::spawn(move || {
        // A refused handshake does not end the listener; the listen timeout does.
        let (vm, report) = accept(
            &listener,
            &tcp(psk).with_listen_timeout(Some(Duration::from_secs(5))),
            kvm_destination_factory(KvmDestConfig::default()),
        )?;
        Ok((into_kvm(vm).expect("the destination VM is a KvmVm"), report))
    });
    (addr, h)
}

#[test]
fn guest_dirties_at_the_requested_rate() {
    let Some(_one) = kvm_or_skip() else { return };
    // 16 MiB/s = 4096 pages/s into a 32 MiB (8192 page) working set: no page twice in 1 s.
    let mut vm = KvmVm::start(&config(64, 32, 16)).unwrap();
    vm.start_dirty_log().unwrap();
    let handed0 = vm.pages_dirtied();
    let t = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let mut set = PageSet::empty(vm.memory());
    vm.fetch_and_clear_dirty(&mut set).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let handed = vm.pages_dirtied() - handed0;
    let per_s = set.count() as f64 / secs;
    eprintln!(
        "dirty log: {} pages in {secs:.3} s ({per_s:.0}/s); guest was handed {handed}",
        set.count()
    );
    // The dirty log holds the data pages the guest was handed (none twice in 1 s), plus the
    // few generation-table pages that index them; a batch (4 pages) may straddle either end.
    assert!(
        set.count() + 8 >= handed,
        "the dirty log missed pages the guest wrote"
    );
    assert!(
        set.count() <= handed + 16,
        "the dirty log has pages the guest did not write"
    );
    // The rate is the requested one, within what a busy shared 2-core host allows.
    assert!(
        (0.7 * 4096.0..=1.2 * 4096.0).contains(&per_s),
        "{per_s} dirty pages/s, 4096 requested"
    );
    assert!(vm.self_check().unwrap().ok());
    vm.stop();
}

#[test]
fn idle_guest_dirties_nothing_and_pauses_fast() {
    let Some(_one) = kvm_or_skip() else { return };
    let mut vm = KvmVm::start(&config(16, 4, 0)).unwrap();
    vm.start_dirty_log().unwrap();
    thread::sleep(Duration::from_millis(200));
    let mut set = PageSet::empty(vm.memory());
    vm.fetch_and_clear_dirty(&mut set).unwrap();
    assert_eq!(set.count(), 0, "an idle guest wrote memory");
    let t = Instant::now();
    vm.pause().unwrap();
    eprintln!("pause of an idle guest: {:?}", t.elapsed());
    let a = vm.save_state().unwrap();
    thread::sleep(Duration::from_millis(50));
    let b = vm.save_state().unwrap();
    assert_eq!(a, b, "a paused vCPU changed state");
    vm.fetch_and_clear_dirty(&mut set).unwrap();
    assert_eq!(set.count(), 0);
    vm.resume().unwrap();
    assert!(vm.self_check().unwrap().ok());
    vm.stop();
}

fn migrate_running_guest(cfg: KvmConfig) -> MigrationReport {
    let mut src = KvmVm::start(&cfg).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert!(
        src.self_check().unwrap().ok(),
        "the source guest fails its own check before migrating"
    );
    let psk = Psk::random().unwrap();
    let (addr, dest) = destination(psk.clone());
    let report = migrate(&mut src, addr, &tcp(psk), &mut |_| {}).expect("migration");
    let (mut dst, dreport) = dest.join().unwrap().expect("destination");
    eprintln!(
        "migrated {} MiB in {:.1} ms, {} rounds, downtime {:.2} ms, resume {:.2} ms",
        report.mem_bytes >> 20,
        report.total_ms,
        report.rounds,
        report.downtime_ms,
        dreport.resume_ms
    );
    assert!(report.verified, "memory digest mismatch");
    assert_eq!(report.digest, dreport.digest);
    let saved = src
        .vcpu_state_digest()
        .expect("source saved its vCPU state");
    assert_eq!(
        Some(saved),
        dst.vcpu_state_digest(),
        "vCPU state differs across the switchover"
    );
    src.stop();

    // The guest runs on: it keeps dirtying and its own check passes.
    let before = dst.pages_dirtied();
    let check = dst.self_check().expect("self-check on the destination");
    assert!(check.ok(), "guest self-check after resume: {check:?}");
    if cfg.dirty_rate > 0 {
        thread::sleep(Duration::from_millis(100));
        assert!(
            dst.pages_dirtied() > before,
            "the guest does not run on the destination"
        );
        assert!(dst.self_check().unwrap().ok());
    }
    dst.stop();
    report
}

#[test]
fn migrates_a_running_guest_over_tcp() {
    let Some(_one) = kvm_or_skip() else { return };
    migrate_running_guest(config(64, 16, 64));
}

#[test]
fn migrates_an_idle_guest_over_tcp() {
    let Some(_one) = kvm_or_skip() else { return };
    migrate_running_guest(config(32, 8, 0));
}

#[test]
fn migrates_a_sparse_running_guest_over_tcp() {
    let Some(_one) = kvm_or_skip() else { return };
    // 256 MiB of which about 32 MiB was ever written: the rest moves as zero ranges.
    let mut cfg = config(256, 16, 64);
    cfg.populated = Some(32 << 20);
    let report = migrate_running_guest(cfg);
    let untouched = (256 - 32 - 2) << 20 >> 12;
    assert!(
        report.zero_pages >= untouched,
        "{} zero pages, at least {untouched} expected",
        report.zero_pages
    );
    assert!(
        report.per_round[0].bytes <= 34 << 20,
        "round 0 moved {} bytes",
        report.per_round[0].bytes
    );
}

#[test]
fn migrates_with_2mib_pages() {
    let Some(_one) = kvm_or_skip() else { return };
    let mut cfg = config(64, 16, 32);
    cfg.page_size = PageSize::new(2 << 20).unwrap();
    migrate_running_guest(cfg);
}

fn assert_source_intact(src: &mut KvmVm) {
    assert!(!src.is_paused(), "the source guest was left paused");
    let before = src.pages_dirtied();
    thread::sleep(Duration::from_millis(50));
    assert!(
        src.pages_dirtied() > before,
        "the source guest is not running"
    );
    let check = src.self_check().unwrap();
    assert!(
        check.ok(),
        "source self-check after a failed migration: {check:?}"
    );
}

#[test]
fn wrong_key_leaves_the_source_running() {
    let Some(_one) = kvm_or_skip() else { return };
    let mut src = KvmVm::start(&config(32, 8, 32)).unwrap();
    let (addr, dest) = destination(Psk::random().unwrap());
    let err = migrate(&mut src, addr, &tcp(Psk::random().unwrap()), &mut |_| {}).unwrap_err();
    eprintln!("source: {err}");
    assert!(dest.join().unwrap().is_err());
    assert_source_intact(&mut src);
    src.stop();
}

#[test]
fn abort_for_non_convergence_leaves_the_source_running() {
    let Some(_one) = kvm_or_skip() else { return };
    // A downtime limit no round can meet: pre-copy rounds run, then the source aborts.
    let mut src = KvmVm::start(&config(64, 32, 64)).unwrap();
    let psk = Psk::random().unwrap();
    let (addr, dest) = destination(psk.clone());
    let cfg = tcp(psk)
        .with_downtime_limit(Duration::from_nanos(1))
        .with_max_rounds(3)
        .with_policy(ConvergencePolicy::Abort);
    let mut rounds = 0;
    let err = migrate(&mut src, addr, &cfg, &mut |_| rounds += 1).unwrap_err();
    eprintln!("source after {rounds} rounds: {err}");
    assert!(rounds >= 1);
    assert!(dest.join().unwrap().is_err());
    assert_source_intact(&mut src);
    src.stop();
}

/// Forwards every connection to `to` until `cut_after` bytes went from the source to the
/// destination in total, then closes every connection, as a destination that died would.
fn cutting_proxy(to: SocketAddr, cut_after: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { return };
            let Ok(outbound) = TcpStream::connect(to) else {
                return;
            };
            conns
                .lock()
                .unwrap()
                .extend([inbound.try_clone().unwrap(), outbound.try_clone().unwrap()]);
            for (mut from, mut into, count) in [
                (
                    inbound.try_clone().unwrap(),
                    outbound.try_clone().unwrap(),
                    true,
                ),
                (outbound, inbound, false),
            ] {
                let (sent, cut, conns) = (sent.clone(), cut.clone(), conns.clone());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        if cut.load(Ordering::SeqCst) || into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if count
                            && sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > cut_after
                        {
                            cut.store(true, Ordering::SeqCst);
                            for c in conns.lock().unwrap().drain(..) {
                                let _ = c.shutdown(Shutdown::Both);
                            }
                        }
                    }
                    let _ = into.shutdown(Shutdown::Both);
                });
            }
        }
    });
    addr
}

#[test]
fn destination_lost_mid_round_leaves_the_source_running() {
    let Some(_one) = kvm_or_skip() else { return };
    let mut src = KvmVm::start(&config(64, 16, 64)).unwrap();
    let psk = Psk::random().unwrap();
    let (addr, dest) = destination(psk.clone());
    // Cut after 16 MiB of the 64 MiB first round.
    let proxy = cutting_proxy(addr, 16 << 20);
    let err = migrate(&mut src, proxy, &tcp(psk), &mut |_| {}).unwrap_err();
    eprintln!("source: {err}");
    assert!(dest.join().unwrap().is_err());
    assert_source_intact(&mut src);

    // The same guest then migrates for real.
    let psk = Psk::random().unwrap();
    let (addr, dest) = destination(psk.clone());
    assert!(
        migrate(&mut src, addr, &tcp(psk), &mut |_| {})
            .unwrap()
            .verified
    );
    src.stop();
    let (mut dst, _) = dest.join().unwrap().unwrap();
    assert!(dst.self_check().unwrap().ok());
    dst.stop();
}

#[test]
fn self_check_catches_stale_and_missing_pages() {
    let Some(_one) = kvm_or_skip() else { return };
    // 1024 pages/s over 1024 pages: page 5 is rewritten early and then not for a second.
    let mut vm = KvmVm::start(&config(16, 4, 4)).unwrap();
    thread::sleep(Duration::from_millis(50));
    let p = vm.params().unwrap();
    let host = vm.memory().regions()[0].host_ptr();
    vm.pause().unwrap();
    // Page 5 (in the working set) gets its old content back; page `last` (never rewritten)
    // is zeroed, as a page that never arrived would be.
    let last = p.data_pages - 1;
    for (page, value) in [(5u32, rdmig_vmm::kvm::control::page_value(5, 0)), (last, 0)] {
        let gpa = u64::from(p.data_base) + u64::from(page) * 4096;
        // The mapping lives as long as `vm`; the guest is paused.
        // SAFETY: the page lies inside the only region (checked by the guest's parameters).
        unsafe {
            std::slice::from_raw_parts_mut(host.add(gpa as usize).cast::<u32>(), 1024).fill(value)
        };
    }
    vm.resume().unwrap();
    let check = vm.self_check().unwrap();
    assert!(!check.ok());
    assert_eq!(check.pages_bad, 2, "{check:?}");
    assert_eq!(check.first_bad, Some(u64::from(p.data_base) / 4096 + 5));
    assert_eq!(check.pages_checked, u64::from(p.data_pages));
    vm.stop();
}

#[test]
fn a_migrated_guest_migrates_again() {
    let Some(_one) = kvm_or_skip() else { return };
    let mut a = KvmVm::start(&config(32, 8, 32)).unwrap();
    let psk = Psk::random().unwrap();
    let (addr, dest) = destination(psk.clone());
    assert!(
        migrate(&mut a, addr, &tcp(psk.clone()), &mut |_| {})
            .unwrap()
            .verified
    );
    a.stop();
    let (mut b, _) = dest.join().unwrap().unwrap();
    thread::sleep(Duration::from_millis(50));
    let (addr, dest) = destination(psk.clone());
    assert!(
        migrate(&mut *b, addr, &tcp(psk), &mut |_| {})
            .unwrap()
            .verified
    );
    let handed_on_b = b.pages_dirtied();
    b.stop();
    let (mut c, _) = dest.join().unwrap().unwrap();
    assert!(c.self_check().unwrap().ok());
    assert!(
        c.pages_dirtied() >= handed_on_b,
        "the dirty counter travels with the guest"
    );
    c.stop();
}

#[test]
fn destination_refuses_layouts_it_cannot_run() {
    use rdmig_transport::mem::GuestAddress;
    use rdmig_transport::vm::MemoryLayout;
    let too_big = MemoryLayout {
        page_size: PageSize::KIB4,
        regions: vec![(GuestAddress(0), 4 << 30)],
        vm: None,
    };
    let none = MemoryLayout {
        page_size: PageSize::KIB4,
        regions: vec![],
        vm: None,
    };
    let many = MemoryLayout {
        page_size: PageSize::KIB4,
        regions: (0..9).map(|i| (GuestAddress(i << 20), 1 << 20)).collect(),
        vm: None,
    };
    for layout in [too_big, none, many] {
        assert!(
            KvmVm::destination(&layout, &KvmDestConfig::default()).is_err(),
            "{layout:?}"
        );
    }
}
