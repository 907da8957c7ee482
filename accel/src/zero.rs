//! Zero-page and uniform-page scan at memory speed.
//!
//! [`classify`] tells whether a buffer (normally one guest page) is all zeros, one
//! non-zero byte repeated (a *uniform* page, such as the 0xCC Linux writes into freed
//! memory), or data, in one pass: it compares every word with the buffer's first byte
//! repeated, so it costs what the zero scan costs. [`is_zero`] is the same scan
//! against zero. Both first
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

/// What a page holds, as far as the sender's encoding is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClass {
    /// Every byte is zero.
    Zero,
    /// Every byte is this one, which is not zero.
    Uniform(u8),
    /// Anything else.
    Data,
}

/// What `buf` holds, with the fastest kernel this CPU has (an empty buffer is zero).
pub fn classify(buf: &[u8]) -> PageClass {
    // SAFETY: a slice is valid for reads of its whole length.
    unsafe { classify_raw(buf.as_ptr(), buf.len()) }
}

/// What the `len` bytes at `ptr` hold, in one pass at the zero scan's speed.
///
/// The memory may be written concurrently by another thread or a vCPU: such a write
/// only makes the answer stale (see the module documentation).
///
/// # Safety
/// As for [`is_zero_raw`].
pub unsafe fn classify_raw(ptr: *const u8, len: usize) -> PageClass {
    // SAFETY: forwarded from this function's contract; `detect` only returns kernels
    // this CPU supports.
    unsafe { classify_with(ZeroKernel::detect(), ptr, len) }
}

/// [`classify_raw`] with a chosen kernel; a kernel the CPU lacks falls back to
/// [`ZeroKernel::Portable`].
///
/// # Safety
/// As for [`is_zero_raw`].
pub unsafe fn classify_with(kernel: ZeroKernel, ptr: *const u8, len: usize) -> PageClass {
    if len == 0 {
        return PageClass::Zero;
    }
    // SAFETY: `len > 0` and the caller guarantees the range is readable.
    let byte = unsafe { ptr.read_volatile() };
    // SAFETY: forwarded from the caller's contract.
    match unsafe { all_equal_with(kernel, ptr, len, byte) } {
        false => PageClass::Data,
        true if byte == 0 => PageClass::Zero,
        true => PageClass::Uniform(byte),
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
    // SAFETY: forwarded from the caller's contract.
    unsafe { all_equal_with(kernel, ptr, len, 0) }
}

/// Whether every byte of the range is `byte`: sampled words first, then the kernel.
///
/// # Safety
/// As for [`is_zero_raw`].
#[inline(always)]
unsafe fn all_equal_with(kernel: ZeroKernel, ptr: *const u8, len: usize, byte: u8) -> bool {
    // SAFETY: the caller guarantees `ptr..ptr+len` is readable.
    if !unsafe { samples_equal(ptr, len, byte) } {
        return false;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        ZeroKernel::Avx2 if kernel.is_available() => {
            // SAFETY: AVX2 is present (checked just above); the range is readable
            // (caller's contract).
            unsafe { avx2::all_equal(ptr, len, byte) }
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable.
        _ => unsafe { portable_all_equal(ptr, len, byte) },
    }
}

/// Reads eight words spread over the buffer; `false` as soon as one is not `byte`
/// repeated.
///
/// # Safety
/// `ptr..ptr+len` must be readable.
#[inline(always)]
unsafe fn samples_equal(ptr: *const u8, len: usize, byte: u8) -> bool {
    if len < 64 {
        return true;
    }
    let pattern = u64::from_ne_bytes([byte; 8]);
    let step = (len - 8) / 7;
    let mut acc = 0u64;
    for i in 0..8 {
        // SAFETY: `i * step + 8 <= 7 * (len - 8) / 7 + 8 <= len`, inside the readable
        // range; `read_unaligned` has no alignment requirement.
        acc |= unsafe { ptr.add(i * step).cast::<u64>().read_unaligned() } ^ pattern;
    }
    acc == 0
}

/// How many bytes the kernels OR together before testing the accumulator.
const CHUNK: usize = 512;

/// Whether every byte is `byte`: each word XORed with the byte repeated, ORed together.
///
/// # Safety
/// `ptr..ptr+len` must be readable.
unsafe fn portable_all_equal(ptr: *const u8, len: usize, byte: u8) -> bool {
    let pattern = u64::from_ne_bytes([byte; 8]);
    let mut off = 0;
    while off + CHUNK <= len {
        let mut acc = [0u64; 8];
        let mut i = 0;
        while i < CHUNK {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: `off + i + 8 * k + 8 <= off + CHUNK <= len`.
                let w = unsafe { ptr.add(off + i + 8 * k).cast::<u64>().read_unaligned() };
                *a |= w ^ pattern;
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
        acc |= unsafe { ptr.add(off).read() } ^ byte;
        off += 1;
    }
    acc == 0
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::{
        __m256i, _mm256_loadu_si256, _mm256_or_si256, _mm256_set1_epi8, _mm256_setzero_si256,
        _mm256_testz_si256, _mm256_xor_si256,
    };

    use super::CHUNK;

    /// # Safety
    /// The CPU must support AVX2 and `ptr..ptr+len` must be readable.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn all_equal(ptr: *const u8, len: usize, byte: u8) -> bool {
        let pattern = _mm256_set1_epi8(byte as i8);
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
                    let x = |v| _mm256_xor_si256(v, pattern);
                    a0 = _mm256_or_si256(a0, x(_mm256_loadu_si256(p)));
                    a1 = _mm256_or_si256(a1, x(_mm256_loadu_si256(p.add(1))));
                    a2 = _mm256_or_si256(a2, x(_mm256_loadu_si256(p.add(2))));
                    a3 = _mm256_or_si256(a3, x(_mm256_loadu_si256(p.add(3))));
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
        unsafe { super::portable_all_equal(ptr.add(off), len - off, byte) }
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

    fn class(kernel: ZeroKernel, buf: &[u8]) -> PageClass {
        // SAFETY: a slice is readable over its length.
        unsafe { classify_with(kernel, buf.as_ptr(), buf.len()) }
    }

    #[test]
    fn every_single_different_byte_breaks_a_uniform_page_for_every_kernel() {
        for kernel in kernels() {
            for len in [1usize, 7, 63, 64, 65, 511, 512, 513, 4096, 4100] {
                for fill in [0u8, 0xcc, 0xff, 0x01] {
                    let mut page = vec![fill; len];
                    let want = match fill {
                        0 => PageClass::Zero,
                        b => PageClass::Uniform(b),
                    };
                    assert_eq!(class(kernel, &page), want, "{kernel:?} len {len}");
                    for pos in 0..len {
                        page[pos] = fill ^ 0x10;
                        assert_eq!(
                            class(kernel, &page),
                            if len == 1 {
                                PageClass::Uniform(fill ^ 0x10)
                            } else {
                                PageClass::Data
                            },
                            "{kernel:?} len {len} pos {pos} fill {fill:#x}"
                        );
                        page[pos] = fill;
                    }
                }
            }
        }
        assert_eq!(classify(&[]), PageClass::Zero);
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
