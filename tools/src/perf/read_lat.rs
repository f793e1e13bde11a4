//! `rdma-bench read-lat`: RDMA READ latency, like `ib_read_lat`.
//!
//! One READ in flight at a time on one QP, timed from post to completion with busy polling;
//! the distribution goes into an hdrhistogram and prints as
//! `#bytes #iterations t_min t_typical t_avg t_p99 t_p99.9` in microseconds.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use rdmig_transport::mem::RegionId;
use rdmig_transport::rdma::{Read, ReadEngine};

use super::{connect, finish, serve, sizes, Common};

/// Arguments of `read-lat`.
#[derive(Parser, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Message size in bytes.
    #[arg(short = 's', long = "size", default_value_t = 2)]
    pub size: u64,
    /// Iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 1000)]
    pub iters: u64,
    /// Run every size from 2 bytes to 8 MiB.
    #[arg(short = 'a', long = "all")]
    pub all: bool,
}

/// One row of results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LatResult {
    /// Message size.
    pub bytes: u64,
    /// READs timed.
    pub iterations: u64,
    /// Fastest, µs.
    pub t_min_us: f64,
    /// Median, µs.
    pub t_typical_us: f64,
    /// Mean, µs.
    pub t_avg_us: f64,
    /// 99th percentile, µs.
    pub t_p99_us: f64,
    /// 99.9th percentile, µs.
    pub t_p999_us: f64,
}

/// Runs the tool.
pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(addr) = args.common.address.clone() else {
        return serve(&args.common);
    };
    let sizes = sizes(args.all, args.size);
    let max = *sizes.iter().max().expect("at least one size");
    let (s, mut engine, _buf) = connect(&args.common, &addr, 1, max)?;
    engine.set_max_read(max)?;
    if !args.common.json {
        let d = engine.device();
        println!(
            "# RDMA READ latency: device {} port {} GID index {}",
            d.summary.name, d.summary.port, d.summary.gid_index
        );
        println!("{}", "-".repeat(96));
        println!(" #bytes #iterations    t_min[usec]    t_typical[usec]    t_avg[usec]    t_p99[usec]    t_p99.9[usec]");
    }
    for size in sizes {
        let r = measure(&mut engine, size, args.iters)?;
        if args.common.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                " {:<6} {:<14} {:<14.2} {:<18.2} {:<14.2} {:<14.2} {:.2}",
                r.bytes,
                r.iterations,
                r.t_min_us,
                r.t_typical_us,
                r.t_avg_us,
                r.t_p99_us,
                r.t_p999_us
            );
        }
    }
    if !args.common.json {
        println!("{}", "-".repeat(96));
    }
    finish(s);
    Ok(())
}

/// Times `iters` single READs of `size` bytes.
pub fn measure(engine: &mut ReadEngine, size: u64, iters: u64) -> anyhow::Result<LatResult> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).context("histogram")?;
    let read = Read {
        region: RegionId(0),
        offset: 0,
        len: size as u32,
        tag: 0,
    };
    let mut q = VecDeque::with_capacity(1);
    let mut done = Vec::with_capacity(4);
    let mut sum = 0u128;
    let iters = iters.max(1);
    for _ in 0..iters {
        q.push_back(read);
        let t = Instant::now();
        engine.post(&mut q)?;
        done.clear();
        while engine.poll(&mut done)? == 0 {
            std::hint::spin_loop();
        }
        let ns = t.elapsed().as_nanos();
        sum += ns;
        h.saturating_record(ns as u64);
    }
    let us = |ns: u64| ns as f64 / 1e3;
    Ok(LatResult {
        bytes: size,
        iterations: iters,
        t_min_us: us(h.min()),
        t_typical_us: us(h.value_at_quantile(0.5)),
        t_avg_us: sum as f64 / iters as f64 / 1e3,
        t_p99_us: us(h.value_at_quantile(0.99)),
        t_p999_us: us(h.value_at_quantile(0.999)),
    })
}
