//! The command line as a user meets it: a loopback migration with JSON output, clear one-line
//! errors for bad arguments, a wrong key, an unreachable peer and a destination killed
//! mid-round (after which the source VM must still be running and intact). Signals and the
//! control socket of a running migration are in `control.rs`.

mod mini_qmp;

use mini_qmp::MiniQmp;
use rdmig_transport::require::{skip, Capability};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rdma-bench"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn key_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rdmig-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn loopback_migration_prints_the_json_fields() {
    let o = bench()
        .args([
            "migrate",
            "--loopback",
            "--vm",
            "synthetic",
            "--transport",
            "tcp",
            "--mem",
            "64MiB",
            "--working-set",
            "8MiB",
        ])
        .args(["--dirty-rate", "32MiB/s", "--streams", "2", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
    for k in [
        "transport",
        "mem_bytes",
        "total_ms",
        "downtime_ms",
        "rounds",
        "bytes_transferred",
        "throughput_mib_s",
        "verified",
        "source_cpu_ms",
        "per_round",
        "vm",
        "guest_verified",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    assert_eq!(v["transport"], "tcp");
    assert_eq!(v["vm"], "synthetic");
    assert_eq!(v["mem_bytes"], 64 << 20);
    assert_eq!(v["verified"], true);
    assert_eq!(v["guest_verified"], true);
    assert!(v["per_round"].as_array().unwrap().len() as u64 == v["rounds"].as_u64().unwrap());
}

#[test]
fn loopback_prints_a_summary_table() {
    let o = bench()
        .args([
            "migrate",
            "--loopback",
            "--vm",
            "synthetic",
            "--mem",
            "32MiB",
            "--working-set",
            "4MiB",
            "--dirty-rate",
            "16MiB/s",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "downtime",
        "memory digest      verified",
        "guest self-check   passed",
        "round",
    ] {
        assert!(out.contains(needle), "no '{needle}' in:\n{out}");
    }
}

#[test]
fn bad_arguments_give_one_clear_line() {
    for (args, needle) in [
        (
            vec!["migrate", "--loopback", "--mem", "12 parsecs"],
            "unknown size unit",
        ),
        (
            vec!["migrate", "--loopback", "--dirty-rate", "fast"],
            "rates look like",
        ),
        (vec!["migrate", "--loopback", "--mem", "lots"], "not a size"),
        (
            vec!["migrate", "--loopback", "--transport", "carrier-pigeon"],
            "invalid value",
        ),
        (vec!["migrate"], "required"),
        (
            vec!["migrate", "--loopback", "--listen", "127.0.0.1:1"],
            "cannot be used with",
        ),
        (
            vec![
                "migrate",
                "--loopback",
                "--mem",
                "1MiB",
                "--working-set",
                "2MiB",
            ],
            "larger than --mem",
        ),
        (
            vec!["migrate", "--loopback", "--page-size", "3000"],
            "page size",
        ),
        (vec!["migrate", "--loopback", "--streams", "0"], "--streams"),
        (
            vec!["migrate", "--connect", "127.0.0.1:1", "--vm", "synthetic"],
            "--psk-file is required",
        ),
        // Limits that could never work are refused before any VM is built.
        (
            vec![
                "migrate",
                "--loopback",
                "--vm",
                "synthetic",
                "--max-rounds",
                "0",
            ],
            "max rounds must be at least 1",
        ),
        (
            vec![
                "migrate",
                "--loopback",
                "--vm",
                "synthetic",
                "--max-bandwidth",
                "0",
            ],
            "bandwidth cap of 0",
        ),
        (
            vec![
                "migrate",
                "--loopback",
                "--vm",
                "synthetic",
                "--io-timeout",
                "0s",
            ],
            "I/O timeout of 0",
        ),
        (
            vec![
                "migrate",
                "--loopback",
                "--vm",
                "synthetic",
                "--progress-timeout",
                "0s",
            ],
            "progress timeout of 0",
        ),
        // More memory than the host has: refused up front, not killed by the OOM killer.
        (
            vec![
                "migrate",
                "--loopback",
                "--vm",
                "synthetic",
                "--mem",
                "64TiB",
            ],
            "this host can give",
        ),
        (
            vec![
                "migrate",
                "--listen",
                "127.0.0.1:0",
                "--vm",
                "synthetic",
                "--mem",
                "64TiB",
                "--psk-file",
                "/dev/null",
            ],
            "this host can give",
        ),
        // A key "file" that never ends or never answers is refused without reading it.
        (
            vec![
                "migrate",
                "--connect",
                "127.0.0.1:1",
                "--vm",
                "synthetic",
                "--mem",
                "8MiB",
                "--psk-file",
                "/dev/zero",
            ],
            "not a regular file",
        ),
    ] {
        let o = bench().args(&args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(needle), "{args:?}: no '{needle}' in: {e}");
        assert!(!e.contains("panicked"), "{args:?} panicked: {e}");
    }
}

#[test]
fn rdma_without_a_device_fails_at_once() {
    if std::env::var_os("RDMIG_RXE_DEV").is_some() {
        let _ = writeln!(std::io::stderr(), "SKIP: an RDMA device exists here");
        return;
    }
    let t = Instant::now();
    let o = bench()
        .args([
            "migrate",
            "--loopback",
            "--vm",
            "synthetic",
            "--transport",
            "rdma",
            "--mem",
            "8MiB",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("RDMA unavailable") && e.lines().any(|l| l.starts_with("rdma-bench: error:")),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn unreachable_peer_and_wrong_key_are_clear_errors() {
    let d = scratch("key");
    let k1 = key_file(&d, "k1", b"first key, thirty-two bytes long");
    let k2 = key_file(&d, "k2", b"other key, thirty-two bytes long");
    // Nobody listens on port 1.
    let o = connect_cmd("127.0.0.1:1", "8MiB", &k1).output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("connecting to the destination at 127.0.0.1:1"),
        "{}",
        stderr(&o)
    );

    let port_file = d.join("port");
    // The listener keeps serving after a refused handshake, until --listen-timeout.
    let dest = listen_cmd("8MiB", &port_file, &k1)
        .args(["--listen-timeout", "3s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let port = wait_port(&port_file);
    let o = connect_cmd(&format!("127.0.0.1:{port}"), "8MiB", &k2)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("authentication failed"), "{e}");
    assert!(
        e.contains("source VM is running") && e.contains("self-check passed"),
        "{e}"
    );
    let out = dest.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the destination must report the failed handshake"
    );
    let de = String::from_utf8_lossy(&out.stderr);
    assert!(de.contains("authentication failed"), "{de}");
}

/// `migrate --listen` for a synthetic VM of `mem`, writing its port to `port_file`.
fn listen_cmd(mem: &str, port_file: &std::path::Path, key: &std::path::Path) -> Command {
    let mut c = bench();
    c.args([
        "migrate",
        "--listen",
        "127.0.0.1:0",
        "--vm",
        "synthetic",
        "--mem",
        mem,
    ])
    .arg("--port-file")
    .arg(port_file)
    .arg("--psk-file")
    .arg(key);
    c
}

/// `migrate --connect addr` for a synthetic VM of `mem`.
fn connect_cmd(addr: &str, mem: &str, key: &std::path::Path) -> Command {
    let mut c = bench();
    c.args([
        "migrate",
        "--connect",
        addr,
        "--vm",
        "synthetic",
        "--mem",
        mem,
    ])
    .arg("--psk-file")
    .arg(key);
    c
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
fn destination_killed_mid_round_leaves_the_source_running() {
    let d = scratch("kill");
    let k = key_file(&d, "k", b"a shared key of thirty-two bytes");
    let port_file = d.join("port");
    let mut dest = listen_cmd("256MiB", &port_file, &k)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let port = wait_port(&port_file);
    // 256 MiB at 64 MiB/s: round 0 takes about 4 s; kill the destination 1.5 s in.
    let src = connect_cmd(&format!("127.0.0.1:{port}"), "256MiB", &k)
        .args([
            "--working-set",
            "16MiB",
            "--dirty-rate",
            "32MiB/s",
            "--max-bandwidth",
            "64MiB/s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    dest.kill().unwrap();
    dest.wait().unwrap();
    let o = src.wait_with_output().unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("migration failed"), "{e}");
    assert!(e.contains("the source VM is running"), "{e}");
    assert!(
        e.contains("self-check passed") && e.contains(" 0 bad"),
        "{e}"
    );
    assert!(
        !e.contains("wrote 0 pages"),
        "the source guest must keep writing: {e}"
    );
}

fn uffd_skip() -> bool {
    match rdmig_transport::postcopy::Uffd::probe() {
        Ok(()) => false,
        Err(e) => {
            let test = std::thread::current().name().unwrap_or("cli").to_string();
            skip(
                Capability::Uffd,
                &test,
                format!("userfaultfd unavailable: {e}"),
            );
            true
        }
    }
}

#[test]
fn loopback_postcopy_and_hybrid_print_the_postcopy_fields() {
    if uffd_skip() {
        return;
    }
    for (mode, rate, extra) in [
        ("postcopy", "256MiB/s", &[][..]),
        (
            "hybrid",
            "1GiB/s",
            &["--downtime-limit", "1ms", "--max-rounds", "2"][..],
        ),
    ] {
        let o = bench()
            .args([
                "migrate",
                "--loopback",
                "--vm",
                "synthetic",
                "--transport",
                "tcp",
                "--mem",
                "64MiB",
                "--working-set",
                "32MiB",
            ])
            .args([
                "--dirty-rate",
                rate,
                "--streams",
                "2",
                "--json",
                "--mode",
                mode,
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
        for k in [
            "mode",
            "postcopy",
            "postcopy_faults",
            "postcopy_ms",
            "postcopy_pages",
            "fault_latency_us",
        ] {
            assert!(v.get(k).is_some(), "missing {k} in {v}");
        }
        for k in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                v["fault_latency_us"].get(k).is_some(),
                "missing fault_latency_us.{k} in {v}"
            );
        }
        assert_eq!(v["mode"], mode);
        assert_eq!(v["postcopy"], true, "{mode}: {v}");
        assert_eq!(v["verified"], true);
        assert_eq!(v["guest_verified"], true);
    }
}

#[test]
fn fault_lat_prints_percentiles_and_rdma_without_a_device_fails_clearly() {
    if uffd_skip() {
        return;
    }
    let o = bench()
        .args(["fault-lat", "-n", "500", "-s", "8MiB", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
    for k in ["min_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "missing {k} in {v}");
    }
    assert_eq!(v["iters"], 500);
    assert_eq!(v["zero_copy"], false);
    if rdmig_transport::postcopy::Uffd::minor_supported() {
        let o = bench()
            .args(["fault-lat", "-n", "300", "-s", "4MiB", "--memfd", "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["zero_copy"], true);
        assert!(v["p50_us"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    }
    if std::env::var_os("RDMIG_RXE_DEV").is_some() {
        return;
    }
    // Without a device (ci/test-rdma runs it on SoftRoCE) RDMA fails at once, saying why.
    let o = bench()
        .args(["fault-lat", "--transport", "rdma"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("RDMA unavailable"), "{}", stderr(&o));
}

#[test]
fn source_killed_during_postcopy_leaves_the_destination_paused_after_the_recover_timeout() {
    if uffd_skip() {
        return;
    }
    let d = scratch("pckill");
    let k = key_file(&d, "k", b"a shared key of thirty-two bytes");
    let port_file = d.join("port");
    let sock = d.join("qmp.sock");
    let dest = listen_cmd("128MiB", &port_file, &k)
        .args(["--recover-timeout", "2s"])
        .arg("--control-socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let port = wait_port(&port_file);
    // Post-copy prefetch capped at 16 MiB/s: 128 MiB take about 8 s.
    let mut src = connect_cmd(&format!("127.0.0.1:{port}"), "128MiB", &k)
        .args([
            "--mode",
            "postcopy",
            "--working-set",
            "16MiB",
            "--dirty-rate",
            "64MiB/s",
            "--max-bandwidth",
            "16MiB/s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the source once the guest runs on the destination in post-copy; the destination
    // then pauses post-copy (QMP status postcopy-paused) and waits for the source.
    let mut qmp = MiniQmp::connect(&sock);
    qmp.wait_status("postcopy-active", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    src.kill().unwrap();
    src.wait().unwrap();
    let killed = std::time::Instant::now();
    qmp.wait_status("postcopy-paused", Duration::from_secs(5));
    let o = dest.wait_with_output().unwrap();
    assert!(!o.status.success());
    let e = stderr(&o) + &String::from_utf8_lossy(&o.stdout);
    // The destination paused post-copy and waited the recover timeout for the source.
    assert!(
        killed.elapsed() >= Duration::from_millis(1900),
        "{:?}: {e}",
        killed.elapsed()
    );
    assert!(
        e.contains("post-copy interrupted with")
            && e.contains("of 32768 pages still on the source"),
        "{e}"
    );
    assert!(e.contains("the source did not reconnect within"), "{e}");
    assert!(e.contains("the destination guest is paused"), "{e}");
}

#[test]
fn loopback_migrates_a_kvm_guest_by_default_where_kvm_works() {
    if let Err(why) = rdmig_vmm::kvm::kvm_available() {
        let test = std::thread::current().name().unwrap_or("cli").to_string();
        skip(
            Capability::Kvm,
            &test,
            format!("/dev/kvm not usable: {why}"),
        );
        return;
    }
    let o = bench()
        .args([
            "migrate",
            "--loopback",
            "--transport",
            "tcp",
            "--mem",
            "64MiB",
            "--working-set",
            "8MiB",
            "--dirty-rate",
            "32MiB/s",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["vm"], "kvm", "KVM is the default where it works");
    assert_eq!(v["verified"], true);
    assert_eq!(
        v["guest_verified"], true,
        "the guest's own check after resume on the destination"
    );
}

#[test]
fn loopback_postcopy_of_a_kvm_guest() {
    if let Err(why) = rdmig_vmm::kvm::kvm_available() {
        let test = std::thread::current().name().unwrap_or("cli").to_string();
        skip(
            Capability::Kvm,
            &test,
            format!("/dev/kvm not usable: {why}"),
        );
        return;
    }
    if uffd_skip() {
        return;
    }
    let o = bench()
        .args([
            "migrate",
            "--loopback",
            "--vm",
            "kvm",
            "--transport",
            "tcp",
            "--mem",
            "64MiB",
            "--working-set",
            "16MiB",
            "--dirty-rate",
            "128MiB/s",
            "--mode",
            "postcopy",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["vm"], "kvm");
    assert_eq!(
        (&v["mode"], &v["postcopy"]),
        (&"postcopy".into(), &true.into())
    );
    assert_eq!(v["rounds"], 0, "{v}");
    // Every page moves after the switchover, but for the zero pages found before it.
    let (fetched, zero) = (
        v["postcopy_pages"].as_u64().unwrap(),
        v["zero_pages"].as_u64().unwrap(),
    );
    assert!(
        fetched <= 64 * 256 && fetched + zero >= 64 * 256,
        "{fetched} fetched, {zero} zero: {v}"
    );
    assert!(v["postcopy_faults"].is_u64(), "{v}");
    assert_eq!(v["verified"], true);
    assert_eq!(
        v["guest_verified"], true,
        "the guest's own check after resume on the destination"
    );
}

#[test]
fn loopback_zero_copy_postcopy_of_a_kvm_guest_with_memfd_memory() {
    if let Err(why) = rdmig_vmm::kvm::kvm_available() {
        let test = std::thread::current().name().unwrap_or("cli").to_string();
        skip(
            Capability::Kvm,
            &test,
            format!("/dev/kvm not usable: {why}"),
        );
        return;
    }
    if uffd_skip() {
        return;
    }
    if !rdmig_transport::postcopy::Uffd::minor_supported() {
        let test = std::thread::current().name().unwrap_or("cli").to_string();
        skip(
            Capability::UffdMinor,
            &test,
            "userfaultfd minor faults on shmem (memfd) unavailable",
        );
        return;
    }
    let o = bench()
        .args([
            "migrate",
            "--loopback",
            "--vm",
            "kvm",
            "--memfd",
            "--mode",
            "postcopy",
            "--transport",
            "tcp",
            "--mem",
            "64MiB",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((&v["vm"], &v["mode"]), (&"kvm".into(), &"postcopy".into()));
    assert_eq!(
        v["postcopy_zero_copy"], true,
        "memfd guest memory is installed in place with UFFDIO_CONTINUE: {v}"
    );
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(
        v["guest_verified"], true,
        "the guest's own check after resume on the destination"
    );
}

#[test]
fn a_destination_without_vm_builds_the_kind_the_source_announces() {
    let d = scratch("announce");
    let k = key_file(&d, "k", b"a shared key of thirty-two bytes");
    let port_file = d.join("port");
    // No --vm: on a host with /dev/kvm the default would be a KVM guest; the synthetic source
    // says what it is before any memory moves, and the destination builds that.
    let dest = bench()
        .args([
            "migrate",
            "--listen",
            "127.0.0.1:0",
            "--mem",
            "16MiB",
            "--json",
        ])
        .arg("--port-file")
        .arg(&port_file)
        .arg("--psk-file")
        .arg(&k)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let port = wait_port(&port_file);
    let o = connect_cmd(&format!("127.0.0.1:{port}"), "16MiB", &k)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dest.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["vm"], "synthetic", "{j}");
    assert_eq!(j["outcome"], "completed", "{j}");
}
