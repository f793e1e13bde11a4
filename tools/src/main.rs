//! `rdma-bench`: rdmig's command line — live migrations (`migrate`), and the RDMA read
//! bandwidth, read latency and fault latency tests in perftest's manner.

mod errors;
mod fault_lat;
mod migrate;
mod perf;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// rdmig's benchmark and migration tool.
#[derive(Parser)]
#[command(
    name = "rdma-bench",
    version,
    about = "rdmig: RDMA zero-copy live migration — migrations and RDMA benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Live-migrate a VM: --loopback (two processes here), or --listen / --connect on two hosts.
    Migrate(Box<migrate::Args>),
    /// Remote page-fault latency (fault to resumed access) over TCP loopback, as percentiles.
    FaultLat(fault_lat::Args),
    /// RDMA READ bandwidth (perftest's ib_read_bw manner: no address = server).
    ReadBw(perf::read_bw::Args),
    /// RDMA READ latency (perftest's ib_read_lat manner: no address = server).
    ReadLat(perf::read_lat::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RDMIG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Migrate(a) => migrate::run(*a),
        Cmd::FaultLat(a) => fault_lat::run(a).map(|()| ExitCode::SUCCESS),
        Cmd::ReadBw(a) => perf::read_bw::run(a).map(|()| ExitCode::SUCCESS),
        Cmd::ReadLat(a) => perf::read_lat::run(a).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rdma-bench: error: {}", errors::describe(&e));
            ExitCode::FAILURE
        }
    }
}
