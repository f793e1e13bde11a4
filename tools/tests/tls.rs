//! `rdma-bench migrate` with `--tls-creds`: a loopback migration over TLS alone, verified and
//! reporting who encrypted; `--listen`/`--connect` with `--tls-hostname`; and bad TLS
//! arguments refused with one clear line before any VM is built.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rdmig_transport::channel::tls::test_creds_dir;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rdma-bench"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tls_kind() -> &'static str {
    if rdmig_transport::channel::tls::ktls::available() {
        "ktls"
    } else {
        "rustls"
    }
}

#[test]
fn loopback_over_tls_alone_is_verified_and_says_who_encrypts() {
    let creds = test_creds_dir();
    let o = bench()
        .args([
            "migrate",
            "--loopback",
            "--vm",
            "synthetic",
            "--transport",
            "tcp",
        ])
        .args([
            "--mem",
            "32MiB",
            "--working-set",
            "4MiB",
            "--dirty-rate",
            "16MiB/s",
        ])
        .arg("--tls-creds")
        .arg(&creds)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["guest_verified"], true, "{v}");
    assert_eq!(v["tls"], tls_kind(), "{v}");
    assert_eq!(v["dest_tls"], tls_kind(), "{v}");

    // The summary says it too.
    let o = bench()
        .args([
            "migrate",
            "--loopback",
            "--vm",
            "synthetic",
            "--transport",
            "tcp",
        ])
        .args(["--mem", "16MiB"])
        .arg("--tls-creds")
        .arg(&creds)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("in TLS ({})", tls_kind())), "{out}");
}

fn wait_port(f: &std::path::Path) -> u16 {
    let t = Instant::now();
    loop {
        if let Some(p) = std::fs::read_to_string(f)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "destination never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn listen_and_connect_check_the_hostname() {
    let creds = test_creds_dir();
    let d = std::env::temp_dir().join(format!("rdmig-cli-tls-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let port_file = d.join("port");
    let listen = |port_file: &std::path::Path| {
        bench()
            .args([
                "migrate",
                "--listen",
                "127.0.0.1:0",
                "--vm",
                "synthetic",
                "--mem",
                "8MiB",
            ])
            .args(["--listen-timeout", "20s"])
            .arg("--port-file")
            .arg(port_file)
            .arg("--tls-creds")
            .arg(&creds)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let connect = |port: u16, host: &str| {
        bench()
            .args(["migrate", "--connect", &format!("127.0.0.1:{port}")])
            .args(["--vm", "synthetic", "--mem", "8MiB", "--tls-hostname", host])
            .arg("--tls-creds")
            .arg(&creds)
            .output()
            .unwrap()
    };
    let mut dest = listen(&port_file);
    let port = wait_port(&port_file);
    // A name the certificate does not carry: refused, and the destination keeps listening.
    let o = connect(port, "migration.example");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("does not name"), "{e}");
    assert!(e.contains("source VM is running"), "{e}");
    // The certificate's DNS name.
    let o = connect(port, "localhost");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dest.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_tls_arguments_give_one_clear_line() {
    let run = |args: &[&str]| {
        let o = bench()
            .args(["migrate", "--vm", "synthetic", "--mem", "8MiB"])
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} must fail");
        stderr(&o)
    };
    let e = run(&["--loopback", "--tls-creds", "/nonexistent/rdmig-creds"]);
    assert!(
        e.contains("/nonexistent/rdmig-creds") && e.contains("does not exist"),
        "{e}"
    );

    // A source's directory (no server key) cannot serve as a destination's.
    let d = std::env::temp_dir().join(format!("rdmig-cli-half-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for f in [
        "ca-cert.pem",
        "client-cert.pem",
        "client-key.pem",
        "server-cert.pem",
    ] {
        std::fs::copy(test_creds_dir().join(f), d.join(f)).unwrap();
    }
    let e = run(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-creds",
        d.to_str().unwrap(),
    ]);
    assert!(e.contains("server-key.pem is missing"), "{e}");
    let _ = std::fs::remove_dir_all(&d);

    let e = run(&["--connect", "127.0.0.1:1"]);
    assert!(e.contains("unless --tls-creds is given"), "{e}");
    let e = run(&["--connect", "127.0.0.1:1", "--tls-hostname", "localhost"]);
    assert!(e.contains("--tls-creds"), "{e}");
}
