//! A whole migration with the source's codec engine on QAT, through the QAT stand-in
//! library (qatlib's C interface over software deflate: not a device). Its own test
//! binary: it points `PAGEWIRE_QATLIB` at the stand-in before anything else runs.

mod common;

use std::time::Duration;

use common::*;
use pagewire::{BackendChoice, DestinationConfig, DestinationListener, Source, SourceConfig};
use pagewire_protocol::{Authentication, CodecId};

#[test]
fn a_migration_on_qat_is_byte_for_byte_equal_and_counts_its_fallbacks() {
    // SAFETY: this binary's only test sets the variables before it starts a thread.
    unsafe {
        std::env::set_var("PAGEWIRE_QATLIB", "standin");
        // Every 40th submission answers CPA_STATUS_RESTARTING: those jobs go to software.
        std::env::set_var("PAGEWIRE_QAT_STANDIN_FAULT", "restarting:40");
    }
    let src_mem = memory(32);
    fill(&src_mem, 11);
    let dcfg = DestinationConfig::new(session(1), Authentication::None);
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut guest = guest(src_mem.clone(), 20_000, 5);
    let mut cfg = SourceConfig::new(session(1), Authentication::None);
    cfg.codec = CodecId::DEFLATE.into();
    cfg.channels = 2;
    cfg.accel = BackendChoice::Qat;
    cfg.precopy.downtime_limit = Duration::from_millis(50);
    cfg.precopy.max_rounds = 8;
    let mut source = Source::connect(addr, src_mem.clone(), cfg).unwrap();
    let mut log = guest.log();
    let mut vcpus = guest.vcpus();
    let mut devices =
        |_: &mut pagewire::DeviceStateWriter<'_>| -> Result<(), pagewire::DirtyLogError> { Ok(()) };
    let stats = pagewire::migrate(&mut source, &mut log, &mut vcpus, &mut devices).unwrap();
    guest.stop();
    drop(source);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&src_mem, &migrated.memory), None);
    assert_eq!(stats.engine.backend, "qat", "{stats}");
    assert!(stats.engine.hw_fallbacks > 0, "{stats}");
    assert_eq!(
        stats.engine.hw_fallbacks, stats.engine.hw_fallback_causes.device_error,
        "{stats}"
    );
    assert!(stats.pages.compressed > 0, "{stats}");
}
