//! Helpers shared by the scenario tests: a session over loopback, and pages to send.
#![allow(dead_code)]

use std::time::Duration;

use pagewire_protocol::{
    Authentication, Capabilities, CodecId, PageFrame, PageIndex, PageRun, RegionId, Round,
    SessionId, WireList,
};
use pagewire_transport::session::{self, Backend, Established, Listener, SessionConfig};
use pagewire_transport::{GuestMemory, OutFrame, Payload};

pub const PAGE: usize = 4096;

pub fn config(session: u8, channels: u16) -> SessionConfig {
    let mut caps = Capabilities::new(PAGE as u32);
    caps.max_pages = 512;
    caps.max_frame_bytes = 4 << 20;
    let mut cfg = SessionConfig::new(
        caps,
        SessionId([session; 16]),
        channels,
        Authentication::None,
    );
    cfg.handshake_timeout = Duration::from_secs(10);
    // Every receive in the tests is bounded in time.
    cfg.tcp.recv_timeout = Some(Duration::from_secs(60));
    cfg.uring.recv_timeout = Some(Duration::from_secs(60));
    cfg
}

/// Source and destination ends of `cfg.channels` loopback channels, in index order.
pub fn pair(cfg: &SessionConfig) -> (Vec<Established>, Vec<Established>) {
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let addr = l.local_addr().unwrap();
    let c = cfg.clone();
    let t = std::thread::spawn(move || session::connect(addr, &c).unwrap());
    let acc = l.accept_session(cfg, Duration::from_secs(20)).unwrap();
    (t.join().unwrap(), acc.channels)
}

/// Guest memory of `pages` pages, each filled with a pattern from its index and `seed`.
pub fn patterned(pages: usize, seed: u64) -> GuestMemory {
    let g = GuestMemory::anonymous(pages * PAGE).unwrap();
    let mut page = vec![0u8; PAGE];
    for p in 0..pages {
        let mut x = (p as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        for chunk in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        g.write(p * PAGE, &page);
    }
    g
}

/// Whether two regions hold the same bytes; returns the first differing page.
pub fn first_difference(a: &GuestMemory, b: &GuestMemory) -> Option<usize> {
    let (mut x, mut y) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    (0..a.len() / PAGE).find(|&p| {
        a.read(p * PAGE, &mut x);
        b.read(p * PAGE, &mut y);
        x != y
    })
}

/// A raw PAGES frame of pages `start..start + count` of `mem`, sent from guest memory.
pub fn raw_frame(mem: &GuestMemory, start: u64, count: u32) -> OutFrame {
    let runs = [PageRun {
        start: PageIndex(start),
        count,
    }];
    let header = PageFrame {
        codec: CodecId::RAW,
        region: RegionId(0),
        round: Round(1),
        data_runs: WireList::Slice(&runs),
        zero_runs: WireList::Slice(&[]),
        lengths: None,
        crc: None,
        payload: &[],
    };
    let slice = mem
        .slice(start as usize * PAGE, count as usize * PAGE)
        .unwrap();
    OutFrame::pages(&header, vec![Payload::Guest(slice)]).unwrap()
}

/// io_uring without fallback.
pub const URING: Backend = Backend::Uring {
    fallback_to_tcp: false,
};

/// Whether io_uring can be used here; when not, says "skipped: ..." past the
/// harness's output capture, so the skip is visible, or fails the test when
/// `PAGEWIRE_REQUIRE_URING=1` (CI sets it: io_uring works there and must be used).
pub fn uring_available() -> bool {
    match pagewire_transport::uring::probe(&Default::default()) {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var("PAGEWIRE_REQUIRE_URING").as_deref() != Ok("1"),
                "PAGEWIRE_REQUIRE_URING=1 but io_uring is unavailable: {e}"
            );
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: io_uring unavailable: {e}");
            false
        }
    }
}

/// The backends to run a scenario over: TCP, and io_uring where it is available.
pub fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Tcp];
    if uring_available() {
        b.push(URING);
    }
    b
}
