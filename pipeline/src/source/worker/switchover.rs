//! The switchover on channel 0: the device state, COMPLETE and COMMIT; and the other
//! channels' watch for an ABORT meanwhile.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagewire_protocol::{AckKind, DeviceState, Frame, Round};
use pagewire_transport::{Channel, Incoming, OutFrame};

use crate::error::MigrationError;
use crate::source::{Cmd, Reply, Watch};

use super::acks::{EARLY_BUDGET, Next};
use super::{Worker, set_recv_deadline, set_recv_timeout};

/// How often a channel watched during the switchover ([`Worker::watch`]) looks for
/// input, and how long channel 0's waits for the switchover's ACKs go without looking
/// at what the watch found (each receive's deadline: a frame begun stays buffered).
pub(super) const WATCH_POLL: Duration = Duration::from_millis(20);

/// Room for a DEVICE_STATE header (envelope, instance, name length, total, offset).
const DEVICE_STATE_OVERHEAD: usize = 8 + 4 + 1 + 8 + 8;

impl Worker {
    pub(super) fn device_state(
        &mut self,
        name: &str,
        instance: u32,
        total: u64,
        start: u64,
        data: &[u8],
    ) -> Result<(), MigrationError> {
        let limit = self.channel.negotiated().max_frame_bytes as usize;
        let chunk = limit
            .saturating_sub(DEVICE_STATE_OVERHEAD + name.len())
            .max(1);
        let mut offset = 0usize;
        loop {
            let end = (offset + chunk).min(data.len());
            let f = Frame::DeviceState(DeviceState {
                instance,
                name,
                total,
                offset: start + offset as u64,
                data: &data[offset..end],
            });
            self.send_whole(&f)?;
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
        self.reap(true)
    }

    /// The switchover (PROTOCOL.md): COMPLETE, ACK COMPLETE, COMMIT, ACK COMMITTED. An
    /// error before a byte of COMMIT reached the channel is the migration's failure (the
    /// destination cannot run the guest; the source may resume it). From then on the
    /// destination may own the guest: ACK COMMITTED gives [`Reply::Done`], anything else
    /// [`Reply::Unknown`], and no ABORT is sent.
    ///
    /// An ABORT another channel reads meanwhile (`watch`) ends the wait for ACK
    /// COMPLETE as a failure, and the wait for ACK COMMITTED as [`Reply::Unknown`].
    pub(super) fn complete(
        &mut self,
        final_round: u32,
        sections: u32,
        watch: &Watch,
    ) -> Result<Reply, MigrationError> {
        self.early_answers(Next::Complete)?;
        let c = self
            .rules
            .complete(Round(final_round), sections)
            .map_err(|e| self.rule(e))?;
        self.send_whole(&Frame::Complete(c))?;
        self.reap(true)?;
        self.await_ack(AckKind::COMPLETE, u64::from(final_round), Some(watch))?;
        self.early_answers(Next::Commit)?;
        if let Some(e) = watch.take() {
            return Err(e);
        }
        // A cancel that came first keeps COMMIT back; one that comes later no longer
        // interrupts this channel's sends.
        if !self.s.control.seal() {
            return Err(MigrationError::Cancelled);
        }
        let commit = self.rules.commit().map_err(|e| self.rule(e))?;
        let out =
            OutFrame::whole(&Frame::Commit(commit)).map_err(|e| MigrationError::Protocol {
                channel: self.s.ch,
                what: e.to_string(),
            })?;
        // The first byte of COMMIT may leave with this send: the outcome is unknown until
        // ACK COMMITTED arrives.
        let committed = self
            .send(out)
            .and_then(|_| self.reap(true))
            .and_then(|()| self.await_ack(AckKind::COMMITTED, u64::from(final_round), Some(watch)));
        Ok(match committed {
            Ok(()) => Reply::Done,
            Err(e) => Reply::Unknown(e),
        })
    }

    /// Reads this channel, whose final round is acknowledged, while channel 0 hands
    /// the guest over, until the next command arrives (returned; `None` when the
    /// source is gone): an ABORT the destination sends here, or a frame the session's
    /// rules refuse, is recorded in `watch` for channel 0. A close or a failed
    /// connection ends the watch without a word: a destination may idle a channel out
    /// once its final round ended (PROTOCOL.md, ABORT).
    pub(super) fn watch(&mut self, watch: &Watch, rx: &mpsc::Receiver<Cmd>) -> Option<Cmd> {
        loop {
            if watch.ended() {
                return rx.recv().ok();
            }
            if let Err(found) = self.watched_input(watch) {
                if let Some(e) = found {
                    watch.trip(e);
                }
                return rx.recv().ok();
            }
            match rx.recv_timeout(WATCH_POLL) {
                Ok(cmd) => return Some(cmd),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// [`Worker::watch`]'s reads: every frame waiting, each whole within a short read
    /// timeout, for at most [`EARLY_BUDGET`] or until the switchover ends (a frame
    /// begun stays buffered for the next look). `Err(Some(_))` for an ABORT or a
    /// refused frame, `Err(None)` when the channel ended.
    pub(super) fn watched_input(&mut self, watch: &Watch) -> Result<(), Option<MigrationError>> {
        if !self.channel.has_input().map_err(|_| None)? {
            return Ok(());
        }
        let until = Instant::now() + EARLY_BUDGET;
        set_recv_deadline(&mut self.channel, Some(until));
        let result = match set_recv_timeout(&mut self.channel, Some(WATCH_POLL)) {
            Ok(()) => self.read_watched(until, watch),
            Err(_) => Err(None),
        };
        let _ = set_recv_timeout(&mut self.channel, Some(self.s.ack_timeout));
        set_recv_deadline(&mut self.channel, None);
        result
    }

    pub(super) fn read_watched(
        &mut self,
        until: Instant,
        watch: &Watch,
    ) -> Result<(), Option<MigrationError>> {
        use pagewire_transport::ChannelError;
        let ch = self.s.ch;
        while Instant::now() < until
            && !watch.ended()
            && self.channel.has_input().map_err(|_| None)?
        {
            match self.channel.recv(None) {
                Ok(Some(Incoming::Frame(Frame::Abort(a)))) => {
                    return Err(Some(MigrationError::PeerAborted {
                        channel: ch,
                        reason: a.reason,
                        message: a.message.to_owned(),
                    }));
                }
                Ok(Some(Incoming::Frame(f))) => {
                    if let Err(source) = self.rules.on_frame(&f) {
                        return Err(Some(MigrationError::Rule {
                            channel: ch,
                            source,
                        }));
                    }
                }
                Ok(Some(Incoming::Placed(_))) => {
                    return Err(Some(MigrationError::Protocol {
                        channel: ch,
                        what: "the destination sent pages".into(),
                    }));
                }
                Err(ChannelError::RecvTimeout(_)) => return Ok(()),
                // Bytes that are no frame this document allows: refused, as on channel 0.
                Err(source) if crate::error::peer_fault(&source) => {
                    return Err(Some(MigrationError::Channel {
                        channel: ch,
                        source,
                    }));
                }
                Ok(None) | Err(_) => return Err(None),
            }
        }
        Ok(())
    }
}
