//! The destination's post-copy recovery: when the link to the source fails after the guest
//! resumed here, post-copy pauses (the fetchers stop; the guest runs on, and its threads that
//! touch a missing page wait for it), the listener takes only a reconnection that proves the
//! key afresh and the migration id of the first handshake, this end sends what it still
//! lacks, the transport builds a new post-copy link and the fetchers go on over it.
//!
//! | step | message |
//! | --- | --- |
//! | reconnection | `Hello` (`caps::RECONNECT`), `HelloAck`, `AuthProof`, `Recover{proof}` |
//! | accepted | `AuthOk`, then `PostcopyMissing` chunks with `POSTCOPY_RECOVER` |
//! | new link | `DataSetup`, `DataSetupAck`, the transport's streams or queue pairs, `Ready` |
//!
//! The source then sends its digest again (`Switchover`) and post-copy goes on as before.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::listen::{authenticate, Handshake, Rejoin};
use super::setup::Watching;
use super::{Dest, DestState};
use crate::data;
use crate::digest::PageHashes;
use crate::error::{Error, Result};
use crate::mem::GuestMemoryMap;
use crate::pages::PageRange;
use crate::rdma::RdmaOptions;
use crate::session::handle::Phase as Status;
use crate::wire::{Message, MAX_RANGES_PER_MSG, POSTCOPY_LAST_CHUNK, POSTCOPY_RECOVER};

/// What a session that recovers keeps from its first handshake, and its pauses.
pub(super) struct Recovery {
    rejoin: Rejoin,
    streams: u16,
    rdma: RdmaOptions,
    /// Each recovery's pause, from the failure seen here to the fetchers running again.
    pub pauses: Vec<Duration>,
}

impl Recovery {
    pub(super) fn new(rejoin: Rejoin, streams: u16, rdma: RdmaOptions) -> Recovery {
        Recovery {
            rejoin,
            streams,
            rdma,
            pauses: Vec::new(),
        }
    }
}

impl Dest<'_> {
    /// True if `e`, seen after the guest resumed here, is a link failure this session
    /// outlasts.
    pub(super) fn recoverable(&self, e: &Error) -> bool {
        self.recovery.is_some() && e.is_link()
    }

    /// Over an authenticated reconnection: `AuthOk`, the missing set, the new link, the
    /// fetchers started over it, `Ready`.
    fn rejoin(
        &mut self,
        rejoin: &Rejoin,
        hs: &Handshake,
        map: &GuestMemoryMap,
        hashes: &Arc<PageHashes>,
    ) -> Result<()> {
        self.ctl.set_authenticated();
        self.ctl.send(&Message::AuthOk)?;
        let set = self
            .postcopy
            .as_ref()
            .map(|s| s.missing_set())
            .unwrap_or_else(|| crate::pages::PageSet::empty(map));
        let ranges: Vec<PageRange> = set.ranges(u64::from(u32::MAX)).collect();
        let chunks: Vec<&[PageRange]> = if ranges.is_empty() {
            vec![&[]]
        } else {
            ranges.chunks(MAX_RANGES_PER_MSG).collect()
        };
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            let last = if i + 1 == n { POSTCOPY_LAST_CHUNK } else { 0 };
            self.ctl.send(&Message::PostcopyMissing {
                chunk: i as u32,
                flags: POSTCOPY_RECOVER | last,
                ranges: c.to_vec(),
            })?;
        }
        self.state = DestState::AwaitDataSetup;
        let Message::DataSetup(setup) = self.recv()? else {
            unreachable!("state checked")
        };
        let r = self.recovery.as_ref().expect("checked by the caller");
        let params = self.dest_params(
            map,
            hashes,
            (r.streams, r.rdma.clone()),
            false,
            (&hs.hello.nonce, &hs.nonce_d),
        );
        let mut transport = data::dest_transport(rejoin.transport, params);
        let ack = transport.setup(&setup)?;
        self.ctl.send(&Message::DataSetupAck(ack))?;
        let links = transport.connect(&Watching {
            inner: self.listener,
            control: self.control,
        })?;
        if let Some(mut p) = links.precopy {
            if let Err(e) = p.close() {
                tracing::debug!("closing the unused pre-copy path of the new link: {e}");
            }
        }
        if let Some(svc) = self.postcopy.as_mut() {
            let fetchers = links.postcopy.ok_or_else(|| {
                Error::PostcopyUnavailable("the new link has no post-copy fetchers".into())
            })?;
            svc.resume_with(fetchers, hashes.clone(), self.cpu.clone())?;
        }
        self.ctl.send(&Message::Ready)
    }

    /// Pauses post-copy after the link failure `why`, waits for the source to reconnect (up
    /// to the recover timeout) and goes on over a new link. Fails with the timeout (or a
    /// local failure); the caller then reports what is missing as for any post-copy failure.
    pub(super) fn recover(
        &mut self,
        why: &Error,
        map: &GuestMemoryMap,
        hashes: &Arc<PageHashes>,
    ) -> Result<()> {
        let t0 = Instant::now();
        let missing = self.postcopy.as_mut().map_or(0, |s| s.pause());
        // The source learns at once (if it has not seen the failure itself).
        self.ctl.shutdown();
        self.control.update(|p| p.phase = Status::PostcopyPaused);
        let timeout = self.config.recover_timeout.unwrap_or_default();
        tracing::warn!(
            "post-copy paused with {missing} pages missing ({why}); waiting up to {timeout:?} \
             for the source to reconnect"
        );
        let rejoin = self
            .recovery
            .as_ref()
            .expect("recoverable() checked")
            .rejoin
            .clone();
        loop {
            let (ctl, hs) = authenticate(
                self.listener,
                self.config,
                self.control,
                Some((&rejoin, t0 + timeout)),
            )
            .map_err(|e| Error::PostcopyLink(format!("{why}; not recovered: {e}")))?;
            self.ctl = ctl;
            self.control.watch_control(self.ctl.stream());
            self.control.update(|p| p.phase = Status::PostcopyRecover);
            tracing::info!(
                "the source reconnected from {} after {:?}",
                self.ctl.peer(),
                t0.elapsed()
            );
            match self.rejoin(&rejoin, &hs, map, hashes) {
                Ok(()) => break,
                // The new link failed too: pause again and wait for the next reconnection.
                Err(e) if e.is_link() => {
                    tracing::warn!("the reconnection failed ({e}); waiting for another");
                    if let Some(s) = self.postcopy.as_mut() {
                        s.pause();
                    }
                    self.ctl.shutdown();
                    self.control.update(|p| p.phase = Status::PostcopyPaused);
                }
                Err(e) => return Err(e),
            }
        }
        let paused = t0.elapsed();
        let rec = self.recovery.as_mut().expect("checked above");
        rec.pauses.push(paused);
        let count = rec.pauses.len() as u32;
        self.control.update(|p| {
            p.phase = Status::PostcopyActive;
            p.recoveries = count;
        });
        tracing::info!("post-copy recovered after {paused:?} ({missing} pages were missing)");
        self.state = DestState::Postcopy { chunk: 0 };
        Ok(())
    }
}
