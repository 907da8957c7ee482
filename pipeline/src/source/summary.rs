//! The source's statistics: [`Source::stats`], from the workers' counters, the
//! engines' and the rounds so far, and the CPU time of every thread it ran.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pagewire_protocol::CodecId;

use crate::progress::Phase;
use crate::stats::{CodecStats, MigrationStats};

use super::Source;

impl Source {
    /// Adds CPU the caller's thread spent driving the migration (`Migration::run`).
    pub(crate) fn add_driver_cpu(&mut self, cpu: Duration) {
        self.driver_cpu += cpu;
    }

    /// CPU time of the source's threads so far: channel workers, codec threads, and the
    /// caller's thread in `Source::connect` and `Migration::run`.
    pub(super) fn cpu_time(&self) -> Duration {
        let workers: u64 = self
            .workers
            .iter()
            .map(|w| w.counters.cpu_ns.load(Ordering::Relaxed))
            .sum();
        let codecs: Duration = self
            .engine_stats
            .iter()
            .filter_map(|e| e.lock().ok().map(|e| e.worker_cpu))
            .sum();
        Duration::from_nanos(workers) + codecs + self.driver_cpu
    }

    /// A snapshot of the statistics so far (totals are live; rounds appear as they end).
    pub fn stats(&self) -> MigrationStats {
        let mut s = MigrationStats {
            status: match self.progress.phase() {
                Phase::Completed => "completed",
                Phase::Failed => "failed",
                Phase::OutcomeUnknown => "unknown",
                _ => "active",
            }
            .into(),
            transport: self.transport.clone(),
            channels: self.config.channels,
            codec: self.config.codec.label(),
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            setup_ms: self.setup.as_secs_f64() * 1e3,
            rounds: self.rounds.len() as u32,
            per_round: self.rounds.clone(),
            ..Default::default()
        };
        for w in &self.workers {
            let c = &w.counters;
            s.pages.add(&c.pages());
            s.wire_bytes += c.wire_bytes.load(Ordering::Relaxed);
            s.guest_bytes += c.guest_bytes.load(Ordering::Relaxed);
            s.zero_copy.zero_copy += c.zc.load(Ordering::Relaxed);
            s.zero_copy.copied += c.zc_copied.load(Ordering::Relaxed);
            s.zero_copy.registered_bytes += c.registered.load(Ordering::Relaxed);
            s.tls.sealed_bytes += c.tls_sealed.load(Ordering::Relaxed);
            s.tls.copied_bytes += c.tls_copied.load(Ordering::Relaxed);
            s.channel_bytes.push(w.bytes_sent.load(Ordering::Relaxed));
        }
        s.compression_ratio = if s.wire_bytes > 0 {
            s.guest_bytes as f64 / s.wire_bytes as f64
        } else {
            0.0
        };
        s.tls.encrypted = self.config.encryption.tls().is_some();
        let pages = s.pages.total();
        if pages > 0 {
            s.tls.copied_per_page = s.tls.copied_bytes as f64 / pages as f64;
        }
        let secs = s.total_ms / 1e3;
        if secs > 0.0 {
            s.mbit_per_s = s.wire_bytes as f64 * 8.0 / secs / 1e6;
            s.pages_per_s = s.pages.total() as f64 / secs;
        }
        if let Some(r) = self.rounds.iter().rev().find(|r| !r.paused) {
            s.dirty_rate_pages_per_s = r.dirty_rate_pages_per_s;
        }
        s.engine.codec_threads = self
            .config
            .codec_threads
            .unwrap_or_else(|| crate::config::codec_threads_for(self.config.channels));
        // Engine: per codec, busy rate and queue depth, summed over channels.
        let mut codecs: HashMap<CodecId, CodecStats> = HashMap::new();
        let mut busy = 0.0;
        let mut depth = 0.0;
        for e in &self.engine_stats {
            let Ok(e) = e.lock() else { continue };
            busy += e.busy_rate();
            depth += e.mean_queue_depth;
            s.engine.max_queue_depth = s.engine.max_queue_depth.max(e.max_queue_depth as u64);
            s.engine.hw_fallbacks += e.hw_fallbacks;
            s.engine.at_once += e.at_once;
            s.engine.jobs += e.submitted.saturating_sub(e.at_once);
            s.engine.pool_takes += e.pool_takes;
            let name = e.backend.name();
            s.engine.backend = match s.engine.backend {
                "" => name,
                same if same == name => name,
                _ => "mixed",
            };
            s.engine.hw_fallback_causes.add(&e.fallback_causes);
            crate::stats::DeltaCacheSummary::merge(&mut s.engine.delta, e.delta.as_ref());
            for c in &e.encode {
                if c.jobs == 0 {
                    continue;
                }
                let entry = codecs.entry(c.codec).or_insert_with(|| CodecStats {
                    codec: format!("{:?}", c.codec),
                    ..Default::default()
                });
                entry.frames += c.jobs;
                entry.pages += c.pages;
                entry.guest_bytes += c.bytes_in;
                entry.payload_bytes += c.bytes_out;
            }
        }
        let n = self.engine_stats.len().max(1) as f64;
        s.engine.busy_rate = busy / n;
        s.engine.mean_queue_depth = depth / n;
        s.codecs = codecs.into_values().collect();
        if self.config.codec.fixed_codec().is_none() {
            let mut a = crate::stats::AdaptiveStats::default();
            for w in &self.adaptive_stats {
                if let Ok(w) = w.lock() {
                    a.add(&w);
                }
            }
            s.adaptive = Some(a);
        }
        s.codecs.sort_by(|a, b| a.codec.cmp(&b.codec));
        s.cpu =
            crate::stats::CpuSummary::new(self.cpu_time(), self.started.elapsed(), s.guest_bytes);
        s.encode_latency = self.latency.encode.summary();
        s.send_latency = self.latency.send.summary();
        s
    }
}
