//! Building and sending PAGES frames: classifying a frame's pages, the frame of zero
//! and uniform pages only, the frame of an engine completion, and their accounting.

use std::sync::atomic::Ordering;
use std::time::Instant;

use pagewire_accel::{Completion, EncodeOutcome, EngineBuf, Layout};
use pagewire_protocol::{CodecId, Frame, PageFrame, PageRun, RegionId, Round, WireList};
use pagewire_transport::{OutFrame, Owned, Payload, StableBytes};

use crate::error::MigrationError;
use crate::source::split::PageSplit;
use crate::stats::CodecStats;

use super::{FrameMeta, Worker};

/// The engine's output buffer, carried to the transport without a copy or an
/// allocation ([`Payload::Owned`]), and back to the engine's spare buffers once sent
/// (in the worker's `reap`).
pub(super) struct EnginePayload(pub(super) EngineBuf);

impl AsRef<[u8]> for EnginePayload {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

// SAFETY: the bytes are the slot's own heap buffer, not inside the handle, so they do
// not move with it; the pool's strong count the handle holds keeps them allocated (a
// leaked handle keeps them for good). Nothing writes them while the handle is held:
// writing needs `&mut EngineBuf` and the only handle (`EngineBuf::get_mut`), an `Owned`
// never gives out `&mut`, and while this handle lives no other is the only one; the
// pool hands the slot out again only after its last handle drops.
unsafe impl StableBytes for EnginePayload {}

/// Pages of one frame, by how they travel.
#[derive(Clone, Copy)]
struct Sent {
    data: u64,
    zero: u64,
    uniform: u64,
}

impl Worker {
    /// Splits a frame's pages into data, zero and uniform runs (canonical: merged,
    /// ascending), with one scan of each page.
    pub(super) fn classify(
        &self,
        region: RegionId,
        runs: &[PageRun],
        split: &mut PageSplit,
        ps: u64,
    ) -> Result<(), MigrationError> {
        for run in runs {
            for p in run.start.0..run.start.0 + u64::from(run.count) {
                let ptr =
                    self.s
                        .memory
                        .page_ptr(region, p)
                        .ok_or_else(|| MigrationError::Protocol {
                            channel: self.s.ch,
                            what: format!("page {p} outside region {region:?}"),
                        })?;
                // SAFETY: `page_ptr` returned a pointer to a whole page inside a mapped
                // region; the scan only reads it (a concurrent guest write makes the
                // answer stale, and also re-dirties the page).
                let class = unsafe { pagewire_accel::classify_raw(ptr.as_ptr(), ps as usize) };
                split.push(p, class);
            }
        }
        Ok(())
    }

    /// Sends a frame of zero and uniform pages only.
    pub(super) fn send_zero(
        &mut self,
        region: RegionId,
        split: &PageSplit,
    ) -> Result<(), MigrationError> {
        let (zero, uniform) = split.counts();
        let mut frame = PageFrame {
            codec: CodecId::ZERO,
            region,
            round: Round(self.round_no),
            data_runs: WireList::Slice(&[]),
            zero_runs: WireList::Slice(&split.zero),
            uniform_runs: WireList::Slice(&split.uniform),
            lengths: None,
            crc: None,
            payload: &[],
        };
        if self.s.checksum.is_some() {
            frame = frame.with_crc(&[]).map_err(|e| MigrationError::Protocol {
                channel: self.s.ch,
                what: e.to_string(),
            })?;
        }
        self.rules.on_send_pages(&frame).map_err(|e| self.rule(e))?;
        let frame = Frame::Pages(frame);
        self.send_whole(&frame)?;
        let pages = Sent {
            data: 0,
            zero,
            uniform,
        };
        self.account(CodecId::ZERO, pages, 0, frame_len(&frame));
        Ok(())
    }

    pub(super) fn send_completion(&mut self, mut c: Completion) -> Result<(), MigrationError> {
        let meta = self
            .pending
            .remove(&c.tag().0)
            .ok_or_else(|| MigrationError::Protocol {
                channel: self.s.ch,
                what: "completion for an unknown job".into(),
            })?;
        c.status().map_err(|source| MigrationError::Codec {
            channel: self.s.ch,
            source,
        })?;
        let out = c.encoded().ok_or_else(|| MigrationError::Protocol {
            channel: self.s.ch,
            what: "encode job without an outcome".into(),
        })?;
        let payload = match out.in_place {
            true => None,
            false => Some(c.take_payload().ok_or_else(|| MigrationError::Protocol {
                channel: self.s.ch,
                what: "encode job without a payload buffer".into(),
            })?),
        };
        let lengths = frame_lengths(out.codec, c.lengths());
        // Its request and an unused output buffer stay with the engine (no atomics).
        self.s.engine.recycle(c);
        self.send_encoded(meta, out, payload, lengths)
    }

    /// Sends the frame `meta` describes, whose data pages the engine encoded as `out`
    /// into `payload` (`None` when they go from guest memory in place), with its
    /// per-page length table `lengths` (empty for a block format).
    pub(super) fn send_encoded(
        &mut self,
        mut meta: FrameMeta,
        out: EncodeOutcome,
        payload: Option<EngineBuf>,
        lengths: Vec<u32>,
    ) -> Result<(), MigrationError> {
        let took = meta.submitted.elapsed();
        self.s.latency.encode.record(took);
        // Backing the delta cache's new memory is not the codec's cost (`Staged::setup`).
        // The counter is the channel's: with codec threads it grew by other jobs' too,
        // so a frame in flight while it grew counts for its ratio only, and each growth
        // counts once for the window, when first seen.
        let now_setup = self.cache_setup_time();
        let grown = now_setup.saturating_sub(meta.cache_setup);
        let fresh = now_setup.saturating_sub(self.cache_setup_seen);
        self.cache_setup_seen = now_setup;
        let per_page = pagewire_accel::layout(out.codec) == Some(Layout::PerPage);
        let payload: Vec<Payload> = if out.in_place {
            let view = self
                .s
                .views
                .iter()
                .find(|(id, _)| *id == meta.region)
                .map(|(_, v)| v.clone())
                .ok_or(MigrationError::Worker(self.s.ch))?;
            let ps = self.s.memory.page_size() as usize;
            meta.data_runs
                .iter()
                .map(|r| {
                    view.slice(r.start.0 as usize * ps, r.count as usize * ps)
                        .map(Payload::Guest)
                        .ok_or(MigrationError::Worker(self.s.ch))
                })
                .collect::<Result<_, _>>()?
        } else {
            let buf = payload.ok_or_else(|| MigrationError::Protocol {
                channel: self.s.ch,
                what: "encode job without a payload buffer".into(),
            })?;
            if buf.len() != out.payload_len {
                return Err(MigrationError::Protocol {
                    channel: self.s.ch,
                    what: "payload buffer length differs from the encode outcome".into(),
                });
            }
            // A vector a completion handed back, when there is one: no allocation.
            let mut v = self.spare_payloads.pop().unwrap_or_default();
            v.push(Payload::Owned(Owned::new(EnginePayload(buf))));
            v
        };
        let mut frame = PageFrame {
            codec: out.codec,
            region: meta.region,
            round: Round(self.round_no),
            data_runs: WireList::Slice(&meta.data_runs),
            zero_runs: WireList::Slice(&meta.zero_runs),
            uniform_runs: WireList::Slice(&meta.uniform_runs),
            lengths: per_page.then_some(WireList::Slice(&lengths)),
            crc: None,
            payload: &[],
        };
        frame.crc = match self.s.checksum {
            Some(_) => {
                // The checksum covers the envelope and header too (PROTOCOL.md, PAGES).
                let payload_len = payload.iter().map(Payload::len).sum();
                let mut crc =
                    frame
                        .crc_seed(payload_len)
                        .map_err(|e| MigrationError::Protocol {
                            channel: self.s.ch,
                            what: e.to_string(),
                        })?;
                for p in &payload {
                    if let Payload::Owned(bytes) = p {
                        crc = crc32c::crc32c_append(crc, bytes.as_slice());
                    }
                }
                Some(crc)
            }
            None => None,
        };
        self.rules.on_send_pages(&frame).map_err(|e| self.rule(e))?;
        let outf = OutFrame::pages(&frame, payload).map_err(|e| MigrationError::Protocol {
            channel: self.s.ch,
            what: e.to_string(),
        })?;
        let sum = |it: &mut dyn Iterator<Item = u32>| it.map(u64::from).sum();
        let pages = Sent {
            data: sum(&mut meta.data_runs.iter().map(|r| r.count)),
            zero: sum(&mut meta.zero_runs.iter().map(|r| r.count)),
            uniform: sum(&mut meta.uniform_runs.iter().map(|u| u.run.count)),
        };
        if let (Some(i), Some(sel)) = (meta.arm, self.s.adaptive.as_mut()) {
            let ps = u64::from(self.s.memory.page_size());
            // Where this thread encodes, its CPU time; none when the engine was full
            // and the job ran later, while this thread waited on the channel: its wall
            // time then (340-400 ms for 90 pages over io_uring at 1 Gbit/s) is the
            // link's, and made zstd:1 look 1 MB/s of core. With codec threads (or a
            // clock that cannot be read), the wall time from submit to completion.
            // (`meta.cpu`, this thread's own, already leaves the cache's growth out.)
            let took = match (meta.late, meta.cpu) {
                (true, _) => None,
                (false, Some(cpu)) => Some(cpu),
                (false, None) => Some(took).filter(|_| grown.is_zero()),
            };
            // Pages sent as copies are left out: any compressor would have found them
            // (dedup runs before the codec), and frames differ in how many they hold,
            // so counting them would credit the candidate that happened to meet them.
            if meta.delta {
                // Not the arm's figures: delta has its own (`adaptive/delta.rs`).
                sel.observe_delta(i, pages.data * ps, out.bytes_out() as u64, Instant::now());
            } else {
                sel.observe_encode(i, pages.data * ps, out.bytes_out() as u64, took);
            }
        }
        let wire = self.send(outf)?;
        if let Some(d) = self.s.dedup.as_mut() {
            // On the channel now: later frames may copy these pages. Not when the
            // engine sent them raw from guest memory, which may differ from the hashed
            // copy.
            if !out.in_place && !meta.hashes.is_empty() {
                let mut t = d.table.lock();
                for &(p, h) in &meta.hashes {
                    t.insert(meta.region, p, h);
                }
            }
            if let Some(buf) = meta.staged.take() {
                d.give_back(buf);
            }
        }
        if let (Some(_), Some(sel)) = (meta.arm, self.s.adaptive.as_mut()) {
            let ps = u64::from(self.s.memory.page_size());
            if meta.delta {
                // Not what the current choice moves: its window skips the frame.
                sel.skip_frame(Instant::now());
            } else {
                sel.observe_frame(
                    (pages.data + meta.copied) * ps,
                    meta.setup + fresh,
                    Instant::now(),
                );
            }
        }
        self.account(out.codec, pages, out.bytes_out() as u64, wire);
        Ok(())
    }

    /// Counts a frame of `pages` pages (of every kind) and `wire` bytes, in the round
    /// and in the live counters.
    pub(super) fn count_frame(&mut self, pages: u64, wire: u64) {
        let bytes = pages * u64::from(self.s.memory.page_size());
        let r = &mut self.round;
        r.frames += 1;
        r.wire_bytes += wire;
        r.guest_bytes += bytes;
        let c = &self.s.counters;
        c.frames.fetch_add(1, Ordering::Relaxed);
        c.wire_bytes.fetch_add(wire, Ordering::Relaxed);
        c.guest_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn account(&mut self, codec: CodecId, pages: Sent, payload: u64, wire: u64) {
        let Sent {
            data,
            zero,
            uniform,
        } = pages;
        let ps = u64::from(self.s.memory.page_size());
        let all = data + zero + uniform;
        self.count_frame(all, wire);
        let r = &mut self.round;
        r.pages.zero += zero;
        r.pages.uniform += uniform;
        let c = &self.s.counters;
        c.zero.fetch_add(zero, Ordering::Relaxed);
        c.uniform.fetch_add(uniform, Ordering::Relaxed);
        let slot = match codec {
            CodecId::RAW => {
                r.pages.raw += data;
                &c.raw
            }
            CodecId::DELTA => {
                r.pages.delta += data;
                &c.delta
            }
            _ => {
                r.pages.compressed += data;
                &c.compressed
            }
        };
        slot.fetch_add(data, Ordering::Relaxed);
        let e = r.codecs.entry(codec).or_insert_with(|| CodecStats {
            codec: format!("{codec:?}"),
            ..Default::default()
        });
        e.frames += 1;
        e.pages += all;
        e.guest_bytes += data * ps;
        e.payload_bytes += payload;
    }
}

/// The length table a frame of `codec` carries: `lengths` for a per-page format, none
/// for a block format.
pub(super) fn frame_lengths(codec: CodecId, lengths: &[u32]) -> Vec<u32> {
    match pagewire_accel::layout(codec) == Some(Layout::PerPage) {
        true => lengths.to_vec(),
        false => Vec::new(),
    }
}

fn frame_len(f: &Frame<'_>) -> u64 {
    match f {
        Frame::Pages(p) => (p.header_len() + p.payload.len()) as u64,
        _ => 0,
    }
}
