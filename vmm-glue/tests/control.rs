//! A migration driven through its `MigrationControl`, as a VMM drives it: cancel in every
//! phase (the source runs on intact, the destination discards), progress on both ends,
//! parameters changed while it runs, post-copy on demand, and channels other than TCP (a
//! Unix socket, pre-opened descriptors) and the threaded handle. Every test bounds its time.

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use rdmig_transport::abort::AbortCode;
use rdmig_transport::auth::Psk;
use rdmig_transport::channel::{FdChannel, FdListener, MigrationChannel, TcpChannel, UnixChannel};
use rdmig_transport::require::{skip, Capability};
use rdmig_transport::session::{
    accept_controlled, accept_with, migrate_with, ConvergencePolicy, DestReport, Migration,
    MigrationConfig, MigrationControl, MigrationMode, MigrationReport, Phase,
};
use rdmig_transport::wire::TransportKind;
use rdmig_transport::Error;
use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};

const MIB: u64 = 1 << 20;

/// A guest that keeps writing a little (so that "runs on" can be seen).
fn guest(mem: u64) -> SyntheticVm {
    SyntheticVm::start(&SyntheticConfig::new(mem).with_dirtying(2 * MIB, 4 * MIB)).unwrap()
}

fn uffd_ok() -> bool {
    match rdmig_transport::postcopy::Uffd::probe() {
        Ok(()) => true,
        Err(e) => {
            let test = std::thread::current()
                .name()
                .unwrap_or("control")
                .to_string();
            skip(
                Capability::Uffd,
                &test,
                format!("userfaultfd unavailable: {e}"),
            );
            false
        }
    }
}

fn config(psk: &Psk) -> MigrationConfig {
    MigrationConfig::new(psk.clone())
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_downtime_limit(Duration::from_millis(50))
        .with_io_timeout(Duration::from_secs(20))
}

type DestResult = Result<(SyntheticVm, DestReport), Error>;

/// A destination on a thread, driven by `control`.
fn destination(
    cfg: MigrationConfig,
    dest_cfg: SyntheticConfig,
    control: MigrationControl,
) -> (std::net::SocketAddr, std::thread::JoinHandle<DestResult>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        accept_controlled(
            &listener,
            &cfg,
            synthetic_destination_factory(dest_cfg, None),
            &control,
        )
        .map(|(vm, rep)| (*vm.into_any().downcast::<SyntheticVm>().unwrap(), rep))
    });
    (addr, t)
}

/// Migrates `source` to a destination on a thread; `on_round` sees each round with the
/// source's control.
fn migrate_to(
    source: &mut SyntheticVm,
    cfg: MigrationConfig,
    control: &MigrationControl,
    dest_control: MigrationControl,
    on_round: &mut dyn FnMut(&rdmig_transport::session::RoundStats, &MigrationControl),
) -> (Result<MigrationReport, Error>, DestResult) {
    let dest_cfg = SyntheticConfig::new(source.memory_map().total_bytes()).with_dirtying(0, 0);
    let (addr, dest) = destination(cfg.clone(), dest_cfg, dest_control);
    let r = migrate_with(source, &mut TcpChannel(addr), &cfg, control, &mut |s| {
        on_round(s, control)
    });
    (r, dest.join().unwrap())
}

fn assert_intact(source: &SyntheticVm) {
    assert!(source.running(), "the source VM runs on");
    let check = source.verify();
    assert!(check.ok(), "source memory intact: {check:?}");
}

#[test]
fn a_cancel_mid_round_ends_both_ends_at_once_and_the_source_runs_on() {
    let psk = Psk::random().unwrap();
    let mut source = guest(64 * MIB);
    // 64 MiB at 8 MiB/s: round 0 alone takes 8 s.
    let cfg = config(&psk).with_max_bandwidth(Some(8 * MIB));
    let control = MigrationControl::new();
    let c = control.clone();
    let canceller = std::thread::spawn(move || {
        let t = Instant::now();
        while c.progress().transferred_bytes < 2 * MIB {
            assert!(t.elapsed() < Duration::from_secs(10), "no progress seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        let p = c.progress();
        assert_eq!(p.phase, Phase::Active);
        assert!(p.remaining_bytes > 0 && p.total_bytes == 64 * MIB, "{p:?}");
        c.cancel().unwrap();
        Instant::now()
    });
    let dest_control = MigrationControl::new();
    let (r, d) = migrate_to(
        &mut source,
        cfg,
        &control,
        dest_control.clone(),
        &mut |_, _| {},
    );
    let at = canceller.join().unwrap();
    assert!(
        at.elapsed() < Duration::from_secs(2),
        "ended {:?} after the cancel",
        at.elapsed()
    );
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(control.progress().phase, Phase::Cancelled);
    let Err(e) = d else {
        panic!("the destination must discard the guest")
    };
    assert!(e.to_string().contains("cancelled"), "{e}");
    // The source told it why, with a code a VMM can act on.
    assert!(
        matches!(&e, Error::PeerAborted(p) if p.code == AbortCode::Cancelled),
        "{e:?}"
    );
    assert_eq!(dest_control.progress().phase, Phase::Failed);
    assert_intact(&source);
}

#[test]
fn a_cancel_in_the_handshake_or_before_the_start_ends_at_once() {
    let psk = Psk::random().unwrap();
    let mut source = guest(8 * MIB);
    // A destination that accepts and then says nothing.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let keep = std::thread::spawn(move || silent.accept().map(|(s, _)| s));
    let control = MigrationControl::new();
    let c = control.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        c.cancel().unwrap();
    });
    let t = Instant::now();
    let r = migrate_with(
        &mut source,
        &mut TcpChannel(addr),
        &config(&psk),
        &control,
        &mut |_| {},
    );
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(keep.join());
    // A control cancelled before the migration starts refuses to start it.
    let r = migrate_with(
        &mut source,
        &mut TcpChannel(addr),
        &config(&psk),
        &control,
        &mut |_| {},
    );
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_intact(&source);
}

#[test]
fn a_cancel_in_the_stop_and_copy_resumes_the_paused_source() {
    let psk = Psk::random().unwrap();
    let mut source =
        SyntheticVm::start(&SyntheticConfig::new(32 * MIB).with_dirtying(4 * MIB, 8 * MIB))
            .unwrap();
    let control = MigrationControl::new();
    let mut saw_final = false;
    let (r, d) = migrate_to(
        &mut source,
        config(&psk),
        &control,
        MigrationControl::new(),
        &mut |s, c| {
            if s.final_round {
                // The guest is paused and the final round landed; the switchover is next.
                saw_final = true;
                assert_eq!(c.progress().phase, Phase::Device);
                c.cancel().unwrap();
            }
        },
    );
    assert!(saw_final);
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(d.is_err());
    assert_intact(&source);
}

#[test]
fn a_cancel_after_the_switchover_is_refused_and_the_migration_completes() {
    if !uffd_ok() {
        return;
    }
    let psk = Psk::random().unwrap();
    let mut source = guest(64 * MIB);
    let cfg = config(&psk)
        .with_mode(MigrationMode::Postcopy)
        .with_max_bandwidth(Some(32 * MIB));
    let dest_control = MigrationControl::new();
    let c = dest_control.clone();
    let watcher = std::thread::spawn(move || {
        let t = Instant::now();
        while c.progress().phase != Phase::PostcopyActive {
            assert!(t.elapsed() < Duration::from_secs(20), "{:?}", c.progress());
            std::thread::sleep(Duration::from_millis(2));
        }
        let p = c.progress();
        assert!(p.remaining_bytes > 0, "{p:?}");
        let refused = c.cancel();
        // The destination's progress moves during post-copy.
        let mut later = c.progress();
        while later.remaining_bytes == p.remaining_bytes && !later.phase.is_final() {
            std::thread::sleep(Duration::from_millis(20));
            later = c.progress();
        }
        (refused, p, later)
    });
    let control = MigrationControl::new();
    let (r, d) = migrate_to(
        &mut source,
        cfg,
        &control,
        dest_control.clone(),
        &mut |_, _| {},
    );
    let (refused, p, later) = watcher.join().unwrap();
    assert!(
        matches!(refused, Err(Error::TooLateToCancel)),
        "{refused:?}"
    );
    assert!(later.remaining_bytes < p.remaining_bytes || later.phase == Phase::Completed);
    assert!(matches!(control.cancel(), Err(Error::TooLateToCancel)));
    let rep = r.unwrap();
    assert!(rep.verified && rep.postcopy);
    assert!(d.unwrap().0.verify().ok());
    assert_eq!(dest_control.progress().phase, Phase::Completed);
}

#[test]
fn a_destination_cancel_aborts_the_source_which_runs_on() {
    let psk = Psk::random().unwrap();
    let mut source = guest(64 * MIB);
    let cfg = config(&psk).with_max_bandwidth(Some(8 * MIB));
    let dest_control = MigrationControl::new();
    let c = dest_control.clone();
    std::thread::spawn(move || {
        let t = Instant::now();
        while c.progress().phase != Phase::Active {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        c.cancel().unwrap();
    });
    let t = Instant::now();
    let (r, d) = migrate_to(
        &mut source,
        cfg,
        &MigrationControl::new(),
        dest_control,
        &mut |_, _| {},
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(matches!(d, Err(Error::Cancelled)), "{:?}", d.err());
    let e = r.unwrap_err();
    assert!(
        matches!(&e, Error::PeerAborted(p) if p.code == AbortCode::Cancelled),
        "{e:?}"
    );
    assert_intact(&source);
}

#[test]
fn parameters_changed_mid_run_take_effect_in_the_next_round() {
    let psk = Psk::random().unwrap();
    // A guest that dirties 16 MiB/s: with a 1 µs downtime limit the abort policy refuses it.
    let mut source =
        SyntheticVm::start(&SyntheticConfig::new(16 * MIB).with_dirtying(8 * MIB, 16 * MIB))
            .unwrap();
    let cfg = config(&psk)
        .with_downtime_limit(Duration::from_micros(1))
        .with_policy(ConvergencePolicy::Abort)
        .with_max_rounds(6)
        .with_max_bandwidth(Some(4 * MIB));
    let control = MigrationControl::new();
    let mut rounds_seen = 0;
    let t = Instant::now();
    let (r, d) = migrate_to(
        &mut source,
        cfg,
        &control,
        MigrationControl::new(),
        &mut |s, c| {
            rounds_seen += 1;
            if s.round == 0 {
                // Round 0 ran at the 4 MiB/s cap (16 MiB: about 4 s). From round 1 on: no
                // cap, and a limit that a few MiB of dirty pages meet.
                assert!(s.mib_s < 6.0, "round 0 was capped: {s:?}");
                c.set_max_bandwidth(None).unwrap();
                c.set_downtime_limit(Duration::from_secs(5)).unwrap();
            }
        },
    );
    let rep = r.expect("the new limit lets it switch over");
    assert!(rep.verified && !rep.forced_switchover);
    // Round 1 ran uncapped and was judged by the new limit: the final round came next.
    assert_eq!(
        rep.rounds, 3,
        "switched over after round 1: {:?}",
        rep.per_round
    );
    // Round 0 (4 s) dirtied the whole 8 MiB working set: capped at 4 MiB/s, round 1 would
    // take 2 s.
    let r1 = &rep.per_round[1];
    let capped_ms = r1.bytes as f64 / (4 * MIB) as f64 * 1e3;
    assert!(r1.bytes >= 4 * MIB, "{r1:?}");
    assert!(r1.ms < 0.5 * capped_ms, "round 1 uncapped: {r1:?}");
    assert!(rounds_seen >= 2);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let p = control.progress();
    assert_eq!((p.phase, p.max_bandwidth), (Phase::Completed, 0), "{p:?}");
    assert_eq!(p.downtime_limit, Duration::from_secs(5));
    assert!(d.unwrap().0.verify().ok());
}

#[test]
fn start_postcopy_switches_a_hybrid_migration_after_the_round() {
    if !uffd_ok() {
        return;
    }
    let psk = Psk::random().unwrap();
    let mut source =
        SyntheticVm::start(&SyntheticConfig::new(32 * MIB).with_dirtying(8 * MIB, 32 * MIB))
            .unwrap();
    let cfg = config(&psk)
        .with_mode(MigrationMode::Hybrid)
        .with_downtime_limit(Duration::from_micros(1))
        .with_max_rounds(1000);
    let control = MigrationControl::new();
    let (r, d) = migrate_to(
        &mut source,
        cfg,
        &control,
        MigrationControl::new(),
        &mut |s, c| {
            if s.round == 0 {
                // A live parameter in a post-copy session reaches the destination too.
                c.set_max_bandwidth(Some(1 << 30)).unwrap();
            }
            if s.round == 1 {
                c.start_postcopy().unwrap();
            }
        },
    );
    let rep = r.unwrap();
    assert!(rep.postcopy && rep.verified, "{rep:?}");
    assert_eq!(rep.rounds, 2, "post-copy right after round 1");
    assert!(d.unwrap().0.verify().ok());
    // A pre-copy migration cannot.
    let c = MigrationControl::new();
    assert!(matches!(
        c.start_postcopy(),
        Err(Error::PostcopyUnavailable(_))
    ));
}

/// Migrates `source` over `channel` to a destination accepting on `listener`; verifies.
fn migrate_over(
    source: &mut SyntheticVm,
    channel: &mut dyn MigrationChannel,
    listener: Box<dyn rdmig_transport::channel::ChannelListener>,
) -> MigrationReport {
    let psk = Psk::random().unwrap();
    let cfg = config(&psk);
    let dcfg = cfg.clone();
    let dest_cfg = SyntheticConfig::new(source.memory_map().total_bytes()).with_dirtying(0, 0);
    let dest = std::thread::spawn(move || {
        accept_with(
            listener.as_ref(),
            &dcfg,
            synthetic_destination_factory(dest_cfg, None),
            &MigrationControl::new(),
        )
        .map(|(vm, _)| *vm.into_any().downcast::<SyntheticVm>().unwrap())
    });
    let rep = migrate_with(source, channel, &cfg, &MigrationControl::new(), &mut |_| {}).unwrap();
    let dest = dest.join().unwrap().unwrap();
    assert!(rep.verified);
    assert!(dest.verify().ok());
    rep
}

#[test]
fn a_unix_socket_channel_carries_a_migration() {
    let path = std::env::temp_dir().join(format!("rdmig-control-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let mut source =
        SyntheticVm::start(&SyntheticConfig::new(32 * MIB).with_dirtying(2 * MIB, 8 * MIB))
            .unwrap();
    let rep = migrate_over(
        &mut source,
        &mut UnixChannel(path.clone()),
        Box::new(listener),
    );
    assert_eq!(rep.transport, "tcp");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn pre_opened_descriptors_carry_a_migration() {
    // One control connection and two data streams, connected before the migration.
    let (mut src, mut dst): (Vec<OwnedFd>, Vec<OwnedFd>) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (a, b) = UnixStream::pair().unwrap();
        src.push(a.into());
        dst.push(b.into());
    }
    let mut source = guest(16 * MIB);
    migrate_over(
        &mut source,
        &mut FdChannel::new(src),
        Box::new(FdListener::new(dst)),
    );
    // Too few descriptors: a clear error, the source intact.
    let (a, _b) = UnixStream::pair().unwrap();
    let mut source = guest(16 * MIB);
    let mut ch = FdChannel::new([OwnedFd::from(a)]);
    let psk = Psk::random().unwrap();
    let e = migrate_with(
        &mut source,
        &mut ch,
        &config(&psk).with_io_timeout(Duration::from_secs(2)),
        &MigrationControl::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(!e.to_string().is_empty());
    assert_intact(&source);
}

#[test]
fn the_threaded_handle_runs_a_migration_and_hands_the_vm_back() {
    let psk = Psk::random().unwrap();
    let cfg = config(&psk);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = Migration::incoming(
        Box::new(listener),
        cfg.clone(),
        synthetic_destination_factory(SyntheticConfig::new(16 * MIB).with_dirtying(0, 0), None),
    )
    .unwrap();
    let source = guest(16 * MIB);
    let m = Migration::start(Box::new(source), Box::new(TcpChannel(addr)), cfg).unwrap();
    let (vm, r) = m.join();
    let rep = r.unwrap();
    assert!(rep.verified);
    let (dvm, _) = incoming.join().unwrap();
    let dvm = dvm.into_any().downcast::<SyntheticVm>().unwrap();
    assert!(dvm.verify().ok());
    drop(vm);
}

#[test]
fn a_destination_of_another_kind_refuses_before_any_memory_moves() {
    // A synthetic source announces itself; a KVM destination refuses it before it builds
    // anything (no /dev/kvm needed: the kind is checked first).
    let psk = Psk::random().unwrap();
    let cfg = config(&psk);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dcfg = cfg.clone();
    let dest = std::thread::spawn(move || {
        rdmig_transport::session::accept(
            &listener,
            &dcfg,
            rdmig_vmm::kvm::kvm_destination_factory(Default::default()),
        )
        .map(|_| ())
    });
    let mut source = guest(16 * MIB);
    let control = MigrationControl::new();
    let e = migrate_with(
        &mut source,
        &mut TcpChannel(addr),
        &cfg,
        &control,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::PeerAborted(p) if p.code == AbortCode::Vmm
            && p.contains("the source migrates a synthetic VM")),
        "{e:?}"
    );
    assert_eq!(control.progress().transferred_bytes, 0, "no memory moved");
    let de = dest.join().unwrap().unwrap_err();
    assert!(de.to_string().contains("builds kvm VMs"), "{de}");
    assert_intact(&source);
}
