//! A synthetic VM migrated within the test process: source here, destination on a thread.

use std::net::TcpListener;

use rdmig_transport::session::{accept, migrate, DestReport, MigrationConfig, MigrationReport};
use rdmig_transport::Error;
use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};

use super::relay::Relay;

/// What the destination thread ends with.
pub type DestOutcome = Result<(SyntheticVm, DestReport), Error>;

/// Source and destination in this process, the destination listening on `addr` (or behind
/// `relay`, which then forwards to it).
pub fn run_at(
    source: &mut SyntheticVm,
    dest_cfg: SyntheticConfig,
    cfg: MigrationConfig,
    addr: std::net::IpAddr,
    relay: Option<&Relay>,
) -> (Result<MigrationReport, Error>, DestOutcome) {
    let listener = TcpListener::bind((addr, 0)).unwrap();
    let mut target = listener.local_addr().unwrap();
    if let Some(r) = relay {
        r.target(target);
        target = r.addr;
    }
    let dcfg = cfg.clone();
    let dest = std::thread::spawn(move || {
        accept(
            &listener,
            &dcfg,
            synthetic_destination_factory(dest_cfg, None),
        )
        .map(|(vm, rep)| {
            (
                *vm.into_any()
                    .downcast::<SyntheticVm>()
                    .expect("a synthetic VM"),
                rep,
            )
        })
    });
    let r = migrate(source, target, &cfg, &mut |_| {});
    (r, dest.join().unwrap())
}
