//! Ordering under channel jitter, and failures: a channel dying, the destination going
//! away, a corrupt frame, a peer of another version.

mod common;

use std::time::Duration;

use common::*;
use pagewire::error::Wait;
use pagewire::{
    DestinationConfig, DestinationListener, DirtyBitmap, MigrationError, Source, SourceConfig,
};
use pagewire_protocol::{
    Authentication, CodecId, Frame, RegionId, Reject, RejectReason, Version, WireList,
};
use pagewire_transport::session::Backend;

fn destination(
    checksum: bool,
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<Result<pagewire::Migrated, MigrationError>>,
) {
    let mut cfg = DestinationConfig::new(session(2), Authentication::None);
    cfg.checksum = checksum;
    cfg.idle_timeout = Duration::from_secs(5);
    cfg.accept_timeout = Duration::from_secs(10);
    let l = DestinationListener::bind(loopback(), cfg).unwrap();
    let addr = l.local_addr().unwrap();
    (addr, std::thread::spawn(move || l.accept(None)?.wait()))
}

fn source_config(codec: CodecId, checksum: bool) -> SourceConfig {
    let mut cfg = SourceConfig::new(session(2), Authentication::None);
    cfg.codec = codec.into();
    cfg.checksum = checksum;
    cfg.ack_timeout = Duration::from_secs(5);
    cfg.precopy.downtime_limit = Duration::from_millis(20);
    cfg.precopy.max_rounds = 6;
    cfg
}

/// Rewrites pages `0..hot` of region 0 (spread over every channel's chunks), with
/// content that cycles through zero, text, code, random; marks them dirty.
fn rewrite_hot(mem: &pagewire::GuestMemory, hot: u64, round: u64) -> Vec<(RegionId, DirtyBitmap)> {
    let bits = DirtyBitmap::new(mem.pages(RegionId(0)).unwrap());
    let mut rng = Rng::new(round * 7919 + 1);
    let mut page = vec![0u8; PAGE];
    for p in 0..hot {
        page_content(&mut rng, &mut page);
        if (p + round).is_multiple_of(5) {
            page.fill(0);
        } else {
            page[..16].copy_from_slice(&[(round as u8) ^ (p as u8); 16]);
        }
        assert!(mem.write_pages(RegionId(0), p, &page));
        bits.set(p);
    }
    vec![
        (RegionId(0), bits),
        (
            RegionId(1),
            DirtyBitmap::new(mem.pages(RegionId(1)).unwrap()),
        ),
    ]
}

fn ordering_under_jitter(codec: CodecId) {
    let mem = memory(8);
    fill(&mem, 11);
    let (addr, dst) = destination(false);
    let proxy = Proxy::start(
        addr,
        Fault::Delay {
            seed: 5,
            max_us: 3000,
        },
    );
    let mut src = Source::connect(proxy.addr, mem.clone(), source_config(codec, false)).unwrap();
    let all: Vec<(RegionId, DirtyBitmap)> = mem
        .region_ids()
        .map(|id| (id, DirtyBitmap::full(mem.pages(id).unwrap())))
        .collect();
    src.send_round(all, false).unwrap();
    // 1024 hot pages = 8 chunks of 128, alternating channels; every round rewrites them.
    for round in 1..=12 {
        let dirty = rewrite_hot(&mem, 1024, round);
        src.send_round(dirty, round == 12).unwrap();
    }
    assert!(src.complete().unwrap().is_committed());
    drop(src);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(migrated.final_round, 12);
    assert_eq!(first_difference(&mem, &migrated.memory), None);
}

#[test]
fn extension_frames_in_both_directions_are_skipped() {
    let mem = memory(4);
    fill(&mem, 3);
    let (addr, dst) = destination(true);
    let proxy = Proxy::start(addr, Fault::Extensions);
    let mut src = Source::connect(proxy.addr, mem.clone(), source_config(CodecId::LZ4, true))
        .expect("handshakes with extension frames after CONFIRM and READY");
    let all: Vec<(RegionId, DirtyBitmap)> = mem
        .region_ids()
        .map(|id| (id, DirtyBitmap::full(mem.pages(id).unwrap())))
        .collect();
    src.send_round(all, false).unwrap();
    for round in 1..=3 {
        let dirty = rewrite_hot(&mem, 512, round);
        src.send_round(dirty, round == 3).unwrap();
    }
    assert!(src.complete().unwrap().is_committed());
    // After the switchover nothing is sent, and no error lets the guest resume here.
    let again = [
        src.complete().map(drop).unwrap_err(),
        src.send_round(Vec::new(), true).map(drop).unwrap_err(),
        src.send_device_state("cpu", 0, b"x".to_vec()).unwrap_err(),
    ];
    for e in again {
        assert!(matches!(*e.error, MigrationError::HandedOver), "{e:?}");
        assert!(!e.may_resume_source(), "{e:?}");
    }
    drop(src);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(migrated.final_round, 3);
    assert_eq!(first_difference(&mem, &migrated.memory), None);
}

#[test]
fn ordering_holds_under_random_channel_delays_zstd() {
    ordering_under_jitter(CodecId::ZSTD);
}

#[test]
fn ordering_holds_under_random_channel_delays_delta() {
    ordering_under_jitter(CodecId::DELTA);
}

fn failing_migration(fault: Fault, checksum: bool) -> (pagewire::Failed, MigrationError, Guest) {
    let mem = memory(16);
    fill(&mem, 13);
    let (addr, dst) = destination(checksum);
    let proxy = Proxy::start(addr, fault);
    let guest = guest(mem.clone(), 10_000, 9);
    let mut src = Source::connect(
        proxy.addr,
        mem.clone(),
        source_config(CodecId::ZSTD, checksum),
    )
    .unwrap();
    let err = migrate_sim(&mut src, &guest).unwrap_err();
    drop(src);
    let dst_err = dst.join().unwrap().unwrap_err();
    drop(proxy);
    assert!(guest.is_running(), "the guest keeps running on the source");
    let (pauses, resumes) = guest.pauses_and_resumes();
    assert_eq!(pauses, resumes);
    (err, dst_err, guest)
}

#[test]
fn a_channel_dying_mid_round_hands_back_the_pages() {
    let (err, dst_err, _g) = failing_migration(
        Fault::Kill {
            channel: 1,
            bytes: 512 << 10,
        },
        false,
    );
    assert!(err.unacknowledged_pages() > 0, "{err:?}");
    // Every page handed back belongs to the dead channel's share of the round.
    eprintln!("source: {err}; destination: {dst_err}");
}

#[test]
fn the_destination_going_away_fails_both_sides() {
    let (err, dst_err, _g) = failing_migration(Fault::KillAll { bytes: 512 << 10 }, false);
    assert!(err.unacknowledged_pages() > 0);
    eprintln!("source: {err}; destination: {dst_err}");
}

#[test]
fn a_corrupt_frame_is_refused() {
    let (err, dst_err, _g) = failing_migration(
        Fault::Corrupt {
            channel: 0,
            at: (512 << 10) + 77,
        },
        true,
    );
    eprintln!("source: {err}; destination: {dst_err}");
    let text = format!("{dst_err:?}");
    assert!(
        text.contains("Checksum") || text.contains("Decode") || text.contains("Codec"),
        "{text}"
    );
}

#[test]
fn a_peer_of_another_version_is_refused_clearly() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).unwrap();
        let mut out = Vec::new();
        Frame::Reject(Reject {
            reason: RejectReason::UNSUPPORTED_VERSION,
            version_min: Version(2),
            version_max: Version(3),
            page_size: 4096,
            codecs: WireList::Slice(&[CodecId::RAW, CodecId::ZERO]),
            checksums: WireList::Slice(&[]),
            auth: WireList::Slice(&[]),
            message: "this destination speaks versions 2..=3",
        })
        .encode(&mut out)
        .unwrap();
        s.write_all(&out).unwrap();
    });
    let mem = memory(1);
    let err = Source::connect(addr, mem, source_config(CodecId::ZSTD, false)).unwrap_err();
    fake.join().unwrap();
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(matches!(err, MigrationError::Session(_)), "{text}");
    assert!(text.contains("2..=3"), "{text}");
}

/// The relay stops forwarding (both ways, sockets open) after 1 MiB: the source must
/// fail with the timeout variant no sooner than its setting and well before the sum of
/// several timeouts, hand the pages back, and keep the guest running.
fn a_stalled_destination_times_out(backend: Backend, codec: CodecId) {
    let timeout = Duration::from_secs(2);
    let mem = memory(32);
    fill(&mem, 17);
    let mut dcfg = DestinationConfig::new(session(7), Authentication::None);
    dcfg.backend = backend;
    dcfg.idle_timeout = Duration::from_secs(30);
    dcfg.accept_timeout = Duration::from_secs(10);
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let dst = std::thread::spawn(move || l.accept(None)?.wait());
    let proxy = Proxy::start(addr, Fault::Stall { bytes: 1 << 20 });
    let mut cfg = SourceConfig::new(session(7), Authentication::None);
    cfg.backend = backend;
    cfg.codec = codec.into();
    cfg.ack_timeout = timeout;
    cfg.send_timeout = timeout;
    cfg.precopy.max_rounds = 4;
    let guest = guest(mem.clone(), 10_000, 5);
    let mut src = Source::connect(proxy.addr, mem.clone(), cfg).unwrap();
    let mut log = guest.log();
    let mut vcpus = guest.vcpus();
    let err = within(
        Duration::from_secs(60),
        "the failing migration",
        move || {
            let r = pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut pagewire::NoDeviceState);
            (r.map(|_| ()), std::time::Instant::now(), src)
        },
    );
    let (result, failed_at, src) = err;
    let err = result.unwrap_err();
    let stalled_at = proxy.stalled_at().expect("the relay stalled");
    let elapsed = failed_at.duration_since(stalled_at);
    eprintln!("{backend:?} {codec:?}: {err} after {elapsed:?} (setting {timeout:?})");
    assert!(
        matches!(*err.error, MigrationError::Timeout { what: Wait::Send | Wait::Ack, after, .. } if after == timeout),
        "{err:?}"
    );
    assert!(elapsed >= timeout, "{elapsed:?} < {timeout:?}");
    assert!(
        elapsed < timeout * 2 + Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert!(err.unacknowledged_pages() > 0, "{err:?}");
    assert!(guest.is_running(), "the guest keeps running on the source");
    drop(src);
    drop(proxy);
    assert!(
        dst.join().unwrap().is_err(),
        "the destination never completes"
    );
}

#[test]
fn a_stalled_destination_times_out_over_tcp() {
    a_stalled_destination_times_out(Backend::Tcp, CodecId::ZSTD);
}

#[test]
fn a_stalled_destination_times_out_over_tcp_in_the_middle_of_a_send() {
    // Raw pages: more bytes than the socket buffers hold, so a send is what stalls.
    a_stalled_destination_times_out(Backend::Tcp, CodecId::RAW);
}

#[test]
fn a_stalled_destination_times_out_over_io_uring() {
    if !uring_available() {
        return;
    }
    a_stalled_destination_times_out(
        Backend::Uring {
            fallback_to_tcp: false,
        },
        CodecId::ZSTD,
    );
}

#[test]
fn zero_timeouts_are_refused() {
    let mut cfg = source_config(CodecId::ZSTD, false);
    cfg.ack_timeout = Duration::ZERO;
    assert!(matches!(cfg.validate(), Err(MigrationError::Config(_))));
    let mut cfg = source_config(CodecId::ZSTD, false);
    cfg.connect_attempts = 0;
    assert!(matches!(cfg.validate(), Err(MigrationError::Config(_))));
    let mut cfg = source_config(CodecId::ZSTD, false);
    cfg.handshake_timeout = Duration::ZERO;
    let err = Source::connect(loopback(), memory(1), cfg).unwrap_err();
    assert!(matches!(err, MigrationError::Config(_)), "{err}");
}

#[test]
fn a_silent_peer_fails_the_handshake_within_its_timeout() {
    // A listener that accepts and never answers.
    let listener = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = source_config(CodecId::ZSTD, false);
    cfg.handshake_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let err = within(Duration::from_secs(30), "the handshake", move || {
        Source::connect(addr, memory(1), cfg).map(drop)
    })
    .unwrap_err();
    let elapsed = started.elapsed();
    drop(listener);
    assert!(
        matches!(
            err,
            MigrationError::Timeout {
                what: Wait::Handshake,
                ..
            }
        ),
        "{err}"
    );
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[test]
fn a_stalled_destination_times_out_over_io_uring_with_sends_in_flight() {
    // Raw pages: more bytes than the socket buffers hold, so sends are left in flight.
    if !uring_available() {
        return;
    }
    a_stalled_destination_times_out(
        Backend::Uring {
            fallback_to_tcp: false,
        },
        CodecId::RAW,
    );
}

/// Accepts one connection on `listener` and answers its handshake as a destination
/// built from the protocol crate alone would, with `caps`; returns the socket and the
/// bytes the source sent after the handshake.
fn fake_destination(
    listener: std::net::TcpListener,
    caps: pagewire_protocol::Capabilities,
    session: pagewire::SessionId,
) -> (std::net::TcpStream, Vec<u8>) {
    use pagewire_protocol::{ServerConfig, ServerHandshake};
    use std::io::{Read, Write};
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let cfg = ServerConfig {
        caps,
        session: Some(session),
        auth: Authentication::None,
    };
    let mut hs = ServerHandshake::new(cfg, [9; 32]).unwrap();
    let (mut out, mut buf, mut rest) = (Vec::new(), [0u8; 4096], Vec::new());
    while !hs.is_done() {
        out.clear();
        hs.take_output(&mut out);
        s.write_all(&out).unwrap();
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the source closed during the handshake");
        let used = hs.receive(&buf[..n]).unwrap();
        rest.extend_from_slice(&buf[used..n]);
    }
    out.clear();
    hs.take_output(&mut out);
    s.write_all(&out).unwrap();
    (s, rest)
}

/// A destination that never ACKs the round but sends a frame a byte at a time, each
/// byte well within the read timeout: the source's wait for its ACK still ends at
/// `ack_timeout` (at most one read timeout late), not once the whole frame arrived.
fn a_trickled_frame_cannot_stretch_the_ack_wait(backend: Backend) {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // 40 bytes, 150 ms apart: 6 s to trickle, against an ACK timeout of 1 s.
    const LEN: usize = 40;
    let listener = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent2, stop2) = (sent.clone(), stop.clone());
    let fake = std::thread::spawn(move || {
        let caps = pagewire_protocol::Capabilities::new(4096);
        let (mut s, _) = fake_destination(listener, caps, session(8));
        // An extension frame's envelope, then its body a byte at a time.
        s.write_all(&[0x80, 0, 0, 0]).unwrap();
        s.write_all(&(LEN as u32).to_le_bytes()).unwrap();
        for _ in 0..LEN {
            std::thread::sleep(Duration::from_millis(150));
            if stop2.load(Ordering::SeqCst) || s.write_all(&[0]).is_err() {
                break;
            }
            sent2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut cfg = SourceConfig::new(session(8), Authentication::None);
    cfg.backend = backend;
    cfg.channels = 1;
    cfg.codec = CodecId::RAW.into();
    cfg.ack_timeout = Duration::from_secs(1);
    cfg.send_timeout = Duration::from_secs(1);
    let mut src = Source::connect(addr, memory(1), cfg).unwrap();
    let r = src.send_round(vec![(RegionId(0), DirtyBitmap::full(16))], false);
    let at = sent.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let err = r.unwrap_err();
    eprintln!("{backend:?}: {err} with {at} of {LEN} bytes trickled");
    assert!(
        matches!(
            *err.error,
            MigrationError::Timeout {
                what: Wait::Ack,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        at < LEN,
        "the source waited for the whole trickled frame ({at} of {LEN} bytes)"
    );
    drop(src);
    fake.join().unwrap();
}

#[test]
fn a_trickled_frame_cannot_stretch_the_ack_wait_over_tcp() {
    a_trickled_frame_cannot_stretch_the_ack_wait(Backend::Tcp);
}

#[test]
fn a_trickled_frame_cannot_stretch_the_ack_wait_over_io_uring() {
    if !uring_available() {
        return;
    }
    a_trickled_frame_cannot_stretch_the_ack_wait(Backend::Uring {
        fallback_to_tcp: false,
    });
}

/// A destination written from PROTOCOL.md may choose any frame limit from a page and
/// 1024 bytes, whatever `max_pages` it keeps: the source then sends frames of fewer
/// pages, each within the limit, and the round completes.
#[test]
fn the_smallest_frame_limit_a_destination_may_choose_is_kept() {
    use pagewire_protocol::{Ack, AckKind, Capabilities, Envelope, FrameType};
    use std::io::{Read, Write};
    let limit = 4096 + 1024;
    let listener = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || -> (usize, usize) {
        let mut caps = Capabilities::new(4096);
        caps.max_frame_bytes = limit;
        let (mut s, mut stream) = fake_destination(listener, caps, session(9));
        let mut out = Vec::new();
        // Frames by their envelopes alone, each within the limit, until END_OF_ROUND.
        let (mut frames, mut largest) = (0, 0);
        loop {
            while stream.len() >= Envelope::LEN {
                let len = u32::from_le_bytes(stream[4..8].try_into().unwrap()) as usize;
                let whole = Envelope::LEN + len;
                assert!(
                    whole <= limit as usize,
                    "a frame of {whole} bytes, limit {limit}"
                );
                if stream.len() < whole {
                    break;
                }
                let ty = FrameType(stream[0]);
                stream.drain(..whole);
                frames += 1;
                largest = largest.max(whole);
                if ty == FrameType::END_OF_ROUND {
                    out.clear();
                    Frame::Ack(Ack {
                        kind: AckKind::ROUND,
                        value: 0,
                    })
                    .encode(&mut out)
                    .unwrap();
                    s.write_all(&out).unwrap();
                    return (frames, largest);
                }
            }
            let mut buf = vec![0u8; 1 << 16];
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the source closed before END_OF_ROUND");
            stream.extend_from_slice(&buf[..n]);
        }
    });
    let mut cfg = SourceConfig::new(session(9), Authentication::None);
    cfg.channels = 1;
    cfg.codec = CodecId::RAW.into();
    let mem = memory(1);
    fill(&mem, 5);
    let mut src = Source::connect(addr, mem, cfg).unwrap();
    let r = src.send_round(vec![(RegionId(0), DirtyBitmap::full(256))], false);
    let (frames, largest) = fake.join().unwrap();
    eprintln!("{frames} frames, the largest {largest} bytes (limit {limit}): {r:?}");
    r.unwrap();
}

/// A source configured to send zstd only, against a destination that does not decode
/// it: the source refuses the WELCOME with REJECT `NO_COMMON_CODEC` naming zstd, in
/// place of CONFIRM, rather than confirming a session and closing it after READY.
#[test]
fn a_source_of_one_codec_refuses_a_welcome_without_it() {
    use pagewire_protocol::{
        Capabilities, CodecSet, HandshakeError, RejectReason, ServerConfig, ServerHandshake,
    };
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || -> (Result<usize, HandshakeError>, String) {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut caps = Capabilities::new(4096);
        caps.codecs = CodecSet::from_ids([CodecId::RAW, CodecId::ZERO, CodecId::LZ4]).unwrap();
        let cfg = ServerConfig {
            caps,
            session: Some(session(10)),
            auth: Authentication::None,
        };
        let mut hs = ServerHandshake::new(cfg, [9; 32]).unwrap();
        let (mut out, mut buf) = (Vec::new(), [0u8; 4096]);
        let r = loop {
            out.clear();
            hs.take_output(&mut out);
            s.write_all(&out).unwrap();
            if hs.is_done() {
                break Ok(0);
            }
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the source closed without a word");
            if let Err(e) = hs.receive(&buf[..n]) {
                break Err(e);
            }
        };
        (r, hs.peer_message().unwrap_or_default().to_owned())
    });
    let mut cfg = SourceConfig::new(session(10), Authentication::None);
    cfg.channels = 1;
    cfg.codec = CodecId::ZSTD.into();
    let Err(err) = Source::connect(addr, memory(1), cfg) else {
        panic!("the source connected to a destination without zstd");
    };
    let (heard, message) = fake.join().unwrap();
    eprintln!("source: {err}; destination: {heard:?}, {message:?}");
    assert!(
        matches!(
            heard,
            Err(HandshakeError::Rejected {
                reason: RejectReason::NO_COMMON_CODEC,
                ..
            })
        ),
        "the destination heard {heard:?}"
    );
    assert!(message.contains("zstd"), "{message:?}");
    assert!(err.to_string().contains("zstd"), "{err}");
}
