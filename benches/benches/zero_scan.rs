//! Zero-page scan and the uniform-page scan (`classify`, which also finds pages of one
//! repeated byte in the same pass) against a plain memory-read loop over the same
//! buffer, in the same run: zero pages, uniform pages (0xCC) (the whole page must be read), pages with data at the start (the
//! sampled early exit), and pages whose only non-zero byte sits near the end, between
//! the sampled words (the worst case for the early exit).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use pagewire_accel::zero::{PageClass, ZeroKernel, classify_with, is_zero_with};

const PS: usize = 4096;

/// The baseline: read every byte of every page once, as `u64` words folded together.
fn read_loop(buf: &[u8]) -> u64 {
    let mut acc = 0u64;
    for page in buf.chunks_exact(PS) {
        let mut a = [0u64; 8];
        for c in page.chunks_exact(64) {
            for (k, w) in c.chunks_exact(8).enumerate() {
                a[k] ^= u64::from_ne_bytes(w.try_into().unwrap());
            }
        }
        acc = acc.wrapping_add(a.iter().fold(0, |x, y| x ^ y));
    }
    acc
}

fn scan(kernel: ZeroKernel, buf: &[u8]) -> usize {
    buf.chunks_exact(PS)
        // SAFETY: each chunk is a readable slice of `PS` bytes.
        .filter(|p| unsafe { is_zero_with(kernel, p.as_ptr(), p.len()) })
        .count()
}

fn classify(kernel: ZeroKernel, buf: &[u8]) -> usize {
    buf.chunks_exact(PS)
        // SAFETY: each chunk is a readable slice of `PS` bytes.
        .filter(|p| unsafe { classify_with(kernel, p.as_ptr(), p.len()) } != PageClass::Data)
        .count()
}

fn bench_zero(c: &mut Criterion) {
    let mut kernels = vec![("portable", ZeroKernel::Portable)];
    if ZeroKernel::Avx2.is_available() {
        kernels.push(("avx2", ZeroKernel::Avx2));
    }
    // 64 MiB: far beyond the caches, so this is memory bandwidth; 256 KiB: in L2.
    for (size_name, bytes) in [("64MiB", 64usize << 20), ("256KiB", 256 << 10)] {
        // Written once with ones, then zeros: every page is backed by its own memory
        // (a fresh zeroed allocation maps one shared zero page and would measure the
        // cache, not memory).
        let mut zeros = vec![1u8; bytes];
        zeros.fill(0);
        let zeros = black_box(zeros);
        let mut data = vec![0u8; bytes];
        for (i, page) in data.chunks_mut(PS).enumerate() {
            page[0] = 1 + (i % 255) as u8;
        }
        // One byte near the end, between the sampled words: the whole page is read.
        let mut late = vec![1u8; bytes];
        late.fill(0);
        for page in late.chunks_mut(PS) {
            page[PS - 100] = 1;
        }
        let mut g = c.benchmark_group(format!("zero_scan/{size_name}"));
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function("read_loop/zero_pages", |b| {
            b.iter(|| black_box(read_loop(black_box(&zeros))))
        });
        for (name, kernel) in &kernels {
            g.bench_function(format!("{name}/zero_pages"), |b| {
                b.iter(|| assert_eq!(scan(*kernel, black_box(&zeros)), bytes / PS))
            });
            g.bench_function(format!("{name}/data_at_start"), |b| {
                b.iter(|| assert_eq!(scan(*kernel, black_box(&data)), 0))
            });
            g.bench_function(format!("{name}/one_byte_late"), |b| {
                b.iter(|| assert_eq!(scan(*kernel, black_box(&late)), 0))
            });
            g.bench_function(format!("{name}/classify_zero_pages"), |b| {
                b.iter(|| assert_eq!(classify(*kernel, black_box(&zeros)), bytes / PS))
            });
        }
        g.finish();
    }
}

/// One way of reading a buffer.
type Scan<'a> = dyn FnMut(&[u8]) + 'a;

/// Best-of-`rounds` GiB/s of each function over `buf`, interleaved round by round
/// with the order rotated, so every kernel sees the same machine conditions as the
/// read loop it is compared with.
fn interleaved(rounds: usize, buf: &[u8], fs: &mut [&mut Scan<'_>]) -> Vec<f64> {
    let mut best = vec![f64::MAX; fs.len()];
    for round in 0..rounds {
        for k in 0..fs.len() {
            let i = (k + round) % fs.len();
            let t = Instant::now();
            fs[i](buf);
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    best.iter()
        .map(|s| buf.len() as f64 / s / (1u64 << 30) as f64)
        .collect()
}

/// The summary: each kernel's GiB/s as a share of the read loop's, same run.
fn summary() {
    println!(
        "\n== zero scan and uniform-page classify vs plain read loop (best of 25 interleaved runs) =="
    );
    for (size_name, bytes) in [("64MiB", 64usize << 20), ("256KiB", 256 << 10)] {
        let mut zeros = vec![1u8; bytes];
        zeros.fill(0);
        let mut late = vec![1u8; bytes];
        late.fill(0);
        for page in late.chunks_mut(PS) {
            page[PS - 100] = 1;
        }
        let mut data = vec![0u8; bytes];
        for page in data.chunks_mut(PS) {
            page[0] = 1;
        }
        let mut uniform = vec![1u8; bytes];
        uniform.fill(0xcc);
        let avx2 = ZeroKernel::Avx2.is_available();
        let best = if avx2 {
            ZeroKernel::Avx2
        } else {
            ZeroKernel::Portable
        };
        for (what, buf) in [
            ("zero pages", &zeros),
            ("uniform 0xcc", &uniform),
            ("one byte late", &late),
            ("data at start", &data),
        ] {
            let mut base = |b: &[u8]| {
                black_box(read_loop(black_box(b)));
            };
            let mut portable = |b: &[u8]| {
                black_box(scan(ZeroKernel::Portable, black_box(b)));
            };
            let mut wide = |b: &[u8]| {
                black_box(scan(
                    if avx2 {
                        ZeroKernel::Avx2
                    } else {
                        ZeroKernel::Portable
                    },
                    black_box(b),
                ));
            };
            let mut class = |b: &[u8]| {
                black_box(classify(best, black_box(b)));
            };
            let g = interleaved(
                25,
                buf,
                &mut [&mut base, &mut portable, &mut wide, &mut class],
            );
            println!(
                "zero-scan {size_name:>6} {what:<14}: read loop {:6.1} GiB/s | portable {:6.1} GiB/s ({:5.0}%) | avx2{} {:6.1} GiB/s ({:5.0}%) | classify {:6.1} GiB/s ({:5.0}% of read, {:5.0}% of zero scan)",
                g[0],
                g[1],
                100.0 * g[1] / g[0],
                if avx2 { "" } else { " (absent: portable)" },
                g[2],
                100.0 * g[2] / g[0],
                g[3],
                100.0 * g[3] / g[0],
                100.0 * g[3] / g[2],
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_millis(1500))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        .configure_from_args();
    bench_zero(&mut c);
    c.final_summary();
    summary();
}
