//! [`Owned`]: a buffer of another crate's, carried by a channel without an allocation
//! and handed back as the type it was, so its owner can reuse it at once.

use std::any::TypeId;
use std::mem::MaybeUninit;

/// An owner whose bytes stay where they are, unchanged and readable, while an
/// [`Owned`] holds it.
///
/// # Safety
/// From [`Owned::new`] until [`Owned::take`] gives the value back or the `Owned` drops
/// it, however often the `Owned` moves:
/// - [`AsRef::as_ref`] returns the same bytes, at the same address and length: not
///   bytes stored inside the value itself, which move with it;
/// - nothing writes those bytes (no other handle to the same memory either), and they
///   stay readable.
///
/// A channel reads them asynchronously through the pointer taken when the value was
/// wrapped (with a zero-copy send, the kernel does, until it reports the memory
/// released). A channel that cannot learn that the kernel is done leaks the `Owned`
/// (the io_uring channel's drop, when the kernel never answers): the bytes must then
/// stay readable for the rest of the process, so the owner must keep its memory alive
/// itself, not borrow a mapping that someone else may unmap.
pub unsafe trait StableBytes: AsRef<[u8]> + Send + 'static {}

/// Room for an owner kept in place in an [`Owned`]: four words, word-aligned.
type Room = MaybeUninit<[usize; 4]>;

/// What an [`Owned`] knows of the type it holds.
struct Vtable {
    type_id: TypeId,
    /// Drops the owner kept in the room.
    drop: unsafe fn(*mut Room),
}

/// Drops the `T` kept in `room`.
///
/// # Safety
/// `room` holds an initialised `T`, never used again.
unsafe fn drop_owner<T>(room: *mut Room) {
    // SAFETY: as this function's contract.
    unsafe { room.cast::<T>().drop_in_place() }
}

/// Drops nothing: the owner was taken ([`Owned::take`]).
fn drop_none(_: *mut Room) {}

/// The type of no owner: held once the owner was taken.
enum Taken {}

const TAKEN: Vtable = Vtable {
    type_id: TypeId::of::<Taken>(),
    drop: drop_none,
};

struct VtableOf<T>(std::marker::PhantomData<T>);

impl<T: StableBytes> VtableOf<T> {
    const VTABLE: Vtable = Vtable {
        type_id: TypeId::of::<T>(),
        drop: drop_owner::<T>,
    };
}

/// A buffer owned by another crate (a codec engine's output buffer, for example),
/// kept in place, with no allocation: a payload slice of [`Payload::Owned`]. The
/// channel hands it back in a [`Completed`] once sent, and [`Owned::take`] gives the
/// owner back as its own type, to reuse it at once (a `Bytes` owner cannot be
/// recovered, and its wrapper allocates).
///
/// The owner must fit four words with at most word alignment; [`Owned::new`] refuses
/// any other type at compile time.
///
/// [`Payload::Owned`]: crate::Payload::Owned
/// [`Completed`]: crate::Completed
pub struct Owned {
    room: Room,
    ptr: *const u8,
    len: usize,
    vtable: &'static Vtable,
}

// SAFETY: the owner kept in the room is `Send` (`StableBytes`); `ptr` points into its
// bytes, which nothing writes while it is held, so reading them from any thread is
// sound.
unsafe impl Send for Owned {}
// SAFETY: `&Owned` gives access to the bytes only, never to the owner, and nothing
// writes the bytes while it is held (`StableBytes`).
unsafe impl Sync for Owned {}

impl Owned {
    /// Wraps `owner`, keeping it in place.
    pub fn new<T: StableBytes>(owner: T) -> Owned {
        const {
            assert!(
                size_of::<T>() <= size_of::<Room>() && align_of::<T>() <= align_of::<Room>(),
                "an Owned keeps owners of at most four words, word-aligned"
            );
        }
        let mut room = Room::uninit();
        // SAFETY: the room is large and aligned enough for `T` (checked above), and
        // uninitialised: nothing is overwritten. It now owns `owner`.
        unsafe { room.as_mut_ptr().cast::<T>().write(owner) };
        // The bytes' pointer is taken from the owner where it now stays: the room
        // moves with the `Owned` as plain bytes, which invalidates no pointer derived
        // from it (moving the owner itself, a `Box` for one, would).
        // SAFETY: the room holds an initialised `T`, just written. Through the
        // room's mutable pointer: a `T` with a cell or an atomic inline may write
        // it behind `&T`.
        let bytes = unsafe { (*room.as_mut_ptr().cast::<T>()).as_ref() };
        let (ptr, len) = (bytes.as_ptr(), bytes.len());
        Owned {
            room,
            ptr,
            len,
            vtable: &VtableOf::<T>::VTABLE,
        }
    }

    /// Takes the owner out, when it is a `T`, leaving no bytes behind; `None` (and the
    /// `Owned` unchanged) otherwise. In place: a payload handed back need not move.
    pub fn take<T: StableBytes>(&mut self) -> Option<T> {
        if self.vtable.type_id != TypeId::of::<T>() {
            return None;
        }
        self.vtable = &TAKEN;
        self.ptr = std::ptr::NonNull::dangling().as_ptr();
        self.len = 0;
        // SAFETY: the room holds an initialised `T` (the type ids match, and only
        // `new` sets a `T`'s vtable); the vtable now drops nothing and no other call
        // reads the room, so the owner is moved out exactly once.
        Some(unsafe { self.room.as_ptr().cast::<T>().read() })
    }

    /// The owner's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` are the owner's bytes, readable and unchanged while
        // it is held (`StableBytes`), and it is held as long as `self`; after `take`, no
        // bytes at a dangling, aligned, non-null pointer.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address, for building an `iovec` or a send descriptor.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: the vtable is the one of the owner `new` put in the room, or, once
        // `take` moved it out, one that drops nothing; the room is not used after this.
        unsafe { (self.vtable.drop)(&mut self.room) }
    }
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Owned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owned")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A heap buffer that counts its drops.
    struct Counted(Box<[u8]>, Arc<AtomicUsize>);

    impl AsRef<[u8]> for Counted {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }

    // SAFETY: the bytes are on the heap (they do not move with the value) and only
    // written before wrapping.
    unsafe impl StableBytes for Counted {}

    // SAFETY: as `Counted`.
    unsafe impl StableBytes for Vec<u8> {}

    /// An owner with an atomic inline, which its `as_ref` writes (as a `Bytes` may).
    struct Counting(Box<[u8]>, AtomicUsize);

    impl AsRef<[u8]> for Counting {
        fn as_ref(&self) -> &[u8] {
            self.1.fetch_add(1, Ordering::Relaxed);
            &self.0
        }
    }

    // SAFETY: as `Counted`; the atomic is not among the bytes.
    unsafe impl StableBytes for Counting {}

    #[test]
    fn an_owner_with_an_atomic_inline_is_kept_soundly() {
        let mut owned = Owned::new(Counting(vec![3u8; 10].into(), AtomicUsize::new(0)));
        let moved = vec![owned];
        owned = moved.into_iter().next().unwrap();
        assert_eq!(owned.as_slice(), &[3u8; 10][..]);
        let back = owned.take::<Counting>().unwrap();
        // `new` asked for the bytes once; `as_slice` never asks the owner.
        assert_eq!(back.1.load(Ordering::Relaxed), 1);
        assert_eq!(back.as_ref(), &[3u8; 10][..]);
    }

    #[test]
    fn the_owner_comes_back_as_itself_or_is_dropped_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let owned = Owned::new(Counted(vec![7u8; 100].into(), drops.clone()));
        assert_eq!(owned.len(), 100);
        assert_eq!(owned.as_slice(), &[7u8; 100][..]);
        let moved = vec![owned];
        let mut owned = moved.into_iter().next().unwrap();
        // Another type: the Owned stays as it was.
        assert!(owned.take::<Vec<u8>>().is_none());
        assert_eq!(owned.as_slice(), &[7u8; 100][..]);
        let back = owned.take::<Counted>().unwrap();
        assert!(owned.is_empty() && owned.as_slice().is_empty());
        assert!(owned.take::<Counted>().is_none());
        drop(owned);
        assert_eq!(drops.load(Ordering::Relaxed), 0);
        assert_eq!(&back.0[..], &[7u8; 100][..]);
        drop(back);
        assert_eq!(drops.load(Ordering::Relaxed), 1);

        let owned = Owned::new(Counted(vec![1u8; 3].into(), drops.clone()));
        drop(owned);
        assert_eq!(drops.load(Ordering::Relaxed), 2);

        let mut empty = Owned::new(Vec::new());
        assert!(empty.is_empty());
        assert_eq!(empty.take::<Vec<u8>>().unwrap(), Vec::<u8>::new());
    }
}
