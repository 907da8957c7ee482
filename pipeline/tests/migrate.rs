//! Whole migrations over loopback: memory equal byte for byte while a writer keeps
//! dirtying the source.

mod common;

use std::time::Duration;

use common::*;
use pagewire::protocol::{Authentication, CodecId, SessionKey};
use pagewire::{DestinationConfig, DestinationListener, DeviceSection, Source, SourceConfig};

fn key() -> Authentication {
    Authentication::PreSharedKey(SessionKey::new(*b"migration test key, 32 bytes...").unwrap())
}

fn run(codec: CodecId, checksum: bool, channels: u16, auth: Authentication) {
    let src_mem = memory(32);
    fill(&src_mem, 7);
    let mut dcfg = DestinationConfig::new(session(1), auth.clone());
    dcfg.checksum = checksum;
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));

    let mut guest = guest(src_mem.clone(), 20_000, 3);
    let mut cfg = SourceConfig::new(session(1), auth);
    cfg.codec = codec;
    cfg.channels = channels;
    cfg.checksum = checksum;
    cfg.precopy.downtime_limit = Duration::from_millis(50);
    cfg.precopy.max_rounds = 8;
    let mut source = Source::connect(addr, src_mem.clone(), cfg).unwrap();
    let mut log = guest.log();
    let stats = pagewire::migrate(&mut source, &mut log, &mut || {
        vec![DeviceSection {
            name: "cpu".into(),
            instance: 0,
            data: (0..100_000u32).map(|i| i as u8).collect(),
        }]
    })
    .unwrap();
    assert!(!guest.is_running(), "the guest stays paused after success");
    guest.stop();
    drop(source);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&src_mem, &migrated.memory), None);
    assert_eq!(migrated.device_state.len(), 1);
    assert_eq!(migrated.device_state[0].data.len(), 100_000);
    assert!(stats.rounds >= 2, "{stats}");
    assert!(guest.writes() > 0);
    assert!(stats.pages.total() >= src_mem.pages(pagewire::protocol::RegionId(0)).unwrap());
    assert_eq!(stats.status, "completed");
}

#[test]
fn zstd_two_channels_with_a_running_writer() {
    run(CodecId::ZSTD, false, 2, Authentication::None);
}

#[test]
fn lz4_with_checksums_and_authentication() {
    run(CodecId::LZ4, true, 2, key());
}

#[test]
fn deflate_three_channels() {
    run(CodecId::DEFLATE, false, 3, Authentication::None);
}

#[test]
fn raw_pages_zero_copy_from_guest_memory() {
    run(CodecId::RAW, false, 2, Authentication::None);
}

#[test]
fn delta_encoding() {
    run(CodecId::DELTA, false, 2, Authentication::None);
}
