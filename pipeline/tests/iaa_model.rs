//! Whole migrations with the source's codec engine on the IAA backend over its device
//! model (software standing in for the device), under each injected fault: memory
//! equal byte for byte, the fallbacks and their causes in the statistics.

mod common;

use std::time::Duration;

use common::*;
use pagewire::{DestinationConfig, DestinationListener, Source, SourceConfig};
use pagewire_accel::BackendChoice;
use pagewire_protocol::{Authentication, CodecId};

fn migrate_on(accel: &str) -> pagewire::MigrationStats {
    migrate_both(accel, "software").0
}

/// Migrates with the source engine on `accel` and the destination's on `dst_accel`.
fn migrate_both(
    accel: &str,
    dst_accel: &str,
) -> (pagewire::MigrationStats, pagewire::DestinationStats) {
    let src_mem = memory(8);
    fill(&src_mem, 11);
    let mut dcfg = DestinationConfig::new(session(9), Authentication::None);
    dcfg.accel = dst_accel.parse::<BackendChoice>().unwrap();
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut guest = guest(src_mem.clone(), 5_000, 4);
    let mut cfg = SourceConfig::new(session(9), Authentication::None);
    cfg.codec = CodecId::DEFLATE_4K.into();
    cfg.channels = 1;
    cfg.accel = accel.parse::<BackendChoice>().unwrap();
    cfg.precopy.downtime_limit = Duration::from_millis(50);
    cfg.precopy.max_rounds = 6;
    let mut source = Source::connect(addr, src_mem.clone(), cfg).unwrap();
    let stats = migrate_sim(&mut source, &guest).unwrap();
    guest.stop();
    drop(source);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(
        first_difference(&src_mem, &migrated.memory),
        None,
        "{accel}: destination differs"
    );
    assert_eq!(stats.status, "completed");
    assert_eq!(stats.engine.backend, "iaa", "{accel}: {stats}");
    (stats, migrated.stats)
}

#[test]
fn the_destination_decodes_on_the_iaa_model_straight_into_guest_pages() {
    let (_, d) = migrate_both("model", "model");
    assert!(d.hw_decodes > 0, "{d:?}");
    assert_eq!(d.hw_fallbacks, 0, "{d:?}");
    // Faults on the destination's device: frames go to software, memory still equal.
    let (_, d) = migrate_both("model", "model:page-fault/2");
    assert!(d.hw_decodes > 0 && d.hw_fallbacks > 0, "{d:?}");
    assert_eq!(d.hw_fallbacks, d.hw_fallback_causes.page_fault, "{d:?}");
}

#[test]
fn a_migration_on_the_iaa_model_without_faults_uses_no_software() {
    let s = migrate_on("model");
    assert_eq!(s.engine.hw_fallbacks, 0, "{s}");
    let text = s.to_string();
    assert!(text.contains("codec engine:          iaa,"), "{text}");
}

#[test]
fn queue_full_frames_go_to_software_and_are_counted() {
    let s = migrate_on("model:queue-full/20");
    assert!(s.engine.hw_fallback_causes.queue_full > 0, "{s}");
    assert_eq!(
        s.engine.hw_fallbacks,
        s.engine.hw_fallback_causes.queue_full
    );
}

#[test]
fn page_faults_are_resolved_or_go_to_software_counted() {
    let s = migrate_on("model:page-fault/3");
    assert!(s.engine.hw_fallback_causes.page_fault > 0, "{s}");
    assert_eq!(
        s.engine.hw_fallbacks,
        s.engine.hw_fallback_causes.page_fault
    );
}

#[test]
fn output_overflows_send_pages_raw_without_a_fallback() {
    let s = migrate_on("model:overflow/4");
    assert_eq!(s.engine.hw_fallbacks, 0, "{s}");
}

#[test]
fn a_hung_descriptor_and_a_disabled_device_end_in_software_counted() {
    let s = migrate_on("model:hang/300");
    let c = s.engine.hw_fallback_causes;
    // Every job holding a hung descriptor times out; then the device is given up.
    assert!(c.timeout >= 1, "{s}");
    assert!(c.device_lost > 0, "{s}");
    assert_eq!(s.engine.hw_fallbacks, c.timeout + c.device_lost);
    let s = migrate_on("model:disable/300");
    let c = s.engine.hw_fallback_causes;
    assert!(c.device_lost > 0 && c.timeout == 0, "{s}");
    assert_eq!(s.engine.hw_fallbacks, c.device_lost);
}
