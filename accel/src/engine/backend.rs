//! What a codec backend is to the engine: the [`Backend`] trait, what it supports
//! ([`Probe`]) and which kind ran a job ([`BackendKind`]).

use core::time::Duration;
use std::collections::VecDeque;

use pagewire_protocol::CodecId;

use crate::cache::DeltaCache;
use crate::codec::{Codecs, Level};

use super::{Completion, EngineError, Job};

/// Which backend ran a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// The software codecs (worker threads or inline).
    Software,
    /// Intel In-Memory Analytics Accelerator.
    Iaa,
    /// Intel QuickAssist Technology.
    Qat,
}

impl BackendKind {
    /// A short lower-case name: `software`, `iaa`, `qat`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Software => "software",
            BackendKind::Iaa => "iaa",
            BackendKind::Qat => "qat",
        }
    }
}

/// What a backend can do with one format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FormatCaps {
    /// The format.
    pub codec: CodecId,
    /// Whether it can encode it.
    pub encode: bool,
    /// Whether it can decode it.
    pub decode: bool,
    /// Lowest encode level.
    pub min_level: Level,
    /// Highest encode level.
    pub max_level: Level,
}

impl FormatCaps {
    /// A format encoded (at `min_level..=max_level`) and decoded.
    pub fn both(codec: CodecId, min_level: Level, max_level: Level) -> FormatCaps {
        FormatCaps {
            codec,
            encode: true,
            decode: true,
            min_level,
            max_level,
        }
    }
}

/// What a backend supports, asked before use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The backend.
    pub backend: BackendKind,
    /// The formats it handles.
    pub formats: Vec<FormatCaps>,
    /// Most pages in one job.
    pub max_job_pages: usize,
    /// Most input bytes in one job.
    pub max_job_bytes: usize,
    /// Most jobs in flight at once.
    pub queue_depth: usize,
    /// Whether it can encode delta (it needs the sender's delta cache).
    pub delta_cache: bool,
}

impl Probe {
    pub(super) fn caps(&self, codec: CodecId) -> Option<&FormatCaps> {
        // Formats listed in id order from 1 (as the software codecs' are) are found
        // with one comparison.
        usize::from(codec.0)
            .checked_sub(1)
            .and_then(|i| self.formats.get(i))
            .filter(|f| f.codec == codec)
            .or_else(|| self.formats.iter().find(|f| f.codec == codec))
    }

    /// Whether the backend can encode `codec` at `level`.
    pub fn can_encode(&self, codec: CodecId, level: Level) -> bool {
        self.caps(codec)
            .is_some_and(|c| c.encode && level >= c.min_level && level <= c.max_level)
            && (codec != CodecId::DELTA || self.delta_cache)
    }

    /// Whether the backend can decode `codec`.
    pub fn can_decode(&self, codec: CodecId) -> bool {
        self.caps(codec).is_some_and(|c| c.decode)
    }
}

/// A batched codec backend: software workers, or a hardware queue.
///
/// A backend owns the jobs it accepted until it returns them as completions; it may
/// complete them in any order. Jobs reach it through [`Engine::submit`], which has
/// checked them against the backend's [`Probe`] and attached an output buffer to every
/// encode job.
///
/// A hardware backend that cannot finish a job on its device (queue full after its
/// retries, an unresolved page fault, an overflow it cannot settle, a device error, a
/// timeout, a lost device) returns it with [`Job::fall_back`] and a
/// [`FallbackCause`]; the engine runs it on software and counts it (see [`fallback`]).
/// It returns an `Err` only when it cannot take or complete jobs at all any more.
///
/// [`Engine::submit`]: super::Engine::submit
/// [`FallbackCause`]: super::FallbackCause
/// [`fallback`]: super::fallback
pub trait Backend: Send {
    /// CPU time of the backend's own worker threads so far (zero for a backend that
    /// runs jobs on the caller's thread or on a device).
    fn worker_cpu(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// What it supports.
    fn probe(&self) -> Probe;
    /// Takes jobs from the front of `jobs` while it has room and returns how many it
    /// took; the rest stay in `jobs`, in order.
    ///
    /// # Errors
    /// [`EngineError`] when the backend cannot take any job again.
    fn submit(&mut self, jobs: &mut VecDeque<Job>) -> Result<usize, EngineError>;
    /// Appends up to `max` completions to `done` and returns how many. With a
    /// `timeout`, waits up to that long for the first when none is ready.
    ///
    /// # Errors
    /// [`EngineError`] when the backend cannot complete jobs any more.
    fn poll(
        &mut self,
        done: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, EngineError>;
    /// Jobs accepted and not yet returned.
    fn in_flight(&self) -> usize;

    /// Runs `job` at once on the caller's thread, when this backend runs its jobs so
    /// (the inline software backend) and has room: `unpolled` completions wait for
    /// the caller's poll. [`RunNow::Queue`] (the default) leaves the job to
    /// [`Backend::submit`]. A job run so is never queued here, nor counted in the
    /// engine's busy time or queue depths: the engine hands its completion out at the
    /// next poll (until then [`Engine::in_flight`] counts it).
    ///
    /// [`Engine::in_flight`]: super::Engine::in_flight
    fn run_now(&mut self, job: &mut Job, unpolled: usize) -> RunNow {
        let _ = (job, unpolled);
        RunNow::Queue
    }

    /// The codecs this backend runs its jobs with on the caller's thread, and the delta
    /// cache it gives them, when it runs jobs so (the inline software backend):
    /// [`Engine::encode_now`] calls them itself. `None` (the default) for a backend
    /// with queues or a device.
    ///
    /// [`Engine::encode_now`]: super::Engine::encode_now
    fn inline_codecs(&mut self) -> Option<(&mut Codecs, Option<&DeltaCache>)> {
        None
    }

    /// Makes `len` bytes at `addr` (guest memory, once per migration) reachable by
    /// the backend's device; nothing to do for most backends. A VFIO device maps
    /// them into its IOMMU container.
    ///
    /// # Safety
    /// The range must stay allocated until the backend is dropped and be accessed
    /// only through raw pointers while the device may read or write it.
    ///
    /// # Errors
    /// [`EngineError::Backend`] when the mapping fails.
    unsafe fn map_memory(&mut self, addr: *mut u8, len: usize) -> Result<(), EngineError> {
        let _ = (addr, len);
        Ok(())
    }
}

/// What [`Backend::run_now`] did with a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunNow {
    /// It ran: the job is complete.
    Ran,
    /// It runs jobs at once, but as many completions as it allows wait to be polled:
    /// the job stays with the caller.
    Full,
    /// It does not run jobs at once: submit it.
    Queue,
}
