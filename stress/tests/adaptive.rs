//! The adaptive codec (`--codec auto`) in a whole migration over a capped link whose
//! cap drops in the middle of the run (20 Gbit/s, then 1 Gbit/s), on guest memory
//! whose content changes class (three quarters compressible text, then random
//! bytes). Needs root for the network
//! namespaces; without it the test says SKIP (and fails with
//! `PAGEWIRE_REQUIRE_ROOT=1`).

use std::io::Write;
use std::time::Duration;

use pagewire::Authentication;
use pagewire_stress::cell::{self, CellSpec, DestPrep, Outcome, SourceGuest};
use pagewire_stress::cli::{CodecChoice, TransportKind};
use pagewire_stress::workload::{Workload, WritePattern};
use pagewire_stress::{Link, LinkSpec};

fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("PAGEWIRE_REQUIRE_ROOT").as_deref() != Ok("1"),
        "{test}: needs root and PAGEWIRE_REQUIRE_ROOT=1"
    );
    eprintln!("SKIP {test}: needs root");
    false
}

/// Bytes sent by the source's end of the link, as the calling thread's network
/// namespace counts them (`veth-src`); 0 until it exists.
fn sent_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("veth-src:"))
        .and_then(|l| l.split_whitespace().nth(8)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn auto_follows_a_cap_changed_mid_run_and_content_that_changes_class() {
    if !root("auto_follows_a_cap_changed_mid_run_and_content_that_changes_class") {
        return;
    }
    const MIB: u64 = 512;
    // The guest: text (a quarter), random bytes (a quarter), then text again (half).
    // The text is words of a small vocabulary in pseudo-random order: zstd makes it
    // about a third of its size, so on the slow link it takes a while to cross, long
    // enough for the compressors to be explored and paired (a sentence repeated, which
    // compresses 25x, crossed in 60-100 ms and one run in five explored nothing while
    // a compressor was the choice).
    let path = std::env::temp_dir().join(format!("pagewire-adaptive-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&path).unwrap();
        let vocabulary: Vec<&[u8]> = b"live migration moves guest memory while the guest \
            keeps running pages dirty rounds converge link codec frame channel destination \
            source switchover downtime compress decode encode zero uniform copy ratio"
            .split(|&c| c == b' ')
            .filter(|w| !w.is_empty())
            .collect();
        let next = |x: &mut u64| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *x
        };
        let eighth = (MIB << 20) as usize / 8;
        let mut order = 0x2545_f491_4f6c_dd1du64;
        let mut words = |len: usize| {
            let mut out = Vec::with_capacity(len + 16);
            while out.len() < len {
                out.extend_from_slice(vocabulary[next(&mut order) as usize % vocabulary.len()]);
                out.push(b' ');
            }
            out.truncate(len);
            out
        };
        f.write_all(&words(2 * eighth)).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..2 * eighth).map(|_| next(&mut x) as u8).collect();
        f.write_all(&random).unwrap();
        f.write_all(&words(4 * eighth)).unwrap();
    }
    let spec = CellSpec {
        workload: Workload::FillFrom(path.clone()),
        pattern: WritePattern::Random,
        codec: CodecChoice::Auto,
        level: None,
        channels: 2,
        frame_pages: 128,
        dirty_mbps: 0.0,
        link: LinkSpec::Capped { gbit: 20.0 },
        transport: TransportKind::Tcp,
        mem_mib: MIB,
        downtime_ms: 300,
        max_rounds: 5,
        fail_on_cap: false,
        timeout_s: 60,
        // The text is one 66-byte sentence repeated: 33 distinct pages, which dedup
        // would send as copies, leaving the codec choice nothing to compress.
        dedup: false,
        codec_threads: None,
        send_queue: None,
    };
    let mut guest = SourceGuest::new(&spec.workload, MIB).unwrap();
    let link = Link::up(&spec.link).unwrap();
    let r = std::thread::scope(|s| {
        let link = &link;
        // 20 Gbit/s for the first 64 MiB on the wire (half the first text), then 1
        // Gbit/s: the random bytes come after the drop, also once a choice made on the
        // slow link reaches the wire (each channel holds up to 16 MiB). A drop after a
        // fixed time raced the setup: at 20 Gbit/s the random bytes were sometimes all
        // handed over before it.
        s.spawn(move || {
            link.enter_source().unwrap();
            let start = std::time::Instant::now();
            while sent_bytes() < 64 << 20 && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(1));
            }
            link.set_rate(1.0).unwrap();
        });
        cell::run_local(
            &spec,
            0,
            &mut guest,
            link,
            &Authentication::None,
            // Memory populated beforehand: the test is about the source's choice. Into
            // fresh memory the destination's first writes (up to 48 µs a page on this
            // machine's virtual memory, some hours) held the sends back in 38 of 77
            // windows, and auto rightly stayed raw where the receiver was the limit.
            DestPrep {
                memory: pagewire_stress::destmem::DestMemory::Populated,
                prefault: None,
            },
        )
        .unwrap()
    });
    let _ = std::fs::remove_file(&path);
    assert_eq!(r.outcome, Outcome::Completed, "{:?}", r.error);
    assert!(r.verified);
    let a = r.stats.as_ref().unwrap().adaptive.clone().unwrap();
    eprintln!("{a:#?}");
    // Text on the slow link: compression; random bytes (a quarter of the guest), which
    // no codec shrinks: raw, the cheapest way to fill the link. The bound leaves room
    // for the frames spent measuring the compressors on them, which take longer when
    // the two cores are shared with other work (0.2 failed once under a parallel
    // build).
    let compressed = 1.0 - a.share("raw");
    assert!(a.share("raw") > 0.1, "raw for random bytes: {a:?}");
    assert!(compressed > 0.2, "a compressor for text: {a:?}");
    // Compressors explored while another was the choice were compared with it on the
    // same bytes.
    assert!(a.paired_samples > 0, "{a:?}");
    // No channel held more than the choice allows once it knows the link (16 MiB; the
    // TCP channel's own queue and socket take 20): a choice reaches the wire soon.
    assert!(
        a.peak_unacked_bytes > 0 && a.peak_unacked_bytes <= 16 << 20,
        "{a:?}"
    );
    // The channels told how long their sends waited on the receiver's window, and
    // the capped link, not the receiver, held back most windows (2-4 of 41-45 here).
    assert!(
        a.windows > 0 && a.receiver_windows * 4 < a.windows,
        "{} of {} windows receiver-bound: {a:?}",
        a.receiver_windows,
        a.windows
    );
    // It switched for the link (towards compression) and for the core (towards raw).
    assert!(a.switches.iter().any(|w| w.reason == "link-bound"), "{a:?}");
    assert!(
        a.switches
            .iter()
            .any(|w| w.reason == "cpu-bound" || w.reason == "cheaper"),
        "{a:?}"
    );
}
