//! The picture of the cost report: for each tenant and model, monthly cost against monthly tokens
//! for the three ways (a band from each way's cheapest to its dearest offer), with the tenant's
//! volume marked. SVG and PNG, drawn by `plotters`; text is laid out (and, in PNG, rasterised)
//! with DejaVu Sans read at run time from Debian's `fonts-dejavu-core`, so no font lookup
//! (fontconfig) is linked.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::cost::example::volume;
use crate::cost::model::{self, Evaluation, Way};

/// Where Debian's `fonts-dejavu-core` puts the font the plot's text uses.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The font family the charts ask for.
const FAMILY: &str = "sans-serif";
/// Each chart's size in pixels.
const CHART: (u32, u32) = (960, 540);
/// Points on each curve.
const POINTS: usize = 97;

/// Why a plot was not written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlotError {
    /// The font could not be read.
    #[error("cannot read the plot's font {path}: {message} (install Debian's fonts-dejavu-core)")]
    Font {
        /// The font's path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// Nothing to plot.
    #[error(
        "nothing to plot: no tenant's traffic was priced (is --config given, with prices on the model's targets?)"
    )]
    Empty,
    /// Drawing or writing the file failed.
    #[error("cannot draw {path}: {message}")]
    Draw {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// One chart: a title and the month it shows.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    /// Its title (`tenant / model`).
    pub title: String,
    /// The month, its offers and traffic.
    pub month: &'a Evaluation,
}

/// Registers DejaVu Sans with plotters once per process; the bytes live as long as the process,
/// as plotters' font registry requires.
fn font() -> Result<(), PlotError> {
    static FONT: OnceLock<Result<(), PlotError>> = OnceLock::new();
    FONT.get_or_init(|| {
        let failed = |message: String| PlotError::Font { path: PathBuf::from(FONT_PATH), message };
        let bytes = std::fs::read(FONT_PATH).map_err(|e| failed(e.to_string()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| failed("not a TrueType font".into()))
    })
    .clone()
}

/// Writes the charts, stacked, as an SVG file.
pub fn write_svg(path: &Path, charts: &[Chart<'_>]) -> Result<(), PlotError> {
    font()?;
    let root = SVGBackend::new(path, size(charts)?).into_drawing_area();
    draw(root, charts).map_err(|message| PlotError::Draw { path: path.into(), message })
}

/// Writes the charts, stacked, as a PNG file.
pub fn write_png(path: &Path, charts: &[Chart<'_>]) -> Result<(), PlotError> {
    font()?;
    let root = BitMapBackend::new(path, size(charts)?).into_drawing_area();
    draw(root, charts).map_err(|message| PlotError::Draw { path: path.into(), message })
}

fn size(charts: &[Chart<'_>]) -> Result<(u32, u32), PlotError> {
    if charts.is_empty() {
        return Err(PlotError::Empty);
    }
    Ok((CHART.0, CHART.1 * charts.len() as u32))
}

fn colour(way: Way) -> RGBColor {
    match way {
        Way::Api => RGBColor(0x1f, 0x77, 0xb4),
        Way::Serverless => RGBColor(0xff, 0x7f, 0x0e),
        Way::Dedicated => RGBColor(0x2c, 0xa0, 0x2c),
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, charts: &[Chart<'_>]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    for (area, chart) in root.split_evenly((charts.len(), 1)).iter().zip(charts) {
        draw_one(area, chart).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

fn draw_one<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    chart: &Chart<'_>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB::ErrorType: 'static,
{
    let m = chart.month;
    let tokens = m.traffic.tokens().max(1.0);
    // Three decades around the volume at least, and the volume itself always on the chart: a small
    // tenant's mark must not fall off its left edge.
    let (lo, hi) = ((tokens / 10.0).clamp(1.0, 1e4), (tokens * 1_000.0).max(1e7));
    let volumes: Vec<f64> = (0..POINTS).map(|i| lo * (hi / lo).powf(i as f64 / (POINTS - 1) as f64)).collect();
    let curves = model::curves(&m.traffic, &m.offers, &m.gpus, &volumes);
    let values = curves.iter().flat_map(|(_, r)| r.iter().flat_map(|r| [r.low, r.high]));
    let (ymin, ymax) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (ymin, ymax) = ((ymin * 0.5).max(0.01), (ymax * 2.0).max(1.0));

    let mut ctx = ChartBuilder::on(area)
        .caption(format!("{}: monthly cost against monthly tokens", chart.title), (FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d((lo..hi).log_scale(), (ymin..ymax).log_scale())?;
    ctx.configure_mesh()
        .x_desc("tokens a month")
        .y_desc("USD a month")
        .x_label_formatter(&|v| volume(*v))
        .y_label_formatter(&|v| format!("${}", volume(*v)))
        .label_style((FAMILY, 14))
        .draw()?;
    for way in Way::ALL {
        let band: Vec<(f64, f64, f64)> = curves
            .iter()
            .filter_map(|(v, ranges)| ranges.iter().find(|r| r.way == way).map(|r| (*v, r.low, r.high)))
            .collect();
        if band.is_empty() {
            continue;
        }
        let c = colour(way);
        let outline: Vec<(f64, f64)> =
            band.iter().map(|&(v, l, _)| (v, l)).chain(band.iter().rev().map(|&(v, _, h)| (v, h))).collect();
        ctx.draw_series(std::iter::once(Polygon::new(outline, c.mix(0.18).filled())))?;
        ctx.draw_series(LineSeries::new(band.iter().map(|&(v, _, h)| (v, h)), c.stroke_width(1)))?;
        ctx.draw_series(LineSeries::new(band.iter().map(|&(v, l, _)| (v, l)), c.stroke_width(3)))?
            .label(way.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
    }
    ctx.draw_series(LineSeries::new([(tokens, ymin), (tokens, ymax)], BLACK.stroke_width(2)))?
        .label(format!("this traffic: {} tokens", volume(tokens)))
        .legend(|(x, y)| PathElement::new(vec![(x, y - 8), (x, y + 8)], BLACK.stroke_width(2)));
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::example::Example;

    #[test]
    fn writes_svg_and_png_with_every_way_and_the_volume_marked() {
        let example = Example::article();
        let charts: Vec<Chart> = example
            .rows
            .iter()
            .map(|m| Chart { title: format!("{} tokens", volume(m.traffic.tokens())), month: m })
            .collect();
        let dir = std::env::temp_dir().join(format!("meridian-cost-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let (svg, png) = (dir.join("cost.svg"), dir.join("cost.png"));
        let fonts = Path::new(FONT_PATH).exists();
        match write_svg(&svg, &charts) {
            Err(PlotError::Font { .. }) if !fonts => return,
            other => other.expect("an SVG"),
        }
        let text = std::fs::read_to_string(&svg).expect("the SVG");
        for label in ["api", "serverless", "dedicated", "this traffic: 100M tokens", "tokens a month"] {
            assert!(text.contains(label), "{label} missing");
        }
        write_png(&png, &charts).expect("a PNG");
        let bytes = std::fs::read(&png).expect("the PNG");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(matches!(write_svg(&svg, &[]), Err(PlotError::Empty)));
        std::fs::remove_dir_all(&dir).ok();
    }
}
