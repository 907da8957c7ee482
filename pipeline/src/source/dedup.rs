//! Pages the source already sent, found again by their content: a data page equal to
//! one sent before, and unchanged on the destination since, travels as a COPY
//! reference to it instead of its bytes (PROTOCOL.md, COPY).
//!
//! **Content is compared by a keyed hash**, AES-128 of the page's POLYVAL under 32
//! bytes drawn for each source and never sent, 128 bits (`pagehash.rs`). The guest
//! writes the pages, so it could make two different pages collide under a known hash
//! function; under this one, whose key it never sees, any two different pages collide
//! for at most 257 of the 2^128 POLYVAL keys.
//!
//! **The hash is of the bytes that travel**, never of live guest memory: the worker
//! copies a frame's data pages into a buffer ([`Dedup::buffer`]), hashes them there and
//! has the codec encode that buffer. A guest write between the hash and the encode
//! therefore cannot leave the table claiming content the destination does not hold (the
//! write re-dirties the page, which is sent again, but a page already sent as a copy of
//! it would not be).
//!
//! **One table for every channel** ([`DedupTable`]), so a page finds its twin whichever
//! channel carried it. A page enters the table when its frame is handed to its channel
//! ([`Table::insert`]). It leaves it when a round that sends it again starts
//! ([`DedupTable::forget_dirty`], before any channel of that round looks anything up)
//! and when a frame carrying it is built ([`Table::forget`]). So while a round runs,
//! every page in the table holds, on the destination once the round's frames are
//! applied, the content it was entered with: either it is not sent in this round, or
//! its frame of this round was already handed to its channel and it is not sent again.
//! Pages that went as copies are never entered, so no page is both a copy's target and
//! a copy's source within a round.
//!
//! - A source page on the **same channel** as the target goes in an ordinary COPY: its
//!   frame is on the channel before the COPY (COPY frames go to the channel as they are
//!   built), and the destination applies a channel's frames in order.
//! - A source page on **another channel** goes in a `ROUND_END` COPY, which the
//!   destination applies once every channel has ended the round, when every PAGES frame
//!   of the round is applied. The next round, which may send its source again, starts
//!   only once every channel's ACK ROUND arrived ([`super::Source::send_round`]), and
//!   the destination acknowledges a round only after applying its copies.
//!
//! **Memory**: 4 bytes per guest page (where each page's entry is), and a table of
//! 16-byte entries, as many as the guest's pages rounded up to a power of two and at
//! most [`MAX_ENTRIES`] (64 MiB), in buckets of two chosen by the hash's low bits. A
//! new entry goes first in its bucket, the one there moves second and the second is
//! dropped: the table forgets, it never answers wrong. An entry keeps bits 32 to 127 of
//! the hash and the page's position among all the guest's pages in 32 bits, so a
//! lookup matches at least 105 bits of the keyed hash with the bucket (a table has at
//! least 2^10 entries); pages beyond the guest's first 2^32 - 1 (16 TiB of 4 KiB pages)
//! are never entered. The table's pages are first written during the migration, and
//! on this machine's virtual memory a first write costs about 48 µs a page: the 32 MiB
//! of a 2 GiB guest's table when entries were 32 bytes, twice the pages, one a slot,
//! were 14 % of the source's CPU under zstd:1; these 8 MiB keep more pages findable
//! (BENCHMARKS.md, "Dedup: 16-byte entries, two a bucket").

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::sys::mman::{MmapAdvise, madvise};

use pagewire_protocol::RegionId;

use crate::dirty::DirtyBitmap;
use crate::memory::GuestMemory;
use crate::plan::Affinity;

pub(crate) use super::pagehash::PageHash;
use super::pagehash::PageHasher;

/// Most entries of the table (64 MiB).
pub(crate) const MAX_ENTRIES: usize = 1 << 22;

/// The smallest page the kernel maps.
const PAGE: usize = 4096;

#[derive(Clone, Copy, Default)]
struct Entry {
    /// Bits 32 to 127 of the page's hash (the bucket stands for the low bits).
    tag: (u64, u32),
    /// The page's position among the guest's pages + 1 ([`Slots::base`]); 0: empty.
    at: u32,
}

/// An [`Entry`] as the table stores it: plain words, so that a table of empty entries
/// is a zeroed allocation that the kernel maps as pages are first used, not 16 bytes
/// written per entry before the migration starts (tens of milliseconds at 2 GiB).
type Stored = [u64; 2];

impl Entry {
    fn of(hash: PageHash, at: u32) -> Entry {
        Entry {
            tag: ((hash.0 >> 64) as u64, (hash.0 >> 32) as u32),
            at,
        }
    }

    fn load(w: Stored) -> Entry {
        Entry {
            tag: (w[0], (w[1] >> 32) as u32),
            at: w[1] as u32,
        }
    }

    fn store(self) -> Stored {
        [
            self.tag.0,
            (u64::from(self.tag.1) << 32) | u64::from(self.at),
        ]
    }
}

/// Where each page of one region has its entry.
struct Slots {
    region: RegionId,
    /// The position of the region's first page among the guest's pages.
    base: u32,
    /// Entry index + 1 per page (0: none).
    at: Vec<u32>,
}

/// The pages sent, by content: entries and where each page's entry is.
pub(crate) struct Table {
    entries: Vec<Stored>,
    slots: Vec<Slots>,
}

/// The source's table of pages sent, by content, shared by its channels.
pub(crate) struct DedupTable {
    hasher: PageHasher,
    affinity: Affinity,
    table: Mutex<Table>,
    /// Where the table's entries are (their allocation never moves) and how long, and
    /// one bit per [`PREPARE_CHUNK`] of them already backed (see
    /// [`DedupTable::prepare`]).
    entries_at: usize,
    entries_bytes: usize,
    backed: Vec<AtomicU64>,
}

/// The bytes of entries [`DedupTable::prepare`] backs at a time: a page. With 64 KiB,
/// the few frames a raw migration explores compressors on backed 16 pages for each of
/// their hashes, most of the table: 0.39 s of a 1.3 s migration's CPU at 10 Gbit/s on
/// this machine, where a page's first write takes about 48 µs.
const PREPARE_CHUNK: usize = PAGE;

impl std::fmt::Debug for DedupTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("DedupTable")
            .field("affinity", &self.affinity)
            .finish_non_exhaustive()
    }
}

impl DedupTable {
    /// An empty table for `memory`, with a fresh random key.
    ///
    /// # Errors
    /// The system's random source failed.
    pub(crate) fn new(memory: &GuestMemory, affinity: Affinity) -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        let mut pages = 0u64;
        // Positions + 1 fit an entry's 32 bits: each region takes at most the room
        // left below 2^32 - 1 pages (so `pages` never passes `u32::MAX`); pages past
        // it have no slot and are never entered.
        let slots = memory
            .region_ids()
            .map(|region| {
                let base = u32::try_from(pages).unwrap_or(u32::MAX);
                let n = memory
                    .pages(region)
                    .unwrap_or(0)
                    .min(u64::from(u32::MAX - base));
                pages += n;
                Slots {
                    region,
                    base,
                    at: vec![0; usize::try_from(n).unwrap_or(0)],
                }
            })
            .collect();
        let want = usize::try_from(pages).unwrap_or(MAX_ENTRIES);
        let len = want.next_power_of_two().clamp(1024, MAX_ENTRIES);
        let entries: Vec<Stored> = vec![[0; 2]; len];
        let (entries_at, entries_bytes) = (entries.as_ptr() as usize, size_of_val(&entries[..]));
        // Chunks of whole pages from the one holding the first entry (see `prepare`).
        let chunks = (entries_bytes + PAGE).div_ceil(PREPARE_CHUNK);
        Ok(DedupTable {
            hasher: PageHasher::new(key),
            affinity,
            table: Mutex::new(Table { entries, slots }),
            entries_at,
            entries_bytes,
            backed: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    /// The keyed hash of one page's bytes.
    #[cfg(test)]
    pub(crate) fn hash(&self, page: &[u8]) -> PageHash {
        self.hasher.hash(page)
    }

    /// The keyed hash of each `page_size` piece of `pages`, in order (see
    /// `pagehash.rs`).
    pub(crate) fn hash_pages(&self, pages: &[u8], page_size: usize) -> Vec<PageHash> {
        let mut out = Vec::with_capacity(pages.len() / page_size.max(1) + 1);
        self.hasher.hash_pages(pages, page_size, &mut out);
        out
    }

    /// The channel that carries `page` of `region`.
    pub(crate) fn channel(&self, region: RegionId, page: u64) -> u16 {
        self.affinity.channel(region, page)
    }

    /// Has the kernel back the entries `hashes` land on, before the table is locked:
    /// the table is a zeroed allocation mapped as it is first written, and a page
    /// fault taken with the lock held holds up every channel. On this machine's
    /// virtual memory a first write to a page took about 48 µs; the first 800 ms of a
    /// 2 GiB migration spent 0.39 s of its channel threads in such faults under the
    /// lock, the other channel waiting meanwhile. A page is backed once (one
    /// `MADV_POPULATE_WRITE`, which changes no contents); after that this is one
    /// atomic load per hash. Returns how many pages it backed (a one-time cost
    /// of the table's, not of the frame's codec).
    pub(crate) fn prepare(&self, hashes: &[PageHash]) -> usize {
        let mut backed = 0;
        // Chunks of whole pages, from the page holding the first entry.
        let base = self.entries_at / PAGE * PAGE;
        let end = (self.entries_at + self.entries_bytes).next_multiple_of(PAGE);
        // A bucket's first and last byte: the allocation is only 8-byte aligned, so
        // a bucket may straddle two pages.
        let last = WAYS * size_of::<Stored>() - 1;
        let ends = hashes.iter().flat_map(|h| {
            let at = self.entry_addr(*h);
            [at, at + last]
        });
        for at in ends {
            let chunk = (at - base) / PREPARE_CHUNK;
            let (word, bit) = (&self.backed[chunk / 64], 1u64 << (chunk % 64));
            if word.load(Ordering::Relaxed) & bit != 0 {
                continue;
            }
            word.fetch_or(bit, Ordering::Relaxed);
            backed += 1;
            let from = base + chunk * PREPARE_CHUNK;
            let to = (from + PREPARE_CHUNK).min(end);
            if let Some(ptr) = NonNull::new(from as *mut c_void) {
                // SAFETY: the pages hold the entries, whose allocation lives as long as
                // `self` and never moves (its first and last page may hold the
                // allocator's bytes too); POPULATE_WRITE only has the kernel back
                // them, it reads or writes no byte of any (no data race with the lock
                // holder's accesses).
                let _ = unsafe { madvise(ptr, to - from, MmapAdvise::MADV_POPULATE_WRITE) };
            }
        }
        backed
    }

    /// The address of the bucket `h` lands on (its two entries share a page).
    fn entry_addr(&self, h: PageHash) -> usize {
        let len = self.entries_bytes / size_of::<Stored>();
        self.entries_at + bucket_of(h, len) * size_of::<Stored>()
    }

    /// The table, for a frame's lookups or entries at once.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Table> {
        // The table holds no invariant a panic elsewhere could break halfway: a
        // poisoned lock still holds entries that never answer wrong.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every page of a round about to start: whatever the destination holds
    /// for them may change in it. Called before any channel of the round looks up.
    pub(crate) fn forget_dirty(&self, dirty: &[(RegionId, DirtyBitmap)]) {
        let mut t = self.lock();
        for (region, bits) in dirty {
            for (start, count) in bits.runs() {
                for p in start..start + count {
                    t.forget(*region, p);
                }
            }
        }
    }
}

impl Table {
    /// A page of `region` holding `hash` on the destination, if one is known.
    pub(crate) fn find(&self, region: RegionId, hash: PageHash) -> Option<u64> {
        let e = Entry::load(self.entries[self.matching(hash)?]);
        let (s, l) = self.position(e.at - 1)?;
        (self.slots[s].region == region).then_some(l as u64)
    }

    /// The entry of `hash`'s bucket that holds it, if one does.
    fn matching(&self, hash: PageHash) -> Option<usize> {
        let b = self.bucket(hash);
        let tag = Entry::of(hash, 0).tag;
        (b..b + WAYS).find(|&i| {
            let e = Entry::load(self.entries[i]);
            e.at != 0 && e.tag == tag
        })
    }

    /// Records that the frame carrying `page` with content `hash` went to its channel.
    pub(crate) fn insert(&mut self, region: RegionId, page: u64, hash: PageHash) {
        let Some((s, l)) = self.slot(region, page) else {
            return;
        };
        self.forget_at(s, l);
        // Another page with this content gives its entry up: one entry a content.
        if let Some(i) = self.matching(hash) {
            self.drop_entry(i);
        }
        let b = self.bucket(hash);
        // The first entry moves second (dropping what was there), unless it is empty.
        if Entry::load(self.entries[b]).at != 0 {
            self.drop_entry(b + 1);
            self.move_entry(b, b + 1);
        }
        // `slot` keeps `base + l` below `u32::MAX`.
        let at = self.slots[s].base + l as u32 + 1;
        self.entries[b] = Entry::of(hash, at).store();
        // `b` is below `entries.len() <= MAX_ENTRIES`.
        self.slots[s].at[l] = b as u32 + 1;
    }

    /// Empties entry `i`, and its page's record of it.
    fn drop_entry(&mut self, i: usize) {
        let e = Entry::load(std::mem::take(&mut self.entries[i]));
        if e.at != 0
            && let Some((s, l)) = self.position(e.at - 1)
        {
            self.slots[s].at[l] = 0;
        }
    }

    /// Moves entry `from` to the empty entry `to`, and its page's record of it.
    fn move_entry(&mut self, from: usize, to: usize) {
        let e = Entry::load(std::mem::take(&mut self.entries[from]));
        self.entries[to] = e.store();
        if e.at != 0
            && let Some((s, l)) = self.position(e.at - 1)
        {
            // `to` is below `entries.len() <= MAX_ENTRIES`.
            self.slots[s].at[l] = to as u32 + 1;
        }
    }

    /// Forgets what `page` holds: it is about to change.
    pub(crate) fn forget(&mut self, region: RegionId, page: u64) {
        if let Some((s, l)) = self.slot(region, page) {
            self.forget_at(s, l);
        }
    }

    fn forget_at(&mut self, s: usize, l: usize) {
        let at = std::mem::take(&mut self.slots[s].at[l]);
        if at != 0 {
            self.entries[at as usize - 1] = [0; 2];
        }
    }

    /// The first entry of `hash`'s bucket.
    fn bucket(&self, hash: PageHash) -> usize {
        bucket_of(hash, self.entries.len())
    }

    /// The slot list and index of `page` of `region`; `None` outside the regions.
    fn slot(&self, region: RegionId, page: u64) -> Option<(usize, usize)> {
        let s = self.slots.iter().position(|s| s.region == region)?;
        let l = usize::try_from(page).ok()?;
        (l < self.slots[s].at.len()).then_some((s, l))
    }

    /// The slot list and index of the page at `pos` among the guest's pages.
    fn position(&self, pos: u32) -> Option<(usize, usize)> {
        self.slots.iter().enumerate().find_map(|(s, slots)| {
            let l = pos.checked_sub(slots.base)? as usize;
            (l < slots.at.len()).then_some((s, l))
        })
    }
}

/// Entries a bucket.
const WAYS: usize = 2;

/// The first entry of the bucket `hash` lands on in a table of `len` entries (a power
/// of two, at least [`WAYS`]).
fn bucket_of(hash: PageHash, len: usize) -> usize {
    ((hash.0 as usize) & (len / WAYS - 1)) * WAYS
}

/// One channel's side of dedup: the shared table and the buffers of its frames.
pub(crate) struct Dedup {
    pub(crate) table: Arc<DedupTable>,
    /// Buffers of frames given back, kept for the next ones.
    pool: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl Dedup {
    /// A channel's side of `table`.
    pub(crate) fn new(table: Arc<DedupTable>) -> Self {
        Dedup {
            table,
            pool: Vec::new(),
        }
    }

    /// Whether a buffer given back is there for [`Dedup::buffer`] (else it allocates
    /// one, whose pages are first written then).
    pub(crate) fn has_spare(&self) -> bool {
        !self.pool.is_empty()
    }

    /// A buffer of `len` bytes for a frame's pages (contents unspecified), from those
    /// given back when there is one.
    pub(crate) fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.pool.pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    /// Gives a frame's buffer back once its job is done.
    pub(crate) fn give_back(&mut self, b: Vec<u8>) {
        if self.pool.len() < 64 {
            self.pool.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_protocol::{GuestAddr, MemoryLayout, RegionDesc};

    fn memory(pages: u64) -> GuestMemory {
        let layout = MemoryLayout::new(
            4096,
            [
                RegionDesc {
                    id: RegionId(0),
                    backing_page_size: 4096,
                    guest_addr: GuestAddr(0),
                    length: pages * 4096,
                },
                RegionDesc {
                    id: RegionId(7),
                    backing_page_size: 4096,
                    guest_addr: GuestAddr(pages * 4096),
                    length: pages * 4096,
                },
            ],
        )
        .unwrap();
        GuestMemory::anonymous(&layout).unwrap()
    }

    const AFF: Affinity = Affinity {
        channels: 2,
        chunk_pages: 4,
    };

    fn table(pages: u64) -> DedupTable {
        DedupTable::new(&memory(pages), AFF).unwrap()
    }

    #[test]
    fn a_page_sent_is_found_by_its_content_and_forgotten_when_it_changes() {
        let d = table(64);
        let mut t = d.lock();
        let r = RegionId(0);
        let (a, b) = (3, 9);
        let h = d.hash(&[7u8; 4096]);
        assert_eq!(t.find(r, h), None);
        t.insert(r, a, h);
        assert_eq!(t.find(r, h), Some(a));
        // Not in another region, and not by other content.
        assert_eq!(t.find(RegionId(7), h), None);
        assert_eq!(t.find(r, d.hash(&[8u8; 4096])), None);
        // The page changes: forgotten.
        t.forget(r, a);
        assert_eq!(t.find(r, h), None);
        // Inserted again under other content: the old content is gone.
        t.insert(r, a, h);
        t.insert(r, a, d.hash(&[9u8; 4096]));
        assert_eq!(t.find(r, h), None);
        // Another page with the same content takes its place.
        t.insert(r, b, h);
        assert_eq!(t.find(r, h), Some(b));
    }

    /// Whether the page holding `addr` is backed (mincore).
    fn resident(addr: usize) -> bool {
        let page = addr / PAGE * PAGE;
        let mut v = [0u8; 1];
        // SAFETY: `page` is inside a live allocation of the test's table and `v` holds
        // the one byte mincore writes for one page.
        let rc = unsafe { nix::libc::mincore(page as *mut c_void, PAGE, v.as_mut_ptr()) };
        assert_eq!(rc, 0);
        v[0] & 1 == 1
    }

    #[test]
    fn preparing_backs_the_entries_a_frame_lands_on_before_the_lock_and_changes_nothing() {
        // 2^21 guest pages: a table of 32 MiB, beyond any heap reuse, so its pages are
        // mapped only as they are first written.
        let d = table(1 << 20);
        let r = RegionId(0);
        let h = d.hash(&[7u8; 4096]);
        let at = |h: PageHash| d.entry_addr(h);
        // The pages a bucket spans: one, or two where it straddles a page boundary.
        let span = |h: PageHash| {
            let last = at(h) + WAYS * size_of::<Stored>() - 1;
            1 + usize::from(last / PAGE != at(h) / PAGE)
        };
        // Content whose entry is in a chunk well away from `h`'s (the key is random).
        let far = (8..=255u8)
            .map(|b| d.hash(&[b; 4096]))
            .find(|&f| at(h).abs_diff(at(f)) > 2 * PREPARE_CHUNK)
            .expect("one of 248 contents lands away from one chunk");
        // An allocator that writes what it zeroes (ThreadSanitizer's `calloc`, under
        // `.ci/tsan`, which sets TSAN_OPTIONS) leaves nothing to observe; the
        // contents are still checked. glibc's does not.
        let observable = !resident(at(h)) && !resident(at(far));
        if !observable {
            assert!(
                std::env::var_os("TSAN_OPTIONS").is_some(),
                "the table's pages were backed before any write"
            );
            eprintln!("the table's pages were backed before any write: not checking backing");
        }
        assert_eq!(d.prepare(&[h]), span(h), "the bucket's chunks backed");
        if observable {
            assert!(resident(at(h)), "the entry's page is backed");
            assert!(!resident(at(far)), "only the chunks the hashes land on");
        }
        // Once backed, a chunk is not advised again.
        let chunk = (at(h) - d.entries_at / PAGE * PAGE) / PREPARE_CHUNK;
        assert_ne!(
            d.backed[chunk / 64].load(Ordering::Relaxed) & (1 << (chunk % 64)),
            0
        );
        // Nothing changed: the table still answers as before.
        let mut t = d.lock();
        assert_eq!(t.find(r, h), None);
        t.insert(r, 5, h);
        drop(t);
        assert_eq!(
            d.prepare(&[h, far]),
            span(far),
            "only the chunks not backed before"
        );
        assert_eq!(d.lock().find(r, h), Some(5));
        assert!(resident(at(far)));
    }

    #[test]
    fn pages_of_every_channel_are_found_and_a_round_forgets_the_pages_it_sends() {
        let d = table(64);
        let r = RegionId(7);
        // Pages 0..4 are one channel's, 4..8 the other's.
        assert_ne!(d.channel(r, 1), d.channel(r, 5));
        // Three contents in three different buckets of the table.
        let mut hs: Vec<PageHash> = Vec::new();
        for b in 0..=255u8 {
            let h = d.hash(&[b; 4096]);
            let t = d.lock();
            if hs.iter().all(|o| t.bucket(*o) != t.bucket(h)) {
                hs.push(h);
            }
            if hs.len() == 3 {
                break;
            }
        }
        let [h1, h5, h9] = hs[..] else {
            panic!("no three slots")
        };
        {
            let mut t = d.lock();
            t.insert(r, 1, h1);
            t.insert(r, 5, h5);
            t.insert(r, 9, h9);
            // The same content in another region takes the entry: one entry a content.
            t.insert(RegionId(0), 5, h9);
        }
        let dirty = DirtyBitmap::new(64);
        dirty.set(5);
        dirty.set(9);
        d.forget_dirty(&[(r, dirty)]);
        let t = d.lock();
        assert_eq!(t.find(r, h1), Some(1));
        assert_eq!(t.find(r, h5), None);
        assert_eq!(t.find(r, h9), None);
        // Only that region's pages.
        assert_eq!(t.find(RegionId(0), h9), Some(5));
    }

    #[test]
    fn pages_outside_the_regions_are_never_entered() {
        let d = table(64);
        let mut t = d.lock();
        let h = d.hash(&[1u8; 4096]);
        t.insert(RegionId(7), 64, h);
        t.insert(RegionId(7), 1 << 40, h);
        t.insert(RegionId(3), 0, h);
        assert_eq!(t.find(RegionId(7), h), None);
        assert_eq!(t.find(RegionId(3), h), None);
    }

    #[test]
    fn an_entry_replaced_in_its_bucket_is_forgotten_not_misattributed() {
        let d = table(4096);
        let mut t = d.lock();
        let r = RegionId(0);
        // More contents than entries: later ones replace earlier ones.
        let n = t.entries.len() * 2;
        let mut kept = Vec::new();
        for (i, p) in (0..4096u64).cycle().take(n).enumerate() {
            let h = d.hash(&(i as u64).to_le_bytes().repeat(512));
            t.insert(r, p, h);
            kept.push((p, h));
        }
        // Every answer names the page last inserted with that content, and that page
        // was not changed since.
        let mut last = std::collections::HashMap::new();
        for &(p, h) in &kept {
            last.insert(p, h);
        }
        for &(_, h) in &kept {
            if let Some(p) = t.find(r, h) {
                assert_eq!(last[&p], h);
            }
        }
    }

    #[test]
    fn an_entry_matches_on_its_bucket_and_every_stored_bit_of_the_hash() {
        let d = table(64);
        let mut t = d.lock();
        let r = RegionId(7);
        let h = PageHash(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        t.insert(r, 63, h);
        assert_eq!(t.find(r, h), Some(63));
        // The same bucket, a hash differing in any one stored bit: not found.
        for bit in 32..128 {
            assert_eq!(t.find(r, PageHash(h.0 ^ (1 << bit))), None, "bit {bit}");
        }
        // Another bucket.
        assert_eq!(t.find(r, PageHash(h.0 ^ 1)), None);
        // The last page of the second region is told apart from the first region's.
        assert_eq!(t.find(RegionId(0), h), None);
        t.insert(RegionId(0), 63, h);
        assert_eq!(t.find(RegionId(0), h), Some(63));
        assert_eq!(t.find(r, h), None);
    }

    #[test]
    fn a_bucket_keeps_its_two_newest_contents_and_where_each_page_is() {
        let d = table(64);
        let mut t = d.lock();
        let r = RegionId(0);
        // Four contents in one bucket (the same low bits).
        let h = |k: u128| PageHash((k << 64) | 0x2a);
        assert!((1..=4).all(|k| t.bucket(h(k)) == t.bucket(h(1))));
        t.insert(r, 1, h(1));
        t.insert(r, 2, h(2));
        assert_eq!((t.find(r, h(1)), t.find(r, h(2))), (Some(1), Some(2)));
        // A third drops the oldest.
        t.insert(r, 3, h(3));
        assert_eq!(t.find(r, h(1)), None);
        assert_eq!((t.find(r, h(2)), t.find(r, h(3))), (Some(2), Some(3)));
        // Page 2 (moved to the second entry) changes: its entry, not page 3's, goes.
        t.forget(r, 2);
        assert_eq!((t.find(r, h(2)), t.find(r, h(3))), (None, Some(3)));
        // Page 3 moves to the second entry; forgetting it still finds its entry.
        t.insert(r, 4, h(4));
        t.forget(r, 3);
        assert_eq!((t.find(r, h(3)), t.find(r, h(4))), (None, Some(4)));
        // The same content again on another page: one entry, the newest page.
        t.insert(r, 5, h(4));
        assert_eq!(t.find(r, h(4)), Some(5));
        t.forget(r, 5);
        assert_eq!(t.find(r, h(4)), None);
        assert!(t.entries.iter().all(|e| Entry::load(*e).at == 0));
    }

    #[test]
    fn the_key_differs_between_tables() {
        let (a, b) = (table(8), table(8));
        let page = [3u8; 4096];
        assert_ne!(a.hash(&page), b.hash(&page));
        assert_eq!(a.hash(&page), a.hash(&page));
    }
}
