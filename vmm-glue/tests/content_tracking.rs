//! A VM without a dirty log ([`DirtyLog::Content`]): the transport finds the pages its guest
//! writes by comparing every page's hash with what the destination reports it landed. The
//! synthetic VM's writers run through the rounds, and its own dirty log is hidden from the
//! transport, so only the comparison can find their writes:
//! - with the comparison, the destination's memory equals the paused source's and its guest
//!   check passes, over one stream and four, with zero pages and without;
//! - the control: the same VM that claims its (hidden, empty) log is complete loses the
//!   writes, so the test would see a comparison that missed pages;
//! - post-copy and hybrid modes, which need a dirty log, are refused before anything moves.

use std::net::TcpListener;
use std::time::Duration;

use rdmig_transport::auth::Psk;
use rdmig_transport::digest::full_digest;
use rdmig_transport::mem::GuestMemoryMap;
use rdmig_transport::pages::PageSet;
use rdmig_transport::session::{accept, migrate, MigrationConfig, MigrationMode, MigrationReport};
use rdmig_transport::vm::{DirtyLog, SourceVm, VmDescriptor};
use rdmig_transport::wire::TransportKind;
use rdmig_transport::{Error, VmmError};
use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};

const MIB: u64 = 1 << 20;

/// The synthetic VM with its dirty log hidden: fetches report nothing, and `log` says who must
/// find the written pages.
struct NoDirtyLog {
    vm: SyntheticVm,
    log: DirtyLog,
}

impl SourceVm for NoDirtyLog {
    fn memory(&self) -> &GuestMemoryMap {
        self.vm.memory()
    }
    fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    fn fetch_and_clear_dirty(&mut self, _into: &mut PageSet) -> Result<(), VmmError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), VmmError> {
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        self.vm.resume()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmmError> {
        self.vm.save_state()
    }
    fn descriptor(&self) -> VmDescriptor {
        self.vm.descriptor()
    }
    fn dirty_log(&self) -> DirtyLog {
        self.log
    }
}

fn guest() -> SyntheticConfig {
    // 32 MiB, a 4 MiB working set rewritten at 64 MiB/s (a tenth of the writes zero a page),
    // half of memory never written (zero, holes).
    SyntheticConfig {
        zero_share: 10,
        ..SyntheticConfig::new(32 * MIB)
            .with_populated(Some(16 * MIB))
            .with_dirtying(4 * MIB, 64 * MIB)
    }
}

fn config(streams: u16, zero_pages: bool) -> MigrationConfig {
    MigrationConfig::new(Psk::random().unwrap())
        .with_transport(TransportKind::Tcp)
        .with_streams(streams)
        .with_zero_pages(zero_pages)
        .with_downtime_limit(Duration::from_millis(50))
        .with_io_timeout(Duration::from_secs(30))
}

/// Migrates `src` to a destination thread; returns the report and the destination VM.
fn run(
    src: &mut NoDirtyLog,
    cfg: MigrationConfig,
) -> (Result<MigrationReport, Error>, Option<SyntheticVm>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dcfg = cfg.clone();
    let dest_guest = SyntheticConfig {
        dirty_rate: 0,
        ..guest()
    };
    let dest = std::thread::spawn(move || {
        accept(
            &listener,
            &dcfg,
            synthetic_destination_factory(dest_guest, None),
        )
        .map(|(vm, _)| {
            *vm.into_any()
                .downcast::<SyntheticVm>()
                .expect("a synthetic VM")
        })
    });
    let r = migrate(src, addr, &cfg, &mut |_| {});
    (r, dest.join().unwrap().ok())
}

fn migrates_by_content(streams: u16, zero_pages: bool) {
    let mut src = NoDirtyLog {
        vm: SyntheticVm::start(&guest()).unwrap(),
        log: DirtyLog::Content,
    };
    std::thread::sleep(Duration::from_millis(50));
    let (r, dest) = run(&mut src, config(streams, zero_pages));
    let rep = r.unwrap();
    let dest = dest.expect("the destination resumed the guest");
    assert!(rep.verified);
    assert!(rep.rounds >= 2, "{rep:?}");
    let later: u64 = rep.per_round[1..].iter().map(|r| r.pages).sum();
    assert!(later > 0, "no page found written after round 0: {rep:?}");
    assert!(src.vm.pages_written() > 0);
    assert_eq!(
        full_digest(src.vm.memory_map()),
        full_digest(dest.memory_map()),
        "the destination's memory differs from the paused source's"
    );
    let check = dest.verify();
    assert!(check.ok(), "{check:?}");
    eprintln!(
        "by content, {streams} stream(s), zero pages {zero_pages}: {} rounds, pages per round {:?}, downtime {:.1} ms",
        rep.rounds,
        rep.per_round.iter().map(|r| r.pages).collect::<Vec<_>>(),
        rep.downtime_ms
    );
    src.vm.stop();
}

#[test]
fn writes_are_found_by_content_one_stream_with_zero_pages() {
    migrates_by_content(1, true);
}

#[test]
fn writes_are_found_by_content_four_streams_without_zero_pages() {
    migrates_by_content(4, false);
}

#[test]
fn without_the_comparison_the_hidden_writes_are_lost() {
    let mut src = NoDirtyLog {
        vm: SyntheticVm::start(&guest()).unwrap(),
        log: DirtyLog::Vm,
    };
    std::thread::sleep(Duration::from_millis(50));
    let (r, dest) = run(&mut src, config(2, true));
    // The transport trusts the (empty) log and moves only round 0's view: a page torn while it
    // moved fails the digest (the source runs on), or else the ends agree on the digest of
    // what moved while the memory differs.
    match r {
        Err(e) => {
            assert!(e.to_string().contains("digest mismatch"), "{e}");
            assert!(src.vm.running());
        }
        Ok(rep) => {
            assert!(rep.per_round[1..].iter().all(|r| r.pages == 0), "{rep:?}");
            assert_ne!(
                full_digest(src.vm.memory_map()),
                full_digest(dest.unwrap().memory_map()),
                "the writers wrote nothing during round 0: this test proves nothing"
            );
        }
    }
    src.vm.stop();
}

#[test]
fn post_copy_and_hybrid_need_a_dirty_log() {
    for mode in [MigrationMode::Postcopy, MigrationMode::Hybrid] {
        let mut src = NoDirtyLog {
            vm: SyntheticVm::start(&guest()).unwrap(),
            log: DirtyLog::Content,
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let e = migrate(
            &mut src,
            addr,
            &config(1, true).with_mode(mode),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, Error::InvalidConfig(_)), "{e:?}");
        assert!(e.to_string().contains("pre-copy only"), "{e}");
        // Refused before connecting: nothing reached the listener, the guest runs on.
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err());
        assert!(src.vm.running());
        let check = src.vm.verify();
        assert!(check.ok(), "{check:?}");
        src.vm.stop();
    }
}
