//! What prints after the criterion groups: the engine's overhead over the direct call
//! with the compression ratios, and the engine's fixed cost per job.

use std::hint::black_box;
use std::time::Instant;

use pagewire_accel::{
    Codecs, DeltaCache, DeltaConfig, EncodeParams, EngineBuf, Level, PageKey, PageList,
    PageListMut, PageSize, Tag, max_payload_len,
};
use pagewire_protocol::CodecId;

use crate::data::{delta_setup, encode_frames, mixed, touched, warm_cache};
use crate::direct::Direct;
use crate::engine::Bench;
use crate::{CASES, FRAMES, PAGES, PS};

/// `f` (the direct call) and `g` (the engine) run back to back `rounds` times, the
/// order swapped every round so neither always runs with the other's data in the
/// cache. Returns the best time of each, and the median over rounds of `g`'s time
/// over `f`'s in the same round: a slow phase of the (shared) machine hits both
/// halves of a round alike, so the median ratio is steadier than a ratio of bests.
pub(crate) fn ab(rounds: usize, mut f: impl FnMut(), mut g: impl FnMut()) -> (f64, f64, f64) {
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

/// The engine-overhead and ratio summary (see the crate documentation).
pub(crate) fn summary() {
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
            // The destination's own decode path: no engine job, the codec called on
            // a page list of raw pointers into guest memory, as its receivers do.
            let mut dst3 = dst.clone();
            let mut codecs = Codecs::new();
            let mut lengths = Vec::new();
            let mut list = PageListMut::new(PageSize::KIB4);
            let (pd, pe, pr) = ab(
                31,
                || {
                    for (enc, out) in frames.iter().zip(dst.chunks_mut(n * PS)) {
                        direct.decompress(case, enc, out);
                    }
                },
                || receiver_decode(&mut codecs, &mut lengths, &mut list, &frames, &mut dst3, n),
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
                "receiver-decode {:<10} frame {:>3} pages: {:>7.0} MB/s direct {:>7.0} MB/s the destination's path ({:+5.1}%, {:+5.0} ns/frame)",
                case.name,
                n,
                mb / pd,
                mb / pe,
                (pr - 1.0) * 100.0,
                per_job(pd, pr),
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

/// Decodes `frames` into `dst` (frames of `n` pages) as a destination's receiver
/// does: per frame, its kept page list filled with raw pointers into the pages and one
/// call of the codec, no engine job (`pipeline/src/destination/receiver.rs`, `decode`).
fn receiver_decode(
    codecs: &mut Codecs,
    lengths: &mut Vec<u32>,
    list: &mut PageListMut<'static>,
    frames: &[crate::data::Encoded],
    dst: &mut [u8],
    n: usize,
) {
    for (enc, out) in frames.iter().zip(dst.chunks_mut(n * PS)) {
        list.reset(PageSize::KIB4);
        // SAFETY: `out` is exclusively borrowed for this iteration, and the list is
        // reset before the next one and after the loop.
        unsafe { list.push_raw(out.as_mut_ptr(), (out.len() / PS) as u32, PageKey(0)) }.unwrap();
        lengths.clear();
        lengths.extend_from_slice(&enc.lengths);
        codecs
            .decode(enc.codec, &enc.payload, lengths, list)
            .unwrap();
    }
    list.reset(PageSize::KIB4);
}

/// The engine's own cost per job, with no codec work to hide it: 256 one-page encode
/// jobs that end raw in place (the codec only notes that the pages go as they are), and
/// 256 one-page decodes of `zero` frames against the same zero fill done directly.
pub(crate) fn fixed_cost() {
    const JOBS: usize = PAGES;
    let a = mixed(PAGES, 42);
    let mut engine = Bench::new(None, 1);
    let params = EncodeParams {
        raw_in_place: true,
        ..EncodeParams::new(CodecId::RAW, Level::DEFAULT)
    };
    let mut encode = || raw_in_place_jobs(&mut engine, &a, params, true);
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
    let empty = EngineBuf::from_vec(Vec::new());
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
                    engine.recycle_done();
                }
            }
        },
    );
    let ns = |t: f64| t * 1e9 / JOBS as f64;
    println!(
        "engine-fixed 1-page frames: encode ending raw in place (no codec work{}) {:.0} ns/frame best, {:.0} median | decode job of a zero frame {:.0} ns/job best vs {:.0} direct 4 KiB zero fill, median overhead {:+.0} ns/job",
        if engine.now { ", encode_now" } else { ", jobs" },
        ns(enc_best),
        ns(enc_median),
        ns(eng),
        ns(fill),
        (ratio - 1.0) * ns(fill),
    );
}

/// One-page encode jobs over every page of `a` that end raw in place, in batches of the
/// engine's depth; with `check`, each completion is checked to have ended so.
fn raw_in_place_jobs(engine: &mut Bench, a: &[u8], params: EncodeParams, check: bool) {
    let jobs = a.len() / PS;
    for (i, page) in a.chunks(PS).enumerate() {
        if engine.now {
            let out = engine.encode_now(params, page, PageKey(i as u64), i + 1 == jobs);
            assert!(!check || out.in_place);
            continue;
        }
        let mut job = engine.engine.job().unwrap();
        let list = job.encode(Tag(i as u64), params);
        // SAFETY: `a` outlives the jobs: every completion is polled below.
        unsafe { list.push_raw(page.as_ptr(), 1, PageKey(i as u64)).unwrap() };
        engine.batch.push_back(job);
        if engine.batch.len() == engine.depth || i + 1 == jobs {
            engine.flush();
            if check {
                assert!(
                    engine
                        .done
                        .iter()
                        .all(|c| c.encoded().is_some_and(|e| e.in_place))
                );
            }
            engine.recycle_done();
        }
    }
}

/// Where the fixed cost of a one-page encode goes, each phase timed alone (best of 31
/// runs): taking a request and dropping it; that plus describing the job (an encode of
/// one page); the whole job as [`fixed_cost`] runs it; and the codec's own raw-in-place
/// path called directly, which the whole job includes. `PAGEWIRE_FIXED_ONLY=1` runs
/// this and [`fixed_cost`] alone (`PAGEWIRE_PHASE_REPS` sets the passes per run).
pub(crate) fn fixed_phases() {
    let a = mixed(PAGES, 42);
    let mut engine = Bench::new(None, 1);
    let params = EncodeParams {
        raw_in_place: true,
        ..EncodeParams::new(CodecId::RAW, Level::DEFAULT)
    };
    let reps: usize = std::env::var("PAGEWIRE_PHASE_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(400);
    let time = |f: &mut dyn FnMut()| {
        let mut best = f64::MAX;
        for _ in 0..31 {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        best * 1e9 / (reps * PAGES) as f64
    };
    let take = time(&mut || {
        for _ in 0..PAGES {
            black_box(engine.engine.job().unwrap());
        }
    });
    let describe = time(&mut || {
        for (i, page) in a.chunks(PS).enumerate() {
            let mut job = engine.engine.job().unwrap();
            let list = job.encode(Tag(i as u64), params);
            // SAFETY: `a` outlives the job, dropped right below.
            unsafe { list.push_raw(page.as_ptr(), 1, PageKey(i as u64)).unwrap() };
            black_box(job);
        }
    });
    let whole = time(&mut || raw_in_place_jobs(&mut engine, &a, params, false));
    let mut codecs = Codecs::new();
    let mut out = vec![0u8; max_payload_len(1, PageSize::KIB4)];
    let mut lengths = Vec::new();
    let mut list = PageList::with_capacity(PageSize::KIB4, 1);
    let codec = time(&mut || {
        for (i, page) in a.chunks(PS).enumerate() {
            list.reset(PageSize::KIB4);
            // SAFETY: `a` outlives the list's use in this iteration.
            unsafe { list.push_raw(page.as_ptr(), 1, PageKey(i as u64)).unwrap() };
            black_box(
                codecs
                    .encode(&params, &list, None, &mut out, &mut lengths)
                    .unwrap(),
            );
        }
    });
    let whole_what = match engine.now {
        true => "the whole frame at once (encode_now, no job)",
        false => "the whole job",
    };
    println!(
        "engine-fixed phases, one-page encode ending raw in place: take and drop a request {take:.1} ns | and describe the job {describe:.1} ns | {whole_what} {whole:.1} ns, of which the codec's raw path called directly {codec:.1} ns"
    );
}
