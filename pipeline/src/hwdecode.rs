//! The destination's hardware decode path ([`DestinationConfig::accel`]): a codec
//! engine on a hardware backend that inflates a frame's pages straight into guest
//! memory. Formats the hardware does not decode stay on the receiver's software
//! codecs; jobs the hardware gives up on run on the engine's software fallback,
//! counted.
//!
//! [`DestinationConfig::accel`]: crate::DestinationConfig::accel

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pagewire_accel::{
    BackendChoice, BackendKind, CodecError, Completion, Engine, EngineBuf, EngineConfig,
    FallbackCause, Job, PageKey, PageSize, SoftwareConfig, Tag,
};
use pagewire_protocol::CodecId;

use crate::error::MigrationError;

/// One receiver's hardware decoder.
pub(crate) struct Decoder {
    engine: Engine,
    /// Whether guest memory was mapped for the device (once per migration).
    mapped: bool,
    /// The job being submitted and its completion: kept, so that a decode allocates
    /// nothing.
    batch: VecDeque<Job>,
    done: Vec<Completion>,
    /// The tag of the current decode; a completion with another (of a decode that
    /// gave up on its deadline) is given back unread.
    tag: u64,
}

/// The most a decode may take on the device before the receiver gives up on it.
const DECODE_DEADLINE: Duration = Duration::from_secs(30);

impl Decoder {
    /// A decoder on `choice`, or `None` when it resolves to the software codecs.
    pub(crate) fn new(
        choice: &BackendChoice,
        page_size: u32,
        max_pages: u32,
    ) -> Result<Option<Decoder>, MigrationError> {
        if *choice == BackendChoice::Software {
            return Ok(None);
        }
        let page_size =
            PageSize::new(page_size).ok_or_else(|| MigrationError::Config("page size".into()))?;
        let engine = Engine::build(
            choice,
            EngineConfig {
                page_size,
                max_pages: max_pages as usize,
                requests: 2,
                buffers: 2,
                delta: None,
            },
            SoftwareConfig::default(),
        )
        .map_err(|e| MigrationError::Config(format!("destination codec engine: {e}")))?;
        Ok(
            (engine.probe().backend != BackendKind::Software).then_some(Decoder {
                engine,
                mapped: false,
                batch: VecDeque::with_capacity(1),
                done: Vec::with_capacity(1),
                tag: 0,
            }),
        )
    }

    /// Maps guest memory for the device the first time (a no-op unless it reaches
    /// memory through an IOMMU mapping, as IAA over VFIO does).
    pub(crate) fn map(&mut self, memory: &crate::GuestMemory) -> Result<(), CodecError> {
        if self.mapped {
            return Ok(());
        }
        for region in memory.region_ids() {
            let pages = memory.pages(region).unwrap_or(0);
            if let Some((ptr, len)) = memory.span(region, 0, pages) {
                // SAFETY: the destination's guest memory outlives its receivers (and
                // so this engine) and is written only through raw pointers.
                unsafe { self.engine.map_memory(ptr.as_ptr(), len) }.map_err(|_| {
                    CodecError::Corrupt {
                        codec: CodecId::RAW,
                        detail: "guest memory could not be mapped for the codec device",
                    }
                })?;
            }
        }
        self.mapped = true;
        Ok(())
    }

    /// Whether the hardware decodes `codec` itself.
    pub(crate) fn takes(&self, codec: CodecId) -> bool {
        self.engine.probe().can_decode(codec)
    }

    /// Decodes `payload` into the pages at `runs` (pointer, pages, first key) on the
    /// device. Returns why the hardware handed the job to software, if it did.
    ///
    /// # Safety
    /// Every run must be whole pages of writable memory that nobody else reads or
    /// writes until this returns.
    pub(crate) unsafe fn decode(
        &mut self,
        codec: CodecId,
        payload: &[u8],
        lengths: &[u32],
        runs: &[(*mut u8, u32, u64)],
    ) -> Result<Option<FallbackCause>, CodecError> {
        let busy = CodecError::Corrupt {
            codec,
            detail: "the destination's codec engine has no free request",
        };
        // What a decode that gave up on its deadline left behind.
        self.batch.clear();
        for c in self.done.drain(..) {
            self.engine.recycle(c);
        }
        self.tag = self.tag.wrapping_add(1);
        let tag = Tag(self.tag);
        let mut job = self.engine.job().ok_or(busy)?;
        let buf = match self.engine.buffers().take() {
            Some(mut b) if b.capacity() >= payload.len() => {
                if let Some(bytes) = b.get_mut() {
                    bytes[..payload.len()].copy_from_slice(payload);
                }
                b.set_len(payload.len());
                b
            }
            _ => EngineBuf::from_vec(payload.to_vec()),
        };
        let dst = job.decode(tag, codec, buf, lengths);
        for &(ptr, pages, key) in runs {
            // SAFETY: forwarded from this function's contract; the job ends (its
            // completion is given back) before this function returns.
            unsafe { dst.push_raw(ptr, pages, PageKey(key)) }
                .map_err(|_| CodecError::NoPages { codec })?;
        }
        self.batch.push_back(job);
        let deadline = Instant::now() + DECODE_DEADLINE;
        loop {
            if let Some(i) = self.done.iter().position(|c| c.tag() == tag) {
                let c = self.done.swap_remove(i);
                let result = c.status().map(|()| c.fallback());
                self.engine.recycle(c);
                return result;
            }
            for c in self.done.drain(..) {
                self.engine.recycle(c);
            }
            if Instant::now() > deadline {
                return Err(CodecError::Corrupt {
                    codec,
                    detail: "the destination's codec engine did not complete a decode",
                });
            }
            if !self.batch.is_empty() {
                let _ = self.engine.submit(&mut self.batch);
            }
            let _ = self
                .engine
                .poll(&mut self.done, 1, Some(Duration::from_millis(10)));
        }
    }
}
