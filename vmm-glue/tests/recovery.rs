//! Post-copy recovery with real userfaultfd over TCP loopback (and RDMA on SoftRoCE): a relay
//! in front of the destination cuts every connection during post-copy, once and twice, with
//! writers running on the destination guest, and refuses reconnections for a while (the link
//! is down); the source reconnects, and the migration must end verified with the recoveries
//! counted on both ends. A reconnection with the wrong key or another migration's id is
//! refused while the real source still recovers; a source that never returns leaves the
//! destination paused with the missing pages counted once the recover timeout passes.
//! Skipped, with the reason, where userfaultfd (or, for `rdma_`, SoftRoCE) is unavailable.

mod support;

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdmig_transport::auth::{random_bytes, Psk};
use rdmig_transport::channel::tls::{TlsChannel, TlsCreds, TlsListener};
use rdmig_transport::channel::{self, ChannelListener, MigrationChannel, TcpChannel};
use rdmig_transport::control::Control;
use rdmig_transport::session::{
    accept_with, migrate_with, DestReport, MigrationConfig, MigrationControl, MigrationMode,
    MigrationReport, Phase,
};
use rdmig_transport::wire::{caps, Command, Hello, Message, TransportKind, PROTOCOL_VERSION};
use rdmig_transport::Error;
use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};

use support::interrupted::expect_remnant;
use support::relay::Relay;
use support::rxe::rxe;
use support::uffd::uffd_ok;

const MIB: u64 = 1 << 20;

/// Post-copy of 64 MiB paced at 16 MiB/s: about 4 s, long enough for the cuts to land in it.
fn config(psk: &Psk, mode: MigrationMode) -> MigrationConfig {
    MigrationConfig::new(psk.clone())
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_mode(mode)
        .with_downtime_limit(Duration::from_millis(50))
        .with_max_bandwidth(Some(16 * MIB))
        .with_io_timeout(Duration::from_secs(60))
        .with_recover_timeout(Some(Duration::from_secs(20)))
}

/// A guest whose writers keep stamping pages (on the source, and on the destination after
/// the resume, where their writes fault through userfaultfd).
fn guest() -> SyntheticConfig {
    SyntheticConfig::new(64 * MIB).with_dirtying(8 * MIB, 64 * MIB)
}

type DestOutcome = Result<(SyntheticVm, DestReport), Error>;

/// Migrates `source` through `relay` to a destination listening on `ip`; `script` runs on a
/// thread of its own with the destination's control and its direct address.
fn run(
    source: &mut SyntheticVm,
    cfg: MigrationConfig,
    ip: IpAddr,
    relay: &Arc<Relay>,
    script: impl FnOnce(&MigrationControl, SocketAddr) + Send + 'static,
) -> (Result<MigrationReport, Error>, DestOutcome) {
    run_with(
        source,
        cfg,
        ip,
        relay,
        &MigrationControl::new(),
        false,
        script,
    )
}

/// [`run`] with the source driven by `control`, and with `tls` every connection in mutual TLS
/// (the test credentials).
fn run_with(
    source: &mut SyntheticVm,
    cfg: MigrationConfig,
    ip: IpAddr,
    relay: &Arc<Relay>,
    control: &MigrationControl,
    tls: bool,
    script: impl FnOnce(&MigrationControl, SocketAddr) + Send + 'static,
) -> (Result<MigrationReport, Error>, DestOutcome) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let direct = listener.local_addr().unwrap();
    relay.target(direct);
    let dest_control = MigrationControl::new();
    let (dcfg, dc) = (cfg.clone(), dest_control.clone());
    let creds = tls.then(|| TlsCreds::from_dir(channel::tls::test_creds_dir()).unwrap());
    let dest_creds = creds.clone();
    let dest = std::thread::spawn(move || {
        let l: Box<dyn ChannelListener> = match dest_creds {
            Some(c) => Box::new(TlsListener::new(listener, &c).unwrap()),
            None => Box::new(listener),
        };
        accept_with(
            &*l,
            &dcfg,
            synthetic_destination_factory(guest(), None),
            &dc,
        )
        .map(|(vm, rep)| (*vm.into_any().downcast::<SyntheticVm>().unwrap(), rep))
    });
    let script = std::thread::spawn(move || script(&dest_control, direct));
    let mut ch: Box<dyn MigrationChannel> = match &creds {
        Some(c) => Box::new(TlsChannel::tcp(relay.addr, c, None).unwrap()),
        None => Box::new(TcpChannel(relay.addr)),
    };
    let r = migrate_with(source, &mut *ch, &cfg, control, &mut |_| {});
    let d = dest.join().unwrap();
    if script.join().is_err() {
        panic!(
            "the test's script failed (see above); the source: {:?}; the destination: {:?}",
            r.as_ref().err(),
            d.as_ref().err()
        );
    }
    (r, d)
}

/// Waits until the destination runs the guest in post-copy after `recoveries` recoveries
/// (bounded generously: a debug build in the emulated SoftRoCE guest is slow to get there).
fn await_postcopy(c: &MigrationControl, recoveries: u32) {
    let t = Instant::now();
    loop {
        let p = c.progress();
        if p.phase == Phase::PostcopyActive && p.recoveries == recoveries {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120) && !p.phase.is_final(),
            "post-copy never ran after {recoveries} recoveries: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Cuts the link `times` times during post-copy, each time keeping it down for `down`;
/// prints how long after the link came back the destination's post-copy ran again.
fn cut_during_postcopy(
    relay: Arc<Relay>,
    times: u32,
    down: Duration,
) -> impl FnOnce(&MigrationControl, SocketAddr) + Send + 'static {
    move |c, _| {
        let mut back = Vec::new();
        for i in 0..times {
            await_postcopy(c, i);
            std::thread::sleep(Duration::from_millis(300));
            let p = c.progress();
            assert!(
                p.remaining_bytes > 0,
                "the cut must land in post-copy: {p:?}"
            );
            relay.set_down(true);
            relay.cut();
            std::thread::sleep(down);
            relay.set_down(false);
            let t = Instant::now();
            await_postcopy(c, i + 1);
            back.push(t.elapsed().as_secs_f64() * 1e3);
        }
        eprintln!("recovery: link back -> post-copy running again (ms): {back:.1?}");
    }
}

fn expect_recovered(
    r: Result<MigrationReport, Error>,
    d: DestOutcome,
    recoveries: u32,
    down: Duration,
) {
    let rep = r.expect("the source recovers and completes");
    assert!(rep.verified && rep.postcopy, "{rep:?}");
    assert_eq!(rep.recoveries, recoveries, "{rep:?}");
    assert_eq!(rep.recovery_pauses_ms.len(), recoveries as usize);
    let (vm, drep) = d.expect("the destination recovers and completes");
    assert_eq!(drep.recoveries, recoveries, "{drep:?}");
    assert_eq!(drep.digest, rep.digest);
    // Each end's pause runs from the failure it saw: the first to see it pauses for at least
    // as long as the link was down.
    for (s, d) in rep.recovery_pauses_ms.iter().zip(&drep.recovery_pauses_ms) {
        assert!(
            s.max(*d) >= down.as_secs_f64() * 1e3 * 0.9,
            "a pause outlasts the link's down time of {down:?}: source {s} ms, destination {d} ms"
        );
    }
    let check = vm.verify();
    assert!(
        check.ok(),
        "the destination guest's memory after the recoveries: {check:?}"
    );
    assert!(vm.running(), "the destination guest runs");
}

#[test]
fn postcopy_recovers_from_a_link_cut_once_and_twice_with_writers_on_the_destination() {
    if !uffd_ok() {
        return;
    }
    let psk = Psk::random().unwrap();
    let down = Duration::from_millis(200);
    for times in [1, 2] {
        let mut source = SyntheticVm::start(&guest()).unwrap();
        let relay = Arc::new(Relay::new(0));
        let (r, d) = run(
            &mut source,
            config(&psk, MigrationMode::Postcopy),
            [127, 0, 0, 1].into(),
            &relay,
            cut_during_postcopy(relay.clone(), times, down),
        );
        expect_recovered(r, d, times, down);
        assert!(
            !source.running(),
            "the guest moved: the source stays paused"
        );
    }
}

/// A benchmark, not a test of time (`bench/postcopy-recovery` runs it in a release build):
/// five cuts in one post-copy, each link down for 100 ms; it prints the time from the link
/// coming back to post-copy running again.
#[test]
#[ignore = "a benchmark: bench/postcopy-recovery"]
fn recovery_time() {
    if !uffd_ok() {
        return;
    }
    let psk = Psk::random().unwrap();
    let down = Duration::from_millis(100);
    let mut source = SyntheticVm::start(&guest()).unwrap();
    let relay = Arc::new(Relay::new(0));
    // 8 MiB/s: post-copy lasts about 8 s, room for five cuts.
    let cfg = config(&psk, MigrationMode::Postcopy).with_max_bandwidth(Some(8 * MIB));
    let (r, d) = run(
        &mut source,
        cfg,
        [127, 0, 0, 1].into(),
        &relay,
        cut_during_postcopy(relay.clone(), 5, down),
    );
    expect_recovered(r, d, 5, down);
}

#[test]
fn postcopy_over_tls_alone_recovers_with_a_new_tls_handshake() {
    if !uffd_ok() {
        return;
    }
    let down = Duration::from_millis(100);
    let mut source = SyntheticVm::start(&guest()).unwrap();
    let relay = Arc::new(Relay::new(0));
    // No pre-shared key: TLS alone authenticates, the first time and the reconnection.
    let (r, d) = run_with(
        &mut source,
        config(&Psk::tls_only(), MigrationMode::Postcopy),
        [127, 0, 0, 1].into(),
        &relay,
        &MigrationControl::new(),
        true,
        cut_during_postcopy(relay.clone(), 1, down),
    );
    assert!(!r.as_ref().map_or(true, |r| r.tls.is_empty()), "{r:?}");
    expect_recovered(r, d, 1, down);
}

#[test]
fn hybrid_postcopy_recovers_from_a_link_cut() {
    if !uffd_ok() {
        return;
    }
    let psk = Psk::random().unwrap();
    let down = Duration::from_millis(100);
    // A working set dirtied faster than the cap moves it: pre-copy cannot converge and the
    // hybrid migration switches to post-copy after two rounds.
    let mut source =
        SyntheticVm::start(&SyntheticConfig::new(64 * MIB).with_dirtying(32 * MIB, 256 * MIB))
            .unwrap();
    let relay = Arc::new(Relay::new(0));
    let cfg = config(&psk, MigrationMode::Hybrid)
        .with_max_rounds(2)
        .with_downtime_limit(Duration::from_micros(100));
    let (r, d) = run(
        &mut source,
        cfg,
        [127, 0, 0, 1].into(),
        &relay,
        cut_during_postcopy(relay.clone(), 1, down),
    );
    let rounds = r.as_ref().map(|r| r.rounds).unwrap_or(0);
    assert!(rounds >= 1, "pre-copy rounds ran before the switch: {r:?}");
    expect_recovered(r, d, 1, down);
}

/// A reconnection's handshake as a stranger would run it: `psk` and migration `id` of its
/// own. Returns how the destination refused it.
fn reconnect_as(addr: SocketAddr, transport: TransportKind, psk: &Psk, id: &[u8; 32]) -> Error {
    let mut ctl = Control::new(
        TcpStream::connect(addr).unwrap(),
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    let nonce = random_bytes().unwrap();
    ctl.send(&Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        transport,
        mode: MigrationMode::Postcopy.to_u8(),
        caps: caps::TCP | caps::POSTCOPY | caps::RECOVER | caps::RECONNECT | caps::ZERO_PAGES,
        streams: 2,
        qps: 1,
        max_bandwidth: 0,
        nonce,
    }))
    .unwrap();
    let ack = match ctl.recv_filtered("awaiting HelloAck", &|c| c == Command::HelloAck) {
        Ok(Message::HelloAck(ack)) => ack,
        Ok(m) => panic!("unexpected {m:?}"),
        Err(e) => return e,
    };
    ctl.send(&Message::AuthProof(psk.source_proof(&nonce, &ack.nonce)))
        .unwrap();
    ctl.send(&Message::Recover(psk.recover_proof(id, &nonce, &ack.nonce)))
        .unwrap();
    match ctl.recv_filtered("awaiting AuthOk", &|c| c == Command::AuthOk) {
        Ok(m) => panic!("a stranger's reconnection was taken: {m:?}"),
        Err(e) => e,
    }
}

/// While the link is down, strangers reach the destination at `ip` directly: one with
/// another key, one with the key but another migration's id. Both are refused and the real
/// source still recovers.
fn strangers_are_refused_and_the_source_recovers(cfg: MigrationConfig, ip: IpAddr) {
    let relay = Arc::new(Relay::new(0));
    let (key, r2, transport) = (cfg.psk.clone(), relay.clone(), cfg.transport);
    let script = move |c: &MigrationControl, direct: SocketAddr| {
        await_postcopy(c, 0);
        std::thread::sleep(Duration::from_millis(300));
        r2.set_down(true);
        r2.cut();
        let t = Instant::now();
        while c.progress().phase != Phase::PostcopyPaused {
            assert!(t.elapsed() < Duration::from_secs(10), "{:?}", c.progress());
            std::thread::sleep(Duration::from_millis(2));
        }
        let other = Psk::random().unwrap();
        let e = reconnect_as(direct, transport, &other, &[0; 32]);
        assert!(
            matches!(&e, Error::PeerAborted(a) if a.reason == "authentication failed"),
            "wrong key: {e}"
        );
        let e = reconnect_as(direct, transport, &key, &random_bytes().unwrap());
        assert!(
            matches!(&e, Error::PeerAborted(a) if a.reason == "authentication failed"),
            "another migration's id: {e}"
        );
        assert_eq!(c.progress().recoveries, 0);
        r2.set_down(false);
    };
    let mut source = SyntheticVm::start(&guest()).unwrap();
    let (r, d) = run(&mut source, cfg, ip, &relay, script);
    expect_recovered(r, d, 1, Duration::ZERO);
}

#[test]
fn reconnections_with_the_wrong_key_or_another_migration_id_are_refused_and_the_source_recovers() {
    if !uffd_ok() {
        return;
    }
    let cfg = config(&Psk::random().unwrap(), MigrationMode::Postcopy);
    strangers_are_refused_and_the_source_recovers(cfg, [127, 0, 0, 1].into());
}

#[test]
fn rdma_reconnections_with_the_wrong_key_or_another_migration_id_are_refused() {
    let Some((opts, addr)) =
        rxe("rdma_reconnections_with_the_wrong_key_or_another_migration_id_are_refused")
    else {
        return;
    };
    if !uffd_ok() {
        return;
    }
    let cfg = config(&Psk::random().unwrap(), MigrationMode::Postcopy)
        .with_transport(TransportKind::Rdma)
        .with_rdma(opts)
        .with_max_bandwidth(Some(8 * MIB));
    strangers_are_refused_and_the_source_recovers(cfg, addr);
}

#[test]
fn rdma_postcopy_with_its_control_connection_in_tls_recovers() {
    let Some((opts, addr)) = rxe("rdma_postcopy_with_its_control_connection_in_tls_recovers")
    else {
        return;
    };
    if !uffd_ok() {
        return;
    }
    let down = Duration::from_millis(100);
    let mut source = SyntheticVm::start(&guest()).unwrap();
    let relay = Arc::new(Relay::new(0));
    // TLS alone authenticates; over RDMA only the control connection is TLS.
    let cfg = config(&Psk::tls_only(), MigrationMode::Postcopy)
        .with_transport(TransportKind::Rdma)
        .with_rdma(opts)
        .with_max_bandwidth(Some(8 * MIB));
    let (r, d) = run_with(
        &mut source,
        cfg,
        addr,
        &relay,
        &MigrationControl::new(),
        true,
        cut_during_postcopy(relay.clone(), 1, down),
    );
    let rep = r.as_ref().expect("completes");
    assert_eq!(rep.transport, "rdma", "{rep:?}");
    assert!(
        !rep.tls.is_empty(),
        "the control connection is TLS: {rep:?}"
    );
    expect_recovered(r, d, 1, down);
}

#[test]
fn a_source_that_never_returns_leaves_the_destination_paused_after_the_recover_timeout() {
    if !uffd_ok() {
        return;
    }
    let psk = Psk::random().unwrap();
    let relay = Arc::new(Relay::new(0));
    let r2 = relay.clone();
    let cut_at = Arc::new(std::sync::Mutex::new(None));
    let c2 = cut_at.clone();
    let script = move |c: &MigrationControl, _: SocketAddr| {
        await_postcopy(c, 0);
        std::thread::sleep(Duration::from_millis(300));
        r2.set_down(true);
        r2.cut();
        *c2.lock().unwrap() = Some(Instant::now());
    };
    let timeout = Duration::from_millis(1500);
    let mut source = SyntheticVm::start(&guest()).unwrap();
    let cfg = config(&psk, MigrationMode::Postcopy).with_recover_timeout(Some(timeout));
    let (r, d) = run(&mut source, cfg, [127, 0, 0, 1].into(), &relay, script);
    let waited = cut_at.lock().unwrap().expect("cut").elapsed();
    assert!(
        waited >= timeout,
        "both ends waited the recover timeout: {waited:?}"
    );
    let e = r.expect_err("the source cannot complete without the destination");
    assert!(
        matches!(&e, Error::SwitchoverUnknown(c) if matches!(**c, Error::Timeout(_))),
        "{e}"
    );
    assert!(e.to_string().contains("did not take a reconnection"), "{e}");
    assert!(
        !source.running(),
        "the guest moved: the source stays paused"
    );
    let de = d
        .as_ref()
        .expect_err("the destination cannot complete without the source");
    assert!(
        de.to_string()
            .contains("the source did not reconnect within"),
        "{de}"
    );
    expect_interrupted(Err(e), d, &source);
}

#[test]
fn the_source_recovers_to_a_new_address_it_is_given() {
    if !uffd_ok() {
        return;
    }
    let psk = Psk::random().unwrap();
    let relay = Arc::new(Relay::new(0));
    let (r2, source_control) = (relay.clone(), MigrationControl::new());
    let sc = source_control.clone();
    let script = move |c: &MigrationControl, direct: SocketAddr| {
        await_postcopy(c, 0);
        std::thread::sleep(Duration::from_millis(300));
        // The old path stays down for good; the destination is reachable through another.
        r2.set_down(true);
        r2.cut();
        let other = Relay::to(direct, 0);
        sc.recover_to(other.addr.to_string());
        await_postcopy(c, 1);
        // The new path carries the rest of post-copy (the relay lives until it is done).
        while !c.progress().phase.is_final() {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut source = SyntheticVm::start(&guest()).unwrap();
    let (r, d) = run_with(
        &mut source,
        config(&psk, MigrationMode::Postcopy),
        [127, 0, 0, 1].into(),
        &relay,
        &source_control,
        false,
        script,
    );
    expect_recovered(r, d, 1, Duration::ZERO);
}

/// The source stays paused (the guest moved); the destination reports the missing pages and
/// hands back its paused guest with what arrived.
fn expect_interrupted(r: Result<MigrationReport, Error>, d: DestOutcome, source: &SyntheticVm) {
    let e = r.expect_err("the source cannot complete over a cut link");
    assert!(
        matches!(e, Error::SwitchoverUnknown(_)),
        "the guest moved: the source must stay paused: {e}"
    );
    assert!(
        !source.running(),
        "the guest moved: the source stays paused"
    );
    let de = d.expect_err("the destination cannot complete over a cut link");
    let remnant = expect_remnant(de, 64 * MIB);
    let vm = *remnant
        .release()
        .into_any()
        .downcast::<SyntheticVm>()
        .unwrap();
    assert!(!vm.running(), "the destination guest is paused");
}

#[test]
fn without_recovery_a_link_cut_leaves_the_destination_paused_with_the_missing_count() {
    if !uffd_ok() {
        return;
    }
    let psk = Psk::random().unwrap();
    let relay = Arc::new(Relay::new(0));
    let r2 = relay.clone();
    let script = move |c: &MigrationControl, _: SocketAddr| {
        await_postcopy(c, 0);
        std::thread::sleep(Duration::from_millis(300));
        r2.cut();
    };
    let mut source = SyntheticVm::start(&guest()).unwrap();
    let cfg = config(&psk, MigrationMode::Postcopy).with_recover_timeout(None);
    let (r, d) = run(&mut source, cfg, [127, 0, 0, 1].into(), &relay, script);
    expect_interrupted(r, d, &source);
}

#[test]
fn rdma_postcopy_recovers_from_a_control_link_cut() {
    let Some((opts, addr)) = rxe("rdma_postcopy_recovers_from_a_control_link_cut") else {
        return;
    };
    if !uffd_ok() {
        return;
    }
    let psk = Psk::random().unwrap();
    let down = Duration::from_millis(200);
    let mut source = SyntheticVm::start(&guest()).unwrap();
    // Over RDMA only the control connection crosses the relay: the source, seeing it fail,
    // closes its queue pairs and registration, so the destination's READs fail too; the
    // recovery registers memory again and builds new queue pairs.
    let relay = Arc::new(Relay::new(0));
    let cfg = config(&psk, MigrationMode::Postcopy)
        .with_transport(TransportKind::Rdma)
        .with_rdma(opts)
        .with_max_bandwidth(Some(8 * MIB));
    let (r, d) = run(
        &mut source,
        cfg,
        addr,
        &relay,
        cut_during_postcopy(relay.clone(), 2, down),
    );
    expect_recovered(r, d, 2, down);
}
