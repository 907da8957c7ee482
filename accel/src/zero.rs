//! Zero-page scan at memory speed.
//!
//! [`is_zero`] tells whether a buffer (normally one guest page) is all zeros. It first
//! reads a few sampled words spread over the buffer, so a page with data anywhere
//! common exits after a handful of loads; then it ORs the whole buffer together with
//! wide loads (AVX2 when the CPU has it, detected at run time, else a portable loop
//! over `u64` words that the compiler vectorises with the baseline SIMD) and checks the
//! accumulator every 512 bytes, so a page whose data sits late also exits early.
//!
//! # Guest memory
//! Guest memory is volatile: a vCPU may write it while we read it. [`is_zero_raw`] takes
//! a raw pointer and reads only through raw-pointer loads (SIMD loads or unaligned word
//! reads), never through a `&[u8]` that would promise the compiler the bytes do not
//! change. A concurrent write can only make the answer stale (the page was zero when a
//! word was read and is no longer, or the reverse); the caller's dirty tracking covers
//! that, exactly as it covers a page written just after the scan.

/// Which implementation of the wide OR reduction runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ZeroKernel {
    /// Unaligned `u64` words, eight accumulators; runs on every target.
    Portable,
    /// 256-bit AVX2 loads, four accumulators (x86_64 with AVX2 only).
    Avx2,
}

impl ZeroKernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> ZeroKernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                return ZeroKernel::Avx2;
            }
        }
        ZeroKernel::Portable
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            ZeroKernel::Portable => true,
            ZeroKernel::Avx2 => ZeroKernel::detect() == ZeroKernel::Avx2,
        }
    }
}

/// Whether every byte of `buf` is zero, with the fastest kernel this CPU has.
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: a slice is valid for reads of its whole length.
    unsafe { is_zero_raw(buf.as_ptr(), buf.len()) }
}

/// Whether every byte of the `len` bytes at `ptr` is zero, with the fastest kernel this
/// CPU has.
///
/// The memory may be written concurrently by another thread or a vCPU: such a write
/// only makes the answer stale (see the module documentation).
///
/// # Safety
/// `ptr..ptr + len` must be mapped and readable for the whole call (for guest memory:
/// the region stays mapped). It need not be aligned, initialised by Rust, or free of
/// concurrent writers.
pub unsafe fn is_zero_raw(ptr: *const u8, len: usize) -> bool {
    // SAFETY: forwarded from this function's contract; `detect` only returns kernels
    // this CPU supports.
    unsafe { is_zero_with(ZeroKernel::detect(), ptr, len) }
}

/// [`is_zero_raw`] with a chosen kernel; a kernel the CPU lacks falls back to
/// [`ZeroKernel::Portable`].
///
/// # Safety
/// As for [`is_zero_raw`].
pub unsafe fn is_zero_with(kernel: ZeroKernel, ptr: *const u8, len: usize) -> bool {
    // SAFETY: the caller guarantees `ptr..ptr+len` is readable.
    if !unsafe { samples_zero(ptr, len) } {
        return false;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        ZeroKernel::Avx2 if kernel.is_available() => {
            // SAFETY: AVX2 is present (checked just above); the range is readable
            // (caller's contract).
            unsafe { avx2::is_zero(ptr, len) }
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable.
        _ => unsafe { portable_is_zero(ptr, len) },
    }
}

/// Reads eight words spread over the buffer; `false` as soon as one is non-zero.
///
/// # Safety
/// `ptr..ptr+len` must be readable.
#[inline(always)]
unsafe fn samples_zero(ptr: *const u8, len: usize) -> bool {
    if len < 64 {
        return true;
    }
    let step = (len - 8) / 7;
    let mut acc = 0u64;
    for i in 0..8 {
        // SAFETY: `i * step + 8 <= 7 * (len - 8) / 7 + 8 <= len`, inside the readable
        // range; `read_unaligned` has no alignment requirement.
        acc |= unsafe { ptr.add(i * step).cast::<u64>().read_unaligned() };
    }
    acc == 0
}

/// How many bytes the kernels OR together before testing the accumulator.
const CHUNK: usize = 512;

/// # Safety
/// `ptr..ptr+len` must be readable.
unsafe fn portable_is_zero(ptr: *const u8, len: usize) -> bool {
    let mut off = 0;
    while off + CHUNK <= len {
        let mut acc = [0u64; 8];
        let mut i = 0;
        while i < CHUNK {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: `off + i + 8 * k + 8 <= off + CHUNK <= len`.
                *a |= unsafe { ptr.add(off + i + 8 * k).cast::<u64>().read_unaligned() };
            }
            i += 64;
        }
        if acc.iter().fold(0, |x, y| x | y) != 0 {
            return false;
        }
        off += CHUNK;
    }
    let mut acc = 0u8;
    while off < len {
        // SAFETY: `off < len`.
        acc |= unsafe { ptr.add(off).read() };
        off += 1;
    }
    acc == 0
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::{
        __m256i, _mm256_loadu_si256, _mm256_or_si256, _mm256_setzero_si256, _mm256_testz_si256,
    };

    use super::CHUNK;

    /// # Safety
    /// The CPU must support AVX2 and `ptr..ptr+len` must be readable.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn is_zero(ptr: *const u8, len: usize) -> bool {
        let mut off = 0;
        while off + CHUNK <= len {
            let mut a0 = _mm256_setzero_si256();
            let mut a1 = _mm256_setzero_si256();
            let mut a2 = _mm256_setzero_si256();
            let mut a3 = _mm256_setzero_si256();
            let mut i = 0;
            while i < CHUNK {
                let p = ptr.wrapping_add(off + i).cast::<__m256i>();
                // SAFETY: `off + i + 128 <= off + CHUNK <= len`, so the four 32-byte
                // loads stay inside the readable range; `loadu` needs no alignment.
                unsafe {
                    a0 = _mm256_or_si256(a0, _mm256_loadu_si256(p));
                    a1 = _mm256_or_si256(a1, _mm256_loadu_si256(p.add(1)));
                    a2 = _mm256_or_si256(a2, _mm256_loadu_si256(p.add(2)));
                    a3 = _mm256_or_si256(a3, _mm256_loadu_si256(p.add(3)));
                }
                i += 128;
            }
            let acc = _mm256_or_si256(_mm256_or_si256(a0, a1), _mm256_or_si256(a2, a3));
            if _mm256_testz_si256(acc, acc) == 0 {
                return false;
            }
            off += CHUNK;
        }
        // SAFETY: `off <= len`, so the rest is inside the caller's readable range.
        unsafe { super::portable_is_zero(ptr.add(off), len - off) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernels() -> Vec<ZeroKernel> {
        let mut k = vec![ZeroKernel::Portable];
        if ZeroKernel::Avx2.is_available() {
            k.push(ZeroKernel::Avx2);
        }
        k
    }

    fn check(kernel: ZeroKernel, buf: &[u8]) -> bool {
        // SAFETY: a slice is readable over its length.
        unsafe { is_zero_with(kernel, buf.as_ptr(), buf.len()) }
    }

    #[test]
    fn every_single_set_byte_is_found_by_every_kernel() {
        for kernel in kernels() {
            for len in [0usize, 1, 7, 63, 64, 65, 511, 512, 513, 4096, 4100] {
                let mut buf = vec![0u8; len + 3];
                // Unaligned start too.
                for start in [0usize, 3] {
                    let page = &mut buf[start..start + len];
                    assert!(check(kernel, page), "{kernel:?} len {len}");
                    for pos in 0..len {
                        page[pos] = 0x80;
                        assert!(!check(kernel, page), "{kernel:?} len {len} pos {pos}");
                        page[pos] = 0;
                    }
                }
            }
        }
    }

    #[test]
    fn default_entry_points_agree() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        // SAFETY: the vector is readable over its length.
        assert!(!unsafe { is_zero_raw(page.as_ptr(), page.len()) });
        assert!(ZeroKernel::detect().is_available());
    }
}
