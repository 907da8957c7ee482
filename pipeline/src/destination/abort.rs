//! What a destination receiver tells the source when its channel ends with an error:
//! the ABORT reason for each failure (PROTOCOL.md, ABORT), and which failures get none.

use pagewire_protocol::{Abort, AbortReason, Frame};
use pagewire_transport::session::AnyChannel;
use pagewire_transport::{Channel, ChannelError, OutFrame};

use crate::error::{MigrationError, peer_fault};

/// Tells the source why the channel ends: ABORT with the reason for `e`
/// ([`abort_reason`]) and its message, best effort, unless the channel's I/O failed or
/// the source ended it.
pub(super) fn send(channel: &mut AnyChannel, e: &MigrationError) {
    let Some(reason) = abort_reason(e) else {
        return;
    };
    let message = e.to_string();
    let mut end = message.len().min(200);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    if let Ok(f) = OutFrame::whole(&Frame::Abort(Abort {
        reason,
        message: &message[..end],
    })) {
        let mut done = Vec::new();
        let _ = channel.send(f);
        let _ = channel.flush(&mut done);
    }
}

/// The ABORT reason a receiver ending with `e` sends (PROTOCOL.md, ABORT), or `None`
/// when it sends none: the source ended the channel (its ABORT, a close inside a
/// frame), the channel's I/O failed (a socket error, a send timeout, TLS records that
/// do not authenticate), so nothing more can usefully be sent on it, or the channel
/// timed out: it idled out (which a channel that ended the final round may do while
/// channel 0 still works: the source learns of it only if the session fails), a frame
/// did not arrive whole within the idle timeout, or COMMIT did not come within it.
fn abort_reason(e: &MigrationError) -> Option<AbortReason> {
    match e {
        MigrationError::NoCommit { source, .. } => abort_reason(source),
        MigrationError::PeerAborted { .. } => None,
        MigrationError::Channel { source, .. } => match source {
            e if peer_fault(e) => Some(AbortReason::BAD_FRAME),
            ChannelError::BadPlacement { .. } | ChannelError::UnknownCompletion(_) => {
                Some(AbortReason::INTERNAL)
            }
            _ => None,
        },
        MigrationError::SessionFailed { .. } => Some(AbortReason::CHANNEL_FAILED),
        // A timeout closes the channel without an ABORT, as an idle-out does
        // (PROTOCOL.md, ABORT `TIMEOUT`): the wait for COMMIT.
        MigrationError::Timeout { .. } => None,
        MigrationError::Cancelled => Some(AbortReason::CANCELLED),
        MigrationError::DeviceStateRefused { .. } => Some(AbortReason::APPLY_FAILED),
        MigrationError::Worker(_)
        | MigrationError::WorkerPanicked { .. }
        | MigrationError::Memory(_)
        | MigrationError::Engine(_) => Some(AbortReason::INTERNAL),
        // The rules, the frame decoder, the payload's codec, and the protocol checks
        // made here: a frame the destination refuses.
        _ => Some(AbortReason::BAD_FRAME),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pagewire_protocol::{DecodeError, FrameType, SessionError};

    use super::*;

    fn channel(source: ChannelError) -> MigrationError {
        MigrationError::Channel { channel: 1, source }
    }

    #[test]
    fn what_the_peer_sent_gets_bad_frame_and_a_failed_connection_nothing() {
        let bad_frame = [
            channel(ChannelError::Decode(DecodeError::UnknownFrameType(
                FrameType(0x20),
            ))),
            channel(ChannelError::Decode(DecodeError::ChecksumMismatch {
                expected: 1,
                actual: 2,
            })),
            channel(ChannelError::FrameTooLarge { len: 9, max: 8 }),
            MigrationError::Codec {
                channel: 1,
                source: pagewire_accel::CodecError::NoPages {
                    codec: pagewire_protocol::CodecId::ZSTD,
                },
            },
            MigrationError::Rule {
                channel: 1,
                source: SessionError::LayoutMissing(FrameType::PAGES),
            },
        ];
        for e in &bad_frame {
            assert_eq!(abort_reason(e), Some(AbortReason::BAD_FRAME), "{e}");
        }
        let no_commit = MigrationError::NoCommit {
            final_round: 3,
            source: Box::new(channel(ChannelError::FrameTooLarge { len: 9, max: 8 })),
        };
        assert_eq!(abort_reason(&no_commit), Some(AbortReason::BAD_FRAME));
        let silent = [
            channel(ChannelError::PeerClosedMidFrame { have: 3, need: 8 }),
            channel(ChannelError::Failed),
            channel(ChannelError::TlsTruncated),
            channel(ChannelError::SendTimeout(Duration::from_secs(1))),
            channel(ChannelError::RecvTimeout(Duration::from_secs(1))),
            channel(ChannelError::FrameTimeout {
                have: 9,
                need: 4096,
                after: Duration::from_secs(1),
            }),
            MigrationError::NoCommit {
                final_round: 0,
                source: Box::new(MigrationError::Timeout {
                    channel: Some(0),
                    what: crate::error::Wait::Commit,
                    after: Duration::from_secs(1),
                }),
            },
            channel(ChannelError::Io {
                op: "recv",
                source: std::io::ErrorKind::ConnectionReset.into(),
            }),
            MigrationError::PeerAborted {
                channel: 0,
                reason: AbortReason::CANCELLED,
                message: String::new(),
            },
        ];
        for e in &silent {
            assert_eq!(abort_reason(e), None, "{e}");
        }
        let ended = MigrationError::SessionFailed {
            channel: 0,
            cause: "channel 1: bad frame".into(),
        };
        assert_eq!(abort_reason(&ended), Some(AbortReason::CHANNEL_FAILED));
        assert_eq!(
            abort_reason(&MigrationError::Cancelled),
            Some(AbortReason::CANCELLED)
        );
    }
}
