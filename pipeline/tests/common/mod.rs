//! Shared pieces of the pipeline's scenario tests: guest memory with mixed content, a
//! dirty log driven by a writer thread that plays the guest, and loopback addresses.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pagewire::protocol::{GuestAddr, MemoryLayout, RegionDesc, RegionId, SessionId};
use pagewire::{DirtyBitmap, DirtyLog, DirtyLogError, GuestMemory};

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

/// A small deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One page of mixed content: zeros, text, code-like bytes, random, sequences.
pub fn page_content(rng: &mut Rng, page: &mut [u8]) {
    match rng.below(5) {
        0 => page.fill(0),
        1 => {
            let text = b"the quick brown fox jumps over the lazy dog; migration moves memory. ";
            for (i, b) in page.iter_mut().enumerate() {
                *b = text[(i + rng.0 as usize % 7) % text.len()];
            }
        }
        2 => {
            for (i, b) in page.iter_mut().enumerate() {
                *b = [0x48, 0x89, 0xe5, 0x8b, 0x45, 0xfc, 0xc3, 0x90][i % 8] ^ (i / 512) as u8;
            }
        }
        3 => {
            for chunk in page.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
            }
        }
        _ => {
            for (i, chunk) in page.chunks_mut(8).enumerate() {
                chunk.copy_from_slice(&(i as u64 + rng.0 % 1000).to_le_bytes()[..chunk.len()]);
            }
        }
    }
}

pub fn fill(memory: &GuestMemory, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut page = vec![0u8; PAGE];
    for id in memory.region_ids().collect::<Vec<_>>() {
        for p in 0..memory.pages(id).unwrap() {
            page_content(&mut rng, &mut page);
            assert!(memory.write_pages(id, p, &page));
        }
    }
}

/// Compares every page of two memories; returns the first difference.
pub fn first_difference(a: &GuestMemory, b: &GuestMemory) -> Option<(RegionId, u64)> {
    let mut pa = vec![0u8; PAGE];
    let mut pb = vec![0u8; PAGE];
    for id in a.region_ids().collect::<Vec<_>>() {
        for p in 0..a.pages(id).unwrap() {
            assert!(a.read_pages(id, p, 1, &mut pa));
            assert!(b.read_pages(id, p, 1, &mut pb));
            if pa != pb {
                return Some((id, p));
            }
        }
    }
    None
}

/// The guest: a writer thread that rewrites pages and marks them dirty (write first,
/// mark second, as a dirty log sees it), and a [`DirtyLog`] over its marks.
pub struct Guest {
    pub memory: Arc<GuestMemory>,
    marks: Arc<Vec<(RegionId, DirtyBitmap)>>,
    running: Arc<Mutex<bool>>,
    stop: Arc<AtomicBool>,
    pub writes: Arc<AtomicU64>,
    pub pauses: Arc<AtomicU64>,
    pub resumes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Guest {
    /// Starts writing `pages_per_ms` pages per millisecond, within the first `hot` pages
    /// of region 0 (all pages when `hot` is 0).
    pub fn start(memory: Arc<GuestMemory>, pages_per_ms: u64, hot: u64, seed: u64) -> Guest {
        let marks: Arc<Vec<(RegionId, DirtyBitmap)>> = Arc::new(
            memory
                .region_ids()
                .map(|id| (id, DirtyBitmap::new(memory.pages(id).unwrap())))
                .collect(),
        );
        let running = Arc::new(Mutex::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (m, mk, r, s, w) = (
            memory.clone(),
            marks.clone(),
            running.clone(),
            stop.clone(),
            writes.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut rng = Rng(seed | 1);
            let mut page = vec![0u8; PAGE];
            let mut version = 0u64;
            while !s.load(Ordering::Relaxed) {
                for _ in 0..pages_per_ms.max(1) {
                    let Ok(g) = r.lock() else { return };
                    if !*g {
                        break;
                    }
                    let (id, bits) = &mk[(rng.below(8) == 0) as usize];
                    let pages = if hot > 0 && id.0 == 0 {
                        hot
                    } else {
                        bits.pages()
                    };
                    let p = rng.below(pages);
                    page_content(&mut rng, &mut page);
                    version += 1;
                    page[..8].copy_from_slice(&version.to_le_bytes());
                    assert!(m.write_pages(*id, p, &page));
                    bits.set(p);
                    w.fetch_add(1, Ordering::Relaxed);
                    drop(g);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Guest {
            memory,
            marks,
            running,
            stop,
            writes,
            pauses: Arc::new(AtomicU64::new(0)),
            resumes: Arc::new(AtomicU64::new(0)),
            thread: Some(thread),
        }
    }

    pub fn log(&self) -> Log {
        Log {
            marks: self.marks.clone(),
            running: self.running.clone(),
            pauses: self.pauses.clone(),
            resumes: self.resumes.clone(),
        }
    }

    /// Marks every page of region 0 in `[0, n)` dirty after rewriting it (hot pages).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    pub fn is_running(&self) -> bool {
        *self.running.lock().unwrap()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The VMM's dirty log over a [`Guest`].
pub struct Log {
    marks: Arc<Vec<(RegionId, DirtyBitmap)>>,
    running: Arc<Mutex<bool>>,
    pauses: Arc<AtomicU64>,
    resumes: Arc<AtomicU64>,
}

impl DirtyLog for Log {
    fn sync_and_clear(
        &mut self,
        region: RegionId,
        into: &DirtyBitmap,
    ) -> Result<(), DirtyLogError> {
        let (_, bits) = self
            .marks
            .iter()
            .find(|(id, _)| *id == region)
            .ok_or("unknown region")?;
        bits.drain_into(into);
        Ok(())
    }

    fn pause(&mut self) -> Result<(), DirtyLogError> {
        // Taking the lock waits for a write in progress; after it no write starts.
        *self.running.lock().map_err(|_| "poisoned")? = false;
        self.pauses.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DirtyLogError> {
        *self.running.lock().map_err(|_| "poisoned")? = true;
        self.resumes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
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
}

/// A TCP relay on loopback between the source and the destination, one upstream
/// connection per accepted one (so connection order is channel order). Every thread
/// it starts ends when its sockets close or the proxy is dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
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
                        let st = stop2.clone();
                        let me = index;
                        index += 1;
                        pumps.push(std::thread::spawn(move || {
                            pump(down, up, Some((fault, me)), &st)
                        }));
                        let st = stop2.clone();
                        pumps.push(std::thread::spawn(move || pump(u2, d2, None, &st)));
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
        ) {
            use std::io::{Read, Write};
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0u64;
            let mut rng = Rng(match fault {
                Some((Fault::Delay { seed, .. }, i)) => seed ^ ((i as u64 + 1) * 0x9e37_79b9),
                _ => 1,
            });
            let (mut from, mut to) = (from, to);
            let cut = |a: &std::net::TcpStream, b: &std::net::TcpStream| {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            };
            while !stop.load(Ordering::Relaxed) {
                let cap = match fault {
                    Some((Fault::Delay { .. }, _)) => 1 + rng.below(16 << 10) as usize,
                    _ => buf.len(),
                };
                let n = match from.read(&mut buf[..cap]) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue;
                    }
                    Err(_) => break,
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
            }
            cut(&from, &to);
        }

        Proxy {
            addr,
            stop,
            thread: Some(thread),
        }
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
