//! When to stop pre-copy: downtime estimation and the convergence policy.

use std::time::Duration;

/// How the pre-copy driver decides to stop iterating.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrecopyConfig {
    /// The longest pause acceptable; iteration stops once the expected downtime is under it.
    pub downtime_limit: Duration,
    /// Stop after this many pre-copy rounds whatever the estimate.
    pub max_rounds: u32,
    /// Stop iterating after this long whatever the estimate.
    pub max_time: Duration,
    /// Throttle the guest (through [`VcpuControl::throttle`](crate::dirty::VcpuControl::throttle))
    /// when rounds stop shrinking, like QEMU's auto-converge.
    pub auto_converge: bool,
    /// What to do when `max_rounds` or `max_time` is reached before the expected
    /// downtime fits the limit.
    pub on_cap: CapPolicy,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            max_time: Duration::from_secs(300),
            auto_converge: false,
            on_cap: CapPolicy::SwitchOver,
        }
    }
}

/// What pre-copy does when a round or time cap is hit before it converged.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CapPolicy {
    /// Pause the guest and switch over anyway, whatever the expected downtime (QEMU's
    /// behaviour).
    #[default]
    SwitchOver,
    /// Fail with [`MigrationError::NotConverged`](crate::MigrationError::NotConverged);
    /// the guest never paused and keeps running on the source.
    Fail,
}

/// Why iteration stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum StopReason {
    /// The expected downtime is under the limit.
    Converged,
    /// The round cap was reached.
    RoundCap,
    /// The time cap was reached.
    TimeCap,
    /// The VMM's per-round callback asked to switch over.
    Requested,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Converged => "the expected downtime fits the limit",
            StopReason::RoundCap => "the round cap (max_rounds) was reached",
            StopReason::TimeCap => "the time cap (max_time) was reached",
            StopReason::Requested => "the VMM asked to switch over",
        })
    }
}

/// The policy's answer after a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Run another pre-copy round; `throttle` is the guest CPU share to apply, if changed.
    Continue {
        /// New throttle percentage, when auto-converge changes it.
        throttle: Option<u8>,
    },
    /// Pause the guest and send the rest.
    Stop(StopReason),
}

/// Measures bandwidth and compression and predicts the downtime of stopping now.
#[derive(Clone, Debug, Default)]
pub struct Estimator {
    /// Wire bytes per second, smoothed.
    bandwidth: f64,
    /// Wire bytes per guest page sent, smoothed.
    bytes_per_page: f64,
    /// Dirty pages per second, last measurement.
    dirty_rate: f64,
    throttle: u8,
    last_dirty: Option<u64>,
    /// Bytes sent during downtime besides pages (device state still pending).
    extra_bytes: u64,
}

impl Estimator {
    /// Records a finished round: wire bytes and pages it sent and how long it took.
    pub fn round_done(&mut self, wire_bytes: u64, pages: u64, took: Duration) {
        let secs = took.as_secs_f64();
        if secs > 0.0 && wire_bytes > 0 {
            let bw = wire_bytes as f64 / secs;
            self.bandwidth = smooth(self.bandwidth, bw);
        }
        if pages > 0 {
            self.bytes_per_page = smooth(self.bytes_per_page, wire_bytes as f64 / pages as f64);
        }
    }

    /// Records the dirty pages found after a round that lasted `over`.
    pub fn dirty_found(&mut self, pages: u64, over: Duration) {
        let secs = over.as_secs_f64();
        if secs > 0.0 {
            self.dirty_rate = pages as f64 / secs;
        }
    }

    /// Measured wire bandwidth, bytes/s.
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// Measured dirty rate, pages/s.
    pub fn dirty_rate(&self) -> f64 {
        self.dirty_rate
    }

    /// Sets the bytes that downtime sends besides pages (device state a device still
    /// has to send), counted in [`Self::expected_downtime`].
    pub fn set_extra_bytes(&mut self, bytes: u64) {
        self.extra_bytes = bytes;
    }

    /// Downtime expected if the guest were paused with `dirty` pages left.
    pub fn expected_downtime(&self, dirty: u64) -> Duration {
        if dirty == 0 && self.extra_bytes == 0 {
            return Duration::ZERO;
        }
        if self.bandwidth <= 0.0 || (dirty > 0 && self.bytes_per_page <= 0.0) {
            return Duration::MAX;
        }
        let bytes = dirty as f64 * self.bytes_per_page + self.extra_bytes as f64;
        Duration::from_secs_f64((bytes / self.bandwidth).min(1e9))
    }

    /// Decides after round `round` (0-based, pre-copy rounds done so far = round + 1),
    /// with `dirty` pages left and `elapsed` since the migration started.
    pub fn decide(
        &mut self,
        cfg: &PrecopyConfig,
        round: u32,
        dirty: u64,
        elapsed: Duration,
    ) -> Decision {
        let previous = self.last_dirty.replace(dirty);
        if self.expected_downtime(dirty) <= cfg.downtime_limit {
            return Decision::Stop(StopReason::Converged);
        }
        if round + 1 >= cfg.max_rounds {
            return Decision::Stop(StopReason::RoundCap);
        }
        if elapsed >= cfg.max_time {
            return Decision::Stop(StopReason::TimeCap);
        }
        // Not shrinking by at least a tenth: throttle harder.
        let stuck = previous.is_some_and(|p| dirty * 10 > p * 9);
        let throttle = (cfg.auto_converge && stuck).then(|| {
            self.throttle = (self.throttle + 20).min(99);
            100 - self.throttle
        });
        Decision::Continue { throttle }
    }
}

fn smooth(old: f64, new: f64) -> f64 {
    if old == 0.0 {
        new
    } else {
        0.5 * old + 0.5 * new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_when_the_estimate_fits_the_limit() {
        let cfg = PrecopyConfig {
            downtime_limit: Duration::from_millis(100),
            ..Default::default()
        };
        let mut e = Estimator::default();
        // 100 MB/s, 1000 bytes per page.
        e.round_done(100_000_000, 100_000, Duration::from_secs(1));
        assert_eq!(e.expected_downtime(10_000), Duration::from_millis(100));
        assert_eq!(
            e.decide(&cfg, 0, 10_000, Duration::from_secs(1)),
            Decision::Stop(StopReason::Converged)
        );
        assert_eq!(
            e.decide(&cfg, 0, 50_000, Duration::from_secs(1)),
            Decision::Continue { throttle: None }
        );
    }

    #[test]
    fn caps_and_auto_converge() {
        let cfg = PrecopyConfig {
            downtime_limit: Duration::from_millis(1),
            max_rounds: 3,
            max_time: Duration::from_secs(10),
            auto_converge: true,
            on_cap: CapPolicy::SwitchOver,
        };
        let mut e = Estimator::default();
        e.round_done(1_000_000, 1000, Duration::from_secs(1));
        assert_eq!(
            e.decide(&cfg, 0, 5000, Duration::ZERO),
            Decision::Continue { throttle: None }
        );
        assert_eq!(
            e.decide(&cfg, 1, 5000, Duration::ZERO),
            Decision::Continue { throttle: Some(80) }
        );
        assert_eq!(
            e.decide(&cfg, 2, 5000, Duration::ZERO),
            Decision::Stop(StopReason::RoundCap)
        );
        let mut e = Estimator::default();
        assert_eq!(e.expected_downtime(1), Duration::MAX);
        assert_eq!(
            e.decide(&cfg, 0, 1, Duration::from_secs(11)),
            Decision::Stop(StopReason::TimeCap)
        );
    }
}
