//! The source side: N channels, one worker thread each, sending the dirty pages of
//! each round through the codec engine.
//!
//! Each worker owns its channel and its codec engine. Per round it walks the dirty
//! pages its channel carries (page-to-channel affinity, see [`crate::plan`]), finds
//! zero pages, submits the rest to the engine in batches, sends each frame as its
//! completion arrives (compressed payloads straight from the engine's buffer pool, raw
//! pages straight from guest memory when no checksum is asked), marks the end of the
//! round and waits for the destination to acknowledge it.
//!
//! Every wait is bounded by a [`SourceConfig`] setting and ends in
//! [`MigrationError::Timeout`] naming it ([`Wait`]): connecting (`connect_timeout` ×
//! `connect_attempts`), the handshake (`handshake_timeout`), the peer taking a frame
//! or a send completing, and the codec engine freeing a buffer (`send_timeout` without
//! progress), the destination's ACK (`ack_timeout`, one deadline for the whole wait).
//! Engine output buffers travel with their frame to the transport and come back only
//! when its send completes (with io_uring, when the worker reaps the completion), so a
//! worker short of buffers reaps and, when nothing else can free one, waits for sends.
//!
//! [`Wait`]: crate::error::Wait

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagewire_protocol::{CodecId, RegionId};
use pagewire_transport::session::{self, AnyChannel};
use pagewire_transport::{Endpoint, Stream};

use crate::config::{Control, SourceConfig};
use crate::dirty::DirtyBitmap;
use crate::error::{Failed, MigrationError};
use crate::memory::GuestMemory;
use crate::plan::Affinity;
use crate::progress::{Phase, Progress};
use crate::stats::{CodecStats, Latency, PageCounts, RoundStats};
use crate::switchover::Switchover;

pub mod adaptive;
mod dedup;
pub(crate) mod pagehash;
mod setup;
mod split;
mod summary;
mod worker;

/// Live counters of one channel, summed by [`Source::stats`] and [`Progress`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) frames: AtomicU64,
    pub(crate) wire_bytes: AtomicU64,
    pub(crate) guest_bytes: AtomicU64,
    pub(crate) compressed: AtomicU64,
    pub(crate) zero: AtomicU64,
    pub(crate) uniform: AtomicU64,
    pub(crate) copied: AtomicU64,
    pub(crate) delta: AtomicU64,
    pub(crate) raw: AtomicU64,
    pub(crate) zc: AtomicU64,
    pub(crate) zc_copied: AtomicU64,
    /// The channel's registered bytes so far.
    pub(crate) registered: AtomicU64,
    /// The channel's TLS byte counters so far (sealed, copied; 0 in clear).
    pub(crate) tls_sealed: AtomicU64,
    pub(crate) tls_copied: AtomicU64,
    /// CPU time of the channel's worker thread so far, ns.
    pub(crate) cpu_ns: AtomicU64,
}

impl Counters {
    pub(crate) fn pages(&self) -> PageCounts {
        PageCounts {
            compressed: self.compressed.load(Ordering::Relaxed),
            zero: self.zero.load(Ordering::Relaxed),
            uniform: self.uniform.load(Ordering::Relaxed),
            copied: self.copied.load(Ordering::Relaxed),
            delta: self.delta.load(Ordering::Relaxed),
            raw: self.raw.load(Ordering::Relaxed),
        }
    }
}

/// Latency histograms shared by the workers.
#[derive(Debug, Default)]
pub(crate) struct SourceLatency {
    pub(crate) encode: Latency,
    pub(crate) send: Latency,
}

/// What a channel did in a round.
#[derive(Debug, Default)]
struct ChannelRound {
    frames: u64,
    pages: PageCounts,
    wire_bytes: u64,
    guest_bytes: u64,
    codecs: HashMap<CodecId, CodecStats>,
}

enum Cmd {
    Round {
        round: u32,
        /// The guest is paused: no round follows but another paused one.
        paused: bool,
        dirty: Arc<Vec<(RegionId, DirtyBitmap)>>,
    },
    DeviceState {
        name: String,
        instance: u32,
        total: u64,
        offset: u64,
        data: Vec<u8>,
    },
    Complete {
        final_round: u32,
        sections: u32,
        watch: Arc<Watch>,
    },
    /// Read the channel for an ABORT while channel 0 hands the guest over, until the
    /// next command (no reply).
    Watch(Arc<Watch>),
    /// Send ABORT with this reason and message (the VMM's side failed), then end.
    Abort {
        reason: pagewire_protocol::AbortReason,
        message: String,
    },
    Close,
}

/// What the other channels saw while channel 0 hands the guest over: the first ABORT
/// (or frame the session's rules refuse) the destination sent on one of them. Channel
/// 0 checks it while it waits for ACK COMPLETE and ACK COMMITTED, and before it sends
/// COMMIT, so a destination that fails on another channel after that channel's final
/// round does not leave channel 0 waiting for its `ack_timeout` (PROTOCOL.md, ABORT).
#[derive(Default)]
pub(crate) struct Watch {
    tripped: std::sync::Mutex<Option<MigrationError>>,
    /// Channel 0's switchover ended: the other channels stop reading.
    ended: std::sync::atomic::AtomicBool,
}

impl Watch {
    /// Whether channel 0's switchover ended (the watchers stop).
    pub(crate) fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
    }

    /// Records `e`, unless an earlier one is recorded.
    pub(crate) fn trip(&self, e: MigrationError) {
        let mut t = self.tripped.lock().unwrap_or_else(|p| p.into_inner());
        t.get_or_insert(e);
    }

    /// The error recorded, once.
    pub(crate) fn take(&self) -> Option<MigrationError> {
        self.tripped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

enum Reply {
    Ready(ChannelTransport),
    Round(ChannelRound),
    Done,
    Failed(MigrationError),
    /// COMMIT went to the channel (whole or in part) and ACK COMMITTED did not come.
    Unknown(MigrationError),
}

struct WorkerHandle {
    tx: mpsc::Sender<Cmd>,
    rx: mpsc::Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    bytes_sent: Arc<AtomicU64>,
}

/// A migration's source end.
pub struct Source {
    workers: Vec<WorkerHandle>,
    memory: Arc<GuestMemory>,
    config: SourceConfig,
    control: Control,
    affinity: Affinity,
    latency: Arc<SourceLatency>,
    rounds: Vec<RoundStats>,
    /// Whether the last `send_round` call was a paused round and succeeded: only
    /// then may `complete` hand the guest over.
    last_round_paused: bool,
    next_round: u32,
    sections: u32,
    started: Instant,
    setup: Duration,
    transport: String,
    transports: Vec<ChannelTransport>,
    engine_stats: Vec<Arc<std::sync::Mutex<pagewire_accel::EngineStats>>>,
    adaptive_stats: Vec<Arc<std::sync::Mutex<crate::stats::AdaptiveStats>>>,
    /// The pages sent, by content, when dedup is on: each round forgets its pages
    /// before its channels start.
    dedup: Option<Arc<dedup::DedupTable>>,
    progress: Progress,
    /// COMMIT was sent, or may have been ([`Source::complete`] returned `Ok`): every
    /// later call fails with [`MigrationError::HandedOver`], never with an error that
    /// lets the guest be resumed here.
    handed_over: bool,
    /// When [`Source::complete`] had the destination's answer (or gave up on it).
    handed_over_at: Option<Instant>,
    /// CPU the caller's thread spent in `Source::connect` and `Migration::run`.
    driver_cpu: Duration,
    /// Why the session was aborted ([`Source::abort_session`]): every later call fails.
    aborted: Option<String>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("channels", &self.workers.len())
            .field("next_round", &self.next_round)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// Connects `config.channels` channels to the destination at the TCP address
    /// `addr`, runs the handshake on each, and sends the memory layout on every
    /// channel ([`Self::connect_to`] with [`Endpoint::Tcp`]).
    ///
    /// # Errors
    /// [`MigrationError::Session`] when a channel cannot be opened or its handshake
    /// fails; `Config` for an unusable configuration.
    pub fn connect(
        addr: SocketAddr,
        memory: Arc<GuestMemory>,
        config: SourceConfig,
    ) -> Result<Source, MigrationError> {
        Self::connect_to(&Endpoint::Tcp(addr), memory, config)
    }

    /// Connects `config.channels` channels to the destination at `endpoint`, a TCP
    /// address or a Unix socket path (local migrations), like [`Self::connect`]: each
    /// connection within `connect_timeout`, `connect_attempts` times
    /// `connect_retry_delay` apart, each handshake within `handshake_timeout`.
    ///
    /// # Errors
    /// As [`Self::connect`]; [`MigrationError::Timeout`] (`Wait::Connect`) when every
    /// attempt timed out, [`MigrationError::Session`] when they failed otherwise (a
    /// Unix path that does not exist: `NotFound`).
    pub fn connect_to(
        endpoint: &Endpoint,
        memory: Arc<GuestMemory>,
        config: SourceConfig,
    ) -> Result<Source, MigrationError> {
        Self::open(memory, config, |scfg| session::connect_to(endpoint, scfg))
    }

    /// Runs the migration over streams the caller already connected (e.g. sockets a
    /// management layer handed to the VMM), TCP or Unix: `streams[i]` becomes channel
    /// `i`, and there must be exactly `config.channels` of them. The handshake runs on
    /// each within `handshake_timeout`; the send and ACK timeouts apply as for
    /// [`Self::connect`] (the connect settings have nothing to do).
    ///
    /// # Errors
    /// [`MigrationError::Config`] when the number of streams is not
    /// `config.channels` (nothing is sent then); otherwise as [`Self::connect`].
    pub fn from_streams(
        streams: Vec<Stream>,
        memory: Arc<GuestMemory>,
        config: SourceConfig,
    ) -> Result<Source, MigrationError> {
        if streams.len() != usize::from(config.channels) {
            return Err(MigrationError::Config(format!(
                "{} pre-connected streams were given for {} channels (SourceConfig::channels); give one stream per channel",
                streams.len(),
                config.channels
            )));
        }
        Self::open(memory, config, |scfg| {
            session::connect_streams(streams, scfg)
        })
    }

    /// The transport each channel runs on, in channel order: a VMM (or a test) that
    /// asked for io_uring sees here whether it got it.
    pub fn channel_transports(&self) -> &[ChannelTransport] {
        &self.transports
    }

    /// A handle on this migration's progress (phase, round, pages, bytes, rates,
    /// expected downtime), readable from any thread while a [`crate::Migration`] runs.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.progress.set_phase(phase);
    }

    /// The handle that changes bandwidth and downtime limits or cancels.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Guest memory being migrated.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub(crate) fn config_precopy(&self) -> crate::precopy::PrecopyConfig {
        self.config.precopy
    }

    /// The next round's number.
    pub fn next_round(&self) -> u32 {
        self.next_round
    }

    /// Sends one round: the pages set in `dirty` (one bitmap per region), on every
    /// channel, and waits until the destination has acknowledged all of them.
    ///
    /// # Errors
    /// [`Failed`] with the pages of this round that were not acknowledged.
    /// [`MigrationError::Config`], before anything is sent, for a page set in a region
    /// this source's memory lacks or past its region's end (the pages of the round
    /// within its memory come back in [`Failed`]).
    pub fn send_round(
        &mut self,
        dirty: Vec<(RegionId, DirtyBitmap)>,
        paused: bool,
    ) -> Result<RoundStats, Failed> {
        self.not_handed_over()?;
        // Set again only when this round succeeds: a round refused or failed leaves
        // pages `complete` must not hand over without.
        self.last_round_paused = false;
        if let Some(what) = self.bad_bitmap(&dirty) {
            let pages = self.within_memory(dirty);
            return Err(Failed::new(MigrationError::Config(what), pages));
        }
        let started = Instant::now();
        let cpu_before = self.cpu_time();
        let round = self.next_round;
        self.progress.set_round(round);
        if !paused && round == 0 {
            self.progress.set_phase(Phase::Precopy);
        }
        let dirty_pages: u64 = dirty.iter().map(|(_, b)| b.count()).sum();
        if let Some(table) = &self.dedup {
            table.forget_dirty(&dirty);
        }
        let dirty = Arc::new(dirty);
        let replies = self.broadcast(|| Cmd::Round {
            round,
            paused,
            dirty: dirty.clone(),
        });
        let mut stats = RoundStats {
            round,
            paused,
            dirty_pages,
            ..Default::default()
        };
        let mut failed = Vec::new();
        let mut first_error = None;
        for (ch, reply) in replies.into_iter().enumerate() {
            match reply {
                Ok(Reply::Round(r)) => {
                    stats.frames += r.frames;
                    stats.pages.add(&r.pages);
                    stats.wire_bytes += r.wire_bytes;
                    stats.guest_bytes += r.guest_bytes;
                }
                Ok(_) => {
                    failed.push(ch as u16);
                    first_error.get_or_insert(MigrationError::Worker(ch as u16));
                }
                Err(e) => {
                    failed.push(ch as u16);
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(error) = first_error {
            let unacknowledged = dirty
                .iter()
                .map(|(region, bits)| {
                    let out = DirtyBitmap::new(bits.pages());
                    for (start, count) in bits.runs() {
                        for p in start..start + count {
                            if failed.contains(&self.affinity.channel(*region, p)) {
                                out.set(p);
                            }
                        }
                    }
                    (*region, out)
                })
                .collect();
            return Err(Failed::new(error, unacknowledged));
        }
        self.next_round += 1;
        let secs = started.elapsed().as_secs_f64();
        stats.duration_ms = secs * 1e3;
        stats.mbit_per_s = if secs > 0.0 {
            stats.wire_bytes as f64 * 8.0 / secs / 1e6
        } else {
            0.0
        };
        stats.cpu_s = self.cpu_time().saturating_sub(cpu_before).as_secs_f64();
        self.progress.round_done(stats.mbit_per_s);
        self.rounds.push(stats.clone());
        self.last_round_paused = paused;
        Ok(stats)
    }

    /// Records the dirty rate measured for the last round (pages/s), for statistics.
    pub fn note_dirty_rate(&mut self, pages_per_s: f64) {
        if let Some(r) = self.rounds.last_mut() {
            r.dirty_rate_pages_per_s = pages_per_s;
        }
    }

    /// Sends one whole device-state section (chunked) on channel 0. For sections
    /// streamed as they are produced, see [`crate::DeviceStateWriter`].
    ///
    /// # Errors
    /// [`Failed`] when channel 0 fails or the name is not 1..=255 bytes.
    pub fn send_device_state(
        &mut self,
        name: &str,
        instance: u32,
        data: Vec<u8>,
    ) -> Result<(), Failed> {
        self.send_device_chunk(name, instance, data.len() as u64, 0, data)
    }

    /// Sends the part of a device-state section that starts at `offset`, of a section
    /// `total` bytes long, on channel 0. A section's chunks go in order, from offset 0
    /// to `total` (PROTOCOL.md, DEVICE_STATE).
    pub(crate) fn send_device_chunk(
        &mut self,
        name: &str,
        instance: u32,
        total: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), Failed> {
        if name.is_empty() || name.len() > 255 {
            return Err(Failed::bare(MigrationError::Config(
                "a device-state name is 1..=255 bytes".into(),
            )));
        }
        if offset == 0 {
            self.sections += 1;
        }
        self.progress.add_device_bytes(data.len() as u64);
        self.one(
            0,
            Cmd::DeviceState {
                name: name.to_owned(),
                instance,
                total,
                offset,
                data,
            },
        )
    }

    /// Hands the guest over (PROTOCOL.md, Switchover): sends COMPLETE, waits until the
    /// destination confirms that everything is applied (ACK COMPLETE), sends COMMIT and
    /// waits for ACK COMMITTED, then closes every channel. Call it with the guest
    /// paused, after the final round and the device state.
    ///
    /// - `Ok(Switchover::Committed)`: the destination owns and runs the guest; discard
    ///   it here.
    /// - `Ok(Switchover::Unknown { .. })`: COMMIT may have reached the destination, and
    ///   its answer did not come back. Keep the guest paused, neither resume nor discard
    ///   it, and let the management layer ask the destination.
    /// - `Err(Failed)`: COMMIT never left, so the destination cannot run the guest; the
    ///   guest may be resumed here ([`Failed::may_resume_source`] is `true`).
    ///
    /// # Errors
    /// [`Failed`] when the migration failed before COMMIT: the destination did not
    /// confirm COMPLETE. [`MigrationError::Config`], before anything is sent (the
    /// session goes on), when no round was sent, or the last `send_round` call was not
    /// a paused one (`send_round(.., true)`) that succeeded: the pages the guest
    /// dirtied after the last round sent, or those of a round refused or failed, would
    /// never reach the destination.
    pub fn complete(&mut self) -> Result<Switchover, Failed> {
        self.not_handed_over()?;
        let final_round = self
            .next_round
            .checked_sub(1)
            .ok_or_else(|| Failed::bare(MigrationError::Config("no round was sent".into())))?;
        if !self.last_round_paused {
            return Err(Failed::bare(MigrationError::Config(
                "complete() needs a last round sent paused that succeeded (send_round(.., \
                 true), with the guest paused): the pages dirtied or left unsent after the \
                 last round sent would be lost"
                    .into(),
            )));
        }
        // The other channels are read for an ABORT meanwhile; their next command ends
        // the watch.
        let watch = Arc::new(Watch::default());
        for w in &self.workers[1..] {
            let _ = w.tx.send(Cmd::Watch(watch.clone()));
        }
        let w = &self.workers[0];
        let cmd = Cmd::Complete {
            final_round,
            sections: self.sections,
            watch: watch.clone(),
        };
        if w.tx.send(cmd).is_err() {
            // The worker was gone before it got the command: nothing was sent.
            watch.end();
            self.set_phase(Phase::Failed);
            return Err(Failed::bare(self.died(0)));
        }
        let reply = w.rx.recv();
        let answered = Instant::now();
        watch.end();
        let switchover = match reply {
            Ok(Reply::Done) => Switchover::Committed,
            Ok(Reply::Unknown(e)) => Switchover::Unknown { error: Box::new(e) },
            Ok(Reply::Failed(e)) => {
                self.set_phase(Phase::Failed);
                return Err(Failed::bare(e));
            }
            // The worker died without a word: it may have sent COMMIT.
            Err(_) => Switchover::Unknown {
                error: Box::new(self.died(0)),
            },
            Ok(_) => Switchover::Unknown {
                error: Box::new(MigrationError::Worker(0)),
            },
        };
        self.set_phase(match switchover {
            Switchover::Committed => Phase::Completed,
            Switchover::Unknown { .. } => Phase::OutcomeUnknown,
        });
        // The guest's downtime ends with channel 0's answer (ACK COMMITTED, or the end
        // of its wait), not after the channels' closes below.
        self.handed_over_at = Some(answered);
        self.handed_over = true;
        // Closing cannot change who owns the guest; its errors are not the migration's.
        let _ = self.broadcast(|| Cmd::Close);
        Ok(switchover)
    }

    /// Why `dirty` cannot be a round of this source's memory, if it cannot: a page set
    /// in a region it lacks, or past a region's end.
    fn bad_bitmap(&self, dirty: &[(RegionId, DirtyBitmap)]) -> Option<String> {
        dirty.iter().find_map(|(id, bitmap)| {
            let Some(pages) = self.memory.pages(*id) else {
                return (bitmap.count() > 0).then(|| {
                    format!("send_round: region {id:?} is not in the source's guest memory")
                });
            };
            let past = (pages..bitmap.pages()).find(|&p| bitmap.is_set(p))?;
            Some(format!(
                "send_round: the dirty bitmap of region {id:?} sets page {past}, past the \
                 region's {pages} pages"
            ))
        })
    }

    /// `dirty` cut to this source's memory: the pages of it a VMM may mark dirty again
    /// after a refused round.
    fn within_memory(&self, dirty: Vec<(RegionId, DirtyBitmap)>) -> Vec<(RegionId, DirtyBitmap)> {
        dirty
            .into_iter()
            .filter_map(|(id, bitmap)| {
                let pages = self.memory.pages(id)?;
                if bitmap.pages() <= pages {
                    return Some((id, bitmap));
                }
                let cut = DirtyBitmap::new(pages);
                for (start, count) in bitmap.runs().take_while(|&(s, _)| s < pages) {
                    cut.set_range(start, count.min(pages - start));
                }
                Some((id, cut))
            })
            .collect()
    }

    /// When [`Source::complete`] had the destination's answer to COMMIT, or gave up
    /// waiting for it: the end of the guest's downtime as the source sees it.
    pub(crate) fn handed_over_at(&self) -> Option<Instant> {
        self.handed_over_at
    }

    /// `Err` with [`MigrationError::HandedOver`] once the switchover ran.
    fn not_handed_over(&self) -> Result<(), Failed> {
        if self.handed_over {
            return Err(Failed::bare(MigrationError::HandedOver));
        }
        match &self.aborted {
            Some(why) => Err(Failed::bare(MigrationError::Config(format!(
                "this source's session was aborted after a failure ({why}); a new \
                 migration needs a new Source"
            )))),
            None => Ok(()),
        }
    }

    /// Tells the destination on every channel that the migration failed on this side
    /// (ABORT `CANCELLED` for a cancel, else `INTERNAL`, with `error` as its message),
    /// so it frees the session at once rather than after its idle timeout, and ends
    /// the channels. A send that would wait for a full socket does not: the control's
    /// interrupt is raised first. Never after the switchover ran (an ABORT cannot take
    /// the guest back). Every later call fails.
    pub(crate) fn abort_session(&mut self, error: &MigrationError) {
        if self.handed_over || self.aborted.is_some() {
            return;
        }
        self.aborted = Some(error.to_string());
        self.control.interrupt().raise();
        let reason = error.abort_reason();
        let message = error.to_string();
        // All at once, then the replies: the channels send in parallel.
        let sent: Vec<bool> = self
            .workers
            .iter()
            .map(|w| {
                w.tx.send(Cmd::Abort {
                    reason,
                    message: message.clone(),
                })
                .is_ok()
            })
            .collect();
        for (w, sent) in self.workers.iter().zip(sent) {
            if sent {
                let _ = w.rx.recv();
            }
        }
    }

    fn one(&mut self, ch: usize, cmd: Cmd) -> Result<(), Failed> {
        self.not_handed_over()?;
        let w = &self.workers[ch];
        let reply = match w.tx.send(cmd) {
            Ok(()) => w.rx.recv().ok(),
            Err(_) => None,
        };
        match reply {
            Some(Reply::Done) => Ok(()),
            Some(Reply::Failed(e)) => Err(Failed::bare(e)),
            Some(_) => Err(Failed::bare(MigrationError::Worker(ch as u16))),
            None => Err(Failed::bare(self.died(ch))),
        }
    }

    /// The error for worker `ch`, whose thread is gone (its channel to us closed):
    /// with the panic's message when it panicked.
    fn died(&mut self, ch: usize) -> MigrationError {
        match self.workers[ch].thread.take() {
            // It dropped its end of the channel: it is ending, if not ended.
            Some(t) => crate::error::worker_ended(ch as u16, t.join()),
            None => MigrationError::Worker(ch as u16),
        }
    }

    fn broadcast(&mut self, mut cmd: impl FnMut() -> Cmd) -> Vec<Result<Reply, MigrationError>> {
        let sent: Vec<bool> = self
            .workers
            .iter()
            .map(|w| w.tx.send(cmd()).is_ok())
            .collect();
        let replies: Vec<Option<Reply>> = self
            .workers
            .iter()
            .zip(sent)
            .map(|(w, ok)| ok.then(|| w.rx.recv().ok()).flatten())
            .collect();
        replies
            .into_iter()
            .enumerate()
            .map(|(ch, reply)| match reply {
                Some(Reply::Failed(e)) => Err(e),
                Some(r) => Ok(r),
                None => Err(self.died(ch)),
            })
            .collect()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if !self.handed_over {
            // A close that would wait for a destination that stopped reading does not
            // hold the drop (up to `send_timeout`): the session is over.
            self.control.interrupt().raise();
        }
        for w in &self.workers {
            let _ = w.tx.send(Cmd::Close);
        }
        for w in &mut self.workers {
            // Dropping the command sender ends the worker's loop even if it missed Close.
            let (tx, _) = mpsc::channel();
            drop(std::mem::replace(&mut w.tx, tx));
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The transport a channel runs on.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelTransport {
    /// TCP, as asked.
    Tcp,
    /// io_uring, as asked.
    Uring,
    /// TCP, because io_uring was asked for and could not be used.
    TcpFallback {
        /// Why io_uring could not be used.
        reason: String,
    },
    /// RDMA (`Backend::Rdma`).
    Rdma,
    /// Another backend.
    Other,
}

impl ChannelTransport {
    fn of(ch: &AnyChannel) -> Self {
        match ch {
            AnyChannel::Tcp(_) => Self::Tcp,
            AnyChannel::Uring(_) => Self::Uring,
            AnyChannel::Fallback(_, e) => Self::TcpFallback {
                reason: e.to_string(),
            },
            #[cfg(feature = "rdma")]
            AnyChannel::Rdma(..) => Self::Rdma,
            #[allow(unreachable_patterns)]
            _ => Self::Other,
        }
    }
}

impl std::fmt::Display for ChannelTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp => f.write_str("tcp"),
            Self::Uring => f.write_str("io_uring"),
            Self::TcpFallback { .. } => f.write_str("tcp (io_uring unavailable)"),
            Self::Rdma => f.write_str("rdma"),
            Self::Other => f.write_str("other"),
        }
    }
}

/// The frame limit that fits `max_pages` raw pages with their headers.
pub(crate) fn frame_bytes(page_size: u32, max_pages: u32) -> u32 {
    let pages = u64::from(page_size) * u64::from(max_pages);
    // Envelope, header, one run per page at worst, a length per page, CRC.
    let overhead = 64 + 16 * u64::from(max_pages);
    // `min` then `max`, not `clamp`: a page size past the frame limit (refused by
    // the configurations' checks) gets the larger bound instead of a panic.
    (pages + overhead)
        .min(u64::from(pagewire_protocol::limits::MAX_FRAME_BYTES))
        .max(u64::from(pagewire_protocol::limits::min_frame_bytes(
            page_size,
        ))) as u32
}

/// The most pages whose frame, raw with its headers, fits `max_frame_bytes` (the
/// inverse of [`frame_bytes`]); at least 1, as every frame limit a peer may choose
/// holds a page and 1024 bytes.
pub(crate) fn pages_per_frame(page_size: u32, max_frame_bytes: u32) -> u32 {
    let per_page = u64::from(page_size) + 16;
    let pages = u64::from(max_frame_bytes).saturating_sub(64) / per_page;
    u32::try_from(pages).unwrap_or(u32::MAX).max(1)
}

/// Transport views of every region, for zero-copy sends and io_uring registration.
pub(crate) fn transport_views(
    memory: &Arc<GuestMemory>,
) -> Vec<(RegionId, pagewire_transport::GuestMemory)> {
    memory
        .region_ids()
        .filter_map(|id| {
            let pages = memory.pages(id)?;
            let (ptr, len) = memory.span(id, 0, pages)?;
            // SAFETY: the range is a whole region of `memory`, mapped for as long as the
            // `Arc<GuestMemory>` lives; every holder of these views (workers, channels)
            // also holds that `Arc` and drops the views first.
            Some((id, unsafe {
                pagewire_transport::GuestMemory::new(ptr, len)
            }))
        })
        .collect()
}
