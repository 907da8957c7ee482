//! The `session` fuzz target: the session state machines driven by frames as they come
//! off the wire, or by a generated source with faults, against a destination whose
//! rules are recomputed here.

use crate::copy::{CopyFrame, CopyRun};
use crate::frame::{Envelope, Frame};
use crate::ids::{AckKind, ChannelId, PageIndex, RegionId, Round};
use crate::limits::Limits;
use crate::session::{Affinity, DestinationLimits, SessionError, SourceChannel, SourceEvent};
use crate::wire::{PageRun, WireList};

use super::limits;

mod destination;
mod generated;
mod round_end;
mod seeds;

use destination::FuzzDestination;
use generated::session_generated;
pub use seeds::session_seeds;

/// Destination limits small enough for the fuzzer to reach every one of them.
fn session_limits() -> DestinationLimits {
    DestinationLimits {
        max_guest_bytes: 1 << 20,
        max_regions: 4,
        max_channels: 4,
        max_device_sections: 4,
        max_device_bytes: 4096,
    }
}

/// The page size of fuzzed sessions (the one [`limits`] uses).
const SESSION_PAGE: u64 = 4096;

/// What one run of [`session`] did, for the tests that replay it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOutcome {
    /// The final round, when the destination verified the session complete.
    pub completed: Option<Round>,
    /// The final round the source's channel 0 saw acknowledged by ACK COMPLETE.
    pub source_completed: Option<Round>,
    /// The final round, when the destination took a valid COMMIT: it reports success
    /// and runs the guest.
    pub committed: Option<Round>,
    /// The final round of the COMMIT the source's channel 0 sent (or began to send):
    /// from then on it must not resume the guest.
    pub source_commit_sent: Option<Round>,
    /// The final round the source's channel 0 saw acknowledged by ACK COMMITTED.
    pub source_committed: Option<Round>,
    /// PAGES and COPY frames the destination applied, per channel.
    pub applied: Vec<u64>,
    /// The COPY frames among them, per channel (ROUND_END ones when recorded).
    pub copied: Vec<u64>,
    /// ROUND_END COPY frames applied at the end of their round, per channel.
    pub round_end: Vec<u64>,
    /// Channels that failed (an error from the state machines, or an undecodable frame).
    pub dead: Vec<bool>,
    /// Why each channel failed, in order: the state machines' error, or `None` for a
    /// frame that did not decode.
    pub errors: Vec<(usize, Option<SessionError>)>,
    /// Faults injected into a generated session (0 for the frame mode).
    pub faults: usize,
}

/// Reads fuzzer bytes as parameters; 0 once they run out.
struct Params<'a>(&'a [u8]);

impl Params<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
}

/// The session state machines (`crate::session`) against a fuzzer.
///
/// Input: a selector byte (bit 0: generated-session mode, else frame mode; bit 1: CRC32C
/// negotiated), then:
/// - frame mode: a byte choosing 1–4 channels, then records `channel byte || frame`
///   (a whole frame as on the wire). The frames go to a
///   [`DestinationSession`](crate::session::DestinationSession) and its
///   channels exactly as a destination would feed them; with bit 7 of the channel byte
///   set, to a [`SourceChannel`] that sent nothing yet, which must accept no ACK but
///   FRAMES 0.
/// - generated mode: parameters of a legitimate session (channels, chunk size, regions,
///   rounds, dirty pages, device-state sections, extension frames, COPY frames, ROUND_END
///   ones among them with sources of other channels) that a
///   [`SourceChannel`] per channel produces, a fault list (drop, duplicate, move to
///   another channel, alter a run of a PAGES or COPY frame, flip a byte) and a delivery schedule (which channel's
///   next frame the destination reads). The destination's ACKs go back to the source,
///   which sends COMMIT once ACK COMPLETE arrived. A session with faults may also lose
///   COMMIT or ACK COMMITTED, or send a COMMIT too early (bits 3 and 4 of its
///   extension byte).
///
/// Invariants: nothing panics; every frame the destination applies names pages inside
/// the LAYOUT (a COPY's sources too, none of them among its targets), all on the channel
/// that owns them by `(page / chunk + region) % channels`
/// recomputed here (but a ROUND_END copy's sources), in a round that channel has not
/// ended; a channel's ROUND_END copies of a round target at most the layout's pages, are
/// applied once every channel ended their round, and hold back the channel's ACK ROUND
/// until then, and none is left unapplied when the session completes; a channel that failed gets
/// no more frames; the destination takes COMMIT only on channel 0 after it sent ACK
/// COMPLETE, and unless frames were altered or COMMIT sent early, it never owns the
/// guest while the source may still resume it (has not sent COMMIT). Without faults a
/// generated session completes and commits at its final round on both sides, with every
/// frame applied and every ACK accepted by the source, whatever the schedule. The generated source holds COMPLETE back until every device-state
/// section sent on another channel than 0 is acknowledged by a later ROUND ACK there,
/// as `PROTOCOL.md` asks (COMPLETE).
///
/// # Panics
/// When an invariant fails.
pub fn session(data: &[u8]) {
    let _ = session_run(data);
}

/// [`session`], returning what happened.
///
/// # Panics
/// As [`session`].
pub fn session_run(data: &[u8]) -> SessionOutcome {
    let Some((&selector, rest)) = data.split_first() else {
        return SessionOutcome::default();
    };
    let limits = limits(selector & 2);
    match selector & 1 {
        0 => session_frames(&limits, rest),
        _ => session_generated(&limits, selector & 2 != 0, rest),
    }
}

fn session_frames(limits: &Limits, data: &[u8]) -> SessionOutcome {
    let Some((&n, mut rest)) = data.split_first() else {
        return SessionOutcome::default();
    };
    let channels = 1 + u16::from(n % 4);
    let Some(mut dest) = FuzzDestination::new(channels) else {
        return SessionOutcome::default();
    };
    // Source channels that sent nothing but LAYOUT, for frames with bit 7 of their
    // channel byte set: they must accept no ACK but FRAMES 0.
    let mut sources: Vec<SourceChannel> = match Affinity::new(channels, 1) {
        Some(a) => (0..channels)
            .filter_map(|c| SourceChannel::new(ChannelId(c), a).ok())
            .collect(),
        None => Vec::new(),
    };
    for s in &mut sources {
        s.on_send_layout();
    }
    while let Some((&ch, tail)) = rest.split_first() {
        let c = usize::from(ch & 0x7f) % usize::from(channels);
        let Some(env) = tail
            .get(..Envelope::LEN)
            .and_then(|b| <&[u8; Envelope::LEN]>::try_from(b).ok())
            .and_then(|b| Envelope::parse(b, limits).ok())
        else {
            // The channel's stream cannot be framed: it fails, and the input ends.
            dest.kill(c, None);
            break;
        };
        let Some(body) = tail.get(Envelope::LEN..env.frame_len()) else {
            dest.kill(c, None);
            break;
        };
        match (Frame::decode(env, body, limits), sources.get_mut(c)) {
            (Ok(f), Some(s)) if ch & 0x80 != 0 => {
                let event = s.on_frame(&f);
                match f {
                    Frame::Ack(a) if a.kind == AckKind::FRAMES && a.value == 0 => {
                        assert_eq!(event, Ok(SourceEvent::FramesApplied(0)));
                    }
                    Frame::Extension { .. } => assert_eq!(event, Ok(SourceEvent::Skip)),
                    _ => assert!(event.is_err(), "a source that sent nothing took {f:?}"),
                }
            }
            (Ok(f), _) => dest.receive(c, &f),
            (Err(_), _) => dest.kill(c, None),
        }
        rest = &tail[env.frame_len()..];
    }
    dest.outcome(None, 0)
}

/// Canonical runs of ascending, distinct pages.
fn runs_of(pages: &[u64]) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some(r) if r.start.0 + u64::from(r.count) == p => r.count += 1,
            _ => runs.push(PageRun {
                start: PageIndex(p),
                count: 1,
            }),
        }
    }
    runs
}

/// A generated COPY frame, with its CRC when `crc`.
fn copy_frame(
    region: RegionId,
    round: Round,
    round_end: bool,
    runs: &[CopyRun],
    crc: bool,
) -> CopyFrame<'_> {
    let copy = CopyFrame {
        region,
        round,
        round_end,
        runs: WireList::Slice(runs),
        crc: None,
    };
    match crc {
        true => copy.with_crc().expect("a generated frame fits its fields"),
        false => copy,
    }
}

fn encoded(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    frame
        .encode(&mut out)
        .expect("a generated frame fits its fields");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Complete, DeviceState, EndOfRound, LayoutFrame, PageFrame};
    use crate::ids::{CodecId, FrameType, GuestAddr};
    use crate::session::{CompleteProgress, DestinationSession};
    use crate::wire::RegionDesc;

    fn seed(name: &str) -> Vec<u8> {
        session_seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s)
            .unwrap()
    }

    #[test]
    fn session_frames_complete_two_channels() {
        let out = session_run(&seed("seed-frames-complete"));
        assert_eq!(out.dead, [false, false]);
        assert_eq!(out.applied, [1, 3]);
        assert_eq!(out.completed, Some(Round(0)));
        assert_eq!(out.committed, Some(Round(0)));
    }

    #[test]
    fn copy_frames_are_applied_counted_and_kept_to_their_channel() {
        let out = session_run(&seed("seed-frames-copy"));
        assert_eq!(out.errors, []);
        assert_eq!(out.applied, [2, 2]);
        assert_eq!(out.copied, [1, 1]);
        assert_eq!(out.committed, Some(Round(0)));

        let out = session_run(&seed("seed-frames-copy-wrong-channel"));
        assert_eq!(out.applied, [0, 0]);
        let wrong = |page, channel, owner| SessionError::WrongChannel {
            region: RegionId(0),
            page,
            channel: ChannelId(channel),
            owner: ChannelId(owner),
        };
        // Channel 0: the source page 5 is channel 1's. Channel 1: the target page 8 is
        // channel 0's.
        assert_eq!(
            out.errors,
            [(0, Some(wrong(5, 0, 1))), (1, Some(wrong(8, 1, 0)))]
        );

        // A generated session with COPY frames and CRC32C completes with every frame.
        let out = session_run(&seed("seed-generated-copy"));
        assert_eq!(out.errors, []);
        assert_eq!(out.committed, Some(Round(2)));
        assert!(out.copied.iter().all(|&c| c > 0), "{out:?}");
        assert_eq!(out.round_end, [0, 0]);
    }

    #[test]
    fn round_end_copies_read_other_channels_and_apply_when_every_channel_ended() {
        let out = session_run(&seed("seed-frames-round-end-copy"));
        assert_eq!(out.errors, []);
        assert_eq!(out.applied, [2, 2]);
        assert_eq!(out.copied, [1, 1]);
        assert_eq!(out.round_end, [1, 1]);
        assert_eq!(out.committed, Some(Round(0)));

        // A generated session of three channels with ROUND_END copies completes with
        // every frame, each copy applied at its round's end.
        let out = session_run(&seed("seed-generated-round-end-copy"));
        assert_eq!(out.errors, []);
        assert_eq!(out.committed, Some(Round(2)));
        assert!(out.round_end.iter().all(|&c| c > 0), "{out:?}");
    }

    #[test]
    fn commit_is_refused_on_another_channel_and_before_ack_complete() {
        let out = session_run(&seed("seed-frames-commit-early"));
        assert_eq!(out.dead, [true, true]);
        assert_eq!(
            out.errors,
            [
                (1, Some(SessionError::CommitChannel(ChannelId(1)))),
                (
                    0,
                    Some(SessionError::CommitEarly {
                        final_round: Round(0)
                    })
                ),
            ]
        );
        assert_eq!(out.committed, None);
    }

    /// Faults in the switchover (bits 3 and 4 of the generated session's `ext` byte)
    /// never leave both sides free to run the guest, and each loss ends as
    /// PROTOCOL.md's table says.
    #[test]
    fn switchover_losses_never_let_both_sides_run_the_guest() {
        for mode in 0..4u8 {
            // One channel, one region of one page, one round; extension frames before
            // LAYOUT; one fault, read from exhausted input as zeros: drop channel 0's
            // first frame (the extension frame). Then the switchover `mode`.
            let ext = 1 | (mode << 3);
            let input = [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, ext, 0, 1];
            let out = session_run(&input);
            assert_eq!(out.faults, 1, "mode {mode}");
            assert!(out.completed.is_some(), "mode {mode}: {out:?}");
            match mode {
                0 => {
                    assert_eq!(out.committed, out.completed, "{out:?}");
                    assert_eq!(out.source_committed, out.completed);
                }
                1 => {
                    // COMMIT lost: the destination never runs the guest; the source sent
                    // COMMIT, so it must not resume it either (outcome unknown).
                    assert_eq!(out.committed, None, "{out:?}");
                    assert_eq!(out.source_commit_sent, out.completed);
                    assert_eq!(out.source_committed, None);
                }
                2 => {
                    // ACK COMMITTED lost: the destination runs the guest, the source does
                    // not know it.
                    assert_eq!(out.committed, out.completed, "{out:?}");
                    assert_eq!(out.source_commit_sent, out.completed);
                    assert_eq!(out.source_committed, None);
                }
                _ => {
                    // With one channel ACK COMPLETE goes out at COMPLETE, so the early
                    // COMMIT right behind it is taken, and the source's own COMMIT is
                    // refused as a second one.
                    assert_eq!(out.committed, out.completed, "{out:?}");
                    assert!(
                        out.errors
                            .contains(&(0, Some(SessionError::AfterCommit(FrameType::COMMIT))))
                    );
                }
            }
        }
    }

    /// Found by the `session` fuzz target (before its source learnt to wait): a legitimate
    /// source sends a device-state section on channel 1, ends the round there and on
    /// channel 0, then COMPLETE on channel 0. Channels are read independently, so the
    /// destination may take COMPLETE before channel 1's section; it then refuses it
    /// (`SectionCount`), although it waited for channel 1's round in the same situation.
    /// The session now waits for sections as it waits for rounds.
    #[test]
    fn complete_waits_for_a_section_still_travelling_on_another_channel() {
        let mut s = DestinationSession::new(2, 4096, session_limits()).unwrap();
        let regions = [RegionDesc {
            id: RegionId(0),
            backing_page_size: 4096,
            guest_addr: GuestAddr(0),
            length: SESSION_PAGE,
        }];
        let layout = LayoutFrame {
            chunk_pages: 1,
            regions: WireList::Slice(&regions),
        };
        assert_eq!(s.on_layout(&layout), Ok(true));
        assert_eq!(s.on_round_ended(ChannelId(0), Round(0)), Ok(None));
        let complete = Complete {
            final_round: Round(0),
            sections: 1,
        };
        assert_eq!(s.on_complete(&complete), Ok(CompleteProgress::Waiting));
        let section = DeviceState {
            instance: 0,
            name: "cpu",
            total: 1,
            offset: 0,
            data: b"x",
        };
        assert!(s.on_device_state(ChannelId(1), &section).is_ok());
        assert_eq!(
            s.on_round_ended(ChannelId(1), Round(0)),
            Ok(Some(CompleteProgress::Done(Round(0))))
        );
    }

    /// Found by the fuzzer in this harness: a byte flip that turned run counts (or a
    /// COMPLETE's type) into nonsense made the run-altering fault index past the frame.
    #[test]
    fn a_fault_after_a_byte_flip_stays_inside_the_frame() {
        let input = [
            53, 3, 3, 144, 144, 144, 1, 128, 144, 144, 50, 144, 144, 144, 144, 0, 0, 144, 144, 144,
            3, 3, 0, 0, 15, 240, 102, 1, 71, 0, 0, 55, 255, 255, 240, 240, 240, 240, 0, 0, 129, 2,
            154, 63, 154, 154, 154, 154, 154, 1, 1, 1, 1, 1, 129, 3, 43, 2, 1, 153, 128, 38, 144,
            144, 39, 39,
        ];
        assert!(session_run(&input).faults > 0);
    }

    /// A channel that ended the final round and then opened a later one (its pages
    /// applied) does not stop the session from completing.
    #[test]
    fn pages_after_the_final_round_fail_completion() {
        let regions = [RegionDesc {
            id: RegionId(0),
            backing_page_size: 4096,
            guest_addr: GuestAddr(0),
            length: 4 * SESSION_PAGE,
        }];
        let layout = Frame::Layout(LayoutFrame {
            chunk_pages: 1,
            regions: WireList::Slice(&regions),
        });
        let runs = [PageRun {
            start: PageIndex(1),
            count: 1,
        }];
        let end = Frame::EndOfRound(EndOfRound {
            round: Round(0),
            frames: 0,
            pages: 0,
        });
        let late = Frame::Pages(PageFrame {
            codec: CodecId::ZERO,
            region: RegionId(0),
            round: Round(1),
            data_runs: WireList::Slice(&[]),
            zero_runs: WireList::Slice(&runs),
            uniform_runs: WireList::Slice(&[]),
            lengths: None,
            crc: None,
            payload: &[],
        });
        let complete = Frame::Complete(Complete {
            final_round: Round(0),
            sections: 0,
        });
        let mut input = vec![0, 1];
        for (ch, f) in [
            (0, &layout),
            (1, &layout),
            (0, &end),
            (1, &end),
            (1, &late),
            (0, &complete),
        ] {
            input.push(ch);
            input.extend_from_slice(&encoded(f));
        }
        let out = session_run(&input);
        assert_eq!(out.applied, [0, 1]);
        assert_eq!(out.completed, None, "{out:?}");
    }

    #[test]
    fn short_and_empty_inputs_do_nothing() {
        for input in [&[][..], &[0], &[1], &[2, 3], &[0, 0, 0x11]] {
            session(input);
        }
    }
}
