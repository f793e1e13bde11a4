//! The control channel: framed [`Message`]s over one TCP connection, with bounded reads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::wire::{Header, Message};

/// One end of the control connection.
#[derive(Debug)]
pub struct Control {
    stream: TcpStream,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    peer: SocketAddr,
}

impl Control {
    /// Wraps a connected stream (Nagle off: control messages are small and latency-bound).
    pub fn new(stream: TcpStream, timeout: Option<Duration>) -> Result<Control> {
        let peer = stream
            .peer_addr()
            .map_err(|e| Error::io("control peer address", e, "control"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io("TCP_NODELAY on control", e, "control"))?;
        stream
            .set_read_timeout(timeout)
            .map_err(|e| Error::io("control read timeout", e, "control"))?;
        Ok(Control {
            stream,
            wbuf: Vec::new(),
            rbuf: Vec::new(),
            peer,
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The local address.
    pub fn local(&self) -> Result<SocketAddr> {
        self.stream
            .local_addr()
            .map_err(|e| Error::io("control local address", e, "control"))
    }

    /// Changes the read timeout.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(|e| Error::io("control read timeout", e, "control"))
    }

    /// Sends one message.
    pub fn send(&mut self, m: &Message) -> Result<()> {
        m.encode_into(&mut self.wbuf)?;
        self.stream
            .write_all(&self.wbuf)
            .map_err(|e| Error::io(format!("sending {}", m.name()), e, "control"))
    }

    /// Receives one message, including `Abort`.
    pub fn recv_any(&mut self) -> Result<Message> {
        let mut hdr = [0u8; size_of::<Header>()];
        self.stream
            .read_exact(&mut hdr)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout(
                    format!("no message from {} on the control channel", self.peer),
                ),
                _ => Error::io("reading a control header", e, "control"),
            })?;
        let (cmd, len) = Message::check_header(&hdr)?;
        self.rbuf.resize(len, 0);
        self.stream.read_exact(&mut self.rbuf).map_err(|e| {
            Error::io(
                format!("reading a {cmd:?} payload of {len} bytes"),
                e,
                "control",
            )
        })?;
        Message::decode(cmd, &self.rbuf)
    }

    /// Receives one message; a peer's `Abort` becomes [`Error::PeerAborted`].
    pub fn recv(&mut self) -> Result<Message> {
        match self.recv_any()? {
            Message::Abort(reason) => Err(Error::PeerAborted(reason)),
            m => Ok(m),
        }
    }

    /// Best-effort abort notice; failures are logged, not returned (the channel may be dead).
    pub fn send_abort(&mut self, reason: &str) {
        if let Err(e) = self.send(&Message::Abort(reason.to_string())) {
            tracing::debug!("could not deliver abort notice: {e}");
        }
    }

    /// Shuts the connection down both ways.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
