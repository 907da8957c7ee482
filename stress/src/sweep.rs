//! Runs a [`Plan`]: the plain-socket baseline per link and channel count, every cell
//! of the matrix `repeat` times, and the bisections of `--find-max-dirty-rate`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagewire::Authentication;
use serde::Serialize;

use crate::cell::{self, CellSpec, Outcome, RunResult, SourceGuest};
use crate::cli::{Mode, Plan};
use crate::serve::Client;
use crate::{Link, LinkSpec, bisect};

/// A plain-socket copy loop's throughput, the link's ceiling in this run.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// Link.
    pub link: String,
    /// Connections.
    pub channels: u16,
    /// Gbit/s, or why it could not be measured.
    pub gbit_per_s: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
    /// With `--memory-baseline`: the loop copying the guest's size into fresh and into
    /// populated memory, Gbit/s.
    pub into_memory: Option<IntoMemory>,
}

/// A plain-socket loop copying into destination memory, Gbit/s.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct IntoMemory {
    /// Into memory the reader mapped just before.
    pub fresh_gbit_per_s: f64,
    /// Into memory written beforehand.
    pub populated_gbit_per_s: f64,
    /// Into memory written beforehand, the writers sending from a mapping of the
    /// guest's size (as a source reads guest memory) instead of one hot buffer.
    pub populated_from_memory_gbit_per_s: f64,
}

/// A cell and its repetitions.
#[derive(Clone, Debug, Serialize)]
pub struct CellReport {
    /// Settings.
    pub spec: CellSpec,
    /// Every repetition.
    pub runs: Vec<RunResult>,
    /// The baseline of its link and channel count, Gbit/s.
    pub baseline_gbit_per_s: Option<f64>,
}

/// One `--find-max-dirty-rate` bisection.
#[derive(Clone, Debug, Serialize)]
pub struct BisectReport {
    /// The cell bisected (its dirty rate is the variable).
    pub spec: CellSpec,
    /// Largest rate that converged, MB/s.
    pub largest_ok_mbps: Option<f64>,
    /// Smallest rate that did not, MB/s.
    pub smallest_failing_mbps: Option<f64>,
    /// Every rate tried and whether it converged.
    pub steps: Vec<(f64, bool)>,
    /// Every migration of the bisection.
    pub runs: Vec<RunResult>,
    /// Why the bisection stopped early.
    pub error: Option<String>,
}

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `local` or the serve end's address.
    pub mode: String,
    /// Workload.
    pub workload: String,
    /// Writer pattern.
    pub pattern: String,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Repetitions per cell.
    pub repeat: u32,
    /// Baselines.
    pub baselines: Vec<Baseline>,
    /// The order of free page reporting when this machine returns freed memory to its
    /// host ([`crate::destmem::free_page_reporting`]).
    pub free_page_reporting: Option<u32>,
    /// Matrix cells.
    pub cells: Vec<CellReport>,
    /// Bisections.
    pub bisections: Vec<BisectReport>,
}

impl Report {
    /// Repetitions of matrix cells that failed or were not verified.
    pub fn failures(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for c in &self.cells {
            for r in &c.runs {
                if r.outcome != Outcome::Completed || !r.verified {
                    out.push((
                        c.spec.label(),
                        r.error.clone().unwrap_or_else(|| "not verified".into()),
                    ));
                }
            }
        }
        for b in &self.bisections {
            if let Some(e) = &b.error {
                out.push((format!("bisection {}", b.spec.label()), e.clone()));
            }
        }
        out
    }
}

/// The cells of the matrix, in table order (link, transport, codec, frame pages,
/// channels, dirty rate).
pub fn cells(plan: &Plan) -> Vec<CellSpec> {
    let mut out = Vec::new();
    for link in &plan.links {
        for transport in &plan.transports {
            for codec in &plan.codecs {
                // A codec without levels runs once, whatever the level list.
                let levels = match codec.level_range() {
                    Some((lo, hi)) => {
                        let mut ls: Vec<Option<i32>> = Vec::new();
                        for l in plan.levels.iter().map(|l| l.map(|l| l.clamp(lo, hi))) {
                            if !ls.contains(&l) {
                                ls.push(l);
                            }
                        }
                        ls
                    }
                    None => vec![None],
                };
                for level in levels {
                    for frame_pages in &plan.frame_pages {
                        for channels in &plan.channels {
                            for dirty in &plan.dirty_mbps {
                                out.push(CellSpec {
                                    workload: plan.workload.clone(),
                                    pattern: plan.pattern,
                                    codec: *codec,
                                    level,
                                    channels: *channels,
                                    frame_pages: *frame_pages,
                                    dirty_mbps: *dirty,
                                    link: *link,
                                    transport: *transport,
                                    mem_mib: plan.mem_mib,
                                    downtime_ms: plan.downtime_ms,
                                    max_rounds: plan.max_rounds,
                                    fail_on_cap: false,
                                    timeout_s: plan.timeout_s,
                                    dedup: plan.dedup,
                                    codec_threads: plan.codec_threads,
                                    send_queue: plan.send_queue,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Where cells run: both ends here, or a `serve` end.
pub trait Runner {
    /// The plain-socket ceiling over `link` with `channels` connections, Gbit/s.
    ///
    /// # Errors
    /// The sockets.
    fn baseline(&mut self, link: &LinkSpec, channels: u16, for_ms: u64) -> anyhow::Result<f64>;

    /// A plain-socket loop copying `bytes` into fresh and into populated memory.
    ///
    /// # Errors
    /// Where it cannot be measured (only local runs can).
    fn copy_into_memory(
        &mut self,
        _link: &LinkSpec,
        _channels: u16,
        _bytes: u64,
    ) -> anyhow::Result<IntoMemory> {
        anyhow::bail!("the copy-into-memory baseline runs locally only")
    }

    /// One repetition of a cell.
    ///
    /// # Errors
    /// What keeps the cell from being measured at all.
    fn run(&mut self, spec: &CellSpec, repetition: u32) -> anyhow::Result<RunResult>;
}

/// Both ends in this process.
#[derive(Debug)]
pub struct LocalRunner {
    guest: SourceGuest,
    links: Vec<(LinkSpec, Link)>,
    auth: Authentication,
    dest: cell::DestPrep,
}

impl LocalRunner {
    /// Fills the guest and brings every link up.
    ///
    /// # Errors
    /// A link that cannot be brought up (capped links need root); the workload.
    pub fn new(plan: &Plan, auth: Authentication) -> anyhow::Result<Self> {
        let mut links = Vec::new();
        for spec in &plan.links {
            let link = Link::up(spec).with_context(|| format!("bringing up link {spec}"))?;
            links.push((*spec, link));
        }
        let guest = SourceGuest::new(&plan.workload, plan.mem_mib)?;
        Ok(LocalRunner {
            guest,
            links,
            auth,
            dest: cell::DestPrep {
                memory: plan.dest_memory,
                prefault: plan.prefault,
            },
        })
    }

    fn link(&self, spec: &LinkSpec) -> anyhow::Result<&Link> {
        self.links
            .iter()
            .find(|(s, _)| s == spec)
            .map(|(_, l)| l)
            .with_context(|| format!("link {spec} is not up"))
    }
}

impl Runner for LocalRunner {
    fn baseline(&mut self, link: &LinkSpec, channels: u16, for_ms: u64) -> anyhow::Result<f64> {
        let link = self.link(link)?;
        socket_ceiling(link, channels, Duration::from_millis(for_ms))
    }

    fn copy_into_memory(
        &mut self,
        link: &LinkSpec,
        channels: u16,
        bytes: u64,
    ) -> anyhow::Result<IntoMemory> {
        use crate::destmem::{DestMemory, socket_into_memory};
        let link = self.link(link)?;
        let populated = DestMemory::Populated;
        Ok(IntoMemory {
            fresh_gbit_per_s: socket_into_memory(link, channels, bytes, DestMemory::Fresh, false)?,
            populated_gbit_per_s: socket_into_memory(link, channels, bytes, populated, false)?,
            populated_from_memory_gbit_per_s: socket_into_memory(
                link, channels, bytes, populated, true,
            )?,
        })
    }

    fn run(&mut self, spec: &CellSpec, repetition: u32) -> anyhow::Result<RunResult> {
        let link = self
            .links
            .iter()
            .find(|(s, _)| *s == spec.link)
            .map(|(_, l)| l)
            .with_context(|| format!("link {} is not up", spec.link))?;
        cell::run_local(
            spec,
            repetition,
            &mut self.guest,
            link,
            &self.auth,
            self.dest,
        )
    }
}

/// A source here, the destination a `serve` end.
#[derive(Debug)]
pub struct RemoteRunner {
    guest: SourceGuest,
    client: Client,
    auth: Authentication,
}

impl RemoteRunner {
    /// Connects to the serve end and fills the guest.
    ///
    /// # Errors
    /// The control connection; the workload.
    pub fn new(plan: &Plan, to: SocketAddr, auth: Authentication) -> anyhow::Result<Self> {
        let client = Client::connect(to)?;
        let guest = SourceGuest::new(&plan.workload, plan.mem_mib)?;
        Ok(RemoteRunner {
            guest,
            client,
            auth,
        })
    }
}

impl Runner for RemoteRunner {
    fn baseline(&mut self, _link: &LinkSpec, channels: u16, for_ms: u64) -> anyhow::Result<f64> {
        self.client
            .baseline(channels, Duration::from_millis(for_ms))
    }

    fn run(&mut self, spec: &CellSpec, repetition: u32) -> anyhow::Result<RunResult> {
        self.client
            .run_cell(spec, repetition, &mut self.guest, &self.auth)
    }
}

/// Binds a listener for the destination end inside the link's destination namespace
/// and reports its address, or why it could not, to the connecting side through `tx`.
pub(crate) fn listen_in_destination(
    link: &Link,
    tx: &std::sync::mpsc::Sender<anyhow::Result<SocketAddr>>,
) -> anyhow::Result<TcpListener> {
    let listener = (|| -> anyhow::Result<TcpListener> {
        link.enter_destination()?;
        Ok(TcpListener::bind(link.destination_addr(0))?)
    })();
    match listener {
        Ok(l) => {
            let _ = tx.send(l.local_addr().map_err(Into::into));
            Ok(l)
        }
        Err(e) => {
            let _ = tx.send(Err(anyhow::anyhow!("{e:#}")));
            Err(e)
        }
    }
}

/// Reads `c` to its end (or its first error) through a 1 MiB buffer; returns the
/// bytes read.
pub(crate) fn drain(c: &mut impl Read) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total
}

/// Plain blocking-socket copy loop over `link` with `channels` connections (the
/// readers in the destination's namespace, the writers in the source's): the
/// link's ceiling, Gbit/s.
///
/// # Errors
/// The sockets or the namespaces.
pub fn socket_ceiling(link: &Link, channels: u16, for_how_long: Duration) -> anyhow::Result<f64> {
    std::thread::scope(|s| -> anyhow::Result<f64> {
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
        let readers = s.spawn(move || -> anyhow::Result<u64> {
            let listener = crate::sweep::listen_in_destination(link, &tx)?;
            let total = std::thread::scope(|s2| -> anyhow::Result<u64> {
                let mut handles = Vec::new();
                for _ in 0..channels {
                    let (mut c, _) = listener.accept()?;
                    handles.push(s2.spawn(move || drain(&mut c)));
                }
                Ok(handles.into_iter().map(|h| h.join().unwrap_or(0)).sum())
            })?;
            Ok(total)
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .context("the baseline's reader did not bind")??;
        let start = Instant::now();
        let writers: Vec<_> = (0..channels)
            .map(|_| {
                s.spawn(move || -> anyhow::Result<()> {
                    link.enter_source()?;
                    write_for(addr, start, for_how_long)
                })
            })
            .collect();
        for w in writers {
            w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        let bytes = readers
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
    })
}

/// Writes 1 MiB buffers to `addr` until `for_how_long` after `start`.
///
/// # Errors
/// Connecting or writing.
pub fn write_for(addr: SocketAddr, start: Instant, for_how_long: Duration) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; 1 << 20];
    while start.elapsed() < for_how_long {
        s.write_all(&buf)?;
    }
    Ok(())
}

/// Runs the plan on `runner`: baselines, cells, bisections.
///
/// # Errors
/// What stops the whole run (a cell that cannot be measured at all).
pub fn run(plan: &Plan, runner: &mut dyn Runner) -> anyhow::Result<Report> {
    let cells = cells(plan);
    let mut pairs: Vec<(LinkSpec, u16)> = Vec::new();
    for c in &cells {
        if !pairs.contains(&(c.link, c.channels)) {
            pairs.push((c.link, c.channels));
        }
    }
    let bisect_cells = bisection_cells(plan);
    let bisect_steps = plan.bisect.map_or(0, |b| b.max_steps as u64);
    let total = pairs.len() as u64
        + cells.len() as u64 * plan.repeat as u64
        + bisect_cells.len() as u64 * bisect_steps;
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if plan.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }

    let mut baselines = Vec::new();
    let mut ceiling = BTreeMap::new();
    for (link, channels) in &pairs {
        bar.set_message(format!("baseline {link} x{channels}"));
        let b = runner.baseline(link, *channels, plan.baseline_ms);
        let (gbit, error) = match b {
            Ok(g) => (Some(g), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        ceiling.insert((link.to_string(), *channels), gbit);
        let into_memory = plan
            .memory_baseline
            .then(|| runner.copy_into_memory(link, *channels, plan.mem_mib << 20))
            .and_then(|r| {
                r.map_err(|e| eprintln!("copy-into-memory baseline: {e:#}"))
                    .ok()
            });
        baselines.push(Baseline {
            link: match plan.mode {
                Mode::Local => link.to_string(),
                Mode::Remote(a) => format!("to {a}"),
            },
            channels: *channels,
            gbit_per_s: gbit,
            error,
            into_memory,
        });
        bar.inc(1);
    }

    let mut reports = Vec::new();
    for spec in cells {
        let mut runs = Vec::new();
        for rep in 0..plan.repeat {
            bar.set_message(format!("{} #{}", spec.label(), rep + 1));
            runs.push(runner.run(&spec, rep)?);
            bar.inc(1);
        }
        reports.push(CellReport {
            baseline_gbit_per_s: ceiling
                .get(&(spec.link.to_string(), spec.channels))
                .copied()
                .flatten(),
            spec,
            runs,
        });
    }

    let mut bisections = Vec::new();
    if let Some(b) = plan.bisect {
        for spec in bisect_cells {
            let mut runs = Vec::new();
            let mut steps_done = 0u64;
            let result = bisect(0.0, b.max_mbps, b.resolution_mbps, b.max_steps, |rate| {
                let mut s = spec.clone();
                s.dirty_mbps = rate;
                bar.set_message(format!("bisect {}", s.label()));
                let r = runner.run(&s, runs.len() as u32)?;
                steps_done += 1;
                bar.inc(1);
                let outcome = r.outcome;
                let err = r.error.clone();
                // Converged by the estimate, and the pause it took kept the limit.
                let kept = r.downtime_ms <= s.downtime_ms as f64;
                runs.push(r);
                match outcome {
                    Outcome::Completed => Ok(kept),
                    Outcome::NotConverged => Ok(false),
                    Outcome::Failed => Err(anyhow::anyhow!(
                        "at {rate} MB/s: {}",
                        err.unwrap_or_default()
                    )),
                }
            });
            bar.inc(bisect_steps.saturating_sub(steps_done));
            bisections.push(match result {
                Ok(bi) => BisectReport {
                    spec,
                    largest_ok_mbps: bi.largest_ok,
                    smallest_failing_mbps: bi.smallest_failing,
                    steps: bi.steps,
                    runs,
                    error: None,
                },
                Err(e) => BisectReport {
                    spec,
                    largest_ok_mbps: None,
                    smallest_failing_mbps: None,
                    steps: Vec::new(),
                    runs,
                    error: Some(format!("{e:#}")),
                },
            });
        }
    }
    bar.finish_and_clear();
    Ok(Report {
        mode: match plan.mode {
            Mode::Local => "local".into(),
            Mode::Remote(a) => a.to_string(),
        },
        workload: plan.workload.to_string(),
        pattern: plan.pattern.name().into(),
        mem_mib: plan.mem_mib,
        repeat: plan.repeat,
        baselines,
        free_page_reporting: crate::destmem::free_page_reporting(),
        cells: reports,
        bisections,
    })
}

/// The cells bisected: per codec and link, the first channel count, frame size and
/// transport, failing (not switching over) when the caps are hit.
pub fn bisection_cells(plan: &Plan) -> Vec<CellSpec> {
    if plan.bisect.is_none() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for link in &plan.links {
        for codec in &plan.codecs {
            out.push(CellSpec {
                workload: plan.workload.clone(),
                pattern: plan.pattern,
                codec: *codec,
                level: if let Some((lo, hi)) = codec.level_range() {
                    plan.levels[0].map(|l| l.clamp(lo, hi))
                } else {
                    None
                },
                channels: plan.channels[0],
                frame_pages: plan.frame_pages[0],
                dirty_mbps: 0.0,
                link: *link,
                transport: plan.transports[0],
                mem_mib: plan.mem_mib,
                downtime_ms: plan.downtime_ms,
                max_rounds: plan.max_rounds,
                fail_on_cap: true,
                timeout_s: plan.timeout_s,
                dedup: plan.dedup,
                codec_threads: plan.codec_threads,
                send_queue: plan.send_queue,
            });
        }
    }
    out
}
