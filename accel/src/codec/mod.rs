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
//! so the copy allocates nothing once warm. Delta reads each page in place and writes
//! what changed over the cached version as it writes the delta (a page the
//! cache lacks is copied into it): a borrowed slice and guest memory take the same
//! path.
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
//!
//! [`PageList`]: crate::pages::PageList
//! [`PageListMut`]: crate::pages::PageListMut
//! [`PageList::push_raw`]: crate::pages::PageList::push_raw

mod decode;
pub(crate) mod deflate;
pub(crate) mod delta;
mod encode;
mod error;

use core::fmt;

use pagewire_protocol::CodecId;
use zstd::zstd_safe;

use crate::page::PageSize;

pub(crate) use decode::check_table;
pub(crate) use encode::per_page_done;
pub use error::CodecError;

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::DeltaCache;
    use crate::cache::DeltaConfig;
    use crate::page::PageKey;
    use crate::pages::PageList;

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
