//! The command line: `serve` and `run`, list-valued sweep options, units, and the
//! resolved [`Plan`] a run follows (the `--quick` preset filled in).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use pagewire::CodecId;

use crate::LinkSpec;
use crate::workload::{Workload, WritePattern};

/// pagewire-stress: live-migration stress benchmark (like iperf3, for live migration).
#[derive(Debug, Parser)]
#[command(name = "pagewire-stress", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The two ends.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Be the destination: accept one migration after another, apply and verify each.
    Serve(ServeArgs),
    /// Be the source (`--to ADDR`), or both ends in this process (`--local`).
    Run(Box<RunArgs>),
    /// Write a workload's guest memory to a file, to migrate the same bytes with
    /// another system (or another build: `run --workload fill-from:FILE`).
    Image(ImageArgs),
}

/// `pagewire-stress image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Guest memory content (as `run --workload`).
    #[arg(long, default_value = "idle")]
    pub workload: Workload,
    /// Guest memory size in MiB.
    #[arg(long, default_value_t = 2048)]
    pub mem_mib: u64,
    /// The file to write (replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// How the handshake is authenticated.
#[derive(Clone, Debug, Default, Args)]
pub struct KeyArgs {
    /// Pre-shared key file (16 bytes or more; one trailing newline is ignored). Both
    /// ends need the same file. Keys are never taken from the command line.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Migrate without authentication (both ends must say so).
    #[arg(long, conflicts_with = "key_file")]
    pub insecure_no_key: bool,
}

/// `pagewire-stress serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Control address the sources connect to (`run --to ADDR`).
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Port of the migration listener on the same IP (default: any free port, told to
    /// the source over the control connection).
    #[arg(long, default_value_t = 0)]
    pub data_port: u16,
    /// Stop after this many migrations (default: serve until killed).
    #[arg(long)]
    pub count: Option<u64>,
    /// Key options.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `pagewire-stress run`. List-valued options take comma-separated lists; the cells
/// are their cartesian product.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// The `serve` end to migrate to.
    #[arg(long, value_name = "ADDR", required_unless_present = "local")]
    pub to: Option<SocketAddr>,
    /// Run both ends in this process.
    #[arg(long, conflicts_with = "to")]
    pub local: bool,
    /// A small preset that finishes in well under two minutes (explicit options win).
    #[arg(long)]
    pub quick: bool,
    /// Key options.
    #[command(flatten)]
    pub key: KeyArgs,
    /// Guest memory content: idle, zero, ones, sequence, random, text, mixed, hot,
    /// edits, fill-from:FILE.
    #[arg(long)]
    pub workload: Option<Workload>,
    /// Which pages the writer dirties: random, sequential, hot.
    #[arg(long)]
    pub pattern: Option<WritePattern>,
    /// Codecs: none, lz4, zstd, deflate, delta, auto, auto+delta (default auto;
    /// `--quick`: none, zstd).
    #[arg(long, value_parser = List::<CodecChoice>::parse)]
    pub codec: Option<List<CodecChoice>>,
    /// Codec levels (zstd: -7..=22, deflate: 1..=12), e.g. -3,1,3; codecs without
    /// levels run once.
    #[arg(long, allow_hyphen_values = true, value_parser = List::<i32>::parse)]
    pub level: Option<List<i32>>,
    /// Channels, e.g. 1,2,4,8.
    #[arg(long, value_parser = List::<u16>::parse)]
    pub channels: Option<List<u16>>,
    /// Pages per frame, e.g. 32,128,256.
    #[arg(long, value_parser = List::<u32>::parse)]
    pub frame_pages: Option<List<u32>>,
    /// Writer rates in MB/s (10^6 bytes), e.g. 0,50,100 or 1GB/s.
    #[arg(long, value_parser = List::<Rate>::parse)]
    pub dirty_mbps: Option<List<Rate>>,
    /// Links: loopback, 1gbit, 2.5gbit, 10gbit, 25gbit (capped links need root).
    #[arg(long, value_parser = List::<LinkSpec>::parse)]
    pub link: Option<List<LinkSpec>>,
    /// Transports: tcp, uring.
    #[arg(long, value_parser = List::<TransportKind>::parse)]
    pub transport: Option<List<TransportKind>>,
    /// Repetitions per cell (tables show the median and min–max).
    #[arg(long)]
    pub repeat: Option<u32>,
    /// Guest memory in MiB (or with a unit: 512m, 1g, 1gib).
    #[arg(long, value_parser = parse_mib)]
    pub mem_mib: Option<u64>,
    /// Downtime limit, ms.
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// Pre-copy round cap.
    #[arg(long)]
    pub max_rounds: Option<u32>,
    /// Per codec and link, bisect the writer's rate for the largest that converges.
    #[arg(long)]
    pub find_max_dirty_rate: bool,
    /// Upper end of the bisection, MB/s.
    #[arg(long, value_parser = parse_rate)]
    pub bisect_max_mbps: Option<f64>,
    /// Stop bisecting when the interval is this narrow, MB/s.
    #[arg(long, value_parser = parse_rate)]
    pub bisect_resolution_mbps: Option<f64>,
    /// Most migrations per bisection.
    #[arg(long)]
    pub bisect_steps: Option<u32>,
    /// How long the plain-socket baseline runs, ms.
    #[arg(long)]
    pub baseline_ms: Option<u64>,
    /// Destination memory (local runs): fresh (mapped by the destination) or
    /// populated (written beforehand and given to it).
    #[arg(long)]
    pub dest_memory: Option<crate::destmem::DestMemory>,
    /// How the destination prepares fresh memory: none, thread, hugepages, ahead,
    /// install (userfaultfd UFFDIO_COPY; default: the library's).
    #[arg(long, value_parser = crate::destmem::parse_prefault)]
    pub prefault: Option<pagewire::Prefault>,
    /// Also measure a plain-socket loop copying the guest's size into fresh and into
    /// populated memory (local runs).
    #[arg(long)]
    pub memory_baseline: bool,
    /// Send every data page's bytes, even one equal to a page its channel already sent
    /// (`SourceConfig::dedup` off; it is on by default).
    #[arg(long)]
    pub no_dedup: bool,
    /// Codec threads per channel (`SourceConfig::codec_threads`; default: the
    /// library's choice from the machine, `codec_threads_for`).
    #[arg(long)]
    pub codec_threads: Option<usize>,
    /// Each TCP channel's send queue, MiB (`SourceConfig::send_queue`; default: the
    /// library's, 16 MiB; 0: `send` blocks once the socket is full).
    #[arg(long)]
    pub send_queue_mib: Option<usize>,
    /// Source send/ACK timeout, seconds.
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// Write every cell and repetition as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write every cell and repetition as CSV.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Write charts (SVG, PNG) into this directory.
    #[arg(long, value_name = "DIR")]
    pub charts: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// A comma-separated list of values.
#[derive(Clone, Debug, PartialEq)]
pub struct List<T>(pub Vec<T>);

impl<T> List<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    /// Parses `a,b,c`; empty items and empty lists are errors.
    ///
    /// # Errors
    /// The first item that does not parse, with its position.
    pub fn parse(s: &str) -> anyhow::Result<List<T>> {
        let mut out = Vec::new();
        for (i, item) in s.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                bail!("empty item {} in list {s:?}", i + 1);
            }
            out.push(
                item.parse::<T>()
                    .map_err(|e| anyhow::anyhow!("item {} ({item:?}): {e}", i + 1))?,
            );
        }
        Ok(List(out))
    }
}

/// A codec to sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecChoice {
    /// Raw pages (zero pages still skipped).
    None,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
    /// Deflate.
    Deflate,
    /// XOR delta against the page's previous version.
    Delta,
    /// Choose the codec and level per frame (`CodecPolicy::Auto`).
    Auto,
    /// The same, with delta for cached pages (`CodecPolicy::auto_with_delta`).
    #[serde(rename = "auto+delta")]
    AutoDelta,
}

impl CodecChoice {
    /// The library's codec id, or `None` for `auto`.
    pub fn id(self) -> Option<CodecId> {
        Some(match self {
            CodecChoice::None => CodecId::RAW,
            CodecChoice::Lz4 => CodecId::LZ4,
            CodecChoice::Zstd => CodecId::ZSTD,
            CodecChoice::Deflate => CodecId::DEFLATE,
            CodecChoice::Delta => CodecId::DELTA,
            CodecChoice::Auto | CodecChoice::AutoDelta => return None,
        })
    }

    /// Whether the codec takes a level (zstd, deflate).
    pub fn has_levels(self) -> bool {
        self.level_range().is_some()
    }

    /// The levels the codec takes (pagewire clamps others into this range).
    pub fn level_range(self) -> Option<(i32, i32)> {
        match self {
            CodecChoice::Zstd => Some((-7, 22)),
            CodecChoice::Deflate => Some((1, 12)),
            _ => None,
        }
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CodecChoice::None => "none",
            CodecChoice::Lz4 => "lz4",
            CodecChoice::Zstd => "zstd",
            CodecChoice::Deflate => "deflate",
            CodecChoice::Delta => "delta",
            CodecChoice::Auto => "auto",
            CodecChoice::AutoDelta => "auto+delta",
        }
    }
}

impl FromStr for CodecChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" | "raw" => CodecChoice::None,
            "lz4" => CodecChoice::Lz4,
            "zstd" => CodecChoice::Zstd,
            "deflate" => CodecChoice::Deflate,
            "delta" => CodecChoice::Delta,
            "auto" => CodecChoice::Auto,
            "auto+delta" => CodecChoice::AutoDelta,
            o => bail!("unknown codec {o:?}: none, lz4, zstd, deflate, delta, auto, auto+delta"),
        })
    }
}

/// A transport to sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Blocking TCP.
    Tcp,
    /// io_uring (no fallback: a cell that cannot have it fails and says why).
    Uring,
}

impl TransportKind {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Uring => "uring",
        }
    }

    /// The library's backend.
    pub fn backend(self) -> pagewire::Backend {
        match self {
            TransportKind::Tcp => pagewire::Backend::Tcp,
            TransportKind::Uring => pagewire::Backend::Uring {
                fallback_to_tcp: false,
            },
        }
    }
}

impl FromStr for TransportKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "tcp" => TransportKind::Tcp,
            "uring" | "io_uring" | "io-uring" => TransportKind::Uring,
            o => bail!("unknown transport {o:?}: tcp, uring"),
        })
    }
}

/// A writer rate in MB/s (10^6 bytes per second).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate(pub f64);

impl FromStr for Rate {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        parse_rate(s).map(Rate)
    }
}

/// Parses a rate in MB/s: `50`, `50MB/s`, `50mb`, `1.5GB/s`, `1gb`.
///
/// # Errors
/// Not a number, negative, or an unknown unit (`mbit` is refused: the writer's rate
/// is in bytes).
pub fn parse_rate(s: &str) -> anyhow::Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(n) = t.strip_suffix("gb/s").or(t.strip_suffix("gb")) {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix("mb/s").or(t.strip_suffix("mb")) {
        (n, 1.0)
    } else {
        (t.as_str(), 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad rate {s:?}: MB/s, e.g. 50, 50MB/s or 1GB/s"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("bad rate {s:?}: must be 0 or more");
    }
    Ok(v * scale)
}

/// Parses a memory size in MiB: `256`, `256m`, `256mib`, `1g`, `1gib`.
///
/// # Errors
/// Not a number, zero, or an unknown unit.
pub fn parse_mib(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(n) = t.strip_suffix("gib").or(t.strip_suffix('g')) {
        (n, 1024)
    } else if let Some(n) = t.strip_suffix("mib").or(t.strip_suffix('m')) {
        (n, 1)
    } else {
        (t.as_str(), 1)
    };
    let v: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad size {s:?}: MiB, e.g. 256, 512m or 1g"))?;
    if v == 0 {
        bail!("bad size {s:?}: at least 1 MiB");
    }
    v.checked_mul(scale)
        .with_context(|| format!("size {s:?} is too large"))
}

/// The bisection of `--find-max-dirty-rate`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct BisectPlan {
    /// Upper end, MB/s (the lower end is 0).
    pub max_mbps: f64,
    /// Stop when the interval is this narrow, MB/s.
    pub resolution_mbps: f64,
    /// Most migrations.
    pub max_steps: u32,
}

/// Where the destination is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Both ends in this process.
    Local,
    /// A `serve` end at this control address.
    Remote(SocketAddr),
}

/// A run with every default resolved.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Local or remote.
    pub mode: Mode,
    /// The preset.
    pub quick: bool,
    /// Memory content.
    pub workload: Workload,
    /// Writer pattern.
    pub pattern: WritePattern,
    /// Codecs.
    pub codecs: Vec<CodecChoice>,
    /// Codec levels (`[None]`: the library's default).
    pub levels: Vec<Option<i32>>,
    /// Channels.
    pub channels: Vec<u16>,
    /// Pages per frame.
    pub frame_pages: Vec<u32>,
    /// Writer rates, MB/s.
    pub dirty_mbps: Vec<f64>,
    /// Links.
    pub links: Vec<LinkSpec>,
    /// Transports.
    pub transports: Vec<TransportKind>,
    /// Repetitions per cell.
    pub repeat: u32,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Downtime limit, ms.
    pub downtime_ms: u64,
    /// Round cap.
    pub max_rounds: u32,
    /// The bisection, when asked.
    pub bisect: Option<BisectPlan>,
    /// Baseline duration, ms.
    pub baseline_ms: u64,
    /// Destination memory.
    pub dest_memory: crate::destmem::DestMemory,
    /// Pre-fault policy for fresh destination memory (`None`: the library's default).
    pub prefault: Option<pagewire::Prefault>,
    /// Measure the copy-into-memory baselines.
    pub memory_baseline: bool,
    /// Send repeated pages as COPY references (`SourceConfig::dedup`).
    pub dedup: bool,
    /// Codec threads per channel (`None`: the library's choice).
    pub codec_threads: Option<usize>,
    /// Each TCP channel's send queue, bytes (`None`: the library's default).
    pub send_queue: Option<usize>,
    /// Source timeouts, s.
    pub timeout_s: u64,
    /// Outputs.
    pub json: Option<PathBuf>,
    /// CSV output.
    pub csv: Option<PathBuf>,
    /// Chart directory.
    pub charts: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
}

impl RunArgs {
    /// Resolves defaults (the `--quick` preset's where asked; explicit options win) and
    /// checks every value.
    ///
    /// # Errors
    /// An unusable value, naming the option.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let q = self.quick;
        let mode = match (self.local, self.to) {
            (true, None) => Mode::Local,
            (false, Some(a)) => Mode::Remote(a),
            (true, Some(_)) => bail!("--local and --to exclude each other"),
            (false, None) => bail!("say where to migrate: --to ADDR, or --local"),
        };
        let workload = self.workload.clone().unwrap_or(Workload::Idle);
        let pattern =
            self.pattern
                .unwrap_or(if matches!(workload, Workload::Hot | Workload::Edits) {
                    WritePattern::Hot
                } else {
                    WritePattern::Random
                });
        let codecs = list(
            self.codec.as_ref(),
            if q {
                vec![CodecChoice::None, CodecChoice::Zstd]
            } else {
                vec![CodecChoice::Auto]
            },
        );
        let channels = list(self.channels.as_ref(), vec![2]);
        let frame_pages = list(self.frame_pages.as_ref(), vec![128]);
        let dirty_mbps: Vec<f64> = self
            .dirty_mbps
            .clone()
            .map_or(if q { vec![0.0, 50.0] } else { vec![0.0] }, |l| {
                l.0.into_iter().map(|r| r.0).collect()
            });
        let links = list(self.link.as_ref(), vec![LinkSpec::Loopback]);
        let transports = list(self.transport.as_ref(), vec![TransportKind::Tcp]);
        if channels.contains(&0) {
            bail!("--channels: each at least 1");
        }
        if let Some(&f) = frame_pages.iter().find(|&&f| !(1..=4096).contains(&f)) {
            bail!("--frame-pages {f}: between 1 and 4096");
        }
        if matches!(mode, Mode::Remote(_))
            && (self.dest_memory.is_some() || self.prefault.is_some() || self.memory_baseline)
        {
            bail!("--dest-memory, --prefault and --memory-baseline apply to --local runs only");
        }
        if matches!(mode, Mode::Remote(_)) && links.iter().any(|l| *l != LinkSpec::Loopback) {
            bail!("--link applies to --local runs only: a remote run uses the network to --to");
        }
        let repeat = self.repeat.unwrap_or(1);
        if repeat == 0 {
            bail!("--repeat: at least 1");
        }
        let max_rounds = self.max_rounds.unwrap_or(if q { 10 } else { 30 });
        if max_rounds == 0 {
            bail!("--max-rounds: at least 1");
        }
        let bisect = (self.find_max_dirty_rate || q).then(|| BisectPlan {
            max_mbps: self.bisect_max_mbps.unwrap_or(2000.0),
            resolution_mbps: self
                .bisect_resolution_mbps
                .unwrap_or(if q { 250.0 } else { 25.0 }),
            max_steps: self.bisect_steps.unwrap_or(if q { 5 } else { 10 }),
        });
        if let Some(b) = &bisect
            && (b.max_mbps <= 0.0 || b.resolution_mbps <= 0.0)
        {
            bail!("--bisect-max-mbps and --bisect-resolution-mbps: more than 0");
        }
        Ok(Plan {
            mode,
            quick: q,
            workload,
            pattern,
            codecs,
            levels: self
                .level
                .as_ref()
                .map_or_else(|| vec![None], |l| l.0.iter().copied().map(Some).collect()),
            channels,
            frame_pages,
            dirty_mbps,
            links,
            transports,
            repeat,
            mem_mib: self.mem_mib.unwrap_or(if q { 256 } else { 1024 }),
            downtime_ms: self.downtime_ms.unwrap_or(if q { 20 } else { 300 }),
            max_rounds,
            bisect,
            baseline_ms: self.baseline_ms.unwrap_or(if q { 300 } else { 700 }),
            dest_memory: self.dest_memory.unwrap_or_default(),
            prefault: self.prefault,
            memory_baseline: self.memory_baseline,
            timeout_s: self.timeout_s.unwrap_or(30).max(1),
            dedup: !self.no_dedup,
            codec_threads: self.codec_threads,
            send_queue: self.send_queue_mib.map(|m| m << 20),
            json: self.json.clone(),
            csv: self.csv.clone(),
            charts: self.charts.clone(),
            progress: !self.no_progress,
        })
    }
}

fn list<T: Clone>(given: Option<&List<T>>, default: Vec<T>) -> Vec<T> {
    given.map_or(default, |l| l.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> anyhow::Result<Plan> {
        let mut v = vec!["pagewire-stress", "run"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v)?.command {
            Command::Run(r) => r.plan(),
            Command::Serve(_) | Command::Image(_) => bail!("not run"),
        }
    }

    #[test]
    fn image_takes_a_workload_size_and_file() {
        let c = Cli::try_parse_from(["pagewire-stress", "image", "--out", "/tmp/x"]).unwrap();
        let Command::Image(a) = c.command else {
            panic!("not image")
        };
        assert_eq!((a.workload, a.mem_mib), (Workload::Idle, 2048));
        assert!(Cli::try_parse_from(["pagewire-stress", "image"]).is_err());
    }

    #[test]
    fn levels_are_an_axis_for_the_codecs_that_have_them() {
        let p = run(&[
            "--local",
            "--codec",
            "none,zstd,deflate",
            "--level",
            "-3,1,6",
        ])
        .unwrap();
        assert_eq!(p.levels, vec![Some(-3), Some(1), Some(6)]);
        let cells = crate::sweep::cells(&p);
        let labels: Vec<String> = cells.iter().map(|c| c.codec_label()).collect();
        // Levels outside a codec's range are clamped into it, as pagewire does, once.
        assert_eq!(
            labels,
            [
                "none",
                "zstd:-3",
                "zstd:1",
                "zstd:6",
                "deflate:1",
                "deflate:6"
            ]
        );
        assert!(run(&["--local", "--level", "1,x"]).is_err());
    }

    #[test]
    fn lists_become_the_matrix_axes() {
        let p = run(&[
            "--local",
            "--codec",
            "none,lz4,zstd,deflate",
            "--channels",
            "1,2,4,8",
            "--frame-pages",
            "32,128,256",
            "--dirty-mbps",
            "0,50,1GB/s",
            "--transport",
            "tcp,uring",
            "--link",
            "loopback,2.5gbit",
        ])
        .unwrap();
        assert_eq!(p.codecs.len(), 4);
        assert_eq!(p.levels, vec![None]);
        assert_eq!(p.channels, vec![1, 2, 4, 8]);
        assert_eq!(p.frame_pages, vec![32, 128, 256]);
        assert_eq!(p.dirty_mbps, vec![0.0, 50.0, 1000.0]);
        assert_eq!(p.transports, vec![TransportKind::Tcp, TransportKind::Uring]);
        assert_eq!(
            p.links,
            vec![LinkSpec::Loopback, LinkSpec::Capped { gbit: 2.5 }]
        );
        assert_eq!(p.mode, Mode::Local);
        assert!(p.bisect.is_none());
    }

    #[test]
    fn units() {
        assert_eq!(parse_mib("256").unwrap(), 256);
        assert_eq!(parse_mib("512m").unwrap(), 512);
        assert_eq!(parse_mib("1g").unwrap(), 1024);
        assert_eq!(parse_mib("2GiB").unwrap(), 2048);
        assert!(parse_mib("0").is_err());
        assert!(parse_mib("12k").is_err());
        assert_eq!(parse_rate("50").unwrap(), 50.0);
        assert_eq!(parse_rate("50MB/s").unwrap(), 50.0);
        assert_eq!(parse_rate("1.5gb").unwrap(), 1500.0);
        assert!(parse_rate("100mbit").is_err());
        assert!(parse_rate("-5").is_err());
        let p = run(&["--local", "--mem-mib", "1g"]).unwrap();
        assert_eq!(p.mem_mib, 1024);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = run(&["--local", "--codec", "zstd,,lz4"]).unwrap_err();
        assert!(e.to_string().contains("empty item 2"), "{e}");
        let e = run(&["--local", "--codec", "zstd,brotli"]).unwrap_err();
        assert!(e.to_string().contains("brotli"), "{e}");
        assert!(run(&["--local", "--channels", "0"]).is_err());
        assert!(run(&["--local", "--frame-pages", "5000"]).is_err());
        assert!(run(&["--local", "--repeat", "0"]).is_err());
        assert!(run(&[]).is_err(), "neither --to nor --local");
        assert!(run(&["--local", "--to", "127.0.0.1:1"]).is_err());
        assert!(run(&["--to", "127.0.0.1:1", "--link", "1gbit"]).is_err());
        assert!(run(&["--local", "--key-file", "k", "--insecure-no-key"]).is_err());
        // No --key option exists: keys never come from the command line.
        assert!(run(&["--local", "--key", "0123456789abcdef"]).is_err());
    }

    #[test]
    fn quick_preset_and_explicit_options_win() {
        let p = run(&["--local", "--quick"]).unwrap();
        assert_eq!(p.codecs, vec![CodecChoice::None, CodecChoice::Zstd]);
        assert_eq!(p.repeat, 1);
        assert!(p.mem_mib <= 256 && p.bisect.is_some());
        let p = run(&["--local", "--quick", "--codec", "lz4", "--mem-mib", "64"]).unwrap();
        assert_eq!(p.codecs, vec![CodecChoice::Lz4]);
        assert_eq!(p.mem_mib, 64);
        let p = run(&["--local", "--workload", "hot"]).unwrap();
        assert_eq!(p.pattern, WritePattern::Hot);
        assert!(run(&["--local", "--workload", "fill-from:"]).is_err());
    }
}
