//! Turns guest pages into frame payloads and back: zero-page scan, the codecs of
//! `PROTOCOL.md` and the batched submit/poll engine.
//!
//! It depends on `pagewire-protocol` only, never on `pagewire-transport`.
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod cache;
pub mod codec;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod page;
pub mod pages;
pub mod pool;
pub mod stats;
pub mod zero;

pub use cache::{CacheError, DeltaCache, DeltaConfig, DeltaStats};
pub use codec::{
    CodecError, Codecs, EncodeOutcome, EncodeParams, Layout, Level, SOFTWARE_FORMATS, layout,
    level_range, max_payload_len,
};
pub use engine::{
    Backend, BackendKind, Completion, Engine, EngineConfig, EngineError, FormatCaps, Job, JobOp,
    Probe, SoftwareBackend, SoftwareConfig, Tag,
};
pub use page::{PageKey, PageSize};
pub use pages::{PageList, PageListMut, PagesError};
pub use pool::{BufPool, PoolBuf};
pub use stats::{CodecStats, EngineStats};
pub use zero::{ZeroKernel, is_zero, is_zero_raw};
