//! RDMA data-path tests. They need a RoCE device: `ci/softroce-run` boots a guest with a
//! SoftRoCE device `rxe0` and sets `RDMIG_RXE_DEV`, `RDMIG_RXE_ADDR`, `RDMIG_RXE_GID_INDEX`.
//! Without those every RDMA test prints a SKIP line and returns; the `auto` test then checks
//! that `auto` falls back to TCP.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdmig_transport::auth::Psk;
use rdmig_transport::mem::{GuestAddress, GuestMemoryMap, MmapBacking, MmapRegion, PageSize};
use rdmig_transport::pages::PageSet;
use rdmig_transport::rdma::{RKey, RdmaOptions, RdmaSourcePath, Read, ReadEngine};
use rdmig_transport::require::{skip, Capability};
use rdmig_transport::session::{accept, migrate, MigrationConfig};
use rdmig_transport::vm::{MemoryLayout, SourceVm};
use rdmig_transport::wire::TransportKind;
use rdmig_transport::{Error, VmmError};

mod rdma_vm;

use rdma_vm::*;

/// The SoftRoCE environment, or `None` (after printing why the test skips).
fn rxe(test: &str) -> Option<(RdmaOptions, IpAddr)> {
    let Some(dev) = std::env::var("RDMIG_RXE_DEV").ok() else {
        skip(
            Capability::Rdma,
            test,
            "no RDMA device (RDMIG_RXE_DEV, RDMIG_RXE_ADDR are set by ci/softroce-run)",
        );
        return None;
    };
    let addr: IpAddr = std::env::var("RDMIG_RXE_ADDR")
        .expect("RDMIG_RXE_ADDR with RDMIG_RXE_DEV")
        .parse()
        .expect("RDMIG_RXE_ADDR");
    let gid_index = std::env::var("RDMIG_RXE_GID_INDEX")
        .ok()
        .and_then(|g| g.parse().ok());
    Some((
        RdmaOptions {
            device: Some(dev),
            gid_index,
            port: None,
            qps: 2,
            local_addr: Some(addr),
        },
        addr,
    ))
}

fn config(transport: TransportKind, rdma: Option<&RdmaOptions>) -> MigrationConfig {
    let mut c = MigrationConfig::new(Psk::new(b"rdma-test-key-0123456789abcdef".to_vec()).unwrap())
        .with_transport(transport)
        .with_downtime_limit(Duration::from_millis(2000))
        .with_max_rounds(8);
    c.io_timeout = Duration::from_secs(60);
    if let Some(o) = rdma {
        c.rdma = o.clone();
    }
    c
}

/// One loopback migration; returns the source's report after comparing memories.
fn loopback(
    addr: IpAddr,
    transport: TransportKind,
    rdma: Option<&RdmaOptions>,
    bytes: u64,
    rate: u64,
) -> rdmig_transport::session::MigrationReport {
    let listener = TcpListener::bind(SocketAddr::new(addr, 0)).unwrap();
    let dest_addr = listener.local_addr().unwrap();
    let dconf = config(TransportKind::Auto, rdma);
    let dest = std::thread::spawn(move || accept(&listener, &dconf, dest_factory()));
    let mut vm = TestVm::new(bytes, rate);
    std::thread::sleep(Duration::from_millis(50));
    let sconf = config(transport, rdma);
    let report = migrate(&mut vm, dest_addr, &sconf, &mut |r| {
        eprintln!(
            "round {} final={} pages={} {:.1} MiB/s dirty={}",
            r.round, r.final_round, r.pages, r.mib_s, r.dirty_pages
        )
    })
    .expect("migration");
    let (dvm, dreport) = dest.join().unwrap().expect("destination");
    assert!(report.verified, "digest mismatch: {report:?}");
    assert_eq!(report.transport, dreport.transport);
    // The source is paused after a successful migration: memories must be identical.
    assert!(vm.shared.paused.load(Ordering::SeqCst));
    let (a, b) = (region_bytes(&vm.map), region_bytes(dvm.memory()));
    if a != b {
        let first = a
            .chunks(PAGE as usize)
            .zip(b.chunks(PAGE as usize))
            .position(|(x, y)| x != y);
        panic!("destination memory differs from the source (first differing page {first:?})");
    }
    eprintln!(
        "{} migration of {} MiB: {} rounds, {:.1} MiB/s, source CPU {:.1} ms, destination CPU {:.1} ms, writes during it {}",
        report.transport,
        bytes >> 20,
        report.rounds,
        report.throughput_mib_s,
        report.source_cpu_ms,
        report.dest_cpu_ms,
        vm.shared.writes.load(Ordering::Relaxed)
    );
    report
}

#[test]
fn rdma_loopback_migration_with_writers() {
    let Some((opts, addr)) = rxe("rdma_loopback_migration_with_writers") else {
        return;
    };
    let report = loopback(addr, TransportKind::Rdma, Some(&opts), 32 << 20, 2000);
    assert_eq!(report.transport, "rdma");
    assert!(
        report.rounds >= 2,
        "writers ran, so more than one round: {report:?}"
    );
}

#[test]
fn rdma_loopback_single_qp_idle() {
    let Some((mut opts, addr)) = rxe("rdma_loopback_single_qp_idle") else {
        return;
    };
    opts.qps = 1;
    let report = loopback(addr, TransportKind::Rdma, Some(&opts), 8 << 20, 1);
    assert_eq!(report.transport, "rdma");
}

#[test]
fn auto_picks_rdma_with_a_device_and_tcp_without() {
    match rxe("auto_picks_rdma_with_a_device_and_tcp_without (RDMA half)") {
        Some((_, addr)) => {
            // No device options at all: discovery must find rxe0 and its RoCE v2 GID.
            let opts = RdmaOptions {
                qps: 2,
                ..RdmaOptions::default()
            };
            let report = loopback(addr, TransportKind::Auto, Some(&opts), 8 << 20, 500);
            assert_eq!(report.transport, "rdma", "{}", report.transport_reason);
        }
        None => {
            let why = rdmig_transport::rdma::probe(&RdmaOptions::default()).unwrap_err();
            eprintln!("probe on this host: {why}");
            let report = loopback(
                "127.0.0.1".parse().unwrap(),
                TransportKind::Auto,
                None,
                8 << 20,
                500,
            );
            assert_eq!(report.transport, "tcp");
            assert!(
                report.transport_reason.contains("RDMA"),
                "{}",
                report.transport_reason
            );
        }
    }
}

#[test]
fn rdma_requested_without_a_device_fails_at_once() {
    if std::env::var_os("RDMIG_RXE_DEV").is_some() {
        eprintln!(
            "SKIP: rdma_requested_without_a_device_fails_at_once: this host has an RDMA device"
        );
        return;
    }
    let mut vm = TestVm::new(1 << 20, 1);
    let e = migrate(
        &mut vm,
        "127.0.0.1:9".parse().unwrap(),
        &config(TransportKind::Rdma, None),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(e, Error::RdmaUnavailable(_)), "{e}");
    assert!(!vm.shared.paused.load(Ordering::SeqCst));
}

// ---- engine-level: keys, bounds, deregistration ---------------------------------------------

struct Pair {
    src: RdmaSourcePath,
    engine: ReadEngine,
    src_map: GuestMemoryMap,
    dst_map: GuestMemoryMap,
    _mems: (MmapRegion, MmapRegion),
}

fn pair(opts: &RdmaOptions, bytes: u64) -> Pair {
    let a = MmapRegion::new(bytes, MmapBacking::Anonymous, true).unwrap();
    let b = MmapRegion::new(bytes, MmapBacking::Anonymous, true).unwrap();
    for i in 0..bytes as usize {
        // SAFETY: inside the mapping.
        unsafe { *a.as_ptr().add(i) = (i % 251) as u8 };
    }
    // SAFETY: the mappings live in the Pair, dropped after the paths (field order).
    let (ra, rb) = unsafe {
        (
            a.guest_region(GuestAddress(0)),
            b.guest_region(GuestAddress(0)),
        )
    };
    let src_map = GuestMemoryMap::new(vec![ra], PageSize::KIB4).unwrap();
    let dst_map = GuestMemoryMap::new(vec![rb], PageSize::KIB4).unwrap();
    let (mut src, setup) = RdmaSourcePath::new(&src_map, opts).unwrap();
    let (mut engine, ack) = ReadEngine::new(&dst_map, opts, &setup).unwrap();
    engine.set_stall_timeout(Duration::from_secs(30));
    src.connect(&ack).unwrap();
    Pair {
        src,
        engine,
        src_map,
        dst_map,
        _mems: (a, b),
    }
}

fn read0(len: u32) -> Read {
    Read {
        region: rdmig_transport::mem::RegionId(0),
        offset: 0,
        len,
        tag: 7,
    }
}

#[test]
fn rdma_engine_reads_and_rejects_bad_keys_and_ranges() {
    let Some((opts, _)) = rxe("rdma_engine_reads_and_rejects_bad_keys_and_ranges") else {
        return;
    };
    let len = 1 << 20;

    // A good READ lands the bytes.
    let mut p = pair(&opts, len);
    let mut q = std::collections::VecDeque::from(vec![Read {
        region: rdmig_transport::mem::RegionId(0),
        offset: 0,
        len: len as u32,
        tag: 1,
    }]);
    assert_eq!(p.engine.post(&mut q).unwrap(), 1);
    let mut done = Vec::new();
    p.engine.wait_all(&mut done).unwrap();
    assert_eq!(done, vec![1]);
    assert_eq!(region_bytes(&p.src_map), region_bytes(&p.dst_map));

    // Locally out of bounds: refused before posting.
    let bad = Read {
        region: rdmig_transport::mem::RegionId(0),
        offset: len - 4096,
        len: 8192,
        tag: 2,
    };
    let e = p
        .engine
        .post(&mut std::collections::VecDeque::from(vec![bad]))
        .unwrap_err();
    assert!(matches!(e, Error::Rdma(_)), "{e}");
    let e = p
        .engine
        .post(&mut std::collections::VecDeque::from(vec![Read {
            region: rdmig_transport::mem::RegionId(3),
            ..read0(4096)
        }]))
        .unwrap_err();
    assert!(e.to_string().contains("region 3"), "{e}");

    // A wrong rkey: the source's device refuses it.
    let remote = p.engine.remote_regions()[0];
    p.engine
        .post_to(read0(4096), remote.addr, RKey(remote.rkey.0 ^ 0x5a5a_0000))
        .unwrap();
    let e = p.engine.wait_all(&mut done).unwrap_err();
    eprintln!("wrong rkey: {e}");
    assert!(
        matches!(&e, Error::Rdma(m) if m.contains("remote access")),
        "{e}"
    );
    // The engine stays failed.
    assert!(p
        .engine
        .post(&mut std::collections::VecDeque::from(vec![read0(4096)]))
        .is_err());
    drop(p);

    // A READ past the end of the registered region, with the right key.
    let mut p = pair(&opts, len);
    let remote = p.engine.remote_regions()[0];
    p.engine
        .post_to(read0(4096), remote.addr + remote.len - 2048, remote.rkey)
        .unwrap();
    let e = p.engine.wait_all(&mut done).unwrap_err();
    eprintln!("outside the region: {e}");
    assert!(
        matches!(&e, Error::Rdma(m) if m.contains("remote access")),
        "{e}"
    );
}

#[test]
fn rdma_deregistration_kills_the_keys() {
    let Some((opts, _)) = rxe("rdma_deregistration_kills_the_keys") else {
        return;
    };
    let mut p = pair(&opts, 1 << 20);
    let remote = p.engine.remote_regions()[0];
    assert_eq!(p.src.rkeys(), vec![remote.rkey]);
    let mut done = Vec::new();
    p.engine
        .post_to(read0(4096), remote.addr, remote.rkey)
        .unwrap();
    p.engine.wait_all(&mut done).unwrap();
    // Deregistered, QPs still up: the old key is refused by the device.
    p.src.deregister_memory();
    assert!(!p.src.is_open());
    p.engine
        .post_to(read0(4096), remote.addr, remote.rkey)
        .unwrap();
    let e = p.engine.wait_all(&mut done).unwrap_err();
    eprintln!("old key after deregistration: {e}");
    assert!(
        matches!(&e, Error::Rdma(m) if m.contains("remote access")),
        "{e}"
    );

    // After a full close (what the driver does), a READ fails too.
    let mut p = pair(&opts, 1 << 20);
    let remote = p.engine.remote_regions()[0];
    // With the source's QPs gone nothing answers: retries run out, or the stall timeout hits.
    p.engine.set_stall_timeout(Duration::from_secs(5));
    rdmig_transport::data::SourceDataPath::close(&mut p.src).unwrap();
    p.engine
        .post_to(read0(4096), remote.addr, remote.rkey)
        .unwrap();
    let t = Instant::now();
    let e = p.engine.wait_all(&mut done).unwrap_err();
    eprintln!("after close ({:?}): {e}", t.elapsed());
    assert!(matches!(e, Error::Rdma(_) | Error::Timeout(_)), "{e}");
}

/// Bytes this process has pinned (`VmPin`), as the kernel counts them against RLIMIT_MEMLOCK.
fn pinned_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmPin:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn rdma_postcopy_engines_share_one_registration() {
    if rxe("rdma_postcopy_engines_share_one_registration").is_none() {
        return;
    }
    // VmPin counts the whole process: measure in a child of its own, alone, so that other
    // tests' registrations running in parallel cannot change the count.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_shared_registration",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RDMIG_TEST_ROLE", "shared-registration")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "the child failed: {text}");
    assert!(
        text.contains("pinned by the split"),
        "the child did not run: {text}"
    );
}

/// Helper run as a child process by `rdma_postcopy_engines_share_one_registration`.
#[test]
fn child_shared_registration() {
    if std::env::var("RDMIG_TEST_ROLE").as_deref() != Ok("shared-registration") {
        return;
    }
    let (mut opts, _) = rxe("child_shared_registration").expect("child needs RDMA");
    // One bulk QP and three post-copy engines landing in the same memory (as the fetchers of
    // zero-copy post-copy land in the guest's second mapping), plus one with a buffer of its own.
    opts.qps = 5;
    let len: u64 = 8 << 20;
    let src = MmapRegion::new(len, MmapBacking::Anonymous, true).unwrap();
    let dst = MmapRegion::new(len, MmapBacking::Anonymous, true).unwrap();
    let shared = MmapRegion::new(len, MmapBacking::Anonymous, true).unwrap();
    let own = MmapRegion::new(1 << 20, MmapBacking::Anonymous, true).unwrap();
    for i in 0..len as usize {
        // SAFETY: inside the mapping.
        unsafe { *src.as_ptr().add(i) = (i % 241) as u8 };
    }
    let map = |m: &MmapRegion| {
        // SAFETY: every mapping outlives the engines (dropped at the end of the test).
        let r = unsafe { m.guest_region(GuestAddress(0)) };
        GuestMemoryMap::new(vec![r], PageSize::KIB4).unwrap()
    };
    let (src_map, dst_map, shared_map, own_map) = (map(&src), map(&dst), map(&shared), map(&own));
    let (mut source, setup) = RdmaSourcePath::new(&src_map, &opts).unwrap();
    let before = pinned_bytes();
    let staging = vec![
        shared_map.clone(),
        shared_map.clone(),
        shared_map.clone(),
        own_map.clone(),
    ];
    let (bulk, mut engines, ack) =
        ReadEngine::new_split(&dst_map, &opts, &setup, staging, None).unwrap();
    source.connect(&ack).unwrap();
    let pinned = pinned_bytes() - before;
    eprintln!("pinned by the split: {pinned} bytes");
    // The bulk map once, the shared staging once, the own buffer once.
    assert_eq!(
        pinned,
        2 * len + (1 << 20),
        "the shared staging is pinned once"
    );
    assert!(bulk.is_some());
    assert_eq!(engines.len(), 4);

    // Each sharing engine READs its own quarter; dropping one keeps the others' keys valid.
    let remote = engines[0].remote_regions()[0];
    let quarter = len / 4;
    let mut done = Vec::new();
    let first = engines.remove(0);
    drop(first);
    for (i, e) in engines.iter_mut().take(2).enumerate() {
        let off = (i as u64 + 1) * quarter;
        for k in (0..quarter).step_by(1 << 20) {
            let read = Read {
                region: rdmig_transport::mem::RegionId(0),
                offset: off + k,
                len: 1 << 20,
                tag: k,
            };
            e.post_to(read, remote.addr + off + k, remote.rkey).unwrap();
        }
        e.wait_all(&mut done).unwrap();
    }
    let (s, d) = (region_bytes(&src_map), region_bytes(&shared_map));
    let (lo, hi) = (quarter as usize, 3 * quarter as usize);
    assert!(
        s[lo..hi] == d[lo..hi],
        "the READs landed in the shared memory"
    );
    drop(engines);
    drop(bulk);
    assert_eq!(
        pinned_bytes(),
        before,
        "everything unpinned with the last engine"
    );
}

// ---- a destination killed mid-round --------------------------------------------------------

/// Helper run as a child process by `rdma_destination_killed_mid_round`; does nothing otherwise.
#[test]
fn child_destination() {
    if std::env::var("RDMIG_TEST_ROLE").as_deref() != Ok("dest") {
        return;
    }
    let (opts, addr) = rxe("child_destination").expect("child needs RDMA");
    let listener = TcpListener::bind(SocketAddr::new(addr, 0)).unwrap();
    println!("PORT={}", listener.local_addr().unwrap().port());
    let _ = accept(
        &listener,
        &config(TransportKind::Auto, Some(&opts)),
        dest_factory(),
    );
}

#[test]
fn rdma_destination_killed_mid_round() {
    let Some((opts, addr)) = rxe("rdma_destination_killed_mid_round") else {
        return;
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_destination",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RDMIG_TEST_ROLE", "dest")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // The harness prints "test child_destination ... " before the line, without a newline.
        if let Some(p) = line.split("PORT=").nth(1) {
            port = Some(p.trim().parse::<u16>().unwrap());
            break;
        }
    }
    let dest = SocketAddr::new(addr, port.expect("child printed its port"));
    let mut vm = TestVm::new(64 << 20, 2000);
    let child_id = child.id();
    let killed = Arc::new(AtomicBool::new(false));
    let k = killed.clone();
    // Kill the destination while round 0 (64 MiB, over a second on SoftRoCE) is being read.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        // SAFETY: plain kill(2) of our own child process, by its id.
        unsafe { libc::kill(child_id as i32, libc::SIGKILL) };
        k.store(true, Ordering::SeqCst);
    });
    let t = Instant::now();
    let mut rounds_done = 0;
    let r = migrate(
        &mut vm,
        dest,
        &config(TransportKind::Rdma, Some(&opts)),
        &mut |_| rounds_done += 1,
    );
    killer.join().unwrap();
    let _ = child.wait();
    let e = r.expect_err("the destination was killed");
    eprintln!(
        "source after the destination died ({:?}, {rounds_done} rounds done): {e}",
        t.elapsed()
    );
    assert!(killed.load(Ordering::SeqCst));
    // The VM runs on: not paused, the writer keeps writing, memory is intact.
    assert!(!vm.shared.paused.load(Ordering::SeqCst));
    let w = vm.shared.writes.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        vm.shared.writes.load(Ordering::Relaxed) > w,
        "the source VM must keep running"
    );
    vm.check_intact();
}

// ---- benchmark hook -------------------------------------------------------------------------

/// An idle loopback migration of `RDMIG_BENCH_MIGRATE_MIB` MiB over RDMA, for
/// `bench/rdma-vs-perftest` (until `rdma-bench migrate` exists). Prints
/// `MIGRATION_MIB_S=<throughput>`; skips unless the variable is set.
#[test]
fn bench_idle_rdma_migration() {
    let Ok(mib) = std::env::var("RDMIG_BENCH_MIGRATE_MIB") else {
        let _ = writeln!(std::io::stderr(), "SKIP: bench_idle_rdma_migration: set RDMIG_BENCH_MIGRATE_MIB (bench/rdma-vs-perftest does)");
        return;
    };
    let Some((opts, addr)) = rxe("bench_idle_rdma_migration") else {
        return;
    };
    let mib: u64 = mib
        .parse()
        .expect("RDMIG_BENCH_MIGRATE_MIB is a number of MiB");
    let report = loopback(addr, TransportKind::Rdma, Some(&opts), mib << 20, 1);
    let round0 = &report.per_round[0];
    println!(
        "MIGRATION_MIB_S={:.2} ROUND0_MIB_S={:.2} SOURCE_CPU_MS={:.1} DEST_CPU_MS={:.1}",
        report.throughput_mib_s, round0.mib_s, report.source_cpu_ms, report.dest_cpu_ms
    );
}

// ---- a source killed mid-round -------------------------------------------------------------

/// Helper run as a child process by `rdma_source_killed_mid_round`; does nothing otherwise.
#[test]
fn child_source() {
    let Ok(dest) = std::env::var("RDMIG_TEST_SOURCE_TO") else {
        return;
    };
    let (opts, _) = rxe("child_source").expect("child needs RDMA");
    let mut vm = TestVm::new(64 << 20, 2000);
    let _ = migrate(
        &mut vm,
        dest.parse().unwrap(),
        &config(TransportKind::Rdma, Some(&opts)),
        &mut |_| {},
    );
}

#[test]
fn rdma_source_killed_mid_round() {
    let Some((opts, addr)) = rxe("rdma_source_killed_mid_round") else {
        return;
    };
    let listener = TcpListener::bind(SocketAddr::new(addr, 0)).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_source", "--nocapture", "--test-threads=1"])
        .env(
            "RDMIG_TEST_SOURCE_TO",
            listener.local_addr().unwrap().to_string(),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let child_id = child.id();
    let started = Arc::new(Mutex::new(None::<Instant>));
    let s2 = started.clone();
    // Kill the source while the destination is reading round 0 from it.
    let killer = std::thread::spawn(move || loop {
        if let Some(t) = *s2.lock().unwrap() {
            if t.elapsed() >= Duration::from_millis(700) {
                // SAFETY: plain kill(2) of our own child process, by its id.
                unsafe { libc::kill(child_id as i32, libc::SIGKILL) };
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    });
    let factory: rdmig_transport::vm::DestinationFactory<'static> = {
        let inner = dest_factory();
        let s3 = started.clone();
        Box::new(move |layout: &MemoryLayout| {
            *s3.lock().unwrap() = Some(Instant::now());
            inner(layout)
        })
    };
    let t = Instant::now();
    let r = accept(
        &listener,
        &config(TransportKind::Auto, Some(&opts)),
        factory,
    );
    killer.join().unwrap();
    let _ = child.wait();
    let e = r.err().expect("the source was killed");
    eprintln!("destination after the source died ({:?}): {e}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(90),
        "the destination must give up, not hang"
    );
    assert!(
        matches!(
            e,
            Error::Rdma(_) | Error::Timeout(_) | Error::PeerClosed { .. } | Error::Io { .. }
        ),
        "{e}"
    );
}

// ---- several regions, pages larger than one READ -------------------------------------------

/// An idle VM with two regions and 2 MiB pages: READs are capped at 1 MiB, so every page takes
/// two READs (hashed when both land), and the second region ends in a partial page.
struct TwoRegionVm {
    map: GuestMemoryMap,
    _mem: Vec<MmapRegion>,
}

impl SourceVm for TwoRegionVm {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }
    fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    fn fetch_and_clear_dirty(&mut self, _into: &mut PageSet) -> Result<(), VmmError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
        Ok(Vec::new())
    }
}

#[test]
fn rdma_two_regions_huge_pages() {
    let Some((opts, addr)) = rxe("rdma_two_regions_huge_pages") else {
        return;
    };
    let sizes = [6u64 << 20, (5 << 20) + 4096];
    let gpas = [0u64, 1 << 32];
    let mut mems = Vec::new();
    let mut regions = Vec::new();
    for (i, (&len, &gpa)) in sizes.iter().zip(&gpas).enumerate() {
        let m = MmapRegion::new(len, MmapBacking::Anonymous, true).unwrap();
        for off in (0..len).step_by(8) {
            // SAFETY: inside the mapping.
            unsafe {
                std::ptr::write_unaligned(
                    m.as_ptr().add(off as usize) as *mut u64,
                    off ^ ((i as u64 + 1) << 56),
                )
            };
        }
        // SAFETY: the mapping lives in the VM next to the map.
        regions.push(unsafe { m.guest_region(GuestAddress(gpa)) });
        mems.push(m);
    }
    let map = GuestMemoryMap::new(regions, PageSize::new(2 << 20).unwrap()).unwrap();
    let mut vm = TwoRegionVm { map, _mem: mems };
    let listener = TcpListener::bind(SocketAddr::new(addr, 0)).unwrap();
    let dest_addr = listener.local_addr().unwrap();
    let dconf = config(TransportKind::Auto, Some(&opts));
    let dest = std::thread::spawn(move || accept(&listener, &dconf, dest_factory()));
    let report = migrate(
        &mut vm,
        dest_addr,
        &config(TransportKind::Rdma, Some(&opts)),
        &mut |_| {},
    )
    .expect("migration");
    let (dvm, _) = dest.join().unwrap().expect("destination");
    assert!(report.verified && report.transport == "rdma", "{report:?}");
    for (a, b) in vm.map.regions().iter().zip(dvm.memory().regions()) {
        assert_eq!(a.len(), b.len());
        // SAFETY: both regions are mapped for their lengths while the VMs live.
        let (x, y) = unsafe {
            (
                std::slice::from_raw_parts(a.host_ptr(), a.len() as usize),
                std::slice::from_raw_parts(b.host_ptr(), b.len() as usize),
            )
        };
        assert!(x == y, "region at {:#x} differs", a.gpa().0);
    }
}

#[test]
fn rdma_loopback_with_bandwidth_cap() {
    let Some((opts, addr)) = rxe("rdma_loopback_with_bandwidth_cap") else {
        return;
    };
    let listener = TcpListener::bind(SocketAddr::new(addr, 0)).unwrap();
    let dest_addr = listener.local_addr().unwrap();
    let dconf = config(TransportKind::Auto, Some(&opts));
    let dest = std::thread::spawn(move || accept(&listener, &dconf, dest_factory()));
    let mut vm = TestVm::new(8 << 20, 1);
    let mut c = config(TransportKind::Rdma, Some(&opts));
    c.max_bandwidth = Some(8 << 20);
    let t = Instant::now();
    let report = migrate(&mut vm, dest_addr, &c, &mut |_| {}).expect("migration");
    dest.join().unwrap().expect("destination");
    eprintln!(
        "8 MiB capped at 8 MiB/s: {:?}, {:.1} MiB/s",
        t.elapsed(),
        report.throughput_mib_s
    );
    assert!(report.verified);
    assert!(
        report.throughput_mib_s < 8.0 * 1.25,
        "the cap is honoured: {:.1} MiB/s",
        report.throughput_mib_s
    );
}
