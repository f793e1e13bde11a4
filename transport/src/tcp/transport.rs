//! TCP as a transport plug-in ([`crate::data`]): the data streams (and, for sessions that
//! may switch to post-copy, the post-copy streams) are opened through the migration channel
//! right after `DataSetupAck`, each proving the handshake with its token.

use super::{
    accept_stream_sets, connect_streams, PageServer, TcpDestPath, TcpPageFetcher, TcpSourcePath,
};
use crate::channel::{ChannelListener, MigrationChannel, Purpose};
use crate::data::{
    DestLinks, DestParams, DestTransport, SourceDataPath, SourceLinks, SourceParams,
    SourceTransport,
};
use crate::error::{Error, Result};
use crate::pages::PageRange;
use crate::postcopy::{self, Fetchers, PageFetcher};

/// The source end of TCP.
pub struct TcpSource(SourceParams);

impl TcpSource {
    /// For a session with `params`.
    pub fn new(params: SourceParams) -> TcpSource {
        TcpSource(params)
    }
}

impl SourceTransport for TcpSource {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn setup(&mut self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    fn connect(
        self: Box<Self>,
        ack: &[u8],
        channel: &mut dyn MigrationChannel,
    ) -> Result<SourceLinks> {
        let p = self.0;
        if !ack.is_empty() {
            return Err(Error::Protocol("TCP DataSetupAck carries a payload".into()));
        }
        let streams = connect_streams(channel, Purpose::Data, p.streams, p.tokens.0, p.io_timeout)?;
        let path = TcpSourcePath::new(
            p.map.clone(),
            streams,
            Some(p.limiter.clone()),
            p.cpu.clone(),
        )?;
        // The page server idles until the destination asks for pages after a post-copy
        // switchover.
        let server = if p.postcopy {
            let streams = connect_streams(
                channel,
                Purpose::Postcopy,
                postcopy::stream_count(p.streams),
                p.tokens.1,
                p.io_timeout,
            )?;
            Some(PageServer::start(
                p.map.clone(),
                streams,
                Some(p.limiter.clone()),
                p.cpu.clone(),
            )?)
        } else {
            None
        };
        Ok(SourceLinks {
            precopy: Box::new(SourceSide { path, server }),
        })
    }
}

/// The pre-copy path and the post-copy page server of one session.
struct SourceSide {
    path: TcpSourcePath,
    server: Option<PageServer>,
}

impl SourceDataPath for SourceSide {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn send_chunk(&mut self, round: u32, ranges: &[PageRange]) -> Result<()> {
        self.path.send_chunk(round, ranges)
    }

    fn finish_round(&mut self, round: u32) -> Result<()> {
        self.path.finish_round(round)
    }

    fn close(&mut self) -> Result<()> {
        let served = self.stop_serving();
        self.path.close().and(served)
    }

    fn pages_served(&self) -> Option<u64> {
        Some(self.server.as_ref().map_or(0, PageServer::pages_served))
    }

    fn stop_serving(&mut self) -> Result<()> {
        match self.server.as_mut() {
            Some(s) => s.stop(),
            None => Ok(()),
        }
    }
}

/// The destination end of TCP.
pub struct TcpDest(DestParams);

impl TcpDest {
    /// For a session with `params`.
    pub fn new(params: DestParams) -> TcpDest {
        TcpDest(params)
    }
}

impl DestTransport for TcpDest {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn setup(&mut self, setup: &[u8]) -> Result<Vec<u8>> {
        if !setup.is_empty() {
            return Err(Error::Protocol("TCP DataSetup carries a payload".into()));
        }
        Ok(Vec::new())
    }

    fn connect(self: Box<Self>, listener: &dyn ChannelListener) -> Result<DestLinks> {
        let p = self.0;
        // The pre-copy and (post-copy, hybrid) the post-copy streams, accepted together: the
        // source opens them back to back.
        let mut sets = vec![(p.streams, p.tokens.0)];
        if p.postcopy {
            sets.push((postcopy::stream_count(p.streams), p.tokens.1));
        }
        let mut got = accept_stream_sets(listener, &sets, p.io_timeout)?;
        got.iter().flatten().for_each(|s| (p.watch)(s));
        let fetchers = if p.postcopy {
            Some(fetchers(&p, got.pop().expect("the post-copy set"))?)
        } else {
            None
        };
        let streams = got.pop().expect("the pre-copy set");
        let path = TcpDestPath::new(
            p.map.clone(),
            streams,
            p.hashes.clone(),
            p.cpu.clone(),
            p.io_timeout,
        )?;
        Ok(DestLinks {
            precopy: Some(Box::new(path)),
            postcopy: fetchers,
        })
    }
}

/// One fetcher per post-copy stream, the first for faults.
fn fetchers(p: &DestParams, mut streams: Vec<crate::channel::Stream>) -> Result<Fetchers> {
    if streams.len() < 2 {
        return Err(Error::PostcopyUnavailable(
            "post-copy streams are not connected".into(),
        ));
    }
    let clones = streams
        .iter()
        .map(|s| {
            s.try_clone()
                .map_err(|e| Error::io("cloning a post-copy stream", e, "post-copy stream"))
        })
        .collect::<Result<Vec<_>>>()?;
    let prefetch = streams
        .split_off(1)
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            TcpPageFetcher::new(s, p.map.clone(), format!("prefetch {i}"))
                .map(|f| Box::new(f) as Box<dyn PageFetcher>)
        })
        .collect::<Result<Vec<_>>>()?;
    let fault = Box::new(TcpPageFetcher::new(
        streams.remove(0),
        p.map.clone(),
        "fault",
    )?);
    Ok(Fetchers {
        fault,
        prefetch,
        streams: clones,
        aborts: Vec::new(),
    })
}
