//! Post-copy and hybrid migrations of the synthetic VM over TCP loopback with real
//! userfaultfd: writers run on the destination while pages are still on the source (their
//! writes, and `verify()`, fault through userfaultfd), the digest and the guest's own check
//! must pass, a hybrid run on a workload pre-copy cannot converge on must finish in
//! post-copy, and (over RDMA) a link cut during post-copy without recovery must leave the
//! destination paused with an error that counts the missing pages (recovery.rs: over TCP, and
//! the recoveries). Skipped, with the reason, where userfaultfd is unavailable.

mod support;

use rdmig_transport::require::{skip, Capability};
use std::sync::Arc;
use std::time::Duration;

use rdmig_transport::auth::Psk;
use rdmig_transport::digest::full_digest;
use rdmig_transport::session::{MigrationConfig, MigrationMode, MigrationReport};
use rdmig_transport::wire::TransportKind;
use rdmig_transport::Error;
use rdmig_vmm::synthetic::{SyntheticConfig, SyntheticVm};

use support::interrupted::expect_remnant;
use support::relay::Relay;
use support::rxe::rxe;
use support::synthetic::{run_at, DestOutcome};
use support::uffd::uffd_ok;

const MIB: u64 = 1 << 20;

fn config(psk: &Psk, mode: MigrationMode) -> MigrationConfig {
    MigrationConfig::new(psk.clone())
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_mode(mode)
        .with_downtime_limit(Duration::from_millis(50))
        .with_io_timeout(Duration::from_secs(30))
}

fn run_via(
    source: &mut SyntheticVm,
    dest_cfg: SyntheticConfig,
    cfg: MigrationConfig,
    relay: Option<&Relay>,
) -> (Result<MigrationReport, Error>, DestOutcome) {
    run_at(source, dest_cfg, cfg, [127, 0, 0, 1].into(), relay)
}

fn run(
    source: &mut SyntheticVm,
    dest_cfg: SyntheticConfig,
    cfg: MigrationConfig,
) -> (Result<MigrationReport, Error>, DestOutcome) {
    run_via(source, dest_cfg, cfg, None)
}

#[test]
fn postcopy_with_writers_on_the_destination() {
    if !uffd_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(64 * MIB).with_dirtying(16 * MIB, 256 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (r, d) = run(
        &mut source,
        cfg.clone(),
        config(&psk, MigrationMode::Postcopy),
    );
    let rep = r.unwrap();
    let (dest, drep) = d.unwrap();
    let pages = cfg.mem_bytes / 4096;
    assert!(rep.verified && rep.postcopy, "{rep:?}");
    assert_eq!(
        (rep.mode.as_str(), rep.rounds, rep.postcopy_pages),
        ("postcopy", 0, pages)
    );
    assert!(
        rep.postcopy_faults > 0,
        "the destination writers must have faulted on remote pages"
    );
    assert!(rep.fault_latency_us.p50 > 0.0 && rep.fault_latency_us.max >= rep.fault_latency_us.p99);
    assert_eq!(drep.postcopy_pages, pages);
    assert!(!source.running());
    let c = dest.verify();
    assert!(
        c.ok() && c.pages_checked + c.pages_skipped == pages,
        "{c:?}"
    );
    assert!(
        dest.pages_written() > source.pages_written(),
        "the guest runs on the destination"
    );
    eprintln!(
        "postcopy 64 MiB: downtime {:.3} ms, {} faults, p50 {:.1} µs, post-copy {:.1} ms",
        rep.downtime_ms, rep.postcopy_faults, rep.fault_latency_us.p50, rep.postcopy_ms
    );
}

#[test]
fn postcopy_of_an_idle_vm_copies_memory_exactly() {
    if !uffd_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(32 * MIB).with_regions(3);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let (r, d) = run(
        &mut source,
        cfg.clone(),
        config(&psk, MigrationMode::Postcopy),
    );
    let rep = r.unwrap();
    let (dest, _) = d.unwrap();
    assert!(rep.verified && rep.postcopy);
    assert_eq!(
        full_digest(source.memory_map()),
        full_digest(dest.memory_map())
    );
    assert!(dest.verify().ok());
}

#[test]
fn hybrid_finishes_in_postcopy_when_precopy_cannot_converge() {
    if !uffd_ok() {
        return;
    }
    // 64 MiB written at 2 GiB/s cannot fit a 1 ms downtime.
    let cfg = SyntheticConfig::new(128 * MIB).with_dirtying(64 * MIB, 2048 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let mcfg = config(&psk, MigrationMode::Hybrid)
        .with_downtime_limit(Duration::from_millis(1))
        .with_max_rounds(3);
    let (r, d) = run(&mut source, cfg.clone(), mcfg);
    let rep = r.unwrap();
    let (dest, _) = d.unwrap();
    assert!(
        rep.verified && rep.postcopy && rep.mode == "hybrid",
        "{rep:?}"
    );
    assert!(rep.rounds >= 1 && rep.rounds <= 3, "{} rounds", rep.rounds);
    assert!(
        rep.postcopy_pages > 0 && rep.postcopy_pages < cfg.mem_bytes / 4096,
        "{} pages",
        rep.postcopy_pages
    );
    let c = dest.verify();
    assert!(c.ok(), "{c:?}");
    eprintln!(
        "hybrid: {} rounds, downtime {:.3} ms, {} pages in post-copy",
        rep.rounds, rep.downtime_ms, rep.postcopy_pages
    );
}

#[test]
fn hybrid_that_converges_stays_precopy() {
    if !uffd_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(32 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let (r, d) = run(
        &mut source,
        cfg.clone(),
        config(&psk, MigrationMode::Hybrid),
    );
    let rep = r.unwrap();
    assert!(rep.verified && !rep.postcopy && rep.mode == "hybrid");
    assert!(d.unwrap().0.verify().ok());
}

/// The outcome of a link cut during post-copy: the source stays paused (the guest moved), the
/// destination reports the missing pages and hands back its paused guest with what arrived.
fn expect_interrupted(
    r: Result<MigrationReport, Error>,
    d: DestOutcome,
    source: &SyntheticVm,
    cfg: &SyntheticConfig,
) {
    let e = r.expect_err("the source cannot complete over a cut link");
    assert!(
        matches!(e, Error::SwitchoverUnknown(_)),
        "the guest moved: the source must stay paused: {e}"
    );
    assert!(
        !source.running(),
        "the source must not resume a guest that runs on the destination"
    );
    let Err(de) = d else {
        panic!("the destination cannot complete over a cut link")
    };
    // The destination kept the paused guest and what arrived.
    let remnant = expect_remnant(de, cfg.mem_bytes);
    let vm = *remnant
        .release()
        .into_any()
        .downcast::<SyntheticVm>()
        .expect("a synthetic VM");
    assert!(!vm.running(), "the destination guest is paused");
}

#[test]
fn postcopy_with_64k_pages_and_regions() {
    if !uffd_ok() {
        return;
    }
    let page = rdmig_transport::mem::PageSize::new(65536).unwrap();
    let cfg = SyntheticConfig::new(48 * MIB)
        .with_dirtying(8 * MIB, 256 * MIB)
        .with_page_size(page)
        .with_regions(3);
    let psk = Psk::random().unwrap();
    for mode in [MigrationMode::Postcopy, MigrationMode::Hybrid] {
        let mut source = SyntheticVm::start(&cfg).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let mcfg = config(&psk, mode)
            .with_downtime_limit(Duration::from_micros(200))
            .with_max_rounds(2);
        let (r, d) = run(&mut source, cfg.clone(), mcfg);
        let rep = r.unwrap();
        let (dest, _) = d.unwrap();
        assert!(rep.verified && rep.postcopy, "{mode:?}: {rep:?}");
        let c = dest.verify();
        assert!(
            c.ok() && c.pages_checked + c.pages_skipped == cfg.mem_bytes / 65536,
            "{mode:?}: {c:?}"
        );
    }
}

// ---- over RDMA (SoftRoCE in ci/test-rdma): faults and prefetches are READs ----------------

#[test]
fn rdma_postcopy_with_writers_on_the_destination() {
    let Some((opts, addr)) = rxe("rdma_postcopy_with_writers_on_the_destination") else {
        return;
    };
    if !uffd_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(64 * MIB).with_dirtying(8 * MIB, 64 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mcfg = config(&psk, MigrationMode::Postcopy)
        .with_transport(TransportKind::Rdma)
        .with_rdma(opts);
    let (r, d) = run_at(&mut source, cfg.clone(), mcfg, addr, None);
    let rep = r.unwrap();
    let (dest, drep) = d.unwrap();
    let pages = cfg.mem_bytes / 4096;
    assert_eq!(
        (rep.transport.as_str(), drep.transport.as_str()),
        ("rdma", "rdma")
    );
    assert!(rep.verified && rep.postcopy, "{rep:?}");
    assert_eq!((rep.rounds, rep.postcopy_pages), (0, pages));
    assert!(
        rep.postcopy_faults > 0,
        "the destination writers must have faulted on remote pages"
    );
    assert!(!source.running());
    let c = dest.verify();
    assert!(
        c.ok() && c.pages_checked + c.pages_skipped == pages,
        "{c:?}"
    );
    assert!(
        dest.pages_written() > source.pages_written(),
        "the guest runs on the destination"
    );
    eprintln!(
        "rdma postcopy 64 MiB: downtime {:.3} ms, {} faults, p50 {:.1} µs, p99 {:.1} µs, post-copy {:.1} ms",
        rep.downtime_ms,
        rep.postcopy_faults,
        rep.fault_latency_us.p50,
        rep.fault_latency_us.p99,
        rep.postcopy_ms
    );
}

#[test]
fn rdma_postcopy_of_an_idle_vm_with_64k_pages_copies_memory_exactly() {
    let Some((opts, addr)) =
        rxe("rdma_postcopy_of_an_idle_vm_with_64k_pages_copies_memory_exactly")
    else {
        return;
    };
    if !uffd_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(32 * MIB)
        .with_regions(3)
        .with_page_size(rdmig_transport::mem::PageSize::new(65536).unwrap());
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let mcfg = config(&psk, MigrationMode::Postcopy)
        .with_transport(TransportKind::Rdma)
        .with_rdma(opts);
    let (r, d) = run_at(&mut source, cfg.clone(), mcfg, addr, None);
    let rep = r.unwrap();
    let (dest, _) = d.unwrap();
    assert!(
        rep.verified && rep.postcopy && rep.transport == "rdma",
        "{rep:?}"
    );
    assert_eq!(
        full_digest(source.memory_map()),
        full_digest(dest.memory_map())
    );
    assert!(dest.verify().ok());
}

#[test]
fn rdma_hybrid_finishes_in_postcopy_when_precopy_cannot_converge() {
    let Some((opts, addr)) = rxe("rdma_hybrid_finishes_in_postcopy_when_precopy_cannot_converge")
    else {
        return;
    };
    if !uffd_ok() {
        return;
    }
    // 32 MiB written at 1 GiB/s cannot fit a 1 ms downtime on SoftRoCE.
    let cfg = SyntheticConfig::new(64 * MIB).with_dirtying(32 * MIB, 1024 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let mcfg = config(&psk, MigrationMode::Hybrid)
        .with_transport(TransportKind::Rdma)
        .with_rdma(opts)
        .with_downtime_limit(Duration::from_millis(1))
        .with_max_rounds(2);
    let (r, d) = run_at(&mut source, cfg.clone(), mcfg, addr, None);
    let rep = r.unwrap();
    let (dest, _) = d.unwrap();
    assert!(
        rep.verified && rep.postcopy && rep.mode == "hybrid" && rep.transport == "rdma",
        "{rep:?}"
    );
    assert!(rep.rounds >= 1, "{} rounds", rep.rounds);
    assert!(rep.postcopy_pages > 0 && rep.postcopy_pages < cfg.mem_bytes / 4096);
    let c = dest.verify();
    assert!(c.ok(), "{c:?}");
    eprintln!(
        "rdma hybrid: {} rounds, downtime {:.3} ms, {} pages in post-copy",
        rep.rounds, rep.downtime_ms, rep.postcopy_pages
    );
}

#[test]
fn rdma_link_cut_during_postcopy_pauses_the_destination_and_counts_missing_pages() {
    let Some((opts, addr)) =
        rxe("rdma_link_cut_during_postcopy_pauses_the_destination_and_counts_missing_pages")
    else {
        return;
    };
    if !uffd_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(64 * MIB).with_dirtying(8 * MIB, 32 * MIB);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    // Prefetch paced at 8 MiB/s: 64 MiB take seconds; the control link is cut 1.5 s in.
    let relay = Arc::new(Relay::new(64 * MIB));
    let cutter = relay.cut_after(Duration::from_millis(1500));
    let mcfg = config(&psk, MigrationMode::Postcopy)
        .with_transport(TransportKind::Rdma)
        .with_rdma(opts)
        .with_max_bandwidth(Some(8 * MIB))
        .with_recover_timeout(None);
    let (r, d) = run_at(&mut source, cfg.clone(), mcfg, addr, Some(&relay));
    cutter.join().unwrap();
    expect_interrupted(r, d, &source, &cfg);
}

// ---- zero-copy: memfd guest memory, pages fetched into a second mapping, UFFDIO_CONTINUE ----

fn minor_ok() -> bool {
    if !rdmig_transport::postcopy::Uffd::minor_supported() {
        let test = std::thread::current()
            .name()
            .unwrap_or("post-copy")
            .to_string();
        skip(
            Capability::UffdMinor,
            &test,
            "userfaultfd minor faults on shmem (memfd) unavailable",
        );
        return false;
    }
    true
}

#[test]
fn zero_copy_postcopy_of_memfd_memory_with_writers_on_the_destination() {
    if !uffd_ok() || !minor_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(64 * MIB)
        .with_dirtying(16 * MIB, 256 * MIB)
        .with_memfd(true);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (r, d) = run(
        &mut source,
        cfg.clone(),
        config(&psk, MigrationMode::Postcopy),
    );
    let rep = r.unwrap();
    let (dest, drep) = d.unwrap();
    let pages = cfg.mem_bytes / 4096;
    assert!(
        rep.verified && rep.postcopy && rep.postcopy_pages == pages,
        "{rep:?}"
    );
    assert!(
        drep.postcopy_zero_copy,
        "memfd memory is installed in place"
    );
    assert!(
        rep.postcopy_faults > 0,
        "the destination writers fault on remote pages"
    );
    let c = dest.verify();
    assert!(
        c.ok() && c.pages_checked + c.pages_skipped == pages,
        "{c:?}"
    );
    assert!(dest.pages_written() > source.pages_written());
}

#[test]
fn zero_copy_hybrid_of_memfd_memory_with_64k_pages() {
    if !uffd_ok() || !minor_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(128 * MIB)
        .with_dirtying(64 * MIB, 2048 * MIB)
        .with_regions(3)
        .with_page_size(rdmig_transport::mem::PageSize::new(65536).unwrap())
        .with_memfd(true);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let mcfg = config(&psk, MigrationMode::Hybrid)
        .with_downtime_limit(Duration::from_millis(1))
        .with_max_rounds(3);
    let (r, d) = run(&mut source, cfg.clone(), mcfg);
    let rep = r.unwrap();
    let (dest, drep) = d.unwrap();
    assert!(rep.verified && rep.postcopy && rep.rounds >= 1, "{rep:?}");
    assert!(drep.postcopy_zero_copy);
    let c = dest.verify();
    assert!(c.ok(), "{c:?}");
}

#[test]
fn rdma_zero_copy_postcopy_of_memfd_memory() {
    let Some((opts, addr)) = rxe("rdma_zero_copy_postcopy_of_memfd_memory") else {
        return;
    };
    if !uffd_ok() || !minor_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(64 * MIB)
        .with_dirtying(8 * MIB, 64 * MIB)
        .with_memfd(true);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mcfg = config(&psk, MigrationMode::Postcopy)
        .with_transport(TransportKind::Rdma)
        .with_rdma(opts);
    let (r, d) = run_at(&mut source, cfg.clone(), mcfg, addr, None);
    let rep = r.unwrap();
    let (dest, drep) = d.unwrap();
    let pages = cfg.mem_bytes / 4096;
    assert!(
        rep.verified && rep.postcopy && rep.transport == "rdma",
        "{rep:?}"
    );
    assert!(
        drep.postcopy_zero_copy,
        "READs land in the memfd's second mapping"
    );
    assert!(rep.postcopy_faults > 0);
    let c = dest.verify();
    assert!(
        c.ok() && c.pages_checked + c.pages_skipped == pages,
        "{c:?}"
    );
    eprintln!(
        "rdma zero-copy postcopy 64 MiB: downtime {:.3} ms, {} faults, p50 {:.1} µs, post-copy {:.1} ms",
        rep.downtime_ms, rep.postcopy_faults, rep.fault_latency_us.p50, rep.postcopy_ms
    );
}

#[test]
fn rdma_zero_copy_hybrid_of_memfd_memory() {
    let Some((opts, addr)) = rxe("rdma_zero_copy_hybrid_of_memfd_memory") else {
        return;
    };
    if !uffd_ok() || !minor_ok() {
        return;
    }
    let cfg = SyntheticConfig::new(64 * MIB)
        .with_dirtying(32 * MIB, 1024 * MIB)
        .with_memfd(true);
    let psk = Psk::random().unwrap();
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let mcfg = config(&psk, MigrationMode::Hybrid)
        .with_transport(TransportKind::Rdma)
        .with_rdma(opts)
        .with_downtime_limit(Duration::from_millis(1))
        .with_max_rounds(2);
    let (r, d) = run_at(&mut source, cfg.clone(), mcfg, addr, None);
    let rep = r.unwrap();
    let (dest, drep) = d.unwrap();
    assert!(
        rep.verified && rep.postcopy && rep.transport == "rdma",
        "{rep:?}"
    );
    assert!(drep.postcopy_zero_copy);
    assert!(dest.verify().ok());
}
