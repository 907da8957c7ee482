//! Applying COPY runs on the destination: those of a COPY of the channel's own pages as
//! they arrive, and a channel's `ROUND_END` copies once every channel ended the round,
//! spread over the machine's cores when no run reads a page another one writes.

use std::time::Duration;

use pagewire_protocol::{CopyRun, RegionId};

use crate::memory::GuestMemory;

/// Pages copied per step through the scratch buffer.
const CHUNK: u64 = 32;

/// Fewest runs worth a second thread.
const PARALLEL_RUNS: usize = 256;

/// Applies copy runs of `region`: each target page gets what its source page holds
/// now. The session's rules checked every target and source page against the layout,
/// and the caller holds the copy gate (shared for a COPY of this channel's pages,
/// exclusive for `ROUND_END` copies).
pub(super) fn copy(
    memory: &GuestMemory,
    scratch: &mut Vec<u8>,
    region: RegionId,
    runs: impl Iterator<Item = CopyRun>,
) -> Result<(), String> {
    let ps = memory.page_size() as usize;
    if scratch.len() < CHUNK as usize * ps {
        scratch.resize(CHUNK as usize * ps, 0);
    }
    for run in runs {
        let mut done = 0u64;
        while done < u64::from(run.count) {
            let n = CHUNK.min(u64::from(run.count) - done);
            let buf = &mut scratch[..n as usize * ps];
            // Pages never written read as zeros (fresh memory), not as what an
            // earlier copy left in the buffer.
            buf.fill(0);
            memory.read_written(region, run.from.0 + done, n, buf);
            if !memory.write_pages(region, run.start.0 + done, buf) {
                return Err(format!("COPY {run:?} outside region {region:?}"));
            }
            done += n;
        }
    }
    Ok(())
}

/// Applies `runs`, each of its own region, in order.
fn apply(
    memory: &GuestMemory,
    scratch: &mut Vec<u8>,
    runs: &[(RegionId, CopyRun)],
) -> Result<(), String> {
    runs.iter()
        .try_for_each(|(region, run)| copy(memory, scratch, *region, std::iter::once(*run)))
}

/// Applies a channel's `ROUND_END` copy runs, with the copy gate held exclusively (no
/// other receiver touches guest pages meanwhile). When no run writes a page another
/// one writes or reads, the runs are split over up to `threads` threads, each
/// writing only its own targets; otherwise they are applied in order on this thread.
/// Returns the CPU time of the threads it started.
pub(super) fn apply_round_end(
    memory: &GuestMemory,
    scratch: &mut Vec<u8>,
    runs: &[(RegionId, CopyRun)],
    threads: usize,
) -> Result<Duration, String> {
    if threads < 2 || runs.len() < PARALLEL_RUNS || !independent(runs) {
        return apply(memory, scratch, runs).map(|()| Duration::ZERO);
    }
    // Balanced by pages, in order.
    let pages: u64 = runs.iter().map(|(_, r)| u64::from(r.count)).sum();
    let share = pages.div_ceil(threads as u64);
    let mut parts = Vec::with_capacity(threads);
    let (mut from, mut acc) = (0, 0u64);
    for (i, (_, r)) in runs.iter().enumerate() {
        acc += u64::from(r.count);
        if acc >= share && parts.len() + 1 < threads {
            parts.push(&runs[from..=i]);
            (from, acc) = (i + 1, 0);
        }
    }
    parts.push(&runs[from..]);
    let (mine, others) = parts.split_first().ok_or("no runs")?;
    std::thread::scope(|s| {
        type Part<'r> = &'r [(RegionId, CopyRun)];
        let helpers: Vec<Result<_, Part<'_>>> = others
            .iter()
            .map(|&part| {
                std::thread::Builder::new()
                    .name("pagewire-copy".into())
                    .spawn_scoped(s, move || {
                        let cpu = pagewire_accel::thread_cpu_time();
                        let r = apply(memory, &mut Vec::new(), part);
                        (r, pagewire_accel::thread_cpu_time().saturating_sub(cpu))
                    })
                    .map_err(|_| part)
            })
            .collect();
        let mut result = apply(memory, scratch, mine);
        let mut cpu = Duration::ZERO;
        for h in helpers {
            let (r, used) = match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| (Err("a copy thread panicked".into()), Duration::ZERO)),
                // No thread: this one applies that part.
                Err(part) => (apply(memory, scratch, part), Duration::ZERO),
            };
            cpu += used;
            if result.is_ok() {
                result = r;
            }
        }
        result.map(|()| cpu)
    })
}

/// Whether no run of `runs` writes a page another run writes or any run reads: then
/// they may be applied in any order, at once.
fn independent(runs: &[(RegionId, CopyRun)]) -> bool {
    let mut targets: Vec<(u32, u64, u64)> = runs
        .iter()
        .map(|(g, r)| (g.0, r.start.0, r.start.0 + u64::from(r.count)))
        .collect();
    targets.sort_unstable();
    if targets
        .windows(2)
        .any(|w| w[0].0 == w[1].0 && w[1].1 < w[0].2)
    {
        return false;
    }
    // Does any target range of `region` meet `start..end`?
    let meets = |region: u32, start: u64, end: u64| {
        // The first target range of that region ending after `start`.
        let i = targets.partition_point(|t| (t.0, t.2) <= (region, start));
        targets.get(i).is_some_and(|t| t.0 == region && t.1 < end)
    };
    !runs
        .iter()
        .any(|(g, r)| meets(g.0, r.from.0, r.from.0 + u64::from(r.count)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_protocol::PageIndex;

    fn cr(start: u64, count: u32, from: u64) -> (RegionId, CopyRun) {
        (
            RegionId(0),
            CopyRun {
                start: PageIndex(start),
                count,
                from: PageIndex(from),
            },
        )
    }

    #[test]
    fn runs_are_independent_unless_one_writes_what_another_reads_or_writes() {
        assert!(independent(&[cr(0, 2, 10), cr(4, 2, 10), cr(2, 1, 20)]));
        // A source that is another run's target.
        assert!(!independent(&[cr(0, 2, 10), cr(10, 1, 30)]));
        assert!(!independent(&[cr(10, 4, 30), cr(0, 2, 13)]));
        // Two runs writing one page.
        assert!(!independent(&[cr(0, 4, 10), cr(3, 1, 20)]));
        // The same pages of another region are other pages.
        let other = (RegionId(1), cr(10, 1, 0).1);
        assert!(independent(&[cr(0, 2, 10), other]));
    }

    #[test]
    fn copies_applied_on_several_threads_equal_copies_applied_in_order() {
        let pages = 4096u64;
        let layout = crate::sim::tests::one_region(pages);
        // Sources in the first half, targets in the second, runs of 1 to 3 pages.
        let mut runs = Vec::new();
        let mut t = pages / 2;
        let mut i = 0u64;
        while t + 3 < pages {
            let n = (i % 3 + 1) as u32;
            runs.push(cr(t, n, (i * 7) % (pages / 2 - 3)));
            t += u64::from(n) + 1;
            i += 1;
        }
        assert!(runs.len() >= PARALLEL_RUNS);
        let fill = |m: &GuestMemory| {
            for p in 0..pages / 2 {
                assert!(m.write_pages(RegionId(0), p, &[(p % 251) as u8 + 1; 4096]));
            }
        };
        let (a, b) = (
            GuestMemory::anonymous(&layout).unwrap(),
            GuestMemory::anonymous(&layout).unwrap(),
        );
        fill(&a);
        fill(&b);
        apply_round_end(&a, &mut Vec::new(), &runs, 1).unwrap();
        apply_round_end(&b, &mut Vec::new(), &runs, 4).unwrap();
        let (mut pa, mut pb) = (vec![0u8; 4096], vec![0u8; 4096]);
        for p in 0..pages {
            assert!(a.read_pages(RegionId(0), p, 1, &mut pa));
            assert!(b.read_pages(RegionId(0), p, 1, &mut pb));
            assert_eq!(pa, pb, "page {p}");
        }
        // And the copies are there.
        let (_, r) = runs[5];
        assert!(a.read_pages(RegionId(0), r.start.0, 1, &mut pa));
        assert_eq!(pa[0], (r.from.0 % 251) as u8 + 1);
    }
}
