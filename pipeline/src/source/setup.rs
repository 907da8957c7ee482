//! Setting up a source: opening the session's channels, then, for each one, its codec
//! engine, its adaptive codec choice and its worker thread, which opens the channel and
//! sends the layout.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use pagewire_accel::{
    DeltaCache, DeltaConfig, EncodeParams, Engine, EngineConfig, Level, PageSize, SoftwareConfig,
};
use pagewire_protocol::{Capabilities, CodecId, CodecSet, Frame};
use pagewire_transport::session::{self, Established, SessionConfig};

use crate::config::{CodecPolicy, Control, SourceConfig};
use crate::error::{MigrationError, SessionError, Wait};
use crate::memory::GuestMemory;
use crate::plan::Affinity;
use crate::progress::Progress;

use super::dedup::{Dedup, DedupTable};
use super::worker::WorkerSetup;
use super::{
    ChannelTransport, Counters, Reply, Source, SourceLatency, WorkerHandle, adaptive, frame_bytes,
    transport_views,
};

impl Source {
    /// Opens the channels with `open`, then starts a worker per channel and sends the
    /// layout.
    pub(super) fn open(
        memory: Arc<GuestMemory>,
        config: SourceConfig,
        open: impl FnOnce(&SessionConfig) -> Result<Vec<Established>, session::SessionError>,
    ) -> Result<Source, MigrationError> {
        let started = Instant::now();
        let cpu_at_start = pagewire_accel::thread_cpu_time();
        config.validate()?;
        let page_size = memory.page_size();
        let mut caps = Capabilities::new(page_size);
        caps.max_pages = config.max_pages;
        caps.max_frame_bytes = frame_bytes(page_size, config.max_pages);
        // Delta truncated at a record boundary is undetectable without a checksum
        // (PROTOCOL.md), so delta always asks for one.
        let fixed = config.codec.fixed_codec();
        // The adaptive choice may send delta for cached pages.
        let auto_delta = matches!(&config.codec, CodecPolicy::Auto(a) if a.has_delta());
        caps.checksum = config.checksum || fixed == Some(CodecId::DELTA) || auto_delta;
        caps.codecs = CodecSet::all_known();
        let mut scfg =
            SessionConfig::new(caps, config.session, config.channels, config.auth.clone());
        // A fixed codec is the only one this source sends: a WELCOME without it is
        // refused in place of CONFIRM (REJECT NO_COMMON_CODEC), so the destination
        // hears why rather than a session that closes after READY.
        scfg.require = fixed
            .and_then(|c| CodecSet::from_ids([c]))
            .unwrap_or_default();
        scfg.tcp.recv_timeout = Some(config.ack_timeout);
        scfg.tcp.send_timeout = config.send_timeout;
        scfg.tcp.send_queue = config.send_queue;
        scfg.tcp.connect_timeout = config.connect_timeout;
        scfg.tcp.connect_attempts = config.connect_attempts;
        scfg.tcp.retry_delay = config.connect_retry_delay;
        scfg.uring.recv_timeout = Some(config.ack_timeout);
        scfg.uring.send_timeout = config.send_timeout;
        scfg.handshake_timeout = config.handshake_timeout;
        scfg.encryption = config.encryption.clone();
        let views = transport_views(&memory);
        scfg.uring.guest = views.iter().map(|(_, v)| v.clone()).collect();
        // RDMA (`Backend::Rdma`): the guest memory, registered once for all channels.
        scfg.rdma = pagewire_transport::rdma::RdmaConfig::new(views.clone());
        scfg.rdma.send_timeout = config.send_timeout;
        scfg.rdma.recv_timeout = Some(config.ack_timeout);
        let established = open(&scfg).map_err(|e| session_error(e, &config))?;
        let control = Control::new(config.bandwidth_limit, config.precopy.downtime_limit);
        let affinity = Affinity {
            channels: config.channels,
            chunk_pages: config.max_pages,
        };
        let latency = Arc::new(SourceLatency::default());
        let mut workers = Vec::new();
        let mut engine_stats = Vec::new();
        let mut adaptive_stats = Vec::new();
        let mut transport = String::new();
        let mut transports = Vec::new();
        // One table for every channel with a software engine (see `dedup.rs`).
        let mut dedup: Option<Arc<DedupTable>> = None;
        // What the channels measure of the link they share, for each other.
        // And the machine's idle CPU, which a compressor replacing raw takes its cores
        // from.
        let start = Arc::new(adaptive::SharedLink::with_cpu(
            proc_stat,
            std::thread::available_parallelism().map_or(1, usize::from),
            config.channels,
        ));
        for est in established {
            let ch = est.negotiated.channel.0;
            let negotiated = est.negotiated;
            // A destination may choose a frame limit below what its `max_pages` raw
            // pages need (PROTOCOL.md allows any from a page and 1024 bytes): frames
            // then carry fewer pages, never more bytes.
            let max_pages = negotiated.max_pages.min(super::pages_per_frame(
                page_size,
                negotiated.max_frame_bytes,
            ));
            let delta = if fixed == Some(CodecId::DELTA)
                || (auto_delta && negotiated.codecs.contains(CodecId::DELTA))
            {
                let ps = PageSize::new(page_size)
                    .ok_or_else(|| MigrationError::Config("page size".into()))?;
                Some(Arc::new(
                    DeltaCache::new(DeltaConfig::new(ps, config.delta_cache_pages))
                        .map_err(|e| MigrationError::Config(e.to_string()))?,
                ))
            } else {
                None
            };
            let engine_config = EngineConfig {
                page_size: PageSize::new(page_size)
                    .ok_or_else(|| MigrationError::Config("page size".into()))?,
                max_pages: max_pages as usize,
                requests: config.queue_depth,
                buffers: config.queue_depth * 2,
                delta: delta.clone(),
            };
            let software = SoftwareConfig {
                threads: config
                    .codec_threads
                    .unwrap_or_else(|| crate::config::codec_threads_for(config.channels)),
                queue_depth: config.queue_depth,
            };
            let mut engine = Engine::build(&config.accel, engine_config.clone(), software)?;
            let sendable = |c: CodecId| negotiated.codecs.sendable_as(c, page_size).unwrap_or(c);
            // `auto` takes an accelerator only for a codec it runs itself.
            let accelerated =
                runs_itself(&config.codec, engine.probe(), &negotiated.codecs, page_size);
            if config.accel == pagewire_accel::BackendChoice::Auto
                && engine.probe().backend != pagewire_accel::BackendKind::Software
                && !accelerated
            {
                engine = Engine::software(engine_config, software)?;
            }
            // A device that reaches memory through an IOMMU mapping (IAA over VFIO)
            // gets guest memory mapped once per migration; a no-op for the others.
            for region in memory.region_ids() {
                let pages = memory.pages(region).unwrap_or(0);
                if let Some((ptr, len)) = memory.span(region, 0, pages) {
                    // SAFETY: the region stays mapped as long as `memory`, which the
                    // workers (and so the engine) hold; the engine's backends touch it
                    // through raw pointers only.
                    unsafe { engine.map_memory(ptr.as_ptr(), len) }?;
                }
            }
            let software_engine = engine.probe().backend == pagewire_accel::BackendKind::Software;
            let counters = Arc::new(Counters::default());
            let bytes_sent = Arc::new(AtomicU64::new(0));
            let estats = Arc::new(std::sync::Mutex::new(engine.stats()));
            engine_stats.push(estats.clone());
            let threads = config
                .codec_threads
                .unwrap_or_else(|| crate::config::codec_threads_for(config.channels));
            let selector = match &config.codec {
                CodecPolicy::Auto(a) => Some(
                    adaptive::Selector::new(
                        &adaptive::AdaptiveConfig {
                            candidates: a
                                .candidates
                                .iter()
                                .map(|&(c, l)| (sendable(c), l))
                                .collect(),
                            ..a.clone()
                        },
                        // Only the software codecs keep the delta cache: under a
                        // hardware engine, remembering would send every frame to them.
                        |c| {
                            negotiated.codecs.contains(c)
                                && (c != CodecId::DELTA || (software_engine && delta.is_some()))
                        },
                        negotiated.checksum.is_none(),
                        threads.max(1),
                        ch,
                        Instant::now(),
                    )
                    .map(|s| s.with_shared(start.clone()))
                    .ok_or_else(|| {
                        MigrationError::Config(
                            "the destination decodes none of the adaptive codec's candidates"
                                .into(),
                        )
                    })?,
                ),
                CodecPolicy::Fixed { .. } => None,
            };
            let astats = Arc::new(std::sync::Mutex::new(crate::stats::AdaptiveStats::default()));
            adaptive_stats.push(astats.clone());
            let setup = WorkerSetup {
                ch,
                engine,
                delta,
                views: views.clone(),
                memory: memory.clone(),
                affinity,
                // Under the adaptive choice, the selector's on every frame.
                params: {
                    let (codec, level) = match config.codec {
                        CodecPolicy::Fixed { codec, level } => (sendable(codec), level),
                        CodecPolicy::Auto(_) => (CodecId::RAW, 0),
                    };
                    EncodeParams {
                        codec,
                        level: pagewire_accel::level_range(codec)
                            .map_or(Level(0), |(min, max)| Level(level.clamp(min.0, max.0))),
                        raw_in_place: negotiated.checksum.is_none(),
                        remember: false,
                    }
                },
                checksum: negotiated.checksum,
                max_pages,
                control: control.clone(),
                latency: latency.clone(),
                counters: counters.clone(),
                bytes_sent: bytes_sent.clone(),
                engine_stats: estats,
                adaptive: selector,
                // A hardware engine reads the pages by DMA, from guest memory mapped
                // for it, not from the buffer dedup hashes and encodes from.
                dedup: match (config.dedup && software_engine, &dedup) {
                    (false, _) => None,
                    (true, Some(table)) => Some(Dedup::new(table.clone())),
                    (true, None) => {
                        let table = Arc::new(
                            DedupTable::new(&memory, affinity)
                                .map_err(|e| MigrationError::Session(SessionError::Random(e)))?,
                        );
                        dedup = Some(table.clone());
                        Some(Dedup::new(table))
                    }
                },
                inline_encode: threads == 0,
                adaptive_stats: astats,
                send_timeout: config.send_timeout,
                ack_timeout: config.ack_timeout,
                keepalive: config.keepalive,
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
                    let mut w = match setup.into_worker(channel) {
                        Ok(w) => w,
                        Err(e) => {
                            let _ = tx_reply.send(Reply::Failed(e));
                            return;
                        }
                    };
                    // LAYOUT first on every channel.
                    let memory = w.s.memory.clone();
                    let layout = Frame::Layout(memory.layout().frame(w.s.affinity.chunk_pages));
                    w.rules.on_send_layout();
                    match w.send_whole(&layout) {
                        Ok(_) => {
                            w.note_cpu();
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
        let progress = Progress::new(
            started,
            workers.iter().map(|w| w.counters.clone()).collect(),
        );
        Ok(Source {
            progress,
            workers,
            memory,
            affinity,
            control,
            latency,
            rounds: Vec::new(),
            last_round_paused: false,
            next_round: 0,
            sections: 0,
            handed_over: false,
            aborted: None,
            handed_over_at: None,
            driver_cpu: pagewire_accel::thread_cpu_time().saturating_sub(cpu_at_start),
            started,
            setup: started.elapsed(),
            transport,
            transports,
            engine_stats,
            adaptive_stats,
            dedup,
            config,
        })
    }
}

/// Whether the engine's backend (under `auto`, an accelerator it found) encodes a codec
/// this source will send: the fixed codec, or one of the adaptive choice's candidates,
/// as it goes to a destination that decodes `codecs` at `page_size` (deflate as
/// deflate-4k, [`CodecSet::sendable_as`]). A codec the destination cannot decode is
/// never sent, so it does not count: otherwise every frame would go through the
/// accelerator to its software fallback.
fn runs_itself(
    policy: &CodecPolicy,
    probe: &pagewire_accel::Probe,
    codecs: &CodecSet,
    page_size: u32,
) -> bool {
    let runs = |codec| {
        codecs
            .sendable_as(codec, page_size)
            .is_some_and(|c| probe.can_encode(c, Level::DEFAULT))
    };
    match policy {
        CodecPolicy::Fixed { codec, .. } => runs(*codec),
        CodecPolicy::Auto(a) => a.candidates.iter().any(|&(c, _)| runs(c)),
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
            after: config
                .connect_timeout
                .saturating_mul(*attempts)
                .saturating_add(
                    config
                        .connect_retry_delay
                        .saturating_mul(attempts.saturating_sub(1)),
                ),
        },
        _ => MigrationError::Session(e),
    }
}

/// The machine's idle (idle and iowait) and total CPU time from `/proc/stat`, in
/// clock ticks; `None` where it cannot be read. The adaptive choice's reader of idle
/// cores (`adaptive::SharedLink::with_cpu`).
pub(crate) fn proc_stat() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait irq softirq steal (guest time is in user's).
    let f: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [_, _, _, idle, iowait, ..] = f[..] else {
        return None;
    };
    Some((idle + iowait, f.iter().sum()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_accel::{BackendKind, FormatCaps, Probe};

    /// A device that writes deflate-4k streams, as IAA does at 4 KiB pages (listed as
    /// deflate too, the same streams there).
    fn deflate_4k_device() -> Probe {
        let caps = |codec| FormatCaps::both(codec, Level(0), Level(12));
        Probe {
            backend: BackendKind::Iaa,
            formats: vec![caps(CodecId::DEFLATE_4K), caps(CodecId::DEFLATE)],
            max_job_pages: 64,
            max_job_bytes: 1 << 20,
            queue_depth: 16,
            delta_cache: false,
        }
    }

    fn set(ids: &[CodecId]) -> CodecSet {
        let mut s = CodecSet::empty();
        for &id in ids {
            assert!(s.insert(id));
        }
        s
    }

    #[test]
    fn an_accelerator_is_kept_only_for_a_codec_the_destination_takes() {
        let device = deflate_4k_device();
        let base = [CodecId::RAW, CodecId::ZERO, CodecId::LZ4, CodecId::ZSTD];
        let without = set(&base);
        let with_4k = set(&[&base[..], &[CodecId::DEFLATE_4K]].concat());
        let deflate = CodecPolicy::fixed(CodecId::DEFLATE, 1);
        // deflate goes as deflate-4k at 4 KiB pages, which the device writes.
        assert!(runs_itself(&deflate, &device, &with_4k, 4096));
        assert!(!runs_itself(&deflate, &device, &with_4k, 8192));
        assert!(!runs_itself(&deflate, &device, &without, 4096));
        assert!(!runs_itself(
            &CodecPolicy::fixed(CodecId::LZ4, 0),
            &device,
            &with_4k,
            4096
        ));
        // `auto`'s deflate candidate counts only when the destination decodes it.
        let auto = CodecPolicy::auto();
        assert!(runs_itself(&auto, &device, &with_4k, 4096));
        assert!(!runs_itself(&auto, &device, &without, 4096));
    }
}
