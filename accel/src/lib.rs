//! Turns guest pages into frame payloads and back: zero-page scan, the codecs of
//! `PROTOCOL.md` and the batched submit/poll engine.
//!
//! It depends on `pagewire-protocol` only (for [`CodecId`](pagewire_protocol::CodecId)),
//! never on `pagewire-transport`.
//!
//! # Layers
//! - [`zero`]: is a page all zeros, one byte repeated, or data, at memory speed
//!   ([`classify`], [`is_zero`]).
//! - [`pages`]: what a job reads ([`PageList`]) and writes ([`PageListMut`]): runs of
//!   pages built from raw pointers into guest memory (`unsafe`, with the
//!   volatile-memory contract) or from slices. Guest pages are only ever read through
//!   raw pointers: the codecs compress a raw-pointer copy of them, never a `&[u8]`
//!   over memory the guest may be writing.
//! - [`codec`]: the software codecs, the reference for every format: raw, zero, zstd,
//!   lz4, deflate (per page, as Intel IAA and QAT write it) and delta, with
//!   [`Codecs`] holding one thread's contexts. Output never grows: what does not
//!   shrink is sent raw. Decoders check every size and write only into the
//!   destination.
//! - [`cache`]: the sender's bounded LRU [`DeltaCache`] of pages last sent.
//! - [`pool`]: pre-allocated, reference-counted buffers ([`EngineBuf`]) that return to
//!   their [`BufPool`] when the last user (codec, then transport) drops them.
//! - [`engine`]: the accelerator request model: [`Engine::job`] from a pre-allocated
//!   request pool, [`Engine::submit`] a batch (a backend may take only part of it),
//!   [`Engine::poll`] completions matched by [`Tag`], out of order, each naming the
//!   [`BackendKind`] that ran it. The [`SoftwareBackend`] runs jobs on worker threads
//!   fed by lock-free queues, or inline; hardware backends implement [`Backend`].
//! - [`iaa`]: the Intel IAA backend: descriptors, portals (idxd work queue, VFIO
//!   behind the `vfio` feature), and the IAA device model that tests it. Hardware
//!   backends hand jobs they cannot finish back to the engine's software codecs
//!   ([`engine::fallback`]); [`BackendChoice`] and [`Engine::build`] select a backend.
//! - [`stats`]: jobs, bytes, ratio per codec, raw fallbacks, hardware fallbacks per
//!   cause, busy rate, queue depth.
//!
//! # Driving the engine
//! ```
//! use std::collections::VecDeque;
//! use std::time::Duration;
//! use pagewire_accel::{EncodeParams, Engine, EngineConfig, Level, PageKey, SoftwareConfig, Tag};
//! use pagewire_protocol::CodecId;
//!
//! let mut engine = Engine::software(EngineConfig::default(), SoftwareConfig { threads: 2, queue_depth: 32 })?;
//! // Stands in for guest memory; the pipeline passes pointers into the guest.
//! let guest = vec![0x42u8; 64 * 4096];
//!
//! let mut batch = VecDeque::new();
//! for (i, frame) in guest.chunks(32 * 4096).enumerate() {
//!     let mut job = engine.job().expect("a free request");
//!     let pages = job.encode(Tag(i as u64), EncodeParams::new(CodecId::ZSTD, Level(1)));
//!     // SAFETY: `guest` stays alive and mapped until every completion has been
//!     // polled below.
//!     unsafe { pages.push_raw(frame.as_ptr(), 32, PageKey(32 * i as u64))? };
//!     batch.push_back(job);
//! }
//! let mut done = Vec::new();
//! while !batch.is_empty() || engine.in_flight() > 0 {
//!     engine.submit(&mut batch)?; // what the backend could not take stays in `batch`
//!     engine.poll(&mut done, 64, Some(Duration::from_millis(10)))?;
//! }
//! for mut c in done {
//!     let out = c.encoded().expect("encoded");
//!     let payload = c.take_payload().expect("payload"); // hand this to the transport
//!     assert!(out.codec == CodecId::ZSTD && payload.len() < 32 * 4096);
//! }
//! let stats = engine.stats();
//! assert!(stats.encode_of(CodecId::ZSTD).and_then(|s| s.ratio()).unwrap_or(0.0) > 100.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod cache;
pub mod codec;
pub mod cpu;
mod deadline;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod iaa;
pub mod page;
pub mod pages;
pub mod pool;
pub mod qat;
pub mod stats;
pub mod zero;

pub use cache::{CacheError, DeltaCache, DeltaConfig, DeltaStats};
pub use codec::{
    CodecError, Codecs, EncodeOutcome, EncodeParams, Layout, Level, SOFTWARE_FORMATS, layout,
    level_range, max_payload_len,
};
pub use cpu::thread_cpu_time;
pub use engine::{
    Backend, BackendChoice, BackendKind, BadChoice, Completion, Engine, EngineConfig, EngineError,
    FallbackCause, FallbackCounts, FormatCaps, IaaPortal, Job, JobOp, JobParts, ModelFault,
    ModelFaults, Probe, RunNow, SoftwareBackend, SoftwareConfig, Tag,
};
pub use page::{PageKey, PageSize};
pub use pages::{PageList, PageListMut, PagesError};
pub use pool::{BufPool, EngineBuf};
pub use stats::{CodecStats, EngineStats};
pub use zero::{PageClass, ZeroKernel, classify, classify_raw, is_zero, is_zero_raw};
