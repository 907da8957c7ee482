//! The machine's idle CPU: a compressor replacing raw takes its cores from it.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::source::adaptive::observe::{CpuReader, IDLE_EVERY};

/// A machine 30 % idle: of every 100 ticks, 30 idle.
fn idle_30() -> Option<(u64, u64)> {
    static T: AtomicU64 = AtomicU64::new(0);
    let t = T.fetch_add(100, Ordering::Relaxed) + 100;
    Some((t * 3 / 10, t))
}

/// A machine all idle.
fn idle_all() -> Option<(u64, u64)> {
    static T: AtomicU64 = AtomicU64::new(0);
    let t = T.fetch_add(100, Ordering::Relaxed) + 100;
    Some((t, t))
}

/// Frames of 400 not sent raw on a link that carries 600 MB/s per channel (a share of
/// 10 Gbit/s), where lz4 encodes 1.2 GB/s on a whole core at 0.45 and zstd:-5 1 GB/s
/// at 0.40: on paper either moves twice raw's pages. `cpu` reads the machine's idle
/// time, for two cores and two channels.
fn compressed_frames_on_a_fast_link(cpu: Option<CpuReader>) -> usize {
    let mut now = Instant::now();
    let shared = cpu.map_or_else(SharedLink::default, |r| SharedLink::with_cpu(r, 2, 2));
    let mut s = selector(now).with_shared(Arc::new(shared));
    s.link = Some(6e8);
    let speeds = |label: &str| match label {
        "raw" => (10e9, 1.0),
        "lz4" => (1.2e9, 0.45),
        "zstd:-5" => (1e9, 0.40),
        "zstd:1" => (4e8, 0.30),
        "zstd:3" => (2e8, 0.28),
        _ => (6e7, 0.32),
    };
    let chosen = drive_copying(&mut s, &mut now, 400, &speeds, 6e8, 1.0 / 3e9);
    chosen.iter().filter(|l| *l != "raw").count()
}

#[test]
fn a_compressor_does_not_replace_raw_on_cores_the_machine_does_not_have_idle() {
    // 0.3 of a core idle per channel: lz4 would move 360 MB/s there, less than raw.
    let busy = compressed_frames_on_a_fast_link(Some(idle_30));
    assert!(busy < 40, "{busy} compressed frames with 0.3 core idle");
    // Where the machine has the cores, or cannot tell, the compressor wins.
    let idle = compressed_frames_on_a_fast_link(Some(idle_all));
    assert!(idle > 200, "{idle} compressed frames on an idle machine");
    let unknown = compressed_frames_on_a_fast_link(None);
    assert!(
        unknown > 200,
        "{unknown} compressed frames, idle time unknown"
    );
}

#[test]
fn the_machines_idle_time_is_read_from_proc_stat() {
    let (idle, total) = proc_stat().expect("/proc/stat");
    assert!(idle <= total && total > 0, "{idle} of {total}");
    // Two readings apart: the idle cores per channel lie within the cores.
    let link = SharedLink::with_cpu(proc_stat, 2, 2);
    let now = Instant::now();
    assert_eq!(link.idle_per_channel(now), None);
    std::thread::sleep(Duration::from_millis(30));
    let later = now + IDLE_EVERY;
    let idle = link.idle_per_channel(later).expect("two readings");
    assert!((0.0..=1.0).contains(&idle), "{idle}");
}
