//! Just enough of a QMP client for a test to follow a migration's status on
//! `rdma-bench migrate --control-socket` (tests/control.rs has the full one).

use std::time::Duration;

/// A QMP connection.
pub struct MiniQmp {
    w: std::os::unix::net::UnixStream,
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl MiniQmp {
    /// Connects (waiting up to 20 s for the socket) and negotiates capabilities.
    pub fn connect(path: &std::path::Path) -> MiniQmp {
        let t = std::time::Instant::now();
        let w = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => assert!(t.elapsed() < Duration::from_secs(20), "{e}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = std::io::BufReader::new(w.try_clone().unwrap());
        let mut q = MiniQmp { w, r };
        q.line();
        q.call(r#"{"execute": "qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }

    /// Sends `req` and returns the reply (events are skipped).
    pub fn call(&mut self, req: &str) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.w, "{req}").unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Polls `query-migrate` until its status is `want` (bounded).
    pub fn wait_status(&mut self, want: &str, limit: Duration) {
        let t = std::time::Instant::now();
        loop {
            let r = self.call(r#"{"execute": "query-migrate"}"#);
            if r["return"]["status"] == want {
                return;
            }
            assert!(t.elapsed() < limit, "status never became {want}: {r}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
