//! A live view of a running migration, readable from any thread while
//! [`Migration::run`](crate::Migration::run) holds the [`Source`](crate::Source).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::source::Counters;

/// Where a migration is.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Phase {
    /// Channels are open; no round has started.
    Setup,
    /// Pre-copy rounds while the guest runs.
    Precopy,
    /// The guest is paused: the last pages and the device state are going out.
    StopAndCopy,
    /// Waiting for the destination to confirm, then handing the guest over.
    Switchover,
    /// The destination owns the guest.
    Completed,
    /// The migration failed; the guest runs on the source, unless resuming it failed
    /// too ([`Failed::running_on_source`](crate::Failed::running_on_source) says).
    Failed,
    /// The hand-over began but its end is unknown: the guest runs on neither side
    /// until the management layer asks the destination.
    OutcomeUnknown,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Setup,
            1 => Phase::Precopy,
            2 => Phase::StopAndCopy,
            3 => Phase::Switchover,
            4 => Phase::Completed,
            5 => Phase::Failed,
            _ => Phase::OutcomeUnknown,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Phase::Setup => 0,
            Phase::Precopy => 1,
            Phase::StopAndCopy => 2,
            Phase::Switchover => 3,
            Phase::Completed => 4,
            Phase::Failed => 5,
            Phase::OutcomeUnknown => 6,
        }
    }
}

/// What a per-round callback ([`Migration::on_round`](crate::Migration::on_round))
/// asks after a pre-copy round.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundAction {
    /// Let the convergence policy decide.
    Continue,
    /// Pause the guest and switch over now, whatever the expected downtime.
    SwitchOver,
    /// Stop the migration; the guest keeps running on the source
    /// ([`MigrationError::Cancelled`](crate::MigrationError::Cancelled)).
    Cancel,
}

/// A moment of a migration, as [`Progress::snapshot`] read it.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ProgressSnapshot {
    /// Where it is.
    pub phase: Phase,
    /// The round being sent, or the last one sent (0-based).
    pub round: u32,
    /// Since the source connected.
    pub elapsed: Duration,
    /// Guest pages sent so far (all rounds, zero pages included).
    pub pages: u64,
    /// Guest bytes those pages hold.
    pub guest_bytes: u64,
    /// Bytes of the page-carrying frames (PAGES and COPY) written to the channels.
    pub wire_bytes: u64,
    /// Pages per second since the start.
    pub pages_per_s: f64,
    /// Wire throughput since the start, Mbit/s.
    pub mbit_per_s: f64,
    /// Wire throughput of the last finished round, Mbit/s.
    pub last_round_mbit_per_s: f64,
    /// Dirty pages found after the last round (what the next round sends).
    pub dirty_pages: u64,
    /// The guest's dirty rate, pages/s, measured over the last round.
    pub dirty_rate_pages_per_s: f64,
    /// The downtime expected if the guest were paused now (`None` before the first
    /// round gave a bandwidth).
    pub expected_downtime: Option<Duration>,
    /// Device-state bytes sent so far.
    pub device_state_bytes: u64,
}

/// A cheap, cloneable handle on a migration's progress
/// ([`Source::progress`](crate::Source::progress)); every read is a few atomic loads.
#[derive(Clone, Debug)]
pub struct Progress(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    started: Instant,
    counters: Vec<Arc<Counters>>,
    phase: AtomicU8,
    round: AtomicU32,
    dirty: AtomicU64,
    dirty_rate: AtomicU64,
    last_round_mbit: AtomicU64,
    expected_ns: AtomicU64,
    device_bytes: AtomicU64,
}

const NO_ESTIMATE: u64 = u64::MAX;

impl Progress {
    pub(crate) fn new(started: Instant, counters: Vec<Arc<Counters>>) -> Self {
        Self(Arc::new(Inner {
            started,
            counters,
            phase: AtomicU8::new(Phase::Setup.to_u8()),
            round: AtomicU32::new(0),
            dirty: AtomicU64::new(0),
            dirty_rate: AtomicU64::new(0f64.to_bits()),
            last_round_mbit: AtomicU64::new(0f64.to_bits()),
            expected_ns: AtomicU64::new(NO_ESTIMATE),
            device_bytes: AtomicU64::new(0),
        }))
    }

    /// Reads the migration's state now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let i = &self.0;
        let elapsed = i.started.elapsed();
        let (mut pages, mut guest_bytes, mut wire_bytes) = (0, 0, 0);
        for c in &i.counters {
            pages += c.pages().total();
            guest_bytes += c.guest_bytes.load(Ordering::Relaxed);
            wire_bytes += c.wire_bytes.load(Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        let per_s = |v: f64| if secs > 0.0 { v / secs } else { 0.0 };
        let expected = i.expected_ns.load(Ordering::Relaxed);
        ProgressSnapshot {
            phase: self.phase(),
            round: i.round.load(Ordering::Relaxed),
            elapsed,
            pages,
            guest_bytes,
            wire_bytes,
            pages_per_s: per_s(pages as f64),
            mbit_per_s: per_s(wire_bytes as f64 * 8.0 / 1e6),
            last_round_mbit_per_s: f64::from_bits(i.last_round_mbit.load(Ordering::Relaxed)),
            dirty_pages: i.dirty.load(Ordering::Relaxed),
            dirty_rate_pages_per_s: f64::from_bits(i.dirty_rate.load(Ordering::Relaxed)),
            expected_downtime: (expected != NO_ESTIMATE).then(|| Duration::from_nanos(expected)),
            device_state_bytes: i.device_bytes.load(Ordering::Relaxed),
        }
    }

    /// Where the migration is.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.0.phase.load(Ordering::Relaxed))
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        self.0.phase.store(p.to_u8(), Ordering::Relaxed);
    }

    pub(crate) fn set_round(&self, round: u32) {
        self.0.round.store(round, Ordering::Relaxed);
    }

    pub(crate) fn round_done(&self, mbit_per_s: f64) {
        self.0
            .last_round_mbit
            .store(mbit_per_s.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn set_dirty(&self, pages: u64, rate: f64, expected: Duration) {
        self.0.dirty.store(pages, Ordering::Relaxed);
        self.0.dirty_rate.store(rate.to_bits(), Ordering::Relaxed);
        let ns = if expected == Duration::MAX {
            NO_ESTIMATE
        } else {
            u64::try_from(expected.as_nanos()).unwrap_or(NO_ESTIMATE - 1)
        };
        self.0.expected_ns.store(ns, Ordering::Relaxed);
    }

    pub(crate) fn add_device_bytes(&self, n: u64) {
        self.0.device_bytes.fetch_add(n, Ordering::Relaxed);
    }
}
