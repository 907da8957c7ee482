use super::*;
use crate::copy::{CopyFrame, CopyRun};
use crate::frame::{
    Abort, Ack, Commit, Complete, DeviceState, EndOfRound, Frame, LayoutFrame, PageFrame,
};
use crate::ids::{
    AbortReason, AckKind, ChannelId, CodecId, FrameType, GuestAddr, PageIndex, RegionId, Round,
};
use crate::wire::{PageRun, RegionDesc, UniformRun, WireList};

mod round_end;

const PS: u32 = 4096;

fn regions() -> [RegionDesc; 2] {
    [
        RegionDesc {
            id: RegionId(0),
            backing_page_size: PS,
            guest_addr: GuestAddr(0),
            length: 1024 * u64::from(PS),
        },
        RegionDesc {
            id: RegionId(1),
            backing_page_size: PS,
            guest_addr: GuestAddr(1 << 32),
            length: 256 * u64::from(PS),
        },
    ]
}

fn run(start: u64, count: u32) -> PageRun {
    PageRun {
        start: PageIndex(start),
        count,
    }
}

fn zero_frame<'a>(region: u32, round: u32, runs: &'a [PageRun]) -> Frame<'a> {
    Frame::Pages(PageFrame {
        codec: CodecId::ZERO,
        region: RegionId(region),
        round: Round(round),
        data_runs: WireList::Slice(&[]),
        zero_runs: WireList::Slice(runs),
        uniform_runs: WireList::Slice(&[]),
        lengths: None,
        crc: None,
        payload: &[],
    })
}

fn cr(start: u64, count: u32, from: u64) -> CopyRun {
    CopyRun {
        start: PageIndex(start),
        count,
        from: PageIndex(from),
    }
}

fn copy_frame<'a>(region: u32, round: u32, runs: &'a [CopyRun]) -> Frame<'a> {
    Frame::Copy(CopyFrame {
        region: RegionId(region),
        round: Round(round),
        round_end: false,
        runs: WireList::Slice(runs),
        crc: None,
    })
}

/// A session of `n` channels with the layout accepted on every channel.
fn open(n: u16, chunk: u32) -> (DestinationSession, Vec<DestinationChannel>) {
    let mut s = DestinationSession::new(n, PS, DestinationLimits::default()).unwrap();
    let regions = regions();
    let layout = Frame::Layout(LayoutFrame {
        chunk_pages: chunk,
        regions: WireList::Slice(&regions),
    });
    let mut chans = Vec::new();
    for c in 0..n {
        let mut ch = s.channel(ChannelId(c)).unwrap();
        match ch.on_frame(&layout).unwrap() {
            DestinationEvent::Layout(l) => {
                assert_eq!(s.on_layout(l).unwrap(), c == 0);
            }
            e => panic!("{e:?}"),
        }
        ch.set_layout(&s).unwrap();
        chans.push(ch);
    }
    (s, chans)
}

#[test]
fn affinity_maps_chunks_round_robin_with_the_region_offset() {
    let a = Affinity::new(3, 4).unwrap();
    assert_eq!(a.channel(RegionId(0), 0), ChannelId(0));
    assert_eq!(a.channel(RegionId(0), 4), ChannelId(1));
    assert_eq!(a.channel(RegionId(1), 0), ChannelId(1));
    assert_eq!(a.channel(RegionId(0), 12), ChannelId(0));
    for region in 0..3 {
        for ch in 0..3 {
            for page in 0..50 {
                let next = a.next_on(RegionId(region), ChannelId(ch), page);
                assert!(next >= page);
                assert_eq!(a.channel(RegionId(region), next), ChannelId(ch));
                for p in page..next {
                    assert_ne!(a.channel(RegionId(region), p), ChannelId(ch));
                }
            }
        }
    }
    assert!(a.check_run(RegionId(0), ChannelId(1), run(4, 4)).is_ok());
    assert_eq!(
        a.check_run(RegionId(0), ChannelId(1), run(4, 5)),
        Err(SessionError::WrongChannel {
            region: RegionId(0),
            page: 8,
            channel: ChannelId(1),
            owner: ChannelId(2),
        })
    );
    // A huge run is refused after a bounded number of chunks.
    assert!(matches!(
        a.check_run(RegionId(0), ChannelId(0), run(0, u32::MAX)),
        Err(SessionError::WrongChannel { page: 4, .. })
    ));
    assert!(Affinity::new(0, 1).is_none() && Affinity::new(1, 0).is_none());
}

#[test]
fn a_page_on_the_wrong_channel_is_refused_before_it_is_applied() {
    let (_, mut ch) = open(2, 8);
    let good = [run(8, 8)];
    let f = zero_frame(0, 0, &good);
    let Frame::Pages(p) = &f else { unreachable!() };
    assert!(ch[1].check_pages(p).is_ok());
    assert!(matches!(
        ch[0].check_pages(p),
        Err(SessionError::WrongChannel {
            page: 8,
            owner: ChannelId(1),
            ..
        })
    ));
    assert!(matches!(
        ch[0].on_frame(&f),
        Err(SessionError::WrongChannel { .. })
    ));
    assert!(matches!(ch[1].on_frame(&f), Ok(DestinationEvent::Apply(_))));
}

#[test]
fn uniform_pages_obey_affinity_bounds_and_counts() {
    let (_, mut ch) = open(2, 8);
    let mine = [run(8, 2)];
    let uniform = |start, count| {
        [UniformRun {
            run: run(start, count),
            byte: 0xcc,
        }]
    };
    fn frame<'a>(zeros: &'a [PageRun], u: &'a [UniformRun]) -> PageFrame<'a> {
        PageFrame {
            codec: CodecId::ZERO,
            region: RegionId(0),
            round: Round(0),
            data_runs: WireList::Slice(&[]),
            zero_runs: WireList::Slice(zeros),
            uniform_runs: WireList::Slice(u),
            lengths: None,
            crc: None,
            payload: &[],
        }
    }
    // A uniform page of channel 0's chunk on channel 1.
    let theirs = uniform(3, 1);
    assert!(matches!(
        ch[1].check_pages(&frame(&mine, &theirs)),
        Err(SessionError::WrongChannel {
            page: 3,
            owner: ChannelId(0),
            ..
        })
    ));
    // Past the region's 1024 pages.
    let outside = uniform(1030, 1);
    assert!(matches!(
        ch[1].check_pages(&frame(&mine, &outside)),
        Err(SessionError::PagesOutsideLayout(
            crate::DecodeError::PageOutOfRange { .. }
        ))
    ));
    // Accepted: END_OF_ROUND must count the uniform pages too.
    let ok = uniform(12, 3);
    let f = Frame::Pages(frame(&mine, &ok));
    assert!(matches!(ch[1].on_frame(&f), Ok(DestinationEvent::Apply(_))));
    let short = Frame::EndOfRound(EndOfRound {
        round: Round(0),
        frames: 1,
        pages: 2,
    });
    assert!(matches!(
        ch[1].on_frame(&short),
        Err(SessionError::CountMismatch { .. })
    ));
}

#[test]
fn layout_comes_first_and_extension_frames_are_skipped_anywhere() {
    let mut s = DestinationSession::new(1, PS, DestinationLimits::default()).unwrap();
    let mut ch = s.channel(ChannelId(0)).unwrap();
    let ext = Frame::Extension {
        frame_type: FrameType(0x90),
        flags: 0,
        body: b"x",
    };
    assert!(matches!(ch.on_frame(&ext), Ok(DestinationEvent::Skip)));
    let runs = [run(0, 1)];
    assert_eq!(
        ch.on_frame(&zero_frame(0, 0, &runs)).err(),
        Some(SessionError::LayoutMissing(FrameType::PAGES))
    );
    let (_, mut ch) = open(1, 8);
    assert!(matches!(
        ch[0].on_frame(&zero_frame(0, 0, &runs)),
        Ok(DestinationEvent::Apply(_))
    ));
    assert!(matches!(ch[0].on_frame(&ext), Ok(DestinationEvent::Skip)));
    let _ = &mut s;
}

#[test]
fn a_layout_over_the_limits_or_different_is_refused() {
    let limits = DestinationLimits {
        max_guest_bytes: 1 << 20,
        ..DestinationLimits::default()
    };
    let mut s = DestinationSession::new(1, PS, limits).unwrap();
    let regions = regions();
    let l = LayoutFrame {
        chunk_pages: 1,
        regions: WireList::Slice(&regions),
    };
    assert!(matches!(
        s.on_layout(&l),
        Err(SessionError::LimitExceeded {
            limit: Limit::GuestBytes,
            ..
        })
    ));
    let limits = DestinationLimits {
        max_regions: 1,
        ..DestinationLimits::default()
    };
    let mut s = DestinationSession::new(1, PS, limits).unwrap();
    assert!(matches!(
        s.on_layout(&l),
        Err(SessionError::LimitExceeded {
            limit: Limit::Regions,
            value: 2,
            max: 1
        })
    ));
    let mut s = DestinationSession::new(1, PS, DestinationLimits::default()).unwrap();
    assert_eq!(s.on_layout(&l), Ok(true));
    assert_eq!(s.on_layout(&l), Ok(false));
    let other = LayoutFrame {
        chunk_pages: 2,
        ..l
    };
    assert_eq!(s.on_layout(&other), Err(SessionError::LayoutDiffers));
    assert!(matches!(
        DestinationSession::new(65535, PS, DestinationLimits::default()),
        Err(SessionError::LimitExceeded {
            limit: Limit::Channels,
            ..
        })
    ));
}

#[test]
fn rounds_are_counted_and_ordered() {
    let (_, mut ch) = open(1, 8);
    let c = &mut ch[0];
    let a = [run(0, 3)];
    let b = [run(10, 2)];
    c.on_frame(&zero_frame(0, 1, &a)).unwrap();
    c.on_frame(&zero_frame(1, 1, &b)).unwrap();
    assert!(matches!(
        c.on_frame(&zero_frame(0, 2, &a)),
        Err(SessionError::RoundMismatch { .. })
    ));
    let lost = Frame::EndOfRound(EndOfRound {
        round: Round(1),
        frames: 3,
        pages: 5,
    });
    assert!(matches!(
        c.clone().on_frame(&lost),
        Err(SessionError::CountMismatch { got_frames: 2, .. })
    ));
    let end = Frame::EndOfRound(EndOfRound {
        round: Round(1),
        frames: 2,
        pages: 5,
    });
    assert!(matches!(
        c.on_frame(&end),
        Ok(DestinationEvent::AckRound(Round(1)))
    ));
    assert!(matches!(
        c.on_frame(&zero_frame(0, 1, &a)),
        Err(SessionError::RoundEnded { .. })
    ));
    assert!(matches!(
        c.on_frame(&end),
        Err(SessionError::EndOfRoundOutOfOrder { .. })
    ));
}

#[test]
fn device_state_is_reassembled_within_bounds() {
    let limits = DestinationLimits {
        max_device_bytes: 10,
        max_device_sections: 2,
        ..DestinationLimits::default()
    };
    let mut s = DestinationSession::new(2, PS, limits).unwrap();
    let chunk = |name, total, offset, data| DeviceState {
        instance: 0,
        name,
        total,
        offset,
        data,
    };
    assert_eq!(
        s.on_device_state(ChannelId(0), &chunk("a", 4, 0, b"ab")),
        Ok(None)
    );
    assert!(matches!(
        s.on_device_state(ChannelId(1), &chunk("a", 4, 2, b"cd")),
        Err(SessionError::SectionChannel { .. })
    ));
    assert_eq!(
        s.on_device_state(ChannelId(0), &chunk("a", 4, 3, b"d")),
        Err(SessionError::DeviceStateOutOfOrder {
            instance: 0,
            offset: 3,
            have: 2
        })
    );
    assert_eq!(
        s.on_device_state(ChannelId(0), &chunk("a", 5, 2, b"cd")),
        Err(SessionError::DeviceStateTotalChanged {
            instance: 0,
            total: 5,
            first: 4
        })
    );
    assert_eq!(
        s.on_device_state(ChannelId(0), &chunk("b", 4, 1, b"d")),
        Err(SessionError::DeviceStateOutOfOrder {
            instance: 0,
            offset: 1,
            have: 0
        })
    );
    let done = s
        .on_device_state(ChannelId(0), &chunk("a", 4, 2, b"cd"))
        .unwrap()
        .unwrap();
    assert_eq!(done.data, b"abcd");
    assert!(matches!(
        s.on_device_state(ChannelId(0), &chunk("a", 0, 0, b"")),
        Err(SessionError::DuplicateSection { .. })
    ));
    // Announced totals count against the byte limit before data arrives.
    assert!(matches!(
        s.on_device_state(ChannelId(1), &chunk("big", 7, 0, b"")),
        Err(SessionError::LimitExceeded {
            limit: Limit::DeviceBytes,
            ..
        })
    ));
    assert!(
        s.on_device_state(ChannelId(1), &chunk("b", 0, 0, b""))
            .unwrap()
            .is_some()
    );
    assert!(matches!(
        s.on_device_state(ChannelId(1), &chunk("c", 0, 0, b"")),
        Err(SessionError::LimitExceeded {
            limit: Limit::DeviceSections,
            ..
        })
    ));
}

/// A section arriving in chunks is held in exactly its announced total: growth by
/// doubling would have allocated 4000 bytes for these 3000 (and up to twice the limit).
#[test]
fn a_device_state_section_is_allocated_at_its_announced_total() {
    let mut s = DestinationSession::new(1, PS, DestinationLimits::default()).unwrap();
    let bytes = vec![7u8; 3000];
    let mut done = None;
    for (i, part) in bytes.chunks(1000).enumerate() {
        let d = DeviceState {
            instance: 0,
            name: "ram-adjacent",
            total: 3000,
            offset: 1000 * i as u64,
            data: part,
        };
        done = s.on_device_state(ChannelId(0), &d).unwrap();
    }
    let done = done.expect("the section completed");
    assert_eq!(done.data, bytes);
    assert_eq!(done.data.capacity(), 3000);
}

#[test]
fn complete_waits_for_every_channel_and_checks_sections() {
    let (mut s, mut ch) = open(2, 8);
    let end = |r| {
        Frame::EndOfRound(EndOfRound {
            round: Round(r),
            frames: 0,
            pages: 0,
        })
    };
    let complete = Frame::Complete(Complete {
        final_round: Round(0),
        sections: 0,
    });
    assert!(matches!(
        ch[0].clone().on_frame(&complete),
        Err(SessionError::CompleteEarly { .. })
    ));
    assert!(matches!(
        ch[1].clone().on_frame(&complete),
        Err(SessionError::CompleteChannel(ChannelId(1)))
    ));
    ch[0].on_frame(&end(0)).unwrap();
    s.on_round_ended(ChannelId(0), Round(0)).unwrap();
    let DestinationEvent::Complete(c) = ch[0].on_frame(&complete).unwrap() else {
        panic!()
    };
    let bad = Complete { sections: 1, ..*c };
    // A section announced but not yet arrived (another channel's stream) is waited for.
    let mut s2 = DestinationSession::new(2, PS, DestinationLimits::default()).unwrap();
    s2.on_round_ended(ChannelId(0), Round(0)).unwrap();
    s2.on_round_ended(ChannelId(1), Round(0)).unwrap();
    assert_eq!(s2.on_complete(&bad), Ok(CompleteProgress::Waiting));
    let section = DeviceState {
        instance: 1,
        name: "cpu",
        total: 1,
        offset: 0,
        data: b"x",
    };
    s2.on_device_state(ChannelId(1), &section).unwrap();
    assert_eq!(s2.completed(), Some(Round(0)));
    // What only channel 0 could still send is refused at once: channel 0 carries
    // nothing but COMMIT after COMPLETE.
    let mut alone = DestinationSession::new(1, PS, DestinationLimits::default()).unwrap();
    alone.on_round_ended(ChannelId(0), Round(0)).unwrap();
    assert!(matches!(
        alone.on_complete(&bad),
        Err(SessionError::CompleteEarly { .. })
    ));
    let mut unfinished = DestinationSession::new(2, PS, DestinationLimits::default()).unwrap();
    unfinished.on_round_ended(ChannelId(0), Round(0)).unwrap();
    let first_half = DeviceState {
        total: 2,
        ..section
    };
    assert_eq!(
        unfinished.on_device_state(ChannelId(0), &first_half),
        Ok(None)
    );
    assert!(matches!(
        unfinished.on_complete(&bad),
        Err(SessionError::CompleteEarly { .. })
    ));
    // More sections than announced fail.
    let mut s3 = DestinationSession::new(1, PS, DestinationLimits::default()).unwrap();
    s3.on_device_state(ChannelId(0), &section).unwrap();
    assert!(matches!(
        s3.on_complete(c),
        Err(SessionError::SectionCount {
            announced: 0,
            received: 1
        })
    ));
    assert_eq!(s.on_complete(c), Ok(CompleteProgress::Waiting));
    assert_eq!(s.completed(), None);
    ch[1].on_frame(&end(0)).unwrap();
    assert_eq!(
        s.on_round_ended(ChannelId(1), Round(0)),
        Ok(Some(CompleteProgress::Done(Round(0))))
    );
    assert_eq!(s.completed(), Some(Round(0)));
    let runs = [run(0, 1)];
    assert!(matches!(
        ch[0].on_frame(&zero_frame(0, 1, &runs)),
        Err(SessionError::AfterComplete(_))
    ));
}

#[test]
fn peer_abort_is_an_error_on_both_sides() {
    let abort = Frame::Abort(Abort {
        reason: AbortReason::CANCELLED,
        message: "bye",
    });
    let (_, mut ch) = open(1, 8);
    assert_eq!(
        ch[0].on_frame(&abort).err(),
        Some(SessionError::PeerAborted(AbortReason::CANCELLED))
    );
    let mut src = SourceChannel::new(ChannelId(0), Affinity::new(1, 8).unwrap()).unwrap();
    assert_eq!(
        src.on_frame(&abort).err(),
        Some(SessionError::PeerAborted(AbortReason::CANCELLED))
    );
}

#[test]
fn the_source_checks_its_own_frames_and_the_acks() {
    let a = Affinity::new(2, 8).unwrap();
    let mut src = SourceChannel::new(ChannelId(0), a).unwrap();
    let runs = [run(0, 8)];
    let Frame::Pages(p) = zero_frame(0, 0, &runs) else {
        unreachable!()
    };
    assert!(matches!(src.on_send_pages(&p), Err(SessionError::Local(_))));
    src.on_send_layout();
    src.on_send_pages(&p).unwrap();
    let theirs = [run(8, 1)];
    let Frame::Pages(q) = zero_frame(0, 0, &theirs) else {
        unreachable!()
    };
    assert!(matches!(
        src.on_send_pages(&q),
        Err(SessionError::WrongChannel { .. })
    ));
    let ack = |kind, value| Frame::Ack(Ack { kind, value });
    assert!(matches!(
        src.on_frame(&ack(AckKind::ROUND, 0)),
        Err(SessionError::BadAck { .. })
    ));
    let e = src.end_round(Round(0)).unwrap();
    assert_eq!((e.frames, e.pages), (1, 8));
    assert_eq!(
        src.on_frame(&ack(AckKind::ROUND, 0)),
        Ok(SourceEvent::RoundApplied(Round(0)))
    );
    assert!(src.on_frame(&ack(AckKind::ROUND, 0)).is_err());
    assert!(src.on_frame(&ack(AckKind::COMPLETE, 0)).is_err());
    let ext = Frame::Extension {
        frame_type: FrameType(0xa0),
        flags: 0,
        body: &[],
    };
    assert_eq!(src.on_frame(&ext), Ok(SourceEvent::Skip));
    src.complete(Round(0), 0).unwrap();
    assert_eq!(
        src.on_frame(&ack(AckKind::COMPLETE, 0)),
        Ok(SourceEvent::Complete(Round(0)))
    );
    let mut other = SourceChannel::new(ChannelId(1), a).unwrap();
    other.on_send_layout();
    other.end_round(Round(0)).unwrap();
    assert!(other.complete(Round(0), 0).is_err());
}

#[test]
fn pages_of_a_round_after_the_final_one_fail_completion() {
    let (mut s, mut ch) = open(2, 1);
    let end = Frame::EndOfRound(EndOfRound {
        round: Round(0),
        frames: 0,
        pages: 0,
    });
    for (i, c) in ch.iter_mut().enumerate() {
        c.on_frame(&end).unwrap();
        s.on_round_ended(ChannelId(i as u16), Round(0)).unwrap();
    }
    let runs = [run(1, 1)];
    assert!(matches!(
        ch[1].on_frame(&zero_frame(0, 1, &runs)),
        Ok(DestinationEvent::Apply(_))
    ));
    assert_eq!(ch[1].take_opened(), Some(Round(1)));
    assert_eq!(ch[1].take_opened(), None);
    s.on_round_opened(ChannelId(1), Round(1)).unwrap();
    let complete = Frame::Complete(Complete {
        final_round: Round(0),
        sections: 0,
    });
    let DestinationEvent::Complete(c) = ch[0].on_frame(&complete).unwrap() else {
        panic!()
    };
    assert_eq!(
        s.on_complete(c),
        Err(SessionError::RoundAfterFinal {
            round: Round(1),
            final_round: Round(0)
        })
    );
}

/// One channel that ended round 3 and took COMPLETE for it, verified by the session.
fn completed_session(n: u16) -> (DestinationSession, Vec<DestinationChannel>) {
    let (mut s, mut ch) = open(n, 8);
    let end = Frame::EndOfRound(EndOfRound {
        round: Round(3),
        frames: 0,
        pages: 0,
    });
    for (i, c) in ch.iter_mut().enumerate() {
        c.on_frame(&end).unwrap();
        s.on_round_ended(ChannelId(i as u16), Round(3)).unwrap();
    }
    let complete = Frame::Complete(Complete {
        final_round: Round(3),
        sections: 0,
    });
    let DestinationEvent::Complete(c) = ch[0].on_frame(&complete).unwrap() else {
        panic!()
    };
    assert_eq!(s.on_complete(c), Ok(CompleteProgress::Done(Round(3))));
    (s, ch)
}

fn commit(round: u32) -> Frame<'static> {
    Frame::Commit(Commit {
        final_round: Round(round),
    })
}

#[test]
fn the_destination_takes_commit_only_after_its_ack_complete() {
    let (mut s, mut ch) = completed_session(2);
    // Before ACK COMPLETE went out: refused, and the guest is not this side's.
    assert_eq!(
        ch[0].clone().on_frame(&commit(3)).err(),
        Some(SessionError::CommitEarly {
            final_round: Round(3)
        })
    );
    assert_eq!(
        s.on_commit(&Commit {
            final_round: Round(2)
        }),
        Err(SessionError::CommitMismatch {
            final_round: Round(3),
            commit: Round(2)
        })
    );
    // Only channel 0 answers COMPLETE and takes COMMIT.
    assert!(matches!(
        ch[1].ack_complete(&s),
        Err(SessionError::Local(_))
    ));
    assert_eq!(
        ch[1].on_frame(&commit(3)).err(),
        Some(SessionError::CommitChannel(ChannelId(1)))
    );
    assert_eq!(
        ch[0].ack_complete(&s),
        Ok(Ack {
            kind: AckKind::COMPLETE,
            value: 3
        })
    );
    assert!(matches!(
        ch[0].ack_complete(&s),
        Err(SessionError::Local(_))
    ));
    assert_eq!(s.committed(), None, "ACK COMPLETE alone hands nothing over");
    assert_eq!(ch[0].awaiting_commit(), Some(Round(3)));
    assert_eq!(
        ch[0].clone().on_frame(&commit(4)).err(),
        Some(SessionError::CommitMismatch {
            final_round: Round(3),
            commit: Round(4)
        })
    );
    let frame = commit(3);
    let DestinationEvent::Commit(c) = ch[0].on_frame(&frame).unwrap() else {
        panic!()
    };
    assert_eq!(ch[0].committed(), Some(Round(3)));
    assert_eq!(ch[0].awaiting_commit(), None);
    assert_eq!(
        s.on_commit(c),
        Ok(Ack {
            kind: AckKind::COMMITTED,
            value: 3
        })
    );
    assert_eq!(s.committed(), Some(Round(3)));
    assert_eq!(
        s.on_commit(c),
        Err(SessionError::AfterCommit(FrameType::COMMIT))
    );
    // After COMMIT: a second one and every other frame but ABORT and extension frames
    // are refused; ABORT changes nothing the session already decided.
    assert_eq!(
        ch[0].on_frame(&commit(3)).err(),
        Some(SessionError::AfterCommit(FrameType::COMMIT))
    );
    let runs = [run(0, 1)];
    assert_eq!(
        ch[0].on_frame(&zero_frame(0, 4, &runs)).err(),
        Some(SessionError::AfterCommit(FrameType::PAGES))
    );
    let ext = Frame::Extension {
        frame_type: FrameType(0x85),
        flags: 0,
        body: &[],
    };
    assert!(matches!(ch[0].on_frame(&ext), Ok(DestinationEvent::Skip)));
    let abort = Frame::Abort(Abort {
        reason: AbortReason::CANCELLED,
        message: "",
    });
    assert!(matches!(
        ch[0].on_frame(&abort),
        Err(SessionError::PeerAborted(_))
    ));
    assert_eq!(s.committed(), Some(Round(3)));
}

#[test]
fn ack_complete_waits_for_the_session_to_verify_complete() {
    let (mut s, mut ch) = open(2, 8);
    let end = Frame::EndOfRound(EndOfRound {
        round: Round(0),
        frames: 0,
        pages: 0,
    });
    ch[0].on_frame(&end).unwrap();
    s.on_round_ended(ChannelId(0), Round(0)).unwrap();
    assert!(matches!(
        ch[0].ack_complete(&s),
        Err(SessionError::Local(_))
    ));
    let complete = Frame::Complete(Complete {
        final_round: Round(0),
        sections: 0,
    });
    let DestinationEvent::Complete(c) = ch[0].on_frame(&complete).unwrap() else {
        panic!()
    };
    assert_eq!(s.on_complete(c), Ok(CompleteProgress::Waiting));
    // Channel 1 has not ended the round: no ACK COMPLETE, so no COMMIT either.
    assert!(matches!(
        ch[0].ack_complete(&s),
        Err(SessionError::Local(_))
    ));
    assert_eq!(
        ch[0].clone().on_frame(&commit(0)).err(),
        Some(SessionError::CommitEarly {
            final_round: Round(0)
        })
    );
    ch[1].on_frame(&end).unwrap();
    s.on_round_ended(ChannelId(1), Round(0)).unwrap();
    assert!(ch[0].ack_complete(&s).is_ok());
    assert!(matches!(
        ch[0].on_frame(&commit(0)),
        Ok(DestinationEvent::Commit(_))
    ));
}

#[test]
fn the_source_commits_after_ack_complete_and_checks_ack_committed() {
    let mut src = SourceChannel::new(ChannelId(0), Affinity::new(1, 8).unwrap()).unwrap();
    let ack = |kind, value| Frame::Ack(Ack { kind, value });
    src.on_send_layout();
    src.end_round(Round(2)).unwrap();
    src.complete(Round(2), 0).unwrap();
    assert!(matches!(src.commit(), Err(SessionError::Local(_))));
    assert!(matches!(
        src.on_frame(&ack(AckKind::COMMITTED, 2)),
        Err(SessionError::BadAck { .. })
    ));
    assert_eq!(
        src.on_frame(&ack(AckKind::COMPLETE, 2)),
        Ok(SourceEvent::Complete(Round(2)))
    );
    assert_eq!(src.commit_sent(), None);
    assert_eq!(
        src.commit(),
        Ok(Commit {
            final_round: Round(2)
        })
    );
    assert_eq!(src.commit_sent(), Some(Round(2)));
    assert!(matches!(src.commit(), Err(SessionError::Local(_))));
    assert!(matches!(
        src.on_frame(&ack(AckKind::COMMITTED, 1)),
        Err(SessionError::BadAck { .. })
    ));
    assert_eq!(src.committed(), None);
    assert_eq!(
        src.on_frame(&ack(AckKind::COMMITTED, 2)),
        Ok(SourceEvent::Committed(Round(2)))
    );
    assert_eq!(src.committed(), Some(Round(2)));
    assert!(matches!(
        src.on_frame(&ack(AckKind::COMMITTED, 2)),
        Err(SessionError::BadAck { .. })
    ));
    assert!(SourceChannel::sends(FrameType::COMMIT));
}

/// Two channels, chunks of 8: channel 0 owns pages 0..8 and 16..24 of region 0, channel
/// 1 pages 8..16 and 24..32; region 0 has 1024 pages, region 1 256.
#[test]
fn a_copy_with_a_source_or_target_of_another_channel_is_refused_before_it_is_applied() {
    let (_, mut ch) = open(2, 8);
    let wrong = |page, channel, owner| SessionError::WrongChannel {
        region: RegionId(0),
        page,
        channel: ChannelId(channel),
        owner: ChannelId(owner),
    };
    // Targets 8..10 and 24 from 12..14 and 30: all channel 1's.
    let good = [cr(8, 2, 12), cr(24, 1, 30)];
    let f = copy_frame(0, 0, &good);
    let Frame::Copy(c) = &f else { unreachable!() };
    assert_eq!(ch[1].check_copy(c), Ok(()));
    assert_eq!(ch[0].check_copy(c), Err(wrong(8, 0, 1)));
    // The source page 17 is channel 0's, although every target is channel 1's.
    let source_elsewhere = [cr(8, 2, 12), cr(24, 1, 17)];
    // The target page 16 is channel 0's, although every source is channel 1's.
    let target_elsewhere = [cr(8, 2, 12), cr(16, 1, 30)];
    // A source run that starts on channel 1's chunk and crosses into channel 0's.
    let source_across = [cr(24, 4, 14)];
    for (runs, err) in [
        (&source_elsewhere[..], wrong(17, 1, 0)),
        (&target_elsewhere[..], wrong(16, 1, 0)),
        (&source_across[..], wrong(16, 1, 0)),
    ] {
        let mut c1 = ch[1].clone();
        assert_eq!(c1.on_frame(&copy_frame(0, 0, runs)).err(), Some(err));
        // Refused before anything: no round opened, nothing counted.
        assert_eq!(c1.take_opened(), None);
        let nothing = Frame::EndOfRound(EndOfRound {
            round: Round(0),
            frames: 0,
            pages: 0,
        });
        assert!(matches!(
            c1.on_frame(&nothing),
            Ok(DestinationEvent::AckRound(_))
        ));
    }
    assert!(matches!(ch[1].on_frame(&f), Ok(DestinationEvent::Copy(_))));
}

#[test]
fn copy_sources_and_targets_must_lie_inside_the_region() {
    let (_, ch) = open(1, 8);
    let check = |region, runs: &[CopyRun]| {
        let f = copy_frame(region, 0, runs);
        let Frame::Copy(c) = f else { unreachable!() };
        ch[0].check_copy(&c)
    };
    assert_eq!(check(0, &[cr(1020, 4, 0)]), Ok(()));
    assert_eq!(check(0, &[cr(0, 4, 1020)]), Ok(()));
    // A source past region 0's 1024 pages; a target past them.
    for runs in [&[cr(0, 1, 1024)][..], &[cr(0, 5, 1020)], &[cr(1021, 4, 0)]] {
        assert!(
            matches!(
                check(0, runs),
                Err(SessionError::PagesOutsideLayout(
                    crate::DecodeError::PageOutOfRange { pages: 1024, .. }
                ))
            ),
            "{runs:?}"
        );
    }
    // Region 1 is shorter: a source that fits region 0 does not fit it.
    assert!(matches!(
        check(1, &[cr(0, 1, 300)]),
        Err(SessionError::PagesOutsideLayout(
            crate::DecodeError::PageOutOfRange {
                end: 301,
                pages: 256,
                ..
            }
        ))
    ));
    assert_eq!(
        check(7, &[cr(0, 1, 3)]),
        Err(SessionError::PagesOutsideLayout(
            crate::DecodeError::UnknownRegion(RegionId(7))
        ))
    );
    // Before LAYOUT.
    let s = DestinationSession::new(1, PS, DestinationLimits::default()).unwrap();
    let mut fresh = s.channel(ChannelId(0)).unwrap();
    let runs = [cr(0, 1, 3)];
    assert_eq!(
        fresh.on_frame(&copy_frame(0, 0, &runs)).err(),
        Some(SessionError::LayoutMissing(FrameType::COPY))
    );
}

#[test]
fn copy_frames_follow_the_round_rules_and_end_of_round_counts_them() {
    let (_, mut ch) = open(1, 8);
    let c = &mut ch[0];
    let zeros = [run(0, 3)];
    let copies = [cr(10, 2, 0), cr(12, 1, 0)];
    // A COPY opens a round as PAGES does.
    assert!(matches!(
        c.on_frame(&copy_frame(0, 1, &copies)),
        Ok(DestinationEvent::Copy(_))
    ));
    assert_eq!(c.take_opened(), Some(Round(1)));
    c.on_frame(&zero_frame(0, 1, &zeros)).unwrap();
    assert_eq!(c.take_opened(), None);
    // Another round while round 1 is open.
    assert_eq!(
        c.clone().on_frame(&copy_frame(0, 2, &copies)).err(),
        Some(SessionError::RoundMismatch {
            round: Round(2),
            open: Round(1)
        })
    );
    c.on_frame(&copy_frame(1, 1, &copies)).unwrap();
    // Counts without the COPY frames fail: 3 frames of 3 + 3 + 3 pages.
    for (frames, pages) in [(1, 3), (3, 6), (2, 9)] {
        let short = Frame::EndOfRound(EndOfRound {
            round: Round(1),
            frames,
            pages,
        });
        assert!(matches!(
            c.clone().on_frame(&short),
            Err(SessionError::CountMismatch {
                got_frames: 3,
                got_pages: 9,
                ..
            })
        ));
    }
    let end = Frame::EndOfRound(EndOfRound {
        round: Round(1),
        frames: 3,
        pages: 9,
    });
    assert!(matches!(
        c.on_frame(&end),
        Ok(DestinationEvent::AckRound(Round(1)))
    ));
    assert_eq!(
        c.on_frame(&copy_frame(0, 1, &copies)).err(),
        Some(SessionError::RoundEnded { round: Round(1) })
    );
}

#[test]
fn copy_frames_are_refused_after_complete_and_after_commit() {
    let (s, mut ch) = completed_session(2);
    let runs = [cr(0, 1, 3)];
    // Another channel, once told the session completed.
    ch[1].finish();
    assert_eq!(
        ch[1].on_frame(&copy_frame(0, 4, &runs)).err(),
        Some(SessionError::AfterComplete(FrameType::COPY))
    );
    assert_eq!(
        ch[0].clone().on_frame(&copy_frame(0, 4, &runs)).err(),
        Some(SessionError::AfterComplete(FrameType::COPY))
    );
    ch[0].ack_complete(&s).unwrap();
    ch[0].on_frame(&commit(3)).unwrap();
    assert_eq!(
        ch[0].on_frame(&copy_frame(0, 4, &runs)).err(),
        Some(SessionError::AfterCommit(FrameType::COPY))
    );
}

#[test]
fn the_source_checks_and_counts_its_copy_frames_and_their_acks() {
    let a = Affinity::new(2, 8).unwrap();
    let mut src = SourceChannel::new(ChannelId(0), a).unwrap();
    assert!(SourceChannel::sends(FrameType::COPY));
    let copies = [cr(4, 2, 0), cr(16, 4, 0)];
    let Frame::Copy(c) = copy_frame(0, 0, &copies) else {
        unreachable!()
    };
    assert!(matches!(src.on_send_copy(&c), Err(SessionError::Local(_))));
    src.on_send_layout();
    // A source page and a target page of channel 1.
    for runs in [&[cr(1, 2, 8)][..], &[cr(8, 1, 0)]] {
        let Frame::Copy(bad) = copy_frame(0, 0, runs) else {
            unreachable!()
        };
        assert!(matches!(
            src.clone().on_send_copy(&bad),
            Err(SessionError::WrongChannel {
                page: 8,
                owner: ChannelId(1),
                ..
            })
        ));
    }
    let zeros = [run(0, 1)];
    let Frame::Pages(p) = zero_frame(0, 0, &zeros) else {
        unreachable!()
    };
    src.on_send_pages(&p).unwrap();
    src.on_send_copy(&c).unwrap();
    // Another round while round 0 is open.
    let Frame::Copy(later) = copy_frame(0, 1, &copies) else {
        unreachable!()
    };
    assert!(matches!(
        src.clone().on_send_copy(&later),
        Err(SessionError::Local(_))
    ));
    // ACK FRAMES counts the COPY frame: 2 frames sent.
    let ack = |kind, value| Frame::Ack(Ack { kind, value });
    assert_eq!(
        src.on_frame(&ack(AckKind::FRAMES, 2)),
        Ok(SourceEvent::FramesApplied(2))
    );
    assert!(matches!(
        src.clone().on_frame(&ack(AckKind::FRAMES, 3)),
        Err(SessionError::BadAck { .. })
    ));
    let e = src.end_round(Round(0)).unwrap();
    assert_eq!((e.frames, e.pages), (2, 7));
    // A COPY of an ended round, and after COMPLETE.
    assert!(matches!(src.on_send_copy(&c), Err(SessionError::Local(_))));
    src.on_send_copy(&later).unwrap();
    assert!(matches!(
        src.on_frame(&ack(AckKind::FRAMES, 3)),
        Ok(SourceEvent::FramesApplied(3))
    ));
    assert_eq!(src.end_round(Round(1)).unwrap().frames, 1);
    src.complete(Round(1), 0).unwrap();
    let Frame::Copy(after) = copy_frame(0, 2, &copies) else {
        unreachable!()
    };
    assert!(matches!(
        src.on_send_copy(&after),
        Err(SessionError::Local(_))
    ));
}
