//! The keyed hash dedup compares pages by (see `dedup.rs`): BLAKE3 keyed, of one page
//! as the whole message, 128 bits of it kept.
//!
//! **Many pages per SIMD pass.** BLAKE3 hashes the 1 KiB chunks of one message side by
//! side, one per SIMD lane, but a 4 KiB page has only 4 chunks: `blake3::keyed_hash`
//! of a page fills 4 of AVX-512's 16 lanes and compresses its 3 parent nodes one at a
//! time. [`PageHasher::hash_pages`] computes the same function for up to 16 pages at
//! once: chunk `j` of every page in one pass (every lane's chunk counter is `j`), then
//! each level of parent nodes of every page in one pass, the last with the root flag.
//! With AVX-512 (an Intel machine of this project's) that was 1.8x the per-page call
//! (6.8 against 3.7 GB/s); with AVX2 (an AMD EPYC without AVX-512, whose 8 lanes take
//! the 16 pages in two passes) 1.56x (4.10 against 2.63 GB/s; `cargo bench -p
//! pagewire-benches --bench page_hash`). It is the standard BLAKE3 keyed hash, checked
//! against `blake3::keyed_hash` in the tests below on whichever SIMD the machine has;
//! only the order of the work differs.
//!
//! It uses `blake3::platform::Platform::hash_many`, which the crate marks as unstable
//! (it is public for its benchmarks); `pipeline/Cargo.toml` pins the version, and the
//! tests fail if a new version computed anything else.

use blake3::IncrementCounter;
use blake3::platform::{Platform, words_from_le_bytes_32};

/// A keyed hash of a page's bytes (128 bits of BLAKE3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHash(pub(crate) u128);

impl PageHash {
    fn from_bytes(b: &[u8]) -> PageHash {
        let mut h = [0u8; 16];
        h.copy_from_slice(&b[..16]);
        PageHash(u128::from_le_bytes(h))
    }
}

/// BLAKE3's chunk and block lengths and domain flags (the BLAKE3 specification, 2.1).
const CHUNK: usize = blake3::CHUNK_LEN;
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;
const KEYED_HASH: u8 = 1 << 4;

/// Pages hashed side by side: AVX-512's lanes (two passes of AVX2's 8).
const LANES: usize = 16;

/// The largest page hashed side by side with others: from 16 KiB a page's own chunks
/// fill the 16 lanes, and `blake3::keyed_hash` of the page is as fast.
const MAX_BATCHED_PAGE: usize = 8192;
const MAX_CHUNKS: usize = MAX_BATCHED_PAGE / CHUNK;

/// A BLAKE3 key and the SIMD implementation this machine runs.
pub struct PageHasher {
    key: [u8; 32],
    words: [u32; 8],
    platform: Platform,
}

impl PageHasher {
    /// A hasher keyed with `key`, on the fastest SIMD this machine has.
    pub fn new(key: [u8; 32]) -> Self {
        Self::on(key, Platform::detect())
    }

    /// A hasher on a given SIMD implementation (the tests run every one this machine
    /// has).
    fn on(key: [u8; 32], platform: Platform) -> Self {
        PageHasher {
            key,
            words: words_from_le_bytes_32(&key),
            platform,
        }
    }

    /// The keyed hash of one page's bytes.
    pub fn hash(&self, page: &[u8]) -> PageHash {
        PageHash::from_bytes(blake3::keyed_hash(&self.key, page).as_bytes())
    }

    /// The keyed hash of each `page_size` piece of `pages`, appended to `out`; a piece
    /// shorter than `page_size` at the end is hashed as it is.
    pub fn hash_pages(&self, pages: &[u8], page_size: usize, out: &mut Vec<PageHash>) {
        let batched =
            page_size.is_power_of_two() && (CHUNK..=MAX_BATCHED_PAGE).contains(&page_size);
        if !batched {
            out.extend(pages.chunks(page_size.max(1)).map(|p| self.hash(p)));
            return;
        }
        let mut groups = pages.chunks_exact(page_size * LANES);
        for group in &mut groups {
            self.hash_group(group, page_size, out);
        }
        let rest = groups.remainder();
        let whole = rest.len() / page_size * page_size;
        if whole > 0 {
            self.hash_group(&rest[..whole], page_size, out);
        }
        if whole < rest.len() {
            out.push(self.hash(&rest[whole..]));
        }
    }

    /// Up to [`LANES`] whole pages of `page_size` (a power of two, 1 KiB to
    /// [`MAX_BATCHED_PAGE`]), in the tree BLAKE3 builds over a message of that length:
    /// its chunks are the leaves, and each parent joins two subtrees of equal size.
    fn hash_group(&self, pages: &[u8], page_size: usize, out: &mut Vec<PageHash>) {
        debug_assert!(
            pages.len() / page_size <= LANES,
            "at most {LANES} pages a group"
        );
        let n = (pages.len() / page_size).min(LANES);
        let chunks = (page_size / CHUNK).min(MAX_CHUNKS);
        // The chaining values of every page's nodes at the current level, page after
        // page: two neighbours are their parent's 64-byte block as they lie.
        let mut level = [0u8; 32 * LANES * MAX_CHUNKS];
        let mut pass = [0u8; 32 * LANES];
        // A page of one chunk is its own root.
        let end = if chunks == 1 {
            CHUNK_END | ROOT
        } else {
            CHUNK_END
        };
        for j in 0..chunks {
            let mut inputs: [&[u8; CHUNK]; LANES] = [&[0; CHUNK]; LANES];
            for (slot, page) in inputs.iter_mut().zip(pages.chunks_exact(page_size)) {
                if let Ok(c) = page[j * CHUNK..(j + 1) * CHUNK].try_into() {
                    *slot = c;
                }
            }
            self.platform.hash_many(
                &inputs[..n],
                &self.words,
                j as u64,
                IncrementCounter::No,
                KEYED_HASH,
                CHUNK_START,
                end,
                &mut pass[..32 * n],
            );
            for (i, cv) in pass[..32 * n].chunks_exact(32).enumerate() {
                let at = (i * chunks + j) * 32;
                level[at..at + 32].copy_from_slice(cv);
            }
        }
        let mut next = [0u8; 32 * LANES * MAX_CHUNKS / 2];
        let mut width = chunks;
        while width > 1 {
            let parents = n * width / 2;
            let flags = if width == 2 {
                KEYED_HASH | PARENT | ROOT
            } else {
                KEYED_HASH | PARENT
            };
            let mut inputs: [&[u8; 64]; LANES * MAX_CHUNKS / 2] =
                [&[0; 64]; LANES * MAX_CHUNKS / 2];
            for (slot, block) in inputs
                .iter_mut()
                .zip(level[..64 * parents].chunks_exact(64))
            {
                if let Ok(b) = block.try_into() {
                    *slot = b;
                }
            }
            self.platform.hash_many(
                &inputs[..parents],
                &self.words,
                0,
                IncrementCounter::No,
                flags,
                0,
                0,
                &mut next[..32 * parents],
            );
            level[..32 * parents].copy_from_slice(&next[..32 * parents]);
            width /= 2;
        }
        out.extend(level[..32 * n].chunks_exact(32).map(PageHash::from_bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect()
    }

    /// What `hash_pages` must equal: BLAKE3 keyed of each page, one by one.
    fn reference(key: &[u8; 32], pages: &[u8], ps: usize) -> Vec<PageHash> {
        pages
            .chunks(ps)
            .map(|p| PageHash::from_bytes(blake3::keyed_hash(key, p).as_bytes()))
            .collect()
    }

    #[test]
    fn pages_hashed_side_by_side_are_blake3_keyed_of_each_page() {
        let key: [u8; 32] = bytes(32, 1).try_into().unwrap();
        let h = PageHasher::new(key);
        // 1 and 2 KiB (one chunk, its own root; two chunks under the root) are below
        // the protocol's pages but inside what this hashes side by side.
        for ps in [1024usize, 2048, 4096, 8192, 16384] {
            // Whole groups, a short group, one page, and none.
            for n in [0usize, 1, 5, 16, 17, 40] {
                let pages = bytes(n * ps, (ps + n) as u64);
                let mut got = Vec::new();
                h.hash_pages(&pages, ps, &mut got);
                assert_eq!(
                    got,
                    reference(&key, &pages, ps),
                    "page size {ps}, {n} pages"
                );
            }
        }
        // Equal pages hash equal wherever they sit in a group; a changed byte does not.
        let mut pages = bytes(4096, 9).repeat(16);
        pages[7 * 4096 + 4095] ^= 1;
        let mut got = Vec::new();
        h.hash_pages(&pages, 4096, &mut got);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, g)| (*g == got[0]) == (i != 7))
        );
    }

    /// Every SIMD implementation this machine has (`hash_many` takes the 16 pages in
    /// passes of its own width: 1, 4, 8 or 16), not only the fastest, which the test
    /// above runs; the ones it lacks are named as skipped.
    #[test]
    fn every_simd_this_machine_has_hashes_the_same() {
        let key: [u8; 32] = bytes(32, 7).try_into().unwrap();
        let candidates = [
            ("portable", Some(Platform::portable())),
            ("sse2", Platform::sse2()),
            ("sse41", Platform::sse41()),
            ("avx2", Platform::avx2()),
            ("avx512", Platform::avx512()),
        ];
        let mut ran = 0;
        for (name, platform) in candidates {
            let Some(platform) = platform else {
                eprintln!("skipped: {name} (not on this machine)");
                continue;
            };
            let h = PageHasher::on(key, platform);
            for (ps, n) in [(4096usize, 40usize), (8192, 17), (1024, 3)] {
                let pages = bytes(n * ps, (ps * n) as u64);
                let mut got = Vec::new();
                h.hash_pages(&pages, ps, &mut got);
                assert_eq!(got, reference(&key, &pages, ps), "{name}, page size {ps}");
            }
            eprintln!("ran: {name} ({} lanes)", platform.simd_degree());
            ran += 1;
        }
        // The portable one at least, and on x86_64 SSE2, which every such CPU has.
        assert!(ran >= if cfg!(target_arch = "x86_64") { 2 } else { 1 });
    }

    #[test]
    fn a_piece_shorter_than_a_page_is_hashed_as_it_is() {
        let key = [3u8; 32];
        let h = PageHasher::new(key);
        let pages = bytes(3 * 4096 + 100, 4);
        let mut got = Vec::new();
        h.hash_pages(&pages, 4096, &mut got);
        assert_eq!(got, reference(&key, &pages, 4096));
        assert_eq!(got.len(), 4);
    }
}
