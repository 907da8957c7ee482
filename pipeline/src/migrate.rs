//! The pre-copy driver: rounds over the VMM's dirty log until the expected downtime
//! fits the limit, then pause, the last pages, device state, completion.

use std::time::{Duration, Instant};

use pagewire_protocol::RegionId;

use crate::destination::DeviceSection;
use crate::dirty::{DirtyBitmap, DirtyLog};
use crate::error::{Failed, MigrationError};
use crate::precopy::{Decision, Estimator, StopReason};
use crate::source::Source;
use crate::stats::{DowntimeBreakdown, MigrationStats};
use crate::switchover::Switchover;

/// Live-migrates the source's guest memory: pre-copy rounds over `log`, then the paused
/// final round and `device_state()` (called while the guest is paused), then COMPLETE.
///
/// The guest is resumed on the source if anything fails after it was paused, unless the
/// outcome of the switchover is unknown ([`Failed::may_resume_source`] is `false`): then
/// the destination may run it, and it stays paused here. It keeps running throughout
/// pre-copy.
///
/// # Errors
/// [`Failed`] with the pages the destination never acknowledged, or with
/// [`MigrationError::OutcomeUnknown`] when COMMIT went out unacknowledged.
pub fn migrate(
    source: &mut Source,
    log: &mut dyn DirtyLog,
    device_state: &mut dyn FnMut() -> Vec<DeviceSection>,
) -> Result<MigrationStats, Failed> {
    let started = Instant::now();
    let config = source.config_precopy();
    let control = source.control();
    let regions: Vec<(RegionId, u64)> = source
        .memory()
        .region_ids()
        .filter_map(|id| source.memory().pages(id).map(|n| (id, n)))
        .collect();
    // Start from a clean log: round 0 sends everything.
    let scratch: Vec<DirtyBitmap> = regions.iter().map(|(_, n)| DirtyBitmap::new(*n)).collect();
    sync(log, &regions, &scratch)?;
    let mut dirty: Vec<(RegionId, DirtyBitmap)> = regions
        .iter()
        .map(|(id, n)| (*id, DirtyBitmap::full(*n)))
        .collect();
    let mut est = Estimator::default();
    let mut round = 0u32;
    let (reason, expected): (StopReason, Duration) = loop {
        if control.is_cancelled() {
            return Err(Failed::new(MigrationError::Cancelled, dirty));
        }
        let t = Instant::now();
        let stats = source.send_round(dirty, false)?;
        let took = t.elapsed();
        est.round_done(stats.wire_bytes, stats.pages.total(), took);
        dirty = regions
            .iter()
            .map(|(id, n)| (*id, DirtyBitmap::new(*n)))
            .collect();
        let bitmaps: Vec<&DirtyBitmap> = dirty.iter().map(|(_, b)| b).collect();
        sync_into(log, &regions, &bitmaps).map_err(|e| Failed::new(e, Vec::new()))?;
        let left: u64 = dirty.iter().map(|(_, b)| b.count()).sum();
        est.dirty_found(left, took);
        source.note_dirty_rate(est.dirty_rate());
        let mut cfg = config;
        cfg.downtime_limit = control.downtime_limit();
        let expected = est.expected_downtime(left);
        match est.decide(&cfg, round, left, started.elapsed()) {
            Decision::Continue { throttle } => {
                if let Some(pct) = throttle {
                    log.throttle(pct)
                        .map_err(|e| Failed::new(MigrationError::DirtyLog(e), Vec::new()))?;
                }
            }
            Decision::Stop(r) => break (r, expected),
        }
        round += 1;
    };
    // Stop and copy.
    let pause_at = Instant::now();
    log.pause()
        .map_err(|e| Failed::new(MigrationError::DirtyLog(e), Vec::new()))?;
    let resume_on_error = |log: &mut dyn DirtyLog, f: Failed| {
        if f.may_resume_source() {
            let _ = log.resume();
        }
        f
    };
    let bitmaps: Vec<&DirtyBitmap> = dirty.iter().map(|(_, b)| b).collect();
    if let Err(e) = sync_into(log, &regions, &bitmaps) {
        return Err(resume_on_error(log, Failed::new(e, dirty)));
    }
    let pause_ms = pause_at.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    if let Err(f) = source.send_round(dirty, true) {
        return Err(resume_on_error(log, f));
    }
    let last_pages_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for s in device_state() {
        if let Err(f) = source.send_device_state(&s.name, s.instance, s.data) {
            return Err(resume_on_error(log, f));
        }
    }
    let device_state_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    // Outcome unknown: the destination may run the guest, so it stays paused here.
    if let Err(f) = source.complete().and_then(Switchover::into_result) {
        return Err(resume_on_error(log, f));
    }
    let completion_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut stats = source.stats();
    stats.status = "completed".into();
    stats.downtime_ms = pause_at.elapsed().as_secs_f64() * 1e3;
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
        expected.as_secs_f64() * 1e3
    };
    Ok(stats)
}

fn sync(
    log: &mut dyn DirtyLog,
    regions: &[(RegionId, u64)],
    into: &[DirtyBitmap],
) -> Result<(), Failed> {
    let refs: Vec<&DirtyBitmap> = into.iter().collect();
    sync_into(log, regions, &refs).map_err(Failed::bare)
}

fn sync_into(
    log: &mut dyn DirtyLog,
    regions: &[(RegionId, u64)],
    into: &[&DirtyBitmap],
) -> Result<(), MigrationError> {
    for ((id, _), b) in regions.iter().zip(into) {
        log.sync_and_clear(*id, b)
            .map_err(MigrationError::DirtyLog)?;
    }
    Ok(())
}
