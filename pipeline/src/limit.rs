//! The bandwidth limiter: bytes on the wire, after compression, changeable while a
//! migration runs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A token bucket shared by every channel of a migration. It limits the bytes written
/// to the wire, so a compressing migration moves more guest memory through the same cap.
#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    /// (last refill, tokens available; negative = debt).
    bucket: Mutex<(Instant, f64)>,
}

impl RateLimiter {
    /// Bursts are capped at this much time's worth of bytes.
    const BURST: Duration = Duration::from_millis(20);

    /// A limiter at `bytes_per_s` (0 = unlimited).
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            rate: AtomicU64::new(bytes_per_s),
            bucket: Mutex::new((Instant::now(), 0.0)),
        }
    }

    /// Changes the rate; takes effect for the next bytes.
    pub fn set_rate(&self, bytes_per_s: u64) {
        self.rate.store(bytes_per_s, Ordering::Relaxed);
    }

    /// The rate, bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// How long the caller must wait before sending `bytes` (it reserves them now).
    pub fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let rate = self.rate();
        let Ok(mut b) = self.bucket.lock() else {
            return Duration::ZERO;
        };
        if rate == 0 {
            *b = (now, 0.0);
            return Duration::ZERO;
        }
        let rate = rate as f64;
        let elapsed = now.saturating_duration_since(b.0).as_secs_f64();
        let burst = rate * Self::BURST.as_secs_f64();
        b.1 = (b.1 + elapsed * rate).min(burst);
        b.0 = now;
        b.1 -= bytes as f64;
        if b.1 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.1 / rate)
        }
    }

    /// Waits until `bytes` may be sent.
    pub fn acquire(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_to_the_rate() {
        let l = RateLimiter::new(1_000_000);
        let t0 = Instant::now();
        // 10 MB reserved at once must be spread over ~10 s of (virtual) time.
        let mut wait = Duration::ZERO;
        for _ in 0..10 {
            wait = l.reserve(1_000_000, t0);
        }
        let secs = wait.as_secs_f64();
        assert!((9.9..=10.1).contains(&secs), "{secs}");
        l.set_rate(0);
        assert_eq!(l.reserve(1 << 30, t0), Duration::ZERO);
    }
}
