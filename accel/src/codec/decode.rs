//! Decoding: a payload checked against exactly the bytes the destination holds, then
//! written into a [`PageListMut`].

use pagewire_protocol::CodecId;
use zstd::zstd_safe;

use crate::pages::PageListMut;

use super::{CodecError, Codecs, Layout, deflate, delta, layout, scratch_of};

impl Codecs {
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
    // Skippable frames (magic 0x184D2A50..=0x184D2A5F) carry no pages.
    if let Some(m) = payload.first_chunk::<4>()
        && u32::from_le_bytes(*m) & !0xf == 0x184D_2A50
    {
        return Err(CodecError::Corrupt {
            codec,
            detail: "a skippable zstd frame, not a zstd frame of pages",
        });
    }
    match zstd_safe::find_frame_compressed_size(payload) {
        Ok(len) if len == payload.len() => {}
        Ok(_) => {
            return Err(CodecError::Corrupt {
                codec,
                detail: "bytes after the zstd frame",
            });
        }
        Err(_) if zstd_window_log(payload).is_some_and(|log| log > ZSTD_WINDOW_LOG_MAX) => {
            return Err(CodecError::Corrupt {
                codec,
                detail: "the zstd frame declares a Window_Log above 31, more than the zstd \
                         library decodes (30 on 32-bit hosts); RFC 8878 lets a decoder refuse \
                         it and no compressor writes one (PROTOCOL.md, Codecs)",
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

/// The largest Window_Log the zstd library decodes (its `ZSTD_WINDOWLOG_MAX`, which
/// zstd-safe exposes only with its experimental feature).
const ZSTD_WINDOW_LOG_MAX: u32 = if cfg!(target_pointer_width = "64") {
    31
} else {
    30
};

/// The Window_Log a zstd frame's header declares (RFC 8878, Window_Descriptor: 10 plus
/// its exponent), when the payload starts with a zstd frame's magic and the header has
/// a Window_Descriptor (no Single_Segment_flag).
fn zstd_window_log(payload: &[u8]) -> Option<u32> {
    let &[0x28, 0xb5, 0x2f, 0xfd, descriptor, window, ..] = payload else {
        return None;
    };
    (descriptor & 0x20 == 0).then_some(10 + u32::from(window >> 3))
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
