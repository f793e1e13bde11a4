//! A running `migrate` driven from outside, as an operator does it: SIGTERM cancels a
//! `--loopback` migration (exit 130, one line, the JSON outcome, and the destination child
//! gone with it), and `--control-socket` speaks QMP: the greeting, `qmp_capabilities`,
//! `query-migrate` while it runs, `migrate-set-parameters` lifting the bandwidth cap,
//! `MIGRATION` events, `migrate_cancel`, QMP errors for bad requests, and a post-copy link
//! cut that `--connect`/`--listen` live through (`postcopy-paused`, then `migrate` with
//! `resume: true` to a new path). Every test bounds its own time and kills what it started if
//! a bound passes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rdma-bench"))
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rdmig-ctl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `migrate --loopback` of a synthetic VM over TCP with `extra` arguments.
fn loopback(extra: &[&str]) -> Command {
    let mut c = bench();
    c.args([
        "migrate",
        "--loopback",
        "--vm",
        "synthetic",
        "--transport",
        "tcp",
        "--json",
    ])
    .args(extra);
    c
}

/// A started process whose output is collected by threads (so it never blocks on a pipe).
struct Run {
    child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

impl Run {
    fn start(cmd: &mut Command) -> Run {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Some(collect(child.stdout.take().unwrap()));
        let err = Some(collect(child.stderr.take().unwrap()));
        Run { child, out, err }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) of our own unreaped child.
        assert_eq!(unsafe { libc::kill(self.pid() as libc::pid_t, sig) }, 0);
    }

    /// Waits at most `limit` for the exit; kills it (and fails) past that.
    fn wait(mut self, limit: Duration) -> (ExitStatus, String, String) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let err = self.err.take().unwrap().join().unwrap();
                panic!("still running after {limit:?}; stderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = self.out.take().unwrap().join().unwrap();
        let err = self.err.take().unwrap().join().unwrap();
        (status, out, err)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// State letter and parent pid of process `pid` from `/proc/PID/stat`, or `None` once it is
/// gone.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    Some((state, rest.next()?.parse().ok()?))
}

/// The pids of the children of `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| proc_state(pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

/// The `--loopback` destination child of `run`, once it appeared.
fn destination_child(run: &mut Run) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let [c] = children_of(run.pid())[..] {
            return c;
        }
        assert!(Instant::now() < deadline, "no destination child appeared");
        assert!(run.running(), "the source ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Fails (after killing it) if process `pid` is still alive `limit` from now.
fn assert_gone_within(pid: u32, limit: Duration) -> Duration {
    let t = Instant::now();
    // Gone, or a zombie waiting for whoever adopted it to reap it.
    while let Some((state, _)) = proc_state(pid).filter(|(s, _)| *s != 'Z') {
        if t.elapsed() > limit {
            // SAFETY: kill(2) of a pid; it is the orphaned destination (or nothing).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("destination child {pid} still runs (state {state}) {limit:?} after the source");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("no JSON object ({e}) in {out:?}"))
}

/// SIGTERM to the source process alone, `after` its destination child appeared: the
/// migration is cancelled, the source says so and exits with 130, the child goes with it.
fn sigterm_cancels(after: Duration) {
    // 256 MiB at 32 MiB/s: about 8 s of round 0.
    let mut run = Run::start(&mut loopback(&[
        "--mem",
        "256MiB",
        "--working-set",
        "16MiB",
        "--dirty-rate",
        "32MiB/s",
        "--max-bandwidth",
        "32MiB/s",
    ]));
    let child = destination_child(&mut run);
    std::thread::sleep(after);
    assert!(run.running(), "the migration ended before the signal");
    run.signal(libc::SIGTERM);
    let (status, out, err) = run.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{status}; stderr:\n{err}");
    assert!(err.contains("rdma-bench: migration cancelled"), "{err}");
    let v = json_of(&out);
    assert_eq!(v["outcome"], "cancelled", "{v}");
    if after > Duration::ZERO {
        // Mid-round: the source VM existed and runs on.
        assert!(err.contains("the source VM keeps running"), "{err}");
        assert_eq!(v["source_running"], true, "{v}");
        assert_eq!(v["vm"], "synthetic", "{v}");
        assert!(v["bytes_transferred"].as_u64().is_some(), "{v}");
        assert_eq!(v["dest_outcome"], "cancelled", "{v}");
    } else {
        assert!(
            err.contains("the source VM keeps running")
                || err.contains("before the source VM started"),
            "{err}"
        );
    }
    let gone = assert_gone_within(child, Duration::from_secs(3));
    eprintln!("SIGTERM {after:?} after the destination child appeared: child {child} gone {gone:?} after the source");
}

#[test]
fn sigterm_cancels_a_loopback_migration_and_ends_its_destination() {
    // Before the source connected (the destination is still setting up or listening), and
    // mid-round (the bandwidth cap keeps round 0 going for seconds).
    sigterm_cancels(Duration::ZERO);
    sigterm_cancels(Duration::from_millis(1500));
}

/// A QMP client: replies come back from [`Qmp::call`], events are kept in `events`.
struct Qmp {
    stream: UnixStream,
    lines: Receiver<Value>,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path` (waiting up to 20 s for it to appear) and reads the greeting.
    fn connect(path: &Path) -> (Qmp, Value) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => assert!(Instant::now() < deadline, "{}: {e}", path.display()),
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (tx, rx) = mpsc::channel();
        let reader = BufReader::new(stream.try_clone().unwrap());
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON from the server ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut q = Qmp {
            stream,
            lines: rx,
            events: Vec::new(),
        };
        let greeting = q.next(Duration::from_secs(5)).expect("a greeting");
        (q, greeting)
    }

    /// The next line (event or reply), `None` at EOF.
    fn next(&mut self, limit: Duration) -> Option<Value> {
        match self.lines.recv_timeout(limit) {
            Ok(v) => Some(v),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("nothing from the server in {limit:?}"),
        }
    }

    /// Sends one raw line and returns the reply (events meanwhile go to `events`).
    fn raw(&mut self, line: &str) -> Value {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
        loop {
            let v = self.next(Duration::from_secs(5)).expect("a reply");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    fn call(&mut self, req: Value) -> Value {
        self.raw(&req.to_string())
    }

    /// Reads events until EOF (bounded) and returns the statuses of all events seen.
    fn statuses_until_eof(&mut self, limit: Duration) -> Vec<String> {
        let t = Instant::now();
        while let Some(v) = self.next(limit.saturating_sub(t.elapsed())) {
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
        self.statuses()
    }

    fn statuses(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| {
                assert_eq!(e["event"], "MIGRATION", "{e}");
                assert!(e["timestamp"]["seconds"].as_u64().is_some(), "{e}");
                assert!(e["timestamp"]["microseconds"].as_u64().is_some(), "{e}");
                e["data"]["status"].as_str().unwrap().to_string()
            })
            .collect()
    }

    /// Polls `query-migrate` until its status is `want` (bounded); returns the reply.
    fn wait_status(&mut self, want: &str, limit: Duration) -> Value {
        let t = Instant::now();
        loop {
            let r = self.call(json!({"execute": "query-migrate"}));
            if r["return"]["status"] == want {
                return r["return"].clone();
            }
            assert!(t.elapsed() < limit, "status never became {want}: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn negotiate(q: &mut Qmp) {
    let r = q.call(json!({"execute": "qmp_capabilities", "id": "caps"}));
    assert_eq!(r, json!({"return": {}, "id": "caps"}));
}

#[test]
fn control_socket_reports_progress_and_lifting_the_cap_finishes_the_run() {
    let d = scratch("drive");
    let sock = d.join("ctl.sock");
    // An 8 MiB guest rewriting all of it at 16 MiB/s behind a 2 MiB/s cap never converges:
    // every round moves all 8 MiB in 4 s and predicts 4 s of downtime, over the 2 s limit,
    // and after 5 such rounds --policy abort ends the migration with an error. Uncapped, any
    // link faster than 4 MiB/s (a debug build on a busy host too) predicts less than 2 s and
    // switches over: success says the new cap took effect.
    let mut run = Run::start(
        loopback(&[
            "--mem",
            "8MiB",
            "--working-set",
            "8MiB",
            "--dirty-rate",
            "16MiB/s",
            "--max-bandwidth",
            "2MiB/s",
            "--downtime-limit",
            "2s",
            "--policy",
            "abort",
        ])
        .arg("--control-socket")
        .arg(&sock),
    );
    let (mut q, greeting) = Qmp::connect(&sock);
    assert!(
        greeting["QMP"]["version"]["qemu"]["major"].is_u64(),
        "{greeting}"
    );
    assert_eq!(greeting["QMP"]["capabilities"], json!([]), "{greeting}");
    negotiate(&mut q);
    let first = q.wait_status("active", Duration::from_secs(20));
    let ram = &first["ram"];
    assert_eq!(ram["total"], 8 << 20, "{first}");
    assert_eq!(ram["page-size"], 4096, "{first}");
    for k in [
        "transferred",
        "remaining",
        "dirty-pages-rate",
        "dirty-sync-count",
    ] {
        assert!(ram[k].is_u64(), "{k} in {first}");
    }
    assert!(
        ram["mbps"].is_number() && first["total-time"].is_u64(),
        "{first}"
    );
    assert!(first["expected-downtime"].is_u64(), "{first}");
    // Progress moves piece by piece (a piece at 2 MiB/s may take a second or two).
    let t0 = ram["transferred"].as_u64().unwrap();
    let t = Instant::now();
    loop {
        let now = q.wait_status("active", Duration::from_secs(5));
        let t1 = now["ram"]["transferred"].as_u64().unwrap();
        if t1 > t0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "transferred stays at {t0}: {now}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let params = q.call(json!({"execute": "query-migrate-parameters"}));
    assert_eq!(params["return"]["max-bandwidth"], 2 << 20, "{params}");
    assert_eq!(params["return"]["downtime-limit"], 2000, "{params}");
    assert!(
        run.running(),
        "the capped migration cannot have finished yet"
    );
    let r = q.call(json!({
        "execute": "migrate-set-parameters",
        "arguments": {"max-bandwidth": 0, "downtime-limit": 2000},
        "id": 7,
    }));
    assert_eq!(r, json!({"return": {}, "id": 7}));
    let statuses = q.statuses_until_eof(Duration::from_secs(30));
    let (status, out, err) = run.wait(Duration::from_secs(30));
    assert!(status.success(), "{status}; stderr:\n{err}");
    let v = json_of(&out);
    assert_eq!(v["outcome"], "completed", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("completed"),
        "{statuses:?}"
    );
    assert!(statuses.iter().any(|s| s == "active"), "{statuses:?}");
    assert!(!sock.exists(), "the control socket must be removed at exit");
    let mut dest = sock.into_os_string();
    dest.push(".dest");
    assert!(
        !Path::new(&dest).exists(),
        "the destination's socket must go too"
    );
}

#[test]
fn migrate_cancel_over_the_control_socket_cancels_the_run() {
    let d = scratch("cancel");
    let sock = d.join("ctl.sock");
    // 64 MiB at 8 MiB/s: round 0 takes 8 s.
    let mut run = Run::start(
        loopback(&[
            "--mem",
            "64MiB",
            "--working-set",
            "8MiB",
            "--dirty-rate",
            "16MiB/s",
            "--max-bandwidth",
            "8MiB/s",
        ])
        .arg("--control-socket")
        .arg(&sock),
    );
    let child = destination_child(&mut run);
    let (mut q, _) = Qmp::connect(&sock);
    negotiate(&mut q);
    q.wait_status("active", Duration::from_secs(20));
    let r = q.call(json!({"execute": "migrate_cancel", "id": "c"}));
    assert_eq!(r, json!({"return": {}, "id": "c"}));
    let statuses = q.statuses_until_eof(Duration::from_secs(20));
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("cancelled"),
        "{statuses:?}"
    );
    let (status, out, err) = run.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{status}; stderr:\n{err}");
    assert!(
        err.contains("migration cancelled") && err.contains("the source VM keeps running"),
        "{err}"
    );
    let v = json_of(&out);
    assert_eq!(v["outcome"], "cancelled", "{v}");
    assert_eq!(v["source_running"], true, "{v}");
    // The source tells the destination why it stops: the destination cancels too.
    assert_eq!(v["dest_outcome"], "cancelled", "{v}");
    assert_gone_within(child, Duration::from_secs(3));
    assert!(!sock.exists(), "the control socket must be removed at exit");
}

#[test]
fn control_socket_answers_bad_requests_with_qmp_errors() {
    let d = scratch("bad");
    let key = d.join("key");
    std::fs::write(&key, b"a shared key of thirty-two bytes").unwrap();
    let sock = d.join("ctl.sock");
    // A path that is not a socket is refused, and left alone.
    std::fs::write(&sock, b"precious").unwrap();
    let connect_to = |addr: &str| {
        let mut c = bench();
        c.args([
            "migrate",
            "--connect",
            addr,
            "--vm",
            "synthetic",
            "--mem",
            "16MiB",
            "--io-timeout",
            "60s",
        ])
        .arg("--psk-file")
        .arg(&key)
        .arg("--control-socket")
        .arg(&sock);
        c
    };
    let (status, _, err) = Run::start(&mut connect_to("127.0.0.1:1")).wait(Duration::from_secs(20));
    assert!(!status.success());
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
    // A stale socket (nobody serves it) is replaced.
    std::fs::remove_file(&sock).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());

    // A silent destination: the source waits for its answer (phase setup) while we talk.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let run = Run::start(&mut connect_to(&addr));
    let (conn, _) = silent.accept().unwrap();
    let (mut q, _) = Qmp::connect(&sock);
    let (mut other, _) = Qmp::connect(&sock);
    let not_found = |r: &Value| r["error"]["class"] == "CommandNotFound";
    let generic = |r: &Value| r["error"]["class"] == "GenericError";
    // Nothing but qmp_capabilities before the negotiation.
    let r = q.call(json!({"execute": "query-migrate"}));
    assert!(not_found(&r), "{r}");
    negotiate(&mut q);
    let r = q.call(json!({"execute": "qmp_capabilities"}));
    assert!(not_found(&r), "negotiated twice: {r}");
    for bad in [
        "{\"execute\": ",
        "not json at all",
        "[1, 2]",
        "{\"id\": 5}",
        "{\"execute\": 42}",
        "{\"execute\": \"query-migrate\", \"arguments\": [1]}",
        "{\"execute\": \"query-migrate\", \"bogus\": 1}",
    ] {
        let r = q.raw(bad);
        assert!(generic(&r), "{bad} -> {r}");
        assert!(
            r["error"]["desc"].as_str().is_some_and(|d| !d.is_empty()),
            "{r}"
        );
    }
    let r = q.call(json!({"execute": "query-kvm", "id": {"n": 1}}));
    assert!(not_found(&r), "{r}");
    assert_eq!(r["id"], json!({"n": 1}), "the id is echoed: {r}");
    for args in [
        json!({"downtime-limit": 0}),
        json!({"downtime-limit": "fast"}),
        json!({"downtime-limit": 3_000_000}),
        json!({"max-bandwidth": -1}),
        json!({"multifd-channels": 4}),
    ] {
        let r = q.call(json!({"execute": "migrate-set-parameters", "arguments": args}));
        assert!(generic(&r), "{args} -> {r}");
    }
    let r = q.call(json!({"execute": "query-migrate", "arguments": {"detail": true}}));
    assert!(generic(&r), "{r}");
    let r = q.call(json!({"execute": "migrate-start-postcopy", "id": 3}));
    assert!(
        generic(&r) && r["id"] == 3,
        "pre-copy has no post-copy: {r}"
    );
    // The connection survived all of it, and a second client is served alongside.
    let r = q.call(json!({"execute": "query-migrate", "id": "ok"}));
    assert_eq!(r["id"], "ok");
    assert_eq!(r["return"]["status"], "setup", "{r}");
    negotiate(&mut other);
    let r = other.call(json!({"execute": "query-commands"}));
    assert!(r["return"].as_array().is_some_and(|c| c.len() >= 6), "{r}");
    // The destination goes away: the source fails, tells the clients and removes its socket.
    drop(conn);
    let (status, _, err) = run.wait(Duration::from_secs(30));
    assert!(!status.success(), "{err}");
    let statuses = q.statuses_until_eof(Duration::from_secs(10));
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("failed"),
        "{statuses:?}"
    );
    assert!(!sock.exists(), "the control socket must be removed at exit");
}

/// A TCP relay for one test: forwards each connection to `target` until [`CutRelay::cut`],
/// which closes every connection and every later one (the path is gone for good).
struct CutRelay {
    addr: std::net::SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CutRelay {
    fn to(target: std::net::SocketAddr) -> CutRelay {
        use std::net::{Shutdown, TcpStream};
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let relay = CutRelay {
            addr,
            conns: Default::default(),
            down: Default::default(),
        };
        let (conns, down) = (relay.conns.clone(), relay.down.clone());
        std::thread::spawn(move || {
            for a in l.incoming() {
                let Ok(a) = a else { return };
                if down.load(Ordering::Relaxed) {
                    let _ = a.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(b) = TcpStream::connect(target) else {
                    return;
                };
                conns
                    .lock()
                    .unwrap()
                    .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        relay
    }

    fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_postcopy_link_cut_is_recovered_over_a_new_path_given_on_the_control_socket() {
    if let Err(e) = rdmig_transport::postcopy::Uffd::probe() {
        let test = std::thread::current()
            .name()
            .unwrap_or("control")
            .to_string();
        rdmig_transport::require::skip(
            rdmig_transport::require::Capability::Uffd,
            &test,
            format!("userfaultfd unavailable: {e}"),
        );
        return;
    }
    let d = scratch("recover");
    let key = d.join("key");
    std::fs::write(&key, b"a shared key of thirty-two bytes").unwrap();
    let (port_file, dsock, ssock) = (d.join("port"), d.join("dest.sock"), d.join("src.sock"));
    let synthetic = ["--vm", "synthetic", "--mem", "64MiB", "--json"];
    let dest = Run::start(
        bench()
            .args(["migrate", "--listen", "127.0.0.1:0"])
            .args(synthetic)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--psk-file")
            .arg(&key)
            .arg("--control-socket")
            .arg(&dsock),
    );
    let t = Instant::now();
    let port: u16 = loop {
        if let Some(p) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no port file");
        std::thread::sleep(Duration::from_millis(10));
    };
    let direct: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let relay = CutRelay::to(direct);
    // Post-copy prefetch capped at 16 MiB/s: the 64 MiB take about 4 s.
    let source = Run::start(
        bench()
            .args(["migrate", "--connect", &relay.addr.to_string()])
            .args(synthetic)
            .args([
                "--mode",
                "postcopy",
                "--working-set",
                "8MiB",
                "--dirty-rate",
                "32MiB/s",
            ])
            .args(["--max-bandwidth", "16MiB/s", "--transport", "tcp"])
            .arg("--psk-file")
            .arg(&key)
            .arg("--control-socket")
            .arg(&ssock),
    );
    let (mut dq, _) = Qmp::connect(&dsock);
    negotiate(&mut dq);
    let (mut sq, _) = Qmp::connect(&ssock);
    negotiate(&mut sq);
    dq.wait_status("postcopy-active", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    relay.cut();
    dq.wait_status("postcopy-paused", Duration::from_secs(10));
    // The old path stays down: the operator gives the source the destination's own address.
    let r = sq.call(json!({"execute": "migrate", "arguments": {"uri": format!("tcp:{direct}"), "resume": true}}));
    assert_eq!(r, json!({"return": {}}));
    let (status, out, err) = source.wait(Duration::from_secs(60));
    assert!(status.success(), "source: {err}");
    let v = json_of(&out);
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["recoveries"], 1, "{v}");
    assert_eq!(
        v["recovery_pauses_ms"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    let (status, _, err) = dest.wait(Duration::from_secs(30));
    assert!(status.success(), "destination: {err}");
    let _ = std::fs::remove_dir_all(&d);
}
