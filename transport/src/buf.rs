//! Memory a channel sends from and receives into: guest memory regions, buffer pools,
//! and the payload slices that point into them.
//!
//! Guest memory is *volatile*: on the source the guest keeps running and may change a
//! page while it is being sent. No `&[u8]` is ever built over guest memory here; bytes
//! move between guest memory and sockets through raw `iovec`s or explicit
//! `copy_nonoverlapping`, and a [`GuestSlice`] keeps its region mapped (it holds a
//! reference to it) until the channel reports the send complete.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::mman::{self, MapFlags, ProtFlags};

/// An anonymous private mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) len: usize,
}

impl Mapping {
    pub(crate) fn new(len: usize) -> std::io::Result<Self> {
        let len = NonZeroUsize::new(len).unwrap_or(NonZeroUsize::MIN);
        // SAFETY: a fresh private anonymous mapping with no address hint; no existing
        // memory is affected.
        let ptr = unsafe {
            mman::mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }?;
        Ok(Self {
            ptr: ptr.cast(),
            len: len.get(),
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // A failed munmap leaves nothing to undo, so its result is ignored.
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing refers to the
        // mapping any more (every user holds an `Arc` to its owner).
        let _ = unsafe { mman::munmap(self.ptr.cast(), self.len) };
    }
}

static NEXT_MEMORY_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
struct GuestInner {
    ptr: NonNull<u8>,
    len: usize,
    id: u64,
    _owned: Option<Mapping>,
}

// SAFETY: the region is plain memory; `GuestMemory::new`'s contract makes the caller
// responsible for its validity from any thread, and this type only hands out raw
// pointers and explicit copies, never references.
unsafe impl Send for GuestInner {}
// SAFETY: as above; shared access only produces raw pointers.
unsafe impl Sync for GuestInner {}

/// One contiguous range of guest memory (one region of the VM), registered once per
/// session with the channels that send from or receive into it.
///
/// Cloning is cheap (a reference count); the memory stays valid while any clone or
/// [`GuestSlice`] lives.
#[derive(Clone, Debug)]
pub struct GuestMemory {
    inner: Arc<GuestInner>,
}

impl GuestMemory {
    /// Wraps memory the VMM owns.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be mapped readable and writable, and must stay mapped until
    /// this value, its clones and every [`GuestSlice`] of it are dropped (a channel
    /// holds slices until the kernel or NIC has released them). On a destination, nothing
    /// else may read or write a page while a channel places received bytes into it.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        Self {
            inner: Arc::new(GuestInner {
                ptr,
                len,
                id: NEXT_MEMORY_ID.fetch_add(1, Ordering::Relaxed),
                _owned: None,
            }),
        }
    }

    /// Allocates `len` bytes of zeroed anonymous memory (what a destination, a test or a
    /// benchmark uses as guest memory).
    ///
    /// # Errors
    /// The `mmap` error.
    pub fn anonymous(len: usize) -> std::io::Result<Self> {
        let map = Mapping::new(len)?;
        Ok(Self {
            inner: Arc::new(GuestInner {
                ptr: map.ptr,
                len,
                id: NEXT_MEMORY_ID.fetch_add(1, Ordering::Relaxed),
                _owned: Some(map),
            }),
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Start address (for registration with the kernel or a NIC).
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.ptr.as_ptr()
    }

    /// A process-unique id, used to find the registration that covers a slice.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The bytes `offset..offset + len`, or `None` when they are not inside the region.
    pub fn slice(&self, offset: usize, len: usize) -> Option<GuestSlice> {
        let end = offset.checked_add(len)?;
        (end <= self.inner.len).then(|| GuestSlice {
            memory: self.clone(),
            offset,
            len,
        })
    }

    /// Copies `src` into the region at `offset` (a volatile-safe copy, no reference to
    /// guest memory is formed).
    ///
    /// # Panics
    /// When the range is outside the region.
    pub fn write(&self, offset: usize, src: &[u8]) {
        let s = self
            .slice(offset, src.len())
            .expect("write inside the region");
        // SAFETY: the range is inside the region (checked by `slice`), which is valid
        // for writes by `GuestMemory::new`'s contract; `src` cannot overlap guest memory
        // borrowed by no one.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), s.as_ptr(), src.len()) }
    }

    /// Copies bytes of the region at `offset` into `dst`.
    ///
    /// # Panics
    /// When the range is outside the region.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        let s = self
            .slice(offset, dst.len())
            .expect("read inside the region");
        // SAFETY: the range is inside the region, valid for reads; `dst` is a distinct
        // Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), dst.as_mut_ptr(), dst.len()) }
    }
}

/// A byte range of a [`GuestMemory`] region, holding the region alive.
#[derive(Clone, Debug)]
pub struct GuestSlice {
    memory: GuestMemory,
    offset: usize,
    len: usize,
}

impl GuestSlice {
    /// First byte.
    pub fn as_ptr(&self) -> *mut u8 {
        // Inside the region by construction.
        self.memory.as_ptr().wrapping_add(self.offset)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset inside its region.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The region.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}

#[derive(Debug)]
struct PoolInner {
    map: Mapping,
    slot_size: usize,
    slots: usize,
    free: Mutex<Vec<u32>>,
    id: u64,
}

// SAFETY: the mapping is only reached through `PoolBuf`s, each of which owns one slot
// exclusively; the free list is behind a mutex.
unsafe impl Send for PoolInner {}
// SAFETY: as above.
unsafe impl Sync for PoolInner {}

/// A pool of fixed-size buffers in one mapping, so a channel can register the whole
/// pool once (io_uring fixed buffers, an RDMA memory region) and send any of its
/// buffers without per-send pinning.
#[derive(Clone, Debug)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

impl BufferPool {
    /// `slots` buffers of `slot_size` bytes each.
    ///
    /// # Errors
    /// `mmap`'s error, or `InvalidInput` when a size is zero or they overflow.
    pub fn new(slots: usize, slot_size: usize) -> std::io::Result<Self> {
        let total = slots
            .checked_mul(slot_size)
            .filter(|&t| t > 0 && u32::try_from(slots).is_ok())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let map = Mapping::new(total)?;
        Ok(Self {
            inner: Arc::new(PoolInner {
                map,
                slot_size,
                slots,
                free: Mutex::new((0..slots as u32).rev().collect()),
                id: NEXT_MEMORY_ID.fetch_add(1, Ordering::Relaxed),
            }),
        })
    }

    /// A free buffer, or `None` when every buffer is in use (wait for completions).
    pub fn take(&self) -> Option<PoolBuf> {
        let slot = self.inner.free.lock().ok()?.pop()?;
        Some(PoolBuf {
            pool: self.inner.clone(),
            slot,
            len: 0,
        })
    }

    /// Buffers not in use.
    pub fn available(&self) -> usize {
        self.inner.free.lock().map_or(0, |f| f.len())
    }

    /// Size of each buffer.
    pub fn slot_size(&self) -> usize {
        self.inner.slot_size
    }

    /// The whole mapping, for registration: `(start, length)`.
    pub fn region(&self) -> (*mut u8, usize) {
        (
            self.inner.map.ptr.as_ptr(),
            self.inner.slots * self.inner.slot_size,
        )
    }

    /// A process-unique id, used to find the registration that covers a buffer.
    pub fn id(&self) -> u64 {
        self.inner.id
    }
}

/// One buffer of a [`BufferPool`], owned exclusively; it returns to the pool on drop.
#[derive(Debug)]
pub struct PoolBuf {
    pool: Arc<PoolInner>,
    slot: u32,
    len: usize,
}

impl PoolBuf {
    fn base(&self) -> *mut u8 {
        // slot < slots, so the offset is inside the mapping.
        self.pool
            .map
            .ptr
            .as_ptr()
            .wrapping_add(self.slot as usize * self.pool.slot_size)
    }

    /// The filled part.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len <= slot_size`; the slot is owned by `self` alone, so no one
        // writes it while this shared borrow lives.
        unsafe { std::slice::from_raw_parts(self.base(), self.len) }
    }

    /// The whole buffer, to fill; then call [`Self::set_len`].
    pub fn spare_mut(&mut self) -> &mut [u8] {
        // SAFETY: the slot is inside the mapping and owned exclusively by `self`; the
        // mapping is zero-initialised, so every byte is initialised.
        unsafe { std::slice::from_raw_parts_mut(self.base(), self.pool.slot_size) }
    }

    /// Sets the filled length.
    ///
    /// # Panics
    /// When `len` exceeds the slot size.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.pool.slot_size, "PoolBuf length beyond its slot");
        self.len = len;
    }

    /// Filled length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The id of the pool the buffer belongs to.
    pub fn pool_id(&self) -> u64 {
        self.pool.id
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            free.push(self.slot);
        }
    }
}

/// One payload slice of an outgoing frame. The channel owns it until the send has
/// completed (for zero-copy sends: until the kernel or NIC has released the memory)
/// and then hands it back in a [`Completed`](crate::Completed).
#[derive(Debug)]
#[non_exhaustive]
pub enum Payload {
    /// A buffer from a pool (compressed pages, for example).
    Pool(PoolBuf),
    /// Pages straight from guest memory.
    Guest(GuestSlice),
    /// Bytes in an ordinary vector (control data, tests).
    Bytes(Vec<u8>),
    /// A buffer owned by another crate (for example a codec engine's output pool,
    /// wrapped with [`Bytes::from_owner`](bytes::Bytes::from_owner)), kept alive by the
    /// channel until the send completes: a `Bytes` never moves or changes its bytes, so
    /// the kernel may read them until then. Never registered with io_uring, so sent
    /// with a plain (unregistered) zero-copy or copying send.
    Foreign(bytes::Bytes),
    /// A buffer owned by another crate, kept in place with no allocation and handed
    /// back as its own type ([`Owned::take`](crate::Owned::take)) in the
    /// send's [`Completed`](crate::Completed), so its owner can reuse it at once. Sent
    /// like [`Payload::Foreign`].
    Owned(crate::Owned),
}

impl Payload {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Pool(b) => b.len(),
            Self::Guest(s) => s.len(),
            Self::Bytes(v) => v.len(),
            Self::Foreign(f) => f.len(),
            Self::Owned(o) => o.len(),
        }
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start address, for building an `iovec` or a send descriptor.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        match self {
            Self::Pool(b) => b.base(),
            Self::Guest(s) => s.as_ptr(),
            Self::Bytes(v) => v.as_ptr(),
            Self::Foreign(f) => f.as_ptr(),
            Self::Owned(o) => o.as_ptr(),
        }
    }

    /// The registration key of the memory this slice lies in (`None` for plain bytes).
    pub(crate) fn memory_id(&self) -> Option<u64> {
        match self {
            Self::Pool(b) => Some(b.pool_id()),
            Self::Guest(s) => Some(s.memory().id()),
            Self::Bytes(_) | Self::Foreign(_) | Self::Owned(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_of_empty_buffers_is_refused() {
        for (slots, size) in [(1 << 31, 0), (0, 4096), (1, 0)] {
            let e = BufferPool::new(slots, size).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{slots} {size}");
        }
    }

    #[test]
    fn pool_buffers_return_on_drop_and_are_disjoint() {
        let pool = BufferPool::new(3, 4096).unwrap();
        let mut a = pool.take().unwrap();
        let mut b = pool.take().unwrap();
        a.spare_mut().fill(1);
        b.spare_mut().fill(2);
        a.set_len(10);
        assert_eq!(a.as_slice(), &[1; 10]);
        assert_eq!(pool.available(), 1);
        let _c = pool.take().unwrap();
        assert!(pool.take().is_none());
        drop(a);
        assert_eq!(pool.available(), 1);
        b.set_len(4096);
        assert!(b.as_slice().iter().all(|&x| x == 2));
    }

    #[test]
    fn guest_slices_are_bounds_checked() {
        let g = GuestMemory::anonymous(8192).unwrap();
        assert!(g.slice(4096, 4096).is_some());
        assert!(g.slice(4097, 4096).is_none());
        assert!(g.slice(usize::MAX, 2).is_none());
        g.write(100, b"abc");
        let mut out = [0; 3];
        g.read(100, &mut out);
        assert_eq!(&out, b"abc");
        let s = g.slice(100, 3).unwrap();
        drop(g);
        // The slice keeps the mapping alive.
        // SAFETY: the slice holds the region, 3 bytes at its start are readable.
        let first = unsafe { *s.as_ptr() };
        assert_eq!(first, b'a');
    }
}
