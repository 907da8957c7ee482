//! A source worker: one channel and its codec engine, on their own thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use pagewire_accel::{Completion, DeltaCache, EncodeParams, Engine, PageKey, PageList};
use pagewire_protocol::{
    Abort, AbortReason, AckKind, ChannelId, ChecksumId, Frame, FrameType, PageRun, RegionId, Round,
    SessionError, SourceChannel, UniformRun,
};
use pagewire_transport::session::AnyChannel;
use pagewire_transport::{Channel, Completed, Incoming, OutFrame, Payload};

use crate::config::Control;
use crate::dirty::DirtyBitmap;
use crate::error::{MigrationError, Wait};
use crate::memory::GuestMemory;
use crate::plan::Affinity;

use super::adaptive::Selector;
use super::dedup::{Dedup, PageHash};
use super::split::PageSplit;
use super::{ChannelRound, Cmd, Counters, Reply, SourceLatency};

mod acks;
mod copies;
mod engine;
mod pages;
mod pair;
mod send;
mod switchover;

use acks::Next;

struct FrameMeta {
    region: RegionId,
    data_runs: Vec<PageRun>,
    zero_runs: Vec<PageRun>,
    uniform_runs: Vec<UniformRun>,
    /// The adaptive candidate that encoded it.
    arm: Option<usize>,
    submitted: Instant,
    /// This thread's CPU time encoding it, when measured (see
    /// [`WorkerSetup::inline_encode`]).
    cpu: Option<Duration>,
    /// Measured, but the engine was full and the job ran later, while this thread
    /// waited on the channel: its cost is not known.
    late: bool,
    /// The copy of the data pages the engine encodes, when dedup took one (kept until
    /// the job is done), and each data page's hash, entered into the table once the
    /// frame is on the channel.
    staged: Option<Vec<u8>>,
    hashes: Vec<(u64, PageHash)>,
    /// Pages of the frame that went as copies: the adaptive choice counts them in the
    /// guest bytes the channel moved (not in the codec's ratio).
    copied: u64,
    /// Wall time it spent having memory backed for the first time
    /// (`Staged::setup_wall`): a window of the adaptive choice that spent much of its
    /// time so measured the memory, not the codec.
    setup: Duration,
    /// Sent as delta in place of `arm`, its pages all cached (`adaptive/delta.rs`).
    delta: bool,
    /// The delta cache's setup time when the job was submitted: what it grew by until
    /// the completion backed cache memory, not the codec's cost.
    cache_setup: Duration,
}

/// Everything a worker needs but its channel, which it opens on its own thread.
pub(super) struct WorkerSetup {
    pub(super) ch: u16,
    pub(super) engine: Engine,
    /// The delta cache, when the codec is delta or among the adaptive candidates:
    /// pages sent another way are evicted (or, under the adaptive choice, what a
    /// compressor sent of them kept), so the next delta is never computed against
    /// content the destination lacks.
    pub(super) delta: Option<Arc<DeltaCache>>,
    pub(super) views: Vec<(RegionId, pagewire_transport::GuestMemory)>,
    pub(super) memory: Arc<GuestMemory>,
    pub(super) affinity: Affinity,
    pub(super) params: EncodeParams,
    pub(super) checksum: Option<ChecksumId>,
    pub(super) max_pages: u32,
    pub(super) control: Control,
    pub(super) latency: Arc<SourceLatency>,
    pub(super) counters: Arc<Counters>,
    pub(super) bytes_sent: Arc<AtomicU64>,
    pub(super) engine_stats: Arc<std::sync::Mutex<pagewire_accel::EngineStats>>,
    /// The per-frame codec choice, when adaptive.
    pub(super) adaptive: Option<Selector>,
    /// Pages this channel sent, by content, when data pages equal to them go as COPY
    /// references.
    pub(super) dedup: Option<Dedup>,
    /// The engine encodes on this thread, at submit (no codec threads): the choice
    /// is then told each frame's encode in this thread's CPU time, which other work
    /// on the same cores does not stretch, instead of in wall time.
    pub(super) inline_encode: bool,
    /// Its statistics, copied out at the end of each round.
    pub(super) adaptive_stats: Arc<std::sync::Mutex<crate::stats::AdaptiveStats>>,
    pub(super) send_timeout: Duration,
    pub(super) ack_timeout: Duration,
    /// [`SourceConfig::keepalive`](crate::SourceConfig::keepalive).
    pub(super) keepalive: Duration,
}

impl WorkerSetup {
    /// The worker for `channel`, with the session's source rules for its index.
    ///
    /// # Errors
    /// [`MigrationError::Rule`] when the channel index is outside the session;
    /// [`MigrationError::Channel`] when the channel cannot take the control's interrupt.
    pub(super) fn into_worker(self, mut channel: AnyChannel) -> Result<Worker, MigrationError> {
        let ch = self.ch;
        let rules = SourceChannel::new(ChannelId(ch), self.affinity.wire()).map_err(|source| {
            MigrationError::Rule {
                channel: ch,
                source,
            }
        })?;
        // A cancel ends a send blocked on a destination that stopped reading.
        set_interrupt(&mut channel, Some(self.control.interrupt().clone())).map_err(|source| {
            MigrationError::Channel {
                channel: ch,
                source,
            }
        })?;
        let page_size = self.engine.config().page_size;
        Ok(Worker {
            rules,
            channel,
            s: self,
            batch: VecDeque::new(),
            completions: Vec::new(),
            list: PageList::new(page_size),
            lengths: Vec::new(),
            done: Vec::new(),
            spare_payloads: Vec::new(),
            pending: HashMap::new(),
            sends: VecDeque::new(),
            next_tag: 0,
            round: ChannelRound::default(),
            round_no: 0,
            pairing: None,
            remembered: false,
            paused: false,
            cache_setup_seen: Duration::ZERO,
            broken: None,
        })
    }
}

pub(super) struct Worker {
    /// Declared first: dropped before the memory its sends may point into (held by
    /// `s`).
    channel: AnyChannel,
    pub(super) s: WorkerSetup,
    /// The session's rules for what this channel sends and the ACKs it receives.
    pub(super) rules: SourceChannel,
    batch: VecDeque<pagewire_accel::Job>,
    completions: Vec<Completion>,
    /// The page list and length table of the frames encoded at once
    /// (`Engine::encode_now`), kept across frames; the list is empty between them.
    list: PageList<'static>,
    lengths: Vec<u32>,
    done: Vec<Completed>,
    /// Payload vectors the transport handed back, emptied, for the next frames.
    spare_payloads: Vec<Vec<Payload>>,
    pending: HashMap<u64, FrameMeta>,
    sends: VecDeque<(pagewire_transport::SendId, Instant)>,
    next_tag: u64,
    round: ChannelRound,
    round_no: u32,
    /// Codec contexts and buffers for the adaptive choice's paired samples.
    pairing: Option<Box<pair::Pairing>>,
    /// Whether a frame kept pages in the delta cache under the adaptive choice: from
    /// then on raw frames forget theirs (before, the cache holds none of them).
    remembered: bool,
    /// The round being sent is a paused one.
    paused: bool,
    /// The delta cache's setup time as the last completion saw it.
    cache_setup_seen: Duration,
    /// A keepalive's failure, the answer to the next command.
    broken: Option<MigrationError>,
}

/// How long a channel waiting for its next command sleeps between looks at the
/// control (a cancel) and the time since it last sent (a keepalive).
const IDLE_SLICE: Duration = Duration::from_millis(100);

impl Worker {
    /// The delta cache when it may hold pages: under the adaptive choice, only once a
    /// frame kept some (zero and uniform pages, and copies, then forget theirs).
    pub(super) fn delta_cache(&self) -> Option<&DeltaCache> {
        self.s
            .delta
            .as_deref()
            .filter(|_| self.s.adaptive.is_none() || self.remembered)
    }

    /// The time the delta cache spent allocating memory so far (zero without one).
    pub(super) fn cache_setup_time(&self) -> Duration {
        self.s
            .delta
            .as_ref()
            .map_or(Duration::ZERO, |c| c.setup_time())
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Cmd>, tx: mpsc::Sender<Reply>) {
        let mut next = None;
        // Waiting for the VMM, the channel wakes every `IDLE_SLICE` to see a cancel
        // (and tell the destination at once), and sends a keepalive once it has been
        // quiet for `keepalive`.
        let mut quiet_since = Instant::now();
        loop {
            let cmd = match next.take() {
                Some(cmd) => cmd,
                None => match rx.recv_timeout(self.s.keepalive.min(IDLE_SLICE)) {
                    Ok(cmd) => cmd,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Not a cancel after the seal: COMMIT may be on its way on
                        // channel 0, and no channel sends ABORT after it.
                        if self.s.control.cancelled_unsealed() {
                            self.cancelled_while_idle();
                        } else if quiet_since.elapsed() >= self.s.keepalive {
                            self.keepalive();
                            quiet_since = Instant::now();
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
            };
            quiet_since = Instant::now();
            if !matches!(cmd, Cmd::Watch(_))
                && let Some(e) = self.broken.take()
            {
                let _ = tx.send(Reply::Failed(self.peer_reason(e)));
                return;
            }
            let res = match cmd {
                Cmd::Watch(watch) => {
                    next = self.watch(&watch, &rx);
                    continue;
                }
                Cmd::Round {
                    round,
                    paused,
                    dirty,
                } => {
                    self.paused = paused;
                    self.send_round(round, &dirty).map(Reply::Round)
                }
                Cmd::DeviceState {
                    name,
                    instance,
                    total,
                    offset,
                    data,
                } => self
                    .device_state(&name, instance, total, offset, &data)
                    .map(|()| Reply::Done),
                Cmd::Complete {
                    final_round,
                    sections,
                    watch,
                } => self.complete(final_round, sections, &watch),
                Cmd::Close => {
                    let r = self.close().map(|()| Reply::Done);
                    self.note_cpu();
                    let _ = tx.send(r.unwrap_or_else(Reply::Failed));
                    return;
                }
                Cmd::Abort { reason, message } => {
                    self.abort_with(reason, &message);
                    self.note_cpu();
                    let _ = tx.send(Reply::Done);
                    return;
                }
            };
            if let Ok(mut s) = self.s.engine_stats.lock() {
                *s = self.s.engine.stats();
            }
            self.note_cpu();
            match res {
                Ok(r) => {
                    if tx.send(r).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let e = self.peer_reason(e);
                    self.abort(&e);
                    let _ = tx.send(Reply::Failed(e));
                    return;
                }
            }
        }
    }

    /// A send that failed because the destination closed the connection: the
    /// destination usually said why first (an ABORT naming the rule or its VMM's
    /// refusal), so look for that ABORT among the bytes already received, briefly, and
    /// report it instead of the bare broken pipe.
    fn peer_reason(&mut self, e: MigrationError) -> MigrationError {
        use std::io::ErrorKind;
        let closed = matches!(
            &e,
            MigrationError::Channel {
                source: pagewire_transport::ChannelError::Io { source, .. },
                ..
            } if matches!(source.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
        );
        if !closed || set_recv_timeout(&mut self.channel, Some(Duration::from_millis(200))).is_err()
        {
            return e;
        }
        // Bounded: a few frames (ACKs may precede the ABORT), each within the timeout,
        // all within a second however slowly they arrive.
        set_recv_deadline(
            &mut self.channel,
            Some(Instant::now() + Duration::from_secs(1)),
        );
        let mut found = e;
        for _ in 0..16 {
            match self.channel.recv(None) {
                Ok(Some(Incoming::Frame(Frame::Abort(a)))) => {
                    found = MigrationError::PeerAborted {
                        channel: self.s.ch,
                        reason: a.reason,
                        message: a.message.to_owned(),
                    };
                    break;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        set_recv_deadline(&mut self.channel, None);
        found
    }

    /// A channel error; a send or receive timeout becomes [`MigrationError::Timeout`]
    /// naming the wait (a receive on the source only ever waits for an ACK).
    fn chan_err(&self, source: pagewire_transport::ChannelError) -> MigrationError {
        use pagewire_transport::ChannelError;
        let channel = Some(self.s.ch);
        match source {
            ChannelError::SendTimeout(after) => MigrationError::Timeout {
                channel,
                what: Wait::Send,
                after,
            },
            ChannelError::RecvTimeout(_) => MigrationError::Timeout {
                channel,
                what: Wait::Ack,
                after: self.s.ack_timeout,
            },
            // The control's interrupt: a cancel ended a blocked send.
            ChannelError::Interrupted => MigrationError::Cancelled,
            source => MigrationError::Channel {
                channel: self.s.ch,
                source,
            },
        }
    }

    /// Tells the destination why, best effort, unless the channel itself broke or
    /// stalled (an ABORT would wait behind the stalled bytes for another timeout).
    fn abort(&mut self, e: &MigrationError) {
        if matches!(
            e,
            MigrationError::Channel { .. }
                | MigrationError::PeerAborted { .. }
                | MigrationError::Timeout {
                    what: Wait::Send | Wait::Ack,
                    ..
                }
        ) {
            return;
        }
        self.abort_with(e.abort_reason(), &e.to_string());
    }

    /// Sends ABORT with `reason` and (the first 200 bytes of) `message`, best effort;
    /// never after COMMIT, when it could not take the guest back (PROTOCOL.md, COMMIT).
    fn abort_with(&mut self, reason: AbortReason, message: &str) {
        if self.rules.commit_sent().is_some() {
            return;
        }
        let mut end = message.len().min(200);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message[..end];
        if let Ok(f) = OutFrame::whole(&Frame::Abort(Abort { reason, message })) {
            let _ = self.channel.send(f);
            let _ = self.channel.flush(&mut self.done);
            self.done.clear();
        }
    }

    fn rule(&self, source: SessionError) -> MigrationError {
        MigrationError::Rule {
            channel: self.s.ch,
            source,
        }
    }

    fn send_round(
        &mut self,
        round: u32,
        dirty: &[(RegionId, DirtyBitmap)],
    ) -> Result<ChannelRound, MigrationError> {
        self.round = ChannelRound::default();
        self.round_no = round;
        let ps = u64::from(self.s.memory.page_size());
        let mut split = PageSplit::default();
        for (region, bitmap) in dirty {
            let plan = self
                .s
                .affinity
                .frames(*region, self.s.ch, bitmap, self.s.max_pages);
            for runs in plan {
                if self.s.control.is_cancelled() {
                    return Err(MigrationError::Cancelled);
                }
                split.clear();
                self.classify(*region, &runs, &mut split, ps)?;
                if let Some(cache) = self.delta_cache() {
                    let runs = split.runs_only().map(|r| (r.start.0, r.count));
                    run_keys(*region, runs).for_each(|k| cache.invalidate(k));
                }
                if let Some(d) = &self.s.dedup {
                    // Whatever the destination holds for these pages is about to change.
                    let mut t = d.table.lock();
                    for run in &runs {
                        for p in run.start.0..run.start.0 + u64::from(run.count) {
                            t.forget(*region, p);
                        }
                    }
                }
                if split.data.is_empty() {
                    self.send_zero(*region, &split)?;
                } else {
                    self.submit(*region, &split)?;
                }
            }
        }
        self.drain()?;
        // Before the rules take the round as ended: an ACK of it already here was sent
        // ahead.
        self.early_answers(Next::EndOfRound(round))?;
        // The rules count what this channel sent in the round.
        let eor = self
            .rules
            .end_round(Round(round))
            .map_err(|e| self.rule(e))?;
        debug_assert_eq!(
            (u64::from(eor.frames), eor.pages),
            (self.round.frames, self.round.pages.total())
        );
        if let (Some(sel), Ok(mut st)) = (&self.s.adaptive, self.s.adaptive_stats.lock()) {
            *st = sel.stats();
        }
        self.send_whole(&Frame::EndOfRound(eor))?;
        self.reap(true)?;
        self.await_ack(AckKind::ROUND, u64::from(round), None)?;
        Ok(std::mem::take(&mut self.round))
    }

    /// The control was cancelled while this channel waited for its next command (the
    /// VMM's thread may be busy in a callback): tell the destination now, before
    /// COMMIT only, and answer the next command with `Cancelled`.
    fn cancelled_while_idle(&mut self) {
        if self.rules.commit_sent().is_some() || self.broken.is_some() {
            return;
        }
        self.abort_with(AbortReason::CANCELLED, "cancelled by the source's VMM");
        self.broken = Some(MigrationError::Cancelled);
    }

    /// Sends an empty extension frame (type `0xFF`), which the destination skips, so
    /// that a channel waiting for the VMM does not idle out. A failure is the answer
    /// to the next command. Never after COMMIT (the source sends nothing more that
    /// matters, and may have closed), nor once broken.
    fn keepalive(&mut self) {
        if self.rules.commit_sent().is_some() || self.broken.is_some() {
            return;
        }
        let frame = Frame::Extension {
            frame_type: FrameType(0xFF),
            flags: 0,
            body: &[],
        };
        if let Err(e) = self.send_whole(&frame).and_then(|_| self.reap(false)) {
            self.broken = Some(e);
        }
    }

    /// Publishes this thread's CPU time since it began: opening its channel, the
    /// layout, watches and every command so far.
    pub(super) fn note_cpu(&self) {
        let ns = u64::try_from(pagewire_accel::thread_cpu_time().as_nanos()).unwrap_or(u64::MAX);
        self.s.counters.cpu_ns.store(ns, Ordering::Relaxed);
    }

    fn close(&mut self) -> Result<(), MigrationError> {
        self.channel
            .close(&mut self.done)
            .map_err(|e| self.chan_err(e))?;
        self.done.clear();
        Ok(())
    }
}

/// Sets how long the channel's next receive may wait.
fn set_recv_timeout(
    ch: &mut AnyChannel,
    timeout: Option<Duration>,
) -> Result<(), pagewire_transport::ChannelError> {
    match ch {
        AnyChannel::Tcp(c) | AnyChannel::Fallback(c, _) => c.set_recv_timeout(timeout),
        AnyChannel::Uring(c) => {
            c.set_recv_timeout(timeout);
            Ok(())
        }
        #[allow(unreachable_patterns)]
        _ => Ok(()),
    }
}

/// Gives the channel the interrupt that ends its blocked sends (RDMA: none).
fn set_interrupt(
    ch: &mut AnyChannel,
    interrupt: Option<pagewire_transport::Interrupt>,
) -> Result<(), pagewire_transport::ChannelError> {
    match ch {
        AnyChannel::Tcp(c) | AnyChannel::Fallback(c, _) => c.set_interrupt(interrupt),
        AnyChannel::Uring(c) => c.set_interrupt(interrupt),
        #[allow(unreachable_patterns)]
        _ => Ok(()),
    }
}

/// Sets when the channel's receives must have returned by (RDMA: checked between
/// messages, each wait for one bounded by the receive timeout set at setup).
fn set_recv_deadline(ch: &mut AnyChannel, deadline: Option<Instant>) {
    match ch {
        AnyChannel::Tcp(c) | AnyChannel::Fallback(c, _) => c.set_recv_deadline(deadline),
        AnyChannel::Uring(c) => c.set_recv_deadline(deadline),
        #[cfg(feature = "rdma")]
        AnyChannel::Rdma(c, _) => c.set_recv_deadline(deadline),
        // The transport's `rdma` feature may be on without this crate's.
        #[allow(unreachable_patterns)]
        _ => {}
    }
}

/// The delta cache key of a page: region id above page index.
fn page_key(region: RegionId, page: u64) -> PageKey {
    PageKey((u64::from(region.0) << 40) | page)
}

/// The delta cache keys of the pages of `runs` (first page, count) of `region`.
fn run_keys(
    region: RegionId,
    runs: impl IntoIterator<Item = (u64, u32)>,
) -> impl Iterator<Item = PageKey> {
    runs.into_iter().flat_map(move |(start, count)| {
        (start..start + u64::from(count)).map(move |p| page_key(region, p))
    })
}
