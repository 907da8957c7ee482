//! Bisection for the largest value that still passes a test, such as the largest dirty
//! rate at which a pre-copy migration converges.
//!
//! [`bisect`] assumes the test is monotonic: true up to some threshold in `[lo, hi]`,
//! false above it. It probes `lo` first (if that fails there is nothing to find), then
//! `hi` (if that passes the threshold is beyond the range), then halves the interval
//! between the largest passing and the smallest failing value until it is no wider
//! than `resolution` or `max_steps` probes have been made. The answer is that bracket,
//! [`Bisection::largest_ok`] and [`Bisection::smallest_failing`], with every probe in
//! [`Bisection::steps`].
//!
//! Real measurements are noisy near the threshold; [`bisect_noisy`] runs each probe
//! `repeats` times (an odd number) and takes the majority, stopping a probe as soon as
//! one side has it.
//!
//! ```text
//! // Converges up to 300 (say MiB/s of dirtying), not above.
//! let b = bisect(0.0, 1000.0, 1.0, 40, |rate| Ok(rate <= 300.0))?;
//! let ok = b.largest_ok.unwrap();
//! assert!(ok <= 300.0 && 300.0 - ok <= 1.0);
//! ```

use anyhow::{Context, Result, bail};

/// The outcome of a bisection.
#[derive(Clone, Debug, PartialEq)]
pub struct Bisection {
    /// The largest probed value that passed; `None` when `lo` itself failed.
    pub largest_ok: Option<f64>,
    /// The smallest probed value that failed; `None` when `hi` passed.
    pub smallest_failing: Option<f64>,
    /// Every probe in order: the value and its verdict (for [`bisect_noisy`], the
    /// majority verdict of its repeats).
    pub steps: Vec<(f64, bool)>,
}

/// Finds the largest value in `[lo, hi]` for which `converges` returns true, assuming
/// it is true below some threshold and false above.
///
/// Probes `lo`, then `hi`, then midpoints until the bracket is at most `resolution`
/// wide or `max_steps` probes (counting `lo` and `hi`) have been made.
///
/// # Errors
/// An invalid range or setting (a value not finite, `lo > hi`, `resolution <= 0`,
/// `max_steps < 2`), or the first error `converges` returns, with the probed value
/// added as context (the original error stays reachable by `downcast_ref`).
pub fn bisect(
    lo: f64,
    hi: f64,
    resolution: f64,
    max_steps: u32,
    converges: impl FnMut(f64) -> Result<bool>,
) -> Result<Bisection> {
    bisect_noisy(lo, hi, resolution, max_steps, 1, converges)
}

/// [`bisect`] for a noisy test: each probe calls `converges` up to `repeats` times and
/// takes the majority verdict, stopping early once one side has more than half.
/// `max_steps` counts probes, not calls: at most `max_steps * repeats` calls are made.
///
/// # Errors
/// As [`bisect`]; also when `repeats` is even or zero (a tie would have no majority).
pub fn bisect_noisy(
    lo: f64,
    hi: f64,
    resolution: f64,
    max_steps: u32,
    repeats: u32,
    mut converges: impl FnMut(f64) -> Result<bool>,
) -> Result<Bisection> {
    if !lo.is_finite() || !hi.is_finite() || lo > hi {
        bail!("bisection range [{lo}, {hi}] must be finite with lo <= hi");
    }
    if !resolution.is_finite() || resolution <= 0.0 {
        bail!("bisection resolution {resolution} must be a positive number");
    }
    if max_steps < 2 {
        bail!("bisection needs max_steps >= 2 (lo and hi are always probed), got {max_steps}");
    }
    if repeats.is_multiple_of(2) {
        bail!("repeats must be odd so that each probe has a majority, got {repeats}");
    }

    let mut steps = Vec::new();
    let mut probe = |x: f64, steps: &mut Vec<(f64, bool)>| -> Result<bool> {
        let need = repeats / 2 + 1;
        let (mut yes, mut no) = (0, 0);
        while yes < need && no < need {
            if converges(x).with_context(|| format!("probe at {x}"))? {
                yes += 1;
            } else {
                no += 1;
            }
        }
        let ok = yes >= need;
        steps.push((x, ok));
        Ok(ok)
    };

    if !probe(lo, &mut steps)? {
        return Ok(Bisection {
            largest_ok: None,
            smallest_failing: Some(lo),
            steps,
        });
    }
    if lo == hi || probe(hi, &mut steps)? {
        return Ok(Bisection {
            largest_ok: Some(hi),
            smallest_failing: None,
            steps,
        });
    }
    let (mut good, mut bad) = (lo, hi);
    while bad - good > resolution && steps.len() < max_steps as usize {
        let mid = good + (bad - good) / 2.0;
        // Below the floating-point spacing the interval cannot shrink any further.
        if mid <= good || mid >= bad {
            break;
        }
        if probe(mid, &mut steps)? {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Ok(Bisection {
        largest_ok: Some(good),
        smallest_failing: Some(bad),
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a small seeded generator, so the noisy tests are reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn threshold_is_found_within_resolution() {
        let mut calls = 0;
        let b = bisect(0.0, 1000.0, 0.5, 100, |x| {
            calls += 1;
            Ok(x <= 371.25)
        })
        .unwrap();
        let (ok, fail) = (b.largest_ok.unwrap(), b.smallest_failing.unwrap());
        assert!(ok <= 371.25 && fail > 371.25, "{ok} {fail}");
        assert!(fail - ok <= 0.5);
        assert_eq!(b.steps[0], (0.0, true));
        assert_eq!(b.steps[1], (1000.0, false));
        assert_eq!(calls, b.steps.len());
        // 1000 / 2^11 < 0.5: eleven midpoints after lo and hi.
        assert_eq!(b.steps.len(), 2 + 11);
        // The verdicts agree with the bracket.
        for &(x, v) in &b.steps {
            assert_eq!(v, x <= ok, "{x}");
        }
    }

    #[test]
    fn module_example() {
        let b = bisect(0.0, 1000.0, 1.0, 40, |rate| Ok(rate <= 300.0)).unwrap();
        let ok = b.largest_ok.unwrap();
        assert!(ok <= 300.0 && 300.0 - ok <= 1.0);
    }

    #[test]
    fn max_steps_bounds_the_probes() {
        let b = bisect(0.0, 1000.0, 1e-9, 6, |x| Ok(x < 123.0)).unwrap();
        assert_eq!(b.steps.len(), 6);
        let (ok, fail) = (b.largest_ok.unwrap(), b.smallest_failing.unwrap());
        assert!(ok < 123.0 && fail >= 123.0);
        // Four midpoints: 1000 / 16.
        assert_eq!(fail - ok, 62.5);
    }

    #[test]
    fn tiny_resolution_stops_at_float_spacing() {
        let b = bisect(1.0, 2.0, f64::MIN_POSITIVE, 10_000, |x| Ok(x <= 1.5)).unwrap();
        assert!(b.steps.len() < 100, "{}", b.steps.len());
        assert_eq!(b.largest_ok, Some(1.5));
    }

    #[test]
    fn always_true_returns_hi_after_two_probes() {
        let b = bisect(10.0, 20.0, 0.1, 50, |_| Ok(true)).unwrap();
        assert_eq!(b.largest_ok, Some(20.0));
        assert_eq!(b.smallest_failing, None);
        assert_eq!(b.steps, vec![(10.0, true), (20.0, true)]);
    }

    #[test]
    fn always_false_returns_none_after_one_probe() {
        let b = bisect(10.0, 20.0, 0.1, 50, |_| Ok(false)).unwrap();
        assert_eq!(b.largest_ok, None);
        assert_eq!(b.smallest_failing, Some(10.0));
        assert_eq!(b.steps, vec![(10.0, false)]);
    }

    #[test]
    fn single_point_range() {
        let b = bisect(5.0, 5.0, 1.0, 2, |_| Ok(true)).unwrap();
        assert_eq!(b.largest_ok, Some(5.0));
        assert_eq!(b.smallest_failing, None);
        assert_eq!(b.steps.len(), 1);
    }

    #[derive(Debug)]
    struct Broken(f64);

    impl std::fmt::Display for Broken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "the migration at {} crashed", self.0)
        }
    }

    impl std::error::Error for Broken {}

    #[test]
    fn errors_propagate_and_stop_the_search() {
        let mut calls = 0;
        let e = bisect(0.0, 100.0, 1.0, 50, |x| {
            calls += 1;
            if x > 0.0 && x < 100.0 {
                Err(Broken(x).into())
            } else {
                Ok(x == 0.0)
            }
        })
        .unwrap_err();
        // lo, hi, then the first midpoint fails with an error.
        assert_eq!(calls, 3);
        assert!(matches!(e.downcast_ref::<Broken>(), Some(Broken(50.0))));
        assert_eq!(format!("{e:#}"), "probe at 50: the migration at 50 crashed");
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let never = |_: f64| -> Result<bool> { panic!("no probe expected") };
        assert!(bisect(2.0, 1.0, 0.1, 10, never).is_err());
        assert!(bisect(f64::NAN, 1.0, 0.1, 10, never).is_err());
        assert!(bisect(0.0, f64::INFINITY, 0.1, 10, never).is_err());
        assert!(bisect(0.0, 1.0, 0.0, 10, never).is_err());
        assert!(bisect(0.0, 1.0, -1.0, 10, never).is_err());
        assert!(bisect(0.0, 1.0, 0.1, 1, never).is_err());
        assert!(bisect_noisy(0.0, 1.0, 0.1, 10, 2, never).is_err());
        assert!(bisect_noisy(0.0, 1.0, 0.1, 10, 0, never).is_err());
    }

    /// A threshold at 400 seen through noise: within 50 of it each outcome is flipped
    /// with probability 0.3 (0.2 further away), as a migration near its limit sometimes
    /// converges and sometimes not.
    fn noisy(rng: &mut Rng, x: f64) -> bool {
        let truth = x <= 400.0;
        let flip = if (x - 400.0).abs() < 50.0 { 0.3 } else { 0.2 };
        if rng.unit() < flip { !truth } else { truth }
    }

    #[test]
    fn majority_of_repeats_tames_noise() {
        // Over many seeds, 9 repeats land near the threshold far more often than 1.
        let mut near = [0u32; 2];
        for seed in 0..200u64 {
            for (i, repeats) in [1u32, 9].into_iter().enumerate() {
                let mut rng = Rng(seed);
                let b = bisect_noisy(0.0, 1000.0, 1.0, 30, repeats, |x| Ok(noisy(&mut rng, x)))
                    .unwrap();
                if b.largest_ok.is_some_and(|ok| (ok - 400.0).abs() <= 100.0) {
                    near[i] += 1;
                }
            }
        }
        eprintln!("near the threshold (1 and 9 repeats): {near:?}");
        assert!(near[1] > near[0], "{near:?}");
        assert!(near[1] >= 150, "{near:?}");
    }

    #[test]
    fn majority_stops_early_and_counts_calls() {
        // Deterministic: the first two calls at each value agree, so each probe of 3
        // repeats takes exactly two calls.
        let mut calls = 0;
        let b = bisect_noisy(0.0, 8.0, 1.0, 20, 3, |x| {
            calls += 1;
            Ok(x <= 3.0)
        })
        .unwrap();
        assert_eq!(calls, 2 * b.steps.len());
        assert_eq!(b.largest_ok, Some(3.0));
        assert_eq!(b.smallest_failing, Some(4.0));

        // A value that passes 2 of 3 times (pass, fail, pass) passes.
        let mut seq = [true, false, true].into_iter();
        let b = bisect_noisy(1.0, 1.0, 1.0, 2, 3, |_| Ok(seq.next().unwrap())).unwrap();
        assert_eq!(b.steps, vec![(1.0, true)]);
        // ... and one that fails 2 of 3 (fail, pass, fail) fails.
        let mut seq = [false, true, false].into_iter();
        let b = bisect_noisy(1.0, 1.0, 1.0, 2, 3, |_| Ok(seq.next().unwrap())).unwrap();
        assert_eq!(b.steps, vec![(1.0, false)]);
    }
}
