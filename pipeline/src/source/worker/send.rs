//! Handing frames to the channel: the hold on what it may keep unacknowledged, and
//! the sends it finished (their payloads back to the engine).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pagewire_protocol::Frame;
use pagewire_transport::{Channel, OutFrame, Payload};

use crate::error::{MigrationError, Wait};

use super::{Worker, pages};

/// The longest [`Worker::hold`] waits on the channel at a time.
const HOLD_WAIT: Duration = Duration::from_millis(5);

/// What a channel may hold unacknowledged while the adaptive choice does not know the
/// link yet ([`Worker::hold`]): about what a socket held before channels had a send
/// queue.
const BLIND_HOLD: u64 = 2 << 20;

/// What a channel may hold unacknowledged under the adaptive choice once it knows the
/// link ([`Worker::hold`]): 280 ms of a 1 Gbit/s link shared by two channels, 28 ms of
/// 10 Gbit/s. A migration alternates between stretches where the cores limit and
/// stretches where the link does (0.2-0.6 s on the two-copy test image), and what the
/// channel holds carries the link through the first while the cores ran ahead in the
/// second (the TCP send queue's reason to be). With 4 MiB (70 ms at 1 Gbit/s) the link
/// idled there: auto moved 2.5 % fewer pages than static zstd:1 with zstd:1 as its only
/// candidate, none fewer with 16 MiB, and with every candidate 1.03x the pages of 4
/// MiB (medians of 4 rounds, over TCP; 1.10x over io_uring, 3 rounds). The channels'
/// own queues hold more (io_uring 64 MiB, a second of that link; TCP 16 MiB and the
/// socket's 4): a choice would reach the wire that much later, and raw frames taken in
/// at memory speed on an incompressible stretch fill it (10 % of a migration's guest
/// bytes went raw over io_uring's 64 MiB).
const ADAPTIVE_HOLD: u64 = 16 << 20;

/// Most payload vectors a worker keeps for its next frames.
const SPARE_PAYLOADS: usize = 32;

impl Worker {
    /// Sends a frame from its own bytes; returns its length on the wire.
    pub(in crate::source) fn send_whole(
        &mut self,
        frame: &Frame<'_>,
    ) -> Result<u64, MigrationError> {
        let out = OutFrame::whole(frame).map_err(|e| MigrationError::Protocol {
            channel: self.s.ch,
            what: e.to_string(),
        })?;
        self.send(out)
    }

    pub(super) fn send(&mut self, out: OutFrame) -> Result<u64, MigrationError> {
        let len = out.wire_len() as u64;
        let t = Instant::now();
        // A cancelled migration stops waiting for the cap: this frame goes, and the
        // round ends at its next check of the cancellation.
        let control = &self.s.control;
        control.limiter().acquire(len, || control.is_cancelled());
        let id = self.channel.send(out).map_err(|e| self.chan_err(e))?;
        let now = Instant::now();
        self.sends.push_back((id, now));
        self.s.bytes_sent.fetch_add(len, Ordering::Relaxed);
        self.reap(false)?;
        let mut blocked = now - t;
        if let Some(sel) = &self.s.adaptive {
            let limit = if sel.link_known() {
                ADAPTIVE_HOLD
            } else {
                BLIND_HOLD
            };
            blocked += self.hold(limit)?;
        }
        if let Some(sel) = self.s.adaptive.as_mut() {
            // Time on the cap and in the channel: the link's share of the frame; and
            // what the channel still holds, for what really left it.
            let unacked = self.channel.unacked_bytes();
            let channel = &self.channel;
            sel.observe_send_unacked(
                len,
                blocked,
                unacked,
                || channel.peer_limited(),
                Instant::now(),
            );
        }
        Ok(len)
    }

    /// Under the adaptive choice, waits until the channel holds at most `limit` bytes
    /// (within the send timeout) and returns how long: [`BLIND_HOLD`] while the
    /// choice does not know the link yet (its first choice is made blind, raw, and a
    /// channel with a send queue would otherwise take megabytes of raw frames at once,
    /// each worth several compressed ones on a slow link), [`ADAPTIVE_HOLD`] after.
    /// The wait is the channel's: the selector counts it as time waiting on the link,
    /// which is how it finds a slow link early and a busy one later.
    ///
    /// It waits in the kernel where the channel can (`Channel::wait_sends`: room in
    /// the socket for the TCP send queue, an io_uring completion), 5 ms at most at a
    /// time: a channel held back by a slow receiver waits here most of the migration,
    /// and with 200 µs naps, about 34 µs of CPU each on this machine, two channels
    /// took 1.1-1.8 CPU-seconds over a 2 GiB migration where `send` blocking in the
    /// kernel took 0.3.
    ///
    /// While it waits the channel must drain a whole frame's bytes (the largest frame
    /// the session allows) every `send_timeout`: a destination that stops reading, or reads a
    /// byte at a time, fails the channel with [`MigrationError::Timeout`] (PROTOCOL.md,
    /// END_OF_ROUND: `send_timeout` without the destination taking a whole frame).
    /// (It used to give up waiting after `send_timeout` and send the next frame, so a
    /// destination that stopped reading held the source for `send_timeout` a frame.)
    pub(super) fn hold(&mut self, limit: u64) -> Result<Duration, MigrationError> {
        let start = Instant::now();
        // A whole frame: the largest this channel may send (a small frame's bytes would
        // let a destination reading a few bytes a second pass).
        let frame = u64::from(self.channel.negotiated().max_frame_bytes);
        // When the channel last drained a frame's bytes, and what it held then.
        let mut progress: Option<(Instant, u64)> = None;
        while let Some(u) = self.channel.unacked_bytes().filter(|&u| u > limit) {
            // Before COMMIT, a cancel ends the wait (it is 5 ms at a time).
            if self.s.control.is_cancelled() && self.rules.commit_sent().is_none() {
                return Err(MigrationError::Cancelled);
            }
            let now = Instant::now();
            match progress {
                Some((_, low)) if u.saturating_add(frame) <= low => progress = Some((now, u)),
                Some((since, _)) if now.duration_since(since) >= self.s.send_timeout => {
                    return Err(MigrationError::Timeout {
                        channel: Some(self.s.ch),
                        what: Wait::Send,
                        after: self.s.send_timeout,
                    });
                }
                Some(_) => {}
                None => progress = Some((now, u)),
            }
            self.channel
                .wait_sends(HOLD_WAIT)
                .map_err(|e| self.chan_err(e))?;
            self.reap(false)?;
        }
        Ok(start.elapsed())
    }

    /// Collects finished sends: the engine's output buffers go back to its spare
    /// ones, others to their pools on drop.
    pub(super) fn reap(&mut self, all: bool) -> Result<(), MigrationError> {
        let res = if all {
            self.channel.flush(&mut self.done)
        } else {
            self.channel.poll_completions(&mut self.done).map(|_| ())
        };
        res.map_err(|e| self.chan_err(e))?;
        let st = self.channel.stats();
        let counters = &self.s.counters;
        counters
            .registered
            .store(st.registered_bytes, Ordering::Relaxed);
        counters
            .tls_sealed
            .store(st.tls_bytes_sealed, Ordering::Relaxed);
        counters
            .tls_copied
            .store(st.tls_bytes_copied, Ordering::Relaxed);
        for mut c in self.done.drain(..) {
            self.s
                .counters
                .zc
                .fetch_add(u64::from(c.zero_copy.0), Ordering::Relaxed);
            self.s
                .counters
                .zc_copied
                .fetch_add(u64::from(c.zero_copy.1), Ordering::Relaxed);
            // Sends may complete out of order (a small frame copied at once, before a
            // zero-copy send's notification): each completion names exactly one send,
            // whose payload buffers come back with it.
            if let Some(i) = self.sends.iter().position(|&(id, _)| id == c.id)
                && let Some((_, at)) = self.sends.remove(i)
            {
                self.s.latency.send.record(at.elapsed());
            }
            // The engine's buffers go back to its spare ones, with no atomic
            // read-modify-write (dropped, they would go back to its pool, and out again,
            // through the pool's atomic operations).
            for p in &mut c.payload {
                if let Payload::Owned(o) = p
                    && let Some(pages::EnginePayload(buf)) = o.take::<pages::EnginePayload>()
                {
                    self.s.engine.recycle_buf(buf);
                }
            }
            // The vector carries the next frame's payload.
            if c.payload.capacity() > 0 && self.spare_payloads.len() < SPARE_PAYLOADS {
                c.payload.clear();
                self.spare_payloads.push(c.payload);
            }
        }
        Ok(())
    }
}
