//! Page contents and codec subjects shared by the integration tests.
#![allow(dead_code, missing_docs)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use pagewire_accel::{
    CodecError, Codecs, DeltaCache, DeltaConfig, EncodeParams, Engine, EngineBuf, EngineConfig,
    PageKey, PageList, PageListMut, PageSize, SoftwareConfig, Tag,
};
use pagewire_protocol::CodecId;

pub const PS: usize = 4096;

/// A deterministic xorshift generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The kinds of page content the conformance suite covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Zeros,
    OneByte,
    Repeated,
    Sequence,
    Random,
    Text,
    Code,
    Mixed,
}

pub const KINDS: [Kind; 8] = [
    Kind::Zeros,
    Kind::OneByte,
    Kind::Repeated,
    Kind::Sequence,
    Kind::Random,
    Kind::Text,
    Kind::Code,
    Kind::Mixed,
];

const WORDS: &[&str] = &[
    "the",
    "guest",
    "memory",
    "page",
    "is",
    "sent",
    "over",
    "a",
    "channel",
    "while",
    "migration",
    "of",
    "virtual",
    "machine",
    "continues",
    "and",
    "dirty",
    "pages",
    "are",
    "tracked",
    "by",
    "kvm",
    "log",
    "round",
    "frame",
];

/// x86-64 instruction fragments typical of compiled code.
const CODE: &[&[u8]] = &[
    &[0x55],
    &[0x48, 0x89, 0xe5],
    &[0x48, 0x83, 0xec],
    &[0xe8],
    &[0x48, 0x8b, 0x45],
    &[0x89, 0x45],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0xc3],
    &[0x74],
    &[0x75],
    &[0x48, 0x8d, 0x3d],
    &[0x31, 0xc0],
    &[0x5d],
    &[0xff, 0x15],
];

fn page_of(kind: Kind, rng: &mut Rng, index: usize) -> Vec<u8> {
    let mut p = vec![0u8; PS];
    match kind {
        Kind::Zeros => {}
        Kind::OneByte => p[rng.below(PS)] = 1 + rng.below(255) as u8,
        Kind::Repeated => {
            let pat: Vec<u8> = (0..1 + rng.below(24)).map(|_| rng.next() as u8).collect();
            for (i, b) in p.iter_mut().enumerate() {
                *b = pat[i % pat.len()];
            }
        }
        Kind::Sequence => {
            let base = rng.next() as u32;
            for (i, c) in p.chunks_mut(4).enumerate() {
                c.copy_from_slice(&(base.wrapping_add(i as u32)).to_le_bytes());
            }
        }
        Kind::Random => rng.fill(&mut p),
        Kind::Text => {
            let mut i = 0;
            while i < PS {
                let w = WORDS[rng.below(WORDS.len())].as_bytes();
                for &b in w.iter().chain(b" ") {
                    if i < PS {
                        p[i] = b;
                        i += 1;
                    }
                }
            }
        }
        Kind::Code => {
            let mut i = 0;
            while i < PS {
                let ins = CODE[rng.below(CODE.len())];
                let imm = rng.below(3);
                for &b in ins.iter() {
                    if i < PS {
                        p[i] = b;
                        i += 1;
                    }
                }
                for _ in 0..imm {
                    if i < PS {
                        p[i] = if rng.below(2) == 0 {
                            rng.next() as u8
                        } else {
                            0
                        };
                        i += 1;
                    }
                }
            }
        }
        Kind::Mixed => {
            let kinds = [
                Kind::Zeros,
                Kind::Text,
                Kind::Code,
                Kind::Sequence,
                Kind::Random,
                Kind::Repeated,
                Kind::OneByte,
            ];
            return page_of(kinds[index % kinds.len()], rng, index);
        }
    }
    p
}

/// `pages` pages of `kind`.
pub fn content(kind: Kind, pages: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..pages)
        .flat_map(|i| page_of(kind, &mut rng, i))
        .collect()
}

/// An encoded frame.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub codec: CodecId,
    pub payload: Vec<u8>,
    pub lengths: Vec<u32>,
    pub in_place: bool,
}

/// Something that encodes and decodes: the codecs called directly, or an engine.
pub trait Subject {
    fn name(&self) -> String;
    /// Encodes `input` (whole pages, keys from `key`); with `split`, as two runs that
    /// are not contiguous in memory.
    fn encode(
        &mut self,
        params: EncodeParams,
        input: &[u8],
        key: u64,
        split: bool,
    ) -> Result<Encoded, CodecError>;
    /// Decodes into `dst` (whole pages, in place); with `split`, as two runs.
    fn decode(
        &mut self,
        codec: CodecId,
        payload: &[u8],
        lengths: &[u32],
        dst: &mut [u8],
        split: bool,
    ) -> Result<(), CodecError>;
}

/// Copies `input` into a buffer with a gap between its halves and returns the buffer
/// and the two halves' offsets.
fn split_copy(input: &[u8]) -> (Vec<u8>, usize, usize) {
    let pages = input.len() / PS;
    let first = pages / 2 * PS;
    let mut buf = vec![0xeeu8; input.len() + 2 * PS];
    buf[..first].copy_from_slice(&input[..first]);
    let second = first + 2 * PS;
    buf[second..second + input.len() - first].copy_from_slice(&input[first..]);
    (buf, first, second)
}

pub fn delta_cache() -> Arc<DeltaCache> {
    Arc::new(DeltaCache::new(DeltaConfig::new(PageSize::KIB4, 256)).expect("valid cache"))
}

/// The codecs called directly.
pub struct Direct {
    codecs: Codecs,
    delta: Arc<DeltaCache>,
}

impl Direct {
    pub fn new() -> Direct {
        Direct {
            codecs: Codecs::new(),
            delta: delta_cache(),
        }
    }
}

impl Subject for Direct {
    fn name(&self) -> String {
        "direct".into()
    }

    fn encode(
        &mut self,
        params: EncodeParams,
        input: &[u8],
        key: u64,
        split: bool,
    ) -> Result<Encoded, CodecError> {
        let pages = input.len() / PS;
        let mut payload = vec![0u8; pagewire_accel::max_payload_len(pages, PageSize::KIB4)];
        let mut lengths = Vec::new();
        let (buf, first, second) = split_copy(input);
        let mut src = PageList::new(PageSize::KIB4);
        if split && pages >= 2 {
            src.push_slice(&buf[..first], PageKey(key)).expect("pages");
            src.push_slice(
                &buf[second..second + input.len() - first],
                PageKey(key + (first / PS) as u64),
            )
            .expect("pages");
            assert!(!src.is_contiguous());
        } else {
            src.push_slice(input, PageKey(key)).expect("pages");
        }
        let out =
            self.codecs
                .encode(&params, &src, Some(&self.delta), &mut payload, &mut lengths)?;
        payload.truncate(out.payload_len);
        Ok(Encoded {
            codec: out.codec,
            payload,
            lengths,
            in_place: out.in_place,
        })
    }

    fn decode(
        &mut self,
        codec: CodecId,
        payload: &[u8],
        lengths: &[u32],
        dst: &mut [u8],
        split: bool,
    ) -> Result<(), CodecError> {
        let pages = dst.len() / PS;
        let mut dl = PageListMut::new(PageSize::KIB4);
        if split && pages >= 2 {
            let (mut buf, first, second) = split_copy(dst);
            let (a, b) = buf.split_at_mut(second);
            dl.push_slice(&mut a[..first], PageKey(0)).expect("pages");
            dl.push_slice(&mut b[..dst.len() - first], PageKey(1 << 40))
                .expect("pages");
            assert!(!dl.is_contiguous());
            let r = self.codecs.decode(codec, payload, lengths, &mut dl);
            drop(dl);
            dst[..first].copy_from_slice(&buf[..first]);
            let n = dst.len();
            dst[first..].copy_from_slice(&buf[second..second + n - first]);
            return r;
        }
        if !dst.is_empty() {
            dl.push_slice(dst, PageKey(0)).expect("pages");
        }
        self.codecs.decode(codec, payload, lengths, &mut dl)
    }
}

/// The engine over the software backend (inline or with worker threads), or over
/// the QAT backend on a private copy of the QAT stand-in library.
pub struct EngineSubject {
    engine: Engine,
    /// Software worker threads, or `usize::MAX` for the IAA device model.
    threads: usize,
    next_tag: u64,
    /// The stand-in the QAT engine runs on (kept loaded while it is used).
    qat: Option<pagewire_accel::qat::standin::StandIn>,
}

impl EngineSubject {
    pub fn new(threads: usize) -> EngineSubject {
        let config = EngineConfig {
            max_pages: 64,
            requests: 8,
            buffers: 8,
            delta: Some(delta_cache()),
            ..Default::default()
        };
        let engine = Engine::software(
            config,
            SoftwareConfig {
                threads,
                queue_depth: 4,
            },
        )
        .expect("engine starts");
        EngineSubject {
            engine,
            threads,
            next_tag: 1,
            qat: None,
        }
    }

    /// The engine over the QAT backend, on its own copy of the stand-in library.
    pub fn qat() -> EngineSubject {
        let standin = pagewire_accel::qat::standin::StandIn::private(1, false).expect("stand-in");
        let config = EngineConfig {
            max_pages: 64,
            requests: 8,
            buffers: 8,
            delta: Some(delta_cache()),
            ..Default::default()
        };
        let mut qat = pagewire_accel::qat::QatConfig::with_libraries(vec![standin.path().into()]);
        qat.queue_depth = 4;
        let backend =
            pagewire_accel::qat::QatBackend::new(qat, &config).expect("QAT on the stand-in");
        let engine = Engine::new(config, Box::new(backend)).expect("engine starts");
        EngineSubject {
            engine,
            threads: 0,
            next_tag: 1,
            qat: Some(standin),
        }
    }

    /// The backend an encode of `params` must run on.
    fn expected_backend(&self, params: &EncodeParams) -> pagewire_accel::BackendKind {
        if self.qat.is_some() && params.codec == CodecId::DEFLATE {
            pagewire_accel::BackendKind::Qat
        } else if self.threads == usize::MAX
            && matches!(params.codec, CodecId::DEFLATE | CodecId::DEFLATE_4K)
        {
            // The IAA backend runs deflate itself; other formats go to software,
            // counted as unsupported.
            pagewire_accel::BackendKind::Iaa
        } else {
            pagewire_accel::BackendKind::Software
        }
    }

    /// The engine on the IAA backend over the device model (no faults).
    pub fn iaa_model() -> EngineSubject {
        let config = EngineConfig {
            max_pages: 64,
            requests: 8,
            buffers: 8,
            delta: Some(delta_cache()),
            ..Default::default()
        };
        let choice = pagewire_accel::BackendChoice::Iaa(pagewire_accel::IaaPortal::Model(
            pagewire_accel::ModelFaults::default(),
        ));
        let engine =
            Engine::build(&choice, config, SoftwareConfig::default()).expect("engine starts");
        assert_eq!(engine.probe().backend, pagewire_accel::BackendKind::Iaa);
        EngineSubject {
            engine,
            threads: usize::MAX,
            next_tag: 1,
            qat: None,
        }
    }

    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    fn run(&mut self, job: pagewire_accel::Job) -> pagewire_accel::Completion {
        let tag = job.tag();
        let mut batch = VecDeque::from([job]);
        while !batch.is_empty() {
            self.engine.submit(&mut batch).expect("submit");
        }
        let mut done = Vec::new();
        while done.is_empty() {
            self.engine
                .poll(&mut done, 1, Some(Duration::from_millis(50)))
                .expect("poll");
        }
        let c = done.pop().expect("one completion");
        assert_eq!(c.tag(), tag);
        c
    }
}

impl Subject for EngineSubject {
    fn name(&self) -> String {
        if self.qat.is_some() {
            "engine(QAT on the stand-in)".into()
        } else if self.threads == usize::MAX {
            "engine(IAA device model)".into()
        } else {
            format!("engine({} threads)", self.threads)
        }
    }

    fn encode(
        &mut self,
        params: EncodeParams,
        input: &[u8],
        key: u64,
        split: bool,
    ) -> Result<Encoded, CodecError> {
        let pages = input.len() / PS;
        let mut job = self.engine.job().expect("free request");
        let tag = Tag(self.next_tag);
        self.next_tag += 1;
        let (buf, first, second) = split_copy(input);
        if split && pages >= 2 {
            let list = job.encode(tag, params);
            // SAFETY: `buf` outlives the job: `run` returns only after the completion
            // has been received, and `buf` is dropped at the end of this function.
            unsafe {
                list.push_raw(buf.as_ptr(), (first / PS) as u32, PageKey(key))
                    .expect("pages");
                list.push_raw(
                    buf[second..].as_ptr(),
                    (pages - first / PS) as u32,
                    PageKey(key + (first / PS) as u64),
                )
                .expect("pages");
            }
        } else {
            job.encode_buf(
                tag,
                params,
                EngineBuf::from_vec(input.to_vec()),
                PageKey(key),
            )
            .expect("pages");
        }
        let mut c = self.run(job);
        if c.status().is_ok() {
            let want = self.expected_backend(&params);
            assert_eq!(c.backend(), want, "{params:?}");
            if self.threads == usize::MAX {
                let hw = want == pagewire_accel::BackendKind::Iaa;
                assert_eq!(c.fallback().is_some(), !hw, "{params:?}");
            }
        }
        c.status()?;
        let out = c.encoded().expect("encode outcome");
        let payload = c.take_payload().expect("payload buffer");
        assert_eq!(payload.len(), out.payload_len);
        Ok(Encoded {
            codec: out.codec,
            payload: payload.to_vec(),
            lengths: c.lengths().to_vec(),
            in_place: out.in_place,
        })
    }

    fn decode(
        &mut self,
        codec: CodecId,
        payload: &[u8],
        lengths: &[u32],
        dst: &mut [u8],
        split: bool,
    ) -> Result<(), CodecError> {
        let pages = dst.len() / PS;
        let mut job = self.engine.job().expect("free request");
        let tag = Tag(self.next_tag);
        self.next_tag += 1;
        let payload = EngineBuf::from_vec(payload.to_vec());
        if split && pages >= 2 || pages == 0 {
            let list = job.decode(tag, codec, payload, lengths);
            let (mut buf, first, second) = split_copy(dst);
            if pages >= 2 {
                // SAFETY: `buf` outlives the job (`run` returns after the completion
                // has been received); the two runs are disjoint parts of it.
                unsafe {
                    list.push_raw(buf.as_mut_ptr(), (first / PS) as u32, PageKey(0))
                        .expect("pages");
                    list.push_raw(
                        buf.as_mut_ptr().add(second),
                        (pages - first / PS) as u32,
                        PageKey(1 << 40),
                    )
                    .expect("pages");
                }
                assert!(!list.is_contiguous());
            }
            let r = self.run(job).status();
            if pages >= 2 {
                dst[..first].copy_from_slice(&buf[..first]);
                let n = dst.len();
                dst[first..].copy_from_slice(&buf[second..second + n - first]);
            }
            let _ = &mut buf;
            return r;
        }
        job.decode_buf(
            tag,
            codec,
            payload,
            lengths,
            EngineBuf::from_vec(dst.to_vec()),
            PageKey(0),
        )
        .expect("dest");
        let mut c = self.run(job);
        let r = c.status();
        let back = c.take_dest().expect("dest back");
        dst.copy_from_slice(&back);
        r
    }
}

/// Every subject, each with its own delta cache.
pub fn subjects() -> Vec<Box<dyn Subject>> {
    vec![
        Box::new(Direct::new()),
        Box::new(EngineSubject::new(0)),
        Box::new(EngineSubject::new(2)),
        Box::new(EngineSubject::qat()),
        Box::new(EngineSubject::iaa_model()),
    ]
}
