//! The engine's statistics: jobs, bytes, ratio per codec, raw fallbacks, busy rate and
//! queue depth.

use core::time::Duration;
use std::time::Instant;

use pagewire_protocol::CodecId;

use crate::cache::DeltaStats;
use crate::codec::SOFTWARE_FORMATS;
use crate::engine::{BackendKind, FallbackCounts};

/// Counters for one format, in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecStats {
    /// The format (for encodes: the one requested).
    pub codec: CodecId,
    /// Jobs completed without error.
    pub jobs: u64,
    /// Jobs completed with an error.
    pub errors: u64,
    /// Pages in those jobs.
    pub pages: u64,
    /// Uncompressed bytes (pages × page size).
    pub bytes_in: u64,
    /// Bytes on the wire: payload, or raw pages sent in place.
    pub bytes_out: u64,
    /// Encodes that ended up raw because the frame did not shrink.
    pub raw_fallbacks: u64,
}

impl CodecStats {
    fn new(codec: CodecId) -> Self {
        Self {
            codec,
            jobs: 0,
            errors: 0,
            pages: 0,
            bytes_in: 0,
            bytes_out: 0,
            raw_fallbacks: 0,
        }
    }

    /// Compression ratio, uncompressed over wire bytes (`None` before any byte).
    pub fn ratio(&self) -> Option<f64> {
        (self.bytes_out > 0).then(|| self.bytes_in as f64 / self.bytes_out as f64)
    }
}

/// A snapshot of an engine's statistics.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStats {
    /// Jobs handed to the backend.
    pub submitted: u64,
    /// Of those, frames encoded at once with no job ([`Engine::encode_now`]).
    ///
    /// [`Engine::encode_now`]: crate::Engine::encode_now
    pub at_once: u64,
    /// Output buffers taken from the pool, with its atomic operations: a buffer given
    /// back with [`Engine::recycle`] or [`Engine::recycle_buf`] is taken again from the
    /// engine's own spare buffers instead, so while every sent payload comes back this
    /// stays at most the pool's size.
    ///
    /// [`Engine::recycle`]: crate::Engine::recycle
    /// [`Engine::recycle_buf`]: crate::Engine::recycle_buf
    pub pool_takes: u64,
    /// Completions returned to the caller (including errors).
    pub completed: u64,
    /// Jobs refused before reaching the backend (unsupported format, level, size).
    pub rejected: u64,
    /// Times the backend accepted only part of a batch (queue or buffers full).
    pub partial_submits: u64,
    /// Encode counters per requested format.
    pub encode: Vec<CodecStats>,
    /// Decode counters per format.
    pub decode: Vec<CodecStats>,
    /// Completions per backend that ran them.
    pub by_backend: Vec<(BackendKind, u64)>,
    /// Time with at least one job queued in the backend. Jobs the inline software
    /// backend runs within `submit` are never queued (the caller's thread ran them):
    /// such an engine stays at zero here and in the depths below.
    pub busy: Duration,
    /// Time since the engine started (or its statistics were reset).
    pub wall: Duration,
    /// Jobs in flight now (submitted, completion not yet polled).
    pub queue_depth: usize,
    /// Most jobs ever in flight.
    pub max_queue_depth: usize,
    /// Time-weighted mean of jobs in flight.
    pub mean_queue_depth: f64,
    /// The delta cache's counters, when the engine has one.
    pub delta: Option<DeltaStats>,
    /// CPU time of the backend's own worker threads (software codec threads); zero
    /// when jobs run on the caller's thread, whose CPU time is the caller's to count.
    pub worker_cpu: Duration,
    /// The backend the engine runs on (jobs it handed back ran on software).
    pub backend: BackendKind,
    /// Jobs a hardware backend handed to the software codecs (all causes).
    pub hw_fallbacks: u64,
    /// Those jobs per cause.
    pub fallback_causes: FallbackCounts,
}

impl EngineStats {
    /// Busy time over wall time, `0.0..=1.0`.
    pub fn busy_rate(&self) -> f64 {
        if self.wall.is_zero() {
            0.0
        } else {
            self.busy.as_secs_f64() / self.wall.as_secs_f64()
        }
    }

    /// Encode counters of one requested format.
    pub fn encode_of(&self, codec: CodecId) -> Option<&CodecStats> {
        self.encode.iter().find(|s| s.codec == codec)
    }

    /// Decode counters of one format.
    pub fn decode_of(&self, codec: CodecId) -> Option<&CodecStats> {
        self.decode.iter().find(|s| s.codec == codec)
    }
}

/// The engine's running counters; updated on every submit and poll, no allocation
/// after construction (formats outside [`SOFTWARE_FORMATS`] share one "other" slot).
#[derive(Debug)]
pub(crate) struct StatsCounter {
    pub(crate) submitted: u64,
    pub(crate) at_once: u64,
    pub(crate) pool_takes: u64,
    pub(crate) completed: u64,
    pub(crate) rejected: u64,
    pub(crate) partial_submits: u64,
    pub(crate) fallbacks: FallbackCounts,
    encode: Vec<CodecStats>,
    decode: Vec<CodecStats>,
    by_backend: Vec<(BackendKind, u64)>,
    start: Instant,
    last: Instant,
    busy: Duration,
    depth: usize,
    max_depth: usize,
    depth_integral: f64,
}

/// Stands for formats this crate does not know.
const OTHER: CodecId = CodecId(0);

impl StatsCounter {
    pub(crate) fn new(now: Instant) -> Self {
        let all = || {
            SOFTWARE_FORMATS
                .iter()
                .chain([&OTHER])
                .map(|&c| CodecStats::new(c))
                .collect()
        };
        StatsCounter {
            submitted: 0,
            at_once: 0,
            pool_takes: 0,
            completed: 0,
            rejected: 0,
            partial_submits: 0,
            fallbacks: FallbackCounts::default(),
            encode: all(),
            decode: all(),
            by_backend: [BackendKind::Software, BackendKind::Iaa, BackendKind::Qat]
                .into_iter()
                .map(|k| (k, 0))
                .collect(),
            start: now,
            last: now,
            busy: Duration::ZERO,
            depth: 0,
            max_depth: 0,
            depth_integral: 0.0,
        }
    }

    /// Advances the clock to `now` with the current depth.
    fn tick(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last);
        if self.depth > 0 {
            self.busy += dt;
        }
        self.depth_integral += dt.as_secs_f64() * self.depth as f64;
        self.last = now;
    }

    pub(crate) fn set_depth(&mut self, now: Instant, depth: usize) {
        self.tick(now);
        self.depth = depth;
        self.max_depth = self.max_depth.max(depth);
    }

    fn slot(list: &mut [CodecStats], codec: CodecId) -> &mut CodecStats {
        // The slots are in id order from 1 (`SOFTWARE_FORMATS`), "other" last.
        let i = usize::from(codec.0)
            .checked_sub(1)
            .filter(|&i| list.get(i).is_some_and(|s| s.codec == codec))
            .or_else(|| list.iter().position(|s| s.codec == codec))
            .unwrap_or(list.len() - 1);
        &mut list[i]
    }

    /// Records one completion.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &mut self,
        encode: bool,
        codec: CodecId,
        backend: BackendKind,
        ok: bool,
        pages: usize,
        bytes_in: usize,
        bytes_out: usize,
        raw_fallback: bool,
    ) {
        self.completed += 1;
        let s = Self::slot(
            if encode {
                &mut self.encode
            } else {
                &mut self.decode
            },
            codec,
        );
        if ok {
            s.jobs += 1;
            s.pages += pages as u64;
            s.bytes_in += bytes_in as u64;
            s.bytes_out += bytes_out as u64;
            s.raw_fallbacks += u64::from(raw_fallback);
        } else {
            s.errors += 1;
        }
        match self.by_backend.iter_mut().find(|(k, _)| *k == backend) {
            Some((_, n)) => *n += 1,
            None => {
                if let Some((_, n)) = self.by_backend.first_mut() {
                    *n += 1;
                }
            }
        }
    }

    pub(crate) fn snapshot(&self, now: Instant, delta: Option<DeltaStats>) -> EngineStats {
        let dt = now.saturating_duration_since(self.last);
        let busy = if self.depth > 0 {
            self.busy + dt
        } else {
            self.busy
        };
        let wall = now.saturating_duration_since(self.start);
        let integral = self.depth_integral + dt.as_secs_f64() * self.depth as f64;
        EngineStats {
            submitted: self.submitted,
            at_once: self.at_once,
            pool_takes: self.pool_takes,
            completed: self.completed,
            rejected: self.rejected,
            partial_submits: self.partial_submits,
            encode: self.encode.clone(),
            decode: self.decode.clone(),
            by_backend: self.by_backend.clone(),
            busy,
            wall,
            queue_depth: self.depth,
            max_queue_depth: self.max_depth,
            mean_queue_depth: if wall.is_zero() {
                0.0
            } else {
                integral / wall.as_secs_f64()
            },
            delta,
            worker_cpu: Duration::ZERO,
            backend: BackendKind::Software,
            hw_fallbacks: self.fallbacks.total(),
            fallback_causes: self.fallbacks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_counts_only_time_with_work() {
        let t0 = Instant::now();
        let mut s = StatsCounter::new(t0);
        s.set_depth(t0 + Duration::from_millis(10), 2);
        s.set_depth(t0 + Duration::from_millis(30), 0);
        let snap = s.snapshot(t0 + Duration::from_millis(40), None);
        assert_eq!(snap.busy, Duration::from_millis(20));
        assert_eq!(snap.wall, Duration::from_millis(40));
        assert!((snap.busy_rate() - 0.5).abs() < 1e-9);
        assert!((snap.mean_queue_depth - 1.0).abs() < 1e-9);
        assert_eq!(snap.max_queue_depth, 2);
    }

    #[test]
    fn ratio_and_fallbacks_per_codec() {
        let t0 = Instant::now();
        let mut s = StatsCounter::new(t0);
        s.record(
            true,
            CodecId::ZSTD,
            BackendKind::Software,
            true,
            2,
            8192,
            1024,
            false,
        );
        s.record(
            true,
            CodecId::ZSTD,
            BackendKind::Software,
            true,
            1,
            4096,
            4096,
            true,
        );
        s.record(
            false,
            CodecId(0x77),
            BackendKind::Qat,
            false,
            0,
            0,
            0,
            false,
        );
        let snap = s.snapshot(t0, None);
        let z = snap.encode_of(CodecId::ZSTD).unwrap();
        assert_eq!((z.jobs, z.pages, z.raw_fallbacks), (2, 3, 1));
        assert!((z.ratio().unwrap() - 12288.0 / 5120.0).abs() < 1e-9);
        assert_eq!(snap.decode_of(OTHER).unwrap().errors, 1);
        assert_eq!(snap.by_backend[2], (BackendKind::Qat, 1));
        assert_eq!(snap.completed, 3);
    }
}
