//! The inputs: a guest-like buffer of mixed pages, its next version for delta, and its
//! frames encoded once by the codecs.

use pagewire_accel::{
    Codecs, DeltaCache, DeltaConfig, EncodeParams, EngineBuf, PageKey, PageList, PageSize,
    max_payload_len,
};
use pagewire_protocol::CodecId;

use crate::{CASES, Case, PAGES, PS};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A guest-like mix of non-zero pages (zero pages never reach a codec): text, code,
/// counters and pointers, sparse structures, and some incompressible pages.
pub(crate) fn mixed(pages: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let words: [&[u8]; 12] = [
        b"the ", b"guest ", b"kernel ", b"page ", b"memory ", b"struct ", b"0x7f", b"error ",
        b"\n", b"= ", b"int ", b"return ",
    ];
    let code: [&[u8]; 8] = [
        &[0x55],
        &[0x48, 0x89, 0xe5],
        &[0xe8],
        &[0x48, 0x8b, 0x45],
        &[0xc3],
        &[0x0f, 0x1f, 0x44, 0, 0],
        &[0x74],
        &[0x31, 0xc0],
    ];
    let mut buf = vec![0u8; pages * PS];
    for (p, page) in buf.chunks_mut(PS).enumerate() {
        match p % 8 {
            0 | 1 => {
                let mut i = 0;
                while i < PS {
                    for &b in words[(rng.next() % 12) as usize] {
                        if i < PS {
                            page[i] = b;
                            i += 1;
                        }
                    }
                }
            }
            2 | 3 => {
                let mut i = 0;
                while i < PS {
                    for &b in code[(rng.next() % 8) as usize] {
                        if i < PS {
                            page[i] = b;
                            i += 1;
                        }
                    }
                    if i < PS && rng.next().is_multiple_of(3) {
                        page[i] = rng.next() as u8;
                        i += 1;
                    }
                }
            }
            4 => {
                let base = 0xffff_8880_0000_0000u64 + (rng.next() % 4096) * 4096;
                for (i, c) in page.chunks_mut(8).enumerate() {
                    c.copy_from_slice(&(base + i as u64 * 64).to_le_bytes());
                }
            }
            5 => {
                for _ in 0..24 {
                    let at = (rng.next() as usize) % (PS - 8);
                    page[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            6 => {
                for c in page.chunks_mut(8) {
                    c.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            _ => {
                for (i, c) in page.chunks_mut(4).enumerate() {
                    c.copy_from_slice(&((i as u32) << 8 | (rng.next() % 4) as u32).to_le_bytes());
                }
            }
        }
    }
    buf
}

/// The same buffer with a few bytes changed per page (the next version for delta).
pub(crate) fn touched(buf: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut v = buf.to_vec();
    for page in v.chunks_mut(PS) {
        for _ in 0..6 {
            let at = (rng.next() as usize) % PS;
            page[at] = page[at].wrapping_add(1);
        }
    }
    v
}
pub(crate) struct Encoded {
    pub(crate) codec: CodecId,
    pub(crate) payload: EngineBuf,
    pub(crate) lengths: Vec<u32>,
}

/// Encodes every frame once with the codecs (for the decompress benches and ratios).
pub(crate) fn encode_frames(
    case: Case,
    buf: &[u8],
    n: usize,
    cache: Option<&DeltaCache>,
) -> Vec<Encoded> {
    let mut codecs = Codecs::new();
    buf.chunks(n * PS)
        .enumerate()
        .map(|(i, frame)| {
            let mut src = PageList::new(PageSize::KIB4);
            src.push_slice(frame, PageKey((i * n) as u64)).unwrap();
            let mut out = vec![0u8; max_payload_len(n, PageSize::KIB4)];
            let mut lengths = Vec::new();
            let o = codecs
                .encode(
                    &EncodeParams::new(case.codec, case.level),
                    &src,
                    cache,
                    &mut out,
                    &mut lengths,
                )
                .unwrap();
            out.truncate(o.payload_len);
            Encoded {
                codec: o.codec,
                payload: EngineBuf::from_vec(out),
                lengths,
            }
        })
        .collect()
}

/// For delta: a cache holding version A, and the frames of version B against it.
pub(crate) fn delta_setup(a: &[u8], b: &[u8], n: usize) -> Vec<Encoded> {
    let cache = DeltaCache::new(DeltaConfig::new(PageSize::KIB4, PAGES)).unwrap();
    encode_frames(CASES[5], a, n, Some(&cache));
    encode_frames(CASES[5], b, n, Some(&cache))
}

pub(crate) fn warm_cache(cache: &DeltaCache, a: &[u8]) {
    encode_frames(CASES[5], a, PAGES, Some(cache));
}
