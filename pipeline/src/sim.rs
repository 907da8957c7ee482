//! A simulated guest for demos, benchmarks and tests: memory filled with realistic
//! mixed content, a writer thread that dirties pages at a set rate (playing the vCPUs),
//! and a [`DirtyLog`] over what it wrote.
//!
//! The writer writes a page first and marks it dirty second, as a hardware dirty log
//! observes writes, so a page synced in between is sent again in the next round.
//! Pausing takes the lock each write holds, so no write is in progress or starts once
//! [`VcpuControl::pause`] returns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagewire_protocol::RegionId;

use crate::dirty::{DirtyBitmap, DirtyLog, DirtyLogError, VcpuControl};
use crate::memory::GuestMemory;

/// A small deterministic generator (xorshift64).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator from a seed (0 is replaced).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// What pages are filled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// A realistic mix: a sixth each of zero pages, text, code-like bytes, random
    /// bytes, counters, and uniform pages of 0xCC (what Linux writes into freed memory).
    Mixed,
    /// All zero.
    Zero,
    /// Random bytes (incompressible).
    Random,
    /// English-like text.
    Text,
}

/// Fills one page with `content`.
pub fn page_content(rng: &mut Rng, content: Content, page: &mut [u8]) {
    let kind = match content {
        Content::Mixed => rng.below(6),
        Content::Zero => 0,
        Content::Text => 1,
        Content::Random => 3,
    };
    match kind {
        0 => page.fill(0),
        1 => {
            const TEXT: &[u8] = b"The quick brown fox jumps over the lazy dog; \
                live migration moves guest memory while the guest keeps running. ";
            let shift = rng.below(TEXT.len() as u64) as usize;
            for (i, b) in page.iter_mut().enumerate() {
                *b = TEXT[(i + shift) % TEXT.len()];
            }
        }
        2 => {
            const CODE: [u8; 16] = [
                0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0x8b, 0x45, 0xfc, 0x89, 0xc7, 0xe8,
                0x00, 0xc3,
            ];
            let salt = rng.next_u64();
            for (i, b) in page.iter_mut().enumerate() {
                *b = CODE[i % 16]
                    ^ if i % 64 == 13 {
                        (salt >> (i % 56)) as u8
                    } else {
                        0
                    };
            }
        }
        3 => {
            for chunk in page.chunks_mut(8) {
                let v = rng.next_u64().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        }
        5 => page.fill(0xcc),
        _ => {
            let base = rng.below(1 << 20);
            for (i, chunk) in page.chunks_mut(8).enumerate() {
                let v = (base + i as u64).to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        }
    }
}

/// Fills every page of `memory` with `content`, deterministically from `seed`.
pub fn fill(memory: &GuestMemory, content: Content, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut page = vec![0u8; memory.page_size() as usize];
    for id in memory.region_ids().collect::<Vec<_>>() {
        for p in 0..memory.pages(id).unwrap_or(0) {
            page_content(&mut rng, content, &mut page);
            memory.write_pages(id, p, &page);
        }
    }
}

/// Fills guest memory from `data`, repeated as needed (a real memory dump, a file).
pub fn fill_from(memory: &GuestMemory, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let ps = memory.page_size() as usize;
    let mut page = vec![0u8; ps];
    let mut at = 0usize;
    for id in memory.region_ids().collect::<Vec<_>>() {
        for p in 0..memory.pages(id).unwrap_or(0) {
            for b in page.iter_mut() {
                *b = data[at];
                at = (at + 1) % data.len();
            }
            memory.write_pages(id, p, &page);
        }
    }
}

/// The first page at which two memories differ, comparing every page.
pub fn first_difference(a: &GuestMemory, b: &GuestMemory) -> Option<(RegionId, u64)> {
    let ps = a.page_size() as usize;
    let mut pa = vec![0u8; ps];
    let mut pb = vec![0u8; ps];
    for id in a.region_ids().collect::<Vec<_>>() {
        for p in 0..a.pages(id).unwrap_or(0) {
            let ok = a.read_pages(id, p, 1, &mut pa) && b.read_pages(id, p, 1, &mut pb);
            if !ok || pa != pb {
                return Some((id, p));
            }
        }
    }
    None
}

/// Which pages the writer dirties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly over all memory.
    Random,
    /// Only the first `n` pages of the first region (a hot working set).
    Hot(u64),
    /// Sweeps memory in order, wrapping.
    Sequential,
    /// `hot_percent` of the writes go to the first `hot_pages` pages of the first
    /// region, the rest uniformly over all memory (a key-value cache: a small share of
    /// pages written most often).
    Skewed {
        /// Pages in the hot set.
        hot_pages: u64,
        /// Share of the writes that go to the hot set, 0..=100.
        hot_percent: u8,
    },
}

/// Settings of the simulated vCPUs.
#[derive(Clone, Copy, Debug)]
pub struct WriterConfig {
    /// Pages rewritten per second (0: the writer does nothing).
    pub pages_per_s: u64,
    /// Which pages.
    pub pattern: Pattern,
    /// Content of rewritten pages.
    pub content: Content,
    /// Seed.
    pub seed: u64,
    /// 0: each write rewrites its page whole with `content`. Otherwise each write
    /// changes this many bytes of its page in place (at an offset that is a multiple
    /// of it, the rest of the page as it was), as a guest updates one item of a
    /// slab: the bytes come from `content`.
    pub edit_bytes: u32,
}

/// A simulated running guest (see the module docs).
#[derive(Debug)]
pub struct Guest {
    marks: Arc<Vec<(RegionId, DirtyBitmap)>>,
    running: Arc<Mutex<bool>>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    pauses: Arc<AtomicU64>,
    resumes: Arc<AtomicU64>,
    logging: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Guest {
    /// Starts the writer over `memory`.
    pub fn start(memory: Arc<GuestMemory>, cfg: WriterConfig) -> Guest {
        let marks: Arc<Vec<(RegionId, DirtyBitmap)>> = Arc::new(
            memory
                .region_ids()
                .map(|id| (id, DirtyBitmap::new(memory.pages(id).unwrap_or(0))))
                .collect(),
        );
        let running = Arc::new(Mutex::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (mk, r, s, w) = (marks.clone(), running.clone(), stop.clone(), writes.clone());
        let thread = std::thread::Builder::new()
            .name("pagewire-sim-guest".into())
            .spawn(move || write_loop(&memory, &mk, &r, &s, &w, cfg))
            .ok();
        Guest {
            marks,
            running,
            stop,
            writes,
            pauses: Arc::new(AtomicU64::new(0)),
            resumes: Arc::new(AtomicU64::new(0)),
            logging: Arc::new(AtomicBool::new(false)),
            thread,
        }
    }

    /// The dirty log the migration reads.
    pub fn log(&self) -> Log {
        Log {
            marks: self.marks.clone(),
            logging: self.logging.clone(),
        }
    }

    /// The control of the simulated vCPUs (pause, resume).
    pub fn vcpus(&self) -> Vcpus {
        Vcpus {
            running: self.running.clone(),
            pauses: self.pauses.clone(),
            resumes: self.resumes.clone(),
        }
    }

    /// Whether dirty logging is on ([`DirtyLog::start`] was called and
    /// [`DirtyLog::stop`] was not).
    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::Relaxed)
    }

    /// Pages written so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Times the guest was paused and resumed.
    pub fn pauses_and_resumes(&self) -> (u64, u64) {
        (
            self.pauses.load(Ordering::Relaxed),
            self.resumes.load(Ordering::Relaxed),
        )
    }

    /// Whether the vCPUs run (not paused).
    pub fn is_running(&self) -> bool {
        self.running.lock().map(|g| *g).unwrap_or(false)
    }

    /// Stops the writer thread for good.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_loop(
    memory: &GuestMemory,
    marks: &[(RegionId, DirtyBitmap)],
    running: &Mutex<bool>,
    stop: &AtomicBool,
    writes: &AtomicU64,
    cfg: WriterConfig,
) {
    let mut rng = Rng::new(cfg.seed);
    let mut page = vec![0u8; memory.page_size() as usize];
    let mut edit = vec![0u8; page.len()];
    let total: u64 = marks.iter().map(|(_, b)| b.pages()).sum();
    let started = Instant::now();
    let mut done = 0u64;
    let mut sweep = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Pace: writes due by now at the configured rate, in bursts of at most 256.
        let due = (started.elapsed().as_secs_f64() * cfg.pages_per_s as f64) as u64;
        if due <= done || total == 0 {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        for _ in 0..(due - done).min(256) {
            let Ok(g) = running.lock() else { return };
            if !*g {
                break;
            }
            let global = match cfg.pattern {
                Pattern::Random => rng.below(total),
                Pattern::Hot(n) => rng.below(n.min(marks[0].1.pages())),
                Pattern::Sequential => {
                    sweep = (sweep + 1) % total;
                    sweep
                }
                Pattern::Skewed {
                    hot_pages,
                    hot_percent,
                } => {
                    if rng.below(100) < u64::from(hot_percent) {
                        rng.below(hot_pages.min(marks[0].1.pages()))
                    } else {
                        rng.below(total)
                    }
                }
            };
            let (mut idx, mut p) = (0, global);
            while idx + 1 < marks.len() && p >= marks[idx].1.pages() {
                p -= marks[idx].1.pages();
                idx += 1;
            }
            let (id, bits) = &marks[idx];
            let n = (cfg.edit_bytes as usize).min(page.len());
            if n > 0 && memory.read_pages(*id, p, 1, &mut page) {
                let at = rng.below((page.len() / n) as u64) as usize * n;
                page_content(&mut rng, cfg.content, &mut edit);
                page[at..at + n].copy_from_slice(&edit[..n]);
            } else {
                page_content(&mut rng, cfg.content, &mut page);
            }
            if memory.write_pages(*id, p, &page) {
                bits.set(p);
            }
            writes.fetch_add(1, Ordering::Relaxed);
            done += 1;
            drop(g);
        }
        if !running.lock().map(|g| *g).unwrap_or(false) {
            // Paused: the rate restarts from now when resumed.
            std::thread::sleep(Duration::from_millis(1));
            done = (started.elapsed().as_secs_f64() * cfg.pages_per_s as f64) as u64;
        }
    }
}

/// The simulated guest's dirty log. The writer marks every page it writes; the log
/// reports them while logging is on.
#[derive(Debug)]
pub struct Log {
    marks: Arc<Vec<(RegionId, DirtyBitmap)>>,
    logging: Arc<AtomicBool>,
}

impl DirtyLog for Log {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        if self.logging.swap(true, Ordering::Relaxed) {
            return Err("dirty logging is already on".into());
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        self.logging.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn sync_and_clear(
        &mut self,
        region: RegionId,
        into: &DirtyBitmap,
    ) -> Result<(), DirtyLogError> {
        if !self.logging.load(Ordering::Relaxed) {
            return Err("dirty logging is off".into());
        }
        let (_, bits) = self
            .marks
            .iter()
            .find(|(id, _)| *id == region)
            .ok_or("unknown region")?;
        bits.drain_into(into);
        Ok(())
    }
}

/// The simulated guest's vCPUs: pausing stops the writer.
#[derive(Debug)]
pub struct Vcpus {
    running: Arc<Mutex<bool>>,
    pauses: Arc<AtomicU64>,
    resumes: Arc<AtomicU64>,
}

impl VcpuControl for Vcpus {
    fn pause(&mut self) -> Result<(), DirtyLogError> {
        *self.running.lock().map_err(|_| "poisoned")? = false;
        self.pauses.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DirtyLogError> {
        *self.running.lock().map_err(|_| "poisoned")? = true;
        self.resumes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pagewire_protocol::{GuestAddr, MemoryLayout, RegionDesc};

    /// A layout of one region of `pages` 4 KiB pages.
    pub(crate) fn one_region(pages: u64) -> MemoryLayout {
        MemoryLayout::new(
            4096,
            [RegionDesc {
                id: RegionId(0),
                backing_page_size: 4096,
                guest_addr: GuestAddr(0),
                length: pages * 4096,
            }],
        )
        .unwrap()
    }

    #[test]
    fn skewed_writes_stay_in_the_hot_set_when_all_are_hot() {
        let layout = one_region(64);
        let mem = Arc::new(GuestMemory::anonymous(&layout).unwrap());
        let mut g = Guest::start(
            mem,
            WriterConfig {
                pages_per_s: 50_000,
                pattern: Pattern::Skewed {
                    hot_pages: 8,
                    hot_percent: 100,
                },
                content: Content::Random,
                seed: 3,
                edit_bytes: 0,
            },
        );
        let mut log = g.log();
        log.start().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.writes() < 200 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        g.stop();
        let marked = DirtyBitmap::new(64);
        log.sync_and_clear(RegionId(0), &marked).unwrap();
        assert!(marked.count() > 0);
        assert!(
            (8..64).all(|p| !marked.is_set(p)),
            "a write left the hot set"
        );
    }

    #[test]
    fn writer_marks_what_it_writes_and_stops_when_paused() {
        let layout = one_region(64);
        let mem = Arc::new(GuestMemory::anonymous(&layout).unwrap());
        let copy = GuestMemory::anonymous(&layout).unwrap();
        let mut g = Guest::start(
            mem.clone(),
            WriterConfig {
                pages_per_s: 50_000,
                pattern: Pattern::Random,
                content: Content::Random,
                seed: 1,
                edit_bytes: 0,
            },
        );
        let mut log = g.log();
        let mut vcpus = g.vcpus();
        log.start().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.writes() < 100 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        vcpus.pause().unwrap();
        let marked = DirtyBitmap::new(64);
        log.sync_and_clear(RegionId(0), &marked).unwrap();
        assert!(marked.count() > 0);
        // Every page that differs from a never-written copy is marked.
        let writes = g.writes();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.writes(), writes, "no write while paused");
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        for p in 0..64 {
            mem.read_pages(RegionId(0), p, 1, &mut a);
            copy.read_pages(RegionId(0), p, 1, &mut b);
            if a != b {
                assert!(marked.is_set(p), "page {p} written but not marked");
            }
        }
        g.stop();
    }

    /// With `edit_bytes`, a write changes one aligned slot of that many bytes of its
    /// page and leaves the rest as it was.
    #[test]
    fn an_editing_writer_changes_one_slot_of_a_page() {
        let layout = one_region(4);
        let mem = Arc::new(GuestMemory::anonymous(&layout).unwrap());
        fill(&mem, Content::Random, 5);
        let mut before = vec![0u8; 4 * 4096];
        assert!(mem.read_pages(RegionId(0), 0, 4, &mut before));
        let mut g = Guest::start(
            mem.clone(),
            WriterConfig {
                pages_per_s: 20,
                pattern: Pattern::Random,
                content: Content::Zero,
                seed: 2,
                edit_bytes: 128,
            },
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.writes() < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        g.vcpus().pause().unwrap();
        g.stop();
        // Fewer writes than a page has slots: a whole page rewritten would show.
        assert!(g.writes() >= 1 && g.writes() < 32, "{} writes", g.writes());
        let mut after = vec![0u8; 4 * 4096];
        assert!(mem.read_pages(RegionId(0), 0, 4, &mut after));
        let slots: Vec<usize> = (0..4 * 32)
            .filter(|&s| before[s * 128..(s + 1) * 128] != after[s * 128..(s + 1) * 128])
            .collect();
        assert!(
            !slots.is_empty() && slots.len() as u64 <= g.writes(),
            "{slots:?}"
        );
        for &s in &slots {
            assert!(after[s * 128..(s + 1) * 128].iter().all(|&b| b == 0));
        }
    }
}
