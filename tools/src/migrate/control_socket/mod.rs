//! `--control-socket PATH`: a Unix socket that speaks QEMU's QMP for the running migration.
//!
//! Any number of clients may connect. Each gets QMP's greeting, must send
//! `{"execute": "qmp_capabilities"}` first (as with QEMU), and then sends one JSON object per
//! line and gets one per line back, with its `"id"` echoed:
//!
//! | command | arguments | does |
//! | --- | --- | --- |
//! | `query-migrate` | | status, times and `ram` figures from [`MigrationControl::progress`] |
//! | `query-migrate-parameters` | | `downtime-limit` (ms) and `max-bandwidth` (bytes/s, 0: none) |
//! | `migrate-set-parameters` | `downtime-limit` (ms), `max-bandwidth` (bytes/s; 0 lifts the cap) | from the next round (source only) |
//! | `migrate_cancel` | | cancels; an error once the switchover has begun |
//! | `migrate-start-postcopy` | | post-copy after this round (source of a hybrid or post-copy migration) |
//!
//! Errors have QMP's shape: `CommandNotFound` for an unknown command (or any command before
//! `qmp_capabilities`), `GenericError` for malformed JSON (the connection stays open) and
//! refused arguments. Every client that negotiated gets a `MIGRATION` event whenever the phase
//! changes (polled every 20 ms, so a phase shorter than that may be missed), and the final
//! one when the migration ends. One thread serves all clients with `poll(2)` and
//! non-blocking sockets; a client that stops reading is dropped rather than waited for.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdmig_transport::session::{MigrationControl, Phase};
use serde_json::Value;

use super::{signals, End};

mod qmp;
use qmp::Commands;

/// How often the phase is polled (and the longest a request waits for its reply).
const TICK_MS: i32 = 20;
/// A request line longer than this closes the connection.
const MAX_LINE: usize = 64 << 10;
/// A client with this much unread output is dropped.
const MAX_PENDING: usize = 1 << 20;

/// The running server; [`ControlSocket::finish`] (or drop) stops it and removes the socket.
pub struct ControlSocket {
    path: PathBuf,
    inode: (u64, u64),
    stop: Arc<AtomicBool>,
    last: Arc<Mutex<Option<Phase>>>,
    thread: Option<JoinHandle<()>>,
}

/// One connected client.
struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    negotiated: bool,
    closing: bool,
}

/// The serving thread's state.
struct Server {
    control: MigrationControl,
    commands: Commands,
}

impl ControlSocket {
    /// Binds `path` (refusing one that exists unless it is a stale socket) and serves it for
    /// the migration `control` drives; `on_cancel` runs after `migrate_cancel` succeeded.
    pub fn start(
        path: &Path,
        control: &MigrationControl,
        end: End,
        page_size: u64,
        on_cancel: Box<dyn Fn() + Send>,
    ) -> Result<ControlSocket> {
        let shown = path.display();
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => bail!("--control-socket {shown}: another process serves this socket"),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing the stale socket {shown}"))?;
                }
                Err(e) => bail!("--control-socket {shown}: exists and cannot be checked ({e})"),
            },
            Ok(_) => bail!(
                "--control-socket {shown}: exists and is not a socket; not replacing it (choose another path)"
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => bail!("--control-socket {shown}: {e}"),
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("--control-socket {shown}"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("--control-socket {shown}: chmod"))?;
        let meta = std::fs::symlink_metadata(path)?;
        listener.set_nonblocking(true)?;
        signals::remove_on_exit(path.to_path_buf());
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(Mutex::new(None));
        let server = Server {
            control: control.clone(),
            commands: Commands {
                control: control.clone(),
                end,
                page_size,
                on_cancel,
            },
        };
        let (s, l) = (stop.clone(), last.clone());
        let thread = std::thread::Builder::new()
            .name("control-socket".into())
            .spawn(move || server.run(&listener, &s, &l))?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
            stop,
            last,
            thread: Some(thread),
        })
    }

    /// The migration ended with `phase`: tells the clients (unless the migration already
    /// did), sends them what is pending (bounded), closes them and removes the socket.
    pub fn finish(mut self, phase: Phase) {
        *lock(&self.last) = Some(phase);
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Only our own socket: someone may have replaced the path meanwhile.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("removing {}: {e}", self.path.display());
            }
        }
        signals::forget(&self.path);
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shut_down();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    fn send(&mut self, v: &Value) {
        // Serialising a Value cannot fail.
        let _ = serde_json::to_writer(&mut self.output, v);
        self.output.push(b'\n');
    }

    /// Writes what it can without blocking; false when the client is gone.
    fn flush(&mut self) -> bool {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return false,
                Ok(n) => drop(self.output.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.output.len() <= MAX_PENDING && !(self.closing && self.output.is_empty())
    }
}

impl Server {
    fn run(&self, listener: &UnixListener, stop: &AtomicBool, last: &Mutex<Option<Phase>>) {
        let mut clients: Vec<Client> = Vec::new();
        let mut sent = self.control.progress().phase;
        let mut stopping_since: Option<Instant> = None;
        loop {
            // Read before the status, so that the end `finish` set is announced.
            let stopping = stop.load(Ordering::Acquire);
            let phase = self.status(last, sent);
            if phase != sent {
                sent = phase;
                let event = qmp::event(phase);
                for c in clients.iter_mut().filter(|c| c.negotiated) {
                    c.send(&event);
                }
            }
            clients.retain_mut(Client::flush);
            if stopping {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if clients.iter().all(|c| c.output.is_empty())
                    || since.elapsed() > Duration::from_secs(1)
                {
                    return;
                }
            }
            self.poll(listener, &mut clients);
            while let Ok((stream, _)) = listener.accept() {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let mut c = Client {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    negotiated: false,
                    closing: false,
                };
                c.send(&qmp::greeting());
                clients.push(c);
            }
            for c in &mut clients {
                self.read(c, last, sent);
            }
        }
    }

    /// The phase to report: the migration's own, or the end the CLI saw if the migration has
    /// not reported one.
    fn status(&self, last: &Mutex<Option<Phase>>, sent: Phase) -> Phase {
        match *lock(last) {
            Some(_) if sent.is_final() => sent,
            Some(end) => end,
            None => self.control.progress().phase,
        }
    }

    /// Waits (at most a tick) until the listener or a client has something.
    fn poll(&self, listener: &UnixListener, clients: &mut [Client]) {
        let mut fds = vec![libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        fds.extend(clients.iter().map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: libc::POLLIN
                | if c.output.is_empty() {
                    0
                } else {
                    libc::POLLOUT
                },
            revents: 0,
        }));
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the whole call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, TICK_MS) };
    }

    /// Reads what a client sent and answers its complete lines.
    fn read(&self, c: &mut Client, last: &Mutex<Option<Phase>>, sent: Phase) {
        let mut buf = [0u8; 4096];
        while !c.closing {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.closing = true;
                    // Answer a last line that had no newline.
                    if !c.input.is_empty() {
                        c.input.push(b'\n');
                    }
                }
                Ok(n) => c.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => c.closing = true,
            }
            if c.input.len() > MAX_LINE && !c.input[..MAX_LINE].contains(&b'\n') {
                c.send(&qmp::too_long(MAX_LINE));
                c.closing = true;
                return;
            }
        }
        while let Some(nl) = c.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = c.input.drain(..=nl).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let status = self.status(last, sent);
            let reply = self.commands.handle(&line, &mut c.negotiated, status);
            c.send(&reply);
        }
    }
}
