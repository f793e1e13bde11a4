//! Migrations of the synthetic VM over mutual TLS on loopback: pre-copy and post-copy
//! verified; a wrong CA, an expired client certificate, a client without one and a plain-TCP
//! source refused with a clear error and the source intact; and a capture of what crosses the
//! wire: a known page of the guest is in the plain-TCP bytes and not in the TLS ones.
//!
//! The credentials come from `ci/make-test-certs` (openssl, which `ci/setup` installs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdmig_transport::auth::Psk;
use rdmig_transport::channel::tls::{self, TlsChannel, TlsCreds, TlsListener};
use rdmig_transport::channel::{ChannelListener, MigrationChannel, TcpChannel};
use rdmig_transport::digest::full_digest;
use rdmig_transport::mem::{PageIndex, RegionId};
use rdmig_transport::postcopy::Uffd;
use rdmig_transport::require::{skip, Capability};
use rdmig_transport::session::{
    accept_with, migrate_with, DestReport, MigrationConfig, MigrationControl, MigrationMode,
    MigrationReport,
};
use rdmig_transport::wire::TransportKind;
use rdmig_transport::Error;
use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};

const MIB: u64 = 1 << 20;

fn creds(sub: &str) -> TlsCreds {
    TlsCreds::from_dir(tls::test_creds_dir().join(sub)).unwrap()
}

fn config(psk: Psk, mode: MigrationMode) -> MigrationConfig {
    MigrationConfig::new(psk)
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_mode(mode)
        .with_downtime_limit(Duration::from_millis(50))
        .with_io_timeout(Duration::from_secs(30))
        .with_listen_timeout(Some(Duration::from_secs(3)))
}

type DestOutcome = Result<(SyntheticVm, DestReport), Error>;

/// Migrates `source` to a destination on a thread (TLS with `dest_creds` if given), the
/// source connecting through `make_channel` (given the address to dial).
fn run(
    source: &mut SyntheticVm,
    cfg: MigrationConfig,
    dest_creds: Option<TlsCreds>,
    via: Option<&Recorder>,
    make_channel: impl FnOnce(SocketAddr) -> Box<dyn MigrationChannel>,
) -> (Result<MigrationReport, Error>, DestOutcome) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut target = listener.local_addr().unwrap();
    if let Some(r) = via {
        *r.target.lock().unwrap() = Some(target);
        target = r.addr;
    }
    let dest_cfg = SyntheticConfig {
        dirty_rate: 0,
        ..source.config().clone()
    };
    let dcfg = cfg.clone();
    let dest = std::thread::spawn(move || {
        let l: Box<dyn ChannelListener> = match dest_creds {
            Some(c) => Box::new(TlsListener::new(listener, &c).unwrap()),
            None => Box::new(listener),
        };
        accept_with(
            &*l,
            &dcfg,
            synthetic_destination_factory(dest_cfg, None),
            &MigrationControl::new(),
        )
        .map(|(vm, rep)| {
            let vm = vm.into_any().downcast::<SyntheticVm>().expect("synthetic");
            (*vm, rep)
        })
    });
    let mut ch = make_channel(target);
    let r = migrate_with(
        source,
        &mut *ch,
        &cfg,
        &MigrationControl::new(),
        &mut |_| {},
    );
    (r, dest.join().unwrap())
}

fn tls_to(c: TlsCreds) -> impl FnOnce(SocketAddr) -> Box<dyn MigrationChannel> {
    move |a| Box::new(TlsChannel::tcp(a, &c, None).unwrap())
}

fn expect_tls_kind(s: &str) {
    let want = if tls::ktls::available() {
        "ktls"
    } else {
        "rustls"
    };
    assert_eq!(s, want);
}

fn migrate_verified(mode: MigrationMode, psk: Psk) {
    let cfg = SyntheticConfig::new(32 * MIB)
        .with_regions(2)
        .with_dirtying(8 * MIB, 64 * MIB);
    let mut source = SyntheticVm::start(&cfg).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (r, d) = run(
        &mut source,
        config(psk, mode),
        Some(creds("")),
        None,
        tls_to(creds("")),
    );
    let rep = r.unwrap();
    let (dest, drep) = d.unwrap();
    assert!(rep.verified, "{rep:?}");
    expect_tls_kind(&rep.tls);
    expect_tls_kind(&drep.tls);
    assert_eq!(
        full_digest(source.memory_map()),
        full_digest(dest.memory_map()),
        "memory differs"
    );
    let c = dest.verify();
    assert!(c.ok(), "{c:?}");
}

#[test]
fn precopy_over_tls_alone_is_verified() {
    migrate_verified(MigrationMode::Precopy, Psk::tls_only());
}

#[test]
fn precopy_over_tls_with_a_key_too_is_verified() {
    migrate_verified(MigrationMode::Precopy, Psk::random().unwrap());
}

#[test]
fn postcopy_over_tls_is_verified() {
    if let Err(e) = Uffd::probe() {
        skip(
            Capability::Uffd,
            "postcopy_over_tls_is_verified",
            format!("userfaultfd unavailable: {e}"),
        );
        return;
    }
    migrate_verified(MigrationMode::Postcopy, Psk::tls_only());
}

/// A migration the destination must refuse: the source's error, with the source intact.
fn refused(psk: Psk, make_channel: impl FnOnce(SocketAddr) -> Box<dyn MigrationChannel>) -> String {
    // Writers only in the first MiB: the rest must come out bit for bit as it was.
    let cfg = SyntheticConfig::new(8 * MIB).with_dirtying(MIB, 16 * MIB);
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let before = untouched_digest(&source);
    let (r, d) = run(
        &mut source,
        config(psk, MigrationMode::Precopy),
        Some(creds("")),
        None,
        make_channel,
    );
    let e = r.expect_err("the migration must be refused").to_string();
    assert!(d.is_err(), "the destination must not take a guest");
    assert!(source.running(), "the source keeps running");
    let written = source.pages_written();
    std::thread::sleep(Duration::from_millis(50));
    assert!(source.pages_written() > written, "its guest keeps writing");
    assert_eq!(untouched_digest(&source), before, "source memory changed");
    assert!(source.verify().ok());
    eprintln!("refused as expected: {e}");
    e
}

/// A digest of the source's memory past the writers' first MiB.
fn untouched_digest(vm: &SyntheticVm) -> u128 {
    let map = vm.memory_map();
    let pages = map.regions()[0].pages(map.page_size()) - 256;
    let (ptr, len) = map.span(RegionId(0), PageIndex(256), pages).unwrap();
    let mut b = vec![0u8; len];
    // Nothing writes past the working set (the writers stay inside it).
    // SAFETY: `span` checked the range against the map, which stays mapped while `vm` lives.
    unsafe { std::ptr::copy_nonoverlapping(ptr, b.as_mut_ptr(), len) };
    rdmig_transport::digest::digest_bytes(&b)
}

#[test]
fn a_wrong_ca_is_refused() {
    let e = refused(Psk::tls_only(), tls_to(creds("other-ca")));
    assert!(e.contains("not signed by our CA"), "{e}");
}

#[test]
fn an_expired_client_certificate_is_refused() {
    let e = refused(Psk::tls_only(), tls_to(creds("expired-client")));
    assert!(e.contains("expired"), "{e}");
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let bare = std::env::temp_dir().join(format!("rdmig-bare-{}", std::process::id()));
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(
        tls::test_creds_dir().join(tls::CA_CERT),
        bare.join(tls::CA_CERT),
    )
    .unwrap();
    let e = refused(Psk::tls_only(), tls_to(TlsCreds::from_dir(&bare).unwrap()));
    let _ = std::fs::remove_dir_all(&bare);
    assert!(e.contains("requires a client certificate"), "{e}");
}

#[test]
fn a_plain_tcp_source_is_refused_by_a_tls_destination() {
    let e = refused(Psk::random().unwrap(), |a| Box::new(TcpChannel(a)));
    assert!(e.contains("does the destination require TLS?"), "{e}");
    // Without a key and without TLS, the source refuses to start at all.
    let e = refused(Psk::tls_only(), |a| Box::new(TcpChannel(a)));
    assert!(e.contains("not TLS"), "{e}");
}

/// A TCP relay recording every byte the source sends (up to a bound).
struct Recorder {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    const MAX: usize = 64 << 20;

    fn new() -> Recorder {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let bytes: Arc<Mutex<Vec<u8>>> = Arc::default();
        let (t2, b2) = (target.clone(), bytes.clone());
        std::thread::spawn(move || {
            for inbound in l.incoming() {
                let Ok(a) = inbound else { return };
                let Some(t) = *t2.lock().unwrap() else { return };
                let Ok(b) = TcpStream::connect(t) else { return };
                let (a2, b2c) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                let rec = b2.clone();
                std::thread::spawn(move || pump(a, b, Some(rec)));
                std::thread::spawn(move || pump(b2c, a2, None));
            }
        });
        Recorder {
            addr,
            target,
            bytes,
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, rec: Option<Arc<Mutex<Vec<u8>>>>) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(r) = &rec {
            let mut r = r.lock().unwrap();
            if r.len() + n <= Recorder::MAX {
                r.extend_from_slice(&buf[..n]);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Whether the bytes the source sent contain page 100 of its guest.
fn capture(tls_on: bool) -> bool {
    let cfg = SyntheticConfig::new(8 * MIB);
    let mut source = SyntheticVm::start(&cfg).unwrap();
    let rec = Recorder::new();
    let (r, d) = if tls_on {
        run(
            &mut source,
            config(Psk::tls_only(), MigrationMode::Precopy),
            Some(creds("")),
            Some(&rec),
            tls_to(creds("")),
        )
    } else {
        run(
            &mut source,
            config(Psk::random().unwrap(), MigrationMode::Precopy),
            None,
            Some(&rec),
            |a| Box::new(TcpChannel(a)),
        )
    };
    let rep = r.unwrap();
    assert!(rep.verified && d.is_ok());
    assert_eq!(rep.tls.is_empty(), !tls_on);
    let map = source.memory_map();
    let (ptr, len) = map.span(RegionId(0), PageIndex(100), 1).unwrap();
    let mut page = vec![0u8; len];
    // The source is paused after the migration: nothing writes its memory now.
    // SAFETY: `span` checked the page against the map, which stays mapped while `source` lives.
    unsafe { std::ptr::copy_nonoverlapping(ptr, page.as_mut_ptr(), len) };
    assert!(page.iter().any(|&b| b != 0), "page 100 holds a pattern");
    let bytes = rec.bytes.lock().unwrap();
    assert!(
        bytes.len() as u64 > cfg.mem_bytes / 2,
        "the relay saw the migration"
    );
    bytes.windows(len).any(|w| w == &page[..])
}

#[test]
fn a_capture_shows_page_content_in_plain_tcp_and_none_in_tls() {
    assert!(capture(false), "the plain-TCP capture holds the page");
    assert!(!capture(true), "the TLS capture must not hold the page");
}
