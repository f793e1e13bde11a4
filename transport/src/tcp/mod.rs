//! The TCP data path: page data on N streams separate from the control connection, sent
//! straight from source guest memory with `writev` and received straight into destination
//! guest memory with `recv(MSG_WAITALL)`: no staging copy of page data on either side.
//! Post-copy over TCP: the destination's [`TcpPageFetcher`]s ask the source's [`PageServer`]
//! on streams of their own. [`TcpSource`] and [`TcpDest`] are the transport plug-in
//! ([`crate::data`]).

mod fetch;
mod io;
mod receiver;
mod sender;
mod serve;
mod streams;
mod transport;

pub use fetch::TcpPageFetcher;
pub(crate) use io::{recv_exact, writev_all};
pub use receiver::TcpDestPath;
pub use sender::TcpSourcePath;
pub use serve::PageServer;
pub use streams::{accept_stream_sets, accept_streams, connect_streams, GREETING_TIMEOUT};
pub use transport::{TcpDest, TcpSource};

/// Largest run of page data sent after one header: big enough to amortise the header and
/// the system call, small enough to balance rounds across streams.
pub const MAX_PIECE_BYTES: u64 = 1 << 20;
