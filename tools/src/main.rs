//! `rdma-bench`: rdmig's command line. This branch carries the RDMA READ benchmarks only;
//! the full CLI (migrations, fault latency) merges them as subcommands.

mod perf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "rdma-bench", version, about = "rdmig benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// RDMA READ bandwidth (like ib_read_bw): no address = server, an address = client.
    ReadBw(perf::read_bw::Args),
    /// RDMA READ latency (like ib_read_lat): no address = server, an address = client.
    ReadLat(perf::read_lat::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = match Cli::parse().cmd {
        Cmd::ReadBw(a) => perf::read_bw::run(a),
        Cmd::ReadLat(a) => perf::read_lat::run(a),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdma-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
