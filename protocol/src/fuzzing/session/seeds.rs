//! Seeds for the `session` fuzz target.

use crate::copy::{CopyFrame, CopyRun};
use crate::frame::{Ack, Commit, Complete, DeviceState, EndOfRound, Frame, LayoutFrame, PageFrame};
use crate::ids::{AckKind, CodecId, FrameType, GuestAddr, PageIndex, RegionId, Round};
use crate::wire::{PageRun, RegionDesc, WireList};

use super::{SESSION_PAGE, encoded};

/// Seeds for [`session`](super::session): destination-side frame streams (a complete
/// two-channel session, and one with a page on the wrong channel) and generated sessions
/// with and without faults.
pub fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn record(out: &mut Vec<u8>, ch: u8, frame: &Frame<'_>) {
        out.push(ch);
        out.extend_from_slice(&encoded(frame));
    }
    let regions = [
        RegionDesc {
            id: RegionId(0),
            backing_page_size: 4096,
            guest_addr: GuestAddr(0),
            length: 16 * SESSION_PAGE,
        },
        RegionDesc {
            id: RegionId(1),
            backing_page_size: 4096,
            guest_addr: GuestAddr(1 << 20),
            length: 8 * SESSION_PAGE,
        },
    ];
    let layout = Frame::Layout(LayoutFrame {
        chunk_pages: 4,
        regions: WireList::Slice(&regions),
    });
    let run = |start, count| PageRun {
        start: PageIndex(start),
        count,
    };
    // Two channels, chunks of 4 pages: region 0 pages 0..4 and region 1 pages 4..8 are
    // channel 0's; region 0 pages 4..8 and region 1 pages 0..4 are channel 1's.
    let ch0_zero = [run(1, 3)];
    let ch1_zero = [run(4, 2)];
    let ch1_region1 = [run(0, 4)];
    let data_page = [0u8; 4096];
    let data_run = [run(5, 1)];
    // Page 5 of region 0, raw (channel 1's).
    let raw_page = Frame::Pages(PageFrame {
        codec: CodecId::RAW,
        region: RegionId(0),
        round: Round(0),
        data_runs: WireList::Slice(&data_run),
        zero_runs: WireList::Slice(&[]),
        uniform_runs: WireList::Slice(&[]),
        lengths: None,
        crc: None,
        payload: &data_page,
    });
    let zero = |region, runs| {
        Frame::Pages(PageFrame {
            codec: CodecId::ZERO,
            region: RegionId(region),
            round: Round(0),
            data_runs: WireList::Slice(&[]),
            zero_runs: WireList::Slice(runs),
            uniform_runs: WireList::Slice(&[]),
            lengths: None,
            crc: None,
            payload: &[],
        })
    };
    let end = |frames, pages| {
        Frame::EndOfRound(EndOfRound {
            round: Round(0),
            frames,
            pages,
        })
    };
    let mut complete = vec![0, 1];
    record(
        &mut complete,
        1,
        &Frame::Extension {
            frame_type: FrameType(0x80),
            flags: 0,
            body: b"before layout",
        },
    );
    record(&mut complete, 0, &layout);
    record(&mut complete, 1, &layout);
    record(&mut complete, 0, &zero(0, &ch0_zero[..]));
    record(&mut complete, 1, &zero(0, &ch1_zero[..]));
    record(&mut complete, 1, &zero(1, &ch1_region1[..]));
    record(&mut complete, 1, &raw_page);
    record(
        &mut complete,
        0,
        &Frame::DeviceState(DeviceState {
            instance: 0,
            name: "cpu",
            total: 3,
            offset: 0,
            data: b"abc",
        }),
    );
    record(&mut complete, 0, &end(1, 3));
    record(&mut complete, 1, &end(3, 7));
    let complete_frame = Frame::Complete(Complete {
        final_round: Round(0),
        sections: 1,
    });
    let commit = Frame::Commit(Commit {
        final_round: Round(0),
    });
    // The same session up to COMPLETE, with COMMITs the destination must refuse: on
    // channel 1, and on channel 0 before ACK COMPLETE (channel 1 has not ended the
    // round yet).
    let mut early = complete.clone();
    let at = early.len() - 1 - encoded(&end(3, 7)).len();
    early.truncate(at);
    record(&mut early, 1, &commit);
    record(&mut early, 0, &complete_frame);
    record(&mut early, 0, &commit);
    record(&mut complete, 0, &complete_frame);
    record(&mut complete, 0, &commit);

    let mut wrong = vec![0, 1];
    record(&mut wrong, 0, &layout);
    record(&mut wrong, 1, &layout);
    // Channel 0's pages on channel 1, then on channel 0.
    record(&mut wrong, 1, &zero(0, &ch0_zero[..]));
    record(&mut wrong, 0, &zero(0, &ch0_zero[..]));
    record(&mut wrong, 0, &end(1, 3));

    // COPY frames: channel 0 copies its zero pages 1..4 of region 0 to 8..11; channel 1
    // its data page 5 to pages 4, 12 and 13 (two touching runs whose sources do not
    // continue). Then the same COPYs with a source (channel 0) or a target (channel 1)
    // of the other channel.
    let copy_of = |round_end, runs| {
        Frame::Copy(CopyFrame {
            region: RegionId(0),
            round: Round(0),
            round_end,
            runs: WireList::Slice(runs),
            crc: None,
        })
    };
    let copy = |runs| copy_of(false, runs);
    let copy_run = |start, count, from| CopyRun {
        start: PageIndex(start),
        count,
        from: PageIndex(from),
    };
    let ch0_copy = [copy_run(8, 3, 1)];
    let ch1_copy = [copy_run(4, 1, 5), copy_run(12, 1, 5), copy_run(13, 1, 5)];
    let mut copies = vec![0, 1];
    record(&mut copies, 0, &layout);
    record(&mut copies, 1, &layout);
    record(&mut copies, 0, &zero(0, &ch0_zero[..]));
    record(&mut copies, 0, &copy(&ch0_copy[..]));
    record(&mut copies, 1, &raw_page);
    record(&mut copies, 1, &copy(&ch1_copy[..]));
    record(&mut copies, 0, &end(2, 6));
    record(&mut copies, 1, &end(2, 4));
    record(
        &mut copies,
        0,
        &Frame::Complete(Complete {
            final_round: Round(0),
            sections: 0,
        }),
    );
    record(&mut copies, 0, &commit);
    let mut copies_wrong = vec![0, 1];
    record(&mut copies_wrong, 0, &layout);
    record(&mut copies_wrong, 1, &layout);
    let across = [copy_run(8, 1, 5)];
    record(&mut copies_wrong, 0, &copy(&across[..]));
    record(&mut copies_wrong, 1, &copy(&across[..]));

    // ROUND_END copies with sources of the other channel: channel 1 sets its pages 12
    // and 13 to channel 0's zero pages 1 and 2, channel 0 its page 8 to channel 1's data
    // page 5. Channel 1 ends the round first: its copy waits for channel 0's
    // END_OF_ROUND.
    let ch1_late = [copy_run(12, 2, 1)];
    let ch0_late = [copy_run(8, 1, 5)];
    let mut late = vec![0, 1];
    record(&mut late, 0, &layout);
    record(&mut late, 1, &layout);
    record(&mut late, 1, &copy_of(true, &ch1_late[..]));
    record(&mut late, 0, &zero(0, &ch0_zero[..]));
    record(&mut late, 1, &raw_page);
    record(&mut late, 0, &copy_of(true, &ch0_late[..]));
    record(&mut late, 1, &end(2, 3));
    record(&mut late, 0, &end(2, 4));
    record(
        &mut late,
        0,
        &Frame::Complete(Complete {
            final_round: Round(0),
            sections: 0,
        }),
    );
    record(&mut late, 0, &commit);

    // ACKs and an extension frame for sources that sent nothing (bit 7 of the channel
    // byte), then a LAYOUT for the destination.
    let mut acks = vec![0, 1];
    for (ch, kind, value) in [
        (0x80, AckKind::FRAMES, 0),
        (0x81, AckKind::ROUND, 0),
        (0x80, AckKind::FRAMES, 1),
        (0x81, AckKind::COMPLETE, 0),
        (0x80, AckKind::COMMITTED, 0),
    ] {
        record(&mut acks, ch, &Frame::Ack(Ack { kind, value }));
    }
    record(
        &mut acks,
        0x81,
        &Frame::Extension {
            frame_type: FrameType(0xfe),
            flags: 0,
            body: &[],
        },
    );
    record(&mut acks, 0, &layout);

    vec![
        ("seed-frames-complete", complete),
        ("seed-frames-commit-early", early),
        ("seed-frames-wrong-channel", wrong),
        ("seed-frames-copy", copies),
        ("seed-frames-copy-wrong-channel", copies_wrong),
        ("seed-frames-round-end-copy", late),
        ("seed-frames-acks-to-idle-source", acks),
        // 2 channels, chunks of 2, two regions of 8 and 4 pages, 2 rounds, up to 4
        // pages a frame, extension frames everywhere; no sections, no faults.
        (
            "seed-generated",
            vec![
                1,
                1,
                0,
                1,
                0,
                1,
                7,
                0,
                0,
                3,
                1,
                1,
                3,
                7,
                0,
                0b1011_0110,
                0x5a,
                0x33,
                1,
                0x0f,
                0xf0,
                0x66,
            ],
        ),
        // 3 channels with CRC32C, one region of 16 pages, 3 rounds, one device-state
        // section on channel 0; no faults.
        (
            "seed-generated-crc-section",
            vec![
                3, 2, 0, 3, 1, 0, 15, 1, 2, 5, 3, 1, 0, 20, 8, 1, 0xff, 0xff, 0x33, 0x0f, 0xf0,
                0x55, 0xaa, 0x0f, 0x3c, 0xc3,
            ],
        ),
        // 2 channels with CRC32C, chunks of 2, one region of 16 pages, 2 rounds, up to 8
        // pages a frame, COPY frames (ext bit 5); no sections, no faults.
        (
            "seed-generated-copy",
            vec![
                3, 1, 0, 1, 0, 0, 15, 0, 1, 7, 0x27, 0, 0xff, 0xff, 0xff, 0x7f, 0x8f, 0xf5, 0xff,
                0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ),
        // 3 channels with CRC32C, chunks of 2, one region of 16 pages, rounds 0 and 2, up to 8
        // pages a frame, COPY frames and ROUND_END ones (ext bits 5 and 6); no sections,
        // no faults.
        (
            "seed-generated-round-end-copy",
            vec![
                3, 2, 0, 1, 0, 0, 15, 0, 1, 7, 0x67, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ),
        // 4 channels, chunks of 1, one region of 32 pages all dirty in 2 rounds: a
        // drop, a move and an altered run.
        (
            "seed-generated-faults",
            [
                &[1u8, 3, 3, 0, 0, 0, 31, 0, 1, 7, 0, 0][..],
                &[0xff; 4],
                &[0x0f; 4],
                &[0],
                &[0xff; 4],
                &[0xf0; 4],
                &[0, 0, 1, 2, 2, 2, 0, 3, 3, 3, 1, 0x81],
                &[3, 2, 1, 0, 3, 2, 1, 0],
            ]
            .concat(),
        ),
    ]
}
