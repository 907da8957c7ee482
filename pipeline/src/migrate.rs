//! The pre-copy driver: rounds over the VMM's dirty log until the expected downtime
//! fits the limit, then pause, the last pages, device state, and the switchover.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use pagewire::{DirtyBitmap, DirtyLogError, RegionId, VcpuControl, DirtyLog};
//! # struct Vm { log: Log, vcpus: Vcpus }
//! # struct Log; struct Vcpus;
//! # impl DirtyLog for Log {
//! #   fn start(&mut self) -> Result<(), DirtyLogError> { Ok(()) }
//! #   fn stop(&mut self) -> Result<(), DirtyLogError> { Ok(()) }
//! #   fn sync_and_clear(&mut self, _: RegionId, _: &DirtyBitmap) -> Result<(), DirtyLogError> { Ok(()) }
//! # }
//! # impl VcpuControl for Vcpus {
//! #   fn pause(&mut self) -> Result<(), DirtyLogError> { Ok(()) }
//! #   fn resume(&mut self) -> Result<(), DirtyLogError> { Ok(()) }
//! # }
//! # impl Vcpus { fn save_state(&self) -> Vec<u8> { Vec::new() } }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let mut source: pagewire::Source = unimplemented!();
//! # let mut vm = Vm { log: Log, vcpus: Vcpus };
//! use pagewire::{DeviceStateWriter, Migration, RoundAction};
//!
//! let progress = source.progress(); // clone it into a thread that reports progress
//! let Vm { log, vcpus } = &mut vm;
//! let saved = vcpus.save_state();
//! let mut devices = |out: &mut DeviceStateWriter<'_>| -> Result<(), DirtyLogError> {
//!     out.write_section("cpu", 0, &saved)?;
//!     Ok(())
//! };
//! let stats = Migration::new(&mut source, log, vcpus)
//!     .device_state(&mut devices)
//!     .on_round(|p| {
//!         println!("round {}: {} dirty pages", p.round, p.dirty_pages);
//!         RoundAction::Continue
//!     })
//!     .run()?;
//! println!("{stats}");
//! # drop(progress);
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::time::{Duration, Instant};

use pagewire_protocol::RegionId;

use crate::device::{DeviceState, DeviceStateWriter, NoDeviceState};
use crate::dirty::{DirtyBitmap, DirtyLog, VcpuControl};
use crate::error::{Failed, MigrationError, vmm_call};
use crate::precopy::{CapPolicy, Decision, Estimator, StopReason};
use crate::progress::{Phase, ProgressSnapshot, RoundAction};
use crate::source::Source;
use crate::stats::{DowntimeBreakdown, MigrationStats};
use crate::switchover::Switchover;

type RoundCallback<'a> = Box<dyn FnMut(&ProgressSnapshot) -> RoundAction + 'a>;

/// A live migration of the source's guest: pre-copy rounds over the dirty log, the
/// paused final round and the device state, then the switchover.
///
/// The guest keeps running throughout pre-copy; it runs on the source again after
/// any failure that leaves the destination unable to run it. Dirty logging is started
/// at the beginning and stopped on every way out.
pub struct Migration<'a> {
    source: &'a mut Source,
    log: &'a mut dyn DirtyLog,
    vcpus: &'a mut dyn VcpuControl,
    devices: Option<&'a mut dyn DeviceState>,
    on_round: Option<RoundCallback<'a>>,
}

impl std::fmt::Debug for Migration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("source", &self.source)
            .field("device_state", &self.devices.is_some())
            .field("on_round", &self.on_round.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a> Migration<'a> {
    /// A migration of `source`'s memory, tracked by `log`, of the guest whose vCPUs
    /// `vcpus` controls; no device state unless [`Self::device_state`] adds it.
    pub fn new(
        source: &'a mut Source,
        log: &'a mut dyn DirtyLog,
        vcpus: &'a mut dyn VcpuControl,
    ) -> Self {
        Self {
            source,
            log,
            vcpus,
            devices: None,
            on_round: None,
        }
    }

    /// The VMM's device state, streamed (and, for devices with a pre-copy phase, sent
    /// while the guest runs).
    pub fn device_state(mut self, devices: &'a mut dyn DeviceState) -> Self {
        self.devices = Some(devices);
        self
    }

    /// Called after every pre-copy round with the progress so far; its answer can
    /// switch over now or cancel.
    pub fn on_round(mut self, f: impl FnMut(&ProgressSnapshot) -> RoundAction + 'a) -> Self {
        self.on_round = Some(Box::new(f));
        self
    }

    /// Runs the migration to its end: `Ok` once the destination acknowledged COMMIT
    /// and owns the guest (discard it here).
    ///
    /// # Errors
    /// [`Failed`], with the pages the destination never acknowledged and whether the
    /// guest runs on the source again ([`Failed::running_on_source`]). When COMMIT
    /// went out but its acknowledgement did not come back, the error is
    /// [`MigrationError::OutcomeUnknown`] ([`Failed::may_resume_source`] is false):
    /// the guest stays paused here, neither resumed nor discarded, until the
    /// management layer learns from the destination whether it reported success
    /// (PROTOCOL.md, Switchover).
    pub fn run(self) -> Result<MigrationStats, Failed> {
        let Migration {
            source,
            log,
            vcpus,
            devices,
            on_round,
        } = self;
        let mut none = NoDeviceState;
        let devices: &mut dyn DeviceState = match devices {
            Some(d) => d,
            None => &mut none,
        };
        if let Err(e) = call("the dirty log's start", || log.start(), dirty_log) {
            source.set_phase(Phase::Failed);
            source.abort_session(&e);
            let mut f = Failed::bare(e).with_resumed(true);
            // It may have turned logging on for part of the memory.
            f.warnings.extend(stop_log(log));
            return Err(f);
        }
        let mut run = Run {
            source,
            log: &mut *log,
            vcpus,
            devices,
            on_round,
            sections: HashSet::new(),
            cpu_at_start: Some(pagewire_accel::thread_cpu_time()),
            throttled: false,
        };
        let result = run.run();
        // A failed run's CPU counts too (it is in the source's statistics now).
        run.count_driver_cpu();
        let stopped = stop_log(log);
        match result {
            Ok(mut stats) => {
                stats.warnings.extend(stopped);
                Ok(stats)
            }
            Err(mut f) => {
                f.warnings.extend(stopped);
                Err(f)
            }
        }
    }
}

/// Live-migrates the source's guest memory with no per-round callback: shorthand for
/// [`Migration::new`]`(source, log, vcpus).device_state(devices).run()`.
///
/// # Errors
/// As [`Migration::run`].
pub fn migrate(
    source: &mut Source,
    log: &mut dyn DirtyLog,
    vcpus: &mut dyn VcpuControl,
    devices: &mut dyn DeviceState,
) -> Result<MigrationStats, Failed> {
    Migration::new(source, log, vcpus)
        .device_state(devices)
        .run()
}

/// Runs `f`, a callback of the VMM named `callback`: its error becomes `wrap`'s
/// [`MigrationError`], its panic [`MigrationError::CallbackPanicked`].
fn call<T>(
    callback: &'static str,
    f: impl FnOnce() -> Result<T, crate::DirtyLogError>,
    wrap: fn(&'static str, crate::DirtyLogError) -> MigrationError,
) -> Result<T, MigrationError> {
    call_infallible(callback, f)?.map_err(|e| wrap(callback, e))
}

/// [`MigrationError::DirtyLog`] for [`call`].
fn dirty_log(call: &'static str, source: crate::DirtyLogError) -> MigrationError {
    MigrationError::DirtyLog { call, source }
}

/// [`MigrationError::Vcpu`] for [`call`].
fn vcpu(call: &'static str, source: crate::DirtyLogError) -> MigrationError {
    MigrationError::Vcpu { call, source }
}

/// [`MigrationError::DeviceState`] for [`call`].
fn device_state(call: &'static str, source: crate::DirtyLogError) -> MigrationError {
    MigrationError::DeviceState { call, source }
}

/// [`call`] for a callback that cannot fail but may panic.
fn call_infallible<T>(callback: &'static str, f: impl FnOnce() -> T) -> Result<T, MigrationError> {
    vmm_call(f).map_err(|message| MigrationError::CallbackPanicked { callback, message })
}

/// Stops the dirty log; what went wrong, as a warning.
fn stop_log(log: &mut dyn DirtyLog) -> Option<String> {
    call("the dirty log's stop", || log.stop(), dirty_log)
        .err()
        .map(|e| format!("stopping the dirty log failed: {e}"))
}

struct Run<'a, 'b> {
    source: &'b mut Source,
    log: &'b mut dyn DirtyLog,
    vcpus: &'b mut dyn VcpuControl,
    devices: &'b mut dyn DeviceState,
    on_round: Option<RoundCallback<'a>>,
    sections: HashSet<(String, u32)>,
    /// This thread's CPU clock when the run began: its own CPU (dirty-log syncs,
    /// pausing, the device state, the round callbacks) counts as the source's
    /// ([`Run::count_driver_cpu`]; `None` once counted).
    cpu_at_start: Option<Duration>,
    /// Auto-converge throttled the guest: lifted again on every way out but a commit.
    throttled: bool,
}

impl Run<'_, '_> {
    /// Adds this thread's CPU since the run began to the source's, once.
    fn count_driver_cpu(&mut self) {
        if let Some(start) = self.cpu_at_start.take() {
            let cpu = pagewire_accel::thread_cpu_time().saturating_sub(start);
            self.source.add_driver_cpu(cpu);
        }
    }

    /// A failure while the guest runs on the source (before the pause).
    fn running(&mut self, error: MigrationError, pages: Vec<(RegionId, DirtyBitmap)>) -> Failed {
        self.failed_running(Failed::new(error, pages))
    }

    /// [`Self::running`] for a failure that already is a [`Failed`]: the destination
    /// is told (ABORT), the throttle lifted.
    fn failed_running(&mut self, mut f: Failed) -> Failed {
        // A source that already handed the guest over keeps its phase, and the guest
        // is not its to run.
        if matches!(*f.error, MigrationError::HandedOver) {
            return f.with_resumed(false);
        }
        self.source.set_phase(Phase::Failed);
        self.source.abort_session(&f.error);
        f.warnings.extend(self.unthrottle());
        f.with_resumed(true)
    }

    /// A failure after the pause, while the destination cannot run the guest: tell it
    /// (ABORT), lift the throttle and resume the guest here.
    fn paused(&mut self, mut f: Failed) -> Failed {
        self.source.set_phase(Phase::Failed);
        // The guest first (COMMIT never left, so it is this side's), then the
        // destination: the ABORTs must not lengthen the guest's pause.
        f.warnings.extend(self.unthrottle());
        let vcpus = &mut *self.vcpus;
        let f = match call("the vCPUs' resume", || vcpus.resume(), vcpu) {
            Ok(()) => f.with_resumed(true),
            Err(e) => {
                f.resume_error = Some(e.to_string());
                f.with_resumed(false)
            }
        };
        self.source.abort_session(&f.error);
        f
    }

    /// Runs the guest at full speed again if auto-converge throttled it; what went
    /// wrong, as a warning.
    fn unthrottle(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.throttled) {
            return None;
        }
        let vcpus = &mut *self.vcpus;
        call("the vCPUs' throttle", || vcpus.throttle(100), vcpu)
            .err()
            .map(|e| format!("lifting the auto-converge throttle failed: {e}"))
    }

    fn device_step(&mut self, save: bool) -> Result<(), Failed> {
        let mut w = DeviceStateWriter::new(self.source, &mut self.sections);
        let devices = &mut *self.devices;
        let res = if save {
            call(
                "the device state's save",
                || devices.save(&mut w),
                device_state,
            )
        } else {
            call(
                "the device state's precopy",
                || devices.precopy(&mut w),
                device_state,
            )
        };
        // A failed send fails the migration whatever the VMM made of it; but a panic
        // is what went wrong when there was one (it may have left a section open,
        // which the writer reports).
        let failure = w.into_failure();
        match (res, failure) {
            (Err(e @ MigrationError::CallbackPanicked { .. }), _) => Err(Failed::bare(e)),
            (_, Some(f)) => Err(f),
            (res, None) => res.map_err(Failed::bare),
        }
    }

    fn run(&mut self) -> Result<MigrationStats, Failed> {
        let started = Instant::now();
        let config = self.source.config_precopy();
        let control = self.source.control();
        let progress = self.source.progress();
        let regions: Vec<(RegionId, u64)> = self
            .source
            .memory()
            .region_ids()
            .filter_map(|id| self.source.memory().pages(id).map(|n| (id, n)))
            .collect();
        // Start from a clean log: round 0 sends everything.
        let scratch: Vec<DirtyBitmap> = regions.iter().map(|(_, n)| DirtyBitmap::new(*n)).collect();
        let refs: Vec<&DirtyBitmap> = scratch.iter().collect();
        if let Err(e) = sync_into(self.log, &regions, &refs) {
            return Err(self.running(e, Vec::new()));
        }
        drop(scratch);
        let mut dirty: Vec<(RegionId, DirtyBitmap)> = regions
            .iter()
            .map(|(id, n)| (*id, DirtyBitmap::full(*n)))
            .collect();
        let mut est = Estimator::default();
        let mut round = 0u32;
        let (reason, expected): (StopReason, Duration) = loop {
            if control.is_cancelled() {
                return Err(self.running(MigrationError::Cancelled, dirty));
            }
            let t = Instant::now();
            let stats = match self.source.send_round(dirty, false) {
                Ok(s) => s,
                Err(f) => return Err(self.failed_running(f)),
            };
            let took = t.elapsed();
            est.round_done(stats.wire_bytes, stats.pages.total(), took);
            dirty = regions
                .iter()
                .map(|(id, n)| (*id, DirtyBitmap::new(*n)))
                .collect();
            let bitmaps: Vec<&DirtyBitmap> = dirty.iter().map(|(_, b)| b).collect();
            if let Err(e) = sync_into(self.log, &regions, &bitmaps) {
                return Err(self.running(e, dirty));
            }
            if let Err(mut f) = self.device_step(false) {
                // The pages just synced are dirty too.
                f.unacknowledged.append(&mut dirty);
                return Err(self.failed_running(f));
            }
            let left: u64 = dirty.iter().map(|(_, b)| b.count()).sum();
            est.dirty_found(left, took);
            let devices = &*self.devices;
            let pending = match call_infallible("the device state's pending_bytes", || {
                devices.pending_bytes()
            }) {
                Ok(n) => n,
                Err(e) => return Err(self.running(e, dirty)),
            };
            est.set_extra_bytes(pending);
            self.source.note_dirty_rate(est.dirty_rate());
            let expected = est.expected_downtime(left);
            progress.set_dirty(left, est.dirty_rate(), expected);
            let mut cfg = config;
            cfg.downtime_limit = control.downtime_limit();
            let asked = match self.on_round.as_mut() {
                Some(f) => {
                    match call_infallible("the round callback", || f(&progress.snapshot())) {
                        Ok(a) => a,
                        Err(e) => return Err(self.running(e, dirty)),
                    }
                }
                None => RoundAction::Continue,
            };
            let decision = match asked {
                RoundAction::Cancel => {
                    return Err(self.running(MigrationError::Cancelled, dirty));
                }
                RoundAction::SwitchOver => Decision::Stop(StopReason::Requested),
                _ => est.decide(&cfg, round, left, started.elapsed()),
            };
            match decision {
                Decision::Continue { throttle } => {
                    if let Some(pct) = throttle {
                        self.throttled = true;
                        let vcpus = &mut *self.vcpus;
                        if let Err(e) = call("the vCPUs' throttle", || vcpus.throttle(pct), vcpu) {
                            return Err(self.running(e, dirty));
                        }
                    }
                }
                Decision::Stop(r @ (StopReason::RoundCap | StopReason::TimeCap))
                    if cfg.on_cap == CapPolicy::Fail =>
                {
                    let e = MigrationError::NotConverged {
                        reason: r,
                        expected_downtime: expected,
                        limit: cfg.downtime_limit,
                    };
                    return Err(self.running(e, dirty));
                }
                Decision::Stop(r) => break (r, expected),
            }
            round += 1;
        };
        // Stop and copy.
        let pause_at = Instant::now();
        let vcpus = &mut *self.vcpus;
        if let Err(e) = call("the vCPUs' pause", || vcpus.pause(), vcpu) {
            // Some vCPUs may have stopped: resume them all.
            return Err(self.paused(Failed::new(e, dirty)));
        }
        self.source.set_phase(Phase::StopAndCopy);
        let bitmaps: Vec<&DirtyBitmap> = dirty.iter().map(|(_, b)| b).collect();
        if let Err(e) = sync_into(self.log, &regions, &bitmaps) {
            return Err(self.paused(Failed::new(e, dirty)));
        }
        let pause_ms = ms(pause_at.elapsed());
        let t = Instant::now();
        if let Err(f) = self.source.send_round(dirty, true) {
            return Err(self.paused(f));
        }
        let last_pages_ms = ms(t.elapsed());
        let t = Instant::now();
        if let Err(f) = self.device_step(true) {
            return Err(self.paused(f));
        }
        let device_state_ms = ms(t.elapsed());
        let t = Instant::now();
        self.source.set_phase(Phase::Switchover);
        match self.source.complete() {
            // COMMIT never left: the destination cannot run the guest.
            Err(f) => return Err(self.paused(f)),
            Ok(Switchover::Committed) => {}
            // The destination may run the guest: it stays paused here.
            Ok(Switchover::Unknown { error }) => {
                self.source.set_phase(Phase::OutcomeUnknown);
                let e = MigrationError::OutcomeUnknown { source: error };
                // The throttle stays: whoever resumes the guest here lifts it.
                return Err(Failed::bare(e).with_resumed(false));
            }
        }
        // Up to ACK COMMITTED: the channels' closes after it are not the guest's
        // downtime.
        let handed_over = self.source.handed_over_at().unwrap_or_else(Instant::now);
        let completion_ms = ms(handed_over.saturating_duration_since(t));
        self.count_driver_cpu();
        let mut stats = self.source.stats();
        stats.status = "completed".into();
        stats.downtime_ms = ms(handed_over.saturating_duration_since(pause_at));
        stats.downtime = DowntimeBreakdown {
            pause_ms,
            last_pages_ms,
            device_state_ms,
            completion_ms,
        };
        stats.stop_reason = format!("{reason:?}");
        stats.expected_downtime_ms = if expected == Duration::MAX {
            f64::INFINITY
        } else {
            ms(expected)
        };
        Ok(stats)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sync_into(
    log: &mut dyn DirtyLog,
    regions: &[(RegionId, u64)],
    into: &[&DirtyBitmap],
) -> Result<(), MigrationError> {
    for ((id, _), b) in regions.iter().zip(into) {
        call(
            "the dirty log's sync_and_clear",
            || log.sync_and_clear(*id, b),
            dirty_log,
        )?;
    }
    Ok(())
}
