//! Pages this channel already sent, found again by their content: a data page equal to
//! one the channel sent before, and unchanged since, travels as a COPY reference to it
//! instead of its bytes (PROTOCOL.md, COPY).
//!
//! **Content is compared by a keyed hash**, BLAKE3 keyed with 32 bytes drawn for each
//! source and never sent, 128 bits of it kept. The guest writes the pages, so it could
//! make two different pages collide under a known hash function; under a key it never
//! sees it would have to find a BLAKE3 collision blind.
//!
//! **The hash is of the bytes that travel**, never of live guest memory: the worker
//! copies a frame's data pages into a buffer ([`Dedup::buffer`]), hashes them there and
//! has the codec encode that buffer. A guest write between the hash and the encode
//! therefore cannot leave the table claiming content the destination does not hold (the
//! write re-dirties the page, which is sent again, but a page already sent as a copy of
//! it would not be).
//!
//! **Ordering.** A page enters the table when its frame is handed to the channel
//! ([`Dedup::insert`]), and leaves it when a later frame carrying that page is built
//! ([`Dedup::forget`]), before anything of that frame is looked up. COPY frames go to the
//! channel as they are built. So a COPY names as sources only pages whose frames went on
//! the channel before it, and no frame that changes a source can be on the channel
//! between the two, whatever order the codec engine finishes its jobs in. Every page
//! of this table belongs to this channel, so the destination applies both in order.
//!
//! **Memory**: 4 bytes per guest page this channel carries (where each page's entry
//! is), and a table of 32-byte entries, twice the channel's pages rounded up to a power
//! of two and at most [`MAX_ENTRIES`]. A new entry replaces the one in its slot: the
//! table forgets, it never answers wrong.

use pagewire_protocol::RegionId;

use crate::memory::GuestMemory;
use crate::plan::Affinity;

/// Most entries of one channel's table (32 MiB).
pub(crate) const MAX_ENTRIES: usize = 1 << 20;

/// A keyed hash of a page's bytes (128 bits of BLAKE3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageHash(u128);

#[derive(Clone, Copy, Default)]
struct Entry {
    hash: u128,
    /// Page index + 1 in `region`; 0: empty.
    page: u64,
    region: u32,
}

/// Where each of this channel's pages of one region has its entry.
struct Slots {
    region: RegionId,
    /// Entry index + 1 per page of this channel (0: none), by [`Dedup::local`].
    at: Vec<u32>,
}

/// One channel's table of pages sent, by content.
pub(crate) struct Dedup {
    key: [u8; 32],
    entries: Vec<Entry>,
    slots: Vec<Slots>,
    affinity: Affinity,
    ch: u16,
    /// Buffers of frames given back, kept for the next ones.
    pool: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Dedup")
            .field("entries", &self.entries.len())
            .field("ch", &self.ch)
            .finish_non_exhaustive()
    }
}

impl Dedup {
    /// An empty table for channel `ch` of `memory`, with a fresh random key.
    ///
    /// # Errors
    /// The system's random source failed.
    pub(crate) fn new(
        memory: &GuestMemory,
        affinity: Affinity,
        ch: u16,
    ) -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        let n = u64::from(affinity.channels.max(1));
        let chunk = u64::from(affinity.chunk_pages.max(1));
        let mut pages = 0u64;
        let slots = memory
            .region_ids()
            .map(|region| {
                let chunks = memory.pages(region).unwrap_or(0).div_ceil(chunk);
                let mine = chunks.div_ceil(n) * chunk;
                pages += mine;
                Slots {
                    region,
                    at: vec![0; usize::try_from(mine).unwrap_or(0)],
                }
            })
            .collect();
        let want = usize::try_from(pages.saturating_mul(2)).unwrap_or(MAX_ENTRIES);
        let len = want.next_power_of_two().clamp(1024, MAX_ENTRIES);
        Ok(Dedup {
            key,
            entries: vec![Entry::default(); len],
            slots,
            affinity,
            ch,
            pool: Vec::new(),
        })
    }

    /// The keyed hash of one page's bytes.
    pub(crate) fn hash(&self, page: &[u8]) -> PageHash {
        let h = blake3::keyed_hash(&self.key, page);
        let mut b = [0u8; 16];
        b.copy_from_slice(&h.as_bytes()[..16]);
        PageHash(u128::from_le_bytes(b))
    }

    /// A page of this channel in `region` holding `hash` on the destination, if one is
    /// known.
    pub(crate) fn find(&self, region: RegionId, hash: PageHash) -> Option<u64> {
        let e = self.entries[self.index(hash)];
        (e.page != 0 && e.hash == hash.0 && e.region == region.0).then(|| e.page - 1)
    }

    /// Records that the frame carrying `page` with content `hash` went to the channel.
    pub(crate) fn insert(&mut self, region: RegionId, page: u64, hash: PageHash) {
        let Some((s, l)) = self.slot(region, page) else {
            return;
        };
        self.forget_at(s, l);
        let i = self.index(hash);
        let old = self.entries[i];
        if old.page != 0
            && let Some((os, ol)) = self.slot(RegionId(old.region), old.page - 1)
        {
            self.slots[os].at[ol] = 0;
        }
        self.entries[i] = Entry {
            hash: hash.0,
            page: page + 1,
            region: region.0,
        };
        // `index` is below `entries.len() <= MAX_ENTRIES`.
        self.slots[s].at[l] = i as u32 + 1;
    }

    /// Forgets what `page` holds: a frame that changes it is being built.
    pub(crate) fn forget(&mut self, region: RegionId, page: u64) {
        if let Some((s, l)) = self.slot(region, page) {
            self.forget_at(s, l);
        }
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

    fn forget_at(&mut self, s: usize, l: usize) {
        let at = std::mem::take(&mut self.slots[s].at[l]);
        if at != 0 {
            self.entries[at as usize - 1] = Entry::default();
        }
    }

    fn index(&self, hash: PageHash) -> usize {
        // A power of two long.
        (hash.0 as usize) & (self.entries.len() - 1)
    }

    /// The slot list and index of `page` of `region`; `None` for a page of another
    /// channel or outside the regions.
    fn slot(&self, region: RegionId, page: u64) -> Option<(usize, usize)> {
        if self.affinity.channel(region, page) != self.ch {
            return None;
        }
        let s = self.slots.iter().position(|s| s.region == region)?;
        let chunk = u64::from(self.affinity.chunk_pages.max(1));
        let n = u64::from(self.affinity.channels.max(1));
        // Chunks of this channel are `n` apart: chunk / n numbers them.
        let local = (page / chunk / n) * chunk + page % chunk;
        let l = usize::try_from(local).ok()?;
        (l < self.slots[s].at.len()).then_some((s, l))
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

    /// Pages of `region` that channel `ch` carries.
    fn mine(region: RegionId, ch: u16, pages: u64) -> Vec<u64> {
        (0..pages)
            .filter(|&p| AFF.channel(region, p) == ch)
            .collect()
    }

    #[test]
    fn a_page_sent_is_found_by_its_content_and_forgotten_when_it_changes() {
        let m = memory(64);
        let mut d = Dedup::new(&m, AFF, 1).unwrap();
        let r = RegionId(0);
        let [a, b, ..] = mine(r, 1, 64)[..] else {
            panic!("no pages")
        };
        let h = d.hash(&[7u8; 4096]);
        assert_eq!(d.find(r, h), None);
        d.insert(r, a, h);
        assert_eq!(d.find(r, h), Some(a));
        // Not in another region, and not by other content.
        assert_eq!(d.find(RegionId(7), h), None);
        assert_eq!(d.find(r, d.hash(&[8u8; 4096])), None);
        // The page changes: forgotten.
        d.forget(r, a);
        assert_eq!(d.find(r, h), None);
        // Inserted again under other content: the old content is gone.
        d.insert(r, a, h);
        d.insert(r, a, d.hash(&[9u8; 4096]));
        assert_eq!(d.find(r, h), None);
        // Another page with the same content takes its place.
        d.insert(r, b, h);
        assert_eq!(d.find(r, h), Some(b));
    }

    #[test]
    fn pages_of_other_channels_are_never_entered() {
        let m = memory(64);
        let mut d = Dedup::new(&m, AFF, 0).unwrap();
        let r = RegionId(7);
        let theirs = mine(r, 1, 64)[0];
        let h = d.hash(&[1u8; 4096]);
        d.insert(r, theirs, h);
        assert_eq!(d.find(r, h), None);
        // Outside the region too.
        d.insert(r, 1 << 40, h);
        assert_eq!(d.find(r, h), None);
    }

    #[test]
    fn every_page_of_the_channel_has_its_own_slot() {
        let m = memory(61);
        for ch in 0..2 {
            let d = Dedup::new(&m, AFF, ch).unwrap();
            for r in [RegionId(0), RegionId(7)] {
                let mut seen = std::collections::HashSet::new();
                for p in mine(r, ch, 61) {
                    let slot = d.slot(r, p).expect("a slot");
                    assert!(seen.insert(slot), "page {p} shares slot {slot:?}");
                }
            }
        }
    }

    #[test]
    fn an_entry_replaced_in_its_slot_is_forgotten_not_misattributed() {
        let m = memory(4096);
        let mut d = Dedup::new(&m, AFF, 0).unwrap();
        let r = RegionId(0);
        let pages = mine(r, 0, 4096);
        // More contents than entries: later ones replace earlier ones.
        let n = d.entries.len() * 2;
        let mut kept = Vec::new();
        for (i, &p) in pages.iter().cycle().take(n).enumerate() {
            let h = d.hash(&(i as u64).to_le_bytes().repeat(512));
            d.insert(r, p, h);
            kept.push((p, h));
        }
        // Every answer names the page last inserted with that content, and that page
        // was not changed since.
        let mut last = std::collections::HashMap::new();
        for &(p, h) in &kept {
            last.insert(p, h);
        }
        for &(_, h) in &kept {
            if let Some(p) = d.find(r, h) {
                assert_eq!(last[&p], h);
            }
        }
    }

    #[test]
    fn the_key_differs_between_tables() {
        let m = memory(8);
        let (a, b) = (
            Dedup::new(&m, AFF, 0).unwrap(),
            Dedup::new(&m, AFF, 0).unwrap(),
        );
        let page = [3u8; 4096];
        assert_ne!(a.hash(&page), b.hash(&page));
        assert_eq!(a.hash(&page), a.hash(&page));
    }
}
