//! Pre-allocated, recycled byte buffers with shared ownership.
//!
//! A [`BufPool`] allocates all its buffers when it is built. [`BufPool::take`] hands
//! out a [`PoolBuf`], a reference-counted handle: the codec writes the buffer while it
//! holds the only handle, then clones of the handle go to whoever still needs the
//! bytes (the transport until its send completes, a retransmit queue...). When the
//! last handle is dropped the buffer goes back to the pool. Taking and returning are a
//! lock-free queue operation and an atomic count; nothing is allocated.

use core::cell::UnsafeCell;
use core::fmt;
use core::ops::Deref;
use core::sync::atomic::{AtomicUsize, Ordering, fence};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

struct Slot {
    refs: AtomicUsize,
    /// Written only through the unique handle (`refs == 1` and `&mut PoolBuf`).
    data: UnsafeCell<Box<[u8]>>,
    /// Valid bytes; written only through the unique handle.
    len: UnsafeCell<usize>,
}

struct Shared {
    slots: Box<[Slot]>,
    free: ArrayQueue<u32>,
    buf_len: usize,
}

// SAFETY: a slot's `UnsafeCell`s are written only by the holder of its unique handle
// (`refs == 1`, through `&mut PoolBuf`) and read through shared handles otherwise; the
// reference count's acquire/release ordering and the free queue's synchronisation
// order those accesses across threads.
unsafe impl Sync for Shared {}
// SAFETY: as above; the buffers themselves are plain bytes.
unsafe impl Send for Shared {}

/// A fixed set of equally sized buffers (see the module documentation).
#[derive(Clone)]
pub struct BufPool {
    shared: Arc<Shared>,
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("buffers", &self.buffers())
            .field("available", &self.available())
            .field("buf_len", &self.buf_len())
            .finish()
    }
}

impl BufPool {
    /// Allocates `count` buffers of `buf_len` bytes each (zeroed).
    ///
    /// # Panics
    /// When `count` exceeds `u32::MAX`.
    pub fn new(count: usize, buf_len: usize) -> BufPool {
        let count32 = u32::try_from(count).expect("a pool holds at most u32::MAX buffers");
        let slots: Box<[Slot]> = (0..count)
            .map(|_| Slot {
                refs: AtomicUsize::new(0),
                data: UnsafeCell::new(vec![0u8; buf_len].into_boxed_slice()),
                len: UnsafeCell::new(0),
            })
            .collect();
        let free = ArrayQueue::new(count.max(1));
        for i in 0..count32 {
            // The queue has room for every index.
            let _ = free.push(i);
        }
        BufPool {
            shared: Arc::new(Shared {
                slots,
                free,
                buf_len,
            }),
        }
    }

    /// A free buffer, empty (`len() == 0`) and uniquely owned, or `None` when all are
    /// in use.
    pub fn take(&self) -> Option<PoolBuf> {
        let idx = self.shared.free.pop()?;
        let slot = &self.shared.slots[idx as usize];
        slot.refs.store(1, Ordering::Relaxed);
        let mut buf = PoolBuf {
            shared: self.shared.clone(),
            idx,
        };
        buf.set_len_unique(0);
        Some(buf)
    }

    /// Buffers not in use.
    pub fn available(&self) -> usize {
        self.shared.free.len()
    }

    /// All buffers of the pool.
    pub fn buffers(&self) -> usize {
        self.shared.slots.len()
    }

    /// The size of each buffer.
    pub fn buf_len(&self) -> usize {
        self.shared.buf_len
    }
}

/// A shared handle to a pool buffer: derefs to its valid bytes; the buffer returns
/// to its pool when the last handle drops.
pub struct PoolBuf {
    shared: Arc<Shared>,
    idx: u32,
}

impl PoolBuf {
    /// A buffer holding `bytes`, in a pool of its own. This allocates: it is for
    /// tests, tools and cold paths, not for the per-frame path.
    pub fn from_vec(bytes: Vec<u8>) -> PoolBuf {
        let len = bytes.len();
        let shared = Arc::new(Shared {
            slots: Box::new([Slot {
                refs: AtomicUsize::new(1),
                data: UnsafeCell::new(bytes.into_boxed_slice()),
                len: UnsafeCell::new(len),
            }]),
            free: ArrayQueue::new(1),
            buf_len: len,
        });
        PoolBuf { shared, idx: 0 }
    }

    fn slot(&self) -> &Slot {
        &self.shared.slots[self.idx as usize]
    }

    /// The buffer's full size.
    pub fn capacity(&self) -> usize {
        self.shared.buf_len
    }

    /// Whether this is the only handle, so the buffer may be written.
    pub fn is_unique(&self) -> bool {
        self.slot().refs.load(Ordering::Acquire) == 1
    }

    /// The whole buffer (all `capacity()` bytes) for writing, when this is the only
    /// handle.
    pub fn get_mut(&mut self) -> Option<&mut [u8]> {
        if !self.is_unique() {
            return None;
        }
        // SAFETY: `refs == 1` and we hold `&mut self`: no other handle exists that
        // could read or write the slot, and none can be created while the borrow lives.
        Some(unsafe { &mut (&mut *self.slot().data.get())[..] })
    }

    /// Sets how many bytes are valid; `false` (and no change) when the handle is
    /// shared or `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> bool {
        if !self.is_unique() || len > self.capacity() {
            return false;
        }
        self.set_len_unique(len);
        true
    }

    fn set_len_unique(&mut self, len: usize) {
        // SAFETY: callers hold the unique handle (`refs == 1`, `&mut self`), so no
        // other thread reads `len` concurrently.
        unsafe { *self.slot().len.get() = len };
    }
}

impl Deref for PoolBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        let slot = self.slot();
        // SAFETY: writes happen only through a unique handle; while `self` is borrowed
        // shared, no unique `&mut` access can exist. `len <= capacity` is kept by
        // `set_len`.
        unsafe {
            let len = *slot.len.get();
            &(&*slot.data.get())[..len]
        }
    }
}

impl Clone for PoolBuf {
    fn clone(&self) -> PoolBuf {
        self.slot().refs.fetch_add(1, Ordering::Relaxed);
        PoolBuf {
            shared: self.shared.clone(),
            idx: self.idx,
        }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if self.slot().refs.fetch_sub(1, Ordering::Release) == 1 {
            fence(Ordering::Acquire);
            // Each index is in the queue at most once and the queue holds them all,
            // so the push cannot fail.
            let _ = self.shared.free.push(self.idx);
        }
    }
}

impl fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuf")
            .field("idx", &self.idx)
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_returns_only_after_the_last_handle() {
        let pool = BufPool::new(2, 16);
        let mut a = pool.take().unwrap();
        assert_eq!(pool.available(), 1);
        a.get_mut().unwrap()[..3].copy_from_slice(b"abc");
        assert!(a.set_len(3));
        assert_eq!(&a[..], b"abc");
        let b = a.clone();
        assert!(a.get_mut().is_none());
        assert!(!a.set_len(1));
        drop(a);
        assert_eq!(pool.available(), 1);
        assert_eq!(&b[..], b"abc");
        drop(b);
        assert_eq!(pool.available(), 2);
        let _c = pool.take().unwrap();
        let _d = pool.take().unwrap();
        assert!(pool.take().is_none());
    }

    #[test]
    fn handles_cross_threads() {
        let pool = BufPool::new(4, 8);
        let mut handles = Vec::new();
        for t in 0..4u8 {
            let mut buf = pool.take().unwrap();
            buf.get_mut().unwrap().fill(t);
            buf.set_len(8);
            let copy = buf.clone();
            handles.push(std::thread::spawn(move || {
                assert!(copy.iter().all(|&b| b == t));
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(pool.available(), 4);
    }

    #[test]
    fn from_vec_is_standalone() {
        let mut b = PoolBuf::from_vec(vec![1, 2, 3]);
        assert_eq!(&b[..], &[1, 2, 3]);
        assert!(b.set_len(2));
        assert_eq!(&b[..], &[1, 2]);
        assert!(!b.set_len(4));
    }
}
