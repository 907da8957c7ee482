//! Deadlines from configured timeouts that may be as long as `Duration::MAX` (a
//! VMM's "wait forever"): `Instant + Duration` panics when the sum overflows, so every
//! deadline taken from a setting goes through [`after`] or [`from_now`], which put one
//! that far at [`FAR`] from its start instead.

use std::time::{Duration, Instant};

/// How far a deadline of an overflowing timeout lies: about a century, never reached.
pub const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `start + timeout`, or `start + FAR` (sooner, but never reached) when the sum
/// overflows or `timeout` is longer.
pub fn after(start: Instant, timeout: Duration) -> Instant {
    start + timeout.min(FAR)
}

/// [`after`] from now.
pub fn from_now(timeout: Duration) -> Instant {
    after(Instant::now(), timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_of_duration_max_is_a_deadline_a_century_away() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), now + FAR);
        assert_eq!(
            after(now, Duration::from_secs(3)),
            now + Duration::from_secs(3)
        );
        assert!(from_now(Duration::MAX) > now + FAR / 2);
    }
}
