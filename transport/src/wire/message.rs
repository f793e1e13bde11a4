//! Control-channel messages: the header, the command numbers, the fixed structs and the
//! [`Message`] enum with its encoder and its bounds-checking decoder.

use bytemuck::{Pod, Zeroable};

use super::le::{Le128, Le16, Le32, Le64};
use crate::error::{Error, Result};
use crate::mem::{GuestAddress, PageIndex, RegionId};
use crate::pages::PageRange;

/// The first four bytes of every control message.
pub const MAGIC: [u8; 4] = *b"RDMG";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Length of the nonces exchanged in `Hello`/`HelloAck`.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Most regions a region table may carry.
pub const MAX_REGIONS: usize = 1024;
/// Most ranges one `Round` message may carry.
pub const MAX_RANGES_PER_MSG: usize = 65536;
/// Largest device state blob.
pub const MAX_DEVICE_STATE: usize = 256 << 20;
/// Largest transport setup payload.
pub const MAX_SETUP: usize = 64 << 10;
/// Longest text (abort reasons, transport reasons).
pub const MAX_TEXT: usize = 4096;

/// Capability bits exchanged in `Hello`/`HelloAck`.
pub mod caps {
    /// TCP data streams.
    pub const TCP: u32 = 1 << 0;
    /// One-sided RDMA reads (a usable device is present).
    pub const RDMA: u32 = 1 << 1;
    /// Post-copy page requests.
    pub const POSTCOPY: u32 = 1 << 2;
}

/// Transport request (in `Hello`) or choice (in `HelloAck`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TransportKind {
    /// Let the ends decide (request only).
    Auto = 0,
    /// TCP data streams.
    Tcp = 1,
    /// One-sided RDMA reads.
    Rdma = 2,
}

impl TransportKind {
    fn from_u8(v: u8) -> Result<TransportKind> {
        Ok(match v {
            0 => TransportKind::Auto,
            1 => TransportKind::Tcp,
            2 => TransportKind::Rdma,
            _ => return Err(Error::Protocol(format!("unknown transport {v}"))),
        })
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
        }
    }
}

/// Command numbers. `0` is invalid so that a zeroed header is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// Never sent.
    Invalid = 0,
    /// Source → destination: version, capabilities, transport request, nonce.
    Hello = 1,
    /// Destination → source: version, capabilities, transport choice, nonce, proof of key.
    HelloAck = 2,
    /// Source → destination: proof of key.
    AuthProof = 3,
    /// Destination → source: authenticated.
    AuthOk = 4,
    /// Source → destination: memory layout.
    RegionTable = 5,
    /// Source → destination: transport-specific setup (RDMA keys and queue pairs).
    DataSetup = 6,
    /// Destination → source: transport-specific setup answer.
    DataSetupAck = 7,
    /// Destination → source: data path up, rounds may start.
    Ready = 8,
    /// Source → destination: a chunk of a round's page ranges.
    Round = 9,
    /// Destination → source: a round has landed.
    RoundDone = 10,
    /// Source → destination: device state of the paused VM.
    DeviceState = 11,
    /// Source → destination: all memory sent; digest to compare.
    Switchover = 12,
    /// Destination → source: digest matched, VM resumed.
    Complete = 13,
    /// Source → destination: the source has stopped; tear down.
    Finish = 14,
    /// Either way: the migration is aborted, with a reason.
    Abort = 15,
}

impl Command {
    /// Decodes a command number.
    pub fn from_u16(v: u16) -> Result<Command> {
        use Command::*;
        Ok(match v {
            1 => Hello,
            2 => HelloAck,
            3 => AuthProof,
            4 => AuthOk,
            5 => RegionTable,
            6 => DataSetup,
            7 => DataSetupAck,
            8 => Ready,
            9 => Round,
            10 => RoundDone,
            11 => DeviceState,
            12 => Switchover,
            13 => Complete,
            14 => Finish,
            15 => Abort,
            _ => return Err(Error::Protocol(format!("unknown command {v}"))),
        })
    }

    /// Largest payload accepted for this command; checked before any allocation.
    pub fn max_payload(self) -> usize {
        use Command::*;
        match self {
            Invalid => 0,
            Hello => size_of::<HelloWire>(),
            HelloAck => size_of::<HelloAckWire>() + MAX_TEXT,
            AuthProof => MAC_LEN,
            AuthOk | Ready | Finish => 0,
            RegionTable => size_of::<RegionTableWire>() + MAX_REGIONS * size_of::<RegionWire>(),
            DataSetup | DataSetupAck => MAX_SETUP,
            Round => size_of::<RoundWire>() + MAX_RANGES_PER_MSG * size_of::<RangeWire>(),
            RoundDone => size_of::<RoundDoneWire>(),
            DeviceState => MAX_DEVICE_STATE,
            Switchover => size_of::<SwitchoverWire>(),
            Complete => size_of::<CompleteWire>(),
            Abort => MAX_TEXT,
        }
    }
}

/// Frame header of every control message.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 4],
    /// [`PROTOCOL_VERSION`].
    pub version: Le16,
    /// A [`Command`].
    pub command: Le16,
    /// Payload bytes that follow.
    pub length: Le32,
    /// Zero.
    pub reserved: Le32,
}

/// `Hello` payload.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct HelloWire {
    /// Protocol version of the source.
    pub version: Le16,
    /// A [`TransportKind`] request.
    pub transport: u8,
    /// Zero.
    pub reserved0: u8,
    /// [`caps`] bits.
    pub caps: Le32,
    /// TCP data streams the source will open.
    pub streams: Le16,
    /// RDMA queue pairs requested.
    pub qps: Le16,
    /// Bandwidth cap in bytes/s (0 = none), applied by whichever end moves data.
    pub max_bandwidth: Le64,
    /// Source nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// `HelloAck` fixed part; followed by the UTF-8 reason for the transport choice.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct HelloAckWire {
    /// Protocol version of the destination.
    pub version: Le16,
    /// The chosen [`TransportKind`] (never `Auto`).
    pub transport: u8,
    /// Zero.
    pub reserved0: u8,
    /// [`caps`] bits.
    pub caps: Le32,
    /// Destination nonce.
    pub nonce: [u8; NONCE_LEN],
    /// HMAC proving the destination holds the key.
    pub mac: [u8; MAC_LEN],
}

/// `RegionTable` fixed part; followed by `count` [`RegionWire`].
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RegionTableWire {
    /// Page size in bytes.
    pub page_size: Le32,
    /// Number of regions.
    pub count: Le32,
}

/// One region in a `RegionTable`.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RegionWire {
    /// Guest physical address.
    pub gpa: Le64,
    /// Length in bytes.
    pub len: Le64,
}

/// Round flag: the last chunk of this round.
pub const ROUND_LAST_CHUNK: u32 = 1;
/// Round flag: the stop-and-copy round (the source VM is paused).
pub const ROUND_FINAL: u32 = 2;

/// `Round` fixed part; followed by `count` [`RangeWire`].
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RoundWire {
    /// Round number (0 = all memory).
    pub round: Le32,
    /// Chunk number within the round.
    pub chunk: Le32,
    /// `ROUND_*` flags.
    pub flags: Le32,
    /// Number of ranges that follow.
    pub count: Le32,
}

/// One page range.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RangeWire {
    /// Region index.
    pub region: Le32,
    /// Pages in the range.
    pub npages: Le32,
    /// First page, relative to the region.
    pub first: Le64,
}

/// `RoundDone` payload.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct RoundDoneWire {
    /// Round number.
    pub round: Le32,
    /// Zero.
    pub reserved: Le32,
    /// Pages landed.
    pub pages: Le64,
    /// Bytes landed.
    pub bytes: Le64,
    /// Destination time for the round, µs.
    pub micros: Le64,
}

/// `Switchover` payload.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct SwitchoverWire {
    /// The source's memory digest.
    pub digest: Le128,
    /// Total guest pages covered by the digest.
    pub pages: Le64,
    /// Zero.
    pub reserved: Le64,
}

/// `Complete` payload.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct CompleteWire {
    /// The destination's memory digest.
    pub digest: Le128,
    /// CPU time the destination's migration threads used, µs.
    pub cpu_micros: Le64,
    /// Destination time from `Switchover` received to the VM resumed, µs.
    pub resume_micros: Le64,
    /// Pages the destination received in all.
    pub pages: Le64,
    /// Bytes the destination received in all.
    pub bytes: Le64,
}

const _: () = {
    assert!(size_of::<Header>() == 16);
    assert!(size_of::<HelloWire>() == 52);
    assert!(size_of::<HelloAckWire>() == 72);
    assert!(size_of::<RegionTableWire>() == 8);
    assert!(size_of::<RegionWire>() == 16);
    assert!(size_of::<RoundWire>() == 16);
    assert!(size_of::<RangeWire>() == 16);
    assert!(size_of::<RoundDoneWire>() == 32);
    assert!(size_of::<SwitchoverWire>() == 32);
    assert!(size_of::<CompleteWire>() == 48);
};

/// `Hello`, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Source version.
    pub version: u16,
    /// Transport request.
    pub transport: TransportKind,
    /// Capabilities.
    pub caps: u32,
    /// TCP streams.
    pub streams: u16,
    /// RDMA queue pairs.
    pub qps: u16,
    /// Bandwidth cap, bytes/s, 0 = none.
    pub max_bandwidth: u64,
    /// Nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// `HelloAck`, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloAck {
    /// Destination version.
    pub version: u16,
    /// Chosen transport.
    pub transport: TransportKind,
    /// Capabilities.
    pub caps: u32,
    /// Nonce.
    pub nonce: [u8; NONCE_LEN],
    /// HMAC tag.
    pub mac: [u8; MAC_LEN],
    /// Why that transport.
    pub reason: String,
}

/// `Round`, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Round {
    /// Round number.
    pub round: u32,
    /// Chunk number.
    pub chunk: u32,
    /// `ROUND_*` flags.
    pub flags: u32,
    /// Page ranges (not yet checked against the region table: the receiver does that).
    pub ranges: Vec<PageRange>,
}

/// `RoundDone`, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundDone {
    /// Round.
    pub round: u32,
    /// Pages.
    pub pages: u64,
    /// Bytes.
    pub bytes: u64,
    /// Destination µs.
    pub micros: u64,
}

/// `Complete`, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Complete {
    /// Destination digest.
    pub digest: u128,
    /// Destination migration CPU µs.
    pub cpu_micros: u64,
    /// Destination switchover-to-resume µs.
    pub resume_micros: u64,
    /// Pages received.
    pub pages: u64,
    /// Bytes received.
    pub bytes: u64,
}

/// Every control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Command::Hello`].
    Hello(Hello),
    /// See [`Command::HelloAck`].
    HelloAck(HelloAck),
    /// See [`Command::AuthProof`].
    AuthProof([u8; MAC_LEN]),
    /// See [`Command::AuthOk`].
    AuthOk,
    /// See [`Command::RegionTable`].
    RegionTable {
        /// Page size in bytes.
        page_size: u32,
        /// Regions: guest physical address and length.
        regions: Vec<(GuestAddress, u64)>,
    },
    /// See [`Command::DataSetup`].
    DataSetup(Vec<u8>),
    /// See [`Command::DataSetupAck`].
    DataSetupAck(Vec<u8>),
    /// See [`Command::Ready`].
    Ready,
    /// See [`Command::Round`].
    Round(Round),
    /// See [`Command::RoundDone`].
    RoundDone(RoundDone),
    /// See [`Command::DeviceState`].
    DeviceState(Vec<u8>),
    /// See [`Command::Switchover`].
    Switchover {
        /// Source digest.
        digest: u128,
        /// Pages covered.
        pages: u64,
    },
    /// See [`Command::Complete`].
    Complete(Complete),
    /// See [`Command::Finish`].
    Finish,
    /// See [`Command::Abort`].
    Abort(String),
}

fn text(s: &str) -> &[u8] {
    let b = s.as_bytes();
    let mut n = b.len().min(MAX_TEXT);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &b[..n]
}

impl Message {
    /// The command of this message.
    pub fn command(&self) -> Command {
        match self {
            Message::Hello(_) => Command::Hello,
            Message::HelloAck(_) => Command::HelloAck,
            Message::AuthProof(_) => Command::AuthProof,
            Message::AuthOk => Command::AuthOk,
            Message::RegionTable { .. } => Command::RegionTable,
            Message::DataSetup(_) => Command::DataSetup,
            Message::DataSetupAck(_) => Command::DataSetupAck,
            Message::Ready => Command::Ready,
            Message::Round(_) => Command::Round,
            Message::RoundDone(_) => Command::RoundDone,
            Message::DeviceState(_) => Command::DeviceState,
            Message::Switchover { .. } => Command::Switchover,
            Message::Complete(_) => Command::Complete,
            Message::Finish => Command::Finish,
            Message::Abort(_) => Command::Abort,
        }
    }

    /// Encodes header and payload into `out` (cleared first). Fails if a variable part
    /// exceeds its bound, so an encoder can never produce what a decoder refuses.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.extend_from_slice(&[0u8; size_of::<Header>()]);
        match self {
            Message::Hello(h) => out.extend_from_slice(bytemuck::bytes_of(&HelloWire {
                version: h.version.into(),
                transport: h.transport as u8,
                reserved0: 0,
                caps: h.caps.into(),
                streams: h.streams.into(),
                qps: h.qps.into(),
                max_bandwidth: h.max_bandwidth.into(),
                nonce: h.nonce,
            })),
            Message::HelloAck(h) => {
                out.extend_from_slice(bytemuck::bytes_of(&HelloAckWire {
                    version: h.version.into(),
                    transport: h.transport as u8,
                    reserved0: 0,
                    caps: h.caps.into(),
                    nonce: h.nonce,
                    mac: h.mac,
                }));
                out.extend_from_slice(text(&h.reason));
            }
            Message::AuthProof(mac) => out.extend_from_slice(mac),
            Message::AuthOk | Message::Ready | Message::Finish => {}
            Message::RegionTable { page_size, regions } => {
                if regions.len() > MAX_REGIONS {
                    return Err(Error::InvalidConfig(format!(
                        "{} regions, at most {MAX_REGIONS}",
                        regions.len()
                    )));
                }
                out.extend_from_slice(bytemuck::bytes_of(&RegionTableWire {
                    page_size: (*page_size).into(),
                    count: (regions.len() as u32).into(),
                }));
                for (gpa, len) in regions {
                    out.extend_from_slice(bytemuck::bytes_of(&RegionWire {
                        gpa: gpa.0.into(),
                        len: (*len).into(),
                    }));
                }
            }
            Message::DataSetup(b) | Message::DataSetupAck(b) | Message::DeviceState(b) => {
                if b.len() > self.command().max_payload() {
                    return Err(Error::InvalidConfig(format!(
                        "{:?} payload of {} bytes exceeds {}",
                        self.command(),
                        b.len(),
                        self.command().max_payload()
                    )));
                }
                out.extend_from_slice(b);
            }
            Message::Round(r) => {
                if r.ranges.len() > MAX_RANGES_PER_MSG {
                    return Err(Error::InvalidConfig(format!(
                        "{} ranges in one message",
                        r.ranges.len()
                    )));
                }
                out.reserve(size_of::<RoundWire>() + r.ranges.len() * size_of::<RangeWire>());
                out.extend_from_slice(bytemuck::bytes_of(&RoundWire {
                    round: r.round.into(),
                    chunk: r.chunk.into(),
                    flags: r.flags.into(),
                    count: (r.ranges.len() as u32).into(),
                }));
                for g in &r.ranges {
                    let npages = u32::try_from(g.npages).map_err(|_| {
                        Error::InvalidConfig(format!("range of {} pages is too long", g.npages))
                    })?;
                    out.extend_from_slice(bytemuck::bytes_of(&RangeWire {
                        region: g.region.0.into(),
                        npages: npages.into(),
                        first: g.first.0.into(),
                    }));
                }
            }
            Message::RoundDone(d) => out.extend_from_slice(bytemuck::bytes_of(&RoundDoneWire {
                round: d.round.into(),
                reserved: 0.into(),
                pages: d.pages.into(),
                bytes: d.bytes.into(),
                micros: d.micros.into(),
            })),
            Message::Switchover { digest, pages } => {
                out.extend_from_slice(bytemuck::bytes_of(&SwitchoverWire {
                    digest: (*digest).into(),
                    pages: (*pages).into(),
                    reserved: 0.into(),
                }))
            }
            Message::Complete(c) => out.extend_from_slice(bytemuck::bytes_of(&CompleteWire {
                digest: c.digest.into(),
                cpu_micros: c.cpu_micros.into(),
                resume_micros: c.resume_micros.into(),
                pages: c.pages.into(),
                bytes: c.bytes.into(),
            })),
            Message::Abort(reason) => out.extend_from_slice(text(reason)),
        }
        let len = out.len() - size_of::<Header>();
        let header = Header {
            magic: MAGIC,
            version: PROTOCOL_VERSION.into(),
            command: (self.command() as u16).into(),
            length: (len as u32).into(),
            reserved: 0.into(),
        };
        out[..size_of::<Header>()].copy_from_slice(bytemuck::bytes_of(&header));
        Ok(())
    }

    /// Encodes into a new buffer.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.encode_into(&mut v)?;
        Ok(v)
    }

    /// Checks a header and returns its command and payload length, refusing bad magic, other
    /// versions, unknown commands and oversized payloads before anything is read further.
    pub fn check_header(bytes: &[u8; size_of::<Header>()]) -> Result<(Command, usize)> {
        let h: Header = bytemuck::pod_read_unaligned(bytes);
        if h.magic != MAGIC {
            return Err(Error::Protocol(format!(
                "bad magic {:02x?} (not an rdmig peer?)",
                h.magic
            )));
        }
        if h.version.get() != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                peer: h.version.get(),
                ours: PROTOCOL_VERSION,
            });
        }
        let cmd = Command::from_u16(h.command.get())?;
        if cmd == Command::Invalid {
            return Err(Error::Protocol("command 0 (invalid)".into()));
        }
        let len = h.length.get() as usize;
        if len > cmd.max_payload() {
            return Err(Error::Protocol(format!(
                "{cmd:?} payload of {len} bytes exceeds its bound of {}",
                cmd.max_payload()
            )));
        }
        Ok((cmd, len))
    }

    /// Decodes a payload whose header passed [`Message::check_header`].
    pub fn decode(cmd: Command, p: &[u8]) -> Result<Message> {
        fn fixed<T: Pod>(cmd: Command, p: &[u8]) -> Result<T> {
            if p.len() != size_of::<T>() {
                return Err(Error::Protocol(format!(
                    "{cmd:?} payload is {} bytes, expected {}",
                    p.len(),
                    size_of::<T>()
                )));
            }
            Ok(bytemuck::pod_read_unaligned(p))
        }
        fn prefix<T: Pod>(cmd: Command, p: &[u8]) -> Result<(T, &[u8])> {
            if p.len() < size_of::<T>() {
                return Err(Error::Protocol(format!(
                    "{cmd:?} payload truncated at {} bytes",
                    p.len()
                )));
            }
            Ok((
                bytemuck::pod_read_unaligned(&p[..size_of::<T>()]),
                &p[size_of::<T>()..],
            ))
        }
        fn array<T: Pod>(cmd: Command, rest: &[u8], count: usize, max: usize) -> Result<Vec<T>> {
            if count > max {
                return Err(Error::Protocol(format!(
                    "{cmd:?} announces {count} entries, at most {max}"
                )));
            }
            if rest.len() != count * size_of::<T>() {
                return Err(Error::Protocol(format!(
                    "{cmd:?} announces {count} entries but carries {} bytes (truncated or trailing data)",
                    rest.len()
                )));
            }
            Ok(rest
                .chunks_exact(size_of::<T>())
                .map(bytemuck::pod_read_unaligned)
                .collect())
        }
        fn empty(cmd: Command, p: &[u8], m: Message) -> Result<Message> {
            if p.is_empty() {
                Ok(m)
            } else {
                Err(Error::Protocol(format!(
                    "{cmd:?} carries {} unexpected bytes",
                    p.len()
                )))
            }
        }
        Ok(match cmd {
            Command::Invalid => return Err(Error::Protocol("command 0 (invalid)".into())),
            Command::Hello => {
                let w: HelloWire = fixed(cmd, p)?;
                Message::Hello(Hello {
                    version: w.version.get(),
                    transport: TransportKind::from_u8(w.transport)?,
                    caps: w.caps.get(),
                    streams: w.streams.get(),
                    qps: w.qps.get(),
                    max_bandwidth: w.max_bandwidth.get(),
                    nonce: w.nonce,
                })
            }
            Command::HelloAck => {
                let (w, rest): (HelloAckWire, _) = prefix(cmd, p)?;
                let transport = TransportKind::from_u8(w.transport)?;
                if transport == TransportKind::Auto {
                    return Err(Error::Protocol(
                        "HelloAck must choose a transport, not auto".into(),
                    ));
                }
                Message::HelloAck(HelloAck {
                    version: w.version.get(),
                    transport,
                    caps: w.caps.get(),
                    nonce: w.nonce,
                    mac: w.mac,
                    reason: String::from_utf8_lossy(rest).into_owned(),
                })
            }
            Command::AuthProof => Message::AuthProof(fixed(cmd, p)?),
            Command::AuthOk => empty(cmd, p, Message::AuthOk)?,
            Command::Ready => empty(cmd, p, Message::Ready)?,
            Command::Finish => empty(cmd, p, Message::Finish)?,
            Command::RegionTable => {
                let (w, rest): (RegionTableWire, _) = prefix(cmd, p)?;
                let regions: Vec<RegionWire> =
                    array(cmd, rest, w.count.get() as usize, MAX_REGIONS)?;
                Message::RegionTable {
                    page_size: w.page_size.get(),
                    regions: regions
                        .iter()
                        .map(|r| (GuestAddress(r.gpa.get()), r.len.get()))
                        .collect(),
                }
            }
            Command::DataSetup => Message::DataSetup(p.to_vec()),
            Command::DataSetupAck => Message::DataSetupAck(p.to_vec()),
            Command::DeviceState => Message::DeviceState(p.to_vec()),
            Command::Round => {
                let (w, rest): (RoundWire, _) = prefix(cmd, p)?;
                let ranges: Vec<RangeWire> =
                    array(cmd, rest, w.count.get() as usize, MAX_RANGES_PER_MSG)?;
                let mut out = Vec::with_capacity(ranges.len());
                for r in ranges {
                    if r.npages.get() == 0 {
                        return Err(Error::Protocol("Round carries an empty range".into()));
                    }
                    out.push(PageRange {
                        region: RegionId(r.region.get()),
                        first: PageIndex(r.first.get()),
                        npages: u64::from(r.npages.get()),
                    });
                }
                Message::Round(Round {
                    round: w.round.get(),
                    chunk: w.chunk.get(),
                    flags: w.flags.get(),
                    ranges: out,
                })
            }
            Command::RoundDone => {
                let w: RoundDoneWire = fixed(cmd, p)?;
                Message::RoundDone(RoundDone {
                    round: w.round.get(),
                    pages: w.pages.get(),
                    bytes: w.bytes.get(),
                    micros: w.micros.get(),
                })
            }
            Command::Switchover => {
                let w: SwitchoverWire = fixed(cmd, p)?;
                Message::Switchover {
                    digest: w.digest.get(),
                    pages: w.pages.get(),
                }
            }
            Command::Complete => {
                let w: CompleteWire = fixed(cmd, p)?;
                Message::Complete(Complete {
                    digest: w.digest.get(),
                    cpu_micros: w.cpu_micros.get(),
                    resume_micros: w.resume_micros.get(),
                    pages: w.pages.get(),
                    bytes: w.bytes.get(),
                })
            }
            Command::Abort => Message::Abort(String::from_utf8_lossy(p).into_owned()),
        })
    }

    /// A short name for errors and logs.
    pub fn name(&self) -> String {
        format!("{:?}", self.command())
    }
}
