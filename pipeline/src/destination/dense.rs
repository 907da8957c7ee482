//! [`Prefault::HugeWhereDense`]: transparent huge pages for the 2 MiB blocks of the
//! destination's fresh memory that the first frame writing into them shows to be
//! dense, and 4 KiB faults everywhere else, so that memory the source leaves mostly
//! zero stays unbacked.
//!
//! A block is decided once, by the first frame that writes into it. A PAGES frame
//! counts its data and uniform pages in the block (written) and its zero pages; pages
//! of its span it does not list are another frame's (a COPY, say), not known zero. The
//! block is sparse when more than an eighth of the span the frame covers in it is zero,
//! dense when it is not and the frame writes at least [`MIN_BYTES`] there. A COPY (or
//! a channel's `ROUND_END` copies) knows no zero pages: dense when the copies write at
//! least [`MIN_BYTES`] and half their span in it. A frame that shows neither (a COPY
//! of a few pages, a PAGES frame whose other pages went as copies) follows the guest
//! so far: dense unless more than an eighth of the blocks PAGES frames showed were
//! sparse. A source sends a frame's copies before its other pages, so a block's first
//! writer is often a COPY of a few pages. Dense blocks are advised `MADV_HUGEPAGE`. The write that follows an advice
//! faults the whole block in at once. Any other first write decides the block against:
//! its 4 KiB fault gives the block a page table, after which the kernel no longer backs
//! it with a huge page at fault time.
//!
//! The destination advises its whole mapping `MADV_NOHUGEPAGE` first, so that where
//! THP is on for every mapping only the advised blocks get huge pages. Each advice
//! splits the mapping (the kernel merges neighbours advised alike), so at most
//! [`MAX_ISLANDS`] advised blocks without an advised neighbour are asked for, and none
//! once the kernel refused one.
//!
//! [`Prefault::HugeWhereDense`]: crate::Prefault::HugeWhereDense

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use pagewire_protocol::{CopyRun, PageFrame, RegionId};

use crate::memory::GuestMemory;

/// A transparent huge page on x86-64 and on arm64 with 4 KiB base pages; elsewhere
/// (the kernel's `hpage_pmd_size` differs) the policy does nothing.
const BLOCK: usize = 2 << 20;

/// Advised runs of blocks with no advised neighbour, at most, per destination: each
/// splits its mapping in up to three, and a process has `vm.max_map_count` (65,530 by
/// default) mappings in all, its threads' stacks and its allocator's among them. Past
/// this, blocks are decided against.
const MAX_ISLANDS: u64 = 1024;

/// Fewest bytes one frame must write into a block for it to be advised on its own
/// evidence: a write of a few pages alone does not bring a whole block in.
const MIN_BYTES: usize = 256 << 10;

/// No frame has written into the block yet.
const UNDECIDED: u8 = 0;
/// A receiver is advising the block: no page of it may be written until it is done, or
/// a 4 KiB fault would come first.
const ADVISING: u8 = 1;
/// Not advised, for good.
const DECIDED: u8 = 2;
/// Advised, for good.
const HUGE: u8 = 3;

/// The blocks of every region of one destination's own anonymous memory.
#[derive(Debug)]
pub(super) struct DenseBlocks {
    page_size: usize,
    regions: Vec<Blocks>,
    /// Blocks PAGES frames decided so far, dense and not: the guest's density, which
    /// decides a block that a COPY writes first and shows too little of.
    pages_dense: AtomicU64,
    pages_sparse: AtomicU64,
    /// Blocks advised (the kernel took the advice).
    advised: AtomicU64,
    /// Advised blocks with no advised neighbour when advised ([`MAX_ISLANDS`]).
    islands: AtomicU64,
    /// The kernel refused an advice: no more are asked for.
    refused: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Blocks {
    id: RegionId,
    /// Host address of the region's first page.
    host: usize,
    /// Host address of its first whole block.
    first: usize,
    /// Per whole block of the region: [`UNDECIDED`], [`ADVISING`], [`DECIDED`] or
    /// [`HUGE`].
    state: Vec<AtomicU8>,
}

impl DenseBlocks {
    /// The blocks of `memory`'s regions: only the whole, aligned 2 MiB blocks inside
    /// each. `None` where the kernel's huge pages are not 2 MiB (or it has none), for
    /// pages of 2 MiB or more, or sizes that do not divide a block.
    pub(super) fn new(memory: &GuestMemory) -> Option<Self> {
        Self::with_huge_page(memory, huge_page_size()?)
    }

    fn with_huge_page(memory: &GuestMemory, huge: usize) -> Option<Self> {
        let page_size = memory.page_size() as usize;
        if huge != BLOCK || page_size == 0 || page_size >= BLOCK || !BLOCK.is_multiple_of(page_size)
        {
            return None;
        }
        let regions = memory
            .region_ids()
            .filter_map(|id| {
                let (ptr, len) = memory.span(id, 0, memory.pages(id)?)?;
                let host = ptr.as_ptr() as usize;
                let first = host.checked_next_multiple_of(BLOCK)?;
                // The first whole block starts at a page of the region.
                if !(first - host).is_multiple_of(page_size) {
                    return None;
                }
                let blocks = host.checked_add(len)?.saturating_sub(first) / BLOCK;
                Some(Blocks {
                    id,
                    host,
                    first,
                    state: (0..blocks).map(|_| AtomicU8::new(UNDECIDED)).collect(),
                })
            })
            .collect();
        Some(Self {
            page_size,
            regions,
            pages_dense: AtomicU64::new(0),
            pages_sparse: AtomicU64::new(0),
            advised: AtomicU64::new(0),
            islands: AtomicU64::new(0),
            refused: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Decides the blocks a frame is about to write into, before any of its pages is
    /// written: `written` and `zero` are `(first page, pages)` runs of `region`,
    /// checked against the layout; `copies` when the frame is a COPY (no zero runs,
    /// pages it leaves out unknown).
    pub(super) fn before_write(
        &self,
        memory: &GuestMemory,
        region: RegionId,
        written: impl Iterator<Item = (u64, u64)>,
        zero: impl Iterator<Item = (u64, u64)>,
        copies: bool,
    ) {
        let Some(b) = self.regions.iter().find(|b| b.id == region) else {
            return;
        };
        let per_block = (BLOCK / self.page_size) as u64;
        // The region's page at its first whole block.
        let base = ((b.first - b.host) / self.page_size) as u64;
        // Per undecided block and run: (block, pages written, zero pages, first page,
        // end); merged per block below.
        let mut seen: Vec<(usize, u64, u64, u64, u64)> = Vec::new();
        let runs = written.map(|r| (r, true)).chain(zero.map(|r| (r, false)));
        for ((start, count), writes) in runs {
            let end = start.saturating_add(count);
            let mut p = start.max(base);
            while p < end {
                let k = ((p - base) / per_block) as usize;
                let Some(state) = b.state.get(k) else {
                    break;
                };
                let upto = end.min(base + (k as u64 + 1) * per_block);
                if state.load(Ordering::Acquire) < DECIDED {
                    let n = upto - p;
                    let (w, z) = if writes { (n, 0) } else { (0, n) };
                    match seen.last_mut() {
                        // Runs come in order: most of a frame's runs in a block merge
                        // here, and the list stays one entry per block.
                        Some(e) if e.0 == k => {
                            e.1 += w;
                            e.2 += z;
                            e.3 = e.3.min(p);
                            e.4 = e.4.max(upto);
                        }
                        _ => seen.push((k, w, z, p, upto)),
                    }
                }
                p = upto;
            }
        }
        seen.sort_unstable_by_key(|e| e.0);
        let min_pages = (MIN_BYTES / self.page_size) as u64;
        for group in seen.chunk_by(|a, c| a.0 == c.0) {
            let written: u64 = group.iter().map(|e| e.1).sum();
            if written == 0 {
                // Zero pages alone write nothing on memory never written.
                continue;
            }
            let zero: u64 = group.iter().map(|e| e.2).sum();
            let lo = group.iter().map(|e| e.3).min().unwrap_or(0);
            let span = group.iter().map(|e| e.4).max().unwrap_or(0) - lo;
            // What the frame shows of the block: sparse, dense, or too little either
            // way (a COPY of a few pages, a PAGES frame whose other pages went as
            // copies), which follows the guest so far.
            let shown = match copies {
                false if zero * 8 > span => Some(false),
                false => (written >= min_pages).then_some(true),
                true => (written >= min_pages && written * 2 >= span).then_some(true),
            };
            let dense = shown.unwrap_or_else(|| self.mostly_dense());
            let k = group[0].0;
            let state = &b.state[k];
            let next = if dense { ADVISING } else { DECIDED };
            match state.compare_exchange(UNDECIDED, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if dense {
                        let huge = self.advise(memory, b, k);
                        state.store(if huge { HUGE } else { DECIDED }, Ordering::Release);
                    }
                    if let Some(dense) = shown.filter(|_| !copies) {
                        let n = if dense {
                            &self.pages_dense
                        } else {
                            &self.pages_sparse
                        };
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Another receiver's advice is under way: its one system call.
                Err(ADVISING) => {
                    while state.load(Ordering::Acquire) == ADVISING {
                        std::thread::yield_now();
                    }
                }
                Err(_) => {}
            }
        }
    }
}

impl DenseBlocks {
    /// Advises block `k` of `b` (marked [`ADVISING`] by this thread), unless the
    /// kernel refused an advice before or it would start an island past
    /// [`MAX_ISLANDS`]. Whether the kernel took it.
    fn advise(&self, memory: &GuestMemory, b: &Blocks, k: usize) -> bool {
        if self.refused.load(Ordering::Relaxed) {
            return false;
        }
        let huge = |i: Option<usize>| {
            i.and_then(|i| b.state.get(i))
                .is_some_and(|s| matches!(s.load(Ordering::Acquire), ADVISING | HUGE))
        };
        let island = !huge(k.checked_sub(1)) && !huge(k.checked_add(1));
        if island && self.islands.fetch_add(1, Ordering::Relaxed) >= MAX_ISLANDS {
            return false;
        }
        if !memory.advise_huge_range(b.first + k * BLOCK, BLOCK) {
            self.refused.store(true, Ordering::Relaxed);
            return false;
        }
        self.advised.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Blocks advised so far.
    pub(super) fn advised(&self) -> u64 {
        self.advised.load(Ordering::Relaxed)
    }

    /// At most an eighth of the blocks PAGES frames showed sparse or dense so far were
    /// sparse (none shown yet counts as dense: a source's copies come first from its
    /// second frame on, and a sparse guest shows its zero pages from the first).
    fn mostly_dense(&self) -> bool {
        let dense = self.pages_dense.load(Ordering::Relaxed);
        let sparse = self.pages_sparse.load(Ordering::Relaxed);
        sparse * 7 <= dense
    }

    /// [`DenseBlocks::before_write`] for a PAGES frame: its data and uniform pages are
    /// written, its zero pages known zero.
    pub(super) fn before_pages(&self, memory: &GuestMemory, p: &PageFrame<'_>) {
        let data = p.data_runs.iter().map(|r| (r.start.0, u64::from(r.count)));
        let uniform = p
            .uniform_runs
            .iter()
            .map(|u| (u.run.start.0, u64::from(u.run.count)));
        let zero = p.zero_runs.iter().map(|r| (r.start.0, u64::from(r.count)));
        self.before_write(memory, p.region, data.chain(uniform), zero, false);
    }

    /// [`DenseBlocks::before_write`] for copy runs of `region` (a COPY frame's, or
    /// those of a channel's `ROUND_END` copies).
    pub(super) fn before_copies(
        &self,
        memory: &GuestMemory,
        region: RegionId,
        runs: impl Iterator<Item = CopyRun>,
    ) {
        let targets = runs.map(|r| (r.start.0, u64::from(r.count)));
        self.before_write(memory, region, targets, std::iter::empty(), true);
    }
}

/// The kernel's transparent huge page size (`hpage_pmd_size`), where it has THP.
fn huge_page_size() -> Option<usize> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_protocol::{GuestAddr, MemoryLayout, RegionDesc};

    /// 16 MiB of fresh memory in one region: at least 7 whole blocks wherever the
    /// kernel places it.
    fn memory() -> GuestMemory {
        let layout = MemoryLayout::new(
            4096,
            [RegionDesc {
                id: RegionId(3),
                backing_page_size: 4096,
                guest_addr: GuestAddr(0),
                length: 16 << 20,
            }],
        )
        .unwrap();
        GuestMemory::anonymous(&layout).unwrap()
    }

    /// The region's page that starts whole block `k`.
    fn block(d: &DenseBlocks, k: u64) -> u64 {
        let b = &d.regions[0];
        ((b.first - b.host) / d.page_size) as u64 + k * 512
    }

    fn state(d: &DenseBlocks, k: usize) -> u8 {
        d.regions[0].state[k].load(Ordering::Relaxed)
    }

    fn pages(d: &DenseBlocks, m: &GuestMemory, written: &[(u64, u64)], zero: &[(u64, u64)]) {
        let (w, z) = (written.iter().copied(), zero.iter().copied());
        d.before_write(m, RegionId(3), w, z, false);
    }

    fn copies(d: &DenseBlocks, m: &GuestMemory, written: &[(u64, u64)]) {
        d.before_write(
            m,
            RegionId(3),
            written.iter().copied(),
            std::iter::empty(),
            true,
        );
    }

    /// Whether this kernel has THP, so that an advice can be taken.
    fn thp() -> bool {
        let on = huge_page_size().is_some();
        if !on {
            eprintln!("skipped: this kernel has no transparent huge pages");
        }
        on
    }

    /// [`memory`] and its blocks, where this kernel has THP.
    fn fresh() -> Option<(GuestMemory, DenseBlocks)> {
        if !thp() {
            return None;
        }
        let m = memory();
        let d = DenseBlocks::with_huge_page(&m, BLOCK)?;
        Some((m, d))
    }

    #[test]
    fn a_dense_frame_advises_its_block_and_a_sparse_one_decides_against() {
        let Some((m, d)) = fresh() else {
            return;
        };
        assert!(d.regions[0].state.len() >= 7);
        // 246 pages written, 10 zero among them: dense.
        let b0 = block(&d, 0);
        pages(&d, &m, &[(b0, 100), (b0 + 110, 146)], &[(b0 + 100, 10)]);
        assert_eq!((d.advised(), state(&d, 0)), (1, HUGE));
        // 20 written among 236 zero pages: not dense, decided for good.
        let b1 = block(&d, 1);
        pages(&d, &m, &[(b1 + 236, 20)], &[(b1, 236)]);
        assert_eq!((d.advised(), state(&d, 1)), (1, DECIDED));
        pages(&d, &m, &[(b1 + 256, 256)], &[]);
        assert_eq!(d.advised(), 1, "a block is decided once");
        // Too few pages written to show the block dense, and half the guest so far
        // sparse: decided against.
        let b2 = block(&d, 2);
        pages(&d, &m, &[(b2, 63)], &[]);
        assert_eq!((d.advised(), state(&d, 2)), (1, DECIDED));
    }

    #[test]
    fn zero_pages_alone_leave_a_block_undecided() {
        let Some((m, d)) = fresh() else {
            return;
        };
        let b0 = block(&d, 0);
        pages(&d, &m, &[], &[(b0, 512)]);
        assert_eq!((d.advised(), state(&d, 0)), (0, UNDECIDED));
        pages(&d, &m, &[(b0, 256)], &[]);
        assert_eq!(d.advised(), 1);
    }

    #[test]
    fn a_run_across_blocks_counts_in_each() {
        let Some((m, d)) = fresh() else {
            return;
        };
        // 100 pages at the end of block 3, 412 at the start of block 4.
        pages(&d, &m, &[(block(&d, 3) + 412, 512)], &[]);
        assert_eq!((state(&d, 3), state(&d, 4)), (HUGE, HUGE));
        assert_eq!(d.advised(), 2);
        // Pages before the first whole block or past the last are no block's.
        let last = d.regions[0].state.len() as u64;
        pages(&d, &m, &[(block(&d, last), 1 << 20)], &[]);
        assert_eq!(d.advised(), 2);
    }

    #[test]
    fn a_copy_decides_on_its_span_or_on_the_guest_so_far() {
        let Some((m, d)) = fresh() else {
            return;
        };
        // A few copied pages, nothing shown yet of the guest: as a dense one.
        copies(&d, &m, &[(block(&d, 0), 5)]);
        assert_eq!((d.advised(), state(&d, 0)), (1, HUGE));
        // Once a PAGES frame showed a sparse block, a few copies are not enough; half
        // the span and enough pages are.
        pages(&d, &m, &[(block(&d, 1), 1)], &[(block(&d, 1) + 1, 255)]);
        copies(&d, &m, &[(block(&d, 2), 5)]);
        assert_eq!((d.advised(), state(&d, 2)), (1, DECIDED));
        let b3 = block(&d, 3);
        copies(&d, &m, &[(b3, 64), (b3 + 120, 10)]);
        assert_eq!(d.advised(), 2);
        // Seven dense blocks for one sparse one: a few copies are enough again, and a
        // PAGES frame that shows too little follows too.
        let d = DenseBlocks::with_huge_page(&m, BLOCK).unwrap();
        d.pages_dense.store(7, Ordering::Relaxed);
        d.pages_sparse.store(1, Ordering::Relaxed);
        copies(&d, &m, &[(block(&d, 0), 1)]);
        pages(&d, &m, &[(block(&d, 1), 10)], &[]);
        assert_eq!(d.advised(), 2);
        d.pages_sparse.store(2, Ordering::Relaxed);
        copies(&d, &m, &[(block(&d, 2), 1)]);
        assert_eq!(d.advised(), 2, "a sparse guest so far");
    }

    #[test]
    fn pages_frames_count_toward_the_guest_and_copies_do_not() {
        let m = memory();
        let d = DenseBlocks::with_huge_page(&m, BLOCK).unwrap();
        pages(&d, &m, &[(block(&d, 0), 256)], &[]);
        pages(&d, &m, &[(block(&d, 1), 1)], &[(block(&d, 1) + 1, 255)]);
        copies(&d, &m, &[(block(&d, 2), 256)]);
        let counts = |d: &DenseBlocks| {
            (
                d.pages_dense.load(Ordering::Relaxed),
                d.pages_sparse.load(Ordering::Relaxed),
            )
        };
        assert_eq!(counts(&d), (1, 1));
    }

    #[test]
    fn pages_of_a_block_or_more_have_no_blocks() {
        let layout = MemoryLayout::new(
            2 << 20,
            [RegionDesc {
                id: RegionId(0),
                backing_page_size: 2 << 20,
                guest_addr: GuestAddr(0),
                length: 4 << 20,
            }],
        )
        .unwrap();
        let m = GuestMemory::anonymous(&layout).unwrap();
        assert!(DenseBlocks::with_huge_page(&m, BLOCK).is_none());
        // Nor where the kernel's huge pages are not 2 MiB.
        assert!(DenseBlocks::with_huge_page(&memory(), 32 << 20).is_none());
    }

    #[test]
    fn islands_past_the_budget_are_decided_against_and_neighbours_not() {
        let Some((m, d)) = fresh() else {
            return;
        };
        pages(&d, &m, &[(block(&d, 1), 512)], &[]);
        assert_eq!(state(&d, 1), HUGE);
        d.islands.store(MAX_ISLANDS, Ordering::Relaxed);
        // A neighbour of an advised block splits no mapping further: advised.
        pages(&d, &m, &[(block(&d, 2), 512)], &[]);
        assert_eq!(state(&d, 2), HUGE);
        // A block of its own would: decided against.
        pages(&d, &m, &[(block(&d, 5), 512)], &[]);
        assert_eq!((state(&d, 5), d.advised()), (DECIDED, 2));
    }

    #[test]
    fn another_region_or_wild_runs_change_nothing() {
        let m = memory();
        let d = DenseBlocks::with_huge_page(&m, BLOCK).unwrap();
        d.before_write(
            &m,
            RegionId(9),
            [(0, 512)].into_iter(),
            std::iter::empty(),
            false,
        );
        pages(&d, &m, &[(u64::MAX - 10, 100), (u64::MAX, u64::MAX)], &[]);
        assert_eq!(d.advised(), 0);
        assert!((0..d.regions[0].state.len()).all(|k| state(&d, k) == UNDECIDED));
    }
}
