//! Entry points for the cargo-fuzz targets in `fuzz/` (thin wrappers over these) and
//! for the property tests that run them in `cargo test`. Not a stable API.
//!
//! Each decoder function drives one software decoder with arbitrary input into a
//! destination of `pages % 9` pages of 4 KiB, laid out as two runs (when there are at
//! least two pages) with guard bytes before, between and after them. It panics when
//! the decoder panics, writes a guard byte, or reports success for the wrong size; it
//! returns normally for every payload the decoder rejects.

use pagewire_protocol::CodecId;

use crate::cache::{DeltaCache, DeltaConfig};
use crate::codec::{CodecError, Codecs, EncodeParams, Level, max_payload_len};
use crate::page::{PageKey, PageSize};
use crate::pages::{PageList, PageListMut};

const PS: usize = 4096;
const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0xa5;

/// A destination of `pages` pages in two runs with guards; `fill` seeds the pages.
struct Guarded {
    buf: Vec<u8>,
    pages: usize,
    split: usize,
}

impl Guarded {
    fn new(pages: usize, fill: &[u8]) -> Guarded {
        let split = pages / 2;
        let mut buf = vec![GUARD_BYTE; pages * PS + 3 * GUARD];
        let mut g = Guarded {
            buf: Vec::new(),
            pages,
            split,
        };
        for p in 0..pages {
            let at = g.offset(p);
            for (i, b) in buf[at..at + PS].iter_mut().enumerate() {
                *b = fill
                    .get((p * PS + i) % fill.len().max(1))
                    .copied()
                    .unwrap_or(0);
            }
        }
        g.buf = buf;
        g
    }

    /// Where page `p` starts in `buf`.
    fn offset(&self, p: usize) -> usize {
        if p < self.split {
            GUARD + p * PS
        } else {
            2 * GUARD + p * PS
        }
    }

    fn decode(
        &mut self,
        codec: CodecId,
        payload: &[u8],
        lengths: &[u32],
    ) -> Result<(), CodecError> {
        let (split, pages) = (self.split, self.pages);
        let (head, tail) = self.buf.split_at_mut(GUARD + split * PS);
        let mut dst = PageListMut::new(PageSize::KIB4);
        if split > 0 {
            dst.push_slice(&mut head[GUARD..], PageKey(0))
                .expect("whole pages");
        }
        if pages > split {
            dst.push_slice(
                &mut tail[GUARD..GUARD + (pages - split) * PS],
                PageKey(split as u64),
            )
            .expect("whole pages");
        }
        let r = Codecs::new().decode(codec, payload, lengths, &mut dst);
        drop(dst);
        self.check_guards();
        r
    }

    fn check_guards(&self) {
        let s = self.split * PS;
        let guards = [
            0..GUARD,
            GUARD + s..2 * GUARD + s,
            2 * GUARD + self.pages * PS..3 * GUARD + self.pages * PS,
        ];
        for g in guards {
            assert!(
                self.buf[g.clone()].iter().all(|&b| b == GUARD_BYTE),
                "decoder wrote a guard byte in {g:?}"
            );
        }
    }

    fn page(&self, p: usize) -> &[u8] {
        let at = self.offset(p);
        &self.buf[at..at + PS]
    }
}

fn drive(codec: CodecId, payload: &[u8], lengths: &[u32], pages: u8, fill: &[u8]) {
    let pages = usize::from(pages % 9);
    let mut dst = Guarded::new(pages, fill);
    let _ = dst.decode(codec, payload, lengths);
}

/// Drives the raw decoder.
pub fn decode_raw(payload: &[u8], pages: u8) {
    drive(CodecId::RAW, payload, &[], pages, &[]);
}

/// Drives the zero decoder.
pub fn decode_zero(payload: &[u8], pages: u8) {
    drive(CodecId::ZERO, payload, &[], pages, &[1]);
}

/// Drives the zstd decoder.
pub fn decode_zstd(payload: &[u8], pages: u8) {
    drive(CodecId::ZSTD, payload, &[], pages, &[]);
}

/// Drives the lz4 decoder.
pub fn decode_lz4(payload: &[u8], pages: u8) {
    drive(CodecId::LZ4, payload, &[], pages, &[]);
}

/// Drives the per-page deflate decoder with a claimed length table; with the high bit
/// of `pages` set, as `deflate-4k`, and the IAA device model's window-checking
/// inflater over the payload too.
pub fn decode_deflate(payload: &[u8], lengths: &[u32], pages: u8) {
    if pages & 0x80 != 0 {
        let _ = crate::codec::deflate::inflate_max_distance(payload, &mut [0u8; PS]);
        drive(CodecId::DEFLATE_4K, payload, lengths, pages & 0x7f, &[]);
    } else {
        drive(CodecId::DEFLATE, payload, lengths, pages, &[]);
    }
}

/// Drives the delta decoder; the destination pages start as `base` repeated.
pub fn decode_delta(payload: &[u8], lengths: &[u32], pages: u8, base: &[u8]) {
    drive(CodecId::DELTA, payload, lengths, pages, base);
}

/// One target over every decoder: byte 0 picks the decoder, byte 1 the page count,
/// bytes 2.. hold (for per-page formats) a table of `pages` little-endian u16
/// lengths, and the rest is the payload.
pub fn decode_bytes(data: &[u8]) {
    let [which, pages, rest @ ..] = data else {
        return;
    };
    let codec = match which % 6 {
        0 => CodecId::RAW,
        1 => CodecId::ZERO,
        2 => CodecId::ZSTD,
        3 => CodecId::LZ4,
        // The high bit of the page-count byte picks deflate-4k (same decoder, and the
        // IAA device model's window-checking inflater over the payload).
        4 if *pages & 0x80 != 0 => {
            let _ = crate::codec::deflate::inflate_max_distance(rest, &mut [0u8; PS]);
            CodecId::DEFLATE_4K
        }
        4 => CodecId::DEFLATE,
        _ => CodecId::DELTA,
    };
    let mut lengths = [0u32; 8];
    let n = usize::from(pages % 9);
    let (table, payload) = if crate::codec::layout(codec) == Some(crate::codec::Layout::PerPage) {
        let t = rest.len().min(2 * n);
        let (t, p) = rest.split_at(t);
        for (i, c) in t.chunks_exact(2).enumerate() {
            lengths[i] = u32::from(u16::from_le_bytes([c[0], c[1]]));
        }
        (&lengths[..t.len() / 2], p)
    } else {
        (&lengths[..0], rest)
    };
    drive(codec, payload, table, *pages, &[0x11, 0x22, 0x33]);
}

/// Encodes `data` (cut to whole pages, at most 8; an empty input is padded to one
/// page of zeros) with the format and level picked by `codec` and `level`, decodes
/// the result, and checks it gives back the input. For delta it first sends a base
/// version (the input with every 97th byte changed), then the input as a delta.
pub fn roundtrip(codec: u8, level: i8, data: &[u8]) {
    let pages = (data.len() / PS).clamp(1, 8);
    let mut input = data[..data.len().min(pages * PS)].to_vec();
    input.resize(pages * PS, 0);
    let (codec, level) = match codec % 6 {
        0 => (CodecId::RAW, 0),
        1 => (CodecId::ZERO, 0),
        2 => (CodecId::ZSTD, i32::from(level % 23)),
        3 => (CodecId::LZ4, 0),
        4 => (CodecId::DEFLATE, i32::from(level.rem_euclid(13))),
        _ => (CodecId::DELTA, 0),
    };
    let cache = DeltaCache::new(DeltaConfig::new(PageSize::KIB4, 16)).expect("valid cache config");
    let mut codecs = Codecs::new();
    let mut payload = vec![0u8; max_payload_len(pages, PageSize::KIB4)];
    let mut lengths = Vec::new();
    let params = EncodeParams::new(codec, Level(level));
    let mut base = input.clone();
    let mut dst = Guarded::new(pages, &[0]);
    if codec == CodecId::DELTA {
        for b in base.iter_mut().step_by(97) {
            *b = b.wrapping_add(1);
        }
        let mut src = PageList::new(PageSize::KIB4);
        src.push_slice(&base, PageKey(0)).expect("whole pages");
        let out = codecs
            .encode(&params, &src, Some(&cache), &mut payload, &mut lengths)
            .expect("encode base");
        dst.decode(out.codec, &payload[..out.payload_len], &lengths)
            .expect("decode base");
    }
    let mut src = PageList::new(PageSize::KIB4);
    src.push_slice(&input, PageKey(0)).expect("whole pages");
    let out = codecs
        .encode(&params, &src, Some(&cache), &mut payload, &mut lengths)
        .expect("encode");
    assert!(
        out.payload_len <= pages * PS,
        "payload longer than its pages"
    );
    dst.decode(out.codec, &payload[..out.payload_len], &lengths)
        .expect("decode of our own encoding");
    for p in 0..pages {
        assert_eq!(
            dst.page(p),
            &input[p * PS..(p + 1) * PS],
            "page {p} differs after round trip"
        );
    }
}

/// A stateful sequence for the delta codec and its cache: a sender and a receiver
/// each hold 6 pages; the sender's cache holds only 3 (so pages are evicted), and
/// every 4 bytes of `ops` are one operation: change bytes of a page, rewrite a page
/// with noise, clear it back to zeros, invalidate it in the cache, or send a frame of
/// 1 to 3 pages and apply it on the receiver: as delta, or with raw, zero, lz4, zstd,
/// deflate or deflate-4k keeping what they send in the cache
/// (`EncodeParams::remember`, as the adaptive choice with delta does), the pages read
/// as a borrowed slice or as guest memory, in one run or two, raw fallbacks copied or
/// sent in place. After every frame the receiver's copy of the sent
/// pages must equal the sender's: a delta is never computed against content the
/// receiver lacks.
pub fn delta_sequence(ops: &[u8]) {
    const N: usize = 6;
    let mut config = DeltaConfig::new(PageSize::KIB4, 3);
    config.shards = 2;
    config.threshold = 1024;
    let cache = DeltaCache::new(config).expect("valid cache config");
    let mut sender = vec![0u8; N * PS];
    let mut receiver = Guarded::new(N, &[0]);
    let mut codecs = Codecs::new();
    let mut payload = vec![0u8; max_payload_len(3, PageSize::KIB4)];
    let mut lengths = Vec::new();
    for op in ops.chunks_exact(4) {
        let page = usize::from(op[1]) % N;
        let at = page * PS + (usize::from(op[2]) * 16).min(PS - 32);
        match op[0] % 5 {
            0 => {
                let len = usize::from(op[3] % 32) + 1;
                sender[at..at + len].fill(op[3]);
            }
            1 => {
                let mut x = u64::from(op[3]) | 1;
                for b in &mut sender[page * PS..(page + 1) * PS] {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            2 => cache.invalidate(PageKey(page as u64)),
            3 => sender[page * PS..(page + 1) * PS].fill(0),
            _ => {
                let count = (usize::from(op[3]) % 3 + 1).min(N - page);
                // `op[2]`: bit 0 reads the pages as guest memory (copied into the
                // codecs' scratch) rather than as a borrowed slice, bit 1 makes the
                // frame two runs, bit 2 lets a raw fallback go from memory in place.
                let (guest, two_runs, in_place) = (op[2] & 1 != 0, op[2] & 2 != 0, op[2] & 4 != 0);
                let first = if two_runs && count > 1 { 1 } else { count };
                let mut src = PageList::new(PageSize::KIB4);
                for (from, n) in [(page, first), (page + first, count - first)] {
                    if n == 0 {
                        continue;
                    }
                    let run = &sender[from * PS..(from + n) * PS];
                    let key = PageKey(from as u64);
                    if guest {
                        // SAFETY: `sender` outlives `src` and is not written while
                        // `src` lives (until this frame is applied).
                        unsafe { src.push_raw(run.as_ptr(), n as u32, key) }.expect("pages");
                    } else {
                        src.push_slice(run, key).expect("whole pages");
                    }
                }
                let codec = [
                    CodecId::DELTA,
                    CodecId::DELTA,
                    CodecId::LZ4,
                    CodecId::ZSTD,
                    CodecId::DEFLATE,
                    CodecId::DEFLATE_4K,
                    CodecId::RAW,
                    CodecId::ZERO,
                ][usize::from(op[3] / 3) % 8];
                let params = EncodeParams {
                    remember: true,
                    raw_in_place: in_place,
                    ..EncodeParams::new(codec, Level::DEFAULT)
                };
                let out = codecs
                    .encode(&params, &src, Some(&cache), &mut payload, &mut lengths)
                    .expect("encode");
                drop(src);
                // Apply to the receiver's pages `page..page + count`.
                let mut dst = PageListMut::new(PageSize::KIB4);
                let split = receiver.split;
                let (head, tail) = receiver.buf.split_at_mut(GUARD + split * PS);
                for p in page..page + count {
                    let slice = if p < split {
                        &mut head[GUARD + p * PS..GUARD + (p + 1) * PS]
                    } else {
                        let q = p - split;
                        &mut tail[GUARD + q * PS..GUARD + (q + 1) * PS]
                    };
                    // SAFETY: each page slice is a distinct part of `receiver.buf`,
                    // used only by `dst` until it is dropped below.
                    unsafe {
                        dst.push_raw(slice.as_mut_ptr(), 1, PageKey(p as u64))
                            .expect("one page")
                    };
                }
                if out.in_place {
                    // Sent from the sender's memory as it is.
                    for (i, p) in (page..page + count).enumerate() {
                        let bytes = &sender[p * PS..(p + 1) * PS];
                        let to = dst.page_mut(i).expect("a page of the frame");
                        // SAFETY: `to` is page `i` of `dst`, a whole page of
                        // `receiver.buf` that nothing else references meanwhile.
                        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), to, PS) };
                    }
                } else {
                    codecs
                        .decode(out.codec, &payload[..out.payload_len], &lengths, &mut dst)
                        .expect("decode of our own frame");
                }
                drop(dst);
                receiver.check_guards();
                for p in page..page + count {
                    assert_eq!(
                        receiver.page(p),
                        &sender[p * PS..(p + 1) * PS],
                        "page {p} differs after a {codec} frame"
                    );
                }
            }
        }
    }
    let s = cache.stats();
    assert!(s.resident <= 3, "cache over its bound");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Valid payloads of every format, to mutate.
    type Seed = (CodecId, Vec<u8>, Vec<u32>, usize);

    fn seeds() -> &'static [Seed] {
        static SEEDS: std::sync::OnceLock<Vec<Seed>> = std::sync::OnceLock::new();
        SEEDS.get_or_init(make_seeds)
    }

    fn make_seeds() -> Vec<Seed> {
        let mut data = vec![0u8; 3 * PS];
        for (i, b) in data.iter_mut().enumerate() {
            *b = if i % 7 == 0 {
                (i / 7) as u8
            } else {
                b"pagewire"[i % 8]
            };
        }
        let mut out = Vec::new();
        let cache = DeltaCache::new(DeltaConfig::new(PageSize::KIB4, 16)).unwrap();
        let mut codecs = Codecs::new();
        for codec in [
            CodecId::ZSTD,
            CodecId::LZ4,
            CodecId::DEFLATE,
            CodecId::DELTA,
        ] {
            let mut src = PageList::new(PageSize::KIB4);
            src.push_slice(&data, PageKey(0)).unwrap();
            let mut payload = vec![0u8; max_payload_len(3, PageSize::KIB4)];
            let mut lengths = Vec::new();
            let params = EncodeParams::new(codec, Level::DEFAULT);
            let mut o = codecs
                .encode(&params, &src, Some(&cache), &mut payload, &mut lengths)
                .unwrap();
            if codec == CodecId::DELTA {
                let mut v2 = data.clone();
                v2[5] ^= 1;
                v2[5000] ^= 2;
                let mut src = PageList::new(PageSize::KIB4);
                src.push_slice(&v2, PageKey(0)).unwrap();
                o = codecs
                    .encode(&params, &src, Some(&cache), &mut payload, &mut lengths)
                    .unwrap();
            }
            assert_eq!(o.codec, codec);
            out.push((codec, payload[..o.payload_len].to_vec(), lengths, 3));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_break_a_decoder(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            decode_bytes(&data);
        }

        #[test]
        fn arbitrary_tables_never_break_per_page_decoders(
            payload in proptest::collection::vec(any::<u8>(), 0..1024),
            lengths in proptest::collection::vec(0u32..5000, 0..9),
            pages in any::<u8>(),
            base in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            decode_deflate(&payload, &lengths, pages);
            decode_delta(&payload, &lengths, pages, &base);
        }

        #[test]
        fn block_decoders_survive_arbitrary_payloads(payload in proptest::collection::vec(any::<u8>(), 0..4096), pages in any::<u8>()) {
            decode_raw(&payload, pages);
            decode_zero(&payload, pages);
            decode_zstd(&payload, pages);
            decode_lz4(&payload, pages);
        }

        #[test]
        fn mutated_valid_payloads_never_break_a_decoder(
            which in 0usize..4,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
            pages_delta in 0u8..3,
        ) {
            let (codec, mut payload, lengths, pages) = seeds()[which].clone();
            for (at, x) in flips {
                if !payload.is_empty() {
                    let i = at % payload.len();
                    payload[i] ^= x | 1;
                }
            }
            if cut % 3 == 0 && !payload.is_empty() {
                payload.truncate(cut % payload.len());
            }
            let pages = (pages as u8 + pages_delta).saturating_sub(1);
            match codec {
                CodecId::DEFLATE => decode_deflate(&payload, &lengths, pages),
                CodecId::DELTA => decode_delta(&payload, &lengths, pages, b"x"),
                CodecId::ZSTD => decode_zstd(&payload, pages),
                _ => decode_lz4(&payload, pages),
            }
        }

        #[test]
        fn delta_sequences_keep_sender_and_receiver_equal(ops in proptest::collection::vec(any::<u8>(), 0..400)) {
            delta_sequence(&ops);
        }

        #[test]
        fn every_format_round_trips(codec in any::<u8>(), level in any::<i8>(), data in proptest::collection::vec(any::<u8>(), 0..3 * PS), zeros in any::<bool>()) {
            // Half the inputs compressible: long runs of a few values.
            let data: Vec<u8> = if zeros { data.iter().map(|b| b & 3).collect() } else { data };
            roundtrip(codec, level, &data);
        }
    }

    #[test]
    fn seeds_decode_cleanly() {
        for (codec, payload, lengths, pages) in seeds() {
            if *codec == CodecId::DELTA {
                continue; // needs the base version; covered by `roundtrip`
            }
            let mut dst = Guarded::new(*pages, &[0]);
            dst.decode(*codec, payload, lengths).unwrap();
        }
    }

    #[test]
    #[should_panic(expected = "guard")]
    fn guard_check_catches_a_stray_write() {
        let mut g = Guarded::new(2, &[0]);
        let at = g.offset(1) + PS;
        g.buf[at] = 0;
        g.check_guards();
    }
}
