//! The QAT backend's whole FFI path, run for real against the QAT stand-in: a shared
//! library built with this crate that exports qatlib's functions with qatlib's types
//! and runs each request in software (libdeflate). What it proves and what only a
//! device can: see `pagewire_accel::qat`.
//!
//! Each test loads a private copy of the stand-in, so their global states (started
//! runtime, injected failures, counters) do not mix.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::{Kind, PS, content};
use pagewire_accel::qat::standin::{Inject, StandIn};
use pagewire_accel::qat::{self, QatBackend, QatConfig, ffi};
use pagewire_accel::{
    BackendKind, Codecs, Completion, EncodeParams, Engine, EngineBuf, EngineConfig, EngineError,
    FallbackCause, Job, Level, PageKey, PageList, PageListMut, PageSize, Tag,
};
use pagewire_protocol::CodecId;

fn qat_config(s: &StandIn) -> QatConfig {
    let mut c = QatConfig::with_libraries(vec![s.path().into()]);
    c.queue_depth = 4;
    c.busy_timeout = Duration::from_millis(20);
    c.device_timeout = Duration::from_secs(2);
    c
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        max_pages: 32,
        requests: 32,
        buffers: 32,
        ..Default::default()
    }
}

fn qat_engine(s: &StandIn) -> Engine {
    let config = engine_config();
    let backend = QatBackend::new(qat_config(s), &config).expect("QAT backend on the stand-in");
    Engine::new(config, Box::new(backend)).expect("engine")
}

/// A frame of mixed content: text, zeros, random (does not shrink), sparse.
fn frame(seed: u64, pages: usize) -> Vec<u8> {
    let kinds = [Kind::Text, Kind::Zeros, Kind::Random, Kind::Mixed];
    (0..pages)
        .flat_map(|i| content(kinds[i % kinds.len()], 1, seed + i as u64))
        .collect()
}

/// One deflate encode job per frame.
fn encode_jobs(engine: &Engine, frames: &[Vec<u8>], level: Level) -> VecDeque<Job> {
    frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut job = engine.job().expect("free request");
            job.encode_buf(
                Tag(i as u64),
                EncodeParams::new(CodecId::DEFLATE, level),
                EngineBuf::from_vec(f.clone()),
                PageKey(0),
            )
            .expect("pages");
            job
        })
        .collect()
}

/// Submits what is left of `batch` and polls until every job completed; returns the
/// completions in tag order.
fn drain(engine: &mut Engine, mut batch: VecDeque<Job>, expected: usize) -> Vec<Completion> {
    let mut done = Vec::new();
    for _ in 0..100_000 {
        if batch.is_empty() && engine.in_flight() == 0 {
            break;
        }
        engine.submit(&mut batch).expect("submit");
        engine
            .poll(&mut done, 64, Some(Duration::from_millis(5)))
            .expect("poll");
    }
    assert_eq!(done.len(), expected, "every job completed");
    done.sort_by_key(|c| c.tag());
    done
}

/// Encodes every frame through `engine` (all submitted as one batch), returns the
/// completions in tag order.
fn encode_all(engine: &mut Engine, frames: &[Vec<u8>], level: Level) -> Vec<Completion> {
    let batch = encode_jobs(engine, frames, level);
    drain(engine, batch, frames.len())
}

/// Decodes a completion's payload with the software codecs and checks the pages.
fn software_decodes(c: &Completion, original: &[u8]) {
    let out = c.encoded().expect("encoded");
    let mut dst = vec![0xeeu8; original.len()];
    let mut list = PageListMut::with_capacity(PageSize::KIB4, 1);
    list.push_slice(&mut dst, PageKey(0)).expect("pages");
    Codecs::new()
        .decode(
            out.codec,
            c.payload().expect("payload"),
            c.lengths(),
            &mut list,
        )
        .expect("software decodes what QAT wrote");
    drop(list);
    assert!(dst == original, "pages differ after decoding");
}

#[test]
fn the_standin_compiles_the_same_struct_layouts() {
    let s = StandIn::private(1, false).expect("stand-in");
    use core::mem::size_of;
    assert_eq!(
        s.layout(),
        [
            size_of::<ffi::CpaFlatBuffer>() as u64,
            size_of::<ffi::CpaBufferList>() as u64,
            size_of::<ffi::CpaDcSessionSetupData>() as u64,
            size_of::<ffi::CpaDcRqResults>() as u64,
            size_of::<ffi::CpaDcOpData>() as u64,
            size_of::<ffi::CpaInstanceInfo2>() as u64,
        ]
    );
}

#[test]
fn discovery_lists_and_starts_instances_and_everything_is_released() {
    let s = StandIn::private(3, false).expect("stand-in");
    let p = qat::probe(&[s.path().into()]).expect("probe");
    assert_eq!(p.instances, ["standin-dc0", "standin-dc1", "standin-dc2"]);
    assert!(p.skipped.is_empty());
    assert_eq!(s.counters().starts, 3);
    // The probe's runtime is gone: sessions removed, pinned memory freed.
    let c = s.counters();
    assert_eq!((c.live_sessions, c.live_allocations), (0, 0), "{c:?}");
    {
        let mut engine = qat_engine(&s);
        let frames: Vec<_> = (0..6).map(|i| frame(i, 8)).collect();
        let done = encode_all(&mut engine, &frames, Level(1));
        assert!(done.iter().all(|c| c.backend() == BackendKind::Qat));
        let c = s.counters();
        assert!(c.live_sessions == 1 && c.live_allocations >= 2, "{c:?}");
    }
    let c = s.counters();
    assert_eq!((c.live_sessions, c.live_allocations), (0, 0), "{c:?}");
    assert_eq!(c.submitted, c.completed);
}

#[test]
fn without_svm_or_without_qatlib_qat_is_unavailable_and_says_why() {
    let s = StandIn::private(2, true).expect("stand-in");
    let why = qat::probe(&[s.path().into()]).expect_err("no usable instance");
    assert!(why.contains("physically contiguous"), "{why}");
    let missing = QatConfig::with_libraries(vec!["/nonexistent/libqat.so.4".into()]);
    match QatBackend::new(missing, &engine_config()) {
        Err(EngineError::Unavailable {
            backend: BackendKind::Qat,
            reason,
        }) => assert!(reason.contains("/nonexistent/libqat.so.4"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let none = StandIn::private(0, false).expect("stand-in");
    let why = qat::probe(&[none.path().into()]).expect_err("no instance");
    assert!(why.contains("no data compression instance"), "{why}");
}

#[test]
fn batches_compress_on_the_device_into_the_software_format_and_back() {
    let s = StandIn::private(1, false).expect("stand-in");
    let mut engine = qat_engine(&s);
    let frames: Vec<_> = (0..24)
        .map(|i| frame(100 + i, 1 + (i as usize % 32)))
        .collect();
    for level in [Level(1), Level::DEFAULT, Level(9)] {
        let done = encode_all(&mut engine, &frames, level);
        for (c, f) in done.iter().zip(&frames) {
            assert_eq!(c.backend(), BackendKind::Qat);
            assert_eq!(c.fallback(), None);
            software_decodes(c, f);
        }
    }
    // Random pages overflowed their `page_size - 1` output and went raw: a frame of
    // random pages only is a raw frame.
    let random: Vec<u8> = content(Kind::Random, 4, 9);
    let done = encode_all(&mut engine, std::slice::from_ref(&random), Level(1));
    assert_eq!(done[0].encoded().map(|e| e.codec), Some(CodecId::RAW));
    software_decodes(&done[0], &random);
    let st = engine.stats();
    assert_eq!(st.hw_fallbacks, 0);
    // Verify is on by default: the device checked every compression it returned.
    assert!(s.counters().verified > 0);
    let c = s.counters();
    assert_eq!(c.submitted, c.completed);
}

/// Decodes `payload` through the engine into a fresh buffer.
fn decode(
    engine: &mut Engine,
    codec: CodecId,
    payload: &[u8],
    lengths: &[u32],
    pages: usize,
) -> (Completion, Vec<u8>) {
    let mut job = engine.job().expect("free request");
    job.decode_buf(
        Tag(1),
        codec,
        EngineBuf::from_vec(payload.to_vec()),
        lengths,
        EngineBuf::from_vec(vec![0xee; pages * PS]),
        PageKey(0),
    )
    .expect("dest");
    let mut batch = VecDeque::from([job]);
    let mut done = Vec::new();
    for _ in 0..10_000 {
        if !batch.is_empty() {
            engine.submit(&mut batch).expect("submit");
        }
        engine
            .poll(&mut done, 1, Some(Duration::from_millis(5)))
            .expect("poll");
        if !done.is_empty() {
            break;
        }
    }
    let mut c = done.pop().expect("completed");
    let out = c.take_dest().expect("dest").to_vec();
    (c, out)
}

#[test]
fn the_device_decodes_what_the_software_codecs_write() {
    let s = StandIn::private(1, false).expect("stand-in");
    let mut engine = qat_engine(&s);
    let input = frame(7, 16);
    let mut codecs = Codecs::new();
    let mut payload = vec![0u8; input.len() * 2];
    let mut lengths = Vec::new();
    let mut list = PageList::with_capacity(PageSize::KIB4, 1);
    list.push_slice(&input, PageKey(0)).expect("pages");
    let out = codecs
        .encode(
            &EncodeParams::new(CodecId::DEFLATE, Level(6)),
            &list,
            None,
            &mut payload,
            &mut lengths,
        )
        .expect("software encode");
    assert_eq!(out.codec, CodecId::DEFLATE);
    let payload = &payload[..out.payload_len];
    let (c, pages) = decode(&mut engine, CodecId::DEFLATE, payload, &lengths, 16);
    assert_eq!(c.status(), Ok(()));
    assert_eq!((c.backend(), c.fallback()), (BackendKind::Qat, None));
    assert!(pages == input, "decoded pages differ");
    // A corrupt stream: the device refuses it, software redoes the job and reports it
    // as corrupt (counted as a fallback, since only software can tell a bad stream
    // from a device error).
    let mut bad = payload.to_vec();
    bad[0] ^= 0xff;
    bad[1] ^= 0x55;
    let (c, _) = decode(&mut engine, CodecId::DEFLATE, &bad, &lengths, 16);
    assert!(c.status().is_err(), "{c:?}");
    // A table that does not add up is refused before anything reaches the device.
    let submitted = s.counters().submitted;
    let mut short = lengths.clone();
    short[0] += 1;
    let (c, _) = decode(&mut engine, CodecId::DEFLATE, payload, &short, 16);
    assert!(
        matches!(c.status(), Err(pagewire_accel::CodecError::TableSum { .. })),
        "{c:?}"
    );
    assert_eq!(s.counters().submitted, submitted);
}

#[test]
fn a_busy_instance_is_retried_then_given_up_on_as_queue_full() {
    let s = StandIn::private(1, false).expect("stand-in");
    let mut engine = qat_engine(&s);
    let frames: Vec<_> = (0..8).map(|i| frame(300 + i, 8)).collect();
    // A few retries: every job still runs on the device.
    s.inject(Inject::Busy(5));
    let done = encode_all(&mut engine, &frames, Level(1));
    assert!(
        done.iter()
            .all(|c| c.backend() == BackendKind::Qat && c.fallback().is_none())
    );
    assert!(s.counters().retries >= 5);
    for (c, f) in done.iter().zip(&frames) {
        software_decodes(c, f);
    }
    drop(done);
    // Busy for good: after `busy_timeout` the jobs go to software, counted.
    s.inject(Inject::Busy(u32::MAX));
    let done = encode_all(&mut engine, &frames, Level(1));
    for (c, f) in done.iter().zip(&frames) {
        assert_eq!(c.backend(), BackendKind::Software);
        assert_eq!(c.fallback(), Some(FallbackCause::QueueFull));
        software_decodes(c, f);
    }
    let st = engine.stats();
    assert_eq!(st.hw_fallbacks, frames.len() as u64);
    assert_eq!(
        st.fallback_causes.of(FallbackCause::QueueFull),
        frames.len() as u64
    );
}

#[test]
fn a_restarting_device_fails_one_job_and_a_lost_one_fails_them_all_to_software() {
    let s = StandIn::private(1, false).expect("stand-in");
    let mut engine = qat_engine(&s);
    let frames: Vec<_> = (0..6).map(|i| frame(500 + i, 8)).collect();
    s.inject(Inject::Restarting(1));
    let done = encode_all(&mut engine, &frames, Level(1));
    let errors = done
        .iter()
        .filter(|c| c.fallback() == Some(FallbackCause::DeviceError))
        .count();
    assert_eq!(errors, 1);
    assert!(
        done.iter()
            .filter(|c| c.backend() == BackendKind::Qat)
            .count()
            == frames.len() - 1
    );
    for (c, f) in done.iter().zip(&frames) {
        software_decodes(c, f);
    }
    drop(done);
    // Lost with requests in flight: submit, lose the device, then poll.
    let mut batch = encode_jobs(&engine, &frames, Level(1));
    engine.submit(&mut batch).expect("submit");
    s.inject(Inject::Lost);
    let done = drain(&mut engine, batch, frames.len());
    for (c, f) in done.iter().zip(&frames) {
        assert_eq!(c.fallback(), Some(FallbackCause::DeviceLost), "{c:?}");
        software_decodes(c, f);
    }
    let st = engine.stats();
    assert_eq!(
        st.fallback_causes.of(FallbackCause::DeviceLost),
        frames.len() as u64
    );
    assert_eq!(st.fallback_causes.of(FallbackCause::DeviceError), 1);
}

#[test]
fn a_failed_verification_sends_the_job_to_software_and_verify_can_be_off() {
    let s = StandIn::private(1, false).expect("stand-in");
    let mut engine = qat_engine(&s);
    let frames: Vec<_> = (0..4).map(|i| frame(700 + i, 4)).collect();
    s.inject(Inject::VerifyFails(1));
    let done = encode_all(&mut engine, &frames, Level(1));
    assert_eq!(
        done.iter()
            .filter(|c| c.fallback() == Some(FallbackCause::DeviceError))
            .count(),
        1
    );
    for (c, f) in done.iter().zip(&frames) {
        software_decodes(c, f);
    }
    drop((done, engine));
    let mut config = qat_config(&s);
    config.verify = false;
    let backend = QatBackend::new(config, &engine_config()).expect("backend");
    let mut engine = Engine::new(engine_config(), Box::new(backend)).expect("engine");
    let verified = s.counters().verified;
    let done = encode_all(&mut engine, &frames, Level(1));
    assert!(done.iter().all(|c| c.backend() == BackendKind::Qat));
    assert_eq!(
        s.counters().verified,
        verified,
        "verify off: the device was not asked"
    );
}

#[test]
fn engines_on_several_threads_share_instances() {
    let s = StandIn::private(2, false).expect("stand-in");
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let s = &s;
            scope.spawn(move || {
                let mut engine = qat_engine(s);
                let frames: Vec<_> = (0..12)
                    .map(|i| frame(1000 * t + i, 1 + i as usize))
                    .collect();
                let done = encode_all(&mut engine, &frames, Level(1));
                for (c, f) in done.iter().zip(&frames) {
                    assert_eq!(c.backend(), BackendKind::Qat);
                    software_decodes(c, f);
                }
            });
        }
    });
    let c = s.counters();
    assert_eq!(c.submitted, c.completed);
    assert_eq!((c.live_sessions, c.live_allocations), (0, 0), "{c:?}");
}
