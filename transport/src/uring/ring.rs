//! The ring's machinery: the provided-buffer ring, submitting sends in linked chains,
//! reaping completions and zero-copy notifications, and the bounded drain on drop.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue};

use super::{
    BGID, BufRing, CANCEL_TAG, COPY_FROM, Core, DIRECT_TAG, InFlight, MAX_SPARE_RECORD_BUFFER,
    NOTIF_USAGE_ZC_COPIED, RECV_TAG, SPARE_RECORD_BUFFERS, ZC_AUTO_COPIED, ZC_AUTO_PAUSE,
};
use crate::buf::{Mapping, Payload};
use crate::channel::{ChannelError, Completed, OutFrame, SendId};

impl BufRing {
    pub(super) fn new(entries: u16, size: u32) -> io::Result<Self> {
        let ring = Mapping::new(
            usize::from(entries) * std::mem::size_of::<io_uring::types::BufRingEntry>(),
        )?;
        let bufs = Mapping::new(usize::from(entries) * size as usize)?;
        Ok(Self {
            ring,
            bufs,
            entries,
            size,
            tail: 0,
        })
    }

    pub(super) fn buf_ptr(&self, bid: u16) -> *mut u8 {
        self.bufs
            .ptr
            .as_ptr()
            .wrapping_add(usize::from(bid) * self.size as usize)
    }

    /// Hands buffer `bid` to the kernel.
    pub(super) fn push(&mut self, bid: u16) {
        let base = self
            .ring
            .ptr
            .as_ptr()
            .cast::<io_uring::types::BufRingEntry>();
        let slot = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `slot < entries`, so the entry lies inside the ring mapping; the
        // kernel reads entries only up to the published tail, and this one is past it.
        let entry = unsafe { &mut *base.add(slot) };
        entry.set_addr(self.buf_ptr(bid) as u64);
        entry.set_len(self.size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in the first entry of the ring mapping, which is
        // valid and aligned for a u16; the kernel reads it concurrently, hence atomic.
        let tail =
            unsafe { AtomicU16::from_ptr(io_uring::types::BufRingEntry::tail(base).cast_mut()) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Core {
    pub(super) fn fixed_index(&self, p: &Payload) -> Option<u16> {
        if self.fixed_state != super::FixedState::Registered {
            return None;
        }
        let id = p.memory_id()?;
        let start = p.as_ptr() as usize;
        let end = start + p.len();
        self.fixed
            .iter()
            .position(|f| f.memory == id && f.base <= start && end <= f.base + f.len)
            .and_then(|i| u16::try_from(i).ok())
    }

    pub(super) fn arm(&mut self) -> io::Result<()> {
        let e = opcode::RecvMulti::new(Fd(self.stream.as_raw_fd()), BGID)
            .build()
            .user_data(RECV_TAG);
        self.push_now(&e)?;
        self.armed = true;
        Ok(())
    }

    /// Pushes one entry outside the send chain (receive, cancel).
    pub(super) fn push_now(&mut self, e: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entry references no memory (receive uses the registered
            // buffer ring; cancel carries no pointer).
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Starts the next linked chain of queued sends when none is in the kernel.
    pub(super) fn pump(&mut self) {
        if self.chain_left > 0 || self.pending.is_empty() {
            return;
        }
        let mut sq = self.ring.submission();
        let room = sq.capacity() - sq.len();
        let n = room.min(self.pending.len());
        for i in 0..n {
            let Some(mut e) = self.pending.pop_front() else {
                break;
            };
            if i + 1 < n {
                e = e.flags(squeue::Flags::IO_LINK);
            }
            // SAFETY: every queued send points into memory owned by its `InFlight`
            // entry (header vector, boxed msghdr and iovecs, payload slices holding
            // their regions), which stays
            // in `self.inflight` until all of its completions, notifications included,
            // have arrived. `room` guarantees the push succeeds.
            let pushed = unsafe { sq.push(&e) };
            debug_assert!(pushed.is_ok());
        }
        self.chain_left = n as u32;
    }

    /// Enters the kernel: submits, runs deferred work, waits for `want` completions at
    /// most `timeout` long. Returns `false` on timeout.
    pub(super) fn enter(
        &mut self,
        want: usize,
        timeout: Option<Duration>,
    ) -> Result<bool, ChannelError> {
        let r = match timeout {
            Some(t) => {
                // A timespec's seconds are signed: `Duration::MAX` would wrap to -1 s,
                // which the kernel takes as already expired.
                let ts = Timespec::from(t.min(crate::deadline::FAR));
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            None if want == 0 => {
                let n = self.ring.submission().len();
                // SAFETY: the queued entries satisfy `pump`'s and `push_now`'s
                // invariants; no extra argument is passed.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        n as u32,
                        0,
                        io_uring::EnterFlags::GETEVENTS.bits(),
                        None,
                    )
                }
            }
            None => self.ring.submit_and_wait(want),
        };
        match r {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(ChannelError::io("io_uring_enter", e)),
        }
    }

    /// Handles every completion in the queue.
    pub(super) fn reap(&mut self) -> Result<(), ChannelError> {
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        for cqe in cqes {
            let (ud, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            match ud {
                RECV_TAG => self.on_recv(res, flags)?,
                CANCEL_TAG => {}
                DIRECT_TAG => self.direct_res = Some(res),
                seq => self.on_send(seq, res, flags)?,
            }
        }
        Ok(())
    }

    pub(super) fn on_recv(&mut self, res: i32, flags: u32) -> Result<(), ChannelError> {
        if !cqueue::more(flags) {
            self.armed = false;
        }
        if res > 0 {
            let bid =
                cqueue::buffer_select(flags).ok_or(ChannelError::UnknownCompletion(RECV_TAG))?;
            if bid >= self.br.entries {
                return Err(ChannelError::UnknownCompletion(RECV_TAG));
            }
            self.chunks.push_back((bid, res as u32, 0));
        } else if res == 0 {
            self.eof = true;
        } else if res != -libc::ENOBUFS && res != -libc::ECANCELED {
            self.recv_error = Some(io::Error::from_raw_os_error(-res));
        }
        Ok(())
    }

    pub(super) fn on_send(&mut self, seq: u64, res: i32, flags: u32) -> Result<(), ChannelError> {
        let notif = cqueue::notif(flags);
        let copied = res as u32 & NOTIF_USAGE_ZC_COPIED != 0;
        if notif && self.inflight.contains_key(&seq) {
            self.note_zc_usage(copied);
        }
        let f = self
            .inflight
            .get_mut(&seq)
            .ok_or(ChannelError::UnknownCompletion(seq))?;
        f.ops -= 1;
        if notif {
            if copied {
                f.copied += 1;
            } else {
                f.zc += 1;
            }
        } else {
            self.chain_left = self.chain_left.saturating_sub(1);
            if cqueue::more(flags) {
                f.ops += 1;
            }
            if res > 0 {
                self.unsent_bytes = self.unsent_bytes.saturating_sub(res as u64);
            }
            if res < 0 && self.send_error.is_none() {
                self.send_error = Some(io::Error::from_raw_os_error(-res));
            }
        }
        if f.ops == 0
            && let Some(f) = self.inflight.remove(&seq)
        {
            self.finish(f);
        }
        Ok(())
    }

    /// Feeds [`ZeroCopy::Auto`](super::ZeroCopy::Auto) one zero-copy send's outcome:
    /// [`ZC_AUTO_COPIED`] copied in a row pause zero-copy, one in place turns it on.
    pub(super) fn note_zc_usage(&mut self, copied: bool) {
        if copied {
            self.zc_copied_run += 1;
            if self.zc_copied_run >= ZC_AUTO_COPIED {
                self.zc_copied_run = 0;
                self.zc_pause = ZC_AUTO_PAUSE;
                self.zc_budget = ZC_AUTO_COPIED;
            }
        } else {
            self.zc_copied_run = 0;
            self.zc_budget = u32::MAX;
        }
    }

    /// Waits until at most `limit` payload bytes are in flight; the send timeout runs
    /// from the last completion. With an interrupt, it waits a slice at a time, and a
    /// slice that ends with the interrupt raised ends the wait with
    /// [`ChannelError::Interrupted`].
    pub(super) fn wait_in_flight(&mut self, limit: usize) -> Result<(), ChannelError> {
        let timeout = self.cfg.send_timeout;
        let mut deadline = crate::deadline::from_now(timeout);
        while self.in_flight_bytes > limit || (limit == 0 && !self.inflight.is_empty()) {
            if self.send_error.is_some() {
                return Ok(());
            }
            self.pump();
            let before = self.done.len() + usize::from(self.chain_left > 0);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::SendTimeout(timeout));
            }
            let slice = crate::interrupt::slice(left, self.interrupt.as_ref());
            self.enter(1, Some(slice))?;
            self.reap()?;
            if self.done.len() + usize::from(self.chain_left > 0) != before {
                deadline = crate::deadline::from_now(timeout);
            }
            // Also while sends still trickle out: a cancel must not wait for a slow
            // destination to drain what is in flight.
            if self
                .interrupt
                .as_ref()
                .is_some_and(crate::Interrupt::is_raised)
            {
                return Err(ChannelError::Interrupted);
            }
        }
        Ok(())
    }

    pub(super) fn recycle(&mut self, bid: u16) {
        self.br.push(bid);
    }

    /// The front chunk's unread bytes, waiting for one if needed. `None` at EOF.
    /// The receive timeout runs from the call, whatever other completions (sends,
    /// notifications) arrive meanwhile.
    pub(super) fn front(&mut self) -> Result<Option<(u16, u32, u32)>, ChannelError> {
        let deadline = self.cfg.recv_timeout.map(crate::deadline::from_now);
        loop {
            if let Some(&c) = self.chunks.front() {
                return Ok(Some(c));
            }
            if self.eof {
                return Ok(None);
            }
            if let Some(e) = self.recv_error.take() {
                return Err(ChannelError::io("io_uring recv", e));
            }
            if !self.armed {
                self.arm()
                    .map_err(|e| ChannelError::io("io_uring recv", e))?;
            }
            self.pump();
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let timed_out = match left {
                Some(l) if l.is_zero() => {
                    self.enter(0, None)?;
                    self.ring.completion().is_empty()
                }
                _ => !self.enter(1, left)? && self.ring.completion().is_empty(),
            };
            if timed_out {
                return Err(ChannelError::RecvTimeout(
                    self.cfg.recv_timeout.unwrap_or_default(),
                ));
            }
            self.reap()?;
        }
    }

    pub(super) fn consume(&mut self, n: u32) {
        if let Some(c) = self.chunks.front_mut() {
            c.2 += n;
            if c.2 == c.1 {
                let bid = c.0;
                self.chunks.pop_front();
                self.recycle(bid);
            }
        }
    }
}

impl Core {
    /// Keeps a records buffer whose send completed for a later frame, within
    /// [`SPARE_RECORD_BUFFERS`] and [`MAX_SPARE_RECORD_BUFFER`].
    fn keep_records(&mut self, buf: Vec<u8>, sealed: bool) {
        if sealed
            && self.spare_records.len() < SPARE_RECORD_BUFFERS
            && buf.capacity() <= MAX_SPARE_RECORD_BUFFER
        {
            self.spare_records.push(buf);
        }
    }

    pub(super) fn on_send_empty(&mut self, seq: u64) {
        if let Some(f) = self.inflight.remove(&seq) {
            self.finish(f);
        }
    }

    /// The kernel is done with frame `f`: its bytes leave the budget, and its payload
    /// goes back to the caller, unless it went back when sent (a copy, `early`).
    fn finish(&mut self, f: InFlight) {
        self.in_flight_bytes -= f.bytes;
        self.keep_records(f.header, f.sealed);
        self.stats.zc_sends += u64::from(f.zc);
        self.stats.zc_copied += u64::from(f.copied);
        if f.early {
            self.copied_bytes -= f.bytes;
        } else {
            self.done.push(Completed {
                id: f.id,
                payload: f.payload,
                zero_copy: (f.zc, f.copied),
            });
        }
    }

    /// Behind a backlog, copies a frame whose payload is all buffers into one vector
    /// of the channel's and completes the frame now, handing its buffers back (see
    /// [`UringConfig::copy_backlog`]); `true` when it did.
    pub(super) fn copy_behind(&mut self, frame: &mut OutFrame, id: SendId) -> bool {
        let bytes = frame.wire_len() - frame.header.len();
        if bytes == 0
            || self.in_flight_bytes < COPY_FROM
            || self.copied_bytes + bytes > self.cfg.copy_backlog
            || frame
                .payload
                .iter()
                .any(|p| matches!(p, Payload::Guest(_) | Payload::Bytes(_)))
        {
            return false;
        }
        let mut copy = Vec::with_capacity(bytes);
        for p in &frame.payload {
            match p {
                Payload::Pool(b) => copy.extend_from_slice(b.as_slice()),
                Payload::Foreign(b) => copy.extend_from_slice(b),
                Payload::Owned(b) => copy.extend_from_slice(b.as_slice()),
                Payload::Guest(_) | Payload::Bytes(_) => {}
            }
        }
        let originals = std::mem::replace(&mut frame.payload, vec![Payload::Bytes(copy)]);
        self.done.push(Completed {
            id,
            payload: originals,
            zero_copy: (0, 0),
        });
        true
    }
}

impl Core {
    /// Whether a direct receive is with the kernel.
    pub(super) fn direct_pending(&self) -> bool {
        self.direct.is_some() && self.direct_res.is_none()
    }

    /// Forgets the sends never handed to the kernel, so their frames complete.
    pub(super) fn drop_pending(&mut self) {
        for e in std::mem::take(&mut self.pending) {
            let seq = e.get_user_data();
            if let Some(f) = self.inflight.get_mut(&seq) {
                f.ops -= 1;
                if f.ops == 0 {
                    self.on_send_empty(seq);
                }
            }
        }
    }

    /// Waits for outstanding completions until `deadline`; `true` when none is left.
    pub(super) fn drain(&mut self, deadline: Instant) -> bool {
        while !self.inflight.is_empty() || self.armed || self.direct_pending() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || self
                    .enter(1, Some(left.min(Duration::from_millis(100))))
                    .is_err()
                || self.reap().is_err()
            {
                return false;
            }
        }
        true
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // Nothing queued may start now; cancel what the kernel has.
        self.drop_pending();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        let _ = self.push_now(&cancel);
        let drained = self.drain(Instant::now() + Duration::from_millis(500));
        if !drained {
            // Zero-copy notifications wait for the socket's send queue, which a peer
            // that reads nothing never empties: reset the connection to free it.
            let _ = socket2::SockRef::from(&*self.stream).set_linger(Some(Duration::ZERO));
        }
        // SAFETY: `stream` is taken exactly once, here, and not used afterwards.
        drop(unsafe { ManuallyDrop::take(&mut self.stream) });
        if !drained && !self.drain(Instant::now() + Duration::from_secs(5)) {
            // Memory the kernel may still reference must outlive it: leak it.
            if let Some(d) = self.direct.take() {
                std::mem::forget(d);
            }
            for (_, f) in self.inflight.drain() {
                std::mem::forget(f);
            }
        }
    }
}
