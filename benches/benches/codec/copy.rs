//! The copy-cost section: what copying guest pages before a codec sees them costs.

use std::hint::black_box;
use std::time::Instant;

use pagewire_accel::{
    Codecs, DeltaCache, DeltaConfig, EncodeParams, Level, PageKey, PageList, PageSize,
    max_payload_len,
};
use pagewire_protocol::CodecId;

use crate::data::{mixed, touched, warm_cache};
use crate::summary::ab;
use crate::{PAGES, PS};

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

/// The copy-cost section (see the crate documentation).
pub(crate) fn copy_cost() {
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
                    CodecId::DELTA => "; delta reads both in place, one way (control)",
                    CodecId::RAW => "; raw copies into the payload either way (control)",
                    _ => "",
                }
            );
        }
    }
}
