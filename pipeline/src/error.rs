//! The pipeline's error type.

use std::time::Duration;

pub use pagewire_accel::{CodecError, EngineError};
pub use pagewire_protocol::{AbortReason, DecodeError, SessionError as RuleError};
pub use pagewire_transport::ChannelError;
pub use pagewire_transport::session::SessionError;

use pagewire_protocol::RegionId;

use crate::dirty::{DirtyBitmap, DirtyLogError};
use crate::memory::MemoryError;

/// Whether a receive failed because of what the peer sent (frame bytes that do not
/// decode, a frame over the limit, broken transport framing), rather than because the
/// connection failed or ended.
pub(crate) fn peer_fault(e: &pagewire_transport::ChannelError) -> bool {
    matches!(
        e,
        pagewire_transport::ChannelError::Decode(_)
            | pagewire_transport::ChannelError::FrameTooLarge { .. }
            | pagewire_transport::ChannelError::Framing(_)
    )
}

/// Why a migration failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The channels could not be opened or accepted.
    #[error("could not set up the session: {0}")]
    Session(#[from] SessionError),
    /// A channel failed.
    #[error("channel {channel} failed: {source}")]
    Channel {
        /// The channel.
        channel: u16,
        /// Why.
        #[source]
        source: ChannelError,
    },
    /// The codec engine failed.
    #[error("codec engine failed: {0}")]
    Engine(#[from] EngineError),
    /// A page could not be encoded or decoded.
    #[error("codec failed on channel {channel}: {source}")]
    Codec {
        /// The channel.
        channel: u16,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// The peer broke the protocol.
    #[error("channel {channel}: protocol violation: {what}")]
    Protocol {
        /// The channel.
        channel: u16,
        /// What happened.
        what: String,
    },
    /// The peer broke a rule of the session (layout, rounds, affinity, limits, device
    /// state, completion).
    #[error("channel {channel}: {source}")]
    Rule {
        /// The channel.
        channel: u16,
        /// The rule and its values.
        #[source]
        source: RuleError,
    },
    /// A frame failed a protocol check.
    #[error("channel {channel}: bad frame: {source}")]
    Decode {
        /// The channel.
        channel: u16,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The destination VMM's check refused the device state the source sent
    /// ([`DestinationConfig::check_device_state`](crate::DestinationConfig::check_device_state)),
    /// before COMPLETE was acknowledged: the destination sent ABORT `APPLY_FAILED`, and
    /// the source keeps its guest.
    #[error("the device state was refused before COMPLETE was acknowledged: {what}")]
    DeviceStateRefused {
        /// Why, as the check said.
        what: String,
    },
    /// The peer aborted the migration: it sent ABORT on `channel`.
    #[error("channel {channel}: the peer aborted the migration: {reason} ({message})")]
    PeerAborted {
        /// The channel the ABORT came on.
        channel: u16,
        /// Its reason.
        reason: AbortReason,
        /// Its message.
        message: String,
    },
    /// A destination channel was ended because another channel had already failed the
    /// session (the destination woke it and sent it ABORT `CHANNEL_FAILED`).
    /// [`Destination::wait`](crate::Destination::wait) returns the first channel's own
    /// error instead of this.
    #[error("channel {channel} was ended because the session failed: {cause}")]
    SessionFailed {
        /// The channel.
        channel: u16,
        /// The first failure, as it was reported.
        cause: String,
    },
    /// The VMM's dirty log failed.
    #[error("the VMM's dirty log failed in {call}: {source}")]
    DirtyLog {
        /// Which call: "the dirty log's start", "... sync_and_clear" or "... stop".
        call: &'static str,
        /// The VMM's error.
        #[source]
        source: DirtyLogError,
    },
    /// The VMM's vCPU control (pause, resume, throttle) failed.
    #[error("the VMM's vCPU control failed in {call}: {source}")]
    Vcpu {
        /// Which call: "the vCPUs' pause", "... resume" or "... throttle".
        call: &'static str,
        /// The VMM's error.
        #[source]
        source: DirtyLogError,
    },
    /// The VMM's device state failed to save (or a section it wrote was malformed).
    #[error("the VMM's device state failed in {call}: {source}")]
    DeviceState {
        /// Which call: "the device state's save" or "... precopy".
        call: &'static str,
        /// The VMM's error.
        #[source]
        source: DirtyLogError,
    },
    /// Pre-copy hit its round or time cap before the expected downtime fit the limit,
    /// and [`CapPolicy::Fail`](crate::CapPolicy::Fail) was asked: the guest was never
    /// paused.
    #[error(
        "pre-copy did not converge: {reason}; expected downtime {expected_downtime:?} over the limit of {limit:?}"
    )]
    NotConverged {
        /// Which cap.
        reason: crate::precopy::StopReason,
        /// The downtime stopping now would have cost.
        expected_downtime: Duration,
        /// The limit in force.
        limit: Duration,
    },
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// The configuration is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The migration was cancelled through its control handle.
    #[error("cancelled")]
    Cancelled,
    /// A callback of the VMM panicked (`callback` names it: "the dirty log's
    /// sync_and_clear", "the round callback", ...); the migration failed as if it had
    /// returned an error there.
    #[error("{callback} panicked: {message}")]
    CallbackPanicked {
        /// Which callback.
        callback: &'static str,
        /// The panic's message.
        message: String,
    },
    /// A worker thread died, or lost track of its own state.
    #[error("worker thread for channel {0} died")]
    Worker(u16),
    /// A worker thread panicked (a bug in pagewire or in a callback it ran): the
    /// panic's message.
    #[error("worker thread for channel {channel} panicked: {message}")]
    WorkerPanicked {
        /// The worker's channel.
        channel: u16,
        /// What the panic said (its `&str` or `String` payload).
        message: String,
    },
    /// The source handed COMMIT to channel 0 (whole or in part) but ACK COMMITTED did
    /// not arrive: the destination may be running the guest. The guest must stay paused
    /// on the source, neither resumed nor discarded, until the management layer asks the
    /// destination whether it reported success (PROTOCOL.md, Switchover).
    #[error(
        "the migration's outcome is unknown: COMMIT was sent but not acknowledged ({source}); \
         the destination may be running the guest, so do not resume it here before asking \
         the destination"
    )]
    OutcomeUnknown {
        /// Why ACK COMMITTED did not arrive.
        #[source]
        source: Box<MigrationError>,
    },
    /// A call on a [`Source`](crate::Source) whose switchover already handed the guest
    /// over, or may have ([`Source::complete`](crate::Source::complete) returned `Ok`):
    /// it sends nothing more, and the guest must not be resumed here on its account.
    #[error(
        "the switchover already ran (COMMIT was sent): this source sends nothing more, and \
         the guest must not be resumed here unless the destination reports it failed"
    )]
    HandedOver,
    /// The destination verified the migration and sent ACK COMPLETE, but no COMMIT
    /// followed (the channel closed or failed, the source aborted, or the idle timeout
    /// ran out): the guest was not handed over and must not run on the destination.
    #[error(
        "no COMMIT after ACK COMPLETE for round {final_round}: {source}; the guest was not \
         handed over and must not run here"
    )]
    NoCommit {
        /// The final round acknowledged by ACK COMPLETE.
        final_round: u32,
        /// What ended the wait for COMMIT.
        #[source]
        source: Box<MigrationError>,
    },
    /// A bounded wait of the source (or the destination's wait for COMMIT) ran out: the
    /// setting that bounds it is named by `what` (see [`Wait`]).
    #[error("{}timed out after {after:?} waiting for {what}", channel.map(|c| format!("channel {c}: ")).unwrap_or_default())]
    Timeout {
        /// The channel, when the wait belonged to one.
        channel: Option<u16>,
        /// What was waited for.
        what: Wait,
        /// How long.
        after: Duration,
    },
}

/// What a source waited for when a [`MigrationError::Timeout`] expired, and the
/// [`SourceConfig`](crate::SourceConfig) setting that bounds that wait (or, for
/// [`Wait::Commit`], what the destination waited for and its setting).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// A TCP connection to the destination (`connect_timeout` per attempt, times
    /// `connect_attempts`).
    Connect,
    /// A channel's handshake (`handshake_timeout`).
    Handshake,
    /// The peer taking a frame, or the send completion that releases its buffer
    /// (`send_timeout`).
    Send,
    /// The codec engine: a free output buffer or a finished job (`send_timeout`).
    Engine,
    /// The destination's acknowledgement of a round or of COMPLETE (`ack_timeout`).
    Ack,
    /// On the destination: COMMIT, which must arrive within the idle timeout
    /// ([`DestinationConfig::idle_timeout`](crate::DestinationConfig::idle_timeout)) of
    /// ACK COMPLETE; frames arriving meanwhile do not extend it.
    Commit,
}

impl MigrationError {
    /// The reason the source gives the destination in ABORT for this failure of its
    /// own: `CANCELLED` for a cancel, else `INTERNAL`.
    pub(crate) fn abort_reason(&self) -> AbortReason {
        match self {
            MigrationError::Cancelled => AbortReason::CANCELLED,
            _ => AbortReason::INTERNAL,
        }
    }
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Wait::Connect => "a connection to the destination (connect_timeout); is it listening and reachable?",
            Wait::Handshake => "the channel handshake (handshake_timeout); is the peer a pagewire destination?",
            Wait::Send => "the destination to take data (send_timeout): it stopped reading or the link is down",
            Wait::Engine => "the codec engine to free a buffer or finish a job (send_timeout)",
            Wait::Ack => "the destination's acknowledgement (ack_timeout): it stopped or the link is down",
            Wait::Commit => "COMMIT after ACK COMPLETE (the destination's idle_timeout, which other frames do not extend): the source stopped or the link is down",
        })
    }
}

/// A failed source-side migration: the error, the pages whose arrival the destination
/// never acknowledged (the VMM marks those dirty again if it retries), and whether the
/// guest runs on the source again. When the outcome of the switchover is unknown
/// ([`Failed::may_resume_source`] is false), the destination may be running the guest
/// and the source must not: [`Migration`](crate::Migration) leaves it paused.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", resume_error.as_deref().map(|e| format!(" (and resuming the guest failed: {e})")).unwrap_or_default())]
pub struct Failed {
    /// What went wrong.
    #[source]
    pub error: Box<MigrationError>,
    /// Per region, pages sent without acknowledgement (or never sent).
    pub unacknowledged: Vec<(RegionId, DirtyBitmap)>,
    /// Whether the guest runs on the source after this failure: it was never paused,
    /// or [`Migration`](crate::Migration) resumed it. `false` when resuming failed
    /// (`resume_error`) or was not safe.
    pub running_on_source: bool,
    /// Why resuming the vCPUs failed, when it did.
    pub resume_error: Option<String>,
    /// What went wrong on the way out besides the error: stopping the dirty log,
    /// lifting the auto-converge throttle.
    pub warnings: Vec<String>,
}

impl Failed {
    /// A failure with no pages outstanding.
    pub fn bare(error: MigrationError) -> Self {
        Self::new(error, Vec::new())
    }

    /// A failure with pages outstanding.
    pub fn new(error: MigrationError, unacknowledged: Vec<(RegionId, DirtyBitmap)>) -> Self {
        Self {
            error: Box::new(error),
            unacknowledged,
            running_on_source: false,
            resume_error: None,
            warnings: Vec::new(),
        }
    }

    pub(crate) fn with_resumed(mut self, running: bool) -> Self {
        self.running_on_source = running;
        self
    }

    /// Whether the guest may be resumed on the source: `true` unless the outcome of the
    /// switchover is unknown ([`MigrationError::OutcomeUnknown`]), when the destination
    /// may already run it and only the management layer can tell (PROTOCOL.md,
    /// Switchover), or a call came after the switchover ([`MigrationError::HandedOver`]).
    pub fn may_resume_source(&self) -> bool {
        !matches!(
            *self.error,
            MigrationError::OutcomeUnknown { .. } | MigrationError::HandedOver
        )
    }

    /// Pages outstanding in total.
    pub fn unacknowledged_pages(&self) -> u64 {
        self.unacknowledged.iter().map(|(_, b)| b.count()).sum()
    }
}

/// The error for worker `channel` whose thread ended with `joined`: the panic's
/// message when it panicked.
pub(crate) fn worker_ended(channel: u16, joined: std::thread::Result<()>) -> MigrationError {
    match joined {
        Ok(()) => MigrationError::Worker(channel),
        Err(payload) => MigrationError::WorkerPanicked {
            channel,
            message: panic_message(payload.as_ref()),
        },
    }
}

/// Runs `f`, the VMM's code (a callback), on this thread: a panic in it becomes `Err`
/// with the panic's message, for the caller to fail the session with, rather than end
/// this thread without a word to the source.
pub(crate) fn vmm_call<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|panic| panic_message(panic.as_ref()))
}

/// The text of a panic's payload (`panic!`'s `&str` or `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => (*s).to_owned(),
        (None, Some(s)) => s.clone(),
        (None, None) => "(a payload that is not text)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_panicked_is_reported_with_its_message() {
        let joined = std::thread::spawn(|| {
            let n = 3;
            panic!("page {n} vanished");
        })
        .join();
        let e = worker_ended(2, joined);
        assert!(
            matches!(&e, MigrationError::WorkerPanicked { channel: 2, message } if message == "page 3 vanished"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "worker thread for channel 2 panicked: page 3 vanished"
        );
        let plain = std::thread::spawn(|| panic!("static")).join();
        assert!(worker_ended(0, plain).to_string().ends_with(": static"));
        assert!(matches!(worker_ended(1, Ok(())), MigrationError::Worker(1)));
    }
}
