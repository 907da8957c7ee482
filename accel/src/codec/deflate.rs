//! Raw deflate (RFC 1951) decoding through libdeflate, with the consumed-input check
//! that `libdeflater` does not expose.

use core::ptr::NonNull;

use libdeflate_sys::{
    libdeflate_alloc_decompressor, libdeflate_decompressor, libdeflate_deflate_decompress_ex,
    libdeflate_free_decompressor, libdeflate_result_LIBDEFLATE_SUCCESS,
};

/// An owned libdeflate decompressor.
pub(crate) struct Inflater(NonNull<libdeflate_decompressor>);

// SAFETY: a libdeflate decompressor has no thread affinity; `&mut self` on every use
// keeps it to one thread at a time.
unsafe impl Send for Inflater {}

impl Inflater {
    /// Allocates a decompressor; `None` when libdeflate is out of memory.
    pub(crate) fn new() -> Option<Inflater> {
        // SAFETY: plain allocation call with no argument; NULL means failure.
        NonNull::new(unsafe { libdeflate_alloc_decompressor() }).map(Inflater)
    }

    /// Inflates one raw deflate stream that must use exactly all of `input` and
    /// produce exactly `out.len()` bytes. Returns `false` otherwise.
    pub(crate) fn inflate_exact(&mut self, input: &[u8], out: &mut [u8]) -> bool {
        let mut in_used = 0usize;
        let mut out_made = 0usize;
        // SAFETY: `self.0` is a live decompressor used by this thread only; `input` is
        // readable for `input.len()` bytes and `out` writable for `out.len()` bytes,
        // and libdeflate writes no further than `out_nbytes_avail`; the two result
        // pointers point at live locals.
        let ret = unsafe {
            libdeflate_deflate_decompress_ex(
                self.0.as_ptr(),
                input.as_ptr().cast(),
                input.len(),
                out.as_mut_ptr().cast(),
                out.len(),
                &mut in_used,
                &mut out_made,
            )
        };
        ret == libdeflate_result_LIBDEFLATE_SUCCESS
            && in_used == input.len()
            && out_made == out.len()
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: allocated by `libdeflate_alloc_decompressor`, freed once here.
        unsafe { libdeflate_free_decompressor(self.0.as_ptr()) }
    }
}

/// Largest back-reference distance of a `deflate-4k` stream: the 4 KiB history an
/// Intel IAA keeps.
pub const WINDOW_4K: usize = 4096;

/// One LZ77 token of a deflate stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Token {
    /// A literal byte.
    Literal(u8),
    /// A back-reference: `len` (3..=258) bytes from `dist` (1..=[`WINDOW_4K`]) back.
    Match {
        /// Match length.
        len: u16,
        /// Distance back.
        dist: u16,
    },
}

/// Parses `input` into LZ77 tokens whose back-references reach at most
/// [`WINDOW_4K`] bytes back (a greedy matcher over a hash chain limited to the
/// window), handing each to `emit`; stops at the first `None` from `emit`.
pub(crate) fn lz77_window(input: &[u8], mut emit: impl FnMut(Token) -> Option<()>) -> Option<()> {
    const HASH_BITS: u32 = 12;
    const NIL: u32 = u32::MAX;
    const MAX_CHAIN: usize = 32;
    const MAX_MATCH: usize = 258;
    let n = input.len();
    let mut head = [NIL; 1 << HASH_BITS];
    let mut prev = vec![NIL; n];
    let hash = |i: usize| {
        let v = u32::from(input[i]) | u32::from(input[i + 1]) << 8 | u32::from(input[i + 2]) << 16;
        (v.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize
    };
    let insert = |i: usize, head: &mut [u32], prev: &mut [u32]| {
        if i + 3 <= n {
            let h = hash(i);
            prev[i] = head[h];
            head[h] = i as u32;
        }
    };
    let mut i = 0;
    while i < n {
        let mut best_len = 0;
        let mut best_dist = 0;
        if i + 3 <= n {
            let mut cand = head[hash(i)];
            let mut chain = 0;
            while cand != NIL && chain < MAX_CHAIN {
                let c = cand as usize;
                let dist = i - c;
                if dist > WINDOW_4K {
                    break;
                }
                let max = (n - i).min(MAX_MATCH);
                let mut l = 0;
                while l < max && input[c + l] == input[i + l] {
                    l += 1;
                }
                if l > best_len {
                    best_len = l;
                    best_dist = dist;
                    if l == max {
                        break;
                    }
                }
                cand = prev[c];
                chain += 1;
            }
        }
        if best_len >= 3 {
            emit(Token::Match {
                len: best_len as u16,
                dist: best_dist as u16,
            })?;
            for k in i..i + best_len {
                insert(k, &mut head, &mut prev);
            }
            i += best_len;
        } else {
            emit(Token::Literal(input[i]))?;
            insert(i, &mut head, &mut prev);
            i += 1;
        }
    }
    Some(())
}

/// Compresses `input` into one complete raw deflate stream (a single final block
/// with the fixed Huffman code, RFC 1951 §3.2.6) whose back-references reach at most
/// [`WINDOW_4K`] bytes back, into `out`. Returns the stream's length, or `None` when
/// it does not fit `out` (the caller sends the input raw).
///
/// This is the software writer of `deflate-4k` for inputs longer than the window,
/// and the device model's fixed-Huffman compressor (tokens from [`lz77_window`]).
pub(crate) fn compress_fixed_window(input: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut w = BitWriter::new(out);
    w.put(1, 1)?; // BFINAL
    w.put(1, 2)?; // BTYPE 01: fixed Huffman
    lz77_window(input, |t| match t {
        Token::Literal(b) => put_literal(&mut w, b),
        Token::Match { len, dist } => {
            put_length(&mut w, usize::from(len))?;
            put_distance(&mut w, usize::from(dist))
        }
    })?;
    put_code(&mut w, 0, 7)?; // end of block (256): 7 zero bits
    w.finish()
}

/// The literal/length symbol of match length `len` (3..=258), with its extra bits:
/// `(symbol, extra bit count, extra value)`.
pub(crate) fn length_symbol(len: usize) -> Option<(u32, u32, u32)> {
    let i = LEN_BASE.iter().rposition(|&b| usize::from(b) <= len)?;
    Some((
        257 + i as u32,
        u32::from(LEN_EXTRA[i]),
        (len - usize::from(LEN_BASE[i])) as u32,
    ))
}

/// The distance code of distance `dist` (1..=32768), with its extra bits:
/// `(code, extra bit count, extra value)`.
pub(crate) fn distance_code(dist: usize) -> Option<(u32, u32, u32)> {
    let i = DIST_BASE.iter().rposition(|&b| usize::from(b) <= dist)?;
    Some((
        i as u32,
        u32::from(DIST_EXTRA[i]),
        (dist - usize::from(DIST_BASE[i])) as u32,
    ))
}

/// LSB-first bit writer into a bounded buffer.
pub(crate) struct BitWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
    acc: u64,
    bits: u32,
}

impl<'a> BitWriter<'a> {
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        BitWriter {
            out,
            pos: 0,
            acc: 0,
            bits: 0,
        }
    }

    /// Appends the `n` low bits of `v`, least significant first.
    pub(crate) fn put(&mut self, v: u32, n: u32) -> Option<()> {
        self.acc |= u64::from(v & ((1u32 << n) - 1)) << self.bits;
        self.bits += n;
        while self.bits >= 8 {
            *self.out.get_mut(self.pos)? = self.acc as u8;
            self.pos += 1;
            self.acc >>= 8;
            self.bits -= 8;
        }
        Some(())
    }

    /// Bits written so far.
    pub(crate) fn bits_written(&self) -> usize {
        self.pos * 8 + self.bits as usize
    }

    /// Pads the last byte with zero bits and returns the bytes written.
    pub(crate) fn finish(mut self) -> Option<usize> {
        if self.bits > 0 {
            *self.out.get_mut(self.pos)? = self.acc as u8;
            self.pos += 1;
        }
        Some(self.pos)
    }
}

/// Writes a Huffman code (given most significant bit first, as RFC 1951 defines it).
pub(crate) fn put_code(w: &mut BitWriter<'_>, code: u32, len: u32) -> Option<()> {
    w.put(code.reverse_bits() >> (32 - len), len)
}

/// The fixed code of literal/length symbol `sym` (RFC 1951 §3.2.6).
fn put_symbol(w: &mut BitWriter<'_>, sym: u32) -> Option<()> {
    match sym {
        0..=143 => put_code(w, 0x30 + sym, 8),
        144..=255 => put_code(w, 0x190 + sym - 144, 9),
        256..=279 => put_code(w, sym - 256, 7),
        _ => put_code(w, 0xc0 + sym - 280, 8),
    }
}

fn put_literal(w: &mut BitWriter<'_>, b: u8) -> Option<()> {
    put_symbol(w, u32::from(b))
}

/// Length symbols 257..=285: base lengths and extra bits.
const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Distance codes 0..=29: base distances and extra bits.
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

fn put_length(w: &mut BitWriter<'_>, len: usize) -> Option<()> {
    let (sym, extra, v) = length_symbol(len)?;
    put_symbol(w, sym)?;
    w.put(v, extra)
}

fn put_distance(w: &mut BitWriter<'_>, dist: usize) -> Option<()> {
    let (code, extra, v) = distance_code(dist)?;
    put_code(w, code, 5)?;
    w.put(v, extra)
}

/// Inflates one complete raw deflate stream into `out` (which it must fill
/// exactly, using every input byte) and returns the largest back-reference distance
/// it used, or `None` for an invalid stream. A small bit-by-bit inflater: the device
/// model uses it to refuse, as an IAA does, streams whose history exceeds 4 KiB, and
/// tests use it to check that `deflate-4k` writers honour the window. (The software
/// decoder is libdeflate, which accepts any window.)
pub(crate) fn inflate_max_distance(input: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut r = BitReader {
        data: input,
        pos: 0,
        bit: 0,
    };
    let mut o = 0usize;
    let mut max_dist = 0usize;
    loop {
        let last = r.bits(1)?;
        match r.bits(2)? {
            0 => {
                r.align();
                let len = r.bits(16)? as usize;
                let nlen = r.bits(16)? as usize;
                if len != !nlen & 0xffff {
                    return None;
                }
                let src = input.get(r.pos..r.pos + len)?;
                out.get_mut(o..o + len)?.copy_from_slice(src);
                r.pos += len;
                o += len;
            }
            t @ (1 | 2) => {
                let (lit, dist) = if t == 1 {
                    let mut l = [0u8; 288];
                    l[..144].fill(8);
                    l[144..256].fill(9);
                    l[256..280].fill(7);
                    l[280..].fill(8);
                    (Huffman::new(&l)?, Huffman::new(&[5; 30])?)
                } else {
                    dynamic_tables(&mut r)?
                };
                loop {
                    let sym = lit.decode(&mut r)? as usize;
                    if sym < 256 {
                        *out.get_mut(o)? = sym as u8;
                        o += 1;
                    } else if sym == 256 {
                        break;
                    } else {
                        let i = sym - 257;
                        let len = usize::from(*LEN_BASE.get(i)?)
                            + r.bits(u32::from(LEN_EXTRA[i]))? as usize;
                        let d = dist.decode(&mut r)? as usize;
                        let dist = usize::from(*DIST_BASE.get(d)?)
                            + r.bits(u32::from(DIST_EXTRA[d]))? as usize;
                        if dist > o || o + len > out.len() {
                            return None;
                        }
                        max_dist = max_dist.max(dist);
                        for k in 0..len {
                            out[o + k] = out[o + k - dist];
                        }
                        o += len;
                    }
                }
            }
            _ => return None,
        }
        if last == 1 {
            break;
        }
    }
    let used = r.pos + usize::from(r.bit > 0);
    (o == out.len() && used == input.len()).then_some(max_dist)
}

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    bit: u32,
}

impl BitReader<'_> {
    fn bits(&mut self, n: u32) -> Option<u32> {
        let mut v = 0;
        for i in 0..n {
            let b = (self.data.get(self.pos)? >> self.bit) & 1;
            v |= u32::from(b) << i;
            self.bit += 1;
            if self.bit == 8 {
                self.bit = 0;
                self.pos += 1;
            }
        }
        Some(v)
    }

    fn align(&mut self) {
        if self.bit > 0 {
            self.bit = 0;
            self.pos += 1;
        }
    }
}

/// A canonical Huffman decoding table (counts per length and symbols by code).
struct Huffman {
    counts: [u16; 16],
    symbols: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Option<Huffman> {
        let mut counts = [0u16; 16];
        for &l in lengths {
            counts[usize::from(l)] += 1;
        }
        counts[0] = 0;
        let mut offs = [0u16; 16];
        for l in 1..16 {
            offs[l] = offs[l - 1] + counts[l - 1];
        }
        let mut symbols = vec![0u16; lengths.len()];
        for (s, &l) in lengths.iter().enumerate() {
            if l > 0 {
                symbols[usize::from(offs[usize::from(l)])] = s as u16;
                offs[usize::from(l)] += 1;
            }
        }
        Some(Huffman { counts, symbols })
    }

    fn decode(&self, r: &mut BitReader<'_>) -> Option<u16> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= r.bits(1)? as i32;
            let count = i32::from(self.counts[len]);
            if code - count < first {
                return self.symbols.get((index + code - first) as usize).copied();
            }
            index += count;
            first += count;
            first <<= 1;
            code <<= 1;
        }
        None
    }
}

fn dynamic_tables(r: &mut BitReader<'_>) -> Option<(Huffman, Huffman)> {
    const ORDER: [usize; 19] = [
        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
    ];
    let hlit = r.bits(5)? as usize + 257;
    let hdist = r.bits(5)? as usize + 1;
    let hclen = r.bits(4)? as usize + 4;
    let mut cl = [0u8; 19];
    for &i in ORDER.iter().take(hclen) {
        cl[i] = r.bits(3)? as u8;
    }
    let clh = Huffman::new(&cl)?;
    let mut lens = vec![0u8; hlit + hdist];
    let mut i = 0;
    while i < lens.len() {
        let sym = clh.decode(r)?;
        let (val, rep) = match sym {
            0..=15 => (sym as u8, 1),
            16 => (*lens.get(i.checked_sub(1)?)?, 3 + r.bits(2)? as usize),
            17 => (0, 3 + r.bits(3)? as usize),
            18 => (0, 11 + r.bits(7)? as usize),
            _ => return None,
        };
        lens.get_mut(i..i + rep)?.fill(val);
        i += rep;
    }
    Some((Huffman::new(&lens[..hlit])?, Huffman::new(&lens[hlit..])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text-like with repeats far apart (beyond 4 KiB) and near.
    fn sample(n: usize) -> Vec<u8> {
        super::window_tests::tests_sample(n, 0)
    }

    #[test]
    fn fixed_window_streams_inflate_and_never_reach_past_4k() {
        for n in [1, 3, 100, 4096, 16384, 65536] {
            let input = sample(n);
            let mut out = vec![0u8; n + 64];
            let len = compress_fixed_window(&input, &mut out).expect("fits");
            let mut back = vec![0u8; n];
            assert!(
                Inflater::new()
                    .expect("inflater")
                    .inflate_exact(&out[..len], &mut back)
            );
            assert_eq!(back, input);
            let mut back2 = vec![0u8; n];
            let d = inflate_max_distance(&out[..len], &mut back2).expect("valid");
            assert_eq!(back2, input);
            assert!(d <= WINDOW_4K, "{n}: distance {d}");
            if n >= 16384 {
                assert!(len < n / 2, "{n}: compresses ({len})");
            }
        }
        // Incompressible input does not fit an output capped at the input size.
        let mut x = 1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut out = vec![0u8; 4095];
        assert_eq!(compress_fixed_window(&noise, &mut out), None);
    }

    #[test]
    fn the_checking_inflater_sees_libdeflate_reach_past_4k_on_large_inputs() {
        let input = sample(65536);
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::new(9).expect("lvl"));
        let mut out = vec![0u8; 65536];
        let len = c.deflate_compress(&input, &mut out).expect("fits");
        let mut back = vec![0u8; input.len()];
        let d = inflate_max_distance(&out[..len], &mut back).expect("valid dynamic stream");
        assert_eq!(back, input);
        assert!(d > WINDOW_4K, "libdeflate uses its 32 KiB window: {d}");
        // Stored blocks, and garbage.
        let mut stored = vec![0x01, 3, 0, 0xfc, 0xff, b'a', b'b', b'c'];
        let mut three = [0u8; 3];
        assert_eq!(inflate_max_distance(&stored, &mut three), Some(0));
        assert_eq!(&three, b"abc");
        stored[3] = 0;
        assert_eq!(inflate_max_distance(&stored, &mut three), None);
        assert_eq!(inflate_max_distance(&[0xff; 16], &mut [0u8; 64]), None);
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;
    use crate::codec::{Codecs, EncodeParams, Level};
    use crate::page::{PageKey, PageSize};
    use crate::pages::{PageList, PageListMut};
    use pagewire_protocol::CodecId;

    /// deflate-4k at 64 KiB pages: every page's stream stays within 4 KiB of history
    /// and round-trips through the software decoder; plain deflate reaches further.
    pub(super) fn tests_sample(n: usize, seed: u32) -> Vec<u8> {
        let words = [
            "page", "guest", "memory", "frame", "deflate", "window", "iaa", "\n",
        ];
        let mut v = Vec::with_capacity(n);
        let mut x = 12345u32 + seed;
        while v.len() < n {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            v.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
            v.push(b' ');
        }
        v.truncate(n);
        v
    }

    #[test]
    fn deflate_4k_honours_the_window_at_64k_pages() {
        let ps = PageSize::new(65536).expect("page size");
        // Text (compressible within 4 KiB) alternating with one 4 KiB block of noise
        // that repeats every 8 KiB: only a window past 4 KiB can reuse the noise.
        let mut x = 1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut pages = Vec::new();
        for k in 0..16 {
            let text = tests_sample(4096, k);
            pages.extend_from_slice(&text);
            pages.extend_from_slice(&noise);
        }
        let mut src = PageList::new(ps);
        src.push_slice(&pages, PageKey(0)).expect("pages");
        let mut codecs = Codecs::new();
        let mut far = 0;
        for codec in [CodecId::DEFLATE_4K, CodecId::DEFLATE] {
            let mut payload = vec![0u8; crate::max_payload_len(2, ps)];
            let mut lengths = Vec::new();
            let out = codecs
                .encode(
                    &EncodeParams::new(codec, Level(9)),
                    &src,
                    None,
                    &mut payload,
                    &mut lengths,
                )
                .expect("encode");
            assert_eq!(out.codec, codec);
            let mut pos = 0;
            for &len in &lengths {
                let len = len as usize;
                assert!(len < 65536, "{codec}: the page shrinks");
                let mut page = vec![0u8; 65536];
                let d = inflate_max_distance(&payload[pos..pos + len], &mut page).expect("valid");
                if codec == CodecId::DEFLATE_4K {
                    assert!(d <= WINDOW_4K, "distance {d}");
                } else {
                    far = far.max(d);
                }
                pos += len;
            }
            let mut back = vec![0u8; pages.len()];
            let mut dst = PageListMut::new(ps);
            dst.push_slice(&mut back, PageKey(0)).expect("pages");
            codecs
                .decode(codec, &payload[..out.payload_len], &lengths, &mut dst)
                .expect("decode");
            drop(dst);
            assert!(back == pages);
        }
        assert!(
            far > WINDOW_4K,
            "plain deflate used its 32 KiB window ({far})"
        );
    }
}

#[cfg(test)]
mod accept_tests {
    use super::*;
    use crate::codec::Codecs;
    use crate::page::{PageKey, PageSize};
    use crate::pages::PageListMut;
    use pagewire_protocol::CodecId;

    /// A non-final stored block of `data` (≤ 65535 bytes), as IAA writes when a
    /// block does not compress.
    fn stored(data: &[u8]) -> Vec<u8> {
        let n = data.len() as u16;
        let mut v = vec![0x00];
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&(!n).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn software_inflate_accepts_fixed_dynamic_and_stored_deflate_4k_pages() {
        let page = |seed: u8| -> Vec<u8> { (0..4096u32).map(|i| (i / 7) as u8 ^ seed).collect() };
        let pages = [page(1), page(2), page(3)];
        let mut fixed = vec![0u8; 4096];
        let n = compress_fixed_window(&pages[0], &mut fixed).expect("fixed fits");
        fixed.truncate(n);
        assert_eq!(fixed[0] & 0b111, 0b011, "BFINAL, fixed Huffman");
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::new(9).expect("lvl"));
        let mut dynamic = vec![0u8; 4096];
        let n = c.deflate_compress(&pages[1], &mut dynamic).expect("fits");
        dynamic.truncate(n);
        assert_eq!(dynamic[0] & 0b111, 0b101, "BFINAL, dynamic Huffman");
        // A stored block of the first 1000 bytes, then a final fixed block.
        let mut stored = stored(&pages[2][..1000]);
        let mut rest = vec![0u8; 4096];
        let n = compress_fixed_window(&pages[2][1000..], &mut rest).expect("fits");
        stored.extend_from_slice(&rest[..n]);
        assert!(stored.len() < 4096);
        let payload = [fixed.clone(), dynamic.clone(), stored.clone()].concat();
        let lengths = [
            fixed.len() as u32,
            dynamic.len() as u32,
            stored.len() as u32,
        ];
        let mut back = vec![0u8; 3 * 4096];
        let mut dst = PageListMut::new(PageSize::KIB4);
        dst.push_slice(&mut back, PageKey(0)).expect("pages");
        Codecs::new()
            .decode(CodecId::DEFLATE_4K, &payload, &lengths, &mut dst)
            .expect("every block type decodes");
        drop(dst);
        assert_eq!(back, pages.concat());
    }
}
