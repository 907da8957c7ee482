//! The protocol's golden PAGES samples carry payloads written by encoders other than
//! ours (ruzstd, miniz_oxide, lz4_flex); the pipeline's decoders must take them, as a
//! receiver written from PROTOCOL.md alone would send them. The delta sample is decoded
//! against all-zero pages.

use std::path::Path;

use pagewire_accel::{Codecs, PageKey, PageListMut, PageSize};
use pagewire_protocol::{Frame, FrameDecoder, fuzzing};

fn golden(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../protocol/tests/golden")
        .join(format!("{name}.hex"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect()
}

#[test]
fn golden_payloads_decode_with_the_pipelines_codecs() {
    for (name, selector) in [
        ("pages_raw", 0),
        ("pages_zstd", 0),
        ("pages_lz4", 0),
        ("pages_deflate_crc", 2),
        ("pages_delta", 0),
    ] {
        let bytes = golden(name);
        let mut dec = FrameDecoder::new(fuzzing::limits(selector));
        let (_, frame) = dec.decode(&bytes).unwrap();
        let Some(Frame::Pages(p)) = frame else {
            panic!("{name} is not a PAGES frame")
        };
        let n = p.data_pages() as usize;
        let mut pages = vec![0u8; n * 4096];
        let mut dst = PageListMut::new(PageSize::new(4096).unwrap());
        dst.push_slice(&mut pages, PageKey(0)).unwrap();
        let lengths: Vec<u32> = p.lengths.map(|l| l.iter().collect()).unwrap_or_default();
        Codecs::new()
            .decode(p.codec, p.payload, &lengths, &mut dst)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        drop(dst);
        assert!(pages.iter().any(|b| *b != 0), "{name} decoded to something");
        match name {
            "pages_raw" => assert_eq!(pages, p.payload),
            "pages_delta" => {
                let mut want = vec![0u8; 3 * 4096];
                want[..2].copy_from_slice(&[0xde, 0xad]);
                want[2 * 4096 + 16] = 0x7f;
                assert_eq!(pages, want);
            }
            "pages_deflate_crc" => {
                // A deflated text page, then a page sent raw inside the frame.
                assert!(pages[..4096].iter().all(|b| is_text(*b)));
                assert_eq!(pages[4096..], p.payload[p.payload.len() - 4096..]);
            }
            _ => assert!(pages.iter().all(|b| is_text(*b)), "{name}"),
        }
    }
}

/// The bytes of the golden text pages: lowercase words, spaces and newlines.
fn is_text(b: u8) -> bool {
    b.is_ascii_lowercase() || b == b' ' || b == b'\n'
}
