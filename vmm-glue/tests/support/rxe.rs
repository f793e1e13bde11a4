//! The SoftRoCE device `ci/softroce-run` sets up, for the tests that run over RDMA.

use rdmig_transport::rdma::RdmaOptions;
use rdmig_transport::require::{skip, Capability};

/// The device as RDMA options and the address to listen on, or `None` after saying why
/// `test` skips.
pub fn rxe(test: &str) -> Option<(RdmaOptions, std::net::IpAddr)> {
    let Ok(dev) = std::env::var("RDMIG_RXE_DEV") else {
        skip(
            Capability::Rdma,
            test,
            "no RDMA device (RDMIG_RXE_DEV and RDMIG_RXE_ADDR are set by ci/softroce-run)",
        );
        return None;
    };
    let addr: std::net::IpAddr = std::env::var("RDMIG_RXE_ADDR")
        .expect("RDMIG_RXE_ADDR with RDMIG_RXE_DEV")
        .parse()
        .expect("RDMIG_RXE_ADDR is an address");
    let opts = RdmaOptions {
        device: Some(dev),
        gid_index: std::env::var("RDMIG_RXE_GID_INDEX")
            .ok()
            .and_then(|g| g.parse().ok()),
        port: None,
        qps: 2,
        local_addr: Some(addr),
    };
    Some((opts, addr))
}
