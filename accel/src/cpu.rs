//! CPU time of the calling thread, for the statistics' per-side CPU accounting.

use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// CPU time the calling thread has used so far (`CLOCK_THREAD_CPUTIME_ID`: user and
/// system time); zero where the clock is unavailable.
pub fn thread_cpu_time() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_accumulates_cpu_time() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        // Bounded busy work: enough to move the clock on any machine.
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
    }
}
