//! Live-migrates a simulated guest to a destination in the same process over loopback
//! (or a Unix socket with `--unix PATH`), verifies the destination byte for byte, and
//! prints the statistics.
//!
//! ```sh
//! cargo run --release -p pagewire-examples --example demo -- --help
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pagewire::sim::{self, Content, Guest, Pattern, WriterConfig};
use pagewire::{
    Authentication, Backend, CodecId, DestinationConfig, DestinationListener, Encryption, Endpoint,
    GuestAddr, GuestMemory, MemoryLayout, RegionDesc, RegionId, SessionId, SessionKey, Source,
    SourceConfig,
};
use pagewire_examples::tls::{self, TlsArgs};

const HELP: &str = "\
pagewire demo: live-migrate a simulated guest over loopback (or a Unix socket) and print
the statistics

USAGE: demo [OPTIONS]

  --memory MIB          guest memory size (default 1024)
  --fill KIND           mixed | zero | random | text (default mixed)
  --fill-from FILE      fill memory from FILE's bytes (repeated), e.g. a memory dump
  --dirty-rate N        pages the guest rewrites per second (default 20000)
  --dirty-pattern P     random | sequential | hot:N (default random)
  --channels N          channels (default 2)
  --codec C             zstd | lz4 | deflate | deflate-4k | delta | raw | none | auto |
                        auto+delta (default auto: chosen per frame from the measured
                        link, codecs and receiver; auto+delta also sends delta for
                        cached pages; deflate-4k with an IAA --accel)
  --level N             codec level (zstd default 1, deflate 1)
  --accel A             codec engine backend on both sides: auto | software | iaa |
                        iaa:/dev/iax/wqX.Y | vfio:PCI_ADDRESS | model |
                        model:FAULT[/N] (the IAA device model, injecting FAULT on every
                        Nth descriptor: queue-full, page-fault, overflow, hang,
                        disable) | qat (default auto: hardware if usable, else
                        software). IAA runs deflate-4k (and deflate at 4 KiB pages);
                        PAGEWIRE_QATLIB=standin runs qat on the QAT stand-in library
                        (software behind qatlib's interface, not a device)
  --probe               list the IAA devices and work queues found, say why any is
                        unusable, and exit
  --transport T         tcp | uring (default tcp; uring falls back to tcp if unusable)
  --unix PATH           migrate over a Unix socket at PATH (must not exist; removed
                        afterwards) instead of TCP loopback; the ceiling is measured
                        over a Unix socket at PATH.ceiling
  --bandwidth MBIT      wire bandwidth cap in Mbit/s (default: none)
  --downtime MS         downtime limit (default 300)
  --max-rounds N        pre-copy round cap (default 30)
  --checksum            CRC32C on every page frame
  --timeout SECS        source send and ACK timeout (default 30)
  --key TEXT            authenticate with this pre-shared key (16 bytes or more)
  --no-baseline         skip the plain-socket ceiling measurement
  --json                print the statistics as JSON

TLS (both sides in this process; with PEM files, one identity serves both):
";

struct Args {
    memory_mib: u64,
    fill: Content,
    fill_from: Option<String>,
    dirty_rate: u64,
    pattern: Pattern,
    channels: u16,
    codec: Option<CodecId>,
    /// `--codec auto`.
    auto: bool,
    /// `--codec auto+delta`.
    auto_delta: bool,
    level: Option<i32>,
    uring: bool,
    accel: pagewire::BackendChoice,
    unix: Option<PathBuf>,
    bandwidth_mbit: u64,
    downtime_ms: u64,
    max_rounds: u32,
    checksum: bool,
    timeout_s: u64,
    key: Option<String>,
    baseline: bool,
    json: bool,
    tls: TlsArgs,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        memory_mib: 1024,
        fill: Content::Mixed,
        fill_from: None,
        dirty_rate: 20_000,
        pattern: Pattern::Random,
        channels: 2,
        codec: None,
        auto: false,
        auto_delta: false,
        level: None,
        uring: false,
        accel: pagewire::BackendChoice::Auto,
        unix: None,
        bandwidth_mbit: 0,
        downtime_ms: 300,
        max_rounds: 30,
        checksum: false,
        timeout_s: 30,
        key: None,
        baseline: true,
        json: false,
        tls: TlsArgs::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--help" | "-h" => {
                print!("{HELP}{}", tls::HELP);
                std::process::exit(0);
            }
            "--memory" => a.memory_mib = val()?.parse()?,
            "--fill" => {
                a.fill = match val()?.as_str() {
                    "mixed" => Content::Mixed,
                    "zero" => Content::Zero,
                    "random" => Content::Random,
                    "text" => Content::Text,
                    o => bail!("unknown fill {o}"),
                }
            }
            "--fill-from" => a.fill_from = Some(val()?),
            "--dirty-rate" => a.dirty_rate = val()?.parse()?,
            "--dirty-pattern" => {
                let v = val()?;
                a.pattern = match v.as_str() {
                    "random" => Pattern::Random,
                    "sequential" => Pattern::Sequential,
                    h if h.starts_with("hot:") => Pattern::Hot(h[4..].parse()?),
                    o => bail!("unknown pattern {o}"),
                }
            }
            "--channels" => a.channels = val()?.parse()?,
            "--codec" => {
                let name = val()?;
                a.auto_delta = name == "auto+delta";
                a.codec = Some(match name.as_str() {
                    "zstd" => CodecId::ZSTD,
                    "lz4" => CodecId::LZ4,
                    "deflate" => CodecId::DEFLATE,
                    "deflate-4k" => CodecId::DEFLATE_4K,
                    "delta" => CodecId::DELTA,
                    "raw" | "none" => CodecId::RAW,
                    "auto" | "auto+delta" => {
                        a.auto = true;
                        a.codec = None;
                        continue;
                    }
                    o => bail!("unknown codec {o}"),
                });
                a.auto = false;
            }
            "--level" => a.level = Some(val()?.parse()?),
            "--transport" => {
                a.uring = match val()?.as_str() {
                    "tcp" => false,
                    "uring" | "io_uring" => true,
                    o => bail!("unknown transport {o}"),
                }
            }
            "--accel" => a.accel = val()?.parse()?,
            "--unix" => a.unix = Some(val()?.into()),
            "--bandwidth" => a.bandwidth_mbit = val()?.parse()?,
            "--downtime" => a.downtime_ms = val()?.parse()?,
            "--max-rounds" => a.max_rounds = val()?.parse()?,
            "--checksum" => a.checksum = true,
            "--timeout" => a.timeout_s = val()?.parse()?,
            "--key" => a.key = Some(val()?),
            "--no-baseline" => a.baseline = false,
            "--json" => a.json = true,
            o if a.tls.take(o, &mut val)? => {}
            "--probe" => {
                probe();
                std::process::exit(0);
            }
            o => bail!("unknown option {o}; see --help"),
        }
    }
    if a.memory_mib == 0 || a.channels == 0 {
        bail!("--memory and --channels must be at least 1");
    }
    Ok(a)
}

/// `--probe`: what this host offers the IAA backend, and why any of it is unusable.
fn probe() {
    let d = pagewire_accel::iaa::wq::discover(
        Path::new(pagewire_accel::iaa::wq::SYSFS_DEVICES),
        Path::new(pagewire_accel::iaa::wq::DEV_IAX),
    );
    println!(
        "IAA kernel work queues ({}):",
        pagewire_accel::iaa::wq::SYSFS_DEVICES
    );
    print!("{d}");
    match d.usable() {
        Some(w) => println!("--accel auto will use {}", w.dev.display()),
        None => println!(
            "--accel auto will use the software codecs; --accel model runs the IAA backend on \
             its device model (software standing in for the device)"
        ),
    }
    let vfio = Path::new("/dev/vfio/vfio").exists();
    println!(
        "VFIO: /dev/vfio/vfio {}; this build {} the VFIO portal",
        if vfio {
            "present"
        } else {
            "absent (no vfio module loaded)"
        },
        if cfg!(feature = "vfio") {
            "has"
        } else {
            "does not have"
        }
    );
}

/// Plain blocking-socket copy loop with `channels` connections over loopback, or over a
/// Unix socket at `unix`: the link's ceiling in this run, Mbit/s.
fn socket_ceiling(
    channels: u16,
    for_how_long: Duration,
    unix: Option<&Path>,
) -> anyhow::Result<f64> {
    type Accept = Box<dyn FnMut() -> std::io::Result<Box<dyn Read + Send>> + Send>;
    type Connect = Arc<dyn Fn() -> std::io::Result<Box<dyn Write + Send>> + Send + Sync>;
    let (mut accept, connect): (Accept, Connect) = match unix {
        None => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            (
                Box::new(move || Ok(Box::new(listener.accept()?.0) as Box<dyn Read + Send>)),
                Arc::new(move || {
                    let s = TcpStream::connect(addr)?;
                    s.set_nodelay(true)?;
                    Ok(Box::new(s) as Box<dyn Write + Send>)
                }),
            )
        }
        Some(path) => {
            let listener =
                UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
            let path = path.to_owned();
            (
                Box::new(move || Ok(Box::new(listener.accept()?.0) as Box<dyn Read + Send>)),
                Arc::new(
                    move || Ok(Box::new(UnixStream::connect(&path)?) as Box<dyn Write + Send>),
                ),
            )
        }
    };
    let readers = std::thread::spawn(move || -> anyhow::Result<u64> {
        let mut handles = Vec::new();
        for _ in 0..channels {
            let mut s = accept()?;
            handles.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                total
            }));
        }
        Ok(handles.into_iter().map(|h| h.join().unwrap_or(0)).sum())
    });
    let start = Instant::now();
    let writers: Vec<_> = (0..channels)
        .map(|_| {
            let connect = connect.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut s = connect()?;
                let buf = vec![0x5au8; 1 << 20];
                while start.elapsed() < for_how_long {
                    s.write_all(&buf)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    let bytes = readers
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e6)
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let ceiling = if args.baseline {
        let at = args.unix.as_ref().map(|p| {
            let mut c = p.clone().into_os_string();
            c.push(".ceiling");
            PathBuf::from(c)
        });
        let c = socket_ceiling(args.channels, Duration::from_millis(700), at.as_deref());
        if let Some(at) = &at {
            let _ = std::fs::remove_file(at);
        }
        Some(c?)
    } else {
        None
    };
    let auth = match &args.key {
        Some(k) => Authentication::PreSharedKey(SessionKey::new(k.as_bytes().to_vec())?),
        None => Authentication::None,
    };
    let session = SessionId(*b"pagewire-demo-01");
    let layout = MemoryLayout::new(
        4096,
        [RegionDesc {
            id: RegionId(0),
            backing_page_size: 2 << 20,
            guest_addr: GuestAddr(0),
            length: args.memory_mib << 20,
        }],
    )?;
    let memory = Arc::new(GuestMemory::anonymous(&layout)?);
    // `None`: the adaptive choice (the default), but deflate-4k for an IAA engine,
    // the one codec the device runs.
    let codec = match (args.codec, &args.accel) {
        (Some(c), _) => Some(c),
        (None, pagewire::BackendChoice::Iaa(_)) if !args.auto => Some(CodecId::DEFLATE_4K),
        (None, _) => None,
    };
    let t = Instant::now();
    match &args.fill_from {
        Some(path) => {
            let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
            sim::fill_from(&memory, &data);
        }
        None => sim::fill(&memory, args.fill, 42),
    }
    let tls = if args.tls.enabled {
        Some(args.tls.pair()?)
    } else {
        None
    };
    if !args.json {
        eprintln!(
            "filled {} MiB in {:.2} s; migrating with {} channel(s), codec {}, accel {:?}, over {}{}",
            args.memory_mib,
            t.elapsed().as_secs_f64(),
            args.channels,
            codec.map_or(
                if args.auto_delta {
                    "auto+delta"
                } else {
                    "auto"
                }
                .to_string(),
                |c| format!("{c:?}")
            ),
            args.accel,
            args.unix
                .as_ref()
                .map_or("TCP loopback".into(), |p| format!("unix:{}", p.display())),
            if tls.is_some() { " inside TLS 1.3" } else { "" }
        );
        // Why QAT is or is not usable here, whatever --accel says.
        let libraries = pagewire_accel::qat::libraries_from_env();
        match pagewire_accel::qat::probe(&libraries) {
            Ok(p) => eprintln!(
                "qat: {} instance(s) through {:?}: {}",
                p.instances.len(),
                p.libraries,
                p.instances.join(", ")
            ),
            Err(why) => eprintln!("qat: unavailable: {why}"),
        }
    }

    let backend = if args.uring {
        Backend::Uring {
            fallback_to_tcp: true,
        }
    } else {
        Backend::Tcp
    };
    let mut dcfg = DestinationConfig::new(session, auth.clone());
    dcfg.backend = backend;
    dcfg.accel = args.accel.clone();
    dcfg.checksum = args.checksum;
    if let Some((_, d)) = &tls {
        dcfg.encryption = Encryption::Tls(d.clone());
    }
    let endpoint = match &args.unix {
        Some(path) => Endpoint::Unix(path.clone()),
        None => Endpoint::Tcp("127.0.0.1:0".parse()?),
    };
    let listener = DestinationListener::bind_endpoint(&endpoint, dcfg)
        .with_context(|| format!("listening on {endpoint}"))?;
    // The socket file is ours from here on: removed when main returns, however.
    let _unlink = args.unix.clone().map(Unlink);
    let endpoint = listener.local_endpoint()?;
    let destination = std::thread::spawn(move || listener.accept(None)?.wait());

    let mut guest = Guest::start(
        memory.clone(),
        WriterConfig {
            pages_per_s: args.dirty_rate,
            pattern: args.pattern,
            content: args.fill,
            seed: 7,
            edit_bytes: 0,
        },
    );
    let mut cfg = SourceConfig::new(session, auth);
    cfg.channels = args.channels;
    cfg.codec = match codec {
        Some(codec) => pagewire::CodecPolicy::fixed(codec, args.level.unwrap_or(1)),
        None if args.auto_delta => pagewire::CodecPolicy::auto_with_delta(),
        None => pagewire::CodecPolicy::auto(),
    };
    cfg.backend = backend;
    cfg.accel = args.accel.clone();
    cfg.checksum = args.checksum;
    if let Some((s, _)) = tls {
        cfg.encryption = Encryption::Tls(s);
    }
    cfg.bandwidth_limit = args.bandwidth_mbit * 1_000_000 / 8;
    cfg.precopy.downtime_limit = Duration::from_millis(args.downtime_ms);
    cfg.precopy.max_rounds = args.max_rounds;
    cfg.send_timeout = Duration::from_secs(args.timeout_s);
    cfg.ack_timeout = Duration::from_secs(args.timeout_s);
    let mut source = Source::connect_to(&endpoint, memory.clone(), cfg)?;
    let mut log = guest.log();
    let mut vcpus = guest.vcpus();
    let vcpu0: Vec<u8> = (0..64 * 1024u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut device_state =
        |out: &mut pagewire::DeviceStateWriter<'_>| -> Result<(), pagewire::DirtyLogError> {
            out.write_section("demo-vcpu0", 0, &vcpu0)?;
            Ok(())
        };
    let result = pagewire::migrate(&mut source, &mut log, &mut vcpus, &mut device_state);
    guest.stop();
    drop(source);
    let mut stats = match result {
        Ok(s) => s,
        Err(f) => {
            let _ = destination.join();
            bail!(
                "migration failed: {} ({} pages unacknowledged; the guest keeps running)",
                f.error,
                f.unacknowledged_pages()
            );
        }
    };
    let migrated = destination
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))??;
    let t = Instant::now();
    let diff = sim::first_difference(&memory, &migrated.memory);
    let verify_s = t.elapsed().as_secs_f64();
    if let Some((region, page)) = diff {
        bail!("destination differs from the source at {region:?} page {page}");
    }
    if migrated.device_state.len() != 1 || migrated.device_state[0].data != vcpu0 {
        bail!("device state did not arrive intact");
    }
    stats.apply_latency = migrated.stats.apply_latency;
    stats.destination_cpu = Some(migrated.stats.cpu);
    if args.json {
        let mut v = serde_json::to_value(&stats)?;
        v["verified"] = serde_json::Value::Bool(true);
        v["socket_ceiling_mbit_per_s"] = serde_json::json!(ceiling);
        v["destination"] = serde_json::to_value(&migrated.stats)?;
        v["guest_writes"] = serde_json::json!(guest.writes());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{stats}");
        println!(
            "destination:           {} frames, {} data + {} zero + {} uniform + {} copied ({} at rounds' ends, {:.0} ms) pages applied, {:.1} MiB placed raw, pre-fault {:.0} ms, {} blocks of 2 MiB advised for huge pages",
            migrated.stats.frames,
            migrated.stats.data_pages,
            migrated.stats.zero_pages,
            migrated.stats.uniform_pages,
            migrated.stats.copied_pages,
            migrated.stats.round_end_pages,
            migrated.stats.round_end_ms,
            migrated.stats.placed_bytes as f64 / (1 << 20) as f64,
            migrated.stats.prefault_ms,
            migrated.stats.huge_blocks
        );
        if args.tls.enabled {
            println!(
                "destination TLS:       {:.1} MiB opened, {:.1} MiB copied ({:.0} bytes per data page)",
                migrated.stats.tls_opened_bytes as f64 / (1 << 20) as f64,
                migrated.stats.tls_copied_bytes as f64 / (1 << 20) as f64,
                migrated.stats.tls_copied_bytes as f64 / migrated.stats.data_pages.max(1) as f64
            );
        }
        if migrated.stats.hw_decodes > 0 {
            println!(
                "destination engine:    {} frames given to the hardware backend, {} of them handed to software{}",
                migrated.stats.hw_decodes,
                migrated.stats.hw_fallbacks,
                {
                    let c: Vec<String> = migrated
                        .stats
                        .hw_fallback_causes
                        .iter()
                        .map(|(name, n)| format!("{name} {n}"))
                        .collect();
                    if c.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", c.join(", "))
                    }
                }
            );
        }
        if let Some(c) = ceiling {
            let guest = stats.guest_bytes as f64 * 8.0 / (stats.total_ms / 1e3) / 1e6;
            println!(
                "plain-socket ceiling:  {c:.0} Mbit/s with {} connection(s) in this run, uncapped; migration moved guest memory at {guest:.0} Mbit/s ({:.2}x the ceiling; zero, uniform and copied pages included) with {:.0} Mbit/s on the wire ({:.2}x)",
                args.channels,
                guest / c,
                stats.mbit_per_s,
                stats.mbit_per_s / c,
            );
        }
        println!(
            "verified:              destination equals source, every page ({:.2} s); guest wrote {} pages during the migration",
            verify_s,
            guest.writes()
        );
    }
    Ok(())
}

/// Removes a Unix socket's path when dropped.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
