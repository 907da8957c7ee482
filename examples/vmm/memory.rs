//! Guest RAM: one or more regions (memslots) backed by memfd or anonymous memory,
//! through vm-memory's `GuestMemoryMmap`.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use anyhow::{Context, bail};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::guest;

/// Guest RAM.
pub type Ram = GuestMemoryMmap;

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A memfd per region, mapped shared.
    Memfd,
    /// Private anonymous memory.
    Anon,
}

/// The regions `mem_bytes` splits into: `slots` equal, contiguous, 2 MiB-aligned
/// ranges from guest address 0.
pub fn ranges(mem_bytes: u64, slots: u32) -> anyhow::Result<Vec<(u64, u64)>> {
    if slots == 0 || mem_bytes == 0 {
        bail!("memory and slots must be at least 1");
    }
    if mem_bytes > guest::MAX_MEM {
        bail!("at most {} MiB of guest memory", guest::MAX_MEM >> 20);
    }
    let per = mem_bytes / u64::from(slots);
    if !per.is_multiple_of(2 << 20) || per * u64::from(slots) != mem_bytes {
        bail!("each of the {slots} slots must be a multiple of 2 MiB");
    }
    if per < guest::data_start(mem_bytes) + (2 << 20) {
        bail!("the first slot must hold the guest's program, table and some data pages");
    }
    Ok((0..u64::from(slots)).map(|i| (i * per, per)).collect())
}

/// Allocates guest RAM.
///
/// # Errors
/// Invalid sizes, or the kernel refusing memfd or the mapping.
pub fn create(mem_bytes: u64, slots: u32, backing: Backing) -> anyhow::Result<Ram> {
    let mut regions = Vec::new();
    for (i, (start, len)) in ranges(mem_bytes, slots)?.into_iter().enumerate() {
        let file = match backing {
            Backing::Anon => None,
            Backing::Memfd => Some(FileOffset::new(memfd(&format!("guest-ram-{i}"), len)?, 0)),
        };
        regions.push((GuestAddress(start), len as usize, file));
    }
    GuestMemoryMmap::from_ranges_with_files(regions).context("mapping guest memory")
}

fn memfd(name: &str, len: u64) -> anyhow::Result<File> {
    let cname = CString::new(name)?;
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).context("sizing the memfd")?;
    Ok(file)
}

/// Host address, guest address and length of every region, in guest address order.
pub fn regions(ram: &Ram) -> Vec<(u64, u64, u64)> {
    ram.iter()
        .map(|r| {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map(|p| p as u64)
                .unwrap_or(0);
            (host, r.start_addr().0, r.len())
        })
        .collect()
}

/// CRC32C of every region and of all of them together, read with volatile copies.
/// Call only while no vCPU runs, or the digest describes no single instant.
pub fn digest(ram: &Ram) -> anyhow::Result<(u32, Vec<u32>)> {
    let mut buf = vec![0u8; 1 << 20];
    let mut all = 0u32;
    let mut per = Vec::new();
    for r in ram.iter() {
        let mut crc = 0u32;
        let mut off = 0u64;
        while off < r.len() {
            let n = (r.len() - off).min(buf.len() as u64) as usize;
            ram.read_slice(&mut buf[..n], r.start_addr().unchecked_add(off))
                .context("reading guest memory")?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            all = crc32c::crc32c_append(all, &buf[..n]);
            off += n as u64;
        }
        per.push(crc);
    }
    Ok((all, per))
}

use vm_memory::Address as _;

/// Writes the guest's boot image: GDT, page tables and program.
///
/// # Errors
/// The image does not fit guest memory.
pub fn load_guest(ram: &Ram, mem_bytes: u64) -> anyhow::Result<()> {
    for (i, d) in guest::gdt().iter().enumerate() {
        ram.write_obj(*d, GuestAddress(guest::GDT + 8 * i as u64))?;
    }
    for (addr, entry) in guest::page_tables(mem_bytes) {
        ram.write_obj(entry, GuestAddress(addr))?;
    }
    ram.write_slice(&guest::program()?, GuestAddress(guest::CODE))?;
    fill_data_pages(ram, mem_bytes)
}

/// Writes every data page as generation 0 ([`guest::page_word`]).
fn fill_data_pages(ram: &Ram, mem_bytes: u64) -> anyhow::Result<()> {
    const CHUNK: u64 = 256;
    let first = guest::data_start(mem_bytes) / guest::PAGE;
    let end = mem_bytes / guest::PAGE;
    let mut buf = vec![0u8; (CHUNK * guest::PAGE) as usize];
    let mut page = first;
    while page < end {
        let n = CHUNK.min(end - page);
        for (i, w) in buf[..(n * guest::PAGE) as usize]
            .chunks_exact_mut(8)
            .enumerate()
        {
            let i = i as u64;
            let p = page + i / (guest::PAGE / 8);
            w.copy_from_slice(&guest::page_word(p, 0, i % (guest::PAGE / 8)).to_le_bytes());
        }
        ram.write_slice(
            &buf[..(n * guest::PAGE) as usize],
            GuestAddress(page * guest::PAGE),
        )?;
        page += n;
    }
    Ok(())
}
