//! Golden byte samples: one or more per frame type, committed as hex under
//! `tests/golden/`. A change to the wire shows as a diff of those files.
//!
//! `PAGEWIRE_BLESS=1 cargo test -p pagewire-protocol --test golden` rewrites them, and
//! the fuzz seed corpus (`fuzz/corpus/*/seed-*`) made from them and from
//! `fuzzing::{handshake_seeds, session_seeds}`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use pagewire_protocol::frame::{Confirm, Hello, Welcome};
use pagewire_protocol::*;

fn run(start: u64, count: u32) -> PageRun {
    PageRun {
        start: PageIndex(start),
        count,
    }
}

fn copy_run(start: u64, count: u32, from: u64) -> CopyRun {
    CopyRun {
        start: PageIndex(start),
        count,
        from: PageIndex(from),
    }
}

struct Sample {
    name: &'static str,
    bytes: Vec<u8>,
    /// Fuzz selector byte: bit 0 handshake phase, bit 1 checksum.
    selector: u8,
    /// For PAGES frames: the data pages the payload must decode to, in payload order
    /// (delta against all-zero pages).
    pages: Option<Vec<u8>>,
}

fn encode(f: Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out).unwrap();
    out
}

/// A page of text-like bytes that compresses well, different for every `seed`.
fn text_page(seed: u8) -> Vec<u8> {
    let words: [&[u8]; 6] = [b"guest ", b"memory ", b"page ", b"frame ", b"round ", b"\n"];
    let mut page = Vec::with_capacity(4096);
    let mut i = usize::from(seed);
    while page.len() < 4096 {
        page.extend_from_slice(words[i % words.len()]);
        i = (i * 7 + 3) % 1009;
    }
    page.truncate(4096);
    page
}

fn samples() -> Vec<Sample> {
    let codecs = [CodecId::RAW, CodecId::ZERO, CodecId::ZSTD, CodecId::DEFLATE];
    let raw_pages: Vec<u8> = (0..2 * 4096u32).map(|i| (i % 251) as u8).collect();
    // Real payloads, written by encoders other than the ones the pipeline uses (ruzstd,
    // miniz_oxide, lz4_flex) and decoded back below.
    let zstd_pages: Vec<u8> = (0..4).flat_map(text_page).collect();
    let zstd_payload = ruzstd::encoding::compress_to_vec(
        &zstd_pages[..],
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    let lz4_pages: Vec<u8> = (10..12).flat_map(text_page).collect();
    let lz4_payload = lz4_flex::block::compress(&lz4_pages);
    let deflate_pages: Vec<u8> = [text_page(20), raw_pages[..4096].to_vec()].concat();
    let deflated = miniz_oxide::deflate::compress_to_vec(&deflate_pages[..4096], 6);
    let deflate_payload: Vec<u8> = [&deflated[..], &deflate_pages[4096..]].concat();
    let deflate_lengths = [deflated.len() as u32, 4096];
    // deflate-4k: what an IAA writes for 4 KiB pages, a fixed-Huffman stream (miniz
    // level 1 on a short page), a dynamic one, and a page sent raw; with 4 KiB pages
    // no back-reference can reach past 4096 bytes.
    let deflate_4k_pages: Vec<u8> =
        [text_page(30), text_page(31), raw_pages[4096..].to_vec()].concat();
    let fixed = miniz_oxide::deflate::compress_to_vec(&deflate_4k_pages[..4096], 1);
    let dynamic = miniz_oxide::deflate::compress_to_vec(&deflate_4k_pages[4096..8192], 9);
    let deflate_4k_payload: Vec<u8> =
        [&fixed[..], &dynamic[..], &deflate_4k_pages[8192..]].concat();
    let deflate_4k_lengths = [fixed.len() as u32, dynamic.len() as u32, 4096];
    let delta_payload = [0x00, 0x02, 0xde, 0xad, 0x10, 0x01, 0x7f];
    let mut delta_pages = vec![0u8; 3 * 4096];
    delta_pages[..2].copy_from_slice(&[0xde, 0xad]);
    delta_pages[2 * 4096 + 16] = 0x7f;
    let crc_runs = [run(5, 2)];
    let crc_frame = PageFrame {
        codec: CodecId::DEFLATE,
        region: RegionId(2),
        round: Round(7),
        data_runs: WireList::Slice(&crc_runs),
        zero_runs: WireList::Slice(&[]),
        uniform_runs: WireList::Slice(&[]),
        lengths: Some(WireList::Slice(&deflate_lengths)),
        crc: None,
        payload: &deflate_payload,
    }
    .with_crc(&[&deflate_payload[..]])
    .unwrap();
    let copy_runs = [copy_run(12, 2, 9), copy_run(14, 1, 9)];
    let copy_crc_runs = [copy_run(100, 4, 0), copy_run(200, 1, 50)];
    let copy_crc = CopyFrame {
        region: RegionId(2),
        round: Round(7),
        round_end: false,
        runs: WireList::Slice(&copy_crc_runs),
        crc: None,
    }
    .with_crc()
    .unwrap();
    // ROUND_END copies (copy_flags bit 0): pages 20..23 from 40..43 and page 30 from
    // 1; with a CRC, pages 64..66 from 0..2 and page 70 from 2.
    let round_end_runs = [copy_run(20, 3, 40), copy_run(30, 1, 1)];
    let round_end_crc_runs = [copy_run(64, 2, 0), copy_run(70, 1, 2)];
    let round_end_crc = CopyFrame {
        region: RegionId(1),
        round: Round(9),
        round_end: true,
        runs: WireList::Slice(&round_end_crc_runs),
        crc: None,
    }
    .with_crc()
    .unwrap();
    let hs = |name, f| Sample {
        name,
        bytes: encode(f),
        selector: 1,
        pages: None,
    };
    let ss = |name, f| Sample {
        name,
        bytes: encode(f),
        selector: 0,
        pages: None,
    };
    let ps = |name, f, pages: &[u8]| Sample {
        name,
        bytes: encode(f),
        selector: 0,
        pages: Some(pages.to_vec()),
    };
    vec![
        hs(
            "hello",
            Frame::Hello(Hello {
                version_min: Version(6),
                version_max: Version(6),
                session: SessionId(*b"0123456789abcdef"),
                channel: ChannelId(1),
                channel_count: 2,
                page_size: 4096,
                max_pages: 128,
                max_frame_bytes: 4 << 20,
                nonce: [0x11; 32],
                codecs: WireList::Slice(&codecs),
                checksums: WireList::Slice(&[ChecksumId::CRC32C]),
                auth: WireList::Slice(&[AuthMethod::HMAC_SHA256]),
            }),
        ),
        hs(
            "welcome_authenticated",
            Frame::Welcome(Welcome {
                version: Version(6),
                page_size: 4096,
                max_pages: 64,
                max_frame_bytes: 1 << 20,
                nonce: [0x22; 32],
                codecs: WireList::Slice(&codecs[..2]),
                checksum: Some(ChecksumId::CRC32C),
                auth: Some(AuthMethod::HMAC_SHA256),
                proof: Some([0x33; 32]),
            }),
        ),
        hs(
            "welcome_plain",
            Frame::Welcome(Welcome {
                version: Version(6),
                page_size: 65536,
                max_pages: 128,
                max_frame_bytes: 4 << 20,
                nonce: [0x44; 32],
                codecs: WireList::Slice(&codecs),
                checksum: None,
                auth: None,
                proof: None,
            }),
        ),
        hs(
            "reject",
            Frame::Reject(Reject {
                reason: RejectReason::UNSUPPORTED_VERSION,
                version_min: Version(6),
                version_max: Version(6),
                page_size: 4096,
                codecs: WireList::Slice(&codecs),
                checksums: WireList::Slice(&[]),
                auth: WireList::Slice(&[AuthMethod::HMAC_SHA256]),
                message: "no common version",
            }),
        ),
        hs(
            "hello_tls_bound",
            Frame::Hello(Hello {
                version_min: Version(6),
                version_max: Version(6),
                session: SessionId(*b"0123456789abcdef"),
                channel: ChannelId(0),
                channel_count: 1,
                page_size: 4096,
                max_pages: 128,
                max_frame_bytes: 4 << 20,
                nonce: [0x66; 32],
                codecs: WireList::Slice(&codecs),
                checksums: WireList::Slice(&[]),
                auth: WireList::Slice(&[AuthMethod::HMAC_SHA256_TLS_EXPORTER]),
            }),
        ),
        hs(
            "welcome_tls_bound",
            Frame::Welcome(Welcome {
                version: Version(6),
                page_size: 4096,
                max_pages: 128,
                max_frame_bytes: 4 << 20,
                nonce: [0x77; 32],
                codecs: WireList::Slice(&codecs[..2]),
                checksum: None,
                auth: Some(AuthMethod::HMAC_SHA256_TLS_EXPORTER),
                proof: Some([0x88; 32]),
            }),
        ),
        hs(
            "reject_encryption_required",
            Frame::Reject(Reject {
                reason: RejectReason::ENCRYPTION_REQUIRED,
                version_min: Version(6),
                version_max: Version(6),
                page_size: 4096,
                codecs: WireList::Slice(&codecs),
                checksums: WireList::Slice(&[]),
                auth: WireList::Slice(&[AuthMethod::HMAC_SHA256_TLS_EXPORTER]),
                message: "this destination requires TLS",
            }),
        ),
        hs(
            "reject_encryption_unsupported",
            Frame::Reject(Reject {
                reason: RejectReason::ENCRYPTION_UNSUPPORTED,
                version_min: Version(6),
                version_max: Version(6),
                page_size: 4096,
                codecs: WireList::Slice(&codecs),
                checksums: WireList::Slice(&[]),
                auth: WireList::Slice(&[]),
                message: "this destination speaks plaintext only",
            }),
        ),
        hs(
            "confirm_proof",
            Frame::Confirm(Confirm {
                proof: Some([0x55; 32]),
            }),
        ),
        hs("confirm_plain", Frame::Confirm(Confirm { proof: None })),
        hs("ready", Frame::Ready),
        ss(
            "layout",
            Frame::Layout(LayoutFrame {
                chunk_pages: 128,
                regions: WireList::Slice(&[
                    RegionDesc {
                        id: RegionId(0),
                        backing_page_size: 4096,
                        guest_addr: GuestAddr(0),
                        length: 0xc000_0000,
                    },
                    RegionDesc {
                        id: RegionId(1),
                        backing_page_size: 2 << 20,
                        guest_addr: GuestAddr(0x1_0000_0000),
                        length: 0x4000_0000,
                    },
                ]),
            }),
        ),
        ps(
            "pages_raw",
            Frame::Pages(PageFrame {
                codec: CodecId::RAW,
                region: RegionId(1),
                round: Round(3),
                data_runs: WireList::Slice(&[run(16, 1), run(20, 1)]),
                zero_runs: WireList::Slice(&[run(17, 3)]),
                uniform_runs: WireList::Slice(&[]),
                lengths: None,
                crc: None,
                payload: &raw_pages,
            }),
            &raw_pages,
        ),
        ss(
            "pages_zero",
            Frame::Pages(PageFrame {
                codec: CodecId::ZERO,
                region: RegionId(0),
                round: Round(0),
                data_runs: WireList::Slice(&[]),
                zero_runs: WireList::Slice(&[run(0, 128)]),
                uniform_runs: WireList::Slice(&[]),
                lengths: None,
                crc: None,
                payload: &[],
            }),
        ),
        ps(
            "pages_zstd",
            Frame::Pages(PageFrame {
                codec: CodecId::ZSTD,
                region: RegionId(0),
                round: Round(1),
                data_runs: WireList::Slice(&[run(1000, 4)]),
                zero_runs: WireList::Slice(&[]),
                uniform_runs: WireList::Slice(&[]),
                lengths: None,
                crc: None,
                payload: &zstd_payload,
            }),
            &zstd_pages,
        ),
        ps(
            "pages_lz4",
            Frame::Pages(PageFrame {
                codec: CodecId::LZ4,
                region: RegionId(0),
                round: Round(1),
                data_runs: WireList::Slice(&[run(40, 1), run(42, 1)]),
                zero_runs: WireList::Slice(&[run(41, 1)]),
                uniform_runs: WireList::Slice(&[]),
                lengths: None,
                crc: None,
                payload: &lz4_payload,
            }),
            &lz4_pages,
        ),
        ss(
            "pages_uniform",
            Frame::Pages(PageFrame {
                codec: CodecId::ZERO,
                region: RegionId(0),
                round: Round(1),
                data_runs: WireList::Slice(&[]),
                zero_runs: WireList::Slice(&[run(0, 2)]),
                uniform_runs: WireList::Slice(&[
                    UniformRun {
                        run: run(2, 3),
                        byte: 0xcc,
                    },
                    UniformRun {
                        run: run(5, 1),
                        byte: 0xff,
                    },
                ]),
                lengths: None,
                crc: None,
                payload: &[],
            }),
        ),
        ps(
            "pages_lz4_uniform",
            Frame::Pages(PageFrame {
                codec: CodecId::LZ4,
                region: RegionId(0),
                round: Round(1),
                data_runs: WireList::Slice(&[run(40, 1), run(42, 1)]),
                zero_runs: WireList::Slice(&[]),
                uniform_runs: WireList::Slice(&[UniformRun {
                    run: run(41, 1),
                    byte: 0xcc,
                }]),
                lengths: None,
                crc: None,
                payload: &lz4_payload,
            }),
            &lz4_pages,
        ),
        Sample {
            name: "pages_deflate_crc",
            bytes: encode(Frame::Pages(crc_frame)),
            selector: 2,
            pages: Some(deflate_pages.clone()),
        },
        ps(
            "pages_deflate_4k",
            Frame::Pages(PageFrame {
                codec: CodecId::DEFLATE_4K,
                region: RegionId(0),
                round: Round(1),
                data_runs: WireList::Slice(&[run(64, 3)]),
                zero_runs: WireList::Slice(&[]),
                uniform_runs: WireList::Slice(&[]),
                lengths: Some(WireList::Slice(&deflate_4k_lengths)),
                crc: None,
                payload: &deflate_4k_payload,
            }),
            &deflate_4k_pages,
        ),
        ps(
            "pages_delta",
            Frame::Pages(PageFrame {
                codec: CodecId::DELTA,
                region: RegionId(0),
                round: Round(2),
                data_runs: WireList::Slice(&[run(9, 3)]),
                zero_runs: WireList::Slice(&[]),
                uniform_runs: WireList::Slice(&[]),
                lengths: Some(WireList::Slice(&[4, 0, 3])),
                crc: None,
                payload: &delta_payload,
            }),
            &delta_pages,
        ),
        // Pages 12..14 from 9..11, and page 14 from 9 again: the targets touch, the
        // sources do not continue, so these are two runs.
        ss(
            "copy",
            Frame::Copy(CopyFrame {
                region: RegionId(0),
                round: Round(2),
                round_end: false,
                runs: WireList::Slice(&copy_runs),
                crc: None,
            }),
        ),
        Sample {
            name: "copy_crc",
            bytes: encode(Frame::Copy(copy_crc)),
            selector: 2,
            pages: None,
        },
        ss(
            "copy_round_end",
            Frame::Copy(CopyFrame {
                region: RegionId(0),
                round: Round(3),
                round_end: true,
                runs: WireList::Slice(&round_end_runs),
                crc: None,
            }),
        ),
        Sample {
            name: "copy_round_end_crc",
            bytes: encode(Frame::Copy(round_end_crc)),
            selector: 2,
            pages: None,
        },
        ss(
            "end_of_round",
            Frame::EndOfRound(EndOfRound {
                round: Round(4),
                frames: 1234,
                pages: 157_952,
            }),
        ),
        ss(
            "ack_round",
            Frame::Ack(Ack {
                kind: AckKind::ROUND,
                value: 4,
            }),
        ),
        ss(
            "device_state",
            Frame::DeviceState(DeviceState {
                instance: 0,
                name: "virtio-net",
                total: 10,
                offset: 4,
                data: b"state!",
            }),
        ),
        ss(
            "complete",
            Frame::Complete(Complete {
                final_round: Round(9),
                sections: 3,
            }),
        ),
        ss(
            "commit",
            Frame::Commit(Commit {
                final_round: Round(9),
            }),
        ),
        ss(
            "ack_committed",
            Frame::Ack(Ack {
                kind: AckKind::COMMITTED,
                value: 9,
            }),
        ),
        ss(
            "abort",
            Frame::Abort(Abort {
                reason: AbortReason::CANCELLED,
                message: "operator cancelled",
            }),
        ),
        ss(
            "extension",
            Frame::Extension {
                frame_type: FrameType(0x81),
                flags: 0,
                body: b"future",
            },
        ),
    ]
}

/// Decodes a PAGES payload into its data pages (delta against all-zero pages), with
/// decoders written apart from the pipeline's codecs.
fn decode_payload(p: &PageFrame<'_>) -> Vec<u8> {
    let ps = 4096usize;
    let n = p.data_pages() as usize;
    let out = match p.codec {
        CodecId::ZERO => Vec::new(),
        CodecId::RAW => p.payload.to_vec(),
        CodecId::ZSTD => {
            let mut d = ruzstd::decoding::StreamingDecoder::new(p.payload).unwrap();
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut d, &mut out).unwrap();
            out
        }
        CodecId::LZ4 => lz4_flex::block::decompress(p.payload, n * ps).unwrap(),
        CodecId::DEFLATE | CodecId::DEFLATE_4K | CodecId::DELTA => {
            let mut out = Vec::new();
            let mut at = 0usize;
            for len in p.lengths.unwrap().iter() {
                let len = len as usize;
                let bytes = &p.payload[at..at + len];
                at += len;
                if len == ps {
                    out.extend_from_slice(bytes);
                } else if p.codec != CodecId::DELTA {
                    out.extend(miniz_oxide::inflate::decompress_to_vec(bytes).unwrap());
                } else {
                    out.extend(apply_delta(bytes, ps));
                }
            }
            assert_eq!(at, p.payload.len());
            out
        }
        c => panic!("no golden decoder for {c:?}"),
    };
    assert_eq!(
        out.len(),
        n * ps,
        "{:?} decodes to the frame's pages",
        p.codec
    );
    out
}

/// PROTOCOL.md's delta format against an all-zero page.
fn apply_delta(mut d: &[u8], ps: usize) -> Vec<u8> {
    fn uleb(d: &mut &[u8]) -> usize {
        let (mut v, mut shift) = (0usize, 0);
        loop {
            let b = d[0];
            *d = &d[1..];
            v |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }
    let mut page = vec![0u8; ps];
    let mut pos = 0;
    while !d.is_empty() {
        pos += uleb(&mut d);
        let len = uleb(&mut d);
        page[pos..pos + len].copy_from_slice(&d[..len]);
        d = &d[len..];
        pos += len;
    }
    page
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for line in bytes.chunks(16) {
        for (i, b) in line.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            let _ = write!(s, "{sep}{b:02x}");
        }
        s.push('\n');
    }
    s
}

fn unhex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).expect("hex byte"))
        .collect()
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[test]
fn golden_samples_match_the_encoder_and_decode_back() {
    let bless = std::env::var_os("PAGEWIRE_BLESS").is_some();
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let samples = samples();
    for s in &samples {
        let path = dir().join(format!("{}.hex", s.name));
        if bless {
            std::fs::write(&path, hex(&s.bytes)).unwrap();
            let frame_seed = [&[s.selector][..], &s.bytes].concat();
            let stream_seed = [&[s.selector, 2, 7, 200][..], &s.bytes, &s.bytes].concat();
            for (target, seed) in [
                ("frame_roundtrip", &frame_seed),
                ("stream_chunks", &stream_seed),
            ] {
                let d = fuzz.join(target);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join(format!("seed-{}", s.name)), seed).unwrap();
            }
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run with PAGEWIRE_BLESS=1", path.display()));
        assert_eq!(
            hex(&s.bytes),
            want,
            "wire bytes of {} changed: if intended, bump the version or say why not in PROTOCOL.md, then bless",
            s.name
        );
        // And the committed bytes decode to the same frame.
        let bytes = unhex(&want);
        let limits = fuzzing::limits(s.selector);
        let mut dec = FrameDecoder::new(limits);
        let (used, frame) = dec.decode(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        let frame = frame.unwrap();
        let mut again = Vec::new();
        frame.encode(&mut again).unwrap();
        assert_eq!(again, bytes, "{}", s.name);
        // And the payload really decodes, with decoders independent of the pipeline's.
        if let Frame::Pages(p) = frame {
            let want = s.pages.as_ref().unwrap_or_else(|| {
                assert_eq!(p.data_pages(), 0, "{}: no expected pages given", s.name);
                const { &Vec::new() }
            });
            assert_eq!(decode_payload(&p), *want, "payload of {} decodes", s.name);
        }
        // A COPY's checksum, computed apart from the crate: the frame but its last 4
        // bytes.
        if let Frame::Copy(c) = frame
            && let Some(crc) = c.crc
        {
            assert_eq!(crc, crc32c::crc32c(&bytes[..bytes.len() - 4]), "{}", s.name);
        }
        // A COPY's ROUND_END is bit 0 of copy_flags, the u16 at frame bytes 18..20, and
        // only the samples named so have it.
        if let Frame::Copy(c) = frame {
            let round_end = s.name.starts_with("copy_round_end");
            assert_eq!(c.round_end, round_end, "{}", s.name);
            assert_eq!(bytes[18..20], [u8::from(round_end), 0], "{}", s.name);
        }
    }
    if bless {
        // Handshake seeds: a real client's bytes for the destination, a real
        // destination's answer for the source.
        let d = fuzz.join("handshake");
        std::fs::create_dir_all(&d).unwrap();
        let seeds = fuzzing::handshake_seeds();
        for (name, seed) in seeds {
            std::fs::write(d.join(name), &seed).unwrap();
            fuzzing::handshake(&seed);
        }
        // Session seeds: frame streams and generated sessions (fuzzing::session_seeds).
        let d = fuzz.join("session");
        std::fs::create_dir_all(&d).unwrap();
        for (name, seed) in fuzzing::session_seeds() {
            std::fs::write(d.join(name), &seed).unwrap();
            fuzzing::session(&seed);
        }
    }
    // Every frame type has a sample.
    for t in FrameType::KNOWN {
        assert!(
            samples.iter().any(|s| {
                let mut dec = FrameDecoder::new(fuzzing::limits(s.selector));
                dec.decode(&s.bytes).unwrap().1.unwrap().frame_type() == *t
            }),
            "no golden sample for {t}"
        );
    }
}

/// The RDMA binding's messages (PROTOCOL.md, "RDMA binding"): golden bytes, decoded
/// back, the READ_PAGES header a real raw PAGES frame header; fuzz seeds on bless.
#[test]
fn rdma_golden_samples_match_the_encoder_and_decode_back() {
    use pagewire_protocol::rdma::{
        Advert, AdvertRegion, Done, RdmaMsg, ReadPages, ReadSeq, RemoteKey, Segment, SourceAddr,
    };
    let bless = std::env::var_os("PAGEWIRE_BLESS").is_some();
    let advert = Advert {
        regions: vec![
            AdvertRegion {
                region: RegionId(0),
                rkey: RemoteKey(0x0001_2345),
                addr: SourceAddr(0x7f12_3400_0000),
                len: 1 << 30,
            },
            AdvertRegion {
                region: RegionId(1),
                rkey: RemoteKey(0x0001_2346),
                addr: SourceAddr(0x7f52_0000_0000),
                len: 0x4000_0000,
            },
        ],
    };
    // A raw PAGES frame of pages 16 and 20 of region 1; only its envelope and header
    // travel, the payload is read from the two source segments.
    let payload = vec![0u8; 2 * 4096];
    let frame = encode(Frame::Pages(PageFrame {
        codec: CodecId::RAW,
        region: RegionId(1),
        round: Round(3),
        data_runs: WireList::Slice(&[run(16, 1), run(20, 1)]),
        zero_runs: WireList::Slice(&[]),
        uniform_runs: WireList::Slice(&[]),
        lengths: None,
        crc: None,
        payload: &payload,
    }));
    let header = &frame[..frame.len() - payload.len()];
    let read = ReadPages {
        seq: ReadSeq(41),
        segments: vec![
            Segment {
                addr: SourceAddr(0x7f52_0001_0000),
                len: 4096,
            },
            Segment {
                addr: SourceAddr(0x7f52_0001_4000),
                len: 4096,
            },
        ],
        header,
    };
    let mut samples: Vec<(&str, RdmaMsg, Vec<u8>)> = Vec::new();
    let mut b = Vec::new();
    advert.encode(&mut b).unwrap();
    samples.push(("rdma_advert", RdmaMsg::ADVERT, b));
    let mut b = Vec::new();
    read.encode(&mut b).unwrap();
    samples.push(("rdma_read_pages", RdmaMsg::READ_PAGES, b));
    let mut b = Vec::new();
    Done { seq: ReadSeq(41) }.encode(&mut b);
    samples.push(("rdma_done", RdmaMsg::DONE, b));
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/rdma_messages");
    for (i, (name, kind, bytes)) in samples.iter().enumerate() {
        let path = dir().join(format!("{name}.hex"));
        if bless {
            std::fs::write(&path, hex(bytes)).unwrap();
            std::fs::create_dir_all(&fuzz).unwrap();
            std::fs::write(
                fuzz.join(format!("seed-{name}")),
                [&[i as u8][..], bytes].concat(),
            )
            .unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run with PAGEWIRE_BLESS=1", path.display()));
        assert_eq!(hex(bytes), want, "wire bytes of {name} changed");
        let bytes = unhex(&want);
        assert_eq!(
            pagewire_protocol::rdma::roundtrip(*kind, &bytes).as_deref(),
            Some(&bytes[..]),
            "{name}"
        );
    }
    assert_eq!(
        Advert::decode(&unhex(
            &std::fs::read_to_string(dir().join("rdma_advert.hex")).unwrap()
        ))
        .unwrap(),
        advert
    );
    // The READ_PAGES header is the start of a real raw PAGES frame: with the payload
    // the segments name appended, it decodes as that frame.
    let bytes = unhex(&std::fs::read_to_string(dir().join("rdma_read_pages.hex")).unwrap());
    let m = ReadPages::decode(&bytes).unwrap();
    assert_eq!(m.seq, ReadSeq(41));
    let total: u64 = m.segments.iter().map(|s| u64::from(s.len)).sum();
    let whole = [m.header, &vec![0u8; total as usize][..]].concat();
    let mut dec = FrameDecoder::new(fuzzing::limits(0));
    let (used, f) = dec.decode(&whole).unwrap();
    assert_eq!(used, whole.len());
    match f.unwrap() {
        Frame::Pages(p) => {
            assert_eq!(
                (p.codec, p.region, p.data_pages()),
                (CodecId::RAW, RegionId(1), 2)
            );
        }
        other => panic!("not a PAGES frame: {other:?}"),
    }
}
