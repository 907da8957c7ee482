//! POLYVAL (RFC 8452, 3) by carry-less multiplication, many blocks per reduction.
//!
//! POLYVAL of blocks `X1..Xn` under `H` is `S_n`, where `S_0 = 0` and `S_i =
//! dot(S_(i-1) + X_i, H)`, `dot(a, b) = a * b * x^-128` in GF(2^128) modulo `x^128 +
//! x^127 + x^126 + x^121 + 1`. Unrolled over `k` blocks, `S_k = dot(S_0 + X_1, H^k) +
//! dot(X_2, H^(k-1)) + ... + dot(X_k, H)`, with `H^j` the `dot` powers of `H`; `dot` is
//! bilinear, so the `k` products are summed unreduced and reduced once. [`Narrow`] takes
//! 8 blocks a step with `PCLMULQDQ` (three multiplications a block, Karatsuba), [`Wide`]
//! 16 with `VPCLMULQDQ` on 256-bit registers (two blocks an instruction). Both are
//! checked against the `polyval` crate's implementation in `super::tests`.

use std::arch::x86_64::*;

/// The 256-bit product `lo + mid * x^64 + hi * x^128` times `x^-128`, reduced.
#[target_feature(enable = "pclmulqdq,sse2")]
fn reduce(lo: __m128i, mid: __m128i, hi: __m128i) -> __m128i {
    let low = _mm_xor_si128(lo, _mm_slli_si128::<8>(mid));
    let high = _mm_xor_si128(hi, _mm_srli_si128::<8>(mid));
    // Two folds of 64 bits each by the polynomial's low terms (x^127 + x^126 + x^121
    // as 0xc2 << 56, and 1), the Montgomery reduction of AES-GCM-SIV.
    let poly = _mm_set_epi64x(0xc200_0000_0000_0000_u64 as i64, 1);
    let t = _mm_clmulepi64_si128::<0x10>(low, poly);
    let x = _mm_xor_si128(_mm_shuffle_epi32::<0x4e>(low), t);
    let t = _mm_clmulepi64_si128::<0x10>(x, poly);
    let x = _mm_xor_si128(_mm_shuffle_epi32::<0x4e>(x), t);
    _mm_xor_si128(high, x)
}

/// `dot(a, b)`.
#[target_feature(enable = "pclmulqdq,sse2")]
fn dot(a: __m128i, b: __m128i) -> __m128i {
    let lo = _mm_clmulepi64_si128::<0x00>(a, b);
    let hi = _mm_clmulepi64_si128::<0x11>(a, b);
    let mid = _mm_xor_si128(
        _mm_clmulepi64_si128::<0x01>(a, b),
        _mm_clmulepi64_si128::<0x10>(a, b),
    );
    reduce(lo, mid, hi)
}

/// One block from 16 bytes.
#[target_feature(enable = "sse2")]
fn load(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; the load has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

/// Swaps a block's two 64-bit halves and adds them: Karatsuba's middle operand.
#[target_feature(enable = "sse2")]
fn halves(a: __m128i) -> __m128i {
    _mm_xor_si128(a, _mm_shuffle_epi32::<0x4e>(a))
}

/// The blocks of a message after its last whole step, one `dot` each: `rest`
/// zero-padded, then `last`.
#[target_feature(enable = "pclmulqdq,sse2")]
fn tail(mut s: __m128i, rest: &[u8], last: &[u8; 16], h: __m128i) -> [u8; 16] {
    for b in rest.chunks(16) {
        let mut block = [0u8; 16];
        block[..b.len()].copy_from_slice(b);
        s = dot(_mm_xor_si128(s, load(&block)), h);
    }
    store(dot(_mm_xor_si128(s, load(last)), h))
}

/// The first `N` `dot` powers of `h`: `H^1` first.
#[target_feature(enable = "pclmulqdq,sse2")]
fn powers<const N: usize>(h: __m128i) -> [__m128i; N] {
    let mut p = [h; N];
    for i in 1..N {
        p[i] = dot(p[i - 1], h);
    }
    p
}

/// POLYVAL with `PCLMULQDQ`, 8 blocks a reduction. Only built by [`Narrow::new`], which
/// checks that the CPU has the instructions.
pub(super) struct Narrow {
    /// `H^8` down to `H^1`: step block `j` is multiplied by `pow[j]`.
    pow: [__m128i; 8],
    /// [`halves`] of each power.
    kar: [__m128i; 8],
}

impl Narrow {
    /// `None` when this CPU lacks `PCLMULQDQ`.
    pub(super) fn new(h: &[u8; 16]) -> Option<Narrow> {
        if !std::is_x86_feature_detected!("pclmulqdq") {
            return None;
        }
        // SAFETY: the CPU has PCLMULQDQ (checked above) and SSE2 (every x86_64 has).
        Some(unsafe { Self::build(h) })
    }

    #[target_feature(enable = "pclmulqdq,sse2")]
    fn build(h: &[u8; 16]) -> Narrow {
        let mut pow = powers::<8>(load(h));
        pow.reverse();
        Narrow {
            pow,
            kar: pow.map(|p| halves(p)),
        }
    }

    /// POLYVAL of `msg` zero-padded to whole blocks, then `last`.
    pub(super) fn hash(&self, msg: &[u8], last: &[u8; 16]) -> [u8; 16] {
        // SAFETY: `self` exists only where `new` found PCLMULQDQ.
        unsafe { self.hash_on(msg, last) }
    }

    #[target_feature(enable = "pclmulqdq,sse2")]
    fn hash_on(&self, msg: &[u8], last: &[u8; 16]) -> [u8; 16] {
        let mut s = _mm_setzero_si128();
        let (steps, rest) = msg.as_chunks::<128>();
        for step in steps {
            let z = _mm_setzero_si128();
            let (mut lo, mut mid, mut hi) = (z, z, z);
            for (j, b) in step.as_chunks::<16>().0.iter().enumerate() {
                let x = if j == 0 {
                    _mm_xor_si128(load(b), s)
                } else {
                    load(b)
                };
                lo = _mm_xor_si128(lo, _mm_clmulepi64_si128::<0x00>(x, self.pow[j]));
                hi = _mm_xor_si128(hi, _mm_clmulepi64_si128::<0x11>(x, self.pow[j]));
                let k = _mm_clmulepi64_si128::<0x00>(halves(x), self.kar[j]);
                mid = _mm_xor_si128(mid, k);
            }
            s = reduce(lo, _mm_xor_si128(mid, _mm_xor_si128(lo, hi)), hi);
        }
        tail(s, rest, last, self.pow[7])
    }
}

/// A block's 16 bytes.
#[target_feature(enable = "sse2")]
fn store(s: __m128i) -> [u8; 16] {
    let mut out = [0u8; 16];
    // SAFETY: `out` is 16 writable bytes; the store has no alignment requirement.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), s) };
    out
}

/// POLYVAL with `VPCLMULQDQ` on 256-bit registers, 16 blocks a reduction. Only built by
/// [`Wide::new`], which checks that the CPU has the instructions.
pub(super) struct Wide {
    /// Register `j` of a step holds blocks `2j` (low lane) and `2j + 1`: it is
    /// multiplied by `H^(16-2j)` and `H^(15-2j)`.
    pow: [__m256i; 8],
    /// [`halves`] of each power, lane by lane.
    kar: [__m256i; 8],
    /// `H` for the blocks after the last whole step.
    h: __m128i,
}

impl Wide {
    /// `None` when this CPU lacks `VPCLMULQDQ` or AVX2.
    pub(super) fn new(h: &[u8; 16]) -> Option<Wide> {
        let has = std::is_x86_feature_detected!("pclmulqdq")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("vpclmulqdq");
        // SAFETY: the CPU has every feature `build` enables (checked just above).
        has.then(|| unsafe { Self::build(h) })
    }

    #[target_feature(enable = "pclmulqdq,avx2,vpclmulqdq")]
    fn build(h: &[u8; 16]) -> Wide {
        let h = load(h);
        let p = powers::<16>(h);
        let pow: [__m256i; 8] =
            std::array::from_fn(|j| _mm256_set_m128i(p[14 - 2 * j], p[15 - 2 * j]));
        Wide {
            pow,
            kar: pow.map(|p| _mm256_xor_si256(p, _mm256_shuffle_epi32::<0x4e>(p))),
            h,
        }
    }

    /// POLYVAL of `msg` zero-padded to whole blocks, then `last`.
    pub(super) fn hash(&self, msg: &[u8], last: &[u8; 16]) -> [u8; 16] {
        // SAFETY: `self` exists only where `new` found every feature `hash_on` enables.
        unsafe { self.hash_on(msg, last) }
    }

    #[target_feature(enable = "pclmulqdq,avx2,vpclmulqdq")]
    fn hash_on(&self, msg: &[u8], last: &[u8; 16]) -> [u8; 16] {
        let mut s = _mm_setzero_si128();
        let (steps, rest) = msg.as_chunks::<256>();
        for step in steps {
            let z = _mm256_setzero_si256();
            let (mut lo, mut mid, mut hi) = (z, z, z);
            for (j, b) in step.as_chunks::<32>().0.iter().enumerate() {
                // SAFETY: `b` is 32 readable bytes; the load has no alignment requirement.
                let mut x = unsafe { _mm256_loadu_si256(b.as_ptr().cast()) };
                if j == 0 {
                    x = _mm256_xor_si256(x, _mm256_zextsi128_si256(s));
                }
                lo = _mm256_xor_si256(lo, _mm256_clmulepi64_epi128::<0x00>(x, self.pow[j]));
                hi = _mm256_xor_si256(hi, _mm256_clmulepi64_epi128::<0x11>(x, self.pow[j]));
                let xk = _mm256_xor_si256(x, _mm256_shuffle_epi32::<0x4e>(x));
                mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128::<0x00>(xk, self.kar[j]));
            }
            let fold = |v: __m256i| {
                _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v))
            };
            let (lo, mid, hi) = (fold(lo), fold(mid), fold(hi));
            s = reduce(lo, _mm_xor_si128(mid, _mm_xor_si128(lo, hi)), hi);
        }
        tail(s, rest, last, self.h)
    }
}
