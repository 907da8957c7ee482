//! The source side: N channels, one worker thread each, sending the dirty pages of
//! each round through the codec engine.
//!
//! Each worker owns its channel and its codec engine. Per round it walks the dirty
//! pages its channel carries (page-to-channel affinity, see [`crate::plan`]), finds
//! zero pages, submits the rest to the engine in batches, sends each frame as its
//! completion arrives (compressed payloads straight from the engine's buffer pool, raw
//! pages straight from guest memory when no checksum is asked), marks the end of the
//! round and waits for the destination to acknowledge it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagewire_accel::{
    Completion, DeltaCache, DeltaConfig, EncodeParams, Engine, EngineConfig, Layout, Level,
    PageKey, PageSize, SoftwareConfig, Tag,
};
use pagewire_protocol::{
    Abort, AbortReason, AckKind, Capabilities, ChecksumId, CodecId, CodecSet, Complete,
    DeviceState, EndOfRound, Frame, PageFrame, PageIndex, PageRun, RegionId, Round, WireList,
};
use pagewire_transport::session::{self, AnyChannel, SessionConfig};
use pagewire_transport::{Channel, Completed, ForeignBuf, Incoming, OutFrame, Payload};

use crate::config::{Control, SourceConfig};
use crate::dirty::DirtyBitmap;
use crate::error::{Failed, MigrationError, Wait};
use crate::memory::GuestMemory;
use crate::plan::Affinity;
use crate::stats::{CodecStats, Latency, MigrationStats, PageCounts, RoundStats};

/// The engine's output buffer, carried to the transport without a copy.
#[derive(Debug)]
struct EngineBuf {
    buf: pagewire_accel::PoolBuf,
    len: usize,
}

// SAFETY: a pool buffer's bytes neither move nor change while any handle to it lives
// (the pool only hands a slot out again after the last handle is dropped, and shared
// handles never write), and `len` is at most the buffer's length.
unsafe impl ForeignBuf for EngineBuf {
    fn as_ptr(&self) -> *const u8 {
        self.buf.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// Live counters of one channel, summed by [`Source::stats`].
#[derive(Debug, Default)]
struct Counters {
    frames: AtomicU64,
    wire_bytes: AtomicU64,
    guest_bytes: AtomicU64,
    compressed: AtomicU64,
    zero: AtomicU64,
    delta: AtomicU64,
    raw: AtomicU64,
    zc: AtomicU64,
    zc_copied: AtomicU64,
}

impl Counters {
    fn pages(&self) -> PageCounts {
        PageCounts {
            compressed: self.compressed.load(Ordering::Relaxed),
            zero: self.zero.load(Ordering::Relaxed),
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
        dirty: Arc<Vec<(RegionId, DirtyBitmap)>>,
    },
    DeviceState {
        name: String,
        instance: u32,
        data: Arc<Vec<u8>>,
    },
    Complete {
        final_round: u32,
        sections: u32,
    },
    Close,
}

enum Reply {
    Ready(ChannelTransport),
    Round(ChannelRound),
    Done,
    Failed(MigrationError),
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
    next_round: u32,
    sections: u32,
    started: Instant,
    setup: Duration,
    transport: String,
    transports: Vec<ChannelTransport>,
    engine_stats: Vec<Arc<std::sync::Mutex<pagewire_accel::EngineStats>>>,
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
    /// Connects `config.channels` channels to the destination at `addr`, runs the
    /// handshake on each, and sends the memory layout on every channel.
    ///
    /// # Errors
    /// [`MigrationError::Session`] when a channel cannot be opened or its handshake
    /// fails; `Config` for an unusable configuration.
    pub fn connect(
        addr: SocketAddr,
        memory: Arc<GuestMemory>,
        config: SourceConfig,
    ) -> Result<Source, MigrationError> {
        let started = Instant::now();
        config.validate()?;
        let page_size = memory.page_size();
        let mut caps = Capabilities::new(page_size);
        caps.max_pages = config.max_pages;
        caps.max_frame_bytes = frame_bytes(page_size, config.max_pages);
        // Delta truncated at a record boundary is undetectable without a checksum
        // (PROTOCOL.md), so delta always asks for one.
        caps.checksum = config.checksum || config.codec == CodecId::DELTA;
        caps.codecs = CodecSet::all_known();
        let mut scfg =
            SessionConfig::new(caps, config.session, config.channels, config.auth.clone());
        scfg.tcp.recv_timeout = Some(config.ack_timeout);
        scfg.tcp.send_timeout = config.send_timeout;
        scfg.tcp.connect_timeout = config.connect_timeout;
        scfg.tcp.connect_attempts = config.connect_attempts;
        scfg.tcp.retry_delay = config.connect_retry_delay;
        scfg.uring.recv_timeout = Some(config.ack_timeout);
        scfg.uring.send_timeout = config.send_timeout;
        scfg.handshake_timeout = config.handshake_timeout;
        let views = transport_views(&memory);
        scfg.uring.guest = views.iter().map(|(_, v)| v.clone()).collect();
        let established = session::connect(addr, &scfg).map_err(|e| session_error(e, &config))?;
        let control = Control::new(config.bandwidth_limit, config.precopy.downtime_limit);
        let affinity = Affinity {
            channels: config.channels,
            chunk_pages: config.max_pages,
        };
        let latency = Arc::new(SourceLatency::default());
        let mut workers = Vec::new();
        let mut engine_stats = Vec::new();
        let mut transport = String::new();
        let mut transports = Vec::new();
        for est in established {
            let ch = est.negotiated.channel.0;
            let negotiated = est.negotiated;
            if !negotiated.codecs.contains(config.codec) {
                return Err(MigrationError::Config(format!(
                    "the destination cannot decode {:?}",
                    config.codec
                )));
            }
            let delta = if config.codec == CodecId::DELTA {
                let ps = PageSize::new(page_size)
                    .ok_or_else(|| MigrationError::Config("page size".into()))?;
                Some(Arc::new(
                    DeltaCache::new(DeltaConfig::new(ps, config.delta_cache_pages))
                        .map_err(|e| MigrationError::Config(e.to_string()))?,
                ))
            } else {
                None
            };
            let engine = Engine::software(
                EngineConfig {
                    page_size: PageSize::new(page_size)
                        .ok_or_else(|| MigrationError::Config("page size".into()))?,
                    max_pages: negotiated.max_pages as usize,
                    requests: config.queue_depth,
                    buffers: config.queue_depth * 2,
                    delta: delta.clone(),
                },
                SoftwareConfig {
                    threads: config.codec_threads,
                    queue_depth: config.queue_depth,
                },
            )?;
            let counters = Arc::new(Counters::default());
            let bytes_sent = Arc::new(AtomicU64::new(0));
            let estats = Arc::new(std::sync::Mutex::new(engine.stats()));
            engine_stats.push(estats.clone());
            let setup = WorkerSetup {
                ch,
                engine,
                delta,
                views: views.clone(),
                memory: memory.clone(),
                affinity,
                params: EncodeParams {
                    codec: config.codec,
                    level: pagewire_accel::level_range(config.codec)
                        .map_or(Level(0), |(min, max)| {
                            Level(config.level.clamp(min.0, max.0))
                        }),
                    raw_in_place: negotiated.checksum.is_none(),
                },
                checksum: negotiated.checksum,
                max_pages: negotiated.max_pages,
                control: control.clone(),
                latency: latency.clone(),
                counters: counters.clone(),
                bytes_sent: bytes_sent.clone(),
                engine_stats: estats,
                send_timeout: config.send_timeout,
                ack_timeout: config.ack_timeout,
            };
            let (tx, rx_cmd) = mpsc::channel();
            let (tx_reply, rx) = mpsc::channel();
            let backend = config.backend;
            let scfg2 = scfg.clone();
            // The channel is opened on its worker thread: an io_uring ring set up with
            // SINGLE_ISSUER accepts submissions only from the thread that created it.
            let thread = std::thread::Builder::new()
                .name(format!("pagewire-src-{ch}"))
                .spawn(move || {
                    let channel = match est.open(&backend, &scfg2) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = tx_reply.send(Reply::Failed(e.into()));
                            return;
                        }
                    };
                    let name = ChannelTransport::of(&channel);
                    let mut w = setup.into_worker(channel);
                    // LAYOUT first on every channel.
                    let memory = w.s.memory.clone();
                    let layout = Frame::Layout(memory.layout().frame());
                    match w.send_whole(&layout) {
                        Ok(()) => {
                            if tx_reply.send(Reply::Ready(name)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx_reply.send(Reply::Failed(e));
                            return;
                        }
                    }
                    w.run(rx_cmd, tx_reply);
                })
                .map_err(|_| MigrationError::Worker(ch))?;
            match rx.recv() {
                Ok(Reply::Ready(kind)) => {
                    if transport.is_empty() {
                        transport = kind.to_string();
                    }
                    transports.push(kind);
                }
                Ok(Reply::Failed(e)) => {
                    let _ = thread.join();
                    return Err(e);
                }
                _ => {
                    let _ = thread.join();
                    return Err(MigrationError::Worker(ch));
                }
            }
            workers.push(WorkerHandle {
                tx,
                rx,
                thread: Some(thread),
                counters,
                bytes_sent,
            });
        }
        Ok(Source {
            workers,
            memory,
            affinity,
            control,
            latency,
            rounds: Vec::new(),
            next_round: 0,
            sections: 0,
            started,
            setup: started.elapsed(),
            transport,
            transports,
            engine_stats,
            config,
        })
    }

    /// The transport each channel runs on, in channel order: a VMM (or a test) that
    /// asked for io_uring sees here whether it got it.
    pub fn channel_transports(&self) -> &[ChannelTransport] {
        &self.transports
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
    pub fn send_round(
        &mut self,
        dirty: Vec<(RegionId, DirtyBitmap)>,
        paused: bool,
    ) -> Result<RoundStats, Failed> {
        let started = Instant::now();
        let round = self.next_round;
        let dirty_pages: u64 = dirty.iter().map(|(_, b)| b.count()).sum();
        let dirty = Arc::new(dirty);
        let replies = self.broadcast(|| Cmd::Round {
            round,
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
        self.rounds.push(stats.clone());
        Ok(stats)
    }

    /// Records the dirty rate measured for the last round (pages/s), for statistics.
    pub fn note_dirty_rate(&mut self, pages_per_s: f64) {
        if let Some(r) = self.rounds.last_mut() {
            r.dirty_rate_pages_per_s = pages_per_s;
        }
    }

    /// Sends one device-state section (chunked) on channel 0.
    ///
    /// # Errors
    /// [`Failed`] when channel 0 fails.
    pub fn send_device_state(
        &mut self,
        name: &str,
        instance: u32,
        data: Vec<u8>,
    ) -> Result<(), Failed> {
        if name.is_empty() || name.len() > 255 {
            return Err(Failed::bare(MigrationError::Config(
                "a device-state name is 1..=255 bytes".into(),
            )));
        }
        self.sections += 1;
        let data = Arc::new(data);
        self.one(
            0,
            Cmd::DeviceState {
                name: name.to_owned(),
                instance,
                data,
            },
        )
    }

    /// Sends COMPLETE and waits until the destination confirms that everything is
    /// applied, then closes every channel.
    ///
    /// # Errors
    /// [`Failed`] when the destination does not confirm.
    pub fn complete(&mut self) -> Result<(), Failed> {
        let final_round = self
            .next_round
            .checked_sub(1)
            .ok_or_else(|| Failed::bare(MigrationError::Config("no round was sent".into())))?;
        self.one(
            0,
            Cmd::Complete {
                final_round,
                sections: self.sections,
            },
        )?;
        for r in self.broadcast(|| Cmd::Close) {
            r.map_err(Failed::bare)?;
        }
        Ok(())
    }

    fn one(&mut self, ch: usize, cmd: Cmd) -> Result<(), Failed> {
        let w = &self.workers[ch];
        if w.tx.send(cmd).is_err() {
            return Err(Failed::bare(MigrationError::Worker(ch as u16)));
        }
        match w.rx.recv() {
            Ok(Reply::Done) => Ok(()),
            Ok(Reply::Failed(e)) => Err(Failed::bare(e)),
            _ => Err(Failed::bare(MigrationError::Worker(ch as u16))),
        }
    }

    fn broadcast(&mut self, mut cmd: impl FnMut() -> Cmd) -> Vec<Result<Reply, MigrationError>> {
        let sent: Vec<bool> = self
            .workers
            .iter()
            .map(|w| w.tx.send(cmd()).is_ok())
            .collect();
        self.workers
            .iter()
            .zip(sent)
            .enumerate()
            .map(|(ch, (w, ok))| {
                if !ok {
                    return Err(MigrationError::Worker(ch as u16));
                }
                match w.rx.recv() {
                    Ok(Reply::Failed(e)) => Err(e),
                    Ok(r) => Ok(r),
                    Err(_) => Err(MigrationError::Worker(ch as u16)),
                }
            })
            .collect()
    }

    /// A snapshot of the statistics so far (totals are live; rounds appear as they end).
    pub fn stats(&self) -> MigrationStats {
        let mut s = MigrationStats {
            status: "active".into(),
            transport: self.transport.clone(),
            channels: self.config.channels,
            codec: format!("{:?}", self.config.codec),
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            setup_ms: self.setup.as_secs_f64() * 1e3,
            rounds: self.rounds.len() as u32,
            per_round: self.rounds.clone(),
            ..Default::default()
        };
        for w in &self.workers {
            let c = &w.counters;
            s.pages.add(&c.pages());
            s.wire_bytes += c.wire_bytes.load(Ordering::Relaxed);
            s.guest_bytes += c.guest_bytes.load(Ordering::Relaxed);
            s.zero_copy.zero_copy += c.zc.load(Ordering::Relaxed);
            s.zero_copy.copied += c.zc_copied.load(Ordering::Relaxed);
            s.channel_bytes.push(w.bytes_sent.load(Ordering::Relaxed));
        }
        s.compression_ratio = if s.wire_bytes > 0 {
            s.guest_bytes as f64 / s.wire_bytes as f64
        } else {
            0.0
        };
        let secs = s.total_ms / 1e3;
        if secs > 0.0 {
            s.mbit_per_s = s.wire_bytes as f64 * 8.0 / secs / 1e6;
            s.pages_per_s = s.pages.total() as f64 / secs;
        }
        if let Some(r) = self.rounds.iter().rev().find(|r| !r.paused) {
            s.dirty_rate_pages_per_s = r.dirty_rate_pages_per_s;
        }
        // Engine: per codec, busy rate and queue depth, summed over channels.
        let mut codecs: HashMap<CodecId, CodecStats> = HashMap::new();
        let mut busy = 0.0;
        let mut depth = 0.0;
        for e in &self.engine_stats {
            let Ok(e) = e.lock() else { continue };
            busy += e.busy_rate();
            depth += e.mean_queue_depth;
            s.engine.max_queue_depth = s.engine.max_queue_depth.max(e.max_queue_depth as u64);
            for c in &e.encode {
                if c.jobs == 0 {
                    continue;
                }
                let entry = codecs.entry(c.codec).or_insert_with(|| CodecStats {
                    codec: format!("{:?}", c.codec),
                    ..Default::default()
                });
                entry.frames += c.jobs;
                entry.pages += c.pages;
                entry.guest_bytes += c.bytes_in;
                entry.payload_bytes += c.bytes_out;
            }
        }
        let n = self.engine_stats.len().max(1) as f64;
        s.engine.busy_rate = busy / n;
        s.engine.mean_queue_depth = depth / n;
        s.codecs = codecs.into_values().collect();
        s.codecs.sort_by(|a, b| a.codec.cmp(&b.codec));
        s.encode_latency = self.latency.encode.summary();
        s.send_latency = self.latency.send.summary();
        s
    }
}

impl Drop for Source {
    fn drop(&mut self) {
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
            Self::Other => f.write_str("other"),
        }
    }
}

/// A session error, or [`MigrationError::Timeout`] when a connect or handshake wait
/// ran out.
fn session_error(e: session::SessionError, config: &SourceConfig) -> MigrationError {
    use pagewire_transport::tcp::TcpError;
    use session::SessionError;
    let timed_out = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        )
    };
    match &e {
        SessionError::HandshakeIo { source, .. } if timed_out(source) => MigrationError::Timeout {
            channel: None,
            what: Wait::Handshake,
            after: config.handshake_timeout,
        },
        SessionError::Tcp(TcpError::Connect {
            source, attempts, ..
        }) if timed_out(source) => MigrationError::Timeout {
            channel: None,
            what: Wait::Connect,
            after: config.connect_timeout * *attempts
                + config.connect_retry_delay * attempts.saturating_sub(1),
        },
        _ => MigrationError::Session(e),
    }
}

/// The frame limit that fits `max_pages` raw pages with their headers.
pub(crate) fn frame_bytes(page_size: u32, max_pages: u32) -> u32 {
    let pages = u64::from(page_size) * u64::from(max_pages);
    // Envelope, header, one run per page at worst, a length per page, CRC.
    let overhead = 64 + 16 * u64::from(max_pages);
    (pages + overhead).clamp(
        u64::from(pagewire_protocol::limits::min_frame_bytes(page_size)),
        u64::from(pagewire_protocol::limits::MAX_FRAME_BYTES),
    ) as u32
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

struct FrameMeta {
    region: RegionId,
    data_runs: Vec<PageRun>,
    zero_runs: Vec<PageRun>,
    submitted: Instant,
}

/// Everything a worker needs but its channel, which it opens on its own thread.
struct WorkerSetup {
    ch: u16,
    engine: Engine,
    /// The delta cache, when the codec is delta: pages sent another way are evicted,
    /// so the next delta is never computed against content the destination lacks.
    delta: Option<Arc<DeltaCache>>,
    views: Vec<(RegionId, pagewire_transport::GuestMemory)>,
    memory: Arc<GuestMemory>,
    affinity: Affinity,
    params: EncodeParams,
    checksum: Option<ChecksumId>,
    max_pages: u32,
    control: Control,
    latency: Arc<SourceLatency>,
    counters: Arc<Counters>,
    bytes_sent: Arc<AtomicU64>,
    engine_stats: Arc<std::sync::Mutex<pagewire_accel::EngineStats>>,
    send_timeout: Duration,
    ack_timeout: Duration,
}

impl WorkerSetup {
    fn into_worker(self, channel: AnyChannel) -> Worker {
        Worker {
            channel,
            s: self,
            batch: VecDeque::new(),
            completions: Vec::new(),
            done: Vec::new(),
            pending: HashMap::new(),
            sends: VecDeque::new(),
            next_tag: 0,
            round: ChannelRound::default(),
            round_no: 0,
        }
    }
}

struct Worker {
    /// Declared first: dropped before the memory its sends may point into (held by
    /// `s`).
    channel: AnyChannel,
    s: WorkerSetup,
    batch: VecDeque<pagewire_accel::Job>,
    completions: Vec<Completion>,
    done: Vec<Completed>,
    pending: HashMap<u64, FrameMeta>,
    sends: VecDeque<(pagewire_transport::SendId, Instant)>,
    next_tag: u64,
    round: ChannelRound,
    round_no: u32,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Cmd>, tx: mpsc::Sender<Reply>) {
        while let Ok(cmd) = rx.recv() {
            let res = match cmd {
                Cmd::Round { round, dirty } => self.send_round(round, &dirty).map(Reply::Round),
                Cmd::DeviceState {
                    name,
                    instance,
                    data,
                } => self
                    .device_state(&name, instance, &data)
                    .map(|()| Reply::Done),
                Cmd::Complete {
                    final_round,
                    sections,
                } => self.complete(final_round, sections).map(|()| Reply::Done),
                Cmd::Close => {
                    let r = self.close().map(|()| Reply::Done);
                    let _ = tx.send(r.unwrap_or_else(Reply::Failed));
                    return;
                }
            };
            if let Ok(mut s) = self.s.engine_stats.lock() {
                *s = self.s.engine.stats();
            }
            match res {
                Ok(r) => {
                    if tx.send(r).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    self.abort(&e);
                    let _ = tx.send(Reply::Failed(e));
                    return;
                }
            }
        }
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
                | MigrationError::Timeout {
                    what: Wait::Send | Wait::Ack,
                    ..
                }
        ) {
            return;
        }
        let reason = match e {
            MigrationError::Cancelled => AbortReason::CANCELLED,
            _ => AbortReason::INTERNAL,
        };
        let message = e.to_string();
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

    fn send_whole(&mut self, frame: &Frame<'_>) -> Result<(), MigrationError> {
        let out = OutFrame::whole(frame).map_err(|e| MigrationError::Protocol {
            channel: self.s.ch,
            what: e.to_string(),
        })?;
        self.send(out)?;
        Ok(())
    }

    fn send(&mut self, out: OutFrame) -> Result<u64, MigrationError> {
        let len = out.wire_len() as u64;
        self.s.control.limiter().acquire(len);
        let id = self.channel.send(out).map_err(|e| self.chan_err(e))?;
        self.sends.push_back((id, Instant::now()));
        self.s.bytes_sent.fetch_add(len, Ordering::Relaxed);
        self.reap(false)?;
        Ok(len)
    }

    /// Collects finished sends (their buffers go back to their pools on drop).
    fn reap(&mut self, all: bool) -> Result<(), MigrationError> {
        let res = if all {
            self.channel.flush(&mut self.done)
        } else {
            self.channel.poll_completions(&mut self.done).map(|_| ())
        };
        res.map_err(|e| self.chan_err(e))?;
        for c in self.done.drain(..) {
            self.s
                .counters
                .zc
                .fetch_add(u64::from(c.zero_copy.0), Ordering::Relaxed);
            self.s
                .counters
                .zc_copied
                .fetch_add(u64::from(c.zero_copy.1), Ordering::Relaxed);
            while let Some(&(id, at)) = self.sends.front() {
                if id > c.id {
                    break;
                }
                self.sends.pop_front();
                if id == c.id {
                    self.s.latency.send.record(at.elapsed());
                }
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
        let mut data: Vec<PageRun> = Vec::new();
        let mut zero: Vec<PageRun> = Vec::new();
        for (region, bitmap) in dirty {
            let plan = self
                .s
                .affinity
                .frames(*region, self.s.ch, bitmap, self.s.max_pages);
            for runs in plan {
                if self.s.control.is_cancelled() {
                    return Err(MigrationError::Cancelled);
                }
                data.clear();
                zero.clear();
                self.classify(*region, &runs, &mut data, &mut zero, ps)?;
                if let Some(cache) = &self.s.delta {
                    for run in &zero {
                        for p in run.start.0..run.start.0 + u64::from(run.count) {
                            cache.invalidate(page_key(*region, p));
                        }
                    }
                }
                if data.is_empty() {
                    self.send_zero(*region, &zero)?;
                } else {
                    self.submit(*region, &data, &zero)?;
                }
            }
        }
        self.drain()?;
        let eor = Frame::EndOfRound(EndOfRound {
            round: Round(round),
            frames: self.round.frames as u32,
            pages: self.round.pages.total(),
        });
        self.send_whole(&eor)?;
        self.reap(true)?;
        self.await_ack(AckKind::ROUND, u64::from(round))?;
        Ok(std::mem::take(&mut self.round))
    }

    /// Splits a frame's pages into data and zero runs (canonical: merged, ascending).
    fn classify(
        &self,
        region: RegionId,
        runs: &[PageRun],
        data: &mut Vec<PageRun>,
        zero: &mut Vec<PageRun>,
        ps: u64,
    ) -> Result<(), MigrationError> {
        for run in runs {
            for p in run.start.0..run.start.0 + u64::from(run.count) {
                let ptr =
                    self.s
                        .memory
                        .page_ptr(region, p)
                        .ok_or_else(|| MigrationError::Protocol {
                            channel: self.s.ch,
                            what: format!("page {p} outside region {region:?}"),
                        })?;
                // SAFETY: `page_ptr` returned a pointer to a whole page inside a mapped
                // region; the scan only reads it (a concurrent guest write makes the
                // answer stale, and also re-dirties the page).
                let is_zero = unsafe { pagewire_accel::is_zero_raw(ptr.as_ptr(), ps as usize) };
                let list = if is_zero { &mut *zero } else { &mut *data };
                match list.last_mut() {
                    Some(last) if last.start.0 + u64::from(last.count) == p => last.count += 1,
                    _ => list.push(PageRun {
                        start: PageIndex(p),
                        count: 1,
                    }),
                }
            }
        }
        Ok(())
    }

    fn send_zero(&mut self, region: RegionId, zero: &[PageRun]) -> Result<(), MigrationError> {
        let pages: u64 = zero.iter().map(|r| u64::from(r.count)).sum();
        let frame = Frame::Pages(PageFrame {
            codec: CodecId::ZERO,
            region,
            round: Round(self.round_no),
            data_runs: WireList::Slice(&[]),
            zero_runs: WireList::Slice(zero),
            lengths: None,
            crc: self.s.checksum.map(|_| crc32c::crc32c(&[])),
            payload: &[],
        });
        self.send_whole(&frame)?;
        self.account(CodecId::ZERO, 0, pages, 0, frame_len(&frame));
        Ok(())
    }

    fn submit(
        &mut self,
        region: RegionId,
        data: &[PageRun],
        zero: &[PageRun],
    ) -> Result<(), MigrationError> {
        let mut progress = Instant::now();
        let mut job = loop {
            if let Some(j) = self.s.engine.job() {
                break j;
            }
            self.wait_engine(&mut progress)?;
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        let list = job.encode(Tag(tag), self.s.params);
        for run in data {
            let (ptr, _) = self
                .s
                .memory
                .span(region, run.start.0, u64::from(run.count))
                .ok_or_else(|| MigrationError::Protocol {
                    channel: self.s.ch,
                    what: format!("run {run:?} outside region {region:?}"),
                })?;
            let key = page_key(region, run.start.0);
            // SAFETY: the run lies inside a region of `self.s.memory`, which this worker
            // keeps alive (an `Arc`) beyond the job's completion; guest writes meanwhile
            // only make the encoded content stale (the page is dirty again).
            unsafe { list.push_raw(ptr.as_ptr(), run.count, key) }.map_err(|e| {
                MigrationError::Protocol {
                    channel: self.s.ch,
                    what: e.to_string(),
                }
            })?;
        }
        self.pending.insert(
            tag,
            FrameMeta {
                region,
                data_runs: data.to_vec(),
                zero_runs: zero.to_vec(),
                submitted: Instant::now(),
            },
        );
        self.batch.push_back(job);
        loop {
            self.s.engine.submit(&mut self.batch)?;
            if self.batch.is_empty() {
                break;
            }
            self.wait_engine(&mut progress)?;
        }
        // Send whatever is ready without waiting.
        self.drain_some(None).map(drop)
    }

    /// Sends the engine's finished jobs, waiting up to `wait` for the first; returns
    /// how many.
    fn drain_some(&mut self, wait: Option<Duration>) -> Result<usize, MigrationError> {
        let mut comps = std::mem::take(&mut self.completions);
        let res = (|| {
            let n = self.s.engine.poll(&mut comps, 64, wait)?;
            for c in comps.drain(..) {
                self.send_completion(c)?;
            }
            Ok(n)
        })();
        comps.clear();
        self.completions = comps;
        res
    }

    /// Waits for what frees an engine request or output buffer: a finished job (sent
    /// at once) or a finished send (whose payload buffer goes back to the engine's
    /// pool). Buffers held by sends come back only through the channel's completions,
    /// so those are reaped here too, and waited for when nothing else can happen
    /// (io_uring completes sends only when asked). `progress` is when something last
    /// came back; with nothing for `send_timeout` since, fails with
    /// [`MigrationError::Timeout`].
    fn wait_engine(&mut self, progress: &mut Instant) -> Result<(), MigrationError> {
        let timeout = self.s.send_timeout;
        let left = timeout.saturating_sub(progress.elapsed());
        if left.is_zero() {
            return Err(MigrationError::Timeout {
                channel: Some(self.s.ch),
                what: if self.s.engine.in_flight() > 0 {
                    Wait::Engine
                } else {
                    Wait::Send
                },
                after: timeout,
            });
        }
        let sends = self.sends.len();
        let mut got = if self.s.engine.in_flight() > 0 {
            self.drain_some(Some(left.min(Duration::from_millis(50))))?
        } else {
            0
        };
        if self.s.engine.in_flight() == 0 && got == 0 && !self.sends.is_empty() {
            // Every buffer not in the pool is with the channel: wait for its sends
            // (bounded by the channel's send timeout, which is `send_timeout`).
            self.reap(true)?;
        } else {
            self.reap(false)?;
        }
        got += sends.saturating_sub(self.sends.len());
        if got > 0 {
            *progress = Instant::now();
        } else if self.s.engine.in_flight() == 0 && self.sends.is_empty() {
            // Nothing is out, yet nothing is free: the engine lost track of a buffer.
            return Err(MigrationError::Protocol {
                channel: self.s.ch,
                what: format!(
                    "the codec engine has no free request or buffer and nothing in flight ({:?})",
                    self.s.engine
                ),
            });
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), MigrationError> {
        let mut progress = Instant::now();
        while !self.batch.is_empty() || self.s.engine.in_flight() > 0 {
            if !self.batch.is_empty() {
                self.s.engine.submit(&mut self.batch)?;
            }
            self.wait_engine(&mut progress)?;
        }
        Ok(())
    }

    fn send_completion(&mut self, mut c: Completion) -> Result<(), MigrationError> {
        let meta = self
            .pending
            .remove(&c.tag().0)
            .ok_or_else(|| MigrationError::Protocol {
                channel: self.s.ch,
                what: "completion for an unknown job".into(),
            })?;
        c.status().map_err(|source| MigrationError::Codec {
            channel: self.s.ch,
            source,
        })?;
        let out = c.encoded().ok_or_else(|| MigrationError::Protocol {
            channel: self.s.ch,
            what: "encode job without an outcome".into(),
        })?;
        self.s.latency.encode.record(meta.submitted.elapsed());
        let per_page = pagewire_accel::layout(out.codec) == Some(Layout::PerPage);
        let lengths: Vec<u32> = if per_page {
            c.lengths().to_vec()
        } else {
            Vec::new()
        };
        let payload: Vec<Payload> = if out.in_place {
            let view = self
                .s
                .views
                .iter()
                .find(|(id, _)| *id == meta.region)
                .map(|(_, v)| v.clone())
                .ok_or(MigrationError::Worker(self.s.ch))?;
            let ps = self.s.memory.page_size() as usize;
            meta.data_runs
                .iter()
                .map(|r| {
                    view.slice(r.start.0 as usize * ps, r.count as usize * ps)
                        .map(Payload::Guest)
                        .ok_or(MigrationError::Worker(self.s.ch))
                })
                .collect::<Result<_, _>>()?
        } else {
            let buf = c.take_payload().ok_or_else(|| MigrationError::Protocol {
                channel: self.s.ch,
                what: "encode job without a payload buffer".into(),
            })?;
            if buf.len() != out.payload_len {
                return Err(MigrationError::Protocol {
                    channel: self.s.ch,
                    what: "payload buffer length differs from the encode outcome".into(),
                });
            }
            vec![Payload::Foreign(Box::new(EngineBuf {
                len: out.payload_len,
                buf,
            }))]
        };
        drop(c);
        let crc = match self.s.checksum {
            Some(_) => {
                let mut crc = 0u32;
                for p in &payload {
                    if let Payload::Foreign(f) = p {
                        // SAFETY: the engine buffer is readable for `len()` bytes and
                        // does not change while it is held (see `EngineBuf`).
                        let bytes = unsafe { std::slice::from_raw_parts(f.as_ptr(), f.len()) };
                        crc = crc32c::crc32c_append(crc, bytes);
                    }
                }
                Some(crc)
            }
            None => None,
        };
        let frame = PageFrame {
            codec: out.codec,
            region: meta.region,
            round: Round(self.round_no),
            data_runs: WireList::Slice(&meta.data_runs),
            zero_runs: WireList::Slice(&meta.zero_runs),
            lengths: per_page.then_some(WireList::Slice(&lengths)),
            crc,
            payload: &[],
        };
        let outf = OutFrame::pages(&frame, payload).map_err(|e| MigrationError::Protocol {
            channel: self.s.ch,
            what: e.to_string(),
        })?;
        let data_pages: u64 = meta.data_runs.iter().map(|r| u64::from(r.count)).sum();
        let zero_pages: u64 = meta.zero_runs.iter().map(|r| u64::from(r.count)).sum();
        let wire = self.send(outf)?;
        self.account(
            out.codec,
            data_pages,
            zero_pages,
            out.bytes_out() as u64,
            wire,
        );
        Ok(())
    }

    fn account(&mut self, codec: CodecId, data: u64, zero: u64, payload: u64, wire: u64) {
        let ps = u64::from(self.s.memory.page_size());
        let r = &mut self.round;
        r.frames += 1;
        r.wire_bytes += wire;
        r.guest_bytes += (data + zero) * ps;
        r.pages.zero += zero;
        let c = &self.s.counters;
        c.frames.fetch_add(1, Ordering::Relaxed);
        c.wire_bytes.fetch_add(wire, Ordering::Relaxed);
        c.guest_bytes
            .fetch_add((data + zero) * ps, Ordering::Relaxed);
        c.zero.fetch_add(zero, Ordering::Relaxed);
        let slot = match codec {
            CodecId::RAW => {
                r.pages.raw += data;
                &c.raw
            }
            CodecId::DELTA => {
                r.pages.delta += data;
                &c.delta
            }
            _ => {
                r.pages.compressed += data;
                &c.compressed
            }
        };
        slot.fetch_add(data, Ordering::Relaxed);
        let e = r.codecs.entry(codec).or_insert_with(|| CodecStats {
            codec: format!("{codec:?}"),
            ..Default::default()
        });
        e.frames += 1;
        e.pages += data + zero;
        e.guest_bytes += data * ps;
        e.payload_bytes += payload;
    }

    /// Waits for the ACK, within `ack_timeout` of the call in all: each receive gets
    /// only the time left, however many other frames arrive meanwhile.
    fn await_ack(&mut self, kind: AckKind, value: u64) -> Result<(), MigrationError> {
        let ch = self.s.ch;
        let timeout = self.s.ack_timeout;
        let deadline = Instant::now() + timeout;
        let timed_out = MigrationError::Timeout {
            channel: Some(ch),
            what: Wait::Ack,
            after: timeout,
        };
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(timed_out);
            }
            if let Err(e) = set_recv_timeout(&mut self.channel, Some(left)) {
                break Err(self.chan_err(e));
            }
            match self.next_ack(kind, value) {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        // Back to the whole timeout for the next wait (best effort: the next one sets
        // its own).
        let _ = set_recv_timeout(&mut self.channel, Some(timeout));
        result
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
            Some(Incoming::Frame(Frame::Ack(a))) if a.kind == kind && a.value == value => Ok(true),
            Some(Incoming::Frame(Frame::Ack(a))) if a.kind == AckKind::FRAMES => Ok(false),
            Some(Incoming::Frame(Frame::Abort(a))) => Err(MigrationError::PeerAborted {
                reason: a.reason,
                message: a.message.to_owned(),
            }),
            Some(Incoming::Frame(f)) => Err(MigrationError::Protocol {
                channel: ch,
                what: format!("expected ACK {kind:?} {value}, got {:?}", f.frame_type()),
            }),
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
        data: &[u8],
    ) -> Result<(), MigrationError> {
        let limit = self.channel.negotiated().max_frame_bytes as usize;
        let chunk = limit
            .saturating_sub(DEVICE_STATE_OVERHEAD + name.len())
            .max(1);
        let total = data.len() as u64;
        let mut offset = 0usize;
        loop {
            let end = (offset + chunk).min(data.len());
            let f = Frame::DeviceState(DeviceState {
                instance,
                name,
                total,
                offset: offset as u64,
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

    fn complete(&mut self, final_round: u32, sections: u32) -> Result<(), MigrationError> {
        self.send_whole(&Frame::Complete(Complete {
            final_round: Round(final_round),
            sections,
        }))?;
        self.reap(true)?;
        self.await_ack(AckKind::COMPLETE, u64::from(final_round))
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

/// Room for a DEVICE_STATE header (envelope, instance, name length, total, offset).
const DEVICE_STATE_OVERHEAD: usize = 8 + 4 + 1 + 8 + 8;

/// The delta cache key of a page: region id above page index.
fn page_key(region: RegionId, page: u64) -> PageKey {
    PageKey((u64::from(region.0) << 40) | page)
}

fn frame_len(f: &Frame<'_>) -> u64 {
    match f {
        Frame::Pages(p) => (p.header_len() + p.payload.len()) as u64,
        _ => 0,
    }
}
