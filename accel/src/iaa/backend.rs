//! The IAA [`Backend`]: engine jobs become one descriptor per page on a [`Portal`].
//!
//! - Encode (`deflate-4k`, and `deflate` at 4 KiB pages where the two are the same
//!   bytes): each page is compressed by the device straight from guest memory into a
//!   page-sized slot of the backend's output area, capped at `page_size - 1` bytes so
//!   an incompressible page fails fast (`OUTPUT_OVERFLOW`) and goes raw; the finished
//!   streams are packed into the job's payload with their length table.
//! - Huffman code ([`Huffman`], by default from the job's level): level 1 uses the
//!   device's fixed code, one descriptor per page; every other level (the default
//!   included) uses a dynamic code per page, two descriptors: a statistics pass whose
//!   histogram the device writes into the table region of the page's AECS, then, once
//!   the host has built the code and the block header into that AECS
//!   ([`super::aecs`]), the compression with it. Level 1 is "fastest": the dynamic
//!   path costs a second descriptor, a second device round trip and the host's table
//!   build per page, for (on text-like pages) a markedly better ratio. A page whose
//!   header would not fit the AECS accumulator is compressed with the fixed code.
//! - Decode: each compressed page is inflated by the device from the payload straight
//!   into its destination guest page; raw pages are copied by the CPU.
//! - Submission: the backend never has more of its own descriptors on the device
//!   than the queue has entries (it waits for its oldest to complete, which a
//!   dedicated queue requires and which keeps a shared one from refusing it for its
//!   own load); `ENQCMD` refused by a shared queue (other submitters) is retried up
//!   to [`IaaConfig::retries`] times. A queue still busy after that sends the job to
//!   software at once
//!   ([`FallbackCause::QueueFull`]), as soon as its descriptors already on the device
//!   have completed (their buffers are the job's).
//! - Completion: records are polled; with a timeout, the backend waits on the oldest
//!   pending record (`UMWAIT` where the CPU has WAITPKG, else a bounded spin).
//! - Faults: a page fault is resolved by touching the faulting page and resubmitting
//!   that descriptor once, then [`FallbackCause::PageFault`]; an error status
//!   is [`FallbackCause::DeviceError`] (software then decides whether the payload was
//!   corrupt); a descriptor without completion after [`IaaConfig::timeout`] is
//!   [`FallbackCause::Timeout`], and a disabled device [`FallbackCause::DeviceLost`]:
//!   after either, the backend stops using the device (its state is unknown) and
//!   every later job goes to software with `DeviceLost`. The buffers of abandoned
//!   descriptors (output slot, completion records) are never reused.

use core::time::Duration;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use pagewire_protocol::CodecId;

use super::aecs::{AECS_SIZE, Aecs};
use super::desc::{CompletionRecord, Descriptor, Status};
use super::portal::{CpuFeatures, Enqueue, Portal, wait_record};
use crate::codec::{CodecError, Level, check_table, per_page_done};
use crate::engine::{
    Backend, BackendKind, Completion, EngineError, FallbackCause, FormatCaps, Job, JobOp, Probe,
};
use crate::page::PageSize;

/// How the IAA backend runs.
#[derive(Clone, Copy, Debug)]
pub struct IaaConfig {
    /// Page size of every job.
    pub page_size: PageSize,
    /// Most pages per job.
    pub max_pages: usize,
    /// Jobs in flight at once (each owns `max_pages` completion records and output
    /// pages).
    pub slots: usize,
    /// Submission attempts per descriptor before the job goes to software.
    pub retries: u32,
    /// How long a submitted descriptor may take before the job goes to software and
    /// the device is given up.
    pub timeout: Duration,
    /// Which Huffman code compression uses.
    pub huffman: Huffman,
}

/// Which Huffman code the device compresses with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Huffman {
    /// Level 1: fixed; any other level: dynamic.
    #[default]
    ByLevel,
    /// Always the fixed code (one descriptor per page).
    Fixed,
    /// Always a dynamic code per page (statistics pass, then compression).
    Dynamic,
}

impl Huffman {
    /// Whether a job at `level` uses a dynamic code.
    pub fn dynamic(self, level: Level) -> bool {
        match self {
            Huffman::ByLevel => level != Level(1),
            Huffman::Fixed => false,
            Huffman::Dynamic => true,
        }
    }
}

impl IaaConfig {
    /// Defaults for `page_size` and `max_pages`: 16 slots, 64 retries, 2 s timeout.
    pub fn new(page_size: PageSize, max_pages: usize) -> Self {
        Self {
            page_size,
            max_pages,
            slots: 16,
            retries: 64,
            timeout: Duration::from_secs(2),
            huffman: Huffman::ByLevel,
        }
    }
}

/// What the backend did on the device, shared with whoever built it.
#[derive(Debug, Default)]
pub struct IaaCounters {
    /// Descriptors the device accepted.
    pub descriptors: AtomicU64,
    /// Submissions the queue refused (each retried or given up).
    pub refusals: AtomicU64,
    /// Page faults resolved by touching the page and resubmitting.
    pub faults_resolved: AtomicU64,
    /// Pages the device could not shrink (output overflow), sent raw.
    pub raw_pages: AtomicU64,
    /// Statistics passes completed (dynamic Huffman's first descriptor).
    pub statistics_passes: AtomicU64,
    /// Pages compressed with a host-built dynamic code from the AECS.
    pub dynamic_pages: AtomicU64,
    /// Dynamic pages whose header did not fit the AECS, compressed with the fixed
    /// code instead.
    pub fixed_instead: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageState {
    /// No descriptor (a raw page of a decode).
    Skip,
    /// Descriptor built, not submitted yet.
    Ready,
    /// Submitted, record pending.
    Wait,
    /// Done: compressed size (encode) or page written (decode).
    Ok(u32),
    /// Encode overflow: the page goes raw.
    Raw,
}

struct Slot {
    job: Option<Job>,
    records: Box<[CompletionRecord]>,
    out: Box<[u8]>,
    /// One compress AECS per page (dynamic Huffman).
    aecs: Box<[Aecs]>,
    /// Decode input staged in DMA-mapped memory (VFIO only; empty otherwise).
    staged: Box<[u8]>,
    descs: Vec<Descriptor>,
    state: Vec<PageState>,
    retried: Vec<bool>,
    outstanding: usize,
    cause: Option<FallbackCause>,
    deadline: Instant,
    codec: CodecId,
}

/// The IAA backend (see the module documentation).
pub struct IaaBackend {
    portal: Box<dyn Portal>,
    config: IaaConfig,
    cpu: CpuFeatures,
    slots: Vec<Slot>,
    free: Vec<usize>,
    active: VecDeque<usize>,
    done: VecDeque<Completion>,
    /// Descriptors on the device (dedicated queues count them against the size).
    on_device: usize,
    lost: bool,
    /// Descriptors were abandoned on the device (timeout, lost device): their
    /// records and output pages must outlive anything the device might still do.
    abandoned: bool,
    counters: Arc<IaaCounters>,
}

impl core::fmt::Debug for IaaBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IaaBackend")
            .field("portal", &self.portal.describe())
            .field("active", &self.active.len())
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl IaaBackend {
    /// A backend on `portal`.
    ///
    /// # Errors
    /// [`EngineError::Config`] for zero slots or pages, or a page larger than the
    /// portal's transfer limit.
    pub fn new(portal: Box<dyn Portal>, config: IaaConfig) -> Result<IaaBackend, EngineError> {
        if config.slots == 0 || config.max_pages == 0 || config.retries == 0 {
            return Err(EngineError::Config(
                "IAA slots, max_pages and retries must be at least 1",
            ));
        }
        if config.page_size.bytes() > portal.max_transfer() {
            return Err(EngineError::Config(
                "the page size exceeds the IAA work queue's transfer limit",
            ));
        }
        let ps = config.page_size.bytes();
        let stage = portal.needs_dma_map();
        let mut slots: Vec<Slot> = (0..config.slots)
            .map(|_| Slot {
                job: None,
                records: (0..config.max_pages)
                    .map(|_| CompletionRecord::default())
                    .collect(),
                out: vec![0u8; config.max_pages * ps].into_boxed_slice(),
                aecs: (0..config.max_pages).map(|_| Aecs::default()).collect(),
                staged: vec![0u8; if stage { config.max_pages * ps } else { 0 }].into_boxed_slice(),
                descs: Vec::with_capacity(config.max_pages),
                state: Vec::with_capacity(config.max_pages),
                retried: Vec::with_capacity(config.max_pages),
                outstanding: 0,
                cause: None,
                deadline: Instant::now(),
                codec: CodecId::DEFLATE_4K,
            })
            .collect();
        let mut portal = portal;
        if stage {
            for slot in &mut slots {
                let ranges = [
                    (slot.records.as_ptr() as u64, slot.records.len() * 64),
                    (slot.out.as_mut_ptr() as u64, slot.out.len()),
                    (slot.aecs.as_ptr() as u64, slot.aecs.len() * AECS_SIZE),
                    (slot.staged.as_mut_ptr() as u64, slot.staged.len()),
                ];
                for (addr, len) in ranges {
                    // SAFETY: the slot's boxes live as long as the backend, which
                    // owns the portal (dropped first: it is the first field), and are
                    // only reached through raw pointers while the device may write.
                    unsafe { portal.map_dma(addr, len) }.map_err(|source| {
                        EngineError::Backend {
                            backend: BackendKind::Iaa,
                            source,
                        }
                    })?;
                }
            }
        }
        Ok(IaaBackend {
            portal,
            cpu: CpuFeatures::detect(),
            free: (0..config.slots).rev().collect(),
            slots,
            active: VecDeque::with_capacity(config.slots),
            done: VecDeque::with_capacity(config.slots),
            on_device: 0,
            lost: false,
            abandoned: false,
            counters: Arc::new(IaaCounters::default()),
            config,
        })
    }

    /// The backend's device counters.
    pub fn counters(&self) -> Arc<IaaCounters> {
        self.counters.clone()
    }

    /// The portal's description.
    pub fn describe(&self) -> String {
        self.portal.describe()
    }

    /// Builds the slot's descriptors for its job; `Err` completes the job at once.
    fn prepare(&mut self, s: usize) -> Result<(), CodecError> {
        let ps = self.config.page_size.bytes();
        let slot = &mut self.slots[s];
        slot.descs.clear();
        slot.state.clear();
        slot.retried.clear();
        slot.outstanding = 0;
        slot.cause = None;
        slot.deadline = Instant::now() + self.config.timeout;
        let out_base = slot.out.as_mut_ptr();
        let huffman = self.config.huffman;
        let stage_base = slot.staged.as_mut_ptr();
        let stage = !slot.staged.is_empty();
        let Some(job) = slot.job.as_mut() else {
            return Err(CodecError::Unsupported(CodecId(0)));
        };
        let parts = job.parts_mut();
        match parts.op {
            JobOp::Encode(p) => {
                slot.codec = p.codec;
                for i in 0..parts.input.pages() {
                    let (ptr, _) = parts
                        .input
                        .page(i)
                        .ok_or(CodecError::NoPages { codec: p.codec })?;
                    let rec = slot.records[i].addr();
                    slot.records[i].reset();
                    let dst = out_base.wrapping_add(i * ps) as u64;
                    slot.descs.push(if huffman.dynamic(p.level) {
                        Descriptor::statistics(
                            ptr as u64,
                            ps as u32,
                            slot.aecs[i].histogram_addr(),
                            rec,
                        )
                    } else {
                        Descriptor::compress(ptr as u64, ps as u32, dst, ps as u32 - 1, rec, None)
                    });
                    slot.state.push(PageState::Ready);
                    slot.retried.push(false);
                }
            }
            JobOp::Decode(codec) => {
                slot.codec = codec;
                let payload = parts.payload.ok_or(CodecError::Corrupt {
                    codec,
                    detail: "decode job without payload",
                })?;
                let n = parts.dest.pages();
                check_table(codec, payload.len(), parts.lengths, n, ps)?;
                let base = payload.as_ptr();
                let mut pos = 0usize;
                for i in 0..n {
                    let len = parts.lengths[i] as usize;
                    let dst = parts
                        .dest
                        .page_mut(i)
                        .ok_or(CodecError::NoPages { codec })?;
                    slot.records[i].reset();
                    if len == ps {
                        // SAFETY: `pos + ps` lies inside the payload (the table was
                        // checked against its length); `dst` is a whole destination
                        // page reserved for this job (`PageListMut` contract).
                        unsafe { core::ptr::copy_nonoverlapping(base.add(pos), dst, ps) };
                        slot.descs.push(Descriptor::default());
                        slot.state.push(PageState::Skip);
                    } else {
                        let src = if stage {
                            // SAFETY: `pos + len` lies inside the payload and inside
                            // the staging area (both at least the pages' size).
                            unsafe {
                                core::ptr::copy_nonoverlapping(
                                    base.add(pos),
                                    stage_base.add(pos),
                                    len,
                                )
                            };
                            stage_base.wrapping_add(pos)
                        } else {
                            base.wrapping_add(pos).cast_mut()
                        };
                        slot.descs.push(Descriptor::decompress(
                            src as u64,
                            len as u32,
                            dst as u64,
                            ps as u32,
                            slot.records[i].addr(),
                        ));
                        slot.state.push(PageState::Ready);
                    }
                    slot.retried.push(false);
                    pos += len;
                }
            }
            JobOp::Idle => return Err(CodecError::Unsupported(CodecId(0))),
        }
        Ok(())
    }

    /// Submits one descriptor of slot `s` with the retry budget; `false` when the
    /// queue stayed busy (or the device went away).
    fn enqueue(&mut self, s: usize, i: usize) -> bool {
        if self.on_device >= self.portal.size() {
            // The queue is full of our own descriptors (a dedicated queue must never
            // get more; a shared one would only refuse them): wait for the oldest to
            // complete (bounded by the timeout), then count again. Refusals of a
            // shared queue then come from other submitters only.
            let until = Instant::now() + self.config.timeout;
            while self.on_device >= self.portal.size() && Instant::now() < until {
                self.reap();
                if let Some(rec) = self.oldest_pending() {
                    wait_record(
                        rec,
                        (Instant::now() + Duration::from_millis(1)).min(until),
                        self.cpu,
                    );
                } else {
                    break;
                }
            }
            if self.on_device >= self.portal.size() {
                return false;
            }
        }
        for _ in 0..self.config.retries {
            let desc = self.slots[s].descs[i];
            // SAFETY: the descriptor's source (guest page or payload), destination
            // (output slot or destination guest page) and record belong to slot `s`,
            // whose job holds them until the slot finishes; a slot finishes only when
            // every submitted record is written, or is never reused (timeout, lost).
            match unsafe { self.portal.submit(&desc) } {
                Enqueue::Accepted => {
                    self.on_device += 1;
                    self.slots[s].outstanding += 1;
                    self.slots[s].state[i] = PageState::Wait;
                    self.counters.descriptors.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Enqueue::Retry => {
                    self.counters.refusals.fetch_add(1, Ordering::Relaxed);
                    if !self.portal.enabled() {
                        return false;
                    }
                    core::hint::spin_loop();
                }
            }
        }
        false
    }

    /// Submits every ready descriptor of slot `s`; on a busy queue marks the job.
    fn push(&mut self, s: usize) {
        for i in 0..self.slots[s].descs.len() {
            if self.slots[s].cause.is_some() {
                return;
            }
            if self.slots[s].state[i] == PageState::Ready && !self.enqueue(s, i) {
                let cause = if self.portal.enabled() {
                    FallbackCause::QueueFull
                } else {
                    self.lost = true;
                    FallbackCause::DeviceLost
                };
                self.slots[s].cause = Some(cause);
            }
        }
    }

    /// The record of the oldest descriptor still on the device.
    fn oldest_pending(&self) -> Option<&CompletionRecord> {
        self.active.iter().find_map(|&s| {
            let slot = &self.slots[s];
            let i = slot.state.iter().position(|&st| st == PageState::Wait)?;
            Some(&slot.records[i])
        })
    }

    /// Processes the written records of every active slot.
    fn reap(&mut self) {
        for k in 0..self.active.len() {
            let s = self.active[k];
            self.scan(s);
        }
    }

    /// Processes slot `s`'s newly written records.
    fn scan(&mut self, s: usize) {
        for i in 0..self.slots[s].state.len() {
            if self.slots[s].state[i] != PageState::Wait || !self.slots[s].records[i].is_done() {
                continue;
            }
            let rec = self.slots[s].records[i].read();
            self.on_device -= 1;
            self.slots[s].outstanding -= 1;
            let encode = self.slots[s].descs[i].opcode() == super::desc::opcode::COMPRESS;
            let status = rec.status();
            let slot = &mut self.slots[s];
            match status {
                Status::SUCCESS if slot.descs[i].is_statistics() => {
                    // Second pass: the code from the histogram, then compression.
                    self.counters
                        .statistics_passes
                        .fetch_add(1, Ordering::Relaxed);
                    let d = slot.descs[i];
                    let dst = slot
                        .out
                        .as_mut_ptr()
                        .wrapping_add(i * self.config.page_size.bytes());
                    let aecs = if slot.aecs[i].load_dynamic() {
                        self.counters.dynamic_pages.fetch_add(1, Ordering::Relaxed);
                        Some((slot.aecs[i].addr(), AECS_SIZE as u32))
                    } else {
                        self.counters.fixed_instead.fetch_add(1, Ordering::Relaxed);
                        None
                    };
                    slot.descs[i] = Descriptor::compress(
                        d.src1_addr(),
                        d.src1_size(),
                        dst as u64,
                        self.config.page_size.bytes() as u32 - 1,
                        d.completion_addr(),
                        aecs,
                    );
                    slot.records[i].reset();
                    slot.retried[i] = false;
                    slot.state[i] = PageState::Ready;
                    if !self.enqueue(s, i) {
                        self.slots[s].state[i] = PageState::Raw;
                        self.slots[s].cause.get_or_insert(FallbackCause::QueueFull);
                    }
                }
                Status::SUCCESS
                    if encode
                        && rec.output_size > 0
                        && (rec.output_size as usize) < self.config.page_size.bytes() =>
                {
                    slot.state[i] = PageState::Ok(rec.output_size);
                }
                Status::SUCCESS
                    if !encode && rec.output_size as usize == self.config.page_size.bytes() =>
                {
                    slot.state[i] = PageState::Ok(rec.output_size);
                }
                Status::OUTPUT_OVERFLOW if encode => {
                    slot.state[i] = PageState::Raw;
                    self.counters.raw_pages.fetch_add(1, Ordering::Relaxed);
                }
                Status::OUTPUT_OVERFLOW => {
                    slot.state[i] = PageState::Raw;
                    slot.cause.get_or_insert(FallbackCause::OutputOverflow);
                }
                st if st.is_page_fault() && !slot.retried[i] && slot.cause.is_none() => {
                    slot.retried[i] = true;
                    touch(&slot.descs[i], rec.fault_addr, rec.fault_on_write);
                    slot.records[i].reset();
                    slot.state[i] = PageState::Ready;
                    if self.enqueue(s, i) {
                        self.counters
                            .faults_resolved
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.slots[s].state[i] = PageState::Raw;
                        self.slots[s].cause.get_or_insert(FallbackCause::QueueFull);
                    }
                }
                st if st.is_page_fault() => {
                    slot.state[i] = PageState::Raw;
                    slot.cause.get_or_insert(FallbackCause::PageFault);
                }
                _ => {
                    slot.state[i] = PageState::Raw;
                    slot.cause.get_or_insert(FallbackCause::DeviceError);
                }
            }
        }
    }

    /// Whether slot `s` has nothing left on the device and nothing left to submit.
    fn finished(&self, s: usize) -> bool {
        let slot = &self.slots[s];
        slot.outstanding == 0 && (slot.cause.is_some() || !slot.state.contains(&PageState::Ready))
    }

    /// Turns slot `s`'s job into a completion; `reuse` returns the slot to the pool.
    fn finish(&mut self, s: usize, reuse: bool) {
        let ps = self.config.page_size.bytes();
        let slot = &mut self.slots[s];
        let Some(mut job) = slot.job.take() else {
            return;
        };
        let c = if let Some(cause) = slot.cause {
            job.fall_back(BackendKind::Iaa, cause)
        } else {
            let mut parts = job.parts_mut();
            let result = match parts.op {
                JobOp::Encode(_) => {
                    let bytes_in = parts.input.bytes();
                    match parts.payload.as_deref_mut().and_then(|p| p.get_mut()) {
                        None => Err(CodecError::OutputTooSmall {
                            need: bytes_in,
                            have: 0,
                        }),
                        Some(out) => {
                            parts.lengths.clear();
                            let mut pos = 0;
                            for (i, st) in slot.state.iter().enumerate() {
                                let len = match *st {
                                    PageState::Ok(n) => {
                                        let n = n as usize;
                                        out[pos..pos + n]
                                            .copy_from_slice(&slot.out[i * ps..i * ps + n]);
                                        n
                                    }
                                    _ => {
                                        let _ = parts.input.copy_page(i, &mut out[pos..pos + ps]);
                                        ps
                                    }
                                };
                                parts.lengths.push(len as u32);
                                pos += len;
                            }
                            Ok(Some(per_page_done(
                                slot.codec,
                                pos,
                                bytes_in,
                                parts.lengths,
                            )))
                        }
                    }
                }
                _ => Ok(None),
            };
            match result {
                Ok(outcome) => {
                    if let (Some(o), Some(p)) = (outcome, parts.payload.as_deref_mut()) {
                        p.set_len(o.payload_len);
                    }
                    job.set_result(Ok(outcome));
                }
                Err(e) => job.set_result(Err(e)),
            }
            job.complete(BackendKind::Iaa)
        };
        self.done.push_back(c);
        if reuse {
            self.free.push(s);
        }
    }

    /// Completes every finished active slot, in submission order where possible.
    fn collect(&mut self) {
        let now = Instant::now();
        let enabled = self.portal.enabled();
        let mut k = 0;
        while k < self.active.len() {
            let s = self.active[k];
            self.scan(s);
            let (fin, reuse) = if self.finished(s) {
                (true, true)
            } else if !enabled {
                self.lost = true;
                self.slots[s].cause = Some(FallbackCause::DeviceLost);
                (true, false)
            } else if now >= self.slots[s].deadline {
                self.lost = true;
                self.slots[s].cause.get_or_insert(FallbackCause::Timeout);
                (true, false)
            } else {
                (false, false)
            };
            if fin {
                if !reuse {
                    // Descriptors may still be on the device: forget them, never
                    // reuse their records or output pages.
                    self.abandoned |= self.slots[s].outstanding > 0;
                    self.on_device -= self.slots[s].outstanding.min(self.on_device);
                }
                self.active.remove(k);
                self.finish(s, reuse);
            } else {
                k += 1;
            }
        }
    }
}

impl Drop for IaaBackend {
    fn drop(&mut self) {
        // Descriptors still on the device write their records and outputs into the
        // slots: wait for them (bounded by the timeout), and if any may still come,
        // leak the slots rather than free memory a device could write.
        let until = Instant::now() + self.config.timeout;
        while self.on_device > 0 && self.portal.enabled() && Instant::now() < until {
            self.reap();
            match self.oldest_pending() {
                Some(rec) => {
                    wait_record(
                        rec,
                        (Instant::now() + Duration::from_millis(1)).min(until),
                        self.cpu,
                    );
                }
                None => break,
            }
        }
        if self.on_device > 0 || self.abandoned {
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

/// Touches the page a device fault named, if it lies in the descriptor's own source
/// or destination: a read for a read fault, a write of the byte's own value for a
/// write fault (destination pages are overwritten by the resubmission anyway).
fn touch(desc: &Descriptor, addr: u64, write: bool) {
    let in_range = |base: u64, len: u32| addr >= base && addr < base + u64::from(len);
    let ok = if write {
        in_range(desc.dst_addr(), desc.max_dst_size())
    } else {
        in_range(desc.src1_addr(), desc.src1_size())
    };
    if !ok {
        return;
    }
    let p = addr as *mut u8;
    // SAFETY: `addr` lies inside the descriptor's source (readable) or destination
    // (writable, reserved for this job) per the submit contract; volatile accesses
    // through the raw pointer make the kernel map the page.
    unsafe {
        let v = core::ptr::read_volatile(p);
        if write {
            core::ptr::write_volatile(p, v);
        }
    }
}

impl Backend for IaaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Iaa
    }

    fn probe(&self) -> Probe {
        let caps = |codec| FormatCaps::both(codec, Level(0), Level(12));
        let mut formats = vec![caps(CodecId::DEFLATE_4K)];
        if self.config.page_size.bytes() <= crate::codec::deflate::WINDOW_4K {
            // At 4 KiB pages deflate and deflate-4k are the same streams.
            formats.push(caps(CodecId::DEFLATE));
        }
        Probe {
            backend: BackendKind::Iaa,
            formats,
            max_job_pages: self.config.max_pages,
            max_job_bytes: self.config.max_pages * self.config.page_size.bytes(),
            queue_depth: self.config.slots,
            delta_cache: false,
        }
    }

    fn submit(&mut self, jobs: &mut VecDeque<Job>) -> Result<usize, EngineError> {
        let mut taken = 0;
        while !jobs.is_empty() {
            if self.lost {
                if let Some(job) = jobs.pop_front() {
                    self.done
                        .push_back(job.fall_back(BackendKind::Iaa, FallbackCause::DeviceLost));
                    taken += 1;
                }
                continue;
            }
            let Some(s) = self.free.pop() else { break };
            let Some(job) = jobs.pop_front() else {
                self.free.push(s);
                break;
            };
            taken += 1;
            self.slots[s].job = Some(job);
            if let Err(e) = self.prepare(s) {
                if let Some(job) = self.slots[s].job.take() {
                    self.done.push_back(job.fail(BackendKind::Iaa, e));
                }
                self.free.push(s);
                continue;
            }
            // Active before its descriptors go in: a full dedicated queue reaps them.
            self.active.push_back(s);
            self.push(s);
        }
        Ok(taken)
    }

    fn poll(
        &mut self,
        done: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, EngineError> {
        self.collect();
        if self.done.is_empty()
            && let (Some(t), Some(&s)) = (timeout, self.active.front())
        {
            let until = (Instant::now() + t).min(self.slots[s].deadline);
            if let Some(i) = self.slots[s]
                .state
                .iter()
                .position(|&st| st == PageState::Wait)
            {
                wait_record(&self.slots[s].records[i], until, self.cpu);
            } else {
                std::thread::yield_now();
            }
            self.collect();
        }
        let mut n = 0;
        while n < max {
            let Some(c) = self.done.pop_front() else {
                break;
            };
            done.push(c);
            n += 1;
        }
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.active.len() + self.done.len()
    }

    unsafe fn map_memory(&mut self, addr: *mut u8, len: usize) -> Result<(), EngineError> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.portal.map_dma(addr as u64, len) }.map_err(|source| EngineError::Backend {
            backend: BackendKind::Iaa,
            source,
        })
    }
}
