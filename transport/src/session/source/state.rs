//! The message the source waits for in each state: the control channel's filter, checked
//! from a message's header before its payload is read.

use crate::wire::Command;

/// Which message the source waits for (the filter for the control channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SourceState {
    AwaitHelloAck,
    AwaitAuthOk,
    AwaitSetupAck,
    AwaitReady,
    /// Chunk `.1` of round `.0`'s `Landed` hashes (dirty tracking by content).
    AwaitLanded(u32, u32),
    AwaitRoundDone(u32),
    AwaitComplete,
    AwaitPostcopyDropped,
    AwaitPostcopyResumed,
    AwaitPostcopyComplete,
    AwaitRecoverMissing(u32),
    Done,
}

impl SourceState {
    pub(super) fn describe(self) -> &'static str {
        match self {
            SourceState::AwaitHelloAck => "awaiting HelloAck",
            SourceState::AwaitAuthOk => "awaiting AuthOk",
            SourceState::AwaitSetupAck => "awaiting DataSetupAck",
            SourceState::AwaitReady => "awaiting Ready",
            SourceState::AwaitLanded(..) => "awaiting Landed",
            SourceState::AwaitRoundDone(_) => "awaiting RoundDone",
            SourceState::AwaitComplete => "awaiting Complete",
            SourceState::AwaitPostcopyDropped => "awaiting PostcopyDropped",
            SourceState::AwaitPostcopyResumed => "awaiting PostcopyResumed",
            SourceState::AwaitPostcopyComplete => "awaiting PostcopyComplete",
            SourceState::AwaitRecoverMissing(_) => "awaiting the missing set of a recovery",
            SourceState::Done => "done",
        }
    }

    /// The command valid here (from a message's header alone).
    pub(super) fn expects(self) -> Option<Command> {
        use Command as C;
        Some(match self {
            SourceState::AwaitHelloAck => C::HelloAck,
            SourceState::AwaitAuthOk => C::AuthOk,
            SourceState::AwaitSetupAck => C::DataSetupAck,
            SourceState::AwaitReady => C::Ready,
            SourceState::AwaitLanded(..) => C::Landed,
            SourceState::AwaitRoundDone(_) => C::RoundDone,
            SourceState::AwaitComplete => C::Complete,
            SourceState::AwaitPostcopyDropped => C::PostcopyDropped,
            SourceState::AwaitPostcopyResumed => C::PostcopyResumed,
            SourceState::AwaitPostcopyComplete => C::PostcopyComplete,
            SourceState::AwaitRecoverMissing(_) => C::PostcopyMissing,
            SourceState::Done => return None,
        })
    }
}
