//! The statistics as text: what the demo and `pagewire-stress` print.

use std::fmt;

use super::{CpuSummary, MigrationStats};

impl fmt::Display for MigrationStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(f, "Migration status:      {}", self.status)?;
        writeln!(
            f,
            "transport:             {} x{}   codec: {}",
            self.transport, self.channels, self.codec
        )?;
        writeln!(f, "total time:            {:.0} ms", self.total_ms)?;
        writeln!(f, "setup:                 {:.1} ms", self.setup_ms)?;
        writeln!(
            f,
            "downtime:              {:.1} ms (expected {:.1} ms; pause {:.1}, last pages {:.1}, state {:.1}, completion {:.1})",
            self.downtime_ms,
            self.expected_downtime_ms,
            self.downtime.pause_ms,
            self.downtime.last_pages_ms,
            self.downtime.device_state_ms,
            self.downtime.completion_ms
        )?;
        writeln!(
            f,
            "rounds:                {} (stopped: {})",
            self.rounds, self.stop_reason
        )?;
        writeln!(
            f,
            "dirty pages rate:      {:.0} pages/s",
            self.dirty_rate_pages_per_s
        )?;
        writeln!(
            f,
            "pages:                 {} total: {} compressed, {} zero, {} uniform, {} copied, {} delta, {} raw",
            self.pages.total(),
            self.pages.compressed,
            self.pages.zero,
            self.pages.uniform,
            self.pages.copied,
            self.pages.delta,
            self.pages.raw
        )?;
        writeln!(
            f,
            "guest memory:          {:.1} MiB   on the wire: {:.1} MiB   ratio {:.2}",
            mib(self.guest_bytes),
            mib(self.wire_bytes),
            self.compression_ratio
        )?;
        writeln!(
            f,
            "throughput:            {:.0} Mbit/s   {:.0} pages/s",
            self.mbit_per_s, self.pages_per_s
        )?;
        let cpu = |c: &CpuSummary| {
            format!(
                "{:.2} CPU-s ({:.0}% of a core, {:.2} CPU-s/GiB)",
                c.seconds, c.percent_of_core, c.seconds_per_gib
            )
        };
        match &self.destination_cpu {
            Some(d) => writeln!(
                f,
                "CPU:                   source {}; destination {}",
                cpu(&self.cpu),
                cpu(d)
            )?,
            None => writeln!(f, "CPU:                   source {}", cpu(&self.cpu))?,
        }
        for c in &self.codecs {
            writeln!(
                f,
                "  codec {:<8}       {} frames, {} pages, {:.1} MiB -> {:.1} MiB, ratio {:.2}",
                c.codec,
                c.frames,
                c.pages,
                mib(c.guest_bytes),
                mib(c.payload_bytes),
                c.ratio()
            )?;
        }
        if let Some(a) = &self.adaptive {
            let shares: Vec<String> = a
                .choices
                .iter()
                .filter(|c| c.frames > 0)
                .map(|c| format!("{} {:.0}%", c.choice, 100.0 * a.share(&c.choice)))
                .collect();
            writeln!(
                f,
                "adaptive codec:        {} ({} frames explored, receiver-bound in {} of {} windows)",
                shares.join(", "),
                a.explored_frames,
                a.receiver_windows,
                a.windows
            )?;
            for w in &a.switches {
                writeln!(
                    f,
                    "  switch {} -> {} ({}): {}x",
                    w.from, w.to, w.reason, w.count
                )?;
            }
        }
        let per_channel: Vec<String> = self
            .channel_bytes
            .iter()
            .map(|b| format!("{:.1}", mib(*b)))
            .collect();
        writeln!(f, "per channel MiB:       [{}]", per_channel.join(", "))?;
        let queued = if self.engine.backend == "software" && self.engine.codec_threads == 0 {
            format!(
                "inline on the channels' threads ({} frames at once, {} as jobs, {} buffers from the pools)",
                self.engine.at_once, self.engine.jobs, self.engine.pool_takes
            )
        } else {
            format!(
                "busy {:.0}%, queue depth mean {:.1} max {}",
                self.engine.busy_rate * 100.0,
                self.engine.mean_queue_depth,
                self.engine.max_queue_depth
            )
        };
        writeln!(
            f,
            "codec engine:          {}{queued}, hw fallbacks {}{}",
            if self.engine.backend.is_empty() {
                String::new()
            } else {
                format!("{}, ", self.engine.backend)
            },
            self.engine.hw_fallbacks,
            {
                let causes: Vec<String> = self
                    .engine
                    .hw_fallback_causes
                    .iter()
                    .map(|(name, n)| format!("{name} {n}"))
                    .collect();
                if causes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", causes.join(", "))
                }
            }
        )?;
        if let Some(d) = &self.engine.delta {
            writeln!(
                f,
                "delta cache:           {} hits, {} misses, {} overflows, {} kept from other codecs, {} evicted, {} resident",
                d.hits, d.misses, d.overflows, d.stored, d.evictions, d.resident
            )?;
        }
        writeln!(
            f,
            "zero-copy sends:       {} zero-copy, {} copied, {} MiB registered",
            self.zero_copy.zero_copy,
            self.zero_copy.copied,
            self.zero_copy.registered_bytes >> 20
        )?;
        if self.tls.encrypted {
            writeln!(
                f,
                "TLS 1.3:               {:.1} MiB sealed, {:.1} MiB copied ({:.0} bytes per page)",
                mib(self.tls.sealed_bytes),
                mib(self.tls.copied_bytes),
                self.tls.copied_per_page
            )?;
        } else {
            writeln!(f, "TLS:                   none (plaintext channels)")?;
        }
        for (name, l) in [
            ("encode", &self.encode_latency),
            ("send", &self.send_latency),
            ("apply", &self.apply_latency),
        ] {
            // The destination's apply latency is there only when copied in.
            if name == "apply" && l.count == 0 {
                continue;
            }
            writeln!(
                f,
                "latency {:<7}        n={} p50 {} us  p99 {} us  max {} us",
                name, l.count, l.p50_us, l.p99_us, l.max_us
            )?;
        }
        writeln!(
            f,
            "round  paused  dirty      sent       zero       wire MiB   ms       Mbit/s   CPU-s"
        )?;
        for r in &self.per_round {
            writeln!(
                f,
                "{:<6} {:<7} {:<10} {:<10} {:<10} {:<10.1} {:<8.1} {:<8.0} {:.2}",
                r.round,
                if r.paused { "yes" } else { "no" },
                r.dirty_pages,
                r.pages.total(),
                r.pages.zero,
                mib(r.wire_bytes),
                r.duration_ms,
                r.mbit_per_s,
                r.cpu_s
            )?;
        }
        Ok(())
    }
}
