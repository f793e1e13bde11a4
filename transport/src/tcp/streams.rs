//! Opening the data streams: the source connects, the destination accepts and checks each
//! stream's token (derived from the authenticated handshake) and index.

use crate::channel::{ChannelListener, MigrationChannel, Purpose, Stream};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::pending::{self, Pending};
use crate::wire::{StreamHello, MAC_LEN};

/// Opens `count` streams through `channel`, the `i`th for `purpose(i)`.
pub fn connect_streams(
    channel: &mut dyn MigrationChannel,
    purpose: fn(u16) -> Purpose,
    count: u16,
    token: [u8; MAC_LEN],
    timeout: Duration,
) -> Result<Vec<Stream>> {
    (0..count)
        .map(|i| {
            let mut s = channel.open(purpose(i), timeout.min(Duration::from_secs(10)))?;
            // A destination that stops reading must not block a sender forever.
            s.set_write_timeout(Some(timeout))
                .map_err(|e| Error::io("data stream write timeout", e, "data stream"))?;
            s.write_all(bytemuck::bytes_of(&StreamHello::new(i, count, token)))
                .map_err(|e| Error::io(format!("greeting on data stream {i}"), e, "data stream"))?;
            Ok(s)
        })
        .collect()
}

/// Longest a connection may take to send its greeting. Each greeting is read on a thread of
/// its own, so a silent or dripping connection costs a thread for this long at most and
/// never delays the real streams behind it.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// Most connections whose greeting is awaited at once; a new one beyond that evicts the oldest.
const MAX_PENDING: usize = 64;

/// Accepts `count` data streams on `listener`, in index order. Connections with a wrong token
/// or index, or that send no greeting within [`GREETING_TIMEOUT`], are dropped (logged) and do
/// not count; gives up at `timeout`.
pub fn accept_streams(
    listener: &dyn ChannelListener,
    count: u16,
    token: [u8; MAC_LEN],
    timeout: Duration,
) -> Result<Vec<Stream>> {
    let mut sets = accept_stream_sets(listener, &[(count, token)], timeout)?;
    Ok(sets.pop().expect("one set"))
}

/// Accepts several sets of streams at once (the pre-copy and the post-copy streams, which the
/// source opens back to back), each set `(count, token)` in index order; a greeting belongs
/// to the set whose token it carries. Otherwise as [`accept_streams`].
pub fn accept_stream_sets(
    listener: &dyn ChannelListener,
    sets: &[(u16, [u8; MAC_LEN])],
    timeout: Duration,
) -> Result<Vec<Vec<Stream>>> {
    let deadline = Instant::now() + timeout;
    let count: usize = sets.iter().map(|&(n, _)| usize::from(n)).sum();
    let firsts: Vec<usize> = sets
        .iter()
        .scan(0usize, |at, &(n, _)| {
            let first = *at;
            *at += usize::from(n);
            Some(first)
        })
        .collect();
    let sets_owned: std::sync::Arc<Vec<(u16, [u8; MAC_LEN])>> = std::sync::Arc::new(sets.to_vec());
    let mut slots: Vec<Option<Stream>> = (0..count).map(|_| None).collect();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Stream)>();
    let mut pending = Pending::new(MAX_PENDING);
    let result = (|| {
        while slots.iter().any(Option::is_none) {
            while let Ok((i, s)) = rx.try_recv() {
                if slots[i].is_some() {
                    tracing::warn!("refused a duplicate data stream {i}");
                    continue;
                }
                slots[i] = Some(s);
            }
            if slots.iter().all(Option::is_some) {
                break;
            }
            match listener.poll_accept_stream() {
                Ok((s, peer)) => {
                    let Some(done) = pending.admit(&s, "greetings") else {
                        tracing::warn!(
                            "refused a data stream from {peer}: cannot track its socket"
                        );
                        continue;
                    };
                    let (tx, sets, firsts) = (tx.clone(), sets_owned.clone(), firsts.clone());
                    let spawned = crate::threads::spawn("rdmig-greeting", move || {
                        match greeting(s, &sets) {
                            Ok((set, i, s)) => {
                                let _ = tx.send((firsts[set] + usize::from(i), s));
                            }
                            Err(e) => tracing::warn!("refused a data stream from {peer}: {e}"),
                        }
                        pending::done(&done);
                    });
                    if let Err(e) = spawned {
                        return Err(Error::io("spawning a greeting reader", e, "data stream"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let got = slots.iter().filter(|s| s.is_some()).count();
                        return Err(Error::Timeout(format!(
                            "only {got} of {count} data streams connected"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(Error::io("accepting a data stream", e, "data stream")),
            }
        }
        Ok(())
    })();
    result?;
    let mut all = slots.into_iter().flatten();
    Ok(sets
        .iter()
        .map(|&(n, _)| all.by_ref().take(usize::from(n)).collect())
        .collect())
}

/// Reads and checks one connection's greeting within [`GREETING_TIMEOUT`] (as a whole):
/// which set it belongs to, and its index there.
fn greeting(mut s: Stream, sets: &[(u16, [u8; MAC_LEN])]) -> Result<(usize, u16, Stream)> {
    s.set_nonblocking(false)
        .map_err(|e| Error::io("stream blocking mode", e, "data stream"))?;
    let deadline = Instant::now() + GREETING_TIMEOUT;
    let mut b = [0u8; size_of::<StreamHello>()];
    let mut got = 0;
    while got < b.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(format!(
                "no complete greeting within {GREETING_TIMEOUT:?}"
            )));
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| Error::io("stream timeout", e, "data stream"))?;
        match s.read(&mut b[got..]) {
            Ok(0) => {
                return Err(Error::PeerClosed {
                    channel: "data stream",
                    detail: ": before its greeting".into(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading a greeting", e, "data stream")),
        }
    }
    let mut refusal = None;
    for (set, (count, token)) in sets.iter().enumerate() {
        match StreamHello::check(&b, *count, token) {
            Ok(i) => {
                s.set_read_timeout(None)
                    .map_err(|e| Error::io("stream timeout", e, "data stream"))?;
                return Ok((set, i, s));
            }
            Err(e) => refusal = Some(e),
        }
    }
    Err(refusal.unwrap_or_else(|| Error::Protocol("no stream set expected".into())))
}
