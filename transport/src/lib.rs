//! Moves frames between a source and a destination over parallel channels.
//!
//! Not built yet: this crate is laid out by the workspace and filled in by the
//! transport issue. It depends on `pagewire-protocol` only, never on `pagewire-accel`.
