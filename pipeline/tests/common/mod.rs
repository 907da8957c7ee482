//! Shared pieces of the pipeline's scenario tests: guest memory with mixed content, a
//! dirty log driven by a writer thread that plays the guest, and loopback addresses.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use pagewire::GuestMemory;
#[allow(unused_imports)]
pub use pagewire::sim::{Content, Guest, Pattern, Rng, WriterConfig, first_difference};
use pagewire_protocol::{GuestAddr, MemoryLayout, RegionDesc, RegionId, SessionId};

pub fn fill(memory: &GuestMemory, seed: u64) {
    pagewire::sim::fill(memory, Content::Mixed, seed);
}

pub fn page_content(rng: &mut Rng, page: &mut [u8]) {
    pagewire::sim::page_content(rng, Content::Mixed, page);
}

/// A guest rewriting `pages_per_s` random pages per second.
pub fn guest(memory: Arc<GuestMemory>, pages_per_s: u64, seed: u64) -> Guest {
    Guest::start(
        memory,
        WriterConfig {
            pages_per_s,
            pattern: Pattern::Random,
            content: Content::Mixed,
            seed,
            edit_bytes: 0,
        },
    )
}

pub const PAGE: usize = 4096;

/// Two regions: `mib` MiB at 0 and 1 MiB at 4 GiB.
pub fn memory(mib: u64) -> Arc<GuestMemory> {
    let layout = MemoryLayout::new(
        PAGE as u32,
        [
            RegionDesc {
                id: RegionId(0),
                backing_page_size: PAGE as u32,
                guest_addr: GuestAddr(0),
                length: mib << 20,
            },
            RegionDesc {
                id: RegionId(1),
                backing_page_size: 2 << 20,
                guest_addr: GuestAddr(4 << 30),
                length: 1 << 20,
            },
        ],
    )
    .unwrap();
    Arc::new(GuestMemory::anonymous(&layout).unwrap())
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn session(n: u8) -> SessionId {
    SessionId([n; 16])
}

/// What a [`Proxy`] does to the source's bytes on their way to the destination.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Forward in small pieces, sleeping up to `max_us` before each (per-channel jitter).
    Delay { seed: u64, max_us: u64 },
    /// Cut connection number `channel` (both ways) after `bytes` source bytes.
    Kill { channel: usize, bytes: u64 },
    /// Cut every connection after each carried `bytes` source bytes.
    KillAll { bytes: u64 },
    /// Flip one bit of source byte number `at` on connection `channel`.
    Corrupt { channel: usize, at: u64 },
    /// Once some connection has carried `bytes` source bytes, stop reading and
    /// forwarding in both directions on every connection, sockets left open: a
    /// destination that stopped (SIGSTOP) or a link that went dark.
    Stall { bytes: u64 },
    /// Insert an extension frame (type 0x9a) after every CONFIRM and END_OF_ROUND the
    /// source sends and every READY and ACK the destination sends: both sides must
    /// skip them (PROTOCOL.md, "Extension frames").
    Extensions,
}

/// The extension frame a [`Fault::Extensions`] relay inserts.
pub const INSERTED_EXTENSION: [u8; 12] = [0x9a, 0x01, 0, 0, 4, 0, 0, 0, b'e', b'x', b't', b'!'];

/// A TCP relay on loopback between the source and the destination, one upstream
/// connection per accepted one (so connection order is channel order). Every thread
/// it starts ends when its sockets close or the proxy is dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stalled: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, fault: Fault) -> Proxy {
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind(loopback()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let stalled = Arc::new(std::sync::Mutex::new(None));
        let stalled2 = stalled.clone();
        let thread = std::thread::spawn(move || {
            let mut pumps = Vec::new();
            let mut index = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        down.set_nonblocking(false).unwrap();
                        let Ok(up) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        for s in [&down, &up] {
                            s.set_nodelay(true).unwrap();
                            s.set_read_timeout(Some(Duration::from_millis(200)))
                                .unwrap();
                        }
                        let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                        let (st, sl) = (stop2.clone(), stalled2.clone());
                        let me = index;
                        index += 1;
                        pumps.push(std::thread::spawn(move || {
                            pump(down, up, Some((fault, me)), &st, &sl)
                        }));
                        let (st, sl) = (stop2.clone(), stalled2.clone());
                        let back = matches!(fault, Fault::Stall { .. } | Fault::Extensions)
                            .then_some((fault, me));
                        pumps.push(std::thread::spawn(move || pump(u2, d2, back, &st, &sl)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for p in pumps {
                let _ = p.join();
            }
        });

        fn pump(
            from: std::net::TcpStream,
            to: std::net::TcpStream,
            fault: Option<(Fault, usize)>,
            stop: &AtomicBool,
            stalled: &std::sync::Mutex<Option<std::time::Instant>>,
        ) {
            use std::io::Write;
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0u64;
            let mut rng = Rng::new(match fault {
                Some((Fault::Delay { seed, .. }, i)) => seed ^ ((i as u64 + 1) * 0x9e37_79b9),
                _ => 1,
            });
            let (mut from, mut to) = (from, to);
            let cut = |a: &std::net::TcpStream, b: &std::net::TcpStream| {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            };
            let is_stalled = || stalled.lock().map(|s| s.is_some()).unwrap_or(true);
            if matches!(fault, Some((Fault::Extensions, _))) {
                forward_frames(&mut from, &mut to, stop);
                cut(&from, &to);
                return;
            }
            while !stop.load(Ordering::Relaxed) {
                if matches!(fault, Some((Fault::Stall { .. }, _))) && is_stalled() {
                    // Read nothing, forward nothing, close nothing (bounded by `stop`).
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let cap = match fault {
                    Some((Fault::Delay { .. }, _)) => 1 + rng.below(16 << 10) as usize,
                    _ => buf.len(),
                };
                let n = match read_some(&mut from, &mut buf[..cap]) {
                    Some(0) => continue,
                    Some(n) => n,
                    None => break,
                };
                let mut n = n;
                let cut_at = match fault {
                    Some((Fault::Kill { channel, bytes }, i)) if i == channel => Some(bytes),
                    Some((Fault::KillAll { bytes }, _)) => Some(bytes),
                    _ => None,
                };
                match fault {
                    Some((Fault::Delay { max_us, .. }, _)) => {
                        std::thread::sleep(Duration::from_micros(rng.below(max_us + 1)));
                    }
                    Some((Fault::Corrupt { channel, at }, i))
                        if i == channel && total <= at && at < total + n as u64 =>
                    {
                        buf[(at - total) as usize] ^= 0x10;
                    }
                    _ => {}
                }
                if let Some(bytes) = cut_at
                    && total + n as u64 >= bytes
                {
                    n = (bytes - total) as usize;
                    let _ = to.write_all(&buf[..n]);
                    cut(&from, &to);
                    return;
                }
                total += n as u64;
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                if let Some((Fault::Stall { bytes }, _)) = fault
                    && total >= bytes
                    && let Ok(mut s) = stalled.lock()
                {
                    s.get_or_insert_with(std::time::Instant::now);
                }
            }
            cut(&from, &to);
        }

        /// Reads what is there: `Some(0)` when the read timed out (nothing yet), `None`
        /// when the connection closed or failed.
        fn read_some(from: &mut std::net::TcpStream, buf: &mut [u8]) -> Option<usize> {
            use std::io::Read;
            match from.read(buf) {
                Ok(0) => None,
                Ok(n) => Some(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    Some(0)
                }
                Err(_) => None,
            }
        }

        /// Forwards whole frames, inserting [`INSERTED_EXTENSION`] after CONFIRM,
        /// READY, END_OF_ROUND and ACK.
        fn forward_frames(
            from: &mut std::net::TcpStream,
            to: &mut std::net::TcpStream,
            stop: &AtomicBool,
        ) {
            use std::io::Write;
            let mut pending: Vec<u8> = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            while !stop.load(Ordering::Relaxed) {
                let n = match read_some(from, &mut buf) {
                    Some(0) => continue,
                    Some(n) => n,
                    None => return,
                };
                pending.extend_from_slice(&buf[..n]);
                let mut at = 0;
                let mut out = Vec::new();
                while pending.len() - at >= 8 {
                    let len = u32::from_le_bytes(pending[at + 4..at + 8].try_into().unwrap());
                    let end = at + 8 + len as usize;
                    if pending.len() < end {
                        break;
                    }
                    out.extend_from_slice(&pending[at..end]);
                    if matches!(pending[at], 0x04 | 0x05 | 0x12 | 0x13) {
                        out.extend_from_slice(&INSERTED_EXTENSION);
                    }
                    at = end;
                }
                pending.drain(..at);
                if to.write_all(&out).is_err() {
                    return;
                }
            }
        }

        Proxy {
            addr,
            stop,
            stalled,
            thread: Some(thread),
        }
    }

    /// When a [`Fault::Stall`] began, if it did.
    pub fn stalled_at(&self) -> Option<std::time::Instant> {
        self.stalled.lock().ok().and_then(|s| *s)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether io_uring channels can be opened here. Unavailable: prints
/// "skipped: io_uring unavailable: <why>" and returns `false`, or panics when
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

/// Runs `f` on its own thread and returns its result, or panics after `limit`: a test
/// whose subject hangs fails instead of hanging (the thread is left behind).
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within {limit:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// A directory for Unix sockets, removed when dropped.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "pagewire-pipeline-{}-{}",
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

/// `pagewire::migrate` over the simulated guest `g` (its dirty log and vCPUs), with no
/// device state.
pub fn migrate_sim(
    source: &mut pagewire::Source,
    g: &Guest,
) -> Result<pagewire::MigrationStats, pagewire::Failed> {
    let (mut log, mut vcpus) = (g.log(), g.vcpus());
    pagewire::migrate(source, &mut log, &mut vcpus, &mut pagewire::NoDeviceState)
}
