//! Memory from qatlib's allocator (libusdm's `qaeMemAllocNUMA`: pinned, physically
//! contiguous, DMA-mapped), used only where the device reads memory the library
//! describes to it by physical address: session state and buffer-list metadata.
//! Guest pages and payloads are passed in place (the instance must have SVM).

use core::ffi::c_void;
use core::ptr::NonNull;
use std::sync::Arc;

use super::ffi::Lib;

/// An owned block of the library's pinned memory, freed on drop.
pub(crate) struct Pinned {
    lib: Arc<Lib>,
    ptr: NonNull<c_void>,
}

// SAFETY: plain memory with no thread affinity; `Pinned` is its only owner.
unsafe impl Send for Pinned {}
// SAFETY: `Pinned` hands out only a raw pointer; no shared access happens through it.
unsafe impl Sync for Pinned {}

impl Pinned {
    /// `len` zeroed bytes aligned to `align` (a power of two), or `None` when the
    /// library has none left.
    pub(crate) fn new(lib: &Arc<Lib>, len: usize, align: usize) -> Option<Pinned> {
        // SAFETY: plain allocation call; NULL means failure; node 0.
        let p = unsafe { (lib.qaeMemAllocNUMA)(len.max(1), 0, align) };
        let ptr = NonNull::new(p)?;
        // SAFETY: the block is `len` bytes long and ours alone.
        unsafe { core::ptr::write_bytes(ptr.as_ptr().cast::<u8>(), 0, len) };
        Some(Pinned {
            lib: lib.clone(),
            ptr,
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut c_void {
        self.ptr.as_ptr()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut p = self.ptr.as_ptr();
        // SAFETY: allocated by `qaeMemAllocNUMA` of the same library, freed once.
        unsafe { (self.lib.qaeMemFreeNUMA)(&mut p) };
    }
}
