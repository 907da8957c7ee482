//! The criterion groups: compress and decompress of every case at every frame size.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use pagewire_accel::{DeltaCache, DeltaConfig, PageSize};
use pagewire_protocol::CodecId;

use crate::data::{delta_setup, encode_frames, mixed, touched, warm_cache};
use crate::direct::Direct;
use crate::engine::Bench;
use crate::{CASES, FRAMES, PAGES, PS};

pub(crate) fn bench_codecs(c: &mut Criterion) {
    let a = mixed(PAGES, 42);
    let b = touched(&a, 7);
    for case in CASES {
        let mut g = c.benchmark_group(format!("compress/{}", case.name));
        g.throughput(Throughput::Bytes(a.len() as u64));
        for n in FRAMES {
            // Delta alternates between two versions so every encode sees a change.
            let mut direct = Direct::new();
            let mut flip = false;
            if case.codec == CodecId::DELTA {
                warm_cache(&direct.cache, &a);
            }
            g.bench_with_input(BenchmarkId::new("direct", n), &n, |bench, &n| {
                bench.iter(|| {
                    flip = !flip;
                    let src = if flip && case.codec == CodecId::DELTA {
                        &b
                    } else {
                        &a
                    };
                    let mut total = 0;
                    for (i, frame) in src.chunks(n * PS).enumerate() {
                        total += direct.compress(case, frame, (i * n) as u64);
                    }
                    black_box(total)
                })
            });
            let cache = std::sync::Arc::new(
                DeltaCache::new(DeltaConfig::new(PageSize::KIB4, PAGES)).unwrap(),
            );
            warm_cache(&cache, &a);
            let mut engine = Bench::new(Some(cache), n);
            let mut flip = false;
            g.bench_with_input(BenchmarkId::new("engine", n), &n, |bench, &n| {
                bench.iter(|| {
                    flip = !flip;
                    let src = if flip && case.codec == CodecId::DELTA {
                        &b
                    } else {
                        &a
                    };
                    black_box(engine.compress(case, src, n))
                })
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("decompress/{}", case.name));
        g.throughput(Throughput::Bytes(a.len() as u64));
        for n in FRAMES {
            let frames = if case.codec == CodecId::DELTA {
                delta_setup(&a, &b, n)
            } else {
                encode_frames(case, &a, n, None)
            };
            let mut dst = if case.codec == CodecId::DELTA {
                a.clone()
            } else {
                vec![0u8; a.len()]
            };
            let mut direct = Direct::new();
            g.bench_with_input(BenchmarkId::new("direct", n), &n, |bench, &n| {
                bench.iter(|| {
                    for (enc, out) in frames.iter().zip(dst.chunks_mut(n * PS)) {
                        direct.decompress(case, enc, out);
                    }
                })
            });
            let mut engine = Bench::new(None, n);
            // Check once that the engine gives the right bytes back.
            let mut check = dst.clone();
            engine.decompress(&frames, &mut check, n);
            let want = if case.codec == CodecId::DELTA { &b } else { &a };
            assert!(
                &check == want,
                "{} frame {n}: decompressed buffer differs",
                case.name
            );
            g.bench_with_input(BenchmarkId::new("engine", n), &n, |bench, &n| {
                bench.iter(|| engine.decompress(&frames, &mut dst, n))
            });
        }
        g.finish();
    }
}
