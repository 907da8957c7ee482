//! The keyed hash dedup compares pages by (see `dedup.rs`): AES-128 of the page's
//! POLYVAL, each under half of a 32-byte key drawn for the source and never sent.
//!
//! **What it guarantees.** POLYVAL (RFC 8452, the universal hash of AES-GCM-SIV) of a
//! message of `n` 16-byte blocks, under a key `H` the guest does not know, is a
//! polynomial of degree `n` in `H`: two different messages collide for at most `n` of
//! the 2^128 keys, whatever they hold, so a guest that writes pages to collide succeeds
//! with probability at most `n / 2^128` a pair (`n` = 257 for a 4 KiB page and its
//! length block). Matching `b` bits of the result instead of 128 raises that to `n /
//! 2^b`; AES, a permutation under a second key, spreads that bound over every bit of
//! the output (the table matches at least 105: `dedup.rs`) and keeps the guest from
//! learning `H` from which pages share a bucket. This is the standard "universal hash,
//! then a pseudo-random permutation" construction, a bound that holds for any pages
//! rather than a search the guest would have to win blind.
//!
//! **The message** is the page's bytes, zero-padded to whole blocks, then a block with
//! the piece's length in bytes (little-endian, in its first 8 bytes): pieces of
//! different lengths never share a padded message.
//!
//! **Speed.** Dedup hashes every data page it sends, so this is on the source's main
//! path: with BLAKE3 keyed, 16 pages per SIMD pass, it was 15 % of the source's CPU under
//! zstd on an AVX2 machine. POLYVAL here is computed with carry-less multiplication
//! ([`clmul`]): 16 blocks per reduction with `VPCLMULQDQ` where the CPU has it, 8 with
//! `PCLMULQDQ`, and the `polyval` crate's implementation otherwise (which is also
//! what the tests check the other two against). AES runs on many pages' results at
//! once (`aes` uses AES-NI where the CPU has it).

#[cfg(target_arch = "x86_64")]
mod clmul;

use aes::Aes128;
use aes::cipher::{BlockEncrypt, KeyInit};
use polyval::Polyval;
use polyval::universal_hash::UniversalHash;

/// A keyed hash of a page's bytes (128 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHash(pub(crate) u128);

impl PageHash {
    fn of(b: &Block) -> PageHash {
        let mut h = [0u8; 16];
        h.copy_from_slice(b);
        PageHash(u128::from_le_bytes(h))
    }
}

/// One 16-byte block, as the `aes` and `polyval` crates take it.
type Block = aes::Block;

/// Pages whose AES runs in one call.
const BATCH: usize = 32;

/// How POLYVAL is computed on this machine.
enum Poly {
    #[cfg(target_arch = "x86_64")]
    Wide(Box<clmul::Wide>),
    #[cfg(target_arch = "x86_64")]
    Narrow(Box<clmul::Narrow>),
    /// The `polyval` crate.
    Crate,
}

/// The implementations, fastest first, for [`PageHasher::on`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Wide,
    Narrow,
    Crate,
}

/// A key and the POLYVAL implementation this machine runs.
pub struct PageHasher {
    /// POLYVAL's key.
    h: [u8; 16],
    poly: Poly,
    aes: Aes128,
}

impl PageHasher {
    /// A hasher keyed with `key`: POLYVAL under its first 16 bytes, AES-128 under the
    /// last 16, on the fastest implementation this machine has.
    pub fn new(key: [u8; 32]) -> Self {
        [Kind::Wide, Kind::Narrow, Kind::Crate]
            .into_iter()
            .find_map(|k| Self::on(key, k))
            .unwrap_or_else(|| unreachable!("the crate's implementation runs everywhere"))
    }

    /// A hasher on one implementation, `None` when this machine lacks it (the tests run
    /// every one it has).
    fn on(key: [u8; 32], kind: Kind) -> Option<Self> {
        let mut h = [0u8; 16];
        h.copy_from_slice(&key[..16]);
        // Under H = 0 every message would hash to 0; the one key of 2^128 that is never
        // drawn, made so.
        if h == [0; 16] {
            h[0] = 1;
        }
        let poly = match kind {
            #[cfg(target_arch = "x86_64")]
            Kind::Wide => Poly::Wide(Box::new(clmul::Wide::new(&h)?)),
            #[cfg(target_arch = "x86_64")]
            Kind::Narrow => Poly::Narrow(Box::new(clmul::Narrow::new(&h)?)),
            #[cfg(not(target_arch = "x86_64"))]
            Kind::Wide | Kind::Narrow => return None,
            Kind::Crate => Poly::Crate,
        };
        Some(PageHasher {
            h,
            poly,
            aes: Aes128::new(key[16..].into()),
        })
    }

    /// POLYVAL of `piece` zero-padded, then its length block.
    fn polyval(&self, piece: &[u8]) -> Block {
        let mut last = [0u8; 16];
        last[..8].copy_from_slice(&(piece.len() as u64).to_le_bytes());
        let s = match &self.poly {
            #[cfg(target_arch = "x86_64")]
            Poly::Wide(w) => w.hash(piece, &last),
            #[cfg(target_arch = "x86_64")]
            Poly::Narrow(n) => n.hash(piece, &last),
            Poly::Crate => {
                let mut p = Polyval::new(&self.h.into());
                p.update_padded(piece);
                p.update(&[last.into()]);
                p.finalize().into()
            }
        };
        s.into()
    }

    /// The keyed hash of one page's bytes.
    pub fn hash(&self, page: &[u8]) -> PageHash {
        let mut b = self.polyval(page);
        self.aes.encrypt_block(&mut b);
        PageHash::of(&b)
    }

    /// The keyed hash of each `page_size` piece of `pages`, appended to `out`; a piece
    /// shorter than `page_size` at the end is hashed as it is.
    pub fn hash_pages(&self, pages: &[u8], page_size: usize, out: &mut Vec<PageHash>) {
        let ps = page_size.max(1);
        for group in pages.chunks(ps * BATCH) {
            let mut blocks = [Block::default(); BATCH];
            let mut n = 0;
            for (b, piece) in blocks.iter_mut().zip(group.chunks(ps)) {
                *b = self.polyval(piece);
                n += 1;
            }
            self.aes.encrypt_blocks(&mut blocks[..n]);
            out.extend(blocks[..n].iter().map(PageHash::of));
        }
    }
}

#[cfg(test)]
mod tests;
