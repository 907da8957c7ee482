//! pagewire: the live-migration transport a VMM embeds.
//!
//! The VMM describes its guest memory once ([`GuestMemory`]), then either drives rounds
//! itself through a [`Source`] or hands its dirty log to [`migrate`](fn@migrate), which runs
//! pre-copy rounds until the expected downtime fits the limit, pauses the guest, sends
//! the last pages and the device state, and completes. On the other host a
//! [`DestinationListener`] accepts the channels and a [`Destination`] applies every
//! frame straight into guest memory, reporting success only when everything arrived.
//!
//! Layers: this crate joins `pagewire-protocol` (the wire format), `pagewire-accel`
//! (codecs and the batched engine) and `pagewire-transport` (channels).
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod config;
pub mod destination;
pub mod dirty;
pub mod error;
pub mod limit;
pub mod memory;
pub mod migrate;
pub mod plan;
pub mod precopy;
pub mod sim;
pub mod source;
pub mod stats;
pub mod switchover;

pub use config::{Control, DestinationConfig, SourceConfig};
pub use destination::{
    Destination, DestinationListener, DestinationStats, DeviceSection, Migrated,
};
pub use dirty::{DirtyBitmap, DirtyLog, DirtyLogError};
pub use error::{Failed, MigrationError};
pub use memory::{GuestMemory, MemoryError, RegionSpec};
pub use migrate::migrate;
pub use precopy::PrecopyConfig;
pub use source::Source;
pub use stats::MigrationStats;
pub use switchover::Switchover;

pub use pagewire_accel as accel;
pub use pagewire_protocol as protocol;
pub use pagewire_transport as transport;
