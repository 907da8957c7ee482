//! Descriptions of the pages a job reads ([`PageList`]) and writes ([`PageListMut`]).
//!
//! A list is a sequence of *runs*: `count` pages contiguous in memory starting at a
//! pointer, with the [`PageKey`] of the run's first page (the next pages have the next
//! keys; keys matter only to the delta codec). The pipeline builds lists from raw
//! pointers into guest memory with the `unsafe` constructors, whose contract is the
//! volatile-memory one below; tests, tools and receivers that own their buffers use the
//! safe slice constructors. A list keeps its capacity when cleared, so a recycled job
//! reuses it without allocating.
//!
//! # Guest memory
//! A source's guest keeps running while its pages are compressed, so the bytes behind
//! a [`PageList`] built with [`PageList::push_raw`] may change during a job. Following
//! vm-memory's volatile-memory rules, nothing in this crate builds a `&[u8]` over such
//! memory: every read goes through a raw pointer, and there are exactly three kinds:
//! - the zero scan ([`is_zero_raw`](crate::zero::is_zero_raw)) reads the pages in
//!   place and keeps only a yes/no answer;
//! - the delta encoder, for a page the delta cache holds a version of, compares each
//!   64-byte line with that version in place and, like the zero scan, keeps only a
//!   yes/no answer; a line that differs is read again, 16 bytes (two words in the
//!   portable kernel) at a time, and each value loaded is used once, for both the
//!   comparison and the store: lanes that changed are written over the cached version,
//!   and the delta's literals are copied from it;
//! - everything else copies the pages with one raw-pointer `memcpy`
//!   (`core::ptr::copy_nonoverlapping`) into memory the codec owns: the raw codec into
//!   the payload, zstd and lz4 into the frame's scratch buffer, deflate one page at a
//!   time into a page of scratch, delta a page the cache lacks into its slot in the
//!   cache. The compression libraries only ever see that private copy, which no other
//!   thread can change, so the payload, the delta cache and the length table all
//!   describe the same bytes.
//!
//! A page written during the copy may be copied torn (part old, part new). That is
//! harmless: the write also dirtied the page, so the caller's dirty tracking sends it
//! again in a later round (or the final one, with the guest paused). Strictly, Rust's
//! memory model has no non-atomic read that may race with a write; like vm-memory (whose
//! `VolatileSlice` copies of more than a word are a plain `memcpy`) and every VMM, this
//! crate accepts a raw-pointer `memcpy` as that read, because no reference exists that
//! the compiler could assume stable, and the bytes are used only after they are copied.
//! The two scans read with raw-pointer loads to the same standard: the zero scan keeps
//! only its answer, and the delta encoder uses each loaded value once, for the
//! comparison and for what it keeps, so the cached version and the delta agree on
//! whatever mix of old and new bytes a load returned.
//!
//! A list built only from slices ([`PageList::push_slice`]) is a shared borrow nobody
//! can write meanwhile, and so is a private copy the caller keeps unwritten for the
//! list's life ([`PageList::push_stable`]: a source's dedup staging buffer, which holds
//! the pages it hashed): such a list whose runs follow each other in memory is handed
//! to the codecs in place, without a second copy.
//!
//! Raw frames that the transport sends straight from guest memory (an encode with
//! [`EncodeParams::raw_in_place`](crate::EncodeParams::raw_in_place)) stay raw pointers
//! all the way to the kernel or the NIC, which read them like any other device.
//!
//! # Destination memory
//! A [`PageListMut`] is written by one decoder at a time: on a destination the guest is
//! not running yet, and page-to-channel affinity (a protocol rule the receiver checks
//! before a byte reaches guest memory) keeps every other channel's thread off the pages
//! of a frame, so the decoders may borrow those pages as `&mut [u8]` for one call.

use core::marker::PhantomData;

use crate::page::{PageKey, PageSize};

/// One run of contiguous pages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub(crate) ptr: *const u8,
    pub(crate) pages: u32,
    pub(crate) key: PageKey,
    /// Which runs may join this one: only runs pushed the same way, by a constructor
    /// whose contract derives adjacent runs' pointers from one pointer.
    pub(crate) join: Join,
}

/// How a run was pushed, for joining runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Join {
    /// A slice: a borrow of its own range only, never joined.
    Never,
    /// `push_raw`: guest memory, joined with raw runs of the same mapping.
    Raw,
    /// `PageList::push_stable`: a private copy, joined with stable runs of one buffer.
    Stable,
}

/// Why a page list refused a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PagesError {
    /// A slice whose length is not a whole number of pages.
    #[error("a run of {len} bytes is not a whole number of {page_size}-byte pages")]
    NotWholePages {
        /// The slice's length.
        len: usize,
        /// The list's page size.
        page_size: PageSize,
    },
    /// A run of zero pages, or a list that would exceed `u32::MAX` pages.
    #[error("a run must hold 1..=u32::MAX pages, got {pages}")]
    BadRunLength {
        /// The pages in the refused run.
        pages: usize,
    },
}

/// Checks a slice and returns its page count.
fn whole_pages(len: usize, page_size: PageSize) -> Result<u32, PagesError> {
    if !len.is_multiple_of(page_size.bytes()) {
        return Err(PagesError::NotWholePages { len, page_size });
    }
    let pages = len / page_size.bytes();
    match u32::try_from(pages) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(PagesError::BadRunLength { pages }),
    }
}

macro_rules! page_list_common {
    ($name:ident { $($field:ident: $init:expr),* }) => {
        impl<'a> $name<'a> {
            /// An empty list of `page_size` pages.
            pub fn new(page_size: PageSize) -> Self {
                Self::with_capacity(page_size, 0)
            }

            /// An empty list with room for `runs` runs before it allocates.
            pub fn with_capacity(page_size: PageSize, runs: usize) -> Self {
                Self {
                    runs: Vec::with_capacity(runs),
                    pages: 0,
                    page_size,
                    $($field: $init,)*
                    _borrow: PhantomData,
                }
            }

            /// The size of each page.
            pub fn page_size(&self) -> PageSize {
                self.page_size
            }

            /// The number of pages in all runs.
            pub fn pages(&self) -> usize {
                self.pages
            }

            /// The number of bytes in all runs.
            pub fn bytes(&self) -> usize {
                self.pages * self.page_size.bytes()
            }

            /// Whether the list holds no page.
            pub fn is_empty(&self) -> bool {
                self.pages == 0
            }

            /// Whether all pages are one contiguous run.
            pub fn is_contiguous(&self) -> bool {
                self.runs.len() <= 1
            }

            /// Empties the list and sets the page size for the next runs; keeps the
            /// allocation.
            pub fn reset(&mut self, page_size: PageSize) {
                self.runs.clear();
                self.pages = 0;
                self.page_size = page_size;
                $(self.$field = $init;)*
            }

            pub(crate) fn runs(&self) -> &[Run] {
                &self.runs
            }

            /// The pointer to page `i` of the list and its key.
            pub(crate) fn page(&self, mut i: usize) -> Option<(*const u8, PageKey)> {
                for run in &self.runs {
                    let n = run.pages as usize;
                    if i < n {
                        let ptr = run.ptr.wrapping_add(i * self.page_size.bytes());
                        return Some((ptr, PageKey(run.key.0.wrapping_add(i as u64))));
                    }
                    i -= n;
                }
                None
            }

            /// The run joins the last one when it continues it in memory and keys and
            /// both were pushed the same joinable way (`join`).
            fn push_run(
                &mut self,
                ptr: *const u8,
                pages: u32,
                key: PageKey,
                join: Join,
            ) -> Result<(), PagesError> {
                if pages == 0 {
                    return Err(PagesError::BadRunLength { pages: 0 });
                }
                let total = self.pages + pages as usize;
                if u32::try_from(total).is_err() {
                    return Err(PagesError::BadRunLength { pages: total });
                }
                // Merge with the previous run when it continues it in memory and keys.
                let joins = |l: &&mut Run| join != Join::Never && l.join == join;
                if let Some(last) = self.runs.last_mut().filter(joins) {
                    let end = last
                        .ptr
                        .wrapping_add(last.pages as usize * self.page_size.bytes());
                    if end == ptr && last.key.0.wrapping_add(u64::from(last.pages)) == key.0 {
                        last.pages += pages;
                        self.pages = total;
                        return Ok(());
                    }
                }
                self.runs.push(Run {
                    ptr,
                    pages,
                    key,
                    join,
                });
                self.pages = total;
                Ok(())
            }
        }
    };
}

/// Pages a job reads: the input of an encode job.
///
/// `'a` is the borrow of the slices pushed with [`PageList::push_slice`]; a list built
/// only from raw pointers can be `PageList<'static>` and travel in an engine job.
#[derive(Debug)]
pub struct PageList<'a> {
    runs: Vec<Run>,
    pages: usize,
    page_size: PageSize,
    /// Some run came from [`PageList::push_raw`]: memory that others may write while
    /// the list lives, read only through raw pointers (the module documentation's
    /// three kinds of read), never as a slice.
    volatile: bool,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: the list only holds pointers to memory that its constructors' contracts
// (a shared borrow for `'a`, or `push_raw`'s caller) keep readable from any thread.
unsafe impl Send for PageList<'_> {}
// SAFETY: as above; a shared list only reads: raw-pointer copies into the caller's
// buffer, raw pointers, and slices of `push_slice` memory (a `&[u8]`, itself `Sync`).
unsafe impl Sync for PageList<'_> {}

page_list_common!(PageList { volatile: false });

impl<'a> PageList<'a> {
    /// Appends the whole pages of `pages`, the first with key `key`.
    ///
    /// # Errors
    /// [`PagesError`] when the slice is empty or not a whole number of pages.
    pub fn push_slice(&mut self, pages: &'a [u8], key: PageKey) -> Result<(), PagesError> {
        let n = whole_pages(pages.len(), self.page_size)?;
        self.push_run(pages.as_ptr(), n, key, Join::Never)
    }

    /// Appends `pages` pages starting at `ptr`, the first with key `key`.
    ///
    /// # Errors
    /// [`PagesError::BadRunLength`] when `pages` is 0 or the list would pass
    /// `u32::MAX` pages.
    ///
    /// # Safety
    /// `ptr .. ptr + pages × page_size` must stay mapped and readable from any thread
    /// until the list is dropped or reset, or, for a list inside an engine job, until
    /// the job's completion has been received, and no `&mut` reference to it may exist
    /// meanwhile. The guest, vCPU threads and other threads may write the memory
    /// through raw pointers meanwhile: this crate reads it only through raw pointers
    /// (see the module documentation), so a concurrent write can make a payload stale
    /// or torn, never invalid. A run that starts where the list's last raw run
    /// ends joins it: the two pointers must then come from one pointer to one mapping
    /// (a region of guest memory).
    pub unsafe fn push_raw(
        &mut self,
        ptr: *const u8,
        pages: u32,
        key: PageKey,
    ) -> Result<(), PagesError> {
        self.push_run(ptr, pages, key, Join::Raw)?;
        self.volatile = true;
        Ok(())
    }

    /// Appends `pages` pages starting at `ptr`, the first with key `key`, from memory
    /// that nobody writes while the list lives (a copy the caller took and keeps, such
    /// as a source's dedup staging buffer): the codecs may borrow it in place, as
    /// memory pushed with [`PageList::push_slice`].
    ///
    /// # Errors
    /// [`PagesError::BadRunLength`] when `pages` is 0 or the list would pass
    /// `u32::MAX` pages.
    ///
    /// # Safety
    /// `ptr .. ptr + pages × page_size` must stay mapped and readable from any thread,
    /// and be written by nobody (through any pointer or reference), until the list is
    /// dropped or reset, or, for a list inside an engine job, until the job's completion
    /// has been received. When `ptr` is where the list's last run ends, the two
    /// pointers must come from one pointer to one allocated object (one buffer, not
    /// slices of its parts), since the list may then be read as one slice.
    pub unsafe fn push_stable(
        &mut self,
        ptr: *const u8,
        pages: u32,
        key: PageKey,
    ) -> Result<(), PagesError> {
        self.push_run(ptr, pages, key, Join::Stable)
    }

    /// The whole list as one slice, when it may be borrowed in place: one run pushed
    /// with [`PageList::push_slice`] or [`PageList::push_stable`], or runs all pushed
    /// with `push_stable` that follow each other in memory, whatever their keys. `None`
    /// for guest memory or runs apart, which the caller copies with
    /// [`PageList::copy_to`].
    pub(crate) fn as_slice(&self) -> Option<&[u8]> {
        if self.volatile
            || (self.runs.len() > 1 && self.runs.iter().any(|r| r.join != Join::Stable))
        {
            return None;
        }
        let ps = self.page_size.bytes();
        let first = self.runs.first()?;
        let mut end = first.ptr;
        for run in &self.runs {
            if run.ptr != end {
                return None;
            }
            end = run.ptr.wrapping_add(run.pages as usize * ps);
        }
        // SAFETY: without a `push_raw` run, every run came from `push_slice` (a
        // `&'a [u8]` of whole pages nobody may write for `'a`, which outlives this
        // borrow of the list) or `push_stable` (memory nobody writes while the list
        // lives). Each run starts where the one before ends, and when there are several
        // every one came from `push_stable`, whose contract derives adjacent runs'
        // pointers from one pointer to one object: together they are one readable range
        // of `self.pages` pages in one object, reachable from the first run's pointer.
        Some(unsafe { core::slice::from_raw_parts(first.ptr, self.pages * ps) })
    }

    /// Page `i` as a slice, when it may be borrowed in place (a list built only with
    /// [`PageList::push_slice`]), and its key. `None` for guest memory, which the caller
    /// copies with [`PageList::copy_page`], or when `i` is out of range.
    pub(crate) fn page_slice(&self, i: usize) -> Option<(&[u8], PageKey)> {
        if self.volatile {
            return None;
        }
        let (ptr, key) = self.page(i)?;
        // SAFETY: `page` points at a whole page inside a run that came from `push_slice`
        // (no `push_raw` run): a `&'a [u8]` nobody may write for `'a`, which outlives
        // this borrow of the list.
        Some((
            unsafe { core::slice::from_raw_parts(ptr, self.page_size.bytes()) },
            key,
        ))
    }

    /// Copies every page of the list, in order, into `out`, which must be exactly
    /// [`PageList::bytes`] long (else nothing is copied and `false` returned).
    pub(crate) fn copy_to(&self, out: &mut [u8]) -> bool {
        if out.len() != self.bytes() {
            return false;
        }
        let ps = self.page_size.bytes();
        let mut pos = 0;
        for run in &self.runs {
            let len = run.pages as usize * ps;
            // SAFETY: the run is readable for `len` bytes (constructor contracts) and
            // `out[pos..pos + len]` is in bounds since the runs sum to `out.len()`.
            unsafe { copy_out(run.ptr, &mut out[pos..pos + len]) };
            pos += len;
        }
        true
    }

    /// Copies page `i` into `out` (exactly one page long) and returns its key; `None`,
    /// copying nothing, when `i` is out of range or `out` is not one page.
    pub(crate) fn copy_page(&self, i: usize, out: &mut [u8]) -> Option<PageKey> {
        if out.len() != self.page_size.bytes() {
            return None;
        }
        let (ptr, key) = self.page(i)?;
        // SAFETY: `page` points at a whole page inside a readable run (constructor
        // contracts) and `out` is one page long.
        unsafe { copy_out(ptr, out) };
        Some(key)
    }
}

/// Copies `out.len()` bytes at `src` into `out` with one raw-pointer `memcpy`: the
/// single way this crate copies the bytes behind a [`PageList`] (the zero scan and the
/// delta encoder read them in place), safe against concurrent writers as the module
/// documentation explains.
///
/// # Safety
/// `src .. src + out.len()` must be readable: part of a run of a live list, whose
/// constructor contracts also rule out a `&mut` to it, so it cannot overlap `out`.
unsafe fn copy_out(src: *const u8, out: &mut [u8]) {
    // SAFETY: `src` is readable for `out.len()` bytes (this function's contract) and
    // `out` is an exclusive borrow, so the two ranges do not overlap. No reference to
    // `src`'s memory is created: a concurrent write can only tear the copied bytes.
    unsafe { core::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
}

/// Pages a job writes: the destination of a decode job.
///
/// `'a` is the borrow of the slices pushed with [`PageListMut::push_slice`].
#[derive(Debug)]
pub struct PageListMut<'a> {
    runs: Vec<Run>,
    pages: usize,
    page_size: PageSize,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: the list holds pointers to memory that its constructors' contracts (an
// exclusive borrow for `'a`, or `push_raw`'s caller) reserve for the list's writer.
unsafe impl Send for PageListMut<'_> {}

page_list_common!(PageListMut {});

impl<'a> PageListMut<'a> {
    /// Appends the whole pages of `pages`, the first with key `key`.
    ///
    /// # Errors
    /// [`PagesError`] when the slice is empty or not a whole number of pages.
    pub fn push_slice(&mut self, pages: &'a mut [u8], key: PageKey) -> Result<(), PagesError> {
        let n = whole_pages(pages.len(), self.page_size)?;
        self.push_run(pages.as_mut_ptr(), n, key, Join::Never)
    }

    /// Appends `pages` pages starting at `ptr`, the first with key `key`.
    ///
    /// # Errors
    /// [`PagesError::BadRunLength`] when `pages` is 0 or the list would pass
    /// `u32::MAX` pages.
    ///
    /// # Safety
    /// `ptr .. ptr + pages × page_size` must stay mapped and writable until the list is
    /// dropped or reset (for a list inside an engine job: until the job's completion
    /// has been received), must not overlap another run of this list, and nobody else
    /// may read or write it meanwhile: the decoders borrow it as `&mut [u8]`. On a
    /// destination that holds because the guest is not running yet and page-to-channel
    /// affinity, checked by the receiver, keeps other channels' threads off the pages
    /// (see the module documentation). A run that starts where the list's last raw
    /// run ends joins it: the two pointers must then come from one pointer to one
    /// mapping (a region of guest memory).
    pub unsafe fn push_raw(
        &mut self,
        ptr: *mut u8,
        pages: u32,
        key: PageKey,
    ) -> Result<(), PagesError> {
        self.push_run(ptr, pages, key, Join::Raw)
    }

    /// The writable pointer to page `i` of the list.
    pub(crate) fn page_mut(&mut self, i: usize) -> Option<*mut u8> {
        self.page(i).map(|(p, _)| p.cast_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_when_contiguous_and_keys_follow() {
        let buf = vec![0u8; 4 * 4096];
        let base = buf.as_ptr();
        let mut list = PageList::new(PageSize::KIB4);
        let raw = |list: &mut PageList<'_>, page: usize, pages: u32, key: u64| {
            // SAFETY: `buf` outlives the list and nothing writes it; the pointers all
            // come from `base`, one pointer to the whole buffer.
            unsafe { list.push_raw(base.wrapping_add(page * 4096), pages, PageKey(key)) }.unwrap();
        };
        raw(&mut list, 0, 1, 10);
        raw(&mut list, 1, 1, 11);
        assert_eq!(list.runs().len(), 1);
        raw(&mut list, 2, 2, 40);
        assert_eq!(list.runs().len(), 2);
        assert_eq!(list.pages(), 4);
        assert_eq!(list.page(2).map(|p| p.1), Some(PageKey(40)));
        assert_eq!(list.page(3).map(|p| p.1), Some(PageKey(41)));
        assert_eq!(list.page(3).map(|p| p.0), Some(buf[12288..].as_ptr()));
        assert!(list.page(4).is_none());
        list.reset(PageSize::KIB4);
        assert!(list.is_empty());
        // Slices are borrows of their own ranges only: never joined.
        list.push_slice(&buf[..4096], PageKey(10)).unwrap();
        list.push_slice(&buf[4096..8192], PageKey(11)).unwrap();
        assert_eq!(list.runs().len(), 2);
    }

    #[test]
    fn only_lists_of_slices_are_borrowed_in_place() {
        let buf: Vec<u8> = (0..3 * 4096).map(|i| (i / 4096) as u8 + 1).collect();
        let mut list = PageList::new(PageSize::KIB4);
        list.push_slice(&buf[..8192], PageKey(0)).unwrap();
        assert_eq!(list.as_slice(), Some(&buf[..8192]));
        assert_eq!(list.page_slice(1), Some((&buf[4096..8192], PageKey(1))));
        // SAFETY: `buf` outlives the list and nothing writes it.
        unsafe { list.push_raw(buf[8192..].as_ptr(), 1, PageKey(2)).unwrap() };
        assert_eq!(list.runs().len(), 2, "a raw run never joins a slice");
        assert_eq!(list.as_slice(), None);
        assert_eq!(list.page_slice(0), None);

        let mut out = vec![0u8; 3 * 4096];
        assert!(!list.copy_to(&mut out[..4096]), "wrong length is refused");
        assert!(out.iter().all(|&b| b == 0));
        assert!(list.copy_to(&mut out));
        assert_eq!(out, buf);
        let mut page = vec![0u8; 4096];
        assert_eq!(list.copy_page(3, &mut page), None);
        assert_eq!(list.copy_page(2, &mut page[..100]), None);
        assert_eq!(list.copy_page(2, &mut page), Some(PageKey(2)));
        assert!(page.iter().all(|&b| b == 3));

        list.reset(PageSize::KIB4);
        list.push_slice(&buf[..4096], PageKey(0)).unwrap();
        assert_eq!(
            list.as_slice(),
            Some(&buf[..4096]),
            "reset forgets raw runs"
        );
    }

    #[test]
    fn stable_runs_that_follow_in_memory_are_borrowed_whatever_their_keys() {
        let buf: Vec<u8> = (0..4 * 4096).map(|i| (i / 4096) as u8 + 1).collect();
        let stable = |list: &mut PageList<'_>, page: usize, pages: u32, key: u64| {
            let ptr = buf.as_ptr().wrapping_add(page * 4096);
            // SAFETY: `buf` outlives every list below and nothing writes it; every
            // pointer comes from one pointer to the whole buffer.
            unsafe { list.push_stable(ptr, pages, PageKey(key)) }.unwrap();
        };
        let mut list = PageList::new(PageSize::KIB4);
        stable(&mut list, 0, 1, 7);
        stable(&mut list, 1, 2, 30);
        assert_eq!(list.runs().len(), 2, "keys apart: two runs");
        assert_eq!(list.as_slice(), Some(&buf[..3 * 4096]));
        assert_eq!(list.page_slice(1), Some((&buf[4096..8192], PageKey(30))));
        // A run apart in memory: copied, not borrowed.
        list.reset(PageSize::KIB4);
        stable(&mut list, 0, 1, 0);
        stable(&mut list, 2, 1, 1);
        assert_eq!(list.as_slice(), None);
        // Guest memory anywhere in the list: never borrowed.
        list.reset(PageSize::KIB4);
        stable(&mut list, 0, 1, 0);
        // SAFETY: as above.
        unsafe { list.push_raw(buf[4096..].as_ptr(), 1, PageKey(1)) }.unwrap();
        assert_eq!(list.runs().len(), 2, "guest memory never joins a copy");
        assert_eq!(list.as_slice(), None);
        assert_eq!(list.page_slice(0), None);
        // Slices are borrows of their own ranges only: never read as one.
        list.reset(PageSize::KIB4);
        list.push_slice(&buf[..4096], PageKey(0)).unwrap();
        list.push_slice(&buf[4096..8192], PageKey(5)).unwrap();
        assert_eq!(list.as_slice(), None);
        list.reset(PageSize::KIB4);
        list.push_slice(&buf[..4096], PageKey(0)).unwrap();
        stable(&mut list, 1, 1, 1);
        assert_eq!(list.runs().len(), 2, "a stable run never joins a slice");
        assert_eq!(list.as_slice(), None);
    }

    #[test]
    fn partial_pages_are_refused() {
        let buf = vec![0u8; 5000];
        let mut list = PageList::new(PageSize::KIB4);
        assert!(matches!(
            list.push_slice(&buf, PageKey(0)),
            Err(PagesError::NotWholePages { len: 5000, .. })
        ));
        assert!(matches!(
            list.push_slice(&buf[..0], PageKey(0)),
            Err(PagesError::BadRunLength { pages: 0 })
        ));
    }
}
