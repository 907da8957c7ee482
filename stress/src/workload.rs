//! What the source guest's memory holds (`--workload`) and how the simulated vCPUs
//! dirty it (`--pattern`, `--dirty-mbps`).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use pagewire::GuestMemory;
use pagewire::sim::{self, Content, Pattern, Rng};

/// Page size of every workload.
pub const PAGE: usize = 4096;

/// Guest memory content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// An idle Linux guest: most pages from real files of this machine (page cache,
    /// binaries), about 30 % pages of one repeated byte 0xCC (freed memory poisoned
    /// with `init_on_free`/slub debugging, int3 padding), a few % zero pages. The file
    /// pages are two copies of a corpus (as a guest holds a file in its page cache and
    /// again in a process), laid in order: the first copy fills the first half of the
    /// file pages, the second the rest (more copies only when the machine has too few
    /// files; see [`idle_corpus_budget`]).
    Idle,
    /// A memory dump (or any file), repeated to fill memory.
    FillFrom(PathBuf),
    /// All zero.
    Zero,
    /// Every page one repeated byte (a different byte per page, never 0).
    Ones,
    /// Counters: every 8-byte word one more than the last.
    Sequence,
    /// Random bytes (incompressible).
    Random,
    /// English-like text.
    Text,
    /// pagewire's simulated mix (a fifth each of zero, text, code, random, counters).
    Mixed,
    /// A key-value cache (memcached-like slabs of items); written with a skewed
    /// pattern (see [`WritePattern::Hot`]).
    Hot,
    /// The same cache with its items updated in place: each write changes one
    /// 128-byte item of its page, the rest of the page as it was.
    Edits,
}

impl FromStr for Workload {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        if let Some(path) = s.strip_prefix("fill-from:") {
            if path.is_empty() {
                bail!("fill-from:FILE needs a file");
            }
            return Ok(Workload::FillFrom(path.into()));
        }
        Ok(match s {
            "idle" => Workload::Idle,
            "zero" => Workload::Zero,
            "ones" => Workload::Ones,
            "sequence" => Workload::Sequence,
            "random" => Workload::Random,
            "text" => Workload::Text,
            "mixed" => Workload::Mixed,
            "hot" => Workload::Hot,
            "edits" => Workload::Edits,
            o => bail!(
                "unknown workload {o:?}: idle, zero, ones, sequence, random, text, mixed, hot, \
                 edits, fill-from:FILE"
            ),
        })
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Idle => f.write_str("idle"),
            Workload::FillFrom(p) => write!(f, "fill-from:{}", p.display()),
            Workload::Zero => f.write_str("zero"),
            Workload::Ones => f.write_str("ones"),
            Workload::Sequence => f.write_str("sequence"),
            Workload::Random => f.write_str("random"),
            Workload::Text => f.write_str("text"),
            Workload::Mixed => f.write_str("mixed"),
            Workload::Hot => f.write_str("hot"),
            Workload::Edits => f.write_str("edits"),
        }
    }
}

/// Which pages the writer dirties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePattern {
    /// Uniformly over all memory.
    Random,
    /// In order, wrapping.
    Sequential,
    /// 90 % of the writes to a hot 5 % of memory, the rest uniformly.
    Hot,
}

impl FromStr for WritePattern {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "random" => WritePattern::Random,
            "sequential" => WritePattern::Sequential,
            "hot" => WritePattern::Hot,
            o => bail!("unknown pattern {o:?}: random, sequential, hot"),
        })
    }
}

impl WritePattern {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            WritePattern::Random => "random",
            WritePattern::Sequential => "sequential",
            WritePattern::Hot => "hot",
        }
    }

    /// The simulator's pattern over `pages` pages.
    pub fn sim(self, pages: u64) -> Pattern {
        match self {
            WritePattern::Random => Pattern::Random,
            WritePattern::Sequential => Pattern::Sequential,
            WritePattern::Hot => Pattern::Skewed {
                hot_pages: (pages / 20).max(1),
                hot_percent: 90,
            },
        }
    }
}

/// Writer pages per second for a rate in MB/s (10^6 bytes).
pub fn pages_per_s(mbps: f64) -> u64 {
    (mbps * 1e6 / PAGE as f64).round() as u64
}

impl Workload {
    /// What the writer writes into the pages it dirties.
    pub fn writer_content(&self) -> Content {
        match self {
            Workload::Zero => Content::Zero,
            Workload::Random => Content::Random,
            Workload::Text | Workload::Hot | Workload::Edits => Content::Text,
            _ => Content::Mixed,
        }
    }

    /// Bytes each write changes in place (0: the whole page is rewritten).
    pub fn writer_edit_bytes(&self) -> u32 {
        match self {
            Workload::Edits => 128,
            _ => 0,
        }
    }
}

/// The corpus bytes that make the `idle` workload's file pages (66 % of the memory)
/// two copies of it: a third of `mem_bytes`, in whole pages.
pub fn idle_corpus_budget(mem_bytes: u64) -> usize {
    let pages = (mem_bytes / PAGE as u64 * 33).div_ceil(100);
    pages as usize * PAGE
}

/// Source pages for the `idle` workload: 4 KiB pages of real files of this machine.
#[derive(Clone, Debug)]
pub struct FileCorpus {
    pages: Vec<u8>,
}

impl FileCorpus {
    /// Reads regular files under `roots`, in sorted order, at most `per_file` bytes of
    /// each and `budget` bytes in all, visiting at most `max_entries` directory
    /// entries; keeps only pages that are not one repeated byte (those are what the
    /// workload adds on purpose).
    pub fn read(roots: &[&Path], budget: usize, per_file: usize, max_entries: usize) -> Self {
        let mut pages = Vec::new();
        let mut visited = 0usize;
        let mut stack: Vec<PathBuf> = roots.iter().rev().map(|p| p.to_path_buf()).collect();
        while let Some(dir) = stack.pop() {
            if pages.len() >= budget || visited >= max_entries {
                break;
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
            entries.sort();
            let mut subdirs = Vec::new();
            for path in entries {
                visited += 1;
                if pages.len() >= budget || visited >= max_entries {
                    break;
                }
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    subdirs.push(path);
                } else if meta.is_file() && meta.len() >= PAGE as u64 {
                    let Ok(f) = std::fs::File::open(&path) else {
                        continue;
                    };
                    let mut buf = Vec::new();
                    let take = per_file.min(budget - pages.len()) as u64;
                    if std::io::Read::read_to_end(&mut std::io::Read::take(f, take), &mut buf)
                        .is_err()
                    {
                        continue;
                    }
                    for page in buf.chunks_exact(PAGE) {
                        if !uniform(page) {
                            pages.extend_from_slice(page);
                        }
                    }
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        FileCorpus { pages }
    }

    /// The corpus of this machine: /usr/lib and /usr/share (then /usr, /etc).
    pub fn system(budget: usize) -> Self {
        let roots = [
            Path::new("/usr/lib"),
            Path::new("/usr/share"),
            Path::new("/usr"),
            Path::new("/etc"),
        ];
        Self::read(&roots, budget, 1 << 20, 200_000)
    }

    /// Pages held.
    pub fn pages(&self) -> usize {
        self.pages.len() / PAGE
    }
}

fn uniform(page: &[u8]) -> bool {
    page.iter().all(|&b| b == page[0])
}

/// Share of each kind of page in some memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Composition {
    /// Pages.
    pub pages: u64,
    /// All zero.
    pub zero: u64,
    /// All 0xCC.
    pub cc: u64,
    /// One repeated byte other than 0 and 0xCC.
    pub other_uniform: u64,
}

impl Composition {
    /// Counts the kinds of pages in `memory`.
    pub fn of(memory: &GuestMemory) -> Self {
        let mut c = Composition::default();
        let mut page = vec![0u8; PAGE];
        for id in memory.region_ids().collect::<Vec<_>>() {
            for p in 0..memory.pages(id).unwrap_or(0) {
                if !memory.read_pages(id, p, 1, &mut page) {
                    continue;
                }
                c.pages += 1;
                if uniform(&page) {
                    match page[0] {
                        0 => c.zero += 1,
                        0xCC => c.cc += 1,
                        _ => c.other_uniform += 1,
                    }
                }
            }
        }
        c
    }

    /// Share of zero pages, 0..=1.
    pub fn zero_share(&self) -> f64 {
        self.zero as f64 / self.pages.max(1) as f64
    }

    /// Share of 0xCC pages, 0..=1.
    pub fn cc_share(&self) -> f64 {
        self.cc as f64 / self.pages.max(1) as f64
    }
}

/// Fills guest memory with a workload, deterministically from a seed (and, for
/// `idle` and `fill-from`, the files read once).
#[derive(Debug)]
pub struct Filler {
    workload: Workload,
    corpus: Option<FileCorpus>,
    dump: Option<Vec<u8>>,
}

impl Filler {
    /// Reads what the workload needs: the machine's files for `idle` (at most
    /// `corpus_budget` bytes), the file for `fill-from`.
    ///
    /// # Errors
    /// The dump cannot be read or is empty; `idle` found no file pages.
    pub fn new(workload: &Workload, corpus_budget: usize) -> anyhow::Result<Self> {
        let mut f = Filler {
            workload: workload.clone(),
            corpus: None,
            dump: None,
        };
        match workload {
            Workload::Idle => {
                let c = FileCorpus::system(corpus_budget);
                if c.pages() == 0 {
                    bail!(
                        "workload idle: found no readable files under /usr/lib, /usr/share, /usr, /etc"
                    );
                }
                f.corpus = Some(c);
            }
            Workload::FillFrom(path) => {
                let d = std::fs::read(path)
                    .with_context(|| format!("workload fill-from: reading {}", path.display()))?;
                if d.is_empty() {
                    bail!("workload fill-from: {} is empty", path.display());
                }
                f.dump = Some(d);
            }
            _ => {}
        }
        Ok(f)
    }

    /// Fills every page of `memory`.
    pub fn fill(&self, memory: &GuestMemory, seed: u64) {
        let simple = |c: Content| sim::fill(memory, c, seed);
        match &self.workload {
            Workload::Zero => simple(Content::Zero),
            Workload::Random => simple(Content::Random),
            Workload::Text => simple(Content::Text),
            Workload::Mixed => simple(Content::Mixed),
            Workload::FillFrom(_) => {
                if let Some(d) = &self.dump {
                    sim::fill_from(memory, d);
                }
            }
            w => {
                let mut rng = Rng::new(seed);
                let mut page = vec![0u8; PAGE];
                let mut n = 0u64;
                // File pages laid so far: the corpus is laid in order, again and again.
                let mut files = 0u64;
                for id in memory.region_ids().collect::<Vec<_>>() {
                    for p in 0..memory.pages(id).unwrap_or(0) {
                        self.page(w, n, &mut files, &mut rng, &mut page);
                        memory.write_pages(id, p, &page);
                        n += 1;
                    }
                }
            }
        }
    }

    fn page(&self, w: &Workload, n: u64, files: &mut u64, rng: &mut Rng, page: &mut [u8]) {
        match w {
            Workload::Ones => page.fill((n % 255) as u8 + 1),
            Workload::Sequence => {
                for (i, chunk) in page.chunks_mut(8).enumerate() {
                    chunk.copy_from_slice(&(n * 512 + i as u64).to_le_bytes());
                }
            }
            Workload::Idle => {
                let r = rng.below(100);
                if r < 30 {
                    page.fill(0xCC);
                } else if r < 34 {
                    page.fill(0);
                } else if let Some(c) = &self.corpus {
                    let i = (*files as usize) % c.pages();
                    *files += 1;
                    page.copy_from_slice(&c.pages[i * PAGE..(i + 1) * PAGE]);
                }
            }
            _ => hot_page(n, rng, page),
        }
    }
}

/// A memcached-like slab page: 128-byte items, each a header (CAS counter, expiry,
/// lengths), a key (`user:00012345:profile`) and a value (text, or random bytes for
/// a quarter of the items); about a tenth of the slab pages are still empty (zero).
fn hot_page(n: u64, rng: &mut Rng, page: &mut [u8]) {
    if rng.below(10) == 0 {
        page.fill(0);
        return;
    }
    const TEXT: &[u8] =
        b"{\"name\":\"ada\",\"plan\":\"pro\",\"seen\":1712345678,\"cart\":[3,14,15]} ";
    for (i, item) in page.chunks_mut(128).enumerate() {
        let cas = n * 32 + i as u64;
        item[..8].copy_from_slice(&cas.to_le_bytes());
        item[8..12].copy_from_slice(&(3600u32 + (cas % 97) as u32).to_le_bytes());
        item[12..14].copy_from_slice(&21u16.to_le_bytes());
        item[14..16].copy_from_slice(&91u16.to_le_bytes());
        let key = format!("user:{:08}:profile", rng.below(100_000_000));
        let k = key.as_bytes();
        item[16..16 + k.len()].copy_from_slice(k);
        let value = &mut item[16 + k.len()..];
        if rng.below(4) == 0 {
            for b in value.iter_mut() {
                *b = rng.next_u64() as u8;
            }
        } else {
            let shift = rng.below(TEXT.len() as u64) as usize;
            for (j, b) in value.iter_mut().enumerate() {
                *b = TEXT[(j + shift) % TEXT.len()];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire::{GuestAddr, MemoryLayout, RegionDesc, RegionId};

    pub(crate) fn memory(pages: u64) -> GuestMemory {
        let layout = MemoryLayout::new(
            4096,
            [RegionDesc {
                id: RegionId(0),
                backing_page_size: 4096,
                guest_addr: GuestAddr(0),
                length: pages * 4096,
            }],
        )
        .unwrap();
        GuestMemory::anonymous(&layout).unwrap()
    }

    #[test]
    fn idle_is_mostly_files_with_30_percent_cc_and_a_few_percent_zero() {
        let mem = memory(8192);
        let f = Filler::new(&Workload::Idle, 8 << 20).unwrap();
        assert!(
            f.corpus.as_ref().unwrap().pages() > 100,
            "too few file pages"
        );
        f.fill(&mem, 1);
        let c = Composition::of(&mem);
        assert_eq!(c.pages, 8192);
        assert!((0.27..=0.33).contains(&c.cc_share()), "{c:?}");
        assert!((0.02..=0.06).contains(&c.zero_share()), "{c:?}");
        // The rest are file pages, never one repeated byte.
        assert_eq!(c.other_uniform, 0, "{c:?}");
    }

    #[test]
    fn idle_holds_its_corpus_twice_at_most() {
        let pages = 8192u64;
        let mem = memory(pages);
        let f = Filler::new(&Workload::Idle, idle_corpus_budget(pages * 4096)).unwrap();
        let corpus = f.corpus.as_ref().unwrap();
        f.fill(&mem, 1);
        let mut seen = std::collections::HashMap::<Vec<u8>, u32>::new();
        let mut page = vec![0u8; PAGE];
        for p in 0..pages {
            assert!(mem.read_pages(RegionId(0), p, 1, &mut page));
            if !uniform(&page) {
                *seen.entry(page.clone()).or_default() += 1;
            }
        }
        let most = seen.values().copied().max().unwrap();
        // A file can hold the same page twice itself: a corpus page is there twice,
        // and the few repeats within the files add to that.
        let twice = seen.values().filter(|&&n| n == 2).count();
        assert!(most <= 6, "a page {most} times");
        assert!(
            twice as f64 >= 0.8 * corpus.pages() as f64,
            "{twice} of {} corpus pages twice",
            corpus.pages()
        );
        // Every file page is in the corpus's first or second copy, none in a third.
        let file_pages: u32 = seen.values().sum();
        assert!(u64::from(file_pages) <= 2 * corpus.pages() as u64);
    }

    #[test]
    fn simple_workloads_are_what_they_say() {
        let mem = memory(512);
        for (w, zero, uniform) in [
            (Workload::Zero, 512, 0),
            (Workload::Ones, 0, 512),
            (Workload::Random, 0, 0),
            (Workload::Sequence, 0, 0),
        ] {
            Filler::new(&w, 0).unwrap().fill(&mem, 3);
            let c = Composition::of(&mem);
            assert_eq!(
                (c.zero, c.other_uniform + c.cc),
                (zero, uniform),
                "{w}: {c:?}"
            );
        }
        let mut page = vec![0u8; PAGE];
        mem.read_pages(RegionId(0), 7, 1, &mut page);
        assert_eq!(
            u64::from_le_bytes(page[8..16].try_into().unwrap()),
            7 * 512 + 1
        );
        Filler::new(&Workload::Hot, 0).unwrap().fill(&mem, 3);
        let c = Composition::of(&mem);
        assert!(
            c.zero > 10 && c.zero < 120,
            "hot: about a tenth empty slabs: {c:?}"
        );
    }

    #[test]
    fn fill_from_repeats_the_file() {
        let dir = std::env::temp_dir().join(format!("pagewire-stress-dump-{}", std::process::id()));
        std::fs::write(&dir, b"abc").unwrap();
        let mem = memory(4);
        let f = Filler::new(&Workload::FillFrom(dir.clone()), 0).unwrap();
        f.fill(&mem, 0);
        let _ = std::fs::remove_file(&dir);
        let mut page = vec![0u8; PAGE];
        mem.read_pages(RegionId(0), 0, 1, &mut page);
        assert_eq!(&page[..6], b"abcabc");
        assert!(Filler::new(&Workload::FillFrom("/nonexistent/dump".into()), 0).is_err());
    }

    #[test]
    fn hot_pattern_is_skewed_and_rates_are_in_pages() {
        assert_eq!(
            WritePattern::Hot.sim(1000),
            Pattern::Skewed {
                hot_pages: 50,
                hot_percent: 90
            }
        );
        assert_eq!(pages_per_s(4.096), 1000);
        assert_eq!(pages_per_s(0.0), 0);
    }
}
