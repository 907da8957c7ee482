//! The adaptive choice with delta among its candidates (`CodecPolicy::auto_with_delta`):
//! pages sent again are kept from the second round on, a frame whose pages are all
//! kept goes as delta while delta sends less than the current compressor, delta stops
//! when it sends more (pages rewritten whole) and starts again later; the destination
//! ends with the source's memory byte for byte.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pagewire::sim::{Content, Guest, Pattern, WriterConfig};
use pagewire::{
    AdaptiveConfig, CodecPolicy, DestinationConfig, DestinationListener, DirtyBitmap, GuestMemory,
    Source, SourceConfig,
};
use pagewire_protocol::{Authentication, CodecId, RegionId, SessionKey};

fn key() -> Authentication {
    Authentication::PreSharedKey(SessionKey::new(*b"auto delta test key, 32 bytes...").unwrap())
}

/// Pages rewritten each round.
const HOT: u64 = 1024;

/// Changes pages `0..HOT` of region 0: one byte each, or all of it with new text.
fn touch(mem: &GuestMemory, rng: &mut Rng, whole: bool) -> DirtyBitmap {
    let bits = DirtyBitmap::new(mem.pages(RegionId(0)).unwrap());
    let mut page = vec![0u8; PAGE];
    for p in 0..HOT {
        assert!(mem.read_pages(RegionId(0), p, 1, &mut page));
        if whole {
            pagewire::sim::page_content(rng, Content::Text, &mut page);
        } else {
            page[(rng.below(PAGE as u64)) as usize] ^= 0x5a;
        }
        assert!(mem.write_pages(RegionId(0), p, &page));
        bits.set(p);
    }
    bits
}

fn round(src: &mut Source, bits: DirtyBitmap) -> pagewire::stats::RoundStats {
    src.send_round(vec![(RegionId(0), bits)], false).unwrap()
}

/// Guest memory of `mib` MiB (region 0) filled with text pages from `rng`.
fn text_memory(mib: u64, rng: &mut Rng) -> Arc<GuestMemory> {
    let mem = memory(mib);
    let mut page = vec![0u8; PAGE];
    for p in 0..mem.pages(RegionId(0)).unwrap() {
        pagewire::sim::page_content(rng, Content::Text, &mut page);
        assert!(mem.write_pages(RegionId(0), p, &page));
    }
    mem
}

type Destination = std::thread::JoinHandle<Result<pagewire::Migrated, pagewire::MigrationError>>;

/// A destination on loopback for session `n`, and a source of `mem` connected to it
/// with the adaptive choice over `candidates` and delta, set up further by `tune`.
fn connect(
    mem: &Arc<GuestMemory>,
    n: u8,
    candidates: &[(CodecId, i32)],
    tune: impl FnOnce(&mut SourceConfig),
) -> (Source, Destination) {
    let listener =
        DestinationListener::bind(loopback(), DestinationConfig::new(session(n), key())).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut auto = AdaptiveConfig::default();
    auto.candidates = candidates.to_vec();
    let mut cfg = SourceConfig::new(session(n), key());
    cfg.codec = CodecPolicy::Auto(auto.with_delta());
    cfg.channels = 1;
    cfg.dedup = false;
    tune(&mut cfg);
    (Source::connect(addr, mem.clone(), cfg).unwrap(), dst)
}

/// A first round of every page of every region.
fn first_round(src: &mut Source, mem: &GuestMemory) -> pagewire::stats::RoundStats {
    let all = mem
        .region_ids()
        .map(|id| (id, DirtyBitmap::full(mem.pages(id).unwrap())))
        .collect();
    src.send_round(all, false).unwrap()
}

#[test]
fn cached_pages_go_as_delta_until_it_sends_more_than_the_compressor() {
    within(Duration::from_secs(120), "auto with delta", || {
        let mut rng = Rng::new(5);
        let mem = text_memory(8, &mut rng);
        let mut page = vec![0u8; PAGE];
        // lz4 alone, so the current choice is a compressor whatever this machine
        // measures; the channel thread encodes (no codec threads), so each frame's
        // completion is seen before the next frame is chosen.
        let (mut src, dst) = connect(&mem, 21, &[(CodecId::LZ4, 0)], |cfg| {
            cfg.codec_threads = Some(0);
        });
        let r0 = first_round(&mut src, &mem);
        assert_eq!(r0.pages.delta, 0, "{r0:?}");
        // The second round keeps what it sends; none of it is cached yet.
        let r1 = round(&mut src, touch(&mem, &mut rng, false));
        assert_eq!(r1.pages.delta, 0, "{r1:?}");
        // The third finds every page cached, with a byte changed: all delta, and a
        // fraction of lz4's bytes (this text compresses to 33 bytes a page).
        let r2 = round(&mut src, touch(&mem, &mut rng, false));
        assert_eq!(r2.pages.delta, HOT, "{r2:?}");
        assert!(
            r2.wire_bytes * 2 < r1.wire_bytes,
            "delta {} bytes, lz4 {} bytes",
            r2.wire_bytes,
            r1.wire_bytes
        );
        // Pages rewritten whole: delta's first frames send them raw, more than lz4
        // would, and delta stops; lz4 sends the rest.
        let r3 = round(&mut src, touch(&mem, &mut rng, true));
        let stopped_at = std::time::Instant::now();
        assert!(r3.pages.delta > 0 && r3.pages.delta < HOT / 2, "{r3:?}");
        let a = src.stats().adaptive.unwrap();
        // Delta's starts (lz4 → delta, `cached`) and stops (delta → lz4,
        // `delta-larger`).
        let starts_stops = |a: &pagewire::AdaptiveStats| {
            let count = |from: &str, to: &str, reason: &str| {
                a.switches
                    .iter()
                    .filter(|s| s.reason == reason && s.from == from && s.to == to)
                    .map(|s| s.count)
                    .sum::<u64>()
            };
            (
                count("lz4", "delta", "cached"),
                count("delta", "lz4", "delta-larger"),
            )
        };
        assert_eq!(starts_stops(&a), (1, 1), "{:?}", a.switches);
        // Still off (when this round ends within the 2 s pause, as it does unless the
        // machine stalls): lz4, although every page is cached again.
        let r4 = round(&mut src, touch(&mem, &mut rng, false));
        if stopped_at.elapsed() < Duration::from_millis(1900) {
            assert_eq!(r4.pages.delta, 0, "{r4:?}");
        }
        // Delta is tried again once its pause is over.
        std::thread::sleep(Duration::from_millis(2100));
        let r5 = round(&mut src, touch(&mem, &mut rng, false));
        assert_eq!(r5.pages.delta, HOT, "{r5:?}");
        // The paused round: cached pages go as delta, and pages sent otherwise are not
        // kept (no round follows that could use them).
        let stored = |src: &Source| src.stats().engine.delta.unwrap().stored;
        let before = stored(&src);
        let bits = touch(&mem, &mut rng, false);
        for p in HOT..HOT + 256 {
            pagewire::sim::page_content(&mut rng, Content::Text, &mut page);
            assert!(mem.write_pages(RegionId(0), p, &page));
            bits.set(p);
        }
        let r6 = src.send_round(vec![(RegionId(0), bits)], true).unwrap();
        assert_eq!((r6.pages.delta, r6.pages.compressed), (HOT, 256), "{r6:?}");
        assert_eq!(stored(&src), before);
        assert!(src.complete().unwrap().is_committed());
        let stats = src.stats();
        let a = stats.adaptive.clone().unwrap();
        assert_eq!(starts_stops(&a), (2, 1), "{:?}", a.switches);
        assert!(a.share("delta") > 0.0, "{:?}", a.choices);
        assert_eq!(stats.codec, "auto+delta");
        let migrated = dst.join().unwrap().unwrap();
        assert_eq!(first_difference(&mem, &migrated.memory), None, "{stats}");
    });
}

/// Delta is never used where the choice is raw, and the default candidates do not
/// include it.
#[test]
fn raw_frames_keep_nothing_and_auto_has_no_delta_by_default() {
    assert!(!AdaptiveConfig::default().has_delta());
    assert!(AdaptiveConfig::default().with_delta().has_delta());
    let mem = memory(8);
    fill(&mem, 3);
    let (mut src, dst) = connect(&mem, 22, &[(CodecId::RAW, 0)], |_| {});
    let mut rng = Rng::new(9);
    first_round(&mut src, &mem);
    for _ in 0..3 {
        let r = round(&mut src, touch(&mem, &mut rng, false));
        assert_eq!(r.pages.delta, 0, "{r:?}");
    }
    src.send_round(Vec::new(), true).unwrap();
    assert!(src.complete().unwrap().is_committed());
    let stats = src.stats();
    assert_eq!(stats.engine.delta.map(|d| d.stored), Some(0), "{stats}");
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&mem, &migrated.memory), None, "{stats}");
}

/// Two paused rounds in a row: a page the first sends with the compressor (not kept)
/// is forgotten, so the second does not diff it against the version kept before.
#[test]
fn a_page_sent_in_a_paused_round_is_forgotten() {
    let mut rng = Rng::new(8);
    let mem = text_memory(8, &mut rng);
    let pages = mem.pages(RegionId(0)).unwrap();
    let mut page = vec![0u8; PAGE];
    let (mut src, dst) = connect(&mem, 23, &[(CodecId::LZ4, 0)], |_| {});
    first_round(&mut src, &mem);
    // Pages 0..HOT kept (round 1), then all sent as delta (round 2).
    round(&mut src, touch(&mem, &mut rng, false));
    assert_eq!(
        round(&mut src, touch(&mem, &mut rng, false)).pages.delta,
        HOT
    );
    // Page 6 goes as a zero page, which forgets it.
    let zero = vec![0u8; PAGE];
    assert!(mem.write_pages(RegionId(0), 6, &zero));
    let bits = DirtyBitmap::new(pages);
    bits.set(6);
    assert_eq!(round(&mut src, bits).pages.zero, 1);
    // Paused: pages 5 and 6 in one frame, 6 not cached, so lz4; page 5 is forgotten.
    let mut kept = vec![0u8; PAGE];
    assert!(mem.read_pages(RegionId(0), 5, 1, &mut kept));
    page.copy_from_slice(&kept);
    page[..64].fill(0x77);
    assert!(mem.write_pages(RegionId(0), 5, &page));
    assert!(mem.write_pages(RegionId(0), 6, &kept));
    let bits = DirtyBitmap::new(pages);
    bits.set(5);
    bits.set(6);
    let r = src.send_round(vec![(RegionId(0), bits)], true).unwrap();
    assert_eq!((r.pages.delta, r.pages.compressed), (0, 2), "{r:?}");
    // Another paused round: page 5 back to the version kept in round 2 but one byte.
    // Diffed against that version, its delta would be that byte alone and leave the
    // 0x77 bytes the destination holds now.
    kept[3000] ^= 1;
    assert!(mem.write_pages(RegionId(0), 5, &kept));
    let bits = DirtyBitmap::new(pages);
    bits.set(5);
    let r = src.send_round(vec![(RegionId(0), bits)], true).unwrap();
    assert_eq!(r.pages.delta, 0, "{r:?}");
    assert!(src.complete().unwrap().is_committed());
    let stats = src.stats();
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&mem, &migrated.memory), None, "{stats}");
}

/// Two channels, codec threads, dedup, and a guest updating items in place while the
/// rounds run: the destination ends with the source's memory.
#[test]
fn delta_stays_right_with_channels_codec_threads_dedup_and_a_running_guest() {
    within(Duration::from_secs(120), "auto with delta, guest", || {
        let mem = text_memory(16, &mut Rng::new(6));
        let candidates = [(CodecId::LZ4, 0), (CodecId::ZSTD, 1)];
        let (mut src, dst) = connect(&mem, 24, &candidates, |cfg| {
            cfg.channels = 2;
            cfg.codec_threads = Some(1);
            cfg.dedup = true;
            cfg.precopy.downtime_limit = Duration::from_millis(1);
            cfg.precopy.max_rounds = 8;
        });
        let mut g = Guest::start(
            mem.clone(),
            WriterConfig {
                pages_per_s: 20_000,
                pattern: Pattern::Hot(512),
                content: Content::Text,
                seed: 4,
                edit_bytes: 128,
            },
        );
        let stats = migrate_sim(&mut src, &g).unwrap();
        g.stop();
        drop(src);
        let migrated = dst.join().unwrap().unwrap();
        assert_eq!(first_difference(&mem, &migrated.memory), None, "{stats}");
        let d = stats.engine.delta.unwrap();
        assert!(d.stored > 0, "{stats}");
        eprintln!("{} pages went as delta: {d:?}", stats.pages.delta);
    });
}
