//! Drawing with the `plotters` crate: every chart is drawn once, generically
//! over the backend, and written as PNG and SVG of the same size. Text is
//! laid out and rendered with DejaVu Sans embedded in the binary
//! (`assets/fonts/DejaVuSans.ttf`, Bitstream Vera licence, see
//! `assets/fonts/LICENSE-DejaVu.txt`), so plots need no system font.
//!
//! This file holds the frame every chart shares (title, caption naming the
//! job, GPU, date and commit, a legend sized to its longest label) and the
//! charts against sequence length; `plot_bars.rs` and `plot_points.rs` the
//! others. It draws what it is given and computes no figures.

use super::table::num;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};

/// Pixel size of every chart (PNG and SVG alike).
pub const WIDTH: u32 = 1280;
pub const HEIGHT: u32 = 800;

/// The embedded font, registered under the family name the charts use.
const FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Ten distinguishable colours (matplotlib's "tab10"), one per series.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of the `i`-th series.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Error text of a drawing failure.
pub fn e<E: std::fmt::Display>(err: E) -> String {
    err.to_string()
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are compiled in and known to parse; a failure here would
        // show as missing text, caught by the plot tests.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT_BYTES);
    });
}

/// Text of `size` pixels.
pub fn text(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&BLACK)
}

/// A chart that can be drawn on any backend.
pub trait Chart {
    /// File stem of the chart (`tpot_vs_length`).
    fn name(&self) -> String;
    /// Draws the whole chart on `root` (already `WIDTH` × `HEIGHT`).
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Writes `chart` as `<dir>/<name>.png` and `<dir>/<name>.svg`.
pub fn write_chart<C: Chart>(dir: &Path, chart: &C) -> Result<Vec<PathBuf>, String> {
    register_font();
    let png = dir.join(format!("{}.png", chart.name()));
    let svg = dir.join(format!("{}.svg", chart.name()));
    {
        let root = BitMapBackend::new(&png, (WIDTH, HEIGHT)).into_drawing_area();
        chart.draw(&root)?;
        root.present().map_err(|err| format!("{}: {err}", png.display()))?;
    }
    {
        let root = SVGBackend::new(&svg, (WIDTH, HEIGHT)).into_drawing_area();
        chart.draw(&root)?;
        root.present().map_err(|err| format!("{}: {err}", svg.display()))?;
    }
    Ok(vec![png, svg])
}

/// What the title block says.
#[derive(Clone, Debug, Default)]
pub struct Heading {
    pub title: String,
    /// Job, GPU, date and commit of the run(s).
    pub caption: String,
    /// How to read the chart (bands, hollow markers), if it needs saying.
    pub note: Option<String>,
}

/// Clears `root`, draws the title block and returns the area below it.
pub fn frame<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, h: &Heading) -> Result<DrawingArea<DB, Shift>, String> {
    root.fill(&WHITE).map_err(e)?;
    let (w, _) = root.dim_in_pixel();
    let centre = |y| (w as i32 / 2, y);
    let top = Pos::new(HPos::Center, VPos::Top);
    root.draw_text(&h.title, &text(24).pos(top), centre(10)).map_err(e)?;
    root.draw_text(&h.caption, &text(15).color(&RGBColor(60, 60, 60)).pos(top), centre(42)).map_err(e)?;
    let mut used = 66;
    if let Some(note) = &h.note {
        root.draw_text(note, &text(13).color(&RGBColor(90, 90, 90)).pos(top), centre(64)).map_err(e)?;
        used = 86;
    }
    Ok(root.split_vertically(used).1)
}

/// How a legend entry's sample is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mark {
    Line,
    Dashed,
    Block,
}

/// One legend entry.
#[derive(Clone, Debug)]
pub struct LegendEntry {
    pub label: String,
    pub color: RGBColor,
    pub mark: Mark,
}

const LEGEND_FONT: u32 = 15;
const LEGEND_ROW: i32 = 24;
const SAMPLE: i32 = 34;

/// Splits off a legend that shows every label whole: at the right when the
/// longest label leaves the plot most of the width, else below in as many
/// columns as fit. Returns the plot's area.
pub fn legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, entries: &[LegendEntry]) -> Result<DrawingArea<DB, Shift>, String> {
    if entries.is_empty() {
        return Ok(area.clone());
    }
    let font = text(LEGEND_FONT);
    let mut widest = 0;
    for entry in entries {
        widest = widest.max(area.estimate_text_size(&entry.label, &font).map_err(e)?.0 as i32);
    }
    let (w, h) = area.dim_in_pixel();
    let entry_w = SAMPLE + 10 + widest + 24;
    let (plot, legend_area, columns) = if entry_w <= w as i32 * 2 / 5 {
        let (plot, legend_area) = area.split_horizontally(w as i32 - entry_w);
        (plot, legend_area, 1)
    } else {
        let columns = ((w as i32 - 20) / entry_w).max(1) as usize;
        let rows = entries.len().div_ceil(columns) as i32;
        let (plot, legend_area) = area.split_vertically(h as i32 - rows * LEGEND_ROW - 16);
        (plot, legend_area, columns)
    };
    let left = if columns == 1 { 0 } else { 20 };
    for (i, entry) in entries.iter().enumerate() {
        let (row, col) = ((i / columns) as i32, (i % columns) as i32);
        let (x, y) = (left + col * entry_w, (if columns == 1 { 20 } else { 8 }) + row * LEGEND_ROW + LEGEND_ROW / 2);
        match entry.mark {
            Mark::Line => legend_area.draw(&PathElement::new(vec![(x, y), (x + SAMPLE, y)], entry.color.stroke_width(3))).map_err(e)?,
            Mark::Dashed => {
                for k in 0..3 {
                    let x0 = x + k * 13;
                    legend_area.draw(&PathElement::new(vec![(x0, y), (x0 + 8, y)], entry.color.stroke_width(3))).map_err(e)?;
                }
            }
            Mark::Block => legend_area.draw(&Rectangle::new([(x + 6, y - 8), (x + SAMPLE - 6, y + 8)], entry.color.filled())).map_err(e)?,
        }
        legend_area.draw_text(&entry.label, &font.pos(Pos::new(HPos::Left, VPos::Center)), (x + SAMPLE + 10, y)).map_err(e)?;
    }
    Ok(plot)
}

/// One point of a series against sequence length: a median and its
/// p10–p90 band.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub lo: f64,
    pub hi: f64,
    /// Drawn hollow: too few batches or too wide a spread to trust.
    pub unstable: bool,
}

/// A line of points.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub dashed: bool,
    pub points: Vec<Point>,
}

/// A chart of series against sequence length, the length axis
/// logarithmic with every point at its real length.
#[derive(Clone, Debug)]
pub struct LengthChart {
    pub name: String,
    pub heading: Heading,
    pub y_desc: String,
    pub series: Vec<Series>,
    /// A horizontal reference line (1× in the improvement chart) and its label.
    pub reference: Option<(f64, String)>,
    /// Start the value axis at zero (linear) rather than choosing a log axis
    /// for values spanning decades.
    pub from_zero: bool,
}

impl Chart for LengthChart {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let area = frame(root, &self.heading)?;
        let mut entries: Vec<LegendEntry> = self.series.iter().map(|s| LegendEntry { label: s.label.clone(), color: s.color, mark: if s.dashed { Mark::Dashed } else { Mark::Line } }).collect();
        if let Some((_, label)) = &self.reference {
            entries.push(LegendEntry { label: label.clone(), color: RGBColor(80, 80, 80), mark: Mark::Dashed });
        }
        let area = legend(&area, &entries)?;
        let points = || self.series.iter().flat_map(|s| s.points.iter());
        let xs: Vec<f64> = points().map(|p| p.x).filter(|x| *x > 0.0).collect();
        let ys: Vec<f64> = points().flat_map(|p| [p.y, p.lo, p.hi]).chain(self.reference.as_ref().map(|r| r.0)).filter(|y| y.is_finite()).collect();
        if xs.is_empty() || ys.is_empty() {
            return Err(format!("{}: nothing to draw", self.name));
        }
        let (x_min, x_max) = (xs.iter().cloned().fold(f64::INFINITY, f64::min), xs.iter().cloned().fold(0.0, f64::max));
        let x = (x_min / 1.25, x_max * 1.25);
        let (y_min, y_max) = (ys.iter().cloned().fold(f64::INFINITY, f64::min), ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
        if !self.from_zero && y_min > 0.0 && y_max / y_min > 30.0 {
            let (lo, hi) = (y_min / 1.5, y_max * 1.5);
            self.plot(&area, x, (lo, hi), (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)), "log scale")
        } else {
            let top = if y_max > 0.0 { y_max * 1.12 } else { 1.0 };
            let bottom = if self.from_zero || y_min >= 0.0 { 0.0 } else { y_min * 1.12 };
            self.plot(&area, x, (bottom, top), bottom..top, "")
        }
    }
}

/// Tick values of a logarithmic axis over `[lo, hi]`: 1, 2 and 5 of every
/// decade it spans, so every decade is labelled, also below 1.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        out.extend([1.0, 2.0, 5.0].iter().map(|m| m * decade).filter(|v| (lo..=hi).contains(v)));
        decade *= 10.0;
    }
    out
}

impl LengthChart {
    fn plot<DB: DrawingBackend, Y>(&self, area: &DrawingArea<DB, Shift>, x: (f64, f64), y_span: (f64, f64), y: Y, y_scale: &str) -> Result<(), String>
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(area).margin(16).x_label_area_size(56).y_label_area_size(90).build_cartesian_2d((x.0..x.1).log_scale(), y).map_err(e)?;
        let y_desc = if y_scale.is_empty() { self.y_desc.clone() } else { format!("{} ({y_scale})", self.y_desc) };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .set_tick_mark_size(LabelAreaPosition::Bottom, 0)
            .x_label_formatter(&|_| String::new())
            .x_desc("sequence length (tokens, log scale; a tick at every measured length)")
            .y_desc(y_desc)
            .y_label_formatter(&|v| tick(*v))
            .label_style(text(14))
            .axis_desc_style(text(16))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(e)?;
        // Ticks at the lengths measured, not at round numbers: a label is
        // left out where it would overlap the one before it.
        let mut lengths: Vec<f64> = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.x)).collect();
        lengths.sort_by(f64::total_cmp);
        lengths.dedup();
        chart.draw_series(lengths.iter().map(|&l| PathElement::new(vec![(l, y_span.0), (l, y_span.1)], RGBColor(232, 232, 232)))).map_err(e)?;
        let base = area.get_base_pixel();
        let mut free_from = i32::MIN;
        for &l in &lengths {
            let (px, py) = chart.backend_coord(&(l, y_span.0));
            let (px, py) = (px - base.0, py - base.1);
            area.draw(&PathElement::new(vec![(px, py), (px, py + 6)], BLACK.stroke_width(1))).map_err(e)?;
            let label = format!("{}", l.round());
            let width = area.estimate_text_size(&label, &text(13)).map_err(e)?.0 as i32;
            if px - width / 2 > free_from {
                area.draw_text(&label, &text(13).pos(Pos::new(HPos::Center, VPos::Top)), (px, py + 9)).map_err(e)?;
                free_from = px + width / 2 + 6;
            }
        }
        if let Some((level, _)) = &self.reference {
            chart.draw_series(DashedLineSeries::new([(x.0, *level), (x.1, *level)], 8, 6, RGBColor(80, 80, 80).stroke_width(2))).map_err(e)?;
        }
        for (k, s) in self.series.iter().enumerate() {
            // Earlier series drawn wider, so a line hidden under a later one still shows.
            let width = 2 + (self.series.len() - 1 - k).min(3) as u32;
            let mut pts = s.points.clone();
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
            if pts.len() >= 2 {
                let band: Vec<(f64, f64)> = pts.iter().map(|p| (p.x, p.hi)).chain(pts.iter().rev().map(|p| (p.x, p.lo))).collect();
                chart.draw_series(std::iter::once(Polygon::new(band, s.color.mix(0.15).filled()))).map_err(e)?;
            }
            // Each point's own p10–p90 range, visible where the band is a sliver.
            chart.draw_series(pts.iter().filter(|p| p.hi > p.lo).map(|p| PathElement::new(vec![(p.x, p.lo), (p.x, p.hi)], s.color.mix(0.6).stroke_width(2)))).map_err(e)?;
            let line: Vec<(f64, f64)> = pts.iter().map(|p| (p.x, p.y)).collect();
            if s.dashed {
                chart.draw_series(DashedLineSeries::new(line, 10, 6, s.color.stroke_width(width))).map_err(e)?;
            } else {
                chart.draw_series(LineSeries::new(line, s.color.stroke_width(width))).map_err(e)?;
            }
            for p in &pts {
                if p.unstable {
                    chart.draw_series(std::iter::once(Circle::new((p.x, p.y), 6, WHITE.filled()))).map_err(e)?;
                    chart.draw_series(std::iter::once(Circle::new((p.x, p.y), 6, s.color.stroke_width(2)))).map_err(e)?;
                } else {
                    chart.draw_series(std::iter::once(Circle::new((p.x, p.y), 6, s.color.filled()))).map_err(e)?;
                }
            }
        }
        Ok(())
    }
}

/// A tick value without trailing zeros ("0.8", "1.4", "2500", "1.5e-5").
pub fn tick(v: f64) -> String {
    let s = num(v);
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The note of charts with bands and stability markers.
pub fn band_note(min_batches: usize, cv_limit: f64) -> String {
    format!("line: median over batches; band and bars: p10–p90; hollow marker: unstable (fewer than {min_batches} batches, or coefficient of variation above {:.0} %)", cv_limit * 100.0)
}

#[cfg(test)]
mod tests {
    use super::log_ticks;

    #[test]
    fn a_log_axis_is_labelled_in_every_decade_it_spans_also_below_one() {
        assert_eq!(log_ticks(0.15, 8.0), vec![0.2, 0.5, 1.0, 2.0, 5.0]);
        assert_eq!(log_ticks(3.0, 40.0), vec![5.0, 10.0, 20.0]);
    }
}
