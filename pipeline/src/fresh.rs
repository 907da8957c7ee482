//! Which pages of a destination's fresh anonymous memory were never written: those still
//! read as zeros without a byte stored, so a zero page placed there needs no write (and
//! no page fault, no `clear_page`, no memory charged).
//!
//! One bit per page, set while the page is known to be zero. Bits are cleared with
//! atomic `fetch_and`, so channels whose pages share a word never lose each other's
//! updates; a page itself is only ever written by its one channel (affinity), which
//! clears its bit after writing it, before it applies the page's next frame.

use std::sync::atomic::{AtomicU64, Ordering};

/// Pages of one region still known to be zero.
#[derive(Debug)]
pub(crate) struct FreshPages {
    bits: Vec<AtomicU64>,
    pages: u64,
}

impl FreshPages {
    /// `pages` pages, all known to be zero.
    pub(crate) fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        Self {
            bits: (0..words).map(|_| AtomicU64::new(u64::MAX)).collect(),
            pages,
        }
    }

    /// Whether page `p` is still known to be zero (`false` outside the region).
    pub(crate) fn is_fresh(&self, p: u64) -> bool {
        p < self.pages
            && self.bits[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0
    }

    /// Forgets that pages `start..start + count` are zero (they are being written).
    pub(crate) fn touch(&self, start: u64, count: u64) {
        let end = start.saturating_add(count).min(self.pages);
        let mut p = start;
        while p < end {
            let word = p / 64;
            let lo = p % 64;
            let hi = (end - word * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            self.bits[word as usize].fetch_and(!mask, Ordering::Relaxed);
            p = word * 64 + hi;
        }
    }

    /// The maximal runs of pages in `start..start + count` that are *not* known to be
    /// zero, as `(start, count)`: what a zero run must still write.
    pub(crate) fn touched_runs(
        &self,
        start: u64,
        count: u64,
    ) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs(start, count)
            .filter(|&(_, _, fresh)| !fresh)
            .map(|(s, n, _)| (s, n))
    }

    /// `start..start + count` cut into maximal runs of pages that are all fresh or all
    /// touched, as `(start, count, fresh)`, in order: with [`Prefault::Install`], the
    /// fresh runs are installed and the others copied.
    ///
    /// [`Prefault::Install`]: crate::Prefault::Install
    pub(crate) fn runs(
        &self,
        start: u64,
        count: u64,
    ) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        let end = start.saturating_add(count);
        let mut p = start;
        std::iter::from_fn(move || {
            if p >= end {
                return None;
            }
            let s = p;
            let fresh = self.is_fresh(p);
            while p < end && self.is_fresh(p) == fresh {
                p += 1;
            }
            Some((s, p - s, fresh))
        })
    }

    /// Whether any page of `start..start + count` is still fresh.
    pub(crate) fn any_fresh(&self, start: u64, count: u64) -> bool {
        (start..start.saturating_add(count)).any(|p| self.is_fresh(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_pages_are_remembered_across_word_boundaries() {
        let f = FreshPages::new(200);
        assert!(f.is_fresh(0) && f.is_fresh(199) && !f.is_fresh(200));
        assert_eq!(f.touched_runs(0, 200).count(), 0);
        f.touch(60, 10);
        f.touch(128, 64);
        f.touch(199, 5);
        assert_eq!(
            f.touched_runs(0, 200).collect::<Vec<_>>(),
            [(60, 10), (128, 64), (199, 1)]
        );
        assert_eq!(
            f.touched_runs(65, 70).collect::<Vec<_>>(),
            [(65, 5), (128, 7)]
        );
        assert!(f.is_fresh(59) && !f.is_fresh(60) && !f.is_fresh(69) && f.is_fresh(70));
        assert!(f.is_fresh(127) && !f.is_fresh(191) && f.is_fresh(192));
        assert_eq!(
            f.runs(58, 14).collect::<Vec<_>>(),
            [(58, 2, true), (60, 10, false), (70, 2, true)]
        );
        assert!(f.any_fresh(65, 10) && !f.any_fresh(60, 10) && !f.any_fresh(0, 0));
    }
}
