//! Hostile peers against a real destination and a real source (real sockets, the synthetic
//! VM): silent, dripping and unauthenticated connections, a destination that forges its
//! digest, an unauthenticated one that tries to inject text, a guest too large for the
//! destination, and a bandwidth cap that must not sleep through an abort. Each test bounds
//! its own time.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rdmig_transport::auth::Psk;
use rdmig_transport::control::Control;
use rdmig_transport::session::{accept, migrate, MigrationConfig};
use rdmig_transport::wire::{
    Command, Header, HelloAck, Message, TransportKind, MAGIC, PROTOCOL_VERSION,
};
use rdmig_transport::Error;
use rdmig_vmm::synthetic::{synthetic_destination_factory, SyntheticConfig, SyntheticVm};

const MIB: u64 = 1 << 20;

fn config(psk: &Psk) -> MigrationConfig {
    MigrationConfig::new(psk.clone())
        .with_transport(TransportKind::Tcp)
        .with_streams(2)
        .with_downtime_limit(Duration::from_millis(100))
        .with_io_timeout(Duration::from_secs(3))
}

fn vm_config() -> SyntheticConfig {
    SyntheticConfig::new(32 * MIB).with_dirtying(4 * MIB, 16 * MIB)
}

/// Asserts the source VM runs with its memory intact after a failed migration.
fn assert_running_intact(src: &SyntheticVm) {
    assert!(src.running(), "the source VM must run on");
    let before = src.pages_written();
    thread::sleep(Duration::from_millis(100));
    assert!(
        src.pages_written() > before,
        "the source VM's writers stopped"
    );
    assert!(src.verify().ok(), "the source VM's memory is damaged");
}

/// A destination in a thread; the listener's address and the thread.
fn destination(
    cfg: MigrationConfig,
) -> (SocketAddr, thread::JoinHandle<Result<SyntheticVm, Error>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest_cfg = SyntheticConfig {
        dirty_rate: 0,
        ..vm_config()
    };
    let h = thread::spawn(move || {
        accept(
            &listener,
            &cfg,
            synthetic_destination_factory(dest_cfg, None),
        )
        .map(|(vm, _)| {
            *vm.into_any()
                .downcast::<SyntheticVm>()
                .expect("a synthetic VM")
        })
    });
    (addr, h)
}

/// A connection that sends a control header one byte at a time, a byte every `gap`.
fn dripper(addr: SocketAddr, gap: Duration, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return;
        };
        let hdr = [MAGIC.as_slice(), &[1, 0, 1, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]].concat();
        for b in hdr.iter().cycle() {
            if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(gap);
        }
    })
}

#[test]
fn silent_dripping_and_unauthenticated_connections_neither_end_nor_delay_the_listener() {
    let t0 = Instant::now();
    let psk = Psk::random().unwrap();
    let (addr, dest) = destination(config(&psk).with_listen_timeout(Some(Duration::from_secs(60))));
    // Before the real source: more silent connections than the listener serves handshakes at
    // once (the oldest are evicted, never the newest), connections that drip a byte every
    // 300 ms (each read well within the 3 s I/O timeout), garbage, and a source with the wrong key.
    let stop = Arc::new(AtomicBool::new(false));
    let silent: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let drippers: Vec<_> = (0..3)
        .map(|_| dripper(addr, Duration::from_millis(300), stop.clone()))
        .collect();
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(&[0xffu8; 64]).unwrap();
    let mut wrong = SyntheticVm::start(&vm_config()).unwrap();
    let e = migrate(
        &mut wrong,
        addr,
        &config(&Psk::random().unwrap()),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert_running_intact(&wrong);
    wrong.stop();

    // Silent connections opened right after the real source's control connection too (they
    // land among its data streams).
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        (0..80)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect::<Vec<_>>()
    });
    let mut src = SyntheticVm::start(&vm_config()).unwrap();
    thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    let rep = migrate(&mut src, addr, &config(&psk), &mut |_| {}).expect("the real migration");
    let took = started.elapsed();
    assert!(rep.verified);
    // Not delayed by any of them: well within one greeting timeout (5 s) or I/O timeout (3 s).
    assert!(
        took < Duration::from_secs(3),
        "the real migration took {took:?} among hostile connections"
    );
    let mut dvm = dest
        .join()
        .unwrap()
        .expect("the destination completed the real one");
    assert!(dvm.verify().ok());
    // The dripping connections were dropped: their writes fail once the listener cut them.
    stop.store(true, Ordering::Relaxed);
    for d in drippers {
        d.join().unwrap();
    }
    drop((silent, garbage, late.join().unwrap()));
    dvm.stop();
    src.stop();
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_dripping_peer_is_timed_out_per_message_on_both_ends() {
    // Destination side: a Control reading from a peer that drips one byte every 200 ms, each
    // read well within the 1 s timeout, must still give up about 1 s after it started.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let d = dripper(addr, Duration::from_millis(200), stop.clone());
    let (s, _) = l.accept().unwrap();
    let mut ctl = Control::new(s, Some(Duration::from_secs(1))).unwrap();
    let t = Instant::now();
    let e = ctl.recv_any().unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "gave up after {:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("part of a message"), "{e}");
    stop.store(true, Ordering::Relaxed);
    drop(ctl);
    d.join().unwrap();

    // Source side: a "destination" that drips its HelloAck; migrate gives up within about
    // one I/O timeout and the source VM runs on.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let fake = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 512];
        let _ = s.read(&mut b);
        let hdr = [MAGIC.as_slice(), &[1, 0, 2, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]].concat();
        for x in hdr.iter().cycle().take(40) {
            if s.write_all(&[*x]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(250));
        }
    });
    let mut src = SyntheticVm::start(&vm_config()).unwrap();
    let t = Instant::now();
    let cfg = config(&Psk::random().unwrap()).with_io_timeout(Duration::from_secs(1));
    let e = migrate(&mut src, addr, &cfg, &mut |_| {}).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "{:?}: {e}",
        t.elapsed()
    );
    assert_running_intact(&src);
    src.stop();
    fake.join().unwrap();
}

/// Writes a raw header announcing `len` payload bytes of command `cmd`.
fn raw_header(cmd: Command, len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend(PROTOCOL_VERSION.to_le_bytes());
    h.extend((cmd as u16).to_le_bytes());
    h.extend(len.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    assert_eq!(h.len(), size_of::<Header>());
    h
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_huge_announced_payload_allocates_nothing_before_the_bytes_arrive() {
    // Before authentication: 16 bytes announcing a 256 MiB DeviceState are refused at once.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut peer = TcpStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    let mut ctl = Control::new(s, Some(Duration::from_secs(2))).unwrap();
    peer.write_all(&raw_header(Command::DeviceState, 256 << 20))
        .unwrap();
    let before = rss_kib();
    let e = ctl.recv_any().unwrap_err();
    assert!(
        e.to_string().contains("before the peer authenticated"),
        "{e}"
    );
    // After authentication, in a state that expects another message: refused from the header.
    ctl.set_authenticated();
    peer.write_all(&raw_header(Command::DeviceState, 256 << 20))
        .unwrap();
    let e = ctl
        .recv_filtered("awaiting RoundDone", &|c| c == Command::RoundDone)
        .unwrap_err();
    assert!(matches!(e, Error::UnexpectedMessage { .. }), "{e}");
    // Where it is expected, the buffer grows with what arrives: 1 MiB sent, then silence.
    peer.write_all(&raw_header(Command::DeviceState, 256 << 20))
        .unwrap();
    peer.write_all(&vec![0u8; MIB as usize]).unwrap();
    let e = ctl.recv_any().unwrap_err();
    assert!(e.to_string().contains("part of a message"), "{e}");
    let grew = rss_kib().saturating_sub(before);
    // 256 MiB would be 262144 KiB; what arrived plus one chunk ahead is about 2 MiB.
    assert!(grew < 64 * 1024, "RSS grew by {grew} KiB");
}

/// A relay to `target` for every connection it accepts; on the first one (the control
/// connection) it rewrites the destination's `Complete` with a different digest.
fn forging_relay(target: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let mut first = true;
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(u) = TcpStream::connect(target) else {
                return;
            };
            let forge = std::mem::replace(&mut first, false);
            let (c2, u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
            thread::spawn(move || copy(c, u, false));
            thread::spawn(move || copy(u2, c2, forge));
        }
    });
    addr
}

/// Copies `from` to `to`; with `forge`, frame by frame, flipping a digest byte in `Complete`.
fn copy(mut from: TcpStream, mut to: TcpStream, forge: bool) {
    if !forge {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
        return;
    }
    loop {
        let mut h = [0u8; 16];
        if from.read_exact(&mut h).is_err() {
            let _ = to.shutdown(std::net::Shutdown::Write);
            return;
        }
        let cmd = u16::from_le_bytes([h[6], h[7]]);
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let mut p = vec![0u8; len];
        if from.read_exact(&mut p).is_err() {
            return;
        }
        if cmd == Command::Complete as u16 {
            p[0] ^= 0xff;
        }
        if to.write_all(&h).is_err() || to.write_all(&p).is_err() {
            return;
        }
    }
}

#[test]
fn a_forged_digest_in_complete_keeps_the_source_vm() {
    let psk = Psk::random().unwrap();
    let (addr, dest) = destination(config(&psk));
    let relay = forging_relay(addr);
    let mut src = SyntheticVm::start(&vm_config()).unwrap();
    thread::sleep(Duration::from_millis(50));
    let e = migrate(&mut src, relay, &config(&psk), &mut |_| {}).unwrap_err();
    // Kept, not dropped: paused (the destination claims it runs the guest), and said so.
    assert!(
        matches!(&e, Error::SwitchoverUnknown(m) if matches!(**m, Error::DigestMismatch { .. })),
        "{e}"
    );
    assert!(
        !src.running(),
        "the source VM must stay paused, not run twice"
    );
    assert!(src.verify().ok(), "the source VM's memory must be intact");
    // The destination's own check passed (the forgery was on the wire), so it runs the guest:
    // one copy runs, the other is kept paused, and the source said which.
    let mut dvm = dest
        .join()
        .unwrap()
        .expect("the destination resumed the guest");
    assert!(dvm.verify().ok());
    dvm.stop();
    src.stop();
}

#[test]
fn an_unauthenticated_destination_cannot_inject_text() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let forged = "x\nrdma-bench: migration complete, verified OK\x1b[2K\r";
    let fake = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut c = Control::new(s, Some(Duration::from_secs(5))).unwrap();
        let _ = c.recv_any();
        // Neither the abort reason nor the HelloAck reason of a peer without the key shows.
        c.send(&Message::HelloAck(HelloAck {
            version: PROTOCOL_VERSION,
            transport: TransportKind::Tcp,
            caps: 1,
            nonce: [1; 32],
            mac: [2; 32],
            reason: forged.into(),
        }))
        .unwrap();
        c.send(&Message::Abort(forged.into())).unwrap();
    });
    let mut src = SyntheticVm::start(&vm_config()).unwrap();
    let e = migrate(
        &mut src,
        addr,
        &config(&Psk::random().unwrap()),
        &mut |_| {},
    )
    .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains("verified OK"), "{text}");
    assert!(!text.contains('\n') && !text.contains('\x1b'), "{text}");
    assert_running_intact(&src);
    src.stop();
    fake.join().unwrap();

    // Once authenticated, a peer's text is shown, escaped: no raw newline or escape.
    let m = Message::decode(Command::Abort, forged.as_bytes()).unwrap();
    let Message::Abort(r) = m else { panic!() };
    assert!(
        !r.contains('\n') && !r.contains('\x1b') && r.contains("\\u{a}"),
        "{r}"
    );
}

#[test]
fn a_guest_larger_than_the_destination_accepts_is_refused_before_it_is_built() {
    let psk = Psk::random().unwrap();
    let (addr, dest) = destination(config(&psk).with_max_guest_bytes(16 * MIB));
    let mut src = SyntheticVm::start(&vm_config()).unwrap();
    let e = migrate(&mut src, addr, &config(&psk), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("guest too large"), "{e}");
    let de = dest.join().unwrap().unwrap_err();
    assert!(matches!(de, Error::GuestTooLarge(_)), "{de}");
    assert_running_intact(&src);
    src.stop();
}

#[test]
fn the_bandwidth_cap_does_not_sleep_through_an_abort() {
    // 32 MiB at 1 MiB/s would take 32 s; the destination gives up after its 2 s I/O timeout
    // without a round, and the source must end within a few seconds of that, not 30 s later.
    let psk = Psk::random().unwrap();
    let (addr, dest) = destination(config(&psk).with_io_timeout(Duration::from_secs(2)));
    let mut src = SyntheticVm::start(&vm_config()).unwrap();
    let cfg = config(&psk)
        .with_io_timeout(Duration::from_secs(2))
        .with_max_bandwidth(Some(MIB));
    let t = Instant::now();
    let e = migrate(&mut src, addr, &cfg, &mut |_| {}).unwrap_err();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the source ended after {took:?}: {e}"
    );
    let _ = dest.join().unwrap();
    assert_running_intact(&src);
    src.stop();
}
