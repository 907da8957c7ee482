//! pagewire's wire format: the handshake, the frames and their codec ids, encoded and
//! decoded without any I/O. `PROTOCOL.md` beside this crate is the specification.
#![forbid(unsafe_code)]

pub mod copy;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod ids;
pub mod layout;
pub mod limits;
mod pages;
pub mod rdma;
pub mod session;
pub mod stream;
pub mod wire;

pub use copy::{CopyFrame, CopyRun};
pub use error::DecodeError;
pub use frame::{
    Abort, Ack, Commit, Complete, Confirm, DeviceState, EndOfRound, Envelope, Frame, Hello,
    LayoutFrame, PageFrame, PayloadLayout, Reject, Welcome, pages_crc_seed, payload_layout,
};
pub use handshake::{
    Authentication, Capabilities, ChannelBinding, ClientConfig, ClientHandshake, HandshakeError,
    Negotiated, ServerConfig, ServerHandshake, SessionKey, auth_methods, encode_reject,
};
pub use ids::*;
pub use layout::MemoryLayout;
pub use limits::{CodecSet, Limits, Phase};
pub use session::{
    Affinity, DestinationChannel, DestinationEvent, DestinationLimits, DestinationSession,
    SessionError, SourceChannel, SourceEvent,
};
pub use stream::FrameDecoder;
pub use wire::{EncodeError, PageRun, RegionDesc, UniformRun, WireList};
