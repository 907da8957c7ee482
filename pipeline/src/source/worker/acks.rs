//! The destination's answers: waiting for an ACK, and reading what it sent ahead of
//! the frame that asks for it.

use std::time::{Duration, Instant};

use pagewire_protocol::{AckKind, Frame, SessionError, SourceEvent};
use pagewire_transport::{Channel, Incoming};

use crate::error::{MigrationError, Wait};
use crate::source::Watch;

use super::switchover::WATCH_POLL;
use super::{Worker, set_recv_deadline, set_recv_timeout};

/// The frame a worker is about to send that the destination must answer.
#[derive(Clone, Copy, Debug)]
pub(super) enum Next {
    EndOfRound(u32),
    Complete,
    Commit,
}

impl Next {
    /// Whether an ACK of `kind` and `value` would answer this frame (or a later
    /// one): refused now, it was sent ahead of it.
    fn answered_by(self, kind: AckKind, value: u64) -> bool {
        match (self, kind) {
            (Next::EndOfRound(r), AckKind::ROUND) => value >= u64::from(r),
            (Next::EndOfRound(_) | Next::Complete, AckKind::COMPLETE) | (_, AckKind::COMMITTED) => {
                true
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Next::EndOfRound(r) => write!(f, "END_OF_ROUND {r}"),
            Next::Complete => f.write_str("COMPLETE"),
            Next::Commit => f.write_str("COMMIT"),
        }
    }
}

/// How long [`Worker::early_answers`] reads what the destination sent ahead before it
/// gives up on the channel. A million 8-byte extension frames sent ahead of an ACK
/// COMMITTED (8 MB, more than loopback's socket buffers hold at once) took under a
/// tenth of that to read on this project's test machine (the whole migration 0.11 s).
pub(super) const EARLY_BUDGET: Duration = Duration::from_millis(500);

impl Worker {
    /// Waits for the ACK, within `ack_timeout` of the call in all: each receive gets
    /// only the time left, however many other frames arrive meanwhile, and a frame
    /// that arrives a byte at a time is cut off at the deadline too (at most one read
    /// timeout late).
    ///
    /// With a `watch`, the wait also ends as soon as another channel saw an ABORT
    /// ([`Worker::watch`]), with that error; for ACK COMMITTED, once what channel 0
    /// already holds is read (the answer may be there: it then counts).
    pub(super) fn await_ack(
        &mut self,
        kind: AckKind,
        value: u64,
        watch: Option<&Watch>,
    ) -> Result<(), MigrationError> {
        let ch = self.s.ch;
        let timeout = self.s.ack_timeout;
        let deadline = pagewire_transport::deadline::from_now(timeout);
        set_recv_deadline(&mut self.channel, Some(deadline));
        let timed_out = MigrationError::Timeout {
            channel: Some(ch),
            what: Wait::Ack,
            after: timeout,
        };
        // Before COMMIT, `Control::cancel` ends the wait too (a slice at a time); after
        // it, cancelling could not take the guest back.
        let cancellable = kind != AckKind::COMMITTED;
        let result = loop {
            if cancellable && self.s.control.is_cancelled() {
                break Err(MigrationError::Cancelled);
            }
            if let Some(e) = watch.and_then(Watch::take) {
                let answered = kind == AckKind::COMMITTED
                    && matches!(self.answer_waiting(kind, value), Ok(true));
                break if answered { Ok(()) } else { Err(e) };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(timed_out);
            }
            // Watched or cancellable, the receive returns in time to look at the watch
            // and the cancellation, however its bytes trickle in; a frame begun stays
            // buffered for the next receive.
            let sliced = watch.is_some() || cancellable;
            let slice = if sliced {
                set_recv_deadline(
                    &mut self.channel,
                    Some(deadline.min(Instant::now() + WATCH_POLL)),
                );
                left.min(WATCH_POLL)
            } else {
                left
            };
            if let Err(e) = set_recv_timeout(&mut self.channel, Some(slice)) {
                break Err(self.chan_err(e));
            }
            match self.next_ack(kind, value) {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(MigrationError::Timeout {
                    what: Wait::Ack, ..
                }) if sliced && Instant::now() < deadline => {}
                Err(e) => break Err(e),
            }
        };
        // Back to the whole timeout for the next wait (best effort: the next one sets
        // its own).
        let _ = set_recv_timeout(&mut self.channel, Some(timeout));
        set_recv_deadline(&mut self.channel, None);
        result
    }

    /// Reads what the destination already sent, without waiting for more, before a
    /// frame it must answer (END_OF_ROUND, COMPLETE, COMMIT) is sent: an answer that is
    /// already here was sent before that frame, and the session's rules refuse it now,
    /// as an ACK that does not fit what was sent (`BadAck`). Without this a destination
    /// could queue ACK COMPLETE and ACK COMMITTED ahead and stop reading, and the
    /// source, reading them only once it waits, would report the guest committed to a
    /// destination that never took COMMIT. An answer that crosses the frame in flight
    /// cannot be told apart here (PROTOCOL.md, ACK). An ABORT or a close found here
    /// fails the channel at once.
    pub(super) fn early_answers(&mut self, next: Next) -> Result<(), MigrationError> {
        if !self.has_input()? {
            return Ok(());
        }
        // A receive first sends what the channel's queue holds (TCP), which may take
        // longer than the budget on a slow link: send it now, outside the budget.
        self.reap(true)?;
        // A frame begun but not whole within a read timeout stays buffered for the next
        // wait (it had not arrived whole before the frame was sent).
        let until = Instant::now() + EARLY_BUDGET;
        set_recv_deadline(&mut self.channel, Some(until));
        if let Err(e) = set_recv_timeout(&mut self.channel, Some(Duration::from_millis(20))) {
            set_recv_deadline(&mut self.channel, None);
            return Err(self.chan_err(e));
        }
        let result = self.read_early(next, until);
        let _ = set_recv_timeout(&mut self.channel, Some(self.s.ack_timeout));
        set_recv_deadline(&mut self.channel, None);
        result
    }

    /// [`Worker::early_answers`]' reads, every frame waiting however many (extension
    /// frames and FRAMES ACKs are the destination's to send), until nothing waits.
    /// Frames still waiting after [`EARLY_BUDGET`] fail the channel: what a peer can
    /// have sent ahead is bounded by the sockets' buffers, read in well under that,
    /// so a destination still sending then keeps the source from checking what it
    /// sent, and an ACK could hide behind it.
    pub(super) fn read_early(&mut self, next: Next, until: Instant) -> Result<(), MigrationError> {
        while Instant::now() < until {
            if !self.has_input()? {
                return Ok(());
            }
            match self.next_ack(AckKind::FRAMES, u64::MAX) {
                Ok(_) => {}
                // A frame not whole within the read timeout: it had not arrived. But
                // at the budget's end (the receive's deadline), frames still coming.
                Err(MigrationError::Timeout { .. }) if Instant::now() < until => return Ok(()),
                Err(MigrationError::Timeout { .. }) => break,
                Err(MigrationError::Rule {
                    channel,
                    source: SessionError::BadAck { kind, value },
                }) if next.answered_by(kind, value) => {
                    return Err(MigrationError::Protocol {
                        channel,
                        what: format!(
                            "the destination sent ACK {} {value} before this source sent {next} (an ACK answers a frame it received)",
                            format!("{kind:?}").to_uppercase()
                        ),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        if self.has_input()? {
            return Err(MigrationError::Protocol {
                channel: self.s.ch,
                what: format!(
                    "the destination kept sending frames unasked for {EARLY_BUDGET:?} before this source sent {next}"
                ),
            });
        }
        Ok(())
    }

    pub(super) fn has_input(&mut self) -> Result<bool, MigrationError> {
        self.channel.has_input().map_err(|e| self.chan_err(e))
    }

    /// Receives one frame; `true` when it is the ACK waited for, `false` for a FRAMES
    /// ACK (progress reports, skipped).
    pub(super) fn next_ack(&mut self, kind: AckKind, value: u64) -> Result<bool, MigrationError> {
        let ch = self.s.ch;
        let incoming = match self.channel.recv(None) {
            Ok(i) => i,
            Err(e) => {
                return Err(match e {
                    pagewire_transport::ChannelError::RecvTimeout(_) => MigrationError::Timeout {
                        channel: Some(ch),
                        what: Wait::Ack,
                        after: self.s.ack_timeout,
                    },
                    source => MigrationError::Channel {
                        channel: ch,
                        source,
                    },
                });
            }
        };
        match incoming {
            None => Err(MigrationError::Protocol {
                channel: ch,
                what: "the destination closed the channel".into(),
            }),
            Some(Incoming::Frame(Frame::Abort(a))) => Err(MigrationError::PeerAborted {
                channel: ch,
                reason: a.reason,
                message: a.message.to_owned(),
            }),
            // The session's rules check every ACK against what was sent and skip
            // extension frames (PROTOCOL.md).
            Some(Incoming::Frame(f)) => match self.rules.on_frame(&f) {
                Ok(SourceEvent::RoundApplied(r)) => {
                    Ok(kind == AckKind::ROUND && u64::from(r.0) == value)
                }
                Ok(SourceEvent::Complete(r)) => {
                    Ok(kind == AckKind::COMPLETE && u64::from(r.0) == value)
                }
                Ok(SourceEvent::Committed(r)) => {
                    Ok(kind == AckKind::COMMITTED && u64::from(r.0) == value)
                }
                Ok(_) => Ok(false),
                Err(source) => Err(MigrationError::Rule {
                    channel: ch,
                    source,
                }),
            },
            Some(Incoming::Placed(_)) => Err(MigrationError::Protocol {
                channel: ch,
                what: "the destination sent pages".into(),
            }),
        }
    }

    /// What channel 0 already holds, read without waiting for more (each frame whole
    /// within a short read timeout, all within [`EARLY_BUDGET`]): `true` when the ACK
    /// waited for is among it.
    pub(super) fn answer_waiting(
        &mut self,
        kind: AckKind,
        value: u64,
    ) -> Result<bool, MigrationError> {
        let until = Instant::now() + EARLY_BUDGET;
        set_recv_deadline(&mut self.channel, Some(until));
        if let Err(e) = set_recv_timeout(&mut self.channel, Some(WATCH_POLL)) {
            return Err(self.chan_err(e));
        }
        while Instant::now() < until && self.has_input()? {
            match self.next_ack(kind, value) {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(MigrationError::Timeout { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}
