//! The engine's hardware→software fallback contract: a backend that gives up on a job
//! with a cause gets it run on software, byte for byte, counted per cause.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::{Kind, PS, content};
use pagewire_accel::{
    Backend, BackendKind, Codecs, Completion, EncodeParams, Engine, EngineBuf, EngineConfig,
    EngineError, FallbackCause, FormatCaps, Job, JobOp, Level, PageKey, PageList, PageListMut,
    Probe, Tag,
};
use pagewire_protocol::CodecId;

/// A stand-in hardware backend: runs jobs whose tag is divisible by 4 itself (with
/// the software codecs, as a device would), and gives up on the others with a cause
/// picked by the tag, after scribbling over what a device might have half-written.
struct GivingUp {
    codecs: Codecs,
    done: VecDeque<Completion>,
}

fn cause_for(tag: u64) -> Option<FallbackCause> {
    match tag % 4 {
        0 => None,
        1 => Some(FallbackCause::QueueFull),
        2 => Some(FallbackCause::PageFault),
        _ => Some(FallbackCause::Timeout),
    }
}

impl Backend for GivingUp {
    fn kind(&self) -> BackendKind {
        BackendKind::Iaa
    }
    fn probe(&self) -> Probe {
        Probe {
            backend: BackendKind::Iaa,
            formats: vec![FormatCaps::both(CodecId::DEFLATE, Level(0), Level(12))],
            max_job_pages: 64,
            max_job_bytes: 64 * PS,
            queue_depth: 8,
            delta_cache: false,
        }
    }
    fn submit(&mut self, jobs: &mut VecDeque<Job>) -> Result<usize, EngineError> {
        let mut n = 0;
        while self.done.len() < 8 {
            let Some(mut job) = jobs.pop_front() else {
                break;
            };
            let c = match cause_for(job.tag().0) {
                None => {
                    job.run_software(&mut self.codecs, None);
                    job.complete(BackendKind::Iaa)
                }
                Some(cause) => {
                    let parts = job.parts_mut();
                    if let (JobOp::Encode(_), Some(out)) = (parts.op, parts.payload) {
                        // A partial output the software run must overwrite.
                        out.get_mut().expect("unique output").fill(0xEE);
                        out.set_len(17);
                        parts.lengths.extend([1, 2, 3]);
                    }
                    job.fall_back(BackendKind::Iaa, cause)
                }
            };
            self.done.push_back(c);
            n += 1;
        }
        Ok(n)
    }
    fn poll(
        &mut self,
        done: &mut Vec<Completion>,
        max: usize,
        _timeout: Option<Duration>,
    ) -> Result<usize, EngineError> {
        let mut n = 0;
        while n < max {
            let Some(c) = self.done.pop_front() else {
                break;
            };
            done.push(c);
            n += 1;
        }
        Ok(n)
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

fn engine() -> Engine {
    Engine::new(
        EngineConfig {
            max_pages: 16,
            requests: 32,
            buffers: 32,
            ..Default::default()
        },
        Box::new(GivingUp {
            codecs: Codecs::new(),
            done: VecDeque::new(),
        }),
    )
    .expect("engine")
}

fn run(engine: &mut Engine, mut batch: VecDeque<Job>) -> Vec<Completion> {
    let want = batch.len();
    let mut done = Vec::new();
    for _ in 0..1000 {
        if done.len() == want {
            break;
        }
        engine.submit(&mut batch).expect("submit");
        engine.poll(&mut done, want, None).expect("poll");
    }
    assert_eq!(done.len(), want, "every job completes");
    done
}

fn decode_with_software(codec: CodecId, payload: &[u8], lengths: &[u32], pages: usize) -> Vec<u8> {
    let mut back = vec![0u8; pages * PS];
    let mut dst = PageListMut::new(pagewire_accel::PageSize::KIB4);
    dst.push_slice(&mut back, PageKey(0)).expect("pages");
    Codecs::new()
        .decode(codec, payload, lengths, &mut dst)
        .expect("software decodes what the engine wrote");
    drop(dst);
    back
}

#[test]
fn jobs_handed_back_run_on_software_byte_for_byte_and_are_counted_per_cause() {
    let mut engine = engine();
    let inputs: Vec<Vec<u8>> = (0..12)
        .map(|i| {
            content(
                [Kind::Text, Kind::Code, Kind::Mixed][i % 3],
                1 + i % 5,
                i as u64,
            )
        })
        .collect();
    let batch = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut job = engine.job().expect("request");
            job.encode_buf(
                Tag(i as u64),
                EncodeParams::new(CodecId::DEFLATE, Level(6)),
                EngineBuf::from_vec(p.clone()),
                PageKey(0),
            )
            .expect("pages");
            job
        })
        .collect();
    let done = run(&mut engine, batch);
    for c in &done {
        let tag = c.tag().0;
        assert_eq!(c.fallback(), cause_for(tag), "tag {tag}");
        let want = if cause_for(tag).is_some() {
            BackendKind::Software
        } else {
            BackendKind::Iaa
        };
        assert_eq!(c.backend(), want);
        let out = c.encoded().expect("encoded");
        let input = &inputs[tag as usize];
        let back = decode_with_software(
            out.codec,
            &c.payload().expect("payload")[..out.payload_len],
            c.lengths(),
            input.len() / PS,
        );
        assert!(back == *input, "tag {tag}: bytes differ after fallback");
    }
    let stats = engine.stats();
    assert_eq!(stats.hw_fallbacks, 9);
    assert_eq!(stats.fallback_causes.of(FallbackCause::QueueFull), 3);
    assert_eq!(stats.fallback_causes.of(FallbackCause::PageFault), 3);
    assert_eq!(stats.fallback_causes.of(FallbackCause::Timeout), 3);
    assert_eq!(stats.fallback_causes.of(FallbackCause::DeviceLost), 0);
    assert!(stats.by_backend.contains(&(BackendKind::Iaa, 3)));
    assert!(stats.by_backend.contains(&(BackendKind::Software, 9)));
    assert_eq!(
        stats.fallback_causes.to_string(),
        "9 (queue-full 3, page-fault 3, timeout 3)"
    );
}

#[test]
fn decodes_handed_back_fill_every_destination_page() {
    let mut engine = engine();
    let input = content(Kind::Text, 4, 7);
    let mut src = PageList::new(pagewire_accel::PageSize::KIB4);
    src.push_slice(&input, PageKey(0)).expect("pages");
    let mut payload = vec![0; pagewire_accel::max_payload_len(4, pagewire_accel::PageSize::KIB4)];
    let mut lengths = Vec::new();
    let out = Codecs::new()
        .encode(
            &EncodeParams::new(CodecId::DEFLATE, Level(6)),
            &src,
            None,
            &mut payload,
            &mut lengths,
        )
        .expect("encode");
    payload.truncate(out.payload_len);
    let batch = (1..4u64)
        .map(|tag| {
            let mut job = engine.job().expect("request");
            job.decode_buf(
                Tag(tag),
                out.codec,
                EngineBuf::from_vec(payload.clone()),
                &lengths,
                EngineBuf::from_vec(vec![0xAB; input.len()]),
                PageKey(0),
            )
            .expect("dest");
            job
        })
        .collect();
    for mut c in run(&mut engine, batch) {
        assert_eq!(c.fallback(), cause_for(c.tag().0));
        assert_eq!(c.backend(), BackendKind::Software);
        c.status().expect("decoded");
        let dest = c.take_dest().expect("dest");
        assert!(dest[..] == input[..], "tag {}", c.tag().0);
    }
    assert_eq!(engine.stats().hw_fallbacks, 3);
}
