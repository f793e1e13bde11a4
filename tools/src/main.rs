//! `rdma-bench`: rdmig's command line — live migrations (`migrate`), and the RDMA read
//! bandwidth, read latency and fault latency tests in perftest's manner.

mod migrate;
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rdma-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
