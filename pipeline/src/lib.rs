//! pagewire: the live-migration transport a VMM embeds.
//!
//! The VMM describes its guest memory once ([`GuestMemory`]), then either drives rounds
//! itself through a [`Source`] or hands its dirty log to [`migrate`](fn@migrate), which runs
//! pre-copy rounds until the expected downtime fits the limit, pauses the guest, sends
//! the last pages and the device state, and completes. On the other host a
//! [`DestinationListener`] accepts the channels and a [`Destination`] applies every
//! frame straight into guest memory, reporting success only when everything arrived.
//! Channels run over TCP or Unix stream sockets ([`Endpoint`]), bound and connected by
//! pagewire or handed to it already connected ([`Stream`]) or listening
//! ([`StreamListener`]).
//!
//! Layers: this crate joins `pagewire-protocol` (the wire format), `pagewire-accel`
//! (codecs and the batched engine) and `pagewire-transport` (channels).
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod config;
pub mod destination;
pub mod device;
pub mod dirty;
pub mod error;
mod fresh;
mod hwdecode;
mod install;
mod keyfile;
pub mod limit;
pub mod memory;
pub mod migrate;
pub mod plan;
pub mod precopy;
pub mod progress;
pub mod sim;
pub mod source;
pub mod stats;
pub mod switchover;

/// Not part of the API: what `benches/` measures directly.
#[doc(hidden)]
pub mod bench {
    pub use crate::source::pagehash::{PageHash, PageHasher};
}

pub use config::{
    CodecPolicy, Control, DestinationConfig, DeviceStateCheck, MAX_CODEC_THREADS,
    MAX_DELTA_CACHE_PAGES, MAX_QUEUE_DEPTH, MAX_SEND_QUEUE, Prefault, SourceConfig,
    codec_threads_for,
};
pub use destination::{
    Destination, DestinationControl, DestinationListener, DestinationStats, DeviceSection, Migrated,
};
pub use device::{DeviceState, DeviceStateWriter, NoDeviceState, SectionWriter};
pub use dirty::{DirtyBitmap, DirtyLog, DirtyLogError, VcpuControl};
pub use error::{Failed, MigrationError};
pub use install::InstallError;
pub use keyfile::key_from_file;
pub use memory::{DestinationMemory, GuestMemory, MemoryError, MemoryProvider, RegionSpec};
pub use migrate::{Migration, migrate};
pub use pagewire_protocol::{Authentication, RegionId, SessionId, SessionKey};

/// The README's code, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
pub use precopy::{CapPolicy, PrecopyConfig, StopReason};
pub use progress::{Phase, Progress, ProgressSnapshot, RoundAction};
pub use source::Source;
pub use source::adaptive::AdaptiveConfig;
pub use stats::{AdaptiveStats, ChoiceStats, CodecSwitch, CpuSummary, MigrationStats, TlsSummary};
pub use switchover::Switchover;

pub use pagewire_transport::tls::{self, Encryption, PemFiles, TlsConfig};
pub use pagewire_transport::{Endpoint, Stream, StreamListener};

// The few lower-layer types a VMM needs (the lower crates themselves stay available
// as `pagewire-protocol`, `pagewire-transport` and `pagewire-accel`).
pub use pagewire_accel::{BackendChoice, FallbackCause, IaaPortal, ModelFault, ModelFaults};
pub use pagewire_protocol::{CodecId, DestinationLimits, GuestAddr, MemoryLayout, RegionDesc};
pub use pagewire_transport::session::{Backend, ListenerStats};
