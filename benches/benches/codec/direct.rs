//! The baseline: each codec library called directly.

use pagewire_accel::{
    Codecs, DeltaCache, DeltaConfig, EncodeParams, PageKey, PageList, PageListMut, PageSize,
    max_payload_len,
};
use pagewire_protocol::CodecId;
use zstd::zstd_safe;

use crate::data::Encoded;
use crate::{Case, PAGES, PS};

/// The library called directly, with contexts kept across calls (its best case).
pub(crate) struct Direct {
    cctx: zstd_safe::CCtx<'static>,
    dctx: zstd_safe::DCtx<'static>,
    lz4: lz4_flex::block::CompressTable,
    deflate: Vec<libdeflater::Compressor>,
    inflate: libdeflater::Decompressor,
    codecs: Codecs,
    pub(crate) cache: DeltaCache,
    out: Vec<u8>,
    lengths: Vec<u32>,
    /// Delta's page lists, kept across calls so that no call allocates (the engine's
    /// requests keep theirs too); empty between calls.
    src: PageList<'static>,
    dst: PageListMut<'static>,
}

impl Direct {
    pub(crate) fn new() -> Direct {
        Direct {
            cctx: zstd_safe::CCtx::create(),
            dctx: zstd_safe::DCtx::create(),
            lz4: lz4_flex::block::CompressTable::large(),
            deflate: (0..=12)
                .map(|l| libdeflater::Compressor::new(libdeflater::CompressionLvl::new(l).unwrap()))
                .collect(),
            inflate: libdeflater::Decompressor::new(),
            codecs: Codecs::new(),
            cache: DeltaCache::new(DeltaConfig::new(PageSize::KIB4, PAGES)).unwrap(),
            out: vec![0; max_payload_len(PAGES, PageSize::KIB4)],
            lengths: Vec::with_capacity(PAGES),
            src: PageList::with_capacity(PageSize::KIB4, 1),
            dst: PageListMut::with_capacity(PageSize::KIB4, 1),
        }
    }

    /// Compresses one frame; returns the payload bytes.
    pub(crate) fn compress(&mut self, case: Case, frame: &[u8], key: u64) -> usize {
        let n = frame.len();
        match case.codec {
            CodecId::ZSTD => {
                self.cctx
                    .set_parameter(zstd_safe::CParameter::CompressionLevel(case.level.0))
                    .unwrap();
                self.cctx
                    .compress2(&mut self.out[..n - 1], frame)
                    .unwrap_or(n)
            }
            CodecId::LZ4 => {
                lz4_flex::block::compress_into_with_table(frame, &mut self.out, &mut self.lz4)
                    .unwrap()
                    .min(n)
            }
            CodecId::DEFLATE => {
                let c = &mut self.deflate[case.level.0 as usize];
                let mut pos = 0;
                for page in frame.chunks(PS) {
                    pos += c
                        .deflate_compress(page, &mut self.out[pos..pos + PS - 1])
                        .unwrap_or(PS);
                }
                pos
            }
            _ => {
                // Delta has no outside library: the codec called directly is the baseline,
                // over a raw-pointer list as the engine's jobs (and guest memory) have.
                // SAFETY: `frame` outlives the list's use: it is reset before returning.
                unsafe {
                    self.src
                        .push_raw(frame.as_ptr(), (n / PS) as u32, PageKey(key))
                        .unwrap()
                };
                let o = self.codecs.encode(
                    &EncodeParams::new(case.codec, case.level),
                    &self.src,
                    Some(&self.cache),
                    &mut self.out,
                    &mut self.lengths,
                );
                self.src.reset(PageSize::KIB4);
                o.unwrap().payload_len
            }
        }
    }

    pub(crate) fn decompress(&mut self, case: Case, enc: &Encoded, dst: &mut [u8]) {
        match enc.codec {
            CodecId::ZSTD => assert_eq!(
                self.dctx.decompress(dst, &enc.payload[..]).unwrap(),
                dst.len()
            ),
            CodecId::LZ4 => assert_eq!(
                lz4_flex::block::decompress_into(&enc.payload, dst).unwrap(),
                dst.len()
            ),
            CodecId::RAW => dst.copy_from_slice(&enc.payload),
            CodecId::DEFLATE => {
                let mut pos = 0;
                for (page, &len) in dst.chunks_mut(PS).zip(&enc.lengths) {
                    let part = &enc.payload[pos..pos + len as usize];
                    if len as usize == PS {
                        page.copy_from_slice(part);
                    } else {
                        assert_eq!(self.inflate.deflate_decompress(part, page).unwrap(), PS);
                    }
                    pos += len as usize;
                }
            }
            _ => {
                // SAFETY: `dst` is exclusively borrowed for this call, and the list is
                // reset before returning.
                unsafe {
                    self.dst
                        .push_raw(dst.as_mut_ptr(), (dst.len() / PS) as u32, PageKey(0))
                        .unwrap()
                };
                let r = self
                    .codecs
                    .decode(enc.codec, &enc.payload, &enc.lengths, &mut self.dst);
                self.dst.reset(PageSize::KIB4);
                r.unwrap();
                let _ = case;
            }
        }
    }
}
