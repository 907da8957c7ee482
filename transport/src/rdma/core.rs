//! One connection's engine: completions, message buffers, frames in flight, the
//! READs a destination posts, and the byte stream its messages carry.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::BorrowedFd;
use std::ptr;
use std::time::{Duration, Instant};

use pagewire_protocol::Envelope;
use pagewire_protocol::rdma::{AdvertRegion, Done, RdmaMsg, ReadPages};
use rdma_sys::*;

use super::RdmaConfig;
use super::plan::{ReadOp, source_segments};
use super::verbs::{READ_BIT, RECV_BIT, Verbs};
use crate::buf::{GuestSlice, Payload};
use crate::channel::{ChannelError, ChannelStats, Completed, OutFrame, SendId};
use crate::recv::{ByteSource, copy_to_guest, raw_header};
use crate::session::wait_readable;

const IMM_STREAM: u32 = RdmaMsg::STREAM.0;
const IMM_CLOSE: u32 = RdmaMsg::CLOSE.0;
const IMM_DONE: u32 = RdmaMsg::DONE.0;

/// One received message.
#[derive(Clone, Copy, Debug)]
pub(super) struct Msg {
    pub(super) buf: u32,
    pub(super) len: u32,
    pub(super) off: u32,
    pub(super) imm: u32,
}

/// A frame whose work requests are with the NIC.
pub(super) struct Pending {
    id: SendId,
    /// Kept alive until the frame's work requests complete.
    _header: Vec<u8>,
    payload: Vec<Payload>,
    /// Work requests posted and not completed.
    ops: u32,
    /// Every work request of the frame is posted.
    sealed: bool,
    /// A READ_PAGES frame: its payload is kept until the destination's DONE.
    awaiting_done: bool,
    slots: Vec<u32>,
}

/// Everything but the receive parser.
pub(super) struct Core {
    // Declared first so the verbs objects go before the memory they reference.
    pub(super) v: Verbs,
    pub(super) cfg: RdmaConfig,
    pub(super) msgs: VecDeque<Msg>,
    free_slots: Vec<u32>,
    pub(super) pending: HashMap<u64, Pending>,
    next_seq: u64,
    /// The source's advertised memory (on the destination).
    pub(super) remote: Vec<AdvertRegion>,
    pub(super) done: Vec<Completed>,
    pub(super) error: Option<ChannelError>,
    pub(super) eof: bool,
    /// Send and READ work requests posted and not completed (at most `send_depth`).
    outstanding: u32,
    /// READs posted and not completed.
    reads: u32,
    pub(super) stats: ChannelStats,
}

impl Core {
    pub(super) fn new(v: Verbs, cfg: &RdmaConfig) -> Self {
        Self {
            v,
            free_slots: (0..cfg.send_depth).rev().collect(),
            cfg: cfg.clone(),
            msgs: VecDeque::new(),
            pending: HashMap::new(),
            next_seq: 0,
            remote: Vec::new(),
            done: Vec::new(),
            error: None,
            eof: false,
            outstanding: 0,
            reads: 0,
            stats: ChannelStats::default(),
        }
    }

    /// Polls the CQ; with `timeout`, sleeps on the completion channel first when it
    /// is empty. Returns whether anything completed.
    pub(super) fn poll(&mut self, timeout: Option<Option<Duration>>) -> Result<bool, ChannelError> {
        let mut wcs: [ibv_wc; 16] =
            // SAFETY: ibv_wc is plain data; an all-zero value is valid.
            unsafe { std::mem::zeroed() };
        let mut any = false;
        for attempt in 0..2 {
            // SAFETY: the CQ is live; `wcs` has room for 16 entries.
            let n = unsafe { ibv_poll_cq(self.v.cq, 16, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(ChannelError::WorkRequest("ibv_poll_cq failed".into()));
            }
            for wc in &wcs[..n as usize] {
                self.on_completion(wc)?;
                any = true;
            }
            if any || attempt == 1 {
                break;
            }
            let Some(t) = timeout else { break };
            // Arm the notification, re-poll to close the race, then sleep.
            // SAFETY: the CQ is live.
            if unsafe { ibv_req_notify_cq(self.v.cq, 0) } != 0 {
                return Err(ChannelError::WorkRequest("ibv_req_notify_cq failed".into()));
            }
            // SAFETY: the CQ is live; `wcs` has room for 16 entries.
            let n = unsafe { ibv_poll_cq(self.v.cq, 16, wcs.as_mut_ptr()) };
            for wc in &wcs[..n.max(0) as usize] {
                self.on_completion(wc)?;
                any = true;
            }
            if any {
                break;
            }
            // SAFETY: `comp` is the live completion channel of the CQ, and its fd stays
            // open while the channel lives, which is longer than this borrow.
            let fd = unsafe { BorrowedFd::borrow_raw((*self.v.comp).fd) };
            if !wait_readable(fd, t).map_err(|e| ChannelError::io("poll(completion channel)", e))? {
                return Ok(false);
            }
            let (mut cq, mut ctx) = (ptr::null_mut(), ptr::null_mut());
            // SAFETY: the channel is readable, so ibv_get_cq_event does not block; the
            // one event it returns is acknowledged at once.
            unsafe {
                if ibv_get_cq_event(self.v.comp, &mut cq, &mut ctx) == 0 {
                    ibv_ack_cq_events(cq, 1);
                }
            }
        }
        Ok(any)
    }

    fn on_completion(&mut self, wc: &ibv_wc) -> Result<(), ChannelError> {
        if wc.wr_id & RECV_BIT != 0 {
            let buf = (wc.wr_id & !RECV_BIT) as u32;
            if wc.status == ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
                // The connection is gone; without a CLOSE first it was not clean.
                if !self.eof {
                    self.error
                        .get_or_insert(ChannelError::Framing("the peer disconnected"));
                }
                return Ok(());
            }
            if wc.status != ibv_wc_status::IBV_WC_SUCCESS || buf >= self.cfg.recv_depth {
                return Err(ChannelError::WorkRequest(format!(
                    "receive completed with status {}",
                    wc.status
                )));
            }
            let imm = if wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0 {
                // SAFETY: the flag says the union holds immediate data.
                u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })
            } else {
                IMM_STREAM
            };
            if imm == IMM_CLOSE {
                self.eof = true;
                let _ = self.v.post_recv(buf, self.cfg.message_size);
                return Ok(());
            }
            if imm == IMM_DONE {
                let len = (wc.byte_len.min(self.cfg.message_size)) as usize;
                // SAFETY: the NIC wrote `len` bytes into receive buffer `buf` and
                // completed; it is reposted right after this copy.
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.v.recv_buf(buf, self.cfg.message_size), len)
                };
                let done = Done::decode(bytes).map_err(ChannelError::Decode);
                self.v
                    .post_recv(buf, self.cfg.message_size)
                    .map_err(|e| ChannelError::io("ibv_post_recv", e))?;
                let seq = done?.seq.0;
                let p = self
                    .pending
                    .get_mut(&seq)
                    .filter(|p| p.awaiting_done)
                    .ok_or(ChannelError::Framing("DONE for a frame not read"))?;
                p.awaiting_done = false;
                if p.ops == 0 && p.sealed {
                    self.finish(seq);
                }
                return Ok(());
            }
            self.msgs.push_back(Msg {
                buf,
                len: wc.byte_len.min(self.cfg.message_size),
                off: 0,
                imm,
            });
            return Ok(());
        }
        let seq = wc.wr_id;
        self.outstanding = self.outstanding.saturating_sub(1);
        if seq & READ_BIT != 0 {
            self.reads = self.reads.saturating_sub(1);
            if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                self.error.get_or_insert(ChannelError::WorkRequest(format!(
                    "RDMA READ completed with status {}",
                    wc.status
                )));
            }
            return Ok(());
        }
        if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
            self.error.get_or_insert(ChannelError::WorkRequest(format!(
                "send or write completed with status {}",
                wc.status
            )));
        }
        let p = self
            .pending
            .get_mut(&seq)
            .ok_or(ChannelError::UnknownCompletion(seq))?;
        p.ops = p.ops.saturating_sub(1);
        if p.ops == 0 && p.sealed && !p.awaiting_done {
            self.finish(seq);
        }
        Ok(())
    }

    fn finish(&mut self, seq: u64) {
        if let Some(p) = self.pending.remove(&seq) {
            self.free_slots.extend(p.slots);
            self.done.push(Completed {
                id: p.id,
                payload: p.payload,
                zero_copy: (0, 0),
            });
        }
    }

    /// Starts tracking a frame; its memory stays here until it completes.
    /// The number the next `begin` gives.
    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub(super) fn begin(&mut self, header: Vec<u8>, payload: Vec<Payload>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            seq,
            Pending {
                id: SendId(seq),
                _header: header,
                payload,
                ops: 0,
                sealed: false,
                awaiting_done: false,
                slots: Vec::new(),
            },
        );
        seq
    }

    /// Every work request of `seq` is posted.
    pub(super) fn seal(&mut self, seq: u64) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.sealed = true;
            if p.ops == 0 && !p.awaiting_done {
                self.finish(seq);
            }
        }
    }

    /// Sends bytes of the stream as one frame of their own (handshake, control).
    pub(super) fn send_bytes(&mut self, bytes: Vec<u8>, imm: u32) -> Result<(), ChannelError> {
        let part = [(bytes.as_ptr(), bytes.len())];
        let seq = self.begin(bytes, Vec::new());
        let r = self.send_stream(seq, &part, imm);
        self.seal(seq);
        r
    }

    fn wait_slot(&mut self) -> Result<u32, ChannelError> {
        let deadline = crate::deadline::from_now(self.cfg.send_timeout);
        loop {
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            if let Some(s) = self.free_slots.pop() {
                return Ok(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::SendTimeout(self.cfg.send_timeout));
            }
            self.poll(Some(Some(left)))?;
        }
    }

    /// Waits until `n` more send work requests fit the send queue.
    fn reserve(&mut self, n: u32) -> Result<(), ChannelError> {
        let deadline = crate::deadline::from_now(self.cfg.send_timeout);
        while self.outstanding + n > self.cfg.send_depth {
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::SendTimeout(self.cfg.send_timeout));
            }
            self.poll(Some(Some(left)))?;
        }
        Ok(())
    }

    /// Posts work requests of frame `seq`, in batches that fit the send queue.
    pub(super) fn post(
        &mut self,
        seq: u64,
        wrs: &mut [(ibv_send_wr, ibv_sge)],
    ) -> Result<(), ChannelError> {
        let batch = (self.cfg.send_depth as usize / 2).max(1);
        for chunk in wrs.chunks_mut(batch) {
            self.reserve(chunk.len() as u32)?;
            self.post_batch(seq, chunk)?;
        }
        Ok(())
    }

    fn post_batch(
        &mut self,
        seq: u64,
        wrs: &mut [(ibv_send_wr, ibv_sge)],
    ) -> Result<(), ChannelError> {
        let n = wrs.len();
        for i in 0..n {
            let (head, tail) = wrs.split_at_mut(i + 1);
            let (wr, sge) = &mut head[i];
            wr.sg_list = sge;
            wr.num_sge = 1;
            wr.wr_id = seq;
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.next = tail.first_mut().map_or(ptr::null_mut(), |(w, _)| w);
        }
        let Some((first, _)) = wrs.first_mut() else {
            return Ok(());
        };
        if let Some(p) = self.pending.get_mut(&seq) {
            p.ops += n as u32;
        }
        self.outstanding += n as u32;
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live; every WR's SGE points into registered memory that
        // the frame's `Pending` entry (payload slices, send buffer slots) keeps
        // until the WR completes; the WR structs themselves are only read during the
        // call.
        let r = unsafe { ibv_post_send((*self.v.id).qp, first, &mut bad) };
        if r != 0 {
            return Err(ChannelError::io(
                "ibv_post_send",
                io::Error::from_raw_os_error(r),
            ));
        }
        Ok(())
    }

    fn message_wr(&self, slot: u32, len: u32, imm: u32) -> (ibv_send_wr, ibv_sge) {
        // SAFETY: ibv_send_wr is plain data; zero is a valid start.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
        wr.imm_data_invalidated_rkey_union = imm_data_invalidated_rkey_union_t {
            imm_data: imm.to_be(),
        };
        let sge = ibv_sge {
            addr: self.v.send_buf(slot, self.cfg.message_size) as u64,
            length: len,
            // SAFETY: `send_mr` is a live registration.
            lkey: unsafe { (*self.v.send_mr).lkey },
        };
        (wr, sge)
    }

    /// Sends `parts` as messages of the stream, copied into send buffers.
    pub(super) fn send_stream(
        &mut self,
        seq: u64,
        parts: &[(*const u8, usize)],
        imm: u32,
    ) -> Result<(), ChannelError> {
        let size = self.cfg.message_size as usize;
        let mut slots = Vec::new();
        let mut fill = 0usize;
        let total: usize = parts.iter().map(|p| p.1).sum();
        let mut sent = 0;
        let mut part = 0;
        let mut part_off = 0;
        while sent < total || (total == 0 && slots.is_empty()) {
            let slot = self.wait_slot()?;
            if let Some(p) = self.pending.get_mut(&seq) {
                p.slots.push(slot);
            }
            slots.push(slot);
            let dst = self.v.send_buf(slot, self.cfg.message_size);
            while fill < size && part < parts.len() {
                let (p, len) = parts[part];
                let n = (len - part_off).min(size - fill);
                // SAFETY: the source is `n` bytes inside a buffer the caller keeps
                // alive (frame header or payload slice, read without forming a
                // reference to guest memory); the target is inside send slot `slot`,
                // owned by this frame until its completion.
                unsafe { ptr::copy_nonoverlapping(p.add(part_off), dst.add(fill), n) };
                fill += n;
                part_off += n;
                sent += n;
                if part_off == len {
                    part += 1;
                    part_off = 0;
                }
            }
            // Posted at once, so a frame larger than all send buffers together
            // still goes out as buffers come back.
            let mut wr = [self.message_wr(slot, fill as u32, imm)];
            self.post(seq, &mut wr)?;
            fill = 0;
            if total == 0 {
                break;
            }
        }
        Ok(())
    }

    /// The READ_PAGES message of a raw PAGES frame `seq` whose payload lies in the
    /// registered guest memory, when it can go that way (and fits one message).
    pub(super) fn read_pages_msg(
        &self,
        seq: u64,
        frame: &OutFrame,
        limits: &pagewire_protocol::Limits,
    ) -> Option<Vec<u8>> {
        let header = frame.header.get(Envelope::LEN..)?;
        let payload_len = frame.wire_len() - frame.header.len();
        raw_header(frame.header[1], header, payload_len, limits)?;
        let slices: Option<Vec<(u64, u64)>> = frame
            .payload
            .iter()
            .map(|p| match p {
                Payload::Guest(s) => Some((s.as_ptr() as u64, s.len() as u64)),
                _ => None,
            })
            .collect();
        let registered: Vec<(u64, u64)> = self
            .v
            .mrs()
            .iter()
            .map(|m| (m.memory.as_ptr() as u64, m.memory.len() as u64))
            .collect();
        let segments = source_segments(&slices?, &registered)?;
        let mut out = Vec::new();
        ReadPages {
            seq: pagewire_protocol::rdma::ReadSeq(seq),
            segments,
            header: &frame.header,
        }
        .encode(&mut out)
        .ok()?;
        (out.len() <= self.cfg.message_size as usize).then_some(out)
    }

    /// Starts tracking a READ_PAGES frame: kept until its DONE.
    pub(super) fn await_done(&mut self, seq: u64) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.awaiting_done = true;
        }
    }

    /// Posts `reads` (into local memory with key `lkey`) and waits for all of them.
    pub(super) fn read_remote(&mut self, reads: &[(ReadOp, u32)]) -> Result<(), ChannelError> {
        let batch = (self.cfg.send_depth as usize / 2).max(1);
        for chunk in reads.chunks(batch) {
            self.reserve(chunk.len() as u32)?;
            let mut wrs: Vec<(ibv_send_wr, ibv_sge)> = chunk
                .iter()
                .map(|(r, lkey)| {
                    // SAFETY: plain data; zero is a valid start.
                    let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
                    wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
                    wr.wr = wr_t {
                        rdma: rdma_t {
                            remote_addr: r.remote.0,
                            rkey: r.rkey.0,
                        },
                    };
                    let sge = ibv_sge {
                        addr: r.local,
                        length: r.len,
                        lkey: *lkey,
                    };
                    (wr, sge)
                })
                .collect();
            self.reads += wrs.len() as u32;
            self.post_batch(READ_BIT, &mut wrs)?;
        }
        let deadline = crate::deadline::from_now(self.cfg.send_timeout);
        while self.reads > 0 {
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::SendTimeout(self.cfg.send_timeout));
            }
            self.poll(Some(Some(left)))?;
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl ByteSource for Core {
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
        let Some(m) = self.front()? else {
            return Ok(0);
        };
        let n = dst.len().min((m.len - m.off) as usize);
        // SAFETY: the NIC wrote `m.len` bytes into receive buffer `m.buf` and
        // completed; the buffer is not reposted until consumed.
        unsafe {
            ptr::copy_nonoverlapping(
                self.v
                    .recv_buf(m.buf, self.cfg.message_size)
                    .add(m.off as usize),
                dst.as_mut_ptr(),
                n,
            );
        }
        self.consume(n as u32)?;
        Ok(n)
    }

    fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
        let Some(m) = self.front()? else {
            return Ok(0);
        };
        let total: usize = dst.iter().map(GuestSlice::len).sum();
        let n = total.saturating_sub(skip).min((m.len - m.off) as usize);
        // SAFETY: as in `read`.
        let src = unsafe {
            std::slice::from_raw_parts(
                self.v
                    .recv_buf(m.buf, self.cfg.message_size)
                    .add(m.off as usize),
                n,
            )
        };
        copy_to_guest(dst, skip, src);
        self.consume(n as u32)?;
        Ok(n)
    }
}

impl Core {
    /// The next stream message, waiting for one; `None` after a clean close.
    fn front(&mut self) -> Result<Option<Msg>, ChannelError> {
        loop {
            if let Some(m) = self.msgs.front() {
                if m.imm != IMM_STREAM {
                    return Err(ChannelError::Framing(
                        "a placed-pages or advertisement message inside a frame",
                    ));
                }
                return Ok(Some(*m));
            }
            if self.eof {
                return Ok(None);
            }
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            if !self.poll(Some(self.cfg.recv_timeout))? && self.msgs.is_empty() && !self.eof {
                return Err(ChannelError::RecvTimeout(
                    self.cfg.recv_timeout.unwrap_or_default(),
                ));
            }
        }
    }

    fn consume(&mut self, n: u32) -> Result<(), ChannelError> {
        if let Some(m) = self.msgs.front_mut() {
            m.off += n;
            if m.off == m.len {
                let buf = m.buf;
                self.msgs.pop_front();
                self.v
                    .post_recv(buf, self.cfg.message_size)
                    .map_err(|e| ChannelError::io("ibv_post_recv", e))?;
            }
        }
        Ok(())
    }

    /// Waits for a whole message of kind `imm` and returns its bytes (copied).
    pub(super) fn control(&mut self, imm: u32, timeout: Duration) -> Result<Vec<u8>, ChannelError> {
        let deadline = crate::deadline::from_now(timeout);
        loop {
            if let Some(m) = self.msgs.front().copied() {
                if m.imm != imm {
                    return Err(ChannelError::Framing("unexpected message kind"));
                }
                let mut out = vec![0u8; m.len as usize];
                // SAFETY: as in `read`: a completed receive buffer not yet reposted.
                unsafe {
                    ptr::copy_nonoverlapping(
                        self.v.recv_buf(m.buf, self.cfg.message_size),
                        out.as_mut_ptr(),
                        out.len(),
                    );
                }
                self.msgs.pop_front();
                self.v
                    .post_recv(m.buf, self.cfg.message_size)
                    .map_err(|e| ChannelError::io("ibv_post_recv", e))?;
                return Ok(out);
            }
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.eof {
                return Err(ChannelError::RecvTimeout(timeout));
            }
            self.poll(Some(Some(left)))?;
        }
    }
}
