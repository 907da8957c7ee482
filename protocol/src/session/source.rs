//! The source's side of a session, one channel at a time.

use crate::copy::CopyFrame;
use crate::frame::{Commit, Complete, EndOfRound, Frame, PageFrame};
use crate::ids::{AckKind, ChannelId, FrameType, RegionId, Round};
use crate::session::{Affinity, SessionError};
use crate::wire::PageRun;

/// What the source learned from a frame the destination sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceEvent {
    /// Every PAGES and COPY frame of rounds up to this one is applied on this channel.
    RoundApplied(Round),
    /// This many PAGES and COPY frames of this channel are applied (cumulative).
    FramesApplied(u64),
    /// The destination applied the whole migration up to this final round. It does not
    /// run the guest until COMMIT ([`SourceChannel::commit`]).
    Complete(Round),
    /// The destination took COMMIT for this final round: it owns the guest now.
    Committed(Round),
    /// An extension frame: skipped.
    Skip,
}

/// One channel of the source: checks what the source sends (LAYOUT first, rounds in
/// order, pages on their own channel, a COPY's sources included unless it is a ROUND_END
/// copy) and counts it for
/// END_OF_ROUND, and checks the ACKs that come back against what was sent (ACK FRAMES
/// against the PAGES and COPY frames sent).
#[derive(Clone, Debug)]
pub struct SourceChannel {
    channel: ChannelId,
    affinity: Affinity,
    layout_sent: bool,
    open_round: Option<Round>,
    last_ended: Option<Round>,
    frames: u32,
    pages: u64,
    frames_total: u64,
    acked_round: Option<Round>,
    acked_frames: u64,
    complete_sent: Option<Round>,
    completed: Option<Round>,
    commit_sent: Option<Round>,
    committed: Option<Round>,
}

impl SourceChannel {
    /// Channel `channel` of a session with `affinity`.
    ///
    /// # Errors
    /// [`SessionError::BadChannel`] when the channel is outside the session.
    pub fn new(channel: ChannelId, affinity: Affinity) -> Result<Self, SessionError> {
        if channel.0 >= affinity.channels() {
            return Err(SessionError::BadChannel {
                channel,
                channels: affinity.channels(),
            });
        }
        Ok(Self {
            channel,
            affinity,
            layout_sent: false,
            open_round: None,
            last_ended: None,
            frames: 0,
            pages: 0,
            frames_total: 0,
            acked_round: None,
            acked_frames: 0,
            complete_sent: None,
            completed: None,
            commit_sent: None,
            committed: None,
        })
    }

    /// Records that LAYOUT is being sent.
    pub fn on_send_layout(&mut self) {
        self.layout_sent = true;
    }

    /// Checks and counts a PAGES frame about to be sent.
    ///
    /// # Errors
    /// [`SessionError::Local`] for a frame sent before LAYOUT, after COMPLETE, in a round
    /// already ended or while another is open; `WrongChannel` for a page of another
    /// channel.
    pub fn on_send_pages(&mut self, p: &PageFrame<'_>) -> Result<(), SessionError> {
        self.on_send(FrameType::PAGES, p.region, p.round, p.all_runs(), p.pages())
    }

    /// Checks and counts a COPY frame about to be sent, as [`SourceChannel::on_send_pages`]
    /// does a PAGES frame: its target pages, and without ROUND_END its source pages, must
    /// belong to this channel (a ROUND_END copy's sources may be any channel's), and it
    /// counts as one frame of its target pages (END_OF_ROUND, ACK FRAMES). This side
    /// does not know the layout: the destination checks region bounds and the bound on a
    /// round's ROUND_END pages.
    ///
    /// # Errors
    /// As `on_send_pages`.
    pub fn on_send_copy(&mut self, c: &CopyFrame<'_>) -> Result<(), SessionError> {
        self.on_send(
            FrameType::COPY,
            c.region,
            c.round,
            c.affine_runs(),
            c.pages(),
        )
    }

    fn on_send(
        &mut self,
        ty: FrameType,
        region: RegionId,
        round: Round,
        runs: impl Iterator<Item = PageRun>,
        pages: u64,
    ) -> Result<(), SessionError> {
        let copy = ty == FrameType::COPY;
        if !self.layout_sent {
            return Err(SessionError::Local(match copy {
                true => "COPY before LAYOUT",
                false => "PAGES before LAYOUT",
            }));
        }
        if self.complete_sent.is_some() {
            return Err(SessionError::Local(match copy {
                true => "COPY after COMPLETE",
                false => "PAGES after COMPLETE",
            }));
        }
        if self.last_ended.is_some_and(|l| round <= l)
            || self.open_round.is_some_and(|o| o != round)
        {
            return Err(SessionError::Local(match copy {
                true => "COPY of a round that is not open",
                false => "PAGES of a round that is not open",
            }));
        }
        for run in runs {
            self.affinity.check_run(region, self.channel, run)?;
        }
        self.open_round = Some(round);
        self.frames = self.frames.saturating_add(1);
        self.frames_total = self.frames_total.saturating_add(1);
        self.pages = self.pages.saturating_add(pages);
        Ok(())
    }

    /// The END_OF_ROUND to send for `round`, with this channel's counts.
    ///
    /// # Errors
    /// [`SessionError::Local`] when `round` cannot end now.
    pub fn end_round(&mut self, round: Round) -> Result<EndOfRound, SessionError> {
        if !self.layout_sent || self.complete_sent.is_some() {
            return Err(SessionError::Local("END_OF_ROUND outside the session"));
        }
        if self.last_ended.is_some_and(|l| round <= l)
            || self.open_round.is_some_and(|o| o != round)
        {
            return Err(SessionError::Local("END_OF_ROUND out of order"));
        }
        let e = EndOfRound {
            round,
            frames: self.frames,
            pages: self.pages,
        };
        self.frames = 0;
        self.pages = 0;
        self.open_round = None;
        self.last_ended = Some(round);
        Ok(e)
    }

    /// The COMPLETE to send on channel 0 after the final round ended on every channel.
    ///
    /// # Errors
    /// [`SessionError::Local`] on a channel other than 0, or before `final_round`
    /// ended here.
    pub fn complete(
        &mut self,
        final_round: Round,
        sections: u32,
    ) -> Result<Complete, SessionError> {
        if self.channel.0 != 0 {
            return Err(SessionError::Local("COMPLETE on a channel other than 0"));
        }
        if self.open_round.is_some() || self.last_ended != Some(final_round) {
            return Err(SessionError::Local("COMPLETE before the final round ended"));
        }
        self.complete_sent = Some(final_round);
        Ok(Complete {
            final_round,
            sections,
        })
    }

    /// The COMMIT to send on channel 0 once ACK COMPLETE arrived: it hands the guest to
    /// the destination. From the moment its first byte may have left, the source must
    /// not resume the guest: without ACK COMMITTED the outcome is unknown (PROTOCOL.md,
    /// Switchover).
    ///
    /// # Errors
    /// [`SessionError::Local`] before ACK COMPLETE arrived (so on any channel but 0),
    /// or a second time.
    pub fn commit(&mut self) -> Result<Commit, SessionError> {
        let Some(final_round) = self.completed else {
            return Err(SessionError::Local("COMMIT before ACK COMPLETE"));
        };
        if self.commit_sent.is_some() {
            return Err(SessionError::Local("COMMIT sent twice"));
        }
        self.commit_sent = Some(final_round);
        Ok(Commit { final_round })
    }

    /// Takes a frame the destination sent on this channel.
    ///
    /// # Errors
    /// `BadAck` for an ACK of something not sent (or going backwards),
    /// `PeerAborted`, `UnexpectedFrame` for any frame a destination does not send.
    pub fn on_frame(&mut self, frame: &Frame<'_>) -> Result<SourceEvent, SessionError> {
        match frame {
            Frame::Extension { .. } => Ok(SourceEvent::Skip),
            Frame::Abort(a) => Err(SessionError::PeerAborted(a.reason)),
            Frame::Ack(a) => {
                let bad = SessionError::BadAck {
                    kind: a.kind,
                    value: a.value,
                };
                match a.kind {
                    AckKind::ROUND => {
                        let round = u32::try_from(a.value).map(Round).map_err(|_| bad)?;
                        if self.last_ended.is_none_or(|l| round > l)
                            || self.acked_round.is_some_and(|r| round <= r)
                        {
                            return Err(bad);
                        }
                        self.acked_round = Some(round);
                        Ok(SourceEvent::RoundApplied(round))
                    }
                    AckKind::FRAMES => {
                        if a.value > self.frames_total || a.value < self.acked_frames {
                            return Err(bad);
                        }
                        self.acked_frames = a.value;
                        Ok(SourceEvent::FramesApplied(a.value))
                    }
                    AckKind::COMPLETE => {
                        let round = u32::try_from(a.value).map(Round).map_err(|_| bad)?;
                        if self.complete_sent != Some(round) || self.completed.is_some() {
                            return Err(bad);
                        }
                        self.completed = Some(round);
                        Ok(SourceEvent::Complete(round))
                    }
                    AckKind::COMMITTED => {
                        let round = u32::try_from(a.value).map(Round).map_err(|_| bad)?;
                        if self.commit_sent != Some(round) || self.committed.is_some() {
                            return Err(bad);
                        }
                        self.committed = Some(round);
                        Ok(SourceEvent::Committed(round))
                    }
                    _ => Err(bad),
                }
            }
            other => Err(SessionError::UnexpectedFrame(other.frame_type())),
        }
    }

    /// The round acknowledged last.
    pub fn acked_round(&self) -> Option<Round> {
        self.acked_round
    }

    /// The final round, once the destination acknowledged COMPLETE.
    pub fn completed(&self) -> Option<Round> {
        self.completed
    }

    /// The final round, once COMMIT was handed out by [`SourceChannel::commit`]: from
    /// then on the destination may own the guest.
    pub fn commit_sent(&self) -> Option<Round> {
        self.commit_sent
    }

    /// The final round, once the destination acknowledged COMMIT: it owns the guest.
    pub fn committed(&self) -> Option<Round> {
        self.committed
    }

    /// Whether `frame_type` is one a source sends (for callers that check their own
    /// output).
    pub fn sends(frame_type: FrameType) -> bool {
        matches!(
            frame_type,
            FrameType::LAYOUT
                | FrameType::PAGES
                | FrameType::COPY
                | FrameType::END_OF_ROUND
                | FrameType::DEVICE_STATE
                | FrameType::COMPLETE
                | FrameType::COMMIT
                | FrameType::ABORT
        ) || frame_type.is_skippable()
    }
}
