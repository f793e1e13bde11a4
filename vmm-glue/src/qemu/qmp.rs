//! A small QMP client: one Unix socket to one QEMU, the greeting and `qmp_capabilities`, then
//! commands answered in order (matched by `id`), each with a timeout. Asynchronous events that
//! arrive meanwhile are kept aside for [`Qmp::wait_event`]. A closed socket means QEMU exited
//! ([`Error::QemuExited`]).
//!
//! ```no_run
//! use rdmig_vmm::qemu::qmp::Qmp;
//! let mut qmp = Qmp::connect("/run/vm0.qmp".as_ref(), std::time::Duration::from_secs(5))?;
//! let status = qmp.execute("query-status", None)?;
//! assert_eq!(status["status"], "running");
//! # Ok::<(), rdmig_vmm::Error>(())
//! ```

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The process id of a QEMU (from the QMP socket's peer credentials).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pid(pub i32);

/// One QMP connection.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    path: PathBuf,
    buf: Vec<u8>,
    events: VecDeque<Value>,
    next_id: u64,
    timeout: Duration,
    pid: Pid,
    version: String,
}

/// Longest line QEMU may send (a `query-*` answer of a big VM is well below).
const MAX_LINE: usize = 16 << 20;

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and leaves negotiation mode.
    /// `timeout` bounds each command's answer unless a command says otherwise.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = UnixStream::connect(path).map_err(|e| Error::QemuIo {
            context: format!("connecting to the QMP socket {}", path.display()),
            source: e,
        })?;
        let pid = peer_pid(&stream).map_err(|e| Error::QemuIo {
            context: format!("reading the peer of {}", path.display()),
            source: e,
        })?;
        let mut q = Qmp {
            stream,
            path: path.to_path_buf(),
            buf: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            timeout,
            pid,
            version: String::new(),
        };
        let greeting = q.read_message(Instant::now() + timeout)?;
        let Some(v) = greeting.get("QMP") else {
            return Err(Error::QemuSetup(format!(
                "{} is not a QMP socket (greeting {greeting})",
                path.display()
            )));
        };
        let ver = &v["version"]["qemu"];
        q.version = format!("{}.{}.{}", ver["major"], ver["minor"], ver["micro"]);
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The QEMU process behind the socket.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// QEMU's version, `major.minor.micro`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// A second handle on the QMP socket, for watching it (see [`super::watch::ExitWatch`]);
    /// never read from or written to, so the connection's messages stay in order.
    pub fn try_clone_socket(&self) -> Result<UnixStream> {
        self.stream.try_clone().map_err(|e| Error::QemuIo {
            context: format!("cloning the QMP socket {}", self.path.display()),
            source: e,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `command` with `arguments`, waiting the default timeout for its answer.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_within(command, arguments, self.timeout)
    }

    /// Runs `command`, waiting at most `timeout` for its answer; returns its `return` value.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| self.io_err(format!("sending {command}"), e))?;
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.read_message(deadline).map_err(|e| match e {
                Error::QemuTimeout(_) => {
                    Error::QemuTimeout(format!("no answer to {command} within {timeout:?}"))
                }
                other => other,
            })?;
            if m.get("event").is_some() {
                self.events.push_back(m);
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                tracing::debug!("QMP: ignoring an answer to another command: {m}");
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            let err = &m["error"];
            return Err(Error::Qmp {
                command: command.to_string(),
                desc: format!(
                    "{} ({})",
                    err["desc"].as_str().unwrap_or("no description"),
                    err["class"].as_str().unwrap_or("no class")
                ),
            });
        }
    }

    /// Runs a human monitor command and returns its text output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        let r = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    /// Waits for an event named `name` for which `want` holds (events that arrived before are
    /// looked at first; others are kept).
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let is = |e: &Value| e["event"] == name && want(&e["data"]);
        if let Some(i) = self.events.iter().position(is) {
            return Ok(self.events.remove(i).expect("index just found"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.read_message(deadline).map_err(|e| match e {
                Error::QemuTimeout(_) => {
                    Error::QemuTimeout(format!("no {name} event within {timeout:?}"))
                }
                other => other,
            })?;
            if is(&m) {
                return Ok(m);
            }
            if m.get("event").is_some() {
                self.events.push_back(m);
            }
        }
    }

    /// Takes the events kept so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// `query-status`: the run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub fn run_state(&mut self) -> Result<String> {
        let s = self.execute("query-status", None)?;
        Ok(s["status"].as_str().unwrap_or("unknown").to_string())
    }

    fn io_err(&self, context: String, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof => Error::QemuExited(format!(
                "the QMP socket {} closed while {context}",
                self.path.display()
            )),
            _ => Error::QemuIo { context, source: e },
        }
    }

    /// Reads one JSON message (one line) before `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text).map_err(|e| Error::Qmp {
                    command: "(reading)".into(),
                    desc: format!("unparsable QMP message {text:?}: {e}"),
                });
            }
            if self.buf.len() > MAX_LINE {
                return Err(Error::Qmp {
                    command: "(reading)".into(),
                    desc: format!("a QMP message longer than {MAX_LINE} bytes"),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::QemuTimeout("QMP read".into()));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io_err("setting a read timeout".into(), e))?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(Error::QemuExited(format!(
                        "the QMP socket {} closed",
                        self.path.display()
                    )))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::QemuTimeout("QMP read".into()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err("reading QMP".into(), e)),
            }
        }
    }
}

/// The pid of the process at the other end of a Unix socket (`SO_PEERCRED`).
fn peer_pid(s: &UnixStream) -> std::io::Result<Pid> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live local of that size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Pid(cred.pid))
}
