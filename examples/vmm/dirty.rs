//! Dirty pages as KVM reports them, per memslot: the dirty bitmap with manual protect
//! (`KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG`) or the per-vCPU dirty rings
//! (harvest, then `KVM_RESET_DIRTY_RINGS`), plus the pages the VMM itself wrote into
//! guest memory, which KVM never sees.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_DIRTY_LOG_PAGE_OFFSET, kvm_clear_dirty_log, kvm_dirty_gfn};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

use crate::guest::PAGE;
use crate::vm::{DirtyMode, Vm};

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;

/// One bit per page, settable from any thread.
pub struct PageBitmap {
    words: Vec<AtomicU64>,
}

impl PageBitmap {
    /// An empty bitmap of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Marks `page` (ignored past the end).
    pub fn set(&self, page: u64) {
        if let Some(w) = self.words.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// The marks as KVM-style words (bit n = page n), clearing them atomically.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }
}

/// A vCPU's dirty ring, mapped from its fd.
struct Ring {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Next entry to harvest (free-running).
    fetch: u32,
}

// SAFETY: the ring is a shared mapping of the vCPU fd that this value owns; entries are
// accessed through atomics (flags) and volatile reads, under the tracker's mutex.
unsafe impl Send for Ring {}

impl Ring {
    fn map(vcpu: &VcpuFd, bytes: u32) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let offset = i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE as i64;
        // SAFETY: maps `bytes` of the vCPU fd's dirty ring area at the documented
        // offset; a fresh mapping that aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(p.cast()).ok_or(io::ErrorKind::InvalidData)?,
            entries: bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
            fetch: 0,
        })
    }

    /// Moves every entry KVM published into `marks` (slot, page) and hands it back.
    fn harvest(&mut self, mut mark: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        // Bounded: a ring holds `entries` entries.
        for _ in 0..self.entries {
            let i = (self.fetch % self.entries) as usize;
            // SAFETY: `i < entries`, inside the mapping; `flags` is the entry's first
            // u32, naturally aligned, and KVM writes it concurrently, hence the atomic.
            let e = unsafe { self.base.as_ptr().add(i) };
            // SAFETY: as above; `e` points at a live, aligned entry.
            let flags = unsafe { &*(e.cast::<AtomicU32>()) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: KVM published the entry (DIRTY, acquire above) and does not
            // change it until we set RESET.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(&raw const (*e).slot),
                    std::ptr::read_volatile(&raw const (*e).offset),
                )
            };
            mark(slot & 0xffff, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping `map` created; nothing refers to it now.
        unsafe { libc::munmap(self.base.as_ptr().cast(), bytes) };
    }
}

/// Dirty pages per memslot, from KVM and from the VMM's own writes.
pub struct DirtyTracker {
    vm: Arc<Vm>,
    rings: Vec<Mutex<Ring>>,
    ring_marks: Vec<PageBitmap>,
    vmm_marks: Vec<PageBitmap>,
}

impl DirtyTracker {
    /// A tracker for `vm`'s slots; in ring mode, attach every vCPU before it runs.
    pub fn new(vm: Arc<Vm>) -> Self {
        let marks = || {
            vm.slots
                .iter()
                .map(|s| PageBitmap::new(s.pages()))
                .collect()
        };
        Self {
            ring_marks: marks(),
            vmm_marks: marks(),
            rings: Vec::new(),
            vm,
        }
    }

    /// Maps `vcpu`'s dirty ring (ring mode; nothing in bitmap mode).
    ///
    /// # Errors
    /// The mapping failed.
    pub fn attach(&mut self, vcpu: &VcpuFd) -> io::Result<()> {
        if self.vm.dirty == DirtyMode::Ring {
            self.rings
                .push(Mutex::new(Ring::map(vcpu, self.vm.ring_bytes)?));
        }
        Ok(())
    }

    /// Records that the VMM wrote `len` bytes at guest address `gpa`.
    pub fn mark_vmm_write(&self, gpa: u64, len: u64) {
        for (s, marks) in self.vm.slots.iter().zip(&self.vmm_marks) {
            let end = gpa + len.max(1);
            let (lo, hi) = (gpa.max(s.guest), end.min(s.guest + s.len));
            let mut a = lo;
            while a < hi {
                marks.set((a - s.guest) / PAGE);
                a = (a / PAGE + 1) * PAGE;
            }
        }
    }

    /// Empties every vCPU's dirty ring into the marks and lets KVM reuse the entries
    /// (on `KVM_EXIT_DIRTY_RING_FULL`, and before reading the marks).
    ///
    /// Returns the entries harvested.
    ///
    /// # Errors
    /// `KVM_RESET_DIRTY_RINGS` failed.
    pub fn harvest(&self) -> io::Result<u32> {
        let mut any = 0;
        for r in &self.rings {
            let mut ring = r.lock().map_err(|_| io::Error::other("dirty ring lock"))?;
            any += ring.harvest(|slot, page| {
                if let Some(m) = self.ring_marks.get(slot as usize) {
                    m.set(page);
                }
            });
        }
        if any > 0 {
            // SAFETY: a VM fd ioctl without argument.
            let ret = unsafe { ioctl(&self.vm.fd, KVM_RESET_DIRTY_RINGS()) };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(any)
    }

    /// The pages of `slot` dirtied since the last call (bit n = page n of the slot),
    /// and re-arms tracking of them: a guest write after this call is reported by the
    /// next one.
    ///
    /// # Errors
    /// KVM's dirty log ioctls failed.
    pub fn take(&self, slot: usize) -> io::Result<Vec<u64>> {
        let s = self
            .vm
            .slots
            .get(slot)
            .ok_or_else(|| io::Error::other(format!("no memslot {slot}")))?;
        let mut words = match self.vm.dirty {
            DirtyMode::Bitmap => self.take_bitmap(slot as u32, s.len)?,
            DirtyMode::Ring => {
                self.harvest()?;
                self.ring_marks[slot].take()
            }
        };
        for (w, v) in words.iter_mut().zip(self.vmm_marks[slot].take()) {
            *w |= v;
        }
        Ok(words)
    }

    fn take_bitmap(&self, slot: u32, len: u64) -> io::Result<Vec<u64>> {
        let mut words = self
            .vm
            .fd
            .get_dirty_log(slot, len as usize)
            .map_err(io::Error::from)?;
        if words.iter().all(|w| *w == 0) {
            return Ok(words);
        }
        let clear = kvm_clear_dirty_log {
            slot,
            num_pages: (len / PAGE) as u32,
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `clear` points at a bitmap of `num_pages` bits that lives across the
        // call; KVM only reads it.
        let ret = unsafe { ioctl_with_ref(&self.vm.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bitmap_takes_and_clears() {
        let b = PageBitmap::new(130);
        b.set(3);
        b.set(129);
        b.set(1000);
        assert_eq!(b.take(), vec![1 << 3, 0, 1 << 1]);
        assert_eq!(b.take(), vec![0, 0, 0]);
    }
}
