//! The source's first two phases: the handshake (versions, capabilities, transport, mutual
//! authentication) and the data setup (region table, the transport's `DataSetup` exchange and
//! streams), ending when the destination is `Ready` for round 0.

use std::time::Instant;

use super::content::ContentLog;
use super::{Negotiated, Phase, Precopy, Source, SourceState};
use crate::auth::random_bytes;
use crate::data::{self, SourceParams};
use crate::error::{Error, Result};
use crate::pages::PageSet;
use crate::session::config::MigrationMode;
use crate::session::handle::Phase as Status;
use crate::session::policy::Convergence;
use crate::vm::DirtyLog;
use crate::wire::{caps, Hello, Message, NONCE_LEN, PROTOCOL_VERSION};

impl Source<'_> {
    /// Hello, HelloAck (the destination proves the key), AuthProof, AuthOk.
    pub(super) fn handshake(&mut self) -> Result<Negotiated> {
        let config = self.config;
        config.psk.check_connection(self.ctl.stream().tls())?;
        let nonce_s = random_bytes()?;
        let mut my_caps = caps::TCP;
        if self.rdma_here {
            my_caps |= caps::RDMA;
        }
        let mode = config.mode;
        if mode != MigrationMode::Precopy {
            my_caps |= caps::POSTCOPY;
        }
        if config.zero_pages {
            my_caps |= caps::ZERO_PAGES;
        }
        my_caps |= caps::LIVE_PARAMS | caps::ABORT_CODES;
        let content = self.vm.dirty_log() == DirtyLog::Content;
        if content {
            my_caps |= caps::LANDED;
        }
        // Recovery needs a channel that can open new connections later.
        if mode != MigrationMode::Precopy
            && config.recover_timeout.is_some()
            && self.channel.reconnects()
        {
            my_caps |= caps::RECOVER;
        }
        self.ctl.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            transport: config.transport,
            mode: mode.to_u8(),
            caps: my_caps,
            streams: config.streams,
            qps: config.rdma.qps,
            max_bandwidth: config.max_bandwidth.unwrap_or(0),
            nonce: nonce_s,
        }))?;
        let ack = match self.recv() {
            // A TLS destination hangs up on a plain Hello at once: say what that may mean.
            Err(Error::PeerClosed { channel, detail }) if self.ctl.stream().tls().is_empty() => {
                return Err(Error::PeerClosed {
                    channel,
                    detail: format!(
                        "{detail} before answering the Hello (does the destination require TLS?)"
                    ),
                })
            }
            r => r?,
        };
        let Message::HelloAck(ack) = ack else {
            unreachable!("state checked")
        };
        if !config.psk.check_dest_proof(&nonce_s, &ack.nonce, &ack.mac) {
            return Err(Error::AuthFailed(
                "the destination did not prove the pre-shared key (not the same key?)".into(),
            ));
        }
        // The destination proved the key: its text may be shown from now on.
        self.ctl.set_authenticated();
        self.zero_pages = config.zero_pages && ack.caps & caps::ZERO_PAGES != 0;
        self.live_params = ack.caps & caps::LIVE_PARAMS != 0;
        self.ctl.set_abort_codes(ack.caps & caps::ABORT_CODES != 0);
        if mode != MigrationMode::Precopy && ack.caps & caps::POSTCOPY == 0 {
            return Err(Error::PostcopyUnavailable(format!(
                "the destination does not offer post-copy (needed for {} mode)",
                mode.name()
            )));
        }
        if content && ack.caps & caps::LANDED == 0 {
            return Err(Error::InvalidConfig(
                "this VM has no dirty log, and the destination cannot report what it holds (caps::LANDED: an older rdmig?)".into(),
            ));
        }
        if content {
            self.content = Some(ContentLog::new(&self.map));
        }
        self.ctl.send(&Message::AuthProof(
            config.psk.source_proof(&nonce_s, &ack.nonce),
        ))?;
        self.state = SourceState::AwaitAuthOk;
        self.recv()?;
        tracing::info!(
            "authenticated; transport {} ({})",
            ack.transport.name(),
            ack.reason
        );
        if ack.caps & caps::VM_INFO != 0 {
            self.ctl.send(&Message::VmInfo(self.vm.descriptor()))?;
        }
        Ok(Negotiated {
            transport: ack.transport,
            reason: ack.reason,
            nonces: (nonce_s, ack.nonce),
            recover: my_caps & ack.caps & caps::RECOVER != 0,
        })
    }

    /// The region table, the transport's setup and streams; then the first round's state.
    pub(super) fn setup(&mut self, n: Negotiated) -> Result<Phase> {
        let config = self.config;
        let mode = config.mode;
        // Keys and addresses go out only now.
        self.ctl.send(&Message::RegionTable {
            page_size: self.map.page_size().bytes() as u32,
            regions: self
                .map
                .regions()
                .iter()
                .map(|r| (r.gpa(), r.len()))
                .collect(),
        })?;
        let (ns, nd) = (&n.nonces.0, &n.nonces.1);
        self.kind = n.transport;
        self.migration_id = config.psk.migration_id(ns, nd);
        self.recover = n.recover;
        let params = self.source_params(mode != MigrationMode::Postcopy, (ns, nd));
        let mut transport = data::source_transport(n.transport, params);
        self.transport = transport.name();
        self.reason = n.reason;
        let payload = transport.setup()?;
        self.ctl.send(&Message::DataSetup(payload))?;
        self.state = SourceState::AwaitSetupAck;
        let Message::DataSetupAck(ack) = self.recv()? else {
            unreachable!("state checked")
        };
        let control = self.control;
        let mut watched = WatchingChannel {
            inner: &mut *self.channel,
            control,
        };
        self.data = Some(transport.connect(&ack, &mut watched)?.precopy);
        self.state = SourceState::AwaitReady;
        self.recv()?;
        self.setup_time = self.started.elapsed();

        // Post-copy mode runs no round that moves pages: every page is in the post-copy set,
        // except (with zero pages) those a metadata-only round found zero while the guest
        // ran, with the dirty log on to catch the ones written since.
        let scan = mode == MigrationMode::Postcopy && self.zero_pages;
        if mode != MigrationMode::Postcopy || scan {
            self.vm
                .start_dirty_log()
                .map_err(|e| Error::vmm("start dirty log", e))?;
            self.logging = true;
        }
        let mut pre = Precopy {
            set: PageSet::full(&self.map),
            conv: Convergence::from_config(config),
            round: 0,
            scanned: scan,
            forced: false,
            bytes: 0,
            round_time: std::time::Duration::ZERO,
            per_round: Vec::new(),
        };
        self.control.update(|p| {
            p.phase = Status::Active;
            p.remaining_bytes = self.map.total_bytes();
            p.max_bandwidth = self.limiter.rate();
            p.downtime_limit = config.downtime_limit;
        });
        if mode != MigrationMode::Postcopy {
            return Ok(Phase::Precopy(pre));
        }
        if scan {
            let t = Instant::now();
            let sent = self.send_round(0, &pre.set, false, true)?;
            self.zero_total += sent.zero_pages;
            tracing::info!(
                "post-copy: {} of {} pages are zero (scanned in {:?})",
                sent.zero_pages,
                pre.set.count(),
                t.elapsed()
            );
            pre.set = sent.data_set.expect("asked for");
        }
        Ok(Phase::Postcopy(pre))
    }
}

impl Source<'_> {
    /// The transport's parameters for this session: whether pre-copy rounds move pages, and
    /// the nonces its streams' tokens are bound to (the first handshake's, or a
    /// reconnection's).
    pub(super) fn source_params(
        &self,
        precopy: bool,
        (ns, nd): (&[u8; NONCE_LEN], &[u8; NONCE_LEN]),
    ) -> SourceParams {
        let config = self.config;
        SourceParams {
            map: self.map.clone(),
            streams: config.streams,
            rdma: config.rdma.clone(),
            precopy,
            postcopy: config.mode != MigrationMode::Precopy,
            limiter: self.limiter.clone(),
            cpu: self.cpu.clone(),
            io_timeout: config.io_timeout,
            tokens: (
                config.psk.stream_token(ns, nd),
                config.psk.postcopy_token(ns, nd),
            ),
            local_ip: self.ctl.local_ip(),
        }
    }
}

/// Opens through the session's channel, watching each new connection for a cancel.
pub(super) struct WatchingChannel<'c> {
    pub inner: &'c mut dyn crate::channel::MigrationChannel,
    pub control: &'c crate::session::MigrationControl,
}

impl crate::channel::MigrationChannel for WatchingChannel<'_> {
    fn open(
        &mut self,
        purpose: crate::channel::Purpose,
        timeout: std::time::Duration,
    ) -> Result<crate::channel::Stream> {
        self.control.check()?;
        let s = self.inner.open(purpose, timeout)?;
        self.control.watch_fd(&s);
        Ok(s)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn reconnects(&self) -> bool {
        self.inner.reconnects()
    }

    fn retarget(&mut self, target: &str) -> Result<()> {
        self.inner.retarget(target)
    }
}
