//! The delta format of PROTOCOL.md ("Delta format"): XBZRLE-style records
//! `skip: uleb128, len: uleb128, len bytes`.

use super::CodecError;
use pagewire_protocol::CodecId;

/// Gaps of unchanged bytes at most this long are folded into the surrounding literal:
/// a new record would cost at least two header bytes.
const MERGE_GAP: usize = 2;

fn corrupt(detail: &'static str) -> CodecError {
    CodecError::Corrupt {
        codec: CodecId::DELTA,
        detail,
    }
}

/// Appends `v` as ULEB128 to `out[*pos..]`; `false` when it does not fit.
#[inline]
fn put_uleb(out: &mut [u8], pos: &mut usize, mut v: usize) -> bool {
    loop {
        let Some(slot) = out.get_mut(*pos) else {
            return false;
        };
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        *pos += 1;
        if v == 0 {
            *slot = byte;
            return true;
        }
        *slot = byte | 0x80;
    }
}

/// Reads a minimal ULEB128 not above `max`.
#[inline]
fn get_uleb(input: &[u8], pos: &mut usize, max: usize) -> Result<usize, CodecError> {
    let mut value: usize = 0;
    let mut shift = 0u32;
    loop {
        let Some(&byte) = input.get(*pos) else {
            return Err(corrupt("truncated uleb128"));
        };
        *pos += 1;
        if shift >= 35 {
            return Err(corrupt("uleb128 too long"));
        }
        value |= usize::from(byte & 0x7f) << shift;
        if value > max {
            return Err(corrupt("uleb128 value above page size"));
        }
        if byte & 0x80 == 0 {
            if byte == 0 && shift > 0 {
                return Err(corrupt("uleb128 longer than needed"));
            }
            return Ok(value);
        }
        shift += 7;
    }
}

/// Bytes the one-pass encoder reads per step: one cache line, eight words.
const BLOCK: usize = 64;

/// The records of a delta, written as the encoder finds the changed bytes in order.
struct Records {
    /// Output length so far.
    o: usize,
    /// Decoder position after the last record written.
    pos: usize,
    /// The open literal run, `start..end`, when `open`.
    start: usize,
    end: usize,
    open: bool,
    /// `false` once a record did not fit: the page goes raw.
    fits: bool,
}

impl Records {
    const fn new() -> Records {
        Records {
            o: 0,
            pos: 0,
            start: 0,
            end: 0,
            open: false,
            fits: true,
        }
    }

    /// Byte `p` differs (after every earlier changed byte). A gap of at most
    /// [`MERGE_GAP`] unchanged bytes since the open run's end is folded into it.
    #[inline]
    fn changed(&mut self, p: usize, page: &[u8], out: &mut [u8]) {
        if self.open && p - self.end <= MERGE_GAP {
            self.end = p + 1;
            return;
        }
        self.close(page, out);
        self.start = p;
        self.end = p + 1;
        self.open = true;
    }

    /// Writes the open run as a record, its literal taken from `page` (the new
    /// version, which holds those bytes already).
    #[inline]
    fn close(&mut self, page: &[u8], out: &mut [u8]) {
        if !self.open || !self.fits {
            return;
        }
        self.open = false;
        let (skip, len) = (self.start - self.pos, self.end - self.start);
        if !put_uleb(out, &mut self.o, skip) || !put_uleb(out, &mut self.o, len) {
            self.fits = false;
            return;
        }
        let Some(lit) = out.get_mut(self.o..self.o + len) else {
            self.fits = false;
            return;
        };
        lit.copy_from_slice(&page[self.start..self.end]);
        self.o += len;
        self.pos = self.end;
    }
}

/// The page kernels of the one-pass encoder.
trait Lanes {
    /// Whether the 64 bytes at `a` and at `b` are equal.
    ///
    /// # Safety
    /// Both ranges must be readable.
    unsafe fn equal64(a: *const u8, b: *const u8) -> bool;

    /// Reads the 16 bytes at `src` once; when they differ from the 16 at `dst`, writes
    /// them there. Returns one bit per byte that differed (bit `i` for byte `i`).
    ///
    /// # Safety
    /// `src` must be readable and `dst` writable for 16 bytes.
    unsafe fn update16(src: *const u8, dst: *mut u8) -> u32;
}

/// The kernels this target runs.
#[cfg(target_arch = "x86_64")]
type Native = sse2::Sse2;
#[cfg(not(target_arch = "x86_64"))]
type Native = words::Words;

/// 128-bit SSE2 kernels (every x86_64 CPU has SSE2).
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use core::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8,
        _mm_storeu_si128,
    };

    pub(super) struct Sse2;

    impl super::Lanes for Sse2 {
        #[inline(always)]
        unsafe fn equal64(a: *const u8, b: *const u8) -> bool {
            // SAFETY: both ranges are readable for 64 bytes (contract); `loadu` needs no
            // alignment, and SSE2 is part of x86_64.
            unsafe {
                let eq = |k: usize| {
                    _mm_cmpeq_epi8(
                        _mm_loadu_si128(a.add(16 * k).cast::<__m128i>()),
                        _mm_loadu_si128(b.add(16 * k).cast::<__m128i>()),
                    )
                };
                let all = _mm_and_si128(_mm_and_si128(eq(0), eq(1)), _mm_and_si128(eq(2), eq(3)));
                _mm_movemask_epi8(all) == 0xffff
            }
        }

        #[inline(always)]
        unsafe fn update16(src: *const u8, dst: *mut u8) -> u32 {
            // SAFETY: as the contract says; `loadu`/`storeu` need no alignment.
            unsafe {
                let new = _mm_loadu_si128(src.cast::<__m128i>());
                let old = _mm_loadu_si128(dst.cast::<__m128i>());
                let differ = !(_mm_movemask_epi8(_mm_cmpeq_epi8(new, old)) as u32) & 0xffff;
                if differ != 0 {
                    _mm_storeu_si128(dst.cast::<__m128i>(), new);
                }
                differ
            }
        }
    }
}

/// Unaligned `u64` word kernels, for any target (tested on x86_64 too).
#[cfg(any(test, not(target_arch = "x86_64")))]
mod words {
    pub(super) struct Words;

    /// One bit set (the byte's top bit) for each nonzero byte of `x`.
    #[inline(always)]
    const fn nonzero_bytes(x: u64) -> u64 {
        const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
        (((x & LOW7) + LOW7) | x) & !LOW7
    }

    impl super::Lanes for Words {
        #[inline(always)]
        unsafe fn equal64(a: *const u8, b: *const u8) -> bool {
            let mut acc = 0u64;
            for k in 0..8 {
                // SAFETY: `8 * k + 8 <= 64`, inside both readable ranges (contract).
                acc |= unsafe {
                    a.add(8 * k).cast::<u64>().read_unaligned()
                        ^ b.add(8 * k).cast::<u64>().read_unaligned()
                };
            }
            acc == 0
        }

        #[inline(always)]
        unsafe fn update16(src: *const u8, dst: *mut u8) -> u32 {
            let mut differ = 0u32;
            for h in 0..2 {
                // SAFETY: `8 * h + 8 <= 16`, inside both ranges (contract).
                let (new, old) = unsafe {
                    (
                        src.add(8 * h).cast::<u64>().read_unaligned(),
                        dst.add(8 * h).cast::<u64>().read_unaligned(),
                    )
                };
                let x = new ^ old;
                if x != 0 {
                    // SAFETY: as above, `dst` is writable.
                    unsafe { dst.add(8 * h).cast::<u64>().write_unaligned(new) };
                    // Little-endian: the byte at the lowest address is the least significant.
                    let mut nz = nonzero_bytes(x.to_le());
                    while nz != 0 {
                        differ |= 1 << (8 * h as u32 + nz.trailing_zeros() / 8);
                        nz &= nz - 1;
                    }
                }
            }
            differ
        }
    }
}

/// Writes the delta that turns the page in `old` into the page at `src` into `out`,
/// reading the new page in place and writing the lanes that changed (16 bytes; two
/// words in the portable kernel) over `old`. Returns the delta's length, or `None` when it would not fit in `out`
/// (the caller's threshold); either way `old` then holds exactly the bytes read, and
/// a returned delta turns the old version into them. An unchanged page gives
/// `Some(0)` and writes nothing.
///
/// This is the third way the crate reads guest memory (see [`crate::pages`], "Guest
/// memory"). A cache line is first compared as a whole; only when it differs are its
/// lanes read again, each once, and what is kept (the new cached version, and the
/// literals, copied from it) is exactly what that read returned. A concurrent write
/// can only make the page read a mix of old and new bytes, consistently.
///
/// # Safety
/// `src .. src + old.len()` must be readable and must not overlap `old` or `out`.
pub(crate) unsafe fn encode_over(old: &mut [u8], src: *const u8, out: &mut [u8]) -> Option<usize> {
    // SAFETY: the same contract.
    unsafe { encode_over_with::<Native>(old, src, out) }
}

/// [`encode_over`] with the kernels `L`.
///
/// # Safety
/// As [`encode_over`].
#[inline(always)]
unsafe fn encode_over_with<L: Lanes>(
    old: &mut [u8],
    src: *const u8,
    out: &mut [u8],
) -> Option<usize> {
    let n = old.len();
    let mut rec = Records::new();
    let mut off = 0;
    while off + BLOCK <= n {
        let block = &mut old[off..off + BLOCK];
        // SAFETY: `src + off .. + BLOCK` is inside the readable range (contract) and
        // `block` is 64 bytes of `old`.
        if unsafe { L::equal64(src.add(off), block.as_ptr()) } {
            off += BLOCK;
            continue;
        }
        let mut differ = [0u32; BLOCK / 16];
        for (k, d) in differ.iter_mut().enumerate() {
            // SAFETY: lane `k` of the block: 16 bytes inside both ranges.
            *d = unsafe { L::update16(src.add(off + 16 * k), block.as_mut_ptr().add(16 * k)) };
        }
        if rec.fits {
            for (k, &d) in differ.iter().enumerate() {
                let mut m = d;
                while m != 0 {
                    rec.changed(off + 16 * k + m.trailing_zeros() as usize, old, out);
                    m &= m - 1;
                }
            }
        }
        off += BLOCK;
    }
    // Page sizes are multiples of the block; a shorter tail goes byte by byte.
    while off < n {
        // SAFETY: `off < n`, inside the readable range.
        let b = unsafe { src.add(off).read() };
        if b != old[off] {
            old[off] = b;
            if rec.fits {
                rec.changed(off, old, out);
            }
        }
        off += 1;
    }
    rec.close(old, out);
    rec.fits.then_some(rec.o)
}

/// Checks `delta` against the format for a `page_size` page without writing.
fn validate(delta: &[u8], page_size: usize) -> Result<(), CodecError> {
    walk(delta, page_size, |_, _| {})
}

/// Walks the records, calling `f(position, literal)` for each.
#[inline]
fn walk(delta: &[u8], page_size: usize, mut f: impl FnMut(usize, &[u8])) -> Result<(), CodecError> {
    let mut i = 0usize;
    let mut pos = 0usize;
    let mut first = true;
    while i < delta.len() {
        let skip = get_uleb(delta, &mut i, page_size)?;
        if skip == 0 && !first {
            return Err(corrupt("record after the first with skip 0"));
        }
        let len = get_uleb(delta, &mut i, page_size)?;
        if len == 0 {
            return Err(corrupt("record with len 0"));
        }
        pos = pos
            .checked_add(skip)
            .filter(|&p| p <= page_size)
            .ok_or(corrupt("skip passes the page end"))?;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= page_size)
            .ok_or(corrupt("record passes the page end"))?;
        let lit_end = i.checked_add(len).ok_or(corrupt("truncated literal"))?;
        let lit = delta.get(i..lit_end).ok_or(corrupt("truncated literal"))?;
        f(pos, lit);
        i = lit_end;
        pos = end;
        first = false;
    }
    Ok(())
}

/// Applies `delta` to `page` in place. The whole delta is checked before the first
/// byte is written, so a corrupt delta leaves the page untouched.
pub(crate) fn apply(delta: &[u8], page: &mut [u8]) -> Result<(), CodecError> {
    let page_size = page.len();
    validate(delta, page_size)?;
    walk(delta, page_size, |pos, lit| {
        page[pos..pos + lit.len()].copy_from_slice(lit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two-pass encoder [`encode_over`] replaced, kept as its oracle: writes the
    /// delta that turns `old` into `new` into `out`, and returns its length, or `None`
    /// when it would not fit in `out`. An unchanged page gives `Some(0)`.
    ///
    /// `old` and `new` must have the same length.
    fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Option<usize> {
        debug_assert_eq!(old.len(), new.len());
        let n = old.len().min(new.len());
        let mut pos = 0usize; // decoder position after the last record
        let mut o = 0usize; // output length
        let mut i = 0usize;
        while i < n {
            // Skip equal bytes, a word at a time.
            while i + 8 <= n && old[i..i + 8] == new[i..i + 8] {
                i += 8;
            }
            while i < n && old[i] == new[i] {
                i += 1;
            }
            if i >= n {
                break;
            }
            // A literal run: extend while bytes differ or the equal gap is short.
            let start = i;
            let mut end = i + 1;
            loop {
                while end < n && old[end] != new[end] {
                    end += 1;
                }
                // `end` is at an equal byte (or the page end): look at the gap.
                let mut gap_end = end;
                while gap_end < n && gap_end - end <= MERGE_GAP && old[gap_end] == new[gap_end] {
                    gap_end += 1;
                }
                if gap_end < n && gap_end - end <= MERGE_GAP {
                    // Short gap followed by a difference: fold it in.
                    end = gap_end + 1;
                } else {
                    break;
                }
            }
            let skip = start - pos;
            let len = end - start;
            if !put_uleb(out, &mut o, skip) || !put_uleb(out, &mut o, len) {
                return None;
            }
            let lit = out.get_mut(o..o + len)?;
            lit.copy_from_slice(&new[start..end]);
            o += len;
            pos = end;
            i = end;
        }
        Some(o)
    }

    type Encoder = unsafe fn(&mut [u8], *const u8, &mut [u8]) -> Option<usize>;

    /// [`encode_over`] on a copy of `old`: the same answer as the oracle, byte for
    /// byte, and the copy then holds `new` whether or not the delta fit.
    fn one_pass(old: &[u8], new: &[u8], out: &mut [u8]) -> Option<usize> {
        let mut want = vec![0u8; out.len()];
        let expected = encode(old, new, &mut want);
        // Both kernels: this target's and the word kernels of other targets.
        let kernels: [Encoder; 2] = [encode_over, encode_over_with::<words::Words>];
        for (k, run) in kernels.into_iter().enumerate() {
            let mut cached = old.to_vec();
            // Nothing left by the kernel before can pass for this one's records.
            out.fill(0xa5);
            // SAFETY: `new` is a live slice as long as `cached`, separate from it and
            // `out`.
            let got = unsafe { run(&mut cached, new.as_ptr(), out) };
            assert_eq!(got, expected, "kernel {k} answers as the oracle");
            if let Some(n) = got {
                assert_eq!(out[..n], want[..n], "kernel {k} writes the same records");
            }
            assert!(cached == new, "kernel {k} caches the page read");
        }
        expected
    }

    fn roundtrip(old: &[u8], new: &[u8]) -> usize {
        let mut out = vec![0u8; old.len() * 2];
        let n = one_pass(old, new, &mut out).expect("fits");
        let mut page = old.to_vec();
        apply(&out[..n], &mut page).expect("applies");
        assert_eq!(page, new);
        n
    }

    #[test]
    fn unchanged_page_is_empty_delta() {
        let page = vec![7u8; 4096];
        assert_eq!(roundtrip(&page, &page), 0);
    }

    #[test]
    fn small_changes_make_small_deltas() {
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        new[0] = 1;
        new[100] = 2;
        new[102] = 3; // gap of one: folded
        new[4095] = 4;
        let n = roundtrip(&old, &new);
        assert!(n < 20, "{n}");
        let mut all = old.clone();
        all.iter_mut().for_each(|b| *b = 0xff);
        roundtrip(&old, &all);
    }

    #[test]
    fn records_follow_the_format() {
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        new[5] = 9;
        new[200] = 8;
        let mut out = vec![0u8; 64];
        let n = one_pass(&old, &new, &mut out).unwrap();
        // skip 5, len 1, [9]; skip 194, len 1, [8] (194 = 0xc2 0x01 in ULEB128).
        assert_eq!(&out[..n], &[5, 1, 9, 0xc2, 0x01, 1, 8]);
    }

    #[test]
    fn delta_that_does_not_fit_is_refused() {
        let old = vec![0u8; 4096];
        let new = vec![1u8; 4096];
        let mut out = vec![0u8; 100];
        assert_eq!(one_pass(&old, &new, &mut out), None);
    }

    #[test]
    fn malformed_deltas_are_rejected_without_writing() {
        let mut page = vec![0u8; 4096];
        let bad: &[&[u8]] = &[
            &[0, 0],                   // len 0
            &[0, 1],                   // truncated literal
            &[0, 1, 5, 0, 1, 6],       // second record with skip 0
            &[0x80, 0x00, 1, 1],       // non-minimal uleb
            &[0x81, 0x80, 0x01, 1, 1], // 16385 > page size
            &[0xff, 0x1f, 1, 1],       // skip 4095 + len 1 = 4096 ok, but then:
            &[0x80],                   // truncated uleb
            &[0x80, 0x20, 1, 1],       // skip 4096 then len 1 passes the end
        ];
        for (k, d) in bad.iter().enumerate() {
            let r = apply(d, &mut page);
            if k == 5 {
                assert!(r.is_ok(), "{k}");
                assert_eq!(page[4095], 1);
                page[4095] = 0;
                continue;
            }
            assert!(r.is_err(), "case {k} accepted");
            assert!(page.iter().all(|&b| b == 0), "case {k} wrote");
        }
    }

    /// A xorshift generator for the tests' pages.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Changes two bytes apart by a gap of `gap` equal bytes at lane and line
    /// boundaries of a 64 KiB page, past the 16,384 where a skip takes three ULEB128
    /// bytes, and at the last byte: the records the oracle writes, and a page they
    /// rebuild.
    #[test]
    fn gaps_fold_across_lanes_and_lines_on_a_large_page() {
        let len = 65536;
        let mut next = rng(7);
        let old: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        for gap in 0..=4usize {
            let mut new = old.clone();
            for at in [15usize, 63, 127, 1023, 20_000, 40_959, len - 2 - gap] {
                new[at] ^= 0x11;
                new[at + 1 + gap] ^= 0x22;
            }
            new[len - 1] ^= 0x44;
            let n = roundtrip(&old, &new);
            assert!(n > 0, "gap {gap}");
        }
    }

    /// Kernels that play a guest writing the page while the encoder reads it: after a
    /// line is compared, it is sometimes made equal to the cached line, or has a byte
    /// changed; around each lane's read, a byte of the line changes now and then.
    struct Racy<L>(core::marker::PhantomData<L>);

    std::thread_local! {
        static RACE: core::cell::Cell<u64> = const { core::cell::Cell::new(1) };
    }

    fn race() -> u64 {
        RACE.with(|r| {
            let mut x = r.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            r.set(x);
            x
        })
    }

    impl<L: Lanes> Lanes for Racy<L> {
        unsafe fn equal64(a: *const u8, b: *const u8) -> bool {
            // SAFETY: as the trait's contract.
            let equal = unsafe { L::equal64(a, b) };
            let dice = race();
            // SAFETY: in these tests `a` is the page being read, a live buffer the
            // test owns and lets the kernels write (the guest's writes); 64 bytes.
            unsafe {
                match dice % 4 {
                    0 => core::ptr::copy_nonoverlapping(b, a.cast_mut(), 64),
                    1 => *a.cast_mut().add((dice >> 8) as usize % 64) ^= 0x5a,
                    _ => {}
                }
            }
            equal
        }

        unsafe fn update16(src: *const u8, dst: *mut u8) -> u32 {
            let scribble = || {
                let dice = race();
                if dice.is_multiple_of(3) {
                    // SAFETY: `src` is 16 bytes of the test's own page (see above).
                    unsafe { *src.cast_mut().add((dice >> 8) as usize % 16) ^= 0xc3 };
                }
            };
            scribble();
            // SAFETY: as the trait's contract.
            let differ = unsafe { L::update16(src, dst) };
            scribble();
            differ
        }
    }

    /// With the page written while it is read, whatever the delta says and the cache
    /// keeps still agree: a delta that fits turns the old version into exactly the
    /// cached one, on both kernels, whole pages and a tail.
    #[test]
    fn a_page_written_while_it_is_read_leaves_cache_and_delta_agreeing() {
        let kernels: [Encoder; 2] = [
            encode_over_with::<Racy<Native>>,
            encode_over_with::<Racy<words::Words>>,
        ];
        let seeds = if cfg!(miri) { 3 } else { 1000 };
        let mut fitted = 0;
        for seed in 0..seeds {
            let mut next = rng(seed);
            let len = [4096, 8192, 4133][seed as usize % 3];
            let old: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for (k, run) in kernels.into_iter().enumerate() {
                RACE.with(|r| r.set(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1));
                let mut new = old.clone();
                for _ in 0..(next() % 40) {
                    let at = next() as usize % len;
                    new[at] = new[at].wrapping_add(1);
                }
                let mut cached = old.clone();
                let mut out = vec![0u8; len / 2];
                // SAFETY: `new` is the test's own buffer, as long as `cached` and
                // separate from it and `out`; the racing kernels write it through
                // this pointer only.
                let got = unsafe { run(&mut cached, new.as_mut_ptr().cast_const(), &mut out) };
                if let Some(n) = got {
                    let mut dest = old.clone();
                    apply(&out[..n], &mut dest).expect("applies");
                    assert!(
                        dest == cached,
                        "seed {seed}, kernel {k}: delta and cache differ"
                    );
                    fitted += 1;
                }
            }
        }
        assert!(
            fitted > seeds,
            "most deltas fit ({fitted} of {})",
            2 * seeds
        );
    }

    proptest::proptest! {
        // Miri checks the kernels' raw-pointer reads and writes on a few cases.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(if cfg!(miri) { 6 } else { 256 }))]

        /// Pages that differ sparsely, densely, in runs and at the edges, against every
        /// room in `out` from none to plenty: the one-pass encoder writes the oracle's
        /// records, refuses where it refuses, and always leaves the page read cached.
        #[test]
        fn one_pass_matches_the_two_pass_oracle(
            seed in proptest::prelude::any::<u64>(),
            changes in proptest::prop_oneof![0usize..8, 0usize..600],
            run in 1usize..40,
            room in 0usize..5000,
            // Page sizes, and lengths with a tail past the last whole line.
            len in proptest::prop_oneof![
                proptest::strategy::Just(4096usize),
                proptest::strategy::Just(8192),
                proptest::strategy::Just(65536),
                4000usize..4200,
            ],
        ) {
            let mut next = rng(seed);
            let old: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut new = old.clone();
            for _ in 0..changes {
                let at = next() as usize % len;
                for b in new.iter_mut().skip(at).take(run) {
                    *b = b.wrapping_add(1 + (next() % 255) as u8);
                }
            }
            let mut out = vec![0u8; room];
            if let Some(n) = one_pass(&old, &new, &mut out) {
                let mut page = old.clone();
                apply(&out[..n], &mut page).expect("applies");
                proptest::prop_assert!(page == new);
            }
        }
    }
}
