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
    /// Keep what the frame sends for each page in the engine's delta cache, so the
    /// page's next version may go as a delta against it: the bytes a compressor
    /// encoded (or copied into a raw payload) are stored; pages sent from their
    /// memory in place, or as raw or zero frames, are forgotten. Needs a delta cache
    /// and the software codecs (a job with it goes to them); ignored by delta, which
    /// always keeps what it encodes.
    pub remember: bool,
}

impl EncodeParams {
    /// `codec` at `level`, raw fallbacks copied into the payload, the delta cache left
    /// alone.
    pub fn new(codec: CodecId, level: Level) -> Self {
        Self {
            codec,
            level,
            raw_in_place: false,
            remember: false,
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

    /// Codecs and a length table for [`Enc::run`].
    struct Enc {
        codecs: Codecs,
        lengths: Vec<u32>,
    }

    impl Enc {
        /// Encodes the 8 pages at `pages` (keys 100..108 in two runs, read as guest
        /// memory) with `params`, remembering into `cache`.
        fn run(
            &mut self,
            params: EncodeParams,
            pages: &[u8],
            cache: Option<&DeltaCache>,
        ) -> Result<EncodeOutcome, CodecError> {
            let ps = PageSize::KIB4;
            assert_eq!(pages.len(), 8 * 4096);
            let mut payload = vec![0u8; max_payload_len(8, ps)];
            let mut src = PageList::new(ps);
            // SAFETY: `pages` (8 pages) outlives `src` and nothing writes it meanwhile.
            unsafe { src.push_raw(pages.as_ptr(), 4, PageKey(100)).unwrap() };
            // SAFETY: as above; a second run, so keys are followed across runs.
            unsafe {
                src.push_raw(pages.as_ptr().add(4 * 4096), 4, PageKey(104))
                    .unwrap()
            };
            self.codecs
                .encode(&params, &src, cache, &mut payload, &mut self.lengths)
        }
    }

    /// A frame of another codec sent with `remember` leaves exactly the bytes it sent
    /// in the delta cache: the next delta of an unchanged page is empty and that of a
    /// page with one byte changed is one record; raw and zero frames, and a raw
    /// fallback sent in place, forget their pages; without `remember` the cache is
    /// left alone, and `remember` without a cache is an error.
    #[test]
    fn remembered_frames_keep_what_they_sent_in_the_delta_cache() {
        let ps = PageSize::KIB4;
        let mut e = Enc {
            codecs: Codecs::new(),
            lengths: Vec::new(),
        };
        let keys = || (100..108).map(PageKey);
        let remember = |codec| EncodeParams {
            remember: true,
            ..EncodeParams::new(codec, Level::DEFAULT)
        };
        let delta = EncodeParams::new(CodecId::DELTA, Level::DEFAULT);
        let mut x = 0x9e37_79b9_u32;
        let random: Vec<u8> = (0..8 * 4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for codec in [
            CodecId::ZSTD,
            CodecId::LZ4,
            CodecId::DEFLATE,
            CodecId::DEFLATE_4K,
        ] {
            let mut pages: Vec<u8> = (0..8 * 4096).map(|i| (i / 7 % 13) as u8).collect();
            let cache = DeltaCache::new(DeltaConfig::new(ps, 64)).unwrap();
            let c = Some(&cache);
            e.run(EncodeParams::new(codec, Level::DEFAULT), &pages, c)
                .unwrap();
            assert_eq!(cache.stats().resident, 0, "{codec}: remembered unasked");
            assert_eq!(e.run(remember(codec), &pages, c).unwrap().codec, codec);
            assert_eq!(cache.stats().stored, 8, "{codec}");
            assert!(keys().all(|k| cache.contains(k)), "{codec}");
            pages[5 * 4096 + 300] ^= 0x5a;
            assert_eq!(e.run(delta, &pages, c).unwrap().codec, CodecId::DELTA);
            // skip 300 (two bytes), len 1, the byte.
            assert_eq!(e.lengths, [0, 0, 0, 0, 0, 4, 0, 0], "{codec}");
            assert_eq!(cache.stats().hits, 8, "{codec}");
            // Raw and zero frames forget what the cache held.
            for forgetting in [CodecId::RAW, CodecId::ZERO] {
                e.run(remember(codec), &pages, c).unwrap();
                e.run(remember(forgetting), &pages, c).unwrap();
                assert!(keys().all(|k| !cache.contains(k)), "{codec} {forgetting}");
            }
            // A frame that does not compress, sent from its memory in place, too.
            e.run(remember(codec), &pages, c).unwrap();
            let in_place = EncodeParams {
                raw_in_place: true,
                ..remember(codec)
            };
            let out = e.run(in_place, &random, c).unwrap();
            assert_eq!(out.codec, CodecId::RAW, "{codec}");
            if out.in_place {
                assert!(keys().all(|k| !cache.contains(k)), "{codec}");
            } else {
                // Per-page formats copy raw pages into the payload: those are kept,
                // and the next delta is against them.
                e.run(delta, &random, c).unwrap();
                assert_eq!(e.lengths, [0; 8], "{codec}");
            }
            assert_eq!(
                e.run(remember(codec), &pages, None),
                Err(CodecError::NoDeltaCache)
            );
        }
    }

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
