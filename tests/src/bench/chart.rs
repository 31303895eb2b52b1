//! PNG charts of the benchmarks' distributions (`plotters`, bitmap backend).
//!
//! Text needs a TrueType font: plotters' `ab_glyph` backend draws with a font registered from
//! bytes, read at run time from `WATCHDOG_BENCH_FONT` or a usual system path (Debian's
//! `fonts-dejavu-core`). Without one the chart is drawn without text, and the caller says so.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Where a TrueType font is usually found.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

/// Line colours, in order.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Registers a font for "sans-serif" once; whether one was found.
pub fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let from_env = std::env::var("WATCHDOG_BENCH_FONT").ok();
        let candidates = from_env.iter().map(String::as_str).chain(
            if from_env.is_some() {
                &[][..]
            } else {
                FONT_PATHS
            }
            .iter()
            .copied(),
        );
        for path in candidates {
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        false
    })
}

/// One line of a panel.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Draw a marker at every point (for few points).
    pub markers: bool,
}

/// A horizontal reference line (a target).
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub label: String,
    pub y: f64,
}

/// One chart of a figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic x axis (latencies spanning decades).
    pub log_x: bool,
    pub lines: Vec<Line>,
    pub references: Vec<Reference>,
    /// Where the legend goes (a CDF's empty corner is the upper left).
    pub legend: SeriesLabelPosition,
}

/// The empirical CDF of `samples`: (value, percent at or below), sorted.
pub fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.iter()
        .enumerate()
        .map(|(i, &x)| (x, (i + 1) as f64 / n * 100.0))
        .collect()
}

/// [`cdf`] thinned to at most `points` points, evenly spaced in rank (the last always kept):
/// a 400,000-sample distribution stays a light PNG.
pub fn cdf_quantiles(samples: &[f64], points: usize) -> Vec<(f64, f64)> {
    let full = cdf(samples);
    if full.len() <= points || points < 2 {
        return full;
    }
    let step = full.len() as f64 / points as f64;
    let mut out: Vec<(f64, f64)> = (0..points)
        .map(|i| full[((i as f64 * step) as usize).min(full.len() - 1)])
        .collect();
    if out.last() != full.last() {
        out.extend(full.last().copied());
    }
    out
}

/// Draws `panels` side by side into a PNG at `path`, `title` above them. Returns whether text
/// was drawn (a font was found).
pub fn render(path: &Path, title: &str, panels: &[Panel]) -> Result<bool> {
    let text = font_available();
    let width = 640 * u32::try_from(panels.len().max(1)).unwrap_or(1);
    let root = BitMapBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = if text {
        root.titled(title, ("sans-serif", 22))
            .map_err(|e| anyhow!("{e}"))?
    } else {
        root
    };
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel, text)?;
    }
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(text)
}

/// The range of all x (or y) values of a panel, padded; positive for a log axis.
fn range(panel: &Panel, pick: fn(&(f64, f64)) -> f64, log: bool) -> (f64, f64) {
    let values = panel
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(pick))
        .filter(|v| v.is_finite() && (!log || *v > 0.0));
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return if log { (0.1, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        lo /= 1.5;
        hi *= 1.5;
    } else {
        let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.002).max(1e-6);
        lo -= pad;
        hi += pad;
    }
    (lo, hi)
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
    text: bool,
) -> Result<()> {
    // A log axis labels only powers of ten: under a decade and a half, linear reads better.
    let (lo, hi) = range(panel, |p| p.0, true);
    let log_x = panel.log_x && hi / lo > 30.0;
    let (x_lo, x_hi) = range(panel, |p| p.0, log_x);
    let (mut y_lo, mut y_hi) = range(panel, |p| p.1, false);
    for r in &panel.references {
        y_lo = y_lo.min(r.y - (y_hi - y_lo) * 0.05);
        y_hi = y_hi.max(r.y + (y_hi - y_lo) * 0.05);
    }
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(&panel.title, ("sans-serif", 17))
            .x_label_area_size(42)
            .y_label_area_size(58);
    }
    // Two coordinate types (log or linear x) share everything after the build.
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            let mut mesh = chart.configure_mesh();
            if text {
                mesh.x_desc(if log_x {
                    format!("{} (log scale)", panel.x_label)
                } else {
                    panel.x_label.clone()
                })
                .y_desc(panel.y_label.as_str())
                .x_labels(12)
                .label_style(("sans-serif", 13));
            } else {
                mesh.x_labels(0).y_labels(0);
            }
            mesh.draw().map_err(|e| anyhow!("{e}"))?;
            for r in &panel.references {
                let style = ShapeStyle::from(&BLACK.mix(0.55)).stroke_width(1);
                let series = chart
                    .draw_series(DashedLineSeries::new(
                        vec![(x_lo, r.y), (x_hi, r.y)],
                        6,
                        4,
                        style,
                    ))
                    .map_err(|e| anyhow!("{e}"))?;
                if text {
                    series
                        .label(r.label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                }
            }
            for (i, line) in panel.lines.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let points: Vec<(f64, f64)> = line
                    .points
                    .iter()
                    .copied()
                    .filter(|p| !log_x || p.0 > 0.0)
                    .collect();
                let series = chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(|e| anyhow!("{e}"))?;
                if text {
                    series.label(line.label.as_str()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                }
                if line.markers {
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                        .map_err(|e| anyhow!("{e}"))?;
                }
            }
            if text {
                chart
                    .configure_series_labels()
                    .position(panel.legend.clone())
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.4))
                    .label_font(("sans-serif", 13))
                    .draw()
                    .map_err(|e| anyhow!("{e}"))?;
            }
        }};
    }
    if log_x {
        finish!(
            builder
                .build_cartesian_2d((x_lo..x_hi).log_scale(), y_lo..y_hi)
                .map_err(|e| anyhow!("{e}"))?
        );
    } else {
        finish!(
            builder
                .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
                .map_err(|e| anyhow!("{e}"))?
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_is_sorted_and_ends_at_100() {
        let c = cdf(&[3.0, 1.0, 2.0, f64::NAN]);
        let xs: Vec<f64> = c.iter().map(|p| p.0).collect();
        assert_eq!(xs, vec![1.0, 2.0, 3.0]);
        assert!((c[0].1 - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(c[2].1, 100.0);
        assert!(cdf(&[]).is_empty());
    }

    #[test]
    fn renders_a_png() {
        let dir = std::env::temp_dir().join(format!("wd-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("t.png");
        let panel = Panel {
            title: "t".into(),
            x_label: "ms".into(),
            y_label: "%".into(),
            log_x: true,
            lines: vec![Line {
                label: "a".into(),
                points: cdf(&[0.5, 1.0, 2.0, 40.0]),
                markers: false,
            }],
            references: vec![Reference {
                label: "p99".into(),
                y: 99.0,
            }],
            legend: SeriesLabelPosition::UpperLeft,
        };
        render(
            &path,
            "test",
            &[
                panel.clone(),
                Panel {
                    log_x: false,
                    ..panel
                },
            ],
        )
        .expect("render");
        let bytes = std::fs::read(&path).expect("png written");
        assert_eq!(&bytes[1..4], b"PNG");
        if std::env::var_os("WATCHDOG_BENCH_KEEP_PNG").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
