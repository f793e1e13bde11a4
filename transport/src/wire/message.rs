//! Control-channel messages: the limits, and the [`Message`] enum with its encoder and its
//! bounds-checking decoder over the fixed structs of [`super::layout`] (the command numbers
//! are in `command.rs`).

use bytemuck::Pod;

use super::command::Command;
use super::layout::*;
use super::le::Le64;
use super::negotiate::TransportKind;
use crate::error::{Error, Result};
use crate::mem::{GuestAddress, PageIndex, RegionId};
use crate::pages::PageRange;

/// The first four bytes of every control message.
pub const MAGIC: [u8; 4] = *b"RDMG";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
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

/// `Hello`, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Source version.
    pub version: u16,
    /// Transport request.
    pub transport: TransportKind,
    /// Migration mode byte (see [`HelloWire::mode`]).
    pub mode: u8,
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

/// `PostcopyComplete`, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostcopyComplete {
    /// Digest, CPU, pages and bytes as in a pre-copy `Complete` (`resume_micros` is 0: it
    /// came in `PostcopyResumed`).
    pub complete: Complete,
    /// Fault events served.
    pub faults: u64,
    /// Pages installed by the fault service.
    pub fault_pages: u64,
    /// From resume to the last page installed, µs.
    pub postcopy_micros: u64,
    /// Fault latency p50, p90, p99, p99.9, max, ns.
    pub latency_ns: [u64; 5],
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
    /// See [`Command::PostcopyMissing`].
    PostcopyMissing {
        /// Chunk number.
        chunk: u32,
        /// `POSTCOPY_*` flags.
        flags: u32,
        /// Missing page ranges (checked against the region table by the receiver).
        ranges: Vec<PageRange>,
    },
    /// See [`Command::PostcopyResumed`].
    PostcopyResumed {
        /// Destination µs from the set received to resumed.
        resume_micros: u64,
        /// Pages marked missing.
        missing: u64,
    },
    /// See [`Command::PostcopyComplete`].
    PostcopyComplete(PostcopyComplete),
    /// See [`Command::PostcopyDropped`].
    PostcopyDropped {
        /// Destination µs to drop the pages.
        micros: u64,
        /// Pages dropped.
        pages: u64,
    },
    /// See [`Command::Fail`].
    Fail {
        /// The kind of failure (`crate::abort::AbortCode`'s encoding).
        code: u16,
        /// Why.
        reason: String,
    },
    /// See [`Command::VmInfo`].
    VmInfo(crate::vm::VmDescriptor),
    /// See [`Command::Recover`].
    Recover([u8; MAC_LEN]),
    /// See [`Command::Params`].
    Params {
        /// Bandwidth cap, bytes/s (0: none).
        max_bandwidth: u64,
    },
    /// See [`Command::Landed`].
    Landed(super::landed::Landed),
}

/// Encodes a `RoundWire` and its ranges (a `Round` or a `PostcopyMissing` chunk).
fn encode_ranges(
    out: &mut Vec<u8>,
    round: u32,
    chunk: u32,
    flags: u32,
    ranges: &[PageRange],
) -> Result<()> {
    if ranges.len() > MAX_RANGES_PER_MSG {
        return Err(Error::InvalidConfig(format!(
            "{} ranges in one message",
            ranges.len()
        )));
    }
    out.reserve(size_of::<RoundWire>() + ranges.len() * size_of::<RangeWire>());
    out.extend_from_slice(bytemuck::bytes_of(&RoundWire {
        round: round.into(),
        chunk: chunk.into(),
        flags: flags.into(),
        count: (ranges.len() as u32).into(),
    }));
    for g in ranges {
        let npages = u32::try_from(g.npages).map_err(|_| {
            Error::InvalidConfig(format!("range of {} pages is too long", g.npages))
        })?;
        if npages == 0 {
            // The receiver refuses it; refuse it here, where the bug is.
            return Err(Error::InvalidConfig("an empty page range".into()));
        }
        out.extend_from_slice(bytemuck::bytes_of(&RangeWire {
            region: g.region.0.into(),
            npages: npages.into(),
            first: g.first.0.into(),
        }));
    }
    Ok(())
}

/// Text from the peer made safe for a log line or a terminal: control characters (newlines,
/// escapes, carriage returns) and the Unicode bidirectional controls are written as `\u{..}`
/// escapes, so a peer cannot forge a line or move the cursor. Printable text is kept. The result
/// is cut to [`MAX_TEXT`] bytes like the text on the wire, so it encodes back unchanged.
pub fn peer_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_TEXT));
    for c in s.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}');
        let escape = c.is_control() || bidi;
        let len = if escape {
            c.escape_unicode().len()
        } else {
            c.len_utf8()
        };
        if out.len() + len > MAX_TEXT {
            // Never an escape or a character cut in two.
            break;
        }
        if escape {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
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
            Message::PostcopyMissing { .. } => Command::PostcopyMissing,
            Message::PostcopyResumed { .. } => Command::PostcopyResumed,
            Message::PostcopyComplete(_) => Command::PostcopyComplete,
            Message::PostcopyDropped { .. } => Command::PostcopyDropped,
            Message::Params { .. } => Command::Params,
            Message::Landed(_) => Command::Landed,
            Message::Fail { .. } => Command::Fail,
            Message::VmInfo(_) => Command::VmInfo,
            Message::Recover(_) => Command::Recover,
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
                mode: h.mode,
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
            Message::AuthProof(mac) | Message::Recover(mac) => out.extend_from_slice(mac),
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
            Message::Round(r) => encode_ranges(out, r.round, r.chunk, r.flags, &r.ranges)?,
            Message::Landed(l) => super::landed::encode(out, l)?,
            Message::PostcopyMissing {
                chunk,
                flags,
                ranges,
            } => encode_ranges(out, 0, *chunk, *flags, ranges)?,
            Message::PostcopyResumed {
                resume_micros,
                missing,
            } => out.extend_from_slice(bytemuck::bytes_of(&PostcopyResumedWire {
                resume_micros: (*resume_micros).into(),
                missing: (*missing).into(),
            })),
            Message::PostcopyDropped { micros, pages } => {
                out.extend_from_slice(bytemuck::bytes_of(&PostcopyResumedWire {
                    resume_micros: (*micros).into(),
                    missing: (*pages).into(),
                }))
            }
            Message::Params { max_bandwidth } => {
                out.extend_from_slice(bytemuck::bytes_of(&ParamsWire {
                    max_bandwidth: (*max_bandwidth).into(),
                    reserved: 0.into(),
                }))
            }
            Message::PostcopyComplete(p) => {
                out.extend_from_slice(bytemuck::bytes_of(&PostcopyCompleteWire {
                    digest: p.complete.digest.into(),
                    cpu_micros: p.complete.cpu_micros.into(),
                    pages: p.complete.pages.into(),
                    bytes: p.complete.bytes.into(),
                    faults: p.faults.into(),
                    fault_pages: p.fault_pages.into(),
                    postcopy_micros: p.postcopy_micros.into(),
                    latency_ns: p.latency_ns.map(Le64::new),
                }))
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
            Message::VmInfo(d) => {
                if !crate::vm::VmDescriptor::kind_is_valid(&d.kind) {
                    return Err(Error::InvalidConfig(format!(
                        "VM kind {:?}: at most {} bytes of [a-z0-9._-]",
                        d.kind,
                        crate::vm::VmDescriptor::MAX_KIND
                    )));
                }
                out.extend_from_slice(bytemuck::bytes_of(&VmInfoWire {
                    state_version: d.state_version.into(),
                    reserved: 0.into(),
                }));
                out.extend_from_slice(d.kind.as_bytes());
            }
            Message::Fail { code, reason } => {
                out.extend_from_slice(bytemuck::bytes_of(&FailWire {
                    code: (*code).into(),
                    reserved: 0.into(),
                }));
                out.extend_from_slice(text(reason));
            }
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
        if h.reserved.get() != 0 {
            return Err(Error::Protocol(format!(
                "header reserved field is {:#x}, not 0",
                h.reserved.get()
            )));
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
                    mode: w.mode,
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
                    reason: peer_text(&String::from_utf8_lossy(rest)),
                })
            }
            Command::AuthProof => Message::AuthProof(fixed(cmd, p)?),
            Command::Recover => Message::Recover(fixed(cmd, p)?),
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
            Command::Round | Command::PostcopyMissing => {
                let (w, rest): (RoundWire, _) = prefix(cmd, p)?;
                let ranges: Vec<RangeWire> =
                    array(cmd, rest, w.count.get() as usize, MAX_RANGES_PER_MSG)?;
                let mut out = Vec::with_capacity(ranges.len());
                for r in ranges {
                    if r.npages.get() == 0 {
                        return Err(Error::Protocol(format!("{cmd:?} carries an empty range")));
                    }
                    out.push(PageRange {
                        region: RegionId(r.region.get()),
                        first: PageIndex(r.first.get()),
                        npages: u64::from(r.npages.get()),
                    });
                }
                if cmd == Command::PostcopyMissing {
                    Message::PostcopyMissing {
                        chunk: w.chunk.get(),
                        flags: w.flags.get(),
                        ranges: out,
                    }
                } else {
                    Message::Round(Round {
                        round: w.round.get(),
                        chunk: w.chunk.get(),
                        flags: w.flags.get(),
                        ranges: out,
                    })
                }
            }
            Command::PostcopyResumed => {
                let w: PostcopyResumedWire = fixed(cmd, p)?;
                Message::PostcopyResumed {
                    resume_micros: w.resume_micros.get(),
                    missing: w.missing.get(),
                }
            }
            Command::PostcopyDropped => {
                let w: PostcopyResumedWire = fixed(cmd, p)?;
                Message::PostcopyDropped {
                    micros: w.resume_micros.get(),
                    pages: w.missing.get(),
                }
            }
            Command::Landed => Message::Landed(super::landed::decode(p)?),
            Command::Params => {
                let w: ParamsWire = fixed(cmd, p)?;
                if w.reserved.get() != 0 {
                    return Err(Error::Protocol("Params: reserved field set".into()));
                }
                Message::Params {
                    max_bandwidth: w.max_bandwidth.get(),
                }
            }
            Command::PostcopyComplete => {
                let w: PostcopyCompleteWire = fixed(cmd, p)?;
                Message::PostcopyComplete(PostcopyComplete {
                    complete: Complete {
                        digest: w.digest.get(),
                        cpu_micros: w.cpu_micros.get(),
                        resume_micros: 0,
                        pages: w.pages.get(),
                        bytes: w.bytes.get(),
                    },
                    faults: w.faults.get(),
                    fault_pages: w.fault_pages.get(),
                    postcopy_micros: w.postcopy_micros.get(),
                    latency_ns: w.latency_ns.map(Le64::get),
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
            Command::Abort => Message::Abort(peer_text(&String::from_utf8_lossy(p))),
            Command::VmInfo => {
                let n = size_of::<VmInfoWire>();
                if p.len() < n {
                    return Err(Error::Protocol(format!("VmInfo of {} bytes", p.len())));
                }
                let w: VmInfoWire = bytemuck::pod_read_unaligned(&p[..n]);
                let kind = std::str::from_utf8(&p[n..]).unwrap_or("\u{fffd}");
                if w.reserved.get() != 0 || !crate::vm::VmDescriptor::kind_is_valid(kind) {
                    return Err(Error::Protocol(format!(
                        "VmInfo: bad kind {:?} or reserved field",
                        peer_text(kind)
                    )));
                }
                Message::VmInfo(crate::vm::VmDescriptor::new(kind, w.state_version.get()))
            }
            Command::Fail => {
                let n = size_of::<FailWire>();
                if p.len() < n {
                    return Err(Error::Protocol(format!("Fail of {} bytes", p.len())));
                }
                let w: FailWire = bytemuck::pod_read_unaligned(&p[..n]);
                if w.reserved.get() != 0 {
                    return Err(Error::Protocol("Fail: reserved field set".into()));
                }
                Message::Fail {
                    code: w.code.get(),
                    reason: peer_text(&String::from_utf8_lossy(&p[n..])),
                }
            }
        })
    }

    /// A short name for errors and logs.
    pub fn name(&self) -> String {
        format!("{:?}", self.command())
    }
}
