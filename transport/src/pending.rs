//! Connections still in their handshake or greeting, bounded: beyond the bound the oldest is
//! evicted (shut down), never the new one, so a flood of silent connections cannot lock a real
//! peer out — its handshake takes milliseconds, and only that many newer connections arriving
//! within them could evict it.

use crate::channel::Stream;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The pending connections of one listener.
pub(crate) struct Pending {
    max: usize,
    /// A handle on each pending stream (to evict it) and the flag its handler sets when done.
    q: VecDeque<(Stream, Arc<AtomicBool>)>,
}

impl Pending {
    /// At most `max` pending at once.
    pub(crate) fn new(max: usize) -> Pending {
        Pending {
            max,
            q: VecDeque::new(),
        }
    }

    /// Admits `s` (evicting the oldest pending connection if the bound is reached) and returns
    /// the flag its handler must set when it ends; `None` if the socket cannot be tracked.
    pub(crate) fn admit(&mut self, s: &Stream, what: &str) -> Option<Arc<AtomicBool>> {
        self.q.retain(|(_, done)| !done.load(Ordering::Acquire));
        if self.q.len() >= self.max {
            if let Some((oldest, _)) = self.q.pop_front() {
                let peer = oldest.peer();
                tracing::warn!(
                    "{} {what} pending: dropping the oldest, from {peer}",
                    self.max
                );
                let _ = oldest.shutdown(std::net::Shutdown::Both);
            }
        }
        let handle = s.try_clone().ok()?;
        let done = Arc::new(AtomicBool::new(false));
        self.q.push_back((handle, done.clone()));
        Some(done)
    }
}

/// Marks a pending connection's handling as ended.
pub(crate) fn done(flag: &AtomicBool) {
    flag.store(true, Ordering::Release);
}
