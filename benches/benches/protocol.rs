//! Page-frame decoding speed: frames/s and payload GB/s through the stream decoder.
//!
//! `cargo bench -p pagewire-benches --bench protocol`
//!
//! Each case decodes a stream of 64 PAGES frames of 128 pages as the receiver does
//! (envelope, header, runs, length table, optional CRC32C), without touching the
//! payload otherwise; the payload is borrowed, never copied.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pagewire_protocol::*;

const FRAMES: usize = 64;
const PAGES: u32 = 128;
const PAGE: usize = 4096;

struct Case {
    name: &'static str,
    stream: Vec<u8>,
    payload_bytes: u64,
    limits: Limits,
}

fn case(name: &'static str, codec: CodecId, per_page: bool, crc: bool, sparse: bool) -> Case {
    let checksum = crc.then_some(ChecksumId::CRC32C);
    let limits = Limits::session(4096, PAGES, 4 << 20, CodecSet::all_known(), checksum).unwrap();
    // Sparse: every other page dirty, so 64 runs; dense: one run.
    let runs: Vec<PageRun> = if sparse {
        (0..u64::from(PAGES))
            .map(|i| PageRun {
                start: PageIndex(i * 2),
                count: 1,
            })
            .collect()
    } else {
        vec![PageRun {
            start: PageIndex(0),
            count: PAGES,
        }]
    };
    let (lengths, payload_len): (Option<Vec<u32>>, usize) = if per_page {
        let l: Vec<u32> = (0..PAGES).map(|i| 900 + (i % 7) * 100).collect();
        let sum = l.iter().sum::<u32>() as usize;
        (Some(l), sum)
    } else if codec == CodecId::RAW {
        (None, PAGES as usize * PAGE)
    } else {
        (None, PAGES as usize * PAGE / 3)
    };
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 31 % 256) as u8).collect();
    let mut stream = Vec::new();
    for round in 0..FRAMES as u32 {
        Frame::Pages(PageFrame {
            codec,
            region: RegionId(0),
            round: Round(round),
            data_runs: WireList::Slice(&runs),
            zero_runs: WireList::Slice(&[]),
            uniform_runs: WireList::Slice(&[]),
            lengths: lengths.as_deref().map(WireList::Slice),
            crc: crc.then(|| crc32c::crc32c(&payload)),
            payload: &payload,
        })
        .encode(&mut stream)
        .unwrap();
    }
    Case {
        name,
        stream,
        payload_bytes: (payload_len * FRAMES) as u64,
        limits,
    }
}

fn decode_all(limits: Limits, mut input: &[u8]) -> usize {
    let mut dec = FrameDecoder::new(limits);
    let mut n = 0;
    while !input.is_empty() {
        let (used, frame) = dec.decode(input).unwrap();
        if let Some(Frame::Pages(p)) = frame {
            black_box(p.payload);
            n += 1;
        }
        input = &input[used..];
    }
    n
}

fn bench(c: &mut Criterion) {
    let cases = [
        case("raw-dense", CodecId::RAW, false, false, false),
        case("zstd-dense", CodecId::ZSTD, false, false, false),
        case("deflate-sparse", CodecId::DEFLATE, true, false, true),
        case("deflate-sparse-crc32c", CodecId::DEFLATE, true, true, true),
        case("raw-dense-crc32c", CodecId::RAW, false, true, false),
    ];
    for (unit, name) in [
        ("frames", "page_frame_decode/frames"),
        ("bytes", "page_frame_decode/payload"),
    ] {
        let mut g = c.benchmark_group(name);
        g.measurement_time(Duration::from_secs(2));
        g.warm_up_time(Duration::from_millis(500));
        for case in &cases {
            assert_eq!(decode_all(case.limits, &case.stream), FRAMES);
            g.throughput(match unit {
                "frames" => Throughput::Elements(FRAMES as u64),
                _ => Throughput::Bytes(case.payload_bytes),
            });
            g.bench_function(case.name, |b| {
                b.iter(|| decode_all(case.limits, black_box(&case.stream)))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
