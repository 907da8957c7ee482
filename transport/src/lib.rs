//! Moves protocol frames between a source and a destination over parallel channels.
//!
//! A session is `channel_count` channels; each starts with the protocol's handshake
//! ([`pagewire_protocol::ClientHandshake`] / [`pagewire_protocol::ServerHandshake`]) and
//! then carries frames encoded and decoded by `pagewire-protocol`. This crate knows
//! nothing of codecs: a frame is a header plus payload slices. Linux only.
//!
//! - [`Channel`] is the one interface; [`tcp`], [`uring`] and [`rdma`] (its verbs code
//!   behind the cargo feature `rdma`) are its backends, each with its contract in its module docs.
//! - [`session`] opens the channels of a session ([`session::connect`]) and accepts
//!   them ([`session::Listener`]: every pending handshake on the calling thread, each
//!   bounded in time and memory), refusing channels that fail the handshake.
//! - [`endpoint`] says where channels run: TCP or Unix stream sockets ([`Endpoint`]),
//!   bound and connected by [`session`] or handed over by the caller already connected
//!   ([`Stream`], [`session::connect_streams`]) or listening ([`StreamListener`],
//!   [`session::Listener::from_listener`]).
//! - [`buf`] holds the memory channels send from and receive into: registered guest
//!   memory ([`GuestMemory`]) and buffer pools ([`BufferPool`]).
//! - [`tls`] puts TLS 1.3 (rustls) around the stream channels: a session is either
//!   [`Encryption::Tls`] (mutual X.509, the handshake bound to the TLS session) or
//!   declared [`Encryption::Plaintext`], set in
//!   [`session::SessionConfig::encryption`]; a mismatch is refused with a REJECT that
//!   says so.
//!
//! The source sends raw pages straight from guest memory; the destination places
//! them straight into its own:
//!
//! ```no_run
//! use std::time::Duration;
//! use pagewire_protocol::*;
//! use pagewire_transport::session::{self, Backend, Listener, SessionConfig};
//! use pagewire_transport::{Channel, GuestMemory, Incoming, OutFrame, Payload, RegionSink};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = SessionConfig::new(Capabilities::new(4096), SessionId([1; 16]), 2,
//!                              Authentication::None);
//! let uring = Backend::Uring { fallback_to_tcp: true };
//!
//! // Destination: accept the session's channels, place pages into guest memory.
//! let listener = Listener::bind("0.0.0.0:4444".parse()?, &cfg)?;
//! let dst_memory = GuestMemory::anonymous(1 << 30)?;
//! # let cfg2 = cfg.clone();
//! std::thread::spawn(move || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     for est in listener.accept_session(&cfg2, Duration::from_secs(30))?.channels {
//!         let (cfg, memory) = (cfg2.clone(), dst_memory.clone());
//!         std::thread::spawn(move || {
//!             let mut ch = est.open(&uring, &cfg).expect("channel");
//!             let mut sink = RegionSink::new(4096, vec![(RegionId(0), memory)]);
//!             while let Some(frame) = ch.recv(Some(&mut sink)).expect("recv") {
//!                 if let Incoming::Placed(pages) = frame { /* mark pages.data_runs received */ }
//!             }
//!         });
//!     }
//!     Ok(())
//! });
//!
//! // Source: open the channels, send 64 pages of guest memory on channel 0.
//! let src_memory = GuestMemory::anonymous(1 << 30)?;
//! let mut ch = session::connect("10.0.0.2:4444".parse()?, &cfg)?.remove(0).open(&uring, &cfg)?;
//! let runs = [PageRun { start: PageIndex(0), count: 64 }];
//! let header = PageFrame { codec: CodecId::RAW, region: RegionId(0), round: Round(1),
//!                          data_runs: WireList::Slice(&runs), zero_runs: WireList::Slice(&[]),
//!                          uniform_runs: WireList::Slice(&[]), lengths: None, crc: None, payload: &[] };
//! let pages = src_memory.slice(0, 64 * 4096).expect("inside the region");
//! ch.send(OutFrame::pages(&header, vec![Payload::Guest(pages)])?)?;
//! let mut released = Vec::new();
//! ch.close(&mut released)?; // every payload slice is back in `released`
//! # Ok(()) }
//! ```
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod buf;
pub mod channel;
pub mod deadline;
pub mod endpoint;
pub mod interrupt;
mod owned;
mod recv;
mod sendq;
pub mod session;
pub mod tcp;
pub mod tls;
pub mod uring;

pub mod rdma;

pub use buf::{BufferPool, GuestMemory, GuestSlice, Payload, PoolBuf};
pub use channel::{
    Channel, ChannelError, ChannelStats, Completed, Incoming, OutFrame, PageSink, RegionSink,
    SendId,
};
pub use endpoint::{Endpoint, Stream, StreamListener};
pub use interrupt::Interrupt;
pub use owned::{Owned, StableBytes};
pub use recv::FRAME_MIN_RATE;
pub use tls::{Encryption, PemFiles, PinnedPemFiles, TlsConfig, TlsError};
