//! Settings at their edges, as a VMM may pass them: every timeout `Duration::MAX`
//! ("wait forever") on both sides, settings that cannot work refused with a clear
//! error before anything connects, and a dirty bitmap that does not fit its region
//! refused before anything of its round is sent.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::*;
use pagewire::{
    Backend, DestinationConfig, DestinationListener, DirtyBitmap, GuestMemory, MemoryError,
    MigrationError, RegionId, RegionSpec, Source, SourceConfig,
};
use pagewire_protocol::{Authentication, CodecId};

/// A migration of 8 MiB in `codec` with a guest writing, every timeout of both sides at
/// `Duration::MAX`, the source's send queue off (so a full socket waits on the send
/// timeout at once), optionally inside TLS, and a silent connection to the listener
/// before the source's (which the handshake timeout covers). `Instant + Duration::MAX`
/// panics, so before every deadline was bounded this panicked: in the listener as soon
/// as a connection arrived, in the source's handshake and sends, at the source's first
/// ACK wait, and in the destination's receivers at COMPLETE.
fn forever(n: u8, backend: Backend, tls: bool, codec: CodecId) {
    let mem = memory(8);
    fill(&mem, u64::from(n));
    let pki = tls.then(|| pagewire::tls::generate::pki("test CA", &["localhost"]).unwrap());
    let mut dcfg = DestinationConfig::new(session(n), Authentication::None);
    dcfg.accept_timeout = Duration::MAX;
    dcfg.handshake_timeout = Duration::MAX;
    dcfg.idle_timeout = Duration::MAX;
    dcfg.evict_after = Duration::MAX;
    dcfg.evict_named_after = Duration::MAX;
    dcfg.backend = backend;
    if let Some(p) = &pki {
        dcfg.encryption = pagewire::Encryption::Tls(p.destination_config().unwrap());
    }
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    // Held open, silent, until the migration is over.
    let silent = TcpStream::connect(addr).unwrap();

    let g = guest(mem.clone(), 2_000, u64::from(n));
    let mut cfg = SourceConfig::new(session(n), Authentication::None);
    cfg.codec = codec.into();
    cfg.backend = backend;
    cfg.send_queue = 0;
    cfg.ack_timeout = Duration::MAX;
    cfg.send_timeout = Duration::MAX;
    cfg.connect_timeout = Duration::MAX;
    cfg.handshake_timeout = Duration::MAX;
    cfg.connect_retry_delay = Duration::MAX;
    cfg.precopy.max_rounds = 4;
    cfg.precopy.max_time = Duration::MAX;
    if let Some(p) = &pki {
        cfg.encryption = pagewire::Encryption::Tls(p.source_config("localhost").unwrap());
    }
    let result = within(Duration::from_secs(120), "the migration", move || {
        let mut source = Source::connect(addr, mem.clone(), cfg).map_err(|e| e.to_string())?;
        let stats = migrate_sim(&mut source, &g).map_err(|f| f.to_string())?;
        drop(source);
        let migrated = dst.join().unwrap().map_err(|e| e.to_string())?;
        Ok::<_, String>((stats, migrated, mem, g))
    });
    let (stats, migrated, mem, g) = result.unwrap();
    drop(silent);
    assert_eq!(stats.status, "completed");
    assert_eq!(first_difference(&mem, &migrated.memory), None);
    assert!(g.writes() > 0);
}

#[test]
fn every_timeout_may_be_duration_max_over_tcp() {
    forever(1, Backend::Tcp, false, CodecId::RAW);
}

#[test]
fn every_timeout_may_be_duration_max_over_tls() {
    forever(2, Backend::Tcp, true, CodecId::LZ4);
}

#[test]
fn every_timeout_may_be_duration_max_over_io_uring() {
    if !uring_available() {
        return;
    }
    // Raw frames: the destination receives their pages straight into guest memory,
    // with a wait of its own (which took `Duration::MAX` as an expired timespec).
    for (n, codec) in [(3, CodecId::RAW), (4, CodecId::LZ4)] {
        forever(
            n,
            Backend::Uring {
                fallback_to_tcp: false,
            },
            false,
            codec,
        );
    }
}

/// Changes one setting.
type Set<C> = fn(&mut C);

fn config_error(e: MigrationError, says: &str) {
    match e {
        MigrationError::Config(what) => assert!(what.contains(says), "{what}"),
        other => panic!("not a configuration error: {other}"),
    }
}

#[test]
fn unusable_settings_are_refused_before_anything_connects() {
    // Nothing listens here: a setting refused before connecting never learns that.
    let nowhere = loopback();
    let mem = memory(1);
    let cases: [(&str, Set<SourceConfig>); 9] = [
        ("queue_depth", |c| c.queue_depth = usize::MAX),
        ("delta_cache_pages", |c| {
            c.codec = CodecId::DELTA.into();
            c.delta_cache_pages = 0;
        }),
        // Its index alone would take tens of GiB, allocated after the channels opened.
        ("delta_cache_pages", |c| c.delta_cache_pages = 1 << 31),
        ("send_queue", |c| c.send_queue = usize::MAX),
        ("queue_depth", |c| c.queue_depth = 1 << 20),
        ("codec_threads", |c| c.codec_threads = Some(usize::MAX)),
        ("max_pages", |c| c.max_pages = 65537),
        ("max_rounds", |c| c.precopy.max_rounds = 0),
        ("send_timeout", |c| c.send_timeout = Duration::ZERO),
    ];
    for (says, set) in cases {
        let mut cfg = SourceConfig::new(session(9), Authentication::None);
        set(&mut cfg);
        let e = Source::connect(nowhere, mem.clone(), cfg).unwrap_err();
        config_error(e, says);
    }

    let dest_cases: [(&str, Set<DestinationConfig>); 6] = [
        // The listener accepts up to `max_pending` connections between two polls.
        ("max_pending", |c| c.max_pending = usize::MAX),
        // 1 GiB pages: the transfer page size is at most 2 MiB.
        ("page_size", |c| c.page_size = 1 << 30),
        ("page_size", |c| c.page_size = 12288),
        ("max_pages", |c| c.max_pages = 0),
        ("handshake_timeout", |c| {
            c.handshake_timeout = Duration::ZERO
        }),
        ("max_pending", |c| c.max_pending = 0),
    ];
    for (says, set) in dest_cases {
        let mut cfg = DestinationConfig::new(session(9), Authentication::None);
        set(&mut cfg);
        let e = DestinationListener::bind(loopback(), cfg).err().unwrap();
        config_error(e, says);
    }

    // Guest memory on 1 GiB pages is described with a transfer page size the protocol
    // carries; 1 GiB itself is refused (it made the source's frame limit panic).
    let mut backing = vec![0u8; 2 * 4096];
    let spec = RegionSpec {
        id: RegionId(0),
        host_addr: backing
            .as_mut_ptr()
            .wrapping_add(backing.as_ptr().align_offset(4096)),
        guest_addr: pagewire_protocol::GuestAddr(0),
        len: 4096,
        backing_page_size: 4096,
    };
    // SAFETY: refused before the region is used.
    let e = unsafe { GuestMemory::new(1 << 30, &[spec]) }.err().unwrap();
    assert!(matches!(e, MemoryError::PageSize(1073741824)), "{e}");
}

/// Misuse of the source's own API is refused before anything of it is sent, and the
/// session goes on: a bitmap past its region, a region the memory lacks, and
/// `complete()` after a round not sent paused.
#[test]
fn a_bitmap_past_its_region_is_refused_before_anything_of_its_round_is_sent() {
    let mem = memory(2);
    fill(&mem, 5);
    let mut dcfg = DestinationConfig::new(session(10), Authentication::None);
    dcfg.idle_timeout = Duration::from_secs(20);
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut cfg = SourceConfig::new(session(10), Authentication::None);
    cfg.codec = CodecId::LZ4.into();
    let mut source = Source::connect(addr, mem.clone(), cfg).unwrap();
    let pages = mem.pages(RegionId(0)).unwrap();

    // A page set past the region's end, and a region the memory lacks.
    let past = DirtyBitmap::new(pages + 64);
    past.set(pages + 3);
    let f = source
        .send_round(vec![(RegionId(0), past)], false)
        .unwrap_err();
    config_error(
        *f.error,
        &format!("sets page {}, past the region's {pages} pages", pages + 3),
    );
    // The pages handed back are those within the memory: none here.
    assert!(
        f.unacknowledged
            .iter()
            .all(|(id, b)| *id == RegionId(0) && b.pages() == pages && b.count() == 0),
        "{:?}",
        f.unacknowledged
    );
    let f = source
        .send_round(vec![(RegionId(7), DirtyBitmap::full(8))], false)
        .unwrap_err();
    config_error(*f.error, "RegionId(7)");

    // Nothing went out: the same source migrates everything after all.
    let all: Vec<(RegionId, DirtyBitmap)> = mem
        .region_ids()
        .map(|id| (id, DirtyBitmap::full(mem.pages(id).unwrap())))
        .collect();
    source.send_round(all, false).unwrap();
    // The guest was not paused for that round: what it dirtied since would be lost.
    let f = source.complete().unwrap_err();
    assert!(f.may_resume_source(), "{f:?}");
    config_error(*f.error, "a last round sent paused");
    // Nor after a paused round that was refused, even with an earlier one sent paused.
    source
        .send_round(vec![(RegionId(0), DirtyBitmap::new(pages))], true)
        .unwrap();
    let f = source
        .send_round(vec![(RegionId(7), DirtyBitmap::full(8))], true)
        .unwrap_err();
    config_error(*f.error, "RegionId(7)");
    let f = source.complete().unwrap_err();
    config_error(*f.error, "a last round sent paused");
    source
        .send_round(
            mem.region_ids()
                .map(|id| (id, DirtyBitmap::new(mem.pages(id).unwrap())))
                .collect(),
            true,
        )
        .unwrap();
    assert!(matches!(
        source.complete().unwrap(),
        pagewire::Switchover::Committed
    ));
    drop(source);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&mem, &migrated.memory), None);
}

/// A destination on 2 MiB transfer pages that accepts the most pages per frame
/// (65536) and decodes on a hardware engine (the IAA device model): the engine's
/// buffers are sized for the frames that can arrive (a frame is at most 64 MiB: 31
/// pages here), not for 65536 pages of 2 MiB (two buffers of 128 GiB each), whose
/// allocation failed and aborted the process when the source connected.
#[test]
fn a_hardware_decoder_on_2_mib_pages_is_sized_by_the_frame_limit() {
    let layout = pagewire_protocol::MemoryLayout::new(
        2 << 20,
        [pagewire_protocol::RegionDesc {
            id: RegionId(0),
            backing_page_size: 2 << 20,
            guest_addr: pagewire_protocol::GuestAddr(0),
            length: 64 << 20,
        }],
    )
    .unwrap();
    let mem = std::sync::Arc::new(GuestMemory::anonymous(&layout).unwrap());
    fill(&mem, 12);
    let mut dcfg = DestinationConfig::new(session(11), Authentication::None);
    dcfg.page_size = 2 << 20;
    dcfg.max_pages = 65536;
    dcfg.accel = "model".parse().unwrap();
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut cfg = SourceConfig::new(session(11), Authentication::None);
    cfg.codec = CodecId::LZ4.into();
    // As many as the destination: the negotiated 65536 pages are clamped by the
    // frame limit alone.
    cfg.max_pages = 65536;
    let g = guest(mem.clone(), 0, 12);
    let mut source = Source::connect(addr, mem.clone(), cfg).unwrap();
    migrate_sim(&mut source, &g).unwrap();
    drop(source);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&mem, &migrated.memory), None);
}
