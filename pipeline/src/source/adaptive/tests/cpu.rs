//! The machine's idle CPU: a compressor replacing raw takes its cores from it.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::source::adaptive::observe::{CpuReader, IDLE_EVERY};
use crate::source::setup::proc_stat;

/// A machine `percent` % idle: a clock of 100 ticks a reading, its share idle.
fn machine(percent: u64) -> Option<(u64, u64)> {
    static T: AtomicU64 = AtomicU64::new(0);
    let t = T.fetch_add(100, Ordering::Relaxed) + 100;
    Some((t * percent / 100, t))
}

/// A machine 30 % idle, one with no core idle, one all idle.
const IDLE_30: CpuReader = || machine(30);
const IDLE_NONE: CpuReader = || machine(0);
const IDLE_ALL: CpuReader = || machine(100);

/// Frames of 400 not sent raw on a link that carries 600 MB/s per channel (a share of
/// 10 Gbit/s), where lz4 encodes 1 GB/s on a whole core at 0.45 and zstd:-5 0.9 GB/s
/// at 0.40: on paper either moves 1.5-1.7x raw's pages. `cpu` reads the machine's idle
/// time, for two cores and two channels.
fn compressed_frames_on_a_fast_link(cpu: Option<CpuReader>) -> usize {
    let mut now = Instant::now();
    let shared = cpu.map_or_else(SharedLink::default, |r| SharedLink::with_cpu(r, 2, 2));
    let mut s = selector(now).with_shared(Arc::new(shared));
    s.link = Some(6e8);
    let speeds = |label: &str| match label {
        "raw" => (10e9, 1.0),
        "lz4" => (1e9, 0.45),
        "zstd:-5" => (0.9e9, 0.40),
        "zstd:1" => (4e8, 0.30),
        "zstd:3" => (2e8, 0.28),
        _ => (6e7, 0.32),
    };
    let chosen = drive_copying(&mut s, &mut now, 400, &speeds, 6e8, 1.0 / 3e9);
    chosen.iter().filter(|l| *l != "raw").count()
}

#[test]
fn a_compressor_does_not_replace_raw_on_cores_the_machine_does_not_have_idle() {
    // 0.3 of a core idle per channel: lz4 is priced on half a core (the least
    // assumed), 500 MB/s, less than raw.
    let busy = compressed_frames_on_a_fast_link(Some(IDLE_30));
    assert!(busy < 40, "{busy} compressed frames with 0.3 core idle");
    // Where the machine has the cores, or cannot tell, the compressor wins.
    let idle = compressed_frames_on_a_fast_link(Some(IDLE_ALL));
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

#[test]
fn on_a_slow_link_a_machine_with_no_core_idle_still_compresses() {
    // 60 MB/s, raw the choice, other work keeping both cores busy: a compressor still
    // gets half a core from the scheduler, and moves several times raw's pages.
    let mut now = Instant::now();
    let shared = SharedLink::with_cpu(IDLE_NONE, 2, 2);
    let mut s = selector(now).with_shared(Arc::new(shared));
    s.link = Some(6e7);
    let chosen = drive(&mut s, &mut now, 400, &text, 6e7);
    assert!(s.idle == Some(0.0), "{:?}", s.idle);
    assert!(tail_share(&chosen, "raw") < 0.1, "{chosen:?}");
}
