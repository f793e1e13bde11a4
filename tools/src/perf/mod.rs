//! `rdma-bench read-bw` and `read-lat`: RDMA READ bandwidth and latency in perftest's manner
//! (no address = server, an address = client), driving the same read engine migrations use.
//!
//! The two ends meet on a TCP connection (`-p`, default 18515) and exchange the transport's
//! own `DataSetup`/`DataSetupAck` payloads (QPN, PSN, GID, region key). The server registers a
//! buffer REMOTE_READ and waits; the client registers its own LOCAL_WRITE buffer and READs.
//! There is no authentication: this is a lab tool, like perftest.

pub mod read_bw;
pub mod read_lat;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;

use anyhow::{bail, Context};
use rdmig_transport::mem::{GuestAddress, GuestMemoryMap, MmapBacking, MmapRegion, PageSize};
use rdmig_transport::rdma::{RdmaOptions, RdmaSourcePath, ReadEngine};
use rdmig_transport::wire::MAX_SETUP;

/// First bytes of the bench exchange.
const MAGIC: [u8; 4] = *b"RDBN";
/// Largest buffer a server agrees to register.
const MAX_BUF: u64 = 1 << 30;

/// Options both tools share.
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// Server address; without it, run as the server.
    pub address: Option<String>,
    /// RDMA device (default: the first with an active RoCE port).
    #[arg(short = 'd', long = "ib-dev")]
    pub ib_dev: Option<String>,
    /// Port of the device.
    #[arg(short = 'i', long = "ib-port")]
    pub ib_port: Option<u8>,
    /// GID index (default: the RoCE v2 GID of the address the TCP exchange uses).
    #[arg(short = 'x', long = "gid-index")]
    pub gid_index: Option<u8>,
    /// TCP port of the exchange.
    #[arg(short = 'p', long = "port", default_value_t = 18515)]
    pub port: u16,
    /// Print JSON lines instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl Common {
    fn rdma(&self, qps: u16, local: IpAddr) -> RdmaOptions {
        RdmaOptions {
            device: self.ib_dev.clone(),
            gid_index: self.gid_index,
            port: self.ib_port,
            qps,
            local_addr: Some(local),
        }
    }
}

/// A buffer registered for the bench, with the map that describes it.
pub struct Buffer {
    /// The map (one region).
    pub map: GuestMemoryMap,
    _mem: Arc<MmapRegion>,
}

impl Buffer {
    fn new(len: u64) -> anyhow::Result<Buffer> {
        let mem = Arc::new(MmapRegion::new(len, MmapBacking::Anonymous, true)?);
        // SAFETY: the mapping is kept in the Buffer next to the map that describes it.
        let region = unsafe { mem.guest_region(GuestAddress(0)) };
        Ok(Buffer {
            map: GuestMemoryMap::new(vec![region], PageSize::KIB4)?,
            _mem: mem,
        })
    }
}

fn send_frame(s: &mut TcpStream, b: &[u8]) -> anyhow::Result<()> {
    s.write_all(&(b.len() as u32).to_le_bytes())?;
    s.write_all(b)?;
    Ok(())
}

fn recv_frame(s: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut n = [0u8; 4];
    s.read_exact(&mut n).context("reading from the peer")?;
    let n = u32::from_le_bytes(n) as usize;
    if n > MAX_SETUP {
        bail!("peer sent a {n}-byte frame (at most {MAX_SETUP})");
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Server side: accepts one client, registers a buffer of the size it asks for, serves
/// its READs until it says it is done.
pub fn serve(common: &Common) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", common.port))
        .with_context(|| format!("listening on port {}", common.port))?;
    eprintln!(
        "rdma-bench server: waiting for a client on port {}",
        common.port
    );
    let (mut s, peer) = listener.accept()?;
    let mut hello = [0u8; 16];
    s.read_exact(&mut hello)?;
    if hello[..4] != MAGIC {
        bail!("{peer} is not an rdma-bench client");
    }
    let qps = u16::from_le_bytes([hello[4], hello[5]]).clamp(1, 64);
    let len = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
    if len == 0 || len > MAX_BUF {
        bail!("client asks for a {len}-byte buffer (1..={MAX_BUF})");
    }
    let buf = Buffer::new(len)?;
    let opts = common.rdma(qps, s.local_addr()?.ip());
    let (mut src, setup) = RdmaSourcePath::new(&buf.map, &opts)?;
    send_frame(&mut s, &setup)?;
    let ack = recv_frame(&mut s)?;
    src.connect(&ack)?;
    s.write_all(b"R")?;
    eprintln!("rdma-bench server: {peer} connected ({qps} QPs, {len}-byte buffer); serving READs");
    let mut done = [0u8; 1];
    let _ = s.read(&mut done);
    rdmig_transport::data::SourceDataPath::close(&mut src)?;
    Ok(())
}

/// Client side: connects, sets up the engine over a `len`-byte buffer.
pub fn connect(
    common: &Common,
    addr: &str,
    qps: u16,
    len: u64,
) -> anyhow::Result<(TcpStream, ReadEngine, Buffer)> {
    let target: SocketAddr = (addr, common.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} has no address"))?;
    let mut s = TcpStream::connect(target)
        .with_context(|| format!("connecting to the server at {target}"))?;
    let mut hello = [0u8; 16];
    hello[..4].copy_from_slice(&MAGIC);
    hello[4..6].copy_from_slice(&qps.to_le_bytes());
    hello[8..16].copy_from_slice(&len.to_le_bytes());
    s.write_all(&hello)?;
    let buf = Buffer::new(len)?;
    let setup = recv_frame(&mut s)?;
    let opts = common.rdma(qps, s.local_addr()?.ip());
    let (engine, ack) = ReadEngine::new(&buf.map, &opts, &setup)?;
    send_frame(&mut s, &ack)?;
    let mut ready = [0u8; 1];
    s.read_exact(&mut ready)
        .context("waiting for the server to connect its queue pairs")?;
    Ok((s, engine, buf))
}

/// Tells the server the client is done.
pub fn finish(mut s: TcpStream) {
    let _ = s.write_all(b"D");
}

/// The sizes to run: `-a` = 2 B … 8 MiB in powers of two, else `-s`.
pub fn sizes(all: bool, size: u64) -> Vec<u64> {
    if all {
        (1..=23).map(|i| 1u64 << i).collect()
    } else {
        vec![size]
    }
}
