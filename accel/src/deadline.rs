//! Deadlines from configured device timeouts, which may be as long as
//! `Duration::MAX`: `Instant + Duration` panics when the sum overflows.

use std::time::{Duration, Instant};

/// About a century: a deadline never reached.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + timeout`, at most [`FAR`] away.
pub(crate) fn from_now(timeout: Duration) -> Instant {
    Instant::now() + timeout.min(FAR)
}
