//! A job and its request: what the caller fills, what a backend runs, and the
//! completion that hands back the payload or the decoded pages.

use core::fmt;
use pagewire_protocol::CodecId;

use crate::cache::DeltaCache;
use crate::codec::{CodecError, Codecs, EncodeOutcome, EncodeParams, max_payload_len};
use crate::page::{PageKey, PageSize};
use crate::pages::{PageList, PageListMut, PagesError};
use crate::pool::EngineBuf;
use crate::stats::StatsCounter;

use super::{BackendKind, EngineError, FallbackCause, Tag};

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOp {
    /// Not set up yet.
    Idle,
    /// Encode the input pages.
    Encode(EncodeParams),
    /// Decode the payload into the destination pages.
    Decode(CodecId),
}

/// A request's state; allocated once with the engine, recycled forever.
pub(crate) struct Request {
    pub(super) tag: Tag,
    pub(super) op: JobOp,
    pub(super) input: PageList<'static>,
    pub(super) input_keep: Option<EngineBuf>,
    pub(super) dest: PageListMut<'static>,
    pub(super) dest_keep: Option<EngineBuf>,
    pub(super) payload: Option<EngineBuf>,
    pub(super) lengths: Vec<u32>,
    pub(super) result: Result<Option<EncodeOutcome>, CodecError>,
    pub(super) backend: BackendKind,
    /// Set by [`Job::fall_back`]: why the job went to software.
    pub(super) fallback: Option<FallbackCause>,
    /// Set by [`Job::fall_back`], cleared once the engine ran the job on software.
    pub(super) fallback_pending: bool,
}

impl Request {
    pub(super) fn new(page_size: PageSize, max_pages: usize) -> Request {
        Request {
            tag: Tag(0),
            op: JobOp::Idle,
            input: PageList::with_capacity(page_size, 16),
            input_keep: None,
            dest: PageListMut::with_capacity(page_size, 16),
            dest_keep: None,
            payload: None,
            lengths: Vec::with_capacity(max_pages),
            result: Ok(None),
            backend: BackendKind::Software,
            fallback: None,
            fallback_pending: false,
        }
    }

    pub(super) fn reset(&mut self) {
        let ps = self.input.page_size();
        self.op = JobOp::Idle;
        self.input.reset(ps);
        self.dest.reset(ps);
        self.input_keep = None;
        self.dest_keep = None;
        self.payload = None;
        self.lengths.clear();
        self.result = Ok(None);
        self.fallback = None;
        self.fallback_pending = false;
    }

    /// Runs the request on the software codecs, storing the result.
    pub(super) fn run_software(&mut self, codecs: &mut Codecs, delta: Option<&DeltaCache>) {
        let r = self;
        r.result = match r.op {
            JobOp::Idle => Err(CodecError::Unsupported(CodecId(0))),
            JobOp::Encode(params) => match r.payload.as_mut().and_then(EngineBuf::get_mut) {
                None => Err(CodecError::OutputTooSmall {
                    need: max_payload_len(r.input.pages(), r.input.page_size()),
                    have: 0,
                }),
                Some(out) => match codecs.encode(&params, &r.input, delta, out, &mut r.lengths) {
                    Ok(outcome) => {
                        if let Some(buf) = r.payload.as_mut() {
                            buf.set_len(outcome.payload_len);
                        }
                        Ok(Some(outcome))
                    }
                    Err(e) => Err(e),
                },
            },
            JobOp::Decode(codec) => match r.payload.as_ref() {
                None => Err(CodecError::Corrupt {
                    codec,
                    detail: "decode job without payload",
                }),
                Some(payload) => codecs
                    .decode(codec, payload, &r.lengths, &mut r.dest)
                    .map(|()| None),
            },
        };
    }
}

pub(super) use super::home::Handle;

/// A request being set up or in flight (see the module documentation).
pub struct Job {
    pub(super) h: Handle,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.h.req();
        f.debug_struct("Job")
            .field("tag", &r.tag)
            .field("op", &r.op)
            .field("pages", &r.input.pages())
            .finish()
    }
}

impl Job {
    /// The job's tag.
    pub fn tag(&self) -> Tag {
        self.h.req().tag
    }

    /// What the job does.
    pub fn op(&self) -> JobOp {
        self.h.req().op
    }

    /// Makes this an encode job and returns its (empty) input list, to fill with
    /// [`PageList::push_raw`] runs of guest memory.
    pub fn encode(&mut self, tag: Tag, params: EncodeParams) -> &mut PageList<'static> {
        let r = self.h.req_mut();
        if r.op != JobOp::Idle {
            r.reset();
        }
        r.tag = tag;
        r.op = JobOp::Encode(params);
        &mut r.input
    }

    /// Makes this an encode job over the pages held by `pages` (a whole number of
    /// pages), which the job keeps alive until its completion is dropped.
    ///
    /// # Errors
    /// [`EngineError::Pages`] when `pages` is empty or not whole pages.
    pub fn encode_buf(
        &mut self,
        tag: Tag,
        params: EncodeParams,
        pages: EngineBuf,
        key: PageKey,
    ) -> Result<(), EngineError> {
        let input = self.encode(tag, params);
        // SAFETY: the buffer's bytes stay allocated and unchanged (shared handles
        // never write) for as long as the job or its completion holds `pages`, which
        // is stored right below and dropped only when the request is reset.
        unsafe { push_buf(input, &pages, key)? };
        self.h.req_mut().input_keep = Some(pages);
        Ok(())
    }

    /// Makes this a decode job of `payload` (format `codec`, per-page table `lengths`,
    /// empty for block formats) and returns its (empty) destination list, to fill
    /// with [`PageListMut::push_raw`] runs.
    pub fn decode(
        &mut self,
        tag: Tag,
        codec: CodecId,
        payload: EngineBuf,
        lengths: &[u32],
    ) -> &mut PageListMut<'static> {
        let r = self.h.req_mut();
        if r.op != JobOp::Idle {
            r.reset();
        }
        r.tag = tag;
        r.op = JobOp::Decode(codec);
        r.payload = Some(payload);
        r.lengths.extend_from_slice(lengths);
        &mut r.dest
    }

    /// Makes this a decode job into `dest`, a uniquely held buffer whose valid bytes
    /// (`len()`, set with [`EngineBuf::set_len`] for a pool buffer) are whole pages; it
    /// comes back with [`Completion::take_dest`].
    ///
    /// # Errors
    /// [`EngineError::Job`] when `dest` is shared; [`EngineError::Pages`] when it is
    /// empty or not whole pages.
    pub fn decode_buf(
        &mut self,
        tag: Tag,
        codec: CodecId,
        payload: EngineBuf,
        lengths: &[u32],
        mut dest: EngineBuf,
        key: PageKey,
    ) -> Result<(), EngineError> {
        let list = self.decode(tag, codec, payload, lengths);
        let ps = list.page_size().bytes();
        let len = dest.len();
        if !dest.is_unique() {
            return Err(EngineError::Job(
                "a decode destination buffer must be held uniquely",
            ));
        }
        if !len.is_multiple_of(ps) {
            return Err(EngineError::Pages(PagesError::NotWholePages {
                len,
                page_size: list.page_size(),
            }));
        }
        let bytes = dest.get_mut().ok_or(EngineError::Job(
            "a decode destination buffer must be held uniquely",
        ))?;
        let pages =
            u32::try_from(len / ps).map_err(|_| EngineError::Job("destination too large"))?;
        // SAFETY: `dest` is the only handle to the buffer and is moved into the
        // request below, so nobody else reads or writes these bytes until the
        // completion hands the buffer back; the run covers whole pages inside it.
        unsafe { list.push_raw(bytes.as_mut_ptr(), pages, key)? };
        self.h.req_mut().dest_keep = Some(dest);
        Ok(())
    }

    /// The input pages of an encode job (for backends).
    pub fn input(&self) -> &PageList<'static> {
        &self.h.req().input
    }

    /// Runs the job on the software codecs (the reference, and every hardware
    /// backend's fallback), storing the result for the completion.
    pub fn run_software(&mut self, codecs: &mut Codecs, delta: Option<&DeltaCache>) {
        self.h.req_mut().run_software(codecs, delta);
    }

    /// Turns the finished job into its completion, recording the backend that ran it.
    pub fn complete(mut self, backend: BackendKind) -> Completion {
        self.h.req_mut().backend = backend;
        Completion { h: self.h }
    }

    /// Hands the job back for the engine to run on software, because the device could
    /// not finish it for `cause` (see [`fallback`]). `backend` is the hardware backend
    /// giving up; the completion the caller finally sees names
    /// [`BackendKind::Software`] and reports the cause in [`Completion::fallback`].
    /// Whatever the device wrote for this job is overwritten.
    ///
    /// [`fallback`]: super::fallback
    pub fn fall_back(mut self, backend: BackendKind, cause: FallbackCause) -> Completion {
        let r = self.h.req_mut();
        r.fallback = Some(cause);
        r.fallback_pending = true;
        r.result = Ok(None);
        self.complete(backend)
    }

    /// Everything a backend reads and writes to run the job itself.
    pub fn parts_mut(&mut self) -> JobParts<'_> {
        let r = self.h.req_mut();
        JobParts {
            op: r.op,
            input: &r.input,
            dest: &mut r.dest,
            payload: r.payload.as_mut(),
            lengths: &mut r.lengths,
        }
    }

    /// Stores the result of a backend that ran the job itself: for an encode the
    /// outcome (with the payload's length set and the length table filled through
    /// [`Job::parts_mut`]), for a decode `Ok(None)`.
    pub fn set_result(&mut self, result: Result<Option<EncodeOutcome>, CodecError>) {
        self.h.req_mut().result = result;
    }

    /// Completes the job with an error, without running it.
    pub fn fail(mut self, backend: BackendKind, error: CodecError) -> Completion {
        self.h.req_mut().result = Err(error);
        self.complete(backend)
    }
}

/// A job's buffers, for a backend that runs it ([`Job::parts_mut`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct JobParts<'a> {
    /// What the job does.
    pub op: JobOp,
    /// An encode's input pages.
    pub input: &'a PageList<'static>,
    /// A decode's destination pages.
    pub dest: &'a mut PageListMut<'static>,
    /// An encode's output buffer (attached by the engine, held uniquely), or a
    /// decode's input payload.
    pub payload: Option<&'a mut EngineBuf>,
    /// The per-page length table: an encode fills it, a decode reads it.
    pub lengths: &'a mut Vec<u32>,
}

/// # Safety
/// The buffer must stay alive and unwritten while the list is used.
unsafe fn push_buf(
    list: &mut PageList<'static>,
    buf: &EngineBuf,
    key: PageKey,
) -> Result<(), PagesError> {
    let ps = list.page_size().bytes();
    if buf.is_empty() || !buf.len().is_multiple_of(ps) {
        return Err(PagesError::NotWholePages {
            len: buf.len(),
            page_size: list.page_size(),
        });
    }
    let pages = u32::try_from(buf.len() / ps).map_err(|_| PagesError::BadRunLength {
        pages: buf.len() / ps,
    })?;
    // SAFETY: forwarded from this function's contract.
    unsafe { list.push_raw(buf.as_ptr(), pages, key) }
}

/// Runs a completion a hardware backend handed back (see [`fallback`]) on the
/// software codecs and counts it; leaves any other completion alone.
pub(super) fn run_fallback(
    codecs: &mut Codecs,
    delta: Option<&DeltaCache>,
    stats: &mut StatsCounter,
    c: &mut Completion,
) {
    let r = c.h.req_mut();
    if let Some(cause) = r.fallback
        && r.fallback_pending
    {
        r.fallback_pending = false;
        r.run_software(codecs, delta);
        r.backend = BackendKind::Software;
        stats.fallbacks.add(cause);
    }
}

/// A finished job: its result, payload, length table, and the backend that ran it.
pub struct Completion {
    pub(super) h: Handle,
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.h.req();
        f.debug_struct("Completion")
            .field("tag", &r.tag)
            .field("op", &r.op)
            .field("backend", &r.backend)
            .field("result", &r.result)
            .finish()
    }
}

impl Completion {
    /// The job's tag.
    pub fn tag(&self) -> Tag {
        self.h.req().tag
    }

    /// What the job did.
    pub fn op(&self) -> JobOp {
        self.h.req().op
    }

    /// The backend that ran it.
    pub fn backend(&self) -> BackendKind {
        self.h.req().backend
    }

    /// Why a hardware backend handed this job to software, which then ran it (`None`
    /// for a job run where it was submitted).
    pub fn fallback(&self) -> Option<FallbackCause> {
        self.h.req().fallback
    }

    /// Whether it succeeded.
    ///
    /// # Errors
    /// The job's [`CodecError`].
    pub fn status(&self) -> Result<(), CodecError> {
        self.h.req().result.map(|_| ())
    }

    /// For a successful encode: the format used, sizes, and whether the raw pages are
    /// to be sent in place.
    pub fn encoded(&self) -> Option<EncodeOutcome> {
        self.h.req().result.ok().flatten()
    }

    /// The payload: for an encode, the output (its length is the payload length);
    /// for a decode, the input.
    pub fn payload(&self) -> Option<&EngineBuf> {
        self.h.req().payload.as_ref()
    }

    /// Takes the payload handle (to give to the transport); the buffer returns to its
    /// pool when that handle, and every clone, is dropped.
    pub fn take_payload(&mut self) -> Option<EngineBuf> {
        self.h.req_mut().payload.take()
    }

    /// The per-page length table (encode output, or decode input).
    pub fn lengths(&self) -> &[u32] {
        &self.h.req().lengths
    }

    /// The pages an encode read (for sending raw pages in place).
    pub fn input(&self) -> &PageList<'static> {
        &self.h.req().input
    }

    /// Takes back the destination buffer given to [`Job::decode_buf`].
    pub fn take_dest(&mut self) -> Option<EngineBuf> {
        self.h.req_mut().dest_keep.take()
    }

    pub(super) fn pages(&self) -> usize {
        let r = self.h.req();
        match r.op {
            JobOp::Decode(_) => r.dest.pages(),
            _ => r.input.pages(),
        }
    }
}
