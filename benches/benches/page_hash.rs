//! Dedup's keyed page hash (AES-128 of each 4 KiB page's POLYVAL, `pipeline/src/source/
//! pagehash.rs`): `PageHasher::hash_pages` against one `blake3::keyed_hash` call per
//! page, a keyed hash dedup used before, over the same buffer in the same run. A
//! frame's staging buffer (256 KiB, in L2) is what dedup hashes; 64 MiB is the same
//! from memory. Prints GB/s and the ratio.

use std::hint::black_box;
use std::time::Instant;

use pagewire::bench::{PageHash, PageHasher};

const PS: usize = 4096;
const ROUNDS: usize = 25;

fn main() {
    let key = [0x5au8; 32];
    let hasher = PageHasher::new(key);
    println!(
        "\n== dedup page hash: AES(POLYVAL) vs BLAKE3 keyed, one call per page (best of {ROUNDS}, interleaved) =="
    );
    for (name, bytes) in [("256KiB", 256usize << 10), ("64MiB", 64 << 20)] {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let buf: Vec<u8> = (0..bytes)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let mut out: Vec<PageHash> = Vec::with_capacity(bytes / PS);
        let mut batched = || {
            out.clear();
            hasher.hash_pages(black_box(&buf), PS, &mut out);
            black_box(&out);
        };
        let mut one = Vec::with_capacity(bytes / PS);
        let mut per_page = || {
            one.clear();
            one.extend(
                buf.chunks_exact(PS)
                    .map(|p| blake3::keyed_hash(&key, black_box(p))),
            );
            black_box(&one);
        };
        // Many passes over the small buffer per timing, one over the large one.
        let reps = ((64usize << 20) / bytes).max(1);
        let (mut best_b, mut best_p) = (f64::MAX, f64::MAX);
        for round in 0..ROUNDS {
            for k in 0..2 {
                let t = Instant::now();
                for _ in 0..reps {
                    if (k + round) % 2 == 0 {
                        batched();
                    } else {
                        per_page();
                    }
                }
                let s = t.elapsed().as_secs_f64();
                if (k + round) % 2 == 0 {
                    best_b = best_b.min(s);
                } else {
                    best_p = best_p.min(s);
                }
            }
        }
        let gbs = |s: f64| (bytes * reps) as f64 / s / 1e9;
        println!(
            "{name:>7}: AES(POLYVAL) {:6.2} GB/s | BLAKE3 keyed {:6.2} GB/s | {:.2}x",
            gbs(best_b),
            gbs(best_p),
            best_p / best_b
        );
    }
}
