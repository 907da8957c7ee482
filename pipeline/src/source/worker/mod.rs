//! A source worker: one channel and its codec engine, on their own thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use pagewire_accel::{Completion, DeltaCache, EncodeParams, Engine, PageKey, PageList};
use pagewire_protocol::{
    Abort, AbortReason, AckKind, ChannelId, ChecksumId, DeviceState, Frame, FrameType, PageRun,
    RegionId, Round, SessionError, SourceChannel, SourceEvent, UniformRun,
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
use super::{ChannelRound, Cmd, Counters, Reply, SourceLatency, Watch};

mod copies;
mod engine;
mod pages;
mod pair;

/// The longest [`Worker::hold`] waits on the channel at a time.
const HOLD_WAIT: Duration = Duration::from_millis(5);
/// What a channel may hold unacknowledged while the adaptive choice does not know the
/// link yet ([`Worker::hold`]): about what a socket held before channels had a send
/// queue.
const BLIND_HOLD: u64 = 2 << 20;
/// What a channel may hold unacknowledged under the adaptive choice once it knows the
/// link ([`Worker::hold`]): 280 ms of a 1 Gbit/s link shared by two channels, 28 ms of
/// 10 Gbit/s. A migration alternates between stretches where the cores limit and
/// stretches where the link does (0.2-0.6 s on the two-copy test image), and what the
/// channel holds carries the link through the first while the cores ran ahead in the
/// second (the TCP send queue's reason to be). With 4 MiB (70 ms at 1 Gbit/s) the link
/// idled there: auto moved 2.5 % fewer pages than static zstd:1 with zstd:1 as its only
/// candidate, none fewer with 16 MiB, and with every candidate 1.03x the pages of 4
/// MiB (medians of 4 rounds, over TCP; 1.10x over io_uring, 3 rounds). The channels'
/// own queues hold more (io_uring 64 MiB, a second of that link; TCP 16 MiB and the
/// socket's 4): a choice would reach the wire that much later, and raw frames taken in
/// at memory speed on an incompressible stretch fill it (10 % of a migration's guest
/// bytes went raw over io_uring's 64 MiB).
const ADAPTIVE_HOLD: u64 = 16 << 20;

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

/// Most payload vectors a worker keeps for its next frames.
const SPARE_PAYLOADS: usize = 32;

/// How long [`Worker::early_answers`] reads what the destination sent ahead before it
/// gives up on the channel. A million 8-byte extension frames sent ahead of an ACK
/// COMMITTED (8 MB, more than loopback's socket buffers hold at once) took under a
/// tenth of that to read on this project's test machine (the whole migration 0.11 s).
const EARLY_BUDGET: Duration = Duration::from_millis(500);
/// How often a channel watched during the switchover ([`Worker::watch`]) looks for
/// input, and how long channel 0's waits for the switchover's ACKs go without looking
/// at what the watch found (each receive's deadline: a frame begun stays buffered).
const WATCH_POLL: Duration = Duration::from_millis(20);

/// The frame a worker is about to send that the destination must answer.
#[derive(Clone, Copy, Debug)]
enum Next {
    EndOfRound(u32),
    Complete,
    Commit,
}

impl Next {
    /// Whether an ACK of `kind` and `value` would answer this frame (or a later
    /// one): refused now, it was sent ahead of it.
    fn answered_by(self, kind: AckKind, value: u64) -> bool {
        match (self, kind) {
            (Next::EndOfRound(r), AckKind::ROUND) => value >= u64::from(r),
            (Next::EndOfRound(_) | Next::Complete, AckKind::COMPLETE) | (_, AckKind::COMMITTED) => {
                true
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Next::EndOfRound(r) => write!(f, "END_OF_ROUND {r}"),
            Next::Complete => f.write_str("COMPLETE"),
            Next::Commit => f.write_str("COMMIT"),
        }
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

    /// Sends a frame from its own bytes; returns its length on the wire.
    pub(super) fn send_whole(&mut self, frame: &Frame<'_>) -> Result<u64, MigrationError> {
        let out = OutFrame::whole(frame).map_err(|e| MigrationError::Protocol {
            channel: self.s.ch,
            what: e.to_string(),
        })?;
        self.send(out)
    }

    fn send(&mut self, out: OutFrame) -> Result<u64, MigrationError> {
        let len = out.wire_len() as u64;
        let t = Instant::now();
        // A cancelled migration stops waiting for the cap: this frame goes, and the
        // round ends at its next check of the cancellation.
        let control = &self.s.control;
        control.limiter().acquire(len, || control.is_cancelled());
        let id = self.channel.send(out).map_err(|e| self.chan_err(e))?;
        let now = Instant::now();
        self.sends.push_back((id, now));
        self.s.bytes_sent.fetch_add(len, Ordering::Relaxed);
        self.reap(false)?;
        let mut blocked = now - t;
        if let Some(sel) = &self.s.adaptive {
            let limit = if sel.link_known() {
                ADAPTIVE_HOLD
            } else {
                BLIND_HOLD
            };
            blocked += self.hold(limit)?;
        }
        if let Some(sel) = self.s.adaptive.as_mut() {
            // Time on the cap and in the channel: the link's share of the frame; and
            // what the channel still holds, for what really left it.
            let unacked = self.channel.unacked_bytes();
            let channel = &self.channel;
            sel.observe_send_unacked(
                len,
                blocked,
                unacked,
                || channel.peer_limited(),
                Instant::now(),
            );
        }
        Ok(len)
    }

    /// Under the adaptive choice, waits until the channel holds at most `limit` bytes
    /// (within the send timeout) and returns how long: [`BLIND_HOLD`] while the
    /// choice does not know the link yet (its first choice is made blind, raw, and a
    /// channel with a send queue would otherwise take megabytes of raw frames at once,
    /// each worth several compressed ones on a slow link), [`ADAPTIVE_HOLD`] after.
    /// The wait is the channel's: the selector counts it as time waiting on the link,
    /// which is how it finds a slow link early and a busy one later.
    ///
    /// It waits in the kernel where the channel can (`Channel::wait_sends`: room in
    /// the socket for the TCP send queue, an io_uring completion), 5 ms at most at a
    /// time: a channel held back by a slow receiver waits here most of the migration,
    /// and with 200 µs naps, about 34 µs of CPU each on this machine, two channels
    /// took 1.1-1.8 CPU-seconds over a 2 GiB migration where `send` blocking in the
    /// kernel took 0.3.
    ///
    /// While it waits the channel must drain a whole frame's bytes (the largest frame
    /// the session allows) every `send_timeout`: a destination that stops reading, or reads a
    /// byte at a time, fails the channel with [`MigrationError::Timeout`] (PROTOCOL.md,
    /// END_OF_ROUND: `send_timeout` without the destination taking a whole frame).
    /// (It used to give up waiting after `send_timeout` and send the next frame, so a
    /// destination that stopped reading held the source for `send_timeout` a frame.)
    fn hold(&mut self, limit: u64) -> Result<Duration, MigrationError> {
        let start = Instant::now();
        // A whole frame: the largest this channel may send (a small frame's bytes would
        // let a destination reading a few bytes a second pass).
        let frame = u64::from(self.channel.negotiated().max_frame_bytes);
        // When the channel last drained a frame's bytes, and what it held then.
        let mut progress: Option<(Instant, u64)> = None;
        while let Some(u) = self.channel.unacked_bytes().filter(|&u| u > limit) {
            // Before COMMIT, a cancel ends the wait (it is 5 ms at a time).
            if self.s.control.is_cancelled() && self.rules.commit_sent().is_none() {
                return Err(MigrationError::Cancelled);
            }
            let now = Instant::now();
            match progress {
                Some((_, low)) if u.saturating_add(frame) <= low => progress = Some((now, u)),
                Some((since, _)) if now.duration_since(since) >= self.s.send_timeout => {
                    return Err(MigrationError::Timeout {
                        channel: Some(self.s.ch),
                        what: Wait::Send,
                        after: self.s.send_timeout,
                    });
                }
                Some(_) => {}
                None => progress = Some((now, u)),
            }
            self.channel
                .wait_sends(HOLD_WAIT)
                .map_err(|e| self.chan_err(e))?;
            self.reap(false)?;
        }
        Ok(start.elapsed())
    }

    /// Collects finished sends: the engine's output buffers go back to its spare
    /// ones, others to their pools on drop.
    fn reap(&mut self, all: bool) -> Result<(), MigrationError> {
        let res = if all {
            self.channel.flush(&mut self.done)
        } else {
            self.channel.poll_completions(&mut self.done).map(|_| ())
        };
        res.map_err(|e| self.chan_err(e))?;
        let st = self.channel.stats();
        let counters = &self.s.counters;
        counters
            .registered
            .store(st.registered_bytes, Ordering::Relaxed);
        counters
            .tls_sealed
            .store(st.tls_bytes_sealed, Ordering::Relaxed);
        counters
            .tls_copied
            .store(st.tls_bytes_copied, Ordering::Relaxed);
        for mut c in self.done.drain(..) {
            self.s
                .counters
                .zc
                .fetch_add(u64::from(c.zero_copy.0), Ordering::Relaxed);
            self.s
                .counters
                .zc_copied
                .fetch_add(u64::from(c.zero_copy.1), Ordering::Relaxed);
            // Sends may complete out of order (a small frame copied at once, before a
            // zero-copy send's notification): each completion names exactly one send,
            // whose payload buffers come back with it.
            if let Some(i) = self.sends.iter().position(|&(id, _)| id == c.id)
                && let Some((_, at)) = self.sends.remove(i)
            {
                self.s.latency.send.record(at.elapsed());
            }
            // The engine's buffers go back to its spare ones, with no atomic
            // read-modify-write (dropped, they would go back to its pool, and out again,
            // through the pool's atomic operations).
            for p in &mut c.payload {
                if let Payload::Owned(o) = p
                    && let Some(pages::EngineBuf(buf)) = o.take::<pages::EngineBuf>()
                {
                    self.s.engine.recycle_buf(buf);
                }
            }
            // The vector carries the next frame's payload.
            if c.payload.capacity() > 0 && self.spare_payloads.len() < SPARE_PAYLOADS {
                c.payload.clear();
                self.spare_payloads.push(c.payload);
            }
        }
        Ok(())
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

    /// Waits for the ACK, within `ack_timeout` of the call in all: each receive gets
    /// only the time left, however many other frames arrive meanwhile, and a frame
    /// that arrives a byte at a time is cut off at the deadline too (at most one read
    /// timeout late).
    ///
    /// With a `watch`, the wait also ends as soon as another channel saw an ABORT
    /// ([`Worker::watch`]), with that error; for ACK COMMITTED, once what channel 0
    /// already holds is read (the answer may be there: it then counts).
    fn await_ack(
        &mut self,
        kind: AckKind,
        value: u64,
        watch: Option<&Watch>,
    ) -> Result<(), MigrationError> {
        let ch = self.s.ch;
        let timeout = self.s.ack_timeout;
        let deadline = pagewire_transport::deadline::from_now(timeout);
        set_recv_deadline(&mut self.channel, Some(deadline));
        let timed_out = MigrationError::Timeout {
            channel: Some(ch),
            what: Wait::Ack,
            after: timeout,
        };
        // Before COMMIT, `Control::cancel` ends the wait too (a slice at a time); after
        // it, cancelling could not take the guest back.
        let cancellable = kind != AckKind::COMMITTED;
        let result = loop {
            if cancellable && self.s.control.is_cancelled() {
                break Err(MigrationError::Cancelled);
            }
            if let Some(e) = watch.and_then(Watch::take) {
                let answered = kind == AckKind::COMMITTED
                    && matches!(self.answer_waiting(kind, value), Ok(true));
                break if answered { Ok(()) } else { Err(e) };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(timed_out);
            }
            // Watched or cancellable, the receive returns in time to look at the watch
            // and the cancellation, however its bytes trickle in; a frame begun stays
            // buffered for the next receive.
            let sliced = watch.is_some() || cancellable;
            let slice = if sliced {
                set_recv_deadline(
                    &mut self.channel,
                    Some(deadline.min(Instant::now() + WATCH_POLL)),
                );
                left.min(WATCH_POLL)
            } else {
                left
            };
            if let Err(e) = set_recv_timeout(&mut self.channel, Some(slice)) {
                break Err(self.chan_err(e));
            }
            match self.next_ack(kind, value) {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(MigrationError::Timeout {
                    what: Wait::Ack, ..
                }) if sliced && Instant::now() < deadline => {}
                Err(e) => break Err(e),
            }
        };
        // Back to the whole timeout for the next wait (best effort: the next one sets
        // its own).
        let _ = set_recv_timeout(&mut self.channel, Some(timeout));
        set_recv_deadline(&mut self.channel, None);
        result
    }

    /// Reads what the destination already sent, without waiting for more, before a
    /// frame it must answer (END_OF_ROUND, COMPLETE, COMMIT) is sent: an answer that is
    /// already here was sent before that frame, and the session's rules refuse it now,
    /// as an ACK that does not fit what was sent (`BadAck`). Without this a destination
    /// could queue ACK COMPLETE and ACK COMMITTED ahead and stop reading, and the
    /// source, reading them only once it waits, would report the guest committed to a
    /// destination that never took COMMIT. An answer that crosses the frame in flight
    /// cannot be told apart here (PROTOCOL.md, ACK). An ABORT or a close found here
    /// fails the channel at once.
    fn early_answers(&mut self, next: Next) -> Result<(), MigrationError> {
        if !self.has_input()? {
            return Ok(());
        }
        // A receive first sends what the channel's queue holds (TCP), which may take
        // longer than the budget on a slow link: send it now, outside the budget.
        self.reap(true)?;
        // A frame begun but not whole within a read timeout stays buffered for the next
        // wait (it had not arrived whole before the frame was sent).
        let until = Instant::now() + EARLY_BUDGET;
        set_recv_deadline(&mut self.channel, Some(until));
        if let Err(e) = set_recv_timeout(&mut self.channel, Some(Duration::from_millis(20))) {
            set_recv_deadline(&mut self.channel, None);
            return Err(self.chan_err(e));
        }
        let result = self.read_early(next, until);
        let _ = set_recv_timeout(&mut self.channel, Some(self.s.ack_timeout));
        set_recv_deadline(&mut self.channel, None);
        result
    }

    /// [`Worker::early_answers`]' reads, every frame waiting however many (extension
    /// frames and FRAMES ACKs are the destination's to send), until nothing waits.
    /// Frames still waiting after [`EARLY_BUDGET`] fail the channel: what a peer can
    /// have sent ahead is bounded by the sockets' buffers, read in well under that,
    /// so a destination still sending then keeps the source from checking what it
    /// sent, and an ACK could hide behind it.
    fn read_early(&mut self, next: Next, until: Instant) -> Result<(), MigrationError> {
        while Instant::now() < until {
            if !self.has_input()? {
                return Ok(());
            }
            match self.next_ack(AckKind::FRAMES, u64::MAX) {
                Ok(_) => {}
                // A frame not whole within the read timeout: it had not arrived. But
                // at the budget's end (the receive's deadline), frames still coming.
                Err(MigrationError::Timeout { .. }) if Instant::now() < until => return Ok(()),
                Err(MigrationError::Timeout { .. }) => break,
                Err(MigrationError::Rule {
                    channel,
                    source: SessionError::BadAck { kind, value },
                }) if next.answered_by(kind, value) => {
                    return Err(MigrationError::Protocol {
                        channel,
                        what: format!(
                            "the destination sent ACK {} {value} before this source sent {next} (an ACK answers a frame it received)",
                            format!("{kind:?}").to_uppercase()
                        ),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        if self.has_input()? {
            return Err(MigrationError::Protocol {
                channel: self.s.ch,
                what: format!(
                    "the destination kept sending frames unasked for {EARLY_BUDGET:?} before this source sent {next}"
                ),
            });
        }
        Ok(())
    }

    fn has_input(&mut self) -> Result<bool, MigrationError> {
        self.channel.has_input().map_err(|e| self.chan_err(e))
    }

    /// Receives one frame; `true` when it is the ACK waited for, `false` for a FRAMES
    /// ACK (progress reports, skipped).
    fn next_ack(&mut self, kind: AckKind, value: u64) -> Result<bool, MigrationError> {
        let ch = self.s.ch;
        let incoming = match self.channel.recv(None) {
            Ok(i) => i,
            Err(e) => {
                return Err(match e {
                    pagewire_transport::ChannelError::RecvTimeout(_) => MigrationError::Timeout {
                        channel: Some(ch),
                        what: Wait::Ack,
                        after: self.s.ack_timeout,
                    },
                    source => MigrationError::Channel {
                        channel: ch,
                        source,
                    },
                });
            }
        };
        match incoming {
            None => Err(MigrationError::Protocol {
                channel: ch,
                what: "the destination closed the channel".into(),
            }),
            Some(Incoming::Frame(Frame::Abort(a))) => Err(MigrationError::PeerAborted {
                channel: ch,
                reason: a.reason,
                message: a.message.to_owned(),
            }),
            // The session's rules check every ACK against what was sent and skip
            // extension frames (PROTOCOL.md).
            Some(Incoming::Frame(f)) => match self.rules.on_frame(&f) {
                Ok(SourceEvent::RoundApplied(r)) => {
                    Ok(kind == AckKind::ROUND && u64::from(r.0) == value)
                }
                Ok(SourceEvent::Complete(r)) => {
                    Ok(kind == AckKind::COMPLETE && u64::from(r.0) == value)
                }
                Ok(SourceEvent::Committed(r)) => {
                    Ok(kind == AckKind::COMMITTED && u64::from(r.0) == value)
                }
                Ok(_) => Ok(false),
                Err(source) => Err(MigrationError::Rule {
                    channel: ch,
                    source,
                }),
            },
            Some(Incoming::Placed(_)) => Err(MigrationError::Protocol {
                channel: ch,
                what: "the destination sent pages".into(),
            }),
        }
    }

    fn device_state(
        &mut self,
        name: &str,
        instance: u32,
        total: u64,
        start: u64,
        data: &[u8],
    ) -> Result<(), MigrationError> {
        let limit = self.channel.negotiated().max_frame_bytes as usize;
        let chunk = limit
            .saturating_sub(DEVICE_STATE_OVERHEAD + name.len())
            .max(1);
        let mut offset = 0usize;
        loop {
            let end = (offset + chunk).min(data.len());
            let f = Frame::DeviceState(DeviceState {
                instance,
                name,
                total,
                offset: start + offset as u64,
                data: &data[offset..end],
            });
            self.send_whole(&f)?;
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
        self.reap(true)
    }

    /// The switchover (PROTOCOL.md): COMPLETE, ACK COMPLETE, COMMIT, ACK COMMITTED. An
    /// error before a byte of COMMIT reached the channel is the migration's failure (the
    /// destination cannot run the guest; the source may resume it). From then on the
    /// destination may own the guest: ACK COMMITTED gives [`Reply::Done`], anything else
    /// [`Reply::Unknown`], and no ABORT is sent.
    ///
    /// An ABORT another channel reads meanwhile (`watch`) ends the wait for ACK
    /// COMPLETE as a failure, and the wait for ACK COMMITTED as [`Reply::Unknown`].
    fn complete(
        &mut self,
        final_round: u32,
        sections: u32,
        watch: &Watch,
    ) -> Result<Reply, MigrationError> {
        self.early_answers(Next::Complete)?;
        let c = self
            .rules
            .complete(Round(final_round), sections)
            .map_err(|e| self.rule(e))?;
        self.send_whole(&Frame::Complete(c))?;
        self.reap(true)?;
        self.await_ack(AckKind::COMPLETE, u64::from(final_round), Some(watch))?;
        self.early_answers(Next::Commit)?;
        if let Some(e) = watch.take() {
            return Err(e);
        }
        // A cancel that came first keeps COMMIT back; one that comes later no longer
        // interrupts this channel's sends.
        if !self.s.control.seal() {
            return Err(MigrationError::Cancelled);
        }
        let commit = self.rules.commit().map_err(|e| self.rule(e))?;
        let out =
            OutFrame::whole(&Frame::Commit(commit)).map_err(|e| MigrationError::Protocol {
                channel: self.s.ch,
                what: e.to_string(),
            })?;
        // The first byte of COMMIT may leave with this send: the outcome is unknown until
        // ACK COMMITTED arrives.
        let committed = self
            .send(out)
            .and_then(|_| self.reap(true))
            .and_then(|()| self.await_ack(AckKind::COMMITTED, u64::from(final_round), Some(watch)));
        Ok(match committed {
            Ok(()) => Reply::Done,
            Err(e) => Reply::Unknown(e),
        })
    }

    /// What channel 0 already holds, read without waiting for more (each frame whole
    /// within a short read timeout, all within [`EARLY_BUDGET`]): `true` when the ACK
    /// waited for is among it.
    fn answer_waiting(&mut self, kind: AckKind, value: u64) -> Result<bool, MigrationError> {
        let until = Instant::now() + EARLY_BUDGET;
        set_recv_deadline(&mut self.channel, Some(until));
        if let Err(e) = set_recv_timeout(&mut self.channel, Some(WATCH_POLL)) {
            return Err(self.chan_err(e));
        }
        while Instant::now() < until && self.has_input()? {
            match self.next_ack(kind, value) {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(MigrationError::Timeout { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Reads this channel, whose final round is acknowledged, while channel 0 hands
    /// the guest over, until the next command arrives (returned; `None` when the
    /// source is gone): an ABORT the destination sends here, or a frame the session's
    /// rules refuse, is recorded in `watch` for channel 0. A close or a failed
    /// connection ends the watch without a word: a destination may idle a channel out
    /// once its final round ended (PROTOCOL.md, ABORT).
    fn watch(&mut self, watch: &Watch, rx: &mpsc::Receiver<Cmd>) -> Option<Cmd> {
        loop {
            if watch.ended() {
                return rx.recv().ok();
            }
            if let Err(found) = self.watched_input(watch) {
                if let Some(e) = found {
                    watch.trip(e);
                }
                return rx.recv().ok();
            }
            match rx.recv_timeout(WATCH_POLL) {
                Ok(cmd) => return Some(cmd),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// [`Worker::watch`]'s reads: every frame waiting, each whole within a short read
    /// timeout, for at most [`EARLY_BUDGET`] or until the switchover ends (a frame
    /// begun stays buffered for the next look). `Err(Some(_))` for an ABORT or a
    /// refused frame, `Err(None)` when the channel ended.
    fn watched_input(&mut self, watch: &Watch) -> Result<(), Option<MigrationError>> {
        if !self.channel.has_input().map_err(|_| None)? {
            return Ok(());
        }
        let until = Instant::now() + EARLY_BUDGET;
        set_recv_deadline(&mut self.channel, Some(until));
        let result = match set_recv_timeout(&mut self.channel, Some(WATCH_POLL)) {
            Ok(()) => self.read_watched(until, watch),
            Err(_) => Err(None),
        };
        let _ = set_recv_timeout(&mut self.channel, Some(self.s.ack_timeout));
        set_recv_deadline(&mut self.channel, None);
        result
    }

    fn read_watched(
        &mut self,
        until: Instant,
        watch: &Watch,
    ) -> Result<(), Option<MigrationError>> {
        use pagewire_transport::ChannelError;
        let ch = self.s.ch;
        while Instant::now() < until
            && !watch.ended()
            && self.channel.has_input().map_err(|_| None)?
        {
            match self.channel.recv(None) {
                Ok(Some(Incoming::Frame(Frame::Abort(a)))) => {
                    return Err(Some(MigrationError::PeerAborted {
                        channel: ch,
                        reason: a.reason,
                        message: a.message.to_owned(),
                    }));
                }
                Ok(Some(Incoming::Frame(f))) => {
                    if let Err(source) = self.rules.on_frame(&f) {
                        return Err(Some(MigrationError::Rule {
                            channel: ch,
                            source,
                        }));
                    }
                }
                Ok(Some(Incoming::Placed(_))) => {
                    return Err(Some(MigrationError::Protocol {
                        channel: ch,
                        what: "the destination sent pages".into(),
                    }));
                }
                Err(ChannelError::RecvTimeout(_)) => return Ok(()),
                // Bytes that are no frame this document allows: refused, as on channel 0.
                Err(source) if crate::error::peer_fault(&source) => {
                    return Err(Some(MigrationError::Channel {
                        channel: ch,
                        source,
                    }));
                }
                Ok(None) | Err(_) => return Err(None),
            }
        }
        Ok(())
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

/// Room for a DEVICE_STATE header (envelope, instance, name length, total, offset).
const DEVICE_STATE_OVERHEAD: usize = 8 + 4 + 1 + 8 + 8;

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
