//! The sender's delta cache: the content last sent for recently sent pages.
//!
//! A bounded LRU of page copies, keyed by [`PageKey`], split into shards (each behind
//! its own mutex, chosen by key hash) so worker threads encoding different pages
//! rarely meet; there is no global lock. The page memory is allocated in chunks of
//! 1 MiB (`CHUNK_BYTES`; one page where a page is larger) as slots are first used, up
//! to the configured size, and touched when allocated (the time that takes is
//! [`DeltaCache::setup_time`], not a codec's): a cache that is never filled costs no
//! page memory (its slot table and index, about 40 bytes a page, are allocated when it
//! is built), and a large allocation made at once could come from a heap that must
//! clear it. Hits, misses, overflows (deltas above
//! the threshold) and evictions are counted.
//!
//! # Contract with the caller
//! The cache holds what the destination *will* hold once the frames are applied, so:
//! - a page must not be in two delta jobs in flight at once, and its frames must be
//!   sent in the order their jobs completed;
//! - when a frame is not delivered (a failed channel), [`DeltaCache::invalidate`] its
//!   pages or [`DeltaCache::clear`] the cache, so the next version goes without delta.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::page::{PageKey, PageSize};

/// Why a delta cache could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The threshold is 0 or not below the page size.
    #[error("delta threshold {threshold} must be in 1..{page_size}")]
    BadThreshold {
        /// The configured threshold.
        threshold: u32,
        /// The page size.
        page_size: PageSize,
    },
    /// The cache would hold no page, or more than this machine can address.
    #[error("delta cache of {pages} pages is out of range (1..=2^31 pages that fit in memory)")]
    BadSize {
        /// The configured number of pages.
        pages: usize,
    },
}

/// How a delta cache is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaConfig {
    /// Page size of the session.
    pub page_size: PageSize,
    /// Most pages the cache holds (its page memory grows up to `pages × page_size`).
    pub pages: usize,
    /// Largest delta, in bytes, worth sending; a larger one is an overflow and the page
    /// goes raw. Must be in `1..page_size`.
    pub threshold: u32,
    /// Number of independently locked shards (rounded to at least 1).
    pub shards: usize,
}

impl DeltaConfig {
    /// A cache of `pages` pages with a threshold of half a page and 16 shards.
    pub fn new(page_size: PageSize, pages: usize) -> Self {
        Self {
            page_size,
            pages,
            threshold: page_size.get() / 2,
            shards: 16,
        }
    }
}

/// Counters of a [`DeltaCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Pages found in the cache.
    pub hits: u64,
    /// Pages not in the cache (sent raw, then inserted).
    pub misses: u64,
    /// Pages found but whose delta exceeded the threshold (sent raw).
    pub overflows: u64,
    /// Pages evicted to make room.
    pub evictions: u64,
    /// Pages kept from frames of other codecs
    /// ([`EncodeParams::remember`](crate::EncodeParams::remember)).
    pub stored: u64,
    /// Pages the cache holds now.
    pub resident: u64,
}

/// What the cache did for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeltaOutcome {
    /// A delta of this many bytes was written (0: unchanged).
    Delta(usize),
    /// The page must go raw (miss or overflow); the cache now holds it.
    Raw,
}

const NIL: u32 = u32::MAX;

/// Bytes per chunk of cache memory (at least one page).
pub(crate) const CHUNK_BYTES: usize = 1 << 20;

#[derive(Clone, Copy)]
struct Slot {
    key: u64,
    prev: u32,
    next: u32,
    live: bool,
}

/// A multiplicative hash: keys are already well spread page numbers.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

struct Shard {
    map: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    slots: Vec<Slot>,
    /// The versions, one page per slot: slot `s`'s is page `s % chunk` of chunk
    /// `s / chunk`; a chunk is allocated when its first slot is first used.
    chunks: Vec<Box<[u8]>>,
    /// Slots per chunk.
    chunk: usize,
    page: usize,
    /// Time spent allocating chunks since the cache last took it.
    setup: Duration,
    head: u32, // most recently used
    tail: u32, // least recently used
    used: u32,
    capacity: u32,
}

impl Shard {
    fn new(capacity: u32, page: usize) -> Shard {
        Shard {
            map: HashMap::with_capacity_and_hasher(capacity as usize, Default::default()),
            slots: vec![
                Slot {
                    key: 0,
                    prev: NIL,
                    next: NIL,
                    live: false
                };
                capacity as usize
            ],
            chunks: Vec::new(),
            chunk: (CHUNK_BYTES / page).max(1),
            page,
            setup: Duration::ZERO,
            head: NIL,
            tail: NIL,
            used: 0,
            capacity,
        }
    }

    fn unlink(&mut self, s: u32) {
        let Slot { prev, next, .. } = self.slots[s as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, s: u32) {
        self.slots[s as usize].prev = NIL;
        self.slots[s as usize].next = self.head;
        if self.head != NIL {
            self.slots[self.head as usize].prev = s;
        }
        self.head = s;
        if self.tail == NIL {
            self.tail = s;
        }
    }

    /// Slot `s`'s version.
    fn version(&mut self, s: u32) -> &mut [u8] {
        let (c, i) = (s as usize / self.chunk, s as usize % self.chunk);
        // In bounds: a slot is used only after `grow` allocated its chunk.
        &mut self.chunks[c][i * self.page..(i + 1) * self.page]
    }

    /// Allocates the chunk of never-used slot `s` if it has none yet, and writes a
    /// byte of each of its 4 KiB pages, so the faults that back it are taken here,
    /// timed into `setup`, not inside the copy or the encode that follows.
    fn grow(&mut self, s: u32) {
        if (s as usize) < self.chunks.len() * self.chunk {
            return;
        }
        let t = Instant::now();
        let slots = self
            .chunk
            .min(self.capacity as usize - self.chunks.len() * self.chunk);
        let mut chunk = vec![0u8; slots * self.page].into_boxed_slice();
        let last = chunk.len().saturating_sub(1);
        for i in (0..chunk.len()).step_by(4096).chain([last]) {
            if let Some(b) = chunk.get_mut(i) {
                // SAFETY: `b` is a valid, exclusive byte of `chunk`. Volatile, so the
                // store of the zero that is already there is not elided.
                unsafe { core::ptr::write_volatile(b, 0) };
            }
        }
        self.chunks.push(chunk);
        self.setup += t.elapsed();
    }

    /// A slot for a new key: a never-used one, or the LRU one (evicted).
    fn take_slot(&mut self, key: u64) -> (u32, bool) {
        let (s, evicted) = if self.used < self.capacity {
            self.used += 1;
            self.grow(self.used - 1);
            (self.used - 1, false)
        } else {
            let s = self.tail;
            self.unlink(s);
            let old = self.slots[s as usize];
            if old.live {
                self.map.remove(&old.key);
            }
            (s, old.live)
        };
        self.slots[s as usize].key = key;
        self.slots[s as usize].live = true;
        self.map.insert(key, s);
        self.push_front(s);
        (s, evicted)
    }
}

/// The sender's bounded LRU cache of previously sent pages (see the module docs).
pub struct DeltaCache {
    shards: Box<[Mutex<Shard>]>,
    page: usize,
    threshold: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    overflows: AtomicU64,
    evictions: AtomicU64,
    stored: AtomicU64,
    /// Nanoseconds spent allocating and first touching cache memory.
    setup: AtomicU64,
}

impl core::fmt::Debug for DeltaCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeltaCache")
            .field("page", &self.page)
            .field("threshold", &self.threshold)
            .field("shards", &self.shards.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl DeltaCache {
    /// Builds a cache: its slot table and index now, its page memory as it fills.
    ///
    /// # Errors
    /// [`CacheError`] when the threshold or size is out of range.
    pub fn new(config: DeltaConfig) -> Result<DeltaCache, CacheError> {
        let page = config.page_size.bytes();
        if config.threshold == 0 || config.threshold >= config.page_size.get() {
            return Err(CacheError::BadThreshold {
                threshold: config.threshold,
                page_size: config.page_size,
            });
        }
        if config.pages == 0 || config.pages > 1 << 31 || config.pages.checked_mul(page).is_none() {
            return Err(CacheError::BadSize {
                pages: config.pages,
            });
        }
        let shards = config.shards.clamp(1, config.pages);
        let base = config.pages / shards;
        let extra = config.pages % shards;
        let shards = (0..shards)
            .map(|i| Mutex::new(Shard::new((base + usize::from(i < extra)) as u32, page)))
            .collect();
        Ok(DeltaCache {
            shards,
            page,
            threshold: config.threshold as usize,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            setup: AtomicU64::new(0),
        })
    }

    /// The page size in bytes.
    pub fn page_bytes(&self) -> usize {
        self.page
    }

    /// The largest delta worth sending.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The time spent so far allocating cache memory and having the kernel back it
    /// (by any thread): a cost of the cache's first use, not of the codec whose frame
    /// filled it.
    pub fn setup_time(&self) -> Duration {
        Duration::from_nanos(self.setup.load(Ordering::Relaxed))
    }

    /// `key`'s slot in `shard`, made the most recently used, and whether it was there
    /// already (a hit); otherwise a new or evicted slot (counted), its memory
    /// allocated if new.
    fn slot(&self, shard: &mut Shard, key: PageKey) -> (u32, bool) {
        if let Some(&s) = shard.map.get(&key.0) {
            shard.unlink(s);
            shard.push_front(s);
            return (s, true);
        }
        let (s, evicted) = shard.take_slot(key.0);
        if evicted {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.took_setup(shard);
        (s, false)
    }

    /// Takes shard's chunk allocation time into [`DeltaCache::setup_time`].
    fn took_setup(&self, shard: &mut Shard) {
        let t = std::mem::take(&mut shard.setup);
        if !t.is_zero() {
            let ns = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
            self.setup.fetch_add(ns, Ordering::Relaxed);
        }
    }

    fn shard(&self, key: PageKey) -> std::sync::MutexGuard<'_, Shard> {
        // Consecutive keys (the pages of a run) go round-robin over the shards, so a
        // contiguous working set fills every shard evenly.
        let i = ((key.0 ^ (key.0 >> 40)) % self.shards.len() as u64) as usize;
        // A panic while a shard was locked leaves it consistent (no update is
        // half-done across an unwinding point: the delta encoder has no panicking
        // path, its indices being in bounds by construction), so a poisoned lock is
        // still usable.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encodes `page` as a delta of at most `threshold` bytes against the cached
    /// version into `out` (at least one page long), and stores it as the new cached
    /// version; see [`DeltaCache::encode_raw`].
    #[cfg(test)]
    pub(crate) fn encode(&self, key: PageKey, page: &[u8], out: &mut [u8]) -> DeltaOutcome {
        assert_eq!(page.len(), self.page);
        // SAFETY: `page` is a live slice of one page, which `out`, an exclusive borrow,
        // cannot overlap, nor can the cache's own memory.
        unsafe { self.encode_raw(key, page.as_ptr(), out) }
    }

    /// Encodes the page at `src` as a delta of at most `threshold` bytes against the
    /// cached version into `out` (at least one page long), and stores the page as the
    /// new cached version. When the page must go raw (a miss, or a delta over the
    /// threshold), it is copied into `out[..page_bytes]` and [`DeltaOutcome::Raw`] is
    /// returned.
    ///
    /// On a hit the one-pass delta encoder reads the page in place and writes the
    /// lanes that changed over the old version; on a miss one raw-pointer `memcpy`
    /// copies it into the cache. What the cache then holds is exactly what
    /// was encoded, even if the page was written meanwhile.
    ///
    /// # Safety
    /// `src .. src + page_bytes` must be readable for the call and must not overlap
    /// `out` (guest memory behind a [`PageList`](crate::PageList) run qualifies: see
    /// [`crate::pages`], "Guest memory").
    pub(crate) unsafe fn encode_raw(
        &self,
        key: PageKey,
        src: *const u8,
        out: &mut [u8],
    ) -> DeltaOutcome {
        let mut guard = self.shard(key);
        let shard = &mut *guard;
        let ps = self.page;
        let (s, hit) = self.slot(shard, key);
        if !hit {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        let version = shard.version(s);
        if !hit {
            // SAFETY: `src` is readable for a page (this function's contract) and
            // `version`, the cache's own memory, is an exclusive borrow of one page.
            unsafe { core::ptr::copy_nonoverlapping(src, version.as_mut_ptr(), ps) };
            return raw_page(out, version);
        }
        let limit = self.threshold.min(ps - 1).min(out.len());
        // SAFETY: `src` is readable for a page and overlaps neither `out` (this
        // function's contract) nor the cache's memory.
        match unsafe { super::codec::delta::encode_over(version, src, &mut out[..limit]) } {
            Some(n) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                DeltaOutcome::Delta(n)
            }
            None => {
                self.overflows.fetch_add(1, Ordering::Relaxed);
                raw_page(out, version)
            }
        }
    }

    /// Keeps `page` (one page long) as the version of `key` the destination will hold:
    /// what a frame of another codec sent for it
    /// ([`EncodeParams::remember`](crate::EncodeParams::remember)), so its next
    /// version may go as a delta against it. A page of another length is forgotten.
    pub(crate) fn store(&self, key: PageKey, page: &[u8]) {
        if page.len() != self.page {
            self.invalidate(key);
            return;
        }
        let mut guard = self.shard(key);
        let shard = &mut *guard;
        let (s, _) = self.slot(shard, key);
        shard.version(s).copy_from_slice(page);
        self.stored.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets a page, so its next version goes without delta.
    pub fn invalidate(&self, key: PageKey) {
        let mut shard = self.shard(key);
        if let Some(s) = shard.map.remove(&key.0) {
            shard.unlink(s);
            // Move the freed slot to the LRU end so it is reused first; it is no
            // longer live, so reusing it evicts nothing.
            let tail = shard.tail;
            shard.slots[s as usize].live = false;
            shard.slots[s as usize].prev = tail;
            shard.slots[s as usize].next = NIL;
            if tail == NIL {
                shard.head = s;
            } else {
                shard.slots[tail as usize].next = s;
            }
            shard.tail = s;
        }
    }

    /// Forgets every page.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.map.clear();
            shard.head = NIL;
            shard.tail = NIL;
            shard.used = 0;
        }
    }

    /// Whether the cache holds a version of the page.
    pub fn contains(&self, key: PageKey) -> bool {
        self.shard(key).map.contains_key(&key.0)
    }

    /// The counters so far.
    pub fn stats(&self) -> DeltaStats {
        let resident = self
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len() as u64)
            .sum();
        DeltaStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            overflows: self.overflows.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            resident,
        }
    }
}

/// `snap` copied into the start of `out` (at least a page long): the page goes raw.
fn raw_page(out: &mut [u8], snap: &[u8]) -> DeltaOutcome {
    debug_assert!(out.len() >= snap.len());
    if let Some(o) = out.get_mut(..snap.len()) {
        o.copy_from_slice(snap);
    }
    DeltaOutcome::Raw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(pages: usize, shards: usize) -> DeltaCache {
        let mut config = DeltaConfig::new(PageSize::KIB4, pages);
        config.shards = shards;
        DeltaCache::new(config).unwrap()
    }

    /// Memory comes in chunks as slots are first used (the last chunk holds the
    /// rest), every slot keeps its own page across the chunk boundary, and the
    /// allocation time is counted.
    #[test]
    fn chunks_are_allocated_as_slots_are_first_used() {
        const CHUNK: usize = CHUNK_BYTES / 4096;
        let n = CHUNK + 44;
        let c = cache(n, 1);
        let chunks = |c: &DeltaCache| {
            let s = c.shards[0].lock().unwrap();
            s.chunks.iter().map(|b| b.len() / 4096).collect::<Vec<_>>()
        };
        assert_eq!(chunks(&c), Vec::<usize>::new());
        let page = |k: usize| vec![(k % 251) as u8 + 1; 4096];
        c.store(PageKey(0), &page(0));
        assert_eq!(chunks(&c), [CHUNK]);
        assert!(!c.setup_time().is_zero());
        for k in 1..n {
            c.store(PageKey(k as u64), &page(k));
        }
        assert_eq!(chunks(&c), [CHUNK, 44]);
        {
            let mut shard = c.shards[0].lock().unwrap();
            for k in 0..n {
                let s = shard.map[&(k as u64)];
                assert_eq!(shard.version(s), &page(k)[..], "page {k}");
            }
        }
        // Across the chunk boundary, through the encoder too.
        let mut out = vec![0u8; 4096];
        for k in [0, CHUNK - 1, CHUNK, n - 1] {
            let outcome = c.encode(PageKey(k as u64), &page(k), &mut out);
            assert_eq!(outcome, DeltaOutcome::Delta(0), "page {k}");
        }
        // Full: a new page evicts, and no chunk is added.
        c.store(PageKey(n as u64), &page(n));
        assert_eq!(chunks(&c), [CHUNK, 44]);
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(c.stats().stored, n as u64 + 1);
        // Pages larger than a chunk come one a chunk.
        let big = PageSize::new(2 << 20).unwrap();
        let mut config = DeltaConfig::new(big, 3);
        config.shards = 1;
        let c = DeltaCache::new(config).unwrap();
        c.store(PageKey(1), &vec![9u8; 2 << 20]);
        assert_eq!(c.shards[0].lock().unwrap().chunks.len(), 1);
        assert_eq!(c.shards[0].lock().unwrap().chunks[0].len(), 2 << 20);
    }

    #[test]
    fn miss_then_hit_then_overflow() {
        let c = cache(4, 1);
        let mut out = vec![0u8; 4096];
        let mut page = vec![0u8; 4096];
        assert_eq!(c.encode(PageKey(1), &page, &mut out), DeltaOutcome::Raw);
        assert_eq!(
            c.encode(PageKey(1), &page, &mut out),
            DeltaOutcome::Delta(0)
        );
        page[10] = 1;
        assert_eq!(
            c.encode(PageKey(1), &page, &mut out),
            DeltaOutcome::Delta(3)
        );
        assert_eq!(&out[..3], &[10, 1, 1]);
        page.iter_mut().for_each(|b| *b = 0x55);
        assert_eq!(c.encode(PageKey(1), &page, &mut out), DeltaOutcome::Raw);
        // The overflowed version is now the cached one.
        assert_eq!(
            c.encode(PageKey(1), &page, &mut out),
            DeltaOutcome::Delta(0)
        );
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.overflows, s.evictions, s.resident),
            (3, 1, 1, 0, 1)
        );
    }

    /// Each delta is against exactly the previous version, which a hit updates in
    /// place, and a raw page comes back in `out`.
    #[test]
    fn successive_versions_delta_against_the_last_one() {
        let c = cache(2, 1);
        let mut out = vec![0u8; 4096];
        let mut page: Vec<u8> = (0..4096).map(|i| (i % 13) as u8).collect();
        assert_eq!(c.encode(PageKey(7), &page, &mut out), DeltaOutcome::Raw);
        assert_eq!(out, page, "a miss returns the page read as the raw page");
        let mut dest = page.clone();
        for v in 1..6u8 {
            page[usize::from(v) * 100] = v;
            page[4000] = v;
            let n = match c.encode(PageKey(7), &page, &mut out) {
                DeltaOutcome::Delta(n) => n,
                DeltaOutcome::Raw => panic!("version {v} went raw"),
            };
            crate::codec::delta::apply(&out[..n], &mut dest).unwrap();
            assert_eq!(dest, page, "version {v}");
        }
        page.iter_mut().for_each(|b| *b = b.wrapping_mul(7) ^ 0x5a);
        assert_eq!(c.encode(PageKey(7), &page, &mut out), DeltaOutcome::Raw);
        assert_eq!(
            out, page,
            "an overflow returns the page read as the raw page"
        );
        assert_eq!(
            c.encode(PageKey(7), &page, &mut out),
            DeltaOutcome::Delta(0)
        );
    }

    #[test]
    fn least_recently_used_is_evicted() {
        let c = cache(2, 1);
        let mut out = vec![0u8; 4096];
        let page = vec![0u8; 4096];
        c.encode(PageKey(1), &page, &mut out);
        c.encode(PageKey(2), &page, &mut out);
        c.encode(PageKey(1), &page, &mut out); // 1 is now the most recent
        c.encode(PageKey(3), &page, &mut out); // evicts 2
        assert!(c.contains(PageKey(1)));
        assert!(!c.contains(PageKey(2)));
        assert!(c.contains(PageKey(3)));
        assert_eq!(c.stats().evictions, 1);
        c.invalidate(PageKey(1));
        assert!(!c.contains(PageKey(1)));
        c.encode(PageKey(4), &page, &mut out); // reuses 1's slot: no eviction
        assert!(c.contains(PageKey(3)) && c.contains(PageKey(4)));
        assert_eq!(c.stats().evictions, 1);
        c.clear();
        assert_eq!(c.stats().resident, 0);
        assert_eq!(c.encode(PageKey(3), &page, &mut out), DeltaOutcome::Raw);
    }

    #[test]
    fn many_keys_over_shards_stay_bounded() {
        let c = cache(64, 8);
        let mut out = vec![0u8; 4096];
        let page = vec![3u8; 4096];
        for k in 0..1000u64 {
            c.encode(PageKey(k), &page, &mut out);
        }
        let s = c.stats();
        assert!(s.resident <= 64);
        assert_eq!(s.misses, 1000);
        assert_eq!(s.evictions, 1000 - s.resident);
    }

    #[test]
    fn a_contiguous_working_set_of_cache_size_fits() {
        let c = cache(256, 16);
        let mut out = vec![0u8; 4096];
        let page = vec![3u8; 4096];
        for k in 0..256u64 {
            c.encode(PageKey(k), &page, &mut out);
        }
        for k in 0..256u64 {
            assert_eq!(
                c.encode(PageKey(k), &page, &mut out),
                DeltaOutcome::Delta(0)
            );
        }
        assert_eq!(c.stats().evictions, 0);
    }

    #[test]
    fn bad_configs_are_refused() {
        let mut config = DeltaConfig::new(PageSize::KIB4, 0);
        assert!(matches!(
            DeltaCache::new(config),
            Err(CacheError::BadSize { .. })
        ));
        config.pages = 1;
        config.threshold = 4096;
        assert!(matches!(
            DeltaCache::new(config),
            Err(CacheError::BadThreshold { .. })
        ));
    }
}
