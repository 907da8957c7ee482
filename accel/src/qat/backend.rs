//! [`QatBackend`]: the engine's jobs as qatlib requests, one stateless deflate request
//! per page, submitted asynchronously and completed by polling the instance (qatlib
//! calls [`on_done`] from inside `icp_sal_DcPollInstance`).
//!
//! Memory: each page request's buffer lists point at the page itself (an encode's
//! input, a decode's destination: guest memory, no bounce copy) and at the job's
//! payload buffer; only the lists' private metadata and the sessions come from the
//! library's pinned allocator, once, when the backend is built. An encode writes page
//! `i`'s stream at `i × page_size` in the payload, with room for `page_size - 1`
//! bytes (a page that does not shrink overflows and is sent raw), and the streams are
//! packed together when the job completes.

use core::ffi::c_void;
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use core::time::Duration;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use pagewire_protocol::CodecId;

use super::QatConfig;
use super::ffi::{self, CpaBufferList, CpaDcOpData, CpaDcRqResults, CpaFlatBuffer};
use super::pinned::Pinned;
use super::runtime::{Instance, Runtime};
use crate::codec::{CodecError, EncodeOutcome, Level, check_table};
use crate::engine::{
    Backend, BackendKind, Completion, EngineConfig, EngineError, FallbackCause, FormatCaps, Job,
    JobOp, Probe,
};

/// Status of a page request not completed yet.
const PENDING: i32 = i32::MIN;

/// One page request: what qatlib reads (lists, op data) and writes (results).
#[repr(C)]
struct PageOp {
    src_flat: CpaFlatBuffer,
    dst_flat: CpaFlatBuffer,
    src_list: CpaBufferList,
    dst_list: CpaBufferList,
    op: CpaDcOpData,
    res: CpaDcRqResults,
    /// The callback's status, [`PENDING`] until it ran.
    status: AtomicI32,
    /// The job slot's count of completed requests.
    counter: *const AtomicU32,
}

/// qatlib's completion callback, run inside `icp_sal_DcPollInstance` on the polling
/// thread (which may be another engine's when engines share an instance).
///
/// # Safety
/// `tag` is the `PageOp` given with the request, alive until its counter says so.
unsafe extern "C" fn on_done(tag: *mut c_void, status: ffi::CpaStatus) {
    let op = tag.cast::<PageOp>();
    // SAFETY: the op and its slot counter outlive the request (the backend frees them
    // only when no request is in flight); only the atomics are touched here, and the
    // library wrote `res` before calling back.
    unsafe {
        (*op).status.store(status, Ordering::Relaxed);
        (*(*op).counter).fetch_add(1, Ordering::Release);
    }
}

/// A job being run on the device.
struct InFlight {
    job: Job,
    decode: bool,
    pages: usize,
    /// Next page to hand to the device.
    next: usize,
    /// Offset of page `next` in a decode's payload.
    src_off: usize,
    /// Pages settled without the device (a decode's raw pages).
    local: u32,
    /// The session (per level) the job runs on.
    session: *mut c_void,
    /// Why the job goes back to software, once its requests have completed.
    failed: Option<FallbackCause>,
    /// Since when the instance has answered "retry" for this job.
    busy_since: Option<Instant>,
}

/// The QAT backend (see the module documentation).
pub struct QatBackend {
    config: QatConfig,
    max_pages: usize,
    page_size: usize,
    ops: *mut PageOp,
    n_ops: usize,
    counters: Box<[AtomicU32]>,
    /// Freed after the page requests, unless the device may still use it.
    meta: core::mem::ManuallyDrop<Pinned>,
    jobs: Vec<Option<InFlight>>,
    free: Vec<usize>,
    ready: VecDeque<Completion>,
    lost: Option<Instant>,
    inst: Arc<Instance>,
    _rt: Arc<Runtime>,
    /// Requests answered "retry" (instance busy) and submitted again.
    pub(crate) retries: u64,
}

// SAFETY: the raw pointers are the backend's own page-request array and sessions;
// qatlib's callbacks on other threads touch only the atomics of in-flight requests
// (see `on_done`), everything else is used through `&mut self`.
unsafe impl Send for QatBackend {}

impl core::fmt::Debug for QatBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QatBackend")
            .field("instance", &self.inst.name)
            .field("in_flight", &self.in_flight())
            .field("lost", &self.lost.is_some())
            .finish_non_exhaustive()
    }
}

fn unavailable(reason: impl Into<String>) -> EngineError {
    EngineError::Unavailable {
        backend: BackendKind::Qat,
        reason: reason.into(),
    }
}

/// The qatlib compression level (`CPA_DC_L1..=L12`) for an engine level (`DEFAULT`
/// is 6).
fn cpa_level(level: Level) -> u32 {
    if level == Level::DEFAULT {
        6
    } else {
        level.0.clamp(1, 12) as u32
    }
}

impl QatBackend {
    /// Opens qatlib (`config.libraries`), takes an instance and pre-allocates the
    /// requests for `config.queue_depth` jobs of `engine.max_pages` pages.
    ///
    /// # Errors
    /// [`EngineError::Unavailable`] saying why QAT cannot be used here;
    /// [`EngineError::Config`] for a zero queue depth.
    pub fn new(config: QatConfig, engine: &EngineConfig) -> Result<QatBackend, EngineError> {
        if config.queue_depth == 0 {
            return Err(EngineError::Config("QAT queue_depth must be at least 1"));
        }
        let page_size = engine.page_size.bytes();
        let rt = Runtime::get(&config.libraries).map_err(|e| unavailable(e.to_string()))?;
        let inst = rt.pick();
        let max_pages = engine.max_pages;
        let n_ops = config.queue_depth * max_pages;
        let meta_size = inst.meta_size.next_multiple_of(64).max(64);
        let meta = Pinned::new(&inst.lib, 2 * n_ops * meta_size, 64)
            .ok_or_else(|| unavailable("qaeMemAllocNUMA: no pinned memory for buffer-list metadata (are huge pages reserved for qatlib?)"))?;
        let counters: Box<[AtomicU32]> =
            (0..config.queue_depth).map(|_| AtomicU32::new(0)).collect();
        let zero_flat = CpaFlatBuffer {
            dataLenInBytes: 0,
            pData: core::ptr::null_mut(),
        };
        let zero_list = CpaBufferList {
            numBuffers: 1,
            pBuffers: core::ptr::null_mut(),
            pUserData: core::ptr::null_mut(),
            pPrivateMetaData: core::ptr::null_mut(),
        };
        let mut ops: Vec<PageOp> = (0..n_ops)
            .map(|i| PageOp {
                src_flat: zero_flat,
                dst_flat: zero_flat,
                src_list: zero_list,
                dst_list: zero_list,
                op: CpaDcOpData {
                    flushFlag: ffi::CPA_DC_FLUSH_FINAL,
                    compressAndVerify: if config.verify {
                        ffi::CPA_TRUE
                    } else {
                        ffi::CPA_FALSE
                    },
                    compressAndVerifyAndRecover: ffi::CPA_FALSE,
                    integrityCrcCheck: ffi::CPA_FALSE,
                    verifyHwIntegrityCrcs: ffi::CPA_FALSE,
                    integrityCrcSize: 0,
                    inputSkipData: Default::default(),
                    outputSkipData: Default::default(),
                    pCrcData: core::ptr::null_mut(),
                },
                res: CpaDcRqResults::default(),
                status: AtomicI32::new(PENDING),
                counter: &counters[i / max_pages],
            })
            .collect();
        let base = meta.as_ptr().cast::<u8>();
        for (i, op) in ops.iter_mut().enumerate() {
            // Each request's two metadata blocks, inside `meta`.
            op.src_list.pPrivateMetaData = base.wrapping_add(2 * i * meta_size).cast();
            op.dst_list.pPrivateMetaData = base.wrapping_add((2 * i + 1) * meta_size).cast();
        }
        let ops = Box::into_raw(ops.into_boxed_slice()).cast::<PageOp>();
        // Lists point at their own flat buffers: set once the array has its address.
        for i in 0..n_ops {
            // SAFETY: `i < n_ops`, inside the array just leaked; no request is in
            // flight yet.
            unsafe {
                let op = ops.add(i);
                (*op).src_list.pBuffers = addr_of_mut!((*op).src_flat);
                (*op).dst_list.pBuffers = addr_of_mut!((*op).dst_flat);
            }
        }
        Ok(QatBackend {
            max_pages,
            page_size,
            ops,
            n_ops,
            counters,
            meta: core::mem::ManuallyDrop::new(meta),
            jobs: (0..config.queue_depth).map(|_| None).collect(),
            free: (0..config.queue_depth).rev().collect(),
            ready: VecDeque::new(),
            lost: None,
            inst,
            _rt: rt,
            retries: 0,
            config,
        })
    }

    /// The instance this backend submits to.
    pub fn instance_name(&self) -> &str {
        &self.inst.name
    }

    fn op(&self, slot: usize, page: usize) -> *mut PageOp {
        debug_assert!(slot * self.max_pages + page < self.n_ops);
        self.ops.wrapping_add(slot * self.max_pages + page)
    }

    /// Takes a job: into a free slot (returned) for the device, or completed at once
    /// (`None`); gives it back when no slot is free.
    fn accept(&mut self, mut job: Job) -> Result<Option<usize>, Job> {
        let Some(slot) = self.free.pop() else {
            return Err(job);
        };
        let (decode, pages, level) = match job.op() {
            JobOp::Encode(p) => (false, job.input().pages(), p.level),
            JobOp::Decode(_) => (true, job.parts_mut().dest.pages(), Level::DEFAULT),
            JobOp::Idle => (false, 0, Level::DEFAULT),
        };
        self.counters[slot].store(0, Ordering::Relaxed);
        if self.lost.is_some() {
            self.free.push(slot);
            self.ready
                .push_back(job.fall_back(BackendKind::Qat, FallbackCause::DeviceLost));
            return Ok(None);
        }
        if let Err(e) = self.check(&mut job, decode, pages) {
            self.free.push(slot);
            job.set_result(Err(e));
            self.ready.push_back(job.complete(BackendKind::Qat));
            return Ok(None);
        }
        let session = match self.inst.session(cpa_level(level), on_done) {
            Ok(s) => s,
            Err(_) => {
                self.free.push(slot);
                self.ready
                    .push_back(job.fall_back(BackendKind::Qat, FallbackCause::DeviceError));
                return Ok(None);
            }
        };
        self.jobs[slot] = Some(InFlight {
            job,
            decode,
            pages,
            next: 0,
            src_off: 0,
            local: 0,
            session,
            failed: None,
            busy_since: None,
        });
        Ok(Some(slot))
    }

    /// What must hold before a job's pages go to the device.
    fn check(&self, job: &mut Job, decode: bool, pages: usize) -> Result<(), CodecError> {
        let ps = self.page_size;
        let codec = CodecId::DEFLATE;
        let parts = job.parts_mut();
        if pages == 0 || pages > self.max_pages {
            return Err(CodecError::TooManyPages {
                pages,
                max: self.max_pages,
            });
        }
        let Some(payload) = parts.payload else {
            return Err(CodecError::OutputTooSmall {
                need: pages * ps,
                have: 0,
            });
        };
        if decode {
            check_table(codec, payload.len(), parts.lengths, pages, ps)?;
        } else if payload.capacity() < pages * ps || !payload.is_unique() {
            return Err(CodecError::OutputTooSmall {
                need: pages * ps,
                have: payload.capacity(),
            });
        }
        Ok(())
    }

    /// Hands the next pages of slot `slot` to the device until it is busy; `false`
    /// when the instance answered "retry".
    fn submit_pages(&mut self, slot: usize) -> bool {
        let ps = self.page_size;
        let ops = self.ops;
        let max_pages = self.max_pages;
        let inst = self.inst.clone();
        let Some(f) = self.jobs[slot].as_mut() else {
            return true;
        };
        let parts = f.job.parts_mut();
        let Some(payload) = parts.payload else {
            f.failed = Some(FallbackCause::DeviceError);
            return true;
        };
        let payload_ptr = if f.decode {
            payload.as_ptr().cast_mut()
        } else {
            match payload.get_mut() {
                Some(b) => b.as_mut_ptr(),
                None => {
                    f.failed = Some(FallbackCause::DeviceError);
                    return true;
                }
            }
        };
        let _g = inst.lock.lock().unwrap_or_else(|e| e.into_inner());
        while f.next < f.pages && f.failed.is_none() {
            let i = f.next;
            let op = ops.wrapping_add(slot * max_pages + i);
            let (src, src_len, dst, dst_len) = if f.decode {
                let len = parts.lengths[i] as usize;
                let Some(dst) = parts.dest.page_mut(i) else {
                    f.failed = Some(FallbackCause::DeviceError);
                    break;
                };
                let src = payload_ptr.wrapping_add(f.src_off);
                if len == ps {
                    // A raw page: no device needed.
                    // SAFETY: `src` is `ps` bytes inside the payload (the table adds
                    // up to its length, checked in `check`); `dst` is a whole page of
                    // the destination list, reserved for this job.
                    unsafe { core::ptr::copy_nonoverlapping(src, dst, ps) };
                    f.local += 1;
                    f.src_off += len;
                    f.next += 1;
                    continue;
                }
                (src, len, dst, ps)
            } else {
                let Some((src, _)) = parts.input.page(i) else {
                    f.failed = Some(FallbackCause::DeviceError);
                    break;
                };
                (src.cast_mut(), ps, payload_ptr.wrapping_add(i * ps), ps - 1)
            };
            // SAFETY: `op` is this slot's request `i`, not in flight (its page was not
            // submitted yet). The buffers stay valid until the request completes:
            // `src`/`dst` point into the job's pages and payload, which the job (held
            // in `self.jobs[slot]` until every request completed) keeps alive; the
            // lists' metadata is in `self.meta`; the device writes at most
            // `dst_len` bytes. The instance lock is held.
            let status = unsafe {
                (*op).src_flat = CpaFlatBuffer {
                    dataLenInBytes: src_len as u32,
                    pData: src,
                };
                (*op).dst_flat = CpaFlatBuffer {
                    dataLenInBytes: dst_len as u32,
                    pData: dst,
                };
                (*op).res = CpaDcRqResults::default();
                (*op).status.store(PENDING, Ordering::Relaxed);
                let submit = if f.decode {
                    inst.lib.cpaDcDecompressData2
                } else {
                    inst.lib.cpaDcCompressData2
                };
                submit(
                    inst.handle,
                    f.session,
                    addr_of_mut!((*op).src_list),
                    addr_of_mut!((*op).dst_list),
                    addr_of_mut!((*op).op),
                    addr_of_mut!((*op).res),
                    op.cast(),
                )
            };
            match status {
                ffi::CPA_STATUS_SUCCESS => {
                    f.busy_since = None;
                    if f.decode {
                        f.src_off += src_len;
                    }
                    f.next += 1;
                }
                ffi::CPA_STATUS_RETRY => {
                    self.retries += 1;
                    let since = *f.busy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.config.busy_timeout {
                        f.failed = Some(FallbackCause::QueueFull);
                    }
                    return false;
                }
                ffi::CPA_STATUS_FAIL | ffi::CPA_STATUS_FATAL => {
                    f.failed = Some(FallbackCause::DeviceLost);
                    self.lost.get_or_insert_with(Instant::now);
                }
                _ => f.failed = Some(FallbackCause::DeviceError),
            }
        }
        true
    }

    /// Polls the instance and resubmits what it had refused.
    fn drive(&mut self) {
        {
            let _g = self.inst.lock.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: a started instance; callbacks run `on_done` on requests whose
            // ops are alive (see `on_done`).
            let s = unsafe { (self.inst.lib.icp_sal_DcPollInstance)(self.inst.handle, 0) };
            if s == ffi::CPA_STATUS_FAIL || s == ffi::CPA_STATUS_FATAL {
                self.lost.get_or_insert_with(Instant::now);
            }
        }
        for slot in 0..self.jobs.len() {
            let resubmit = self.jobs[slot]
                .as_ref()
                .is_some_and(|f| f.next < f.pages && f.failed.is_none());
            if resubmit {
                if self.lost.is_some() {
                    if let Some(f) = self.jobs[slot].as_mut() {
                        f.failed = Some(FallbackCause::DeviceLost);
                    }
                } else if !self.submit_pages(slot) {
                    break;
                }
            }
        }
    }

    /// Moves finished jobs to `ready`.
    fn collect(&mut self) {
        for slot in 0..self.jobs.len() {
            let Some(f) = self.jobs[slot].as_ref() else {
                continue;
            };
            let settled = self.counters[slot].load(Ordering::Acquire) as usize + f.local as usize;
            let finished = if f.failed.is_some() {
                settled == f.next
            } else {
                f.next == f.pages && settled == f.pages
            };
            if !finished {
                continue;
            }
            let Some(f) = self.jobs[slot].take() else {
                continue;
            };
            self.free.push(slot);
            let c = self.finish(slot, f);
            self.ready.push_back(c);
        }
    }

    /// Turns a job whose requests all completed into its completion.
    fn finish(&self, slot: usize, mut f: InFlight) -> Completion {
        if let Some(cause) = f.failed {
            return f.job.fall_back(BackendKind::Qat, cause);
        }
        let ps = self.page_size;
        let lost = self.lost.is_some();
        let mut cause = None;
        {
            let parts = f.job.parts_mut();
            for i in 0..f.pages {
                let op = self.op(slot, i);
                if f.decode && parts.lengths[i] as usize == ps {
                    continue;
                }
                // SAFETY: the request completed (the slot counter, read with Acquire,
                // counted it), so the library no longer writes `res` or `status`.
                let (status, res) = unsafe { ((*op).status.load(Ordering::Relaxed), (*op).res) };
                if status != ffi::CPA_STATUS_SUCCESS {
                    cause = Some(if lost || status == ffi::CPA_STATUS_FAIL {
                        FallbackCause::DeviceLost
                    } else {
                        FallbackCause::DeviceError
                    });
                    break;
                }
                let ok = if f.decode {
                    res.status == ffi::CPA_DC_OK
                        && res.produced as usize == ps
                        && res.consumed == parts.lengths[i]
                } else {
                    res.status == ffi::CPA_DC_OVERFLOW
                        || (res.status == ffi::CPA_DC_OK
                            && res.produced > 0
                            && (res.produced as usize) < ps
                            && res.consumed as usize == ps)
                };
                if !ok {
                    // A verify failure, a device error, or (decode) a stream the
                    // device did not accept: the software codecs redo the job and
                    // report a corrupt payload as such.
                    cause = Some(if res.status == ffi::CPA_DC_OVERFLOW {
                        FallbackCause::OutputOverflow
                    } else {
                        FallbackCause::DeviceError
                    });
                    break;
                }
            }
        }
        if let Some(cause) = cause {
            return f.job.fall_back(BackendKind::Qat, cause);
        }
        if f.decode {
            f.job.set_result(Ok(None));
            return f.job.complete(BackendKind::Qat);
        }
        // Pack the page streams; pages that overflowed go raw.
        let parts = f.job.parts_mut();
        let bytes_in = f.pages * ps;
        let Some(payload) = parts.payload else {
            return f
                .job
                .fall_back(BackendKind::Qat, FallbackCause::DeviceError);
        };
        let Some(buf) = payload.get_mut() else {
            return f
                .job
                .fall_back(BackendKind::Qat, FallbackCause::DeviceError);
        };
        parts.lengths.clear();
        let mut pos = 0usize;
        for i in 0..f.pages {
            let op = self.op(slot, i);
            // SAFETY: completed request (see above).
            let res = unsafe { (*op).res };
            if res.status == ffi::CPA_DC_OK {
                let len = res.produced as usize;
                buf.copy_within(i * ps..i * ps + len, pos);
                parts.lengths.push(len as u32);
                pos += len;
            } else {
                // Overflow: the page does not shrink. `pos + ps <= (i + 1) * ps`, so
                // this never overwrites a later page's stream.
                match parts.input.page(i) {
                    Some((src, _)) => {
                        // SAFETY: `src` is a readable page of the input list (its
                        // contract); the copy is the raw-pointer read of the guest
                        // page every codec makes (see `pages`).
                        unsafe {
                            core::ptr::copy_nonoverlapping(src, buf[pos..pos + ps].as_mut_ptr(), ps)
                        };
                    }
                    None => {
                        return f
                            .job
                            .fall_back(BackendKind::Qat, FallbackCause::DeviceError);
                    }
                }
                parts.lengths.push(ps as u32);
                pos += ps;
            }
        }
        let codec = if pos >= bytes_in {
            parts.lengths.clear();
            CodecId::RAW
        } else {
            CodecId::DEFLATE
        };
        payload.set_len(pos);
        f.job.set_result(Ok(Some(EncodeOutcome {
            codec,
            payload_len: pos,
            in_place: false,
            bytes_in,
        })));
        f.job.complete(BackendKind::Qat)
    }

    /// An error once the device failed and requests it holds did not complete in
    /// time (their memory stays allocated: the device might still write it).
    fn device_stuck(&self) -> Option<EngineError> {
        let lost = self.lost?;
        if lost.elapsed() < self.config.device_timeout || !self.outstanding() {
            return None;
        }
        Some(EngineError::Backend {
            backend: BackendKind::Qat,
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "QAT instance {} failed and its requests in flight did not complete within {:?}",
                    self.inst.name, self.config.device_timeout
                ),
            ),
        })
    }

    /// Whether the device holds requests that have not completed.
    fn outstanding(&self) -> bool {
        self.jobs.iter().enumerate().any(|(s, f)| {
            f.as_ref().is_some_and(|f| {
                (self.counters[s].load(Ordering::Acquire) as usize + f.local as usize) < f.next
            })
        })
    }
}

impl Backend for QatBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qat
    }

    fn probe(&self) -> Probe {
        Probe {
            backend: BackendKind::Qat,
            formats: vec![FormatCaps::both(CodecId::DEFLATE, Level(0), Level(12))],
            max_job_pages: self.max_pages,
            max_job_bytes: usize::MAX,
            queue_depth: self.config.queue_depth,
            delta_cache: false,
        }
    }

    fn submit(&mut self, jobs: &mut VecDeque<Job>) -> Result<usize, EngineError> {
        let mut taken = 0;
        while let Some(job) = jobs.pop_front() {
            match self.accept(job) {
                Ok(None) => taken += 1,
                Ok(Some(slot)) => {
                    taken += 1;
                    // While the instance is busy the next jobs wait in `jobs`; this
                    // one's remaining pages are resubmitted by `poll`.
                    if !self.submit_pages(slot) {
                        break;
                    }
                }
                Err(job) => {
                    jobs.push_front(job);
                    break;
                }
            }
        }
        Ok(taken)
    }

    fn poll(
        &mut self,
        done: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, EngineError> {
        let deadline = timeout.map(crate::deadline::from_now);
        let mut got = 0;
        loop {
            if self.in_flight() > self.ready.len() {
                self.drive();
                self.collect();
            }
            while got < max {
                let Some(c) = self.ready.pop_front() else {
                    break;
                };
                done.push(c);
                got += 1;
            }
            if got > 0 || self.in_flight() == 0 {
                break;
            }
            if let Some(e) = self.device_stuck() {
                return Err(e);
            }
            match deadline {
                Some(d) if Instant::now() < d => std::thread::yield_now(),
                _ => break,
            }
        }
        Ok(got)
    }

    fn in_flight(&self) -> usize {
        self.jobs.iter().flatten().count() + self.ready.len()
    }
}

impl Drop for QatBackend {
    fn drop(&mut self) {
        // Let the device finish what it holds before its memory is freed.
        let give_up = crate::deadline::from_now(self.config.device_timeout);
        loop {
            if !self.outstanding() {
                break;
            }
            if Instant::now() >= give_up {
                // The device may still write into these: never free them.
                for f in self.jobs.iter_mut().filter_map(Option::take) {
                    core::mem::forget(f);
                }
                return;
            }
            self.drive();
            std::thread::yield_now();
        }
        // SAFETY: no request is in flight; the array was leaked from a boxed slice of
        // `n_ops` ops in `new` and is freed once here.
        drop(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(self.ops, self.n_ops)) });
        // SAFETY: dropped once, here, after the last request that used it.
        unsafe { core::mem::ManuallyDrop::drop(&mut self.meta) };
    }
}
