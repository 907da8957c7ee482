//! Output: Markdown tables in the layout of the published tables, CSV and JSON with
//! every cell and repetition, and charts.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::cell::{Outcome, RunResult};
use crate::sweep::{CellReport, Report};
use crate::{Series, bar_chart, line_chart};

/// Median, smallest and largest of some values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// Of `values`; `None` when empty.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// `median` alone, or `median (min–max)` when they differ, with `digits`
    /// decimals.
    pub fn show(&self, digits: usize) -> String {
        let m = format!("{:.*}", digits, self.median);
        let lo = format!("{:.*}", digits, self.min);
        let hi = format!("{:.*}", digits, self.max);
        if lo == hi {
            m
        } else {
            format!("{m} ({lo}–{hi})")
        }
    }
}

/// The completed, verified repetitions of a cell.
fn good(c: &CellReport) -> Vec<&RunResult> {
    c.runs
        .iter()
        .filter(|r| r.outcome == Outcome::Completed && r.verified)
        .collect()
}

fn spread(runs: &[&RunResult], f: impl Fn(&RunResult) -> f64) -> Option<Spread> {
    Spread::of(runs.iter().map(|r| f(r)))
}

fn show(s: Option<Spread>, digits: usize) -> String {
    s.map_or_else(|| "—".into(), |s| s.show(digits))
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The run as Markdown: a heading, the baselines, the matrix table, failures, and the
/// bisection table.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### pagewire-stress: {} MiB, workload {}, pattern {}, {}, {} repetition(s) per cell\n",
        r.mem_mib, r.workload, r.pattern, r.mode, r.repeat
    );
    out.push_str("Baseline (a plain-socket copy loop, measured in this run over the same link): ");
    let b: Vec<String> = r
        .baselines
        .iter()
        .map(|b| match (b.gbit_per_s, &b.error) {
            (Some(g), _) => format!("{} x{}: {g:.2} Gbit/s", b.link, b.channels),
            (None, e) => format!(
                "{} x{}: failed ({})",
                b.link,
                b.channels,
                e.as_deref().unwrap_or("?")
            ),
        })
        .collect();
    let _ = writeln!(out, "{}.\n", b.join("; "));
    for b in &r.baselines {
        if let Some(m) = b.into_memory {
            let _ = writeln!(
                out,
                "Plain-socket loop copying the guest's size into memory ({} x{}): fresh {:.2} Gbit/s, populated {:.2} Gbit/s; sending from guest-sized memory instead of a hot buffer, into populated {:.2} Gbit/s.\n",
                b.link,
                b.channels,
                m.fresh_gbit_per_s,
                m.populated_gbit_per_s,
                m.populated_from_memory_gbit_per_s
            );
        }
    }
    if let Some(order) = r.free_page_reporting {
        let _ = writeln!(
            out,
            "This machine returns freed memory to its host (free page reporting, blocks of 2^{order} pages): fresh memory is faulted in by the host again on first touch, and figures into fresh memory measure that too.\n"
        );
    }
    let remote = (r.mode != "local").then(|| format!("to {}", r.mode));
    out.push_str(&matrix_table(&r.cells, remote.as_deref()));
    for c in &r.cells {
        for run in &c.runs {
            if let Some(a) = run.stats.as_ref().and_then(|s| s.adaptive.as_ref()) {
                let _ = writeln!(
                    out,
                    "\n{} #{}: {}",
                    c.spec.label(),
                    run.repetition + 1,
                    adaptive_line(a)
                );
            }
        }
    }
    let failures: Vec<String> = r
        .cells
        .iter()
        .flat_map(|c| {
            c.runs.iter().filter_map(move |run| {
                run.error
                    .as_ref()
                    .map(|e| format!("- {} #{}: {e}", c.spec.label(), run.repetition + 1))
            })
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\nFailed repetitions:\n{}", failures.join("\n"));
    }
    if !r.bisections.is_empty() {
        out.push('\n');
        out.push_str(&bisection_table(r));
    }
    out
}

/// The adaptive codec's shares and switches in one line.
fn adaptive_line(a: &pagewire::AdaptiveStats) -> String {
    let shares: Vec<String> = a
        .choices
        .iter()
        .filter(|c| c.frames > 0)
        .map(|c| format!("{} {:.0}%", c.choice, 100.0 * a.share(&c.choice)))
        .collect();
    let switches: Vec<String> = a
        .switches
        .iter()
        .map(|w| format!("{}→{} ({}) ×{}", w.from, w.to, w.reason, w.count))
        .collect();
    format!(
        "auto chose {} of the guest bytes; {} frames explored ({} paired); the receiver limited {} of {} windows; switches: {}",
        shares.join(", "),
        a.explored_frames,
        a.paired_samples,
        a.receiver_windows,
        a.windows,
        if switches.is_empty() {
            "none".to_string()
        } else {
            switches.join(", ")
        }
    )
}

/// The matrix table. Columns for frame size and transport appear when they vary; the
/// link column says `remote` (e.g. `to 10.0.0.2:7100`) for a run against a serve end.
pub fn matrix_table(cells: &[CellReport], remote: Option<&str>) -> String {
    let varies = |f: &dyn Fn(&CellReport) -> String| {
        let mut v: Vec<String> = cells.iter().map(f).collect();
        v.dedup();
        v.len() > 1
    };
    let frames = varies(&|c| c.spec.frame_pages.to_string());
    let transport = varies(&|c| c.spec.transport.name().to_string());
    let mut head = vec!["codec", "link"];
    if transport {
        head.push("transport");
    }
    head.push("channels");
    if frames {
        head.push("pages/frame");
    }
    head.extend([
        "dirty rate",
        "total time",
        "downtime",
        "pages/s",
        "guest Gbit/s",
        "vs baseline",
        "wire Gbit/s",
        "compression",
        "CPU % src / dst",
        "CPU-s/GiB src / dst",
        "verified",
    ]);
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(head.len()));
    for c in cells {
        let g = good(c);
        let s = &c.spec;
        let link = remote.map_or_else(|| s.link.to_string(), str::to_string);
        let mut row = vec![s.codec_label(), link];
        if transport {
            row.push(s.transport.name().into());
        }
        row.push(s.channels.to_string());
        if frames {
            row.push(s.frame_pages.to_string());
        }
        let achieved = spread(&g, |r| r.dirty_mbps_achieved);
        let mut dirty = format!("{} MB/s", s.dirty_mbps);
        if let Some(a) = achieved {
            // The writer shares the machine: say so when it fell short.
            if s.dirty_mbps > 0.0 && a.median < 0.9 * s.dirty_mbps {
                dirty = format!("{} MB/s (got {:.0})", s.dirty_mbps, a.median);
            }
        }
        // What the migration had to resend: distinct pages dirtied per second in the
        // last pre-copy round (the writer's rate counts a page rewritten twice twice).
        let distinct: Vec<f64> = g.iter().filter_map(|r| r.dirty_mbps_distinct()).collect();
        if s.dirty_mbps > 0.0 && !distinct.is_empty() {
            let mut d = distinct;
            d.sort_by(f64::total_cmp);
            dirty = format!("{dirty}, {:.0} distinct", d[d.len() / 2]);
        }
        row.push(dirty);
        row.push(show(spread(&g, |r| r.total_ms), 0) + " ms");
        row.push(show(spread(&g, |r| r.downtime_ms), 1) + " ms");
        row.push(spread(&g, |r| r.pages_per_s).map_or_else(|| "—".into(), |s| thousands(s.median)));
        let gbit = spread(&g, |r| r.guest_gbit_per_s);
        row.push(show(gbit, 2));
        row.push(match (gbit, c.baseline_gbit_per_s) {
            (Some(g), Some(b)) if b > 0.0 => format!("{:.2}x", g.median / b),
            _ => "—".into(),
        });
        row.push(show(spread(&g, |r| r.wire_gbit_per_s), 2));
        row.push(
            spread(&g, |r| r.compression_ratio)
                .map_or_else(|| "—".into(), |s| format!("{:.2}x", s.median)),
        );
        let (cs, cd) = (
            spread(&g, |r| r.cpu_source_pct()),
            spread(&g, |r| r.cpu_destination_pct()),
        );
        row.push(match (cs, cd) {
            (Some(a), Some(b)) => format!("{:.0} / {:.0}", a.median, b.median),
            _ => "—".into(),
        });
        let (gs, gd) = (
            spread(&g, |r| r.cpu_s_per_gib().0),
            spread(&g, |r| r.cpu_s_per_gib().1),
        );
        row.push(match (gs, gd) {
            (Some(a), Some(b)) => format!("{:.2} / {:.2}", a.median, b.median),
            _ => "—".into(),
        });
        let failed = c.runs.len() - g.len();
        row.push(if failed == 0 {
            format!("yes ({}/{})", g.len(), c.runs.len())
        } else {
            format!("**FAILED {failed}/{}**", c.runs.len())
        });
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

fn bisection_table(r: &Report) -> String {
    let mut out = String::new();
    out.push_str(
        "Largest dirty rate that still converges with the measured downtime within its \
         limit (bisection; the guest writer's rate, repeated writes to a page included, \
         CapPolicy::Fail; a step that completed over the limit says so):\n\n",
    );
    out.push_str("| codec | link | channels | downtime limit | round cap | converges at | fails at | steps (MB/s) |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for b in &r.bisections {
        let s = &b.spec;
        let ok = b
            .largest_ok_mbps
            .map_or_else(|| "none tried".into(), |v| format!("{v:.0} MB/s"));
        let fail = match (b.smallest_failing_mbps, &b.error) {
            (_, Some(e)) => format!("error: {e}"),
            (Some(v), None) => format!("{v:.0} MB/s"),
            (None, None) => "none up to the top".into(),
        };
        // Each step with the rate the writer achieved when it fell short (it shares
        // the machine with both ends).
        let steps: Vec<String> = b
            .steps
            .iter()
            .zip(b.runs.iter().map(Some).chain(std::iter::repeat(None)))
            .map(|((x, ok), run)| {
                let got = run
                    .map(|r| r.dirty_mbps_achieved)
                    .filter(|a| *x > 0.0 && *a < 0.9 * x)
                    .map_or(String::new(), |a| format!(" (got {a:.0})"));
                let over = run
                    .filter(|r| !ok && r.outcome == Outcome::Completed)
                    .map_or(String::new(), |r| {
                        format!(" (downtime {:.0} ms)", r.downtime_ms)
                    });
                format!("{x:.0}{got} {}{over}", if *ok { "ok" } else { "no" })
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} ms | {} | {ok} | {fail} | {} |",
            s.codec_label(),
            s.link,
            s.channels,
            s.downtime_ms,
            s.max_rounds,
            steps.join(", ")
        );
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Every repetition of every cell and bisection step, one CSV row each.
pub fn csv(r: &Report) -> String {
    let mut out = String::from(
        "kind,workload,codec,level,link,transport,channels,frame_pages,dirty_mbps,mem_mib,\
         downtime_limit_ms,max_rounds,repetition,outcome,verified,total_ms,setup_ms,downtime_ms,\
         rounds,pages_per_s,guest_bytes,wire_bytes,guest_gbit_per_s,wire_gbit_per_s,\
         baseline_gbit_per_s,ratio_vs_baseline,compression_ratio,dirty_mbps_achieved,\
         dirty_mbps_distinct,cpu_source_s,cpu_destination_s,cpu_source_pct,cpu_destination_pct,\
         cpu_source_s_per_gib,cpu_destination_s_per_gib,error\n",
    );
    let rows = r
        .cells
        .iter()
        .flat_map(|c| {
            c.runs
                .iter()
                .map(move |run| ("cell", &c.spec, c.baseline_gbit_per_s, run))
        })
        .chain(
            r.bisections
                .iter()
                .flat_map(|b| b.runs.iter().map(move |run| ("bisect", &b.spec, None, run))),
        );
    for (kind, s, base, run) in rows {
        let per = run.cpu_s_per_gib();
        let dirty = if kind == "bisect" {
            run.dirty_mbps_set
        } else {
            s.dirty_mbps
        };
        let fields = [
            kind.to_string(),
            s.workload.to_string(),
            s.codec.name().into(),
            s.level.map_or(String::new(), |l| l.to_string()),
            s.link.to_string(),
            s.transport.name().into(),
            s.channels.to_string(),
            s.frame_pages.to_string(),
            dirty.to_string(),
            s.mem_mib.to_string(),
            s.downtime_ms.to_string(),
            s.max_rounds.to_string(),
            run.repetition.to_string(),
            format!("{:?}", run.outcome),
            run.verified.to_string(),
            format!("{:.3}", run.total_ms),
            format!("{:.3}", run.setup_ms),
            format!("{:.3}", run.downtime_ms),
            run.rounds.to_string(),
            format!("{:.0}", run.pages_per_s),
            run.guest_bytes.to_string(),
            run.wire_bytes.to_string(),
            format!("{:.4}", run.guest_gbit_per_s),
            format!("{:.4}", run.wire_gbit_per_s),
            base.map_or(String::new(), |b| format!("{b:.4}")),
            base.filter(|b| *b > 0.0).map_or(String::new(), |b| {
                format!("{:.4}", run.guest_gbit_per_s / b)
            }),
            format!("{:.4}", run.compression_ratio),
            format!("{:.2}", run.dirty_mbps_achieved),
            run.dirty_mbps_distinct()
                .map_or(String::new(), |d| format!("{d:.2}")),
            format!("{:.4}", run.cpu_source_s),
            format!("{:.4}", run.cpu_destination_s),
            format!("{:.1}", run.cpu_source_pct()),
            format!("{:.1}", run.cpu_destination_pct()),
            format!("{:.4}", per.0),
            format!("{:.4}", per.1),
            run.error.clone().unwrap_or_default(),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// Writes `--json`, `--csv` and `--charts` where asked.
///
/// # Errors
/// Writing a file.
pub fn write_outputs(
    r: &Report,
    json: Option<&Path>,
    csv_path: Option<&Path>,
    charts: Option<&Path>,
) -> anyhow::Result<()> {
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_string_pretty(r)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = csv_path {
        std::fs::write(p, csv(r)).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = charts {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_charts(r, dir)?;
    }
    Ok(())
}

/// Series of median `y` against `x`, one per group of the other settings.
fn series(
    cells: &[CellReport],
    x: impl Fn(&CellReport) -> f64,
    group: impl Fn(&CellReport) -> String,
    y: impl Fn(&RunResult) -> f64,
) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for c in cells {
        let Some(m) = spread(&good(c), &y) else {
            continue;
        };
        let name = group(c);
        match out.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((x(c), m.median)),
            None => out.push(Series {
                name,
                points: vec![(x(c), m.median)],
            }),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The charts: throughput against channels, total time and downtime against dirty
/// rate, CPU per GiB by codec.
///
/// # Errors
/// Writing a chart.
pub fn write_charts(r: &Report, dir: &Path) -> anyhow::Result<()> {
    let cells = &r.cells;
    let by_channels = |c: &CellReport| {
        format!(
            "{} {} {} f{} {}MB/s",
            c.spec.codec_label(),
            c.spec.link,
            c.spec.transport.name(),
            c.spec.frame_pages,
            c.spec.dirty_mbps
        )
    };
    let by_dirty = |c: &CellReport| {
        format!(
            "{} {} {} x{} f{}",
            c.spec.codec_label(),
            c.spec.link,
            c.spec.transport.name(),
            c.spec.channels,
            c.spec.frame_pages
        )
    };
    line_chart(
        &dir.join("throughput-vs-channels"),
        "Guest memory throughput against channels",
        "channels",
        "Gbit/s",
        &series(
            cells,
            |c| f64::from(c.spec.channels),
            by_channels,
            |r| r.guest_gbit_per_s,
        ),
    )?;
    line_chart(
        &dir.join("total-time-vs-dirty-rate"),
        "Total time against dirty rate",
        "dirty rate, MB/s",
        "total time, ms",
        &series(cells, |c| c.spec.dirty_mbps, by_dirty, |r| r.total_ms),
    )?;
    line_chart(
        &dir.join("downtime-vs-dirty-rate"),
        "Downtime against dirty rate",
        "dirty rate, MB/s",
        "downtime, ms",
        &series(cells, |c| c.spec.dirty_mbps, by_dirty, |r| r.downtime_ms),
    )?;
    let mut bars: Vec<(String, f64)> = Vec::new();
    // Each codec once, in the order of the matrix (cells of one codec need not be
    // adjacent: the link or channel axis may vary faster).
    let mut codecs: Vec<String> = Vec::new();
    for c in cells {
        if !codecs.contains(&c.spec.codec_label()) {
            codecs.push(c.spec.codec_label());
        }
    }
    for codec in codecs {
        let runs: Vec<&RunResult> = cells
            .iter()
            .filter(|c| c.spec.codec_label() == codec)
            .flat_map(good)
            .collect();
        if let (Some(s), Some(d)) = (
            spread(&runs, |r| r.cpu_s_per_gib().0),
            spread(&runs, |r| r.cpu_s_per_gib().1),
        ) {
            bars.push((format!("{codec} src"), s.median));
            bars.push((format!("{codec} dst"), d.median));
        }
    }
    bar_chart(
        &dir.join("cpu-by-codec"),
        "CPU-seconds per GiB migrated, by codec",
        "CPU-s/GiB",
        &bars,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LinkSpec;
    use crate::cell::CellSpec;
    use crate::cli::{CodecChoice, TransportKind};
    use crate::workload::{Workload, WritePattern};

    fn spec(codec: CodecChoice, channels: u16) -> CellSpec {
        CellSpec {
            workload: Workload::Idle,
            pattern: WritePattern::Random,
            codec,
            level: None,
            channels,
            frame_pages: 128,
            dirty_mbps: 50.0,
            link: LinkSpec::Loopback,
            transport: TransportKind::Tcp,
            mem_mib: 256,
            downtime_ms: 300,
            max_rounds: 30,
            fail_on_cap: false,
            timeout_s: 30,
            dedup: true,
            codec_threads: None,
            send_queue: None,
        }
    }

    fn run(rep: u32, total_ms: f64) -> RunResult {
        let s = spec(CodecChoice::Zstd, 2);
        let mut r = RunResult::failed(rep, &s, &anyhow::anyhow!("x"));
        r.outcome = Outcome::Completed;
        r.error = None;
        r.verified = true;
        r.total_ms = total_ms;
        r.downtime_ms = 12.5;
        r.pages_per_s = 201_769.0;
        r.guest_bytes = 1 << 30;
        r.guest_gbit_per_s = 8.0 * 1.073741824 / (total_ms / 1e3);
        r.compression_ratio = 3.72;
        r.cpu_source_s = total_ms / 1e3; // one full core
        r.cpu_destination_s = total_ms / 2e3;
        r.dirty_mbps_achieved = 50.0;
        let mut stats = pagewire::MigrationStats::default();
        stats.dirty_rate_pages_per_s = 5_000.0; // 20.48 MB/s of distinct pages
        r.stats = Some(stats);
        r
    }

    fn report() -> Report {
        let mut failed = RunResult::failed(
            0,
            &spec(CodecChoice::Auto, 2),
            &anyhow::anyhow!("the destination closed the channel"),
        );
        failed.dirty_mbps_set = 50.0;
        Report {
            mode: "local".into(),
            workload: "idle".into(),
            pattern: "random".into(),
            mem_mib: 256,
            repeat: 3,
            baselines: vec![crate::sweep::Baseline {
                link: "loopback".into(),
                channels: 2,
                gbit_per_s: Some(20.0),
                error: None,
                into_memory: None,
            }],
            free_page_reporting: Some(9),
            cells: vec![
                CellReport {
                    spec: spec(CodecChoice::Zstd, 2),
                    runs: vec![run(0, 1000.0), run(1, 1200.0), run(2, 1100.0)],
                    baseline_gbit_per_s: Some(20.0),
                },
                CellReport {
                    spec: spec(CodecChoice::Auto, 2),
                    runs: vec![failed],
                    baseline_gbit_per_s: Some(20.0),
                },
            ],
            bisections: Vec::new(),
        }
    }

    #[test]
    fn spread_is_median_and_range() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of([1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert!(Spread::of([]).is_none());
        assert_eq!(s.show(0), "2 (1–3)");
        assert_eq!(Spread::of([5.0]).unwrap().show(1), "5.0");
    }

    #[test]
    fn markdown_has_the_published_columns_and_figures() {
        let md = markdown(&report());
        let header = md.lines().find(|l| l.starts_with("| codec")).unwrap();
        for col in [
            "codec",
            "link",
            "channels",
            "dirty rate",
            "total time",
            "downtime",
            "pages/s",
            "guest Gbit/s",
            "vs baseline",
            "wire Gbit/s",
            "compression",
            "CPU % src / dst",
            "CPU-s/GiB src / dst",
        ] {
            assert!(header.contains(col), "missing {col}: {header}");
        }
        let row = md.lines().find(|l| l.starts_with("| zstd")).unwrap();
        let cols: Vec<&str> = row.split(" | ").collect();
        assert!(row.contains("1100 (1000–1200) ms"), "{row}");
        assert!(row.contains("201,769"), "{row}");
        assert!(row.contains("3.72x"), "{row}");
        // One core on the source, half a core on the destination; 1 GiB migrated.
        assert!(row.contains("100 / 50"), "{row}");
        assert!(row.contains("yes (3/3)"), "{row}");
        assert!(row.contains("| 50 MB/s, 20 distinct |"), "{row}");
        assert_eq!(cols.len(), header.split(" | ").count());
        // Ratio: median Gbit/s over the 20 Gbit/s baseline.
        let g = 8.0 * 1.073741824 / 1.1;
        assert!(row.contains(&format!("{:.2}x", g / 20.0)), "{row}");
        assert!(md.contains("loopback x2: 20.00 Gbit/s"), "{md}");
        assert!(
            md.contains("free page reporting, blocks of 2^9 pages"),
            "{md}"
        );
        let quiet = Report {
            free_page_reporting: None,
            ..report()
        };
        assert!(!markdown(&quiet).contains("free page reporting"));
        let auto = md.lines().find(|l| l.starts_with("| auto")).unwrap();
        assert!(auto.contains("**FAILED 1/1**"), "{auto}");
        assert!(md.contains("the destination closed the channel"), "{md}");
    }

    #[test]
    fn csv_has_a_row_per_repetition() {
        let c = csv(&report());
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(lines.len(), 1 + 4);
        let n = lines[0].split(',').count();
        assert!(lines[1..3].iter().all(|l| l.split(',').count() == n), "{c}");
        assert!(lines[1].starts_with("cell,idle,zstd,,loopback,tcp,2,128,50,256"));
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
    }

    #[test]
    fn json_and_charts_are_written() {
        let dir =
            std::env::temp_dir().join(format!("pagewire-stress-report-{}", std::process::id()));
        let json = dir.join("r.json");
        std::fs::create_dir_all(&dir).unwrap();
        write_outputs(
            &report(),
            Some(&json),
            Some(&dir.join("r.csv")),
            Some(&dir.join("charts")),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(v["cells"][0]["runs"].as_array().unwrap().len(), 3);
        assert_eq!(v["cells"][0]["spec"]["codec"], "zstd");
        assert!(dir.join("charts/throughput-vs-channels.svg").exists());
        assert!(dir.join("charts/cpu-by-codec.svg").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
