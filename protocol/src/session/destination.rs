//! The destination's side of a session.

use crate::frame::{Ack, Commit, Complete, DeviceState, LayoutFrame};
use crate::ids::{AckKind, ChannelId, FrameType, Round};
use crate::layout::MemoryLayout;
use crate::session::{Affinity, DestinationChannel, Limit, SessionError};

/// What the destination accepts from an authenticated peer. Every value bounds memory
/// or work the peer can make the destination spend; a frame that asks for more fails
/// the session with [`SessionError::LimitExceeded`] naming the limit.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestinationLimits {
    /// Guest memory over all regions of the LAYOUT, bytes. The destination never maps
    /// more.
    pub max_guest_bytes: u64,
    /// Regions in the LAYOUT.
    pub max_regions: u32,
    /// Channels in the session.
    pub max_channels: u16,
    /// Device-state sections.
    pub max_device_sections: u32,
    /// Device-state bytes over all sections (announced totals and received data).
    pub max_device_bytes: u64,
}

impl Default for DestinationLimits {
    /// 16 GiB of guest memory in at most 256 regions, 64 channels, 4096 device-state
    /// sections of 256 MiB in all.
    fn default() -> Self {
        Self {
            max_guest_bytes: 16 << 30,
            max_regions: 256,
            max_channels: 64,
            max_device_sections: 4096,
            max_device_bytes: 256 << 20,
        }
    }
}

impl DestinationLimits {
    pub(super) fn check(limit: Limit, value: u64, max: u64) -> Result<(), SessionError> {
        if value > max {
            return Err(SessionError::LimitExceeded { limit, value, max });
        }
        Ok(())
    }
}

/// A device-state section received whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// Its name.
    pub name: String,
    /// Its instance number.
    pub instance: u32,
    /// Its bytes.
    pub data: Vec<u8>,
}

#[derive(Debug)]
struct Partial {
    name: String,
    instance: u32,
    channel: ChannelId,
    total: u64,
    data: Vec<u8>,
}

/// Where a COMPLETE stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompleteProgress {
    /// Everything is applied: answer ACK COMPLETE for this round.
    Done(Round),
    /// Some channels have not yet ended the final round; ask again when one does.
    Waiting,
}

/// The session-wide part of the destination: the layout, the rounds every channel has
/// ended, device state and completion. Shared by the channels (the caller puts it
/// behind a lock); the per-frame work is in [`DestinationChannel`].
#[derive(Debug)]
pub struct DestinationSession {
    limits: DestinationLimits,
    channels: u16,
    page_size: u32,
    layout: Option<(MemoryLayout, Affinity)>,
    ended: Vec<Option<Round>>,
    /// The last round each channel opened (sent pages of).
    opened: Vec<Option<Round>>,
    partial: Vec<Partial>,
    done_sections: Vec<(String, u32)>,
    device_bytes: u64,
    complete: Option<(Round, u32)>,
    completed: Option<Round>,
    committed: Option<Round>,
}

impl DestinationSession {
    /// A session of `channels` channels with `page_size`.
    ///
    /// # Errors
    /// [`SessionError::LimitExceeded`] when `channels` is above the limit,
    /// [`SessionError::BadChannel`] when it is 0.
    pub fn new(
        channels: u16,
        page_size: u32,
        limits: DestinationLimits,
    ) -> Result<Self, SessionError> {
        if channels == 0 {
            return Err(SessionError::BadChannel {
                channel: ChannelId(0),
                channels,
            });
        }
        DestinationLimits::check(Limit::Channels, channels.into(), limits.max_channels.into())?;
        Ok(Self {
            limits,
            channels,
            page_size,
            layout: None,
            ended: vec![None; usize::from(channels)],
            opened: vec![None; usize::from(channels)],
            partial: Vec::new(),
            done_sections: Vec::new(),
            device_bytes: 0,
            complete: None,
            completed: None,
            committed: None,
        })
    }

    /// The per-channel state machine of channel `ch`.
    ///
    /// # Errors
    /// [`SessionError::BadChannel`] when `ch` is outside the session.
    pub fn channel(&self, ch: ChannelId) -> Result<DestinationChannel, SessionError> {
        if ch.0 >= self.channels {
            return Err(SessionError::BadChannel {
                channel: ch,
                channels: self.channels,
            });
        }
        Ok(DestinationChannel::new(ch))
    }

    /// The limits in force.
    pub fn limits(&self) -> &DestinationLimits {
        &self.limits
    }

    /// Channels in the session.
    pub fn channels(&self) -> u16 {
        self.channels
    }

    /// The layout and affinity, once a LAYOUT has been accepted.
    pub fn layout(&self) -> Option<(&MemoryLayout, Affinity)> {
        self.layout.as_ref().map(|(l, a)| (l, *a))
    }

    /// Takes a LAYOUT a channel received. Returns `true` for the session's first one:
    /// the caller prepares guest memory for [`DestinationSession::layout`] now. Every
    /// later copy must be identical.
    ///
    /// # Errors
    /// `BadLayout`, `LimitExceeded` (regions, guest bytes) or `LayoutDiffers`.
    pub fn on_layout(&mut self, frame: &LayoutFrame<'_>) -> Result<bool, SessionError> {
        DestinationLimits::check(
            Limit::Regions,
            frame.regions.len() as u64,
            self.limits.max_regions.into(),
        )?;
        let layout =
            MemoryLayout::from_frame(frame, self.page_size).map_err(SessionError::BadLayout)?;
        let affinity = Affinity::new(self.channels, frame.chunk_pages).ok_or(
            SessionError::BadLayout(crate::DecodeError::InvalidField {
                field: "layout chunk pages",
                value: frame.chunk_pages.into(),
            }),
        )?;
        DestinationLimits::check(
            Limit::GuestBytes,
            layout.total_bytes(),
            self.limits.max_guest_bytes,
        )?;
        match &self.layout {
            Some((l, a)) if *l == layout && *a == affinity => Ok(false),
            Some(_) => Err(SessionError::LayoutDiffers),
            None => {
                self.layout = Some((layout, affinity));
                Ok(true)
            }
        }
    }

    /// Records that `ch` ended `round` (after its [`DestinationChannel`] accepted the
    /// END_OF_ROUND). Returns where a pending COMPLETE stands, if one is pending.
    ///
    /// # Errors
    /// `RoundAfterFinal` when the channel ended a round after an announced final one.
    pub fn on_round_ended(
        &mut self,
        ch: ChannelId,
        round: Round,
    ) -> Result<Option<CompleteProgress>, SessionError> {
        if let Some(slot) = self.ended.get_mut(usize::from(ch.0)) {
            *slot = Some(round);
        }
        self.settle()
    }

    /// Records that `ch` opened `round`: its first page frame of that round passed
    /// the channel's rules ([`DestinationChannel::take_opened`]). Pages of a round after
    /// an announced final round fail the session.
    ///
    /// # Errors
    /// `RoundAfterFinal`, or `AfterComplete` once the session completed.
    pub fn on_round_opened(&mut self, ch: ChannelId, round: Round) -> Result<(), SessionError> {
        if self.completed.is_some() {
            return Err(SessionError::AfterComplete(FrameType::PAGES));
        }
        if let Some(slot) = self.opened.get_mut(usize::from(ch.0)) {
            *slot = Some(round);
        }
        self.settle().map(|_| ())
    }

    /// Re-evaluates a pending COMPLETE.
    fn settle(&mut self) -> Result<Option<CompleteProgress>, SessionError> {
        match self.complete {
            Some(_) => self.progress().map(Some),
            None => Ok(None),
        }
    }

    /// Takes a device-state chunk received on `ch`. Returns the section when this chunk
    /// finished it.
    ///
    /// # Errors
    /// `LimitExceeded` (sections, bytes), `DeviceStateOutOfOrder`,
    /// `DeviceStateTotalChanged`, `SectionChannel`,
    /// `DuplicateSection`, `AfterComplete`.
    pub fn on_device_state(
        &mut self,
        ch: ChannelId,
        d: &DeviceState<'_>,
    ) -> Result<Option<Section>, SessionError> {
        if self.completed.is_some() {
            return Err(SessionError::AfterComplete(FrameType::DEVICE_STATE));
        }
        let pos = self
            .partial
            .iter()
            .position(|p| p.instance == d.instance && p.name == d.name);
        let i = match pos {
            Some(i) => {
                let p = &self.partial[i];
                if p.channel != ch {
                    return Err(SessionError::SectionChannel {
                        instance: d.instance,
                        channel: ch,
                        began: p.channel,
                    });
                }
                if p.total != d.total {
                    return Err(SessionError::DeviceStateTotalChanged {
                        instance: d.instance,
                        total: d.total,
                        first: p.total,
                    });
                }
                if p.data.len() as u64 != d.offset {
                    return Err(SessionError::DeviceStateOutOfOrder {
                        instance: d.instance,
                        offset: d.offset,
                        have: p.data.len() as u64,
                    });
                }
                i
            }
            None => {
                if d.offset != 0 {
                    return Err(SessionError::DeviceStateOutOfOrder {
                        instance: d.instance,
                        offset: d.offset,
                        have: 0,
                    });
                }
                if self
                    .done_sections
                    .iter()
                    .any(|(n, i)| *i == d.instance && n == d.name)
                {
                    return Err(SessionError::DuplicateSection {
                        instance: d.instance,
                    });
                }
                let sections = (self.done_sections.len() + self.partial.len() + 1) as u64;
                DestinationLimits::check(
                    Limit::DeviceSections,
                    sections,
                    self.limits.max_device_sections.into(),
                )?;
                // Announced totals count against the byte limit before any data is
                // kept, so no section can grow past it.
                let announced = self
                    .partial
                    .iter()
                    .fold(self.device_bytes, |t, p| {
                        t.saturating_add(p.total - p.data.len() as u64)
                    })
                    .saturating_add(d.total);
                DestinationLimits::check(
                    Limit::DeviceBytes,
                    announced,
                    self.limits.max_device_bytes,
                )?;
                self.partial.push(Partial {
                    name: d.name.to_owned(),
                    instance: d.instance,
                    channel: ch,
                    total: d.total,
                    data: Vec::new(),
                });
                self.partial.len() - 1
            }
        };
        let p = &mut self.partial[i];
        // Bounded: offset + len ≤ total (checked by the decoder and above), and totals
        // count against the byte limit. The whole section is reserved with its first
        // chunk, so what is allocated is the announced total, not up to twice it as
        // growth by doubling would (a large reservation is mapped as it is written).
        // A reservation the allocator refuses (a limit set past what the host can
        // commit) is not an error: the section then grows as its bytes arrive.
        if p.data.capacity() == 0
            && let Ok(total) = usize::try_from(p.total)
        {
            let _ = p.data.try_reserve_exact(total);
        }
        p.data.extend_from_slice(d.data);
        self.device_bytes = self.device_bytes.saturating_add(d.data.len() as u64);
        if p.data.len() as u64 == p.total {
            let p = self.partial.swap_remove(i);
            self.done_sections.push((p.name.clone(), p.instance));
            self.settle()?;
            return Ok(Some(Section {
                name: p.name,
                instance: p.instance,
                data: p.data,
            }));
        }
        Ok(None)
    }

    /// Takes the COMPLETE that channel 0 accepted ([`DestinationEvent::Complete`]).
    /// The session completes once every channel has ended the final round, no channel
    /// opened a later one, and exactly the announced device-state sections arrived
    /// whole: other channels are independent streams, so their last rounds and
    /// sections may still be on their way.
    ///
    /// Channel 0 carries nothing but COMMIT after COMPLETE, so what only channel 0
    /// could still send is refused at once rather than waited for: a section left
    /// unfinished on channel 0, and in a session of one channel any missing section.
    ///
    /// # Errors
    /// `SectionCount` (more sections than announced), `RoundAfterFinal`,
    /// `CompleteEarly` (what only channel 0 could still send is missing).
    ///
    /// [`DestinationEvent::Complete`]: super::DestinationEvent::Complete
    pub fn on_complete(&mut self, c: &Complete) -> Result<CompleteProgress, SessionError> {
        if self.complete.is_some() {
            return Err(SessionError::AfterComplete(FrameType::COMPLETE));
        }
        self.complete = Some((c.final_round, c.sections));
        let progress = self.progress()?;
        if progress == CompleteProgress::Waiting {
            let early = |what| SessionError::CompleteEarly {
                final_round: c.final_round,
                what,
            };
            if self.partial.iter().any(|p| p.channel == ChannelId(0)) {
                return Err(early("a device-state section is unfinished on channel 0"));
            }
            if self.channels == 1 {
                return Err(early(
                    "device-state sections are missing, on the only channel",
                ));
            }
        }
        Ok(progress)
    }

    fn progress(&mut self) -> Result<CompleteProgress, SessionError> {
        let Some((final_round, sections)) = self.complete else {
            return Ok(CompleteProgress::Waiting);
        };
        let later = self.ended.iter().chain(self.opened.iter()).flatten();
        if let Some(round) = later.filter(|r| **r > final_round).max() {
            return Err(SessionError::RoundAfterFinal {
                round: *round,
                final_round,
            });
        }
        let received = self.done_sections.len() as u32;
        if received > sections {
            return Err(SessionError::SectionCount {
                announced: sections,
                received,
            });
        }
        if self.ended.iter().all(|e| *e == Some(final_round))
            && received == sections
            && self.partial.is_empty()
        {
            self.completed = Some(final_round);
            return Ok(CompleteProgress::Done(final_round));
        }
        Ok(CompleteProgress::Waiting)
    }

    /// Whether a device-state section begun on `channel` is unfinished: its other
    /// chunks may come only on that channel (`SectionChannel`).
    pub fn unfinished_on(&self, channel: ChannelId) -> bool {
        self.partial.iter().any(|p| p.channel == channel)
    }

    /// What a COMPLETE still waits for, for an error message.
    pub fn waiting_for(&self) -> (usize, u32, usize) {
        let ended = self
            .ended
            .iter()
            .filter(|e| self.complete.is_some_and(|(f, _)| **e == Some(f)))
            .count();
        (ended, self.done_sections.len() as u32, self.partial.len())
    }

    /// Where a received COMPLETE stands now (`Waiting` also before any COMPLETE).
    pub fn complete_progress(&self) -> CompleteProgress {
        match self.completed {
            Some(r) => CompleteProgress::Done(r),
            None => CompleteProgress::Waiting,
        }
    }

    /// The final round, once the migration is verified complete. The guest must not run
    /// here yet: that waits for COMMIT ([`DestinationSession::committed`]).
    pub fn completed(&self) -> Option<Round> {
        self.completed
    }

    /// Takes the COMMIT that channel 0 accepted ([`DestinationEvent::Commit`]) and
    /// returns the ACK COMMITTED to send back (best effort: the source that misses it
    /// reports the outcome unknown and keeps the guest paused). From here on
    /// [`DestinationSession::committed`] says the guest is this side's to run.
    ///
    /// # Errors
    /// `CommitEarly` before the session completed, `CommitMismatch` for another round
    /// than the final one, `AfterCommit` for a second COMMIT.
    ///
    /// [`DestinationEvent::Commit`]: super::DestinationEvent::Commit
    pub fn on_commit(&mut self, c: &Commit) -> Result<Ack, SessionError> {
        if self.committed.is_some() {
            return Err(SessionError::AfterCommit(FrameType::COMMIT));
        }
        match self.completed {
            Some(r) if r == c.final_round => {
                self.committed = Some(r);
                Ok(Ack {
                    kind: AckKind::COMMITTED,
                    value: r.0.into(),
                })
            }
            Some(r) => Err(SessionError::CommitMismatch {
                final_round: r,
                commit: c.final_round,
            }),
            None => Err(SessionError::CommitEarly {
                final_round: c.final_round,
            }),
        }
    }

    /// The final round, once a valid COMMIT arrived: only then does the destination
    /// report success and run the guest (PROTOCOL.md, Switchover).
    pub fn committed(&self) -> Option<Round> {
        self.committed
    }

    /// The last round each channel ended.
    pub fn ended(&self) -> &[Option<Round>] {
        &self.ended
    }

    /// The last round every channel has ended (that round or a later one), `None` while
    /// a channel has ended none. The ROUND_END copies of rounds up to it may be applied
    /// now ([`DestinationEvent::RoundEndCopy`]).
    ///
    /// [`DestinationEvent::RoundEndCopy`]: super::DestinationEvent::RoundEndCopy
    pub fn ended_everywhere(&self) -> Option<Round> {
        // `None` orders before every `Some`: one channel without a round gives `None`.
        self.ended.iter().copied().min().flatten()
    }
}
