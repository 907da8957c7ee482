//! The destination's bounds on how long the source may take (PROTOCOL.md, Frames after
//! the handshake, Idle timeout; Switchover): each frame whole within the idle timeout
//! of its first byte, and COMMIT within the idle timeout of ACK COMPLETE, whatever
//! else arrives meanwhile.

use std::time::{Duration, Instant};

use pagewire_transport::ChannelError;
use pagewire_transport::session::AnyChannel;

use crate::error::{MigrationError, Wait};

/// How long a receive waits at a time while channel 0 waits for COMMIT: the wait ends
/// this late past its deadline at most, however the source's bytes trickle in.
const COMMIT_SLICE: Duration = Duration::from_millis(50);

/// Gives the channel its frame timeout: each frame must arrive whole within `timeout`
/// of its first byte, plus its length at `pagewire_transport::FRAME_MIN_RATE` (RDMA:
/// not bounded this way, see PROTOCOL.md, Idle timeout).
pub(super) fn set_frame_timeout(channel: &mut AnyChannel, timeout: Duration) {
    match channel {
        AnyChannel::Tcp(c) | AnyChannel::Fallback(c, _) => c.set_frame_timeout(Some(timeout)),
        AnyChannel::Uring(c) => c.set_frame_timeout(Some(timeout)),
        // The transport's `rdma` feature may be on without this crate's.
        #[allow(unreachable_patterns)]
        _ => {}
    }
}

/// Channel 0's wait for COMMIT after it sent ACK COMPLETE: it ends at `by`, the idle
/// timeout after that ACK; frames that arrive meanwhile (extension frames, which are
/// skipped) do not move it.
#[derive(Clone, Copy, Debug)]
pub(super) struct CommitWait {
    by: Instant,
    after: Duration,
}

impl CommitWait {
    /// The wait that starts now, ACK COMPLETE sent, for `idle_timeout`.
    pub(super) fn from_now(idle_timeout: Duration) -> Self {
        Self {
            by: pagewire_transport::deadline::from_now(idle_timeout),
            after: idle_timeout,
        }
    }

    /// Whether the wait has ended.
    pub(super) fn expired(&self) -> bool {
        Instant::now() >= self.by
    }

    /// The error of a wait that ended without COMMIT.
    pub(super) fn timed_out(&self) -> MigrationError {
        MigrationError::Timeout {
            channel: Some(0),
            what: Wait::Commit,
            after: self.after,
        }
    }

    /// Before a receive: bounds it by the wait's end, a slice at a time (so that it
    /// returns by then however the bytes trickle in).
    ///
    /// # Errors
    /// [`Self::timed_out`] once the wait has ended; the channel's error when its
    /// receive timeout cannot be set.
    pub(super) fn before_recv(&self, channel: &mut AnyChannel) -> Result<(), MigrationError> {
        let left = self.by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        let slice = Some(left.min(COMMIT_SLICE));
        let set = match channel {
            AnyChannel::Tcp(c) | AnyChannel::Fallback(c, _) => {
                c.set_recv_deadline(Some(self.by));
                c.set_recv_timeout(slice)
            }
            AnyChannel::Uring(c) => {
                c.set_recv_deadline(Some(self.by));
                c.set_recv_timeout(slice);
                Ok(())
            }
            #[cfg(feature = "rdma")]
            AnyChannel::Rdma(c, _) => {
                c.set_recv_deadline(Some(self.by));
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        };
        set.map_err(|source| MigrationError::Channel { channel: 0, source })
    }

    /// Whether a receive that failed with `e` may be tried again: a slice ran out
    /// before the wait's end.
    pub(super) fn retry(&self, e: &ChannelError) -> bool {
        matches!(e, ChannelError::RecvTimeout(_)) && !self.expired()
    }
}
