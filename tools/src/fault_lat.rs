//! `rdma-bench fault-lat`: remote page-fault latency, from the faulting access to the access
//! resumed, as an hdrhistogram (min, p50, p90, p99, p99.9, max).
//!
//! Source and destination run in this process: the source fills a mapping (TCP: its page
//! server answers from it over loopback; RDMA: it is registered REMOTE_READ on the device and
//! the fault fetcher READs it on a QP of its own, as in a post-copy migration), the destination
//! registers an empty mapping with userfaultfd and runs the same fault service as a post-copy
//! migration; a thread then reads one word of each of `--iters` pages in a scattered order and
//! times each read.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rdmig_transport::cpu::CpuMeter;
use rdmig_transport::digest::PageHashes;
use rdmig_transport::mem::{GuestAddress, GuestMemoryMap, MmapBacking, MmapRegion, PageSize};
use rdmig_transport::pages::PageSet;
use rdmig_transport::postcopy::fault::{self, fault_loop, FaultStats};
use rdmig_transport::postcopy::{AliasMap, MissingPages, PageFetcher, Uffd};
use rdmig_transport::rdma::fetch::FAULT_SPIN;
use rdmig_transport::rdma::{RdmaOptions, RdmaPageFetcher, RdmaSourcePath, ReadEngine, Staging};
use rdmig_transport::tcp::{PageServer, TcpPageFetcher};
use serde_json::json;

use crate::units::parse_size;

/// Transport of the page fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FetchTransport {
    /// A page request on a dedicated TCP stream (loopback).
    Tcp,
    /// One RDMA READ per fault into a registered staging page, then `UFFDIO_COPY`.
    Rdma,
}

/// Arguments of `fault-lat`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// How faults are served.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: FetchTransport,
    /// Faults to measure (each on a different page).
    #[arg(short = 'n', long = "iters", default_value_t = 10000)]
    pub iters: u64,
    /// Size of the remote memory (at least iters pages).
    #[arg(short = 's', long = "size", default_value = "64MiB", value_parser = parse_size)]
    pub size: u64,
    /// RDMA device (default: the first with an active RoCE port).
    #[arg(short = 'd', long = "ib-dev")]
    pub ib_dev: Option<String>,
    /// GID index (default: the RoCE v2 GID of --bind, else the first RoCE v2 GID).
    #[arg(short = 'x', long = "gid-index")]
    pub gid_index: Option<u8>,
    /// Local address whose RoCE v2 GID the RDMA connection uses.
    #[arg(long)]
    pub bind: Option<std::net::IpAddr>,
    /// Back the destination's memory with a memfd: faults are fetched into a second mapping
    /// and resolved with UFFDIO_CONTINUE (zero-copy) instead of UFFDIO_COPY.
    #[arg(long)]
    pub memfd: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// A fetcher and what keeps its far end alive.
enum Far {
    Tcp(PageServer),
    Rdma(RdmaSourcePath),
}

/// Connects a fault fetcher to the source memory `src_map` over the chosen transport.
fn connect(
    args: &Args,
    src_map: &GuestMemoryMap,
    dst_map: &GuestMemoryMap,
    alias: Option<Arc<AliasMap>>,
) -> Result<(Box<dyn PageFetcher>, Far, String)> {
    match args.transport {
        FetchTransport::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let client = TcpStream::connect(listener.local_addr()?)?;
            let (served, _) = listener.accept()?;
            let cpu = Arc::new(CpuMeter::default());
            let server = PageServer::start(src_map.clone(), vec![served.into()], None, cpu)?;
            let f = TcpPageFetcher::new(client.into(), dst_map.clone(), "fault")?;
            Ok((Box::new(f), Far::Tcp(server), "tcp (loopback)".into()))
        }
        FetchTransport::Rdma => {
            let opts = RdmaOptions {
                device: args.ib_dev.clone(),
                gid_index: args.gid_index,
                port: None,
                qps: 1,
                local_addr: args.bind,
            };
            let (mut source, setup) = RdmaSourcePath::new(src_map, &opts)
                .context("fault-lat --transport rdma: the source end")?;
            let page = dst_map.page_size();
            let staging = match alias {
                Some(a) => Staging::alias(a),
                None => Staging::new(fault::staging_bytes(page.bytes() as usize), page)?,
            };
            let (_, mut engines, ack) =
                ReadEngine::new_split(dst_map, &opts, &setup, vec![staging.map().clone()], None)?;
            source.connect(&ack)?;
            let engine = engines.pop().context("no fault engine")?;
            let what = format!(
                "rdma ({} port {} GID index {})",
                engine.device().summary.name,
                engine.device().summary.port,
                engine.device().summary.gid_index
            );
            let f = RdmaPageFetcher::new(engine, staging, page, "fault").with_spin(FAULT_SPIN);
            Ok((Box::new(f), Far::Rdma(source), what))
        }
    }
}

fn region(len: u64, backing: MmapBacking) -> Result<(MmapRegion, GuestMemoryMap)> {
    let m = MmapRegion::new(len, backing, false)?;
    // SAFETY: `m` is returned with the map and the caller keeps it alive as long as the map.
    let r = unsafe { m.guest_region(GuestAddress(0)) };
    let map = GuestMemoryMap::new(vec![r], PageSize::KIB4)?;
    Ok((m, map))
}

/// The word the source holds at the start of page `p`.
fn pattern(p: u64) -> u64 {
    p.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// Runs `fault-lat`.
pub fn run(args: Args) -> Result<()> {
    const PAGE: u64 = 4096;
    let pages = args.size / PAGE;
    if args.iters == 0 || args.iters > pages {
        bail!(
            "--iters must be between 1 and the {pages} pages of --size {}",
            args.size
        );
    }
    Uffd::probe().context("fault-lat needs userfaultfd")?;

    let (src_mem, src_map) = region(args.size, MmapBacking::Anonymous)?;
    for p in 0..pages {
        // SAFETY: page p lies inside the source mapping, which nothing else uses yet.
        unsafe {
            src_mem
                .as_ptr()
                .add((p * PAGE) as usize)
                .cast::<u64>()
                .write(pattern(p))
        };
    }
    let backing = if args.memfd {
        MmapBacking::Memfd
    } else {
        MmapBacking::Anonymous
    };
    let (dst_mem, dst_map) = region(args.size, backing)?;
    let alias = AliasMap::for_guest(&dst_map)?.map(Arc::new);
    let (mut fetcher, far, what) = connect(&args, &src_map, &dst_map, alias.clone())?;

    let mut all = PageSet::empty(&dst_map);
    all.fill();
    let mut state = MissingPages::new(&dst_map, &all);
    let uffd = Arc::new(match &alias {
        Some(a) => {
            state = state.in_place(a.clone());
            Uffd::open_minor()?
        }
        None => Uffd::open()?,
    });
    let missing = Arc::new(state);
    // With --memfd it is a shared memfd mapping whose pages AliasMap::for_guest allocated.
    // SAFETY: the mapping outlives the fault thread (joined, then unregistered below).
    unsafe {
        if alias.is_some() {
            uffd.register_minor(dst_mem.as_ptr(), dst_mem.len())?
        } else {
            uffd.register(dst_mem.as_ptr(), dst_mem.len())?
        }
    };
    let hashes = Arc::new(PageHashes::new(&dst_map));
    let (u, m, h) = (uffd.clone(), missing.clone(), hashes.clone());
    let service = std::thread::Builder::new()
        .name("fault-lat-service".into())
        .spawn(move || {
            let mut stats = FaultStats::new();
            let r = fault_loop(&u, &m, &h, fetcher.as_mut(), &mut stats);
            fetcher.close();
            r.map(|()| stats)
        })?;

    // Scattered order: a stride coprime with the page count.
    let mut stride = (pages / 2 + 1) | 1;
    while gcd(stride, pages) != 1 {
        stride += 2;
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let base = dst_mem.as_ptr();
    let mut bad = 0u64;
    for i in 0..args.iters {
        let p = (i * stride) % pages;
        let t = Instant::now();
        // The read faults and returns once the fault service installed the page.
        // SAFETY: page p lies inside the registered destination mapping.
        let v = unsafe { base.add((p * PAGE) as usize).cast::<u64>().read_volatile() };
        hist.saturating_record(t.elapsed().as_nanos() as u64);
        bad += u64::from(v != pattern(p));
    }
    missing.request_stop();
    let stats = service
        .join()
        .map_err(|_| anyhow::anyhow!("the fault service panicked"))??;
    uffd.unregister(dst_mem.as_ptr(), dst_mem.len())?;
    match far {
        Far::Tcp(mut server) => {
            if let Err(e) = server.stop() {
                tracing::debug!("page server: {e}");
            }
        }
        Far::Rdma(mut source) => source.deregister_memory(),
    }
    if bad > 0 {
        bail!("{bad} pages arrived with the wrong content");
    }

    let us = |ns: u64| ns as f64 / 1e3;
    let q = |f: f64| us(hist.value_at_quantile(f));
    if args.json {
        println!(
            "{}",
            json!({
                "zero_copy": args.memfd,
                "transport": match args.transport {
                    FetchTransport::Tcp => "tcp",
                    FetchTransport::Rdma => "rdma",
                },
                "size": args.size,
                "page_size": PAGE,
                "iters": args.iters,
                "faults_served": stats.faults,
                "min_us": us(hist.min()),
                "p50_us": q(0.5),
                "p90_us": q(0.9),
                "p99_us": q(0.99),
                "p999_us": q(0.999),
                "max_us": us(hist.max()),
                "service_p50_us": us(stats.percentiles_ns()[0]),
            })
        );
    } else {
        println!(
            "remote fault latency over {what}, fault to resumed access, {PAGE} byte pages, {}",
            if args.memfd {
                "memfd memory: UFFDIO_CONTINUE (zero-copy)"
            } else {
                "anonymous memory: UFFDIO_COPY"
            }
        );
        println!(
            "{:>8} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "#bytes", "#iterations", "t_min", "t_p50", "t_p90", "t_p99", "t_p99.9", "t_max"
        );
        println!(
            "{:>8} {:>11} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}   [usec]",
            PAGE,
            args.iters,
            us(hist.min()),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            us(hist.max())
        );
        println!(
            "fault service alone (fault read to UFFDIO_COPY done): p50 {:.2} usec",
            us(stats.percentiles_ns()[0])
        );
    }
    Ok(())
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
