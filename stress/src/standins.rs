//! STAND-INS, to be deleted: minimal private versions of `link.rs`, `bisect.rs` and
//! `chart.rs`, which another branch is writing with these exact names and signatures.
//! When they land, each `use crate::standins::X` in `lib.rs` becomes `use crate::link::X`
//! (or `bisect`, `chart`), one line per item, and this file goes.
//!
//! What the stand-ins do not do: `Link::up` only brings up loopback (a capped link
//! fails with an error that says so); `line_chart`/`bar_chart` write a plain SVG and no
//! PNG.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr;

use anyhow::bail;

/// STAND-IN for `link::LinkSpec`: the link a cell migrates over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinkSpec {
    /// 127.0.0.1, no cap.
    Loopback,
    /// A network-namespace pair whose veth is capped by `tc tbf` at `gbit` Gbit/s.
    Capped {
        /// The cap, Gbit/s.
        gbit: f64,
    },
}

impl FromStr for LinkSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        if s == "loopback" || s == "lo" {
            return Ok(LinkSpec::Loopback);
        }
        let Some(n) = s.strip_suffix("gbit") else {
            bail!("unknown link {s:?}: loopback, or a cap such as 1gbit, 2.5gbit, 10gbit");
        };
        match n.parse::<f64>() {
            Ok(gbit) if gbit.is_finite() && gbit > 0.0 => Ok(LinkSpec::Capped { gbit }),
            _ => bail!("bad link cap {s:?}: a positive number of Gbit/s such as 2.5gbit"),
        }
    }
}

impl std::fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkSpec::Loopback => f.write_str("loopback"),
            LinkSpec::Capped { gbit } => write!(f, "{gbit}gbit"),
        }
    }
}

/// STAND-IN for `link::Link`: loopback only.
#[derive(Debug)]
pub struct Link {
    _private: (),
}

impl Link {
    /// Brings the link up (loopback: nothing to do).
    ///
    /// # Errors
    /// Always for a capped link: the stand-in cannot make one.
    pub fn up(spec: &LinkSpec) -> anyhow::Result<Link> {
        match spec {
            LinkSpec::Loopback => Ok(Link { _private: () }),
            LinkSpec::Capped { .. } => bail!(
                "link {spec}: capped links need stress/src/link.rs (network namespaces and \
                 tc tbf), which has not landed on this branch yet; use --link loopback"
            ),
        }
    }

    /// Where the destination listens.
    pub fn destination_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// Moves the calling thread into the source's namespace (loopback: nothing).
    ///
    /// # Errors
    /// Never for loopback.
    pub fn enter_source(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Moves the calling thread into the destination's namespace (loopback: nothing).
    ///
    /// # Errors
    /// Never for loopback.
    pub fn enter_destination(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// STAND-IN for `bisect::Bisection`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bisection {
    /// The largest value that converged.
    pub largest_ok: Option<f64>,
    /// The smallest value that did not.
    pub smallest_failing: Option<f64>,
    /// Every value tried, in order, with its outcome.
    pub steps: Vec<(f64, bool)>,
}

/// STAND-IN for `bisect::bisect`: tries `hi`, then `lo`, then halves the interval
/// until it is narrower than `resolution` or `max_steps` values were tried.
///
/// # Errors
/// The first error of `converges`.
pub fn bisect(
    lo: f64,
    hi: f64,
    resolution: f64,
    max_steps: u32,
    mut converges: impl FnMut(f64) -> anyhow::Result<bool>,
) -> anyhow::Result<Bisection> {
    let mut b = Bisection::default();
    let mut try_at = |x: f64, b: &mut Bisection| -> anyhow::Result<bool> {
        let ok = converges(x)?;
        b.steps.push((x, ok));
        if ok {
            b.largest_ok = Some(b.largest_ok.map_or(x, |v: f64| v.max(x)));
        } else {
            b.smallest_failing = Some(b.smallest_failing.map_or(x, |v: f64| v.min(x)));
        }
        Ok(ok)
    };
    if max_steps == 0 {
        return Ok(b);
    }
    if try_at(hi, &mut b)? || b.steps.len() as u32 >= max_steps {
        return Ok(b);
    }
    if !try_at(lo, &mut b)? {
        return Ok(b);
    }
    let (mut ok, mut bad) = (lo, hi);
    while bad - ok > resolution && (b.steps.len() as u32) < max_steps {
        let mid = (ok + bad) / 2.0;
        if try_at(mid, &mut b)? {
            ok = mid;
        } else {
            bad = mid;
        }
    }
    Ok(b)
}

/// STAND-IN for `chart::Series`.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend.
    pub name: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn svg_frame(title: &str, x: &str, y: &str, body: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"400\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"640\" height=\"400\" fill=\"white\"/>\n\
         <text x=\"320\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n\
         <line x1=\"60\" y1=\"340\" x2=\"600\" y2=\"340\" stroke=\"black\"/>\n\
         <line x1=\"60\" y1=\"40\" x2=\"60\" y2=\"340\" stroke=\"black\"/>\n\
         <text x=\"330\" y=\"375\" text-anchor=\"middle\">{}</text>\n\
         <text x=\"15\" y=\"190\" transform=\"rotate(-90 15 190)\" text-anchor=\"middle\">{}</text>\n\
         {body}</svg>\n",
        esc(title),
        esc(x),
        esc(y)
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// STAND-IN for `chart::line_chart`: writes `stem.svg` only (no PNG).
///
/// # Errors
/// Writing the file.
pub fn line_chart(
    stem: &Path,
    title: &str,
    x: &str,
    y: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(px, py) in pts {
        x0 = x0.min(px);
        x1 = x1.max(px);
        y1 = y1.max(py);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let sx = |v: f64| 60.0 + (v - x0) / (x1 - x0) * 540.0;
    let sy = |v: f64| 340.0 - v / y1 * 300.0;
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<text x=\"55\" y=\"44\" text-anchor=\"end\">{y1:.3}</text>"
    );
    let _ = writeln!(
        body,
        "<text x=\"60\" y=\"355\" text-anchor=\"middle\">{x0}</text>"
    );
    let _ = writeln!(
        body,
        "<text x=\"600\" y=\"355\" text-anchor=\"middle\">{x1}</text>"
    );
    for (i, s) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let line: Vec<String> = s
            .points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", sx(px), sy(py)))
            .collect();
        let _ = writeln!(
            body,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
            line.join(" ")
        );
        for &(px, py) in &s.points {
            let _ = writeln!(
                body,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>",
                sx(px),
                sy(py)
            );
        }
        let _ = writeln!(
            body,
            "<text x=\"470\" y=\"{}\" fill=\"{c}\">{}</text>",
            50 + 16 * i,
            esc(&s.name)
        );
    }
    std::fs::write(stem.with_extension("svg"), svg_frame(title, x, y, &body))?;
    Ok(())
}

/// STAND-IN for `chart::bar_chart`: writes `stem.svg` only (no PNG).
///
/// # Errors
/// Writing the file.
pub fn bar_chart(stem: &Path, title: &str, y: &str, bars: &[(String, f64)]) -> anyhow::Result<()> {
    let top = bars
        .iter()
        .map(|b| b.1)
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let w = 540.0 / bars.len().max(1) as f64;
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<text x=\"55\" y=\"44\" text-anchor=\"end\">{top:.3}</text>"
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let h = v / top * 300.0;
        let x = 60.0 + i as f64 * w;
        let _ = writeln!(
            body,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\n\
             <text x=\"{:.1}\" y=\"355\" text-anchor=\"middle\">{}</text>",
            x + w * 0.1,
            340.0 - h,
            w * 0.8,
            COLOURS[i % COLOURS.len()],
            x + w / 2.0,
            esc(name)
        );
    }
    std::fs::write(stem.with_extension("svg"), svg_frame(title, "", y, &body))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_parse() {
        assert_eq!("loopback".parse::<LinkSpec>().unwrap(), LinkSpec::Loopback);
        assert_eq!(
            "2.5gbit".parse::<LinkSpec>().unwrap(),
            LinkSpec::Capped { gbit: 2.5 }
        );
        assert!("10mbit".parse::<LinkSpec>().is_err());
        assert!("-1gbit".parse::<LinkSpec>().is_err());
    }

    #[test]
    fn bisection_brackets_the_threshold() {
        let b = bisect(0.0, 100.0, 5.0, 20, |x| Ok(x <= 37.0)).unwrap();
        let (ok, bad) = (b.largest_ok.unwrap(), b.smallest_failing.unwrap());
        assert!(ok <= 37.0 && bad > 37.0 && bad - ok <= 5.0, "{b:?}");
        let b = bisect(0.0, 100.0, 5.0, 3, |_| Ok(false)).unwrap();
        assert_eq!(b.largest_ok, None);
        assert_eq!(b.steps.len(), 2);
    }
}
