//! Opening the data streams: the source connects, the destination accepts and checks each
//! stream's token (derived from the authenticated handshake) and index.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::wire::{StreamHello, MAC_LEN};

/// Connects `count` data streams to `addr`.
pub fn connect_streams(
    addr: SocketAddr,
    count: u16,
    token: [u8; MAC_LEN],
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    (0..count)
        .map(|i| {
            let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
                Error::io(
                    format!("connecting data stream {i} to {addr}"),
                    e,
                    "data stream",
                )
            })?;
            // A destination that stops reading must not block a sender forever.
            s.set_write_timeout(Some(timeout))
                .map_err(|e| Error::io("data stream write timeout", e, "data stream"))?;
            s.write_all(bytemuck::bytes_of(&StreamHello::new(i, count, token)))
                .map_err(|e| Error::io(format!("greeting on data stream {i}"), e, "data stream"))?;
            Ok(s)
        })
        .collect()
}

/// Accepts `count` data streams on `listener`, in index order. Connections with a wrong token
/// or index are dropped (logged) and do not count; gives up at `timeout`.
pub fn accept_streams(
    listener: &TcpListener,
    count: u16,
    token: [u8; MAC_LEN],
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    let deadline = Instant::now() + timeout;
    let mut slots: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("listener non-blocking", e, "data stream"))?;
    let result = (|| {
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false)
                        .map_err(|e| Error::io("stream blocking mode", e, "data stream"))?;
                    s.set_read_timeout(Some(
                        deadline
                            .saturating_duration_since(Instant::now())
                            .max(Duration::from_millis(10)),
                    ))
                    .map_err(|e| Error::io("stream timeout", e, "data stream"))?;
                    let mut b = [0u8; size_of::<StreamHello>()];
                    if let Err(e) = s.read_exact(&mut b) {
                        tracing::warn!("data stream from {peer} sent no greeting: {e}");
                        continue;
                    }
                    let i = match StreamHello::check(&b, count, &token) {
                        Ok(i) => i,
                        Err(e) => {
                            tracing::warn!("refused a data stream from {peer}: {e}");
                            continue;
                        }
                    };
                    if slots[i as usize].is_some() {
                        tracing::warn!("refused a duplicate data stream {i} from {peer}");
                        continue;
                    }
                    s.set_read_timeout(None)
                        .map_err(|e| Error::io("stream timeout", e, "data stream"))?;
                    slots[i as usize] = Some(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let got = slots.iter().filter(|s| s.is_some()).count();
                        return Err(Error::Timeout(format!(
                            "only {got} of {count} data streams connected"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(Error::io("accepting a data stream", e, "data stream")),
            }
        }
        Ok(())
    })();
    listener
        .set_nonblocking(false)
        .map_err(|e| Error::io("listener blocking mode", e, "data stream"))?;
    result?;
    Ok(slots.into_iter().flatten().collect())
}
