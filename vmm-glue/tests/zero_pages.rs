//! Zero pages over TCP loopback: sparse synthetic guests (0 %, 25 % and 100 % of memory
//! populated) in pre-copy, post-copy and hybrid mode, with writers that turn pages zero and
//! non-zero between rounds; a page that turns zero after it was sent ends zero on the
//! destination; zero pages move no bytes; and a 4 GiB guest with 256 MiB populated leaves the
//! destination with about 256 MiB resident. (The same over RDMA: transport/tests/rdma.rs, in
//! the SoftRoCE guest.) Post-copy cases skip, with the reason, where userfaultfd is missing.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use rdmig_transport::auth::Psk;
use rdmig_transport::digest::full_digest;
use rdmig_transport::mem::GuestMemoryMap;
use rdmig_transport::postcopy::Uffd;
use rdmig_transport::rdma::RdmaOptions;
use rdmig_transport::require::{skip, Capability};
use rdmig_transport::session::{DestReport, MigrationConfig, MigrationMode, MigrationReport};
use rdmig_transport::wire::TransportKind;
use rdmig_vmm::synthetic::{SyntheticConfig, SyntheticVm};

use support::rxe::rxe;
use support::synthetic::run_at;

const MIB: u64 = 1 << 20;

fn config(psk: &Psk, mode: MigrationMode) -> MigrationConfig {
    MigrationConfig::new(psk.clone())
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_mode(mode)
        .with_downtime_limit(Duration::from_millis(50))
        .with_max_rounds(6)
        .with_io_timeout(Duration::from_secs(30))
}

fn uffd_ok(test: &str) -> bool {
    match Uffd::probe() {
        Ok(()) => true,
        Err(e) => {
            skip(
                Capability::Uffd,
                test,
                format!("userfaultfd unavailable: {e}"),
            );
            false
        }
    }
}

/// Pages of `map` resident in this process (mincore).
fn resident_pages(map: &GuestMemoryMap) -> u64 {
    let mut n = 0;
    for r in map.regions() {
        let pages = r.len().div_ceil(4096) as usize;
        let mut v = vec![0u8; pages];
        // SAFETY: the region is mapped for its whole length; `v` has one byte per 4 KiB page.
        let rc = unsafe { libc::mincore(r.host_ptr().cast(), r.len() as usize, v.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        n += v.iter().filter(|&&b| b & 1 != 0).count() as u64;
    }
    n
}

/// Migrates a guest of `mem` bytes with `populated` of it written, whose writers dirty a
/// working set at the start of memory (`zero_share` % of their writes write zero pages) during
/// the rounds and, in post-copy, on the destination. Checks the digest, the destination's own
/// check, and (pre-copy, where the destination does not write) its memory byte for byte.
fn migrate_sparse(
    mode: MigrationMode,
    mem: u64,
    populated: u64,
    zero_share: u8,
) -> (MigrationReport, DestReport) {
    migrate_sparse_via(mode, mem, populated, zero_share, None, false)
}

/// As [`migrate_sparse`], over RDMA with `rdma` (options, address) given.
fn migrate_sparse_via(
    mode: MigrationMode,
    mem: u64,
    populated: u64,
    zero_share: u8,
    rdma: Option<&(RdmaOptions, IpAddr)>,
    memfd: bool,
) -> (MigrationReport, DestReport) {
    let psk = Psk::random().unwrap();
    let (mig, addr) = match rdma {
        Some((opts, addr)) => (
            config(&psk, mode)
                .with_transport(TransportKind::Rdma)
                .with_rdma(opts.clone()),
            *addr,
        ),
        None => (config(&psk, mode), [127, 0, 0, 1].into()),
    };
    let cfg = SyntheticConfig::new(mem)
        .with_dirtying(8 * MIB, 64 * MIB)
        .with_populated(Some(populated))
        .with_zero_share(zero_share)
        .with_memfd(memfd);
    let mut source = SyntheticVm::start(&cfg).unwrap();
    std::thread::sleep(Duration::from_millis(40));
    let dest_rate = if mode == MigrationMode::Precopy {
        0
    } else {
        64 * MIB
    };
    let (r, d) = run_at(
        &mut source,
        cfg.clone().with_dirtying(8 * MIB, dest_rate),
        mig,
        addr,
        None,
    );
    let rep = r.unwrap_or_else(|e| panic!("{mode:?}, {populated} populated: {e}"));
    assert_eq!(rep.transport, if rdma.is_some() { "rdma" } else { "tcp" });
    let (mut dest, drep) = d.unwrap();
    assert!(rep.verified);
    if mode == MigrationMode::Precopy {
        assert_eq!(
            full_digest(source.memory_map()),
            full_digest(dest.memory_map()),
            "memory differs"
        );
    }
    let check = dest.verify();
    assert!(
        check.ok(),
        "{mode:?}, {populated} populated: {} bad pages, first {:?}",
        check.pages_bad,
        check.first_bad
    );
    dest.stop();
    (rep, drep)
}

#[test]
fn sparse_guests_migrate_in_pre_copy_with_pages_turning_zero_and_back() {
    let mem = 64 * MIB;
    let pages = mem / 4096;
    for populated in [0, mem / 4, mem] {
        let (rep, drep) = migrate_sparse(MigrationMode::Precopy, mem, populated, 30);
        let unpopulated = (mem - populated) / 4096;
        let r0 = &rep.per_round[0];
        // Round 0 sends every page once: the unpopulated ones (outside the working set, which
        // the writers may have zeroed or filled) as zero ranges.
        assert_eq!(r0.pages + r0.zero_pages, pages);
        assert!(
            r0.zero_pages >= unpopulated.saturating_sub(8 * MIB / 4096),
            "{populated} populated: round 0 found {} zero pages",
            r0.zero_pages
        );
        assert!(r0.bytes <= (pages - r0.zero_pages) * 4096);
        assert_eq!(rep.zero_pages, drep.zero_pages, "both ends count the same");
        assert_eq!(
            rep.bytes_transferred,
            rep.per_round.iter().map(|r| r.bytes).sum::<u64>()
        );
    }
}

#[test]
fn a_page_zeroed_after_it_was_sent_is_zeroed_on_the_destination() {
    // Every write zeroes a page: pages of the fully populated working set go as data in
    // round 0 and turn zero afterwards, so the destination must write zero over them.
    let (rep, drep) = migrate_sparse(MigrationMode::Precopy, 32 * MIB, 32 * MIB, 100);
    assert!(rep.rounds >= 2);
    assert!(
        drep.zeroed_pages > 0,
        "no page was zeroed on the destination"
    );
    assert!(rep.per_round[1..].iter().any(|r| r.zero_pages > 0));
    // And pages that stop being zero are sent: an unpopulated guest whose writers fill pages.
    // Round 0 of an all-zero guest takes a millisecond, so on a loaded machine the writers may
    // not run before the pause at all (nothing to send, and the destination's checks pass):
    // up to three migrations, one of which must send pages written after round 0.
    let sent_later = (0..3).any(|_| {
        let (rep, _) = migrate_sparse(MigrationMode::Precopy, 32 * MIB, 0, 0);
        assert!(rep.per_round[0].zero_pages > 0);
        rep.per_round[1..].iter().any(|r| r.pages > 0)
    });
    assert!(
        sent_later,
        "pages the writers filled after round 0 were not sent"
    );
}

#[test]
fn sparse_guests_migrate_in_post_copy_and_hybrid() {
    if !uffd_ok("sparse_guests_migrate_in_post_copy_and_hybrid") {
        return;
    }
    let mem = 64 * MIB;
    for mode in [MigrationMode::Postcopy, MigrationMode::Hybrid] {
        for populated in [0, mem / 4, mem] {
            let (rep, drep) = migrate_sparse(mode, mem, populated, 30);
            let unpopulated = (mem - populated) / 4096;
            assert!(
                rep.zero_pages >= unpopulated.saturating_sub(8 * MIB / 4096),
                "{mode:?}, {populated} populated: {} zero pages",
                rep.zero_pages
            );
            if mode == MigrationMode::Postcopy {
                // The scan left the zero pages out of the post-copy set.
                assert!(
                    rep.postcopy_pages <= mem / 4096 - unpopulated + 8 * MIB / 4096,
                    "{populated} populated: {} pages fetched in post-copy",
                    rep.postcopy_pages
                );
                assert_eq!(rep.rounds, 0);
            }
            assert_eq!(drep.zero_pages, rep.zero_pages);
        }
    }
}

#[test]
fn sparse_memfd_guests_migrate_in_post_copy_and_hybrid() {
    // memfd memory: post-copy installs in place, and zero pages are zeroed in the second
    // mapping and mapped with UFFDIO_CONTINUE.
    if !uffd_ok("sparse_memfd_guests_migrate_in_post_copy_and_hybrid") || !minor_ok() {
        return;
    }
    let mem = 32 * MIB;
    for mode in [MigrationMode::Postcopy, MigrationMode::Hybrid] {
        for populated in [0, mem / 4] {
            let (rep, drep) = migrate_sparse_via(mode, mem, populated, 50, None, true);
            assert!(
                drep.postcopy_zero_copy || !rep.postcopy,
                "{mode:?}, {populated} populated: post-copy did not install in place"
            );
            assert!(rep.zero_pages >= (mem - populated) / 4096 - 8 * MIB / 4096);
        }
    }
}

fn minor_ok() -> bool {
    if Uffd::minor_supported() {
        return true;
    }
    skip(
        Capability::UffdMinor,
        "sparse_memfd_guests_migrate_in_post_copy_and_hybrid",
        "userfaultfd minor faults on shmem are unavailable",
    );
    false
}

#[test]
fn without_zero_pages_every_page_moves_as_data() {
    let psk = Psk::random().unwrap();
    let cfg = SyntheticConfig::new(16 * MIB).with_populated(Some(0));
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let (r, d) = run_at(
        &mut source,
        cfg.clone(),
        config(&psk, MigrationMode::Precopy).with_zero_pages(false),
        [127, 0, 0, 1].into(),
        None,
    );
    let rep = r.unwrap();
    assert_eq!(rep.zero_pages, 0);
    assert_eq!(rep.per_round[0].pages, 16 * MIB / 4096);
    assert_eq!(d.unwrap().1.zero_pages, 0);
}

#[test]
fn a_sparse_guest_costs_the_destination_only_its_populated_memory() {
    // 4 GiB with 256 MiB populated: the destination faults in what the rounds land, never the
    // zero pages.
    let (mem, populated) = (4096 * MIB, 256 * MIB);
    let psk = Psk::random().unwrap();
    let cfg = SyntheticConfig::new(mem).with_populated(Some(populated));
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let (r, d) = run_at(
        &mut source,
        cfg.clone(),
        config(&psk, MigrationMode::Precopy),
        [127, 0, 0, 1].into(),
        None,
    );
    let rep = r.unwrap();
    let (dest, _) = d.unwrap();
    let resident = resident_pages(dest.memory_map()) * 4096;
    assert!(
        resident <= populated + 16 * MIB,
        "destination holds {} MiB of a guest with {} MiB populated",
        resident / MIB,
        populated / MIB
    );
    assert!(resident >= populated, "the populated part arrived");
    assert_eq!(rep.zero_pages, (mem - populated) / 4096);
    assert_eq!(rep.bytes_transferred, populated);
    assert!(dest.verify().ok());
}

#[test]
fn rdma_sparse_guests_migrate_in_every_mode() {
    let Some(rdma) = rxe("rdma_sparse_guests_migrate_in_every_mode") else {
        return;
    };
    let mem = 32 * MIB;
    for mode in [
        MigrationMode::Precopy,
        MigrationMode::Postcopy,
        MigrationMode::Hybrid,
    ] {
        if mode != MigrationMode::Precopy && !uffd_ok("rdma_sparse_guests_migrate_in_every_mode") {
            return;
        }
        for populated in [0, mem / 4, mem] {
            let memfd = populated == mem / 4;
            let (rep, drep) = migrate_sparse_via(mode, mem, populated, 30, Some(&rdma), memfd);
            let unpopulated = (mem - populated) / 4096;
            assert!(
                rep.zero_pages >= unpopulated.saturating_sub(8 * MIB / 4096),
                "{mode:?}, {populated} populated: {} zero pages",
                rep.zero_pages
            );
            assert_eq!(drep.zero_pages, rep.zero_pages);
            if mode == MigrationMode::Precopy {
                // The destination READ only the data pages of each round.
                assert_eq!(
                    drep.bytes,
                    rep.per_round.iter().map(|r| r.pages * 4096).sum::<u64>()
                );
            }
        }
    }
}
