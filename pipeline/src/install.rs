//! Installing pages into a destination's fresh anonymous memory with userfaultfd
//! (`UFFDIO_COPY`) instead of faulting them in ([`Prefault::Install`]).
//!
//! Writing a page of fresh anonymous memory takes a page fault, and the kernel zeroes
//! the new page (`clear_page`) before the write lands on it: on this project's
//! measurements a quarter of a zstd migration's samples. With the memory registered
//! with a userfaultfd in MISSING mode, `UFFDIO_COPY` allocates the page and copies the
//! caller's bytes into it in one step, for a run of contiguous pages per call: no
//! zeroing, no fault trap.
//!
//! # Every fault is resolved
//! While the memory is registered, *any* access to a page not yet installed (a codec
//! decoding in place, a transport placing a payload, the kernel's `recv` copying into
//! it) blocks until someone resolves the fault. A handler thread does: a page nobody
//! has installed reads as zeros, so a read fault gets `UFFDIO_ZEROPAGE` and a write
//! fault `UFFDIO_COPY` of a zero page; the faulting access then proceeds as on plain
//! memory. [`Installer::finish`] (called before a destination hands the memory on, and
//! on drop) unregisters the memory, which wakes anything still waiting, then stops and
//! joins the handler.
//!
//! # Fallback
//! When userfaultfd cannot be had (no `CAP_SYS_PTRACE` with
//! `vm.unprivileged_userfaultfd=0`, a seccomp filter, an old kernel), registration
//! fails with an [`InstallError`] and the caller writes pages as before.
//!
//! [`Prefault::Install`]: crate::Prefault::Install

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use nix::libc;
use pagewire_protocol::RegionId;

use crate::GuestMemory;
use crate::fresh::FreshPages;

// From linux/userfaultfd.h (the ioctl numbers as _IOWR/_IOR of type 0xAA).
const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault, `flags` at 8 and `address` at 16.
#[repr(C)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    flags: u64,
    address: u64,
    ptid: u64,
}

/// Why pages cannot be installed with userfaultfd; the destination then writes them
/// as before (faulting them in) and reports this reason in its statistics.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The userfaultfd could not be opened.
    #[error(
        "userfaultfd unavailable (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1, no seccomp filter against it, Linux 4.3 or later)"
    )]
    Open(#[source] io::Error),
    /// The API handshake or the registration of the memory failed.
    #[error("userfaultfd {what} failed")]
    Register {
        /// Which step.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The memory is not mapped by pagewire itself ([`GuestMemory::anonymous`]), or
    /// is registered already.
    ///
    /// [`GuestMemory::anonymous`]: crate::GuestMemory::anonymous
    #[error("only memory pagewire mapped itself can be registered, and only once")]
    NotOwned,
    /// The fault-handler thread could not be started.
    #[error("the userfaultfd handler thread could not be started")]
    Thread(#[source] io::Error),
}

/// Counters of an [`Installer`].
#[derive(Debug, Default)]
pub(crate) struct InstallCounters {
    /// Pages placed with `UFFDIO_COPY`.
    pub(crate) installed: AtomicU64,
    /// Pages that were already present (`EEXIST`) and were copied normally.
    pub(crate) present: AtomicU64,
    /// Faults the handler resolved with zeros.
    pub(crate) faults: AtomicU64,
    /// CPU time of the handler thread, ns, stored when it ends.
    pub(crate) handler_cpu_ns: AtomicU64,
}

/// Opens a userfaultfd: the system call, non-blocking and close-on-exec.
pub(crate) fn open_userfaultfd() -> io::Result<OwnedFd> {
    // SAFETY: the system call takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Memory registered with a userfaultfd, and the thread that resolves its faults.
#[derive(Debug)]
pub(crate) struct Installer {
    uffd: Arc<OwnedFd>,
    /// Written once to stop the handler.
    stop: Arc<OwnedFd>,
    ranges: Vec<UffdRange>,
    page_size: usize,
    active: AtomicBool,
    handler: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<InstallCounters>,
}

#[derive(Clone, Copy, Debug)]
struct UffdRange {
    start: u64,
    len: u64,
}

fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here takes a pointer to the `#[repr(C)]` struct of its
    // kind, which `arg` is and which lives for the call.
    let rc = unsafe { libc::ioctl(fd, req, std::ptr::from_mut(arg)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Installer {
    /// Registers `ranges` (page-aligned mappings the caller owns, anonymous and
    /// private) with the userfaultfd `open` returns, and starts the fault handler.
    ///
    /// # Errors
    /// [`InstallError`] naming the step that failed; nothing stays registered then.
    pub(crate) fn register(
        ranges: &[(NonNull<u8>, usize)],
        page_size: usize,
        open: fn() -> io::Result<OwnedFd>,
    ) -> Result<Self, InstallError> {
        let uffd = open().map_err(InstallError::Open)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|source| InstallError::Register {
            what: "API handshake",
            source,
        })?;
        let ranges: Vec<UffdRange> = ranges
            .iter()
            .map(|&(p, len)| UffdRange {
                start: p.as_ptr() as u64,
                len: len as u64,
            })
            .collect();
        for r in &ranges {
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: r.start,
                    len: r.len,
                },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // On failure the descriptor closes, which unregisters what was registered.
            ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg).map_err(|source| {
                InstallError::Register {
                    what: "registration",
                    source,
                }
            })?;
        }
        // SAFETY: eventfd takes an initial count and flags and returns a new descriptor.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(InstallError::Thread(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this descriptor, owned by nobody else.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let uffd = Arc::new(uffd);
        let counters = Arc::new(InstallCounters::default());
        let (u2, s2, c2) = (uffd.clone(), stop.clone(), counters.clone());
        let handler = std::thread::Builder::new()
            // "pagewire-dst…": tools that split CPU time by thread name count it for
            // the destination.
            .name("pagewire-dst-uffd".into())
            .spawn(move || {
                let cpu = pagewire_accel::thread_cpu_time();
                resolve_faults(&u2, &s2, page_size, &c2);
                let used = pagewire_accel::thread_cpu_time().saturating_sub(cpu);
                c2.handler_cpu_ns.store(
                    u64::try_from(used.as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            })
            .map_err(InstallError::Thread)?;
        Ok(Self {
            uffd,
            stop,
            ranges,
            page_size,
            active: AtomicBool::new(true),
            handler: Mutex::new(Some(handler)),
            counters,
        })
    }

    /// Whether the memory is still registered (pages may be installed).
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub(crate) fn counters(&self) -> Arc<InstallCounters> {
        self.counters.clone()
    }

    /// Places `len` bytes from `src` at `dst` (page-aligned, whole pages): pages still
    /// missing are installed with `UFFDIO_COPY`, pages already present are copied
    /// normally. Any other failure (the memory no longer registered) copies the rest
    /// normally too.
    ///
    /// # Safety
    /// `dst..dst + len` lies inside the registered memory and no other thread writes
    /// it meanwhile; `src..src + len` is readable and does not overlap it.
    pub(crate) unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) {
        let ps = self.page_size;
        let mut done = 0;
        let mut retries = 0u32;
        while done < len {
            let mut c = UffdioCopy {
                dst: dst as u64 + done as u64,
                src: src as u64 + done as u64,
                len: (len - done) as u64,
                mode: 0,
                copy: 0,
            };
            let res = ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut c);
            if res.is_ok() {
                self.counters
                    .installed
                    .fetch_add(((len - done) / ps) as u64, Ordering::Relaxed);
                return;
            }
            if c.copy > 0 {
                // Part copied (the kernel answers EAGAIN); go on after it.
                let n = c.copy as usize;
                self.counters
                    .installed
                    .fetch_add((n / ps) as u64, Ordering::Relaxed);
                done += n;
                continue;
            }
            let step = if c.copy == -i64::from(libc::EEXIST) {
                self.counters.present.fetch_add(1, Ordering::Relaxed);
                ps
            } else if c.copy == -i64::from(libc::EAGAIN) && retries < 64 {
                // The mapping is changing; retrying is what the kernel asks.
                retries += 1;
                continue;
            } else {
                len - done
            };
            // SAFETY: within the ranges the caller vouches for; the page (or the rest)
            // is present or no longer registered, so a plain copy completes.
            unsafe { std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), step) };
            done += step;
        }
    }

    /// Unregisters the memory (waking anything still waiting on a fault, which then
    /// faults normally) and stops and joins the handler. Idempotent.
    pub(crate) fn finish(&self) {
        if !self.active.swap(false, Ordering::AcqRel) {
            return;
        }
        for r in &self.ranges {
            let mut range = UffdioRange {
                start: r.start,
                len: r.len,
            };
            // A failure leaves the range registered until the descriptor closes (on
            // drop), which unregisters it; the handler keeps resolving until then.
            let _ = ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range);
        }
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one` to the eventfd this value owns.
        let _ = unsafe { libc::write(self.stop.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
        if let Some(h) = self.handler.lock().ok().and_then(|mut h| h.take()) {
            let _ = h.join();
        }
    }
}

/// The userfaultfd side of [`GuestMemory`]: registration, and what the writers ask.
impl GuestMemory {
    /// Registers the mappings this value owns ([`GuestMemory::anonymous`]) with a
    /// userfaultfd, so that pages never written since are installed with `UFFDIO_COPY`
    /// (allocated and filled in one step, without being zeroed first) by
    /// [`GuestMemory::write_pages`] and [`GuestMemory::fill_pages`]
    /// ([`Prefault::Install`](crate::Prefault::Install)). A handler thread resolves
    /// every other access to a missing page with zeros, so writing or reading through
    /// [`GuestMemory::span`] still works. Call [`GuestMemory::finish_install`] before
    /// anyone else uses the memory; dropping the value does it too.
    ///
    /// # Errors
    /// [`InstallError`] when userfaultfd is unavailable or refuses the memory, or the
    /// memory is not this value's own; the memory is then used as before.
    pub fn install_pages(&self) -> Result<(), InstallError> {
        self.install_pages_with(crate::install::open_userfaultfd)
    }

    /// [`GuestMemory::install_pages`] with the userfaultfd from `open` (tests inject
    /// a refusal here).
    pub(crate) fn install_pages_with(
        &self,
        open: fn() -> io::Result<std::os::fd::OwnedFd>,
    ) -> Result<(), InstallError> {
        if self.owned.is_empty() || self.installer.get().is_some() {
            return Err(InstallError::NotOwned);
        }
        let installer = Installer::register(&self.owned, self.page_size() as usize, open)?;
        self.installer
            .set(installer)
            .map_err(|_| InstallError::NotOwned)
    }

    /// Ends [`GuestMemory::install_pages`]: unregisters the memory (anything waiting on
    /// a missing page wakes and faults normally) and stops the handler thread. Does
    /// nothing when the memory was never registered.
    pub fn finish_install(&self) {
        if let Some(i) = self.installer.get() {
            i.finish();
        }
    }

    /// The counters of the userfaultfd registration, if there is one.
    pub(crate) fn install_counters(&self) -> Option<Arc<InstallCounters>> {
        self.installer.get().map(Installer::counters)
    }

    /// The registration and the fresh pages of `region`, while pages are installed.
    pub(crate) fn installing(&self, region: RegionId) -> Option<(&Installer, &FreshPages)> {
        let i = self.installer.get().filter(|i| i.is_active())?;
        Some((i, self.region(region)?.fresh.as_ref()?))
    }

    /// Copies the pages of `page..page + pages` that were written into the matching
    /// pages of `dst` (pages never written are left as they are in `dst`): a delta
    /// decoder's base without touching pages still missing.
    pub(crate) fn read_written(&self, region: RegionId, page: u64, pages: u64, dst: &mut [u8]) {
        let ps = self.page_size() as usize;
        let Some(fresh) = self.region(region).and_then(|r| r.fresh.as_ref()) else {
            self.read_pages(region, page, pages, dst);
            return;
        };
        for (start, count) in fresh.touched_runs(page, pages) {
            let off = (start - page) as usize * ps;
            let n = count as usize * ps;
            if let Some(d) = dst.get_mut(off..off + n) {
                self.read_pages(region, start, count, d);
            }
        }
    }

    /// Whether writing pages `page..page + pages` would install any of them (pages
    /// are being installed and one of them was never written): a decoder then decodes
    /// into a scratch buffer and hands it to [`GuestMemory::write_pages`].
    pub(crate) fn installs(&self, region: RegionId, page: u64, pages: u64) -> bool {
        self.installing(region)
            .is_some_and(|(_, fresh)| fresh.any_fresh(page, pages))
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The handler: resolves every page fault on the registered memory with zeros (what
/// a page nobody installed reads as) until `stop` is signalled.
fn resolve_faults(uffd: &OwnedFd, stop: &OwnedFd, page_size: usize, counters: &InstallCounters) {
    let zeros = vec![0u8; page_size];
    let mut fds = [
        libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is an array of two valid pollfd entries.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            // Interrupted, or out of memory for a moment: returning would leave every
            // later fault unresolved, so try again.
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            continue;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            // The userfaultfd is no longer usable (it reports this once released); no
            // fault can arrive through it.
            return;
        }
        loop {
            let mut msg = std::mem::MaybeUninit::<UffdMsg>::uninit();
            // SAFETY: reads at most one message's size into `msg`.
            let n = unsafe {
                libc::read(
                    uffd.as_raw_fd(),
                    msg.as_mut_ptr().cast(),
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if n != std::mem::size_of::<UffdMsg>() as isize {
                break;
            }
            // SAFETY: the kernel filled the whole message.
            let msg = unsafe { msg.assume_init() };
            if msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let page = msg.address & !(page_size as u64 - 1);
            let range = UffdioRange {
                start: page,
                len: page_size as u64,
            };
            let res = if msg.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0 {
                let mut c = UffdioCopy {
                    dst: page,
                    src: zeros.as_ptr() as u64,
                    len: page_size as u64,
                    mode: 0,
                    copy: 0,
                };
                ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &mut c)
            } else {
                let mut z = UffdioZeropage {
                    range,
                    mode: 0,
                    zeropage: 0,
                };
                ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z)
            };
            match res {
                Ok(()) => {
                    counters.faults.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    // Present already (installed meanwhile): make sure the faulting
                    // thread is awake.
                    let mut r = range;
                    let _ = ioctl(uffd.as_raw_fd(), UFFDIO_WAKE, &mut r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_protocol::{GuestAddr, MemoryLayout, RegionDesc};
    use std::time::Duration;

    const PS: usize = 4096;
    const R: RegionId = RegionId(0);

    fn memory(pages: u64) -> Arc<GuestMemory> {
        let layout = MemoryLayout::new(
            PS as u32,
            [RegionDesc {
                id: R,
                backing_page_size: PS as u32,
                guest_addr: GuestAddr(0),
                length: pages * PS as u64,
            }],
        )
        .unwrap();
        Arc::new(GuestMemory::anonymous(&layout).unwrap())
    }

    /// Registered memory, or `None` after saying why the test is skipped.
    fn installing(pages: u64) -> Option<Arc<GuestMemory>> {
        let m = memory(pages);
        match m.install_pages() {
            Ok(()) => Some(m),
            Err(e) => {
                assert!(
                    std::env::var("PAGEWIRE_REQUIRE_USERFAULTFD").as_deref() != Ok("1"),
                    "PAGEWIRE_REQUIRE_USERFAULTFD=1 but userfaultfd is unavailable: {e}"
                );
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "skipped: userfaultfd unavailable: {e}: {:?}",
                    std::error::Error::source(&e)
                );
                None
            }
        }
    }

    /// Runs `f` on a thread of its own and fails if it does not finish in 20 s (a
    /// fault nobody resolved would hang it).
    fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(v) => v,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("{what} did not finish: a fault was left unresolved")
            }
            Err(_) => panic!("{what} panicked"),
        }
    }

    fn page(m: &GuestMemory, p: u64) -> Vec<u8> {
        let mut v = vec![0u8; PS];
        assert!(m.read_pages(R, p, 1, &mut v));
        v
    }

    fn counts(m: &GuestMemory) -> (u64, u64, u64) {
        let c = m.install_counters().unwrap();
        (
            c.installed.load(Ordering::Relaxed),
            c.present.load(Ordering::Relaxed),
            c.faults.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn fresh_pages_are_installed_and_present_ones_copied() {
        let Some(m) = installing(64) else { return };
        bounded("installing", move || {
            let data: Vec<u8> = (0..4 * PS).map(|i| (i % 251) as u8).collect();
            assert!(m.installs(R, 4, 4));
            assert!(m.write_pages(R, 4, &data));
            assert_eq!(counts(&m).0, 4);
            assert!(!m.installs(R, 4, 4));
            // Written again: copied in place, not installed.
            assert!(m.write_pages(R, 5, &data[..PS]));
            assert_eq!(counts(&m).0, 4);
            // A run half fresh, half written: only the fresh half is installed.
            assert!(m.write_pages(R, 2, &data));
            assert_eq!(counts(&m).0, 6);
            // A uniform run over fresh pages is installed from a page of its byte.
            assert!(m.fill_pages(R, 20, 40, 0xcc));
            assert_eq!(counts(&m).0, 46);
            // Zero pages on fresh memory stay untouched.
            assert!(m.zero_pages(R, 60, 4));
            assert_eq!(counts(&m), (46, 0, 0));
            m.finish_install();
            // Pages 2..6 hold the last write, 6 and 7 the first.
            for (p, part) in [(2, 0), (3, 1), (5, 3), (6, 2), (7, 3)] {
                let want = &data[part * PS..(part + 1) * PS];
                assert!(page(&m, p) == want, "page {p}");
            }
            assert!(page(&m, 20).iter().all(|&b| b == 0xcc));
            assert!(page(&m, 59).iter().all(|&b| b == 0xcc));
            assert!(page(&m, 60).iter().all(|&b| b == 0));
        });
    }

    #[test]
    fn a_direct_write_or_read_of_a_missing_page_is_resolved_not_hung() {
        let Some(m) = installing(16) else { return };
        bounded("direct access to missing pages", move || {
            let (ptr, len) = m.span(R, 3, 2).unwrap();
            // SAFETY: `span` returned a range inside the mapping; nobody else uses it.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0x5a, len) };
            // A read of a page nobody wrote reads zeros.
            assert!(page(&m, 9).iter().all(|&b| b == 0));
            // The handler counts a fault after its ioctl has woken the faulting
            // thread, so the count may trail the accesses by a moment.
            let mut faults = counts(&m).2;
            for _ in 0..1000 {
                if faults >= 3 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
                faults = counts(&m).2;
            }
            assert!(faults >= 3, "{faults} faults resolved");
            // The pages written in place are still marked fresh (nobody noted them):
            // installing over them finds them present and copies normally.
            assert!(m.write_pages(R, 3, &[7u8; PS]));
            assert!(m.write_pages(R, 9, &[8u8; PS]));
            assert_eq!(counts(&m).1, 2);
            m.finish_install();
            assert!(page(&m, 3).iter().all(|&b| b == 7));
            assert!(page(&m, 4).iter().all(|&b| b == 0x5a));
            assert!(page(&m, 9).iter().all(|&b| b == 8));
        });
    }

    #[test]
    fn finishing_unregisters_and_stops_the_handler_and_drop_does_too() {
        let Some(m) = installing(16) else { return };
        let counters = m.install_counters().unwrap();
        bounded("finish", move || {
            m.finish_install();
            assert!(!m.installs(R, 0, 16));
            // The handler has ended (it held the other reference).
            assert_eq!(Arc::strong_count(&counters), 2);
            // Plain memory again: a missing page faults in normally.
            assert!(m.write_pages(R, 1, &[3u8; PS]));
            let (ptr, _) = m.span(R, 2, 1).unwrap();
            // SAFETY: a page inside the mapping.
            unsafe { ptr.as_ptr().write(9) };
            assert_eq!(counts(&m), (0, 0, 0));
            assert_eq!(page(&m, 1)[0], 3);
            m.finish_install();
        });
        let Some(m) = installing(16) else { return };
        let counters = m.install_counters().unwrap();
        bounded("drop", move || {
            assert!(m.write_pages(R, 0, &[1u8; PS]));
            drop(m);
            assert_eq!(Arc::strong_count(&counters), 1);
        });
    }

    #[test]
    fn a_refused_registration_leaves_plain_memory() {
        fn refuse() -> io::Result<OwnedFd> {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
        let m = memory(8);
        let e = m.install_pages_with(refuse).unwrap_err();
        assert!(matches!(&e, InstallError::Open(io) if io.raw_os_error() == Some(libc::EPERM)));
        assert!(m.install_counters().is_none());
        assert!(!m.installs(R, 0, 8));
        assert!(m.write_pages(R, 1, &[4u8; PS]));
        assert!(m.fill_pages(R, 2, 2, 0xcc));
        assert!(page(&m, 1).iter().all(|&b| b == 4));
        assert!(page(&m, 3).iter().all(|&b| b == 0xcc));
        // Memory pagewire did not map is never registered.
        let mut buf = vec![0u8; 3 * PS];
        let off = buf.as_ptr().align_offset(PS);
        let spec = crate::RegionSpec {
            id: R,
            host_addr: buf[off..].as_mut_ptr(),
            guest_addr: GuestAddr(0),
            len: PS as u64,
            backing_page_size: PS as u32,
        };
        // SAFETY: the buffer outlives `given`.
        let given = unsafe { GuestMemory::new(PS as u32, &[spec]) }.unwrap();
        assert!(matches!(given.install_pages(), Err(InstallError::NotOwned)));
    }

    #[test]
    fn message_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(std::mem::offset_of!(UffdMsg, flags), 8);
        assert_eq!(std::mem::offset_of!(UffdMsg, address), 16);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
    }
}
