//! A destination that receives one migration into memory of its own and writes that
//! memory to a file: the other end of `protocol/conformance/source_from_spec.py`, a
//! source written from PROTOCOL.md alone, which compares the file with the memory it
//! meant to send.
//!
//! ```sh
//! cargo run --release --example receive -- --listen 127.0.0.1:0 --key-file KEY \
//!     --session pagewire-spec-01 --out MEMORY [--channels N] [--max-memory BYTES] \
//!     [--transport tcp|uring]
//! ```
//!
//! `--channels` and `--max-memory` set the destination's limits on the channels of the
//! session and the guest memory a LAYOUT may ask for (default 16 GiB). `--transport
//! uring` receives each channel's frames through io_uring instead of blocking TCP
//! reads (the wire is the same; it fails where io_uring cannot be used).
//!
//! Prints `listening on ADDR` once bound, then one JSON line: `{"status":"completed",
//! "final_round", "regions": [{"id", "bytes"}], "device_state": [{"name", "instance",
//! "len", "crc32c"}], "stats"}` (exit 0) or `{"status":"failed","error"}` (exit 1). The
//! memory file holds every region's bytes in region-id order.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use pagewire::{
    Authentication, Backend, DestinationConfig, DestinationListener, Migrated, SessionId,
};

struct Args {
    listen: SocketAddr,
    key_file: String,
    session: SessionId,
    out: String,
    channels: Option<u16>,
    max_memory: Option<u64>,
    uring: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = std::env::args().skip(1);
    let (mut listen, mut key_file, mut session, mut out, mut channels, mut max_memory) =
        (None, None, None, None, None, None);
    let mut uring = false;
    while let Some(flag) = a.next() {
        let mut value = || a.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?.parse().context("--listen")?),
            "--key-file" => key_file = Some(value()?),
            "--session" => session = Some(pagewire_examples::cli::session_id(&value()?)?),
            "--out" => out = Some(value()?),
            "--channels" => channels = Some(value()?.parse().context("--channels")?),
            "--max-memory" => max_memory = Some(value()?.parse().context("--max-memory")?),
            "--transport" => {
                uring = match value()?.as_str() {
                    "tcp" => false,
                    "uring" => true,
                    t => bail!("--transport {t:?}: tcp or uring"),
                }
            }
            o => bail!("unknown argument {o:?}"),
        }
    }
    Ok(Args {
        listen: listen.context("--listen ADDR")?,
        key_file: key_file.context("--key-file FILE")?,
        session: session.context("--session ID (16 bytes)")?,
        out: out.context("--out FILE")?,
        channels,
        max_memory,
        uring,
    })
}

/// Writes every region of the migrated memory to `path`, in region-id order.
fn dump(m: &Migrated, path: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let memory = &m.memory;
    let ps = u64::from(memory.page_size());
    let mut regions = Vec::new();
    let mut ids: Vec<_> = memory.region_ids().collect();
    ids.sort_by_key(|r| r.0);
    let mut buf = vec![0u8; 256 * ps as usize];
    for r in ids {
        let pages = memory.pages(r).unwrap_or(0);
        let mut p = 0;
        while p < pages {
            let n = (pages - p).min(256);
            let part = &mut buf[..(n * ps) as usize];
            if !memory.read_pages(r, p, n, part) {
                bail!("region {} pages {p}..{} unreadable", r.0, p + n);
            }
            file.write_all(part)?;
            p += n;
        }
        regions.push(serde_json::json!({ "id": r.0, "bytes": pages * ps }));
    }
    file.flush()?;
    Ok(regions)
}

fn run(a: &Args) -> anyhow::Result<serde_json::Value> {
    let key = pagewire::key_from_file(&a.key_file)?;
    let auth = Authentication::PreSharedKey(key);
    let mut cfg = DestinationConfig::new(a.session, auth);
    if let Some(n) = a.channels {
        cfg.limits.max_channels = n;
    }
    if let Some(n) = a.max_memory {
        cfg.limits.max_guest_bytes = n;
    }
    if a.uring {
        cfg.backend = Backend::Uring {
            fallback_to_tcp: false,
        };
    }
    let listener = DestinationListener::bind(a.listen, cfg)?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let migrated = listener.accept(None)?.wait()?;
    let regions = dump(&migrated, &a.out)?;
    let sections: Vec<_> = migrated
        .device_state
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "instance": s.instance,
                "len": s.data.len(),
                "crc32c": crc32c::crc32c(&s.data),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "status": "completed",
        "final_round": migrated.final_round,
        "regions": regions,
        "device_state": sections,
        "stats": serde_json::to_value(&migrated.stats)?,
    }))
}

fn main() {
    let result = args().and_then(|a| run(&a));
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({ "status": "failed", "error": pagewire_examples::cli::error_text(&e) })
            );
            std::process::exit(1);
        }
    }
}
