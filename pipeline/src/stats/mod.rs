//! Migration statistics: a plain struct the VMM reads at any time, a one-screen text
//! table in the spirit of QEMU's `info migrate`, and JSON.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

mod text;

/// Pages sent, by how they were sent.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PageCounts {
    /// Sent compressed.
    pub compressed: u64,
    /// Sent as zero-page offsets only.
    pub zero: u64,
    /// Sent as uniform runs only: one byte repeated over the page.
    pub uniform: u64,
    /// Sent as COPY references to an equal page the channel sent before
    /// ([`SourceConfig::dedup`](crate::SourceConfig::dedup)).
    pub copied: u64,
    /// Sent as a delta against the previous version.
    pub delta: u64,
    /// Sent raw because compression did not shrink them (or raw was chosen).
    pub raw: u64,
}

impl PageCounts {
    /// All pages.
    pub fn total(&self) -> u64 {
        self.compressed + self.zero + self.uniform + self.copied + self.delta + self.raw
    }

    /// Adds another count.
    pub fn add(&mut self, o: &PageCounts) {
        self.compressed += o.compressed;
        self.zero += o.zero;
        self.uniform += o.uniform;
        self.copied += o.copied;
        self.delta += o.delta;
        self.raw += o.raw;
    }
}

/// The adaptive codec choice of a migration (`CodecPolicy::Auto`, the default), over
/// all channels.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct AdaptiveStats {
    /// Each candidate (codec at a level) and what it encoded.
    pub choices: Vec<ChoiceStats>,
    /// Switches between candidates, counted by (from, to, reason).
    pub switches: Vec<CodecSwitch>,
    /// The latest switches with their figures (up to 32 per channel).
    pub recent: Vec<CodecSwitch>,
    /// Frames sent with another candidate to refresh its measurements.
    pub explored_frames: u64,
    /// Explored frames whose first pages were also encoded, off the wire, by the
    /// explored compressor and the current choice, compared on the same bytes.
    pub paired_samples: u64,
    /// The last link rate measured, bytes/s, summed over channels.
    pub link_bytes_per_s: f64,
    /// The most any channel held unacknowledged (socket and send queue) after a send,
    /// where the channel tells: the choice holds it to 16 MiB once it knows the link,
    /// so that a choice reaches the wire within a few hundred milliseconds at 1 Gbit/s.
    pub peak_unacked_bytes: u64,
    /// Windows (100 ms of a channel) in which the choice measured the channel.
    pub windows: u64,
    /// Of those, the windows whose sends waited on the destination's receive window
    /// more than half the time, where the channel tells (TCP, io_uring): the receiver,
    /// not the link, limited them, and no candidate was expected to move more guest
    /// bytes than the current one did.
    pub receiver_windows: u64,
}

impl AdaptiveStats {
    /// Adds another channel's statistics.
    pub fn add(&mut self, o: &AdaptiveStats) {
        for c in &o.choices {
            match self.choices.iter_mut().find(|x| x.choice == c.choice) {
                Some(x) => {
                    x.frames += c.frames;
                    x.guest_bytes += c.guest_bytes;
                    x.payload_bytes += c.payload_bytes;
                }
                None => self.choices.push(c.clone()),
            }
        }
        for w in &o.switches {
            match self
                .switches
                .iter_mut()
                .find(|x| x.from == w.from && x.to == w.to && x.reason == w.reason)
            {
                Some(x) => x.count += w.count,
                None => self.switches.push(w.clone()),
            }
        }
        self.recent.extend(o.recent.iter().cloned());
        self.recent.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        self.explored_frames += o.explored_frames;
        self.paired_samples += o.paired_samples;
        self.link_bytes_per_s += o.link_bytes_per_s;
        self.peak_unacked_bytes = self.peak_unacked_bytes.max(o.peak_unacked_bytes);
        self.windows += o.windows;
        self.receiver_windows += o.receiver_windows;
    }

    /// Share of the guest bytes encoded by `choice`, 0..=1.
    pub fn share(&self, choice: &str) -> f64 {
        let total: u64 = self.choices.iter().map(|c| c.guest_bytes).sum();
        let mine: u64 = self
            .choices
            .iter()
            .filter(|c| c.choice == choice)
            .map(|c| c.guest_bytes)
            .sum();
        ratio(mine, total)
    }
}

/// What one adaptive candidate encoded.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ChoiceStats {
    /// The codec and level, e.g. `zstd:-5`, `lz4`, `raw`.
    pub choice: String,
    /// Frames.
    pub frames: u64,
    /// Guest bytes of their data pages.
    pub guest_bytes: u64,
    /// Payload bytes out.
    pub payload_bytes: u64,
}

/// A switch of the adaptive codec choice.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CodecSwitch {
    /// From this candidate.
    pub from: String,
    /// To this one.
    pub to: String,
    /// `link-bound` (more compression moves more), `cpu-bound` (a cheaper codec
    /// moves more) or `cheaper` (another moves as much for less core time); with
    /// delta among the candidates, `cached` (to `delta`: frames whose pages are all
    /// cached go as delta) and `delta-larger` (from `delta`: its frames sent more bytes
    /// per guest byte than the current choice is expected to).
    pub reason: String,
    /// How many times (in [`AdaptiveStats::switches`]; 1 in the log).
    pub count: u64,
    /// When, ms after the channel started (log entries).
    pub at_ms: f64,
    /// The channel (log entries).
    pub channel: u16,
    /// The figures that decided it (log entries): the link's rate per channel (and
    /// whether it was busy), and for both candidates the encode speed per core, the
    /// expected ratio and the guest bytes per second the model expected of it.
    pub detail: String,
}

/// What one codec did.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CodecStats {
    /// The codec's name (`zstd`, `raw`, ...).
    pub codec: String,
    /// Frames sent with it.
    pub frames: u64,
    /// Guest pages those frames carried.
    pub pages: u64,
    /// Guest bytes in.
    pub guest_bytes: u64,
    /// Payload bytes out.
    pub payload_bytes: u64,
}

impl CodecStats {
    /// Guest bytes over payload bytes.
    pub fn ratio(&self) -> f64 {
        ratio(self.guest_bytes, self.payload_bytes)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// One round of pre-copy (or the final, paused one).
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct RoundStats {
    /// Round number.
    pub round: u32,
    /// Whether the guest was paused (the last round).
    pub paused: bool,
    /// Wall time of the round, ms.
    pub duration_ms: f64,
    /// Dirty pages found at the start of the round.
    pub dirty_pages: u64,
    /// Pages sent, by kind.
    pub pages: PageCounts,
    /// PAGES frames sent.
    pub frames: u64,
    /// Guest memory bytes covered: every page sent, zero, uniform and copied pages
    /// included.
    pub guest_bytes: u64,
    /// Bytes of the round's page-carrying frames (PAGES and COPY, headers included)
    /// written to the channels, before TLS.
    pub wire_bytes: u64,
    /// Pages dirtied per second during the round, as measured at its end.
    pub dirty_rate_pages_per_s: f64,
    /// Wire bandwidth achieved in the round, Mbit/s.
    pub mbit_per_s: f64,
    /// CPU-seconds the source's threads used in the round.
    pub cpu_s: f64,
}

/// CPU time one side of a migration used: its channel threads (and codec threads,
/// when it has any), user and system time, from each thread's own CPU clock.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CpuSummary {
    /// CPU-seconds.
    pub seconds: f64,
    /// CPU-seconds over wall time, as % of one core (200 = two cores busy).
    pub percent_of_core: f64,
    /// CPU-seconds per GiB of guest memory moved (pages × page size).
    pub seconds_per_gib: f64,
}

impl CpuSummary {
    /// The summary of `cpu` spent over `wall` while `guest_bytes` moved.
    pub fn new(cpu: Duration, wall: Duration, guest_bytes: u64) -> Self {
        let seconds = cpu.as_secs_f64();
        let wall = wall.as_secs_f64();
        let gib = guest_bytes as f64 / f64::from(1u32 << 30);
        Self {
            seconds,
            percent_of_core: if wall > 0.0 {
                seconds / wall * 100.0
            } else {
                0.0
            },
            seconds_per_gib: if gib > 0.0 { seconds / gib } else { 0.0 },
        }
    }
}

/// A latency distribution, in microseconds.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest.
    pub max_us: u64,
}

/// A concurrent latency histogram (1 µs to 60 s, 3 significant digits).
#[derive(Debug)]
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        // Bounds are constants that hdrhistogram accepts.
        let h = Histogram::new_with_bounds(1, 60_000_000, 3)
            .unwrap_or_else(|_| unreachable!("valid histogram bounds"));
        Self(Mutex::new(h))
    }
}

impl Latency {
    /// Records one sample.
    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 60_000_000);
        if let Ok(mut h) = self.0.lock() {
            let _ = h.record(us);
        }
    }

    /// The distribution so far.
    pub fn summary(&self) -> LatencySummary {
        match self.0.lock() {
            Ok(h) if !h.is_empty() => LatencySummary {
                count: h.len(),
                p50_us: h.value_at_quantile(0.5),
                p99_us: h.value_at_quantile(0.99),
                max_us: h.max(),
            },
            _ => LatencySummary::default(),
        }
    }
}

/// Where the downtime went.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DowntimeBreakdown {
    /// Pausing the guest and syncing the last dirty log, ms.
    pub pause_ms: f64,
    /// Sending the last dirty pages, ms.
    pub last_pages_ms: f64,
    /// Sending device state, ms.
    pub device_state_ms: f64,
    /// COMPLETE until ACK COMMITTED: waiting for the destination to confirm everything
    /// is applied, then handing the guest over, ms. Closing the channels afterwards is
    /// not included.
    pub completion_ms: f64,
}

/// The codec engine's view.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct EngineSummary {
    /// Time with work queued over wall time, 0..=1.
    pub busy_rate: f64,
    /// Mean jobs queued when a job was submitted.
    pub mean_queue_depth: f64,
    /// Most jobs queued at once.
    pub max_queue_depth: u64,
    /// Frames encoded at once on the channels' threads, with no job
    /// ([`Engine::encode_now`](pagewire_accel::Engine::encode_now)).
    pub at_once: u64,
    /// Frames encoded as engine jobs.
    pub jobs: u64,
    /// Output buffers the engines took from their pools, with the pools' atomic
    /// operations ([`EngineStats::pool_takes`](pagewire_accel::EngineStats::pool_takes)):
    /// the others were payloads the transport handed back, reused with no atomic
    /// read-modify-write. At most the pools' size while every payload comes back.
    pub pool_takes: u64,
    /// Jobs a hardware backend handed back to software.
    pub hw_fallbacks: u64,
    /// Those jobs per cause.
    pub hw_fallback_causes: FallbackSummary,
    /// The backend of the channels' engines (`software`, `iaa`, `qat`; `mixed`
    /// when channels differ; empty before any engine ran).
    pub backend: &'static str,
    /// Software codec threads per channel; 0: each channel runs its codec jobs on its
    /// own thread, within the engine's submit, so nothing is ever queued and the busy
    /// rate and depths stay 0.
    pub codec_threads: usize,
    /// The source's delta caches, summed over channels, where it keeps them (the
    /// delta codec, or delta among the adaptive candidates).
    pub delta: Option<DeltaCacheSummary>,
}

/// What the source's delta caches did (see
/// [`DeltaStats`](pagewire_accel::DeltaStats)).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeltaCacheSummary {
    /// Pages a delta frame found cached.
    pub hits: u64,
    /// Pages a delta frame did not find (sent raw in it, then kept).
    pub misses: u64,
    /// Pages found whose delta was too large (sent raw in the delta frame).
    pub overflows: u64,
    /// Pages evicted to make room.
    pub evictions: u64,
    /// Pages kept from frames of other codecs (the adaptive choice's delta).
    pub stored: u64,
    /// Pages the caches hold now.
    pub resident: u64,
}

impl DeltaCacheSummary {
    fn add(&mut self, d: &pagewire_accel::DeltaStats) {
        self.hits += d.hits;
        self.misses += d.misses;
        self.overflows += d.overflows;
        self.evictions += d.evictions;
        self.stored += d.stored;
        self.resident += d.resident;
    }

    /// Adds a channel's cache.
    pub(crate) fn merge(
        into: &mut Option<DeltaCacheSummary>,
        d: Option<&pagewire_accel::DeltaStats>,
    ) {
        if let Some(d) = d {
            into.get_or_insert_with(Default::default).add(d);
        }
    }
}

/// Jobs a hardware backend handed to software, per cause (see
/// [`FallbackCause`](pagewire_accel::FallbackCause)).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct FallbackSummary {
    /// The work queue stayed full after the backend's retries.
    pub queue_full: u64,
    /// An unresolved device page fault.
    pub page_fault: u64,
    /// An output overflow the backend could not settle.
    pub output_overflow: u64,
    /// Another device error status.
    pub device_error: u64,
    /// No completion in time (a hung descriptor).
    pub timeout: u64,
    /// The device or its queue was disabled or removed.
    pub device_lost: u64,
    /// A format or level the hardware does not do.
    pub unsupported: u64,
}

impl FallbackSummary {
    /// Adds one engine's counts.
    pub fn add(&mut self, c: &pagewire_accel::FallbackCounts) {
        use pagewire_accel::FallbackCause as C;
        self.queue_full += c.of(C::QueueFull);
        self.page_fault += c.of(C::PageFault);
        self.output_overflow += c.of(C::OutputOverflow);
        self.device_error += c.of(C::DeviceError);
        self.timeout += c.of(C::Timeout);
        self.device_lost += c.of(C::DeviceLost);
        self.unsupported += c.of(C::Unsupported);
    }

    /// The non-zero causes, named as in the statistics text.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("queue-full", self.queue_full),
            ("page-fault", self.page_fault),
            ("output-overflow", self.output_overflow),
            ("device-error", self.device_error),
            ("timeout", self.timeout),
            ("device-lost", self.device_lost),
            ("unsupported", self.unsupported),
        ]
        .into_iter()
        .filter(|&(_, n)| n > 0)
    }
}

/// Zero-copy sends.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ZeroCopySummary {
    /// Sends the kernel completed without copying.
    pub zero_copy: u64,
    /// Sends the kernel had to copy.
    pub copied: u64,
    /// io_uring: memory registered as fixed buffers, all channels (0 until a zero-copy
    /// send went in place, unless zero-copy was forced on).
    pub registered_bytes: u64,
}

/// TLS on the source's channels.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct TlsSummary {
    /// Whether the channels run inside TLS 1.3.
    pub encrypted: bool,
    /// Plaintext bytes sealed into records.
    pub sealed_bytes: u64,
    /// Bytes copied in user space on the TLS send path (by rustls and pagewire).
    pub copied_bytes: u64,
    /// `copied_bytes` over the pages sent.
    pub copied_per_page: f64,
}

/// Everything about a migration, per round and in total.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct MigrationStats {
    /// `active`, `completed`, `failed` (the guest was not handed over), or `unknown`
    /// (COMMIT went out unacknowledged: [`Phase::OutcomeUnknown`](crate::Phase::OutcomeUnknown)),
    /// as the migration's [`Phase`](crate::Phase) says.
    pub status: String,
    /// Transport backend.
    pub transport: String,
    /// Channels.
    pub channels: u16,
    /// Codec asked for.
    pub codec: String,
    /// Since `Source::connect` began (setup included) until these statistics were
    /// taken, ms.
    pub total_ms: f64,
    /// `Source::connect`: connecting, handshaking, starting the channels' threads and
    /// codec engines, and sending the memory layout, ms.
    pub setup_ms: f64,
    /// Guest paused, as the source sees it: from pausing the vCPUs until ACK COMMITTED
    /// (the destination's own restore and start of the guest, the VMM's, not
    /// included), ms. 0 when the caller drove the rounds itself instead of
    /// [`migrate`](fn@crate::migrate).
    pub downtime_ms: f64,
    /// Where the downtime went.
    pub downtime: DowntimeBreakdown,
    /// Downtime expected from the last round's dirty set and bandwidth, ms.
    pub expected_downtime_ms: f64,
    /// Rounds, the final one included.
    pub rounds: u32,
    /// Why pre-copy stopped iterating (`Converged`, `RoundCap`, `TimeCap`).
    pub stop_reason: String,
    /// Pages dirtied per second, as measured in the last pre-copy round.
    pub dirty_rate_pages_per_s: f64,
    /// Pages sent, by kind.
    pub pages: PageCounts,
    /// Guest memory bytes transferred (pages × page size): every page sent, zero,
    /// uniform and copied pages included, which travel with no payload.
    pub guest_bytes: u64,
    /// Bytes of the page-carrying frames (PAGES and COPY, headers included) written
    /// to the channels, before TLS. Every frame's bytes (device state and control
    /// frames too) are in `channel_bytes`.
    pub wire_bytes: u64,
    /// Guest bytes over wire bytes: the effective ratio, pages that went without
    /// payload (zero, uniform, copies) included, not a codec's alone (see `codecs`).
    pub compression_ratio: f64,
    /// Per codec.
    pub codecs: Vec<CodecStats>,
    /// The adaptive codec choice, when it was on.
    pub adaptive: Option<AdaptiveStats>,
    /// Throughput of `wire_bytes` over the total time, Mbit/s.
    pub mbit_per_s: f64,
    /// Guest pages per second over the total time (every page, as `guest_bytes`).
    pub pages_per_s: f64,
    /// Bytes written per channel: every frame after the handshake (pages, device
    /// state, control frames), before TLS.
    pub channel_bytes: Vec<u64>,
    /// Codec engine.
    pub engine: EngineSummary,
    /// Zero-copy sends.
    pub zero_copy: ZeroCopySummary,
    /// TLS: whether encrypted, and what sealing copied.
    pub tls: TlsSummary,
    /// Frame encode latency.
    pub encode_latency: LatencySummary,
    /// Send-completion latency.
    pub send_latency: LatencySummary,
    /// Destination apply latency, when the caller has the destination's statistics
    /// (same process) and copies them in
    /// ([`DestinationStats::apply_latency`](crate::DestinationStats::apply_latency));
    /// empty (`count` 0, and not printed) otherwise: the source does not measure it.
    pub apply_latency: LatencySummary,
    /// Per round.
    pub per_round: Vec<RoundStats>,
    /// CPU the source's threads used: the channels' workers, the codec threads, and
    /// the caller's thread in `Source::connect` (the handshake) and `Migration::run`
    /// (dirty-log syncs, pausing, the device state, the round callbacks).
    pub cpu: CpuSummary,
    /// CPU the destination's threads used, when the caller has the destination's
    /// statistics (same process) and copies them in
    /// ([`DestinationStats::cpu`](crate::DestinationStats::cpu)).
    pub destination_cpu: Option<CpuSummary>,
    /// Things that went wrong without failing the migration (e.g. stopping the dirty
    /// log).
    pub warnings: Vec<String>,
}

#[cfg(feature = "serde")]
impl MigrationStats {
    /// The statistics as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_summary_as_share_of_a_core_and_per_gib() {
        let c = CpuSummary::new(Duration::from_secs(3), Duration::from_secs(2), 2 << 30);
        assert_eq!(c.seconds, 3.0);
        assert_eq!(c.percent_of_core, 150.0);
        assert_eq!(c.seconds_per_gib, 1.5);
        let z = CpuSummary::new(Duration::from_secs(1), Duration::ZERO, 0);
        assert_eq!((z.percent_of_core, z.seconds_per_gib), (0.0, 0.0));
    }

    #[test]
    fn table_and_json_carry_the_figures() {
        let s = MigrationStats {
            status: "completed".into(),
            rounds: 3,
            guest_bytes: 8 << 20,
            wire_bytes: 2 << 20,
            compression_ratio: 4.0,
            codecs: vec![CodecStats {
                codec: "zstd".into(),
                frames: 10,
                pages: 2048,
                guest_bytes: 8 << 20,
                payload_bytes: 2 << 20,
            }],
            per_round: vec![RoundStats {
                round: 0,
                dirty_pages: 2048,
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = s.to_string();
        assert!(t.contains("completed") && t.contains("ratio 4.00"), "{t}");
        #[cfg(feature = "serde")]
        {
            let j: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
            assert_eq!(j["rounds"], 3);
            assert_eq!(j["codecs"][0]["pages"], 2048);
        }
        let l = Latency::default();
        for us in [10, 20, 30, 1000] {
            l.record(Duration::from_micros(us));
        }
        let sum = l.summary();
        assert_eq!(sum.count, 4);
        assert!(sum.p50_us >= 19 && sum.p50_us <= 21, "{sum:?}");
        assert!(sum.max_us >= 999);
    }
}
