//! The destination's states and the messages each accepts: first from a message's header
//! (before its payload is read), then from the decoded message.

use crate::wire::{Command, Message, POSTCOPY_EARLY, POSTCOPY_ZERO};

/// Where the destination is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DestState {
    AwaitRegionTable,
    AwaitDataSetup,
    Precopy {
        round: u32,
        chunk: u32,
    },
    AwaitDeviceState,
    AwaitSwitchover,
    EarlyDrop {
        chunk: u32,
    },
    AwaitPostcopyMissing {
        chunk: u32,
    },
    /// The guest runs here; `chunk` is the next `POSTCOPY_ZERO` chunk's number.
    Postcopy {
        chunk: u32,
    },
    AwaitFinish,
}

impl DestState {
    pub(super) fn describe(self) -> &'static str {
        match self {
            DestState::AwaitRegionTable => "awaiting RegionTable",
            DestState::AwaitDataSetup => "awaiting DataSetup",
            DestState::Precopy { .. } => "in pre-copy",
            DestState::AwaitDeviceState => "awaiting DeviceState",
            DestState::AwaitSwitchover => "awaiting Switchover",
            DestState::EarlyDrop { .. } => "dropping stale pages early",
            DestState::AwaitPostcopyMissing { .. } => "awaiting PostcopyMissing",
            DestState::Postcopy { .. } => "in post-copy",
            DestState::AwaitFinish => "awaiting Finish",
        }
    }

    /// Whether a message with command `c` may be valid here (checked from its header, before
    /// its payload is read; [`DestState::accepts`] then checks the decoded message).
    pub(super) fn may_receive(self, c: Command, postcopy: bool) -> bool {
        use Command as C;
        match self {
            DestState::AwaitRegionTable => matches!(c, C::RegionTable | C::VmInfo),
            DestState::AwaitDataSetup => c == C::DataSetup,
            DestState::Precopy { chunk: 0, .. } if postcopy => {
                matches!(
                    c,
                    C::Round | C::Params | C::DeviceState | C::PostcopyMissing
                )
            }
            DestState::Precopy { chunk: 0, .. } => matches!(c, C::Round | C::Params),
            DestState::Precopy { .. } => c == C::Round,
            DestState::AwaitDeviceState => c == C::DeviceState,
            DestState::AwaitSwitchover => c == C::Switchover,
            DestState::Postcopy { .. } => matches!(c, C::Switchover | C::PostcopyMissing),
            DestState::EarlyDrop { chunk: 0 } => matches!(c, C::DeviceState | C::PostcopyMissing),
            DestState::EarlyDrop { .. } | DestState::AwaitPostcopyMissing { .. } => {
                c == C::PostcopyMissing
            }
            DestState::AwaitFinish => c == C::Finish,
        }
    }

    pub(super) fn accepts(self, m: &Message, postcopy: bool) -> bool {
        match (self, m) {
            (DestState::Precopy { chunk: 0, .. }, Message::DeviceState(_)) => postcopy,
            (DestState::Precopy { chunk: 0, .. }, Message::Params { .. }) => true,
            (
                DestState::Precopy { chunk: 0, .. },
                Message::PostcopyMissing {
                    chunk: 0, flags, ..
                },
            ) => postcopy && flags & POSTCOPY_EARLY != 0,
            (DestState::EarlyDrop { chunk: 0 }, Message::DeviceState(_)) => true,
            (
                DestState::EarlyDrop { chunk },
                Message::PostcopyMissing {
                    chunk: c, flags, ..
                },
            ) => *c == chunk && flags & POSTCOPY_EARLY != 0,
            (
                DestState::AwaitPostcopyMissing { chunk },
                Message::PostcopyMissing {
                    chunk: c, flags, ..
                },
            ) => *c == chunk && flags & POSTCOPY_EARLY == 0,
            (DestState::Postcopy { .. }, Message::Switchover { .. }) => true,
            (
                DestState::Postcopy { chunk },
                Message::PostcopyMissing {
                    chunk: c, flags, ..
                },
            ) => *c == chunk && flags & POSTCOPY_ZERO != 0,
            (DestState::AwaitRegionTable, Message::RegionTable { .. } | Message::VmInfo(_))
            | (DestState::AwaitDataSetup, Message::DataSetup(_))
            | (DestState::AwaitDeviceState, Message::DeviceState(_))
            | (DestState::AwaitSwitchover, Message::Switchover { .. })
            | (DestState::AwaitFinish, Message::Finish) => true,
            (DestState::Precopy { round, chunk }, Message::Round(r)) => {
                r.round == round && r.chunk == chunk
            }
            _ => false,
        }
    }
}
