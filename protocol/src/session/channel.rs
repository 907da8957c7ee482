//! One channel of the destination: its rounds, counts and pages, checked frame by frame.

use crate::copy::CopyFrame;
use crate::frame::{Ack, Commit, Complete, DeviceState, EndOfRound, Frame, LayoutFrame, PageFrame};
use crate::ids::{AckKind, ChannelId, FrameType, RegionId, Round};
use crate::layout::MemoryLayout;
use crate::session::{Affinity, DestinationLimits, DestinationSession, Limit, SessionError};
use crate::wire::PageRun;

/// What the caller does after a frame was accepted on a channel.
#[derive(Debug)]
#[non_exhaustive]
pub enum DestinationEvent<'f, 'a> {
    /// A LAYOUT: hand it to [`DestinationSession::on_layout`], then call
    /// [`DestinationChannel::set_layout`].
    Layout(&'f LayoutFrame<'a>),
    /// A PAGES frame whose pages passed every rule: decode it into the pages it names
    /// and zero its zero runs.
    Apply(&'f PageFrame<'a>),
    /// A COPY frame (without ROUND_END) whose target and source pages passed every rule:
    /// give each target page the content its source page holds now (after this
    /// channel's earlier frames), then count it like an applied PAGES frame (ACK FRAMES).
    Copy(&'f CopyFrame<'a>),
    /// A ROUND_END COPY frame whose targets (this channel's) and sources (any channel's)
    /// passed every rule: record its runs (bounded: at most the layout's pages in a
    /// round on a channel) and count it for ACK FRAMES now. Apply it once
    /// [`DestinationSession::ended_everywhere`] reaches its round, while no other frame
    /// writes pages (exclusively) and after those of earlier rounds: each target gets
    /// what its source holds then. Hold this channel's ACK ROUND for its round, or a
    /// later one, until it is applied.
    RoundEndCopy(&'f CopyFrame<'a>),
    /// The channel ended a round: tell [`DestinationSession::on_round_ended`], and send
    /// ACK ROUND for it once this channel's ROUND_END copies of rounds up to it are
    /// applied ([`DestinationEvent::RoundEndCopy`]): at once when there are none.
    AckRound(Round),
    /// A device-state chunk: hand it to [`DestinationSession::on_device_state`].
    DeviceState(&'f DeviceState<'a>),
    /// A COMPLETE on channel 0 with nothing open on it: hand it to
    /// [`DestinationSession::on_complete`]; once that says
    /// [`CompleteProgress::Done`], send the ACK COMPLETE that
    /// [`DestinationChannel::ack_complete`] returns.
    ///
    /// [`CompleteProgress::Done`]: super::CompleteProgress::Done
    Complete(&'f Complete),
    /// A COMMIT on channel 0 after its ACK COMPLETE, for the final round: hand it to
    /// [`DestinationSession::on_commit`], which hands the guest to this side.
    Commit(&'f Commit),
    /// An extension frame: skipped.
    Skip,
}

/// Where channel 0 stands in the switchover (PROTOCOL.md, Switchover).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handover {
    /// No COMPLETE yet (always, on other channels).
    Open,
    /// COMPLETE taken for this final round; the session verifies it.
    Completed(Round),
    /// ACK COMPLETE sent: COMMIT may come.
    Acked(Round),
    /// COMMIT taken: only ABORT and extension frames may follow, and change nothing.
    Committed(Round),
}

#[derive(Clone, Debug)]
struct Rules {
    layout: MemoryLayout,
    affinity: Affinity,
    /// The layout's pages this channel carries: what its ROUND_END copies may target
    /// in a round.
    pages: u64,
}

/// One channel of the destination: its rounds, its counts, and which pages it may
/// carry. Lives on the channel's thread; nothing here is shared.
#[derive(Clone, Debug)]
pub struct DestinationChannel {
    channel: ChannelId,
    rules: Option<Rules>,
    /// A round opened since [`DestinationChannel::take_opened`] was last asked.
    opened: Option<Round>,
    open_round: Option<Round>,
    last_ended: Option<Round>,
    frames: u32,
    pages: u64,
    /// Target pages of the ROUND_END copies accepted in the open round.
    round_end_pages: u64,
    completed: bool,
    handover: Handover,
}

impl DestinationChannel {
    /// Channel `channel` before its LAYOUT ([`DestinationSession::channel`] checks the
    /// index).
    pub(super) fn new(channel: ChannelId) -> Self {
        Self {
            channel,
            rules: None,
            opened: None,
            open_round: None,
            last_ended: None,
            frames: 0,
            pages: 0,
            round_end_pages: 0,
            completed: false,
            handover: Handover::Open,
        }
    }

    /// This channel's index.
    pub fn id(&self) -> ChannelId {
        self.channel
    }

    /// Installs the session's layout and affinity after [`DestinationSession::on_layout`]
    /// accepted this channel's LAYOUT.
    ///
    /// # Errors
    /// `LayoutMissing` when the session has none.
    pub fn set_layout(&mut self, session: &DestinationSession) -> Result<(), SessionError> {
        let (layout, affinity) = session
            .layout()
            .ok_or(SessionError::LayoutMissing(FrameType::LAYOUT))?;
        if self.rules.is_none() {
            let page_size = u64::from(layout.page_size());
            let pages = layout.regions().iter().fold(0u64, |t, r| {
                t.saturating_add(affinity.pages_on(r.id, r.length / page_size, self.channel))
            });
            self.rules = Some(Rules {
                layout: layout.clone(),
                affinity,
                pages,
            });
        }
        Ok(())
    }

    /// The layout in force on this channel.
    pub fn layout(&self) -> Option<&MemoryLayout> {
        self.rules.as_ref().map(|r| &r.layout)
    }

    /// Checks a PAGES frame's header **before** any of its bytes are decoded or placed:
    /// the layout is known, the pages lie inside their region, every page belongs to
    /// this channel, and the round may carry pages. Does not count the frame.
    ///
    /// # Errors
    /// `LayoutMissing`, `PagesOutsideLayout`, `WrongChannel`, `RoundEnded`,
    /// `RoundMismatch`, `AfterComplete`.
    pub fn check_pages(&self, p: &PageFrame<'_>) -> Result<(), SessionError> {
        self.check_frame(
            FrameType::PAGES,
            p.region,
            p.round,
            || p.all_runs(),
            || p.all_runs(),
        )
        .map(|_| ())
    }

    /// Checks a COPY frame **before** any page is copied, exactly as
    /// [`DestinationChannel::check_pages`] checks PAGES, with its sources as well as its
    /// targets: every one inside the region and, without ROUND_END, owned by this
    /// channel. A ROUND_END copy's sources may belong to any channel; its targets, with
    /// those of the round's earlier ROUND_END copies on this channel, may number at most
    /// the layout's pages this channel carries (a page named twice counted twice; a
    /// source names none twice). Does not count the frame.
    ///
    /// # Errors
    /// As `check_pages`; `LimitExceeded` ([`Limit::RoundEndPages`]) for ROUND_END
    /// targets past the bound.
    pub fn check_copy(&self, c: &CopyFrame<'_>) -> Result<(), SessionError> {
        let rules = self.check_frame(
            FrameType::COPY,
            c.region,
            c.round,
            || c.all_runs(),
            || c.affine_runs(),
        )?;
        if c.round_end {
            // A new round starts from 0: the counter is reset when a round ends.
            DestinationLimits::check(
                Limit::RoundEndPages,
                self.round_end_pages.saturating_add(c.pages()),
                rules.pages,
            )?;
        }
        Ok(())
    }

    /// The rules of a page frame (PAGES or COPY) of `ty` naming `runs` of `region`, of
    /// which `affine` must belong to this channel. Returns the rules in force.
    fn check_frame<I: Iterator<Item = PageRun>, J: Iterator<Item = PageRun>>(
        &self,
        ty: FrameType,
        region: RegionId,
        round: Round,
        runs: impl Fn() -> I,
        affine: impl Fn() -> J,
    ) -> Result<&Rules, SessionError> {
        if self.completed {
            return Err(SessionError::AfterComplete(ty));
        }
        let rules = self.rules.as_ref().ok_or(SessionError::LayoutMissing(ty))?;
        rules
            .layout
            .check_runs(region, runs())
            .map_err(SessionError::PagesOutsideLayout)?;
        for run in affine() {
            rules.affinity.check_run(region, self.channel, run)?;
        }
        if self.last_ended.is_some_and(|l| round <= l) {
            return Err(SessionError::RoundEnded { round });
        }
        match self.open_round {
            Some(open) if open != round => Err(SessionError::RoundMismatch { round, open }),
            _ => Ok(rules),
        }
    }

    /// Checks and counts a PAGES frame whose pages a transport already placed after
    /// [`DestinationChannel::check_pages`] allowed it.
    ///
    /// # Errors
    /// As `check_pages`.
    pub fn on_placed(&mut self, p: &PageFrame<'_>) -> Result<(), SessionError> {
        self.check_pages(p)?;
        self.count(p.round, p.pages());
        Ok(())
    }

    /// Counts an accepted PAGES or COPY frame of `round` with `pages` pages.
    fn count(&mut self, round: Round, pages: u64) {
        if self.open_round.is_none() {
            self.opened = Some(round);
        }
        self.open_round = Some(round);
        self.frames = self.frames.saturating_add(1);
        self.pages = self.pages.saturating_add(pages);
    }

    /// Whether a page frame of `round` would open a round on this channel (none is
    /// open): a transport that places its pages before the frame is counted tells the
    /// session first ([`DestinationSession::on_round_opened`]), so that no page of a
    /// round after the final one, or after the session completed, reaches memory.
    pub fn opens_round(&self, round: Round) -> Option<Round> {
        self.open_round.is_none().then_some(round)
    }

    /// The round this channel opened with the frame just accepted, once: hand it to
    /// [`DestinationSession::on_round_opened`].
    pub fn take_opened(&mut self) -> Option<Round> {
        self.opened.take()
    }

    /// Takes a frame received on this channel and says what to do with it.
    ///
    /// # Errors
    /// The rule the frame broke; the channel is then finished (send ABORT and close).
    pub fn on_frame<'f, 'a>(
        &mut self,
        frame: &'f Frame<'a>,
    ) -> Result<DestinationEvent<'f, 'a>, SessionError> {
        let ty = frame.frame_type();
        match frame {
            Frame::Extension { .. } => return Ok(DestinationEvent::Skip),
            Frame::Abort(a) => return Err(SessionError::PeerAborted(a.reason)),
            _ if matches!(self.handover, Handover::Committed(_)) => {
                return Err(SessionError::AfterCommit(ty));
            }
            Frame::Commit(c) => return self.commit(c).map(|()| DestinationEvent::Commit(c)),
            _ if self.completed => return Err(SessionError::AfterComplete(ty)),
            Frame::Layout(l) => return Ok(DestinationEvent::Layout(l)),
            _ if self.rules.is_none() => return Err(SessionError::LayoutMissing(ty)),
            _ => {}
        }
        match frame {
            Frame::Pages(p) => {
                self.check_pages(p)?;
                self.count(p.round, p.pages());
                Ok(DestinationEvent::Apply(p))
            }
            Frame::Copy(c) => {
                self.check_copy(c)?;
                self.count(c.round, c.pages());
                if c.round_end {
                    self.round_end_pages = self.round_end_pages.saturating_add(c.pages());
                    return Ok(DestinationEvent::RoundEndCopy(c));
                }
                Ok(DestinationEvent::Copy(c))
            }
            Frame::EndOfRound(e) => self.end_round(e).map(DestinationEvent::AckRound),
            Frame::DeviceState(d) => Ok(DestinationEvent::DeviceState(d)),
            Frame::Complete(c) => {
                if self.channel.0 != 0 {
                    return Err(SessionError::CompleteChannel(self.channel));
                }
                if self.open_round.is_some() {
                    return Err(SessionError::CompleteEarly {
                        final_round: c.final_round,
                        what: "a round is open on channel 0",
                    });
                }
                if self.last_ended != Some(c.final_round) {
                    return Err(SessionError::CompleteEarly {
                        final_round: c.final_round,
                        what: "channel 0 has not ended that round",
                    });
                }
                self.completed = true;
                self.handover = Handover::Completed(c.final_round);
                Ok(DestinationEvent::Complete(c))
            }
            _ => Err(SessionError::UnexpectedFrame(ty)),
        }
    }

    fn commit(&mut self, c: &Commit) -> Result<(), SessionError> {
        if self.channel.0 != 0 {
            return Err(SessionError::CommitChannel(self.channel));
        }
        match self.handover {
            Handover::Acked(r) if r == c.final_round => {
                self.handover = Handover::Committed(r);
                Ok(())
            }
            Handover::Acked(r) => Err(SessionError::CommitMismatch {
                final_round: r,
                commit: c.final_round,
            }),
            _ => Err(SessionError::CommitEarly {
                final_round: c.final_round,
            }),
        }
    }

    /// The ACK COMPLETE to send on channel 0 once the session verified the COMPLETE
    /// this channel took ([`CompleteProgress::Done`]); records it as sent, after which
    /// this channel accepts COMMIT.
    ///
    /// # Errors
    /// [`SessionError::Local`] on a channel that took no COMPLETE (any but 0), before
    /// the session completed at that round, or a second time.
    ///
    /// [`CompleteProgress::Done`]: super::CompleteProgress::Done
    pub fn ack_complete(&mut self, session: &DestinationSession) -> Result<Ack, SessionError> {
        match self.handover {
            Handover::Completed(r) if session.completed() == Some(r) => {
                self.handover = Handover::Acked(r);
                Ok(Ack {
                    kind: AckKind::COMPLETE,
                    value: r.0.into(),
                })
            }
            Handover::Completed(_) => Err(SessionError::Local(
                "ACK COMPLETE before the session verified COMPLETE",
            )),
            Handover::Open => Err(SessionError::Local("ACK COMPLETE without a COMPLETE")),
            Handover::Acked(_) | Handover::Committed(_) => {
                Err(SessionError::Local("ACK COMPLETE sent twice"))
            }
        }
    }

    /// The final round while this channel (0) sent ACK COMPLETE and waits for COMMIT: a
    /// failure now means the guest was not handed over.
    pub fn awaiting_commit(&self) -> Option<Round> {
        match self.handover {
            Handover::Acked(r) => Some(r),
            _ => None,
        }
    }

    /// The final round, once this channel (0) took a valid COMMIT.
    pub fn committed(&self) -> Option<Round> {
        match self.handover {
            Handover::Committed(r) => Some(r),
            _ => None,
        }
    }

    fn end_round(&mut self, e: &EndOfRound) -> Result<Round, SessionError> {
        let round = e.round;
        if self.last_ended.is_some_and(|l| round <= l)
            || self.open_round.is_some_and(|o| o != round)
        {
            return Err(SessionError::EndOfRoundOutOfOrder { round });
        }
        if e.frames != self.frames || e.pages != self.pages {
            return Err(SessionError::CountMismatch {
                round,
                sent_frames: e.frames,
                sent_pages: e.pages,
                got_frames: self.frames,
                got_pages: self.pages,
            });
        }
        self.frames = 0;
        self.pages = 0;
        self.round_end_pages = 0;
        self.open_round = None;
        self.last_ended = Some(round);
        Ok(round)
    }

    /// Marks the session complete on this channel (another channel received COMPLETE):
    /// any later page frame here is refused.
    pub fn finish(&mut self) {
        self.completed = true;
    }

    /// The last round this channel ended.
    pub fn last_ended(&self) -> Option<Round> {
        self.last_ended
    }
}
