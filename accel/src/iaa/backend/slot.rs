//! One slot's job on the device: its descriptors built, submitted within the queue's
//! size and the retry budget, their records reaped (page faults resolved by touching
//! the page), and the job completed or sent to software.

use core::time::Duration;
use std::sync::atomic::Ordering;
use std::time::Instant;

use pagewire_protocol::CodecId;

use crate::codec::{CodecError, check_table, per_page_done};
use crate::engine::{BackendKind, FallbackCause, JobOp};
use crate::iaa::aecs::AECS_SIZE;
use crate::iaa::desc::{CompletionRecord, Descriptor, Status};
use crate::iaa::portal::{Enqueue, wait_record};

use super::{IaaBackend, PageState};

impl IaaBackend {
    /// Builds the slot's descriptors for its job; `Err` completes the job at once.
    pub(super) fn prepare(&mut self, s: usize) -> Result<(), CodecError> {
        let ps = self.config.page_size.bytes();
        let slot = &mut self.slots[s];
        slot.descs.clear();
        slot.state.clear();
        slot.retried.clear();
        slot.outstanding = 0;
        slot.cause = None;
        slot.deadline = crate::deadline::from_now(self.config.timeout);
        let out_base = slot.out.as_mut_ptr();
        let huffman = self.config.huffman;
        let stage_base = slot.staged.as_mut_ptr();
        let stage = !slot.staged.is_empty();
        let Some(job) = slot.job.as_mut() else {
            return Err(CodecError::Unsupported(CodecId(0)));
        };
        let parts = job.parts_mut();
        match parts.op {
            JobOp::Encode(p) => {
                slot.codec = p.codec;
                for i in 0..parts.input.pages() {
                    let (ptr, _) = parts
                        .input
                        .page(i)
                        .ok_or(CodecError::NoPages { codec: p.codec })?;
                    let rec = slot.records[i].addr();
                    slot.records[i].reset();
                    let dst = out_base.wrapping_add(i * ps) as u64;
                    slot.descs.push(if huffman.dynamic(p.level) {
                        Descriptor::statistics(
                            ptr as u64,
                            ps as u32,
                            slot.aecs[i].histogram_addr(),
                            rec,
                        )
                    } else {
                        Descriptor::compress(ptr as u64, ps as u32, dst, ps as u32 - 1, rec, None)
                    });
                    slot.state.push(PageState::Ready);
                    slot.retried.push(false);
                }
            }
            JobOp::Decode(codec) => {
                slot.codec = codec;
                let payload = parts.payload.ok_or(CodecError::Corrupt {
                    codec,
                    detail: "decode job without payload",
                })?;
                let n = parts.dest.pages();
                check_table(codec, payload.len(), parts.lengths, n, ps)?;
                let base = payload.as_ptr();
                let mut pos = 0usize;
                for i in 0..n {
                    let len = parts.lengths[i] as usize;
                    let dst = parts
                        .dest
                        .page_mut(i)
                        .ok_or(CodecError::NoPages { codec })?;
                    slot.records[i].reset();
                    if len == ps {
                        // SAFETY: `pos + ps` lies inside the payload (the table was
                        // checked against its length); `dst` is a whole destination
                        // page reserved for this job (`PageListMut` contract).
                        unsafe { core::ptr::copy_nonoverlapping(base.add(pos), dst, ps) };
                        slot.descs.push(Descriptor::default());
                        slot.state.push(PageState::Skip);
                    } else {
                        let src = if stage {
                            // SAFETY: `pos + len` lies inside the payload and inside
                            // the staging area (both at least the pages' size).
                            unsafe {
                                core::ptr::copy_nonoverlapping(
                                    base.add(pos),
                                    stage_base.add(pos),
                                    len,
                                )
                            };
                            stage_base.wrapping_add(pos)
                        } else {
                            base.wrapping_add(pos).cast_mut()
                        };
                        slot.descs.push(Descriptor::decompress(
                            src as u64,
                            len as u32,
                            dst as u64,
                            ps as u32,
                            slot.records[i].addr(),
                        ));
                        slot.state.push(PageState::Ready);
                    }
                    slot.retried.push(false);
                    pos += len;
                }
            }
            JobOp::Idle => return Err(CodecError::Unsupported(CodecId(0))),
        }
        Ok(())
    }

    /// Submits one descriptor of slot `s` with the retry budget; `false` when the
    /// queue stayed busy (or the device went away).
    fn enqueue(&mut self, s: usize, i: usize) -> bool {
        if self.on_device >= self.portal.size() {
            // The queue is full of our own descriptors (a dedicated queue must never
            // get more; a shared one would only refuse them): wait for the oldest to
            // complete (bounded by the timeout), then count again. Refusals of a
            // shared queue then come from other submitters only.
            let until = crate::deadline::from_now(self.config.timeout);
            while self.on_device >= self.portal.size() && Instant::now() < until {
                self.reap();
                if let Some(rec) = self.oldest_pending() {
                    wait_record(
                        rec,
                        (Instant::now() + Duration::from_millis(1)).min(until),
                        self.cpu,
                    );
                } else {
                    break;
                }
            }
            if self.on_device >= self.portal.size() {
                return false;
            }
        }
        for _ in 0..self.config.retries {
            let desc = self.slots[s].descs[i];
            // SAFETY: the descriptor's source (guest page or payload), destination
            // (output slot or destination guest page) and record belong to slot `s`,
            // whose job holds them until the slot finishes; a slot finishes only when
            // every submitted record is written, or is never reused (timeout, lost).
            match unsafe { self.portal.submit(&desc) } {
                Enqueue::Accepted => {
                    self.on_device += 1;
                    self.slots[s].outstanding += 1;
                    self.slots[s].state[i] = PageState::Wait;
                    self.counters.descriptors.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Enqueue::Retry => {
                    self.counters.refusals.fetch_add(1, Ordering::Relaxed);
                    if !self.portal.enabled() {
                        return false;
                    }
                    core::hint::spin_loop();
                }
            }
        }
        false
    }

    /// Submits every ready descriptor of slot `s`; on a busy queue marks the job.
    pub(super) fn push(&mut self, s: usize) {
        for i in 0..self.slots[s].descs.len() {
            if self.slots[s].cause.is_some() {
                return;
            }
            if self.slots[s].state[i] == PageState::Ready && !self.enqueue(s, i) {
                let cause = if self.portal.enabled() {
                    FallbackCause::QueueFull
                } else {
                    self.lost = true;
                    FallbackCause::DeviceLost
                };
                self.slots[s].cause = Some(cause);
            }
        }
    }

    /// The record of the oldest descriptor still on the device.
    pub(super) fn oldest_pending(&self) -> Option<&CompletionRecord> {
        self.active.iter().find_map(|&s| {
            let slot = &self.slots[s];
            let i = slot.state.iter().position(|&st| st == PageState::Wait)?;
            Some(&slot.records[i])
        })
    }

    /// Processes the written records of every active slot.
    pub(super) fn reap(&mut self) {
        for k in 0..self.active.len() {
            let s = self.active[k];
            self.scan(s);
        }
    }

    /// Processes slot `s`'s newly written records.
    fn scan(&mut self, s: usize) {
        for i in 0..self.slots[s].state.len() {
            if self.slots[s].state[i] != PageState::Wait || !self.slots[s].records[i].is_done() {
                continue;
            }
            let rec = self.slots[s].records[i].read();
            self.on_device -= 1;
            self.slots[s].outstanding -= 1;
            let encode = self.slots[s].descs[i].opcode() == crate::iaa::desc::opcode::COMPRESS;
            let status = rec.status();
            let slot = &mut self.slots[s];
            match status {
                Status::SUCCESS if slot.descs[i].is_statistics() => {
                    // Second pass: the code from the histogram, then compression.
                    self.counters
                        .statistics_passes
                        .fetch_add(1, Ordering::Relaxed);
                    let d = slot.descs[i];
                    let dst = slot
                        .out
                        .as_mut_ptr()
                        .wrapping_add(i * self.config.page_size.bytes());
                    let aecs = if slot.aecs[i].load_dynamic() {
                        self.counters.dynamic_pages.fetch_add(1, Ordering::Relaxed);
                        Some((slot.aecs[i].addr(), AECS_SIZE as u32))
                    } else {
                        self.counters.fixed_instead.fetch_add(1, Ordering::Relaxed);
                        None
                    };
                    slot.descs[i] = Descriptor::compress(
                        d.src1_addr(),
                        d.src1_size(),
                        dst as u64,
                        self.config.page_size.bytes() as u32 - 1,
                        d.completion_addr(),
                        aecs,
                    );
                    slot.records[i].reset();
                    slot.retried[i] = false;
                    slot.state[i] = PageState::Ready;
                    if !self.enqueue(s, i) {
                        self.slots[s].state[i] = PageState::Raw;
                        self.slots[s].cause.get_or_insert(FallbackCause::QueueFull);
                    }
                }
                Status::SUCCESS
                    if encode
                        && rec.output_size > 0
                        && (rec.output_size as usize) < self.config.page_size.bytes() =>
                {
                    slot.state[i] = PageState::Ok(rec.output_size);
                }
                Status::SUCCESS
                    if !encode && rec.output_size as usize == self.config.page_size.bytes() =>
                {
                    slot.state[i] = PageState::Ok(rec.output_size);
                }
                Status::OUTPUT_OVERFLOW if encode => {
                    slot.state[i] = PageState::Raw;
                    self.counters.raw_pages.fetch_add(1, Ordering::Relaxed);
                }
                Status::OUTPUT_OVERFLOW => {
                    slot.state[i] = PageState::Raw;
                    slot.cause.get_or_insert(FallbackCause::OutputOverflow);
                }
                st if st.is_page_fault() && !slot.retried[i] && slot.cause.is_none() => {
                    slot.retried[i] = true;
                    touch(&slot.descs[i], rec.fault_addr, rec.fault_on_write);
                    slot.records[i].reset();
                    slot.state[i] = PageState::Ready;
                    if self.enqueue(s, i) {
                        self.counters
                            .faults_resolved
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.slots[s].state[i] = PageState::Raw;
                        self.slots[s].cause.get_or_insert(FallbackCause::QueueFull);
                    }
                }
                st if st.is_page_fault() => {
                    slot.state[i] = PageState::Raw;
                    slot.cause.get_or_insert(FallbackCause::PageFault);
                }
                _ => {
                    slot.state[i] = PageState::Raw;
                    slot.cause.get_or_insert(FallbackCause::DeviceError);
                }
            }
        }
    }

    /// Whether slot `s` has nothing left on the device and nothing left to submit.
    fn finished(&self, s: usize) -> bool {
        let slot = &self.slots[s];
        slot.outstanding == 0 && (slot.cause.is_some() || !slot.state.contains(&PageState::Ready))
    }

    /// Turns slot `s`'s job into a completion; `reuse` returns the slot to the pool.
    fn finish(&mut self, s: usize, reuse: bool) {
        let ps = self.config.page_size.bytes();
        let slot = &mut self.slots[s];
        let Some(mut job) = slot.job.take() else {
            return;
        };
        let c = if let Some(cause) = slot.cause {
            job.fall_back(BackendKind::Iaa, cause)
        } else {
            let mut parts = job.parts_mut();
            let result = match parts.op {
                JobOp::Encode(_) => {
                    let bytes_in = parts.input.bytes();
                    match parts.payload.as_deref_mut().and_then(|p| p.get_mut()) {
                        None => Err(CodecError::OutputTooSmall {
                            need: bytes_in,
                            have: 0,
                        }),
                        Some(out) => {
                            parts.lengths.clear();
                            let mut pos = 0;
                            for (i, st) in slot.state.iter().enumerate() {
                                let len = match *st {
                                    PageState::Ok(n) => {
                                        let n = n as usize;
                                        out[pos..pos + n]
                                            .copy_from_slice(&slot.out[i * ps..i * ps + n]);
                                        n
                                    }
                                    _ => {
                                        let _ = parts.input.copy_page(i, &mut out[pos..pos + ps]);
                                        ps
                                    }
                                };
                                parts.lengths.push(len as u32);
                                pos += len;
                            }
                            Ok(Some(per_page_done(
                                slot.codec,
                                pos,
                                bytes_in,
                                parts.lengths,
                            )))
                        }
                    }
                }
                _ => Ok(None),
            };
            match result {
                Ok(outcome) => {
                    if let (Some(o), Some(p)) = (outcome, parts.payload.as_deref_mut()) {
                        p.set_len(o.payload_len);
                    }
                    job.set_result(Ok(outcome));
                }
                Err(e) => job.set_result(Err(e)),
            }
            job.complete(BackendKind::Iaa)
        };
        self.done.push_back(c);
        if reuse {
            self.free.push(s);
        }
    }

    /// Completes every finished active slot, in submission order where possible.
    pub(super) fn collect(&mut self) {
        let now = Instant::now();
        let enabled = self.portal.enabled();
        let mut k = 0;
        while k < self.active.len() {
            let s = self.active[k];
            self.scan(s);
            let (fin, reuse) = if self.finished(s) {
                (true, true)
            } else if !enabled {
                self.lost = true;
                self.slots[s].cause = Some(FallbackCause::DeviceLost);
                (true, false)
            } else if now >= self.slots[s].deadline {
                self.lost = true;
                self.slots[s].cause.get_or_insert(FallbackCause::Timeout);
                (true, false)
            } else {
                (false, false)
            };
            if fin {
                if !reuse {
                    // Descriptors may still be on the device: forget them, never
                    // reuse their records or output pages.
                    self.abandoned |= self.slots[s].outstanding > 0;
                    self.on_device -= self.slots[s].outstanding.min(self.on_device);
                }
                self.active.remove(k);
                self.finish(s, reuse);
            } else {
                k += 1;
            }
        }
    }
}

/// Touches the page a device fault named, if it lies in the descriptor's own source
/// or destination: a read for a read fault, a write of the byte's own value for a
/// write fault (destination pages are overwritten by the resubmission anyway).
fn touch(desc: &Descriptor, addr: u64, write: bool) {
    let in_range = |base: u64, len: u32| addr >= base && addr < base + u64::from(len);
    let ok = if write {
        in_range(desc.dst_addr(), desc.max_dst_size())
    } else {
        in_range(desc.src1_addr(), desc.src1_size())
    };
    if !ok {
        return;
    }
    let p = addr as *mut u8;
    // SAFETY: `addr` lies inside the descriptor's source (readable) or destination
    // (writable, reserved for this job) per the submit contract; volatile accesses
    // through the raw pointer make the kernel map the page.
    unsafe {
        let v = core::ptr::read_volatile(p);
        if write {
            core::ptr::write_volatile(p, v);
        }
    }
}
