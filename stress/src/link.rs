//! The link a stress run migrates over: plain loopback, or a pair of network
//! namespaces joined by a veth pair whose two ends are capped by `tc tbf`.
//!
//! A capped [`Link`] is made of two namespaces, `pws-<pid>-<n>-src` and
//! `pws-<pid>-<n>-dst`, with `veth-src` (10.213.`n`.1/30) in the first and `veth-dst`
//! (10.213.`n`.2/30) in the second, `lo` and both veth ends up, and on each veth end's
//! egress a token bucket: `tc qdisc add dev <end> root tbf rate <R>bit burst <B>
//! latency 20ms`. Both directions are capped, so the data and the acknowledgements
//! cross the same kind of link. The addresses only have to be unique within a pair
//! (the pair is a world of its own), so `n` wrapping at 256 does no harm.
//!
//! The burst `B` is [`burst_bytes`]: the larger of 4 ms of traffic at the rate (the
//! rate/HZ rule for a kernel with HZ = 250, so the bucket never runs dry between timer
//! ticks) and 256 KiB (four 64 KiB GSO packets, so veth's large segments pass whole
//! instead of being split by tbf). Over a transfer of a few hundred milliseconds this
//! lets at most a few percent more through than the rate; `latency 20ms` bounds the
//! queue to 20 ms of traffic.
//!
//! The source side of a migration calls [`Link::enter_source`] on its thread and the
//! destination side [`Link::enter_destination`] on its own; sockets they open then
//! live in that namespace and reach each other over the capped veth pair at
//! [`Link::destination_addr`].
//!
//! Needs root (`CAP_NET_ADMIN`, and `CAP_SYS_ADMIN` for `ip netns`) and iproute2's `ip`
//! and `tc`. The namespaces are deleted when the [`Link`] is dropped;
//! [`Link::cleanup_stale`] deletes those a killed earlier run left behind.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// The prefix of every namespace this module creates.
const PREFIX: &str = "pws-";
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";
/// The smallest and largest rates accepted (1 Mbit/s to 1 Tbit/s).
const MIN_BITS: f64 = 1e6;
const MAX_BITS: f64 = 1e12;

/// Numbers the links of this process.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// What kind of link to migrate over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinkSpec {
    /// 127.0.0.1 in the current namespace, uncapped.
    Loopback,
    /// A veth pair between two namespaces, each direction capped at `gbit` Gbit/s.
    Capped {
        /// The rate in Gbit/s (10^9 bit/s).
        gbit: f64,
    },
}

impl LinkSpec {
    /// The cap in bit/s, or `None` for loopback.
    pub fn rate_bits_per_s(&self) -> Option<u64> {
        match *self {
            LinkSpec::Loopback => None,
            LinkSpec::Capped { gbit } => Some((gbit * 1e9).round() as u64),
        }
    }
}

impl FromStr for LinkSpec {
    type Err = anyhow::Error;

    /// `loopback` or `lo`, or a rate: a positive number followed by `gbit` or `mbit`
    /// (`10gbit`, `2.5gbit`, `500mbit`), between 1 Mbit/s and 1000 Gbit/s. Case is
    /// ignored.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        if t == "loopback" || t == "lo" {
            return Ok(LinkSpec::Loopback);
        }
        let (num, scale) = if let Some(n) = t.strip_suffix("gbit") {
            (n, 1e9)
        } else if let Some(n) = t.strip_suffix("mbit") {
            (n, 1e6)
        } else {
            bail!(
                "unknown link {s:?}: expected `loopback` (or `lo`) or a rate such as \
                 `1gbit`, `2.5gbit`, `10gbit`, `500mbit`"
            );
        };
        let value: f64 = num
            .trim()
            .parse()
            .with_context(|| format!("link rate {s:?}: {num:?} is not a number"))?;
        let bits = value * scale;
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            bail!("link rate {s:?} is outside 1mbit..1000gbit");
        }
        Ok(LinkSpec::Capped { gbit: bits / 1e9 })
    }
}

impl fmt::Display for LinkSpec {
    /// `loopback`, `<g>gbit` from 1 Gbit/s up, `<m>mbit` below; parses back to the
    /// same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LinkSpec::Loopback => f.write_str("loopback"),
            LinkSpec::Capped { gbit } if gbit >= 1.0 => write!(f, "{gbit}gbit"),
            // Via whole bit/s, so 0.1 Gbit/s prints as 100, not 100.00000000000001.
            LinkSpec::Capped { gbit } => write!(f, "{}mbit", (gbit * 1e9).round() / 1e6),
        }
    }
}

/// The error [`Link::up`] returns when it cannot create namespaces at all: not root,
/// or `ip`/`tc` missing. A caller may `downcast_ref` to it to skip capped links.
#[derive(Debug)]
pub struct LinkUnavailable {
    /// What is missing.
    pub reason: String,
}

impl fmt::Display for LinkUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a capped link needs root (CAP_NET_ADMIN) and iproute2: {}",
            self.reason
        )
    }
}

impl std::error::Error for LinkUnavailable {}

/// The burst of the tbf qdisc at `bits_per_s`, in bytes: the larger of 4 ms at the
/// rate and 256 KiB (see the module documentation).
pub fn burst_bytes(bits_per_s: u64) -> u64 {
    (bits_per_s / 8 / 250).max(256 << 10)
}

/// A network namespace created with `ip netns add`, deleted on drop.
#[derive(Debug)]
struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> Result<Self> {
        // Names carry this process' pid and a counter of this process, so one that
        // exists already was left by a killed run whose pid has come round again.
        if std::path::Path::new(NETNS_DIR).join(&name).exists() {
            run("ip", &["netns", "del", &name])?;
        }
        run("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    /// Moves the calling thread into this namespace.
    fn enter(&self) -> Result<()> {
        let path = format!("{NETNS_DIR}/{}", self.name);
        let f = File::open(&path).with_context(|| format!("open {path}"))?;
        // SAFETY: `f` is an open file descriptor for the whole call; setns only
        // changes the calling thread's network namespace and touches no memory.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            return Err(e).with_context(|| format!("setns into network namespace {path}"));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort: deleting the namespace also deletes the veth end inside it,
        // and with it the peer.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The two namespaces of a capped link. Field order is drop order.
#[derive(Debug)]
struct Pair {
    src: Netns,
    dst: Netns,
    dst_ip: Ipv4Addr,
}

/// A link set up for one stress run; see the module documentation.
///
/// Threads that entered one of its namespaces keep that namespace alive (unnamed)
/// until they exit or leave it, even after the `Link` is dropped: drop it after
/// joining them.
#[derive(Debug)]
pub struct Link {
    spec: LinkSpec,
    pair: Option<Pair>,
}

impl Link {
    /// Sets up the link: nothing for [`LinkSpec::Loopback`]; for
    /// [`LinkSpec::Capped`] two namespaces, a veth pair between them and a tbf qdisc on
    /// both ends.
    ///
    /// # Errors
    /// [`LinkUnavailable`] when not root or `ip`/`tc` cannot be run; otherwise the
    /// failing command and its message. Whatever was created is removed again.
    pub fn up(spec: &LinkSpec) -> Result<Link> {
        let bits = match spec.rate_bits_per_s() {
            None => {
                return Ok(Link {
                    spec: *spec,
                    pair: None,
                });
            }
            Some(b) => b,
        };
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(LinkUnavailable {
                reason: format!("running as uid {uid}"),
            }
            .into());
        }
        for tool in ["ip", "tc"] {
            if let Err(e) = Command::new(tool).arg("-V").output() {
                return Err(LinkUnavailable {
                    reason: format!("cannot run `{tool}`: {e}"),
                }
                .into());
            }
        }

        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let stem = format!("{PREFIX}{}-{n}", std::process::id());
        let octet = (n % 256) as u8;
        let (src_ip, dst_ip) = (
            Ipv4Addr::new(10, 213, octet, 1),
            Ipv4Addr::new(10, 213, octet, 2),
        );
        let src = Netns::add(format!("{stem}-src"))?;
        let dst = Netns::add(format!("{stem}-dst"))?;
        let (s, d) = (src.name.as_str(), dst.name.as_str());
        // Created inside the source namespace, the peer moved into the destination:
        // nothing appears in the caller's namespace, not even for a moment.
        run(
            "ip",
            &[
                "-n", s, "link", "add", "veth-src", "type", "veth", "peer", "name", "veth-dst",
                "netns", d,
            ],
        )?;
        let rate = format!("{bits}bit");
        let burst = burst_bytes(bits).to_string();
        for (ns, dev, ip) in [(s, "veth-src", src_ip), (d, "veth-dst", dst_ip)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/30"), "dev", dev],
            )?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
            run(
                "tc",
                &[
                    "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                    &burst, "latency", "20ms",
                ],
            )?;
        }
        Ok(Link {
            spec: *spec,
            pair: Some(Pair { src, dst, dst_ip }),
        })
    }

    /// Changes the cap of both ends to `gbit` Gbit/s while the link is in use (a
    /// link that got faster or slower in the middle of a migration). The spec, and
    /// [`Link::rate_bits_per_s`], keep the rate the link was brought up with.
    ///
    /// # Errors
    /// Loopback (no cap to change), a rate outside 1 Mbit/s..1 Tbit/s, or `tc`.
    pub fn set_rate(&self, gbit: f64) -> Result<()> {
        let Some(pair) = &self.pair else {
            bail!("a loopback link has no cap to change");
        };
        let bits_f = gbit * 1e9;
        if !(MIN_BITS..=MAX_BITS).contains(&bits_f) {
            bail!("link rate {gbit} Gbit/s is outside 1mbit..1000gbit");
        }
        let bits = bits_f.round() as u64;
        let rate = format!("{bits}bit");
        let burst = burst_bytes(bits).to_string();
        for (ns, dev) in [(&pair.src.name, "veth-src"), (&pair.dst.name, "veth-dst")] {
            run(
                "tc",
                &[
                    "-n", ns, "qdisc", "change", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                    &burst, "latency", "20ms",
                ],
            )?;
        }
        Ok(())
    }

    /// The spec this link was made from.
    pub fn spec(&self) -> LinkSpec {
        self.spec
    }

    /// The cap in bit/s, or `None` for loopback.
    pub fn rate_bits_per_s(&self) -> Option<u64> {
        self.spec.rate_bits_per_s()
    }

    /// The names of the source and destination namespaces, or `None` for loopback.
    pub fn namespaces(&self) -> Option<(&str, &str)> {
        self.pair
            .as_ref()
            .map(|p| (p.src.name.as_str(), p.dst.name.as_str()))
    }

    /// Where the destination listens: 127.0.0.1 for loopback, the destination veth's
    /// address otherwise (bind it from inside [`Link::enter_destination`]).
    pub fn destination_addr(&self, port: u16) -> SocketAddr {
        let ip = match &self.pair {
            None => Ipv4Addr::LOCALHOST,
            Some(p) => p.dst_ip,
        };
        SocketAddr::new(IpAddr::V4(ip), port)
    }

    /// Moves the calling thread into the source namespace (a no-op for loopback).
    /// Only this thread moves; threads it spawns afterwards start in the namespace
    /// too, threads spawned before stay where they were.
    ///
    /// # Errors
    /// When the namespace file cannot be opened or `setns` fails.
    pub fn enter_source(&self) -> Result<()> {
        match &self.pair {
            None => Ok(()),
            Some(p) => p.src.enter(),
        }
    }

    /// Moves the calling thread into the destination namespace (a no-op for
    /// loopback); as [`Link::enter_source`].
    ///
    /// # Errors
    /// When the namespace file cannot be opened or `setns` fails.
    pub fn enter_destination(&self) -> Result<()> {
        match &self.pair {
            None => Ok(()),
            Some(p) => p.dst.enter(),
        }
    }

    /// Deletes the namespaces that runs of this tool left behind when they were killed
    /// before dropping their links: those named `pws-<pid>-...` whose process is gone.
    /// Namespaces of live processes (this one included) are kept. Returns the names
    /// deleted.
    ///
    /// # Errors
    /// When `/var/run/netns` exists but cannot be read, or `ip netns del` fails.
    pub fn cleanup_stale() -> Result<Vec<String>> {
        let dir = match std::fs::read_dir(NETNS_DIR) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("read {NETNS_DIR}")),
        };
        let mut removed = Vec::new();
        for entry in dir {
            let entry = entry.with_context(|| format!("read {NETNS_DIR}"))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let Some(pid) = owner_pid(&name) else {
                continue;
            };
            if pid_alive(pid) {
                continue;
            }
            match run("ip", &["netns", "del", &name]) {
                Ok(()) => removed.push(name),
                // Another cleanup got there first.
                Err(_) if !std::path::Path::new(NETNS_DIR).join(&name).exists() => {}
                Err(e) => return Err(e),
            }
        }
        removed.sort();
        Ok(removed)
    }
}

/// The pid in a namespace name of this module (`pws-<pid>-<n>-src|dst`).
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let rest = rest
        .strip_suffix("-src")
        .or_else(|| rest.strip_suffix("-dst"))?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse::<i32>().ok().filter(|&p| p > 0)
}

/// Whether a process with this pid exists (a process of another user counts).
fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks that `pid` exists and
    // may be signalled. `pid > 0`, so it names one process, never a group.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Runs an iproute2 command, turning a failure into an error that names it.
fn run(tool: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| LinkUnavailable {
            reason: format!("cannot run `{tool}`: {e}"),
        })?;
    if !out.status.success() {
        bail!(
            "`{tool} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    #[test]
    fn parses_the_documented_forms() {
        let cases = [
            ("loopback", LinkSpec::Loopback),
            ("lo", LinkSpec::Loopback),
            ("LO", LinkSpec::Loopback),
            ("1gbit", LinkSpec::Capped { gbit: 1.0 }),
            ("10gbit", LinkSpec::Capped { gbit: 10.0 }),
            ("25gbit", LinkSpec::Capped { gbit: 25.0 }),
            ("2.5gbit", LinkSpec::Capped { gbit: 2.5 }),
            ("500mbit", LinkSpec::Capped { gbit: 0.5 }),
            (" 1GBit ", LinkSpec::Capped { gbit: 1.0 }),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<LinkSpec>().unwrap(), want, "{s}");
        }
        assert_eq!(
            "2.5gbit".parse::<LinkSpec>().unwrap().rate_bits_per_s(),
            Some(2_500_000_000)
        );
        assert_eq!(
            "500mbit".parse::<LinkSpec>().unwrap().rate_bits_per_s(),
            Some(500_000_000)
        );
        assert_eq!(LinkSpec::Loopback.rate_bits_per_s(), None);
    }

    #[test]
    fn rejects_other_forms_with_a_clear_error() {
        for s in [
            "", "fast", "10", "10gb", "gbit", "xgbit", "-1gbit", "0gbit", "0.5mbit", "2000gbit",
            "nangbit", "infgbit", "1 0gbit",
        ] {
            let e = s.parse::<LinkSpec>().unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains(&format!("{s:?}")), "{s}: {msg}");
        }
        let msg = "fast".parse::<LinkSpec>().unwrap_err().to_string();
        assert!(msg.contains("loopback") && msg.contains("500mbit"), "{msg}");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "loopback", "1gbit", "10gbit", "25gbit", "2.5gbit", "500mbit", "100mbit",
        ] {
            let spec: LinkSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
            assert_eq!(spec.to_string().parse::<LinkSpec>().unwrap(), spec);
        }
        assert_eq!("lo".parse::<LinkSpec>().unwrap().to_string(), "loopback");
    }

    #[test]
    fn burst_covers_the_timer_tick_and_gso_packets() {
        assert_eq!(burst_bytes(500_000_000), 256 << 10);
        assert_eq!(burst_bytes(1_000_000_000), 500_000);
        assert_eq!(burst_bytes(25_000_000_000), 12_500_000);
        for bits in [1_000_000, 1_000_000_000, 100_000_000_000] {
            assert!(burst_bytes(bits) >= bits / 8 / 250);
            assert!(burst_bytes(bits) >= 4 * 65536);
        }
    }

    #[test]
    fn namespace_names_carry_the_pid() {
        assert_eq!(owner_pid("pws-1234-0-src"), Some(1234));
        assert_eq!(owner_pid("pws-1234-17-dst"), Some(1234));
        assert_eq!(owner_pid("pws-1234-17-mid"), None);
        assert_eq!(owner_pid("pws-x-17-src"), None);
        assert_eq!(owner_pid("pws-0-1-src"), None);
        assert_eq!(owner_pid("pws--1-1-src"), None);
        assert_eq!(owner_pid("pagewire-bench-1234"), None);
    }

    #[test]
    fn loopback_needs_nothing() {
        let link = Link::up(&LinkSpec::Loopback).unwrap();
        assert_eq!(link.namespaces(), None);
        assert_eq!(link.rate_bits_per_s(), None);
        assert_eq!(
            link.destination_addr(4000),
            "127.0.0.1:4000".parse().unwrap()
        );
        link.enter_source().unwrap();
        link.enter_destination().unwrap();
    }

    /// True when running as root; otherwise prints a SKIP line and returns false,
    /// or fails when `PAGEWIRE_REQUIRE_ROOT=1`.
    fn root(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var("PAGEWIRE_REQUIRE_ROOT").as_deref() != Ok("1"),
            "{test}: needs root and PAGEWIRE_REQUIRE_ROOT=1"
        );
        eprintln!("SKIP {test}: needs root");
        false
    }

    fn netns_exists(name: &str) -> bool {
        std::path::Path::new(NETNS_DIR).join(name).exists()
    }

    #[test]
    fn not_root_is_a_typed_error() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            eprintln!("SKIP not_root_is_a_typed_error: runs as root");
            return;
        }
        let e = Link::up(&LinkSpec::Capped { gbit: 1.0 }).unwrap_err();
        assert!(e.downcast_ref::<LinkUnavailable>().is_some(), "{e:#}");
    }

    /// A byte pattern that a shifted or dropped chunk would not reproduce.
    fn pattern(i: usize) -> u8 {
        (i as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(17) as u8
    }

    #[test]
    fn capped_link_limits_the_rate_and_delivers_intact() {
        if !root("capped_link_limits_the_rate_and_delivers_intact") {
            return;
        }
        const BYTES: usize = 16 << 20;
        let link = Link::up(&"500mbit".parse().unwrap()).unwrap();
        let (src_ns, dst_ns) = link
            .namespaces()
            .map(|(s, d)| (s.to_owned(), d.to_owned()))
            .unwrap();
        assert!(netns_exists(&src_ns) && netns_exists(&dst_ns));
        let cap = link.rate_bits_per_s().unwrap() as f64;

        let (bits_per_s, received) = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let link = &link;
            let dst = s.spawn(move || {
                link.enter_destination().unwrap();
                // Binding the veth address only works inside the destination namespace.
                let l = TcpListener::bind(link.destination_addr(0)).unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                let (mut c, _) = l.accept().unwrap();
                let mut buf = vec![0u8; BYTES];
                let mut got = 0;
                let mut first: Option<(Instant, usize)> = None;
                while got < BYTES {
                    let n = c.read(&mut buf[got..]).unwrap();
                    assert!(n > 0, "connection closed after {got} bytes");
                    got += n;
                    first.get_or_insert((Instant::now(), got));
                }
                let end = Instant::now();
                assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0);
                // From the first read on: the bytes after it over the time after it.
                let (t0, before) = first.unwrap();
                let secs = (end - t0).as_secs_f64();
                ((BYTES - before) as f64 * 8.0 / secs, buf)
            });
            let src = s.spawn(move || {
                link.enter_source().unwrap();
                let addr = rx.recv().unwrap();
                let mut c = TcpStream::connect(addr).unwrap();
                let data: Vec<u8> = (0..BYTES).map(pattern).collect();
                c.write_all(&data).unwrap();
            });
            src.join().unwrap();
            dst.join().unwrap()
        });
        assert!(received.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        eprintln!(
            "capped link: {:.0} Mbit/s of TCP payload under a {:.0} Mbit/s cap",
            bits_per_s / 1e6,
            cap / 1e6
        );
        // An upper bound only: the burst lets a little more through at the start, a
        // slow machine may be far below the cap.
        assert!(
            bits_per_s < cap * 1.25,
            "{bits_per_s} bit/s over a {cap} bit/s cap"
        );

        drop(link);
        assert!(!netns_exists(&src_ns) && !netns_exists(&dst_ns));
    }

    #[test]
    fn the_caller_stays_in_its_namespace() {
        if !root("the_caller_stays_in_its_namespace") {
            return;
        }
        let link = Link::up(&LinkSpec::Capped { gbit: 1.0 }).unwrap();
        let addr = link.destination_addr(0);
        // Only the thread that entered moved: the veth address exists there, not here.
        std::thread::scope(|s| {
            s.spawn(|| {
                link.enter_destination().unwrap();
                TcpListener::bind(addr).unwrap();
                // A thread spawned from here starts in the namespace too.
                std::thread::spawn(move || TcpListener::bind(addr).unwrap())
                    .join()
                    .unwrap();
            });
        });
        assert!(TcpListener::bind(addr).is_err());
    }

    #[test]
    fn both_ends_are_capped() {
        if !root("both_ends_are_capped") {
            return;
        }
        let link = Link::up(&"500mbit".parse().unwrap()).unwrap();
        let (s, d) = link.namespaces().unwrap();
        for (ns, dev) in [(s, "veth-src"), (d, "veth-dst")] {
            let out = Command::new("tc")
                .args(["-n", ns, "qdisc", "show", "dev", dev])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("qdisc tbf") && text.contains("rate 500Mbit"),
                "{ns} {dev}: {text}"
            );
        }
    }

    #[test]
    fn a_leftover_with_our_own_name_is_replaced() {
        if !root("a_leftover_with_our_own_name_is_replaced") {
            return;
        }
        // As if a killed run with this pid had left it (a counter value this process
        // never reaches in its tests).
        let name = format!("{PREFIX}{}-999999-src", std::process::id());
        run("ip", &["netns", "add", &name]).unwrap();
        let ns = Netns::add(name.clone()).unwrap();
        assert!(netns_exists(&name));
        drop(ns);
        assert!(!netns_exists(&name));
    }

    #[test]
    fn cleanup_stale_removes_only_dead_owners() {
        if !root("cleanup_stale_removes_only_dead_owners") {
            return;
        }
        // A pid that existed and is gone: a child that has exited and been reaped.
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = format!("{PREFIX}{dead}-0-src");
        run("ip", &["netns", "add", &stale]).unwrap();
        let live = Link::up(&LinkSpec::Capped { gbit: 1.0 }).unwrap();

        let removed = Link::cleanup_stale().unwrap();
        assert!(removed.contains(&stale), "{removed:?}");
        assert!(!netns_exists(&stale));
        let (s, d) = live.namespaces().unwrap();
        assert!(!removed.iter().any(|r| r == s || r == d), "{removed:?}");
        assert!(netns_exists(s) && netns_exists(d));
    }
}
