//! What the listener counts.

use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(doc)]
use super::{Accepted, Listener, ListenerConfig};

/// What a [`Listener`] did with the connections it saw: since it was bound
/// ([`Listener::stats`]) or during one call ([`Accepted::stats`]).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections taken from the socket.
    pub accepted: u64,
    /// Connections that completed their handshake and became a channel of the session.
    pub established: u64,
    /// Handshakes that failed: garbage, failed authentication, another session, no
    /// common version or codec, a REJECT from the peer.
    pub refused_handshake: u64,
    /// HELLOs asking for more channels than [`ListenerConfig::max_channels`].
    pub refused_too_many_channels: u64,
    /// Handshakes refused (REJECT `BAD_CHANNEL`, before READY) because the channel
    /// does not fit its session: another channel holds its index, or its channel count
    /// differs from the session's.
    pub refused_channel: u64,
    /// Connections the peer closed, or whose socket failed, during the handshake.
    pub closed: u64,
    /// Handshakes that did not complete within their deadline.
    pub timed_out: u64,
    /// Handshakes still in progress when a call returned; they were closed.
    pub abandoned: u64,
    /// Times `max_pending` handshakes were in progress when a new connection waited.
    pub cap_reached: u64,
    /// Pending connections closed to keep `max_pending` places while a new connection
    /// came: one whose place was open ([`ListenerConfig::evict_after`],
    /// [`ListenerConfig::evict_named_after`]), one that got less far than the new
    /// connection, or the new connection itself (see [`Listener`](super::Listener)).
    pub evicted: u64,
    /// `accept` calls that failed (out of file descriptors, memory, ...); each was
    /// retried after the back-off.
    pub accept_errors: u64,
    /// The most handshakes in progress at once.
    pub peak_pending: u64,
    /// HELLOs that carried their session's HELLO key tag, near this host's clock and
    /// not seen before (PROTOCOL.md, "HELLO key tag"): ranked above untagged ones.
    pub tagged: u64,
}

impl ListenerStats {
    pub(super) fn since(&self, before: &Self, peak: u64) -> Self {
        Self {
            accepted: self.accepted - before.accepted,
            established: self.established - before.established,
            refused_handshake: self.refused_handshake - before.refused_handshake,
            refused_too_many_channels: self.refused_too_many_channels
                - before.refused_too_many_channels,
            refused_channel: self.refused_channel - before.refused_channel,
            closed: self.closed - before.closed,
            timed_out: self.timed_out - before.timed_out,
            abandoned: self.abandoned - before.abandoned,
            cap_reached: self.cap_reached - before.cap_reached,
            evicted: self.evicted - before.evicted,
            accept_errors: self.accept_errors - before.accept_errors,
            peak_pending: peak,
            tagged: self.tagged - before.tagged,
        }
    }
}

/// The live counters behind [`ListenerStats`], readable from any thread.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) accepted: AtomicU64,
    pub(super) established: AtomicU64,
    pub(super) refused_handshake: AtomicU64,
    pub(super) refused_too_many_channels: AtomicU64,
    pub(super) refused_channel: AtomicU64,
    pub(super) closed: AtomicU64,
    pub(super) timed_out: AtomicU64,
    pub(super) abandoned: AtomicU64,
    pub(super) cap_reached: AtomicU64,
    pub(super) evicted: AtomicU64,
    pub(super) accept_errors: AtomicU64,
    pub(super) peak_pending: AtomicU64,
    pub(super) tagged: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(super) fn snapshot(&self) -> ListenerStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ListenerStats {
            accepted: l(&self.accepted),
            established: l(&self.established),
            refused_handshake: l(&self.refused_handshake),
            refused_too_many_channels: l(&self.refused_too_many_channels),
            refused_channel: l(&self.refused_channel),
            closed: l(&self.closed),
            timed_out: l(&self.timed_out),
            abandoned: l(&self.abandoned),
            cap_reached: l(&self.cap_reached),
            evicted: l(&self.evicted),
            accept_errors: l(&self.accept_errors),
            peak_pending: l(&self.peak_pending),
            tagged: l(&self.tagged),
        }
    }
}
