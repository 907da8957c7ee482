//! Frames encoded at once on the channel's thread (`Engine::encode_now`, what an
//! inline engine does: codec threads 0) against the same migration with a codec
//! thread (engine jobs): with dedup's staged copies, raw frames sent from guest memory
//! in place, CRC32C and a writer changing pages, the destination ends with the
//! source's memory byte for byte, and the statistics say which path each run took.

mod common;

use std::time::Duration;

use common::*;
use pagewire::{DestinationConfig, DestinationListener, Source, SourceConfig};
use pagewire_protocol::{Authentication, CodecId, RegionId, SessionKey};

fn key() -> Authentication {
    Authentication::PreSharedKey(SessionKey::new(*b"inline encode test key, 32 bytes").unwrap())
}

/// Migrates 16 MiB whose second half repeats its first (dedup's copies) while a
/// writer changes 3000 pages a second; returns the source's statistics.
fn migrate(
    codec: CodecId,
    codec_threads: usize,
    queue_depth: Option<usize>,
) -> pagewire::MigrationStats {
    let mem = memory(16);
    let pages = mem.pages(RegionId(0)).unwrap();
    let mut page = vec![0u8; PAGE];
    for p in pages / 2..pages {
        assert!(mem.read_pages(RegionId(0), p - pages / 2, 1, &mut page));
        assert!(mem.write_pages(RegionId(0), p, &page));
    }
    let mut dcfg = DestinationConfig::new(session(31), key());
    dcfg.checksum = true;
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut g = guest(mem.clone(), 3000, 7);
    let mut cfg = SourceConfig::new(session(31), key());
    cfg.codec = codec.into();
    cfg.channels = 2;
    cfg.checksum = true;
    cfg.dedup = true;
    cfg.codec_threads = Some(codec_threads);
    if let Some(d) = queue_depth {
        // Small frames too: many more frames than buffers.
        cfg.queue_depth = d;
        cfg.max_pages = 8;
    }
    cfg.precopy.downtime_limit = Duration::from_millis(50);
    cfg.precopy.max_rounds = 6;
    let mut source = Source::connect(addr, mem.clone(), cfg).unwrap();
    let stats = migrate_sim(&mut source, &g).unwrap();
    g.stop();
    drop(source);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&mem, &migrated.memory), None, "{stats}");
    stats
}

#[test]
fn frames_encoded_at_once_arrive_as_jobs_do() {
    within(Duration::from_secs(120), "inline encode", || {
        for codec in [CodecId::LZ4, CodecId::RAW, CodecId::DEFLATE] {
            let inline = migrate(codec, 0, None);
            let e = &inline.engine;
            assert!(e.at_once > 0, "{codec}: no frame encoded at once: {e:?}");
            // Jobs only when every output buffer waited for the channel.
            assert!(e.jobs <= e.at_once / 10, "{codec}: {e:?}");
            if codec != CodecId::RAW {
                assert!(inline.pages.copied > 0, "{codec}: no copies: {inline}");
            }
            let threaded = migrate(codec, 1, None);
            let e = &threaded.engine;
            assert_eq!(e.at_once, 0, "{codec}: codec threads never encode at once");
            assert!(e.jobs > 0, "{codec}: {e:?}");
        }
    });
}

/// Compressed payloads go to the transport and come back to the engine that wrote
/// them (`Payload::Owned`), which reuses them with no lock: the engines take from
/// their pools only the buffers they hold, however many frames they encode.
#[test]
fn sent_payloads_come_back_to_their_engine() {
    within(Duration::from_secs(120), "payloads back", || {
        let depth = 2;
        for (codec, threads) in [(CodecId::LZ4, 0), (CodecId::LZ4, 1), (CodecId::DEFLATE, 0)] {
            let stats = migrate(codec, threads, Some(depth));
            let e = &stats.engine;
            let frames = e.at_once + e.jobs;
            // Two channels, each with an engine of 2 × depth buffers.
            let pools = 2 * 2 * depth as u64;
            assert!(frames > 2 * pools, "{codec}: too few frames to tell: {e:?}");
            assert!(
                e.pool_takes <= pools,
                "{codec} ({threads} codec threads): {} buffers taken from the pools for {frames} frames: {e:?}",
                e.pool_takes
            );
        }
    });
}
