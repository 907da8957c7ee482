//! Whole migrations over loopback: memory equal byte for byte while a writer keeps
//! dirtying the source.

mod common;

use std::time::Duration;

use common::*;
use pagewire::source::ChannelTransport;
use pagewire::{DestinationConfig, DestinationListener, Source, SourceConfig};
use pagewire_protocol::{Authentication, CodecId, SessionKey};
use pagewire_transport::session::Backend;

fn key() -> Authentication {
    Authentication::PreSharedKey(SessionKey::new(*b"migration test key, 32 bytes...").unwrap())
}

fn run(codec: CodecId, checksum: bool, channels: u16, auth: Authentication) {
    run_on(codec, checksum, channels, auth, Backend::Tcp);
}

fn run_on(codec: CodecId, checksum: bool, channels: u16, auth: Authentication, backend: Backend) {
    run_tls(codec, checksum, channels, auth, backend, false);
}

/// [`run_on`], inside TLS 1.3 when `tls` (certificates made for the run).
fn run_tls(
    codec: CodecId,
    checksum: bool,
    channels: u16,
    auth: Authentication,
    backend: Backend,
    tls: bool,
) {
    let src_mem = memory(32);
    fill(&src_mem, 7);
    let pki = tls.then(|| pagewire::tls::generate::pki("test CA", &["localhost"]).unwrap());
    let mut dcfg = DestinationConfig::new(session(1), auth.clone());
    if let Some(p) = &pki {
        dcfg.encryption = pagewire::Encryption::Tls(p.destination_config().unwrap());
    }
    dcfg.checksum = checksum;
    // A destination asked for io_uring gets it or fails: it never falls back silently.
    dcfg.backend = match backend {
        Backend::Uring { .. } => Backend::Uring {
            fallback_to_tcp: false,
        },
        b => b,
    };
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));

    let mut guest = guest(src_mem.clone(), 20_000, 3);
    let mut cfg = SourceConfig::new(session(1), auth);
    cfg.codec = codec.into();
    cfg.channels = channels;
    cfg.checksum = checksum;
    cfg.backend = backend;
    if let Some(p) = &pki {
        cfg.encryption = pagewire::Encryption::Tls(p.source_config("localhost").unwrap());
    }
    cfg.precopy.downtime_limit = Duration::from_millis(50);
    cfg.precopy.max_rounds = 8;
    let mut source = Source::connect(addr, src_mem.clone(), cfg).unwrap();
    let want = match backend {
        Backend::Uring { .. } => ChannelTransport::Uring,
        _ => ChannelTransport::Tcp,
    };
    assert_eq!(
        source.channel_transports(),
        vec![want; usize::from(channels)]
    );
    let mut log = guest.log();
    let mut vcpus = guest.vcpus();
    let cpu: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let mut devices =
        |out: &mut pagewire::DeviceStateWriter<'_>| -> Result<(), pagewire::DirtyLogError> {
            out.write_section("cpu", 0, &cpu)?;
            Ok(())
        };
    let stats = pagewire::migrate(&mut source, &mut log, &mut vcpus, &mut devices).unwrap();
    assert!(
        !guest.is_logging(),
        "dirty logging is off after the migration"
    );
    assert!(!guest.is_running(), "the guest stays paused after success");
    guest.stop();
    drop(source);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&src_mem, &migrated.memory), None);
    assert_eq!(migrated.device_state.len(), 1);
    assert_eq!(migrated.device_state[0].data.len(), 100_000);
    assert!(stats.rounds >= 2, "{stats}");
    assert!(guest.writes() > 0);
    assert!(stats.pages.total() >= src_mem.pages(pagewire_protocol::RegionId(0)).unwrap());
    // A sixth of the guest's pages are 0xCC: they travel as uniform runs whatever the
    // codec, and the destination counts them the same.
    assert!(stats.pages.uniform > 0, "{stats}");
    assert_eq!(migrated.stats.uniform_pages, stats.pages.uniform, "{stats}");
    assert_eq!(stats.status, "completed");
    if matches!(backend, Backend::Uring { .. }) {
        assert_eq!(stats.transport, "io_uring", "{stats}");
    }
    assert_eq!(stats.tls.encrypted, tls, "{stats}");
    if tls {
        // Every byte written went through TLS: sealed at least the wire bytes.
        assert!(stats.tls.sealed_bytes >= stats.wire_bytes, "{stats}");
        assert!(migrated.stats.tls_opened_bytes >= stats.wire_bytes);
    } else {
        assert_eq!(stats.tls.sealed_bytes + migrated.stats.tls_opened_bytes, 0);
    }
}

#[test]
fn encrypted_migration_over_tcp() {
    run_tls(CodecId::ZSTD, false, 2, key(), Backend::Tcp, true);
    run_tls(
        CodecId::RAW,
        true,
        2,
        Authentication::None,
        Backend::Tcp,
        true,
    );
}

#[test]
fn encrypted_migration_over_io_uring() {
    if !uring_available() {
        return;
    }
    let uring = Backend::Uring {
        fallback_to_tcp: false,
    };
    run_tls(CodecId::ZSTD, false, 2, key(), uring, true);
    run_tls(CodecId::RAW, false, 2, Authentication::None, uring, true);
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
fn io_uring_channels() {
    // The source may fall back to TCP, but must not have: `run_on` checks that every
    // channel of both sides is io_uring.
    if !uring_available() {
        return;
    }
    run_on(
        CodecId::ZSTD,
        false,
        2,
        Authentication::None,
        Backend::Uring {
            fallback_to_tcp: true,
        },
    );
    run_on(
        CodecId::RAW,
        true,
        2,
        Authentication::None,
        Backend::Uring {
            fallback_to_tcp: true,
        },
    );
}

#[test]
fn io_uring_zstd_with_a_small_engine_pool_completes() {
    // One engine request and two output buffers per channel: every buffer is soon held
    // by the io_uring channel until its send completes, so the worker must reap send
    // completions to get one back (it used to spin for ever instead).
    if !uring_available() {
        return;
    }
    within(Duration::from_secs(60), "the migration", || {
        let src_mem = memory(16);
        fill(&src_mem, 3);
        let uring = Backend::Uring {
            fallback_to_tcp: false,
        };
        let mut dcfg = DestinationConfig::new(session(4), Authentication::None);
        dcfg.backend = uring;
        let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
        let addr = listener.local_addr().unwrap();
        let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
        let mut cfg = SourceConfig::new(session(4), Authentication::None);
        cfg.codec = CodecId::ZSTD.into();
        cfg.backend = uring;
        cfg.queue_depth = 1;
        cfg.ack_timeout = Duration::from_secs(20);
        cfg.precopy.max_rounds = 2;
        let mut source = Source::connect(addr, src_mem.clone(), cfg).unwrap();
        assert_eq!(
            source.channel_transports(),
            vec![ChannelTransport::Uring; 2]
        );
        let mut g = guest(src_mem.clone(), 0, 1);
        let stats = migrate_sim(&mut source, &g).unwrap();
        g.stop();
        drop(source);
        let migrated = dst.join().unwrap().unwrap();
        assert_eq!(first_difference(&src_mem, &migrated.memory), None);
        assert!(stats.pages.compressed > 0, "{stats}");
    });
}

#[test]
fn delta_encoding() {
    run(CodecId::DELTA, false, 2, Authentication::None);
}

#[test]
fn the_bandwidth_cap_limits_wire_bytes_not_guest_bytes() {
    // 8 MiB of mixed memory compresses about 4x; capped at 40 Mbit/s on the wire.
    let src_mem = memory(8);
    fill(&src_mem, 5);
    let listener = DestinationListener::bind(
        loopback(),
        DestinationConfig::new(session(3), Authentication::None),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut cfg = SourceConfig::new(session(3), Authentication::None);
    cfg.bandwidth_limit = 40_000_000 / 8;
    cfg.precopy.max_rounds = 2;
    let mut source = Source::connect(addr, src_mem.clone(), cfg).unwrap();
    let mut g = guest(src_mem.clone(), 0, 1);
    let stats = migrate_sim(&mut source, &g).unwrap();
    g.stop();
    drop(source);
    dst.join().unwrap().unwrap();
    // An upper bound only: a slow machine can make the wire slower, never faster.
    // Allow the limiter's 20 ms burst and the handshake/layout bytes.
    let secs = stats.total_ms / 1e3;
    let allowed = 40e6 / 8.0 * (secs + 0.05) + 64.0 * 1024.0;
    assert!(
        (stats.wire_bytes as f64) <= allowed,
        "{} wire bytes in {secs:.2} s exceed the cap",
        stats.wire_bytes
    );
    // Compression moves more guest memory than the cap. Measured over the transfer
    // alone: on a loaded machine the setup (connecting, pre-faulting) can take a second
    // and says nothing about the cap.
    let transfer = (stats.total_ms - stats.setup_ms).max(1.0) / 1e3;
    assert!(stats.guest_bytes as f64 * 8.0 / transfer > 40e6, "{stats}");
}
