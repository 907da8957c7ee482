//! Guest memory as the VMM describes it: regions of host virtual memory that the guest
//! may write at any moment.
//!
//! # The source: the guest is running
//! Following vm-memory's volatile-memory rules, pagewire never builds a `&[u8]` or
//! `&mut [u8]` over a source's guest memory. It reads the pages through raw pointers
//! only, in these ways:
//! - the zero/uniform scan (`pagewire_accel::classify_raw`) reads pages in place and keeps only
//!   its class (zero, one byte repeated, data);
//! - the codecs copy a frame's pages with one raw-pointer `memcpy`
//!   (`copy_nonoverlapping`) into their own reused scratch buffer, or for a raw frame
//!   into the payload, and compress that private copy (`pagewire_accel::pages`, "Guest
//!   memory"), so the payload, the delta cache and the length table describe the same
//!   bytes;
//! - a raw frame sent without a copy (iovec sends, io_uring SEND_ZC, RDMA) hands the raw
//!   pointers to the kernel or the NIC, which reads them like any other device;
//! - [`GuestMemory::read_pages`] copies with `copy_nonoverlapping`.
//!
//! A page copied while the guest writes it may be torn; that is harmless because the
//! write also marks the page dirty, so a later round (or the final, paused one) sends
//! it again. Strictly, Rust's memory model has no non-atomic read that may race with a
//! write; like vm-memory (whose `VolatileSlice` copies of more than a word are a plain
//! `memcpy`) and every VMM, pagewire accepts a raw-pointer `memcpy` as that read: no
//! reference exists that the compiler could assume stable, and the bytes are used only
//! once copied.
//!
//! # The destination: one writer per page
//! The destination's guest does not run until the migration has completed, and
//! page-to-channel affinity, a protocol rule that the receiver checks before a byte
//! reaches guest memory, keeps every version of a page on one channel, whose thread
//! applies its frames one at a time. So while a frame is placed, no other thread reads
//! or writes its pages, and the decoder borrows them as `&mut [u8]` for one call (zstd
//! and lz4 decompress straight into a contiguous run, deflate and delta into each page).
//! Zero pages and raw payloads are written with raw-pointer copies
//! ([`GuestMemory::zero_pages`], [`GuestMemory::write_pages`]); [`GuestMemory::prefault`]
//! only asks the kernel to back pages and changes no byte. With
//! [`GuestMemory::install_pages`] (userfaultfd), pages never written are placed with
//! `UFFDIO_COPY` instead of a copy, and a handler thread resolves any other access to a
//! missing page with zeros (`crate::install`).

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use nix::errno::Errno;
use nix::sys::mman::{self, MapFlags, MmapAdvise, ProtFlags};
use pagewire_protocol::{GuestAddr, MemoryLayout, RegionDesc, RegionId};

use crate::dirty::DirtyLogError;
use crate::fresh::FreshPages;
use crate::install::Installer;

/// Errors describing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region's parameters are not acceptable.
    #[error("region {id:?}: {what}")]
    BadRegion {
        /// The region.
        id: RegionId,
        /// What is wrong.
        what: &'static str,
    },
    /// The regions do not form a valid layout (duplicate ids or overlap).
    #[error("invalid memory layout: {0}")]
    Layout(#[from] pagewire_protocol::DecodeError),
    /// The transfer page size is not one the protocol carries: a power of two from 4
    /// KiB to 2 MiB. Memory backed by larger pages (1 GiB hugetlbfs) is described with
    /// a smaller transfer page size and `backing_page_size`.
    #[error(
        "transfer page size {0} is not a power of two from 4096 to 2 MiB (describe larger backing pages with backing_page_size)"
    )]
    PageSize(u32),
    /// Mapping anonymous memory failed.
    #[error("mmap of {len} bytes failed")]
    Map {
        /// Bytes requested.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The VMM's [`MemoryProvider`] refused the layout (its error's text follows),
    /// panicked, or returned memory of another layout.
    #[error("the VMM's memory provider {0}")]
    Provider(String),
}

/// One region as the VMM describes it.
#[derive(Clone, Copy, Debug)]
pub struct RegionSpec {
    /// Region id, unique in the session.
    pub id: RegionId,
    /// Host virtual address of the region's first byte.
    pub host_addr: *mut u8,
    /// Guest physical address of the first byte.
    pub guest_addr: GuestAddr,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
    /// Page size backing the region (4 KiB, 2 MiB, 1 GiB).
    pub backing_page_size: u32,
}

#[derive(Debug)]
pub(crate) struct Region {
    desc: RegionDesc,
    host: NonNull<u8>,
    /// For memory this value mapped itself: the pages never written since, which
    /// still read as zeros.
    pub(crate) fresh: Option<FreshPages>,
}

/// The guest memory a migration reads (source) or writes (destination).
pub struct GuestMemory {
    page_size: u32,
    regions: Vec<Region>,
    layout: MemoryLayout,
    /// Mappings this value owns and unmaps on drop.
    pub(crate) owned: Vec<(NonNull<u8>, usize)>,
    /// What keeps the VMM's mappings alive ([`GuestMemory::keeping`]).
    owner: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// The userfaultfd registration of the owned mappings ([`GuestMemory::install_pages`]).
    pub(crate) installer: OnceLock<Installer>,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("page_size", &self.page_size)
            .field("layout", &self.layout)
            .field("owns_mappings", &!self.owned.is_empty())
            .field("has_owner", &self.owner.is_some())
            .field(
                "installing",
                &self.installer.get().is_some_and(Installer::is_active),
            )
            .finish()
    }
}

// SAFETY: the regions are plain memory whose validity `GuestMemory::new`'s caller
// guarantees for the value's lifetime. This type only hands out raw pointers and makes
// raw-pointer copies, which tolerate concurrent writers; the one place a reference is
// built over guest memory (a destination's decoder) relies on channel affinity to have
// the pages to itself (see the module docs). So sharing between threads adds no hazard
// beyond what the guest itself already does.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; `&GuestMemory` only hands out copies and raw pointers.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Describes guest memory at host addresses the VMM owns.
    ///
    /// # Safety
    /// For every region, `host_addr..host_addr + len` must be mapped readable and
    /// writable for as long as this value (and any migration using it) lives, and must
    /// not be unmapped or remapped meanwhile, and no `&mut` reference to it may exist
    /// while a migration uses it. The guest and other threads may write the memory of a
    /// source concurrently (through raw pointers, as vCPUs do): pagewire reads it only
    /// through raw pointers (mostly copies) and never builds a reference over it. A destination's
    /// memory must not be accessed by anyone else until the migration has completed:
    /// pagewire's decoders borrow the pages they place (see the module docs).
    ///
    /// # Errors
    /// `PageSize` for a transfer page size the protocol does not carry; `BadRegion` for
    /// a null, unaligned or empty region; `Layout` for duplicate ids or overlapping
    /// guest ranges.
    pub unsafe fn new(page_size: u32, specs: &[RegionSpec]) -> Result<Self, MemoryError> {
        if !pagewire_protocol::limits::valid_page_size(page_size) {
            return Err(MemoryError::PageSize(page_size));
        }
        let mut regions = Vec::with_capacity(specs.len());
        for s in specs {
            let bad = |what| MemoryError::BadRegion { id: s.id, what };
            let host = NonNull::new(s.host_addr).ok_or(bad("null host address"))?;
            if s.len == 0 || !s.len.is_multiple_of(u64::from(page_size)) {
                return Err(bad("length must be a non-zero multiple of the page size"));
            }
            if !(s.host_addr as usize).is_multiple_of(page_size as usize) {
                return Err(bad("host address must be page aligned"));
            }
            if usize::try_from(s.len).is_err() {
                return Err(bad("length does not fit the address space"));
            }
            regions.push(Region {
                desc: RegionDesc {
                    id: s.id,
                    backing_page_size: s.backing_page_size,
                    guest_addr: s.guest_addr,
                    length: s.len,
                },
                host,
                fresh: None,
            });
        }
        let layout = MemoryLayout::new(page_size, regions.iter().map(|r| r.desc))?;
        regions.sort_by_key(|r| r.desc.id);
        Ok(Self {
            page_size,
            regions,
            layout,
            owned: Vec::new(),
            owner: None,
            installer: OnceLock::new(),
        })
    }

    /// Allocates zero-filled anonymous memory for `layout`'s regions (a destination's
    /// guest memory, or a test's). The mappings are private, lazily backed, and
    /// unmapped on drop.
    ///
    /// # Errors
    /// `Map` when the kernel refuses the mapping; `BadRegion` as [`GuestMemory::new`].
    pub fn anonymous(layout: &MemoryLayout) -> Result<Self, MemoryError> {
        let mut owned = Vec::new();
        let mut specs = Vec::new();
        for r in layout.regions() {
            let len = usize::try_from(r.length).map_err(|_| MemoryError::BadRegion {
                id: r.id,
                what: "length does not fit the address space",
            })?;
            // A layout's regions are never empty; mmap would refuse a zero length.
            let Some(nz_len) = NonZeroUsize::new(len) else {
                free_mappings(&owned);
                return Err(MemoryError::Map {
                    len: r.length,
                    source: Errno::EINVAL.into(),
                });
            };
            // SAFETY: a fresh private anonymous mapping with no address hint; no existing
            // memory is affected.
            let mapped = unsafe {
                mman::mmap_anonymous(
                    None,
                    nz_len,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
                )
            };
            let p = match mapped {
                Ok(p) => p.cast::<u8>(),
                Err(e) => {
                    free_mappings(&owned);
                    return Err(MemoryError::Map {
                        len: r.length,
                        source: e.into(),
                    });
                }
            };
            owned.push((p, len));
            specs.push(RegionSpec {
                id: r.id,
                host_addr: p.as_ptr(),
                guest_addr: r.guest_addr,
                len: r.length,
                backing_page_size: r.backing_page_size,
            });
        }
        // SAFETY: the mappings were just created, are readable and writable, and are
        // owned by the value returned, which unmaps them only when dropped.
        match unsafe { Self::new(layout.page_size(), &specs) } {
            Ok(mut m) => {
                m.owned = owned;
                let ps = u64::from(m.page_size);
                for r in &mut m.regions {
                    r.fresh = Some(FreshPages::new(r.desc.length / ps));
                }
                Ok(m)
            }
            Err(e) => {
                free_mappings(&owned);
                Err(e)
            }
        }
    }

    /// Describes the regions of a rust-vmm `vm-memory` guest memory (for example a
    /// `GuestMemoryMmap`), region `i` getting id `i`.
    ///
    /// # Safety
    /// `mem`'s mappings must stay mapped, unchanged, for as long as the returned value
    /// and any migration using it live (keep `mem`, or the `GuestMemoryAtomic` holding
    /// it, alive and do not hot-unplug its regions meanwhile). As with
    /// [`GuestMemory::new`], the guest may write the memory concurrently.
    ///
    /// # Errors
    /// `BadRegion` for a region without a host mapping or not page aligned; `Layout`
    /// for overlapping regions.
    #[cfg(feature = "vm-memory")]
    pub unsafe fn from_vm_memory<M: vm_memory::GuestMemoryBackend>(
        mem: &M,
        page_size: u32,
    ) -> Result<Self, MemoryError> {
        use vm_memory::{Address, GuestMemoryRegion, MemoryRegionAddress};
        let mut specs = Vec::new();
        for (i, r) in mem.iter().enumerate() {
            let id = RegionId(i as u32);
            let host =
                r.get_host_address(MemoryRegionAddress(0))
                    .map_err(|_| MemoryError::BadRegion {
                        id,
                        what: "the region has no host mapping",
                    })?;
            specs.push(RegionSpec {
                id,
                host_addr: host,
                guest_addr: GuestAddr(r.start_addr().raw_value()),
                len: r.len(),
                backing_page_size: if r.is_hugetlbfs() == Some(true) {
                    2 << 20
                } else {
                    page_size
                },
            });
        }
        // SAFETY: the caller keeps `mem`'s mappings alive and in place (this function's
        // contract), which is what `new` requires.
        unsafe { Self::new(page_size, &specs) }
    }

    /// Keeps `owner` (e.g. the VMM's `GuestMemoryMmap`, or its memfd mappings) alive
    /// as long as this value, so the mappings it describes cannot go away under a
    /// migration (or a destination's [`crate::Migrated`]).
    #[must_use]
    pub fn keeping(mut self, owner: impl std::any::Any + Send + Sync) -> Self {
        self.owner = Some(Box::new(owner));
        self
    }

    /// The layout sent to the destination.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The page size.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Region ids in ascending order.
    pub fn region_ids(&self) -> impl Iterator<Item = RegionId> + '_ {
        self.regions.iter().map(|r| r.desc.id)
    }

    /// Pages in a region.
    pub fn pages(&self, region: RegionId) -> Option<u64> {
        self.layout.pages(region)
    }

    pub(crate) fn region(&self, id: RegionId) -> Option<&Region> {
        self.regions
            .binary_search_by_key(&id, |r| r.desc.id)
            .ok()
            .map(|i| &self.regions[i])
    }

    /// A raw pointer to a page, or `None` when it is outside the memory. Dereferencing it
    /// is the caller's unsafe step: the memory is shared with the guest.
    pub fn page_ptr(&self, region: RegionId, page: u64) -> Option<NonNull<u8>> {
        let r = self.region(region)?;
        let off = page.checked_mul(u64::from(self.page_size))?;
        if off >= r.desc.length {
            return None;
        }
        // SAFETY: `off < length`, so the result stays inside the region's mapping, whose
        // length fits `usize` (checked in `new`).
        Some(unsafe { r.host.add(off as usize) })
    }

    /// Copies `pages` consecutive pages starting at `page` into `dst`.
    ///
    /// Returns `false` (copying nothing) when the range is outside the region or `dst`
    /// is not exactly that long.
    pub fn read_pages(&self, region: RegionId, page: u64, pages: u64, dst: &mut [u8]) -> bool {
        let Some((src, len)) = self.span(region, page, pages) else {
            return false;
        };
        if dst.len() != len {
            return false;
        }
        // SAFETY: `span` checked that `src..src+len` lies inside a mapped region; `dst` is
        // a distinct Rust buffer of the same length. Concurrent guest writes can tear the
        // copy, which the dirty log makes harmless (module docs).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), len) };
        true
    }

    /// Copies `src` into consecutive pages starting at `page`.
    ///
    /// Returns `false` (writing nothing) when the range is outside the region or `src` is
    /// not a whole number of pages.
    pub fn write_pages(&self, region: RegionId, page: u64, src: &[u8]) -> bool {
        let ps = self.page_size as usize;
        if src.is_empty() || !src.len().is_multiple_of(ps) {
            return false;
        }
        let Some((dst, len)) = self.span(region, page, (src.len() / ps) as u64) else {
            return false;
        };
        let pages = (src.len() / ps) as u64;
        match self.installing(region) {
            Some((installer, fresh)) => {
                for (start, count, is_fresh) in fresh.runs(page, pages) {
                    // Inside `page..page + pages`, which `span` checked.
                    let off = (start - page) as usize * ps;
                    let n = count as usize * ps;
                    // SAFETY: `off + n <= len`, inside the range `span` checked; `src`
                    // is a separate buffer; one writer per page (channel affinity, and
                    // the copy gate for ROUND_END copies).
                    unsafe {
                        let (d, s) = (dst.as_ptr().add(off), src.as_ptr().add(off));
                        if is_fresh {
                            installer.copy(d, s, n);
                        } else {
                            std::ptr::copy_nonoverlapping(s, d, n);
                        }
                    }
                }
            }
            // SAFETY: `span` checked the destination range lies inside a mapped region,
            // and `src` is a separate buffer of exactly `len` bytes.
            None => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_ptr(), len) },
        }
        self.note_written(region, page, pages);
        true
    }

    /// Fills consecutive pages with zeros. Pages of memory this value mapped itself
    /// ([`GuestMemory::anonymous`]) that were never written since are left alone: they
    /// read as zeros already, and writing them would only fault them in.
    pub fn zero_pages(&self, region: RegionId, page: u64, pages: u64) -> bool {
        let Some((dst, len)) = self.span(region, page, pages) else {
            return false;
        };
        match self.region(region).and_then(|r| r.fresh.as_ref()) {
            Some(fresh) => {
                let ps = self.page_size as usize;
                for (start, count) in fresh.touched_runs(page, pages) {
                    // `touched_runs` stays inside `page..page + pages`, which `span`
                    // checked.
                    let off = (start - page) as usize * ps;
                    // SAFETY: `off + count * ps <= len`, inside the range `span` checked.
                    unsafe { std::ptr::write_bytes(dst.as_ptr().add(off), 0, count as usize * ps) };
                }
            }
            // SAFETY: `span` checked the range lies inside a mapped region.
            None => unsafe { std::ptr::write_bytes(dst.as_ptr(), 0, len) },
        }
        true
    }

    /// Fills consecutive pages with `byte` (a uniform run; zero pages go through
    /// [`GuestMemory::zero_pages`]).
    pub fn fill_pages(&self, region: RegionId, page: u64, pages: u64, byte: u8) -> bool {
        if byte == 0 {
            return self.zero_pages(region, page, pages);
        }
        let Some((dst, len)) = self.span(region, page, pages) else {
            return false;
        };
        match self.installing(region) {
            // Pages still missing are installed from a buffer of that byte, as
            // `write_pages` installs them.
            Some((_, fresh)) if fresh.any_fresh(page, pages) => {
                const CHUNK: u64 = 32;
                let ps = self.page_size as usize;
                let buf = vec![byte; CHUNK.min(pages) as usize * ps];
                let mut p = page;
                while p < page + pages {
                    let n = CHUNK.min(page + pages - p);
                    self.write_pages(region, p, &buf[..n as usize * ps]);
                    p += n;
                }
            }
            // SAFETY: `span` checked the range lies inside a mapped region.
            _ => unsafe { std::ptr::write_bytes(dst.as_ptr(), byte, len) },
        }
        self.note_written(region, page, pages);
        true
    }

    /// Records that pages were written by other means (a codec decoding into
    /// [`GuestMemory::span`], a transport placing a payload), so that a later zero page
    /// there is written, not skipped.
    pub(crate) fn note_written(&self, region: RegionId, page: u64, pages: u64) {
        if let Some(fresh) = self.region(region).and_then(|r| r.fresh.as_ref()) {
            fresh.touch(page, pages);
        }
    }

    /// The host range of `pages` pages from `page`, bounds-checked.
    pub fn span(&self, region: RegionId, page: u64, pages: u64) -> Option<(NonNull<u8>, usize)> {
        let r = self.region(region)?;
        let ps = u64::from(self.page_size);
        let off = page.checked_mul(ps)?;
        let len = pages.checked_mul(ps)?;
        if pages == 0 || off.checked_add(len)? > r.desc.length {
            return None;
        }
        // SAFETY: `off + len <= length`, inside the mapping (its length fits usize).
        Some((unsafe { r.host.add(off as usize) }, len as usize))
    }

    /// Asks for transparent huge pages (MADV_HUGEPAGE) on the mappings this value owns
    /// (those of [`GuestMemory::anonymous`]); memory from elsewhere is left alone.
    /// Errors are ignored (a kernel without THP): it is an optimisation.
    pub fn advise_huge_pages(&self) {
        for &(p, len) in &self.owned {
            // SAFETY: advising over a mapping this value owns; MADV_HUGEPAGE changes
            // how the kernel backs it, never its contents.
            let _ = unsafe { mman::madvise(p.cast(), len, MmapAdvise::MADV_HUGEPAGE) };
        }
    }

    /// Asks for transparent huge pages (MADV_HUGEPAGE) on `len` bytes from host
    /// address `start` where they lie inside one mapping this value owns; anything else
    /// is left alone. Whether the kernel took the advice (a range outside the owned
    /// mappings is refused here; the kernel refuses, for one, once the process has
    /// `vm.max_map_count` mappings, as advising part of a mapping splits it).
    pub(crate) fn advise_huge_range(&self, start: usize, len: usize) -> bool {
        let inside = self.owned.iter().any(|&(p, l)| {
            let p = p.as_ptr() as usize;
            start >= p && start.checked_add(len).is_some_and(|end| end <= p + l)
        });
        let Some(ptr) = NonNull::new(start as *mut std::ffi::c_void).filter(|_| inside) else {
            return false;
        };
        // SAFETY: the range lies inside a mapping this value owns; MADV_HUGEPAGE changes
        // how the kernel backs it, never its contents.
        unsafe { mman::madvise(ptr, len, MmapAdvise::MADV_HUGEPAGE) }.is_ok()
    }

    /// Asks for no transparent huge pages (MADV_NOHUGEPAGE) on the mappings this value
    /// owns, so that where THP is on for every mapping (`enabled` = `always`) only
    /// the ranges advised later get them. Errors are ignored (a kernel without THP).
    pub(crate) fn advise_no_huge_pages(&self) {
        for &(p, len) in &self.owned {
            // SAFETY: advising over a mapping this value owns; MADV_NOHUGEPAGE changes
            // how the kernel backs it, never its contents.
            let _ = unsafe { mman::madvise(p.cast(), len, MmapAdvise::MADV_NOHUGEPAGE) };
        }
    }

    /// Asks the kernel to back `pages` pages from `page` now (MADV_POPULATE_WRITE), in
    /// one call; out-of-range requests and errors are ignored (an optimisation).
    pub fn populate(&self, region: RegionId, page: u64, pages: u64) {
        if let Some((ptr, len)) = self.span(region, page, pages) {
            // SAFETY: `span` checked the range lies inside a mapped region;
            // POPULATE_WRITE only faults pages in, it does not change contents.
            let _ = unsafe { mman::madvise(ptr.cast(), len, MmapAdvise::MADV_POPULATE_WRITE) };
        }
    }

    /// Asks the kernel to back every page now (MADV_POPULATE_WRITE), so a destination
    /// does not take page faults during downtime. It works in 2 MiB steps so that the
    /// threads applying frames meanwhile are never held up for long. Errors are ignored
    /// (older kernels lack the advice): it is an optimisation.
    pub fn prefault(&self) {
        self.prefault_until(&AtomicBool::new(false));
    }

    /// [`Self::prefault`], stopping before the next 2 MiB step once `stop` is set.
    /// Returns whether it went through every region (`false` when stopped, or when the
    /// kernel refused the advice).
    pub fn prefault_until(&self, stop: &AtomicBool) -> bool {
        const STEP: usize = 2 << 20;
        for r in &self.regions {
            let len = r.desc.length as usize;
            let mut off = 0;
            while off < len {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                let n = STEP.min(len - off);
                // SAFETY: advising over a range inside our own mapped region;
                // POPULATE_WRITE only faults pages in, it does not change contents.
                let rc = unsafe {
                    mman::madvise(r.host.add(off).cast(), n, MmapAdvise::MADV_POPULATE_WRITE)
                };
                if rc.is_err() {
                    return false;
                }
                off += n;
            }
        }
        true
    }
}

fn free_mappings(owned: &[(NonNull<u8>, usize)]) {
    for &(p, len) in owned {
        // A failed munmap leaves nothing to undo, so its result is ignored.
        // SAFETY: each entry is a mapping this module created with this length and no
        // longer uses.
        let _ = unsafe { mman::munmap(p.cast(), len) };
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // Unregistered (and its handler joined) while the mappings still exist.
        self.finish_install();
        free_mappings(&self.owned);
        // `owner` (the VMM's mappings) drops after the last use of the pointers.
    }
}

/// The VMM's memory for an incoming migration, chosen once the source's LAYOUT has
/// arrived and passed [`DestinationConfig::limits`](crate::DestinationConfig::limits):
/// e.g. memfd or hugetlbfs memslots of exactly that layout. A closure
/// `Fn(&MemoryLayout) -> Result<Arc<GuestMemory>, DirtyLogError>` is a provider.
pub trait MemoryProvider: Send + Sync {
    /// Returns guest memory with exactly `layout`'s regions, or refuses it (the
    /// migration fails and the source is told why).
    ///
    /// # Errors
    /// The VMM's reason for refusing.
    fn memory_for(&self, layout: &MemoryLayout) -> Result<Arc<GuestMemory>, DirtyLogError>;
}

impl<F> MemoryProvider for F
where
    F: Fn(&MemoryLayout) -> Result<Arc<GuestMemory>, DirtyLogError> + Send + Sync,
{
    fn memory_for(&self, layout: &MemoryLayout) -> Result<Arc<GuestMemory>, DirtyLogError> {
        self(layout)
    }
}

/// Where a destination puts the guest's memory.
#[non_exhaustive]
#[derive(Clone, Default)]
pub enum DestinationMemory {
    /// Private anonymous memory mapped for the source's layout and prepared as
    /// [`DestinationConfig::prefault`](crate::DestinationConfig::prefault) says (the
    /// default).
    #[default]
    Anonymous,
    /// This memory; the source's layout must match it exactly.
    Given(Arc<GuestMemory>),
    /// Asked of the VMM when the layout arrives; not pre-faulted (the VMM backs it as
    /// it likes).
    Provider(Arc<dyn MemoryProvider>),
}

impl std::fmt::Debug for DestinationMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DestinationMemory::Anonymous => f.write_str("Anonymous"),
            DestinationMemory::Given(m) => f.debug_tuple("Given").field(m.layout()).finish(),
            DestinationMemory::Provider(_) => f.write_str("Provider(..)"),
        }
    }
}

impl From<Option<Arc<GuestMemory>>> for DestinationMemory {
    fn from(m: Option<Arc<GuestMemory>>) -> Self {
        m.map_or(DestinationMemory::Anonymous, DestinationMemory::Given)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(
            4096,
            [
                RegionDesc {
                    id: RegionId(0),
                    backing_page_size: 4096,
                    guest_addr: GuestAddr(0),
                    length: 16 * 4096,
                },
                RegionDesc {
                    id: RegionId(7),
                    backing_page_size: 4096,
                    guest_addr: GuestAddr(1 << 30),
                    length: 4 * 4096,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn pages_copy_in_and_out_within_bounds() {
        let m = GuestMemory::anonymous(&layout()).unwrap();
        let page = vec![0xab; 2 * 4096];
        assert!(m.write_pages(RegionId(7), 2, &page));
        let mut back = vec![0; 2 * 4096];
        assert!(m.read_pages(RegionId(7), 2, 2, &mut back));
        assert_eq!(back, page);
        // Out of bounds and wrong sizes write nothing.
        assert!(!m.write_pages(RegionId(7), 3, &page));
        assert!(!m.write_pages(RegionId(7), 0, &page[..100]));
        assert!(!m.read_pages(RegionId(9), 0, 1, &mut back[..4096]));
        assert!(m.page_ptr(RegionId(7), 4).is_none());
        assert!(m.zero_pages(RegionId(7), 2, 1));
        assert!(m.read_pages(RegionId(7), 2, 1, &mut back[..4096]));
        assert!(back[..4096].iter().all(|&b| b == 0));
    }

    /// Whether the page at `ptr` is backed by memory (mincore).
    fn resident(ptr: NonNull<u8>) -> bool {
        let mut vec = [0u8; 1];
        // SAFETY: `ptr` is a page-aligned address inside a live mapping, and `vec`
        // holds the one byte mincore writes for one page.
        let rc = unsafe { nix::libc::mincore(ptr.as_ptr().cast(), 4096, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec[0] & 1 != 0
    }

    #[test]
    fn prefault_populates_every_page_unless_stopped() {
        let m = GuestMemory::anonymous(&layout()).unwrap();
        let r = RegionId(0);
        let last = m.pages(r).unwrap() - 1;
        // Stopped before it began: nothing backed.
        assert!(!m.prefault_until(&AtomicBool::new(true)));
        assert!(!resident(m.page_ptr(r, 0).unwrap()));
        assert!(!resident(m.page_ptr(r, last).unwrap()));
        assert!(m.prefault_until(&AtomicBool::new(false)));
        assert!(resident(m.page_ptr(r, 0).unwrap()));
        assert!(resident(m.page_ptr(r, last).unwrap()));
    }

    #[test]
    fn zero_pages_on_fresh_memory_are_not_touched_and_written_pages_are_zeroed() {
        let m = GuestMemory::anonymous(&layout()).unwrap();
        let r = RegionId(0);
        // Fresh: zeroing faults nothing in.
        assert!(m.zero_pages(r, 0, 16));
        assert!((0..16).all(|p| !resident(m.page_ptr(r, p).unwrap())));
        // Written by a uniform run, a copy and a decoder: a later zero run writes them.
        assert!(m.fill_pages(r, 1, 2, 0xcc));
        assert!(m.write_pages(r, 5, &[7u8; 4096]));
        let (ptr, len) = m.span(r, 9, 1).unwrap();
        // SAFETY: `span` returned a range inside the mapping.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0x55, len) };
        m.note_written(r, 9, 1);
        let mut page = vec![0u8; 4096];
        assert!(m.read_pages(r, 2, 1, &mut page));
        assert!(page.iter().all(|&b| b == 0xcc));
        assert!(m.zero_pages(r, 0, 16));
        // (Reading a fresh page maps the shared zero page, so check before reading.)
        assert!(!resident(m.page_ptr(r, 0).unwrap()));
        assert!(!resident(m.page_ptr(r, 3).unwrap()));
        for p in 0..16 {
            assert!(m.read_pages(r, p, 1, &mut page));
            assert!(page.iter().all(|&b| b == 0), "page {p}");
        }
        // Memory the VMM gives is never assumed zero.
        let mut buf = vec![0xeeu8; 8 * 4096 + 4096];
        let off = buf.as_ptr().align_offset(4096);
        let spec = RegionSpec {
            id: RegionId(0),
            host_addr: buf[off..].as_mut_ptr(),
            guest_addr: GuestAddr(0),
            len: 8 * 4096,
            backing_page_size: 4096,
        };
        // SAFETY: the buffer outlives `given`.
        let given = unsafe { GuestMemory::new(4096, &[spec]) }.unwrap();
        assert!(given.zero_pages(r, 0, 8));
        assert!(buf[off..off + 8 * 4096].iter().all(|&b| b == 0));
    }

    #[cfg(feature = "vm-memory")]
    #[test]
    fn vm_memory_regions_are_described_and_shared() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let vm: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 8 * 4096),
            (GuestAddress(1 << 32), 4 * 4096),
        ])
        .unwrap();
        vm.write_slice(&[7u8; 4096], GuestAddress((1 << 32) + 4096))
            .unwrap();
        // SAFETY: `vm` outlives `m` in this test.
        let m = unsafe { GuestMemory::from_vm_memory(&vm, 4096) }.unwrap();
        assert_eq!(m.pages(RegionId(0)), Some(8));
        assert_eq!(m.pages(RegionId(1)), Some(4));
        let mut page = vec![0u8; 4096];
        assert!(m.read_pages(RegionId(1), 1, 1, &mut page));
        assert!(page.iter().all(|&b| b == 7));
        assert!(m.write_pages(RegionId(0), 2, &[9u8; 4096]));
        let mut back = [0u8; 4096];
        vm.read_slice(&mut back, GuestAddress(2 * 4096)).unwrap();
        assert!(back.iter().all(|&b| b == 9));
    }

    #[test]
    fn bad_regions_are_refused() {
        let mut buf = vec![0u8; 3 * 4096];
        let spec = RegionSpec {
            id: RegionId(0),
            host_addr: buf.as_mut_ptr(),
            guest_addr: GuestAddr(0),
            len: 4096 + 1,
            backing_page_size: 4096,
        };
        // SAFETY: the test buffer outlives the value (which is an error anyway).
        let res = unsafe { GuestMemory::new(4096, &[spec]) };
        assert!(matches!(res, Err(MemoryError::BadRegion { .. })));
    }
}
