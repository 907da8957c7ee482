//! Dirty-page sets and the trait through which a VMM hands over its dirty log.

use std::sync::atomic::{AtomicU64, Ordering};

use pagewire_protocol::RegionId;

/// One bit per page of a region. Setting bits is lock-free, so a VMM's own tracking (or
/// a test's writer thread) can mark pages from any thread.
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl DirtyBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        Self {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// A bitmap with every page set (the first round sends everything).
    pub fn full(pages: u64) -> Self {
        let b = Self::new(pages);
        b.set_range(0, pages);
        b
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks one page; pages past the end are ignored.
    pub fn set(&self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// Marks `count` pages from `start` (clipped to the bitmap).
    pub fn set_range(&self, start: u64, count: u64) {
        let end = start.saturating_add(count).min(self.pages);
        let mut p = start;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[(p / 64) as usize].fetch_or(mask, Ordering::Relaxed);
            p += n;
        }
    }

    /// Whether a page is marked.
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// Marked pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Moves every mark into `into` (OR) and clears this bitmap, word by word
    /// atomically, so no mark set concurrently is lost.
    pub fn drain_into(&self, into: &DirtyBitmap) {
        for (w, d) in self.words.iter().zip(&into.words) {
            let bits = w.swap(0, Ordering::AcqRel);
            if bits != 0 {
                d.fetch_or(bits, Ordering::Relaxed);
            }
        }
    }

    /// ORs a KVM-style bitmap (little-endian u64 words, bit n = page n) into this one.
    /// Bits past the last page are dropped.
    ///
    /// # Errors
    /// A bitmap of another number of words than this one's (one per 64 pages, the
    /// last partly used), which is merged nowhere: a log of another page size or of
    /// another region, whose marks would land on the wrong pages or be lost.
    pub fn merge_words(&self, words: &[u64]) -> Result<(), DirtyLogError> {
        if words.len() != self.words.len() {
            return Err(format!(
                "a dirty bitmap of {} words for a region of {} pages ({} words): the log's \
                 page size or region differs from the guest memory's",
                words.len(),
                self.pages,
                self.words.len()
            )
            .into());
        }
        self.merge_words_lenient(words);
        Ok(())
    }

    /// [`Self::merge_words`] without the size check: words past this bitmap's are
    /// ignored, missing ones are no marks.
    fn merge_words_lenient(&self, words: &[u64]) {
        for (w, &bits) in self.words.iter().zip(words) {
            if bits != 0 {
                w.fetch_or(bits, Ordering::Relaxed);
            }
        }
        self.clear_tail();
    }

    /// Clears every mark.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// The marked pages as maximal runs `(start, count)`, ascending.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            bitmap: self,
            next: 0,
        }
    }
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("pages", &self.pages)
            .field("marked", &self.count())
            .finish()
    }
}

impl Clone for DirtyBitmap {
    fn clone(&self) -> Self {
        let out = DirtyBitmap::new(self.pages);
        self.words
            .iter()
            .zip(&out.words)
            .for_each(|(a, b)| b.store(a.load(Ordering::Relaxed), Ordering::Relaxed));
        out
    }
}

/// Iterator over the runs of marked pages of a [`DirtyBitmap`].
#[derive(Debug)]
pub struct Runs<'a> {
    bitmap: &'a DirtyBitmap,
    next: u64,
}

impl Runs<'_> {
    /// First page at or after `from` whose bit equals `want`, or the bitmap's end.
    fn seek(&self, from: u64, want: bool) -> u64 {
        let b = self.bitmap;
        let mut p = from;
        while p < b.pages {
            let w = b.words[(p / 64) as usize].load(Ordering::Relaxed);
            let w = if want { w } else { !w } >> (p % 64);
            if w != 0 {
                return (p + u64::from(w.trailing_zeros())).min(b.pages);
            }
            p = (p / 64 + 1) * 64;
        }
        b.pages
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.seek(self.next, true);
        if start >= self.bitmap.pages {
            self.next = start;
            return None;
        }
        let end = self.seek(start, false);
        self.next = end;
        Some((start, end - start))
    }
}

/// Errors a VMM's dirty log, vCPU control or device state reports; boxed so any VMM
/// error type fits.
pub type DirtyLogError = Box<dyn std::error::Error + Send + Sync>;

/// The VMM's dirty-page log: KVM's dirty bitmap (`KVM_GET_DIRTY_LOG` with
/// `KVM_CLEAR_DIRTY_LOG`), a dirty ring, or the VMM's own tracking (see
/// `DirtyBitmap::merge_vm_memory` (feature `vm-memory`) for vm-memory's `AtomicBitmap`).
///
/// [`Migration`](crate::Migration) calls [`start`](Self::start) before the first
/// round and [`stop`](Self::stop) on every way out (success, failure, cancellation),
/// so logging never stays on after a migration.
pub trait DirtyLog: Send {
    /// Turns logging on (e.g. sets `KVM_MEM_LOG_DIRTY_PAGES` on every memslot). Pages
    /// written from now on are reported by [`sync_and_clear`](Self::sync_and_clear).
    ///
    /// # Errors
    /// Whatever the VMM reports; the migration fails before anything is sent.
    fn start(&mut self) -> Result<(), DirtyLogError>;

    /// Turns logging off again. Called once after every [`start`](Self::start),
    /// whatever the outcome, a failed `start` included (which may have turned logging
    /// on for part of the memory); an error or a panic here is reported as a warning
    /// (in the statistics, or in [`Failed::warnings`](crate::Failed::warnings)), not as
    /// a failure.
    ///
    /// # Errors
    /// Whatever the VMM reports.
    fn stop(&mut self) -> Result<(), DirtyLogError>;

    /// Adds the pages of `region` dirtied since the last call (or since
    /// [`start`](Self::start)) to `into` (OR, without clearing `into`), and clears them
    /// in the log: after this call, a guest write marks the page again. Called before
    /// the pages are read.
    ///
    /// # Errors
    /// Whatever the VMM's log reports; the migration fails and the guest keeps running.
    fn sync_and_clear(&mut self, region: RegionId, into: &DirtyBitmap)
    -> Result<(), DirtyLogError>;
}

/// The VMM's control of its vCPUs.
pub trait VcpuControl: Send {
    /// Stops every vCPU for the final round (they must not write guest memory until
    /// [`resume`](Self::resume)).
    ///
    /// # Errors
    /// The VMM could not pause the guest; the migration fails, the guest keeps running.
    fn pause(&mut self) -> Result<(), DirtyLogError>;

    /// Restarts the vCPUs after a failed migration, when the destination cannot be
    /// running the guest.
    ///
    /// # Errors
    /// The VMM could not resume the guest.
    fn resume(&mut self) -> Result<(), DirtyLogError>;

    /// Slows the guest to `percent` of its CPU time (100 = unthrottled), when a
    /// migration does not converge and auto-converge is on. Optional.
    /// [`Migration`](crate::Migration) calls it with 100 once it throttled, on every
    /// failure that leaves the guest running here (or resumed), so it runs at full
    /// speed again (a failure there is a warning in
    /// [`Failed::warnings`](crate::Failed::warnings)); not after a commit, nor when the
    /// outcome is unknown (the guest stays paused: whoever resumes it lifts the
    /// throttle). It must not resume a paused guest.
    ///
    /// # Errors
    /// The VMM could not throttle.
    fn throttle(&mut self, percent: u8) -> Result<(), DirtyLogError> {
        let _ = percent;
        Ok(())
    }
}

#[cfg(feature = "vm-memory")]
impl DirtyBitmap {
    /// Moves the marks of a vm-memory `AtomicBitmap` (the VMM's own writes to guest
    /// memory through vm-memory, e.g. device emulation) into this bitmap and clears
    /// them there. The `AtomicBitmap` must track the same region with the same page
    /// size as this bitmap (one bit per transfer page); marks past this bitmap's end
    /// are ignored.
    pub fn merge_vm_memory(&self, bitmap: &vm_memory::bitmap::AtomicBitmap) {
        self.merge_words_lenient(&bitmap.get_and_reset());
        self.clear_tail();
    }
}

impl DirtyBitmap {
    /// Clears bits past the last page (a merged word may carry them).
    fn clear_tail(&self) {
        let rem = self.pages % 64;
        if rem != 0
            && let Some(last) = self.words.last()
        {
            last.fetch_and((1u64 << rem) - 1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_maximal_and_cross_words() {
        let b = DirtyBitmap::new(200);
        b.set_range(3, 2);
        b.set_range(60, 10);
        b.set(199);
        b.set(500);
        assert_eq!(b.runs().collect::<Vec<_>>(), [(3, 2), (60, 10), (199, 1)]);
        assert_eq!(b.count(), 13);
        let f = DirtyBitmap::full(130);
        assert_eq!(f.runs().collect::<Vec<_>>(), [(0, 130)]);
        assert_eq!(DirtyBitmap::new(64).runs().count(), 0);
    }

    #[test]
    fn drain_moves_marks_and_clears() {
        let a = DirtyBitmap::new(100);
        let b = DirtyBitmap::new(100);
        a.set(5);
        b.set(7);
        a.drain_into(&b);
        assert_eq!(a.count(), 0);
        assert_eq!(b.runs().collect::<Vec<_>>(), [(5, 1), (7, 1)]);
        b.merge_words(&[1 << 9, 1 << 35]).unwrap();
        assert!(b.is_set(9) && b.is_set(99));
        // A log of another size (another page size or region): refused, nothing merged.
        for words in [&[1u64 << 3][..], &[1 << 3, 0, 0][..]] {
            let e = b.merge_words(words).unwrap_err().to_string();
            assert!(e.contains("100 pages (2 words)"), "{e}");
            assert!(!b.is_set(3));
        }
    }

    #[cfg(feature = "vm-memory")]
    #[test]
    fn vm_memory_bitmap_marks_move_over_and_are_cleared() {
        use std::num::NonZeroUsize;
        let vmm =
            vm_memory::bitmap::AtomicBitmap::new(100 * 4096, NonZeroUsize::new(4096).unwrap());
        vmm.set_addr_range(5 * 4096, 2 * 4096);
        vmm.set_addr_range(99 * 4096, 4096);
        let b = DirtyBitmap::new(64);
        b.merge_vm_memory(&vmm);
        // Page 99 is past this 64-page bitmap: dropped, not carried in a spare bit.
        assert_eq!(b.runs().collect::<Vec<_>>(), [(5, 2)]);
        assert!(!vmm.is_addr_set(5 * 4096), "cleared in the VMM's bitmap");
    }
}
