//! Transport throughput, as a ratio against a plain blocking-socket copy loop measured
//! in the same run (the link's ceiling).
//!
//! Every case moves raw PAGES frames from a 64 MiB guest region over 1, 2 and 4
//! channels, received with direct placement into a 64 MiB destination region, and
//! compares with the plain loop at the same channel count and frame size: one
//! `write_all` per frame from the same source region, `read`s straight into the same
//! destination region, no framing. `plain-hot` is the same loop over one hot buffer
//! on each side (no guest-memory traffic), shown for reference. Ratios `(x)` are
//! against the plain loop over guest memory.
//! The second part repeats a few cases inside a network namespace whose loopback has a
//! 1 Gbit/s `tc tbf` qdisc; it needs root and `ip`/`tc`, and says "skipped" otherwise.
//!
//! Run: `cargo bench -p pagewire-benches --bench transport`
//! (`PAGEWIRE_BENCH_MIB=N` sets the bytes per loopback case, default 256).

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(not(target_os = "linux"))]
fn main() {
    println!("skipped: the transport benchmark needs Linux");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::process::Command;
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use pagewire_protocol::{
        Authentication, Capabilities, CodecId, PageFrame, PageIndex, PageRun, RegionId, Round,
        SessionId, WireList,
    };
    use pagewire_transport::session::{self, Backend, Listener, SessionConfig};
    use pagewire_transport::uring::ZeroCopy;
    use pagewire_transport::{Channel, GuestMemory, OutFrame, Payload, RegionSink};

    const PAGE: usize = 4096;
    const REGION: usize = 64 << 20;
    const SIZES: [usize; 3] = [64 << 10, 512 << 10, 2 << 20];
    const CHANNELS: [u16; 3] = [1, 2, 4];

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Kind {
        /// The plain loop over the guest regions (the baseline).
        Plain,
        /// The plain loop over one hot buffer (for reference).
        PlainHot,
        Tcp,
        Uring {
            zero_copy: ZeroCopy,
        },
        /// io_uring (zero-copy) sender, TCP receiver.
        UringToTcp,
        /// TCP sender, io_uring receiver.
        TcpToUring,
    }

    struct Mem {
        src: GuestMemory,
        dst: GuestMemory,
    }

    /// The plain loop: `channels` sockets, each writing `bytes / channels` in
    /// `frame`-sized `write_all`s, the receivers `read`ing until end of stream. With
    /// `guest`, the writes come from the source region and the reads land in the
    /// destination region (each channel its own part), so the loop moves the same
    /// memory as the channels do; without, both ends use one hot buffer.
    fn plain(channels: u16, frame: usize, bytes: usize, guest: Option<&Mem>) -> f64 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let per = bytes / usize::from(channels) / frame;
        let part = REGION / usize::from(channels);
        // Every thread notes when it starts and ends: on a loaded machine the main
        // thread may run late after the barrier, so its own clock would be wrong.
        let start = Arc::new(Barrier::new(usize::from(channels) * 2));
        let mut threads = Vec::new();
        for i in 0..usize::from(channels) {
            let b = start.clone();
            let src = guest.map(|m| m.src.slice(i * part, part).unwrap());
            threads.push(std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let hot = vec![0x5au8; frame];
                b.wait();
                let t0 = Instant::now();
                for f in 0..per {
                    let buf = match &src {
                        Some(g) => {
                            let off = (f * frame) % (part - part % frame);
                            // SAFETY: the source region is only read during the
                            // benchmark; `off + frame <= part`, inside the slice.
                            unsafe { std::slice::from_raw_parts(g.as_ptr().add(off), frame) }
                        }
                        None => &hot[..],
                    };
                    s.write_all(buf).unwrap();
                }
                (t0, Instant::now())
            }));
        }
        for i in 0..usize::from(channels) {
            let (mut s, _) = l.accept().unwrap();
            let b = start.clone();
            let dst = guest.map(|m| m.dst.slice(i * part, part).unwrap());
            threads.push(std::thread::spawn(move || {
                let mut hot = vec![0u8; 256 << 10];
                let mut off = 0;
                b.wait();
                let t0 = Instant::now();
                loop {
                    let buf = match &dst {
                        Some(g) => {
                            if off == part {
                                off = 0;
                            }
                            // SAFETY: each receiver writes only its own part of the
                            // destination region, and nothing reads it meanwhile.
                            unsafe {
                                std::slice::from_raw_parts_mut(g.as_ptr().add(off), part - off)
                            }
                        }
                        None => &mut hot[..],
                    };
                    match s.read(buf).unwrap() {
                        0 => break,
                        n if dst.is_some() => off += n,
                        _ => {}
                    }
                }
                (t0, Instant::now())
            }));
        }
        let spans: Vec<(Instant, Instant)> =
            threads.into_iter().map(|t| t.join().unwrap()).collect();
        (per * frame * usize::from(channels)) as f64 / span_secs(&spans)
    }

    /// Seconds from the first thread's start to the last thread's end.
    fn span_secs(spans: &[(Instant, Instant)]) -> f64 {
        let begin = spans.iter().map(|s| s.0).min();
        let end = spans.iter().map(|s| s.1).max();
        match (begin, end) {
            (Some(b), Some(e)) => (e - b).as_secs_f64(),
            _ => f64::NAN,
        }
    }

    fn config(channels: u16, frame: usize, zero_copy: ZeroCopy, mem: &Mem) -> SessionConfig {
        let mut caps = Capabilities::new(PAGE as u32);
        caps.max_pages = (frame / PAGE) as u32;
        caps.max_frame_bytes = (frame + (64 << 10)) as u32;
        let mut cfg = SessionConfig::new(caps, SessionId([9; 16]), channels, Authentication::None);
        cfg.uring.zero_copy = zero_copy;
        cfg.uring.guest = vec![mem.src.clone()];
        cfg
    }

    /// One backend: raw PAGES frames from guest memory, placed into destination memory.
    /// Returns payload bytes per second and the zero-copy counts (in place, copied).
    fn channel(
        kind: Kind,
        channels: u16,
        frame: usize,
        bytes: usize,
        mem: &Mem,
    ) -> (f64, u64, u64) {
        let uring = Backend::Uring {
            fallback_to_tcp: false,
        };
        let (backend, dst_backend, zc) = match kind {
            Kind::Tcp => (Backend::Tcp, Backend::Tcp, ZeroCopy::Auto),
            Kind::Uring { zero_copy } => (uring, uring, zero_copy),
            Kind::UringToTcp => (uring, Backend::Tcp, ZeroCopy::Auto),
            Kind::TcpToUring => (Backend::Tcp, uring, ZeroCopy::Auto),
            Kind::Plain | Kind::PlainHot => unreachable!(),
        };
        let cfg = config(channels, frame, zc, mem);
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &cfg).unwrap();
        let addr = l.local_addr().unwrap();
        let c = cfg.clone();
        let t = std::thread::spawn(move || session::connect(addr, &c).unwrap());
        let dst = l
            .accept_session(&cfg, Duration::from_secs(20))
            .unwrap()
            .channels;
        let src = t.join().unwrap();

        let per = bytes / usize::from(channels) / frame;
        let pages = (frame / PAGE) as u32;
        let start = Arc::new(Barrier::new(usize::from(channels) * 2));
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for (i, est) in src.into_iter().enumerate() {
            let (b, cfg, m) = (start.clone(), cfg.clone(), mem.src.clone());
            senders.push(std::thread::spawn(move || {
                let mut ch = est.open(&backend, &cfg).unwrap();
                let mut done = Vec::new();
                let frames_in_region = REGION / frame;
                b.wait();
                let t0 = Instant::now();
                for f in 0..per {
                    let slot = (f * usize::from(cfg.channels) + i) % frames_in_region;
                    let runs = [PageRun {
                        start: PageIndex((slot * frame / PAGE) as u64),
                        count: pages,
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
                    let payload = Payload::Guest(m.slice(slot * frame, frame).unwrap());
                    ch.send(OutFrame::pages(&header, vec![payload]).unwrap())
                        .unwrap();
                    ch.poll_completions(&mut done).unwrap();
                    done.clear();
                }
                ch.close(&mut done).unwrap();
                let s = ch.stats();
                (s.zc_sends, s.zc_copied, t0)
            }));
        }
        for est in dst {
            let (b, cfg, m) = (start.clone(), cfg.clone(), mem.dst.clone());
            receivers.push(std::thread::spawn(move || {
                let mut ch = est.open(&dst_backend, &cfg).unwrap();
                let mut sink = RegionSink::new(PAGE as u32, vec![(RegionId(0), m)]);
                b.wait();
                let t0 = Instant::now();
                let mut n = 0;
                while ch.recv(Some(&mut sink)).unwrap().is_some() {
                    n += 1;
                }
                (n, t0, Instant::now())
            }));
        }
        let mut spans = Vec::new();
        let mut frames = 0;
        for r in receivers {
            let (n, t0, t1) = r.join().unwrap();
            frames += n;
            spans.push((t0, t1));
        }
        let (mut zc, mut copied) = (0, 0);
        for s in senders {
            let (a, b, t0) = s.join().unwrap();
            zc += a;
            copied += b;
            spans.push((t0, t0));
        }
        assert_eq!(frames, per * usize::from(channels));
        ((frames * frame) as f64 / span_secs(&spans), zc, copied)
    }

    fn run(kind: Kind, channels: u16, frame: usize, bytes: usize, mem: &Mem) -> (f64, u64, u64) {
        match kind {
            Kind::Plain => (plain(channels, frame, bytes, Some(mem)), 0, 0),
            Kind::PlainHot => (plain(channels, frame, bytes, None), 0, 0),
            _ => channel(kind, channels, frame, bytes, mem),
        }
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Prints one table; each figure is the median of `reps` runs, interleaved.
    fn table(title: &str, cases: &[(u16, usize)], bytes: usize, reps: usize, mem: &Mem) {
        let kinds = [
            Kind::Plain,
            Kind::PlainHot,
            Kind::Tcp,
            Kind::Uring {
                zero_copy: ZeroCopy::Auto,
            },
            Kind::Uring {
                zero_copy: ZeroCopy::Always,
            },
            Kind::UringToTcp,
            Kind::TcpToUring,
        ];
        println!("\n{title} ({} MiB per run, median of {reps})", bytes >> 20);
        println!(
            "{:>3} {:>6} | {:>10} | {:>16} | {:>16} | {:>16} | {:>16} | {:>16} | {:>16} | SEND_ZC notifications",
            "ch",
            "frame",
            "plain MB/s",
            "plain-hot (x)",
            "tcp MB/s (x)",
            "uring (x)",
            "uring-zc (x)",
            "uring>tcp (x)",
            "tcp>uring (x)"
        );
        for &(channels, frame) in cases {
            let mut results = vec![Vec::new(); kinds.len()];
            let (mut zc, mut copied) = (0, 0);
            for _ in 0..reps {
                for (k, kind) in kinds.iter().enumerate() {
                    let (r, a, b) = run(*kind, channels, frame, bytes, mem);
                    results[k].push(r);
                    if *kind
                        == (Kind::Uring {
                            zero_copy: ZeroCopy::Always,
                        })
                    {
                        zc += a;
                        copied += b;
                    }
                }
            }
            let m: Vec<f64> = results.into_iter().map(median).collect();
            let cell = |v: f64| format!("{:>7.0} ({:.2})", v / 1e6, v / m[0]);
            println!(
                "{:>3} {:>5}K | {:>10.0} | {:>16} | {:>16} | {:>16} | {:>16} | {:>16} | {:>16} | {zc} in place, {copied} copied",
                channels,
                frame >> 10,
                m[0] / 1e6,
                cell(m[1]),
                cell(m[2]),
                cell(m[3]),
                cell(m[4]),
                cell(m[5]),
                cell(m[6]),
            );
        }
    }

    /// A network namespace with a 1 Gbit/s loopback, removed on drop.
    struct Netns {
        name: String,
    }

    impl Netns {
        fn create() -> Result<Self, String> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err("not root".into());
            }
            let name = format!("pagewire-bench-{}", std::process::id());
            let ip = |args: &[&str]| -> Result<(), String> {
                let out = Command::new("ip")
                    .args(args)
                    .output()
                    .map_err(|e| format!("ip: {e}"))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
            };
            ip(&["netns", "add", &name])?;
            let ns = Self { name };
            ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])?;
            ip(&[
                "netns", "exec", &ns.name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                "rate", "1gbit", "burst", "1mb", "latency", "20ms",
            ])?;
            Ok(ns)
        }

        /// Moves the calling thread (and threads it spawns later) into the namespace.
        fn enter(&self) -> std::io::Result<()> {
            let f = std::fs::File::open(format!("/var/run/netns/{}", self.name))?;
            // SAFETY: `f` is an open namespace file; setns changes only the calling
            // thread's network namespace.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    pub fn main() {
        let mib: usize = std::env::var("PAGEWIRE_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256);
        // `cargo bench` passes `--bench`; a filter argument is ignored.
        let src = GuestMemory::anonymous(REGION).unwrap();
        let mut page = vec![0u8; PAGE];
        for p in 0..REGION / PAGE {
            page.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (p * 31 + i) as u8);
            src.write(p * PAGE, &page);
        }
        let mem = Arc::new(Mem {
            src,
            dst: GuestMemory::anonymous(REGION).unwrap(),
        });
        let cases: Vec<(u16, usize)> = CHANNELS
            .iter()
            .flat_map(|&c| SIZES.iter().map(move |&s| (c, s)))
            .collect();
        if let Ok(only) = std::env::var("PAGEWIRE_BENCH_CHANNELS") {
            let only: u16 = only.parse().unwrap_or(2);
            let cases: Vec<_> = cases.iter().copied().filter(|c| c.0 == only).collect();
            table("loopback", &cases, mib << 20, 5, &mem);
            return;
        }
        table("loopback", &cases, mib << 20, 5, &mem);

        match Netns::create() {
            Err(why) => println!("\n1 Gbit/s namespace: skipped: {why}"),
            Ok(ns) => {
                let m = mem.clone();
                let r = std::thread::spawn(move || {
                    ns.enter().map_err(|e| format!("setns: {e}"))?;
                    table(
                        "loopback in a namespace capped at 1 Gbit/s by tc tbf",
                        &[(1, 64 << 10), (2, 64 << 10), (2, 2 << 20), (4, 2 << 20)],
                        48 << 20,
                        1,
                        &m,
                    );
                    drop(ns);
                    Ok::<(), String>(())
                })
                .join();
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => println!("1 Gbit/s namespace: skipped: {e}"),
                    Err(_) => println!("1 Gbit/s namespace: failed (see the panic above)"),
                }
            }
        }
    }
}
