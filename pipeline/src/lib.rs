//! The migration engine a VMM embeds.
//!
//! Not built yet: this crate is laid out by the workspace and filled in by the
//! pipeline issue. For now it re-exports the wire protocol.

pub use pagewire_protocol as protocol;
