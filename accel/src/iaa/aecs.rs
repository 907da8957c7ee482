//! The compress AECS (Analytics Engine Configuration and State) and the host side of
//! dynamic-Huffman compression on IAA.
//!
//! Dynamic Huffman on IAA takes two descriptors per page, as Intel QPL drives it:
//! 1. a compress descriptor in **statistics mode** (`STATS_MODE`, no AECS): the
//!    device parses the source into LZ77 tokens and writes their histogram to the
//!    destination, 1280 bytes laid out like the AECS's table region (286
//!    literal/length counts, 2 reserved, 30 distance counts, 2 reserved, `u32` each).
//!    The backend points that destination at the table region of the page's own AECS;
//! 2. the host builds a length-limited canonical Huffman code from the histogram
//!    (deflate's rules, codes at most 15 bits), writes each symbol's entry into the
//!    AECS table (bits 18–15 code length, bits 14–0 the code, most significant bit
//!    first as RFC 1951 gives it) and the block header (BFINAL, BTYPE 10, the
//!    code-length code and the run-length coded lengths) into the AECS **output
//!    accumulator**, whose bits the device emits before any token;
//! 3. a compress descriptor that reads the AECS (`READ_SRC2_AECS`): the device writes
//!    the accumulator's bits, the tokens with the table's codes and, on `APPEND_EOB`,
//!    the table's end-of-block code, then flushes the last byte. The result is one
//!    complete raw deflate stream (one final dynamic block).
//!
//! Compress AECS layout (1568 bytes, 32-byte aligned, little-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | CRC |
//! | 4 | 4 | XOR checksum |
//! | 8 | 20 | reserved |
//! | 28 | 4 | valid bits in the output accumulator |
//! | 32 | 256 | output accumulator |
//! | 288 | 1144 | literal/length entries 0..=285 (`u32`) |
//! | 1432 | 8 | reserved |
//! | 1440 | 120 | distance entries 0..=29 (`u32`) |
//! | 1560 | 8 | reserved |

use core::cell::UnsafeCell;

use crate::codec::deflate::BitWriter;

/// Size of the compress AECS with its Huffman table.
pub const AECS_SIZE: usize = 1568;
/// Offset of the valid-bit count of the output accumulator.
pub const ACCUM_BITS_OFFSET: usize = 28;
/// Offset of the output accumulator.
pub const ACCUM_OFFSET: usize = 32;
/// Size of the output accumulator.
pub const ACCUM_SIZE: usize = 256;
/// Offset of the table region (the literal/length entries; a histogram in the same
/// shape is what statistics mode writes).
pub const TABLE_OFFSET: usize = 288;
/// Offset of the distance entries.
pub const DIST_OFFSET: usize = 1440;
/// Size of a statistics-mode histogram (and of the AECS table region).
pub const HISTOGRAM_SIZE: usize = 1280;
/// Literal/length symbols (0..=285).
pub const LL_SYMBOLS: usize = 286;
/// Distance codes (0..=29).
pub const D_SYMBOLS: usize = 30;
/// Longest code deflate allows.
pub const MAX_CODE_LEN: u8 = 15;

/// One table entry: bits 18–15 code length, bits 14–0 the code (MSB-first value).
pub fn entry(len: u8, code: u16) -> u32 {
    (u32::from(len & 0xf) << 15) | u32::from(code & 0x7fff)
}

/// An entry's `(length, code)`.
pub fn entry_parts(e: u32) -> (u8, u16) {
    (((e >> 15) & 0xf) as u8, (e & 0x7fff) as u16)
}

/// Literal/length and distance counts, as statistics mode reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// Literal/length symbol counts.
    pub ll: [u32; LL_SYMBOLS],
    /// Distance code counts.
    pub d: [u32; D_SYMBOLS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            ll: [0; LL_SYMBOLS],
            d: [0; D_SYMBOLS],
        }
    }
}

impl Histogram {
    /// Encodes it as statistics mode writes it (1280 bytes).
    pub fn to_bytes(&self) -> [u8; HISTOGRAM_SIZE] {
        let mut b = [0u8; HISTOGRAM_SIZE];
        for (i, v) in self.ll.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        let d0 = DIST_OFFSET - TABLE_OFFSET;
        for (i, v) in self.d.iter().enumerate() {
            b[d0 + i * 4..d0 + i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decodes the 1280 bytes statistics mode wrote.
    pub fn from_bytes(b: &[u8; HISTOGRAM_SIZE]) -> Histogram {
        let at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut h = Histogram::default();
        for (i, v) in h.ll.iter_mut().enumerate() {
            *v = at(i * 4);
        }
        for (i, v) in h.d.iter_mut().enumerate() {
            *v = at(DIST_OFFSET - TABLE_OFFSET + i * 4);
        }
        h
    }
}

/// A compress AECS in memory the device reads (and, in statistics mode through the
/// destination address, writes): 1568 bytes, 32-byte aligned.
#[repr(C, align(32))]
pub struct Aecs(UnsafeCell<[u8; AECS_SIZE]>);

// SAFETY: the bytes are reached through `&mut self` by the host, or by a device
// through the raw address while a descriptor naming it is in flight, during which
// the backend does not touch it (the submit contract).
unsafe impl Sync for Aecs {}
// SAFETY: as above; plain bytes.
unsafe impl Send for Aecs {}

impl Default for Aecs {
    fn default() -> Self {
        Aecs(UnsafeCell::new([0; AECS_SIZE]))
    }
}

impl core::fmt::Debug for Aecs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Aecs({} accumulator bits)", self.accum_bits())
    }
}

impl Aecs {
    /// The AECS address, for a descriptor's source 2.
    pub fn addr(&self) -> u64 {
        self.0.get() as u64
    }

    /// Where statistics mode should write its histogram: the table region.
    pub fn histogram_addr(&self) -> u64 {
        self.addr() + TABLE_OFFSET as u64
    }

    /// The bytes (no descriptor naming this AECS may be in flight).
    pub fn bytes(&self) -> &[u8; AECS_SIZE] {
        // SAFETY: no device writes while the host reads (the backend reads only
        // after the descriptor's record was written).
        unsafe { &*self.0.get() }
    }

    /// The bytes, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8; AECS_SIZE] {
        self.0.get_mut()
    }

    fn u32_at(&self, o: usize) -> u32 {
        let b = self.bytes();
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    /// Valid bits in the output accumulator.
    pub fn accum_bits(&self) -> u32 {
        self.u32_at(ACCUM_BITS_OFFSET)
    }

    /// Literal/length entry `sym`.
    pub fn ll_entry(&self, sym: usize) -> u32 {
        self.u32_at(TABLE_OFFSET + sym * 4)
    }

    /// Distance entry `code`.
    pub fn d_entry(&self, code: usize) -> u32 {
        self.u32_at(DIST_OFFSET + code * 4)
    }

    /// The histogram statistics mode wrote into the table region.
    pub fn histogram(&self) -> Histogram {
        let mut b = [0u8; HISTOGRAM_SIZE];
        b.copy_from_slice(&self.bytes()[TABLE_OFFSET..TABLE_OFFSET + HISTOGRAM_SIZE]);
        Histogram::from_bytes(&b)
    }

    /// Replaces the histogram in the table region with a dynamic Huffman code built
    /// from it and writes that block's header (final block) into the output
    /// accumulator. `false` when the header does not fit the accumulator (the
    /// caller compresses with the fixed code instead).
    pub fn load_dynamic(&mut self) -> bool {
        let mut h = self.histogram();
        h.ll[256] = h.ll[256].max(1); // the end-of-block code is always needed
        let ll = code_lengths(&h.ll, MAX_CODE_LEN);
        let d = code_lengths(&h.d, MAX_CODE_LEN);
        let b = self.bytes_mut();
        b[..TABLE_OFFSET + HISTOGRAM_SIZE].fill(0);
        let mut put = |off: usize, lens: &[u8]| {
            for (i, e) in canonical_codes(lens).iter().enumerate() {
                let v = entry(lens[i], *e);
                b[off + i * 4..off + i * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
        };
        put(TABLE_OFFSET, &ll);
        put(DIST_OFFSET, &d);
        let mut w = BitWriter::new(&mut b[ACCUM_OFFSET..ACCUM_OFFSET + ACCUM_SIZE]);
        if write_header(&mut w, &ll, &d).is_none() {
            return false;
        }
        let bits = w.bits_written() as u32;
        // Partial bytes sit in the writer's accumulator: flush them into the
        // accumulator bytes (the valid-bit count says how many matter).
        if w.finish().is_none() {
            return false;
        }
        b[ACCUM_BITS_OFFSET..ACCUM_BITS_OFFSET + 4].copy_from_slice(&bits.to_le_bytes());
        true
    }
}

/// Code lengths (at most `limit` bits) of a Huffman code for `freqs`: zero for
/// unused symbols, and at least two symbols get a code (deflate's decoders want a
/// complete code; an unused second symbol costs nothing). A tree deeper than
/// `limit` is rebuilt from halved frequencies (every used symbol keeps a count of at
/// least 1) until it fits: the code stays a complete Huffman code, and with all
/// counts at 1 any alphabet of up to `2^limit` symbols fits.
pub fn code_lengths(freqs: &[u32], limit: u8) -> Vec<u8> {
    let mut f: Vec<u64> = freqs.iter().map(|&x| u64::from(x)).collect();
    let mut used = f.iter().filter(|&&x| x > 0).count();
    for v in f.iter_mut() {
        if used >= 2 {
            break;
        }
        if *v == 0 {
            *v = 1;
            used += 1;
        }
    }
    loop {
        let lens = huffman_lengths(&f);
        if lens.iter().all(|&l| l <= u32::from(limit)) {
            return lens.iter().map(|&l| l as u8).collect();
        }
        for v in f.iter_mut().filter(|v| **v > 0) {
            *v = (*v >> 1).max(1);
        }
    }
}

/// Unlimited Huffman code lengths for `f` (at least two non-zero counts).
fn huffman_lengths(f: &[u64]) -> Vec<u32> {
    let mut syms: Vec<usize> = (0..f.len()).filter(|&i| f[i] > 0).collect();
    syms.sort_by_key(|&i| (f[i], i));
    let m = syms.len();
    let mut weight: Vec<u64> = syms.iter().map(|&i| f[i]).collect();
    weight.resize(2 * m, 0);
    let mut parent = vec![0usize; 2 * m];
    // Two queues: the sorted leaves, and the new nodes (created in weight order).
    let (mut leaf, mut node, mut next) = (0usize, m, m);
    let mut take = |next: usize, weight: &[u64]| {
        if leaf < m && (node >= next || weight[leaf] <= weight[node]) {
            leaf += 1;
            leaf - 1
        } else {
            node += 1;
            node - 1
        }
    };
    while next < 2 * m - 1 {
        let a = take(next, &weight);
        let b = take(next, &weight);
        weight[next] = weight[a] + weight[b];
        parent[a] = next;
        parent[b] = next;
        next += 1;
    }
    let mut depth = vec![0u32; 2 * m];
    for k in (0..2 * m - 2).rev() {
        depth[k] = depth[parent[k]] + 1;
    }
    let mut lens = vec![0u32; f.len()];
    for (k, &sym) in syms.iter().enumerate() {
        lens[sym] = depth[k];
    }
    lens
}

/// Canonical codes (RFC 1951 §3.2.2) for `lens`, most significant bit first.
pub fn canonical_codes(lens: &[u8]) -> Vec<u16> {
    let mut count = [0u16; 16];
    for &l in lens {
        count[usize::from(l)] += 1;
    }
    count[0] = 0;
    let mut next = [0u16; 16];
    let mut code = 0u16;
    for bits in 1..16 {
        code = (code + count[bits - 1]) << 1;
        next[bits] = code;
    }
    lens.iter()
        .map(|&l| {
            if l == 0 {
                return 0;
            }
            let c = next[usize::from(l)];
            next[usize::from(l)] += 1;
            c
        })
        .collect()
}

/// The order code-length code lengths are sent in (RFC 1951 §3.2.7).
const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// Writes a final dynamic block's header for these lengths.
fn write_header(w: &mut BitWriter<'_>, ll: &[u8], d: &[u8]) -> Option<()> {
    let hlit = ll.iter().rposition(|&l| l > 0)?.max(256) + 1;
    let hdist = d.iter().rposition(|&l| l > 0).unwrap_or(0) + 1;
    let all: Vec<u8> = ll[..hlit].iter().chain(&d[..hdist]).copied().collect();
    // Run-length code the lengths: (symbol 0..=18, extra value).
    let mut runs: Vec<(u8, u8)> = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let l = all[i];
        let mut run = 1;
        while i + run < all.len() && all[i + run] == l {
            run += 1;
        }
        let mut left = run;
        if l == 0 {
            while left >= 11 {
                let r = left.min(138);
                runs.push((18, (r - 11) as u8));
                left -= r;
            }
            if left >= 3 {
                runs.push((17, (left - 3) as u8));
                left = 0;
            }
        } else {
            runs.push((l, 0));
            left -= 1;
            while left >= 3 {
                let r = left.min(6);
                runs.push((16, (r - 3) as u8));
                left -= r;
            }
        }
        runs.extend(std::iter::repeat_n((l, 0), left));
        i += run;
    }
    let mut cl_freq = [0u32; 19];
    for &(s, _) in &runs {
        cl_freq[usize::from(s)] += 1;
    }
    let cl_lens = code_lengths(&cl_freq, 7);
    let cl_codes = canonical_codes(&cl_lens);
    let hclen = CL_ORDER
        .iter()
        .rposition(|&s| cl_lens[s] > 0)
        .unwrap_or(0)
        .max(3)
        + 1;
    w.put(1, 1)?; // BFINAL
    w.put(2, 2)?; // BTYPE 10: dynamic Huffman
    w.put((hlit - 257) as u32, 5)?;
    w.put((hdist - 1) as u32, 5)?;
    w.put((hclen - 4) as u32, 4)?;
    for &s in &CL_ORDER[..hclen] {
        w.put(u32::from(cl_lens[s]), 3)?;
    }
    for (s, extra) in runs {
        let s = usize::from(s);
        crate::codec::deflate::put_code(w, u32::from(cl_codes[s]), u32::from(cl_lens[s]))?;
        match s {
            16 => w.put(u32::from(extra), 2)?,
            17 => w.put(u32::from(extra), 3)?,
            18 => w.put(u32::from(extra), 7)?,
            _ => {}
        }
    }
    Some(())
}

#[cfg(test)]
#[path = "aecs_tests.rs"]
mod tests;
