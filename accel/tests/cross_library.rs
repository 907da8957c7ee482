//! Our payloads against independent implementations of the same formats: what a
//! receiver with other software (or IAA/QAT hardware) would do with them.

mod common;

use std::io::Read;

use common::{KINDS, Kind, PS, Subject, content};
use pagewire_accel::{EncodeParams, Level};
use pagewire_protocol::CodecId;

#[test]
fn deflate_pages_inflate_with_miniz_oxide() {
    let mut s = common::Direct::new();
    for (seed, kind) in KINDS.into_iter().enumerate() {
        for level in [1, 6, 12] {
            let input = content(kind, 8, seed as u64);
            let e = s
                .encode(
                    EncodeParams::new(CodecId::DEFLATE, Level(level)),
                    &input,
                    0,
                    false,
                )
                .expect("encode");
            if e.codec == CodecId::RAW {
                assert_eq!(kind, Kind::Random);
                continue;
            }
            let mut pos = 0;
            for (i, &len) in e.lengths.iter().enumerate() {
                let part = &e.payload[pos..pos + len as usize];
                pos += len as usize;
                let page = &input[i * PS..(i + 1) * PS];
                if len as usize == PS {
                    assert_eq!(part, page);
                    continue;
                }
                let out = miniz_oxide::inflate::decompress_to_vec_with_limit(part, PS)
                    .unwrap_or_else(|err| {
                        panic!("{kind:?} level {level} page {i}: miniz: {err:?}")
                    });
                assert!(
                    out == page,
                    "{kind:?} level {level} page {i} differs under miniz_oxide"
                );
            }
        }
    }
}

#[test]
fn deflate_from_another_encoder_decodes() {
    let mut s = common::Direct::new();
    for (seed, kind) in KINDS.into_iter().enumerate() {
        let input = content(kind, 4, seed as u64);
        let mut payload = Vec::new();
        let mut lengths = Vec::new();
        for page in input.chunks(PS) {
            let c = miniz_oxide::deflate::compress_to_vec(page, 6);
            if c.len() < PS {
                lengths.push(c.len() as u32);
                payload.extend_from_slice(&c);
            } else {
                lengths.push(PS as u32);
                payload.extend_from_slice(page);
            }
        }
        let mut dst = vec![0u8; input.len()];
        s.decode(CodecId::DEFLATE, &payload, &lengths, &mut dst, true)
            .expect("decode miniz output");
        assert!(dst == input, "{kind:?}");
    }
}

#[test]
fn zstd_frames_decode_with_ruzstd() {
    let mut s = common::Direct::new();
    for (seed, kind) in KINDS.into_iter().enumerate() {
        for level in [-5, 1, 3, 19] {
            for pages in [1usize, 32] {
                if level == 19 && pages > 1 {
                    continue;
                }
                let input = content(kind, pages, seed as u64);
                let e = s
                    .encode(
                        EncodeParams::new(CodecId::ZSTD, Level(level)),
                        &input,
                        0,
                        false,
                    )
                    .expect("encode");
                if e.codec == CodecId::RAW {
                    continue;
                }
                let mut dec = ruzstd::decoding::StreamingDecoder::new(&e.payload[..])
                    .unwrap_or_else(|err| panic!("{kind:?} level {level}: ruzstd: {err}"));
                let mut out = Vec::new();
                dec.read_to_end(&mut out).expect("ruzstd decodes");
                assert!(
                    out == input,
                    "{kind:?} level {level} pages {pages} differs under ruzstd"
                );
            }
        }
    }
}
