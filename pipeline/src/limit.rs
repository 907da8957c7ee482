//! The bandwidth limiter: bytes on the wire, after compression, changeable while a
//! migration runs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A token bucket shared by every channel of a migration. It limits the bytes written
/// to the wire, so a compressing migration moves more guest memory through the same cap.
///
/// A reservation that overdraws the bucket waits until the bytes refilled since cover
/// the debt it left: refilled at the rate in force while it waits, so raising (or
/// removing) the cap shortens a wait already begun, and the wait checks the caller's
/// cancellation every [`RateLimiter::SLICE`].
#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Last refill.
    at: Instant,
    /// Bytes available; negative = debt.
    tokens: f64,
    /// Bytes refilled since the start: a reservation waits until this passes the
    /// value it leaves as its target.
    refilled: f64,
}

impl Bucket {
    /// Refills up to `now` at `rate`.
    fn refill(&mut self, now: Instant, rate: f64) {
        let add = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        let burst = rate * RateLimiter::BURST.as_secs_f64();
        self.tokens = (self.tokens + add).min(burst);
        self.refilled += add;
        // `now` was read before the lock: a later caller may hold an earlier one.
        self.at = self.at.max(now);
    }

    /// With no cap: the debt is forgiven, and every reservation waiting is met.
    fn clear(&mut self, now: Instant) {
        self.refilled += (-self.tokens).max(0.0);
        self.tokens = 0.0;
        self.at = self.at.max(now);
    }
}

impl RateLimiter {
    /// Bursts are capped at this much time's worth of bytes.
    const BURST: Duration = Duration::from_millis(20);
    /// A wait sleeps at most this long at once before it looks at the rate and the
    /// caller's cancellation again.
    pub const SLICE: Duration = Duration::from_millis(50);

    /// A limiter at `bytes_per_s` (0 = unlimited).
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            rate: AtomicU64::new(bytes_per_s),
            bucket: Mutex::new(Bucket {
                at: Instant::now(),
                tokens: 0.0,
                refilled: 0.0,
            }),
        }
    }

    /// Changes the rate; takes effect for the next bytes, and for the waits in progress.
    pub fn set_rate(&self, bytes_per_s: u64) {
        // The time until now refills at the rate that was in force.
        if let Ok(mut b) = self.bucket.lock() {
            let now = Instant::now();
            match self.rate() {
                0 => b.clear(now),
                old => b.refill(now, old as f64),
            }
            self.rate.store(bytes_per_s, Ordering::Relaxed);
        } else {
            self.rate.store(bytes_per_s, Ordering::Relaxed);
        }
    }

    /// The rate, bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Reserves `bytes` at `now`: the refill target to wait for, `None` when they may
    /// go at once.
    fn take(&self, bytes: u64, now: Instant) -> Option<f64> {
        let rate = self.rate();
        let mut b = self.bucket.lock().ok()?;
        if rate == 0 {
            b.clear(now);
            return None;
        }
        b.refill(now, rate as f64);
        b.tokens -= bytes as f64;
        (b.tokens < 0.0).then(|| b.refilled - b.tokens)
    }

    /// How long until the refill passes `target`, at the rate in force at `now`.
    fn left(&self, target: f64, now: Instant) -> Duration {
        let rate = self.rate();
        let Ok(mut b) = self.bucket.lock() else {
            return Duration::ZERO;
        };
        if rate == 0 {
            // The cap was removed: nothing waits, and no debt is kept.
            b.clear(now);
            return Duration::ZERO;
        }
        b.refill(now, rate as f64);
        let short = target - b.refilled;
        if short > 0.0 {
            Duration::try_from_secs_f64(short / rate as f64).unwrap_or(Duration::MAX)
        } else {
            Duration::ZERO
        }
    }

    /// How long the caller must wait before sending `bytes` (it reserves them now), at
    /// the current rate.
    pub fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        self.take(bytes, now)
            .map_or(Duration::ZERO, |target| self.left(target, now))
    }

    /// Waits until `bytes` may be sent, or until `cancelled` says so (checked every
    /// [`Self::SLICE`]).
    pub fn acquire(&self, bytes: u64, cancelled: impl Fn() -> bool) {
        let Some(target) = self.take(bytes, Instant::now()) else {
            return;
        };
        loop {
            let wait = self.left(target, Instant::now());
            if wait.is_zero() || cancelled() {
                return;
            }
            std::thread::sleep(wait.min(Self::SLICE));
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

    #[test]
    fn a_wait_shortens_when_the_rate_rises_and_ends_when_the_cap_goes() {
        let l = RateLimiter::new(1_000);
        let t0 = Instant::now();
        // 10 s of debt at 1 kB/s; after 1 s, 9 kB are left: 9 s at this rate, 90 ms
        // once it rises a hundredfold.
        let target = l.take(10_000, t0).unwrap();
        let t1 = t0 + Duration::from_secs(1);
        let left = l.left(target, t1).as_secs_f64();
        assert!((8.95..=9.05).contains(&left), "{left}");
        l.set_rate(100_000);
        let left = l.left(target, t1).as_secs_f64();
        assert!((0.085..=0.095).contains(&left), "{left}");
        l.set_rate(0);
        assert_eq!(l.left(target, t0 + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn a_wait_begun_before_the_cap_was_lifted_is_met_when_it_returns() {
        let l = RateLimiter::new(1_000);
        let t0 = Instant::now();
        let target = l.take(10_000, t0).unwrap();
        // Lifted, then back before the waiter looked again: the debt was forgiven,
        // so the waiter does not wait for it still.
        l.set_rate(0);
        l.set_rate(1_000);
        assert_eq!(l.left(target, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn a_wait_of_days_ends_at_once_when_cancelled() {
        let l = RateLimiter::new(1);
        let t = Instant::now();
        l.acquire(1 << 20, || t.elapsed() > Duration::from_millis(30));
        let took = t.elapsed();
        // One slice after the cancellation at the latest, not the 12 days of the debt.
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}
