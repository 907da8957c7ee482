//! The software backend: the reference codecs on worker threads, or inline on the
//! caller's thread.
//!
//! With `threads > 0`, jobs travel to the workers through a bounded lock-free queue
//! (crossbeam's array channel) and come back through another; each worker owns its
//! [`Codecs`] contexts, so nothing is shared on the hot path except the delta cache's
//! per-shard locks. With `threads == 0`, [`Backend::submit`] runs the jobs at once on
//! the caller's thread and [`Backend::poll`] hands them back.

use core::time::Duration;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError, bounded};

use super::{Backend, BackendKind, Completion, EngineError, FormatCaps, Job, Probe, RunNow};
use crate::cache::DeltaCache;
use crate::codec::{Codecs, SOFTWARE_FORMATS, level_range};

/// How the software backend runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftwareConfig {
    /// Worker threads; 0 runs every job inline, on the thread that submits it. At
    /// most 1024.
    pub threads: usize,
    /// Most jobs in flight (queued, running, or done and not yet polled), 1 to 2^24.
    pub queue_depth: usize,
}

/// Most worker threads of one software backend.
const MAX_THREADS: usize = 1024;

impl Default for SoftwareConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            queue_depth: 64,
        }
    }
}

enum Mode {
    Inline {
        codecs: Box<Codecs>,
        done: VecDeque<Completion>,
    },
    Threads {
        jobs: Option<Sender<Job>>,
        done: Receiver<Completion>,
        workers: Vec<JoinHandle<()>>,
    },
}

/// The software backend (see the module documentation).
pub struct SoftwareBackend {
    mode: Mode,
    delta: Option<Arc<DeltaCache>>,
    queue_depth: usize,
    max_pages: usize,
    in_flight: usize,
    /// CPU nanoseconds the worker threads spent on jobs.
    cpu_ns: Arc<AtomicU64>,
}

impl core::fmt::Debug for SoftwareBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SoftwareBackend")
            .field("queue_depth", &self.queue_depth)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl SoftwareBackend {
    /// Starts the backend for jobs of at most `max_pages` pages.
    ///
    /// # Errors
    /// [`EngineError::Config`] for a queue depth or thread count out of range;
    /// [`EngineError::Spawn`] when a worker thread cannot start.
    pub fn new(
        config: SoftwareConfig,
        max_pages: usize,
        delta: Option<Arc<DeltaCache>>,
    ) -> Result<Self, EngineError> {
        if config.queue_depth == 0 || config.queue_depth > super::home::MAX_REQUESTS {
            return Err(EngineError::Config(
                "software queue_depth must be in 1..=2^24",
            ));
        }
        if config.threads > MAX_THREADS {
            return Err(EngineError::Config("software threads must be at most 1024"));
        }
        let cpu_ns = Arc::new(AtomicU64::new(0));
        let mode = if config.threads == 0 {
            Mode::Inline {
                codecs: Box::new(Codecs::new()),
                done: VecDeque::with_capacity(config.queue_depth),
            }
        } else {
            let (job_tx, job_rx) = bounded::<Job>(config.queue_depth);
            let (done_tx, done_rx) = bounded::<Completion>(config.queue_depth);
            let mut workers = Vec::with_capacity(config.threads);
            for i in 0..config.threads {
                let rx = job_rx.clone();
                let tx = done_tx.clone();
                let delta = delta.clone();
                let cpu = cpu_ns.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("pagewire-codec-{i}"))
                    .spawn(move || worker(rx, tx, delta, &cpu))
                    .map_err(EngineError::Spawn)?;
                workers.push(handle);
            }
            Mode::Threads {
                jobs: Some(job_tx),
                done: done_rx,
                workers,
            }
        };
        Ok(SoftwareBackend {
            mode,
            delta,
            queue_depth: config.queue_depth,
            max_pages,
            in_flight: 0,
            cpu_ns,
        })
    }
}

fn worker(
    jobs: Receiver<Job>,
    done: Sender<Completion>,
    delta: Option<Arc<DeltaCache>>,
    cpu_ns: &AtomicU64,
) {
    let mut codecs = Codecs::new();
    let mut counted = crate::cpu::thread_cpu_time();
    while let Ok(mut job) = jobs.recv() {
        job.run_software(&mut codecs, delta.as_deref());
        let now = crate::cpu::thread_cpu_time();
        cpu_ns.fetch_add(
            u64::try_from(now.saturating_sub(counted).as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        counted = now;
        if done.send(job.complete(BackendKind::Software)).is_err() {
            return;
        }
    }
}

/// What the software codecs do: every format of [`SOFTWARE_FORMATS`] both ways, delta
/// only with a delta cache.
pub(crate) fn probe(max_pages: usize, queue_depth: usize, delta_cache: bool) -> Probe {
    let formats = SOFTWARE_FORMATS
        .iter()
        .filter_map(|&codec| {
            let (min_level, max_level) = level_range(codec)?;
            Some(FormatCaps::both(codec, min_level, max_level))
        })
        .collect();
    Probe {
        backend: BackendKind::Software,
        formats,
        max_job_pages: max_pages,
        max_job_bytes: usize::MAX,
        queue_depth,
        delta_cache,
    }
}

impl Backend for SoftwareBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Software
    }

    fn worker_cpu(&self) -> Duration {
        Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed))
    }

    fn probe(&self) -> Probe {
        probe(self.max_pages, self.queue_depth, self.delta.is_some())
    }

    fn submit(&mut self, jobs: &mut VecDeque<Job>) -> Result<usize, EngineError> {
        let mut taken = 0;
        while self.in_flight < self.queue_depth {
            let Some(mut job) = jobs.pop_front() else {
                break;
            };
            match &mut self.mode {
                Mode::Inline { codecs, done } => {
                    job.run_software(codecs, self.delta.as_deref());
                    done.push_back(job.complete(BackendKind::Software));
                }
                Mode::Threads { jobs: tx, .. } => {
                    let Some(tx) = tx.as_ref() else {
                        jobs.push_front(job);
                        return Err(EngineError::Disconnected(BackendKind::Software));
                    };
                    match tx.try_send(job) {
                        Ok(()) => {}
                        Err(TrySendError::Full(job)) => {
                            jobs.push_front(job);
                            break;
                        }
                        Err(TrySendError::Disconnected(job)) => {
                            jobs.push_front(job);
                            return Err(EngineError::Disconnected(BackendKind::Software));
                        }
                    }
                }
            }
            self.in_flight += 1;
            taken += 1;
        }
        Ok(taken)
    }

    fn poll(
        &mut self,
        out: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, EngineError> {
        let mut got = 0;
        match &mut self.mode {
            Mode::Inline { done, .. } => {
                while got < max {
                    let Some(c) = done.pop_front() else { break };
                    out.push(c);
                    got += 1;
                }
            }
            Mode::Threads { done, .. } => {
                while got < max {
                    match done.try_recv() {
                        Ok(c) => {
                            out.push(c);
                            got += 1;
                        }
                        Err(TryRecvError::Empty) => {
                            let Some(t) = timeout.filter(|_| got == 0 && self.in_flight > 0) else {
                                break;
                            };
                            match done.recv_timeout(t) {
                                Ok(c) => {
                                    out.push(c);
                                    got += 1;
                                }
                                Err(RecvTimeoutError::Timeout) => break,
                                Err(RecvTimeoutError::Disconnected) => {
                                    return Err(EngineError::Disconnected(BackendKind::Software));
                                }
                            }
                        }
                        Err(TryRecvError::Disconnected) => {
                            return Err(EngineError::Disconnected(BackendKind::Software));
                        }
                    }
                }
            }
        }
        self.in_flight -= got.min(self.in_flight);
        Ok(got)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn inline_codecs(&mut self) -> Option<(&mut Codecs, Option<&DeltaCache>)> {
        match &mut self.mode {
            Mode::Inline { codecs, .. } => Some((codecs, self.delta.as_deref())),
            Mode::Threads { .. } => None,
        }
    }

    fn run_now(&mut self, job: &mut Job, unpolled: usize) -> RunNow {
        match &mut self.mode {
            // Done and not yet polled counts against the queue depth, as it does
            // for jobs submitted.
            Mode::Inline { .. } if unpolled + self.in_flight >= self.queue_depth => RunNow::Full,
            Mode::Inline { codecs, .. } => {
                job.run_software(codecs, self.delta.as_deref());
                RunNow::Ran
            }
            Mode::Threads { .. } => RunNow::Queue,
        }
    }
}

impl Drop for SoftwareBackend {
    fn drop(&mut self) {
        if let Mode::Threads {
            jobs,
            workers,
            done,
        } = &mut self.mode
        {
            // Closing the job queue ends each worker after its current job.
            jobs.take();
            // Drain completions so no worker blocks on a full completion queue.
            for handle in workers.drain(..) {
                while !handle.is_finished() {
                    while done.try_recv().is_ok() {}
                    std::thread::yield_now();
                }
                let _ = handle.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{EncodeParams, Level};
    use crate::engine::{Engine, EngineConfig, Tag};
    use crate::page::PageKey;
    use crate::pool::EngineBuf;
    use pagewire_protocol::CodecId;

    fn jobs(engine: &Engine, n: u64) -> VecDeque<Job> {
        (0..n)
            .map(|i| {
                let mut job = engine.job().expect("free request");
                let pages = EngineBuf::from_vec(vec![i as u8; 8 * 4096]);
                job.encode_buf(
                    Tag(i),
                    EncodeParams::new(CodecId::DEFLATE, Level(9)),
                    pages,
                    PageKey(0),
                )
                .expect("pages");
                job
            })
            .collect()
    }

    #[test]
    fn dropping_the_engine_with_jobs_in_flight_finishes_them_and_joins() {
        let config = EngineConfig {
            requests: 16,
            buffers: 16,
            ..Default::default()
        };
        let mut engine = Engine::software(
            config,
            SoftwareConfig {
                threads: 2,
                queue_depth: 16,
            },
        )
        .expect("engine");
        let mut batch = jobs(&engine, 12);
        assert_eq!(engine.submit(&mut batch).expect("submit"), 12);
        drop(engine); // must neither hang nor leave a worker reading freed memory
    }

    #[test]
    fn inline_mode_runs_on_the_callers_thread_at_submit() {
        let mut backend = SoftwareBackend::new(
            SoftwareConfig {
                threads: 0,
                queue_depth: 3,
            },
            8,
            None,
        )
        .expect("backend");
        let engine =
            Engine::software(EngineConfig::default(), SoftwareConfig::default()).expect("engine");
        let mut batch = jobs(&engine, 5);
        assert_eq!(backend.submit(&mut batch).expect("submit"), 3);
        assert_eq!(backend.in_flight(), 3);
        let mut done = Vec::new();
        assert_eq!(backend.poll(&mut done, 2, None).expect("poll"), 2);
        assert_eq!(backend.poll(&mut done, 8, None).expect("poll"), 1);
        assert_eq!(backend.in_flight(), 0);
        // Straight to the backend, the encode jobs lack the output buffer the engine
        // attaches: they fail cleanly instead of writing anywhere.
        assert!(done.iter().all(|c| c.backend() == BackendKind::Software
            && matches!(
                c.status(),
                Err(crate::codec::CodecError::OutputTooSmall { have: 0, .. })
            )));
        let probe = backend.probe();
        assert_eq!(probe.formats.len(), SOFTWARE_FORMATS.len());
        assert!(!probe.delta_cache);
    }
}
