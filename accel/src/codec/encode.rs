//! Encoding: a [`PageList`] into a payload (and a length table for per-page formats),
//! with the raw fallback of every format.

use pagewire_protocol::CodecId;
use zstd::zstd_safe;

use crate::cache::{DeltaCache, DeltaOutcome};
use crate::pages::PageList;
use crate::zero;

use super::{
    CodecError, Codecs, EncodeOutcome, EncodeParams, Level, check_level, deflate, max_payload_len,
    scratch_of,
};

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
        // The cache that keeps what this frame sends (`EncodeParams::remember`).
        let keep = match (params.remember, codec) {
            (false, _) | (true, CodecId::DELTA) => None,
            (true, _) => {
                let cache = delta.ok_or(CodecError::NoDeltaCache)?;
                if cache.page_bytes() != ps {
                    return Err(CodecError::DeltaPageSize {
                        cache: cache.page_bytes(),
                        job: ps,
                    });
                }
                Some(cache)
            }
        };
        let done = |codec, payload_len| EncodeOutcome {
            codec,
            payload_len,
            in_place: false,
            bytes_in,
        };
        match codec {
            CodecId::RAW => Ok(kept(keep, src, None, self.raw(params, src, payload))),
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
                let out = if all_zero {
                    done(CodecId::ZERO, 0)
                } else {
                    self.raw(params, src, payload)
                };
                Ok(kept(keep, src, None, out))
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
                let out = match cctx.compress2(&mut payload[..bytes_in - 1], input) {
                    Ok(len) => done(CodecId::ZSTD, len),
                    Err(_) => raw_from(params, input, payload, bytes_in),
                };
                Ok(kept(keep, src, Some(input), out))
            }
            CodecId::LZ4 => {
                let input = frame_input(src, &mut self.scratch);
                let table = self
                    .lz4_table
                    .get_or_insert_with(lz4_flex::block::CompressTable::large);
                let out = match lz4_flex::block::compress_into_with_table(input, payload, table) {
                    Ok(len) if len < bytes_in => done(CodecId::LZ4, len),
                    _ => raw_from(params, input, payload, bytes_in),
                };
                Ok(kept(keep, src, Some(input), out))
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
                    let (page, key) = page_input(src, i, &mut self.scratch)
                        .ok_or(CodecError::NoPages { codec })?;
                    if let Some(cache) = keep {
                        // Compressed or stored raw from this copy: what goes out.
                        cache.store(key, page);
                    }
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
                    // Every page is read once, in place, by the one-pass delta
                    // encoder (or one `memcpy` into the cache on a miss), which keeps
                    // exactly the bytes it read as the cached version; it goes into
                    // the payload only when the page goes raw.
                    let out = &mut payload[pos..pos + ps];
                    let (ptr, key) = src.page(i).ok_or(CodecError::NoPages { codec })?;
                    // SAFETY: `ptr` points at a whole page of a run of the list,
                    // readable for the list's life (its constructors' contracts), and
                    // `out`, this call's exclusive payload, cannot overlap it.
                    let outcome = unsafe { cache.encode_raw(key, ptr, out) };
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
}

/// `out` after the delta cache `keep` (if any) kept what the frame sends: `input`'s
/// pages, what the codec encoded or copied into the payload; nothing where the pages
/// go from their memory in place or no `input` is given (raw and zero frames), whose
/// pages it forgets (`EncodeParams::remember`).
fn kept(
    keep: Option<&DeltaCache>,
    src: &PageList<'_>,
    input: Option<&[u8]>,
    out: EncodeOutcome,
) -> EncodeOutcome {
    let Some(cache) = keep else {
        return out;
    };
    let ps = src.page_size().bytes();
    let mut at = 0;
    for run in src.runs() {
        for j in 0..u64::from(run.pages) {
            let key = crate::PageKey(run.key.0.wrapping_add(j));
            match input.filter(|_| !out.in_place) {
                Some(bytes) => match bytes.get(at..at + ps) {
                    Some(page) => cache.store(key, page),
                    None => cache.invalidate(key),
                },
                None => cache.invalidate(key),
            }
            at += ps;
        }
    }
    out
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
