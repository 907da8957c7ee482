//! Pre-allocated, recycled byte buffers with shared ownership.
//!
//! A [`BufPool`] allocates all its buffers when it is built. [`BufPool::take`] hands
//! out an [`EngineBuf`], a reference-counted handle: the codec writes the buffer while it
//! holds the only handle, then clones of the handle go to whoever still needs the
//! bytes (the transport until its send completes, a retransmit queue...). When the
//! last handle is dropped the buffer goes back to the pool. Taking and returning are a
//! lock-free stack operation and an atomic count; nothing is allocated. All the handles
//! of one taken buffer share one strong count of the pool, so cloning a handle, or
//! dropping one that is not the last, is one atomic operation. The free list
//! is a stack, so the buffer taken next is the one returned last, still warm in the
//! cache. Buffers are allocated zeroed and left for the kernel to map on first use:
//! touching every page when the pool was built cost 45 ms per channel at 128-page
//! frames on a 2-core machine, before any page could move, and the LIFO free list
//! keeps reusing the few buffers actually in flight, so only those are ever mapped.

use core::cell::UnsafeCell;
use core::fmt;
use core::ops::Deref;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::Arc;

struct Slot {
    refs: AtomicUsize,
    /// Written only through the unique handle (`refs == 1` and `&mut EngineBuf`).
    data: UnsafeCell<Box<[u8]>>,
    /// Valid bytes; written only through the unique handle.
    len: UnsafeCell<usize>,
}

/// A lock-free LIFO of slot indices (a Treiber stack over a fixed array). The head
/// packs a generation tag with the top index, so a pop that raced with a pop and a
/// push of the same index fails its compare-and-swap instead of corrupting the list.
/// A push or a pop is one compare-and-swap; the length is counted only when asked.
struct IndexStack {
    /// `tag << 32 | (index + 1)`; index part 0 means empty.
    head: AtomicU64,
    next: Box<[AtomicU32]>,
}

impl IndexStack {
    fn new(capacity: usize) -> IndexStack {
        IndexStack {
            head: AtomicU64::new(0),
            next: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn push(&self, idx: u32) {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            self.next[idx as usize].store(head as u32, Ordering::Relaxed);
            let new = ((head >> 32).wrapping_add(1) << 32) | u64::from(idx + 1);
            match self
                .head
                .compare_exchange_weak(head, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
    }

    fn pop(&self) -> Option<u32> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let top = head as u32;
            if top == 0 {
                return None;
            }
            let idx = top - 1;
            let next = self.next[idx as usize].load(Ordering::Relaxed);
            let new = ((head >> 32).wrapping_add(1) << 32) | u64::from(next);
            match self
                .head
                .compare_exchange_weak(head, new, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => return Some(idx),
                Err(h) => head = h,
            }
        }
    }

    /// The indices on the stack, counted by walking it: exact when no other thread
    /// pushes or pops meanwhile, a bounded estimate otherwise (diagnostics only).
    fn len(&self) -> usize {
        let mut top = self.head.load(Ordering::Acquire) as u32;
        let mut n = 0;
        while top != 0 && n < self.next.len() {
            n += 1;
            top = self.next[(top - 1) as usize].load(Ordering::Relaxed);
        }
        n
    }
}

struct Shared {
    slots: Box<[Slot]>,
    free: IndexStack,
    buf_len: usize,
}

// SAFETY: a slot's `UnsafeCell`s are written only by the holder of its unique handle
// (`refs == 1`, through `&mut EngineBuf`) and read through shared handles otherwise; the
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
    /// When `count` is `u32::MAX` or more.
    pub fn new(count: usize, buf_len: usize) -> BufPool {
        let count32 = u32::try_from(count)
            .ok()
            .filter(|&c| c < u32::MAX)
            .expect("a pool holds fewer than u32::MAX buffers");
        let slots: Box<[Slot]> = (0..count)
            .map(|_| {
                let data = vec![0u8; buf_len].into_boxed_slice();
                Slot {
                    refs: AtomicUsize::new(0),
                    data: UnsafeCell::new(data),
                    len: UnsafeCell::new(0),
                }
            })
            .collect();
        let free = IndexStack::new(count);
        for i in (0..count32).rev() {
            free.push(i);
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
    pub fn take(&self) -> Option<EngineBuf> {
        let idx = self.shared.free.pop()?;
        let slot = &self.shared.slots[idx as usize];
        slot.refs.store(1, Ordering::Relaxed);
        let mut buf = EngineBuf {
            shared: PoolRef::new(self.shared.clone()),
            idx,
        };
        buf.set_len_unique(0);
        Some(buf)
    }

    /// Buffers not in use, counted by walking the free list (up to the pool's size):
    /// exact when no other thread takes or returns a buffer meanwhile, an estimate
    /// otherwise. For statistics and tests, not for the per-frame path.
    pub fn available(&self) -> usize {
        self.shared.free.len()
    }

    /// Whether `buf` is one of this pool's buffers.
    pub fn owns(&self, buf: &EngineBuf) -> bool {
        core::ptr::eq(Arc::as_ptr(&self.shared), buf.shared.0.as_ptr())
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

/// One strong count of a pool's [`Shared`], owned together by every handle to one
/// taken buffer: taken with the buffer, released by the last of its handles to drop.
/// So cloning or dropping a handle that is not the last touches one atomic (the
/// buffer's count), not two.
#[derive(Clone, Copy)]
struct PoolRef(NonNull<Shared>);

impl PoolRef {
    fn new(shared: Arc<Shared>) -> PoolRef {
        let ptr = Arc::into_raw(shared).cast_mut();
        // SAFETY: `Arc::into_raw` never returns null.
        PoolRef(unsafe { NonNull::new_unchecked(ptr) })
    }

    /// The pool.
    ///
    /// # Safety
    /// The strong count this reference stands for must not have been released: a
    /// live [`EngineBuf`] holding it guarantees that.
    unsafe fn get<'a>(self) -> &'a Shared {
        // SAFETY: the count the caller vouches for keeps the allocation alive.
        unsafe { self.0.as_ref() }
    }

    /// Releases the strong count.
    ///
    /// # Safety
    /// Called once per count, by the last handle of the buffer, which does not use the
    /// reference afterwards.
    unsafe fn release(self) {
        // SAFETY: the count was taken by `Arc::into_raw` in `new` and is released once.
        unsafe { Arc::decrement_strong_count(self.0.as_ptr()) }
    }
}

/// A shared handle to a pool buffer: derefs to its valid bytes; the buffer returns
/// to its pool when the last handle drops.
pub struct EngineBuf {
    shared: PoolRef,
    idx: u32,
}

// SAFETY: a handle is an `Arc<Shared>` shared by the buffer's handles (see `PoolRef`);
// `Shared` is `Send + Sync`, and the handle's own accesses follow the slot rules.
unsafe impl Send for EngineBuf {}
// SAFETY: as above; `&EngineBuf` only reads the slot.
unsafe impl Sync for EngineBuf {}

impl EngineBuf {
    /// A buffer holding `bytes`, in a pool of its own. This allocates: it is for
    /// tests, tools and cold paths, not for the per-frame path.
    pub fn from_vec(bytes: Vec<u8>) -> EngineBuf {
        let len = bytes.len();
        let shared = Arc::new(Shared {
            slots: Box::new([Slot {
                refs: AtomicUsize::new(1),
                data: UnsafeCell::new(bytes.into_boxed_slice()),
                len: UnsafeCell::new(len),
            }]),
            free: IndexStack::new(1),
            buf_len: len,
        });
        EngineBuf {
            shared: PoolRef::new(shared),
            idx: 0,
        }
    }

    #[inline]
    fn pool(&self) -> &Shared {
        // SAFETY: this handle is alive, so the last handle of its buffer has not
        // dropped and the shared strong count is held.
        unsafe { self.shared.get() }
    }

    #[inline]
    fn slot(&self) -> &Slot {
        &self.pool().slots[self.idx as usize]
    }

    /// The buffer's full size.
    pub fn capacity(&self) -> usize {
        self.pool().buf_len
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

impl Deref for EngineBuf {
    type Target = [u8];

    #[inline]
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

impl Clone for EngineBuf {
    fn clone(&self) -> EngineBuf {
        self.slot().refs.fetch_add(1, Ordering::Relaxed);
        EngineBuf {
            shared: self.shared,
            idx: self.idx,
        }
    }
}

impl Drop for EngineBuf {
    fn drop(&mut self) {
        let refs = &self.slot().refs;
        // The only handle needs no read-modify-write: no other can appear (a clone
        // needs a handle), and the acquiring load orders every other handle's use
        // before its decrement (release) ahead of the buffer's return.
        let last = if refs.load(Ordering::Acquire) == 1 {
            refs.store(0, Ordering::Relaxed);
            true
        } else if refs.fetch_sub(1, Ordering::Release) == 1 {
            fence(Ordering::Acquire);
            true
        } else {
            false
        };
        if last {
            self.pool().free.push(self.idx);
            // SAFETY: this is the buffer's last handle, and it is gone after this.
            unsafe { self.shared.release() };
        }
    }
}

impl fmt::Debug for EngineBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuf")
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
    fn the_last_returned_buffer_is_taken_first() {
        let pool = BufPool::new(3, 8);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        let b_idx = b.idx;
        drop(a);
        drop(b);
        assert_eq!(pool.take().unwrap().idx, b_idx);
    }

    #[test]
    fn stack_survives_concurrent_take_and_return() {
        let pool = BufPool::new(8, 8);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(mut b) = pool.take() {
                            assert!(b.get_mut().is_some(), "a taken buffer must be unique");
                            let c = b.clone();
                            drop(b);
                            drop(c);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.available(), 8);
        let all: Vec<_> = (0..8).map(|_| pool.take().unwrap()).collect();
        let mut idx: Vec<u32> = all.iter().map(|b| b.idx).collect();
        idx.sort_unstable();
        assert_eq!(idx, (0..8).collect::<Vec<_>>());
        assert!(pool.take().is_none());
    }

    /// Every handle of a taken buffer shares one strong count of the pool: the pool
    /// outlives its owner while a handle lives, and is freed with the last one.
    #[test]
    fn buffers_keep_their_pool_alive_until_the_last_handle() {
        let pool = BufPool::new(2, 8);
        let weak = Arc::downgrade(&pool.shared);
        let mut a = pool.take().unwrap();
        a.get_mut().unwrap().fill(5);
        assert!(a.set_len(8));
        let b = a.clone();
        let c = pool.take().unwrap();
        assert_eq!(weak.strong_count(), 3, "the pool and one per taken buffer");
        drop(pool);
        drop(c);
        assert_eq!(weak.strong_count(), 1);
        drop(a);
        assert_eq!(&b[..], &[5; 8]);
        assert_eq!(weak.strong_count(), 1);
        drop(b);
        assert_eq!(weak.strong_count(), 0, "freed with the last handle");
        let solo = EngineBuf::from_vec(vec![1; 4]);
        let solo2 = solo.clone();
        drop(solo);
        assert_eq!(&solo2[..], &[1; 4]);
    }

    #[test]
    fn from_vec_is_standalone() {
        let mut b = EngineBuf::from_vec(vec![1, 2, 3]);
        assert_eq!(&b[..], &[1, 2, 3]);
        assert!(b.set_len(2));
        assert_eq!(&b[..], &[1, 2]);
        assert!(!b.set_len(4));
    }
}
