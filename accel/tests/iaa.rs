//! The IAA backend on the device model, under every injected fault: byte-for-byte
//! results, fallbacks counted per cause. And the real-device test, skipped visibly
//! unless `PAGEWIRE_IAA_WQ` names a work queue (or `PAGEWIRE_IAA_VFIO` a PCI address).

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::{Kind, PS, content};
use pagewire_accel::iaa::{
    DeviceModel, Huffman, IaaBackend, IaaConfig, IaaCounters, ModelConfig, WqMode,
};
use pagewire_accel::{
    BackendChoice, BackendKind, Codecs, Completion, EncodeParams, Engine, EngineBuf, EngineConfig,
    FallbackCause, IaaPortal, Job, Level, ModelFault, ModelFaults, PageKey, PageSize,
    SoftwareConfig, Tag,
};
use pagewire_protocol::CodecId;

const PAGES: usize = 8;

/// An engine on the model compressing with the fixed code: one descriptor per page,
/// which the fault tests' arithmetic (every n-th descriptor) assumes.
fn model_engine(faults: ModelFaults, mode: WqMode, size: usize, timeout: Duration) -> Engine {
    model_engine_counted(faults, mode, size, timeout, Huffman::Fixed).0
}

fn model_engine_counted(
    faults: ModelFaults,
    mode: WqMode,
    size: usize,
    timeout: Duration,
    huffman: Huffman,
) -> (Engine, std::sync::Arc<IaaCounters>) {
    let portal = DeviceModel::new(ModelConfig {
        mode,
        size,
        faults,
        ..ModelConfig::default()
    })
    .expect("model");
    let backend = IaaBackend::new(
        Box::new(portal),
        IaaConfig {
            slots: 8,
            retries: 16,
            timeout,
            huffman,
            ..IaaConfig::new(PageSize::KIB4, 16)
        },
    )
    .expect("backend");
    let counters = backend.counters();
    let engine = Engine::new(
        EngineConfig {
            max_pages: 16,
            requests: 16,
            buffers: 32,
            ..Default::default()
        },
        Box::new(backend),
    )
    .expect("engine");
    (engine, counters)
}

fn run(engine: &mut Engine, mut batch: VecDeque<Job>) -> Vec<Completion> {
    let want = batch.len();
    let mut done = Vec::new();
    for _ in 0..20_000 {
        if done.len() == want {
            break;
        }
        engine.submit(&mut batch).expect("submit");
        engine
            .poll(&mut done, want, Some(Duration::from_millis(5)))
            .expect("poll");
    }
    assert_eq!(done.len(), want, "every job completes");
    done
}

/// Frames of text, code, mixed and random pages.
fn inputs(n: usize) -> Vec<Vec<u8>> {
    let kinds = [Kind::Text, Kind::Code, Kind::Mixed, Kind::Random];
    (0..n)
        .map(|i| content(kinds[i % kinds.len()], PAGES, i as u64))
        .collect()
}

/// Encodes every input on `engine`, checks each frame decodes (with software) to its
/// input, then decodes the frames on `engine` and checks the pages; returns the
/// completions' fallback causes.
fn encode_decode(engine: &mut Engine, codec: CodecId) -> Vec<Option<FallbackCause>> {
    encode_decode_at(engine, codec, Level::DEFAULT)
}

/// [`encode_decode`] at `level`.
fn encode_decode_at(
    engine: &mut Engine,
    codec: CodecId,
    level: Level,
) -> Vec<Option<FallbackCause>> {
    let inputs = inputs(12);
    let batch = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut job = engine.job().expect("request");
            job.encode_buf(
                Tag(i as u64),
                EncodeParams::new(codec, level),
                EngineBuf::from_vec(p.clone()),
                PageKey(0),
            )
            .expect("pages");
            job
        })
        .collect();
    let mut causes = Vec::new();
    let mut frames = Vec::new();
    for mut c in run(engine, batch) {
        causes.push(c.fallback());
        let out = c.encoded().expect("encoded");
        let input = &inputs[c.tag().0 as usize];
        let payload = c.take_payload().expect("payload");
        let mut back = vec![0u8; input.len()];
        let mut dst = pagewire_accel::PageListMut::new(PageSize::KIB4);
        dst.push_slice(&mut back, PageKey(0)).expect("pages");
        Codecs::new()
            .decode(
                out.codec,
                &payload[..out.payload_len],
                c.lengths(),
                &mut dst,
            )
            .expect("software decodes the frame");
        drop(dst);
        assert!(back == *input, "frame {} differs", c.tag().0);
        frames.push((
            c.tag().0,
            out.codec,
            payload[..out.payload_len].to_vec(),
            c.lengths().to_vec(),
        ));
    }
    let batch = frames
        .iter()
        .filter(|f| f.1 != CodecId::RAW)
        .map(|(tag, codec, payload, lengths)| {
            let mut job = engine.job().expect("request");
            job.decode_buf(
                Tag(*tag),
                *codec,
                EngineBuf::from_vec(payload.clone()),
                lengths,
                EngineBuf::from_vec(vec![0x5a; PAGES * PS]),
                PageKey(0),
            )
            .expect("dest");
            job
        })
        .collect();
    for mut c in run(engine, batch) {
        c.status().expect("decoded");
        causes.push(c.fallback());
        let dest = c.take_dest().expect("dest");
        assert!(
            dest[..] == inputs[c.tag().0 as usize][..],
            "decode of {} differs",
            c.tag().0
        );
    }
    causes
}

#[test]
fn without_faults_every_job_runs_on_the_model_and_round_trips() {
    // A shared queue with room for the batch; a dedicated queue smaller than one job
    // (the backend waits for its own descriptors to make room).
    for (mode, size) in [(WqMode::Shared, 128), (WqMode::Dedicated, 4)] {
        let mut engine = model_engine(ModelFaults::default(), mode, size, Duration::from_secs(30));
        let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
        assert!(causes.iter().all(Option::is_none), "{mode:?}: {causes:?}");
        let s = engine.stats();
        assert_eq!(s.hw_fallbacks, 0);
        assert!(
            s.by_backend
                .iter()
                .any(|&(k, n)| k == BackendKind::Iaa && n >= 12)
        );
        // Random pages did not shrink on the device and went raw.
        let e = s.encode_of(CodecId::DEFLATE_4K).expect("stats");
        assert!(e.ratio().unwrap_or(0.0) > 1.2, "{e:?}");
    }
}

fn relaxed(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn dynamic_huffman_runs_both_passes_on_the_model_and_beats_the_fixed_code() {
    for (mode, size) in [(WqMode::Shared, 128), (WqMode::Dedicated, 4)] {
        let mut ratios = Vec::new();
        for huffman in [Huffman::Fixed, Huffman::Dynamic] {
            let (mut engine, counters) = model_engine_counted(
                ModelFaults::default(),
                mode,
                size,
                Duration::from_secs(30),
                huffman,
            );
            // Byte-for-byte through the software inflater and the model's decoder.
            let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
            assert!(
                causes.iter().all(Option::is_none),
                "{huffman:?}: {causes:?}"
            );
            let stats = relaxed(&counters.statistics_passes);
            let dynamic = relaxed(&counters.dynamic_pages);
            if huffman == Huffman::Dynamic {
                // Every page of the 12 frames had a statistics pass and, as no
                // header outgrew the accumulator, a dynamic code.
                assert_eq!(stats, 12 * PAGES as u64);
                assert_eq!(dynamic, stats);
                assert_eq!(relaxed(&counters.fixed_instead), 0);
            } else {
                assert_eq!((stats, dynamic), (0, 0));
            }
            let e = engine.stats();
            let e = e.encode_of(CodecId::DEFLATE_4K).expect("stats");
            ratios.push(e.ratio().expect("ratio"));
        }
        assert!(
            ratios[1] > ratios[0] * 1.05,
            "{mode:?}: dynamic {} vs fixed {}",
            ratios[1],
            ratios[0]
        );
    }
}

#[test]
fn dynamic_pages_are_final_dynamic_blocks_that_software_inflates() {
    let (mut engine, _) = model_engine_counted(
        ModelFaults::default(),
        WqMode::Shared,
        64,
        Duration::from_secs(30),
        Huffman::Dynamic,
    );
    let input = content(Kind::Text, PAGES, 7);
    let mut job = engine.job().expect("request");
    job.encode_buf(
        Tag(0),
        EncodeParams::new(CodecId::DEFLATE_4K, Level::DEFAULT),
        EngineBuf::from_vec(input.clone()),
        PageKey(0),
    )
    .expect("pages");
    let mut c = run(&mut engine, VecDeque::from([job])).remove(0);
    assert!(c.fallback().is_none());
    let lengths = c.lengths().to_vec();
    let payload = c.take_payload().expect("payload");
    let mut pos = 0;
    for (i, &len) in lengths.iter().enumerate() {
        let len = len as usize;
        assert!(len < PS, "text page {i} compressed");
        let page = &payload[pos..pos + len];
        // BFINAL = 1, BTYPE = 10 (dynamic Huffman) in the first three bits.
        assert_eq!(page[0] & 0b111, 0b101, "page {i}");
        let mut back = vec![0u8; PS];
        let n = miniz_oxide::inflate::decompress_slice_iter_to_slice(
            &mut back,
            std::iter::once(page),
            false,
            false,
        )
        .expect("a second inflater decodes it");
        assert_eq!(n, PS);
        assert!(back[..] == input[i * PS..(i + 1) * PS], "page {i}");
        pos += len;
    }
}

#[test]
fn the_default_huffman_choice_is_fixed_at_level_1_and_dynamic_above() {
    for (level, dynamic) in [(Level(1), false), (Level::DEFAULT, true), (Level(6), true)] {
        let (mut engine, counters) = model_engine_counted(
            ModelFaults::default(),
            WqMode::Shared,
            64,
            Duration::from_secs(30),
            Huffman::ByLevel,
        );
        let causes = encode_decode_at(&mut engine, CodecId::DEFLATE_4K, level);
        assert!(causes.iter().all(Option::is_none), "{causes:?}");
        assert_eq!(relaxed(&counters.dynamic_pages) > 0, dynamic, "{level:?}");
    }
}

#[test]
fn dynamic_huffman_under_each_fault_stays_byte_for_byte_with_fallbacks_counted() {
    for (fault, every, cause) in [
        (ModelFault::QueueFull, 10, FallbackCause::QueueFull),
        (ModelFault::PageFault, 7, FallbackCause::PageFault),
        (ModelFault::OutputOverflow, 5, FallbackCause::OutputOverflow),
    ] {
        let faults = ModelFaults {
            fault: Some(fault),
            every,
        };
        let (mut engine, counters) = model_engine_counted(
            faults,
            WqMode::Shared,
            64,
            Duration::from_secs(30),
            Huffman::Dynamic,
        );
        let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
        assert!(
            causes.iter().all(|c| c.is_none() || *c == Some(cause)),
            "{fault:?}: {causes:?}"
        );
        let s = engine.stats();
        assert_eq!(s.hw_fallbacks, s.fallback_causes.of(cause), "{fault:?}");
        assert!(relaxed(&counters.dynamic_pages) > 0, "{fault:?}");
        if fault == ModelFault::PageFault {
            assert!(relaxed(&counters.faults_resolved) >= 5);
        }
    }
}

#[test]
fn queue_full_sends_the_frame_to_software_at_once() {
    let faults = ModelFaults {
        fault: Some(ModelFault::QueueFull),
        every: 10,
    };
    let mut engine = model_engine(faults, WqMode::Shared, 64, Duration::from_secs(30));
    let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
    let n = causes
        .iter()
        .filter(|c| **c == Some(FallbackCause::QueueFull))
        .count();
    assert!(n >= 1, "{causes:?}");
    assert!(
        causes
            .iter()
            .all(|c| c.is_none() || *c == Some(FallbackCause::QueueFull))
    );
    let s = engine.stats();
    assert_eq!(s.fallback_causes.of(FallbackCause::QueueFull), n as u64);
    assert_eq!(s.hw_fallbacks, n as u64);
}

#[test]
fn a_page_fault_is_touched_and_resubmitted_once_then_software() {
    // Every 7th descriptor faults: most resubmissions (later descriptors) succeed;
    // one that lands on a 7th index again sends its job to software.
    let faults = ModelFaults {
        fault: Some(ModelFault::PageFault),
        every: 7,
    };
    let (mut engine, counters) = model_engine_counted(
        faults,
        WqMode::Shared,
        128,
        Duration::from_secs(30),
        Huffman::Fixed,
    );
    let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
    let resolved = counters
        .faults_resolved
        .load(std::sync::atomic::Ordering::Relaxed);
    let fell = causes.iter().filter(|c| c.is_some()).count() as u64;
    assert!(resolved >= 10, "faults touched and resubmitted: {resolved}");
    assert!(fell < resolved, "{causes:?}");
    assert!(
        causes
            .iter()
            .all(|c| c.is_none() || *c == Some(FallbackCause::PageFault))
    );
    assert_eq!(
        engine.stats().fallback_causes.of(FallbackCause::PageFault),
        fell
    );
    // Every descriptor faults: each job goes to software with cause page-fault,
    // except the three random frames, whose pages all overflow on the device (the
    // model injects faults into otherwise successful descriptors only) and go raw.
    let faults = ModelFaults {
        fault: Some(ModelFault::PageFault),
        every: 1,
    };
    let mut engine = model_engine(faults, WqMode::Dedicated, 16, Duration::from_secs(30));
    let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
    let none = causes.iter().filter(|c| c.is_none()).count();
    assert_eq!(none, 3, "{causes:?}");
    assert!(
        causes
            .iter()
            .all(|c| c.is_none() || *c == Some(FallbackCause::PageFault))
    );
    let s = engine.stats();
    assert_eq!(
        s.fallback_causes.of(FallbackCause::PageFault),
        (causes.len() - none) as u64
    );
}

#[test]
fn output_overflow_sends_a_compressed_page_raw_and_a_decode_to_software() {
    let faults = ModelFaults {
        fault: Some(ModelFault::OutputOverflow),
        every: 5,
    };
    let mut engine = model_engine(faults, WqMode::Shared, 64, Duration::from_secs(30));
    let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
    // Encodes never fall back for an overflow (the page goes raw); decodes do.
    assert!(causes[..12].iter().all(Option::is_none), "{causes:?}");
    assert!(
        causes[12..].contains(&Some(FallbackCause::OutputOverflow)),
        "{causes:?}"
    );
    let s = engine.stats();
    assert_eq!(
        s.hw_fallbacks,
        s.fallback_causes.of(FallbackCause::OutputOverflow)
    );
}

#[test]
fn a_hung_descriptor_times_out_and_the_device_is_given_up() {
    let faults = ModelFaults {
        fault: Some(ModelFault::Hang),
        every: 20,
    };
    let mut engine = model_engine(faults, WqMode::Shared, 64, Duration::from_millis(200));
    let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
    let timeouts = causes
        .iter()
        .filter(|c| **c == Some(FallbackCause::Timeout))
        .count();
    assert!(timeouts >= 1, "{causes:?}");
    // After the timeout the device is not used again.
    let first = causes.iter().position(|c| c.is_some()).expect("a fallback");
    assert!(
        causes[first + 1..].iter().all(Option::is_some),
        "{causes:?}"
    );
    let s = engine.stats();
    assert_eq!(
        s.hw_fallbacks,
        s.fallback_causes.of(FallbackCause::Timeout)
            + s.fallback_causes.of(FallbackCause::DeviceLost)
    );
}

#[test]
fn a_device_disabled_mid_migration_sends_everything_after_to_software() {
    let faults = ModelFaults {
        fault: Some(ModelFault::DeviceDisabled),
        every: 30,
    };
    let mut engine = model_engine(faults, WqMode::Dedicated, 16, Duration::from_secs(30));
    let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
    assert!(
        causes.iter().any(Option::is_none),
        "some ran on the device: {causes:?}"
    );
    let lost = causes
        .iter()
        .filter(|c| **c == Some(FallbackCause::DeviceLost))
        .count();
    assert!(lost >= 12, "{causes:?}");
    assert_eq!(
        engine.stats().fallback_causes.of(FallbackCause::DeviceLost),
        lost as u64
    );
}

#[test]
fn the_model_refuses_history_beyond_4k_so_plain_deflate_at_large_pages_falls_back() {
    // At 64 KiB pages the IAA backend offers deflate-4k only: plain deflate goes to
    // software as unsupported, deflate-4k runs on the model.
    let choice = BackendChoice::Iaa(IaaPortal::Model(ModelFaults::default()));
    let ps = PageSize::new(65536).expect("page size");
    let mut engine = Engine::build(
        &choice,
        EngineConfig {
            page_size: ps,
            max_pages: 4,
            requests: 4,
            buffers: 4,
            ..Default::default()
        },
        SoftwareConfig::default(),
    )
    .expect("engine");
    assert!(!engine.probe().can_encode(CodecId::DEFLATE, Level::DEFAULT));
    assert!(
        engine
            .probe()
            .can_encode(CodecId::DEFLATE_4K, Level::DEFAULT)
    );
    let page = content(Kind::Text, 16, 3);
    for (tag, codec) in [(1, CodecId::DEFLATE), (2, CodecId::DEFLATE_4K)] {
        let mut job = engine.job().expect("request");
        job.encode_buf(
            Tag(tag),
            EncodeParams::new(codec, Level::DEFAULT),
            EngineBuf::from_vec(page.clone()),
            PageKey(0),
        )
        .expect("pages");
        let c = run(&mut engine, VecDeque::from([job])).pop().expect("one");
        let want = if codec == CodecId::DEFLATE {
            Some(FallbackCause::Unsupported)
        } else {
            None
        };
        assert_eq!(c.fallback(), want);
        assert_eq!(c.encoded().map(|e| e.codec), Some(codec));
    }
}

/// Runs on a real IAA work queue when one is named; skipped visibly otherwise.
#[test]
fn real_iaa_work_queue_round_trips_when_present() {
    let choice = if let Ok(wq) = std::env::var("PAGEWIRE_IAA_WQ") {
        BackendChoice::Iaa(IaaPortal::Wq(Some(wq.into())))
    } else if let Ok(addr) = std::env::var("PAGEWIRE_IAA_VFIO") {
        BackendChoice::Iaa(IaaPortal::Vfio(addr))
    } else {
        // Written past the test harness's capture, so the skip is visible.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"skipped: no IAA work queue (set PAGEWIRE_IAA_WQ=/dev/iax/wqX.Y or PAGEWIRE_IAA_VFIO=PCI_ADDRESS)\n",
        );
        return;
    };
    let mut engine = Engine::build(
        &choice,
        EngineConfig {
            max_pages: 16,
            requests: 16,
            buffers: 32,
            ..Default::default()
        },
        SoftwareConfig::default(),
    )
    .expect("the named IAA opens");
    assert_eq!(engine.probe().backend, BackendKind::Iaa);
    let causes = encode_decode(&mut engine, CodecId::DEFLATE_4K);
    assert!(causes.iter().all(Option::is_none), "{causes:?}");
}
