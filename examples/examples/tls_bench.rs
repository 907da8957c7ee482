//! What TLS costs a migration: the same memory migrated in clear and inside TLS 1.3,
//! for codec none (raw pages) and zstd, over loopback in one process, with the ratios
//! against the plaintext run of the same codec in the same run; and, as the bound for
//! raw pages, AES-128-GCM sealing and opening speed on one core (ring, rustls' crypto
//! provider here and the record layer's AEAD) against a plain `memcpy` of the same
//! bytes.
//!
//! ```sh
//! cargo run --release -p pagewire-examples --example tls_bench -- --memory 512 --repeat 3
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pagewire::sim::{self, Content, Guest, Pattern, WriterConfig};
use pagewire::tls::generate;
use pagewire::{
    Authentication, Backend, CodecId, DestinationConfig, DestinationListener, Encryption,
    GuestAddr, GuestMemory, MemoryLayout, RegionDesc, RegionId, SessionId, Source, SourceConfig,
    TlsConfig,
};

struct Cell {
    pages_per_s: f64,
    cpu_s_per_gib: f64,
    copied_per_page: f64,
}

fn migrate(
    memory: &Arc<GuestMemory>,
    codec: CodecId,
    tls: Option<&(TlsConfig, TlsConfig)>,
    backend: Backend,
    n: u8,
) -> anyhow::Result<Cell> {
    let session = SessionId([n; 16]);
    let mut dcfg = DestinationConfig::new(session, Authentication::None);
    let mut cfg = SourceConfig::new(session, Authentication::None);
    dcfg.backend = backend;
    cfg.backend = backend;
    if let Some((s, d)) = tls {
        dcfg.encryption = Encryption::Tls(d.clone());
        cfg.encryption = Encryption::Tls(s.clone());
    }
    let listener = DestinationListener::bind("127.0.0.1:0".parse()?, dcfg)?;
    let addr = listener.local_addr()?;
    let destination = std::thread::spawn(move || listener.accept(None)?.wait());
    // An idle guest: every cell moves exactly the same pages once.
    let mut guest = Guest::start(
        memory.clone(),
        WriterConfig {
            pages_per_s: 0,
            pattern: Pattern::Random,
            content: Content::Mixed,
            seed: 1,
            edit_bytes: 0,
        },
    );
    cfg.codec = codec.into();
    cfg.channels = 2;
    let mut source = Source::connect(addr, memory.clone(), cfg)?;
    let mut log = guest.log();
    let mut vcpus = guest.vcpus();
    let mut devices = |_: &mut pagewire::DeviceStateWriter<'_>| Ok(());
    let stats = pagewire::migrate(&mut source, &mut log, &mut vcpus, &mut devices)
        .map_err(|f| anyhow::anyhow!("migration failed: {}", f.error))?;
    guest.stop();
    drop(source);
    let migrated = destination
        .join()
        .map_err(|_| anyhow::anyhow!("destination panicked"))??;
    if sim::first_difference(memory, &migrated.memory).is_some() {
        bail!("destination differs from the source");
    }
    let gib = stats.guest_bytes as f64 / f64::from(1u32 << 30);
    let pages = stats.pages.total().max(1) as f64;
    Ok(Cell {
        pages_per_s: stats.pages_per_s,
        cpu_s_per_gib: (stats.cpu.seconds + migrated.stats.cpu.seconds) / gib,
        copied_per_page: (stats.tls.copied_bytes + migrated.stats.tls_copied_bytes) as f64 / pages,
    })
}

/// The suite the two configurations negotiate (an in-memory rustls handshake), and
/// AES-128-GCM from ring (rustls' provider here, and what pagewire's record layer
/// uses) sealing and opening `total` bytes in place, in 16 KiB records on this
/// thread, GB/s.
fn crypto_speed(tls: &(TlsConfig, TlsConfig), total: usize) -> anyhow::Result<(String, f64, f64)> {
    use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let (c, name) = tls.0.rustls_client().context("client config")?;
    let s = tls.1.rustls_server().context("server config")?;
    let mut client = rustls::ClientConnection::new(c.clone(), name.clone())?;
    let mut server = rustls::ServerConnection::new(s.clone())?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf)?;
        server.read_tls(&mut &buf[..])?;
        server.process_new_packets()?;
        buf.clear();
        server.write_tls(&mut buf)?;
        client.read_tls(&mut &buf[..])?;
        client.process_new_packets()?;
    }
    let suite = client
        .negotiated_cipher_suite()
        .map_or("none".into(), |s| format!("{:?}", s.suite()));
    let key = || LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7; 16]).expect("key"));
    let (sealer, opener) = (key(), key());
    let mut record = vec![0x5au8; (16 << 10) + 16];
    let (mut seal, mut open) = (Duration::ZERO, Duration::ZERO);
    let mut done = 0u64;
    while (done as usize) < total {
        let nonce = || {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&done.to_be_bytes());
            Nonce::assume_unique_for_key(n)
        };
        let t = Instant::now();
        let tag = sealer
            .seal_in_place_separate_tag(nonce(), Aad::empty(), &mut record[..16 << 10])
            .map_err(|_| anyhow::anyhow!("seal"))?;
        record[16 << 10..].copy_from_slice(tag.as_ref());
        seal += t.elapsed();
        let t = Instant::now();
        opener
            .open_in_place(nonce(), Aad::empty(), &mut record)
            .map_err(|_| anyhow::anyhow!("open"))?;
        open += t.elapsed();
        done += 16 << 10;
    }
    let gbs = |d: Duration| done as f64 / d.as_secs_f64() / 1e9;
    Ok((suite, gbs(seal), gbs(open)))
}

/// `memcpy` between two 256 MiB buffers (larger than any cache, as guest memory
/// is), GB/s.
fn memcpy_speed(total: usize) -> f64 {
    let src = vec![0x5au8; 256 << 20];
    let mut dst = vec![0u8; 256 << 20];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    let mut done = 0;
    while done < total {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        done += src.len();
    }
    done as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() -> anyhow::Result<()> {
    let mut memory_mib = 512u64;
    let mut repeat = 3usize;
    let mut backend = Backend::Tcp;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--memory" => memory_mib = val()?.parse()?,
            "--repeat" => repeat = val()?.parse()?,
            "--uring" => {
                backend = Backend::Uring {
                    fallback_to_tcp: false,
                }
            }
            "--help" | "-h" => {
                println!("tls_bench [--memory MIB (512)] [--repeat N (3)] [--uring]");
                return Ok(());
            }
            o => bail!("unknown option {o}"),
        }
    }
    let layout = MemoryLayout::new(
        4096,
        [RegionDesc {
            id: RegionId(0),
            backing_page_size: 2 << 20,
            guest_addr: GuestAddr(0),
            length: memory_mib << 20,
        }],
    )?;
    let memory = Arc::new(GuestMemory::anonymous(&layout)?);
    sim::fill(&memory, Content::Mixed, 42);
    let pki = generate::pki("bench CA", &["localhost"])?;
    let tls = (pki.source_config("localhost")?, pki.destination_config()?);
    println!(
        "{memory_mib} MiB of mixed memory, 2 channels over loopback ({}), idle guest; {repeat} repetitions, plain and TLS alternating",
        if backend == Backend::Tcp {
            "tcp"
        } else {
            "io_uring"
        }
    );
    let mut n = 0u8;
    for (codec, name) in [(CodecId::RAW, "none"), (CodecId::ZSTD, "zstd")] {
        let (mut plain, mut enc) = (Vec::new(), Vec::new());
        for r in 0..repeat {
            for tls_first in [r % 2 == 1, r % 2 == 0] {
                n = n.wrapping_add(1);
                let cell = migrate(&memory, codec, tls_first.then_some(&tls), backend, n)?;
                if tls_first {
                    enc.push(cell);
                } else {
                    plain.push(cell);
                }
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let col = |v: &[Cell], f: fn(&Cell) -> f64| median(&mut v.iter().map(f).collect());
        let (pp, ep) = (col(&plain, |c| c.pages_per_s), col(&enc, |c| c.pages_per_s));
        let (pc, ec) = (
            col(&plain, |c| c.cpu_s_per_gib),
            col(&enc, |c| c.cpu_s_per_gib),
        );
        let copied = col(&enc, |c| c.copied_per_page);
        println!(
            "codec {name:<5} plain: {pp:>9.0} pages/s {pc:.2} CPU-s/GiB | TLS: {ep:>9.0} pages/s {ec:.2} CPU-s/GiB, {copied:.0} B copied/page | TLS/plain: throughput {:.3}, CPU {:.3}",
            ep / pp,
            ec / pc
        );
        for (i, (p, e)) in plain.iter().zip(&enc).enumerate() {
            println!(
                "  run {i}: plain {:.0} pages/s {:.2} CPU-s/GiB, TLS {:.0} pages/s {:.2} CPU-s/GiB",
                p.pages_per_s, p.cpu_s_per_gib, e.pages_per_s, e.cpu_s_per_gib
            );
        }
    }
    let total = 1 << 30;
    let (suite, seal, open) = crypto_speed(&tls, total)?;
    let copy = memcpy_speed(total);
    println!(
        "one core: negotiated {suite}; ring AES-128-GCM seal {seal:.2} GB/s, open {open:.2} GB/s in place; memcpy {copy:.2} GB/s (seal/memcpy {:.3}, open/memcpy {:.3})",
        seal / copy,
        open / copy
    );
    Ok(())
}
