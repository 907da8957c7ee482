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
//! a [`PageList`] may change during a job. How each consumer reads them:
//! - the zero scan and the delta codec's snapshot read through raw pointers only
//!   (the delta codec copies each page once, then works on its private copy, so the
//!   cache holds exactly the bytes that were sent);
//! - the compression libraries (zstd, lz4, libdeflate) take a `&[u8]` over the run for
//!   the duration of one call, as every VMM's codec path does (QEMU's multifd hands
//!   guest RAM to zlib, zstd and QPL the same way). A concurrent write may then give
//!   a payload that decodes to a mix of old and new bytes, never an invalid payload
//!   or a write outside the output buffer, since output bounds come from the output
//!   buffer alone; strictly, in the Rust memory model this read is a data race,
//!   which is the documented cost of compressing live guest memory without a copy.
//!
//! Either way the page was dirtied again, so the caller's dirty tracking sends it once
//! more.

use core::marker::PhantomData;

use crate::page::{PageKey, PageSize};

/// One run of contiguous pages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub(crate) ptr: *const u8,
    pub(crate) pages: u32,
    pub(crate) key: PageKey,
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
    ($name:ident) => {
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

            fn push_run(
                &mut self,
                ptr: *const u8,
                pages: u32,
                key: PageKey,
            ) -> Result<(), PagesError> {
                if pages == 0 {
                    return Err(PagesError::BadRunLength { pages: 0 });
                }
                let total = self.pages + pages as usize;
                if u32::try_from(total).is_err() {
                    return Err(PagesError::BadRunLength { pages: total });
                }
                // Merge with the previous run when it continues it in memory and keys.
                if let Some(last) = self.runs.last_mut() {
                    let end = last
                        .ptr
                        .wrapping_add(last.pages as usize * self.page_size.bytes());
                    if end == ptr && last.key.0.wrapping_add(u64::from(last.pages)) == key.0 {
                        last.pages += pages;
                        self.pages = total;
                        return Ok(());
                    }
                }
                self.runs.push(Run { ptr, pages, key });
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
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: the list only holds pointers to memory that its constructors' contracts
// (a shared borrow for `'a`, or `push_raw`'s caller) keep readable from any thread.
unsafe impl Send for PageList<'_> {}
// SAFETY: as above; a shared list only hands out read pointers.
unsafe impl Sync for PageList<'_> {}

page_list_common!(PageList);

impl<'a> PageList<'a> {
    /// Appends the whole pages of `pages`, the first with key `key`.
    ///
    /// # Errors
    /// [`PagesError`] when the slice is empty or not a whole number of pages.
    pub fn push_slice(&mut self, pages: &'a [u8], key: PageKey) -> Result<(), PagesError> {
        let n = whole_pages(pages.len(), self.page_size)?;
        self.push_run(pages.as_ptr(), n, key)
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
    /// the job's completion has been received. Other threads and vCPUs may write the
    /// memory meanwhile (see the module documentation): that only makes the encoded
    /// content stale, never undefined.
    pub unsafe fn push_raw(
        &mut self,
        ptr: *const u8,
        pages: u32,
        key: PageKey,
    ) -> Result<(), PagesError> {
        self.push_run(ptr, pages, key)
    }
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

page_list_common!(PageListMut);

impl<'a> PageListMut<'a> {
    /// Appends the whole pages of `pages`, the first with key `key`.
    ///
    /// # Errors
    /// [`PagesError`] when the slice is empty or not a whole number of pages.
    pub fn push_slice(&mut self, pages: &'a mut [u8], key: PageKey) -> Result<(), PagesError> {
        let n = whole_pages(pages.len(), self.page_size)?;
        self.push_run(pages.as_mut_ptr(), n, key)
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
    /// may read or write it meanwhile (on a destination the guest is not running yet).
    pub unsafe fn push_raw(
        &mut self,
        ptr: *mut u8,
        pages: u32,
        key: PageKey,
    ) -> Result<(), PagesError> {
        self.push_run(ptr, pages, key)
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
        let mut list = PageList::new(PageSize::KIB4);
        list.push_slice(&buf[..4096], PageKey(10)).unwrap();
        list.push_slice(&buf[4096..8192], PageKey(11)).unwrap();
        assert_eq!(list.runs().len(), 1);
        list.push_slice(&buf[8192..], PageKey(40)).unwrap();
        assert_eq!(list.runs().len(), 2);
        assert_eq!(list.pages(), 4);
        assert_eq!(list.page(2).map(|p| p.1), Some(PageKey(40)));
        assert_eq!(list.page(3).map(|p| p.1), Some(PageKey(41)));
        assert_eq!(list.page(3).map(|p| p.0), Some(buf[12288..].as_ptr()));
        assert!(list.page(4).is_none());
        list.reset(PageSize::KIB4);
        assert!(list.is_empty());
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
