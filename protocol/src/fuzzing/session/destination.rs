//! The destination of the `session` fuzz target: the state machines driven as the
//! pipeline drives them, with an independent record of what the session's rules allow.

use crate::copy::CopyFrame;
use crate::frame::{Ack, Frame};
use crate::ids::{AckKind, ChannelId, RegionId, Round};
use crate::session::{
    CompleteProgress, DestinationChannel, DestinationEvent, DestinationSession, SessionError,
    SourceChannel,
};
use crate::wire::PageRun;

use super::round_end::RoundEnd;
use super::{SESSION_PAGE, SessionOutcome, session_limits};

/// A destination driven as the pipeline drives one, with an independent record of what
/// the session's rules allow, checked on every frame the state machines let through.
pub(super) struct FuzzDestination {
    session: DestinationSession,
    channels: Vec<DestinationChannel>,
    dead: Vec<bool>,
    errors: Vec<(usize, Option<SessionError>)>,
    /// The first accepted LAYOUT, kept here: (region id, pages) and the chunk size.
    layout: Option<(Vec<(u32, u64)>, u32)>,
    /// The last round each channel ended, by the AckRound events seen here.
    ended: Vec<Option<Round>>,
    applied: Vec<u64>,
    copied: Vec<u64>,
    /// Bytes of the device-state sections handed out whole.
    device_bytes: u64,
    /// ACKs to send back, per channel.
    pub(super) acks: Vec<Vec<Ack>>,
    /// Whether channel 0 sent ACK COMPLETE (by the events seen here).
    ack_complete_sent: bool,
    /// ROUND_END copies recorded and applied, and the ACK ROUNDs they hold back.
    round_end: RoundEnd,
}

impl FuzzDestination {
    pub(super) fn new(channels: u16) -> Option<Self> {
        let session = DestinationSession::new(channels, 4096, session_limits()).ok()?;
        let chans = (0..channels)
            .map(|c| session.channel(ChannelId(c)))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        let n = usize::from(channels);
        Some(Self {
            session,
            channels: chans,
            dead: vec![false; n],
            errors: Vec::new(),
            layout: None,
            ended: vec![None; n],
            applied: vec![0; n],
            copied: vec![0; n],
            device_bytes: 0,
            acks: vec![Vec::new(); n],
            ack_complete_sent: false,
            round_end: RoundEnd::new(n),
        })
    }

    pub(super) fn kill(&mut self, c: usize, why: Option<SessionError>) {
        self.dead[c] = true;
        self.errors.push((c, why));
    }

    /// Feeds a decoded frame to channel `c` and carries out what the machine says.
    pub(super) fn receive(&mut self, c: usize, frame: &Frame<'_>) {
        if self.dead[c] {
            return;
        }
        let id = ChannelId(c as u16);
        let event = match self.channels[c].on_frame(frame) {
            Ok(e) => e,
            Err(e) => return self.kill(c, Some(e)),
        };
        let result = match event {
            DestinationEvent::Layout(l) => self.session.on_layout(l).and_then(|first| {
                if first {
                    let regions = l
                        .regions
                        .iter()
                        .map(|r| (r.id.0, r.length / SESSION_PAGE))
                        .collect();
                    self.layout = Some((regions, l.chunk_pages));
                }
                self.channels[c].set_layout(&self.session)
            }),
            DestinationEvent::Apply(p) => {
                self.check_apply(c, p.region, p.round, p.all_runs(), [].into_iter());
                return self.applied(c);
            }
            DestinationEvent::Copy(copy) => {
                assert!(!copy.round_end, "a ROUND_END copy applied at once");
                self.check_apply(c, copy.region, copy.round, copy.all_runs(), [].into_iter());
                check_copy_runs(copy);
                self.copied[c] += 1;
                return self.applied(c);
            }
            DestinationEvent::RoundEndCopy(copy) => {
                // Targets of this channel, sources of any channel inside the region.
                assert!(copy.round_end, "a plain COPY deferred");
                self.check_apply(c, copy.region, copy.round, copy.targets(), copy.sources());
                check_copy_runs(copy);
                // The bound: the layout's pages this channel carries, counted by whole
                // cycles of `channels` chunks and the rest (not as the session does).
                let channels = self.channels.len() as u128;
                let own_pages = self.layout.as_ref().map_or(0, |(regions, chunk)| {
                    let chunk = u128::from(*chunk);
                    let cycle = chunk * channels;
                    regions
                        .iter()
                        .map(|&(id, pages)| {
                            let pages = u128::from(pages);
                            let k = (c as u128 + channels - u128::from(id) % channels) % channels;
                            let rest = (pages % cycle).saturating_sub(k * chunk).min(chunk);
                            pages / cycle * chunk + rest
                        })
                        .sum::<u128>()
                });
                self.applied(c);
                if !self.dead[c] {
                    self.copied[c] += 1;
                    self.round_end
                        .record(c, copy.round, copy.pages(), own_pages);
                }
                return;
            }
            DestinationEvent::AckRound(round) => {
                assert!(
                    self.ended[c].is_none_or(|e| round > e),
                    "channel {c} ended round {round} after round {:?}",
                    self.ended[c]
                );
                self.ended[c] = Some(round);
                self.round_end.ended(c, round);
                let result = self.session.on_round_ended(id, round);
                // ACK ROUND once the channel's ROUND_END copies of its rounds are applied.
                let released = self.round_end.release(self.session.ended_everywhere());
                for (ch, r) in released.into_iter().filter(|&(ch, _)| !self.dead[ch]) {
                    self.acks[ch].push(Ack {
                        kind: AckKind::ROUND,
                        value: r.0.into(),
                    });
                }
                result.map(|p| self.progress(p))
            }
            DestinationEvent::DeviceState(d) => {
                self.session.on_device_state(id, d).map(|section| {
                    if let Some(s) = section {
                        self.device_bytes += s.data.len() as u64;
                        assert!(
                            self.device_bytes <= session_limits().max_device_bytes,
                            "device state past the byte limit"
                        );
                    }
                })
            }
            DestinationEvent::Complete(done) => {
                assert_eq!(c, 0, "COMPLETE accepted on channel {c}");
                assert_eq!(
                    self.ended[0],
                    Some(done.final_round),
                    "COMPLETE accepted before channel 0 ended its final round"
                );
                self.session
                    .on_complete(done)
                    .map(|p| self.progress(Some(p)))
            }
            DestinationEvent::Commit(commit) => {
                assert_eq!(c, 0, "COMMIT accepted on channel {c}");
                assert!(
                    self.ack_complete_sent,
                    "COMMIT accepted before ACK COMPLETE was sent"
                );
                assert_eq!(self.session.completed(), Some(commit.final_round));
                self.session.on_commit(commit).map(|ack| {
                    assert_eq!(self.session.committed(), Some(commit.final_round));
                    self.acks[0].push(ack);
                })
            }
            DestinationEvent::Skip => Ok(()),
        };
        if let Err(e) = result {
            self.kill(c, Some(e));
        }
    }

    /// A PAGES or COPY frame applied on channel `c`: its round may have opened, and it
    /// counts for ACK FRAMES.
    fn applied(&mut self, c: usize) {
        if let Some(round) = self.channels[c].take_opened()
            && let Err(e) = self.session.on_round_opened(ChannelId(c as u16), round)
        {
            return self.kill(c, Some(e));
        }
        self.applied[c] += 1;
        self.acks[c].push(Ack {
            kind: AckKind::FRAMES,
            value: self.applied[c],
        });
    }

    /// On completion: every channel ended the final round (by the events seen here),
    /// every channel is finished, and channel 0 answers ACK COMPLETE.
    fn progress(&mut self, p: Option<CompleteProgress>) {
        let Some(CompleteProgress::Done(last)) = p else {
            return;
        };
        assert_eq!(self.session.completed(), Some(last));
        assert!(
            self.ended.iter().all(|e| *e == Some(last)),
            "complete at round {last} but channels ended {:?}",
            self.ended
        );
        assert!(
            self.round_end.idle(),
            "complete at round {last} with ROUND_END copies not applied: {:?}",
            self.round_end
        );
        for ch in &mut self.channels {
            ch.finish();
        }
        if self.dead[0] {
            return;
        }
        let ack = self.channels[0]
            .ack_complete(&self.session)
            .expect("channel 0 took the COMPLETE the session verified");
        assert_eq!(
            ack,
            Ack {
                kind: AckKind::COMPLETE,
                value: last.0.into(),
            }
        );
        self.ack_complete_sent = true;
        self.acks[0].push(ack);
    }

    /// The invariant of every applied frame (PAGES, or COPY with its targets and sources),
    /// recomputed without the session module: its pages lie inside a region of the
    /// LAYOUT, each of `runs` belongs to channel `c` by `(page / chunk + region) %
    /// channels` (`foreign`, a ROUND_END copy's sources, may belong to any), and its
    /// round is still open on `c`.
    fn check_apply(
        &self,
        c: usize,
        region: RegionId,
        round: Round,
        runs: impl Iterator<Item = PageRun>,
        foreign: impl Iterator<Item = PageRun>,
    ) {
        assert!(
            self.session.completed().is_none(),
            "pages applied after completion"
        );
        let Some((regions, chunk)) = &self.layout else {
            panic!("pages applied on channel {c} before any LAYOUT was accepted");
        };
        let Some(&(_, pages)) = regions.iter().find(|(id, _)| *id == region.0) else {
            panic!("pages applied for region {region} outside the LAYOUT");
        };
        let channels = self.channels.len() as u128;
        let runs = runs.map(|r| (r, true)).chain(foreign.map(|r| (r, false)));
        for (run, own) in runs {
            let start = u128::from(run.start.0);
            let end = start + u128::from(run.count);
            assert!(
                end <= u128::from(pages),
                "run {run:?} past region {region} of {pages} pages"
            );
            for page in (start..end).filter(|_| own) {
                let owner = (page / u128::from(*chunk) + u128::from(region.0)) % channels;
                assert_eq!(
                    owner, c as u128,
                    "page {page} of region {region} applied on channel {c}, owner {owner}"
                );
            }
        }
        assert!(
            self.ended[c].is_none_or(|e| round > e),
            "pages of round {round} applied on channel {c}, which ended {:?}",
            self.ended[c]
        );
    }

    pub(super) fn outcome(&self, source: Option<&SourceChannel>, faults: usize) -> SessionOutcome {
        let committed = self.session.committed();
        assert!(
            committed.is_none() || committed == self.session.completed(),
            "committed {committed:?} without completing at that round"
        );
        SessionOutcome {
            completed: self.session.completed(),
            source_completed: source.and_then(SourceChannel::completed),
            committed,
            source_commit_sent: source.and_then(SourceChannel::commit_sent),
            source_committed: source.and_then(SourceChannel::committed),
            applied: self.applied.clone(),
            copied: self.copied.clone(),
            round_end: self.round_end.applied.clone(),
            dead: self.dead.clone(),
            errors: self.errors.clone(),
            faults,
        }
    }
}

/// The decoder's rules of an applied COPY, recomputed page by page (its pages lie inside a
/// region of at most [`session_limits`]' guest bytes, checked before): at least one run,
/// targets ascending and disjoint, no source page among the targets.
fn check_copy_runs(copy: &CopyFrame<'_>) {
    assert!(!copy.runs.is_empty(), "a COPY without runs applied");
    let mut targets: Vec<u64> = Vec::new();
    for t in copy.targets() {
        assert!(
            targets.last().is_none_or(|&l| l < t.start.0) && t.count > 0,
            "COPY targets not ascending: {copy:?}"
        );
        targets.extend(t.start.0..t.start.0 + u64::from(t.count));
    }
    for s in copy.sources() {
        assert!(
            (s.start.0..s.start.0 + u64::from(s.count)).all(|p| !targets.contains(&p)),
            "a COPY source page is one of its targets: {copy:?}"
        );
    }
}
