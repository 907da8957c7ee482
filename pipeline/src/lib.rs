//! The migration engine a VMM embeds (in progress: guest memory, dirty tracking and
//! statistics are here; the source and destination arrive with the pipeline issue).
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod dirty;
pub mod limit;
pub mod memory;
pub mod plan;
pub mod precopy;
pub mod stats;

pub use pagewire_protocol as protocol;
