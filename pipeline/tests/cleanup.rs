//! No thread or socket is left behind by a migration, failed or not. Its own test
//! binary (one test), so no other test's threads or sockets are counted.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pagewire::{DestinationConfig, DestinationListener, Source, SourceConfig};
use pagewire_protocol::{Authentication, CodecId};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn sockets() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count()
    })
}

fn migrate_once(fault: Option<Fault>) -> bool {
    let mem = memory(8);
    fill(&mem, 3);
    let mut dcfg = DestinationConfig::new(session(9), Authentication::None);
    dcfg.idle_timeout = Duration::from_secs(5);
    let l = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = l.local_addr().unwrap();
    let dst = std::thread::spawn(move || l.accept(None)?.wait());
    let proxy = fault.map(|f| Proxy::start(addr, f));
    let target = proxy.as_ref().map_or(addr, |p| p.addr);
    let mut g = guest(mem.clone(), 5_000, 1);
    let mut cfg = SourceConfig::new(session(9), Authentication::None);
    cfg.codec = CodecId::LZ4.into();
    cfg.ack_timeout = Duration::from_secs(5);
    let mut src = Source::connect(target, mem, cfg).unwrap();
    let mut log = g.log();
    let mut vcpus = g.vcpus();
    let ok =
        pagewire::migrate(&mut src, &mut log, &mut vcpus, &mut pagewire::NoDeviceState).is_ok();
    drop(src);
    let dst_ok = dst.join().unwrap().is_ok();
    drop(proxy);
    g.stop();
    assert_eq!(ok, dst_ok, "source and destination agree on the outcome");
    ok
}

#[test]
fn nothing_is_left_behind() {
    let (t0, s0) = (threads(), sockets());
    assert!(migrate_once(None));
    assert!(!migrate_once(Some(Fault::Kill {
        channel: 0,
        bytes: 256 << 10
    })));
    assert!(!migrate_once(Some(Fault::KillAll { bytes: 100 << 10 })));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (t, s) = (threads(), sockets());
        if t <= t0 && s <= s0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {} threads (had {t0}), {} sockets (had {s0})",
            t,
            s
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
