//! Codec kernels: compress and decompress MB/s per core for every format on 4 KiB
//! pages and on frames of 32, 64, 128 and 256 pages of a mixed-content buffer, the
//! library called directly against the same work through the engine (inline, one
//! core), and the compression ratio.
//!
//! Every case processes the same 1 MiB buffer per iteration (256 one-page frames, or
//! 8 frames of 32 pages, ...), so the figures compare directly. After the criterion
//! groups, an interleaved A/B run prints the engine's overhead over the direct call
//! for each case (`engine-overhead` lines: best MB/s of each, and the median of the
//! per-run time ratios, and that excess in ns per job) and the compression ratios
//! (`ratio` lines). The `engine-fixed` line then gives the engine's own cost per job
//! with no codec work to hide it: one-page encodes that end raw in place, and one-page
//! decodes of `zero` frames against the same zero fill done directly.
//!
//! Last, the `copy-cost` lines: what copying guest pages before a codec sees them costs
//! each codec. [`Codecs::encode`] runs interleaved on the same frames built two ways: from
//! a borrowed slice (`push_slice`), which the codecs compress in place, exactly as every
//! single-run list was compressed before the copy existed; and from raw pointers
//! (`push_raw`, as the pipeline passes guest memory), which the codecs first copy into
//! their scratch buffer. Figures are MB/s of each and the median of per-run time ratios.
//! `PAGEWIRE_SUMMARY=none cargo bench -p pagewire-benches --bench codec -- copy-cost`
//! runs this section alone (the filter matches no criterion group); `PAGEWIRE_COPY=lz4`
//! limits it to some codecs.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use pagewire_accel::{
    Codecs, Completion, DeltaCache, DeltaConfig, EncodeParams, Engine, EngineConfig, Level,
    PageKey, PageList, PageListMut, PageSize, PoolBuf, SoftwareConfig, Tag, max_payload_len,
};
use pagewire_protocol::CodecId;
use zstd::zstd_safe;

const PS: usize = 4096;
const PAGES: usize = 256;
const FRAMES: [usize; 5] = [1, 32, 64, 128, 256];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A guest-like mix of non-zero pages (zero pages never reach a codec): text, code,
/// counters and pointers, sparse structures, and some incompressible pages.
fn mixed(pages: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let words: [&[u8]; 12] = [
        b"the ", b"guest ", b"kernel ", b"page ", b"memory ", b"struct ", b"0x7f", b"error ",
        b"\n", b"= ", b"int ", b"return ",
    ];
    let code: [&[u8]; 8] = [
        &[0x55],
        &[0x48, 0x89, 0xe5],
        &[0xe8],
        &[0x48, 0x8b, 0x45],
        &[0xc3],
        &[0x0f, 0x1f, 0x44, 0, 0],
        &[0x74],
        &[0x31, 0xc0],
    ];
    let mut buf = vec![0u8; pages * PS];
    for (p, page) in buf.chunks_mut(PS).enumerate() {
        match p % 8 {
            0 | 1 => {
                let mut i = 0;
                while i < PS {
                    for &b in words[(rng.next() % 12) as usize] {
                        if i < PS {
                            page[i] = b;
                            i += 1;
                        }
                    }
                }
            }
            2 | 3 => {
                let mut i = 0;
                while i < PS {
                    for &b in code[(rng.next() % 8) as usize] {
                        if i < PS {
                            page[i] = b;
                            i += 1;
                        }
                    }
                    if i < PS && rng.next().is_multiple_of(3) {
                        page[i] = rng.next() as u8;
                        i += 1;
                    }
                }
            }
            4 => {
                let base = 0xffff_8880_0000_0000u64 + (rng.next() % 4096) * 4096;
                for (i, c) in page.chunks_mut(8).enumerate() {
                    c.copy_from_slice(&(base + i as u64 * 64).to_le_bytes());
                }
            }
            5 => {
                for _ in 0..24 {
                    let at = (rng.next() as usize) % (PS - 8);
                    page[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            6 => {
                for c in page.chunks_mut(8) {
                    c.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            _ => {
                for (i, c) in page.chunks_mut(4).enumerate() {
                    c.copy_from_slice(&((i as u32) << 8 | (rng.next() % 4) as u32).to_le_bytes());
                }
            }
        }
    }
    buf
}

/// The same buffer with a few bytes changed per page (the next version for delta).
fn touched(buf: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut v = buf.to_vec();
    for page in v.chunks_mut(PS) {
        for _ in 0..6 {
            let at = (rng.next() as usize) % PS;
            page[at] = page[at].wrapping_add(1);
        }
    }
    v
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    codec: CodecId,
    level: Level,
}

const CASES: [Case; 6] = [
    Case {
        name: "zstd-1",
        codec: CodecId::ZSTD,
        level: Level(1),
    },
    Case {
        name: "zstd-neg3",
        codec: CodecId::ZSTD,
        level: Level(-3),
    },
    Case {
        name: "lz4",
        codec: CodecId::LZ4,
        level: Level(0),
    },
    Case {
        name: "deflate-1",
        codec: CodecId::DEFLATE,
        level: Level(1),
    },
    Case {
        name: "deflate-6",
        codec: CodecId::DEFLATE,
        level: Level(6),
    },
    Case {
        name: "delta",
        codec: CodecId::DELTA,
        level: Level(0),
    },
];

/// The library called directly, with contexts kept across calls (its best case).
struct Direct {
    cctx: zstd_safe::CCtx<'static>,
    dctx: zstd_safe::DCtx<'static>,
    lz4: lz4_flex::block::CompressTable,
    deflate: Vec<libdeflater::Compressor>,
    inflate: libdeflater::Decompressor,
    codecs: Codecs,
    cache: DeltaCache,
    out: Vec<u8>,
    lengths: Vec<u32>,
}

impl Direct {
    fn new() -> Direct {
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
        }
    }

    /// Compresses one frame; returns the payload bytes.
    fn compress(&mut self, case: Case, frame: &[u8], key: u64) -> usize {
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
                // Delta has no outside library: the codec called directly is the baseline.
                let mut src = PageList::new(PageSize::KIB4);
                src.push_slice(frame, PageKey(key)).unwrap();
                let o = self
                    .codecs
                    .encode(
                        &EncodeParams::new(case.codec, case.level),
                        &src,
                        Some(&self.cache),
                        &mut self.out,
                        &mut self.lengths,
                    )
                    .unwrap();
                o.payload_len
            }
        }
    }

    fn decompress(&mut self, case: Case, enc: &Encoded, dst: &mut [u8]) {
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
                let mut d = PageListMut::new(PageSize::KIB4);
                d.push_slice(dst, PageKey(0)).unwrap();
                self.codecs
                    .decode(enc.codec, &enc.payload, &enc.lengths, &mut d)
                    .unwrap();
                let _ = case;
            }
        }
    }
}

struct Encoded {
    codec: CodecId,
    payload: PoolBuf,
    lengths: Vec<u32>,
}

/// The engine, inline on this core, with raw-pointer jobs as the pipeline builds them.
struct Bench {
    engine: Engine,
    batch: VecDeque<pagewire_accel::Job>,
    done: Vec<Completion>,
    /// Most jobs in flight: jobs are submitted (and their completions polled) in
    /// batches of this many.
    depth: usize,
}

/// Jobs the bench engine keeps in flight: `PAGEWIRE_DEPTH`, or every frame of the
/// buffer at once (256 one-page frames) when unset. `PAGEWIRE_DEPTH=16` sizes it like
/// the pipeline's default `queue_depth`.
fn depth_for(frames: usize) -> usize {
    std::env::var("PAGEWIRE_DEPTH")
        .ok()
        .and_then(|d| d.parse::<usize>().ok())
        .filter(|&d| d > 0)
        .map_or(frames, |d| d.min(frames))
}

impl Bench {
    /// An engine for frames of `n` pages with room for [`depth_for`] frames in flight
    /// and as many more waiting for the transport (at the default, one buffer's worth
    /// of frames), as a pipeline would size it.
    fn new(cache: Option<std::sync::Arc<DeltaCache>>, n: usize) -> Bench {
        let depth = depth_for(PAGES / n);
        let config = EngineConfig {
            max_pages: n,
            requests: depth + 2,
            buffers: 2 * depth + 2,
            delta: cache,
            ..Default::default()
        };
        let engine = Engine::software(
            config,
            SoftwareConfig {
                threads: 0,
                queue_depth: depth + 2,
            },
        )
        .unwrap();
        Bench {
            engine,
            batch: VecDeque::with_capacity(depth + 2),
            done: Vec::with_capacity(depth + 2),
            depth,
        }
    }

    /// Submits the batch and polls every completion into `done`.
    fn flush(&mut self) {
        let jobs = self.batch.len();
        self.engine.submit(&mut self.batch).unwrap();
        self.engine.poll(&mut self.done, usize::MAX, None).unwrap();
        assert_eq!(self.done.len(), jobs);
    }

    /// Encodes `buf` as frames of `n` pages; returns payload bytes.
    fn compress(&mut self, case: Case, buf: &[u8], n: usize) -> usize {
        let mut bytes = 0;
        let frames = buf.len() / (n * PS);
        for (i, frame) in buf.chunks(n * PS).enumerate() {
            let mut job = self.engine.job().unwrap();
            let list = job.encode(Tag(i as u64), EncodeParams::new(case.codec, case.level));
            // SAFETY: `buf` outlives the jobs: every completion is polled below before
            // this function returns.
            unsafe {
                list.push_raw(
                    frame.as_ptr(),
                    (frame.len() / PS) as u32,
                    PageKey((i * n) as u64),
                )
                .unwrap()
            };
            self.batch.push_back(job);
            if self.batch.len() == self.depth || i + 1 == frames {
                self.flush();
                bytes += self
                    .done
                    .iter()
                    .map(|c| c.encoded().unwrap().bytes_out())
                    .sum::<usize>();
                self.done.clear();
            }
        }
        bytes
    }

    fn decompress(&mut self, frames: &[Encoded], dst: &mut [u8], n: usize) {
        for (i, (enc, out)) in frames.iter().zip(dst.chunks_mut(n * PS)).enumerate() {
            let mut job = self.engine.job().unwrap();
            let list = job.decode(Tag(i as u64), enc.codec, enc.payload.clone(), &enc.lengths);
            // SAFETY: `dst` is exclusively borrowed for this call and every completion
            // is polled before it returns; the chunks are disjoint.
            unsafe {
                list.push_raw(out.as_mut_ptr(), (out.len() / PS) as u32, PageKey(0))
                    .unwrap()
            };
            self.batch.push_back(job);
            if self.batch.len() == self.depth || i + 1 == frames.len() {
                self.flush();
                assert!(self.done.iter().all(|c| c.status().is_ok()));
                self.done.clear();
            }
        }
    }
}

/// Encodes every frame once with the codecs (for the decompress benches and ratios).
fn encode_frames(case: Case, buf: &[u8], n: usize, cache: Option<&DeltaCache>) -> Vec<Encoded> {
    let mut codecs = Codecs::new();
    buf.chunks(n * PS)
        .enumerate()
        .map(|(i, frame)| {
            let mut src = PageList::new(PageSize::KIB4);
            src.push_slice(frame, PageKey((i * n) as u64)).unwrap();
            let mut out = vec![0u8; max_payload_len(n, PageSize::KIB4)];
            let mut lengths = Vec::new();
            let o = codecs
                .encode(
                    &EncodeParams::new(case.codec, case.level),
                    &src,
                    cache,
                    &mut out,
                    &mut lengths,
                )
                .unwrap();
            out.truncate(o.payload_len);
            Encoded {
                codec: o.codec,
                payload: PoolBuf::from_vec(out),
                lengths,
            }
        })
        .collect()
}

/// For delta: a cache holding version A, and the frames of version B against it.
fn delta_setup(a: &[u8], b: &[u8], n: usize) -> Vec<Encoded> {
    let cache = DeltaCache::new(DeltaConfig::new(PageSize::KIB4, PAGES)).unwrap();
    encode_frames(CASES[5], a, n, Some(&cache));
    encode_frames(CASES[5], b, n, Some(&cache))
}

fn warm_cache(cache: &DeltaCache, a: &[u8]) {
    encode_frames(CASES[5], a, PAGES, Some(cache));
}

fn bench_codecs(c: &mut Criterion) {
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

/// `f` (the direct call) and `g` (the engine) run back to back `rounds` times, the
/// order swapped every round so neither always runs with the other's data in the
/// cache. Returns the best time of each, and the median over rounds of `g`'s time
/// over `f`'s in the same round: a slow phase of the (shared) machine hits both
/// halves of a round alike, so the median ratio is steadier than a ratio of bests.
fn ab(rounds: usize, mut f: impl FnMut(), mut g: impl FnMut()) -> (f64, f64, f64) {
    let (mut best_f, mut best_g) = (f64::MAX, f64::MAX);
    let mut ratios = Vec::with_capacity(rounds);
    let time = |h: &mut dyn FnMut()| {
        let t = Instant::now();
        h();
        t.elapsed().as_secs_f64()
    };
    for round in 0..rounds {
        let (tf, tg) = if round % 2 == 0 {
            let tf = time(&mut f);
            (tf, time(&mut g))
        } else {
            let tg = time(&mut g);
            (time(&mut f), tg)
        };
        best_f = best_f.min(tf);
        best_g = best_g.min(tg);
        ratios.push(tg / tf);
    }
    ratios.sort_by(f64::total_cmp);
    (best_f, best_g, ratios[ratios.len() / 2])
}

/// The engine-overhead and ratio summary (see the module documentation).
fn summary() {
    let a = mixed(PAGES, 42);
    let b = touched(&a, 7);
    let mb = a.len() as f64 / 1e6;
    println!(
        "\n== engine overhead (inline engine vs library called directly, MB/s best of 31 interleaved runs, overhead the median of per-run engine/direct time ratios, 1 MiB mixed buffer) =="
    );
    // `PAGEWIRE_SUMMARY=lz4,delta` limits the summary to some cases.
    let only = std::env::var("PAGEWIRE_SUMMARY").ok();
    for case in CASES {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|c| c == case.name))
        {
            continue;
        }
        for n in FRAMES {
            let frames = if case.codec == CodecId::DELTA {
                delta_setup(&a, &b, n)
            } else {
                encode_frames(case, &a, n, None)
            };
            let wire: usize = frames.iter().map(|f| f.payload.len()).sum();
            let raw_frames = frames.iter().filter(|f| f.codec == CodecId::RAW).count();
            let mut direct = Direct::new();
            warm_cache(&direct.cache, &a);
            let cache = std::sync::Arc::new(
                DeltaCache::new(DeltaConfig::new(PageSize::KIB4, PAGES)).unwrap(),
            );
            warm_cache(&cache, &a);
            let mut engine = Bench::new(Some(cache), n);
            let (mut f1, mut f2) = (false, false);
            let (cd, ce, cr) = ab(
                31,
                || {
                    f1 = !f1;
                    let src = if f1 && case.codec == CodecId::DELTA {
                        &b
                    } else {
                        &a
                    };
                    for (i, frame) in src.chunks(n * PS).enumerate() {
                        black_box(direct.compress(case, frame, (i * n) as u64));
                    }
                },
                || {
                    f2 = !f2;
                    let src = if f2 && case.codec == CodecId::DELTA {
                        &b
                    } else {
                        &a
                    };
                    black_box(engine.compress(case, src, n));
                },
            );
            let mut dst = if case.codec == CodecId::DELTA {
                a.clone()
            } else {
                vec![0u8; a.len()]
            };
            let mut dst2 = dst.clone();
            let (dd, de, dr) = ab(
                31,
                || {
                    for (enc, out) in frames.iter().zip(dst.chunks_mut(n * PS)) {
                        direct.decompress(case, enc, out);
                    }
                },
                || engine.decompress(&frames, &mut dst2, n),
            );
            // The overhead per job in ns: the median ratio's excess over the best
            // direct time, spread over the frames.
            let per_job = |best: f64, ratio: f64| (ratio - 1.0) * best * 1e9 / frames.len() as f64;
            println!(
                "engine-overhead {:<10} frame {:>3} pages: compress {:>7.0} MB/s direct {:>7.0} MB/s engine ({:+5.1}%, {:+5.0} ns/job) | decompress {:>7.0} MB/s direct {:>7.0} MB/s engine ({:+5.1}%, {:+5.0} ns/job)",
                case.name,
                n,
                mb / cd,
                mb / ce,
                (cr - 1.0) * 100.0,
                per_job(cd, cr),
                mb / dd,
                mb / de,
                (dr - 1.0) * 100.0,
                per_job(dd, dr),
            );
            println!(
                "ratio {:<10} frame {:>3} pages: {:.2} ({} bytes of {}; {} of {} frames raw)",
                case.name,
                n,
                a.len() as f64 / wire as f64,
                wire,
                a.len(),
                raw_frames,
                frames.len()
            );
        }
    }
}

/// The engine's own cost per job, with no codec work to hide it: 256 one-page encode
/// jobs that end raw in place (the codec only notes that the pages go as they are), and
/// 256 one-page decodes of `zero` frames against the same zero fill done directly.
fn fixed_cost() {
    const JOBS: usize = PAGES;
    let a = mixed(PAGES, 42);
    let mut engine = Bench::new(None, 1);
    let params = EncodeParams {
        raw_in_place: true,
        ..EncodeParams::new(CodecId::RAW, Level::DEFAULT)
    };
    let mut encode = || {
        for (i, page) in a.chunks(PS).enumerate() {
            let mut job = engine.engine.job().unwrap();
            let list = job.encode(Tag(i as u64), params);
            // SAFETY: `a` outlives the jobs: every completion is polled below.
            unsafe { list.push_raw(page.as_ptr(), 1, PageKey(i as u64)).unwrap() };
            engine.batch.push_back(job);
            if engine.batch.len() == engine.depth || i + 1 == JOBS {
                engine.flush();
                assert!(
                    engine
                        .done
                        .iter()
                        .all(|c| c.encoded().is_some_and(|e| e.in_place))
                );
                engine.done.clear();
            }
        }
    };
    // `PAGEWIRE_FIXED_RUNS=100000` repeats it long enough to profile.
    let rounds = std::env::var("PAGEWIRE_FIXED_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(31usize)
        | 1;
    let mut runs: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            encode();
            t.elapsed().as_secs_f64()
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    let (enc_best, enc_median) = (runs[0], runs[runs.len() / 2]);
    let empty = PoolBuf::from_vec(Vec::new());
    let mut dst = vec![1u8; PAGES * PS];
    let mut dst2 = dst.clone();
    let (fill, eng, ratio) = ab(
        rounds,
        || {
            for page in dst.chunks_mut(PS) {
                page.fill(0);
            }
            black_box(&mut dst);
        },
        || {
            for (i, page) in dst2.chunks_mut(PS).enumerate() {
                let mut job = engine.engine.job().unwrap();
                let list = job.decode(Tag(i as u64), CodecId::ZERO, empty.clone(), &[]);
                // SAFETY: `dst2` is exclusively borrowed here and every completion is
                // polled before the closure returns; the pages are disjoint.
                unsafe { list.push_raw(page.as_mut_ptr(), 1, PageKey(0)).unwrap() };
                engine.batch.push_back(job);
                if engine.batch.len() == engine.depth || i + 1 == JOBS {
                    engine.flush();
                    assert!(engine.done.iter().all(|c| c.status().is_ok()));
                    engine.done.clear();
                }
            }
        },
    );
    let ns = |t: f64| t * 1e9 / JOBS as f64;
    println!(
        "engine-fixed 1-page jobs: encode ending raw in place (no codec work) {:.0} ns/job best, {:.0} median | decode of a zero frame {:.0} ns/job best vs {:.0} direct 4 KiB zero fill, median overhead {:+.0} ns/job",
        ns(enc_best),
        ns(enc_median),
        ns(eng),
        ns(fill),
        (ratio - 1.0) * ns(fill),
    );
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_millis(1200))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(10)
        .configure_from_args();
    bench_codecs(&mut c);
    c.final_summary();
    summary();
    fixed_cost();
    copy_cost();
}

/// One side of a copy-cost comparison: warm codecs, a delta cache holding the first
/// version, and the output buffers.
struct CopySide {
    codecs: Codecs,
    cache: DeltaCache,
    out: Vec<u8>,
    lengths: Vec<u32>,
    flip: bool,
}

impl CopySide {
    fn new(a: &[u8], n: usize) -> CopySide {
        let cache = DeltaCache::new(DeltaConfig::new(PageSize::KIB4, PAGES)).unwrap();
        warm_cache(&cache, a);
        CopySide {
            codecs: Codecs::new(),
            cache,
            out: vec![0u8; max_payload_len(n, PageSize::KIB4)],
            lengths: Vec::with_capacity(n),
            flip: false,
        }
    }

    /// Encodes `a` (or, for delta, `a` and `b` in turn, so every encode sees a change)
    /// in frames of `n` pages, each frame a list built from a borrowed slice
    /// (`raw == false`) or from raw pointers (`raw == true`); returns the payload bytes.
    fn encode_all(
        &mut self,
        params: &EncodeParams,
        a: &[u8],
        b: &[u8],
        n: usize,
        raw: bool,
    ) -> usize {
        self.flip = !self.flip;
        let buf = if self.flip && params.codec == CodecId::DELTA {
            b
        } else {
            a
        };
        // One list per call for both sides, so neither allocates per frame.
        let mut src = PageList::with_capacity(PageSize::KIB4, 1);
        let mut total = 0;
        for (i, frame) in buf.chunks(n * PS).enumerate() {
            let key = PageKey((i * n) as u64);
            src.reset(PageSize::KIB4);
            if raw {
                // SAFETY: `frame` outlives `src`, which is dropped at the end of this
                // call, and nothing writes it meanwhile.
                unsafe { src.push_raw(frame.as_ptr(), (frame.len() / PS) as u32, key) }.unwrap();
            } else {
                src.push_slice(frame, key).unwrap();
            }
            total += self
                .codecs
                .encode(
                    params,
                    &src,
                    Some(&self.cache),
                    &mut self.out,
                    &mut self.lengths,
                )
                .unwrap()
                .payload_len;
        }
        total
    }
}

/// The copy-cost section (see the module documentation).
fn copy_cost() {
    let a = mixed(PAGES, 42);
    let b = touched(&a, 7);
    let mb = a.len() as f64 / 1e6;
    let cases = [
        ("zstd-dflt", CodecId::ZSTD),
        ("lz4", CodecId::LZ4),
        ("deflate-dflt", CodecId::DEFLATE),
        ("delta", CodecId::DELTA),
        ("raw", CodecId::RAW),
    ];
    println!(
        "\n== copy cost (Codecs::encode of a 1 MiB mixed buffer: in place from a borrowed slice, as before the copy, vs copied from raw pointers, as guest memory now is; MB/s best of each, cost the median of per-run copied/in-place time ratios, runs interleaved) =="
    );
    // `PAGEWIRE_COPY=lz4,delta` limits the section to some cases.
    let only = std::env::var("PAGEWIRE_COPY").ok();
    for (name, codec) in cases {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|c| c == name))
        {
            continue;
        }
        let params = EncodeParams::new(codec, Level::DEFAULT);
        for n in [32, 128] {
            let mut in_place = CopySide::new(&a, n);
            let mut copied = CopySide::new(&a, n);
            // Warm both sides, then size the run to about 400 ms.
            let t = Instant::now();
            black_box(in_place.encode_all(&params, &a, &b, n, false));
            black_box(copied.encode_all(&params, &a, &b, n, true));
            let per_round = t.elapsed().as_secs_f64();
            let rounds = ((0.4 / per_round) as usize).clamp(15, 61) | 1;
            let (ti, tc, r) = ab(
                rounds,
                || {
                    black_box(in_place.encode_all(&params, &a, &b, n, false));
                },
                || {
                    black_box(copied.encode_all(&params, &a, &b, n, true));
                },
            );
            println!(
                "copy-cost {:<12} frame {:>3} pages: in place {:>7.0} MB/s, copied {:>7.0} MB/s, copied/in-place time {:.3} ({:+5.1}%, {} runs){}",
                name,
                n,
                mb / ti,
                mb / tc,
                r,
                (r - 1.0) * 100.0,
                rounds,
                match codec {
                    CodecId::DELTA => "; delta copied each page before this change too",
                    CodecId::RAW => "; raw copies into the payload either way (control)",
                    _ => "",
                }
            );
        }
    }
}
