//! Helpers shared by the scenario tests: a session over loopback or a Unix socket, and
//! pages to send.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use pagewire_protocol::{
    Authentication, Capabilities, CodecId, PageFrame, PageIndex, PageRun, RegionId, Round,
    SessionId, WireList,
};
use pagewire_transport::session::{
    self, Backend, Established, Listener, SessionConfig, SessionError,
};
use pagewire_transport::{Endpoint, GuestMemory, OutFrame, Payload, Stream, StreamListener};

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

/// How the two ends of a session find each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// TCP over loopback, bound and connected by the transport.
    Loopback,
    /// A Unix socket in a temporary directory, bound and connected by the transport.
    Unix,
    /// A TCP listener bound by the caller, and streams connected by the caller.
    TcpGiven,
    /// A Unix listener bound by the caller, and streams connected by the caller.
    UnixGiven,
}

/// Opens the source's channels of a session.
type Connect = Box<dyn FnOnce(&SessionConfig) -> Result<Vec<Established>, SessionError> + Send>;

/// Source and destination ends of `cfg.channels` channels over `link`, in index order.
pub fn pair_over(link: Link, cfg: &SessionConfig) -> (Vec<Established>, Vec<Established>) {
    let dir = TempDir::new();
    let path = dir.path.join("dst.sock");
    let (l, connect): (Listener, Connect) = match link {
        Link::Loopback => return pair(cfg),
        Link::Unix => {
            let ep = Endpoint::Unix(path);
            let l = Listener::bind_endpoint(&ep, cfg).unwrap();
            assert_eq!(l.local_endpoint().unwrap(), ep);
            (l, Box::new(move |c| session::connect_to(&ep, c)))
        }
        Link::TcpGiven => {
            let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = std_l.local_addr().unwrap();
            let l = Listener::from_listener(std_l, cfg).unwrap();
            let n = cfg.channels;
            (
                l,
                Box::new(move |c| {
                    let s = (0..n)
                        .map(|_| Stream::from(std::net::TcpStream::connect(addr).unwrap()))
                        .collect();
                    session::connect_streams(s, c)
                }),
            )
        }
        Link::UnixGiven => {
            let std_l = std::os::unix::net::UnixListener::bind(&path).unwrap();
            let l = Listener::from_listener(StreamListener::from(std_l), cfg).unwrap();
            let n = cfg.channels;
            (
                l,
                Box::new(move |c| {
                    let s = (0..n)
                        .map(|_| {
                            Stream::from(std::os::unix::net::UnixStream::connect(&path).unwrap())
                        })
                        .collect();
                    session::connect_streams(s, c)
                }),
            )
        }
    };
    let c = cfg.clone();
    let t = std::thread::spawn(move || connect(&c).unwrap());
    let acc = l.accept_session(cfg, Duration::from_secs(20)).unwrap();
    (t.join().unwrap(), acc.channels)
}

/// A directory removed when dropped.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "pagewire-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
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
    let slice = mem
        .slice(start as usize * PAGE, count as usize * PAGE)
        .unwrap();
    raw_pages(start, count, vec![Payload::Guest(slice)])
}

/// A raw PAGES frame of pages `start..start + count` (region 0, round 1) carrying
/// `payload`.
pub fn raw_pages(start: u64, count: u32, payload: Vec<Payload>) -> OutFrame {
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
        uniform_runs: WireList::Slice(&[]),
        lengths: None,
        crc: None,
        payload: &[],
    };
    OutFrame::pages(&header, payload).unwrap()
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
