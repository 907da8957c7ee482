//! The software codecs: the reference implementation of every payload format of
//! PROTOCOL.md ("Codecs", "Delta format") and the test oracle for hardware backends.
//!
//! [`Codecs`] is one thread's set of codec contexts (zstd, libdeflate, scratch
//! buffers), created lazily and reused, so encoding and decoding allocate nothing once
//! warm. It encodes a [`PageList`] into a caller-provided payload buffer (at least
//! [`max_payload_len`] bytes) plus, for per-page formats, a length table; and decodes a
//! payload into a [`PageListMut`].
//!
//! Every encoder caps its output below the input: a frame that does not shrink is
//! returned as [`CodecId::RAW`], and for per-page formats a page that does not shrink
//! is stored raw (its table entry equals the page size). Every decoder checks the
//! payload against the exact number of bytes the destination holds and never writes
//! outside it.
//!
//! No codec library borrows guest memory: the pages of a list built with
//! [`PageList::push_raw`] are copied with a raw-pointer `memcpy` into the contexts'
//! scratch buffer first (the whole frame for zstd and lz4, one page at a time for
//! deflate; raw copies straight into the payload), and the library compresses that
//! private copy (see [`crate::pages`], "Guest memory"). The scratch buffer is reused,
//! so the copy allocates nothing once warm. Delta copies each guest page straight into
//! the delta cache's spare page, which becomes the cached version once the delta
//! against the old one is written: one copy, as with a borrowed slice.
//!
//! ```
//! use pagewire_accel::{Codecs, EncodeParams, Level, PageKey, PageList, PageListMut, PageSize};
//! use pagewire_protocol::CodecId;
//!
//! let page_size = PageSize::KIB4;
//! let pages = vec![7u8; 2 * 4096];
//! let mut src = PageList::new(page_size);
//! src.push_slice(&pages, PageKey(0))?;
//!
//! let mut codecs = Codecs::new();
//! let mut payload = vec![0; pagewire_accel::max_payload_len(2, page_size)];
//! let mut lengths = Vec::new();
//! let out = codecs.encode(&EncodeParams::new(CodecId::ZSTD, Level(3)), &src, None, &mut payload, &mut lengths)?;
//! assert_eq!(out.codec, CodecId::ZSTD);
//!
//! let mut back = vec![0u8; 2 * 4096];
//! let mut dst = PageListMut::new(page_size);
//! dst.push_slice(&mut back, PageKey(0))?;
//! codecs.decode(out.codec, &payload[..out.payload_len], &lengths, &mut dst)?;
//! drop(dst);
//! assert_eq!(back, pages);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub(crate) mod deflate;
pub(crate) mod delta;

use core::fmt;

use pagewire_protocol::CodecId;
use zstd::zstd_safe;

use crate::cache::{DeltaCache, DeltaOutcome};
use crate::page::PageSize;
use crate::pages::{PageList, PageListMut};
use crate::zero;

/// A compression level. Its meaning is the codec's: zstd accepts its whole range
/// including negative (fast) levels, deflate `1..=12`, and every codec accepts
/// [`Level::DEFAULT`] (0), which picks the codec's default.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Level(pub i32);

impl Level {
    /// The codec's default level.
    pub const DEFAULT: Level = Level(0);
}

impl fmt::Debug for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Level({})", self.0)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// How a format lays out its payload (PROTOCOL.md "Codecs").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One block for the whole frame.
    Block,
    /// One entry per page in a length table, payloads back to back.
    PerPage,
    /// No payload at all (`zero`).
    Empty,
}

/// The layout of a format this crate knows, `None` for others.
pub fn layout(codec: CodecId) -> Option<Layout> {
    match codec {
        CodecId::RAW | CodecId::ZSTD | CodecId::LZ4 => Some(Layout::Block),
        CodecId::DEFLATE | CodecId::DEFLATE_4K | CodecId::DELTA => Some(Layout::PerPage),
        CodecId::ZERO => Some(Layout::Empty),
        _ => None,
    }
}

/// The levels the software codecs accept for a format, `None` for unknown formats.
pub fn level_range(codec: CodecId) -> Option<(Level, Level)> {
    match codec {
        CodecId::ZSTD => {
            let r = zstd::compression_level_range();
            Some((Level(*r.start()), Level(*r.end())))
        }
        CodecId::DEFLATE | CodecId::DEFLATE_4K => Some((Level(0), Level(12))),
        CodecId::RAW | CodecId::ZERO | CodecId::LZ4 | CodecId::DELTA => Some((Level(0), Level(0))),
        _ => None,
    }
}

/// The formats the software codecs implement, in id order.
pub const SOFTWARE_FORMATS: &[CodecId] = &[
    CodecId::RAW,
    CodecId::ZERO,
    CodecId::ZSTD,
    CodecId::LZ4,
    CodecId::DEFLATE,
    CodecId::DELTA,
    CodecId::DEFLATE_4K,
];

/// The payload buffer size an encode of `pages` pages needs: the raw size, or the lz4
/// working bound when larger.
pub fn max_payload_len(pages: usize, page_size: PageSize) -> usize {
    let raw = pages.saturating_mul(page_size.bytes());
    raw.max(lz4_flex::block::get_maximum_output_size(raw))
}

/// Why an encode or decode failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A format the software codecs do not implement.
    #[error(
        "codec {0} is not supported; use one of raw, zero, zstd, lz4, deflate, delta, deflate-4k"
    )]
    Unsupported(CodecId),
    /// A level outside the format's range.
    #[error("level {level} is out of range {min}..={max} for {codec}")]
    BadLevel {
        /// The format.
        codec: CodecId,
        /// The refused level.
        level: Level,
        /// Lowest accepted level.
        min: Level,
        /// Highest accepted level.
        max: Level,
    },
    /// A job without pages (only `zero` frames have no data pages).
    #[error("{codec} needs at least one page")]
    NoPages {
        /// The format.
        codec: CodecId,
    },
    /// The payload buffer cannot hold the worst case.
    #[error("payload buffer of {have} bytes is below the {need} bytes this job may need")]
    OutputTooSmall {
        /// Bytes needed ([`max_payload_len`]).
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// A job with more pages than the backend or engine takes at once.
    #[error("a job of {pages} pages exceeds the limit of {max} pages per job")]
    TooManyPages {
        /// Pages in the job.
        pages: usize,
        /// The limit.
        max: usize,
    },
    /// Delta encoding without a delta cache.
    #[error("delta encoding needs a delta cache; configure one for the engine")]
    NoDeltaCache,
    /// The delta cache was built for another page size.
    #[error("delta cache holds {cache}-byte pages, the job has {job}-byte pages")]
    DeltaPageSize {
        /// The cache's page size.
        cache: usize,
        /// The job's page size.
        job: usize,
    },
    /// A payload that decodes to more or fewer bytes than the destination holds.
    #[error("{codec} payload decodes to a size other than the destination's {expected} bytes")]
    SizeMismatch {
        /// The format.
        codec: CodecId,
        /// Bytes the destination holds.
        expected: usize,
    },
    /// A block payload longer than the pages it carries.
    #[error("{codec} payload of {len} bytes is longer than its {max} bytes of pages")]
    PayloadTooLong {
        /// The format.
        codec: CodecId,
        /// The payload length.
        len: usize,
        /// `data_pages × page_size`.
        max: usize,
    },
    /// A length table whose entry count differs from the destination's pages.
    #[error("length table has {entries} entries for {pages} pages")]
    TableEntries {
        /// Entries in the table.
        entries: usize,
        /// Pages in the destination.
        pages: usize,
    },
    /// A length table entry out of range for the format.
    #[error("page {page}: length {len} is invalid for {codec}")]
    BadPageLength {
        /// The format.
        codec: CodecId,
        /// The page's index in the frame.
        page: usize,
        /// The entry.
        len: u32,
    },
    /// A length table whose entries do not sum to the payload length.
    #[error("length table sums to {sum} bytes, the payload has {len}")]
    TableSum {
        /// Sum of the entries (saturated).
        sum: u64,
        /// The payload length.
        len: usize,
    },
    /// Anything else wrong in a payload.
    #[error("corrupt {codec} payload: {detail}")]
    Corrupt {
        /// The format.
        codec: CodecId,
        /// What was wrong.
        detail: &'static str,
    },
    /// A codec library could not allocate its context.
    #[error("{codec} context allocation failed: out of memory")]
    OutOfMemory {
        /// The format.
        codec: CodecId,
    },
}

/// What to encode and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeParams {
    /// The requested format.
    pub codec: CodecId,
    /// Its level.
    pub level: Level,
    /// When the whole frame ends up raw, leave the payload buffer untouched and report
    /// [`EncodeOutcome::in_place`], so the caller sends the pages straight from their
    /// memory (zero-copy). Per-page formats that stored some pages raw never do this.
    pub raw_in_place: bool,
}

impl EncodeParams {
    /// `codec` at `level`, raw fallbacks copied into the payload.
    pub fn new(codec: CodecId, level: Level) -> Self {
        Self {
            codec,
            level,
            raw_in_place: false,
        }
    }
}

/// What an encode produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOutcome {
    /// The format actually written: the requested one, or [`CodecId::RAW`] when the
    /// frame did not shrink (or, for `zero`, was not all zeros).
    pub codec: CodecId,
    /// Payload bytes written at the start of the payload buffer.
    pub payload_len: usize,
    /// The payload is raw and was not copied: send the input pages themselves.
    pub in_place: bool,
    /// Input bytes (`pages × page_size`).
    pub bytes_in: usize,
}

impl EncodeOutcome {
    /// Bytes the frame carries: the payload, or the raw pages when `in_place`.
    pub fn bytes_out(&self) -> usize {
        if self.in_place {
            self.bytes_in
        } else {
            self.payload_len
        }
    }
}

/// One thread's codec contexts and scratch memory (see the module documentation).
pub struct Codecs {
    zstd_c: Option<zstd_safe::CCtx<'static>>,
    zstd_level: Option<i32>,
    zstd_d: Option<zstd_safe::DCtx<'static>>,
    deflate_c: Vec<Option<libdeflater::Compressor>>,
    deflate_d: Option<deflate::Inflater>,
    lz4_table: Option<lz4_flex::block::CompressTable>,
    scratch: Vec<u8>,
}

impl fmt::Debug for Codecs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codecs")
            .field("scratch", &self.scratch.capacity())
            .finish_non_exhaustive()
    }
}

impl Default for Codecs {
    fn default() -> Self {
        Self::new()
    }
}

fn check_level(codec: CodecId, level: Level) -> Result<(), CodecError> {
    let (min, max) = level_range(codec).ok_or(CodecError::Unsupported(codec))?;
    if level < min || level > max {
        return Err(CodecError::BadLevel {
            codec,
            level,
            min,
            max,
        });
    }
    Ok(())
}

/// `scratch` as a buffer of `len` bytes. It grows (zero-filled) only past its largest
/// size so far, so a warm [`Codecs`] neither allocates nor clears per frame.
fn scratch_of(scratch: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if scratch.len() < len {
        scratch.resize(len, 0);
    }
    &mut scratch[..len]
}

/// The input of a block codec as one slice the codec library may borrow: the list
/// itself when it is one run of borrowed slices, else (guest memory, several runs) its
/// pages copied into `scratch` (see [`crate::pages`] "Guest memory").
fn frame_input<'s>(src: &'s PageList<'_>, scratch: &'s mut Vec<u8>) -> &'s [u8] {
    if let Some(bytes) = src.as_slice() {
        return bytes;
    }
    let out = scratch_of(scratch, src.bytes());
    // `out` is exactly `src.bytes()` long, so the copy cannot be refused.
    let copied = src.copy_to(out);
    debug_assert!(copied);
    out
}

/// Page `i` of a list as a slice a codec may borrow, and its key: in place for
/// borrowed slices, else copied into `scratch` (see [`crate::pages`] "Guest memory").
fn page_input<'s>(
    src: &'s PageList<'_>,
    i: usize,
    scratch: &'s mut Vec<u8>,
) -> Option<(&'s [u8], crate::PageKey)> {
    if let Some(page) = src.page_slice(i) {
        return Some(page);
    }
    let out = scratch_of(scratch, src.page_size().bytes());
    let key = src.copy_page(i, out)?;
    Some((out, key))
}

impl Codecs {
    /// Empty contexts; each is created on first use.
    pub fn new() -> Self {
        Self {
            zstd_c: None,
            zstd_level: None,
            zstd_d: None,
            deflate_c: (0..=12).map(|_| None).collect(),
            deflate_d: None,
            lz4_table: None,
            scratch: Vec::new(),
        }
    }

    /// Encodes `src` with `params` into `payload` (and `lengths` for per-page
    /// formats; cleared first and left empty for block formats).
    ///
    /// # Errors
    /// [`CodecError`] for an unsupported format or level, an empty list, a payload
    /// buffer below [`max_payload_len`], or delta without a matching cache. A frame
    /// that does not compress is not an error: it comes back as raw.
    pub fn encode(
        &mut self,
        params: &EncodeParams,
        src: &PageList<'_>,
        delta: Option<&DeltaCache>,
        payload: &mut [u8],
        lengths: &mut Vec<u32>,
    ) -> Result<EncodeOutcome, CodecError> {
        let codec = params.codec;
        check_level(codec, params.level)?;
        lengths.clear();
        let n = src.pages();
        let ps = src.page_size().bytes();
        let bytes_in = src.bytes();
        if n == 0 {
            return Err(CodecError::NoPages { codec });
        }
        let need = max_payload_len(n, src.page_size());
        if payload.len() < need {
            return Err(CodecError::OutputTooSmall {
                need,
                have: payload.len(),
            });
        }
        let done = |codec, payload_len| EncodeOutcome {
            codec,
            payload_len,
            in_place: false,
            bytes_in,
        };
        match codec {
            CodecId::RAW => Ok(self.raw(params, src, payload)),
            CodecId::ZERO => {
                let all_zero = src.runs().iter().all(|run| {
                    (0..run.pages as usize).all(|i| {
                        // SAFETY: page `i` of the run lies inside it; the list's
                        // contract keeps it readable. The scan reads through the raw
                        // pointer and keeps only a yes/no answer, so a concurrent guest
                        // write can change the answer, not make it undefined.
                        unsafe { zero::is_zero_raw(run.ptr.wrapping_add(i * ps), ps) }
                    })
                });
                if all_zero {
                    Ok(done(CodecId::ZERO, 0))
                } else {
                    Ok(self.raw(params, src, payload))
                }
            }
            CodecId::ZSTD => {
                let level = if params.level == Level::DEFAULT {
                    zstd::DEFAULT_COMPRESSION_LEVEL
                } else {
                    params.level.0
                };
                if self.zstd_c.is_none() {
                    self.zstd_c = Some(
                        zstd_safe::CCtx::try_create().ok_or(CodecError::OutOfMemory { codec })?,
                    );
                    self.zstd_level = None;
                }
                let input = frame_input(src, &mut self.scratch);
                let cctx = self
                    .zstd_c
                    .as_mut()
                    .ok_or(CodecError::OutOfMemory { codec })?;
                if self.zstd_level != Some(level) {
                    cctx.set_parameter(zstd_safe::CParameter::CompressionLevel(level))
                        .map_err(|_| CodecError::BadLevel {
                            codec,
                            level: params.level,
                            min: Level(level),
                            max: Level(level),
                        })?;
                    self.zstd_level = Some(level);
                }
                // Capped below the input: a frame that does not shrink fails to fit.
                match cctx.compress2(&mut payload[..bytes_in - 1], input) {
                    Ok(len) => Ok(done(CodecId::ZSTD, len)),
                    Err(_) => Ok(raw_from(params, input, payload, bytes_in)),
                }
            }
            CodecId::LZ4 => {
                let input = frame_input(src, &mut self.scratch);
                let table = self
                    .lz4_table
                    .get_or_insert_with(lz4_flex::block::CompressTable::large);
                match lz4_flex::block::compress_into_with_table(input, payload, table) {
                    Ok(len) if len < bytes_in => Ok(done(CodecId::LZ4, len)),
                    _ => Ok(raw_from(params, input, payload, bytes_in)),
                }
            }
            CodecId::DEFLATE | CodecId::DEFLATE_4K => {
                let lvl = if params.level == Level::DEFAULT {
                    6
                } else {
                    params.level.0
                };
                let slot = &mut self.deflate_c[lvl as usize];
                if slot.is_none() {
                    let l = libdeflater::CompressionLvl::new(lvl).map_err(|_| {
                        CodecError::BadLevel {
                            codec,
                            level: params.level,
                            min: Level(0),
                            max: Level(12),
                        }
                    })?;
                    *slot = Some(libdeflater::Compressor::new(l));
                }
                let comp = slot.as_mut().ok_or(CodecError::OutOfMemory { codec })?;
                let mut pos = 0;
                for i in 0..n {
                    let (page, _) = page_input(src, i, &mut self.scratch)
                        .ok_or(CodecError::NoPages { codec })?;
                    let out = &mut payload[pos..pos + ps - 1];
                    // deflate-4k: libdeflate's 32 KiB window only matters on pages
                    // longer than 4 KiB; those get the window-limited writer.
                    let len = if codec == CodecId::DEFLATE_4K && ps > deflate::WINDOW_4K {
                        deflate::compress_fixed_window(page, out).ok_or(())
                    } else {
                        comp.deflate_compress(page, out).map_err(|_| ())
                    };
                    let len = match len {
                        Ok(len) => len,
                        Err(()) => {
                            payload[pos..pos + ps].copy_from_slice(page);
                            ps
                        }
                    };
                    lengths.push(len as u32);
                    pos += len;
                }
                Ok(per_page_done(codec, pos, bytes_in, lengths))
            }
            CodecId::DELTA => {
                let cache = delta.ok_or(CodecError::NoDeltaCache)?;
                if cache.page_bytes() != ps {
                    return Err(CodecError::DeltaPageSize {
                        cache: cache.page_bytes(),
                        job: ps,
                    });
                }
                let mut pos = 0;
                for i in 0..n {
                    // A borrowed page is compared in place; guest memory is read
                    // once, into a stable snapshot taken straight into the cache
                    // (which must hold exactly the bytes sent). Either goes into the
                    // payload only when the page goes raw.
                    let out = &mut payload[pos..pos + ps];
                    let outcome = if let Some((page, key)) = src.page_slice(i) {
                        cache.encode(key, page, out)
                    } else {
                        let (_, key) = src.page(i).ok_or(CodecError::NoPages { codec })?;
                        let mut copied = false;
                        let outcome = cache.encode_with(
                            key,
                            |snap| copied = src.copy_page(i, snap).is_some(),
                            out,
                        );
                        debug_assert!(copied, "page {i} of {n} is one whole page");
                        outcome
                    };
                    let len = match outcome {
                        DeltaOutcome::Delta(len) => len,
                        DeltaOutcome::Raw => ps,
                    };
                    lengths.push(len as u32);
                    pos += len;
                }
                Ok(per_page_done(codec, pos, bytes_in, lengths))
            }
            other => Err(CodecError::Unsupported(other)),
        }
    }

    fn raw(
        &mut self,
        params: &EncodeParams,
        src: &PageList<'_>,
        payload: &mut [u8],
    ) -> EncodeOutcome {
        let bytes_in = src.bytes();
        if params.raw_in_place {
            return EncodeOutcome {
                codec: CodecId::RAW,
                payload_len: 0,
                in_place: true,
                bytes_in,
            };
        }
        // `payload` holds at least `bytes_in` bytes (checked by `encode`), so the copy
        // cannot be refused.
        let copied = src.copy_to(&mut payload[..bytes_in]);
        debug_assert!(copied);
        EncodeOutcome {
            codec: CodecId::RAW,
            payload_len: bytes_in,
            in_place: false,
            bytes_in,
        }
    }

    /// Decodes `payload` of format `codec` into `dst`; `lengths` is the per-page table
    /// (ignored by block formats, which must get an empty one).
    ///
    /// # Errors
    /// [`CodecError`] when the payload, the table, or their sizes do not match `dst`
    /// exactly. Block formats decode completely before anything is copied into a
    /// non-contiguous destination; a per-page format may have written earlier pages
    /// when a later one fails.
    pub fn decode(
        &mut self,
        codec: CodecId,
        payload: &[u8],
        lengths: &[u32],
        dst: &mut PageListMut<'_>,
    ) -> Result<(), CodecError> {
        let layout = layout(codec).ok_or(CodecError::Unsupported(codec))?;
        let n = dst.pages();
        let ps = dst.page_size().bytes();
        let expected = dst.bytes();
        if n == 0 && codec != CodecId::ZERO {
            return Err(CodecError::NoPages { codec });
        }
        if layout != Layout::PerPage && !lengths.is_empty() {
            return Err(CodecError::TableEntries {
                entries: lengths.len(),
                pages: 0,
            });
        }
        match codec {
            CodecId::RAW => {
                if payload.len() != expected {
                    return Err(CodecError::SizeMismatch { codec, expected });
                }
                scatter(payload, dst);
                Ok(())
            }
            CodecId::ZERO => {
                if !payload.is_empty() {
                    return Err(CodecError::Corrupt {
                        codec,
                        detail: "zero frame with a payload",
                    });
                }
                for run in dst.runs() {
                    // SAFETY: the run is writable for its length (list contract).
                    unsafe {
                        core::ptr::write_bytes(run.ptr.cast_mut(), 0, run.pages as usize * ps)
                    };
                }
                Ok(())
            }
            CodecId::ZSTD | CodecId::LZ4 => {
                if payload.len() > expected {
                    return Err(CodecError::PayloadTooLong {
                        codec,
                        len: payload.len(),
                        max: expected,
                    });
                }
                if codec == CodecId::ZSTD {
                    check_zstd_frame(payload, expected)?;
                    if self.zstd_d.is_none() {
                        self.zstd_d = Some(
                            zstd_safe::DCtx::try_create()
                                .ok_or(CodecError::OutOfMemory { codec })?,
                        );
                    }
                }
                let contiguous = dst.is_contiguous();
                let mut scratch = core::mem::take(&mut self.scratch);
                let out: &mut [u8] = if contiguous {
                    let run = dst.runs()[0];
                    // SAFETY: the single run is writable for `expected` bytes and
                    // reserved for this list's writer: nobody else reads or writes it
                    // while the list lives (`PageListMut::push_raw`'s contract; on a
                    // destination, channel affinity). The slice lives only for this call.
                    unsafe { core::slice::from_raw_parts_mut(run.ptr.cast_mut(), expected) }
                } else {
                    scratch_of(&mut scratch, expected)
                };
                let made = if codec == CodecId::ZSTD {
                    let dctx = self
                        .zstd_d
                        .as_mut()
                        .ok_or(CodecError::OutOfMemory { codec })?;
                    dctx.decompress(out, payload)
                        .map_err(|_| CodecError::SizeMismatch { codec, expected })
                } else {
                    lz4_decompress(payload, out).map_err(|e| CodecError::Corrupt {
                        codec,
                        detail: match e {
                            lz4_flex::block::DecompressError::OutputTooSmall { .. } => {
                                "decodes to more bytes than expected"
                            }
                            _ => "malformed lz4 block",
                        },
                    })
                };
                let result = match made {
                    Ok(m) if m == expected => {
                        if !contiguous {
                            scatter(&scratch[..expected], dst);
                        }
                        Ok(())
                    }
                    Ok(_) => Err(CodecError::SizeMismatch { codec, expected }),
                    Err(e) => Err(e),
                };
                self.scratch = scratch;
                result
            }
            CodecId::DEFLATE | CodecId::DEFLATE_4K | CodecId::DELTA => {
                check_table(codec, payload.len(), lengths, n, ps)?;
                if codec != CodecId::DELTA && self.deflate_d.is_none() {
                    self.deflate_d =
                        Some(deflate::Inflater::new().ok_or(CodecError::OutOfMemory { codec })?);
                }
                let mut pos = 0usize;
                for (i, &len) in lengths.iter().enumerate() {
                    let len = len as usize;
                    let part = &payload[pos..pos + len];
                    pos += len;
                    let ptr = dst.page_mut(i).ok_or(CodecError::NoPages { codec })?;
                    // SAFETY: `page_mut` points at a whole page inside a run that is
                    // writable and reserved for this list's writer (nobody else reads or
                    // writes it: `PageListMut::push_raw`'s contract; on a destination,
                    // channel affinity); the slice lives only for this iteration and no
                    // other slice covers the page.
                    let page = unsafe { core::slice::from_raw_parts_mut(ptr, ps) };
                    if len == ps {
                        page.copy_from_slice(part);
                    } else if codec == CodecId::DELTA {
                        delta::apply(part, page)?;
                    } else {
                        let inflater = self
                            .deflate_d
                            .as_mut()
                            .ok_or(CodecError::OutOfMemory { codec })?;
                        if !inflater.inflate_exact(part, page) {
                            return Err(CodecError::Corrupt {
                                codec,
                                detail: "page is not one raw deflate stream of exactly page_size bytes",
                            });
                        }
                    }
                }
                Ok(())
            }
            other => Err(CodecError::Unsupported(other)),
        }
    }
}

/// The lz4 block decoder, kept out of line: inlined into the large `decode` it was
/// measurably slower.
#[inline(never)]
fn lz4_decompress(
    payload: &[u8],
    out: &mut [u8],
) -> Result<usize, lz4_flex::block::DecompressError> {
    lz4_flex::block::decompress_into(payload, out)
}

/// The raw fallback for a block format whose input is already one slice.
fn raw_from(
    params: &EncodeParams,
    input: &[u8],
    payload: &mut [u8],
    bytes_in: usize,
) -> EncodeOutcome {
    if params.raw_in_place {
        return EncodeOutcome {
            codec: CodecId::RAW,
            payload_len: 0,
            in_place: true,
            bytes_in,
        };
    }
    payload[..bytes_in].copy_from_slice(input);
    EncodeOutcome {
        codec: CodecId::RAW,
        payload_len: bytes_in,
        in_place: false,
        bytes_in,
    }
}

/// A per-page frame whose pages all went raw becomes a raw frame: the same bytes
/// without the table.
pub(crate) fn per_page_done(
    codec: CodecId,
    len: usize,
    bytes_in: usize,
    lengths: &mut Vec<u32>,
) -> EncodeOutcome {
    if len >= bytes_in {
        lengths.clear();
        EncodeOutcome {
            codec: CodecId::RAW,
            payload_len: len,
            in_place: false,
            bytes_in,
        }
    } else {
        EncodeOutcome {
            codec,
            payload_len: len,
            in_place: false,
            bytes_in,
        }
    }
}

/// Copies `bytes` (exactly `dst.bytes()` long) into the runs of `dst`.
fn scatter(bytes: &[u8], dst: &PageListMut<'_>) {
    let ps = dst.page_size().bytes();
    let mut pos = 0;
    for run in dst.runs() {
        let len = run.pages as usize * ps;
        let part = &bytes[pos..pos + len];
        // SAFETY: the run is writable for `len` bytes and reserved for this list's
        // writer (list contract); `bytes` is a separate shared borrow.
        unsafe { core::ptr::copy_nonoverlapping(part.as_ptr(), run.ptr.cast_mut(), len) };
        pos += len;
    }
}

/// One zstd frame exactly filling the payload, whose declared size (when present) is
/// the expected one.
fn check_zstd_frame(payload: &[u8], expected: usize) -> Result<(), CodecError> {
    let codec = CodecId::ZSTD;
    match zstd_safe::find_frame_compressed_size(payload) {
        Ok(len) if len == payload.len() => {}
        Ok(_) => {
            return Err(CodecError::Corrupt {
                codec,
                detail: "bytes after the zstd frame",
            });
        }
        Err(_) => {
            return Err(CodecError::Corrupt {
                codec,
                detail: "not one complete zstd frame",
            });
        }
    }
    match zstd_safe::get_frame_content_size(payload) {
        Ok(Some(size)) if size != expected as u64 => {
            Err(CodecError::SizeMismatch { codec, expected })
        }
        Ok(_) => Ok(()),
        Err(_) => Err(CodecError::Corrupt {
            codec,
            detail: "bad zstd frame header",
        }),
    }
}

/// Checks a per-page length table against the format, the page count and the payload.
pub(crate) fn check_table(
    codec: CodecId,
    payload_len: usize,
    lengths: &[u32],
    pages: usize,
    ps: usize,
) -> Result<(), CodecError> {
    if lengths.len() != pages {
        return Err(CodecError::TableEntries {
            entries: lengths.len(),
            pages,
        });
    }
    let mut sum = 0u64;
    for (page, &len) in lengths.iter().enumerate() {
        let ok = (len as usize) <= ps && (len != 0 || codec == CodecId::DELTA);
        if !ok {
            return Err(CodecError::BadPageLength { codec, page, len });
        }
        sum += u64::from(len);
    }
    if sum != payload_len as u64 {
        return Err(CodecError::TableSum {
            sum,
            len: payload_len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::DeltaConfig;
    use crate::page::PageKey;

    /// Guest-memory lists are copied into the scratch buffer, which is allocated once
    /// and then reused by every format, frame after frame.
    #[test]
    fn guest_pages_are_copied_into_one_reused_scratch() {
        let ps = PageSize::KIB4;
        let pages: Vec<u8> = (0..8 * 4096).map(|i| (i % 251) as u8).collect();
        let cache = DeltaCache::new(DeltaConfig::new(ps, 8)).unwrap();
        let mut codecs = Codecs::new();
        let mut payload = vec![0u8; max_payload_len(8, ps)];
        let mut lengths = Vec::new();
        let mut scratch = None;
        for round in 0..3 {
            for codec in [
                CodecId::ZSTD,
                CodecId::LZ4,
                CodecId::DEFLATE,
                CodecId::DELTA,
            ] {
                let mut src = PageList::new(ps);
                // SAFETY: `pages` outlives `src` and nothing writes it.
                unsafe { src.push_raw(pages.as_ptr(), 8, PageKey(0)).unwrap() };
                let out = codecs
                    .encode(
                        &EncodeParams::new(codec, Level::DEFAULT),
                        &src,
                        Some(&cache),
                        &mut payload,
                        &mut lengths,
                    )
                    .unwrap();
                assert!(round == 0 || out.codec == codec, "{codec} round {round}");
                let now = (codecs.scratch.as_ptr(), codecs.scratch.capacity());
                assert!(now.1 >= 8 * 4096, "{codec}: the frame went through scratch");
                assert_eq!(
                    *scratch.get_or_insert(now),
                    now,
                    "{codec}: scratch reallocated"
                );
            }
        }
    }
}
