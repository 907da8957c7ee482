//! The engine's requests: a fixed set, allocated once, handed out by the engine's
//! thread ([`Requests::take`]) and sent home by whichever thread drops the job or
//! completion holding one ([`Handle`]'s drop).
//!
//! Home is a lock-free stack of request indices whose head word also counts the
//! requests at home and carries a `closed` bit. Taking or returning a request is one
//! compare-and-swap on that word and nothing else: no reference count is taken per
//! job. The set outlives the engine when completions do: dropping [`Requests`] sets
//! `closed`, and whoever brings the count to every request with `closed` set (the
//! engine's drop when all were home, else the last handle returning) frees it. That
//! party alone can, because every change of the word is a compare-and-swap and no
//! request is out once the count is full.
//!
//! Only the engine's thread takes requests ([`Requests`] is `Send` but not `Sync`, so
//! `take(&self)` has one caller at a time), which leaves a stack with a single popper
//! free of the ABA problem: the top index can leave the stack only by the popper's
//! own compare-and-swap.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::job::Request;

/// Head word: bit 63 `closed`, bits 32..63 the requests at home, bits 0..32 the top
/// index plus one (0: none at home).
const CLOSED: u64 = 1 << 63;
const COUNT_SHIFT: u32 = 32;
const COUNT_MASK: u64 = (1 << 31) - 1;

/// Most requests one engine may have (the count's width, with room to spare).
pub(super) const MAX_REQUESTS: usize = 1 << 24;

struct Home {
    head: AtomicU64,
    /// The index below each one on the stack (plus one; 0: the bottom).
    next: Box<[AtomicU32]>,
    /// Accessed only by the holder of the request's [`Handle`], or by the party that
    /// frees the set once every request is home.
    reqs: Box<[UnsafeCell<Request>]>,
}

fn count(head: u64) -> u64 {
    (head >> COUNT_SHIFT) & COUNT_MASK
}

/// The engine's side of the set (see the module documentation).
pub(super) struct Requests {
    home: NonNull<Home>,
}

// SAFETY: the set is reached through the atomic head word and `UnsafeCell`s that only
// a request's unique handle touches; `Request` itself is `Send`. Not `Sync`: `take`
// relies on a single caller at a time.
unsafe impl Send for Requests {}

impl Requests {
    /// `n` requests (`1..=MAX_REQUESTS`), each made by `make`, all at home.
    pub(super) fn new(n: usize, mut make: impl FnMut() -> Request) -> Requests {
        assert!(
            (1..=MAX_REQUESTS).contains(&n),
            "request count out of range"
        );
        let reqs: Box<[UnsafeCell<Request>]> = (0..n).map(|_| UnsafeCell::new(make())).collect();
        // Index i sits on index i + 1; index 0 is the top.
        let next: Box<[AtomicU32]> = (0..n)
            .map(|i| AtomicU32::new(if i + 1 < n { i as u32 + 2 } else { 0 }))
            .collect();
        let head = ((n as u64) << COUNT_SHIFT) | 1;
        let home = Box::new(Home {
            head: AtomicU64::new(head),
            next,
            reqs,
        });
        Requests {
            home: NonNull::from(Box::leak(home)),
        }
    }

    fn home(&self) -> &Home {
        // SAFETY: the set is freed only once `closed` is set, which this value's drop
        // does; until then it is alive.
        unsafe { self.home.as_ref() }
    }

    /// A request from home, or `None` when every one is out.
    pub(super) fn take(&self) -> Option<Handle> {
        let home = self.home();
        let mut head = home.head.load(Ordering::Acquire);
        loop {
            let top = head as u32;
            if top == 0 {
                return None;
            }
            let idx = top - 1;
            // Only this caller removes indices, so `idx` stays on the stack and its
            // `next` unchanged until the exchange below succeeds.
            let next = home.next[idx as usize].load(Ordering::Relaxed);
            let new = (head & CLOSED) | ((count(head) - 1) << COUNT_SHIFT) | u64::from(next);
            match home
                .head
                .compare_exchange_weak(head, new, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(Handle {
                        home: self.home,
                        idx,
                    });
                }
                Err(h) => head = h,
            }
        }
    }

    /// Requests at home now (the count in the head word).
    pub(super) fn available(&self) -> usize {
        count(self.home().head.load(Ordering::Relaxed)) as usize
    }

    /// Whether `h` is one of this set's requests.
    pub(super) fn owns(&self, h: &Handle) -> bool {
        self.home == h.home
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        let home = self.home();
        let n = home.reqs.len() as u64;
        let head = home.head.fetch_or(CLOSED, Ordering::AcqRel);
        if count(head) == n {
            // SAFETY: every request is home and `closed` is now set, so no handle
            // exists and none can be taken: nobody else reaches the set again.
            unsafe { free(self.home) };
        }
    }
}

/// Frees the set.
///
/// # Safety
/// Every request is home and `closed` is set, by an exchange this caller made.
unsafe fn free(home: NonNull<Home>) {
    // SAFETY: allocated by `Box` in `Requests::new`; the caller's exchange makes it
    // the only party left.
    drop(unsafe { Box::from_raw(home.as_ptr()) });
}

/// Owns one request until dropped, then resets it and sends it home.
pub(super) struct Handle {
    home: NonNull<Home>,
    idx: u32,
}

// SAFETY: the handle is the only way to the request while it is out (like a
// `Box<Request>`, and `Request` is `Send`); going home is an atomic exchange. Not
// `Sync`, as a `Box<Request>` is not (`Request` is not).
unsafe impl Send for Handle {}

const _: () = {
    const fn send<T: Send>() {}
    send::<Request>();
};

impl Handle {
    fn home(&self) -> &Home {
        // SAFETY: this request is out, so the count cannot be full and the set is not
        // freed while the handle lives.
        unsafe { self.home.as_ref() }
    }

    pub(super) fn req(&self) -> &Request {
        // SAFETY: the handle owns the request while it is out; `&self` lends it shared.
        unsafe { &*self.home().reqs[self.idx as usize].get() }
    }

    pub(super) fn req_mut(&mut self) -> &mut Request {
        // SAFETY: the handle owns the request while it is out; `&mut self` lends it
        // exclusively.
        unsafe { &mut *self.home().reqs[self.idx as usize].get() }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.req_mut().reset();
        let home = self.home();
        let n = home.reqs.len() as u64;
        let idx = self.idx;
        let mut head = home.head.load(Ordering::Relaxed);
        loop {
            home.next[idx as usize].store(head as u32, Ordering::Relaxed);
            let count = count(head) + 1;
            let new = (head & CLOSED) | (count << COUNT_SHIFT) | u64::from(idx + 1);
            // Release publishes the reset request to its next taker; Acquire lets a
            // freeing party see every other returner's writes.
            match home
                .head
                .compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    if new & CLOSED != 0 && count == n {
                        // SAFETY: this exchange brought the last request home after
                        // the engine closed the set.
                        unsafe { free(self.home) };
                    }
                    return;
                }
                Err(h) => head = h,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;
    use crate::page::PageSize;
    use crate::pool::EngineBuf;

    fn set(n: usize) -> Requests {
        Requests::new(n, || Request::new(PageSize::KIB4, 4))
    }

    #[test]
    fn every_request_is_handed_out_once_then_none() {
        let r = set(5);
        let mut out: Vec<Handle> = (0..5).map(|_| r.take().expect("a request")).collect();
        assert!(r.take().is_none());
        assert_eq!(r.available(), 0);
        let mut idx: Vec<u32> = out.iter().map(|h| h.idx).collect();
        idx.sort_unstable();
        assert_eq!(idx, [0, 1, 2, 3, 4]);
        out.pop();
        assert_eq!(r.available(), 1);
        // The one returned last is taken next (still warm).
        let again = r.take().expect("the returned request");
        assert!(r.take().is_none());
        drop(again);
        drop(out);
        assert_eq!(r.available(), 5);
    }

    #[test]
    fn a_returned_request_is_reset() {
        let r = set(1);
        let mut h = r.take().unwrap();
        h.req_mut().payload = Some(EngineBuf::from_vec(vec![7; 16]));
        h.req_mut().lengths.push(3);
        drop(h);
        let h = r.take().unwrap();
        assert!(h.req().payload.is_none());
        assert!(h.req().lengths.is_empty());
    }

    #[test]
    fn handles_may_outlive_the_set_and_free_it_last() {
        // Miri checks that the set is freed exactly once and nothing is leaked,
        // whichever of the engine and the handles goes last.
        for keep in 0..=3 {
            let r = set(3);
            let out: Vec<Handle> = (0..keep).map(|_| r.take().unwrap()).collect();
            drop(r);
            drop(out);
        }
        let r = set(2);
        let a = r.take().unwrap();
        let b = r.take().unwrap();
        drop(r);
        drop(b);
        drop(a);
    }

    #[test]
    fn requests_come_home_from_other_threads() {
        let r = set(4);
        let rounds = if cfg!(miri) { 20 } else { 2000 };
        for _ in 0..rounds {
            let mut handles: Vec<Handle> = (0..4).map(|_| r.take().unwrap()).collect();
            let theirs = handles.split_off(2);
            let barrier = Barrier::new(2);
            std::thread::scope(|s| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    drop(theirs);
                });
                barrier.wait();
                drop(handles);
            });
            assert_eq!(r.available(), 4);
        }
    }

    #[test]
    fn the_last_handle_dropped_on_another_thread_frees_the_set() {
        let rounds = if cfg!(miri) { 10 } else { 500 };
        for _ in 0..rounds {
            let r = set(2);
            let a = r.take().unwrap();
            let b = r.take().unwrap();
            let barrier = Barrier::new(2);
            std::thread::scope(|s| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    drop(a);
                });
                barrier.wait();
                drop(r);
                drop(b);
            });
        }
    }
}
