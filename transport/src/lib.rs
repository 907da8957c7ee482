//! Moves protocol frames between a source and a destination over parallel channels.
//!
//! A session is `channel_count` channels; each starts with the protocol's handshake
//! ([`pagewire_protocol::ClientHandshake`] / [`pagewire_protocol::ServerHandshake`]) and
//! then carries frames encoded and decoded by `pagewire-protocol`. This crate knows
//! nothing of codecs: a frame is a header plus payload slices.
//!
//! - [`Channel`] is the one interface; [`tcp`], [`uring`] and `rdma` (cargo feature
//!   `rdma`) are its backends, each with its contract in its module docs.
//! - [`session`] opens the channels of a session ([`session::connect`]) and accepts
//!   them ([`session::Listener`]), refusing channels that fail the handshake.
//! - [`buf`] holds the memory channels send from and receive into: registered guest
//!   memory ([`GuestMemory`]) and buffer pools ([`BufferPool`]).
//!
//! ```no_run
//! use pagewire_protocol::{Authentication, Capabilities, SessionId};
//! use pagewire_transport::session::{self, Backend, SessionConfig};
//! use pagewire_transport::{Channel, OutFrame};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = SessionConfig::new(Capabilities::new(4096), SessionId([1; 16]), 2, Authentication::None);
//! for est in session::connect("127.0.0.1:4444".parse()?, &cfg)? {
//!     let mut ch = est.open(&Backend::Tcp, &cfg)?;
//!     let frame = pagewire_protocol::Frame::Ack(pagewire_protocol::Ack {
//!         kind: pagewire_protocol::AckKind::ROUND, value: 0 });
//!     ch.send(OutFrame::whole(&frame)?)?;
//!     ch.close(&mut Vec::new())?;
//! }
//! # Ok(()) }
//! ```
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod buf;
pub mod channel;
mod recv;
pub mod session;
pub mod tcp;
pub mod uring;

#[cfg(feature = "rdma")]
pub mod rdma;

pub use buf::{BufferPool, GuestMemory, GuestSlice, Payload, PoolBuf};
pub use channel::{
    Channel, ChannelError, ChannelStats, Completed, Incoming, OutFrame, PageSink, RegionSink,
    SendId,
};
