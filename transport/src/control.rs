//! The control channel: framed [`Message`]s over one TCP connection.
//!
//! Every message is bounded as a whole: a message must begin within one I/O timeout, and its
//! header and payload must then arrive within one I/O timeout of its first byte (a peer
//! dripping a byte at a time is timed out like a silent one). The command is checked before any payload is read — against the
//! receiver's state ([`Control::recv_filtered`]) and, before the peer has authenticated,
//! against the handshake's few small messages — and a payload grows only as its bytes arrive
//! (at most [`READ_CHUNK`] ahead), so a header announcing a large payload costs nothing until
//! the bytes are there. Text from a peer (abort reasons) is not shown before it authenticated.

use crate::abort::{AbortCode, PeerAbort};
use crate::channel::Stream;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::wire::{Command, Header, Message};

/// Most payload bytes buffered ahead of what has arrived.
pub const READ_CHUNK: usize = 1 << 20;

/// Largest payload accepted before the peer has authenticated (the handshake's messages).
pub const PRE_AUTH_MAX_PAYLOAD: usize = 8192;

/// What an end tells an unauthenticated peer when it ends the handshake: the kind of failure
/// from this fixed list, never its detail (device names, paths, library errors). The same
/// list is all of an unauthenticated peer's abort text that is shown.
pub const PRE_AUTH_REASONS: [&str; 7] = [
    "protocol version mismatch",
    "authentication failed",
    "RDMA cannot be used",
    "post-copy cannot be run",
    "handshake timed out",
    "protocol error in the handshake",
    "the migration was refused",
];

/// The entry of [`PRE_AUTH_REASONS`] for `e`.
pub fn pre_auth_reason(e: &Error) -> &'static str {
    PRE_AUTH_REASONS[match e {
        Error::VersionMismatch { .. } => 0,
        Error::AuthFailed(_) => 1,
        Error::RdmaUnavailable(_) => 2,
        Error::PostcopyUnavailable(_) => 3,
        Error::Timeout(_) => 4,
        Error::Protocol(_) | Error::UnexpectedMessage { .. } => 5,
        _ => 6,
    }]
}

/// The handshake's commands: all a peer may send before it has authenticated.
fn pre_auth(cmd: Command) -> bool {
    matches!(
        cmd,
        Command::Hello
            | Command::HelloAck
            | Command::AuthProof
            | Command::Recover
            | Command::AuthOk
            | Command::Abort
    )
}

/// One end of the control connection.
#[derive(Debug)]
pub struct Control {
    stream: Stream,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    peer: String,
    timeout: Option<Duration>,
    authenticated: bool,
    /// The peer understands `Fail`.
    abort_codes: bool,
}

impl Control {
    /// Wraps a connected stream (Nagle off: control messages are small and latency-bound).
    /// `timeout` bounds each whole message received (`None`: wait for ever).
    pub fn new(stream: impl Into<Stream>, timeout: Option<Duration>) -> Result<Control> {
        let stream = stream.into();
        let peer = stream.peer();
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io("TCP_NODELAY on control", e, "control"))?;
        Ok(Control {
            stream,
            wbuf: Vec::new(),
            rbuf: Vec::new(),
            peer,
            timeout,
            authenticated: false,
            abort_codes: false,
        })
    }

    /// The peer, for logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The local IP address (TCP only): the RDMA device is picked by it.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.stream.local_ip()
    }

    /// The connection, to watch it for cancel.
    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Changes the per-message timeout.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Records that the peer proved the key: from now on any command may arrive (subject to
    /// the receiver's state) and the peer's text is shown.
    pub fn set_authenticated(&mut self) {
        self.authenticated = true;
    }

    /// Whether the peer has authenticated.
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// Sends one message.
    pub fn send(&mut self, m: &Message) -> Result<()> {
        m.encode_into(&mut self.wbuf)?;
        self.stream
            .write_all(&self.wbuf)
            .map_err(|e| Error::io(format!("sending {}", m.name()), e, "control"))
    }

    /// Reads exactly `buf.len()` bytes before `deadline`. `started` says whether bytes of this
    /// message arrived already: a deadline passing mid-message is a stalled peer (the stream
    /// cannot be resynchronised), not a retryable timeout.
    fn read_exact_by(
        &mut self,
        mut buf: &mut [u8],
        deadline: Option<Instant>,
        what: &str,
        mut started: bool,
    ) -> Result<()> {
        while !buf.is_empty() {
            let left = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.stalled(what, started));
                    }
                    Some(left)
                }
                None => None,
            };
            self.stream
                .set_read_timeout(left)
                .map_err(|e| Error::io("control read timeout", e, "control"))?;
            match self.stream.read(buf) {
                Ok(0) => {
                    return Err(Error::PeerClosed {
                        channel: "control",
                        detail: format!(": {what}"),
                    })
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    started = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.stalled(what, started))
                }
                Err(e) => return Err(Error::io(what.to_string(), e, "control")),
            }
        }
        Ok(())
    }

    fn stalled(&self, what: &str, started: bool) -> Error {
        let t = self.timeout.unwrap_or_default();
        if started {
            Error::Protocol(format!(
                "{what}: the peer {} sent part of a message and not the rest within {t:?}",
                self.peer
            ))
        } else {
            Error::Timeout(format!(
                "no message from {} on the control channel within {t:?}",
                self.peer
            ))
        }
    }

    /// Receives one message, including `Abort`, whatever the command.
    pub fn recv_any(&mut self) -> Result<Message> {
        self.recv_checked("receiving", &|_| true)
    }

    /// Receives one message whose command `accept` allows (`Abort` always is), refusing any
    /// other from its header alone, before its payload is read, as unexpected while `state`.
    pub fn recv_filtered(
        &mut self,
        state: &'static str,
        accept: &dyn Fn(Command) -> bool,
    ) -> Result<Message> {
        match self.recv_checked(state, accept)? {
            Message::Abort(reason) => Err(Error::PeerAborted(PeerAbort::text(reason))),
            Message::Fail { code, reason } => Err(Error::PeerAborted(PeerAbort {
                code: AbortCode::from_u16(code),
                reason,
            })),
            m => Ok(m),
        }
    }

    fn recv_checked(
        &mut self,
        state: &'static str,
        accept: &dyn Fn(Command) -> bool,
    ) -> Result<Message> {
        // Up to one timeout for a message to begin, then one timeout for all of it.
        let mut hdr = [0u8; size_of::<Header>()];
        let wait = self.timeout.map(|t| Instant::now() + t);
        self.read_exact_by(&mut hdr[..1], wait, "reading a control header", false)?;
        let deadline = self.timeout.map(|t| Instant::now() + t);
        self.read_exact_by(&mut hdr[1..], deadline, "reading a control header", true)?;
        let (cmd, len) = Message::check_header(&hdr)?;
        if !self.authenticated && (!pre_auth(cmd) || len > PRE_AUTH_MAX_PAYLOAD) {
            return Err(Error::Protocol(format!(
                "{cmd:?} of {len} bytes before the peer authenticated (only the handshake's \
                 small messages are accepted then)"
            )));
        }
        if !matches!(cmd, Command::Abort | Command::Fail) && !accept(cmd) {
            return Err(Error::UnexpectedMessage {
                state,
                got: format!("{cmd:?}"),
            });
        }
        // Grow the buffer as the bytes arrive, never far ahead of them.
        let mut buf = std::mem::take(&mut self.rbuf);
        buf.clear();
        let what = format!("reading a {cmd:?} payload of {len} bytes");
        while buf.len() < len {
            let at = buf.len();
            let n = (len - at).min(READ_CHUNK);
            buf.resize(at + n, 0);
            if let Err(e) = self.read_exact_by(&mut buf[at..], deadline, &what, true) {
                self.rbuf = buf;
                return Err(e);
            }
        }
        let m = Message::decode(cmd, &buf);
        self.rbuf = buf;
        match m? {
            Message::Abort(r) if !self.authenticated && !PRE_AUTH_REASONS.contains(&r.as_str()) => {
                Ok(Message::Abort(
                    "(its reason is not shown: the peer had not authenticated)".into(),
                ))
            }
            m => Ok(m),
        }
    }

    /// Receives one message; a peer's `Abort` becomes [`Error::PeerAborted`].
    pub fn recv(&mut self) -> Result<Message> {
        self.recv_filtered("receiving", &|_| true)
    }

    /// After a failed send or a closed connection: the `Abort` the peer sent before it
    /// closed, if one is waiting (read for at most 200 ms).
    pub fn pending_abort(&mut self) -> Option<PeerAbort> {
        self.timeout = Some(Duration::from_millis(200));
        match self.recv_any() {
            Err(Error::PeerAborted(r)) => Some(r),
            Ok(Message::Abort(r)) => Some(PeerAbort::text(r)),
            Ok(Message::Fail { code, reason }) => Some(PeerAbort {
                code: AbortCode::from_u16(code),
                reason,
            }),
            _ => None,
        }
    }

    /// Records that the peer understands `Fail` (both offered `caps::ABORT_CODES`).
    pub fn set_abort_codes(&mut self, on: bool) {
        self.abort_codes = on;
    }

    /// Best-effort notice of this end's failure `e` to the peer: after authentication with
    /// its code and text (`Fail`, or `Abort` to a peer without codes); before it only the
    /// fixed kind of failure. Failures to send are logged (the channel may be dead).
    pub fn send_failure(&mut self, e: &Error) {
        let m = if !self.authenticated {
            Message::Abort(pre_auth_reason(e).to_string())
        } else if self.abort_codes {
            Message::Fail {
                code: AbortCode::of(e).to_u16(),
                reason: e.to_string(),
            }
        } else {
            Message::Abort(e.to_string())
        };
        if let Err(se) = self.send(&m) {
            tracing::debug!("could not deliver the abort notice: {se}");
        }
    }

    /// Best-effort abort notice; failures are logged, not returned (the channel may be dead).
    pub fn send_abort(&mut self, reason: &str) {
        if let Err(e) = self.send(&Message::Abort(reason.to_string())) {
            tracing::debug!("could not deliver abort notice: {e}");
        }
    }

    /// True if the peer closed the connection or it failed (checked without blocking or
    /// consuming anything: data waiting to be read is not a close).
    pub fn peer_gone(&self) -> bool {
        let mut b = 0u8;
        // SAFETY: a one-byte peek into a local on our own socket.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => true,
            n if n > 0 => false,
            _ => !matches!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }

    /// Shuts the connection down both ways.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
