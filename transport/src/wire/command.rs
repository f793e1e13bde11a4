//! The command numbers of the control protocol, and the largest payload each may carry
//! (checked from the header alone, before any allocation).

use super::layout::*;
use super::message::{MAX_DEVICE_STATE, MAX_RANGES_PER_MSG, MAX_REGIONS, MAX_SETUP, MAX_TEXT};
use crate::error::{Error, Result};

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
    /// Source → destination: a chunk of the post-copy set (pages the destination does not
    /// hold validly and must fetch on demand).
    PostcopyMissing = 16,
    /// Destination → source: the guest runs here; post-copy has begun.
    PostcopyResumed = 17,
    /// Destination → source: every page is here; digest and post-copy figures.
    PostcopyComplete = 18,
    /// Destination → source: the early part of the post-copy set is dropped.
    PostcopyDropped = 19,
    /// Source → destination, between pre-copy rounds: parameters changed while the
    /// migration runs (the bandwidth cap, which the destination applies to RDMA READs). Sent
    /// only to a destination that offered `caps::LIVE_PARAMS`.
    Params = 20,
    /// Either way, after authentication, between ends that offered `caps::ABORT_CODES`: the
    /// migration is aborted, with a code (`crate::abort::AbortCode`) and a reason.
    Fail = 21,
    /// Source → destination, right after `AuthOk` to a destination that offered
    /// `caps::VM_INFO`: the kind of VM and its device-state version, so that the destination
    /// builds that kind or refuses before any memory moves.
    VmInfo = 22,
    /// Source → destination, right after `AuthProof` on a reconnection (`Hello` with
    /// `caps::RECOVER`): proves which migration it continues (an HMAC over the migration id
    /// both ends derived in the first handshake and this connection's nonces). Answered by
    /// `AuthOk` and the destination's missing set (`PostcopyMissing` with `POSTCOPY_RECOVER`).
    Recover = 23,
    /// Destination → source, after a pre-copy round's data landed and before its `RoundDone`,
    /// between ends that offered `caps::LANDED`: the hash of every page the round landed (in
    /// chunks), so that a source whose VM has no dirty log finds the pages written since by
    /// comparing its memory with what the destination holds.
    Landed = 24,
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
            16 => PostcopyMissing,
            17 => PostcopyResumed,
            18 => PostcopyComplete,
            19 => PostcopyDropped,
            20 => Params,
            21 => Fail,
            22 => VmInfo,
            23 => Recover,
            24 => Landed,
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
            AuthProof | Recover => MAC_LEN,
            AuthOk | Ready | Finish => 0,
            RegionTable => size_of::<RegionTableWire>() + MAX_REGIONS * size_of::<RegionWire>(),
            DataSetup | DataSetupAck => MAX_SETUP,
            Round => size_of::<RoundWire>() + MAX_RANGES_PER_MSG * size_of::<RangeWire>(),
            RoundDone => size_of::<RoundDoneWire>(),
            DeviceState => MAX_DEVICE_STATE,
            Switchover => size_of::<SwitchoverWire>(),
            Complete => size_of::<CompleteWire>(),
            Abort => MAX_TEXT,
            Fail => size_of::<FailWire>() + MAX_TEXT,
            VmInfo => size_of::<VmInfoWire>() + crate::vm::VmDescriptor::MAX_KIND,
            PostcopyMissing => size_of::<RoundWire>() + MAX_RANGES_PER_MSG * size_of::<RangeWire>(),
            PostcopyResumed | PostcopyDropped => size_of::<PostcopyResumedWire>(),
            Params => size_of::<ParamsWire>(),
            PostcopyComplete => size_of::<PostcopyCompleteWire>(),
            Landed => super::landed::MAX_PAYLOAD,
        }
    }
}
