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

/// Fills region 0 with mixed content, then copies its first half over its second;
/// returns the data pages (neither zero nor one byte repeated) of a half.
fn twice(mem: &pagewire::GuestMemory) -> u64 {
    fill(mem, 11);
    let pages = mem.pages(RegionId(0)).unwrap();
    let half = pages / 2;
    let mut page = vec![0u8; PAGE];
    let mut data = 0;
    for p in 0..half {
        assert!(mem.read_pages(RegionId(0), p, 1, &mut page));
        assert!(mem.write_pages(RegionId(0), half + p, &page));
        data += u64::from(page.iter().any(|b| *b != page[0]));
    }
    data
}

/// Migrates a guest whose memory is twice the same content, with `writes_per_s`
/// pages rewritten per second meanwhile; returns the source's and the destination's
/// copied pages and the data pages of a half.
fn migrate(codec: CodecId, dedup: bool, checksum: bool, writes_per_s: u64) -> (u64, u64) {
    migrate_into(codec, dedup, checksum, writes_per_s, Prefault::None).0
}

/// [`migrate`] into destination memory prepared with `prefault`; also returns the
/// destination's statistics.
fn migrate_into(
    codec: CodecId,
    dedup: bool,
    checksum: bool,
    writes_per_s: u64,
    prefault: Prefault,
) -> ((u64, u64), pagewire::DestinationStats) {
    let src_mem = memory(16);
    let data = twice(&src_mem);
    let mut dcfg = DestinationConfig::new(session(9), key());
    dcfg.checksum = checksum;
    dcfg.prefault = prefault;
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut g = guest(src_mem.clone(), writes_per_s, 5);
    let mut cfg = SourceConfig::new(session(9), key());
    cfg.codec = codec;
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
    ((stats.pages.copied, data), migrated.stats)
}

#[test]
fn the_second_copy_of_the_memory_travels_as_references() {
    let (copied, data) = migrate(CodecId::ZSTD, true, true, 0);
    // The second half of region 0 repeats the first; each page and its twin are 2048
    // pages apart, a whole number of chunks of the two channels' affinity (128
    // pages, `max_pages`) that is even, so on the same channel. Every data page of the
    // second half goes as a copy (and the mixed content repeats a few pages itself).
    assert!(copied >= data, "{copied} pages copied of {data}");
    assert!(copied < data * 12 / 10, "{copied} pages copied of {data}");
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
    let ((copied, data), dst) = migrate_into(CodecId::ZSTD, true, false, 20_000, Prefault::Install);
    assert!(copied >= data / 2, "{copied} pages copied of {data}");
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
