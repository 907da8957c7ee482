//! The batched codec engine: the accelerator request model (DPDK compressdev, QPL
//! jobs, QAT's request cache) over any [`Backend`].
//!
//! - [`Engine::job`] hands out a pre-allocated request ([`Job`]); the caller describes
//!   the work (an encode of a [`PageList`] or a decode into a [`PageListMut`]) and
//!   tags it.
//! - [`Engine::submit`] passes a batch to the backend, which may accept only part of
//!   it (its queue is full, or no output buffer is free): the rest stays in the batch,
//!   in order, for the caller to retry.
//! - [`Engine::poll`] returns [`Completion`]s, matched to jobs by [`Tag`], possibly
//!   out of order. Each records the backend that ran it. Dropping a completion
//!   recycles its request; its payload buffer ([`EngineBuf`]) goes back to its pool only
//!   when every handle (codec output, then the transport's pending send) is dropped.
//!   [`Engine::recycle`] gives a completion back to the engine itself instead, which
//!   keeps its request and unused buffer for the next jobs with no atomic operation.
//!
//! Nothing is allocated per job once the engine is built. A [`Probe`] tells, before
//! use, what the backend supports; jobs it cannot run complete at once with an error.
//! The engine keeps [`EngineStats`].
//!
//! ```
//! use std::collections::VecDeque;
//! use pagewire_accel::{Engine, EngineConfig, EncodeParams, Level, PageKey, EngineBuf, SoftwareConfig, Tag};
//! use pagewire_protocol::CodecId;
//!
//! let mut engine = Engine::software(EngineConfig::default(), SoftwareConfig { threads: 1, ..Default::default() })?;
//! let mut job = engine.job().expect("a free request");
//! job.encode_buf(Tag(7), EncodeParams::new(CodecId::LZ4, Level::DEFAULT), EngineBuf::from_vec(vec![1u8; 4096]), PageKey(0))?;
//! let mut batch = VecDeque::from([job]);
//! engine.submit(&mut batch)?;
//! let mut done = Vec::new();
//! while done.is_empty() {
//!     engine.poll(&mut done, 16, Some(std::time::Duration::from_millis(100)))?;
//! }
//! assert_eq!(done[0].tag(), Tag(7));
//! assert_eq!(done[0].encoded().map(|e| e.codec), Some(CodecId::LZ4));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`PageList`]: crate::PageList
//! [`PageListMut`]: crate::PageListMut
//! [`EngineBuf`]: crate::EngineBuf

pub mod fallback;
pub mod select;
pub mod software;

mod backend;
mod home;
mod job;

use core::cell::RefCell;
use core::fmt;
use core::time::Duration;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use pagewire_protocol::CodecId;

use crate::cache::DeltaCache;
use crate::codec::{CodecError, Codecs, EncodeOutcome, EncodeParams, max_payload_len};
use crate::page::PageSize;
use crate::pages::{PageList, PagesError};
use crate::pool::{BufPool, EngineBuf};
use crate::stats::{EngineStats, StatsCounter};

pub use backend::{Backend, BackendKind, FormatCaps, Probe, RunNow};
pub use fallback::{FallbackCause, FallbackCounts};
pub use select::{BackendChoice, BadChoice, IaaPortal, ModelFault, ModelFaults};
pub use software::{SoftwareBackend, SoftwareConfig};

use home::Requests;
pub use job::{Completion, Job, JobOp, JobParts};
use job::{Request, run_fallback};

/// The caller's name for a job, returned with its completion.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tag(pub u64);

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", self.0)
    }
}

/// Why the engine or a backend failed (job-level failures are [`CodecError`]s in the
/// completion instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A configuration value out of range.
    #[error("bad engine configuration: {0}")]
    Config(&'static str),
    /// A worker thread could not be started.
    #[error("could not start a codec worker thread ({0}); lower the thread count")]
    Spawn(#[source] std::io::Error),
    /// The backend's workers are gone (a worker panicked).
    #[error("{0:?} backend workers stopped; the engine must be rebuilt")]
    Disconnected(BackendKind),
    /// A page list refused a run.
    #[error(transparent)]
    Pages(#[from] PagesError),
    /// A job misuse caught before submission.
    #[error("job error: {0}")]
    Job(&'static str),
    /// An explicitly chosen backend cannot be used on this host.
    #[error("{backend:?} backend unavailable: {reason}")]
    Unavailable {
        /// The backend.
        backend: BackendKind,
        /// Why, and what to do about it.
        reason: String,
    },
    /// A backend-specific failure.
    #[error("{backend:?} backend failed: {source}")]
    Backend {
        /// The backend.
        backend: BackendKind,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// How an engine is sized.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Page size of every job.
    pub page_size: PageSize,
    /// Most pages per job (a frame).
    pub max_pages: usize,
    /// Requests in the pool: most jobs being set up or in flight at once (1 to 2^24).
    pub requests: usize,
    /// Output buffers in the pool (each `max_payload_len(max_pages)` bytes); more than
    /// `requests` lets payloads wait for the transport while new jobs run.
    pub buffers: usize,
    /// The sender's delta cache, needed for delta encoding.
    pub delta: Option<Arc<DeltaCache>>,
}

impl EngineConfig {
    /// Checks the sizes: what [`Engine::new`] and [`Engine::build`] refuse (the
    /// latter before it opens a device).
    ///
    /// # Errors
    /// [`EngineError::Config`]: `max_pages` out of `1..=65536` or a job of more than
    /// [`MAX_JOB_BYTES`], `requests` or `buffers` out of `1..=2^24`, a delta cache of
    /// another page size.
    pub fn check(&self) -> Result<(), EngineError> {
        if self.max_pages == 0 || self.max_pages > 65536 {
            return Err(EngineError::Config("max_pages must be in 1..=65536"));
        }
        if self.max_pages.saturating_mul(self.page_size.bytes()) > MAX_JOB_BYTES {
            return Err(EngineError::Config(
                "max_pages pages must be at most 256 MiB (MAX_JOB_BYTES)",
            ));
        }
        if self.requests == 0 || self.buffers == 0 {
            return Err(EngineError::Config(
                "requests and buffers must be at least 1",
            ));
        }
        if self.requests > home::MAX_REQUESTS || self.buffers > home::MAX_REQUESTS {
            return Err(EngineError::Config(
                "requests and buffers must be at most 2^24",
            ));
        }
        if let Some(cache) = &self.delta
            && cache.page_bytes() != self.page_size.bytes()
        {
            return Err(EngineError::Config(
                "the delta cache's page size differs from the engine's",
            ));
        }
        Ok(())
    }
}

/// Most input bytes of one job an engine may be sized for: 65536 pages of 4 KiB (a
/// frame is at most 64 MiB on the wire).
pub const MAX_JOB_BYTES: usize = 256 << 20;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            page_size: PageSize::KIB4,
            max_pages: 128,
            requests: 64,
            buffers: 128,
            delta: None,
        }
    }
}

/// The batched codec engine (see the module documentation).
pub struct Engine {
    backend: Box<dyn Backend>,
    probe: Probe,
    /// What the software codecs can do: the jobs a hardware backend may hand back.
    software_probe: Probe,
    /// The software codecs that run jobs a hardware backend handed back.
    fallback: Box<Codecs>,
    config: EngineConfig,
    requests: Requests,
    /// Requests given back through [`Engine::recycle`], reset, handed out first.
    spare: RefCell<Vec<home::Handle>>,
    bufs: BufPool,
    /// Output buffers of the pool given back through [`Engine::recycle`], attached
    /// first.
    spare_bufs: Vec<EngineBuf>,
    staging: VecDeque<Job>,
    ready: VecDeque<Completion>,
    in_flight: usize,
    stats: StatsCounter,
    /// The encode parameters [`Engine::encode_now`] last checked and found good.
    now_checked: Option<EncodeParams>,
    /// Most pages in one job: the backend's limit and the configuration's.
    max_job_pages: usize,
    /// Whether the backend runs jobs on the caller's thread
    /// ([`Backend::inline_codecs`]): what [`Engine::encode_now`] needs.
    inline: bool,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.probe.backend)
            .field("in_flight", &self.in_flight)
            .field(
                "free_requests",
                &(self.requests.available() + self.spare.borrow().len()),
            )
            .field("bufs", &self.bufs)
            .finish()
    }
}

impl Engine {
    /// An engine over the software backend.
    ///
    /// # Errors
    /// [`EngineError`] for a bad configuration or a thread that failed to start.
    pub fn software(config: EngineConfig, software: SoftwareConfig) -> Result<Engine, EngineError> {
        config.check()?;
        let backend = SoftwareBackend::new(software, config.max_pages, config.delta.clone())?;
        Engine::new(config, Box::new(backend))
    }

    /// An engine over any backend.
    ///
    /// # Errors
    /// [`EngineError::Config`] for a size out of range.
    pub fn new(config: EngineConfig, backend: Box<dyn Backend>) -> Result<Engine, EngineError> {
        config.check()?;
        let requests = Requests::new(config.requests, || {
            Request::new(config.page_size, config.max_pages)
        });
        let bufs = BufPool::new(
            config.buffers,
            max_payload_len(config.max_pages, config.page_size),
        );
        let mut backend = backend;
        let inline = backend.inline_codecs().is_some();
        let probe = backend.probe();
        let max_job_pages = probe.max_job_pages.min(config.max_pages);
        let software_probe = software::probe(config.max_pages, usize::MAX, config.delta.is_some());
        Ok(Engine {
            backend,
            probe,
            software_probe,
            fallback: Box::new(Codecs::new()),
            spare: RefCell::new(Vec::with_capacity(config.requests)),
            spare_bufs: Vec::with_capacity(config.buffers),
            staging: VecDeque::with_capacity(config.requests),
            ready: VecDeque::with_capacity(config.requests),
            config,
            requests,
            bufs,
            in_flight: 0,
            stats: StatsCounter::new(Instant::now()),
            now_checked: None,
            max_job_pages,
            inline,
        })
    }

    /// What the backend supports.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// A free request, or `None` when every request is in use (poll, and drop or
    /// [`recycle`](Engine::recycle), completions to free some).
    pub fn job(&self) -> Option<Job> {
        let h = match self.spare.borrow_mut().pop() {
            Some(h) => h,
            None => self.requests.take()?,
        };
        Some(Job { h })
    }

    /// Gives a completion back for reuse: what dropping it does, without a locked
    /// read-modify-write. Its request goes to this engine's own list of spare requests,
    /// and its output buffer (when the caller did not take it, and it is this engine's
    /// and held only here) to this engine's own spare buffers, both handed out first by
    /// [`Engine::job`] and [`Engine::submit`]. Dropping a completion returns its
    /// request to the shared free list (a compare-and-swap) and its buffer to the pool
    /// (a compare-and-swap and a reference-count decrement), and taking them back costs
    /// as much again: 6–11 ns an operation on a 2-core AMD EPYC, most of the engine's
    /// own cost per job at one-page frames. A payload the caller took (to send it)
    /// still pays the pool's operations when its last handle drops. Spare buffers are
    /// not counted by [`BufPool::available`]; they go back to the pool when the engine
    /// is dropped. A completion of another engine is simply dropped.
    pub fn recycle(&mut self, c: Completion) {
        let Completion { mut h } = c;
        if !self.requests.owns(&h) {
            // Another engine's: it goes home as a dropped completion does.
            return;
        }
        let r = h.req_mut();
        if let JobOp::Encode(_) = r.op
            && let Some(mut buf) = r.payload.take()
            && buf.is_unique()
            && self.bufs.owns(&buf)
        {
            buf.set_len(0);
            self.spare_bufs.push(buf);
        }
        r.reset();
        self.spare.get_mut().push(h);
    }

    /// The output buffer pool.
    pub fn buffers(&self) -> &BufPool {
        &self.bufs
    }

    /// Jobs submitted whose completion has not been polled: those the backend holds,
    /// and those that completed at once (run inline, refused, or run on software in
    /// place of the hardware) and wait for the next poll.
    pub fn in_flight(&self) -> usize {
        self.in_flight + self.ready.len()
    }

    /// Checks an encode of `input` with `p` against a probe and the configuration.
    fn check_encode(
        &self,
        probe: &Probe,
        p: EncodeParams,
        input: &PageList<'_>,
    ) -> Result<(), CodecError> {
        let n = input.pages();
        let max = probe.max_job_pages.min(self.config.max_pages);
        if n == 0 {
            return Err(CodecError::NoPages { codec: p.codec });
        }
        if input.page_size() != self.config.page_size {
            return Err(CodecError::PageSize {
                codec: p.codec,
                page_size: input.page_size().bytes(),
                expected: self.config.page_size.bytes(),
            });
        }
        if n > max || input.bytes() > probe.max_job_bytes {
            return Err(CodecError::TooManyPages { pages: n, max });
        }
        // Only the software codecs keep the delta cache.
        if p.remember && p.codec != CodecId::DELTA && !probe.delta_cache {
            return Err(match self.config.delta {
                None => CodecError::NoDeltaCache,
                Some(_) => CodecError::Unsupported(p.codec),
            });
        }
        if !probe.can_encode(p.codec, p.level) {
            return match crate::codec::level_range(p.codec) {
                Some((min, max))
                    if p.codec != CodecId::DELTA
                        && probe.caps(p.codec).is_some_and(|c| c.encode) =>
                {
                    Err(CodecError::BadLevel {
                        codec: p.codec,
                        level: p.level,
                        min,
                        max,
                    })
                }
                _ if p.codec == CodecId::DELTA && self.config.delta.is_none() => {
                    Err(CodecError::NoDeltaCache)
                }
                _ => Err(CodecError::Unsupported(p.codec)),
            };
        }
        Ok(())
    }

    /// Checks a job against a probe and the configuration.
    fn check(&self, probe: &Probe, job: &Job) -> Result<(), CodecError> {
        let r = job.h.req();
        let max = probe.max_job_pages.min(self.config.max_pages);
        match r.op {
            JobOp::Idle => Err(CodecError::Unsupported(CodecId(0))),
            JobOp::Encode(p) => self.check_encode(probe, p, &r.input),
            JobOp::Decode(codec) => {
                if !probe.can_decode(codec) {
                    return Err(CodecError::Unsupported(codec));
                }
                if r.dest.pages() > max {
                    return Err(CodecError::TooManyPages {
                        pages: r.dest.pages(),
                        max,
                    });
                }
                Ok(())
            }
        }
    }

    /// Submits jobs from the front of `batch`. Jobs the backend cannot run complete at
    /// once with an error (see [`Engine::poll`]); the backend may accept only part of
    /// the rest, or none when no output buffer is free: those stay in `batch`, in
    /// order, to be submitted again after a poll. Returns the jobs taken from `batch`.
    ///
    /// # Errors
    /// [`EngineError`] when the backend failed; the jobs not taken stay in `batch`.
    pub fn submit(&mut self, batch: &mut VecDeque<Job>) -> Result<usize, EngineError> {
        let start = batch.len();
        while let Some(mut job) = batch.pop_front() {
            let mut unsupported = false;
            if let Err(e) = self.check(&self.probe, &job) {
                // A job the hardware cannot run but the software codecs can goes to
                // software (counted), not back to the caller as an error; one neither
                // can run gets the software codecs' (more precise) error.
                let e = if self.probe.backend == BackendKind::Software {
                    Err(e)
                } else {
                    self.check(&self.software_probe, &job)
                };
                match e {
                    Ok(()) => unsupported = true,
                    Err(e) => {
                        self.stats.rejected += 1;
                        self.ready.push_back(job.fail(self.probe.backend, e));
                        continue;
                    }
                }
            }
            if let JobOp::Encode(_) = job.op()
                && job.h.req().payload.is_none()
            {
                match self.spare_bufs.pop().or_else(|| self.take_pool_buf()) {
                    Some(buf) => job.h.req_mut().payload = Some(buf),
                    None => {
                        batch.push_front(job);
                        break;
                    }
                }
            }
            if !unsupported {
                match self.backend.run_now(&mut job, self.ready.len()) {
                    RunNow::Ran => {
                        // Inline: done already, never queued (no clock, no depth).
                        self.ready.push_back(job.complete(self.probe.backend));
                        self.stats.submitted += 1;
                        continue;
                    }
                    RunNow::Full => {
                        batch.push_front(job);
                        break;
                    }
                    RunNow::Queue => {}
                }
            }
            if unsupported {
                let mut c = job.fall_back(self.probe.backend, FallbackCause::Unsupported);
                run_fallback(
                    &mut self.fallback,
                    self.config.delta.as_deref(),
                    &mut self.stats,
                    &mut c,
                );
                self.ready.push_back(c);
                continue;
            }
            self.staging.push_back(job);
            if self.staging.len() == self.staging.capacity() {
                break;
            }
        }
        let staged = self.staging.len();
        let result = self.backend.submit(&mut self.staging);
        let accepted = staged - self.staging.len();
        while let Some(job) = self.staging.pop_back() {
            batch.push_front(job);
        }
        if !batch.is_empty() {
            self.stats.partial_submits += 1;
        }
        self.stats.submitted += accepted as u64;
        if accepted > 0 {
            // The clock is read only when the depth changes.
            self.in_flight += accepted;
            self.stats.set_depth(Instant::now(), self.in_flight);
        }
        result?;
        Ok(start - batch.len())
    }

    /// Appends up to `max` completions to `done`, waiting up to `timeout` for the
    /// first when none is ready (`None`: do not wait). Returns how many.
    ///
    /// # Errors
    /// [`EngineError`] when the backend failed.
    pub fn poll(
        &mut self,
        done: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, EngineError> {
        let first = done.len();
        while done.len() - first < max {
            match self.ready.pop_front() {
                Some(c) => done.push(c),
                None => break,
            }
        }
        let from_ready = done.len() - first;
        let wait = if from_ready > 0 || self.in_flight == 0 {
            None
        } else {
            timeout
        };
        let got = if from_ready < max && self.in_flight > 0 {
            self.backend.poll(done, max - from_ready, wait)?
        } else {
            0
        };
        self.in_flight -= got.min(self.in_flight);
        for c in &mut done[first + from_ready..] {
            run_fallback(
                &mut self.fallback,
                self.config.delta.as_deref(),
                &mut self.stats,
                c,
            );
        }
        for c in &done[first..] {
            record(&mut self.stats, c);
        }
        if got > 0 {
            self.stats.set_depth(Instant::now(), self.in_flight);
        }
        Ok(done.len() - first)
    }

    /// Encodes `input` at once on this thread, when the backend runs its jobs so (the
    /// inline software backend, [`Backend::inline_codecs`]): the engine's shortest
    /// path, with no request, no batch and no poll, for a caller that would wait for
    /// the job anyway. The input is checked, an output buffer attached, and the frame
    /// counted, as for a job; `lengths` receives the per-page length table.
    ///
    /// Returns `None`, and the caller submits a job instead, whenever that path does
    /// not apply: a backend with queues or a device, no free output buffer, or earlier
    /// jobs not yet polled (this frame would overtake them). Otherwise the payload
    /// (its length set; unused when the outcome is `in_place`), or the job's error.
    /// Give the buffer back with [`Engine::recycle_buf`], or let the transport drop it.
    pub fn encode_now(
        &mut self,
        params: EncodeParams,
        input: &PageList<'_>,
        lengths: &mut Vec<u32>,
    ) -> Option<Result<(EncodeOutcome, EngineBuf), CodecError>> {
        if !self.inline || self.in_flight > 0 || !self.ready.is_empty() {
            return None;
        }
        let n = input.pages();
        // What depends on the parameters alone was checked for the last frame.
        let checked = self.now_checked == Some(params)
            && n != 0
            && n <= self.max_job_pages
            && input.bytes() <= self.probe.max_job_bytes
            && input.page_size() == self.config.page_size;
        let checked = match checked {
            true => Ok(()),
            false => self.check_encode(&self.probe, params, input),
        };
        if let Err(e) = checked {
            self.stats.rejected += 1;
            self.record_now(params, n, None);
            return Some(Err(e));
        }
        self.now_checked = Some(params);
        let mut buf = self.spare_bufs.pop().or_else(|| self.take_pool_buf())?;
        let (codecs, delta) = self.backend.inline_codecs()?;
        let out = match buf.get_mut() {
            Some(out) => codecs.encode(&params, input, delta, out, lengths),
            None => Err(CodecError::OutputTooSmall {
                need: max_payload_len(n, input.page_size()),
                have: 0,
            }),
        };
        self.stats.submitted += 1;
        self.stats.at_once += 1;
        // Each arm returns what it has: no outcome moved through a common exit.
        match out {
            Ok(out) => {
                buf.set_len(out.payload_len);
                self.record_now(params, n, Some(&out));
                Some(Ok((out, buf)))
            }
            Err(e) => {
                self.recycle_buf(buf);
                self.record_now(params, n, None);
                Some(Err(e))
            }
        }
    }

    /// Counts a frame of `n` pages that [`Engine::encode_now`] encoded with `params`
    /// as `out` (`None`: it failed).
    fn record_now(&mut self, params: EncodeParams, n: usize, out: Option<&EncodeOutcome>) {
        let (bytes_in, bytes_out, raw) = out.map_or((0, 0, false), |o| {
            (o.bytes_in, o.bytes_out(), o.codec != params.codec)
        });
        self.stats.record(
            true,
            params.codec,
            self.probe.backend,
            out.is_some(),
            n,
            bytes_in,
            bytes_out,
            raw,
        );
    }

    /// Whether the backend runs jobs on the caller's thread, so that
    /// [`Engine::encode_now`] may encode frames at once.
    pub fn is_inline(&self) -> bool {
        self.inline
    }

    /// An output buffer from the pool, with its atomic operations (none spare), counted.
    fn take_pool_buf(&mut self) -> Option<EngineBuf> {
        let buf = self.bufs.take()?;
        self.stats.pool_takes += 1;
        Some(buf)
    }

    /// Gives an output buffer back for reuse, as [`Engine::recycle`] does a
    /// completion's: to this engine's own spare buffers when it is this engine's and
    /// held only here, with no atomic read-modify-write; dropped otherwise.
    pub fn recycle_buf(&mut self, mut buf: EngineBuf) {
        if buf.is_unique() && self.bufs.owns(&buf) {
            buf.set_len(0);
            self.spare_bufs.push(buf);
        }
    }

    /// Makes guest memory reachable by the backend's device (see
    /// [`Backend::map_memory`]): call once per region per migration.
    ///
    /// # Safety
    /// As [`Backend::map_memory`].
    ///
    /// # Errors
    /// As [`Backend::map_memory`].
    pub unsafe fn map_memory(&mut self, addr: *mut u8, len: usize) -> Result<(), EngineError> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.backend.map_memory(addr, len) }
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.snapshot(
            Instant::now(),
            self.config.delta.as_ref().map(|d| d.stats()),
        );
        s.worker_cpu = self.backend.worker_cpu();
        s.backend = self.probe.backend;
        s
    }

    /// Restarts the statistics from zero (the delta cache keeps its own counters).
    pub fn reset_stats(&mut self) {
        let now = Instant::now();
        self.stats = StatsCounter::new(now);
        self.stats.set_depth(now, self.in_flight);
    }
}

/// Counts one completion in the statistics.
fn record(stats: &mut StatsCounter, c: &Completion) {
    let r = c.h.req();
    let (encode, codec) = match r.op {
        JobOp::Encode(p) => (true, p.codec),
        JobOp::Decode(codec) => (false, codec),
        JobOp::Idle => (false, CodecId(0)),
    };
    let (bytes_in, bytes_out, fallback) = match (&r.result, r.op) {
        (Ok(Some(o)), _) => (o.bytes_in, o.bytes_out(), o.codec != codec),
        (_, JobOp::Decode(_)) => (
            r.dest.bytes(),
            r.payload.as_ref().map_or(0, |p| p.len()),
            false,
        ),
        _ => (0, 0, false),
    };
    stats.record(
        encode,
        codec,
        c.backend(),
        r.result.is_ok(),
        c.pages(),
        bytes_in,
        bytes_out,
        fallback,
    );
}
