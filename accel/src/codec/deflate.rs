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
