//! The switchover under loss (PROTOCOL.md, Switchover): a relay on 127.0.0.1 between a
//! real source and a real destination loses one of the four last frames on channel 0
//! (COMPLETE, ACK COMPLETE, COMMIT, ACK COMMITTED): it swallows the frame and keeps the
//! connection open, cuts the connection right before it, or cuts it in the middle of
//! the frame's bytes (and, for COMMIT, swallows it and the source's close too, so only
//! the destination's idle timeout ends its wait). In every case the invariant holds: never does the destination
//! report success while the source may resume the guest (or resumed it). And each case
//! ends on both sides as PROTOCOL.md's table says.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use pagewire::{
    DestinationConfig, DestinationListener, DeviceStateCheck, DirtyBitmap, Failed, Migrated,
    MigrationError, Source, SourceConfig, Switchover,
};
use pagewire_protocol::{
    Abort, AbortReason, Ack, AckKind, Authentication, Envelope, Frame, FrameType, Limits,
};

/// One of the last four frames on channel 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Last {
    Complete,
    AckComplete,
    Commit,
    AckCommitted,
}

impl Last {
    /// Whether the frame travels from the source to the destination.
    fn sent_by_source(self) -> bool {
        matches!(self, Last::Complete | Last::Commit)
    }

    /// Whether `frame` (whole, envelope first) is this one.
    fn is(self, frame: &[u8]) -> bool {
        let ack = |kind: AckKind| frame[0] == FrameType::ACK.0 && frame.get(8) == Some(&kind.0);
        match self {
            Last::Complete => frame[0] == FrameType::COMPLETE.0,
            Last::Commit => frame[0] == FrameType::COMMIT.0,
            Last::AckComplete => ack(AckKind::COMPLETE),
            Last::AckCommitted => ack(AckKind::COMMITTED),
        }
    }
}

/// How the relay loses the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loss {
    /// Nothing lost: the reference run.
    None,
    /// The frame is dropped; the connection stays open (the sides' timeouts end it).
    Swallow,
    /// The connection is cut (both ways) right before the frame.
    CutBefore,
    /// Half the frame's bytes go through, then the connection is cut.
    CutInside,
    /// The frame is dropped, and so is the sender's close: the receiver's side of the
    /// connection stays open and silent until the relay drops (its idle timeout ends
    /// the wait).
    SwallowAndHold,
    /// The frame (an ACK) goes through with a forged ACK COMMITTED of the same value
    /// right behind it, in the same write: a destination that answers COMMIT before
    /// COMMIT was sent.
    ForgedCommittedAfter,
    /// As `ForgedCommittedAfter`, with 5,000 empty extension frames between the two
    /// (40 KB, one segment within loopback's first window), so a source that reads
    /// only a few frames ahead misses it.
    ForgedCommittedBehindPadding,
    /// The frame is dropped, and the source gets ABORT `CHANNEL_FAILED` on channel 1,
    /// whose final round it has already seen acknowledged: a destination that failed
    /// there and keeps channel 0 open and silent.
    AbortOnChannel1,
    /// As `AbortOnChannel1`, with an ACK COMMITTED on channel 1 instead, a frame the
    /// session's rules refuse there.
    BadAckOnChannel1,
}

/// A frame-aware TCP relay: forwards whole frames both ways, and on channel 0 loses
/// `last` as `loss` says. Every thread ends when its sockets close or the relay drops.
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Set once the relay lost the frame.
    lost: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The relay's connection to the source on channel 1, once its HELLO passed.
type Channel1 = Arc<Mutex<Option<TcpStream>>>;

impl Relay {
    fn start(upstream: SocketAddr, last: Last, loss: Loss) -> Relay {
        let listener = TcpListener::bind(loopback()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let (stop2, lost2) = (stop.clone(), lost.clone());
        let channel1: Channel1 = Arc::default();
        let thread = std::thread::spawn(move || {
            let mut pumps = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                for s in [&down, &up] {
                    s.set_nodelay(true).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                }
                // The channel index, from the HELLO the source sends first.
                let channel = Arc::new(Mutex::new(None));
                for (from, to, from_source) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap(), true),
                    (up, down, false),
                ] {
                    let lose = (last.sent_by_source() == from_source).then_some((last, loss));
                    let (stop, lost, channel) = (stop2.clone(), lost2.clone(), channel.clone());
                    let channel1 = channel1.clone();
                    pumps.push(std::thread::spawn(move || {
                        pump(
                            from,
                            to,
                            from_source,
                            lose,
                            &channel,
                            &channel1,
                            &stop,
                            &lost,
                        )
                    }));
                }
            }
            for p in pumps {
                let _ = p.join();
            }
        });
        Relay {
            addr,
            stop,
            lost,
            thread: Some(thread),
        }
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Forwards whole frames from `from` to `to`; on channel 0 loses the frame `lose`
/// names (once).
#[allow(clippy::too_many_arguments)]
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    from_source: bool,
    lose: Option<(Last, Loss)>,
    channel: &Mutex<Option<u16>>,
    channel1: &Channel1,
    stop: &AtomicBool,
    lost: &AtomicBool,
) {
    let cut = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut hold = false;
    while !stop.load(Ordering::Relaxed) {
        if hold {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        let mut out = Vec::new();
        while pending.len() - at >= Envelope::LEN {
            let len = u32::from_le_bytes(pending[at + 4..at + 8].try_into().unwrap());
            let end = at + Envelope::LEN + len as usize;
            if pending.len() < end {
                break;
            }
            let frame = &pending[at..end];
            at = end;
            if from_source && frame[0] == FrameType::HELLO.0 {
                let env = Envelope::parse(frame[..8].try_into().unwrap(), &Limits::handshake());
                if let Ok(Frame::Hello(h)) =
                    env.and_then(|e| Frame::decode(e, &frame[8..], &Limits::handshake()))
                {
                    *channel.lock().unwrap() = Some(h.channel.0);
                    if h.channel.0 == 1 {
                        *channel1.lock().unwrap() = from.try_clone().ok();
                    }
                }
            }
            let on_channel_0 = *channel.lock().unwrap() == Some(0);
            match lose {
                Some((last, loss))
                    if on_channel_0 && last.is(frame) && !lost.load(Ordering::Relaxed) =>
                {
                    lost.store(true, Ordering::Relaxed);
                    match loss {
                        Loss::None => out.extend_from_slice(frame),
                        Loss::Swallow => {}
                        Loss::SwallowAndHold => hold = true,
                        Loss::AbortOnChannel1 | Loss::BadAckOnChannel1 => {
                            let mut injected = Vec::new();
                            match loss {
                                Loss::AbortOnChannel1 => Frame::Abort(Abort {
                                    reason: AbortReason::CHANNEL_FAILED,
                                    message: "the relay's channel 1 failed",
                                }),
                                _ => Frame::Ack(Ack {
                                    kind: AckKind::COMMITTED,
                                    value: 1,
                                }),
                            }
                            .encode(&mut injected)
                            .unwrap();
                            let to_source = channel1.lock().unwrap();
                            let mut s = to_source.as_ref().expect("channel 1 is open");
                            s.write_all(&injected).unwrap();
                        }
                        Loss::ForgedCommittedAfter | Loss::ForgedCommittedBehindPadding => {
                            out.extend_from_slice(frame);
                            if loss == Loss::ForgedCommittedBehindPadding {
                                for _ in 0..5_000 {
                                    // An extension frame (type 0x80) with an empty body.
                                    out.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0]);
                                }
                            }
                            let mut forged = frame.to_vec();
                            forged[8] = AckKind::COMMITTED.0;
                            out.extend_from_slice(&forged);
                        }
                        Loss::CutBefore | Loss::CutInside => {
                            if loss == Loss::CutInside {
                                out.extend_from_slice(&frame[..frame.len() / 2]);
                            }
                            let _ = to.write_all(&out);
                            cut(&from, &to);
                            return;
                        }
                    }
                }
                _ => out.extend_from_slice(frame),
            }
        }
        pending.drain(..at);
        if to.write_all(&out).is_err() {
            break;
        }
    }
    cut(&from, &to);
}

/// How a case ended on both sides.
struct Ended {
    destination: Result<Migrated, MigrationError>,
    /// `migrate`'s result on the source.
    source: Result<(), Failed>,
    /// Whether the simulated guest runs on the source afterwards.
    running_on_source: bool,
    lost: bool,
}

impl Ended {
    /// Prints how the case ended on both sides.
    fn report(&self, name: &str) {
        eprintln!(
            "{name}: destination {:?}; source {:?}",
            self.destination.as_ref().map(|m| m.final_round),
            self.source.as_ref().map_err(|f| f.to_string())
        );
    }

    /// The invariant: the destination's success and a guest the source may run never
    /// come together.
    fn check_invariant(&self, case: &str) {
        let source_may_run = match &self.source {
            Ok(()) => false,
            Err(f) => f.may_resume_source(),
        };
        if self.destination.is_ok() {
            assert!(
                !source_may_run,
                "{case}: the destination runs the guest and the source may resume it"
            );
            assert!(
                !self.running_on_source,
                "{case}: the guest runs on both hosts"
            );
        }
        // The source resumes exactly when it may.
        assert_eq!(self.running_on_source, source_may_run, "{case}");
    }
}

const SESSION: u8 = 31;

fn destination() -> (SocketAddr, JoinHandle<Result<Migrated, MigrationError>>) {
    let mut cfg = DestinationConfig::new(session(SESSION), Authentication::None);
    // Well above the source's 2 s timeouts: a channel idle for 2 s before the first
    // pause happened under ThreadSanitizer on a slow machine (two migrations at once
    // on 2 cores), and the migration failed before the case it tests.
    cfg.idle_timeout = Duration::from_secs(6);
    cfg.accept_timeout = Duration::from_secs(10);
    let l = DestinationListener::bind(loopback(), cfg).unwrap();
    let addr = l.local_addr().unwrap();
    (addr, std::thread::spawn(move || l.accept(None)?.wait()))
}

fn source_config() -> SourceConfig {
    let mut cfg = SourceConfig::new(session(SESSION), Authentication::None);
    cfg.channels = 2;
    cfg.ack_timeout = Duration::from_secs(2);
    cfg.send_timeout = Duration::from_secs(2);
    cfg.precopy.max_rounds = 3;
    cfg
}

/// A whole migration (`pagewire::migrate` with a running simulated guest and one
/// device-state section) through a relay that loses `last` as `loss` says.
fn run(last: Last, loss: Loss) -> Ended {
    let mem = memory(1);
    fill(&mem, 7);
    let (addr, dst) = destination();
    let relay = Relay::start(addr, last, loss);
    let guest = guest(mem.clone(), 2_000, 3);
    let src = Source::connect(relay.addr, mem, source_config()).unwrap();
    let source = migrate_with_a_section(src, guest.log(), guest.vcpus());
    let destination = within(Duration::from_secs(60), "the destination", move || {
        dst.join().unwrap()
    });
    let (pauses, resumes) = guest.pauses_and_resumes();
    assert_eq!(
        pauses, 1,
        "the guest was paused once, for the final round (source: {source:?}; destination: \
         {destination:?})"
    );
    let ended = Ended {
        destination,
        source,
        running_on_source: guest.is_running(),
        lost: relay.lost(),
    };
    assert_eq!(resumes, u64::from(ended.running_on_source));
    drop(relay);
    ended
}

/// `pagewire::migrate` with one device-state section (`cpu`/0, 300 bytes), bounded;
/// the source's channels are closed when it returns, so a destination still waiting
/// learns it then.
fn migrate_with_a_section(
    src: Source,
    log: impl pagewire::DirtyLog + 'static,
    vcpus: impl pagewire::VcpuControl + 'static,
) -> Result<(), Failed> {
    within(Duration::from_secs(60), "the migration", move || {
        let (mut src, mut log, mut vcpus) = (src, log, vcpus);
        let mut device =
            |out: &mut pagewire::DeviceStateWriter<'_>| -> Result<(), pagewire::DirtyLogError> {
                out.write_section("cpu", 0, &[0x5a; 300])?;
                Ok(())
            };
        pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut device).map(drop)
    })
}

fn is_unknown(source: &Result<(), Failed>) -> bool {
    matches!(source, Err(f) if matches!(*f.error, MigrationError::OutcomeUnknown { .. }))
}

/// Runs one case, checks the invariant and the outcome PROTOCOL.md's table gives.
fn case(last: Last, loss: Loss) {
    let name = format!("{last:?} {loss:?}");
    let e = run(last, loss);
    e.report(&name);
    assert!(
        e.lost || loss == Loss::None,
        "{name}: the relay saw the frame"
    );
    e.check_invariant(&name);
    let no_commit =
        |d: &Result<Migrated, MigrationError>| matches!(d, Err(MigrationError::NoCommit { .. }));
    match (loss, last) {
        (Loss::None, _) => {
            assert!(e.destination.is_ok(), "{name}");
            assert!(e.source.is_ok(), "{name}");
        }
        // No ACK COMPLETE: the source fails before COMMIT and resumes the guest; the
        // destination never runs it.
        (_, Last::Complete) => {
            let Err(f) = &e.source else {
                panic!("{name}: the source succeeded")
            };
            assert!(f.may_resume_source(), "{name}: {f}");
            assert!(e.running_on_source, "{name}");
            assert!(e.destination.is_err(), "{name}");
            assert!(
                !no_commit(&e.destination),
                "{name}: it never sent ACK COMPLETE"
            );
        }
        (_, Last::AckComplete) => {
            let Err(f) = &e.source else {
                panic!("{name}: the source succeeded")
            };
            assert!(f.may_resume_source(), "{name}: {f}");
            assert!(e.running_on_source, "{name}");
            assert!(
                no_commit(&e.destination),
                "{name}: {:?}",
                e.destination.err()
            );
        }
        // COMMIT lost: the destination fails, the source does not know.
        (_, Last::Commit) => {
            assert!(is_unknown(&e.source), "{name}");
            assert!(!e.running_on_source, "{name}");
            assert!(
                no_commit(&e.destination),
                "{name}: {:?}",
                e.destination.err()
            );
            if loss == Loss::SwallowAndHold {
                // Nothing closed channel 0: the idle timeout after ACK COMPLETE ended
                // the wait.
                assert!(
                    matches!(
                        &e.destination,
                        Err(MigrationError::NoCommit { source, .. })
                            if matches!(
                                **source,
                                MigrationError::Timeout {
                                    channel: Some(0),
                                    what: pagewire::error::Wait::Commit,
                                    ..
                                }
                            )
                    ),
                    "{name}: {:?}",
                    e.destination.err()
                );
            }
        }
        // ACK COMMITTED lost: the destination owns the guest, the source does not know.
        (_, Last::AckCommitted) => {
            assert!(is_unknown(&e.source), "{name}");
            assert!(!e.running_on_source, "{name}");
            let m = e.destination.as_ref().expect("the destination took COMMIT");
            assert!(m.final_round > 0);
            assert_eq!(m.device_state.len(), 1);
        }
    }
}

#[test]
fn nothing_lost_hands_the_guest_over() {
    case(Last::Commit, Loss::None);
}

#[test]
fn complete_lost() {
    for loss in [Loss::Swallow, Loss::CutBefore, Loss::CutInside] {
        case(Last::Complete, loss);
    }
}

#[test]
fn ack_complete_lost() {
    for loss in [Loss::Swallow, Loss::CutBefore, Loss::CutInside] {
        case(Last::AckComplete, loss);
    }
}

#[test]
fn commit_lost() {
    for loss in [
        Loss::Swallow,
        Loss::CutBefore,
        Loss::CutInside,
        Loss::SwallowAndHold,
    ] {
        case(Last::Commit, loss);
    }
}

#[test]
fn ack_committed_lost() {
    for loss in [Loss::Swallow, Loss::CutBefore, Loss::CutInside] {
        case(Last::AckCommitted, loss);
    }
}

/// A destination that fails on channel 1 once that channel's final round is
/// acknowledged, says so with ABORT there only, and keeps channel 0 open and silent:
/// the source learns it from channel 1 while it waits on channel 0. Before COMMIT it
/// fails with that ABORT and keeps the guest; after COMMIT the outcome is unknown, and
/// names it. An ACK COMMITTED on channel 1, which the session's rules refuse there,
/// fails the wait the same way. Before channel 1 was read during the switchover, the
/// source waited out its `ack_timeout` on channel 0 and failed with a timeout.
#[test]
fn an_abort_on_another_channel_ends_the_switchover_wait() {
    let aborted = |e: &MigrationError| match e {
        // The error names the channel the ABORT came on.
        MigrationError::PeerAborted {
            channel: 1,
            reason,
            message,
        } => *reason == AbortReason::CHANNEL_FAILED && message.contains("relay"),
        // The refused ACK on channel 1.
        MigrationError::Rule { channel: 1, .. } => true,
        _ => false,
    };
    let cases = [Last::Complete, Last::AckComplete, Last::Commit]
        .into_iter()
        .map(|last| (last, Loss::AbortOnChannel1))
        .chain([(Last::AckComplete, Loss::BadAckOnChannel1)]);
    for (last, loss) in cases {
        let name = format!("{last:?} with {loss:?}");
        let e = run(last, loss);
        e.report(&name);
        assert!(e.lost, "{name}: the relay saw the frame");
        e.check_invariant(&name);
        assert!(e.destination.is_err(), "{name}");
        let Err(f) = &e.source else {
            panic!("{name}: the source succeeded")
        };
        match last {
            Last::Commit => match &*f.error {
                MigrationError::OutcomeUnknown { source } => {
                    assert!(aborted(source), "{name}: {f}")
                }
                other => panic!("{name}: not an unknown outcome: {other}"),
            },
            _ => {
                assert!(f.may_resume_source(), "{name}: {f}");
                assert!(e.running_on_source, "{name}");
                assert!(aborted(&f.error), "{name}: {f}");
            }
        }
    }
}

/// A destination that sends ACK COMMITTED before COMMIT was sent (glued to ACK
/// COMPLETE): the source reads it before it sends COMMIT and refuses it, and fails
/// with the guest its own; the destination never gets COMMIT. Before the source read
/// what had arrived ahead of COMMIT, it took that ACK as the answer to its COMMIT and
/// reported the guest handed over.
#[test]
fn an_ack_committed_sent_before_commit_is_refused() {
    // Glued to ACK COMPLETE, and behind 5,000 extension frames (a source that read
    // only 64 frames ahead took it).
    for loss in [
        Loss::ForgedCommittedAfter,
        Loss::ForgedCommittedBehindPadding,
    ] {
        forged_ack_committed(loss, "before this source sent COMMIT");
    }
}

fn forged_ack_committed(loss: Loss, said: &str) {
    let e = run(Last::AckComplete, loss);
    assert!(e.lost, "the relay saw ACK COMPLETE");
    e.check_invariant("forged ACK COMMITTED");
    let Err(f) = &e.source else {
        panic!("the source took the forged ACK COMMITTED")
    };
    assert!(f.may_resume_source(), "{f}");
    let text = f.to_string();
    assert!(
        text.contains("sent ACK COMMITTED") && text.contains(said),
        "{loss:?}: {f}"
    );
    assert!(e.running_on_source);
    assert!(
        matches!(e.destination, Err(MigrationError::NoCommit { .. })),
        "{:?}",
        e.destination.err()
    );
}

/// The source's own API, without `migrate`: `complete()` tells the three outcomes apart
/// by type.
#[test]
fn complete_returns_the_switchover() {
    for (last, loss) in [
        (Last::Commit, Loss::None),
        (Last::AckCommitted, Loss::CutInside),
        (Last::AckComplete, Loss::CutInside),
    ] {
        let mem = memory(1);
        fill(&mem, 9);
        let (addr, dst) = destination();
        let relay = Relay::start(addr, last, loss);
        let mut src = Source::connect(relay.addr, mem.clone(), source_config()).unwrap();
        let all: Vec<_> = mem
            .region_ids()
            .map(|id| (id, DirtyBitmap::full(mem.pages(id).unwrap())))
            .collect();
        src.send_round(all, true).unwrap();
        let result = src.complete();
        drop(src);
        let destination = dst.join().unwrap();
        match (last, loss) {
            (_, Loss::None) => {
                assert!(matches!(result, Ok(Switchover::Committed)), "{result:?}");
                assert!(destination.is_ok());
            }
            (Last::AckCommitted, _) => {
                let Ok(Switchover::Unknown { error }) = result else {
                    panic!("{result:?}")
                };
                eprintln!("unknown: {error}");
                assert!(destination.is_ok());
            }
            _ => {
                let f = result.expect_err("no ACK COMPLETE");
                assert!(f.may_resume_source());
                assert!(matches!(destination, Err(MigrationError::NoCommit { .. })));
            }
        }
        drop(relay);
    }
}

/// A destination VMM that could not restore the device state says so before ACK
/// COMPLETE (`DestinationConfig::check_device_state`): the destination answers ABORT
/// `APPLY_FAILED`, the source resumes its guest, and neither side reports success. A
/// check that panics refuses the same way (its thread ended before, without a word to
/// the source, which waited out its ACK timeout). A check that accepts sees the
/// sections and changes nothing.
#[test]
fn device_state_the_vmm_refuses_fails_the_migration_before_the_handover() {
    for how in ["refuse", "panic", "accept"] {
        let refuse = how != "accept";
        let mem = memory(1);
        fill(&mem, 5);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut cfg = DestinationConfig::new(session(SESSION), Authentication::None);
        cfg.idle_timeout = Duration::from_secs(2);
        cfg.accept_timeout = Duration::from_secs(10);
        let s = seen.clone();
        cfg.check_device_state = Some(DeviceStateCheck::new(move |sections| {
            s.lock().unwrap().extend(
                sections
                    .iter()
                    .map(|d| (d.name.clone(), d.instance, d.data.len())),
            );
            match how {
                "refuse" => Err("device state has 1 vCPUs, this machine 2".into()),
                "panic" => panic!("the vCPUs' state did not load"),
                _ => Ok(()),
            }
        }));
        let l = DestinationListener::bind(loopback(), cfg).unwrap();
        let addr = l.local_addr().unwrap();
        let dst = std::thread::spawn(move || l.accept(None)?.wait());
        let guest = guest(mem.clone(), 2_000, 3);
        let src = Source::connect(addr, mem, source_config()).unwrap();
        let source = migrate_with_a_section(src, guest.log(), guest.vcpus());
        let destination = within(Duration::from_secs(60), "the destination", move || {
            dst.join().unwrap()
        });
        assert_eq!(*seen.lock().unwrap(), [("cpu".to_string(), 0, 300)]);
        if refuse {
            let e = destination.expect_err("a refused device state never hands over");
            let said = match how {
                "panic" => "panicked: the vCPUs' state did not load",
                _ => "vCPUs",
            };
            assert!(
                matches!(e, MigrationError::DeviceStateRefused { ref what } if what.contains(said)),
                "{e}"
            );
            let f = source.expect_err("the destination aborted before ACK COMPLETE");
            assert!(
                matches!(
                    *f.error,
                    MigrationError::PeerAborted { reason, .. } if reason == AbortReason::APPLY_FAILED
                ),
                "{}",
                f.error
            );
            assert!(f.may_resume_source());
            assert!(guest.is_running(), "the source resumed its guest");
        } else {
            assert!(destination.is_ok(), "{destination:?}");
            assert!(source.is_ok(), "{source:?}");
            assert!(!guest.is_running(), "the guest was handed over");
        }
    }
}
