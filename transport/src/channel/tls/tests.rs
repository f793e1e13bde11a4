//! TLS channels on loopback: data both ways through every I/O path, and each refusal with its
//! message.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use super::*;

const T: Duration = Duration::from_secs(10);

fn listener(creds: &TlsCreds) -> (TlsListener<TcpListener>, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (TlsListener::new(l, creds).unwrap(), addr)
}

fn accept(l: &TlsListener<TcpListener>, within: Duration) -> Option<Stream> {
    let t = Instant::now();
    while t.elapsed() < within {
        match l.poll_accept() {
            Ok((s, _)) => return Some(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("{e}"),
        }
    }
    None
}

fn creds(sub: &str) -> TlsCreds {
    TlsCreds::from_dir(test_creds_dir().join(sub)).unwrap()
}

#[test]
fn data_crosses_both_ways_through_every_path() {
    let c = creds("");
    let (l, addr) = listener(&c);
    let mut ch = TlsChannel::tcp(addr, &c, None).unwrap();
    let client = std::thread::spawn(move || ch.open(Purpose::Control, T).unwrap());
    let server = accept(&l, T).expect("the handshake completes");
    let client = client.join().unwrap();
    let want = if ktls::available() { "ktls" } else { "rustls" };
    assert_eq!(client.tls(), want);
    assert_eq!(server.tls(), want);

    (&client).write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    (&server).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");

    // 1 MiB + a header in one writev: more than the bounce buffer, several records.
    let data: Vec<u8> = (0..(1usize << 20) + 77)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let head = *b"HEAD";
    let sender = client.try_clone().unwrap();
    let (d, h) = (data.clone(), head);
    let t = std::thread::spawn(move || {
        let mut iov = [
            libc::iovec {
                iov_base: h.as_ptr().cast_mut().cast(),
                iov_len: h.len(),
            },
            libc::iovec {
                iov_base: d.as_ptr().cast_mut().cast(),
                iov_len: d.len(),
            },
        ];
        // SAFETY: both iovecs point at buffers this thread owns for the call.
        unsafe { sender.writev_all(&mut iov) }.unwrap();
    });
    let mut got = vec![0u8; head.len() + data.len()];
    // SAFETY: `got` is writable for its length.
    unsafe { server.recv_exact(got.as_mut_ptr(), got.len()) }.unwrap();
    t.join().unwrap();
    assert_eq!(&got[..4], b"HEAD");
    assert!(got[4..] == data[..]);

    // The end of the stream reads as the end.
    client.shutdown(std::net::Shutdown::Both).unwrap();
    let mut rest = Vec::new();
    (&server).read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

fn refused(client_creds: &TlsCreds, server_creds: &TlsCreds, host: Option<&str>) -> String {
    let (l, addr) = listener(server_creds);
    let mut ch = TlsChannel::tcp(addr, client_creds, host).unwrap();
    let client = std::thread::spawn(move || ch.open(Purpose::Control, T));
    let server = accept(&l, Duration::from_millis(1500));
    assert!(
        server.is_none(),
        "the destination must not yield a refused connection"
    );
    client.join().unwrap().unwrap_err().to_string()
}

#[test]
fn a_wrong_ca_an_expired_or_missing_client_certificate_or_name_are_refused() {
    let good = creds("");
    let e = refused(&creds("other-ca"), &good, None);
    assert!(e.contains("not signed by our CA"), "{e}");
    let e = refused(&good, &creds("other-ca"), None);
    assert!(
        e.contains("destination's certificate is not signed by our CA"),
        "{e}"
    );
    let e = refused(&creds("expired-client"), &good, None);
    assert!(e.contains("expired"), "{e}");
    let e = refused(&good, &good, Some("migration.example"));
    assert!(e.contains("does not name"), "{e}");

    let bare = std::env::temp_dir().join(format!("rdmig-bare-creds-{}", std::process::id()));
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(test_creds_dir().join(CA_CERT), bare.join(CA_CERT)).unwrap();
    let e = refused(&TlsCreds::from_dir(&bare).unwrap(), &good, None);
    assert!(e.contains("requires a client certificate"), "{e}");
    let _ = std::fs::remove_dir_all(&bare);
}

#[test]
fn a_peer_not_speaking_tls_is_named() {
    let good = creds("");
    // A TLS source to a plain destination.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let plain = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
        s.write_all(b"RDMG plain protocol bytes").unwrap();
    });
    let e = TlsChannel::tcp(addr, &good, None)
        .unwrap()
        .open(Purpose::Control, T)
        .unwrap_err()
        .to_string();
    plain.join().unwrap();
    assert!(e.contains("not speaking TLS"), "{e}");

    // A plain source to a TLS destination: refused, never yielded.
    let (l, addr) = listener(&good);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"RDMG plain protocol bytes").unwrap();
    assert!(accept(&l, Duration::from_millis(500)).is_none());
    let mut b = [0u8; 1];
    s.set_read_timeout(Some(T)).unwrap();
    assert_eq!(s.read(&mut b).unwrap_or(0), 0, "the destination hangs up");
}

#[test]
fn kernel_tls_takes_over_where_the_kernel_has_it() {
    if !ktls::available() {
        crate::require::skip(
            crate::require::Capability::Ktls,
            "kernel_tls_takes_over_where_the_kernel_has_it",
            "this kernel has no tls ULP (/proc/sys/net/ipv4/tcp_available_ulp; modprobe tls): \
             user-space rustls is used",
        );
        return;
    }
    let c = creds("");
    let (l, addr) = listener(&c);
    let mut ch = TlsChannel::tcp(addr, &c, None).unwrap();
    let client = std::thread::spawn(move || ch.open(Purpose::Data(0), T).unwrap());
    let server = accept(&l, T).expect("the handshake completes");
    let client = client.join().unwrap();
    assert_eq!((client.tls(), server.tls()), ("ktls", "ktls"));
    let data: Vec<u8> = (0..1usize << 20).map(|i| (i % 253) as u8).collect();
    let d = data.clone();
    let t = std::thread::spawn(move || (&client).write_all(&d).unwrap());
    let mut got = vec![0u8; data.len()];
    (&server).read_exact(&mut got).unwrap();
    t.join().unwrap();
    assert!(got == data);
}

#[test]
fn the_user_space_record_layer_speaks_standard_tls_with_rustls() {
    // The destination's end is ours (rustls for the handshake, the record layer after it);
    // the client is plain rustls all through, records and close_notify included.
    let c = creds("");
    let (l, addr) = listener(&c);
    let client = std::thread::spawn(move || {
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = ClientConnection::new(c.client_config().unwrap(), name).unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let mut confirm = [0u8; 1];
        tls.read_exact(&mut confirm).unwrap();
        let up: Vec<u8> = (0..300_001usize).map(|i| (i % 241) as u8).collect();
        tls.write_all(&up).unwrap();
        tls.flush().unwrap();
        let mut down = Vec::new();
        tls.read_to_end(&mut down).unwrap();
        down
    });
    let server = accept(&l, T).expect("the handshake completes");
    if ktls::available() {
        return; // the kernel speaks for itself
    }
    assert_eq!(server.tls(), "rustls");
    let mut up = vec![0u8; 300_001];
    (&server).read_exact(&mut up).unwrap();
    assert!(up.iter().enumerate().all(|(i, &b)| b == (i % 241) as u8));
    let down: Vec<u8> = (0..500_000usize).map(|i| (i % 239) as u8).collect();
    let mut iov = [libc::iovec {
        iov_base: down.as_ptr().cast_mut().cast(),
        iov_len: down.len(),
    }];
    // SAFETY: the iovec points at `down`, alive for the call.
    unsafe { server.writev_all(&mut iov) }.unwrap();
    server.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        client.join().unwrap() == down,
        "rustls reads our records and close_notify"
    );
}

#[test]
fn a_forged_record_is_refused() {
    if ktls::available() {
        return; // the kernel checks its own records
    }
    let c = creds("");
    let (l, addr) = listener(&c);
    let mut ch = TlsChannel::tcp(addr, &c, None).unwrap();
    let client = std::thread::spawn(move || ch.open(Purpose::Control, T).unwrap());
    let server = accept(&l, T).expect("the handshake completes");
    let client = client.join().unwrap();
    let Stream::Tls(t) = &client else {
        panic!("a TLS stream")
    };
    // A well-formed record header with 32 bytes that no key sealed.
    let mut forged = vec![0x17, 3, 3, 0, 32];
    forged.extend([0x5a; 32]);
    let mut raw = t.socket();
    raw.write_all(&forged).unwrap();
    let mut b = [0u8; 1];
    let e = (&server).read(&mut b).unwrap_err().to_string();
    assert!(e.contains("failed authentication"), "{e}");
}
