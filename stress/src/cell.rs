//! One cell of the matrix: one live migration of the simulated guest with one set of
//! settings, measured and verified.
//!
//! Locally ([`run_local`]) the destination runs on a `stress-dst` thread (in the
//! link's destination namespace) and the source on a `stress-src` thread (in the
//! source namespace); the destination's memory is compared with the source's, page by
//! page, after the migration. Remotely the source side is the same
//! ([`source_side`]) and the `serve` end compares digests ([`crate::serve`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pagewire::sim::{self, Guest, WriterConfig};
use pagewire::source::ChannelTransport;
use pagewire::{
    Authentication, CapPolicy, DestinationConfig, DestinationControl, DestinationListener,
    DeviceStateWriter, DirtyLogError, GuestAddr, GuestMemory, MemoryLayout, Migrated,
    MigrationError, MigrationStats, RegionDesc, RegionId, SessionId, Source, SourceConfig,
};
use serde::Serialize;

use crate::cli::{CodecChoice, TransportKind};
use crate::cpu::CpuMeter;
use crate::workload::{Filler, PAGE, Workload, WritePattern, pages_per_s};
use crate::{Link, LinkSpec};

/// The device-state section every cell sends: its label and the writer's page count
/// at the pause.
pub const SECTION: &str = "pagewire-stress/cell";

/// The settings of one cell.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CellSpec {
    /// Memory content.
    #[serde(serialize_with = "display")]
    pub workload: Workload,
    /// Writer pattern.
    #[serde(serialize_with = "pattern_name")]
    pub pattern: WritePattern,
    /// Codec.
    pub codec: CodecChoice,
    /// Codec level (1 when `None`).
    pub level: Option<i32>,
    /// Channels.
    pub channels: u16,
    /// Pages per frame.
    pub frame_pages: u32,
    /// Writer rate, MB/s.
    pub dirty_mbps: f64,
    /// Link.
    #[serde(serialize_with = "display")]
    pub link: LinkSpec,
    /// Transport.
    pub transport: TransportKind,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Downtime limit, ms.
    pub downtime_ms: u64,
    /// Round cap.
    pub max_rounds: u32,
    /// Fail instead of switching over when the caps are hit (bisection cells).
    pub fail_on_cap: bool,
    /// Source timeouts, s.
    pub timeout_s: u64,
    /// Repeated pages as COPY references (`SourceConfig::dedup`).
    pub dedup: bool,
    /// Codec threads per channel (`None`: the library's choice).
    pub codec_threads: Option<usize>,
    /// Each TCP channel's send queue, bytes (`None`: the library's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_queue: Option<usize>,
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn pattern_name<S: serde::Serializer>(v: &WritePattern, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.name())
}

impl CellSpec {
    /// The codec with its level when one was set (`zstd:3`).
    pub fn codec_label(&self) -> String {
        match self.level {
            Some(l) => format!("{}:{l}", self.codec.name()),
            None => self.codec.name().to_string(),
        }
    }

    /// A short label (`zstd x2 f128 50MB/s loopback tcp`).
    pub fn label(&self) -> String {
        format!(
            "{} x{} f{} {}MB/s {} {}",
            self.codec_label(),
            self.channels,
            self.frame_pages,
            self.dirty_mbps,
            self.link,
            self.transport.name()
        )
    }

    /// The source's settings.
    ///
    /// # Errors
    /// None today; kept for settings a cell may not support.
    pub fn source_config(
        &self,
        session: SessionId,
        auth: Authentication,
    ) -> anyhow::Result<SourceConfig> {
        let mut cfg = SourceConfig::new(session, auth);
        cfg.channels = self.channels;
        cfg.codec = match self.codec.id() {
            Some(codec) => pagewire::CodecPolicy::fixed(codec, self.level.unwrap_or(1)),
            None if self.codec == crate::cli::CodecChoice::AutoDelta => {
                pagewire::CodecPolicy::auto_with_delta()
            }
            None => pagewire::CodecPolicy::auto(),
        };
        cfg.max_pages = self.frame_pages;
        cfg.dedup = self.dedup;
        if self.codec_threads.is_some() {
            cfg.codec_threads = self.codec_threads;
        }
        if let Some(q) = self.send_queue {
            cfg.send_queue = q;
        }
        cfg.backend = self.transport.backend();
        cfg.precopy.downtime_limit = Duration::from_millis(self.downtime_ms);
        cfg.precopy.max_rounds = self.max_rounds;
        cfg.precopy.max_time = Duration::from_secs(120);
        if self.fail_on_cap {
            cfg.precopy.on_cap = CapPolicy::Fail;
        }
        cfg.send_timeout = Duration::from_secs(self.timeout_s);
        cfg.ack_timeout = Duration::from_secs(self.timeout_s);
        Ok(cfg)
    }
}

/// The destination's settings for a cell with `frame_pages` and `backend`.
pub fn destination_config(
    session: SessionId,
    auth: Authentication,
    frame_pages: u32,
    transport: TransportKind,
    mem_bytes: u64,
) -> DestinationConfig {
    let mut d = DestinationConfig::new(session, auth);
    d.max_pages = frame_pages.max(256);
    d.backend = transport.backend();
    d.accept_timeout = Duration::from_secs(30);
    d.limits.max_guest_bytes = d.limits.max_guest_bytes.max(mem_bytes);
    d
}

/// How a repetition ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Migrated and verified.
    Completed,
    /// Pre-copy did not converge within the caps (`CapPolicy::Fail`); the guest was
    /// never paused.
    NotConverged,
    /// Anything else: the error says what.
    Failed,
}

/// One repetition of a cell.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// Repetition number, from 0.
    pub repetition: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it failed.
    pub error: Option<String>,
    /// The destination's memory equals the source's, every page (local), or their
    /// digests match (remote).
    pub verified: bool,
    /// Total time, ms.
    pub total_ms: f64,
    /// Setup (connect, handshake), ms.
    pub setup_ms: f64,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Rounds.
    pub rounds: u32,
    /// Why pre-copy stopped.
    pub stop_reason: String,
    /// Guest pages per second.
    pub pages_per_s: f64,
    /// Guest bytes migrated.
    pub guest_bytes: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Guest memory moved per second, Gbit/s.
    pub guest_gbit_per_s: f64,
    /// Wire throughput, Gbit/s.
    pub wire_gbit_per_s: f64,
    /// Guest bytes over wire bytes.
    pub compression_ratio: f64,
    /// The writer's rate as asked, MB/s.
    pub dirty_mbps_set: f64,
    /// The writer's rate as achieved during the migration, MB/s.
    pub dirty_mbps_achieved: f64,
    /// CPU seconds of the source threads.
    pub cpu_source_s: f64,
    /// CPU seconds of the destination threads.
    pub cpu_destination_s: f64,
    /// Bytes of the destination's guest memory backed right after the migration
    /// (`mincore`; local runs only, 0 otherwise).
    pub dst_resident_bytes: u64,
    /// Transport of each channel as opened.
    pub transports: Vec<String>,
    /// The library's full statistics (source), when the migration got that far.
    pub stats: Option<MigrationStats>,
    /// The destination's statistics (`DestinationStats`), when it completed.
    pub destination_stats: Option<serde_json::Value>,
}

impl RunResult {
    /// A repetition that failed before producing statistics.
    pub fn failed(repetition: u32, spec: &CellSpec, e: &anyhow::Error) -> Self {
        RunResult {
            repetition,
            outcome: Outcome::Failed,
            error: Some(format!("{e:#}")),
            verified: false,
            total_ms: 0.0,
            setup_ms: 0.0,
            downtime_ms: 0.0,
            rounds: 0,
            stop_reason: String::new(),
            pages_per_s: 0.0,
            guest_bytes: 0,
            wire_bytes: 0,
            guest_gbit_per_s: 0.0,
            wire_gbit_per_s: 0.0,
            compression_ratio: 0.0,
            dirty_mbps_set: spec.dirty_mbps,
            dirty_mbps_achieved: 0.0,
            cpu_source_s: 0.0,
            cpu_destination_s: 0.0,
            dst_resident_bytes: 0,
            transports: Vec::new(),
            stats: None,
            destination_stats: None,
        }
    }

    /// Distinct pages dirtied per second in the last pre-copy round (the library's
    /// `dirty_rate_pages_per_s`), MB/s; `None` without the source's statistics.
    pub fn dirty_mbps_distinct(&self) -> Option<f64> {
        self.stats
            .as_ref()
            .map(|s| s.dirty_rate_pages_per_s * PAGE as f64 / 1e6)
    }

    /// Source CPU as a share of one core over the total time, %.
    pub fn cpu_source_pct(&self) -> f64 {
        pct(self.cpu_source_s, self.total_ms)
    }

    /// Destination CPU as a share of one core over the total time, %.
    pub fn cpu_destination_pct(&self) -> f64 {
        pct(self.cpu_destination_s, self.total_ms)
    }

    /// (source, destination) CPU seconds per GiB of guest memory migrated.
    pub fn cpu_s_per_gib(&self) -> (f64, f64) {
        let gib = self.guest_bytes as f64 / (1u64 << 30) as f64;
        if gib <= 0.0 {
            return (0.0, 0.0);
        }
        (self.cpu_source_s / gib, self.cpu_destination_s / gib)
    }
}

fn pct(cpu_s: f64, ms: f64) -> f64 {
    if ms <= 0.0 {
        0.0
    } else {
        cpu_s / (ms / 1e3) * 100.0
    }
}

/// The source guest: memory filled with the workload, refilled before a cell when a
/// writer changed it.
#[derive(Debug)]
pub struct SourceGuest {
    /// The memory.
    pub memory: Arc<GuestMemory>,
    filler: Filler,
    dirty: bool,
}

impl SourceGuest {
    /// Allocates `mem_mib` MiB and fills it with `workload`.
    ///
    /// # Errors
    /// Mapping the memory; reading the workload's files.
    pub fn new(workload: &Workload, mem_mib: u64) -> anyhow::Result<Self> {
        let layout = MemoryLayout::new(
            PAGE as u32,
            [RegionDesc {
                id: RegionId(0),
                backing_page_size: PAGE as u32,
                guest_addr: GuestAddr(0),
                length: mem_mib << 20,
            }],
        )?;
        let memory = Arc::new(GuestMemory::anonymous(&layout).context("mapping guest memory")?);
        let filler = Filler::new(workload, crate::workload::idle_corpus_budget(mem_mib << 20))?;
        filler.fill(&memory, 42);
        Ok(SourceGuest {
            memory,
            filler,
            dirty: false,
        })
    }

    /// Refills the memory if a writer changed it since the last fill, so every cell
    /// starts from the same content.
    pub fn prepare(&mut self) {
        if self.dirty {
            self.filler.fill(&self.memory, 42);
            self.dirty = false;
        }
    }

    /// Notes that a writer changed the memory (when `dirtied`).
    pub fn mark_dirty(&mut self, dirtied: bool) {
        self.dirty |= dirtied;
    }

    /// Pages.
    pub fn pages(&self) -> u64 {
        self.memory.pages(RegionId(0)).unwrap_or(0)
    }
}

/// What the source side ends with.
#[derive(Debug)]
pub struct SourceOutcome {
    /// The statistics, or the failure's error.
    pub result: Result<MigrationStats, Box<MigrationError>>,
    /// Pages the writer wrote while the migration ran.
    pub writes: u64,
    /// How long the migration ran, s (for the achieved writer rate).
    pub elapsed_s: f64,
    /// Transport of each channel.
    pub transports: Vec<String>,
}

/// The source side of a cell, on the calling thread: starts the writer, connects,
/// migrates with the cell's device-state section, stops the writer. `before_drop`
/// runs after the migration while pagewire's channel threads still exist (for a
/// last CPU sample).
///
/// # Errors
/// The settings or the connection; a failed migration is `Ok` with its error in
/// [`SourceOutcome::result`].
pub fn source_side(
    spec: &CellSpec,
    memory: Arc<GuestMemory>,
    addr: SocketAddr,
    session: SessionId,
    auth: Authentication,
    before_drop: &dyn Fn(),
) -> anyhow::Result<SourceOutcome> {
    let cfg = spec.source_config(session, auth)?;
    let pages = memory.pages(RegionId(0)).unwrap_or(0);
    let mut writer = Guest::start(
        memory.clone(),
        WriterConfig {
            pages_per_s: pages_per_s(spec.dirty_mbps),
            pattern: spec.pattern.sim(pages),
            content: spec.workload.writer_content(),
            seed: 7,
            edit_bytes: spec.workload.writer_edit_bytes(),
        },
    );
    let mut source = match Source::connect(addr, memory, cfg) {
        Ok(s) => s,
        Err(e) => {
            writer.stop();
            return Err(anyhow::Error::new(e).context(format!("connecting to {addr}")));
        }
    };
    let transports = source
        .channel_transports()
        .iter()
        .map(|t| match t {
            ChannelTransport::Tcp => "tcp".to_string(),
            ChannelTransport::Uring => "uring".to_string(),
            ChannelTransport::TcpFallback { reason } => format!("tcp (no io_uring: {reason})"),
            other => format!("{other:?}"),
        })
        .collect();
    let mut log = writer.log();
    let mut vcpus = writer.vcpus();
    let label = spec.label();
    let start_writes = writer.writes();
    let started = Instant::now();
    let writes_handle = &writer;
    let mut devices = |out: &mut DeviceStateWriter<'_>| -> Result<(), DirtyLogError> {
        // Saved while the guest is paused: the writer's count is final.
        let body = format!("{label}\nwrites {}", writes_handle.writes());
        out.write_section(SECTION, 0, body.as_bytes())?;
        Ok(())
    };
    let result = pagewire::migrate(&mut source, &mut log, &mut vcpus, &mut devices);
    let elapsed_s = started.elapsed().as_secs_f64();
    before_drop();
    writer.stop();
    let writes = writer.writes() - start_writes;
    drop(source);
    Ok(SourceOutcome {
        result: result.map_err(|f| f.error),
        writes,
        elapsed_s,
        transports,
    })
}

/// Fills a [`RunResult`] from the source's outcome.
pub fn result_from(
    repetition: u32,
    spec: &CellSpec,
    out: SourceOutcome,
    cpu: (f64, f64),
) -> RunResult {
    let mut r = RunResult::failed(repetition, spec, &anyhow::anyhow!("not run"));
    r.error = None;
    r.transports = out.transports;
    r.cpu_source_s = cpu.0;
    r.cpu_destination_s = cpu.1;
    if out.elapsed_s > 0.0 {
        r.dirty_mbps_achieved = out.writes as f64 * PAGE as f64 / out.elapsed_s / 1e6;
    }
    match out.result {
        Ok(s) => {
            r.outcome = Outcome::Completed;
            r.total_ms = s.total_ms;
            r.setup_ms = s.setup_ms;
            r.downtime_ms = s.downtime_ms;
            r.rounds = s.rounds;
            r.stop_reason = s.stop_reason.clone();
            r.pages_per_s = s.pages_per_s;
            r.guest_bytes = s.guest_bytes;
            r.wire_bytes = s.wire_bytes;
            r.compression_ratio = s.compression_ratio;
            // The library's own accounting (each thread's CPU clock) when it has it.
            if s.cpu.seconds > 0.0 {
                r.cpu_source_s = s.cpu.seconds;
            }
            if s.total_ms > 0.0 {
                r.guest_gbit_per_s = s.guest_bytes as f64 * 8.0 / (s.total_ms / 1e3) / 1e9;
                r.wire_gbit_per_s = s.wire_bytes as f64 * 8.0 / (s.total_ms / 1e3) / 1e9;
            }
            r.stats = Some(s);
        }
        Err(e) => {
            r.outcome = if matches!(*e, MigrationError::NotConverged { .. }) {
                Outcome::NotConverged
            } else {
                Outcome::Failed
            };
            r.total_ms = out.elapsed_s * 1e3;
            r.error = Some(e.to_string());
        }
    }
    r
}

/// A fresh random session id.
pub fn session_id() -> SessionId {
    let mut id = [0u8; 16];
    crate::random_bytes(&mut id);
    SessionId(id)
}

/// How a local run's destination gets its memory (plan-wide, not an axis).
#[derive(Clone, Copy, Debug, Default)]
pub struct DestPrep {
    /// Fresh or populated beforehand.
    pub memory: crate::destmem::DestMemory,
    /// The pre-fault policy for fresh memory (`None`: the library's default).
    pub prefault: Option<pagewire::Prefault>,
}

/// Runs one repetition of `spec` with both ends in this process, over `link`, into
/// destination memory prepared as `dest` says.
///
/// # Errors
/// Only what keeps the cell from being measured at all (threads, the link); a failed
/// migration is a [`RunResult`] with [`Outcome::Failed`] or
/// [`Outcome::NotConverged`].
pub fn run_local(
    spec: &CellSpec,
    repetition: u32,
    guest: &mut SourceGuest,
    link: &Link,
    auth: &Authentication,
    dest: DestPrep,
) -> anyhow::Result<RunResult> {
    guest.prepare();
    let session = session_id();
    let mut dcfg = destination_config(
        session,
        auth.clone(),
        spec.frame_pages,
        spec.transport,
        spec.mem_mib << 20,
    );
    if let Some(p) = dest.prefault {
        dcfg.prefault = p;
    }
    let dest_memory = crate::destmem::destination_memory(dest.memory, guest.memory.layout())?;
    let control = DestinationControl::new();
    let memory = guest.memory.clone();
    let meter = CpuMeter::start(Duration::from_millis(10));
    guest.dirty |= spec.dirty_mbps > 0.0;
    let (src, dst) = std::thread::scope(|s| -> anyhow::Result<_> {
        let (tx, rx) = mpsc::channel::<anyhow::Result<SocketAddr>>();
        let control2 = control.clone();
        let dst = std::thread::Builder::new()
            .name("stress-dst".into())
            .spawn_scoped(s, move || -> anyhow::Result<Migrated> {
                let bound = (|| -> anyhow::Result<DestinationListener> {
                    link.enter_destination()?;
                    Ok(DestinationListener::bind(
                        link.destination_addr(0),
                        dcfg.clone(),
                    )?)
                })();
                let listener = match bound {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                let _ = tx.send(listener.local_addr().map_err(Into::into));
                let dest = listener.accept_controlled(&dcfg, dest_memory, &control2)?;
                Ok(dest.wait()?)
            })?;
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                let _ = dst.join();
                return Err(e.context("destination"));
            }
            Err(_) => {
                control.cancel();
                let _ = dst.join();
                bail!("the destination thread did not bind in 30 s");
            }
        };
        let auth = auth.clone();
        let meter = &meter;
        let src = std::thread::Builder::new()
            .name("stress-src".into())
            .spawn_scoped(s, move || {
                link.enter_source()?;
                source_side(spec, memory.clone(), addr, session, auth, &|| {
                    meter.sample()
                })
            })?;
        let src = src
            .join()
            .map_err(|_| anyhow::anyhow!("source thread panicked"))?;
        let ok = matches!(&src, Ok(o) if o.result.is_ok());
        if !ok {
            // The source failed: wake the destination wherever it waits.
            control.cancel();
        }
        meter.sample();
        let dst = dst
            .join()
            .map_err(|_| anyhow::anyhow!("destination thread panicked"))?;
        Ok((src, dst))
    })?;
    let cpu = meter.finish();
    let src = match src {
        Ok(o) => o,
        Err(e) => return Ok(RunResult::failed(repetition, spec, &e)),
    };
    let mut r = result_from(repetition, spec, src, cpu);
    if r.outcome != Outcome::Completed {
        return Ok(r);
    }
    match dst {
        Err(e) => {
            r.outcome = Outcome::Failed;
            r.error = Some(format!(
                "the source completed but the destination failed: {e:#}"
            ));
        }
        Ok(m) => {
            // Before verifying: reading pages never written would map them.
            r.dst_resident_bytes = crate::destmem::resident_bytes(&m.memory);
            match verify_local(spec, &guest.memory, &m) {
                Ok(()) => {
                    r.verified = true;
                    if let Some(s) = r.stats.as_mut() {
                        s.apply_latency = m.stats.apply_latency;
                        s.destination_cpu = Some(m.stats.cpu);
                    }
                    if m.stats.cpu.seconds > 0.0 {
                        r.cpu_destination_s = m.stats.cpu.seconds;
                    }
                    r.destination_stats = serde_json::to_value(&m.stats).ok();
                }
                Err(e) => {
                    r.outcome = Outcome::Failed;
                    r.error = Some(format!("verification failed: {e:#}"));
                }
            }
        }
    }
    Ok(r)
}

/// The destination's memory equals the source's, every page, and the cell's section
/// arrived.
///
/// # Errors
/// Where they differ.
pub fn verify_local(spec: &CellSpec, source: &GuestMemory, m: &Migrated) -> anyhow::Result<()> {
    if let Some((region, page)) = sim::first_difference(source, &m.memory) {
        bail!("destination differs from the source at {region:?} page {page}");
    }
    check_section(spec, m)
}

/// The cell's device-state section arrived, naming this cell.
///
/// # Errors
/// Missing or naming another cell.
pub fn check_section(spec: &CellSpec, m: &Migrated) -> anyhow::Result<()> {
    let Some(s) = m.device_state.iter().find(|s| s.name == SECTION) else {
        bail!("the cell's device-state section did not arrive");
    };
    let body = String::from_utf8_lossy(&s.data);
    if body.lines().next() != Some(spec.label().as_str()) {
        bail!("the device-state section names another cell: {body:?}");
    }
    Ok(())
}

/// A digest of guest memory: pages and CRC32C over all of them in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Digest {
    /// Pages covered.
    pub pages: u64,
    /// CRC32C of their bytes.
    pub crc32c: u32,
}

/// The digest of `memory`.
pub fn digest(memory: &GuestMemory) -> Digest {
    let ps = memory.page_size() as usize;
    let chunk = 256u64;
    let mut buf = vec![0u8; ps * chunk as usize];
    let mut d = Digest {
        pages: 0,
        crc32c: 0,
    };
    for id in memory.region_ids().collect::<Vec<_>>() {
        let n = memory.pages(id).unwrap_or(0);
        let mut p = 0;
        while p < n {
            let k = chunk.min(n - p);
            let b = &mut buf[..ps * k as usize];
            if !memory.read_pages(id, p, k, b) {
                b.fill(0xFF);
            }
            d.crc32c = crc32c::crc32c_append(d.crc32c, b);
            d.pages += k;
            p += k;
        }
    }
    d
}
