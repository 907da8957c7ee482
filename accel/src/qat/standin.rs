//! Steering the QAT stand-in (see [`standin_library`](super::standin_library)) from
//! tests and tools: a private copy per user, instance count, injected failures, and
//! the counters it keeps. Not used by the backend itself.

use core::cell::RefCell;
use core::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use libdeflate_sys::{
    libdeflate_alloc_decompressor, libdeflate_deflate_decompress_ex, libdeflate_free_decompressor,
    libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE, libdeflate_result_LIBDEFLATE_SUCCESS,
};

thread_local! {
    /// The hooks' libdeflate compressors by level, per thread.
    static COMPRESSORS: RefCell<Vec<Option<libdeflater::Compressor>>> =
        RefCell::new((0..=12).map(|_| None).collect());
    /// The input the deflate hook compresses: its own copy, read once.
    static SNAPSHOT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The stand-in's deflate hook (installed by the QAT runtime when it loads the
/// stand-in): raw deflate of `len` bytes at `level` into at most `cap` bytes.
///
/// The input is a guest page handed to the "device" in place, which the guest may be
/// writing meanwhile. A device reads it once, as its DMA streams it in; libdeflate
/// reads its input several times (match finding, then a stored block's bytes), and
/// from bytes that change under it writes streams that decode to another length or
/// not at all (a 20 s loop on this machine: 15 of 165,545 level-6 streams of a page
/// written by another thread). So the hook compresses its own copy, read once.
///
/// # Safety
/// `input` is readable for `len` bytes (its bytes may change during the call) and
/// `out` writable for `cap` bytes, which nothing else reads or writes during the call.
pub(crate) unsafe extern "C" fn deflate_hook(
    level: c_int,
    input: *const u8,
    len: usize,
    out: *mut u8,
    cap: usize,
) -> usize {
    if input.is_null() || out.is_null() {
        return 0;
    }
    // SAFETY: the caller's contract.
    let out = unsafe { core::slice::from_raw_parts_mut(out, cap) };
    std::panic::catch_unwind(core::panic::AssertUnwindSafe(|| {
        SNAPSHOT.with(|snap| {
            let mut snap = snap.borrow_mut();
            if snap.len() < len {
                snap.resize(len, 0);
            }
            // SAFETY: `input` is readable for `len` bytes (the caller's contract) and
            // `snap` holds at least `len`. The raw-pointer copy is the one read of the
            // page (a concurrent guest write changes what it reads, nothing else).
            unsafe { core::ptr::copy_nonoverlapping(input, snap.as_mut_ptr(), len) };
            COMPRESSORS.with(|c| {
                let mut c = c.borrow_mut();
                let lvl = level.clamp(1, 12);
                let slot = c.get_mut(lvl as usize)?;
                if slot.is_none() {
                    *slot = Some(libdeflater::Compressor::new(
                        libdeflater::CompressionLvl::new(lvl).ok()?,
                    ));
                }
                slot.as_mut()?.deflate_compress(&snap[..len], out).ok()
            })
        })
    }))
    .ok()
    .flatten()
    .unwrap_or(0)
}

/// The stand-in's inflate hook: 0 (and the bytes consumed and produced) on success, 1
/// when `cap` is too small, 2 for a bad stream.
///
/// # Safety
/// `input` is readable for `len` bytes, `out` writable for `cap` bytes, and the two
/// out-pointers are writable.
pub(crate) unsafe extern "C" fn inflate_hook(
    input: *const u8,
    len: usize,
    out: *mut u8,
    cap: usize,
    consumed: *mut usize,
    produced: *mut usize,
) -> c_int {
    if input.is_null() || out.is_null() || consumed.is_null() || produced.is_null() {
        return 2;
    }
    // SAFETY: plain allocation; NULL means failure.
    let d = unsafe { libdeflate_alloc_decompressor() };
    if d.is_null() {
        return 2;
    }
    // SAFETY: the caller's contract; `d` is a live decompressor freed right after.
    let r = unsafe {
        let r = libdeflate_deflate_decompress_ex(
            d,
            input.cast(),
            len,
            out.cast(),
            cap,
            consumed,
            produced,
        );
        libdeflate_free_decompressor(d);
        r
    };
    if r == libdeflate_result_LIBDEFLATE_SUCCESS {
        0
    } else if r == libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE {
        1
    } else {
        2
    }
}

/// A failure the stand-in injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Inject {
    /// The next `n` submissions answer `CPA_STATUS_RETRY` (instance busy).
    Busy(u32),
    /// The next `n` submissions answer `CPA_STATUS_RESTARTING`.
    Restarting(u32),
    /// The device is lost: every submission fails with `CPA_STATUS_FAIL` and the
    /// requests in flight complete with it.
    Lost,
    /// The next `n` compressions that ask for compress-and-verify report
    /// `CPA_DC_VERIFY_ERROR`.
    VerifyFails(u32),
}

/// What the stand-in counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Blocks from `qaeMemAllocNUMA` not freed yet.
    pub live_allocations: u64,
    /// Requests accepted.
    pub submitted: u64,
    /// Requests completed (callback called).
    pub completed: u64,
    /// Sessions set up and not removed.
    pub live_sessions: u64,
    /// Compressions verified on request.
    pub verified: u64,
    /// Submissions answered `CPA_STATUS_RETRY`.
    pub retries: u64,
    /// Instances started.
    pub starts: u64,
}

/// A private copy of the stand-in library: its own global state, loaded by the QAT
/// backend when its path is given as the library, and steered from here.
pub struct StandIn {
    path: PathBuf,
    lib: libloading::Library,
}

impl core::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StandIn").field("path", &self.path).finish()
    }
}

/// Why a stand-in copy could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StandInError {
    /// Copying the library failed.
    #[error("cannot copy the QAT stand-in to {path}: {source}")]
    Copy {
        /// The copy's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading it or one of its control functions failed.
    #[error("cannot load the QAT stand-in: {0}")]
    Load(#[from] libloading::Error),
}

impl StandIn {
    /// Copies the stand-in into the temporary directory under a unique name and loads
    /// it there, configured with `instances` data compression instances (at most 8);
    /// `contiguous` makes them require physically contiguous memory (no SVM).
    ///
    /// # Errors
    /// [`StandInError`] when the copy or the load fails.
    pub fn private(instances: u32, contiguous: bool) -> Result<StandIn, StandInError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "pagewire-qat-standin-{}-{}.so",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::copy(super::standin_library(), &path).map_err(|source| StandInError::Copy {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the stand-in's initialisers are the C runtime's only.
        let lib = unsafe { libloading::Library::new(&path) }?;
        let s = StandIn { path, lib };
        // SAFETY: the stand-in exports this function with this signature.
        unsafe {
            let f = s
                .lib
                .get::<unsafe extern "C" fn(c_int, c_int)>(b"pagewire_standin_configure\0")?;
            f(instances as c_int, c_int::from(contiguous));
        }
        Ok(s)
    }

    /// The copy's path: the library to give the backend.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Injects a failure.
    pub fn inject(&self, what: Inject) {
        let (kind, n) = match what {
            Inject::Busy(n) => (1, n),
            Inject::Restarting(n) => (2, n),
            Inject::Lost => (3, 0),
            Inject::VerifyFails(n) => (4, n),
        };
        // SAFETY: the stand-in exports this function with this signature.
        if let Ok(f) = unsafe {
            self.lib
                .get::<unsafe extern "C" fn(c_int, c_int)>(b"pagewire_standin_inject\0")
        } {
            // SAFETY: plain values.
            unsafe { f(kind, n.min(c_int::MAX as u32) as c_int) };
        }
    }

    /// The stand-in's counters.
    pub fn counters(&self) -> Counters {
        let mut out = [0u64; 7];
        // SAFETY: the stand-in exports this function, which writes 7 u64s.
        if let Ok(f) = unsafe {
            self.lib
                .get::<unsafe extern "C" fn(*mut u64)>(b"pagewire_standin_counters\0")
        } {
            // SAFETY: `out` has room for the 7 values.
            unsafe { f(out.as_mut_ptr()) };
        }
        Counters {
            live_allocations: out[0],
            submitted: out[1],
            completed: out[2],
            live_sessions: out[3],
            verified: out[4],
            retries: out[5],
            starts: out[6],
        }
    }

    /// The sizes of the C structs as the stand-in was compiled: flat buffer, buffer
    /// list, session setup data, request results, op data, instance info.
    pub fn layout(&self) -> [u64; 6] {
        let mut out = [0u64; 6];
        // SAFETY: the stand-in exports this function, which writes 6 u64s.
        if let Ok(f) = unsafe {
            self.lib
                .get::<unsafe extern "C" fn(*mut u64)>(b"pagewire_standin_layout\0")
        } {
            // SAFETY: `out` has room for the 6 values.
            unsafe { f(out.as_mut_ptr()) };
        }
        out
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    #[test]
    fn a_page_written_while_the_stand_in_compresses_it_still_gives_one_whole_stream() {
        const PS: usize = 4096;
        let page: &'static mut [u8] = Box::leak(vec![0u8; PS].into_boxed_slice());
        for (i, b) in page.iter_mut().enumerate() {
            *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
        }
        let at = page.as_mut_ptr() as usize;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (stop2, writes) = (stop.clone(), std::sync::Arc::new(AtomicU64::new(0)));
        let writes2 = writes.clone();
        // The guest: short runs of other bytes, anywhere in the page, without pause.
        let guest = std::thread::spawn(move || {
            let mut x: u64 = 1;
            while !stop2.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let off = (x >> 33) as usize % PS;
                let len = ((x >> 20) as usize % 64).min(PS - off);
                for k in 0..len {
                    let v = if x & 256 == 0 {
                        b'a' + ((x >> 8) as u8 % 26)
                    } else {
                        b"the quick"[k % 9]
                    };
                    // SAFETY: inside the leaked page; the hook reads it only through a
                    // raw-pointer copy, as a device reads guest memory.
                    unsafe { core::ptr::write_volatile((at as *mut u8).add(off + k), v) };
                }
                writes2.fetch_add(1, Ordering::Relaxed);
            }
        });
        let mut out = vec![0u8; PS - 1];
        let mut back = vec![0u8; PS];
        let mut d = libdeflater::Decompressor::new();
        let (mut streams, mut bad) = (0u32, 0u32);
        let t = Instant::now();
        // Without the hook's copy, about 2 in 10,000 level-1 streams of such a page
        // were broken (a 20 s loop on a 2-core machine): 40,000 make a miss unlikely.
        while streams < 40_000 && t.elapsed() < Duration::from_secs(30) {
            // SAFETY: the page is readable for PS bytes; `out` is writable for its
            // length and used by nothing else.
            let n = unsafe { deflate_hook(1, at as *const u8, PS, out.as_mut_ptr(), out.len()) };
            if n == 0 {
                continue;
            }
            streams += 1;
            if d.deflate_decompress(&out[..n], &mut back).ok() != Some(PS) {
                bad += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        guest.join().unwrap();
        assert!(
            writes.load(Ordering::Relaxed) > 1000,
            "the guest thread barely ran"
        );
        assert!(streams > 1000, "only {streams} streams in 30 s");
        assert_eq!(
            bad, 0,
            "{bad} of {streams} streams do not decode to one page"
        );
    }
}
