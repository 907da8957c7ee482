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
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use pagewire_protocol::CodecId;

use super::aecs::{AECS_SIZE, Aecs};
use super::desc::{CompletionRecord, Descriptor};
use super::portal::{CpuFeatures, Portal, wait_record};
use crate::codec::Level;
use crate::engine::{
    Backend, BackendKind, Completion, EngineError, FallbackCause, FormatCaps, Job, Probe,
};
use crate::page::PageSize;

mod slot;

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
}

impl Drop for IaaBackend {
    fn drop(&mut self) {
        // Descriptors still on the device write their records and outputs into the
        // slots: wait for them (bounded by the timeout), and if any may still come,
        // leak the slots rather than free memory a device could write.
        let until = crate::deadline::from_now(self.config.timeout);
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
            let until = crate::deadline::from_now(t).min(self.slots[s].deadline);
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
