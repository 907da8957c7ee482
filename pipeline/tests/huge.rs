//! The default destination memory policy (`Prefault::HugeWhereDense`) end to end: a
//! guest whose pages are all written migrates into 2 MiB blocks advised for
//! transparent huge pages (and, where the kernel has THP on for `madvise`, backed by
//! them), one that holds its pages twice too (its copies come first), a guest with one
//! page written per 2 MiB into none, its zero pages left unbacked; all arrive byte
//! for byte.

mod common;

use std::time::Duration;

use common::*;
use pagewire::sim::Content;
use pagewire::{DestinationConfig, DestinationListener, GuestMemory, Source, SourceConfig};
use pagewire_protocol::{Authentication, CodecId, RegionId, SessionKey};

const MIB: u64 = 64;
const BLOCK: usize = 2 << 20;

fn key() -> Authentication {
    Authentication::PreSharedKey(SessionKey::new(*b"huge pages test key, 32 bytes...").unwrap())
}

/// Migrates `src` into fresh memory with the destination's defaults. The caller
/// compares the memory once it looked at what is backed (reading a page never written
/// maps it).
fn migrate(src: std::sync::Arc<GuestMemory>, codec: CodecId) -> pagewire::Migrated {
    let dcfg = DestinationConfig::new(session(12), key());
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let g = guest(src.clone(), 0, 3);
    let mut cfg = SourceConfig::new(session(12), key());
    cfg.codec = codec.into();
    cfg.channels = 2;
    cfg.precopy.downtime_limit = Duration::from_millis(50);
    cfg.precopy.max_rounds = 4;
    let mut source = Source::connect(addr, src.clone(), cfg).unwrap();
    migrate_sim(&mut source, &g).unwrap();
    drop(source);
    dst.join().unwrap().unwrap()
}

/// Whole 2 MiB blocks inside region 0 of `m`.
fn whole_blocks(m: &GuestMemory) -> u64 {
    let start = m.page_ptr(RegionId(0), 0).unwrap().as_ptr() as usize;
    let end = start + (MIB << 20) as usize;
    (end / BLOCK).saturating_sub(start.div_ceil(BLOCK)) as u64
}

/// Bytes of region 0 of `m` the kernel backs with transparent huge pages
/// (`AnonHugePages` of the mappings inside it in `/proc/self/smaps`).
fn huge_bytes(m: &GuestMemory) -> u64 {
    let start = m.page_ptr(RegionId(0), 0).unwrap().as_ptr() as u64;
    let end = start + (MIB << 20);
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            inside = a >= start && b <= end;
        } else if inside && first == "AnonHugePages:" {
            total += words
                .next()
                .and_then(|k| k.parse::<u64>().ok())
                .unwrap_or(0)
                << 10;
        }
    }
    total
}

/// Pages of region 0 of `m` the kernel backs (`mincore`).
fn resident_pages(m: &GuestMemory) -> usize {
    let start = m.page_ptr(RegionId(0), 0).unwrap();
    let mut vec = vec![0u8; (MIB << 20) as usize / PAGE];
    // SAFETY: region 0 is a mapping of MIB MiB from `start`; one byte per page.
    let rc = unsafe {
        nix::libc::mincore(
            start.as_ptr().cast(),
            (MIB << 20) as usize,
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    vec.iter().filter(|b| *b & 1 != 0).count()
}

/// Where THP is on for `madvise`: `enabled` is `always` or `madvise`.
fn thp_on() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"))
}

#[test]
fn a_dense_guest_moves_into_huge_pages() {
    for codec in [CodecId::RAW, CodecId::ZSTD] {
        let src = memory(MIB);
        pagewire::sim::fill(&src, Content::Text, 5);
        let m = migrate(src.clone(), codec);
        let blocks = whole_blocks(&m.memory);
        // Every whole block but those a frame reached first with a sliver of it.
        assert!(
            m.stats.huge_blocks + 2 >= blocks && m.stats.huge_blocks <= blocks,
            "{codec:?}: {} of {blocks} blocks advised",
            m.stats.huge_blocks
        );
        if thp_on() {
            // The kernel may find no free huge page for some blocks; not for none.
            let huge = huge_bytes(&m.memory);
            assert!(
                huge > 0,
                "{codec:?}: no huge page for {} blocks advised",
                m.stats.huge_blocks
            );
        } else {
            eprintln!("skipped: transparent huge pages are off on this kernel (never)");
        }
        assert_eq!(first_difference(&src, &m.memory), None);
    }
}

#[test]
fn a_guest_holding_its_pages_twice_moves_its_copies_into_huge_pages_too() {
    let src = memory(MIB);
    let half = (MIB << 20) / PAGE as u64 / 2;
    pagewire::sim::fill(&src, Content::Text, 8);
    let mut page = vec![0u8; PAGE];
    for p in 0..half {
        assert!(src.read_pages(RegionId(0), p, 1, &mut page));
        assert!(src.write_pages(RegionId(0), half + p, &page));
    }
    let m = migrate(src.clone(), CodecId::ZSTD);
    // The second half went as copies, sent before the rest of their frames: they
    // decide their blocks once the first half showed the guest dense.
    assert!(m.stats.copied_pages * 10 >= half * 9, "{:?}", m.stats);
    let blocks = whole_blocks(&m.memory);
    assert!(
        m.stats.huge_blocks + 4 >= blocks,
        "{} of {blocks} blocks advised",
        m.stats.huge_blocks
    );
    assert_eq!(first_difference(&src, &m.memory), None);
}

#[test]
fn a_sparse_guest_stays_on_small_pages_and_zero_pages_unbacked() {
    let src = memory(MIB);
    // One text page per 2 MiB, the rest zero.
    let mut rng = Rng::new(9);
    let mut page = vec![0u8; PAGE];
    for p in (0..(MIB << 20) / PAGE as u64).step_by(BLOCK / PAGE) {
        pagewire::sim::page_content(&mut rng, Content::Text, &mut page);
        assert!(src.write_pages(RegionId(0), p, &page));
    }
    let m = migrate(src.clone(), CodecId::ZSTD);
    assert_eq!(m.stats.huge_blocks, 0);
    assert_eq!(huge_bytes(&m.memory), 0);
    let resident = resident_pages(&m.memory);
    assert!(
        resident <= (MIB << 20) as usize / BLOCK,
        "{resident} pages backed for {} written",
        (MIB << 20) as usize / BLOCK
    );
    assert_eq!(first_difference(&src, &m.memory), None);
}
