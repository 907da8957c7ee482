//! Turns guest pages into frame payloads and back: zero-page scan, the codecs of
//! `PROTOCOL.md` and the batched submit/poll engine.
//!
//! Not built yet: this crate is laid out by the workspace and filled in by the
//! accel issue. It depends on `pagewire-protocol` only, never on `pagewire-transport`.
