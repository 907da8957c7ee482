//! The engine as the pipeline drives it: inline on this core, raw-pointer jobs in
//! batches.

use std::collections::VecDeque;

use pagewire_accel::{
    Completion, DeltaCache, EncodeOutcome, EncodeParams, Engine, EngineBuf, EngineConfig, PageKey,
    PageList, PageSize, SoftwareConfig, Tag,
};
use pagewire_transport::{Owned, Payload, StableBytes};

use crate::data::Encoded;
use crate::{Case, PAGES, PS};

/// How the bench gives completions back (see [`Bench`]'s `recycle`).
#[derive(Clone, Copy)]
enum Recycle {
    Drop,
    Keep,
    TakePayload,
    /// Each payload handed off as the source hands it to the transport, and back.
    Transport,
    /// Each payload handed off as the source did before `Payload::Owned`, and dropped.
    Bytes,
}

/// A payload as the source hands it to the transport (`pipeline`'s own `EnginePayload`).
struct EnginePayload(EngineBuf);

impl AsRef<[u8]> for EnginePayload {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

// SAFETY: as the pipeline's: the bytes are the slot's own heap buffer, kept allocated
// by the handle's count on the pool; writing needs `&mut EngineBuf` and the only handle,
// which an `Owned` never gives out, so nothing moves or writes them while it holds it.
unsafe impl StableBytes for EnginePayload {}

impl Recycle {
    /// `buf` as a send holds it in this mode, or `buf` itself when the mode gives it
    /// back without one.
    fn hand_off(self, buf: EngineBuf) -> Result<Payload, EngineBuf> {
        match self {
            Recycle::Transport => Ok(Payload::Owned(Owned::new(EnginePayload(buf)))),
            Recycle::Bytes => Ok(Payload::Foreign(bytes::Bytes::from_owner(EnginePayload(
                buf,
            )))),
            Recycle::Keep | Recycle::Drop | Recycle::TakePayload => Err(buf),
        }
    }

    /// Takes back a payload [`Recycle::hand_off`] gave, as the source does from the
    /// send's completion (a `Bytes` owner cannot come back: it is dropped).
    fn take_back(engine: &mut Engine, payload: &mut Payload) {
        if let Payload::Owned(o) = payload
            && let Some(EnginePayload(buf)) = o.take::<EnginePayload>()
        {
            engine.recycle_buf(buf);
        }
    }
}

/// The engine, inline on this core, with raw-pointer jobs as the pipeline builds them.
pub(crate) struct Bench {
    pub(crate) engine: Engine,
    pub(crate) batch: VecDeque<pagewire_accel::Job>,
    pub(crate) done: Vec<Completion>,
    /// Most jobs in flight: jobs are submitted (and their completions polled) in
    /// batches of this many.
    pub(crate) depth: usize,
    /// How completions are given back: through [`Engine::recycle`] (the default);
    /// `PAGEWIRE_RECYCLE=0` drops them instead (what the pipeline did before);
    /// `PAGEWIRE_RECYCLE=payload` takes and drops each payload first, then recycles,
    /// as the pipeline's source did with a compressed frame's payload before it came
    /// back from the transport; `PAGEWIRE_RECYCLE=transport` hands each payload off
    /// as the source now sends it (`Payload::Owned`) and takes it back from there,
    /// and `PAGEWIRE_RECYCLE=bytes` as the source did before (a `Bytes` owner,
    /// dropped): to compare them in one build.
    recycle: Recycle,
    /// Whether encodes go through [`Engine::encode_now`], as the pipeline's source
    /// runs them on an inline engine (the default); `PAGEWIRE_NOW=0` submits jobs and
    /// polls them in batches instead.
    pub(crate) now: bool,
    /// The page list and length table [`Bench::encode_now`] keeps across frames.
    list: PageList<'static>,
    lengths: Vec<u32>,
    /// Payloads not yet given back: as a send holds them (`transport`, `bytes`), or
    /// as buffers (the other modes).
    held: Vec<Payload>,
    kept: Vec<EngineBuf>,
}

/// Jobs the bench engine keeps in flight: `PAGEWIRE_DEPTH`, or every frame of the
/// buffer at once (256 one-page frames) when unset. `PAGEWIRE_DEPTH=16` sizes it like
/// the pipeline's default `queue_depth`.
pub(crate) fn depth_for(frames: usize) -> usize {
    std::env::var("PAGEWIRE_DEPTH")
        .ok()
        .and_then(|d| d.parse::<usize>().ok())
        .filter(|&d| d > 0)
        .map_or(frames, |d| d.min(frames))
}

impl Bench {
    /// An engine for frames of `n` pages with room for [`depth_for`] frames in flight
    /// and as many more waiting for the transport (at the default, one buffer's worth
    /// of frames), as a pipeline would size it.
    pub(crate) fn new(cache: Option<std::sync::Arc<DeltaCache>>, n: usize) -> Bench {
        let depth = depth_for(PAGES / n);
        let config = EngineConfig {
            max_pages: n,
            requests: depth + 2,
            buffers: 2 * depth + 2,
            delta: cache,
            ..Default::default()
        };
        let engine = Engine::software(
            config,
            SoftwareConfig {
                threads: 0,
                queue_depth: depth + 2,
            },
        )
        .unwrap();
        Bench {
            engine,
            batch: VecDeque::with_capacity(depth + 2),
            done: Vec::with_capacity(depth + 2),
            depth,
            recycle: match std::env::var("PAGEWIRE_RECYCLE").as_deref() {
                Ok("0") => Recycle::Drop,
                Ok("payload") => Recycle::TakePayload,
                Ok("transport") => Recycle::Transport,
                Ok("bytes") => Recycle::Bytes,
                _ => Recycle::Keep,
            },
            now: std::env::var("PAGEWIRE_NOW").as_deref() != Ok("0"),
            list: PageList::with_capacity(PageSize::KIB4, 1),
            lengths: Vec::with_capacity(n),
            held: Vec::with_capacity(depth + 2),
            kept: Vec::with_capacity(depth + 2),
        }
    }

    /// Submits the batch and polls every completion into `done`.
    pub(crate) fn flush(&mut self) {
        let jobs = self.batch.len();
        self.engine.submit(&mut self.batch).unwrap();
        self.engine.poll(&mut self.done, usize::MAX, None).unwrap();
        assert_eq!(self.done.len(), jobs);
    }

    /// Gives the polled completions back to the engine, as the pipeline's source does
    /// once it has taken a frame's payload ([`Engine::recycle`]).
    pub(crate) fn recycle_done(&mut self) {
        match self.recycle {
            Recycle::Drop => self.done.clear(),
            Recycle::Keep => {
                for c in self.done.drain(..) {
                    self.engine.recycle(c);
                }
            }
            Recycle::TakePayload => {
                for mut c in self.done.drain(..) {
                    drop(c.take_payload());
                    self.engine.recycle(c);
                }
            }
            Recycle::Transport | Recycle::Bytes => {
                for mut c in self.done.drain(..) {
                    // An encode's output, sent; a decode's input stays with its job.
                    if c.encoded().is_some()
                        && let Some(buf) = c.take_payload()
                    {
                        self.held.extend(self.recycle.hand_off(buf).ok());
                    }
                    self.engine.recycle(c);
                }
                for p in &mut self.held {
                    Recycle::take_back(&mut self.engine, p);
                }
                self.held.clear();
            }
        }
    }

    /// Encodes `frame` through [`Engine::encode_now`], as the pipeline's source does on
    /// an inline engine; its payload is given back as [`Bench::recycle_done`] gives
    /// completions back, once `depth` are held or at the `last` frame.
    pub(crate) fn encode_now(
        &mut self,
        params: EncodeParams,
        frame: &[u8],
        key: PageKey,
        last: bool,
    ) -> EncodeOutcome {
        // SAFETY: `frame` outlives the list's use: it is reset before returning.
        unsafe {
            self.list
                .push_raw(frame.as_ptr(), (frame.len() / PS) as u32, key)
                .unwrap()
        };
        let done = self
            .engine
            .encode_now(params, &self.list, &mut self.lengths);
        self.list.reset(PageSize::KIB4);
        let (out, payload) = done.expect("an inline engine with a free buffer").unwrap();
        // Handed off as the source hands it (`Payload::Owned` built into its place).
        match self.recycle {
            Recycle::Transport => self
                .held
                .push(Payload::Owned(Owned::new(EnginePayload(payload)))),
            _ => match self.recycle.hand_off(payload) {
                Ok(p) => self.held.push(p),
                Err(buf) => self.kept.push(buf),
            },
        }
        if self.held.len() + self.kept.len() == self.depth || last {
            for buf in self.kept.drain(..) {
                match self.recycle {
                    Recycle::Keep => self.engine.recycle_buf(buf),
                    _ => drop(buf),
                }
            }
            for p in &mut self.held {
                Recycle::take_back(&mut self.engine, p);
            }
            self.held.clear();
        }
        out
    }

    /// Encodes `buf` as frames of `n` pages; returns payload bytes.
    pub(crate) fn compress(&mut self, case: Case, buf: &[u8], n: usize) -> usize {
        let mut bytes = 0;
        let frames = buf.len() / (n * PS);
        for (i, frame) in buf.chunks(n * PS).enumerate() {
            if self.now {
                let params = EncodeParams::new(case.codec, case.level);
                let key = PageKey((i * n) as u64);
                bytes += self
                    .encode_now(params, frame, key, i + 1 == frames)
                    .bytes_out();
                continue;
            }
            let mut job = self.engine.job().unwrap();
            let list = job.encode(Tag(i as u64), EncodeParams::new(case.codec, case.level));
            // SAFETY: `buf` outlives the jobs: every completion is polled below before
            // this function returns.
            unsafe {
                list.push_raw(
                    frame.as_ptr(),
                    (frame.len() / PS) as u32,
                    PageKey((i * n) as u64),
                )
                .unwrap()
            };
            self.batch.push_back(job);
            if self.batch.len() == self.depth || i + 1 == frames {
                self.flush();
                bytes += self
                    .done
                    .iter()
                    .map(|c| c.encoded().unwrap().bytes_out())
                    .sum::<usize>();
                self.recycle_done();
            }
        }
        bytes
    }

    pub(crate) fn decompress(&mut self, frames: &[Encoded], dst: &mut [u8], n: usize) {
        for (i, (enc, out)) in frames.iter().zip(dst.chunks_mut(n * PS)).enumerate() {
            let mut job = self.engine.job().unwrap();
            let list = job.decode(Tag(i as u64), enc.codec, enc.payload.clone(), &enc.lengths);
            // SAFETY: `dst` is exclusively borrowed for this call and every completion
            // is polled before it returns; the chunks are disjoint.
            unsafe {
                list.push_raw(out.as_mut_ptr(), (out.len() / PS) as u32, PageKey(0))
                    .unwrap()
            };
            self.batch.push_back(job);
            if self.batch.len() == self.depth || i + 1 == frames.len() {
                self.flush();
                assert!(self.done.iter().all(|c| c.status().is_ok()));
                self.recycle_done();
            }
        }
    }
}
