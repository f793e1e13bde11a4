//! `rdma-bench read-bw`: RDMA READ bandwidth, like `ib_read_bw`.
//!
//! The client keeps every send slot of every QP busy with READs of `-s` bytes (all into the
//! same local buffer, from the same remote buffer, as perftest does) for `-n` iterations or
//! `-D` seconds, and prints `#bytes #iterations BW peak BW average MsgRate`. BW peak is the
//! best rate over windows of at least 20 ms and 8 completions (never below the average).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use clap::Parser;
use rdmig_transport::mem::RegionId;
use rdmig_transport::rdma::{Read, ReadEngine};

use super::{connect, finish, serve, sizes, Common};

/// Arguments of `read-bw`.
#[derive(Parser, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Message size in bytes.
    #[arg(short = 's', long = "size", default_value_t = 65536)]
    pub size: u64,
    /// Iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 1000)]
    pub iters: u64,
    /// Queue pairs.
    #[arg(short = 'q', long = "qps", default_value_t = 1)]
    pub qps: u16,
    /// Run every size from 2 bytes to 8 MiB.
    #[arg(short = 'a', long = "all")]
    pub all: bool,
    /// Run each size for this many seconds instead of `-n` iterations.
    #[arg(short = 'D', long = "duration")]
    pub duration: Option<u64>,
    /// Report Gb/s instead of MiB/s.
    #[arg(long = "report_gbits", alias = "report-gbits")]
    pub report_gbits: bool,
}

/// One row of results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BwResult {
    /// Message size.
    pub bytes: u64,
    /// READs completed.
    pub iterations: u64,
    /// Best windowed bandwidth, MiB/s.
    pub bw_peak_mib_s: f64,
    /// Average bandwidth, MiB/s.
    pub bw_avg_mib_s: f64,
    /// Messages per second, millions.
    pub msg_rate_mpps: f64,
}

/// Runs the tool.
pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(addr) = args.common.address.clone() else {
        return serve(&args.common);
    };
    let sizes = sizes(args.all, args.size);
    let max = *sizes.iter().max().expect("at least one size");
    let (s, mut engine, _buf) = connect(&args.common, &addr, args.qps.max(1), max)?;
    engine.set_max_read(max)?;
    let unit = if args.report_gbits {
        "Gb/sec"
    } else {
        "MiB/sec"
    };
    if !args.common.json {
        let d = engine.device();
        println!(
            "# RDMA READ bandwidth: device {} port {} GID index {}, {} QPs, {} READs in flight",
            d.summary.name,
            d.summary.port,
            d.summary.gid_index,
            args.qps.max(1),
            engine.capacity()
        );
        println!("{}", "-".repeat(88));
        println!(
            " #bytes     #iterations    BW peak[{unit}]    BW average[{unit}]   MsgRate[Mpps]"
        );
    }
    for size in sizes {
        let r = measure(
            &mut engine,
            size,
            args.iters,
            args.duration.map(Duration::from_secs),
        )?;
        if args.common.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            let conv = |mib: f64| {
                if args.report_gbits {
                    mib * 1048576.0 * 8.0 / 1e9
                } else {
                    mib
                }
            };
            println!(
                " {:<10} {:<14} {:<18.2} {:<20.2} {:.6}",
                r.bytes,
                r.iterations,
                conv(r.bw_peak_mib_s),
                conv(r.bw_avg_mib_s),
                r.msg_rate_mpps
            );
        }
    }
    if !args.common.json {
        println!("{}", "-".repeat(88));
    }
    finish(s);
    Ok(())
}

/// Keeps the engine full of `size`-byte READs for `iters` completions or `duration`.
pub fn measure(
    engine: &mut ReadEngine,
    size: u64,
    iters: u64,
    duration: Option<Duration>,
) -> anyhow::Result<BwResult> {
    let read = Read {
        region: RegionId(0),
        offset: 0,
        len: size as u32,
        tag: 0,
    };
    let mut queue = VecDeque::with_capacity(engine.capacity());
    let mut done = Vec::with_capacity(64);
    let (mut posted, mut completed) = (0u64, 0u64);
    let limit = if duration.is_some() {
        u64::MAX
    } else {
        iters.max(1)
    };
    let start = Instant::now();
    let (mut win_start, mut win_count, mut peak) = (start, 0u64, 0f64);
    let mut empty = 0u32;
    loop {
        let stop_posting = match duration {
            Some(d) => start.elapsed() >= d,
            None => posted >= limit,
        };
        if !stop_posting {
            let want = (engine.free() as u64).min(limit - posted) as usize;
            while queue.len() < want {
                queue.push_back(read);
            }
            posted += engine.post(&mut queue)? as u64;
        }
        done.clear();
        let n = engine.poll(&mut done)?;
        completed += done.len() as u64;
        win_count += done.len() as u64;
        if n == 0 {
            empty += 1;
            if empty > 64 {
                std::thread::yield_now();
            }
        } else {
            empty = 0;
        }
        let w = win_start.elapsed();
        if w >= Duration::from_millis(20) && win_count >= 8 {
            peak = peak.max(win_count as f64 * size as f64 / w.as_secs_f64() / 1048576.0);
            win_start = Instant::now();
            win_count = 0;
        }
        if stop_posting && engine.in_flight() == 0 && queue.is_empty() {
            break;
        }
        if stop_posting {
            queue.clear();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let avg = completed as f64 * size as f64 / secs / 1048576.0;
    Ok(BwResult {
        bytes: size,
        iterations: completed,
        bw_peak_mib_s: peak.max(avg),
        bw_avg_mib_s: avg,
        msg_rate_mpps: completed as f64 / secs / 1e6,
    })
}
