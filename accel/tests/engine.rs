//! The engine's request model: tags, out-of-order completion, partial acceptance,
//! pool recycling, statistics, probing, and a second backend plugged in unchanged.

mod common;

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use common::{Kind, PS, content};
use pagewire_accel::{
    Backend, BackendKind, CodecError, Codecs, Completion, EncodeParams, Engine, EngineBuf,
    EngineConfig, EngineError, FallbackCause, FormatCaps, Job, Level, PageKey, Probe,
    SoftwareConfig, Tag,
};
use pagewire_protocol::CodecId;

const WAIT: Option<Duration> = Some(Duration::from_millis(200));

fn encode_job(engine: &Engine, tag: u64, codec: CodecId, pages: &[u8]) -> Job {
    let mut job = engine.job().expect("free request");
    job.encode_buf(
        Tag(tag),
        EncodeParams::new(codec, Level::DEFAULT),
        EngineBuf::from_vec(pages.to_vec()),
        PageKey(tag * 64),
    )
    .expect("whole pages");
    job
}

fn drain(engine: &mut Engine, want: usize) -> Vec<Completion> {
    let mut done = Vec::new();
    let mut idle = 0;
    while done.len() < want {
        let room = want - done.len();
        if engine.poll(&mut done, room, WAIT).expect("poll") == 0 {
            idle += 1;
            assert!(
                idle < 50,
                "completions stopped arriving ({} of {want})",
                done.len()
            );
        }
    }
    done
}

#[test]
fn every_tag_completes_once_across_worker_threads() {
    let config = EngineConfig {
        max_pages: 32,
        requests: 48,
        buffers: 48,
        ..Default::default()
    };
    let mut engine = Engine::software(
        config,
        SoftwareConfig {
            threads: 2,
            queue_depth: 16,
        },
    )
    .expect("engine");
    let kinds = [
        Kind::Text,
        Kind::Random,
        Kind::Zeros,
        Kind::Code,
        Kind::Mixed,
    ];
    let inputs: Vec<Vec<u8>> = (0..40)
        .map(|i| content(kinds[i % kinds.len()], 1 + i % 32, i as u64))
        .collect();
    let mut batch: VecDeque<Job> = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| encode_job(&engine, i as u64, CodecId::ZSTD, p))
        .collect();
    let mut done = Vec::new();
    let mut rounds = 0;
    while !batch.is_empty() {
        engine.submit(&mut batch).expect("submit");
        engine.poll(&mut done, usize::MAX, WAIT).expect("poll");
        rounds += 1;
        assert!(rounds < 1000);
    }
    let rest = 40 - done.len();
    done.extend(drain(&mut engine, rest));
    let tags: HashSet<u64> = done.iter().map(|c| c.tag().0).collect();
    assert_eq!(tags.len(), 40);
    let mut codecs = Codecs::new();
    for c in &done {
        assert_eq!(c.backend(), BackendKind::Software);
        let out = c.encoded().expect("encoded");
        let input = &inputs[c.tag().0 as usize];
        let mut back = vec![0u8; input.len()];
        let mut dst = pagewire_accel::PageListMut::new(pagewire_accel::PageSize::KIB4);
        dst.push_slice(&mut back, PageKey(0)).expect("pages");
        codecs
            .decode(
                out.codec,
                c.payload().expect("payload"),
                c.lengths(),
                &mut dst,
            )
            .expect("decode");
        drop(dst);
        assert!(&back == input, "tag {:?}", c.tag());
    }
    let stats = engine.stats();
    assert_eq!((stats.submitted, stats.completed), (40, 40));
    let z = stats.encode_of(CodecId::ZSTD).expect("zstd stats");
    assert_eq!(z.jobs, 40);
    assert!(
        z.raw_fallbacks >= 8,
        "the random frames fell back: {}",
        z.raw_fallbacks
    );
    assert!(z.ratio().expect("ratio") > 1.0);
    assert!(stats.max_queue_depth >= 1 && stats.max_queue_depth <= 16);
    assert!(stats.busy_rate() > 0.0 && stats.busy_rate() <= 1.0);
    assert_eq!(stats.by_backend[0], (BackendKind::Software, 40));
    assert_eq!(stats.queue_depth, 0);
}

#[test]
fn a_full_queue_accepts_part_of_a_batch() {
    let config = EngineConfig {
        requests: 8,
        buffers: 8,
        ..Default::default()
    };
    let mut engine = Engine::software(
        config,
        SoftwareConfig {
            threads: 0,
            queue_depth: 2,
        },
    )
    .expect("engine");
    let page = content(Kind::Text, 1, 0);
    let mut batch: VecDeque<Job> = (0..5)
        .map(|i| encode_job(&engine, i, CodecId::LZ4, &page))
        .collect();
    assert_eq!(engine.submit(&mut batch).expect("submit"), 2);
    assert_eq!(
        batch.iter().map(Job::tag).collect::<Vec<_>>(),
        vec![Tag(2), Tag(3), Tag(4)]
    );
    assert_eq!(engine.submit(&mut batch).expect("submit"), 0, "still full");
    let done = drain(&mut engine, 2);
    assert_eq!(
        done.iter().map(Completion::tag).collect::<Vec<_>>(),
        vec![Tag(0), Tag(1)]
    );
    assert_eq!(engine.submit(&mut batch).expect("submit"), 2);
    assert_eq!(engine.stats().partial_submits, 3);
}

#[test]
fn buffers_return_only_when_every_user_is_done() {
    let config = EngineConfig {
        requests: 4,
        buffers: 1,
        ..Default::default()
    };
    let mut engine = Engine::software(config, SoftwareConfig::default()).expect("engine");
    let page = content(Kind::Text, 2, 0);
    let mut batch: VecDeque<Job> = (0..2)
        .map(|i| encode_job(&engine, i, CodecId::ZSTD, &page))
        .collect();
    assert_eq!(
        engine.submit(&mut batch).expect("submit"),
        1,
        "one output buffer"
    );
    let mut done = drain(&mut engine, 1);
    let mut c = done.pop().expect("completion");
    // The transport takes the payload; the completion is consumed.
    let in_transport = c.take_payload().expect("payload");
    let retransmit_copy = in_transport.clone();
    drop(c);
    assert_eq!(engine.buffers().available(), 0);
    assert_eq!(
        engine.submit(&mut batch).expect("submit"),
        0,
        "buffer still in use"
    );
    drop(in_transport);
    assert_eq!(engine.buffers().available(), 0, "a clone still holds it");
    drop(retransmit_copy);
    assert_eq!(engine.buffers().available(), 1);
    assert_eq!(engine.submit(&mut batch).expect("submit"), 1);
    drain(&mut engine, 1);
}

#[test]
fn requests_are_recycled() {
    let config = EngineConfig {
        requests: 2,
        buffers: 4,
        ..Default::default()
    };
    let mut engine = Engine::software(config, SoftwareConfig::default()).expect("engine");
    let page = content(Kind::Code, 1, 0);
    let a = encode_job(&engine, 1, CodecId::DEFLATE, &page);
    let b = encode_job(&engine, 2, CodecId::DEFLATE, &page);
    assert!(engine.job().is_none(), "both requests in use");
    drop(b); // an unsubmitted job goes back too
    let b = engine.job().expect("recycled");
    drop(b);
    let mut batch = VecDeque::from([a]);
    engine.submit(&mut batch).expect("submit");
    assert!(engine.job().is_some());
    let done = drain(&mut engine, 1);
    assert!(engine.job().is_some());
    drop(done);
    let j1 = engine.job().expect("1");
    let j2 = engine.job().expect("2");
    assert!(engine.job().is_none());
    drop((j1, j2));
}

/// Submits `job`, polls its completion and checks that it succeeded.
fn run_one(engine: &mut Engine, job: Job) -> Completion {
    let mut batch = VecDeque::from([job]);
    assert_eq!(engine.submit(&mut batch).expect("submit"), 1);
    let c = drain(engine, 1).pop().expect("completion");
    c.status().expect("job succeeded");
    c
}

#[test]
fn recycled_completions_keep_their_request_and_unused_buffer_with_the_engine() {
    let config = EngineConfig {
        max_pages: 4,
        requests: 1,
        buffers: 2,
        ..Default::default()
    };
    let mut engine = Engine::software(config, SoftwareConfig::default()).expect("engine");
    let pool = engine.buffers().clone();
    let page = content(Kind::Text, 1, 0);
    let decoded = |c: &Completion| {
        let mut out = vec![0u8; PS];
        let mut codecs = Codecs::new();
        let mut list = pagewire_accel::PageListMut::new(pagewire_accel::PageSize::KIB4);
        list.push_slice(&mut out, PageKey(0)).expect("one page");
        codecs
            .decode(
                CodecId::LZ4,
                c.payload().expect("payload"),
                c.lengths(),
                &mut list,
            )
            .expect("decodes");
        out
    };
    for round in 0..4u64 {
        let c = {
            let job = encode_job(&engine, round, CodecId::LZ4, &page);
            run_one(&mut engine, job)
        };
        assert_eq!(c.encoded().map(|e| e.codec), Some(CodecId::LZ4));
        assert_eq!(
            decoded(&c),
            page,
            "round {round}: a reused buffer holds this frame"
        );
        assert_eq!(pool.available(), 1, "one buffer out, with the job");
        engine.recycle(c);
        // The only request is free again, and the buffer stays with the engine.
        assert_eq!(
            pool.available(),
            1,
            "round {round}: the buffer is the engine's spare"
        );
        drop(engine.job().expect("the recycled request"));
    }
    // A payload the caller took is the caller's; its buffer goes back to the pool only
    // when the caller's handles drop.
    let mut c = {
        let job = encode_job(&engine, 9, CodecId::LZ4, &page);
        run_one(&mut engine, job)
    };
    let sent = c.take_payload().expect("payload");
    engine.recycle(c);
    assert_eq!(
        pool.available(),
        1,
        "the engine keeps no buffer of a taken payload"
    );
    drop(sent);
    assert_eq!(pool.available(), 2);
    // A payload still shared is not kept either.
    let c = {
        let job = encode_job(&engine, 10, CodecId::LZ4, &page);
        run_one(&mut engine, job)
    };
    let copy = c.payload().expect("payload").clone();
    engine.recycle(c);
    assert_eq!(pool.available(), 1, "the copy holds it");
    drop(copy);
    assert_eq!(pool.available(), 2, "back to the pool, not to the engine");
    // A decode's payload is the caller's, even when it is one of the engine's buffers.
    let mut encoded = {
        let job = encode_job(&engine, 11, CodecId::LZ4, &page);
        run_one(&mut engine, job)
    };
    let payload = encoded.take_payload().expect("payload");
    let lengths = encoded.lengths().to_vec();
    engine.recycle(encoded);
    let mut job = engine.job().expect("request");
    job.decode_buf(
        Tag(12),
        CodecId::LZ4,
        payload,
        &lengths,
        EngineBuf::from_vec(vec![0u8; PS]),
        PageKey(0),
    )
    .expect("decode job");
    let mut c = run_one(&mut engine, job);
    assert_eq!(&c.take_dest().expect("dest")[..], &page[..]);
    engine.recycle(c);
    assert_eq!(
        pool.available(),
        2,
        "a decode's payload went back to the pool"
    );
    // The input an encode kept alive is released when it is recycled.
    let input = EngineBuf::from_vec(page.clone());
    let mut job = engine.job().expect("request");
    job.encode_buf(
        Tag(13),
        EncodeParams::new(CodecId::LZ4, Level::DEFAULT),
        input.clone(),
        PageKey(0),
    )
    .expect("job");
    let c = run_one(&mut engine, job);
    assert!(!input.is_unique(), "the job holds its input");
    engine.recycle(c);
    assert!(input.is_unique(), "recycling released it");
    // Spare buffers go back to the pool with the engine.
    assert_eq!(pool.available(), 1);
    drop(engine);
    assert_eq!(pool.available(), 2);
}

#[test]
fn a_completion_recycled_into_another_engine_goes_back_to_its_own() {
    let config = EngineConfig {
        max_pages: 4,
        requests: 1,
        buffers: 1,
        ..Default::default()
    };
    let mut a = Engine::software(config.clone(), SoftwareConfig::default()).expect("engine");
    let mut b = Engine::software(config, SoftwareConfig::default()).expect("engine");
    let page = content(Kind::Text, 1, 0);
    let job = encode_job(&a, 1, CodecId::LZ4, &page);
    let c = run_one(&mut a, job);
    assert!(a.job().is_none(), "a's only request is out");
    b.recycle(c);
    assert_eq!(
        a.buffers().available(),
        1,
        "its buffer went back to a's pool"
    );
    let mine = a.job().expect("its request went back to a");
    let theirs = b.job().expect("b's own request");
    assert!(b.job().is_none(), "b kept nothing of a's");
    drop((mine, theirs));
}

#[test]
fn recycled_requests_and_buffers_serve_the_next_jobs_of_a_full_engine() {
    // Every request and buffer goes through `recycle` many times over: none is lost
    // or handed out twice.
    let config = EngineConfig {
        max_pages: 2,
        requests: 3,
        buffers: 3,
        ..Default::default()
    };
    let mut engine = Engine::software(
        config,
        SoftwareConfig {
            threads: 1,
            queue_depth: 3,
        },
    )
    .expect("engine");
    let pool = engine.buffers().clone();
    let page = content(Kind::Code, 2, 0);
    let mut seen = HashSet::new();
    for round in 0..50u64 {
        let mut batch: VecDeque<Job> = (0..3)
            .map(|i| encode_job(&engine, round * 3 + i, CodecId::DEFLATE, &page))
            .collect();
        assert!(
            engine.job().is_none(),
            "round {round}: all three requests in use"
        );
        assert_eq!(engine.submit(&mut batch).expect("submit"), 3);
        for c in drain(&mut engine, 3) {
            assert!(seen.insert(c.tag()), "a tag completed twice");
            assert!(c.encoded().is_some_and(|e| e.bytes_in == 2 * PS));
            engine.recycle(c);
        }
        assert_eq!(
            pool.available(),
            0,
            "round {round}: all three spare with the engine"
        );
    }
    assert_eq!(seen.len(), 150);
}

#[test]
fn jobs_the_backend_cannot_run_complete_with_errors() {
    let mut engine = Engine::software(
        EngineConfig {
            max_pages: 4,
            ..Default::default()
        },
        SoftwareConfig::default(),
    )
    .expect("engine");
    let probe = engine.probe().clone();
    assert_eq!(probe.backend, BackendKind::Software);
    for codec in [
        CodecId::RAW,
        CodecId::ZERO,
        CodecId::ZSTD,
        CodecId::LZ4,
        CodecId::DEFLATE,
        CodecId::DELTA,
    ] {
        assert!(probe.can_decode(codec), "{codec}");
    }
    assert!(
        probe.can_encode(CodecId::ZSTD, Level(-7)) && probe.can_encode(CodecId::ZSTD, Level(22))
    );
    assert!(!probe.can_encode(CodecId::DEFLATE, Level(13)));
    assert!(
        !probe.can_encode(CodecId::DELTA, Level::DEFAULT),
        "no delta cache configured"
    );
    assert!(!probe.delta_cache);

    let page = content(Kind::Text, 1, 0);
    let mut batch = VecDeque::new();
    batch.push_back(encode_job(&engine, 1, CodecId(0x99), &page));
    batch.push_back(encode_job(&engine, 2, CodecId::DELTA, &page));
    let mut j = engine.job().expect("job");
    j.encode_buf(
        Tag(3),
        EncodeParams::new(CodecId::ZSTD, Level(99)),
        EngineBuf::from_vec(page.clone()),
        PageKey(0),
    )
    .expect("pages");
    batch.push_back(j);
    batch.push_back(encode_job(
        &engine,
        4,
        CodecId::LZ4,
        &content(Kind::Text, 5, 0),
    ));
    batch.push_back(encode_job(&engine, 5, CodecId::LZ4, &page));
    assert_eq!(engine.submit(&mut batch).expect("submit"), 5);
    let mut done = drain(&mut engine, 5);
    done.sort_by_key(Completion::tag);
    assert!(matches!(
        done[0].status(),
        Err(CodecError::Unsupported(CodecId(0x99)))
    ));
    assert!(matches!(done[1].status(), Err(CodecError::NoDeltaCache)));
    assert!(matches!(done[2].status(), Err(CodecError::BadLevel { .. })));
    assert!(matches!(
        done[3].status(),
        Err(CodecError::TooManyPages { pages: 5, max: 4 })
    ));
    assert!(done[4].status().is_ok());
    let stats = engine.stats();
    assert_eq!(stats.rejected, 4);
    assert_eq!(stats.submitted, 1);
}

#[test]
fn decode_jobs_write_the_destination_and_count_bytes() {
    let mut engine = Engine::software(
        EngineConfig::default(),
        SoftwareConfig {
            threads: 1,
            queue_depth: 4,
        },
    )
    .expect("engine");
    let input = content(Kind::Mixed, 6, 1);
    let mut batch = VecDeque::from([encode_job(&engine, 1, CodecId::DEFLATE, &input)]);
    engine.submit(&mut batch).expect("submit");
    let mut c = drain(&mut engine, 1).pop().expect("completion");
    let out = c.encoded().expect("encoded");
    let payload = c.take_payload().expect("payload");
    let lengths = c.lengths().to_vec();
    drop(c);
    let mut job = engine.job().expect("job");
    job.decode_buf(
        Tag(2),
        out.codec,
        payload,
        &lengths,
        EngineBuf::from_vec(vec![0; input.len()]),
        PageKey(0),
    )
    .expect("dest");
    let mut batch = VecDeque::from([job]);
    engine.submit(&mut batch).expect("submit");
    let mut c = drain(&mut engine, 1).pop().expect("completion");
    c.status().expect("decoded");
    assert!(c.take_dest().expect("dest")[..] == input[..]);
    drop(c);
    // A pool buffer as destination: its valid length sets the page count.
    let mut dest = engine.buffers().take().expect("free buffer");
    assert!(dest.set_len(input.len()));
    let shared = dest.clone();
    let mut job = engine.job().expect("job");
    let payload = EngineBuf::from_vec(input.clone());
    assert!(matches!(
        job.decode_buf(
            Tag(3),
            CodecId::RAW,
            payload.clone(),
            &[],
            shared,
            PageKey(0)
        ),
        Err(EngineError::Job(_))
    ));
    let mut odd = EngineBuf::from_vec(vec![0; PS + 1]);
    assert!(odd.set_len(PS + 1));
    assert!(matches!(
        job.decode_buf(Tag(3), CodecId::RAW, payload.clone(), &[], odd, PageKey(0)),
        Err(EngineError::Pages(_))
    ));
    job.decode_buf(Tag(3), CodecId::RAW, payload, &[], dest, PageKey(0))
        .expect("dest");
    let mut batch = VecDeque::from([job]);
    engine.submit(&mut batch).expect("submit");
    let mut c = drain(&mut engine, 1).pop().expect("completion");
    c.status().expect("decoded");
    assert!(c.take_dest().expect("dest")[..] == input[..]);
    let stats = engine.stats();
    let d = stats
        .decode_of(CodecId::DEFLATE)
        .expect("deflate decode stats");
    assert_eq!((d.jobs, d.pages, d.bytes_in), (1, 6, 6 * PS as u64));
    assert_eq!(d.bytes_out, out.payload_len as u64);
}

/// A stand-in for a hardware queue (a test double, not a device model of IAA or QAT):
/// accepts one job per submit, finishes them in reverse order, and reports itself as
/// QAT. It shows a second backend plugs into the engine unchanged.
struct ReversingQueue {
    codecs: Codecs,
    held: Vec<Job>,
}

impl Backend for ReversingQueue {
    fn kind(&self) -> BackendKind {
        BackendKind::Qat
    }
    fn probe(&self) -> Probe {
        Probe {
            backend: BackendKind::Qat,
            formats: vec![FormatCaps::both(CodecId::DEFLATE, Level(0), Level(9))],
            max_job_pages: 8,
            max_job_bytes: 8 * PS,
            queue_depth: 3,
            delta_cache: false,
        }
    }
    fn submit(&mut self, jobs: &mut VecDeque<Job>) -> Result<usize, EngineError> {
        if self.held.len() >= 3 {
            return Ok(0);
        }
        match jobs.pop_front() {
            Some(job) => {
                self.held.push(job);
                Ok(1)
            }
            None => Ok(0),
        }
    }
    fn poll(
        &mut self,
        done: &mut Vec<Completion>,
        max: usize,
        _timeout: Option<Duration>,
    ) -> Result<usize, EngineError> {
        let mut n = 0;
        while n < max {
            let Some(mut job) = self.held.pop() else {
                break;
            };
            job.run_software(&mut self.codecs, None);
            done.push(job.complete(BackendKind::Qat));
            n += 1;
        }
        Ok(n)
    }
    fn in_flight(&self) -> usize {
        self.held.len()
    }
}

#[test]
fn another_backend_plugs_in_and_completes_out_of_order() {
    let backend = Box::new(ReversingQueue {
        codecs: Codecs::new(),
        held: Vec::new(),
    });
    let mut engine = Engine::new(
        EngineConfig {
            max_pages: 16,
            ..Default::default()
        },
        backend,
    )
    .expect("engine");
    assert_eq!(engine.probe().max_job_pages, 8);
    let page = content(Kind::Text, 2, 0);
    let mut batch: VecDeque<Job> = (0..3)
        .map(|i| encode_job(&engine, i, CodecId::DEFLATE, &page))
        .collect();
    batch.push_back(encode_job(&engine, 9, CodecId::ZSTD, &page));
    let mut accepted = 0;
    while !batch.is_empty() {
        accepted += engine.submit(&mut batch).expect("submit");
    }
    assert_eq!(accepted, 4);
    let done = drain(&mut engine, 4);
    let tags: Vec<u64> = done.iter().map(|c| c.tag().0).collect();
    assert_eq!(
        tags,
        vec![9, 2, 1, 0],
        "the software fallback first, then the device's reverse order"
    );
    // zstd is not in the device's probe: the engine ran it on software, counted.
    assert_eq!(done[0].backend(), BackendKind::Software);
    assert_eq!(done[0].fallback(), Some(FallbackCause::Unsupported));
    assert_eq!(done[0].encoded().map(|e| e.codec), Some(CodecId::ZSTD));
    for c in &done[1..] {
        assert_eq!(c.backend(), BackendKind::Qat);
        assert_eq!(c.fallback(), None);
        assert_eq!(c.encoded().map(|e| e.codec), Some(CodecId::DEFLATE));
    }
    let stats = engine.stats();
    assert!(stats.by_backend.contains(&(BackendKind::Qat, 3)));
    assert!(stats.by_backend.contains(&(BackendKind::Software, 1)));
    assert_eq!(stats.hw_fallbacks, 1);
    assert_eq!(stats.fallback_causes.of(FallbackCause::Unsupported), 1);
    assert_eq!(stats.rejected, 0);
}

#[test]
fn delta_through_the_engine_counts_cache_hits() {
    let cache = common::delta_cache();
    let config = EngineConfig {
        delta: Some(cache.clone()),
        ..Default::default()
    };
    let mut engine = Engine::software(
        config,
        SoftwareConfig {
            threads: 2,
            queue_depth: 8,
        },
    )
    .expect("engine");
    assert!(engine.probe().can_encode(CodecId::DELTA, Level::DEFAULT));
    let mut v = content(Kind::Code, 4, 2);
    for round in 0..3 {
        let mut batch = VecDeque::from([encode_job(&engine, 0, CodecId::DELTA, &v)]);
        engine.submit(&mut batch).expect("submit");
        let c = drain(&mut engine, 1).pop().expect("completion");
        let out = c.encoded().expect("encoded");
        assert_eq!(
            out.codec,
            if round == 0 {
                CodecId::RAW
            } else {
                CodecId::DELTA
            }
        );
        v[round * 10] ^= 0x40;
    }
    let stats = engine.stats();
    let d = stats.delta.expect("delta stats");
    assert_eq!((d.misses, d.hits, d.overflows), (4, 8, 0));
    let e = stats.encode_of(CodecId::DELTA).expect("delta");
    assert_eq!((e.jobs, e.raw_fallbacks), (3, 1));
}

#[test]
fn bad_configurations_are_refused() {
    assert!(matches!(
        Engine::software(
            EngineConfig {
                max_pages: 0,
                ..Default::default()
            },
            SoftwareConfig::default()
        ),
        Err(EngineError::Config(_))
    ));
    assert!(matches!(
        Engine::software(
            EngineConfig::default(),
            SoftwareConfig {
                threads: 1,
                queue_depth: 0
            }
        ),
        Err(EngineError::Config(_))
    ));
}

#[test]
fn concurrent_delta_frames_on_worker_threads_stay_consistent() {
    let cache = common::delta_cache();
    let config = EngineConfig {
        max_pages: 8,
        requests: 32,
        buffers: 32,
        delta: Some(cache.clone()),
        ..Default::default()
    };
    let mut engine = Engine::software(
        config,
        SoftwareConfig {
            threads: 2,
            queue_depth: 16,
        },
    )
    .expect("engine");
    let frames = 16usize;
    let mut sender = content(Kind::Mixed, frames * 8, 21);
    let mut receiver = vec![0u8; sender.len()];
    let mut rng = common::Rng::new(9);
    let mut codecs = Codecs::new();
    for round in 0..4 {
        if round > 0 {
            for _ in 0..200 {
                let i = rng.below(sender.len());
                sender[i] = sender[i].wrapping_add(1);
            }
        }
        let mut batch = VecDeque::new();
        for f in 0..frames {
            let bytes = &sender[f * 8 * PS..(f + 1) * 8 * PS];
            batch.push_back(encode_job_keyed(&engine, f as u64, bytes, (f * 8) as u64));
        }
        let mut done = Vec::new();
        while !batch.is_empty() {
            engine.submit(&mut batch).expect("submit");
            engine.poll(&mut done, usize::MAX, WAIT).expect("poll");
        }
        let rest = frames - done.len();
        done.extend(drain(&mut engine, rest));
        for c in &done {
            let f = c.tag().0 as usize;
            let out = c.encoded().expect("encoded");
            let mut dst = pagewire_accel::PageListMut::new(pagewire_accel::PageSize::KIB4);
            dst.push_slice(&mut receiver[f * 8 * PS..(f + 1) * 8 * PS], PageKey(0))
                .expect("pages");
            codecs
                .decode(
                    out.codec,
                    c.payload().expect("payload"),
                    c.lengths(),
                    &mut dst,
                )
                .expect("apply");
        }
        assert!(
            receiver == sender,
            "round {round}: receiver differs from sender"
        );
    }
    let d = cache.stats();
    assert_eq!(d.misses, (frames * 8) as u64);
    assert_eq!(d.hits + d.overflows, 3 * (frames * 8) as u64);
}

fn encode_job_keyed(engine: &Engine, tag: u64, pages: &[u8], key: u64) -> Job {
    let mut job = engine.job().expect("free request");
    job.encode_buf(
        Tag(tag),
        EncodeParams::new(CodecId::DELTA, Level::DEFAULT),
        EngineBuf::from_vec(pages.to_vec()),
        PageKey(key),
    )
    .expect("whole pages");
    job
}

/// Sizes a VMM could pass that cannot work are refused with `EngineError::Config`
/// before anything is allocated or opened: `buffers` of `usize::MAX` panicked in the
/// pool, and a hardware backend (here the IAA device model) sized its rings and
/// buffers from `max_pages` before the engine checked it (2^40 pages: an allocation
/// of tens of TiB, which aborts).
#[test]
fn sizes_that_cannot_work_are_refused_before_anything_is_allocated() {
    let refused = |r: Result<Engine, EngineError>, says: &str| match r {
        Err(EngineError::Config(what)) => assert!(what.contains(says), "{what}"),
        Err(e) => panic!("not a configuration error: {e}"),
        Ok(_) => panic!("an engine was built"),
    };
    let sw = SoftwareConfig::default();
    let cfg = |change: fn(&mut EngineConfig)| {
        let mut c = EngineConfig::default();
        change(&mut c);
        c
    };
    refused(
        Engine::software(cfg(|c| c.buffers = usize::MAX), sw),
        "buffers",
    );
    refused(
        Engine::software(cfg(|c| c.max_pages = 1 << 40), sw),
        "max_pages",
    );
    // 2 MiB pages: 65536 of them are 128 GiB a job.
    refused(
        Engine::software(
            cfg(|c| {
                c.page_size = pagewire_accel::PageSize::new(2 << 20).unwrap();
                c.max_pages = 65536;
            }),
            sw,
        ),
        "256 MiB",
    );
    let model = "model".parse::<pagewire_accel::BackendChoice>().unwrap();
    refused(
        Engine::build(&model, cfg(|c| c.max_pages = 1 << 40), sw),
        "max_pages",
    );
    refused(
        Engine::software(
            EngineConfig::default(),
            SoftwareConfig {
                threads: 0,
                queue_depth: usize::MAX,
            },
        ),
        "queue_depth",
    );
    refused(
        Engine::software(
            EngineConfig::default(),
            SoftwareConfig {
                threads: usize::MAX,
                queue_depth: 16,
            },
        ),
        "threads",
    );
}

/// Jobs an inline engine ran at once count as in flight until polled, so the loop the
/// crate documents (`while !batch.is_empty() || engine.in_flight() > 0`) collects
/// every completion even when more are ready than one poll takes.
#[test]
fn inline_completions_count_in_flight_until_polled() {
    let mut engine = Engine::software(
        EngineConfig {
            requests: 200,
            buffers: 200,
            ..Default::default()
        },
        SoftwareConfig {
            threads: 0,
            queue_depth: 256,
        },
    )
    .expect("engine");
    let page = content(Kind::Text, 1, 0);
    let mut batch: VecDeque<Job> = (0..150)
        .map(|i| encode_job(&engine, i, CodecId::LZ4, &page))
        .collect();
    let mut done = Vec::new();
    for _ in 0..1000 {
        if batch.is_empty() && engine.in_flight() == 0 {
            break;
        }
        engine.submit(&mut batch).expect("submit");
        assert!(engine.in_flight() <= 150);
        engine
            .poll(&mut done, 64, Some(Duration::from_millis(10)))
            .expect("poll");
    }
    assert_eq!(done.len(), 150);
    assert_eq!(engine.in_flight(), 0);
    let stats = engine.stats();
    assert_eq!((stats.submitted, stats.completed), (150, 150));
    // Run on the caller's thread, never queued: no depth, no busy time.
    assert_eq!((stats.max_queue_depth, stats.busy), (0, Duration::ZERO));
}

#[test]
fn encode_now_encodes_at_once_on_an_inline_engine_and_declines_otherwise() {
    let inline = SoftwareConfig {
        threads: 0,
        queue_depth: 8,
    };
    let config = EngineConfig {
        max_pages: 4,
        requests: 8,
        buffers: 2,
        ..Default::default()
    };
    let mut engine = Engine::software(config.clone(), inline).expect("engine");
    let pages = content(Kind::Text, 2, 0);
    let mut list = pagewire_accel::PageList::new(pagewire_accel::PageSize::KIB4);
    list.push_slice(&pages, PageKey(0)).expect("pages");
    let lz4 = EncodeParams::new(CodecId::LZ4, Level::DEFAULT);
    let mut lengths = vec![7];
    let mut codecs = Codecs::new();
    // Twice with the same parameters: the second finds them checked already.
    for _ in 0..2 {
        let (out, payload) = engine
            .encode_now(lz4, &list, &mut lengths)
            .expect("at once")
            .expect("encoded");
        assert_eq!(out.codec, CodecId::LZ4);
        assert_eq!(payload.len(), out.payload_len);
        let mut back = vec![0u8; pages.len()];
        let mut dst = pagewire_accel::PageListMut::new(pagewire_accel::PageSize::KIB4);
        dst.push_slice(&mut back, PageKey(0)).expect("pages");
        codecs
            .decode(CodecId::LZ4, &payload, &lengths, &mut dst)
            .expect("decodes");
        drop(dst);
        assert!(back == pages, "the pages round-trip");
        engine.recycle_buf(payload);
    }
    // Per-page formats fill the length table.
    let (out, payload) = engine
        .encode_now(
            EncodeParams::new(CodecId::DEFLATE, Level(1)),
            &list,
            &mut lengths,
        )
        .expect("at once")
        .expect("encoded");
    assert_eq!(lengths.len(), 2);
    assert_eq!(
        lengths.iter().map(|&l| l as usize).sum::<usize>(),
        out.payload_len
    );
    engine.recycle_buf(payload);
    // Checked parameters do not spare the page count its check.
    let five = content(Kind::Text, 5, 0);
    let mut big = pagewire_accel::PageList::new(pagewire_accel::PageSize::KIB4);
    big.push_slice(&five, PageKey(0)).expect("pages");
    assert!(matches!(
        engine.encode_now(lz4, &big, &mut lengths),
        Some(Err(CodecError::TooManyPages { pages: 5, max: 4 }))
    ));
    assert!(matches!(
        engine.encode_now(
            EncodeParams::new(CodecId::ZSTD, Level(99)),
            &list,
            &mut lengths
        ),
        Some(Err(CodecError::BadLevel { .. }))
    ));
    // A frame of another page size than the engine's, with parameters checked already.
    let mut huge = pagewire_accel::PageList::new(pagewire_accel::PageSize::MAX);
    let two_mib = vec![1u8; 2 << 20];
    huge.push_slice(&two_mib, PageKey(0)).expect("a page");
    assert!(matches!(
        engine.encode_now(lz4, &huge, &mut lengths),
        Some(Err(CodecError::PageSize {
            page_size: 2097152,
            expected: 4096,
            ..
        }))
    ));
    // A buffer of no pool, given back, is only dropped.
    engine.recycle_buf(EngineBuf::from_vec(vec![0u8; 64]));
    let stats = engine.stats();
    assert_eq!(
        (stats.submitted, stats.completed, stats.rejected),
        (3, 6, 3)
    );
    assert_eq!(stats.at_once, 3);
    assert_eq!(engine.in_flight(), 0);
    assert_eq!(stats.encode.iter().map(|c| c.jobs).sum::<u64>(), 3);

    // A completion waiting to be polled is not overtaken.
    let mut batch = VecDeque::from([encode_job(&engine, 5, CodecId::LZ4, &pages)]);
    assert_eq!(engine.submit(&mut batch).expect("submit"), 1);
    assert!(engine.encode_now(lz4, &list, &mut lengths).is_none());
    let mut first = drain(&mut engine, 1).pop().expect("one");
    // Both output buffers held by payloads on their way: declined.
    let held = first.take_payload().expect("payload");
    drop(first);
    let (_, held2) = engine
        .encode_now(lz4, &list, &mut lengths)
        .expect("a buffer is free")
        .expect("encoded");
    assert!(engine.encode_now(lz4, &list, &mut lengths).is_none());
    drop((held, held2));
    assert!(engine.encode_now(lz4, &list, &mut lengths).is_some());

    // Worker threads: never on the caller's thread.
    let mut threaded = Engine::software(
        config,
        SoftwareConfig {
            threads: 1,
            ..inline
        },
    )
    .expect("engine");
    assert!(threaded.encode_now(lz4, &list, &mut lengths).is_none());
    assert_eq!(threaded.stats().submitted, 0);
}
