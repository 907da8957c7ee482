//! What a session's rules refuse.

use core::fmt;

use crate::error::DecodeError;
use crate::ids::{AbortReason, AckKind, ChannelId, FrameType, RegionId, Round};

/// A destination limit (see [`crate::session::DestinationLimits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Guest memory bytes over all regions.
    GuestBytes,
    /// Regions in the layout.
    Regions,
    /// Channels in the session.
    Channels,
    /// Device-state sections.
    DeviceSections,
    /// Device-state bytes over all sections.
    DeviceBytes,
    /// Target pages of ROUND_END COPY frames in one round on one channel: at most the
    /// layout's pages (a rule of the protocol, not a configured limit).
    RoundEndPages,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::GuestBytes => "guest memory bytes",
            Limit::Regions => "regions",
            Limit::Channels => "channels",
            Limit::DeviceSections => "device-state sections",
            Limit::DeviceBytes => "device-state bytes",
            Limit::RoundEndPages => "ROUND_END copy pages in a round on one channel",
        })
    }
}

/// A rule of the session that a frame broke. Small and `Copy`; every variant says which
/// rule and with which values.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer sent more than a configured limit allows.
    #[error("the peer exceeds the destination's limit of {max} {limit} (asked for {value})")]
    LimitExceeded {
        /// Which limit.
        limit: Limit,
        /// What the peer asked for.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A frame other than LAYOUT (or an extension frame) came first on a channel.
    #[error("{0:?} before LAYOUT; LAYOUT comes first on every channel")]
    LayoutMissing(FrameType),
    /// The LAYOUT is malformed (regions overlap, duplicate ids, bad chunk size).
    #[error("bad LAYOUT: {0}")]
    BadLayout(DecodeError),
    /// A later LAYOUT differs from the first one of the session.
    #[error("a LAYOUT differs from the session's first one")]
    LayoutDiffers,
    /// A page frame names pages outside the layout.
    #[error("pages outside the layout: {0}")]
    PagesOutsideLayout(DecodeError),
    /// A page belongs to another channel by the session's affinity.
    #[error(
        "page {page} of region {region} arrived on channel {channel}, but belongs to channel {owner}"
    )]
    WrongChannel {
        /// The region.
        region: RegionId,
        /// The first offending page.
        page: u64,
        /// The channel it arrived on.
        channel: ChannelId,
        /// The channel it belongs to.
        owner: ChannelId,
    },
    /// Pages of a round this channel already ended.
    #[error("pages of round {round}, which this channel already ended")]
    RoundEnded {
        /// The frame's round.
        round: Round,
    },
    /// Pages of a round while another round is open on the channel.
    #[error("pages of round {round} while round {open} is open")]
    RoundMismatch {
        /// The frame's round.
        round: Round,
        /// The open round.
        open: Round,
    },
    /// END_OF_ROUND for a round that cannot end now.
    #[error("END_OF_ROUND {round} out of order")]
    EndOfRoundOutOfOrder {
        /// The round.
        round: Round,
    },
    /// END_OF_ROUND counts differ from what arrived: data was lost.
    #[error(
        "round {round}: the source sent {sent_frames} frames / {sent_pages} pages, {got_frames} / {got_pages} arrived"
    )]
    CountMismatch {
        /// The round.
        round: Round,
        /// Frames the source announced.
        sent_frames: u32,
        /// Pages the source announced.
        sent_pages: u64,
        /// Frames that arrived.
        got_frames: u32,
        /// Pages that arrived.
        got_pages: u64,
    },
    /// A device-state chunk does not continue its section: it starts elsewhere than
    /// where the section's bytes so far end.
    #[error(
        "device-state section of instance {instance}: a chunk at offset {offset}, but its bytes so far end at {have} (chunks follow each other from offset 0)"
    )]
    DeviceStateOutOfOrder {
        /// The section's instance number.
        instance: u32,
        /// The chunk's offset.
        offset: u64,
        /// The section's bytes so far (0 for a section not begun).
        have: u64,
    },
    /// A device-state chunk states another total than its section's first chunk.
    #[error(
        "device-state section of instance {instance}: a chunk states a total of {total} bytes, its first chunk {first}"
    )]
    DeviceStateTotalChanged {
        /// The section's instance number.
        instance: u32,
        /// The chunk's total.
        total: u64,
        /// The first chunk's total.
        first: u64,
    },
    /// A device-state section (name, instance) was sent twice.
    #[error("device-state section of instance {instance} sent twice (same name and instance)")]
    DuplicateSection {
        /// The section's instance number.
        instance: u32,
    },
    /// A device-state section continues on another channel than it started on.
    #[error(
        "device-state section of instance {instance} continues on channel {channel}, began on {began}"
    )]
    SectionChannel {
        /// The section's instance number.
        instance: u32,
        /// The channel of this chunk.
        channel: ChannelId,
        /// The channel of its first chunk.
        began: ChannelId,
    },
    /// COMPLETE on a channel other than 0.
    #[error("COMPLETE on channel {0}; it belongs on channel 0")]
    CompleteChannel(ChannelId),
    /// COMPLETE while something is unfinished.
    #[error("COMPLETE for round {final_round} while {what}")]
    CompleteEarly {
        /// The announced final round.
        final_round: Round,
        /// What is unfinished.
        what: &'static str,
    },
    /// COMPLETE announces a number of sections other than what arrived.
    #[error("COMPLETE announces {announced} device-state sections, {received} arrived")]
    SectionCount {
        /// Announced.
        announced: u32,
        /// Received whole.
        received: u32,
    },
    /// A channel opened (sent pages of) or ended a round after the final one.
    #[error("a channel opened or ended round {round}, after the final round {final_round}")]
    RoundAfterFinal {
        /// The later round.
        round: Round,
        /// The final round.
        final_round: Round,
    },
    /// A frame after the session completed.
    #[error("{0:?} after COMPLETE")]
    AfterComplete(FrameType),
    /// COMMIT on a channel other than 0.
    #[error("COMMIT on channel {0}; it belongs on channel 0")]
    CommitChannel(ChannelId),
    /// COMMIT before this side sent ACK COMPLETE: the source cannot hand over a guest
    /// the destination has not confirmed whole.
    #[error("COMMIT for round {final_round} before ACK COMPLETE was sent")]
    CommitEarly {
        /// The round the COMMIT names.
        final_round: Round,
    },
    /// COMMIT names another round than the final one acknowledged by ACK COMPLETE.
    #[error("COMMIT for round {commit}, but the final round is {final_round}")]
    CommitMismatch {
        /// The final round of COMPLETE and its ACK.
        final_round: Round,
        /// The round the COMMIT names.
        commit: Round,
    },
    /// A frame after COMMIT (a second COMMIT included): only ABORT and extension frames
    /// may follow it, and they change nothing.
    #[error("{0:?} after COMMIT")]
    AfterCommit(FrameType),
    /// A frame the receiving side never accepts in a session (a handshake frame, or a
    /// frame of the other direction).
    #[error("unexpected {0:?} frame")]
    UnexpectedFrame(FrameType),
    /// An ACK that does not fit what was sent.
    #[error("ACK {kind:?} {value} does not fit what was sent")]
    BadAck {
        /// Its kind.
        kind: AckKind,
        /// Its value.
        value: u64,
    },
    /// The peer aborted the migration.
    #[error("the peer aborted: {0:?}")]
    PeerAborted(AbortReason),
    /// A frame our own side was about to send breaks a rule (a bug on this side).
    #[error("this side was about to send a frame that breaks the protocol: {0}")]
    Local(&'static str),
    /// The channel index is outside the session.
    #[error("channel {channel} outside a session of {channels} channels")]
    BadChannel {
        /// The index.
        channel: ChannelId,
        /// Channels in the session.
        channels: u16,
    },
}
