//! Engine overhead per frame of the IAA hardware path (submit, poll, complete) on the
//! IAA **device model**, against the software path, in the same run.
//!
//! The device model does the compression on its own threads, as a device would, so
//! the caller-side time of the IAA path is the engine's overhead: building one
//! descriptor per page, submitting, polling completion records, packing the streams
//! into the payload. The software path's caller-side time is the whole encode (the
//! inline software backend compresses on the caller's thread). Both encode the same
//! frames with `deflate-4k` (and decode them back); the figures are per frame of
//! 16 × 4 KiB pages. The
//! model's own speed says nothing about IAA hardware; only the overhead figure
//! transfers (the CPU work a real IAA would leave to the caller).
//!
//! The IAA path runs twice per round: at level 1 (the fixed Huffman code, one
//! descriptor per page) and at the default level (a dynamic code per page: a
//! statistics pass, the host's table and header build into the AECS, then the
//! compression). The software path (libdeflate at its default level) is the
//! baseline for both the compression ratio and the caller-side overhead.
//!
//! Run: `cargo bench -p pagewire-benches --bench iaa_engine`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pagewire_accel::iaa::{DeviceModel, IaaBackend, IaaConfig, ModelConfig};
use pagewire_accel::{
    EncodeParams, Engine, EngineBuf, EngineConfig, Level, PageKey, PageSize, SoftwareConfig, Tag,
    thread_cpu_time,
};
use pagewire_protocol::CodecId;

const PAGES: usize = 16;
const FRAMES: usize = 3000;

fn text(seed: u64) -> Vec<u8> {
    let words = [
        "guest ", "memory ", "page ", "frame ", "round ", "dirty ", "\n", "0x7f3a ",
    ];
    let mut v = Vec::with_capacity(PAGES * 4096);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < PAGES * 4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
    }
    v.truncate(PAGES * 4096);
    v
}

struct Figures {
    /// Caller-thread CPU inside submit and poll, per frame: the engine's work on the
    /// caller's thread (for the software path, the whole encode).
    caller_cpu_us: f64,
    /// Wall time inside submit and poll, per frame.
    call_us: f64,
    /// Wall time of the whole run, per frame.
    wall_us: f64,
    ratio: f64,
}

fn run(engine: &mut Engine, frames: &[Vec<u8>], level: Level) -> Figures {
    let mut in_calls = Duration::ZERO;
    let mut cpu_in_calls = Duration::ZERO;
    let start = Instant::now();
    let mut next = 0;
    let mut done_n = 0;
    let mut done = Vec::new();
    let (mut bytes_in, mut bytes_out) = (0usize, 0usize);
    let mut batch = VecDeque::new();
    while done_n < frames.len() {
        while next < frames.len() && batch.len() < 8 {
            let Some(mut job) = engine.job() else { break };
            job.encode_buf(
                Tag(next as u64),
                EncodeParams::new(CodecId::DEFLATE_4K, level),
                EngineBuf::from_vec(frames[next].clone()),
                PageKey(0),
            )
            .expect("pages");
            batch.push_back(job);
            next += 1;
        }
        let t = Instant::now();
        let c = thread_cpu_time();
        engine.submit(&mut batch).expect("submit");
        let n = engine.poll(&mut done, 64, None).expect("poll");
        cpu_in_calls += thread_cpu_time().saturating_sub(c);
        in_calls += t.elapsed();
        if n == 0 {
            // Waiting for the device is not engine overhead: sleep it off.
            std::thread::sleep(Duration::from_micros(50));
        }
        for c in done.drain(..) {
            let o = c.encoded().expect("encoded");
            bytes_in += o.bytes_in;
            bytes_out += o.bytes_out();
            done_n += 1;
        }
    }
    let n = frames.len() as f64;
    Figures {
        caller_cpu_us: cpu_in_calls.as_secs_f64() * 1e6 / n,
        call_us: in_calls.as_secs_f64() * 1e6 / n,
        wall_us: start.elapsed().as_secs_f64() * 1e6 / n,
        ratio: bytes_in as f64 / bytes_out.max(1) as f64,
    }
}

/// One frame encoded: payload and per-page lengths.
struct Encoded {
    payload: Vec<u8>,
    lengths: Vec<u32>,
}

fn encode_all(engine: &mut Engine, frames: &[Vec<u8>]) -> Vec<Encoded> {
    let mut out = Vec::with_capacity(frames.len());
    for (i, f) in frames.iter().enumerate() {
        let mut job = engine.job().expect("request");
        job.encode_buf(
            Tag(i as u64),
            EncodeParams::new(CodecId::DEFLATE_4K, Level::DEFAULT),
            EngineBuf::from_vec(f.clone()),
            PageKey(0),
        )
        .expect("pages");
        let mut batch = VecDeque::from([job]);
        engine.submit(&mut batch).expect("submit");
        let mut done = Vec::new();
        while done.is_empty() {
            engine
                .poll(&mut done, 1, Some(Duration::from_millis(10)))
                .expect("poll");
        }
        let c = &done[0];
        let o = c.encoded().expect("encoded");
        assert_eq!(o.codec, CodecId::DEFLATE_4K, "text frames compress");
        out.push(Encoded {
            payload: c.payload().expect("payload")[..o.payload_len].to_vec(),
            lengths: c.lengths().to_vec(),
        });
    }
    out
}

/// Decodes every frame; returns the caller's CPU inside submit and poll per frame.
fn run_decode(engine: &mut Engine, encoded: &[Encoded], frames: &[Vec<u8>]) -> f64 {
    let mut cpu_in_calls = Duration::ZERO;
    let (mut next, mut done_n) = (0, 0);
    let mut done = Vec::new();
    let mut batch = VecDeque::new();
    while done_n < encoded.len() {
        while next < encoded.len() && batch.len() < 8 {
            let Some(mut job) = engine.job() else { break };
            let e = &encoded[next];
            job.decode_buf(
                Tag(next as u64),
                CodecId::DEFLATE_4K,
                EngineBuf::from_vec(e.payload.clone()),
                &e.lengths,
                EngineBuf::from_vec(vec![0u8; PAGES * 4096]),
                PageKey(0),
            )
            .expect("dest");
            batch.push_back(job);
            next += 1;
        }
        let c = thread_cpu_time();
        engine.submit(&mut batch).expect("submit");
        let n = engine.poll(&mut done, 64, None).expect("poll");
        cpu_in_calls += thread_cpu_time().saturating_sub(c);
        if n == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
        for mut c in done.drain(..) {
            c.status().expect("decoded");
            let i = c.tag().0 as usize;
            if i.is_multiple_of(97) {
                assert!(
                    c.take_dest().expect("dest")[..] == frames[i][..],
                    "frame {i}"
                );
            }
            done_n += 1;
        }
    }
    cpu_in_calls.as_secs_f64() * 1e6 / encoded.len() as f64
}

fn config() -> EngineConfig {
    EngineConfig {
        max_pages: PAGES,
        requests: 16,
        buffers: 32,
        ..Default::default()
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let frames: Vec<Vec<u8>> = (0..FRAMES as u64).map(text).collect();
    let mut software = Engine::software(
        config(),
        SoftwareConfig {
            threads: 0,
            queue_depth: 16,
        },
    )
    .expect("engine");
    let model = DeviceModel::new(ModelConfig::default()).expect("model");
    let backend = IaaBackend::new(
        Box::new(model),
        IaaConfig {
            // 6 jobs x 16 pages stay below the model's 128 queue entries: submit never
            // waits for room, so the caller-side figures are the engine's own work.
            slots: 6,
            ..IaaConfig::new(PageSize::KIB4, PAGES)
        },
    )
    .expect("backend");
    let mut iaa = Engine::new(config(), Box::new(backend)).expect("engine");
    let encoded = encode_all(&mut software, &frames);
    // Warm up both, then alternate three measured runs each.
    run(&mut software, &frames[..200], Level::DEFAULT);
    run(&mut iaa, &frames[..200], Level(1));
    run(&mut iaa, &frames[..200], Level::DEFAULT);
    println!(
        "engine overhead per frame ({PAGES} x 4 KiB pages, deflate-4k, {FRAMES} frames per run)"
    );
    println!("machine shared with other builds: figures are noisy, compare ratios within a run");
    for round in 0..3 {
        let sw = run(&mut software, &frames, Level::DEFAULT);
        let fixed = run(&mut iaa, &frames, Level(1));
        let dynamic = run(&mut iaa, &frames, Level::DEFAULT);
        assert_eq!(
            iaa.stats().hw_fallbacks,
            0,
            "the model run fell back to software"
        );
        println!(
            "run {round}: software path (libdeflate)  CPU in submit+poll {:7.1} us/frame, wall in submit+poll {:7.1} us, wall {:7.1} us, ratio {:.2}",
            sw.caller_cpu_us, sw.call_us, sw.wall_us, sw.ratio
        );
        for (name, hw) in [("fixed  ", &fixed), ("dynamic", &dynamic)] {
            println!(
                "run {round}: IAA on model, {name}   CPU in submit+poll {:7.1} us/frame, wall in submit+poll {:7.1} us, wall {:7.1} us, ratio {:.2}",
                hw.caller_cpu_us, hw.call_us, hw.wall_us, hw.ratio
            );
            println!(
                "run {round}: IAA {name} engine overhead (CPU in submit+poll) = {:.4} x the software path's; whole-run wall {:.3} x (the model is software, not a device)",
                hw.caller_cpu_us / sw.caller_cpu_us,
                hw.wall_us / sw.wall_us
            );
        }
        println!(
            "run {round}: ratio: dynamic {:.2} = {:.3} x fixed ({:.2}), {:.3} x libdeflate ({:.2}); dynamic overhead {:.3} x fixed's",
            dynamic.ratio,
            dynamic.ratio / fixed.ratio,
            fixed.ratio,
            dynamic.ratio / sw.ratio,
            sw.ratio,
            dynamic.caller_cpu_us / fixed.caller_cpu_us
        );
        let sw_d = run_decode(&mut software, &encoded, &frames);
        let hw_d = run_decode(&mut iaa, &encoded, &frames);
        assert_eq!(
            iaa.stats().hw_fallbacks,
            0,
            "the model run fell back to software"
        );
        println!(
            "run {round}: decode: software CPU in submit+poll {sw_d:7.1} us/frame, IAA on model {hw_d:7.1} us/frame: IAA-path overhead = {:.4} x the software path's",
            hw_d / sw_d
        );
    }
}
