//! Builds the transport a handshake chose: the one place that maps a [`TransportKind`] to
//! its implementation.

use super::{DestParams, DestTransport, SourceParams, SourceTransport};
use crate::rdma::{DeviceSummary, RdmaDest, RdmaOptions, RdmaSource};
use crate::tcp::{TcpDest, TcpSource};
use crate::wire::TransportKind;

/// The source end of `kind` (`Auto` never reaches here: the destination decides).
pub fn source_transport(kind: TransportKind, params: SourceParams) -> Box<dyn SourceTransport> {
    match kind {
        TransportKind::Rdma => Box::new(RdmaSource::new(params)),
        TransportKind::Tcp | TransportKind::Auto => Box::new(TcpSource::new(params)),
    }
}

/// The destination end of `kind`.
pub fn dest_transport(kind: TransportKind, params: DestParams) -> Box<dyn DestTransport> {
    match kind {
        TransportKind::Rdma => Box::new(RdmaDest::new(params)),
        TransportKind::Tcp | TransportKind::Auto => Box::new(TcpDest::new(params)),
    }
}

/// This host's usable RDMA device for `opts`, or why there is none (what the handshake offers
/// and chooses by).
pub fn local_rdma(opts: &RdmaOptions) -> Result<DeviceSummary, String> {
    crate::rdma::probe(opts)
}
