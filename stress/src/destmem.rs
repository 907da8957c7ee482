//! The destination's memory in a local run: fresh anonymous memory prepared as the
//! library's [`Prefault`] says, or memory populated beforehand and given to the
//! destination (a VMM that backs its guest RAM before the migration); and the
//! matching baseline, a plain-socket loop that copies the guest's size into fresh or
//! into populated memory over the same link.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pagewire::{DestinationMemory, GuestMemory, MemoryLayout, Prefault};

use crate::Link;

/// The order of Linux's free page reporting when this machine returns freed memory to
/// its host (a virtual machine whose balloon device reports free pages): blocks of
/// 2^order free pages go back to the host, so memory freed here and mapped fresh again
/// is faulted in twice on first touch, by this kernel and by the host. Figures into
/// fresh memory then measure the host as much as the migration. `None` when the kernel
/// has no free page reporting or no balloon device takes the reports.
pub fn free_page_reporting() -> Option<u32> {
    let order = "/sys/module/page_reporting/parameters/page_reporting_order";
    let order = std::fs::read_to_string(order).ok()?.trim().parse().ok()?;
    let balloon = std::fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon").ok()?;
    let mut devices = balloon.flatten();
    devices
        .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        .then_some(order)
}

/// What memory the destination writes into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DestMemory {
    /// Anonymous memory the destination maps itself (`DestinationMemory::Anonymous`).
    #[default]
    Fresh,
    /// Memory populated (every page written) before the migration, given to the
    /// destination (`DestinationMemory::Given`).
    Populated,
}

impl FromStr for DestMemory {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "fresh" => DestMemory::Fresh,
            "populated" => DestMemory::Populated,
            o => bail!("unknown destination memory {o:?}: fresh, populated"),
        })
    }
}

/// The library's pre-fault policy by its command-line name.
///
/// # Errors
/// An unknown name.
pub fn parse_prefault(s: &str) -> anyhow::Result<Prefault> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "none" => Prefault::None,
        "thread" => Prefault::Thread,
        "hugepages" | "thp" => Prefault::HugePages,
        "ahead" => Prefault::Ahead,
        "huge-where-dense" | "dense" => Prefault::HugeWhereDense,
        "install" | "uffd" => Prefault::Install,
        o => bail!(
            "unknown pre-fault policy {o:?}: none, thread, hugepages, huge-where-dense, ahead, \
             install"
        ),
    })
}

/// A pre-fault policy's command-line name.
pub fn prefault_name(p: Prefault) -> &'static str {
    match p {
        Prefault::None => "none",
        Prefault::Thread => "thread",
        Prefault::HugePages => "hugepages",
        Prefault::Ahead => "ahead",
        Prefault::HugeWhereDense => "huge-where-dense",
        Prefault::Install => "install",
        _ => "other",
    }
}

/// The memory to hand the destination for `layout`: `Anonymous`, or anonymous memory
/// whose every page was written beforehand.
///
/// # Errors
/// Mapping the memory.
pub fn destination_memory(
    kind: DestMemory,
    layout: &MemoryLayout,
) -> anyhow::Result<DestinationMemory> {
    Ok(match kind {
        DestMemory::Fresh => DestinationMemory::Anonymous,
        DestMemory::Populated => {
            let m = GuestMemory::anonymous(layout)?;
            touch(&m);
            DestinationMemory::Given(Arc::new(m))
        }
    })
}

/// Writes one byte of every page (the kernel backs each one).
fn touch(m: &GuestMemory) {
    for id in m.region_ids().collect::<Vec<_>>() {
        let pages = m.pages(id).unwrap_or(0);
        m.populate(id, 0, pages);
        // Where POPULATE_WRITE is missing, a write per page does the same.
        for p in 0..pages {
            if let Some(ptr) = m.page_ptr(id, p) {
                // SAFETY: `page_ptr` points at a whole page inside a live mapping that
                // nothing else uses yet.
                unsafe { ptr.as_ptr().write_volatile(0) };
            }
        }
    }
}

/// Bytes of `m` the kernel backs now (`mincore` over each region): what the
/// destination's guest memory costs in RAM after a migration. Pages never written stay
/// unbacked on fresh memory with 4 KiB faults; with transparent huge pages one written
/// page backs its whole 2 MiB block. 0 where `mincore` fails.
pub fn resident_bytes(m: &GuestMemory) -> u64 {
    let ps = u64::from(m.page_size());
    let mut total = 0;
    for id in m.region_ids().collect::<Vec<_>>() {
        let pages = m.pages(id).unwrap_or(0);
        let Some(start) = m.page_ptr(id, 0) else {
            continue;
        };
        // mincore counts in the kernel's base pages.
        // SAFETY: sysconf has no preconditions.
        let base = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = pages * ps;
        let mut vec = vec![0u8; len.div_ceil(base.max(1)) as usize];
        // SAFETY: `start..start + len` is the region's mapping (`page_ptr` of page 0 and
        // `pages` pages of `ps` bytes), `vec` holds one byte per base page of it.
        let rc = unsafe { libc::mincore(start.as_ptr().cast(), len as usize, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * base;
        }
    }
    total
}

/// A plain-socket loop that moves `bytes` over `link` with `channels` connections,
/// each reader `read`ing straight into its share of one anonymous mapping, fresh or
/// populated beforehand: what pagewire's raw path is compared with. Gbit/s of the
/// copy (the mappings are set up before the clock starts). The writers send one hot
/// 1 MiB buffer over and over, or, with `from_memory`, their share of a second
/// mapping of `bytes`, written beforehand: a source reads guest memory, which a hot
/// buffer leaves out.
///
/// # Errors
/// The sockets, the namespaces, the mappings.
pub fn socket_into_memory(
    link: &Link,
    channels: u16,
    bytes: u64,
    kind: DestMemory,
    from_memory: bool,
) -> anyhow::Result<f64> {
    let share = (bytes / u64::from(channels)) as usize & !4095;
    let layout = MemoryLayout::new(
        4096,
        [pagewire::RegionDesc {
            id: pagewire::RegionId(0),
            backing_page_size: 4096,
            guest_addr: pagewire::GuestAddr(0),
            length: (share * usize::from(channels)) as u64,
        }],
    )?;
    let mem = GuestMemory::anonymous(&layout)?;
    if kind == DestMemory::Populated {
        touch(&mem);
    }
    let (base, _) = mem
        .span(pagewire::RegionId(0), 0, 1)
        .context("the baseline's memory")?;
    let base = base.as_ptr() as usize;
    let source = if from_memory {
        let m = GuestMemory::anonymous(&layout)?;
        touch(&m);
        Some(m)
    } else {
        None
    };
    let source = source.as_ref();
    std::thread::scope(|s| -> anyhow::Result<f64> {
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
        let readers = s.spawn(move || -> anyhow::Result<Instant> {
            let listener = crate::sweep::listen_in_destination(link, &tx)?;
            std::thread::scope(|s2| -> anyhow::Result<()> {
                let mut readers = Vec::new();
                for i in 0..usize::from(channels) {
                    let (mut c, _) = listener.accept()?;
                    readers.push(s2.spawn(move || {
                        // SAFETY: connection `i` alone writes bytes `i * share ..
                        // (i + 1) * share` of the mapping, which outlives this scope.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut((base + i * share) as *mut u8, share)
                        };
                        c.read_exact(dst)
                    }));
                }
                for r in readers {
                    r.join()
                        .map_err(|_| anyhow::anyhow!("reader panicked"))?
                        .context("the baseline's reader")?;
                }
                Ok(())
            })?;
            Ok(Instant::now())
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .context("the baseline's reader did not bind")??;
        let start = Instant::now();
        let writers: Vec<_> = (0..usize::from(channels))
            .map(|i| {
                s.spawn(move || -> anyhow::Result<()> {
                    link.enter_source()?;
                    let mut c = TcpStream::connect(addr)?;
                    c.set_nodelay(true)?;
                    if let Some(m) = source {
                        let mut page = (i * share / 4096) as u64;
                        let end = ((i + 1) * share / 4096) as u64;
                        while page < end {
                            let n = (end - page).min(256);
                            let (p, len) = m
                                .span(pagewire::RegionId(0), page, n)
                                .context("the baseline's source memory")?;
                            // SAFETY: the span lies inside `m`, which outlives this
                            // scope, and nothing writes it while the loop runs.
                            c.write_all(unsafe { std::slice::from_raw_parts(p.as_ptr(), len) })?;
                            page += n;
                        }
                        return Ok(());
                    }
                    let buf = vec![0x5au8; 1 << 20];
                    let mut left = share;
                    while left > 0 {
                        let n = left.min(buf.len());
                        c.write_all(&buf[..n])?;
                        left -= n;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in writers {
            w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        let end = readers
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        let secs = end.duration_since(start).as_secs_f64();
        Ok((share * usize::from(channels)) as f64 * 8.0 / secs / 1e9)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkSpec;

    #[test]
    fn the_memory_baselines_move_their_bytes_on_loopback() {
        let link = Link::up(&LinkSpec::Loopback).unwrap();
        for (kind, from_memory) in [
            (DestMemory::Fresh, false),
            (DestMemory::Populated, false),
            (DestMemory::Populated, true),
        ] {
            let gbit = socket_into_memory(&link, 2, 8 << 20, kind, from_memory).unwrap();
            assert!(
                gbit.is_finite() && gbit > 0.0,
                "{kind:?} {from_memory}: {gbit}"
            );
        }
    }
}
