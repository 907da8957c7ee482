//! The migration session after the handshake, as state machines without I/O.
//!
//! Like quinn-proto's `Connection`, these types hold every rule of a session and none of
//! its I/O: the caller feeds them the frames it received (and asks them about the frames
//! it is about to send), and they answer with what to do next or a [`SessionError`] that
//! names the broken rule. The pipeline's threads are the I/O around them.
//!
//! On the destination a session has one shared [`DestinationSession`] (the layout, the
//! rounds every channel has ended, device state, completion, and the COMMIT that hands
//! the guest over) and one
//! [`DestinationChannel`] per channel (its rounds and counts, and the pages it may
//! carry). The per-channel part is what the hot path touches: a PAGES frame is checked
//! by [`DestinationChannel::check_pages`] **before** a byte of it is decoded or placed,
//! against the layout's regions, the open round and the channel affinity, and a COPY
//! frame by [`DestinationChannel::check_copy`] the same way, its source pages as well as
//! its targets (a ROUND_END copy's sources may belong to any channel; the destination
//! applies it at its round's end, [`DestinationEvent::RoundEndCopy`]).
//!
//! On the source a [`SourceChannel`] checks the frames the source sends (so a bug on our
//! side is caught before a peer sees it) and the ACKs it receives, and on channel 0 runs
//! the switchover: COMPLETE, ACK COMPLETE, COMMIT, ACK COMMITTED (`PROTOCOL.md`,
//! Switchover).
//!
//! ```
//! use pagewire_protocol::session::{Affinity, DestinationChannel, DestinationEvent,
//!     DestinationLimits, DestinationSession};
//! use pagewire_protocol::{ChannelId, Frame, LayoutFrame, RegionDesc, RegionId, GuestAddr,
//!     WireList, Round, EndOfRound};
//!
//! let mut session = DestinationSession::new(2, 4096, DestinationLimits::default()).unwrap();
//! let mut ch0 = session.channel(ChannelId(0)).unwrap();
//! let regions = [RegionDesc { id: RegionId(0), backing_page_size: 4096,
//!     guest_addr: GuestAddr(0), length: 1 << 20 }];
//! let layout = Frame::Layout(LayoutFrame { chunk_pages: 64, regions: WireList::Slice(&regions) });
//! match ch0.on_frame(&layout).unwrap() {
//!     DestinationEvent::Layout(l) => { session.on_layout(&l).unwrap(); ch0.set_layout(&session).unwrap(); }
//!     _ => unreachable!(),
//! }
//! let end = Frame::EndOfRound(EndOfRound { round: Round(0), frames: 0, pages: 0 });
//! assert!(matches!(ch0.on_frame(&end), Ok(DestinationEvent::AckRound(Round(0)))));
//! ```

mod affinity;
mod channel;
mod destination;
mod error;
mod source;

pub use affinity::Affinity;
pub use channel::{DestinationChannel, DestinationEvent};
pub use destination::{CompleteProgress, DestinationLimits, DestinationSession, Section};
pub use error::{Limit, SessionError};
pub use source::{SourceChannel, SourceEvent};

#[cfg(test)]
mod tests;
