//! Hostile sources against the destination's time bounds (PROTOCOL.md, Idle timeout
//! and Switchover): a source written by hand against PROTOCOL.md (see `raw_peer`)
//! that keeps sending, but too slowly to make progress, must not hold the destination
//! past its idle timeout: each frame must arrive whole within the idle timeout of its
//! first byte, and COMMIT within the idle timeout of ACK COMPLETE, whatever else
//! arrives meanwhile. Short idle timeouts keep the tests quick; every loop is bounded.

mod common;
mod raw_peer;

use std::time::{Duration, Instant};

use pagewire::error::Wait;
use pagewire::{Backend, MigrationError};
use pagewire_protocol::*;
use pagewire_transport::{ChannelError, FRAME_MIN_RATE};
use raw_peer::*;

const IDLE: Duration = Duration::from_millis(500);

/// What the destination's verdict was and how long after `since` it came; the bytes
/// of `frame` are sent one at a time, 0.6 idle timeouts apart, until it comes (at most
/// 40 of them, 12 s: without a frame timeout the destination waits for ever).
fn trickle(n: u8, backend: Backend, frame: &[u8], whole_first: usize) -> (MigrationError, usize) {
    let dest = Dest::with(n, |cfg| {
        cfg.idle_timeout = IDLE;
        cfg.backend = backend;
    });
    let t = dest.accept(None);
    let mut c = dest.connect(0, 1, false);
    c.stream.set_nodelay(true).unwrap();
    let regions = regions(64 * u64::from(PS));
    c.send(Frame::Layout(LayoutFrame {
        chunk_pages: 4,
        regions: WireList::Slice(&regions),
    }));
    c.send_bytes(&frame[..whole_first]);
    let started = Instant::now();
    let mut sent = whole_first;
    while sent < frame.len().min(whole_first + 40) && !t.is_finished() {
        std::thread::sleep(IDLE * 6 / 10);
        c.send_bytes(&frame[sent..sent + 1]);
        sent += 1;
    }
    let waited = started.elapsed();
    drop(c);
    let err = t
        .join()
        .unwrap()
        .expect_err("a trickled frame fails the session");
    eprintln!(
        "{backend:?}: {err} after {waited:?}, {sent} of {} bytes sent",
        frame.len()
    );
    assert!(
        waited <= IDLE * 10,
        "the destination waited {waited:?} for a frame trickled over {sent} bytes"
    );
    (err, sent)
}

/// A frame's envelope declaring 64 KiB, then a byte every 0.6 idle timeouts; and a raw
/// PAGES frame whose header arrives whole and whose payload (placed straight into
/// guest memory) trickles: each fails the session with `FrameTimeout`, naming how
/// much of how many bytes arrived, within a few idle timeouts.
fn a_trickled_frame_fails_within_the_idle_timeout(backend: Backend, n: u8) {
    let mut big = Vec::new();
    Frame::Extension {
        frame_type: FrameType(0x90),
        flags: 0,
        body: &[0; 64 << 10],
    }
    .encode(&mut big)
    .unwrap();
    let (err, sent) = trickle(n, backend, &big, 1);
    match err {
        MigrationError::Channel {
            channel: 0,
            source: ChannelError::FrameTimeout { have, need, after },
        } => {
            assert!(have <= sent && have >= 2, "{have} of {sent} bytes");
            assert!(need == 8 || need == big.len(), "need {need}");
            assert_eq!(after, budget(need));
        }
        other => panic!("expected a frame timeout on channel 0, got {other:?}"),
    }
    let payload = vec![0x5a; PS as usize];
    let runs = [run(0, 1)];
    let mut pages = Vec::new();
    Frame::Pages(raw_pages(&runs, &payload, 0, false))
        .encode(&mut pages)
        .unwrap();
    let header = pages.len() - payload.len();
    let (err, sent) = trickle(n + 1, backend, &pages, header + 1);
    match err {
        MigrationError::Channel {
            channel: 0,
            source: ChannelError::FrameTimeout { have, need, after },
        } => {
            assert!(have > header && have <= sent, "{have} of {sent} bytes");
            assert_eq!((need, after), (pages.len(), budget(pages.len())));
        }
        other => panic!("expected a frame timeout on channel 0, got {other:?}"),
    }
}

/// The time a frame of `need` bytes has from its first byte: the idle timeout, plus
/// its length at the slowest rate a link may have once its envelope arrived (8 bytes:
/// not yet).
fn budget(need: usize) -> Duration {
    let len = if need == 8 { 0 } else { need };
    IDLE + Duration::from_secs_f64(len as f64 / FRAME_MIN_RATE as f64)
}

#[test]
fn a_trickled_frame_fails_within_the_idle_timeout_over_tcp() {
    a_trickled_frame_fails_within_the_idle_timeout(Backend::Tcp, 70);
}

#[test]
fn a_trickled_frame_fails_within_the_idle_timeout_over_io_uring() {
    if !common::uring_available() {
        return;
    }
    let uring = Backend::Uring {
        fallback_to_tcp: false,
    };
    a_trickled_frame_fails_within_the_idle_timeout(uring, 72);
}

/// After ACK COMPLETE a source sends extension frames every half idle timeout on both
/// channels, then COMMIT three idle timeouts after the ACK: the destination gave up
/// at the idle timeout after its ACK (`NoCommit`, timed out waiting for COMMIT), never
/// sends ACK COMMITTED, and the other channel does not hold the session either.
#[test]
fn extension_frames_after_ack_complete_do_not_extend_the_wait_for_commit() {
    let dest = Dest::with(74, |cfg| cfg.idle_timeout = IDLE);
    let t = dest.accept(None);
    let mut chans = [dest.connect(0, 2, false), dest.connect(1, 2, false)];
    for c in &mut chans {
        through_an_empty_round_0(c);
    }
    chans[0].send(Frame::Complete(Complete {
        final_round: Round(0),
        sections: 0,
    }));
    assert_eq!(chans[0].recv(), Some((FrameType::ACK, 0)), "ACK COMPLETE");
    let acked = Instant::now();
    let mut verdict_after = None;
    for _ in 0..6 {
        std::thread::sleep(IDLE / 2);
        for c in &mut chans {
            c.send(Frame::Extension {
                frame_type: FrameType(0xff),
                flags: 0,
                body: b"still here",
            });
        }
        if verdict_after.is_none() && t.is_finished() {
            verdict_after = Some(acked.elapsed());
        }
    }
    chans[0].send(Frame::Commit(Commit {
        final_round: Round(0),
    }));
    let answers = chans[0].until_end().unwrap_or_default();
    assert!(
        !answers.iter().any(|(t, _)| *t == FrameType::ACK),
        "the destination acknowledged a late COMMIT: {answers:?}"
    );
    let verdict = t.join().unwrap();
    let verdict_after = verdict_after.unwrap_or_else(|| acked.elapsed());
    eprintln!("{verdict:?} {verdict_after:?} after ACK COMPLETE");
    match verdict {
        Err(MigrationError::NoCommit {
            final_round: 0,
            source,
        }) => assert!(
            matches!(
                *source,
                MigrationError::Timeout {
                    channel: Some(0),
                    what: Wait::Commit,
                    after: IDLE,
                }
            ),
            "{source:?}"
        ),
        other => panic!("expected NoCommit after a timeout, got {other:?}"),
    }
    assert!(
        verdict_after <= IDLE * 5,
        "the destination gave up {verdict_after:?} after ACK COMPLETE"
    );
}
