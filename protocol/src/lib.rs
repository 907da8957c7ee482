//! pagewire's wire format (see `PROTOCOL.md` beside this crate).
#![forbid(unsafe_code)]

pub mod ids;

pub use ids::*;
