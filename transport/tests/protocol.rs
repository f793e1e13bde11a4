//! Wire protocol: round trips of every message, and rejection of truncated, oversized,
//! malformed, out-of-range and out-of-order input — at the codec and at a live destination.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdmig_transport::auth::Psk;
use rdmig_transport::control::Control;
use rdmig_transport::mem::{
    GuestAddress, GuestMemoryMap, MmapBacking, MmapRegion, PageIndex, RegionId,
};
use rdmig_transport::pages::PageRange;
use rdmig_transport::session::{accept, MigrationConfig};
use rdmig_transport::vm::{DestinationFactory, DestinationVm, MemoryLayout};
use rdmig_transport::wire::*;
use rdmig_transport::{Error, VmmError};

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            version: 1,
            transport: TransportKind::Auto,
            mode: 2,
            caps: caps::TCP | caps::RDMA,
            streams: 4,
            qps: 2,
            max_bandwidth: 7,
            nonce: [9; 32],
        }),
        Message::HelloAck(HelloAck {
            version: 1,
            transport: TransportKind::Tcp,
            caps: caps::TCP,
            nonce: [3; 32],
            mac: [4; 32],
            reason: "because".into(),
        }),
        Message::AuthProof([5; 32]),
        Message::AuthOk,
        Message::RegionTable {
            page_size: 4096,
            regions: vec![(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 8192)],
        },
        Message::DataSetup(vec![1, 2, 3]),
        Message::DataSetupAck(vec![]),
        Message::Ready,
        Message::Round(Round {
            round: 3,
            chunk: 1,
            flags: ROUND_FINAL | ROUND_LAST_CHUNK,
            ranges: vec![PageRange {
                region: RegionId(1),
                first: PageIndex(5),
                npages: 2,
            }],
        }),
        Message::RoundDone(RoundDone {
            round: 3,
            pages: 2,
            bytes: 8192,
            micros: 77,
        }),
        Message::DeviceState(vec![0xAB; 1000]),
        Message::Switchover {
            digest: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
            pages: 258,
        },
        Message::Complete(Complete {
            digest: 1,
            cpu_micros: 2,
            resume_micros: 3,
            pages: 4,
            bytes: 5,
        }),
        Message::Finish,
        Message::Abort("no space left".into()),
        Message::PostcopyMissing {
            chunk: 2,
            flags: POSTCOPY_LAST_CHUNK,
            ranges: vec![PageRange {
                region: RegionId(0),
                first: PageIndex(9),
                npages: 7,
            }],
        },
        Message::PostcopyResumed {
            resume_micros: 812,
            missing: 4096,
        },
        Message::PostcopyDropped {
            micros: 77,
            pages: 12,
        },
        Message::PostcopyComplete(PostcopyComplete {
            complete: Complete {
                digest: 9,
                cpu_micros: 8,
                resume_micros: 0,
                pages: 7,
                bytes: 6,
            },
            faults: 5,
            fault_pages: 4,
            postcopy_micros: 3,
            latency_ns: [10, 20, 30, 40, 50],
        }),
    ]
}

fn decode(bytes: &[u8]) -> Result<Message, Error> {
    let hdr: [u8; 16] = bytes[..16].try_into().unwrap();
    let (cmd, len) = Message::check_header(&hdr)?;
    if bytes.len() - 16 != len {
        return Err(Error::Protocol("length".into()));
    }
    Message::decode(cmd, &bytes[16..])
}

#[test]
fn every_message_round_trips() {
    for m in all_messages() {
        let b = m.encode().unwrap();
        assert_eq!(decode(&b).unwrap(), m, "{}", m.name());
        assert_eq!(&b[..4], b"RDMG");
        // little-endian length field
        assert_eq!(
            u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize,
            b.len() - 16
        );
    }
}

#[test]
fn truncated_and_extended_payloads_are_rejected() {
    for m in all_messages() {
        let b = m.encode().unwrap();
        let payload = &b[16..];
        let (cmd, _) = Message::check_header(b[..16].try_into().unwrap()).unwrap();
        let variable = matches!(
            m,
            Message::DataSetup(_)
                | Message::DataSetupAck(_)
                | Message::DeviceState(_)
                | Message::Abort(_)
                | Message::HelloAck(_)
        );
        if !payload.is_empty() && !variable {
            assert!(
                Message::decode(cmd, &payload[..payload.len() - 1]).is_err(),
                "truncated {} accepted",
                m.name()
            );
        }
        if !variable {
            let mut longer = payload.to_vec();
            longer.push(0);
            assert!(
                Message::decode(cmd, &longer).is_err(),
                "extended {} accepted",
                m.name()
            );
        }
    }
    assert!(Message::decode(Command::HelloAck, &[0; 10]).is_err());
}

#[test]
fn bad_headers_are_rejected_before_reading_the_payload() {
    let good = Message::Ready.encode().unwrap();
    let mut h: [u8; 16] = good[..16].try_into().unwrap();
    h[0] = b'X';
    assert!(matches!(Message::check_header(&h), Err(Error::Protocol(_))));
    let mut h: [u8; 16] = good[..16].try_into().unwrap();
    h[4] = 2;
    assert!(matches!(
        Message::check_header(&h),
        Err(Error::VersionMismatch { peer: 2, ours: 1 })
    ));
    let mut h: [u8; 16] = good[..16].try_into().unwrap();
    h[6] = 0;
    assert!(Message::check_header(&h).is_err(), "command 0 is invalid");
    h[6] = 200;
    assert!(Message::check_header(&h).is_err(), "unknown command");
    let mut h: [u8; 16] = good[..16].try_into().unwrap();
    h[12] = 1;
    assert!(
        matches!(Message::check_header(&h), Err(Error::Protocol(s)) if s.contains("reserved")),
        "a header whose reserved field is not zero"
    );
    // oversized: a Round announcing 2 GiB of payload
    let mut h: [u8; 16] = Message::Round(Round {
        round: 0,
        chunk: 0,
        flags: 0,
        ranges: vec![],
    })
    .encode()
    .unwrap()[..16]
        .try_into()
        .unwrap();
    h[8..12].copy_from_slice(&(1u32 << 31).to_le_bytes());
    assert!(matches!(Message::check_header(&h), Err(Error::Protocol(s)) if s.contains("exceeds")));
}

#[test]
fn array_counts_must_match_the_bytes() {
    let m = Message::Round(Round {
        round: 0,
        chunk: 0,
        flags: 0,
        ranges: vec![
            PageRange {
                region: RegionId(0),
                first: PageIndex(0),
                npages: 1
            };
            3
        ],
    });
    let mut b = m.encode().unwrap();
    b[16 + 12..16 + 16].copy_from_slice(&4u32.to_le_bytes()); // count = 4, 3 present
    assert!(decode(&b).is_err());
    b[16 + 12..16 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode(&b).is_err());
    // an empty range is malformed
    let m = Message::Round(Round {
        round: 0,
        chunk: 0,
        flags: 0,
        ranges: vec![PageRange {
            region: RegionId(0),
            first: PageIndex(0),
            npages: 1,
        }],
    });
    let mut b = m.encode().unwrap();
    b[16 + 16 + 4..16 + 16 + 8].copy_from_slice(&0u32.to_le_bytes());
    assert!(decode(&b).is_err());
    // too many regions
    let regions = vec![(GuestAddress(0), 4096); MAX_REGIONS + 1];
    assert!(Message::RegionTable {
        page_size: 4096,
        regions
    }
    .encode()
    .is_err());
}

// ---- against a live destination -------------------------------------------------------

struct Vm {
    _mem: MmapRegion,
    map: GuestMemoryMap,
}

impl DestinationVm for Vm {
    fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }
    fn restore_state(&mut self, _: &[u8]) -> Result<(), VmmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

fn factory(built: Arc<AtomicBool>) -> DestinationFactory<'static> {
    Box::new(move |layout: &MemoryLayout| {
        built.store(true, Ordering::SeqCst);
        let mem = MmapRegion::new(layout.total_bytes(), MmapBacking::Anonymous, false)?;
        // SAFETY: the mapping lives in the returned VM alongside the map.
        let region = unsafe { mem.guest_region(layout.regions[0].0) };
        let map = GuestMemoryMap::new(vec![region], layout.page_size)?;
        Ok(Box::new(Vm { _mem: mem, map }) as Box<dyn DestinationVm>)
    })
}

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// A hand-driven source: authenticates, then lets the test send whatever it wants.
fn fake_source(port: u16, key: &[u8], streams: u16) -> (Control, [u8; 32], [u8; 32]) {
    let psk = Psk::new(key.to_vec()).unwrap();
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut c = Control::new(s, Some(Duration::from_secs(10))).unwrap();
    let nonce_s = [7u8; 32];
    c.send(&Message::Hello(Hello {
        version: 1,
        transport: TransportKind::Tcp,
        mode: 0,
        caps: caps::TCP,
        streams,
        qps: 1,
        max_bandwidth: 0,
        nonce: nonce_s,
    }))
    .unwrap();
    let Message::HelloAck(ack) = c.recv().unwrap() else {
        panic!("no HelloAck")
    };
    // (A real source checks the destination's proof first; this one trusts it.)
    c.set_authenticated();
    c.send(&Message::AuthProof(psk.source_proof(&nonce_s, &ack.nonce)))
        .unwrap();
    (c, nonce_s, ack.nonce)
}

fn destination() -> (
    u16,
    Arc<AtomicBool>,
    std::thread::JoinHandle<Result<(), Error>>,
) {
    destination_with_timeout(Duration::from_secs(10))
}

fn destination_with_timeout(
    t: Duration,
) -> (
    u16,
    Arc<AtomicBool>,
    std::thread::JoinHandle<Result<(), Error>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let built = Arc::new(AtomicBool::new(false));
    let b = built.clone();
    let h = std::thread::spawn(move || {
        // The listener keeps serving after a refused handshake: the listen timeout ends it
        // (with the last refusal) in the tests that refuse one.
        let cfg = MigrationConfig::new(Psk::new(KEY.to_vec()).unwrap())
            .with_io_timeout(t)
            .with_listen_timeout(Some(Duration::from_secs(3)));
        accept(&listener, &cfg, factory(b)).map(|_| ())
    });
    (port, built, h)
}

#[test]
fn a_wrong_key_is_rejected_before_any_region_is_announced() {
    let (port, built, h) = destination();
    let (mut c, _, _) = fake_source(port, b"another key of 32 bytes........!", 1);
    // The destination refuses the proof with an Abort, never AuthOk.
    match c.recv() {
        Err(Error::PeerAborted(r)) => assert!(r.contains("authentication"), "{r}"),
        other => panic!("expected an abort, got {other:?}"),
    }
    let e = h.join().unwrap().unwrap_err();
    assert!(matches!(e, Error::AuthFailed(_)), "{e}");
    assert!(
        !built.load(Ordering::SeqCst),
        "the destination built a VM for an unauthenticated peer"
    );
}

#[test]
fn out_of_order_messages_are_rejected() {
    let (port, built, h) = destination();
    let (mut c, _, _) = fake_source(port, KEY, 1);
    assert_eq!(c.recv().unwrap(), Message::AuthOk);
    // A round before the region table.
    c.send(&Message::Round(Round {
        round: 0,
        chunk: 0,
        flags: ROUND_LAST_CHUNK,
        ranges: vec![],
    }))
    .unwrap();
    assert!(matches!(c.recv(), Err(Error::PeerAborted(r)) if r.contains("unexpected")));
    let e = h.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnexpectedMessage {
                state: "awaiting RegionTable",
                ..
            }
        ),
        "{e}"
    );
    assert!(!built.load(Ordering::SeqCst));
}

fn attach_streams(port: u16, nonce_s: &[u8; 32], nonce_d: &[u8; 32], n: u16) -> Vec<TcpStream> {
    let psk = Psk::new(KEY.to_vec()).unwrap();
    let token = psk.stream_token(nonce_s, nonce_d);
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(bytemuck::bytes_of(&StreamHello::new(i, n, token)))
                .unwrap();
            s
        })
        .collect()
}

fn up_to_rounds(port: u16) -> (Control, Vec<TcpStream>) {
    let (mut c, ns, nd) = fake_source(port, KEY, 1);
    assert_eq!(c.recv().unwrap(), Message::AuthOk);
    c.send(&Message::RegionTable {
        page_size: 4096,
        regions: vec![(GuestAddress(0), 64 * 4096)],
    })
    .unwrap();
    c.send(&Message::DataSetup(vec![])).unwrap();
    assert_eq!(c.recv().unwrap(), Message::DataSetupAck(vec![]));
    let streams = attach_streams(port, &ns, &nd, 1);
    assert_eq!(c.recv().unwrap(), Message::Ready);
    (c, streams)
}

#[test]
fn ranges_outside_the_regions_are_rejected() {
    let (port, built, h) = destination();
    let (mut c, _streams) = up_to_rounds(port);
    assert!(built.load(Ordering::SeqCst));
    let bad = PageRange {
        region: RegionId(0),
        first: PageIndex(60),
        npages: 5,
    };
    c.send(&Message::Round(Round {
        round: 0,
        chunk: 0,
        flags: ROUND_LAST_CHUNK,
        ranges: vec![bad],
    }))
    .unwrap();
    assert!(matches!(c.recv(), Err(Error::PeerAborted(r)) if r.contains("outside region")));
    let e = h.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            Error::RangeOutOfBounds {
                region: 0,
                first_page: 60,
                npages: 5,
                region_pages: 64
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_regions_and_skipped_rounds_are_rejected() {
    let (port, _, h) = destination();
    let (mut c, _streams) = up_to_rounds(port);
    let bad = PageRange {
        region: RegionId(3),
        first: PageIndex(0),
        npages: 1,
    };
    c.send(&Message::Round(Round {
        round: 0,
        chunk: 0,
        flags: ROUND_LAST_CHUNK,
        ranges: vec![bad],
    }))
    .unwrap();
    assert!(c.recv().is_err());
    assert!(matches!(
        h.join().unwrap().unwrap_err(),
        Error::UnknownRegion(3)
    ));

    let (port, _, h) = destination();
    let (mut c, _streams) = up_to_rounds(port);
    c.send(&Message::Round(Round {
        round: 1,
        chunk: 0,
        flags: ROUND_LAST_CHUNK,
        ranges: vec![],
    }))
    .unwrap();
    assert!(c.recv().is_err());
    let e = h.join().unwrap().unwrap_err();
    assert!(matches!(e, Error::UnexpectedMessage { .. }), "{e}");
}

#[test]
fn data_streams_with_a_wrong_token_are_refused() {
    let (port, _, h) = destination_with_timeout(Duration::from_secs(1));
    let (mut c, _ns, _nd) = fake_source(port, KEY, 1);
    assert_eq!(c.recv().unwrap(), Message::AuthOk);
    c.send(&Message::RegionTable {
        page_size: 4096,
        regions: vec![(GuestAddress(0), 64 * 4096)],
    })
    .unwrap();
    c.send(&Message::DataSetup(vec![])).unwrap();
    assert_eq!(c.recv().unwrap(), Message::DataSetupAck(vec![]));
    let _bad = attach_streams(port, &[0; 32], &[0; 32], 1);
    // The forged stream does not count: the destination times out waiting for a real one.
    let e = h.join().unwrap().unwrap_err();
    assert!(
        matches!(&e, Error::Timeout(s) if s.contains("0 of 1 data streams")),
        "{e}"
    );
    assert!(c.recv().is_err());
}

#[test]
fn postcopy_messages_are_refused_in_a_precopy_session() {
    // Hello said pre-copy: neither a device state in the middle of the rounds nor a post-copy
    // set is valid.
    for m in [
        Message::DeviceState(vec![1, 2, 3]),
        Message::PostcopyMissing {
            chunk: 0,
            flags: POSTCOPY_EARLY | POSTCOPY_LAST_CHUNK,
            ranges: vec![],
        },
        Message::PostcopyResumed {
            resume_micros: 1,
            missing: 1,
        },
    ] {
        let (port, _, h) = destination();
        let (mut c, _streams) = up_to_rounds(port);
        c.send(&m).unwrap();
        assert!(matches!(c.recv(), Err(Error::PeerAborted(r)) if r.contains("unexpected")));
        let e = h.join().unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                Error::UnexpectedMessage {
                    state: "in pre-copy",
                    ..
                }
            ),
            "{m:?}: {e}"
        );
    }
}

#[test]
fn a_postcopy_hello_without_the_capability_is_refused() {
    let (port, _, h) = destination();
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut c = Control::new(s, Some(Duration::from_secs(10))).unwrap();
    let hello = Hello {
        version: 1,
        transport: TransportKind::Tcp,
        mode: 1,
        caps: caps::TCP,
        streams: 1,
        qps: 1,
        max_bandwidth: 0,
        nonce: [7; 32],
    };
    c.send(&Message::Hello(hello)).unwrap();
    // Unauthenticated, the source learns only the kind of failure; the detail stays here.
    c.set_authenticated();
    assert!(
        matches!(c.recv(), Err(Error::PeerAborted(r)) if r == "protocol error in the handshake")
    );
    let e = h.join().unwrap().unwrap_err();
    assert!(
        matches!(&e, Error::Protocol(m) if m.contains("post-copy capability")),
        "{e}"
    );
}
