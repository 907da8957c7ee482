//! ROUND_END COPY frames (`PROTOCOL.md`, "COPY"): sources of any channel, targets of the
//! receiving one, at most the layout's pages that channel carries as targets in a round
//! on a channel.

use super::*;

fn late_frame<'a>(region: u32, round: u32, runs: &'a [CopyRun]) -> Frame<'a> {
    Frame::Copy(CopyFrame {
        region: RegionId(region),
        round: Round(round),
        round_end: true,
        runs: WireList::Slice(runs),
        crc: None,
    })
}

fn end(round: u32, frames: u32, pages: u64) -> Frame<'static> {
    Frame::EndOfRound(EndOfRound {
        round: Round(round),
        frames,
        pages,
    })
}

fn wrong(page: u64, channel: u16, owner: u16) -> SessionError {
    SessionError::WrongChannel {
        region: RegionId(0),
        page,
        channel: ChannelId(channel),
        owner: ChannelId(owner),
    }
}

/// Two channels, chunks of 8: channel 0 owns pages 0..8 and 16..24 of region 0, channel
/// 1 pages 8..16 and 24..32.
#[test]
fn a_round_end_copy_may_read_pages_of_another_channel() {
    let (_, mut ch) = open(2, 8);
    // Targets 8..10 and 24 (channel 1's) from 0..2 and 17 (channel 0's).
    let runs = [cr(8, 2, 0), cr(24, 1, 17)];
    let late = late_frame(0, 0, &runs);
    let Frame::Copy(c) = &late else {
        unreachable!()
    };
    assert_eq!(ch[1].check_copy(c), Ok(()));
    // The same frame without ROUND_END: its sources break the affinity.
    let plain = copy_frame(0, 0, &runs);
    assert_eq!(ch[1].clone().on_frame(&plain).err(), Some(wrong(0, 1, 0)));
    // Accepted, recorded, counted: it opens the round and END_OF_ROUND counts it.
    assert!(matches!(
        ch[1].on_frame(&late),
        Ok(DestinationEvent::RoundEndCopy(f)) if f.round_end && f.pages() == 3
    ));
    assert_eq!(ch[1].take_opened(), Some(Round(0)));
    assert!(matches!(
        ch[1].clone().on_frame(&end(0, 0, 0)),
        Err(SessionError::CountMismatch {
            got_frames: 1,
            got_pages: 3,
            ..
        })
    ));
    assert!(matches!(
        ch[1].on_frame(&end(0, 1, 3)),
        Ok(DestinationEvent::AckRound(Round(0)))
    ));
    // The round rules are those of any COPY.
    assert_eq!(
        ch[1].on_frame(&late).err(),
        Some(SessionError::RoundEnded { round: Round(0) })
    );
}

#[test]
fn a_round_end_copy_writes_only_pages_of_its_channel() {
    let (_, ch) = open(2, 8);
    // Target 16 is channel 0's; a target run that crosses from channel 1's chunk into
    // channel 0's.
    for (runs, page) in [
        (&[cr(8, 2, 0), cr(16, 1, 30)][..], 16),
        (&[cr(14, 3, 0)][..], 16),
    ] {
        for round_end in [false, true] {
            let f = Frame::Copy(CopyFrame {
                region: RegionId(0),
                round: Round(0),
                round_end,
                runs: WireList::Slice(runs),
                crc: None,
            });
            let mut c1 = ch[1].clone();
            assert_eq!(c1.on_frame(&f).err(), Some(wrong(page, 1, 0)), "{runs:?}");
            assert_eq!(c1.take_opened(), None, "refused before anything");
        }
    }
}

#[test]
fn round_end_sources_must_lie_inside_the_region() {
    let (_, mut ch) = open(2, 8);
    let check = |c: &DestinationChannel, region, runs: &[CopyRun]| {
        let Frame::Copy(f) = late_frame(region, 0, runs) else {
            unreachable!()
        };
        c.check_copy(&f)
    };
    // Region 0 has 1024 pages, region 1 256; target 8 is channel 1's in region 0, and
    // target 0 is channel 1's in region 1 (chunk 0 + region 1).
    assert_eq!(check(&ch[1], 0, &[cr(8, 1, 1023)]), Ok(()));
    for (region, runs, end, pages) in [
        (0, &[cr(8, 1, 1024)][..], 1024 + 1, 1024),
        (0, &[cr(8, 2, 1023)], 1025, 1024),
        (1, &[cr(0, 1, 300)], 301, 256),
    ] {
        assert_eq!(
            check(&ch[1], region, runs),
            Err(SessionError::PagesOutsideLayout(
                crate::DecodeError::PageOutOfRange {
                    region: RegionId(region),
                    end,
                    pages
                }
            )),
            "{runs:?}"
        );
    }
    assert_eq!(
        ch[1].on_frame(&late_frame(7, 0, &[cr(0, 1, 3)])).err(),
        Some(SessionError::PagesOutsideLayout(
            crate::DecodeError::UnknownRegion(RegionId(7))
        ))
    );
}

/// The layout has 1024 + 256 = 1280 pages, all on the one channel: its ROUND_END targets
/// in one round may total that much, not one page more; plain COPY frames do not count.
#[test]
fn round_end_targets_of_a_round_are_bounded_by_the_layout_pages() {
    let (_, mut ch) = open(1, 8);
    let c = &mut ch[0];
    let region0 = [[cr(0, 512, 512)], [cr(512, 512, 0)]];
    let region1 = [[cr(0, 128, 128)], [cr(128, 128, 0)]];
    let one = [cr(0, 1, 1)];
    let over = SessionError::LimitExceeded {
        limit: Limit::RoundEndPages,
        value: 1281,
        max: 1280,
    };
    for round in [0, 1] {
        for runs in &region0 {
            c.on_frame(&late_frame(0, round, runs)).unwrap();
        }
        for runs in &region1 {
            c.on_frame(&late_frame(1, round, runs)).unwrap();
        }
        assert_eq!(c.on_frame(&late_frame(0, round, &one)).err(), Some(over));
        // Refused before it was recorded or counted; a plain COPY is not bounded so.
        assert!(matches!(
            c.on_frame(&copy_frame(0, round, &one)),
            Ok(DestinationEvent::Copy(_))
        ));
        // A new round starts from 0.
        assert!(matches!(
            c.on_frame(&end(round, 5, 1281)),
            Ok(DestinationEvent::AckRound(_))
        ));
    }
    assert!(over.to_string().contains("1280"), "{over}");
}

/// Two channels, chunks of 8, regions of 1024 and 256 pages: each channel carries 512 +
/// 128 = 640 pages, so its ROUND_END targets in a round may total 640 (a source that
/// names no target twice never needs more), not the layout's 1280.
#[test]
fn round_end_targets_of_a_round_are_bounded_by_the_pages_the_channel_carries() {
    let (_, mut ch) = open(2, 8);
    for (c, own) in [(0usize, 0u64), (1, 8)] {
        // Pages own..own + 8 of region 0 are this channel's; the sources are the other
        // channel's, which a ROUND_END copy may read.
        let eight = [cr(own, 8, 8 - own)];
        for _ in 0..80 {
            assert!(matches!(
                ch[c].on_frame(&late_frame(0, 0, &eight)),
                Ok(DestinationEvent::RoundEndCopy(_))
            ));
        }
        let one = [cr(own, 1, 8 - own)];
        assert_eq!(
            ch[c].on_frame(&late_frame(0, 0, &one)).err(),
            Some(SessionError::LimitExceeded {
                limit: Limit::RoundEndPages,
                value: 641,
                max: 640,
            }),
            "channel {c}"
        );
    }
}

#[test]
fn the_session_says_which_rounds_every_channel_ended() {
    let (mut s, mut ch) = open(3, 8);
    assert_eq!(s.ended_everywhere(), None);
    for (c, round) in [(0, 1), (2, 0)] {
        let f = end(round, 0, 0);
        let Ok(DestinationEvent::AckRound(r)) = ch[c].on_frame(&f) else {
            panic!("END_OF_ROUND {round} on channel {c}")
        };
        s.on_round_ended(ChannelId(c as u16), r).unwrap();
    }
    // Channel 1 has ended no round yet.
    assert_eq!(s.ended_everywhere(), None);
    ch[1].on_frame(&end(2, 0, 0)).unwrap();
    s.on_round_ended(ChannelId(1), Round(2)).unwrap();
    assert_eq!(s.ended_everywhere(), Some(Round(0)));
}

#[test]
fn the_source_checks_round_end_targets_only_against_its_channel() {
    let a = Affinity::new(2, 8).unwrap();
    let mut src = SourceChannel::new(ChannelId(0), a).unwrap();
    src.on_send_layout();
    let from_elsewhere = [cr(0, 2, 8)];
    let Frame::Copy(late) = late_frame(0, 0, &from_elsewhere) else {
        unreachable!()
    };
    let Frame::Copy(plain) = copy_frame(0, 0, &from_elsewhere) else {
        unreachable!()
    };
    assert_eq!(
        src.clone().on_send_copy(&plain),
        Err(SessionError::WrongChannel {
            region: RegionId(0),
            page: 8,
            channel: ChannelId(0),
            owner: ChannelId(1),
        })
    );
    // A target of channel 1, with or without ROUND_END.
    let target_elsewhere = [cr(8, 1, 0)];
    let Frame::Copy(bad) = late_frame(0, 0, &target_elsewhere) else {
        unreachable!()
    };
    assert!(matches!(
        src.clone().on_send_copy(&bad),
        Err(SessionError::WrongChannel { page: 8, .. })
    ));
    src.on_send_copy(&late).unwrap();
    // Counted as any COPY: END_OF_ROUND and ACK FRAMES.
    assert_eq!(
        src.on_frame(&Frame::Ack(Ack {
            kind: AckKind::FRAMES,
            value: 1
        })),
        Ok(SourceEvent::FramesApplied(1))
    );
    let e = src.end_round(Round(0)).unwrap();
    assert_eq!((e.frames, e.pages), (1, 2));
}
