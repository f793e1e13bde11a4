//! The source's post-copy recovery: when the link fails after the destination resumed the
//! guest, the source keeps the paused VM and its memory, closes the old link (TCP: its page
//! server; RDMA: its queue pairs and registration), and reconnects through the migration's
//! channel with backoff, for up to the recover timeout. The reconnection authenticates
//! afresh (new nonces) and proves the migration id of the first handshake (`Recover`); the
//! destination answers with what it still lacks, and the transport builds a new post-copy
//! link (TCP: new post-copy streams and page server; RDMA: memory registered again, new
//! queue pairs). See `session/dest/recover.rs` for the messages.

use std::time::{Duration, Instant};

use super::handshake::WatchingChannel;
use super::{Source, SourceState};
use crate::auth::random_bytes;
use crate::channel::Purpose;
use crate::control::Control;
use crate::data;
use crate::error::{Error, Result};
use crate::session::handle::Phase as Status;
use crate::wire::{caps, Hello, Message, POSTCOPY_LAST_CHUNK, POSTCOPY_RECOVER, PROTOCOL_VERSION};

/// First wait between reconnection attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest wait between reconnection attempts: a link that comes back is used within it
/// (an attempt costs a connect).
const MAX_BACKOFF: Duration = Duration::from_millis(50);
/// Longest one reconnection's connect may take (a link that drops packets makes a connect
/// hang rather than fail; the next attempt follows).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest any one message of a reconnection's handshake may take.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Source<'_> {
    /// True if `e` is a link failure this migration outlasts: after the destination resumed
    /// the guest, with both ends offering recovery.
    pub(super) fn recoverable(&self, e: &Error) -> bool {
        self.recover && self.guest_moved && e.is_link()
    }

    /// Pauses post-copy after the link failure `why` and reconnects until a new link is up,
    /// or fails when the recover timeout passes.
    pub(super) fn recover(&mut self, why: &Error) -> Result<()> {
        let t0 = Instant::now();
        self.control.update(|p| p.phase = Status::PostcopyPaused);
        if let Some(mut d) = self.data.take() {
            self.served_before += d.pages_served().unwrap_or(0);
            if let Err(e) = d.close() {
                tracing::debug!("closing the failed post-copy link: {e}");
            }
        }
        self.ctl.shutdown();
        let timeout = self.config.recover_timeout.unwrap_or_default();
        tracing::warn!(
            "post-copy link failed ({why}); the VM stays paused here, reconnecting to {} for \
             up to {timeout:?}",
            self.channel.describe()
        );
        let deadline = t0 + timeout;
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.rejoin(deadline) {
                Ok(missing) => {
                    let paused = t0.elapsed();
                    self.pauses.push(paused);
                    let count = self.pauses.len() as u32;
                    let page = self.map.page_size().bytes();
                    self.control.update(|p| {
                        p.phase = Status::PostcopyActive;
                        p.recoveries = count;
                        p.remaining_bytes = missing * page;
                    });
                    tracing::info!(
                        "post-copy recovered after {paused:?} ({attempts} attempts); the \
                         destination lacks {missing} pages"
                    );
                    return Ok(());
                }
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::Timeout(format!(
                            "post-copy recovery: the destination did not take a reconnection \
                             within {timeout:?} ({attempts} attempts; the link failed with: \
                             {why}; the last attempt: {e})"
                        )));
                    }
                    tracing::debug!("reconnection attempt {attempts} failed: {e}");
                    self.ctl.shutdown();
                    std::thread::sleep(backoff.min(deadline - now));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One reconnection: handshake with `Recover`, the destination's missing set, the new
    /// link. Returns the pages the destination lacks.
    fn rejoin(&mut self, deadline: Instant) -> Result<u64> {
        let config = self.config;
        if let Some(t) = self.control.take_recover_target() {
            match self.channel.retarget(&t) {
                Ok(()) => tracing::info!("post-copy recovery: reconnecting to {t} from now on"),
                Err(e) => tracing::error!("post-copy recovery: {e}; reconnecting as before"),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let stream = self.channel.open(
            Purpose::Control,
            CONNECT_TIMEOUT.min(left).max(Duration::from_millis(1)),
        )?;
        self.ctl = Control::new(stream, Some(config.io_timeout.min(REJOIN_TIMEOUT)))?;
        config.psk.check_connection(self.ctl.stream().tls())?;
        let nonce_s = random_bytes()?;
        let mut my_caps = caps::TCP | caps::POSTCOPY | caps::RECOVER | caps::RECONNECT;
        if self.kind == crate::wire::TransportKind::Rdma {
            my_caps |= caps::RDMA;
        }
        if self.zero_pages {
            my_caps |= caps::ZERO_PAGES;
        }
        my_caps |= caps::LIVE_PARAMS | caps::ABORT_CODES;
        self.state = SourceState::AwaitHelloAck;
        self.ctl.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            transport: self.kind,
            mode: config.mode.to_u8(),
            caps: my_caps,
            streams: config.streams,
            qps: config.rdma.qps,
            max_bandwidth: self.limiter.rate(),
            nonce: nonce_s,
        }))?;
        let Message::HelloAck(ack) = self.recv()? else {
            unreachable!("state checked")
        };
        let psk = &config.psk;
        if !psk.check_dest_proof(&nonce_s, &ack.nonce, &ack.mac) {
            return Err(Error::AuthFailed(
                "the reconnected destination did not prove the pre-shared key".into(),
            ));
        }
        self.ctl.set_authenticated();
        self.ctl.set_abort_codes(ack.caps & caps::ABORT_CODES != 0);
        if ack.transport != self.kind {
            return Err(Error::Protocol(format!(
                "the reconnected destination chose {}, the migration runs on {}",
                ack.transport.name(),
                self.kind.name()
            )));
        }
        self.ctl
            .send(&Message::AuthProof(psk.source_proof(&nonce_s, &ack.nonce)))?;
        self.ctl.send(&Message::Recover(psk.recover_proof(
            &self.migration_id,
            &nonce_s,
            &ack.nonce,
        )))?;
        self.state = SourceState::AwaitAuthOk;
        self.recv()?;
        // What the destination still lacks: every range checked against the region table.
        let mut missing = 0u64;
        self.state = SourceState::AwaitRecoverMissing(0);
        loop {
            let Message::PostcopyMissing {
                chunk,
                flags,
                ranges,
            } = self.recv()?
            else {
                unreachable!("state checked")
            };
            if flags & POSTCOPY_RECOVER == 0 {
                return Err(Error::Protocol(
                    "a recovery's missing set without POSTCOPY_RECOVER".into(),
                ));
            }
            for r in &ranges {
                self.map.span(r.region, r.first, r.npages)?;
                missing += r.npages;
            }
            if flags & POSTCOPY_LAST_CHUNK != 0 {
                break;
            }
            self.state = SourceState::AwaitRecoverMissing(chunk + 1);
        }
        self.ctl.set_timeout(Some(config.io_timeout));
        let params = self.source_params(false, (&nonce_s, &ack.nonce));
        let mut transport = data::source_transport(self.kind, params);
        let payload = transport.setup()?;
        self.ctl.send(&Message::DataSetup(payload))?;
        self.state = SourceState::AwaitSetupAck;
        let Message::DataSetupAck(setup_ack) = self.recv()? else {
            unreachable!("state checked")
        };
        let control = self.control;
        let mut watched = WatchingChannel {
            inner: &mut *self.channel,
            control,
        };
        self.data = Some(transport.connect(&setup_ack, &mut watched)?.precopy);
        self.state = SourceState::AwaitReady;
        self.recv()?;
        Ok(missing)
    }
}
