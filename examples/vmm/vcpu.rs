//! vCPU threads: one thread per vCPU running `KVM_RUN`, the port-I/O exits of the
//! guest (heartbeat with token-bucket pacing, self-check reports), and pause/resume of
//! all of them through a shared run state, `immediate_exit` and a kick signal.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::dirty::DirtyTracker;
use crate::guest;
use crate::memory::Ram;

/// How often the guest heartbeats (the VMM sleeps in the exit until then).
const TICK: Duration = Duration::from_millis(1);
/// Most pages one heartbeat lets the guest write.
const MAX_BATCH: f64 = 4096.0;
/// vCPU 0 writes the host wall clock into the mailbox every this many heartbeats.
const WALLCLOCK_EVERY: u64 = 100;
/// Each vCPU empties the dirty rings every this many heartbeats. KVM asks for that
/// itself (`KVM_EXIT_DIRTY_RING_FULL`) near the ring's end, but on this host's nested
/// KVM that exit came too late and the ring overflowed (entries lost); harvesting
/// often, like QEMU's dirty-ring reaper, keeps the rings nearly empty.
const RING_HARVEST_EVERY: u64 = 4;
/// Consecutive `KVM_EXIT_DIRTY_RING_FULL` exits that harvest nothing before the vCPU
/// gives up (the ring's indices no longer agree with KVM's).
const EMPTY_RING_FULL_LIMIT: u32 = 1000;
/// How long pausing may take before it counts as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    libc::SIGUSR2
}

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const EXIT: u8 = 2;

/// CLOCK_REALTIME in ns (shared by all processes on one machine).
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What the guest reported: heartbeats and self-check results.
#[derive(Default)]
pub struct Monitor {
    heartbeats: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    pages_written: AtomicU64,
    check: Mutex<Check>,
    check_cv: Condvar,
}

#[derive(Default)]
struct Check {
    seq: u64,
    reports: usize,
    checked: u64,
    wrong: u64,
}

/// A heartbeat count and the first and last heartbeat's wall-clock times.
#[derive(Clone, Copy, Debug, Default)]
pub struct Heartbeats {
    /// Heartbeats seen by this process.
    pub count: u64,
    /// CLOCK_REALTIME of the first, ns (0 = none).
    pub first_ns: u64,
    /// CLOCK_REALTIME of the latest, ns (0 = none).
    pub last_ns: u64,
    /// Pages the guest was allowed to write (the sum of its token grants).
    pub pages_written: u64,
}

impl Monitor {
    fn heartbeat(&self, now_ns: u64) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .first_ns
            .compare_exchange(0, now_ns, Ordering::Relaxed, Ordering::Relaxed);
        self.last_ns.fetch_max(now_ns, Ordering::Relaxed);
    }

    /// The heartbeats so far.
    pub fn heartbeats(&self) -> Heartbeats {
        Heartbeats {
            count: self.heartbeats.load(Ordering::Relaxed),
            first_ns: self.first_ns.load(Ordering::Relaxed),
            last_ns: self.last_ns.load(Ordering::Relaxed),
            pages_written: self.pages_written.load(Ordering::Relaxed),
        }
    }

    fn report_check(&self, checked: u32, wrong: u32) {
        if let Ok(mut c) = self.check.lock() {
            c.reports += 1;
            c.checked += u64::from(checked);
            c.wrong += u64::from(wrong);
            self.check_cv.notify_all();
        }
    }

    /// Asks the guest to check every page it wrote: writes the command into the
    /// mailbox (a VMM write, recorded in `dirty`) and waits for every vCPU's report.
    /// Returns `(pages checked, pages wrong)`.
    ///
    /// # Errors
    /// The mailbox write failed, or not every vCPU reported within `timeout`.
    pub fn self_check(
        &self,
        ram: &Ram,
        dirty: &DirtyTracker,
        vcpus: usize,
        timeout: Duration,
    ) -> anyhow::Result<(u64, u64)> {
        let mut c = self.check.lock().map_err(|_| anyhow!("check lock"))?;
        let seq: u64 = ram.read_obj(GuestAddress(guest::MAILBOX))?;
        // Guest memory, which the source wrote: any value, so no overflow.
        c.seq = seq.wrapping_add(1);
        c.reports = 0;
        c.checked = 0;
        c.wrong = 0;
        // Command first, then the sequence number the guest polls (x86 keeps the order).
        ram.write_obj(guest::CMD_CHECK, GuestAddress(guest::MAILBOX + 8))?;
        ram.write_obj(c.seq, GuestAddress(guest::MAILBOX))?;
        dirty.mark_vmm_write(guest::MAILBOX, 16);
        let deadline = Instant::now() + timeout;
        while c.reports < vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the guest did not report its self-check within {timeout:?}");
            }
            c = self
                .check_cv
                .wait_timeout(c, left)
                .map_err(|_| anyhow!("check lock"))?
                .0;
        }
        Ok((c.checked, c.wrong))
    }
}

/// What every vCPU thread shares with the VMM.
pub struct GuestCtx {
    /// Guest RAM.
    pub ram: Arc<Ram>,
    /// Dirty tracking (VMM writes, dirty-ring harvests).
    pub dirty: Arc<DirtyTracker>,
    /// Heartbeats and reports.
    pub monitor: Arc<Monitor>,
    /// Pages per second each vCPU may write.
    pub pages_per_s: f64,
}

struct Kick {
    /// `pthread_t` of the vCPU thread (0 until it started).
    thread: AtomicU64,
    /// Address of the vCPU's `kvm_run.immediate_exit`.
    immediate_exit: AtomicUsize,
}

struct Shared {
    want: AtomicU8,
    state: Mutex<Parked>,
    /// Wakes vCPU threads (resume, exit, pause while pacing).
    wake: Condvar,
    /// Wakes the pauser when a thread parks or ends.
    parked_cv: Condvar,
    kicks: Vec<Kick>,
}

#[derive(Default)]
struct Parked {
    parked: usize,
    ended: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Parked> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn want(&self) -> u8 {
        self.want.load(Ordering::Acquire)
    }

    /// Sleeps until `deadline` unless asked to stop running first.
    fn sleep_until(&self, deadline: Instant) {
        let mut g = self.lock();
        // Bounded: each wait ends by the deadline.
        while self.want() == RUN {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self
                .wake
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Parks until resumed; false when asked to exit.
    fn park(&self) -> bool {
        let mut g = self.lock();
        g.parked += 1;
        self.parked_cv.notify_all();
        while self.want() == PAUSE {
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.parked -= 1;
        self.want() != EXIT
    }

    fn kick_all(&self) {
        for k in &self.kicks {
            let p = k.immediate_exit.load(Ordering::Acquire);
            if p != 0 {
                // SAFETY: `p` is `immediate_exit` inside the vCPU's kvm_run mapping,
                // which lives as long as the VcpuFd the `Vcpus` owns; KVM reads the byte
                // at entry, so a racing write only makes the next entry return early.
                unsafe { std::ptr::write_volatile(p as *mut u8, 1) };
            }
            let t = k.thread.load(Ordering::Acquire);
            if t != 0 {
                // SAFETY: the thread is not joined yet (`Vcpus` holds its handle), so
                // its pthread_t is valid; the signal's handler does nothing.
                unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
            }
        }
        self.wake.notify_all();
    }
}

extern "C" fn on_kick(_: i32) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler that does nothing (async-signal-safe), without
        // SA_RESTART so that KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// The running vCPUs.
pub struct Vcpus {
    shared: Arc<Shared>,
    fds: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Vcpus {
    /// Starts one thread per vCPU, running.
    ///
    /// # Errors
    /// A thread could not be spawned.
    pub fn start(fds: Vec<VcpuFd>, ctx: Arc<GuestCtx>) -> anyhow::Result<Self> {
        install_kick_handler();
        let shared = Arc::new(Shared {
            want: AtomicU8::new(RUN),
            state: Mutex::new(Parked::default()),
            wake: Condvar::new(),
            parked_cv: Condvar::new(),
            kicks: fds
                .iter()
                .map(|_| Kick {
                    thread: AtomicU64::new(0),
                    immediate_exit: AtomicUsize::new(0),
                })
                .collect(),
        });
        let fds: Vec<_> = fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect();
        let mut threads = Vec::new();
        for (id, fd) in fds.iter().enumerate() {
            let (fd, shared, ctx) = (fd.clone(), shared.clone(), ctx.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let res = run_vcpu(id, &fd, &shared, &ctx);
                    let mut g = shared.lock();
                    g.ended += 1;
                    shared.parked_cv.notify_all();
                    drop(g);
                    if let Err(e) = &res {
                        eprintln!("vcpu{id}: {e:#}");
                    }
                    res
                })
                .context("spawning a vCPU thread")?;
            threads.push(t);
        }
        Ok(Self {
            shared,
            fds,
            threads,
        })
    }

    /// Stops every vCPU outside `KVM_RUN` with its pending I/O completed, so that its
    /// state can be saved. Waits at most [`PAUSE_TIMEOUT`].
    ///
    /// # Errors
    /// A vCPU ended (it failed) or did not stop in time.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.shared.want.store(PAUSE, Ordering::Release);
        self.shared.kick_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut g = self.shared.lock();
        while g.parked + g.ended < self.fds.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the vCPUs did not stop within {PAUSE_TIMEOUT:?}");
            }
            g = self
                .shared
                .parked_cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if g.ended > 0 {
            bail!("{} vCPU thread(s) ended", g.ended);
        }
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        let _g = self.shared.lock();
        self.shared.want.store(RUN, Ordering::Release);
        self.shared.wake.notify_all();
    }

    /// Runs `f` over the vCPU fds; call only while paused.
    ///
    /// # Errors
    /// A vCPU fd's lock was poisoned, or `f` failed.
    pub fn with_fds<R>(
        &self,
        f: impl FnOnce(&[&VcpuFd]) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let guards: Vec<_> = self
            .fds
            .iter()
            .map(|m| m.lock().map_err(|_| anyhow!("vCPU lock poisoned")))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&VcpuFd> = guards.iter().map(|g| &**g).collect();
        f(&refs)
    }

    /// Stops the vCPU threads and joins them.
    ///
    /// # Errors
    /// A vCPU thread failed.
    pub fn stop(self) -> anyhow::Result<()> {
        {
            let _g = self.shared.lock();
            self.shared.want.store(EXIT, Ordering::Release);
        }
        self.shared.kick_all();
        let mut first = Ok(());
        for t in self.threads {
            let r = t.join().map_err(|_| anyhow!("a vCPU thread panicked"))?;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Token bucket that paces the guest's page writes.
struct Pacer {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Sleeps until the next heartbeat is due and returns the pages to write.
    fn next(&mut self, shared: &Shared) -> u32 {
        shared.sleep_until(self.last + TICK);
        let now = Instant::now();
        let burst = self.rate * 0.005 + 1.0;
        self.tokens =
            (self.tokens + self.rate * (now - self.last).as_secs_f64()).min(burst.min(MAX_BATCH));
        self.last = now;
        let n = self.tokens.floor();
        self.tokens -= n;
        n as u32
    }

    fn restart(&mut self) {
        self.tokens = 0.0;
        self.last = Instant::now();
    }
}

fn run_vcpu(id: usize, fd: &Mutex<VcpuFd>, shared: &Shared, ctx: &GuestCtx) -> anyhow::Result<()> {
    {
        let mut v = fd.lock().map_err(|_| anyhow!("vCPU lock poisoned"))?;
        let run = v.get_kvm_run();
        shared.kicks[id]
            .immediate_exit
            .store(&raw mut run.immediate_exit as usize, Ordering::Release);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        shared.kicks[id].thread.store(me as u64, Ordering::Release);
    }
    let mut pacer = Pacer::new(ctx.pages_per_s);
    let mut checked = 0u32;
    let mut ticks = 0u64;
    let mut empty_full = 0u32;
    // Ends when the VMM asks (EXIT) or on an error.
    loop {
        if shared.want() != RUN {
            complete_pending_io(fd)?;
            if !shared.park() {
                return Ok(());
            }
            pacer.restart();
            continue;
        }
        let mut v = fd.lock().map_err(|_| anyhow!("vCPU lock poisoned"))?;
        match v.run() {
            Ok(VcpuExit::IoIn(guest::PORT_TICK, data)) => {
                ctx.monitor.heartbeat(realtime_ns());
                ticks += 1;
                if id == 0 && ticks.is_multiple_of(WALLCLOCK_EVERY) {
                    write_wallclock(ctx)?;
                }
                if ticks.is_multiple_of(RING_HARVEST_EVERY) {
                    ctx.dirty.harvest().context("harvesting the dirty rings")?;
                }
                let n = pacer.next(shared);
                ctx.monitor
                    .pages_written
                    .fetch_add(u64::from(n), Ordering::Relaxed);
                let bytes = n.to_le_bytes();
                let len = data.len().min(4);
                data[..len].copy_from_slice(&bytes[..len]);
            }
            Ok(VcpuExit::IoOut(guest::PORT_CHECKED, data)) => checked = le32(data),
            Ok(VcpuExit::IoOut(guest::PORT_WRONG, data)) => {
                ctx.monitor.report_check(checked, le32(data));
            }
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                if ctx.dirty.harvest().context("harvesting the dirty rings")? == 0 {
                    empty_full += 1;
                    if empty_full >= EMPTY_RING_FULL_LIMIT {
                        bail!("vcpu{id}: the dirty ring is full but holds no harvestable entry");
                    }
                } else {
                    empty_full = 0;
                }
            }
            Ok(e) => bail!("vcpu{id}: unexpected exit {e:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                v.set_kvm_immediate_exit(0);
            }
            Err(e) => return Err(e).context(format!("vcpu{id}: KVM_RUN")),
        }
    }
}

/// KVM finishes an exit's I/O (e.g. stores an `in`'s value) only at the next
/// `KVM_RUN`; with `immediate_exit` set that entry completes it and returns at once,
/// so the saved state has it.
fn complete_pending_io(fd: &Mutex<VcpuFd>) -> anyhow::Result<()> {
    let mut v = fd.lock().map_err(|_| anyhow!("vCPU lock poisoned"))?;
    v.set_kvm_immediate_exit(1);
    let r = match v.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(anyhow::Error::from(e).context("completing pending I/O")),
        Ok(e) => Err(anyhow!("unexpected exit completing pending I/O: {e:?}")),
    };
    v.set_kvm_immediate_exit(0);
    r
}

fn write_wallclock(ctx: &GuestCtx) -> anyhow::Result<()> {
    let at = guest::MAILBOX + guest::MAILBOX_WALLCLOCK;
    ctx.ram.write_obj(realtime_ns(), GuestAddress(at))?;
    ctx.dirty.mark_vmm_write(at, 8);
    Ok(())
}

fn le32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}
