//! Hostile sources against a real destination: a client written against PROTOCOL.md
//! (the protocol crate's sans-IO handshake and frame encoder over a plain socket, none of
//! the pipeline's source) breaks one rule at a time. Each case must end in a clear,
//! typed error before a byte reaches guest memory where the rules forbid it, and a
//! legitimate session must still complete.

mod common;
mod raw_peer;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pagewire::MigrationError;
use pagewire_protocol::frame::Hello;
use pagewire_protocol::session::Limit;
use pagewire_protocol::*;
use raw_peer::*;

#[test]
fn extension_frames_are_skipped_and_a_legitimate_session_completes() {
    let dest = Dest::new(1, None);
    legitimate(&dest, 2);
    legitimate(&dest, 1);
}

#[test]
fn garbage_and_a_hello_with_65535_channels_leave_the_listener_serving() {
    let dest = Dest::new(9, None);
    let t = dest.accept(None);
    let mut junk = TcpStream::connect(dest.addr).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut hello = Vec::new();
    Frame::Hello(Hello {
        version_min: Version(5),
        version_max: Version(5),
        session: common::session(9),
        channel: ChannelId(0),
        channel_count: 65535,
        page_size: PS,
        max_pages: 128,
        max_frame_bytes: 1 << 20,
        nonce: [7; 32],
        codecs: WireList::Slice(&[CodecId::RAW, CodecId::ZERO]),
        checksums: WireList::Slice(&[]),
        auth: WireList::Slice(&[]),
    })
    .encode(&mut hello)
    .unwrap();
    let mut greedy = TcpStream::connect(dest.addr).unwrap();
    greedy
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    greedy.write_all(&hello).unwrap();
    let mut answer = vec![0u8; 4096];
    let n = greedy.read(&mut answer).unwrap();
    let env = Envelope::parse(answer[..8].try_into().unwrap(), &Limits::handshake()).unwrap();
    let Frame::Reject(r) = Frame::decode(env, &answer[8..n], &Limits::handshake()).unwrap() else {
        panic!("expected REJECT")
    };
    assert_eq!(r.reason, RejectReason::BAD_CHANNEL, "{}", r.message);
    // The session this accept waits for never comes: it times out, listing refusals.
    assert!(matches!(t.join().unwrap(), Err(MigrationError::Session(_))));
    assert!(dest.listener.stats().refused_too_many_channels >= 1);
    legitimate(&dest, 2);
}

#[test]
fn a_page_on_the_wrong_channel_is_refused_before_placement() {
    let mem = memory(64 * u64::from(PS));
    let dest = Dest::new(2, None);
    let t = dest.accept(Some(mem.clone()));
    let mut c0 = dest.connect(0, 2, false);
    let mut c1 = dest.connect(1, 2, false);
    let regions = regions(64 * u64::from(PS));
    let layout = LayoutFrame {
        chunk_pages: 8,
        regions: WireList::Slice(&regions),
    };
    c0.send(Frame::Layout(layout));
    c1.send(Frame::Layout(layout));
    // Page 8 is in chunk 1: channel 1's. Channel 0 sends it (a raw frame, which the
    // transport would place straight into guest memory).
    let runs = [run(8, 1)];
    let payload = vec![0xaa; PS as usize];
    c0.send(Frame::Pages(raw_pages(&runs, &payload, 0, false)));
    assert_eq!(
        c0.recv().map(|(t, _)| t),
        Some(FrameType::ABORT),
        "the destination says why"
    );
    let e = rule(t.join().unwrap());
    assert_eq!(
        e,
        SessionError::WrongChannel {
            region: RegionId(0),
            page: 8,
            channel: ChannelId(0),
            owner: ChannelId(1),
        }
    );
    let mut got = vec![0u8; PS as usize];
    assert!(mem.read_pages(RegionId(0), 8, 1, &mut got));
    assert!(got.iter().all(|b| *b == 0), "nothing was placed");
    drop((c0, c1));
    legitimate(&dest, 2);
}

#[test]
fn an_oversized_layout_is_refused_by_the_limit_without_mapping_it() {
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap()
    };
    let before = rss();
    let mut limits = DestinationLimits::default();
    limits.max_guest_bytes = 1 << 30;
    let dest = Dest::new(4, Some(limits));
    let t = dest.accept(None);
    let mut c = dest.connect(0, 1, false);
    let regions = regions(64 << 30);
    c.send(Frame::Layout(LayoutFrame {
        chunk_pages: 128,
        regions: WireList::Slice(&regions),
    }));
    let e = rule(t.join().unwrap());
    assert!(matches!(
        e,
        SessionError::LimitExceeded {
            limit: Limit::GuestBytes,
            value,
            max,
        } if value == 64 << 30 && max == 1 << 30
    ));
    let grown = rss().saturating_sub(before);
    assert!(grown < 256 << 10, "RSS grew by {grown} kB");
    drop(c);
    legitimate(&dest, 1);
}

#[test]
fn altered_page_ranges_under_crc_are_refused() {
    let dest = Dest::new(6, None);
    let t = dest.accept(None);
    let mut c = dest.connect(0, 1, true);
    let regions = regions(64 * u64::from(PS));
    c.send(Frame::Layout(LayoutFrame {
        chunk_pages: 8,
        regions: WireList::Slice(&regions),
    }));
    let runs = [run(3, 1)];
    let payload = vec![0x5a; PS as usize];
    let mut bytes = Vec::new();
    Frame::Pages(raw_pages(&runs, &payload, 0, true))
        .encode(&mut bytes)
        .unwrap();
    // Move the frame to page 2: the run's start is the first field after the 16 fixed
    // header bytes.
    bytes[Envelope::LEN + 16] = 2;
    c.send_bytes(&bytes);
    match t.join().unwrap() {
        Err(MigrationError::Channel { source, .. }) => assert!(
            matches!(
                source,
                pagewire_transport::ChannelError::Decode(DecodeError::ChecksumMismatch { .. })
            ),
            "{source:?}"
        ),
        other => panic!("expected a checksum failure, got {other:?}"),
    }
    drop(c);
    legitimate(&dest, 1);
}

#[test]
fn pages_before_layout_are_refused() {
    let dest = Dest::new(8, None);
    let t = dest.accept(None);
    let mut c = dest.connect(0, 1, false);
    c.send(Frame::Pages(PageFrame {
        codec: CodecId::ZERO,
        region: RegionId(0),
        round: Round(0),
        data_runs: WireList::Slice(&[]),
        zero_runs: WireList::Slice(&[run(0, 1)]),
        uniform_runs: WireList::Slice(&[]),
        lengths: None,
        crc: None,
        payload: &[],
    }));
    assert_eq!(
        rule(t.join().unwrap()),
        SessionError::LayoutMissing(FrameType::PAGES)
    );
    drop(c);
    legitimate(&dest, 1);
}

/// One channel through LAYOUT and an empty round 0, acknowledged.
fn up_to_the_final_round(dest: &Dest) -> Raw {
    let mut c = dest.connect(0, 1, false);
    through_an_empty_round_0(&mut c);
    c
}

#[test]
fn a_commit_before_ack_complete_is_refused() {
    let dest = Dest::new(10, None);
    let t = dest.accept(None);
    let mut c = up_to_the_final_round(&dest);
    c.send(Frame::Commit(Commit {
        final_round: Round(0),
    }));
    assert_eq!(
        rule(t.join().unwrap()),
        SessionError::CommitEarly {
            final_round: Round(0)
        }
    );
    assert_eq!(
        c.recv(),
        Some((FrameType::ABORT, u64::from(AbortReason::BAD_FRAME.0)))
    );
    drop(c);
    legitimate(&dest, 1);
}

#[test]
fn an_abort_instead_of_commit_never_lets_the_destination_succeed() {
    let dest = Dest::new(11, None);
    let t = dest.accept(None);
    let mut c = up_to_the_final_round(&dest);
    c.send(Frame::Complete(Complete {
        final_round: Round(0),
        sections: 0,
    }));
    assert_eq!(c.recv(), Some((FrameType::ACK, 0)));
    c.send(Frame::Abort(Abort {
        reason: AbortReason::CANCELLED,
        message: "changed my mind",
    }));
    let r = t.join().unwrap();
    assert!(
        matches!(
            &r,
            Err(MigrationError::NoCommit { final_round: 0, source })
                if matches!(**source, MigrationError::PeerAborted { .. })
        ),
        "{r:?}"
    );
    drop(c);
    legitimate(&dest, 1);
}

/// A source need not close its channels after ACK COMMITTED: the destination reports
/// success once it took COMMIT (PROTOCOL.md, COMMIT) and closes every channel itself,
/// rather than waiting for the source to close them or for them to idle out (the guest
/// would wait that long to start).
#[test]
fn success_is_reported_at_commit_while_the_source_keeps_its_channels_open() {
    let dest = Dest::with(12, |cfg| cfg.idle_timeout = Duration::from_secs(300));
    let t = dest.accept(None);
    let mut chans = [dest.connect(0, 2, false), dest.connect(1, 2, false)];
    for c in &mut chans {
        through_an_empty_round_0(c);
    }
    complete_and_commit(&mut chans[0]);
    // Both channels stay open here; the verdict must come anyway, long before the
    // 300 s idle timeout.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(t.join().unwrap());
    });
    let verdict = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("success is reported while the source's channels are open");
    assert_eq!(verdict.expect("the session completes").final_round, 0);
    // And the destination closed both channels: each reads to its end.
    for c in &mut chans {
        assert_eq!(c.recv(), None);
    }
}

/// Bad uniform runs: each fails the session with its error, and the given guest memory
/// keeps every byte it had.
#[test]
fn bad_uniform_runs_are_refused_and_write_nothing() {
    let uniform = |start, count, byte| UniformRun {
        run: run(start, count),
        byte,
    };
    let outside = [uniform(63, 2, 0xcc)];
    let zero_byte = [uniform(5, 1, 0)];
    let over_data = [uniform(3, 2, 0xcc)];
    let data = [run(4, 1)];
    let payload = vec![0x5a; PS as usize];
    let cases: [(&[UniformRun], &[PageRun], &[u8]); 3] = [
        (&outside, &[], &[]),
        (&zero_byte, &[], &[]),
        (&over_data, &data, &payload),
    ];
    for (i, (u, data, payload)) in cases.into_iter().enumerate() {
        let dest = Dest::new(20 + i as u8, None);
        let mem = memory(64 * u64::from(PS));
        mem.write_pages(RegionId(0), 0, &vec![0x11; 64 * PS as usize]);
        let t = dest.accept(Some(mem.clone()));
        let mut c = dest.connect(0, 1, false);
        let regions = regions(64 * u64::from(PS));
        c.send(Frame::Layout(LayoutFrame {
            chunk_pages: 4,
            regions: WireList::Slice(&regions),
        }));
        c.send(Frame::Pages(PageFrame {
            codec: if data.is_empty() {
                CodecId::ZERO
            } else {
                CodecId::RAW
            },
            region: RegionId(0),
            round: Round(0),
            data_runs: WireList::Slice(data),
            zero_runs: WireList::Slice(&[]),
            uniform_runs: WireList::Slice(u),
            lengths: None,
            crc: None,
            payload,
        }));
        let r = t.join().unwrap();
        match i {
            0 => assert!(
                matches!(
                    rule(r),
                    SessionError::PagesOutsideLayout(DecodeError::PageOutOfRange { end: 65, .. })
                ),
                "case {i}"
            ),
            _ => {
                let Err(MigrationError::Channel { source, .. }) = r else {
                    panic!("case {i}: expected a decode error, got {r:?}");
                };
                let want = match i {
                    1 => matches!(
                        source,
                        pagewire_transport::ChannelError::Decode(DecodeError::InvalidField {
                            field: "uniform byte",
                            ..
                        })
                    ),
                    _ => matches!(
                        source,
                        pagewire_transport::ChannelError::Decode(
                            DecodeError::RunsNotCanonical { .. }
                        )
                    ),
                };
                assert!(want, "case {i}: {source:?}");
            }
        }
        let mut page = vec![0u8; PS as usize];
        for p in 0..64 {
            assert!(mem.read_pages(RegionId(0), p, 1, &mut page));
            assert!(
                page.iter().all(|&b| b == 0x11),
                "case {i}: page {p} changed"
            );
        }
        drop(c);
    }
}

fn copy(start: u64, count: u32, from: u64) -> CopyRun {
    CopyRun {
        start: PageIndex(start),
        count,
        from: PageIndex(from),
    }
}

/// A COPY frame of region 0, round 0.
fn copy_frame(runs: &[CopyRun], round_end: bool, crc: bool) -> Frame<'_> {
    let f = CopyFrame {
        region: RegionId(0),
        round: Round(0),
        runs: WireList::Slice(runs),
        round_end,
        crc: None,
    };
    Frame::Copy(match crc {
        true => f.with_crc().unwrap(),
        false => f,
    })
}

/// Bad COPY frames: a source page of another channel (allowed only at the round's
/// end), a target page of another channel and a source outside the region (at the
/// round's end too), a source that is also a target. Each fails the session with its
/// error, and the given guest memory keeps every byte it had.
#[test]
fn bad_copies_are_refused_and_write_nothing() {
    let wrong_channel = [copy(0, 1, 8)];
    let outside = [copy(0, 2, 63)];
    let overlapping = [copy(4, 2, 5)];
    let wrong_target = [copy(8, 1, 0)];
    let cases: [(&[CopyRun], bool); 5] = [
        (&wrong_channel, false),
        (&outside, true),
        (&overlapping, false),
        (&wrong_target, true),
        (&outside, false),
    ];
    for (i, (runs, round_end)) in cases.into_iter().enumerate() {
        let dest = Dest::new(40 + i as u8, None);
        let mem = memory(64 * u64::from(PS));
        mem.write_pages(RegionId(0), 0, &vec![0x11; 64 * PS as usize]);
        let t = dest.accept(Some(mem.clone()));
        let mut c0 = dest.connect(0, 2, false);
        let mut c1 = dest.connect(1, 2, false);
        let regions = regions(64 * u64::from(PS));
        let layout = LayoutFrame {
            chunk_pages: 8,
            regions: WireList::Slice(&regions),
        };
        c0.send(Frame::Layout(layout));
        c1.send(Frame::Layout(layout));
        // Pages 0..8 and 56..64 are channel 0's, 8..16 channel 1's.
        c0.send(copy_frame(runs, round_end, false));
        // The destination says why on channel 0, whether a rule refused the frame or it
        // did not decode, and ends channel 1 with it.
        assert_eq!(
            c0.recv(),
            Some((FrameType::ABORT, u64::from(AbortReason::BAD_FRAME.0))),
            "case {i}"
        );
        drop(c1);
        let r = t.join().unwrap();
        match i {
            3 => assert_eq!(
                rule(r),
                SessionError::WrongChannel {
                    region: RegionId(0),
                    page: 8,
                    channel: ChannelId(0),
                    owner: ChannelId(1),
                },
                "case {i}"
            ),
            0 => assert_eq!(
                rule(r),
                SessionError::WrongChannel {
                    region: RegionId(0),
                    page: 8,
                    channel: ChannelId(0),
                    owner: ChannelId(1),
                },
                "case {i}"
            ),
            1 | 4 => assert!(
                matches!(
                    rule(r),
                    SessionError::PagesOutsideLayout(DecodeError::PageOutOfRange { .. })
                ),
                "case {i}"
            ),
            _ => assert!(
                matches!(
                    r,
                    Err(MigrationError::Channel {
                        source: pagewire_transport::ChannelError::Decode(
                            DecodeError::RunsNotCanonical { .. }
                        ),
                        ..
                    })
                ),
                "case {i}: {r:?}"
            ),
        }
        let mut page = vec![0u8; PS as usize];
        for p in 0..64 {
            assert!(mem.read_pages(RegionId(0), p, 1, &mut page));
            assert!(
                page.iter().all(|&b| b == 0x11),
                "case {i}: page {p} changed"
            );
        }
        drop(c0);
        legitimate(&dest, 2);
    }
}

/// A client that follows PROTOCOL.md: a page sent, then a COPY of it into two others
/// (one of them across a chunk boundary of the same channel), counted by END_OF_ROUND;
/// the destination holds the copied content.
#[test]
fn a_copy_of_a_page_sent_before_sets_its_targets() {
    let dest = Dest::new(50, None);
    let t = dest.accept(None);
    let mut c = dest.connect(0, 1, true);
    let regions = regions(64 * u64::from(PS));
    c.send(Frame::Layout(LayoutFrame {
        chunk_pages: 4,
        regions: WireList::Slice(&regions),
    }));
    let runs = [run(1, 1)];
    let payload = vec![0x77; PS as usize];
    c.send(Frame::Pages(raw_pages(&runs, &payload, 0, true)));
    let copies = [copy(2, 1, 1), copy(40, 1, 1)];
    c.send(copy_frame(&copies, false, true));
    c.send(Frame::EndOfRound(EndOfRound {
        round: Round(0),
        frames: 2,
        pages: 3,
    }));
    assert_eq!(c.recv(), Some((FrameType::ACK, 0)));
    complete_and_commit(&mut c);
    drop(c);
    let m = t.join().unwrap().expect("the session completes");
    assert_eq!(m.stats.copied_pages, 2);
    let mut page = vec![0u8; PS as usize];
    for (p, byte) in [(1, 0x77), (2, 0x77), (40, 0x77), (3, 0), (41, 0)] {
        assert!(m.memory.read_pages(RegionId(0), p, 1, &mut page));
        assert!(page.iter().all(|&b| b == byte), "page {p}");
    }
}

/// A client that follows PROTOCOL.md, on two channels: channel 0 sends a `ROUND_END`
/// COPY of a page of channel 1 before channel 1 has sent that page, and ends the
/// round; channel 1 sends the page afterwards and ends the round. The copy is applied
/// once both ended it, so its target holds the page channel 1 sent.
#[test]
fn a_round_end_copy_of_another_channels_page_sets_its_target_at_the_rounds_end() {
    let dest = Dest::new(51, None);
    let t = dest.accept(None);
    let mut c0 = dest.connect(0, 2, true);
    let mut c1 = dest.connect(1, 2, true);
    let regions = regions(64 * u64::from(PS));
    let layout = LayoutFrame {
        chunk_pages: 8,
        regions: WireList::Slice(&regions),
    };
    c0.send(Frame::Layout(layout));
    c1.send(Frame::Layout(layout));
    // Pages 0..8 are channel 0's, 8..16 channel 1's.
    let copies = [copy(0, 2, 8)];
    c0.send(copy_frame(&copies, true, true));
    c0.send(Frame::EndOfRound(EndOfRound {
        round: Round(0),
        frames: 1,
        pages: 2,
    }));
    // Channel 0's frames are taken before channel 1 sends the page (a wait helps the
    // test tell "at the round's end" from "on arrival"; it does not decide the result).
    std::thread::sleep(Duration::from_millis(200));
    let runs = [run(8, 2)];
    let payload = [vec![0x5a; PS as usize], vec![0xa5; PS as usize]].concat();
    c1.send(Frame::Pages(raw_pages(&runs, &payload, 0, true)));
    c1.send(Frame::EndOfRound(EndOfRound {
        round: Round(0),
        frames: 1,
        pages: 2,
    }));
    assert_eq!(c1.recv(), Some((FrameType::ACK, 0)));
    assert_eq!(c0.recv(), Some((FrameType::ACK, 0)));
    complete_and_commit(&mut c0);
    drop((c0, c1));
    let m = t.join().unwrap().expect("the session completes");
    assert_eq!((m.stats.copied_pages, m.stats.round_end_pages), (2, 2));
    let mut page = vec![0u8; PS as usize];
    for (p, byte) in [(0, 0x5a), (1, 0xa5), (8, 0x5a), (9, 0xa5), (2, 0)] {
        assert!(m.memory.read_pages(RegionId(0), p, 1, &mut page));
        assert!(page.iter().all(|&b| b == byte), "page {p}");
    }
}

/// Channel 1 sends a raw PAGES frame of round 1, after the final round 0, whose pages
/// the transport places as they arrive, all but its last byte; channel 0 sends COMPLETE
/// before (`complete_first` false) or after it. The session must fail either way, and
/// when COMPLETE came first no byte of the frame may reach memory.
fn pages_after_the_final_round(n: u8, complete_first: bool) {
    let mem = memory(64 * u64::from(PS));
    let dest = Dest::new(n, None);
    let t = dest.accept(Some(mem.clone()));
    let mut chans = [dest.connect(0, 2, true), dest.connect(1, 2, true)];
    for c in &mut chans {
        through_an_empty_round_0(c);
    }
    let [c0, c1] = &mut chans;
    let complete = Frame::Complete(Complete {
        final_round: Round(0),
        sections: 0,
    });
    if complete_first {
        c0.send(complete);
        assert_eq!(c0.recv(), Some((FrameType::ACK, 0)), "ACK COMPLETE");
    }
    // Page 4 is channel 1's (chunks of 4 pages).
    let payload = vec![0xEE; PS as usize];
    let mut bytes = Vec::new();
    Frame::Pages(raw_pages(&[run(4, 1)], &payload, 1, true))
        .encode(&mut bytes)
        .unwrap();
    c1.send_bytes(&bytes[..bytes.len() - 1]);
    std::thread::sleep(Duration::from_millis(300));
    if !complete_first {
        c0.send(complete);
    }
    let first = c0.recv();
    if first == Some((FrameType::ACK, 0)) && !complete_first {
        // Before the fix: ACK COMPLETE, then COMMIT made it a success.
        c0.send(Frame::Commit(Commit {
            final_round: Round(0),
        }));
    }
    let verdict = t.join().unwrap();
    assert!(
        verdict.is_err(),
        "pages of a round after the final one, complete first {complete_first}: \
         the destination reported success (channel 0 got {first:?})"
    );
    let err = verdict.err().unwrap().to_string();
    assert!(
        err.contains("after the final round") || err.contains("after COMPLETE"),
        "{err}"
    );
    if complete_first {
        let mut got = vec![0u8; PS as usize];
        assert!(mem.read_pages(RegionId(0), 4, 1, &mut got));
        assert!(
            got.iter().all(|b| *b == 0),
            "a page of the refused frame was written"
        );
    }
}

#[test]
fn pages_of_a_round_after_the_final_one_fail_the_session_before_they_are_placed() {
    pages_after_the_final_round(57, false);
    pages_after_the_final_round(58, true);
}
