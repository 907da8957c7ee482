//! Page dedup end to end: a guest whose memory holds its content twice migrates with
//! the second copy sent as COPY references, and the destination's memory equals the
//! source's byte for byte, while a writer keeps changing pages (sources included).

mod common;

use std::time::Duration;

use common::*;
use pagewire::{DestinationConfig, DestinationListener, Prefault, Source, SourceConfig};
use pagewire_protocol::{Authentication, CodecId, RegionId, SessionKey};

fn key() -> Authentication {
    Authentication::PreSharedKey(SessionKey::new(*b"dedup test key, 32 bytes........").unwrap())
}

/// Pages between a page and its twin: 16 chunks of the two channels' affinity (128
/// pages, `max_pages`), so both are on the same channel.
const SAME_CHANNEL: u64 = 2048;
/// 17 chunks: a page and its twin are on different channels.
const OTHER_CHANNEL: u64 = 2048 + 128;

/// Fills region 0 with mixed content, then copies each page `gap` pages further on
/// (as many as fit); returns the data pages (neither zero nor one byte repeated)
/// copied.
fn twice(mem: &pagewire::GuestMemory, gap: u64) -> u64 {
    fill(mem, 11);
    let pages = mem.pages(RegionId(0)).unwrap();
    let mut page = vec![0u8; PAGE];
    let mut data = 0;
    for p in 0..(pages - gap).min(gap) {
        assert!(mem.read_pages(RegionId(0), p, 1, &mut page));
        assert!(mem.write_pages(RegionId(0), gap + p, &page));
        data += u64::from(page.iter().any(|b| *b != page[0]));
    }
    data
}

/// Migrates a guest whose memory holds its content twice, `gap` pages apart, with
/// `writes_per_s` pages rewritten per second meanwhile; returns the copied pages (the
/// source's, equal to the destination's) and the data pages repeated.
fn migrate(codec: CodecId, dedup: bool, checksum: bool, writes_per_s: u64) -> (u64, u64) {
    migrate_into(
        codec,
        dedup,
        checksum,
        writes_per_s,
        Prefault::None,
        SAME_CHANNEL,
    )
    .0
}

/// [`migrate`] into destination memory prepared with `prefault`; also returns the
/// destination's statistics.
fn migrate_into(
    codec: CodecId,
    dedup: bool,
    checksum: bool,
    writes_per_s: u64,
    prefault: Prefault,
    gap: u64,
) -> ((u64, u64), pagewire::DestinationStats) {
    let src_mem = memory(16);
    let data = twice(&src_mem, gap);
    let mut dcfg = DestinationConfig::new(session(9), key());
    dcfg.checksum = checksum;
    dcfg.prefault = prefault;
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut g = guest(src_mem.clone(), writes_per_s, 5);
    let mut cfg = SourceConfig::new(session(9), key());
    cfg.codec = codec.into();
    cfg.channels = 2;
    cfg.checksum = checksum;
    cfg.dedup = dedup;
    cfg.precopy.downtime_limit = Duration::from_millis(50);
    cfg.precopy.max_rounds = 8;
    let mut source = Source::connect(addr, src_mem.clone(), cfg).unwrap();
    let stats = migrate_sim(&mut source, &g).unwrap();
    g.stop();
    drop(source);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(
        first_difference(&src_mem, &migrated.memory),
        None,
        "{stats}"
    );
    assert_eq!(migrated.stats.copied_pages, stats.pages.copied, "{stats}");
    // Twins on the same channel go as ordinary copies; those on the other channel are
    // applied at the round's end (a guest at rest: a writer rewrites twins too).
    let d = &migrated.stats;
    if dedup && codec != CodecId::RAW && writes_per_s == 0 {
        let (ordinary, round_end) = (d.copied_pages - d.round_end_pages, d.round_end_pages);
        // Across channels, which channel sends a page first is a race: a twin the
        // other channel has not sent yet goes as data, and the content's own repeats
        // then go as ordinary copies (round-end copies were 80–100 % of the data in
        // 28 runs; the copies in all stay above 90 %, checked by the callers).
        let (twins, share) = match gap {
            SAME_CHANNEL => (ordinary, 9),
            _ => (round_end, 7),
        };
        assert!(
            twins * 10 >= data * share,
            "gap {gap}: {twins} of {data}: {d:?}"
        );
    }
    ((stats.pages.copied, data), migrated.stats)
}

#[test]
fn the_second_copy_of_the_memory_travels_as_references() {
    // Every repeated data page goes as a copy (and the mixed content repeats a few
    // pages itself), whether its twin is on its channel (an ordinary COPY) or on the
    // other one (a ROUND_END COPY).
    for gap in [SAME_CHANNEL, OTHER_CHANNEL] {
        let ((copied, data), _) = migrate_into(CodecId::ZSTD, true, true, 0, Prefault::None, gap);
        // A twin on the other channel is found only once that channel sent it, which
        // it does in the same order, about as fast.
        let want = match gap {
            SAME_CHANNEL => data,
            _ => data * 9 / 10,
        };
        assert!(copied >= want, "gap {gap}: {copied} pages copied of {data}");
        assert!(
            copied < data * 12 / 10,
            "gap {gap}: {copied} pages copied of {data}"
        );
    }
}

#[test]
fn copies_of_other_channels_pages_stay_right_while_the_guest_writes() {
    for codec in [CodecId::LZ4, CodecId::ZSTD] {
        let ((copied, data), _) =
            migrate_into(codec, true, false, 30_000, Prefault::None, OTHER_CHANNEL);
        assert!(
            copied >= data / 2,
            "{codec:?}: {copied} pages copied of {data}"
        );
    }
}

#[test]
fn copies_stay_right_while_the_guest_writes() {
    for codec in [CodecId::LZ4, CodecId::ZSTD] {
        let (copied, _) = migrate(codec, true, false, 30_000);
        assert!(copied > 0, "{codec:?}: nothing copied");
    }
}

#[test]
fn no_copies_without_dedup_or_with_raw_pages() {
    assert_eq!(migrate(CodecId::ZSTD, false, true, 0).0, 0);
    assert_eq!(migrate(CodecId::RAW, true, false, 0).0, 0);
}

/// Copies into memory whose pages are installed with userfaultfd: a copy's target
/// never written before is installed from the copied bytes, a source is read as the
/// destination holds it.
#[test]
fn copies_into_memory_installed_with_userfaultfd() {
    for gap in [SAME_CHANNEL, OTHER_CHANNEL] {
        let ((copied, data), dst) =
            migrate_into(CodecId::ZSTD, true, false, 20_000, Prefault::Install, gap);
        assert!(
            copied >= data / 2,
            "gap {gap}: {copied} pages copied of {data}"
        );
        installed(&dst);
    }
}

fn installed(dst: &pagewire::DestinationStats) {
    match &dst.install_unavailable {
        None => assert!(dst.installed_pages > 0, "{dst:?}"),
        Some(why) => {
            assert!(
                std::env::var("PAGEWIRE_REQUIRE_USERFAULTFD").as_deref() != Ok("1"),
                "PAGEWIRE_REQUIRE_USERFAULTFD=1 but userfaultfd is unavailable: {why}"
            );
            eprintln!("skipped the install part: userfaultfd unavailable: {why}");
        }
    }
}

/// A page the delta cache holds that then goes as a COPY (its content became another
/// page's) must not be diffed against the cached version in the next round: the
/// destination holds the copy, not that version. With the delta codec, and with the
/// adaptive choice sending delta for cached pages (which keeps pages from the second
/// round on, so page 3 is sent once more first).
#[test]
fn a_page_sent_as_a_copy_leaves_the_delta_cache() {
    let mut auto = pagewire::AdaptiveConfig::default();
    auto.candidates = vec![(CodecId::LZ4, 0)];
    for (policy, before) in [
        (pagewire::CodecPolicy::from(CodecId::DELTA), 0),
        (pagewire::CodecPolicy::Auto(auto.with_delta()), 1),
    ] {
        copy_then_delta(policy, before);
    }
}

fn copy_then_delta(policy: pagewire::CodecPolicy, before: u32) {
    use pagewire::DirtyBitmap;
    let mem = memory(1);
    let pages = mem.pages(RegionId(0)).unwrap();
    let mut rng = Rng::new(77);
    let (mut v, mut x) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    page_content(&mut rng, &mut x);
    v.fill(0x11);
    v[..PAGE / 2].copy_from_slice(&x[PAGE / 2..]);
    x[..8].copy_from_slice(b"page x  ");
    for p in 0..pages {
        let mut page = vec![0u8; PAGE];
        page_content(&mut rng, &mut page);
        assert!(mem.write_pages(RegionId(0), p, &page));
    }
    // Page 3 holds `v`, page 9 holds `x`.
    assert!(mem.write_pages(RegionId(0), 3, &v));
    assert!(mem.write_pages(RegionId(0), 9, &x));
    let dcfg = DestinationConfig::new(session(12), key());
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut cfg = SourceConfig::new(session(12), key());
    cfg.codec = policy.clone();
    cfg.channels = 1;
    cfg.dedup = true;
    let mut src = Source::connect(addr, mem.clone(), cfg).unwrap();
    src.send_round(vec![(RegionId(0), DirtyBitmap::full(pages))], false)
        .unwrap();
    let send = |src: &mut Source, p: u64| {
        let bits = DirtyBitmap::new(pages);
        bits.set(p);
        src.send_round(vec![(RegionId(0), bits)], false).unwrap()
    };
    let page3 = |src: &mut Source| send(src, 3);
    for _ in 0..before {
        v[200] ^= 0x0f;
        assert!(mem.write_pages(RegionId(0), 3, &v));
        page3(&mut src);
    }
    // Page 9 sent again, alone: the dedup table's newest entry, so no later page can
    // have pushed it out of its bucket (two entries a bucket, keyed by a random key).
    send(&mut src, 9);
    // Page 3 becomes a copy of page 9.
    assert!(mem.write_pages(RegionId(0), 3, &x));
    let r = page3(&mut src);
    assert_eq!(
        r.pages.copied, 1,
        "{policy:?}: page 3 did not go as a copy: {r:?}"
    );
    // Then `v` with one byte changed: a one-byte delta against `v`.
    v[100] ^= 0xff;
    assert!(mem.write_pages(RegionId(0), 3, &v));
    page3(&mut src);
    src.send_round(Vec::new(), true).unwrap();
    assert!(src.complete().unwrap().is_committed());
    let stats = src.stats();
    // Page 3's version was kept (by delta, or by lz4 in the round before the copy).
    assert!(stats.engine.delta.unwrap().stored + stats.engine.delta.unwrap().misses >= 1);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(
        first_difference(&mem, &migrated.memory),
        None,
        "{policy:?}: {stats}"
    );
}
