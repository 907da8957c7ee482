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
//! (`ratio` lines). Each case's `receiver-decode` line times, against the same direct
//! call, the decode path a destination's receivers run for software codecs: no engine
//! job, the codec called on a page list of raw pointers into the pages (only a
//! hardware decoder goes through engine jobs there). The `engine-fixed` line then gives the engine's own cost per job
//! with no codec work to hide it: one-page encodes that end raw in place, and one-page
//! decodes of `zero` frames against the same zero fill done directly.
//!
//! The engine side encodes as the pipeline's source does on an inline engine (codec
//! threads 0): each frame at once through `Engine::encode_now`, no job
//! (`PAGEWIRE_NOW=0` submits jobs and polls them in batches instead, what the source does
//! with codec threads or a hardware backend). It gives its payloads back with
//! `Engine::recycle_buf` and its completions with `Engine::recycle`, as the source does
//! with what it does not send (`PAGEWIRE_RECYCLE=0` drops them instead;
//! `PAGEWIRE_RECYCLE=payload` drops each payload, and with jobs takes it first;
//! `PAGEWIRE_RECYCLE=transport` hands each payload off as the source sends a compressed
//! frame's, a `Payload::Owned` held until its send would complete and then taken back
//! to `Engine::recycle_buf`; `PAGEWIRE_RECYCLE=bytes` as the source did before, a
//! `Bytes` owner dropped back to the pool). Delta's direct calls, like the
//! engine's requests and the receivers, keep their page lists across calls, so neither
//! side allocates per frame.
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
//!
//! [`Codecs::encode`]: pagewire_accel::Codecs::encode

use std::time::Duration;

use criterion::Criterion;
use pagewire_accel::Level;
use pagewire_protocol::CodecId;

mod copy;
mod data;
mod direct;
mod engine;
mod groups;
mod summary;

use copy::copy_cost;
use groups::bench_codecs;
use summary::{fixed_cost, fixed_phases, summary};

const PS: usize = 4096;
const PAGES: usize = 256;
const FRAMES: [usize; 5] = [1, 32, 64, 128, 256];

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

fn main() {
    // `PAGEWIRE_FIXED_ONLY=1`: the fixed cost alone, with its phases (to profile it).
    if std::env::var_os("PAGEWIRE_FIXED_ONLY").is_some() {
        fixed_phases();
        fixed_cost();
        return;
    }
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
