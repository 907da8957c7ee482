//! Dedup on the channel thread: a frame's data pages copied out and hashed, those
//! the destination already holds under another page sent as COPY frames, the rest
//! left for the codec (see `source/dedup.rs` for why this order is safe).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pagewire_protocol::{CopyFrame, CopyRun, Frame, PageIndex, PageRun, RegionId, Round, WireList};

use crate::error::MigrationError;
use crate::source::dedup::PageHash;
use crate::source::split::{PageSplit, extend};

use super::{Worker, run_keys};

/// A frame's data pages after dedup.
pub(super) struct Staged {
    /// The data pages left, in payload order, and their bytes, back to back.
    pub(super) data: Vec<PageRun>,
    pub(super) buf: Vec<u8>,
    /// Their hashes.
    pub(super) hashes: Vec<(u64, PageHash)>,
    /// The pages that go as copies of pages of this channel, canonical (ascending,
    /// merged where the sources continue).
    pub(super) copies: Vec<CopyRun>,
    /// The pages that go as copies of other channels' pages (`ROUND_END`), the same.
    pub(super) round_end: Vec<CopyRun>,
    /// Thread CPU time spent having the kernel back memory for the first time (a new
    /// buffer, the table's pages): a cost of the migration's first frames, not of the
    /// frame's codec, which the adaptive choice must not charge to it (on this
    /// machine's virtual memory it made zstd:1 look 15 MB/s of core for a second).
    pub(super) setup: Duration,
    /// The wall time that took (the thread also waits for a core meanwhile).
    pub(super) setup_wall: Duration,
}

impl Worker {
    /// Copies the frame's data pages out of guest memory, hashes each copy and splits
    /// them into copies of pages sent before and data pages for the codec.
    pub(super) fn dedupe(
        &mut self,
        region: RegionId,
        split: &PageSplit,
    ) -> Result<Staged, MigrationError> {
        let ch = self.s.ch;
        let ps = self.s.memory.page_size() as usize;
        let d = self.s.dedup.as_mut().ok_or(MigrationError::Worker(ch))?;
        let pages: usize = split.data.iter().map(|r| r.count as usize).sum();
        let (mut setup, mut setup_wall) = (Duration::ZERO, Duration::ZERO);
        // Timed only when the buffer is new: a clock read per frame is a system call.
        let mut buf = if d.has_spare() {
            d.buffer(pages * ps)
        } else {
            let (t0, w0) = (pagewire_accel::thread_cpu_time(), Instant::now());
            let b = d.buffer(pages * ps);
            setup += pagewire_accel::thread_cpu_time().saturating_sub(t0);
            setup_wall += w0.elapsed();
            b
        };
        let mut off = 0;
        for run in &split.data {
            let n = run.count as usize * ps;
            let part = buf
                .get_mut(off..off + n)
                .ok_or(MigrationError::Worker(ch))?;
            if !self
                .s
                .memory
                .read_pages(region, run.start.0, u64::from(run.count), part)
            {
                return Err(MigrationError::Protocol {
                    channel: ch,
                    what: format!("run {run:?} outside region {region:?}"),
                });
            }
            off += n;
        }
        let mut st = Staged {
            data: Vec::with_capacity(split.data.len()),
            buf: Vec::new(),
            hashes: Vec::with_capacity(pages),
            copies: Vec::new(),
            round_end: Vec::new(),
            setup: Duration::ZERO,
            setup_wall: Duration::ZERO,
        };
        // Hashed without the table, looked up with it held once for the frame.
        let table = d.table.clone();
        let hashes: Vec<PageHash> = table.hash_pages(&buf, ps);
        let (t0, w0) = (pagewire_accel::thread_cpu_time(), Instant::now());
        if table.prepare(&hashes) > 0 {
            setup += pagewire_accel::thread_cpu_time().saturating_sub(t0);
            setup_wall += w0.elapsed();
        }
        (st.setup, st.setup_wall) = (setup, setup_wall);
        let found: Vec<Option<u64>> = {
            let t = table.lock();
            hashes.iter().map(|&h| t.find(region, h)).collect()
        };
        let (mut i, mut kept) = (0usize, 0usize);
        for run in &split.data {
            for p in run.start.0..run.start.0 + u64::from(run.count) {
                match found.get(i).copied().flatten() {
                    // Its frame is on this channel before the COPY.
                    Some(from) if table.channel(region, from) == ch => {
                        push_copy(&mut st.copies, p, from)
                    }
                    // On another channel: applied once every channel ended the round.
                    Some(from) => push_copy(&mut st.round_end, p, from),
                    None => {
                        if kept != i {
                            buf.copy_within(i * ps..(i + 1) * ps, kept * ps);
                        }
                        kept += 1;
                        extend(&mut st.data, p);
                        st.hashes.push((p, hashes[i]));
                    }
                }
                i += 1;
            }
        }
        buf.truncate(kept * ps);
        st.buf = buf;
        if let Some(cache) = self.delta_cache() {
            // Sent another way: the next delta must not be against the cached version.
            let runs = st.copies.iter().chain(&st.round_end);
            run_keys(region, runs.map(|c| (c.start.0, c.count))).for_each(|k| cache.invalidate(k));
        }
        Ok(st)
    }

    /// Sends `copies` (of one frame, so at most `max_pages` pages) as COPY frames,
    /// applied at the round's end with `round_end`; returns the pages.
    pub(super) fn send_copies(
        &mut self,
        region: RegionId,
        copies: &[CopyRun],
        round_end: bool,
    ) -> Result<u64, MigrationError> {
        let mut all = 0;
        for runs in copies.chunks(usize::from(u16::MAX)) {
            let mut frame = CopyFrame {
                region,
                round: Round(self.round_no),
                runs: WireList::Slice(runs),
                round_end,
                crc: None,
            };
            if self.s.checksum.is_some() {
                frame = frame.with_crc().map_err(|e| MigrationError::Protocol {
                    channel: self.s.ch,
                    what: e.to_string(),
                })?;
            }
            self.rules.on_send_copy(&frame).map_err(|e| self.rule(e))?;
            let pages = frame.pages();
            let wire = self.send_whole(&Frame::Copy(frame))?;
            self.count_frame(pages, wire);
            self.round.pages.copied += pages;
            self.s.counters.copied.fetch_add(pages, Ordering::Relaxed);
            all += pages;
        }
        Ok(all)
    }
}

/// Adds the copy of page `from` into page `p`, after every copy added so far; runs
/// merge only where both the targets and the sources continue (COPY's canonical form).
fn push_copy(runs: &mut Vec<CopyRun>, p: u64, from: u64) {
    match runs.last_mut() {
        Some(last)
            if last.start.0 + u64::from(last.count) == p
                && last.from.0 + u64::from(last.count) == from
                && last.count < u32::MAX =>
        {
            last.count += 1
        }
        _ => runs.push(CopyRun {
            start: PageIndex(p),
            count: 1,
            from: PageIndex(from),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_merge_only_where_targets_and_sources_continue() {
        let mut c = Vec::new();
        for (p, from) in [(10, 100), (11, 101), (12, 50), (14, 51), (15, 52)] {
            push_copy(&mut c, p, from);
        }
        let got: Vec<_> = c.iter().map(|r| (r.start.0, r.count, r.from.0)).collect();
        assert_eq!(got, [(10, 2, 100), (12, 1, 50), (14, 2, 51)]);
    }
}
