//! The destination side: accepts the session's channels, learns the layout, and applies
//! every frame straight into guest memory, one receiver thread per channel.
//!
//! Raw pages are placed into guest memory by the transport itself (no bounce buffer);
//! compressed frames are decoded by the frame's codec id directly into the guest pages.
//! Each channel applies its frames in arrival order, and page-to-channel affinity keeps
//! every version of a page on one channel, so an older version never overwrites a newer
//! one (see [`crate::plan`]). Every rule of the session lives in the protocol crate's
//! state machines ([`DestinationSession`], [`DestinationChannel`]), which this module
//! drives: a PAGES frame is checked against the layout, the open round and the affinity
//! carried in LAYOUT **before** a byte of it is placed or decoded, so two receiver
//! threads never write the same page; the layout is checked against
//! [`DestinationConfig::limits`] before any memory is mapped. Completion is verified
//! only when every channel has ended the final round with the frame and page counts the
//! source announced, and every device-state section has arrived whole; success is
//! reported only after that, once the source's COMMIT hands the guest over.
//!
//! One bound [`DestinationListener`] serves one session after another, and, shared
//! between threads, up to [`DestinationConfig::max_sessions`] at once:
//! [`DestinationListener::accept`] for the session it was bound with,
//! [`DestinationListener::accept_with`] for any other id and key.
//!
//! [`DestinationChannel`]: pagewire_protocol::DestinationChannel
//! [`DestinationConfig::limits`]: crate::DestinationConfig::limits
//! [`DestinationConfig::max_sessions`]: crate::DestinationConfig::max_sessions

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagewire_protocol::{ChannelId, DestinationSession, MemoryLayout, Round};
use pagewire_transport::Stream;

use crate::config::Prefault;
use crate::error::MigrationError;
use crate::memory::{DestinationMemory, GuestMemory};
use crate::stats::{Latency, LatencySummary};

/// A device-state section as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSection {
    /// Its name.
    pub name: String,
    /// Its instance number.
    pub instance: u32,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// What the destination measured.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DestinationStats {
    /// PAGES and COPY frames applied.
    pub frames: u64,
    /// Data pages applied.
    pub data_pages: u64,
    /// Zero pages applied.
    pub zero_pages: u64,
    /// Uniform pages (one byte repeated) applied.
    pub uniform_pages: u64,
    /// Pages set from another page by COPY frames (`ROUND_END` copies included).
    pub copied_pages: u64,
    /// Of those, the pages of `ROUND_END` copies, applied at the ends of rounds.
    pub round_end_pages: u64,
    /// Wall time the receivers spent applying `ROUND_END` copies with the copy gate
    /// held exclusively, summed over channels, ms: while it runs no frame is applied.
    pub round_end_ms: f64,
    /// Raw payload bytes the transport placed straight into guest memory.
    pub placed_bytes: u64,
    /// TLS: plaintext bytes opened from records (0 in clear), counted as each
    /// channel ends.
    pub tls_opened_bytes: u64,
    /// TLS: bytes copied in user space on the TLS receive path (0 in clear); over
    /// `data_pages`, the copies TLS costs per page. Counted as each channel ends.
    pub tls_copied_bytes: u64,
    /// Time the background pre-fault thread took ([`Prefault::Thread`] only; 0
    /// otherwise), ms: until it populated every page, or until it stopped because the
    /// receivers had ended (0 while it still runs).
    pub prefault_ms: f64,
    /// Frame apply latency.
    pub apply_latency: LatencySummary,
    /// CPU the destination's threads used (receivers, the pre-fault thread and the
    /// userfaultfd handler of [`Prefault::Install`]; the receivers' share is counted
    /// when each ends, the handler's when the memory is handed over).
    pub cpu: crate::stats::CpuSummary,
    /// Frames given to a hardware codec engine ([`DestinationConfig::accel`]).
    ///
    /// [`DestinationConfig::accel`]: crate::DestinationConfig::accel
    pub hw_decodes: u64,
    /// Of those, frames the hardware handed to software.
    pub hw_fallbacks: u64,
    /// Those per cause.
    pub hw_fallback_causes: crate::stats::FallbackSummary,
    /// Pages installed with `UFFDIO_COPY` ([`Prefault::Install`]).
    pub installed_pages: u64,
    /// Pages that were already present when they were to be installed (copied
    /// normally instead).
    pub install_present: u64,
    /// Accesses to pages not yet installed that the userfaultfd handler resolved with
    /// zeros (a decoder or transport writing in place, a read).
    pub install_faults: u64,
    /// Why [`Prefault::Install`] was asked for but not used (userfaultfd unavailable);
    /// the memory was then faulted in as with [`Prefault::None`].
    pub install_unavailable: Option<String>,
    /// 2 MiB blocks advised for transparent huge pages ([`Prefault::HugeWhereDense`]);
    /// the kernel backs each with a huge page where THP is on for `madvise` and it
    /// finds one free.
    pub huge_blocks: u64,
}

/// A migration that completed: the memory, the device state and the statistics.
#[non_exhaustive]
#[derive(Debug)]
pub struct Migrated {
    /// Guest memory as migrated.
    pub memory: Arc<GuestMemory>,
    /// Device-state sections, in arrival order.
    pub device_state: Vec<DeviceSection>,
    /// The final round.
    pub final_round: u32,
    /// Statistics.
    pub stats: DestinationStats,
}

/// Cancels an incoming migration from any thread: [`Destination::wait`] (or an
/// [`accept_controlled`](DestinationListener::accept_controlled) still waiting for the
/// channels) then returns [`MigrationError::Cancelled`] and never reports success, and
/// the guest must not be started; unless COMMIT was already taken, when the guest is
/// this side's and the cancel changes nothing (`wait` reports success: the source has
/// given the guest up). Every blocked wait wakes: the channels' sockets are
/// shut down (so the source sees them close), the wait for other channels at COMPLETE
/// is woken, and an accept in progress stops within 50 ms.
///
/// One control per migration: a cancel is not undone, so every later accept given the
/// same control returns `Cancelled` at once; and a control given to two accepts
/// cancels the later one's session only. pagewire calls the VMM's callbacks
/// ([`DeviceStateCheck`](crate::DeviceStateCheck), a
/// [`MemoryProvider`](crate::MemoryProvider)) on a receiver's thread, where a cancel
/// does not interrupt them: a cancel takes effect when they return (and the source
/// waits for them within its ACK timeout).
#[derive(Clone, Default)]
pub struct DestinationControl(Arc<ControlInner>);

#[derive(Default)]
struct ControlInner {
    cancelled: AtomicBool,
    session: Mutex<Option<std::sync::Weak<Shared>>>,
}

impl std::fmt::Debug for DestinationControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationControl")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl DestinationControl {
    /// A control for a migration not accepted yet
    /// ([`DestinationListener::accept_controlled`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the migration (idempotent).
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        let session = self.0.session.lock().ok().and_then(|s| s.clone());
        if let Some(shared) = session.and_then(|w| w.upgrade()) {
            shared.cancel();
        }
    }

    /// Whether [`Self::cancel`] was called (also when it came after COMMIT and so
    /// changed nothing).
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Binds the accepted session; a cancel that came meanwhile applies at once.
    fn attach(&self, shared: &Arc<Shared>) {
        if let Ok(mut s) = self.0.session.lock() {
            *s = Some(Arc::downgrade(shared));
        }
        if self.is_cancelled() {
            shared.cancel();
        }
    }
}

/// A destination receiving a migration.
///
/// Dropped without [`Destination::wait`], it cancels the migration as
/// [`DestinationControl::cancel`] does (the control itself is not marked, so a control
/// meant for later accepts stays usable): COMMIT is refused from then on, so the source
/// keeps its guest; the drop returns once every receiver has ended (within tens of
/// milliseconds over TCP, TLS and io_uring, whose sockets the cancel shuts down; up to
/// the idle timeout over RDMA), so that none writes the memory afterwards. (Dropped
/// after COMMIT was taken, the guest is lost: the source gave it up; call `wait`.)
#[derive(Debug)]
#[must_use = "dropping a Destination cancels the migration; call wait()"]
pub struct Destination {
    /// Each channel's receiver thread, by channel.
    threads: Vec<(u16, JoinHandle<Result<(), MigrationError>>)>,
    shared: Arc<Shared>,
    control: DestinationControl,
    started: Instant,
}

impl Drop for Destination {
    fn drop(&mut self) {
        // Not waited for: nobody takes the guest, so the source must keep it. The
        // receivers are joined: once this returns none writes the memory any more
        // (the VMM's, with `Given` or a provider, may be unmapped or reused).
        if !self.threads.is_empty() {
            self.shared.cancel();
            for (_, t) in self.threads.drain(..) {
                let _ = t.join();
            }
            self.shared.stop_prefault();
        }
    }
}

impl Destination {
    /// Statistics so far.
    pub fn stats(&self) -> DestinationStats {
        self.shared.stats()
    }

    /// A handle that cancels this migration from any thread.
    pub fn control(&self) -> DestinationControl {
        self.control.clone()
    }

    /// Since the channels were accepted.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for the migration to end. Succeeds only when the source's COMPLETE was
    /// verified (every round on every channel, every device-state section) and
    /// acknowledged, **and** the source's COMMIT then arrived: only then is the guest
    /// this side's to run (PROTOCOL.md, Switchover). Start its vCPUs after this returns
    /// `Ok`, never before.
    ///
    /// A channel that fails (a bad frame, the source's ABORT, a decode error) fails
    /// the session and ends the other channels at once, each told so with ABORT
    /// `CHANNEL_FAILED`: this returns then, not after the idle timeout.
    ///
    /// # Errors
    /// [`MigrationError::NoCommit`] when COMMIT did not follow ACK COMPLETE; else the
    /// error of the channel that failed first, or `Protocol` when the source went away
    /// before completing.
    pub fn wait(mut self) -> Result<Migrated, MigrationError> {
        let mut errors = Vec::new();
        for (ch, t) in std::mem::take(&mut self.threads) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push((ch, e)),
                Err(payload) => errors.push((ch, crate::error::worker_ended(ch, Err(payload)))),
            }
        }
        // No frame comes any more: what the pre-fault thread has not populated yet is
        // faulted in by the guest as it runs, not inside the downtime (or at all, for a
        // failed session). It ends within one 2 MiB step and is joined here.
        self.shared.stop_prefault();
        // Channel 0's verdict on the switchover when it had acknowledged COMPLETE; else
        // the channel that failed the session, not those it ended.
        let failed_first = self.shared.state.lock().ok().and_then(|s| s.failed_channel);
        let at = errors
            .iter()
            .position(|(_, e)| matches!(e, MigrationError::NoCommit { .. }))
            .or_else(|| errors.iter().position(|(ch, _)| Some(*ch) == failed_first))
            .unwrap_or(0);
        let first = (at < errors.len()).then(|| errors.swap_remove(at).1);
        if self.shared.cancelled.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        let committed = self
            .shared
            .state
            .lock()
            .ok()
            .and_then(|s| s.rules.committed())
            .map(|r| r.0);
        match (committed, first) {
            (Some(final_round), _) => {
                let memory = self
                    .shared
                    .memory
                    .lock()
                    .ok()
                    .and_then(|mut m| m.take())
                    .map(|(m, _)| {
                        // Nobody waits on a missing page once the VMM has the memory.
                        m.finish_install();
                        m
                    })
                    .ok_or(MigrationError::Worker(0))?;
                let device_state = self
                    .shared
                    .state
                    .lock()
                    .map(|mut s| std::mem::take(&mut s.sections))
                    .unwrap_or_default();
                Ok(Migrated {
                    memory,
                    device_state,
                    final_round,
                    stats: self.shared.stats(),
                })
            }
            (None, Some(e)) => Err(e),
            (None, None) => Err(MigrationError::Protocol {
                channel: 0,
                what: "the source closed every channel without committing".into(),
            }),
        }
    }
}

#[derive(Debug)]
struct State {
    /// The session's rules (layout, rounds ended, device state, completion).
    rules: DestinationSession,
    failed: Option<String>,
    /// The channel whose failure came first, when a channel's did.
    failed_channel: Option<u16>,
    sections: Vec<DeviceSection>,
    /// The last round each channel ended, for `ROUND_END` copies: recorded before that
    /// channel applies its own, which wait for every channel (see `receiver.rs`).
    copy_ended: Vec<Option<Round>>,
    /// Channels other than 0 that idled out, with why: no failure of the session by
    /// itself (PROTOCOL.md, Idle timeout), but a wait for a round such a channel had
    /// not ended fails ([`Shared::idle_blocks`]).
    idled: Vec<(u16, String)>,
}

type MemorySlot = Option<(Arc<GuestMemory>, Option<JoinHandle<()>>)>;

#[derive(Debug)]
struct Shared {
    page_size: u32,
    wait: Duration,
    /// The VMM's check of the device state before ACK COMPLETE.
    check: Option<crate::config::DeviceStateCheck>,
    memory: Mutex<MemorySlot>,
    /// What the VMM's provider did wrong on one channel (refused, panicked): the
    /// others report the same without calling it again.
    provider_failed: OnceLock<String>,
    /// `Provider` when the VMM chooses the memory, `Anonymous` otherwise.
    provider: DestinationMemory,
    /// Second handles on the channels' sockets (by channel, while its receiver runs),
    /// shut down by [`DestinationControl::cancel`] and when a channel fails the session,
    /// to wake receivers blocked on them.
    sockets: Mutex<Vec<(u16, Stream)>>,
    cancelled: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
    /// Held shared by every receiver while it writes or reads guest pages for a frame,
    /// and exclusively while one applies its `ROUND_END` copies, which read pages of
    /// every channel: no page is then written by two receivers at once, nor read by one
    /// while another writes it, whatever a source sends.
    gate: RwLock<()>,
    apply: Latency,
    frames: AtomicU64,
    data_pages: AtomicU64,
    zero_pages: AtomicU64,
    uniform_pages: AtomicU64,
    copied_pages: AtomicU64,
    round_end_pages: AtomicU64,
    round_end_ns: AtomicU64,
    placed: AtomicU64,
    /// TLS bytes opened and copied, added as each channel ends.
    tls_opened: AtomicU64,
    tls_copied: AtomicU64,
    prefault: Prefault,
    prefault_ns: Arc<AtomicU64>,
    /// Set once the receivers ended ([`Destination::wait`], or a drop): the
    /// [`Prefault::Thread`] stops before its next step rather than populating, inside
    /// the downtime or for a failed session, pages no frame will write.
    prefault_stop: Arc<AtomicBool>,
    /// The userfaultfd counters ([`Prefault::Install`]), once the memory is registered.
    install: OnceLock<Arc<crate::install::InstallCounters>>,
    /// Why registering failed ([`Prefault::Install`]).
    install_unavailable: OnceLock<String>,
    /// The blocks decided so far ([`Prefault::HugeWhereDense`]), once the memory is set
    /// up.
    dense: OnceLock<dense::DenseBlocks>,
    /// CPU nanoseconds of the receiver and pre-fault threads.
    cpu_ns: Arc<AtomicU64>,
    /// Frames decoded on hardware, and those handed to software.
    hw_decodes: AtomicU64,
    hw_fallbacks: Mutex<pagewire_accel::FallbackCounts>,
    /// When the channels were accepted.
    started: Instant,
}

impl Shared {
    fn add_cpu(&self, d: Duration) {
        self.cpu_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn stats(&self) -> DestinationStats {
        let pages = self.data_pages.load(Ordering::Relaxed)
            + self.zero_pages.load(Ordering::Relaxed)
            + self.uniform_pages.load(Ordering::Relaxed)
            + self.copied_pages.load(Ordering::Relaxed);
        let install = self.install.get();
        let counted = |f: fn(&crate::install::InstallCounters) -> &AtomicU64| {
            install.map_or(0, |c| f(c).load(Ordering::Relaxed))
        };
        DestinationStats {
            installed_pages: counted(|c| &c.installed),
            install_present: counted(|c| &c.present),
            install_faults: counted(|c| &c.faults),
            install_unavailable: self.install_unavailable.get().cloned(),
            huge_blocks: self.dense.get().map_or(0, dense::DenseBlocks::advised),
            cpu: crate::stats::CpuSummary::new(
                Duration::from_nanos(
                    self.cpu_ns.load(Ordering::Relaxed) + counted(|c| &c.handler_cpu_ns),
                ),
                self.started.elapsed(),
                pages * u64::from(self.page_size),
            ),
            frames: self.frames.load(Ordering::Relaxed),
            data_pages: self.data_pages.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            uniform_pages: self.uniform_pages.load(Ordering::Relaxed),
            copied_pages: self.copied_pages.load(Ordering::Relaxed),
            round_end_pages: self.round_end_pages.load(Ordering::Relaxed),
            round_end_ms: self.round_end_ns.load(Ordering::Relaxed) as f64 / 1e6,
            placed_bytes: self.placed.load(Ordering::Relaxed),
            tls_opened_bytes: self.tls_opened.load(Ordering::Relaxed),
            tls_copied_bytes: self.tls_copied.load(Ordering::Relaxed),
            prefault_ms: self.prefault_ns.load(Ordering::Relaxed) as f64 / 1e6,
            apply_latency: self.apply.summary(),
            hw_decodes: self.hw_decodes.load(Ordering::Relaxed),
            hw_fallbacks: self.hw_fallbacks.lock().map_or(0, |c| c.total()),
            hw_fallback_causes: {
                let mut s = crate::stats::FallbackSummary::default();
                if let Ok(c) = self.hw_fallbacks.lock() {
                    s.add(&c);
                }
                s
            },
        }
    }

    /// Stops the [`Prefault::Thread`] (see `prefault_stop`) and joins it (the memory
    /// lock is not held while it is joined).
    fn stop_prefault(&self) {
        self.prefault_stop.store(true, Ordering::Relaxed);
        let thread = self
            .memory
            .lock()
            .ok()
            .and_then(|mut m| m.as_mut().and_then(|(_, t)| t.take()));
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// Cancels the session: it fails, and every channel's socket is shut down both
    /// ways, so a receiver blocked in a send wakes too.
    ///
    /// Too late once COMMIT was taken: the guest is this side's then (PROTOCOL.md,
    /// COMMIT), and the source has given it up. Decided under the lock COMMIT is taken
    /// under, which checks for a cancel ([`Self::failure`]).
    fn cancel(&self) {
        match self.state.lock() {
            Ok(s) if s.rules.committed().is_some() => return,
            _ => self.cancelled.store(true, Ordering::SeqCst),
        }
        self.fail(None, "cancelled by the destination's VMM".into());
        self.shutdown(std::net::Shutdown::Both);
    }

    /// Channel `ch` failed with `e`: the session fails ([`Self::fail`]) and its other
    /// receivers end at once ([`Self::end_receivers`]), so that a peer cannot hold a
    /// failed session's threads and memory until their idle timeout. Not after `ch`'s
    /// own idle timeout, though: a channel that ended the final round has nothing more
    /// to send and may idle out while channel 0 still moves the device state, COMPLETE
    /// and COMMIT; the others have their own idle timeout.
    ///
    /// An idle-out of a channel other than 0 (nothing within the idle timeout, or a
    /// frame not whole within it of its first byte) is recorded ([`Self::idle_blocks`]), not a
    /// failure: the session still completes if every channel ended the final round,
    /// and a session that failed refuses COMPLETE and COMMIT ([`Self::failure`]).
    fn channel_failed(&self, ch: u16, e: &MigrationError) {
        // A frame that did not arrive whole in time counts as an idle-out too: the
        // source stopped sending on that channel, as far as this side can tell.
        let idle = matches!(
            e,
            MigrationError::Channel {
                source: pagewire_transport::ChannelError::RecvTimeout(_)
                    | pagewire_transport::ChannelError::FrameTimeout { .. },
                ..
            }
        );
        if idle && ch != 0 {
            if let Ok(mut s) = self.state.lock() {
                s.idled.push((ch, e.to_string()));
            }
            self.cv.notify_all();
            return;
        }
        self.fail(Some(ch), e.to_string());
        self.end_receivers();
    }

    /// A wait of channel `ch` for every channel to end `round` that cannot end well:
    /// a channel that idled out before it ended that round, or with a device-state
    /// section unfinished (only that channel may carry its rest, so the session cannot
    /// complete).
    fn idle_blocks(&self, ch: u16, state: &State, round: Round) -> Option<MigrationError> {
        state
            .idled
            .iter()
            .find(|(c, _)| {
                !state
                    .copy_ended
                    .get(usize::from(*c))
                    .is_some_and(|e| e.is_some_and(|e| e >= round))
                    || state.rules.unfinished_on(ChannelId(*c))
            })
            .map(|(_, why)| MigrationError::SessionFailed {
                channel: ch,
                cause: why.clone(),
            })
    }

    /// Fails the session (with channel `ch`'s failure, or none's) unless it failed
    /// already, and wakes the receivers waiting for other channels.
    fn fail(&self, ch: Option<u16>, why: String) {
        if let Ok(mut s) = self.state.lock()
            && s.failed.is_none()
        {
            s.failed = Some(why);
            s.failed_channel = ch;
        }
        self.cv.notify_all();
    }

    /// Ends every receiver of the session: those blocked in `recv` see their socket's
    /// receiving side shut down and end; after a failure they send ABORT
    /// `CHANNEL_FAILED` on the sending side, which stays open, after COMMIT nothing.
    fn end_receivers(&self) {
        self.shutdown(std::net::Shutdown::Read);
    }

    fn shutdown(&self, how: std::net::Shutdown) {
        if let Ok(sockets) = self.sockets.lock() {
            for (_, s) in sockets.iter() {
                let _ = s.shutdown(how);
            }
        }
    }

    /// Closes the second handle on channel `ch`'s socket once its receiver ended, so
    /// the connection closes with the channel instead of with the session.
    fn release(&self, ch: u16) {
        if let Ok(mut sockets) = self.sockets.lock() {
            sockets.retain(|(c, _)| *c != ch);
        }
    }

    /// The error of receiver `ch` ending because the session failed before it
    /// ([`MigrationError::Cancelled`] when the VMM cancelled it), given the session's
    /// `state`; `None` while the session has not failed.
    fn failure(&self, ch: u16, state: &State) -> Option<MigrationError> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Some(MigrationError::Cancelled);
        }
        state
            .failed
            .as_ref()
            .map(|cause| MigrationError::SessionFailed {
                channel: ch,
                cause: cause.clone(),
            })
    }

    /// [`Self::failure`] with the state locked here.
    fn failed_before(&self, ch: u16) -> Option<MigrationError> {
        self.failure(ch, &*self.state.lock().ok()?)
    }

    fn state(&self, ch: u16) -> Result<std::sync::MutexGuard<'_, State>, MigrationError> {
        self.state.lock().map_err(|_| MigrationError::Worker(ch))
    }

    /// The guest memory for `layout`: the one given at accept (which must match), the
    /// one an earlier channel created, or a new one, pre-faulted in the background. The
    /// layout has passed the session's limits.
    ///
    /// # Errors
    /// [`MigrationError::Protocol`] when the source's layout differs from the memory
    /// given at accept; [`MigrationError::Memory`] (ABORT `INTERNAL`, this side's
    /// failure) when the VMM's provider refuses, panics or returns memory of another
    /// layout, or anonymous memory cannot be mapped.
    fn memory_for(
        &self,
        ch: u16,
        layout: &MemoryLayout,
    ) -> Result<Arc<GuestMemory>, MigrationError> {
        let mut slot = self.memory.lock().map_err(|_| MigrationError::Worker(ch))?;
        if let Some((m, _)) = slot.as_ref() {
            if m.layout() != layout {
                return Err(MigrationError::Protocol {
                    channel: ch,
                    what: "the layout differs from the guest memory already set up".into(),
                });
            }
            return Ok(m.clone());
        }
        if let DestinationMemory::Provider(p) = &self.provider {
            let provider =
                |what: String| MigrationError::Memory(crate::MemoryError::Provider(what));
            if let Some(what) = self.provider_failed.get() {
                return Err(provider(what.clone()));
            }
            // A panic in the VMM's code fails this session, not the lock every channel
            // takes.
            let m = match crate::error::vmm_call(|| p.memory_for(layout)) {
                Ok(Ok(m)) if m.layout() == layout => m,
                failed => {
                    let what = match failed {
                        Err(panic) => format!("panicked: {panic}"),
                        Ok(Err(e)) => format!("refused the layout: {e}"),
                        Ok(Ok(_)) => "returned memory of another layout".into(),
                    };
                    let _ = self.provider_failed.set(what.clone());
                    return Err(provider(what));
                }
            };
            *slot = Some((m.clone(), None));
            return Ok(m);
        }
        let m = Arc::new(GuestMemory::anonymous(layout)?);
        match self.prefault {
            Prefault::Thread => {}
            Prefault::HugePages => {
                m.advise_huge_pages();
                *slot = Some((m.clone(), None));
                return Ok(m);
            }
            Prefault::HugeWhereDense => {
                if let Some(d) = dense::DenseBlocks::new(&m) {
                    // Where THP is on for every mapping, only the blocks advised.
                    m.advise_no_huge_pages();
                    let _ = self.dense.set(d);
                }
                *slot = Some((m.clone(), None));
                return Ok(m);
            }
            Prefault::Install => {
                match m.install_pages() {
                    Ok(()) => {
                        if let Some(c) = m.install_counters() {
                            let _ = self.install.set(c);
                        }
                    }
                    // Not an error: the pages are faulted in as without a policy.
                    Err(e) => {
                        let _ = self.install_unavailable.set(error_chain(&e));
                    }
                }
                *slot = Some((m.clone(), None));
                return Ok(m);
            }
            _ => {
                *slot = Some((m.clone(), None));
                return Ok(m);
            }
        }
        let m2 = m.clone();
        let ns = self.prefault_ns.clone();
        let stop = self.prefault_stop.clone();
        let shared_cpu = self.cpu_ns.clone();
        let prefault = std::thread::Builder::new()
            .name("pagewire-prefault".into())
            .spawn(move || {
                let t = Instant::now();
                let cpu = pagewire_accel::thread_cpu_time();
                m2.prefault_until(&stop);
                ns.store(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                let used = pagewire_accel::thread_cpu_time().saturating_sub(cpu);
                shared_cpu.fetch_add(
                    u64::try_from(used.as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            })
            .ok();
        *slot = Some((m.clone(), prefault));
        Ok(m)
    }
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

mod abort;
mod bounds;
mod copies;
mod dense;
mod listener;
mod receiver;

pub use listener::DestinationListener;
