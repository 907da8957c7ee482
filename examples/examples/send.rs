//! A source that migrates the bytes of a file to a destination at an address: the
//! counterpart of `receive`, for a destination written from PROTOCOL.md alone (or any
//! other) to be tested against pagewire's real source, with no control channel beside
//! the migration's own.
//!
//! ```sh
//! cargo run --release --example send -- --to 127.0.0.1:PORT --key-file KEY \
//!     --session pagewire-spec-01 --image FILE [--codec auto|none|lz4|zstd|deflate|delta]
//!     [--level N] [--channels N] [--rounds N] [--out MEMORY]
//! ```
//!
//! The guest is one region of the file's size rounded up to whole 4 KiB pages (the
//! rest zero), at guest address 0, region id 0. Round 0 sends every page. Each further
//! round (`--rounds`, default 1 in all) first changes every 7th page's first 8 bytes
//! (page index and round, little-endian) and sends the pages it changed, so the
//! destination sees several rounds and, with `--codec delta`, delta frames. Then one
//! device-state section, `send-example`/0, of 1000 bytes (byte `i` is `i % 251`),
//! COMPLETE and COMMIT. `--out` writes the final memory, as the destination must hold
//! it.
//!
//! Prints one JSON line: `{"status":"committed","rounds","memory_bytes","crc32c",
//! "stats"}` (exit 0; `crc32c` of the final memory; `stats` are pagewire's
//! `MigrationStats` taken as `Source::complete` returned, with no downtime: no guest
//! is paused), `{"status":"unknown","error"}`
//! (COMMIT sent, ACK COMMITTED not received; exit 2) or `{"status":"failed","error"}`
//! (exit 1).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use pagewire::{
    Authentication, CodecId, CodecPolicy, DirtyBitmap, GuestAddr, GuestMemory, MemoryLayout,
    RegionDesc, RegionId, SessionId, Source, SourceConfig, Switchover,
};

const PAGE: u64 = 4096;

struct Args {
    to: SocketAddr,
    key_file: String,
    session: SessionId,
    image: String,
    codec: CodecPolicy,
    channels: u16,
    rounds: u32,
    out: Option<String>,
}

fn codec(name: &str, level: i32) -> anyhow::Result<CodecPolicy> {
    let id = match name {
        "auto" => return Ok(CodecPolicy::auto()),
        "auto+delta" => return Ok(CodecPolicy::auto_with_delta()),
        "none" | "raw" => CodecId::RAW,
        "lz4" => CodecId::LZ4,
        "zstd" => CodecId::ZSTD,
        "deflate" => CodecId::DEFLATE,
        "delta" => CodecId::DELTA,
        o => bail!("--codec {o:?}: auto, auto+delta, none, lz4, zstd, deflate or delta"),
    };
    Ok(CodecPolicy::fixed(id, level))
}

fn args() -> anyhow::Result<Args> {
    let mut a = std::env::args().skip(1);
    let (mut to, mut key_file, mut session, mut image, mut out) = (None, None, None, None, None);
    let (mut codec_name, mut level, mut channels, mut rounds) = ("auto".to_owned(), 1, 2, 1);
    while let Some(flag) = a.next() {
        let mut value = || a.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--to" => to = Some(value()?.parse().context("--to")?),
            "--key-file" => key_file = Some(value()?),
            "--session" => session = Some(pagewire_examples::cli::session_id(&value()?)?),
            "--image" => image = Some(value()?),
            "--codec" => codec_name = value()?,
            "--level" => level = value()?.parse().context("--level")?,
            "--channels" => channels = value()?.parse().context("--channels")?,
            "--rounds" => rounds = value()?.parse().context("--rounds")?,
            "--out" => out = Some(value()?),
            o => bail!("unknown argument {o:?}"),
        }
    }
    if rounds == 0 {
        bail!("--rounds: at least 1");
    }
    Ok(Args {
        to: to.context("--to ADDR")?,
        key_file: key_file.context("--key-file FILE")?,
        session: session.context("--session ID (16 bytes)")?,
        image: image.context("--image FILE")?,
        codec: codec(&codec_name, level)?,
        channels,
        rounds,
        out,
    })
}

/// The guest: one region holding the file's bytes.
fn guest(image: &[u8]) -> anyhow::Result<Arc<GuestMemory>> {
    let pages = (image.len() as u64).div_ceil(PAGE).max(1);
    let layout = MemoryLayout::new(
        PAGE as u32,
        [RegionDesc {
            id: RegionId(0),
            backing_page_size: PAGE as u32,
            guest_addr: GuestAddr(0),
            length: pages * PAGE,
        }],
    )?;
    let memory = GuestMemory::anonymous(&layout)?;
    let mut padded = image.to_vec();
    padded.resize((pages * PAGE) as usize, 0);
    if !memory.write_pages(RegionId(0), 0, &padded) {
        bail!("the image does not fit its region");
    }
    Ok(Arc::new(memory))
}

/// Changes every 7th page for `round` and returns the pages changed.
fn dirty(memory: &GuestMemory, pages: u64, round: u32) -> anyhow::Result<DirtyBitmap> {
    let bitmap = DirtyBitmap::new(pages);
    let mut page = vec![0u8; PAGE as usize];
    for p in (0..pages).step_by(7) {
        if !memory.read_pages(RegionId(0), p, 1, &mut page) {
            bail!("page {p} unreadable");
        }
        page[..4].copy_from_slice(&(p as u32).to_le_bytes());
        page[4..8].copy_from_slice(&round.to_le_bytes());
        if !memory.write_pages(RegionId(0), p, &page) {
            bail!("page {p} unwritable");
        }
        bitmap.set(p);
    }
    Ok(bitmap)
}

fn run(a: &Args) -> anyhow::Result<serde_json::Value> {
    let key = pagewire::key_from_file(&a.key_file)?;
    let image = std::fs::read(&a.image).with_context(|| format!("reading {}", a.image))?;
    let memory = guest(&image)?;
    let pages = memory.pages(RegionId(0)).unwrap_or(0);
    let mut cfg = SourceConfig::new(a.session, Authentication::PreSharedKey(key));
    cfg.codec = a.codec.clone();
    cfg.channels = a.channels;
    let mut source = Source::connect(a.to, memory.clone(), cfg)?;
    // With one round, that round is the paused one.
    source.send_round(vec![(RegionId(0), DirtyBitmap::full(pages))], a.rounds == 1)?;
    for round in 1..a.rounds {
        let changed = dirty(&memory, pages, round)?;
        let last = round + 1 == a.rounds;
        source.send_round(vec![(RegionId(0), changed)], last)?;
    }
    let state: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    source.send_device_state("send-example", 0, state)?;
    let switchover = source.complete()?;
    // Taken first: the copy and the file below are not the migration's time.
    let stats = source.stats();
    // Nothing changes the memory after its last round.
    let mut held = vec![0u8; (pages * PAGE) as usize];
    if !memory.read_pages(RegionId(0), 0, pages, &mut held) {
        bail!("the guest memory is unreadable");
    }
    if let Some(path) = &a.out {
        std::fs::write(path, &held).with_context(|| format!("writing {path}"))?;
    }
    match switchover {
        Switchover::Committed => Ok(serde_json::json!({
            "status": "committed",
            "rounds": a.rounds,
            "memory_bytes": held.len(),
            "crc32c": crc32c::crc32c(&held),
            "stats": serde_json::to_value(stats)?,
        })),
        Switchover::Unknown { error } => Ok(serde_json::json!({
            "status": "unknown",
            "error": error.to_string(),
        })),
    }
}

fn main() {
    match args().and_then(|a| run(&a)) {
        Ok(v) => {
            println!("{v}");
            if v["status"] != "committed" {
                std::process::exit(2);
            }
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({ "status": "failed", "error": pagewire_examples::cli::error_text(&e) })
            );
            std::process::exit(1);
        }
    }
}
