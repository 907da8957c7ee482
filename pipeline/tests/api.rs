//! The embedding API as a VMM uses it: progress while `Migration::run` holds the
//! source, the per-round callback, the cap policy, streamed and fallible device state,
//! dirty logging switched off on every way out, and errors that print their cause.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use pagewire::{
    CapPolicy, CodecPolicy, DestinationConfig, DestinationListener, DeviceState, DeviceStateWriter,
    DirtyBitmap, DirtyLog, DirtyLogError, Failed, GuestMemory, Migrated, Migration, MigrationError,
    NoDeviceState, Phase, Prefault, RegionId, RoundAction, Source, SourceConfig, StopReason,
};
use pagewire_protocol::{Authentication, CodecId};

type DestinationThread = std::thread::JoinHandle<Result<Migrated, MigrationError>>;

/// A destination for `mem`'s layout and a connected source.
fn pair(
    mem: &Arc<GuestMemory>,
    n: u8,
    tune: impl FnOnce(&mut SourceConfig),
) -> (Source, DestinationThread) {
    let mut dcfg = DestinationConfig::new(session(n), Authentication::None);
    dcfg.idle_timeout = Duration::from_secs(10);
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let dst = std::thread::spawn(move || l.accept(None)?.wait());
    let mut cfg = SourceConfig::new(session(n), Authentication::None);
    cfg.codec = CodecId::LZ4.into();
    cfg.ack_timeout = Duration::from_secs(10);
    cfg.precopy.max_rounds = 6;
    tune(&mut cfg);
    (Source::connect(addr, mem.clone(), cfg).unwrap(), dst)
}

#[test]
fn progress_is_readable_while_the_migration_runs() {
    let mem = memory(16);
    fill(&mem, 1);
    let g = guest(mem.clone(), 5_000, 1);
    let (mut src, dst) = pair(&mem, 40, |c| c.bandwidth_limit = 40 << 20);
    let progress = src.progress();
    assert_eq!(progress.phase(), Phase::Setup);
    let done = Arc::new(AtomicBool::new(false));
    let (p2, d2) = (progress.clone(), done.clone());
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..100_000 {
            let s = p2.snapshot();
            if seen.last().is_none_or(|(ph, _)| *ph != s.phase) {
                seen.push((s.phase, s.pages));
            }
            if d2.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        seen
    });
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let mut rounds = Vec::new();
    let stats = Migration::new(&mut src, &mut log, &mut vcpus)
        .on_round(|p| {
            rounds.push((p.round, p.pages, p.dirty_pages, p.expected_downtime));
            RoundAction::Continue
        })
        .run()
        .unwrap();
    done.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    drop(src);
    dst.join().unwrap().unwrap();
    let phases: Vec<Phase> = seen.iter().map(|(p, _)| *p).collect();
    assert!(phases.contains(&Phase::Precopy), "{seen:?}");
    assert_eq!(progress.phase(), Phase::Completed);
    assert_eq!(progress.snapshot().pages, stats.pages.total());
    // The callback ran after every pre-copy round with growing totals.
    assert_eq!(rounds.len() as u32 + 1, stats.rounds, "{rounds:?}");
    assert!(rounds.windows(2).all(|w| w[1].1 > w[0].1), "{rounds:?}");
    assert!(rounds[0].1 >= mem.pages(RegionId(0)).unwrap());
    assert!(rounds[0].3.is_some(), "an estimate after the first round");
}

/// A VMM slower between rounds than the destination's idle timeout (here its round
/// callback; a dirty-log sync of a large guest, a pause, device state alike): the
/// source's channels send keepalives meanwhile (`SourceConfig::keepalive`), so the
/// destination does not take it for dead. Before, every channel was silent and the
/// destination failed the session after its idle timeout.
#[test]
fn a_vmm_slower_than_the_idle_timeout_between_rounds_keeps_its_channels_alive() {
    let mem = memory(4);
    fill(&mem, 14);
    let mut dcfg = DestinationConfig::new(session(58), Authentication::None);
    dcfg.idle_timeout = Duration::from_millis(800);
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let dst = std::thread::spawn(move || l.accept(None)?.wait());
    let mut cfg = SourceConfig::new(session(58), Authentication::None);
    cfg.keepalive = Duration::from_millis(100);
    cfg.precopy.max_rounds = 3;
    let mut src = Source::connect(addr, mem.clone(), cfg).unwrap();
    let g = guest(mem.clone(), 2_000, 14);
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let stats = Migration::new(&mut src, &mut log, &mut vcpus)
        .on_round(|p| {
            if p.round == 0 {
                std::thread::sleep(Duration::from_millis(2_500));
            }
            RoundAction::Continue
        })
        .run()
        .unwrap();
    drop(src);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&mem, &migrated.memory), None);
    assert!(stats.rounds >= 2, "{stats}");
}

#[test]
fn the_round_callback_can_switch_over_or_cancel() {
    let mem = memory(8);
    fill(&mem, 2);
    // Switch over after the first round, whatever the estimate.
    let g = guest(mem.clone(), 20_000, 2);
    let (mut src, dst) = pair(&mem, 41, |c| {
        c.precopy.downtime_limit = Duration::from_nanos(1);
    });
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let stats = Migration::new(&mut src, &mut log, &mut vcpus)
        .on_round(|_| RoundAction::SwitchOver)
        .run()
        .unwrap();
    drop(src);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(stats.rounds, 2);
    assert_eq!(stats.stop_reason, format!("{:?}", StopReason::Requested));
    assert_eq!(first_difference(&mem, &migrated.memory), None);
    drop(g);

    // Cancel: the guest never paused, logging is off, the destination does not succeed.
    let g = guest(mem.clone(), 20_000, 3);
    let (mut src, dst) = pair(&mem, 42, |_| {});
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let f = Migration::new(&mut src, &mut log, &mut vcpus)
        .on_round(|_| RoundAction::Cancel)
        .run()
        .unwrap_err();
    assert!(matches!(*f.error, MigrationError::Cancelled), "{f}");
    assert!(f.running_on_source);
    assert_eq!(g.pauses_and_resumes(), (0, 0));
    assert!(!g.is_logging());
    assert_eq!(src.progress().phase(), Phase::Failed);
    drop(src);
    assert!(dst.join().unwrap().is_err());
}

#[test]
fn a_cap_with_the_fail_policy_fails_with_the_guest_running() {
    let mem = memory(8);
    fill(&mem, 4);
    let g = guest(mem.clone(), 50_000, 4);
    let (mut src, dst) = pair(&mem, 43, |c| {
        c.precopy.downtime_limit = Duration::from_nanos(1);
        c.precopy.max_rounds = 2;
        c.precopy.on_cap = CapPolicy::Fail;
    });
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let f = pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut NoDeviceState).unwrap_err();
    let text = f.to_string();
    assert!(
        matches!(
            *f.error,
            MigrationError::NotConverged {
                reason: StopReason::RoundCap,
                ..
            }
        ),
        "{f:?}"
    );
    assert!(text.contains("round cap"), "{text}");
    assert!(f.running_on_source);
    assert_eq!(g.pauses_and_resumes(), (0, 0), "never paused");
    assert!(g.is_running() && !g.is_logging());
    drop(src);
    assert!(dst.join().unwrap().is_err());
}

/// A device with a pre-copy phase: 3 MiB streamed in odd-sized writes over two
/// pre-copy pieces, then a final section.
struct Streamer {
    pieces: u32,
    fail_save: bool,
}

fn blob(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
        .collect()
}

impl DeviceState for Streamer {
    fn precopy(&mut self, out: &mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError> {
        if self.pieces < 2 {
            let data = blob(self.pieces, 3 << 20);
            let mut s = out.section("vfio-precopy", self.pieces, data.len() as u64)?;
            for c in data.chunks(7777) {
                s.write_all(c)?;
            }
            s.finish()?;
            self.pieces += 1;
        }
        Ok(())
    }

    fn pending_bytes(&self) -> u64 {
        4096
    }

    fn save(&mut self, out: &mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError> {
        if self.fail_save {
            return Err("the device would not quiesce".into());
        }
        out.write_section("vfio-final", 0, &blob(99, 4096))?;
        out.write_section("empty", 0, &[])?;
        Ok(())
    }
}

#[test]
fn device_state_streams_in_precopy_and_at_downtime() {
    let mem = memory(8);
    fill(&mem, 5);
    let g = guest(mem.clone(), 10_000, 5);
    let (mut src, dst) = pair(&mem, 44, |c| {
        c.precopy.max_rounds = 4;
        c.precopy.downtime_limit = Duration::from_nanos(1);
    });
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let mut dev = Streamer {
        pieces: 0,
        fail_save: false,
    };
    let stats = Migration::new(&mut src, &mut log, &mut vcpus)
        .device_state(&mut dev)
        .on_round(|p| {
            if p.round >= 2 {
                RoundAction::SwitchOver
            } else {
                RoundAction::Continue
            }
        })
        .run()
        .unwrap();
    assert_eq!(
        src.progress().snapshot().device_state_bytes,
        2 * (3 << 20) + 4096
    );
    drop(src);
    let m = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&mem, &m.memory), None, "{stats}");
    let names: Vec<(&str, u32, usize)> = m
        .device_state
        .iter()
        .map(|s| (s.name.as_str(), s.instance, s.data.len()))
        .collect();
    assert_eq!(
        names,
        [
            ("vfio-precopy", 0, 3 << 20),
            ("vfio-precopy", 1, 3 << 20),
            ("vfio-final", 0, 4096),
            ("empty", 0, 0)
        ]
    );
    assert_eq!(m.device_state[1].data, blob(1, 3 << 20));
}

fn failing_device(
    n: u8,
    dev: &mut dyn DeviceState,
) -> (Failed, Result<Migrated, MigrationError>, Guest) {
    let mem = memory(4);
    fill(&mem, 6);
    let g = guest(mem.clone(), 5_000, 6);
    let (mut src, dst) = pair(&mem, n, |c| c.precopy.max_rounds = 2);
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let f = pagewire::migrate(&mut src, &mut log, &mut vcpus, dev).unwrap_err();
    drop(src);
    (f, dst.join().unwrap(), g)
}

#[test]
fn device_state_errors_fail_cleanly_and_resume_the_guest() {
    // The VMM's own error at downtime: resumed, logging off, destination fails.
    let mut dev = Streamer {
        pieces: 2,
        fail_save: true,
    };
    let (f, dst, g) = failing_device(45, &mut dev);
    assert!(
        matches!(
            *f.error,
            MigrationError::DeviceState {
                call: "the device state's save",
                ..
            }
        ),
        "{f:?}"
    );
    assert!(f.to_string().contains("in the device state's save"), "{f}");
    assert!(f.to_string().contains("would not quiesce"), "{f}");
    assert!(f.running_on_source && g.is_running() && !g.is_logging());
    assert_eq!(g.pauses_and_resumes(), (1, 1));
    assert!(dst.is_err());

    // A section shorter than announced.
    let mut short = |out: &mut DeviceStateWriter<'_>| -> Result<(), DirtyLogError> {
        let mut s = out.section("cpu", 0, 100)?;
        s.write_all(&[1; 99])?;
        s.finish()?;
        Ok(())
    };
    let (f, dst, g) = failing_device(46, &mut short);
    assert!(f.to_string().contains("99 bytes written of the 100"), "{f}");
    assert!(g.is_running() && dst.is_err());

    // The same section twice: refused here, before the destination has to.
    let mut twice = |out: &mut DeviceStateWriter<'_>| -> Result<(), DirtyLogError> {
        out.write_section("cpu", 0, &[1])?;
        out.write_section("cpu", 0, &[2])?;
        Ok(())
    };
    let (f, _, g) = failing_device(47, &mut twice);
    assert!(f.to_string().contains("already sent"), "{f}");
    assert!(g.is_running());

    // A VMM that ignores a write error still fails: the writer remembers it.
    let mut ignores = |out: &mut DeviceStateWriter<'_>| -> Result<(), DirtyLogError> {
        let _ = out.write_section("", 0, &[1]);
        Ok(())
    };
    let (f, _, g) = failing_device(48, &mut ignores);
    assert!(f.to_string().contains("1..=255"), "{f}");
    assert!(g.is_running());
}

/// A device whose pre-copy step fails after the first round.
struct FailsInPrecopy;

impl DeviceState for FailsInPrecopy {
    fn precopy(&mut self, _: &mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError> {
        Err("the device's dirty tracking overflowed".into())
    }
    fn save(&mut self, _: &mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError> {
        Ok(())
    }
}

/// A failure during pre-copy leaves the progress phase `Failed` and the statistics'
/// status `failed`, as a management thread polling them expects. They stayed
/// `Precopy` and `active` when a round or a device's pre-copy step failed.
#[test]
fn a_failure_during_precopy_shows_in_the_phase_and_the_status() {
    let mem = memory(4);
    fill(&mem, 9);
    let g = guest(mem.clone(), 5_000, 9);
    let (mut src, dst) = pair(&mem, 49, |_| {});
    let progress = src.progress();
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let f = pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut FailsInPrecopy).unwrap_err();
    assert!(
        matches!(
            *f.error,
            MigrationError::DeviceState {
                call: "the device state's precopy",
                ..
            }
        ),
        "{f:?}"
    );
    assert!(f.running_on_source && g.is_running());
    assert_eq!(progress.phase(), Phase::Failed);
    assert_eq!(src.stats().status, "failed");
    drop(src);
    assert!(dst.join().unwrap().is_err());
}

/// A dirty log that refuses to start.
struct Broken;

impl DirtyLog for Broken {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        Err("KVM_SET_USER_MEMORY_REGION: no space left".into())
    }
    fn stop(&mut self) -> Result<(), DirtyLogError> {
        panic!("stop without start");
    }
    fn sync_and_clear(&mut self, _: RegionId, _: &DirtyBitmap) -> Result<(), DirtyLogError> {
        panic!("sync without start");
    }
}

#[test]
fn a_dirty_log_that_cannot_start_fails_before_anything_is_sent() {
    let mem = memory(4);
    let g = guest(mem.clone(), 0, 7);
    let (mut src, dst) = pair(&mem, 49, |_| {});
    let mut vcpus = g.vcpus();
    let f = pagewire::migrate(&mut src, &mut Broken, &mut vcpus, &mut NoDeviceState).unwrap_err();
    assert!(
        f.to_string().contains("no space left"),
        "the cause is printed: {f}"
    );
    assert!(f.running_on_source);
    // `stop` follows a failed `start` too (logging may be on for part of the memory);
    // this log's panics there, reported as a warning.
    assert!(
        f.warnings
            .iter()
            .any(|w| w.contains("panicked: stop without start")),
        "{:?}",
        f.warnings
    );
    assert_eq!(src.progress().snapshot().pages, 0);
    drop(src);
    assert!(dst.join().unwrap().is_err());
}

/// Dropped when the memory keeping it drops.
struct Owner(Arc<AtomicBool>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn the_vmm_provides_destination_memory_for_the_layout() {
    use pagewire::DestinationMemory;
    use pagewire_protocol::MemoryLayout;
    let mem = memory(8);
    fill(&mem, 8);
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let dropped = Arc::new(AtomicBool::new(false));
    let (a2, d2) = (asked.clone(), dropped.clone());
    let provider = move |layout: &MemoryLayout| -> Result<Arc<GuestMemory>, DirtyLogError> {
        a2.lock().unwrap().push(layout.total_bytes());
        let m = GuestMemory::anonymous(layout)?.keeping(Owner(d2.clone()));
        Ok(Arc::new(m))
    };
    let mut dcfg = DestinationConfig::new(session(50), Authentication::None);
    dcfg.idle_timeout = Duration::from_secs(10);
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let dst = std::thread::spawn(move || {
        l.accept_into(DestinationMemory::Provider(Arc::new(provider)))?
            .wait()
    });
    let mut cfg = SourceConfig::new(session(50), Authentication::None);
    cfg.precopy.max_rounds = 2;
    let mut src = Source::connect(addr, mem.clone(), cfg).unwrap();
    let g = guest(mem.clone(), 2_000, 8);
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut NoDeviceState).unwrap();
    drop(src);
    let m = dst.join().unwrap().unwrap();
    assert_eq!(
        *asked.lock().unwrap(),
        [mem.layout().total_bytes()],
        "asked once, with the layout"
    );
    assert_eq!(first_difference(&mem, &m.memory), None);
    assert!(!dropped.load(Ordering::Relaxed));
    drop(m);
    assert!(
        dropped.load(Ordering::Relaxed),
        "the owner lives as long as the memory"
    );

    // A provider that refuses: both sides fail, the source says why.
    drop(g);
    let refuse = |_: &MemoryLayout| -> Result<Arc<GuestMemory>, DirtyLogError> {
        Err("no hugetlbfs pages left".into())
    };
    let (e, f) = into_a_failing_provider(51, &mem, Arc::new(refuse));
    assert!(e.to_string().contains("no hugetlbfs pages left"), "{e}");
    // The source hears why: the destination's ABORT, read after the broken pipe.
    assert!(
        f.to_string().contains("no hugetlbfs pages left"),
        "the source hears why: {f}"
    );
}

/// Migrates `mem` (2 channels) into a destination whose memory provider fails; the
/// destination's error and the source's failure, the guest checked running on the
/// source.
fn into_a_failing_provider(
    n: u8,
    mem: &Arc<GuestMemory>,
    provider: Arc<dyn pagewire::MemoryProvider>,
) -> (MigrationError, Failed) {
    use pagewire::DestinationMemory;
    let mut dcfg = DestinationConfig::new(session(n), Authentication::None);
    dcfg.idle_timeout = Duration::from_secs(10);
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let dst =
        std::thread::spawn(move || l.accept_into(DestinationMemory::Provider(provider))?.wait());
    let mut cfg = SourceConfig::new(session(n), Authentication::None);
    cfg.channels = 2;
    cfg.precopy.max_rounds = 2;
    let mut src = Source::connect(addr, mem.clone(), cfg).unwrap();
    let g = guest(mem.clone(), 2_000, u64::from(n));
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let f = pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut NoDeviceState).unwrap_err();
    drop(src);
    let e = within(Duration::from_secs(60), "the destination", move || {
        dst.join().unwrap()
    })
    .unwrap_err();
    assert!(f.running_on_source && g.is_running());
    (e, f)
}

/// A memory provider that panics (the VMM's bug) fails the session as a refusal does,
/// with ABORT `INTERNAL` saying so: it poisoned the memory lock before, so the other
/// channel reported "poisoned" to the source as the source's bad frame.
#[test]
fn a_memory_provider_that_panics_fails_the_session_and_says_so() {
    use pagewire::MemoryError;
    use pagewire_protocol::MemoryLayout;
    let mem = memory(4);
    fill(&mem, 12);
    let panics = |_: &MemoryLayout| -> Result<Arc<GuestMemory>, DirtyLogError> {
        panic!("the VMM's memory map is corrupt")
    };
    let (e, f) = into_a_failing_provider(55, &mem, Arc::new(panics));
    assert!(
        matches!(&e, MigrationError::Memory(MemoryError::Provider(what)) if what.contains("panicked: the VMM's memory map is corrupt")),
        "{e}"
    );
    assert!(
        f.to_string().contains("the VMM's memory map is corrupt"),
        "the source hears why: {f}"
    );
}

/// A `Destination` dropped without `wait` (the VMM's setup failed meanwhile) cancels:
/// the source keeps its guest. Before, the receivers went on alone, took COMMIT, and
/// the source gave the guest up to a destination where nobody would ever start it.
#[test]
fn a_destination_dropped_without_wait_keeps_the_guest_on_the_source() {
    let mem = memory(8);
    fill(&mem, 13);
    let mut dcfg = DestinationConfig::new(session(56), Authentication::None);
    dcfg.idle_timeout = Duration::from_secs(120);
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let dst = std::thread::spawn(move || {
        let d = l.accept(None).unwrap();
        // The VMM's own setup fails here, and `d` is dropped (at once: long before
        // the capped round 0 ends).
        drop(d);
    });
    let mut cfg = SourceConfig::new(session(56), Authentication::None);
    cfg.bandwidth_limit = 8 << 20; // 8 MiB take a second: the drop lands mid-round
    cfg.ack_timeout = Duration::from_secs(120);
    cfg.send_timeout = Duration::from_secs(120);
    let mut src = Source::connect(addr, mem.clone(), cfg).unwrap();
    let g = guest(mem.clone(), 1_000, 13);
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let f = within(Duration::from_secs(60), "the migration", move || {
        pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut NoDeviceState).unwrap_err()
    });
    dst.join().unwrap();
    assert!(f.may_resume_source(), "{f}");
    assert!(g.is_running(), "the source keeps its guest");
}

#[test]
fn the_destination_cancels_and_its_waits_wake() {
    let mem = memory(16);
    fill(&mem, 10);
    let mut dcfg = DestinationConfig::new(session(52), Authentication::None);
    // Long enough that only the cancel can end the waits in time.
    dcfg.idle_timeout = Duration::from_secs(120);
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let dst = std::thread::spawn(move || {
        let d = l.accept(None)?;
        tx.send(d.control()).unwrap();
        d.wait()
    });
    let mut cfg = SourceConfig::new(session(52), Authentication::None);
    cfg.bandwidth_limit = 4 << 20; // 16 MiB take seconds: cancel lands mid-round
    cfg.ack_timeout = Duration::from_secs(120);
    cfg.send_timeout = Duration::from_secs(120);
    let mut src = Source::connect(addr, mem.clone(), cfg).unwrap();
    let control = rx.recv().unwrap();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let t = std::time::Instant::now();
        control.cancel();
        (t, control)
    });
    let g = guest(mem.clone(), 1_000, 10);
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let f = within(
        Duration::from_secs(60),
        "the cancelled migration",
        move || {
            let r = pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut NoDeviceState);
            (r.map(|_| ()).unwrap_err().to_string(), src)
        },
    );
    let e = dst.join().unwrap().unwrap_err();
    let (cancelled_at, control) = canceller.join().unwrap();
    let took = cancelled_at.elapsed();
    eprintln!(
        "source: {}; destination: {e}; both ended {took:?} after the cancel",
        f.0
    );
    assert!(matches!(e, MigrationError::Cancelled), "{e}");
    assert!(control.is_cancelled());
    assert!(g.is_running(), "the source guest keeps running");
    // Far below every timeout configured (120 s): the cancel woke the waits.
    assert!(took < Duration::from_secs(60), "{took:?}");
}

#[test]
fn a_cancel_ends_an_accept_that_waits_for_channels() {
    use pagewire::{DestinationControl, DestinationMemory};
    let mut dcfg = DestinationConfig::new(session(53), Authentication::None);
    dcfg.accept_timeout = Duration::from_secs(120);
    let l = DestinationListener::bind(loopback(), dcfg.clone()).unwrap();
    let control = DestinationControl::new();
    let c2 = control.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        c2.cancel();
        std::time::Instant::now()
    });
    let r = within(Duration::from_secs(60), "the cancelled accept", move || {
        let r = l.accept_controlled(&dcfg, DestinationMemory::Anonymous, &control);
        (r.map(|_| ()), std::time::Instant::now(), l)
    });
    let cancelled_at = canceller.join().unwrap();
    assert!(matches!(r.0, Err(MigrationError::Cancelled)), "{:?}", r.0);
    eprintln!("the accept ended {:?} after the cancel", r.1 - cancelled_at);
    // The listener accepts the next session as usual.
    let l = r.2;
    let addr = l.local_addr().unwrap();
    let mem = memory(2);
    fill(&mem, 11);
    let mut dcfg = DestinationConfig::new(session(54), Authentication::None);
    dcfg.idle_timeout = Duration::from_secs(10);
    let dst = std::thread::spawn(move || {
        l.accept_with_into(&dcfg, DestinationMemory::Anonymous)?
            .wait()
    });
    let mut src = Source::connect(
        addr,
        mem.clone(),
        SourceConfig::new(session(54), Authentication::None),
    )
    .unwrap();
    let g = guest(mem.clone(), 0, 11);
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut NoDeviceState).unwrap();
    drop(src);
    assert_eq!(
        first_difference(&mem, &dst.join().unwrap().unwrap().memory),
        None
    );
}

#[test]
fn the_prefault_thread_has_ended_when_wait_returns() {
    // 256 MiB mostly never written: the pre-fault thread may still be populating it
    // when the last frame arrives; `wait` stops it (it does not hold the downtime
    // for pages no frame writes) and joins it, so its time is in the statistics.
    let mem = memory(256);
    for p in [0, 1, 4096, 65535] {
        assert!(mem.write_pages(RegionId(0), p, &[p as u8 | 1; 4096]));
    }
    let mut dcfg = DestinationConfig::new(session(59), Authentication::None);
    dcfg.prefault = Prefault::Thread;
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let dst = std::thread::spawn(move || l.accept(None)?.wait());
    let cfg = SourceConfig::new(session(59), Authentication::None);
    let mut src = Source::connect(addr, mem.clone(), cfg).unwrap();
    let g = guest(mem.clone(), 0, 14);
    migrate_sim(&mut src, &g).unwrap();
    drop(src);
    let m = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&mem, &m.memory), None);
    assert!(m.stats.prefault_ms > 0.0, "{:?}", m.stats);
}

#[test]
fn both_sides_count_their_cpu_time() {
    let mem = memory(16);
    fill(&mem, 12);
    let g = guest(mem.clone(), 2_000, 12);
    let (mut src, dst) = pair(&mem, 55, |c| c.codec = CodecId::ZSTD.into());
    let stats = migrate_sim(&mut src, &g).unwrap();
    drop(src);
    let m = dst.join().unwrap().unwrap();
    // zstd over 16 MiB takes measurable CPU on both sides; the share of a core is
    // CPU over wall time, the per-GiB figure CPU over the memory moved.
    assert!(stats.cpu.seconds > 0.0, "{stats}");
    assert!(m.stats.cpu.seconds > 0.0, "{:?}", m.stats);
    let total: f64 = stats.per_round.iter().map(|r| r.cpu_s).sum();
    assert!(total > 0.0 && total <= stats.cpu.seconds + 1e-9, "{stats}");
    let gib = stats.guest_bytes as f64 / f64::from(1u32 << 30);
    assert!((stats.cpu.seconds_per_gib - stats.cpu.seconds / gib).abs() < 1e-9);
}

#[test]
fn the_codec_is_chosen_per_frame_unless_the_caller_fixes_one() {
    let cfg = SourceConfig::new(session(57), Authentication::None);
    assert_eq!(cfg.codec, CodecPolicy::auto());
    assert_eq!(
        CodecPolicy::from(CodecId::LZ4),
        CodecPolicy::fixed(CodecId::LZ4, 1)
    );
    let mem = memory(16);
    fill(&mem, 13);
    // The default: every frame's codec chosen, and the choices in the statistics.
    let g = guest(mem.clone(), 2_000, 13);
    let (mut src, dst) = pair(&mem, 57, |c| {
        c.codec = SourceConfig::new(session(57), Authentication::None).codec;
    });
    let stats = migrate_sim(&mut src, &g).unwrap();
    drop(src);
    dst.join().unwrap().unwrap();
    assert_eq!(stats.codec, "auto");
    let a = stats.adaptive.as_ref().expect("the adaptive statistics");
    let frames: u64 = a.choices.iter().map(|c| c.frames).sum();
    assert!(frames > 0, "{stats}");
    // A fixed codec: every data frame in it, no adaptive statistics.
    let g = guest(mem.clone(), 2_000, 14);
    let (mut src, dst) = pair(&mem, 58, |c| c.codec = CodecPolicy::fixed(CodecId::ZSTD, 3));
    let stats = migrate_sim(&mut src, &g).unwrap();
    drop(src);
    dst.join().unwrap().unwrap();
    assert!(stats.adaptive.is_none(), "{stats}");
    assert!(
        stats
            .codecs
            .iter()
            .any(|c| c.frames > 0 && c.codec == "zstd"),
        "{stats}"
    );
    assert!(
        stats
            .codecs
            .iter()
            .all(|c| c.frames == 0 || c.codec == "zstd"),
        "{stats}"
    );
}

#[test]
fn other_channels_wait_past_their_idle_timeout_while_channel_0_moves_the_device_state() {
    // The destination's idle timeout is 2 s; the device state takes about 5 s, sent
    // on channel 0 in pieces 300 ms apart, while the other channel, its final round
    // ended, has nothing to send and idles out: that is no failure of the session
    // (PROTOCOL.md, "Idle timeout"), which channel 0 completes.
    let mem = memory(4);
    fill(&mem, 9);
    let g = guest(mem.clone(), 5_000, 9);
    let mut dcfg = DestinationConfig::new(session(49), Authentication::None);
    dcfg.idle_timeout = Duration::from_secs(2);
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let dst = std::thread::spawn(move || l.accept(None)?.wait());
    let mut cfg = SourceConfig::new(session(49), Authentication::None);
    cfg.channels = 2;
    cfg.ack_timeout = Duration::from_secs(10);
    cfg.precopy.max_rounds = 2;
    let mut src = Source::connect(addr, mem.clone(), cfg).unwrap();
    let mut slow = |out: &mut DeviceStateWriter<'_>| -> Result<(), DirtyLogError> {
        for i in 0..16u32 {
            std::thread::sleep(Duration::from_millis(300));
            out.write_section("slow", i, &blob(i, 4096))?;
        }
        Ok(())
    };
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let stats = pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut slow).unwrap();
    drop(src);
    let m = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&mem, &m.memory), None, "{stats}");
    assert_eq!(m.device_state.len(), 16);
}

/// The simulated guest's dirty log, panicking at its `panic_at`-th sync, or marking
/// every page dirty at each (a guest that never converges).
struct OddLog {
    inner: pagewire::sim::Log,
    syncs: usize,
    panic_at: usize,
    all_dirty: bool,
}

impl OddLog {
    fn new(g: &Guest, panic_at: usize, all_dirty: bool) -> Self {
        OddLog {
            inner: g.log(),
            syncs: 0,
            panic_at,
            all_dirty,
        }
    }
}

impl DirtyLog for OddLog {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.inner.start()
    }
    fn stop(&mut self) -> Result<(), DirtyLogError> {
        self.inner.stop()
    }
    fn sync_and_clear(&mut self, r: RegionId, into: &DirtyBitmap) -> Result<(), DirtyLogError> {
        self.syncs += 1;
        if self.syncs == self.panic_at {
            panic!("the dirty ring overflowed");
        }
        self.inner.sync_and_clear(r, into)?;
        if self.all_dirty {
            into.set_range(0, into.pages());
        }
        Ok(())
    }
}

/// The destination's error, within 8 s (it waits for its idle timeout, 10 s, when the
/// source does not tell it).
fn destination_error(dst: DestinationThread) -> MigrationError {
    within(Duration::from_secs(8), "the destination", move || {
        dst.join().unwrap().unwrap_err()
    })
}

#[test]
fn a_vmm_callback_that_panics_fails_the_migration_and_the_destination_is_told() {
    // The dirty log's sync panics after round 0 (two regions: syncs 1-2 clean the
    // log, 3-4 end round 0). The panic used to unwind through `Migration::run`:
    // logging stayed on, the phase `Precopy`, and the destination waited.
    let mem = memory(4);
    fill(&mem, 15);
    let g = guest(mem.clone(), 2_000, 15);
    let (mut src, dst) = pair(&mem, 60, |_| {});
    let mut log = OddLog::new(&g, 3, false);
    let mut vcpus = g.vcpus();
    let f = pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut NoDeviceState).unwrap_err();
    assert!(
        matches!(&*f.error, MigrationError::CallbackPanicked { callback, message }
            if *callback == "the dirty log's sync_and_clear" && message == "the dirty ring overflowed"),
        "{f:?}"
    );
    assert!(
        f.running_on_source && g.is_running() && !g.is_logging(),
        "{f:?}"
    );
    assert_eq!(src.progress().phase(), Phase::Failed);
    // Told at once with ABORT, while the source still exists.
    let e = destination_error(dst);
    assert!(
        matches!(e, MigrationError::PeerAborted { .. }) && e.to_string().contains("overflowed"),
        "{e}"
    );
    // The session is over: a retry on this source is refused.
    let again = src.send_round(Vec::new(), false).unwrap_err();
    assert!(again.to_string().contains("aborted"), "{again}");
    drop(src);

    // The device state's save panics with the guest paused: resumed here.
    let mut dev = |_: &mut DeviceStateWriter<'_>| -> Result<(), DirtyLogError> {
        panic!("a device model bug");
    };
    let (f, dst, g) = failing_device(62, &mut dev);
    assert!(
        matches!(&*f.error, MigrationError::CallbackPanicked { callback, .. }
            if *callback == "the device state's save"),
        "{f:?}"
    );
    assert!(f.running_on_source && g.is_running() && !g.is_logging());
    assert_eq!(g.pauses_and_resumes(), (1, 1));
    let e = dst.unwrap_err();
    assert!(e.to_string().contains("a device model bug"), "{e}");
    // Inside an open section: the panic is what is reported, not the section the
    // unwinding dropped unfinished.
    let mut dev = |out: &mut DeviceStateWriter<'_>| -> Result<(), DirtyLogError> {
        let mut s = out.section("cpu", 0, 100)?;
        s.write_all(&[1; 10])?;
        panic!("a device model bug mid-section");
    };
    let (f, _, g) = failing_device(66, &mut dev);
    assert!(
        matches!(&*f.error, MigrationError::CallbackPanicked { message, .. }
            if message == "a device model bug mid-section"),
        "{f:?}"
    );
    assert!(f.running_on_source && g.is_running());

    // The round callback panics.
    let mem = memory(4);
    fill(&mem, 16);
    let g = guest(mem.clone(), 2_000, 16);
    let (mut src, dst) = pair(&mem, 63, |_| {});
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let f = Migration::new(&mut src, &mut log, &mut vcpus)
        .on_round(|_| panic!("the management thread's bug"))
        .run()
        .unwrap_err();
    assert!(f.to_string().contains("the round callback panicked"), "{f}");
    assert!(f.running_on_source && g.is_running() && !g.is_logging());
    assert!(matches!(
        destination_error(dst),
        MigrationError::PeerAborted { .. }
    ));
}

#[test]
fn a_cancel_while_the_vmm_is_busy_reaches_the_destination_at_once() {
    // The VMM's thread is in its round callback (a slow management call) when another
    // thread cancels: the channels, idle meanwhile, send ABORT CANCELLED themselves.
    // They used to wait for the VMM's thread, and only keepalives went out.
    let mem = memory(4);
    fill(&mem, 17);
    let g = guest(mem.clone(), 2_000, 17);
    let (mut src, dst) = pair(&mem, 64, |_| {});
    let control = src.control();
    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    let dst = std::thread::spawn(move || {
        let r = dst.join().unwrap();
        done.store(true, Ordering::SeqCst);
        r
    });
    let mut told_while_busy = false;
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    let f = Migration::new(&mut src, &mut log, &mut vcpus)
        .on_round(|_| {
            control.cancel();
            // Bounded: 5 s at most, half the destination's idle timeout.
            for _ in 0..500 {
                if finished.load(Ordering::SeqCst) {
                    told_while_busy = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            RoundAction::Continue
        })
        .run()
        .unwrap_err();
    assert!(matches!(*f.error, MigrationError::Cancelled), "{f:?}");
    assert!(
        told_while_busy,
        "the destination ended only after the callback returned"
    );
    let e = dst.join().unwrap().unwrap_err();
    assert!(
        matches!(&e, MigrationError::PeerAborted { reason, .. } if *reason == pagewire_protocol::AbortReason::CANCELLED),
        "{e}"
    );
}

/// The simulated vCPUs, recording every throttle asked.
struct Throttles {
    inner: pagewire::sim::Vcpus,
    asked: Vec<u8>,
}

impl pagewire::VcpuControl for Throttles {
    fn pause(&mut self) -> Result<(), DirtyLogError> {
        self.inner.pause()
    }
    fn resume(&mut self) -> Result<(), DirtyLogError> {
        self.inner.resume()
    }
    fn throttle(&mut self, percent: u8) -> Result<(), DirtyLogError> {
        self.asked.push(percent);
        Ok(())
    }
}

#[test]
fn a_migration_that_does_not_converge_lifts_the_auto_converge_throttle() {
    // Every page dirty at every sync: auto-converge throttles harder each round, the
    // round cap fails the migration (CapPolicy::Fail), the guest keeps running here,
    // and used to keep running at the last throttle (as little as 1 %).
    let mem = memory(4);
    fill(&mem, 18);
    let g = guest(mem.clone(), 0, 18);
    let (mut src, dst) = pair(&mem, 65, |c| {
        c.precopy.auto_converge = true;
        c.precopy.on_cap = CapPolicy::Fail;
        c.precopy.max_rounds = 4;
        c.precopy.downtime_limit = Duration::from_micros(1);
    });
    let mut log = OddLog::new(&g, 0, true);
    let mut vcpus = Throttles {
        inner: g.vcpus(),
        asked: Vec::new(),
    };
    let f = pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut NoDeviceState).unwrap_err();
    assert!(
        matches!(*f.error, MigrationError::NotConverged { .. }),
        "{f:?}"
    );
    assert!(vcpus.asked.iter().any(|&p| p < 100), "{:?}", vcpus.asked);
    assert_eq!(vcpus.asked.last(), Some(&100), "{:?}", vcpus.asked);
    assert!(f.running_on_source && f.warnings.is_empty(), "{f:?}");
    assert!(matches!(
        destination_error(dst),
        MigrationError::PeerAborted { .. }
    ));
}
