//! Loopback migrations of the synthetic VM over TCP, with writers active during the rounds:
//! several sizes, stream counts, page sizes and region layouts; and failures (link lost
//! mid-round, non-convergence with the abort policy, a stall ended by the progress timeout) that
//! must leave the source running intact.

mod support;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdmig_transport::auth::Psk;
use rdmig_transport::digest::full_digest;
use rdmig_transport::mem::PageSize;
use rdmig_transport::session::{
    accept, migrate, ConvergencePolicy, MigrationConfig, MigrationReport,
};
use rdmig_transport::wire::TransportKind;
use rdmig_transport::Error;
use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};

use support::relay::Relay;
use support::synthetic::run_at;

const MIB: u64 = 1 << 20;

fn config(psk: &Psk, streams: u16) -> MigrationConfig {
    MigrationConfig::new(psk.clone())
        .with_transport(TransportKind::Tcp)
        .with_streams(streams)
        .with_downtime_limit(Duration::from_millis(50))
        .with_io_timeout(Duration::from_secs(30))
}

/// Migrates `source` to an in-process destination built from `dest_cfg`.
fn run(
    source: &mut SyntheticVm,
    dest_cfg: SyntheticConfig,
    cfg: MigrationConfig,
) -> (Result<MigrationReport, Error>, Option<SyntheticVm>) {
    let (r, d) = run_at(source, dest_cfg, cfg, [127, 0, 0, 1].into(), None);
    (r, d.ok().map(|(vm, _)| vm))
}

fn check_migration(cfg: SyntheticConfig, streams: u16) {
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    std::thread::sleep(Duration::from_millis(50)); // let the writers dirty pages first
                                                   // The destination does not write after resume, so its memory can be compared byte for byte
                                                   // with the (paused) source's.
    let (r, dest) = run(
        &mut source,
        SyntheticConfig {
            dirty_rate: 0,
            ..cfg.clone()
        },
        config(&psk, streams),
    );
    let rep = r.unwrap();
    let dest = dest.unwrap();
    assert!(rep.verified, "digest mismatch");
    assert_eq!(rep.transport, "tcp");
    assert!(rep.rounds >= 2);
    assert_eq!(
        rep.per_round[0].pages,
        cfg.mem_bytes / cfg.page_size.bytes(),
        "round 0 moves all memory"
    );
    assert!(
        !source.running() || cfg.dirty_rate == 0,
        "the source stays paused after a successful migration"
    );
    assert_eq!(
        full_digest(source.memory_map()),
        full_digest(dest.memory_map()),
        "memory differs"
    );
    let check = dest.verify();
    assert!(
        check.ok() && check.pages_checked == cfg.mem_bytes / cfg.page_size.bytes(),
        "{check:?}"
    );
    assert!(source.pages_written() > 0 || cfg.dirty_rate == 0);
    assert_eq!(
        dest.pages_written(),
        source.pages_written(),
        "write counter carried in the device state"
    );
}

#[test]
fn migrates_16mib_with_writers_one_stream() {
    check_migration(
        SyntheticConfig::new(16 * MIB).with_dirtying(4 * MIB, 64 * MIB),
        1,
    );
}

#[test]
fn migrates_64mib_with_writers_four_streams_two_regions() {
    check_migration(
        SyntheticConfig::new(64 * MIB)
            .with_dirtying(16 * MIB, 128 * MIB)
            .with_regions(2),
        4,
    );
}

#[test]
fn migrates_with_64k_pages_and_three_regions() {
    let cfg = SyntheticConfig::new(48 * MIB)
        .with_dirtying(8 * MIB, 64 * MIB)
        .with_page_size(PageSize::new(65536).unwrap())
        .with_regions(3);
    check_migration(cfg, 3);
}

#[test]
fn migrates_256mib_with_writers_eight_streams() {
    check_migration(
        SyntheticConfig::new(256 * MIB).with_dirtying(32 * MIB, 128 * MIB),
        8,
    );
}

#[test]
fn migrates_an_idle_vm() {
    check_migration(SyntheticConfig::new(32 * MIB), 2);
}

#[test]
fn destination_writers_resume_after_migration() {
    let cfg = SyntheticConfig::new(32 * MIB).with_dirtying(8 * MIB, 64 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let (r, dest) = run(&mut source, cfg.clone(), config(&psk, 2));
    assert!(r.unwrap().verified);
    let dest = dest.unwrap();
    let before = dest.pages_written();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        dest.pages_written() > before,
        "the guest does not run on the destination"
    );
    let c = dest.verify();
    assert!(c.ok(), "{c:?}");
}

#[test]
fn link_lost_mid_round_leaves_the_source_running_and_intact() {
    let cfg = SyntheticConfig::new(128 * MIB).with_dirtying(16 * MIB, 64 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = Relay::to(listener.local_addr().unwrap(), 0);
    // A bandwidth cap makes round 0 take about 2 s, so the cut lands inside it.
    let mcfg = config(&psk, 2).with_max_bandwidth(Some(64 * MIB));
    let dcfg = mcfg.clone();
    let dest_cfg = cfg.clone();
    let built = Arc::new(AtomicBool::new(false));
    let b2 = built.clone();
    let dest = std::thread::spawn(move || {
        let r = accept(
            &listener,
            &dcfg,
            synthetic_destination_factory(dest_cfg, None),
        );
        b2.store(true, Ordering::SeqCst);
        r.map(|_| ())
    });
    let relay = Arc::new(relay);
    let cutter = relay.cut_after(Duration::from_millis(700));
    let mut rounds_seen = 0;
    let r = migrate(&mut source, relay.addr, &mcfg, &mut |_| rounds_seen += 1);
    cutter.join().unwrap();
    relay.cut();
    let e = r.expect_err("the migration cannot succeed over a cut link");
    assert_eq!(rounds_seen, 0, "the cut was meant to land in round 0");
    assert!(
        matches!(e, Error::PeerClosed { .. } | Error::Io { .. }),
        "{e}"
    );
    assert!(
        dest.join().unwrap().is_err(),
        "the destination must fail too"
    );
    // The source runs on, untouched.
    assert!(source.running());
    let before = source.pages_written();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        source.pages_written() > before,
        "the source guest stopped writing"
    );
    let c = source.verify();
    assert!(
        c.ok() && c.pages_checked + c.pages_skipped == 128 * MIB / 4096,
        "{c:?}"
    );
}

#[test]
fn non_convergence_with_the_abort_policy_keeps_the_source_running() {
    // 32 MiB written at 1 GiB/s cannot fit a 1 ms downtime.
    let cfg = SyntheticConfig::new(64 * MIB).with_dirtying(32 * MIB, 1024 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let mcfg = config(&psk, 2)
        .with_downtime_limit(Duration::from_micros(100))
        .with_max_rounds(3)
        .with_policy(ConvergencePolicy::Abort);
    let (r, dest) = run(&mut source, cfg, mcfg);
    let e = r.expect_err("must not converge");
    assert!(matches!(e, Error::NotConverged(_)), "{e}");
    assert!(dest.is_none());
    assert!(source.running());
    assert!(source.verify().ok());
}

#[test]
fn a_stall_ends_pre_copy_at_the_progress_timeout_well_before_the_round_limit() {
    // 256 MiB/s into a 4 MiB working set over an 8 MiB/s link: each round after round 0 takes
    // about 0.5 s and leaves the whole working set dirty again, so no round leaves a dirty set
    // smaller than round 0's. The round limit is far away and the four-round rule needs five
    // rounds; the 300 ms progress timeout ends pre-copy at the first round that does not
    // shrink, and the abort policy applies.
    let cfg = SyntheticConfig::new(8 * MIB).with_dirtying(4 * MIB, 256 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let mcfg = config(&psk, 2)
        .with_max_bandwidth(Some(8 * MIB))
        .with_max_rounds(1000)
        .with_progress_timeout(Some(Duration::from_millis(300)))
        .with_policy(ConvergencePolicy::Abort);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dcfg = mcfg.clone();
    let dest_cfg = cfg.clone();
    let dest = std::thread::spawn(move || {
        accept(
            &listener,
            &dcfg,
            synthetic_destination_factory(dest_cfg, None),
        )
        .map(|_| ())
    });
    let t = std::time::Instant::now();
    let mut rounds = Vec::new();
    let e = migrate(&mut source, addr, &mcfg, &mut |s| {
        rounds.push((s.ms, s.dirty_pages))
    })
    .expect_err("a pre-copy that makes no progress must not converge");
    let took = t.elapsed();
    eprintln!("stalled after {took:?}; rounds (ms, dirty pages): {rounds:?}");
    assert!(matches!(e, Error::NotConverged(_)), "{e}");
    assert!(e.to_string().contains("progress timeout"), "{e}");
    assert!(
        (2..=3).contains(&rounds.len()),
        "the progress timeout should end pre-copy after two or three rounds, not {}: {rounds:?}",
        rounds.len()
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(
        dest.join().unwrap().is_err(),
        "the destination must fail too"
    );
    // The source runs on, untouched.
    assert!(source.running());
    let before = source.pages_written();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        source.pages_written() > before,
        "the source guest stopped writing"
    );
    let c = source.verify();
    assert!(
        c.ok() && c.pages_checked + c.pages_skipped == 8 * MIB / 4096,
        "{c:?}"
    );
}

#[test]
fn non_convergence_with_the_stop_policy_switches_over_anyway() {
    let cfg = SyntheticConfig::new(64 * MIB).with_dirtying(32 * MIB, 1024 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let mcfg = config(&psk, 2)
        .with_downtime_limit(Duration::from_micros(100))
        .with_max_rounds(3);
    let (r, dest) = run(
        &mut source,
        SyntheticConfig {
            dirty_rate: 0,
            ..cfg
        },
        mcfg,
    );
    let rep = r.unwrap();
    assert!(
        rep.forced_switchover && rep.verified && rep.rounds == 4,
        "{} rounds",
        rep.rounds
    );
    assert!(dest.unwrap().verify().ok());
}

#[test]
fn a_peer_that_hangs_without_closing_times_out_and_the_source_runs_on() {
    let cfg = SyntheticConfig::new(128 * MIB).with_dirtying(16 * MIB, 64 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = Relay::to(listener.local_addr().unwrap(), 0);
    // Round 0 takes about 1 s at this cap, well within the 2 s timeout, unless the peer hangs.
    let mcfg = config(&psk, 2)
        .with_max_bandwidth(Some(128 * MIB))
        .with_io_timeout(Duration::from_secs(2));
    let dcfg = mcfg.clone().with_io_timeout(Duration::from_secs(30));
    let dest = std::thread::spawn(move || {
        accept(
            &listener,
            &dcfg,
            synthetic_destination_factory(cfg.clone(), None),
        )
        .map(|_| ())
    });
    let relay = Arc::new(relay);
    let freezer = {
        let relay = relay.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            relay.freeze(true);
        })
    };
    let t = std::time::Instant::now();
    let e = migrate(&mut source, relay.addr, &mcfg, &mut |_| {})
        .expect_err("a hung peer cannot complete");
    freezer.join().unwrap();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    relay.freeze(false);
    relay.cut();
    assert!(dest.join().unwrap().is_err());
    assert!(source.running());
    assert!(source.verify().ok());
}

#[test]
fn auto_converge_makes_a_non_converging_guest_converge_within_the_limit() {
    // 256 MiB/s into a 32 MiB working set over a 64 MiB/s link: every round dirties more than
    // it moves. Without auto-converge the abort policy ends it; with it, the throttle rises
    // until the rounds shrink and the stop-and-copy fits 50 ms.
    let cfg = SyntheticConfig::new(64 * MIB).with_dirtying(32 * MIB, 256 * MIB);
    let psk = Psk::random().unwrap();
    let mcfg = config(&psk, 2)
        .with_max_bandwidth(Some(64 * MIB))
        .with_downtime_limit(Duration::from_millis(50))
        .with_policy(ConvergencePolicy::Abort);

    let mut source = SyntheticVm::start(&cfg).unwrap();
    let (r, _) = run(&mut source, cfg.clone(), mcfg.clone().with_max_rounds(8));
    let e = r.expect_err("without auto-converge it must not converge");
    assert!(matches!(e, Error::NotConverged(_)), "{e}");
    assert!(source.running());

    let (r, dest) = run(
        &mut source,
        SyntheticConfig {
            dirty_rate: 0,
            ..cfg.clone()
        },
        mcfg.clone().with_auto_converge(true),
    );
    let rep = r.expect("auto-converge makes it converge");
    assert!(!rep.forced_switchover, "{:?}", rep.per_round);
    assert!(rep.verified);
    let top = rep
        .per_round
        .iter()
        .map(|r| r.throttle_percent)
        .max()
        .unwrap();
    assert!(top >= 20, "never throttled: {:?}", rep.per_round);
    assert!(
        rep.per_round.last().unwrap().predicted_downtime_ms <= 50.0
            || rep
                .per_round
                .iter()
                .rev()
                .nth(1)
                .unwrap()
                .predicted_downtime_ms
                <= 50.0
    );
    assert!(dest.unwrap().verify().ok());
    eprintln!(
        "auto-converge: {} rounds, throttle up to {top}%, downtime {:.1} ms",
        rep.rounds, rep.downtime_ms
    );

    // A failed migration lifts the throttle: the guest writes at its own rate again.
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let (r, _) = run(
        &mut source,
        cfg.clone(),
        mcfg.with_auto_converge(true)
            .with_downtime_limit(Duration::from_micros(1))
            .with_max_rounds(4),
    );
    assert!(r.is_err());
    assert!(source.running());
    let w0 = source.pages_written();
    std::thread::sleep(Duration::from_millis(300));
    let per_s = (source.pages_written() - w0) as f64 / 0.3;
    assert!(
        per_s > 0.3 * (256 * MIB / 4096) as f64,
        "{per_s:.0} pages/s after the failure: the throttle stayed on"
    );
}
