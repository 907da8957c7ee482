//! Charts of a stress run's figures, each written twice: `<stem>.svg` and `<stem>.png`.
//!
//! Drawn with plotters, without its `ttf` feature (font-kit, which needs fontconfig to
//! build): text is laid out and rasterised by `ab_glyph` from a TrueType font read at
//! run time, the first of `$PAGEWIRE_FONT`, then DejaVu Sans where Debian's
//! `fonts-dejavu-core` (`/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf`), Fedora,
//! Arch and Alpine install it. Without one, every chart call fails with an error
//! saying so; nothing is written.
//!
//! Charts with nothing to draw (no series, only empty series, no bars) are an error,
//! not an empty picture, so a run that produced no figures is noticed. Values that are
//! not finite (a failed measurement's NaN) are an error too, naming the series.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor;

/// The picture size in pixels (SVG user units).
const SIZE: (u32, u32) = (1024, 640);
/// The font family every text of a chart uses; registered by [`load_font`].
const FAMILY: &str = "sans-serif";
/// Where distributions install DejaVu Sans.
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
/// Colours of the series, in order (Tableau 10), repeating after ten.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a [`line_chart`].
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// `(x, y)` points; drawn sorted by x, each marked with a dot.
    pub points: Vec<(f64, f64)>,
}

/// Writes a line chart to `<stem>.svg` and `<stem>.png` (the suffix is appended, so
/// `out/rate.v2` gives `out/rate.v2.svg`). The y axis always includes 0.
///
/// # Errors
/// No points in any series, a coordinate that is not finite, no font (see the module
/// documentation), or a file that cannot be written.
pub fn line_chart(stem: &Path, title: &str, x: &str, y: &str, series: &[Series]) -> Result<()> {
    let mut sorted = Vec::with_capacity(series.len());
    for s in series {
        if let Some(p) = s
            .points
            .iter()
            .find(|p| !p.0.is_finite() || !p.1.is_finite())
        {
            bail!(
                "chart {title:?}: series {:?} has a point {p:?} that is not finite",
                s.name
            );
        }
        let mut points = s.points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        sorted.push((s.name.as_str(), points));
    }
    let all = || sorted.iter().flat_map(|s| s.1.iter().copied());
    if all().next().is_none() {
        bail!("chart {title:?}: nothing to plot (no series has a point)");
    }
    let xs = span(all().map(|p| p.0), false);
    let ys = span(all().map(|p| p.1), true);
    load_font()?;
    let (svg, png) = (with_suffix(stem, "svg"), with_suffix(stem, "png"));
    draw_lines(
        SVGBackend::new(&svg, SIZE).into_drawing_area(),
        title,
        (x, y),
        (xs, ys),
        &sorted,
    )
    .with_context(|| format!("write {}", svg.display()))?;
    draw_lines(
        BitMapBackend::new(&png, SIZE).into_drawing_area(),
        title,
        (x, y),
        (xs, ys),
        &sorted,
    )
    .with_context(|| format!("write {}", png.display()))
}

/// Writes a bar chart, one bar per `(label, value)` in the given order, to
/// `<stem>.svg` and `<stem>.png`, each bar with its value above it. The y axis always
/// includes 0.
///
/// # Errors
/// No bars, a value that is not finite, no font (see the module documentation), or a
/// file that cannot be written.
pub fn bar_chart(stem: &Path, title: &str, y: &str, bars: &[(String, f64)]) -> Result<()> {
    if bars.is_empty() {
        bail!("chart {title:?}: nothing to plot (no bars)");
    }
    if let Some((label, v)) = bars.iter().find(|b| !b.1.is_finite()) {
        bail!("chart {title:?}: bar {label:?} has a value {v} that is not finite");
    }
    let ys = span(bars.iter().map(|b| b.1), true);
    load_font()?;
    let (svg, png) = (with_suffix(stem, "svg"), with_suffix(stem, "png"));
    draw_bars(
        SVGBackend::new(&svg, SIZE).into_drawing_area(),
        title,
        y,
        ys,
        bars,
    )
    .with_context(|| format!("write {}", svg.display()))?;
    draw_bars(
        BitMapBackend::new(&png, SIZE).into_drawing_area(),
        title,
        y,
        ys,
        bars,
    )
    .with_context(|| format!("write {}", png.display()))
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    ((x0, x1), (y0, y1)): ((f64, f64), (f64, f64)),
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 26))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(85)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .x_label_formatter(&|v| number(*v))
        .y_label_formatter(&|v| number(*v))
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 15))
        .draw()?;
    root.present()?;
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    (y0, y1): (f64, f64),
    bars: &[(String, f64)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let n = bars.len() as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 26))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(85)
        // A segmented 0..k has the k + 1 segments 0..=k.
        .build_cartesian_2d((0..n - 1).into_segmented(), y0..y1)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .y_desc(y_desc)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars
                .get(*i as usize)
                .map(|b| b.0.clone())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| number(*v))
        .draw()?;
    chart.draw_series(bars.iter().zip(0u32..).map(|((_, v), i)| {
        let color = COLORS[i as usize % COLORS.len()];
        let mut r = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *v),
            ],
            color.filled(),
        );
        r.set_margin(0, 0, 12, 12);
        r
    }))?;
    // The value sits just beyond the end of its bar: above a positive one, below a
    // negative one.
    let label = |v: f64| {
        let v_pos = if v < 0.0 {
            text_anchor::VPos::Top
        } else {
            text_anchor::VPos::Bottom
        };
        TextStyle::from((FAMILY, 15).into_font())
            .pos(text_anchor::Pos::new(text_anchor::HPos::Center, v_pos))
    };
    chart.draw_series(
        bars.iter()
            .zip(0u32..)
            .map(|((_, v), i)| Text::new(number(*v), (SegmentValue::CenterOf(i), *v), label(*v))),
    )?;
    root.present()?;
    Ok(())
}

/// The range a list of values spans, widened where a chart needs it: to include 0 if
/// `from_zero`, 5% headroom beyond the data on the side away from 0, and a unit width
/// when all values are equal.
fn span(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if from_zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
        let pad = (hi - lo) * 0.05;
        if hi > 0.0 {
            hi += pad;
        }
        if lo < 0.0 {
            lo -= pad;
        }
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(lo.abs()).max(1.0) {
        lo -= 0.5;
        hi += 0.5;
    }
    (lo, hi)
}

/// A number for an axis or a bar: no more digits than its size needs, no trailing
/// zeros after the point.
fn number(v: f64) -> String {
    let a = v.abs();
    let s = if a == 0.0 {
        return "0".into();
    } else if !(1e-3..1e6).contains(&a) {
        return format!("{v:.2e}");
    } else if a >= 100.0 {
        return format!("{v:.0}");
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `stem` with `.suffix` appended (not replacing an extension stem may have).
fn with_suffix(stem: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(stem.as_os_str());
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Reads the chart font once per process and registers it with plotters as
/// [`FAMILY`]; see the module documentation for where it looks.
fn load_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let env = std::env::var_os("PAGEWIRE_FONT").map(PathBuf::from);
        let candidates: Vec<PathBuf> = env
            .iter()
            .cloned()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        let path = match (&env, candidates.iter().find(|p| p.is_file())) {
            (Some(e), _) if !e.is_file() => {
                return Err(format!("PAGEWIRE_FONT={} is not a file", e.display()));
            }
            (_, Some(p)) => p,
            (_, None) => {
                return Err(format!(
                    "no font for chart text: install fonts-dejavu-core or set PAGEWIRE_FONT \
                     to a .ttf file (looked in {})",
                    FONT_PATHS.join(", ")
                ));
            }
        };
        let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        // Registered fonts must live for the whole process; this happens once.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a TrueType/OpenType font", path.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory in the temp directory for one test; tests that pass remove
    /// it, unless `PAGEWIRE_KEEP_CHARTS=1` (to look at the pictures).
    fn dir(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pagewire-chart-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn done(dir: &Path) {
        if std::env::var("PAGEWIRE_KEEP_CHARTS").as_deref() == Ok("1") {
            eprintln!("charts kept in {}", dir.display());
        } else {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    fn check_files(stem: &Path) {
        let png = std::fs::read(with_suffix(stem, "png")).unwrap();
        assert!(png.len() > 1000, "{} bytes", png.len());
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(with_suffix(stem, "svg")).unwrap();
        assert!(
            svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "{svg}"
        );
    }

    fn series() -> Vec<Series> {
        let curve = |name: &str, f: fn(f64) -> f64| Series {
            name: name.into(),
            points: (0..=10).map(|i| (i as f64 * 100.0, f(i as f64))).collect(),
        };
        vec![
            curve("zstd", |x| 900.0 + 40.0 * x),
            curve("lz4", |x| 1200.0 - 30.0 * x),
            curve("raw", |_| 1100.0),
        ]
    }

    #[test]
    fn line_chart_writes_svg_and_png() {
        let d = dir("line");
        let stem = d.join("throughput.v1");
        line_chart(
            &stem,
            "Throughput against dirty rate",
            "dirty rate (MiB/s)",
            "Mbit/s on the wire",
            &series(),
        )
        .unwrap();
        check_files(&stem);
        let svg = std::fs::read_to_string(with_suffix(&stem, "svg")).unwrap();
        for text in [
            "Throughput against dirty rate",
            "zstd",
            "lz4",
            "dirty rate (MiB/s)",
        ] {
            assert!(svg.contains(text), "{text}");
        }
        // The suffix is appended, not swapped for `.v1`.
        assert!(d.join("throughput.v1.png").is_file());
        assert!(!d.join("throughput.png").exists());
        done(&d);
    }

    #[test]
    fn bar_chart_writes_svg_and_png() {
        let d = dir("bar");
        let stem = d.join("downtime");
        let bars = vec![
            ("raw".to_string(), 412.0),
            ("zstd".to_string(), 233.5),
            ("lz4".to_string(), 198.25),
            ("deflate".to_string(), 0.0),
        ];
        bar_chart(&stem, "Downtime by codec", "ms", &bars).unwrap();
        check_files(&stem);
        let svg = std::fs::read_to_string(with_suffix(&stem, "svg")).unwrap();
        for text in ["Downtime by codec", "zstd", "deflate", "412", "234"] {
            assert!(svg.contains(text), "{text}");
        }
        done(&d);
    }

    #[test]
    fn one_point_and_negative_values_draw() {
        let d = dir("edge");
        let one = [Series {
            name: "only".into(),
            points: vec![(5.0, 5.0)],
        }];
        line_chart(&d.join("one"), "one point", "x", "y", &one).unwrap();
        check_files(&d.join("one"));
        let bars = [("down".to_string(), -3.0), ("up".to_string(), 2.0)];
        bar_chart(&d.join("neg"), "negative", "delta", &bars).unwrap();
        check_files(&d.join("neg"));
        // An empty series next to a full one is a legend entry without a line.
        let mut s = series();
        s.push(Series {
            name: "failed".into(),
            points: vec![],
        });
        line_chart(&d.join("partial"), "partial", "x", "y", &s).unwrap();
        check_files(&d.join("partial"));
        bar_chart(&d.join("single"), "one bar", "y", &[("a".into(), 1.0)]).unwrap();
        check_files(&d.join("single"));
        done(&d);
    }

    #[test]
    fn nothing_to_plot_is_an_error_and_writes_nothing() {
        let d = dir("empty");
        let stem = d.join("empty");
        assert!(line_chart(&stem, "t", "x", "y", &[]).is_err());
        let empty = [Series {
            name: "a".into(),
            points: vec![],
        }];
        let e = line_chart(&stem, "t", "x", "y", &empty).unwrap_err();
        assert!(e.to_string().contains("nothing to plot"), "{e}");
        assert!(bar_chart(&stem, "t", "y", &[]).is_err());
        assert!(!with_suffix(&stem, "svg").exists() && !with_suffix(&stem, "png").exists());
        done(&d);
    }

    #[test]
    fn values_that_are_not_finite_are_an_error() {
        let d = dir("nan");
        let s = [Series {
            name: "broken".into(),
            points: vec![(1.0, 2.0), (2.0, f64::NAN)],
        }];
        let e = line_chart(&d.join("a"), "t", "x", "y", &s).unwrap_err();
        assert!(e.to_string().contains("\"broken\""), "{e}");
        let bars = [("inf".to_string(), f64::INFINITY)];
        assert!(bar_chart(&d.join("b"), "t", "y", &bars).is_err());
        done(&d);
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let stem = Path::new("/nonexistent-pagewire-dir/chart");
        let e = line_chart(stem, "t", "x", "y", &series()).unwrap_err();
        assert!(
            format!("{e:#}").contains("/nonexistent-pagewire-dir/chart.svg"),
            "{e:#}"
        );
    }

    #[test]
    fn spans_and_numbers() {
        assert_eq!(span([1.0, 3.0].into_iter(), false), (1.0, 3.0));
        assert_eq!(span([2.0, 2.0].into_iter(), false), (1.5, 2.5));
        assert_eq!(span([10.0, 20.0].into_iter(), true), (0.0, 21.0));
        assert_eq!(span([0.0].into_iter(), true), (-0.5, 0.5));
        assert_eq!(span([-10.0, 10.0].into_iter(), true), (-11.0, 11.0));
        assert_eq!(number(0.0), "0");
        assert_eq!(number(412.0), "412");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(50.0), "50");
        assert_eq!(number(1.5), "1.5");
        assert_eq!(number(-0.25), "-0.25");
        assert_eq!(number(2.5e9), "2.50e9");
    }
}
