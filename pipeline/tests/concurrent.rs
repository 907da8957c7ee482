//! Two migrations with different session ids and keys arrive at once on one bound
//! destination listener, shared between threads.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pagewire::{
    DestinationConfig, DestinationListener, DirtyBitmap, GuestMemory, Migrated, MigrationError,
    Source, SourceConfig,
};
use pagewire_protocol::{Authentication, RegionId, SessionKey};

fn key(k: &[u8]) -> Authentication {
    Authentication::PreSharedKey(SessionKey::new(k.to_vec()).unwrap())
}

fn destination_config(n: u8, k: &[u8]) -> DestinationConfig {
    let mut cfg = DestinationConfig::new(session(n), key(k));
    cfg.idle_timeout = Duration::from_secs(10);
    cfg.accept_timeout = Duration::from_secs(30);
    cfg.max_sessions = 2;
    cfg
}

/// Migrates `mem` to `addr` as session `n`: a full round, then a paused round with
/// rewritten pages, then COMPLETE.
fn migrate(addr: std::net::SocketAddr, mem: Arc<GuestMemory>, n: u8, k: &[u8], channels: u16) {
    let mut cfg = SourceConfig::new(session(n), key(k));
    cfg.channels = channels;
    cfg.ack_timeout = Duration::from_secs(10);
    let mut src = Source::connect(addr, mem.clone(), cfg).unwrap();
    let all: Vec<(RegionId, DirtyBitmap)> = mem
        .region_ids()
        .map(|id| (id, DirtyBitmap::full(mem.pages(id).unwrap())))
        .collect();
    src.send_round(all, false).unwrap();
    let bits = DirtyBitmap::new(mem.pages(RegionId(0)).unwrap());
    let mut page = vec![0u8; PAGE];
    let mut rng = Rng::new(u64::from(n));
    for p in 0..300 {
        page_content(&mut rng, &mut page);
        assert!(mem.write_pages(RegionId(0), p, &page));
        bits.set(p);
    }
    let region1 = DirtyBitmap::new(mem.pages(RegionId(1)).unwrap());
    src.send_round(vec![(RegionId(0), bits), (RegionId(1), region1)], true)
        .unwrap();
    assert!(src.complete().unwrap().is_committed());
}

#[test]
fn two_migrations_with_different_sessions_share_one_listener() {
    within(
        Duration::from_secs(120),
        "two concurrent migrations",
        || {
            const KEY_A: &[u8] = b"migration a's pre-shared key";
            const KEY_B: &[u8] = b"migration b's other secret key";
            let cfg_a = destination_config(0x31, KEY_A);
            let cfg_b = destination_config(0x42, KEY_B);
            let l = Arc::new(DestinationListener::bind(loopback(), cfg_a).unwrap());
            let addr = l.local_addr().unwrap();
            let la = l.clone();
            let da = std::thread::spawn(move || -> Result<Migrated, MigrationError> {
                la.accept(None)?.wait()
            });
            let lb = l.clone();
            let db = std::thread::spawn(move || -> Result<Migrated, MigrationError> {
                lb.accept_with(&cfg_b, None)?.wait()
            });
            while l.accepting() < 2 {
                std::thread::sleep(Duration::from_millis(5));
            }
            let (mem_a, mem_b) = (memory(4), memory(6));
            fill(&mem_a, 1);
            fill(&mem_b, 2);
            let (ma, mb) = (mem_a.clone(), mem_b.clone());
            let sa = std::thread::spawn(move || migrate(addr, ma, 0x31, KEY_A, 2));
            let sb = std::thread::spawn(move || migrate(addr, mb, 0x42, KEY_B, 3));
            sa.join().unwrap();
            sb.join().unwrap();
            let got_a = da.join().unwrap().unwrap();
            let got_b = db.join().unwrap().unwrap();
            assert_eq!(got_a.final_round, 1);
            assert_eq!(got_b.final_round, 1);
            assert_eq!(first_difference(&mem_a, &got_a.memory), None);
            assert_eq!(first_difference(&mem_b, &got_b.memory), None);
            assert_eq!(l.stats().established, 5);
            assert_eq!(l.accepting(), 0);
        },
    );
}
