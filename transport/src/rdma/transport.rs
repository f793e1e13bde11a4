//! RDMA as a transport plug-in ([`crate::data`]): queue pairs and memory keys travel in the
//! `DataSetup` / `DataSetupAck` payloads; no stream is opened. A session that may switch to
//! post-copy gets queue pairs of its own for the destination's fault fetcher and
//! prefetchers, after the pre-copy ones (none in post-copy mode), each READing into staging
//! memory of its own (or the second mapping of memfd guest memory).

use super::engine::Prepared;
use super::{RdmaDestPath, RdmaOptions, RdmaPageFetcher, RdmaSourcePath, Staging};
use crate::channel::{ChannelListener, MigrationChannel};
use crate::data::{
    DestDataPath, DestLinks, DestParams, DestTransport, SourceLinks, SourceParams, SourceTransport,
};
use crate::error::{Error, Result};
use crate::postcopy::{self, Fetchers, PageFetcher};

/// The source end of RDMA.
pub struct RdmaSource {
    params: SourceParams,
    path: Option<RdmaSourcePath>,
}

impl RdmaSource {
    /// For a session with `params`.
    pub fn new(params: SourceParams) -> RdmaSource {
        RdmaSource { params, path: None }
    }
}

impl SourceTransport for RdmaSource {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn setup(&mut self) -> Result<Vec<u8>> {
        let p = &self.params;
        let mut opts = p.rdma.clone();
        if opts.local_addr.is_none() {
            // The GID that belongs to the address the control channel uses.
            opts.local_addr = p.local_ip;
        }
        if p.postcopy {
            let bulk = if p.precopy { opts.qps.max(1) } else { 0 };
            opts.qps = bulk + postcopy::stream_count(p.streams);
        }
        let (path, payload) = RdmaSourcePath::new(&p.map, &opts)?;
        self.path = Some(path);
        Ok(payload)
    }

    fn connect(
        self: Box<Self>,
        ack: &[u8],
        _channel: &mut dyn MigrationChannel,
    ) -> Result<SourceLinks> {
        let mut path = self
            .path
            .ok_or_else(|| Error::Rdma("connect before setup".into()))?;
        path.connect(ack)?;
        Ok(SourceLinks {
            precopy: Box::new(path),
        })
    }
}

/// The destination end of RDMA.
pub struct RdmaDest {
    params: DestParams,
    links: Option<DestLinks>,
    /// The registration of guest memory started by [`DestTransport::prepare`].
    prepared: Option<std::thread::JoinHandle<Result<Prepared>>>,
}

impl RdmaDest {
    /// For a session with `params`.
    pub fn new(params: DestParams) -> RdmaDest {
        RdmaDest {
            params,
            links: None,
            prepared: None,
        }
    }

    /// The RDMA options of this end: the source's QP count, and the GID of the control
    /// channel's address unless one is configured.
    fn options(&self) -> RdmaOptions {
        let p = &self.params;
        let mut opts = p.rdma.clone();
        opts.qps = p.rdma.qps.max(1);
        if opts.local_addr.is_none() {
            opts.local_addr = p.local_ip;
        }
        opts
    }

    /// The early registration's result, once it ended (`None` if none was started).
    fn take_prepared(&mut self) -> Result<Option<Prepared>> {
        let Some(h) = self.prepared.take() else {
            return Ok(None);
        };
        let r = h
            .join()
            .map_err(|_| Error::Rdma("the registration thread panicked".into()))?;
        r.map(Some)
    }
}

impl Drop for RdmaDest {
    /// A setup that never came: the registration ends (and is undone) before guest memory
    /// may go away.
    fn drop(&mut self) {
        let _ = self.take_prepared();
    }
}

impl DestTransport for RdmaDest {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn prepare(&mut self) {
        // Only pre-copy rounds READ into guest memory itself (post-copy mode: staging).
        if !self.params.precopy || self.prepared.is_some() {
            return;
        }
        let (map, opts, cpu) = (
            self.params.map.clone(),
            self.options(),
            self.params.cpu.clone(),
        );
        match crate::threads::spawn("rdmig-rdma-register", move || {
            let t = crate::cpu::ThreadCpu::start(&cpu);
            let r = Prepared::new(&map, &opts);
            drop(t);
            r
        }) {
            Ok(h) => self.prepared = Some(h),
            // Registered in `setup` then, as without it.
            Err(e) => tracing::warn!("no thread to register guest memory early: {e}"),
        }
    }

    fn setup(&mut self, setup: &[u8]) -> Result<Vec<u8>> {
        let prepared = self.take_prepared()?;
        let opts = self.options();
        let p = &self.params;
        let page = p.map.page_size().bytes() as usize;
        let mut staging = Vec::new();
        if p.postcopy {
            for i in 0..usize::from(postcopy::stream_count(p.streams)) {
                staging.push(match &p.alias {
                    Some(a) => Staging::alias(a.clone()),
                    None if i == 0 => {
                        Staging::new(postcopy::fault::staging_bytes(page), p.map.page_size())?
                    }
                    None => {
                        Staging::new(postcopy::prefetch::staging_bytes(page), p.map.page_size())?
                    }
                });
            }
        }
        let (path, mut fetchers, ack) = RdmaDestPath::with_postcopy(
            &p.map,
            &opts,
            setup,
            p.hashes.clone(),
            p.cpu.clone(),
            Some(p.limiter.clone()),
            staging,
            prepared,
        )?;
        if path.is_none() == p.precopy {
            return Err(Error::Protocol(if path.is_none() {
                "the source offers no queue pair for the pre-copy rounds".into()
            } else {
                "the source offers queue pairs for pre-copy rounds in post-copy mode".into()
            }));
        }
        let postcopy = if p.postcopy {
            if fetchers.is_empty() {
                return Err(Error::PostcopyUnavailable(
                    "the source offers no queue pair for post-copy fetches".into(),
                ));
            }
            let aborts = fetchers.iter().map(RdmaPageFetcher::abort_flag).collect();
            let prefetch = fetchers
                .split_off(1)
                .into_iter()
                .map(|f| Box::new(f) as Box<dyn PageFetcher>)
                .collect();
            Some(Fetchers {
                fault: Box::new(fetchers.remove(0)),
                prefetch,
                streams: Vec::new(),
                aborts,
            })
        } else {
            None
        };
        self.links = Some(DestLinks {
            precopy: path.map(|p| Box::new(p) as Box<dyn DestDataPath>),
            postcopy,
        });
        Ok(ack)
    }

    fn connect(mut self: Box<Self>, _listener: &dyn ChannelListener) -> Result<DestLinks> {
        self.links
            .take()
            .ok_or_else(|| Error::Rdma("connect before setup".into()))
    }
}
