//! Golden byte samples: one or more per frame type, committed as hex under
//! `tests/golden/`. A change to the wire shows as a diff of those files.
//!
//! `PAGEWIRE_BLESS=1 cargo test -p pagewire-protocol --test golden` rewrites them, and
//! the fuzz seed corpus (`fuzz/corpus/*/seed-*`) made from them.

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

fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

struct Sample {
    name: &'static str,
    bytes: Vec<u8>,
    /// Fuzz selector byte: bit 0 handshake phase, bit 1 checksum.
    selector: u8,
}

fn encode(f: Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out).unwrap();
    out
}

fn samples() -> Vec<Sample> {
    let codecs = [CodecId::RAW, CodecId::ZERO, CodecId::ZSTD, CodecId::DEFLATE];
    let raw_pages: Vec<u8> = (0..2 * 4096u32).map(|i| (i % 251) as u8).collect();
    let zstd_payload = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58, 0x01, 0x02, 0x03];
    let deflate_payload: Vec<u8> = [&[0x63u8, 0x60, 0x18, 0x05][..], &[0xab; 4096][..]].concat();
    let delta_payload = [0x00, 0x02, 0xde, 0xad, 0x10, 0x01, 0x7f];
    let hs = |name, f| Sample {
        name,
        bytes: encode(f),
        selector: 1,
    };
    let ss = |name, f| Sample {
        name,
        bytes: encode(f),
        selector: 0,
    };
    vec![
        hs(
            "hello",
            Frame::Hello(Hello {
                version_min: Version(1),
                version_max: Version(1),
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
                version: Version(1),
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
                version: Version(1),
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
                version_min: Version(1),
                version_max: Version(1),
                page_size: 4096,
                codecs: WireList::Slice(&codecs),
                checksums: WireList::Slice(&[]),
                auth: WireList::Slice(&[AuthMethod::HMAC_SHA256]),
                message: "no common version",
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
        ss(
            "pages_raw",
            Frame::Pages(PageFrame {
                codec: CodecId::RAW,
                region: RegionId(1),
                round: Round(3),
                data_runs: WireList::Slice(&[run(16, 1), run(20, 1)]),
                zero_runs: WireList::Slice(&[run(17, 3)]),
                lengths: None,
                crc: None,
                payload: &raw_pages,
            }),
        ),
        ss(
            "pages_zero",
            Frame::Pages(PageFrame {
                codec: CodecId::ZERO,
                region: RegionId(0),
                round: Round(0),
                data_runs: WireList::Slice(&[]),
                zero_runs: WireList::Slice(&[run(0, 128)]),
                lengths: None,
                crc: None,
                payload: &[],
            }),
        ),
        ss(
            "pages_zstd",
            Frame::Pages(PageFrame {
                codec: CodecId::ZSTD,
                region: RegionId(0),
                round: Round(1),
                data_runs: WireList::Slice(&[run(1000, 64)]),
                zero_runs: WireList::Slice(&[]),
                lengths: None,
                crc: None,
                payload: &zstd_payload,
            }),
        ),
        Sample {
            name: "pages_deflate_crc",
            bytes: encode(Frame::Pages(PageFrame {
                codec: CodecId::DEFLATE,
                region: RegionId(2),
                round: Round(7),
                data_runs: WireList::Slice(&[run(5, 2)]),
                zero_runs: WireList::Slice(&[]),
                lengths: Some(WireList::Slice(&[4, 4096])),
                crc: Some(crc(&deflate_payload)),
                payload: &deflate_payload,
            })),
            selector: 2,
        },
        ss(
            "pages_delta",
            Frame::Pages(PageFrame {
                codec: CodecId::DELTA,
                region: RegionId(0),
                round: Round(2),
                data_runs: WireList::Slice(&[run(9, 3)]),
                zero_runs: WireList::Slice(&[]),
                lengths: Some(WireList::Slice(&[4, 0, 3])),
                crc: None,
                payload: &delta_payload,
            }),
        ),
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
        let mut again = Vec::new();
        frame.unwrap().encode(&mut again).unwrap();
        assert_eq!(again, bytes, "{}", s.name);
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
