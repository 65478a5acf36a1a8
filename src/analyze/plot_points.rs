//! Scatter panels: the Pareto plot (tokens/s per sequence against tokens/s
//! per GPU, its frontier drawn) and predicted against measured (log-log,
//! with the line of perfect prediction).
//!
//! Drawing only, as in `plot.rs`.

use super::plot::tick;
use super::plot::{e, frame, legend, text, Chart, Heading, LegendEntry};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One point: its legend entry and a short annotation.
#[derive(Clone, Debug)]
pub struct ScatterPoint {
    pub x: f64,
    pub y: f64,
    pub entry: usize,
    pub note: String,
    pub hollow: bool,
}

/// One panel of points.
#[derive(Clone, Debug)]
pub struct ScatterPanel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub points: Vec<ScatterPoint>,
    /// Log-log axes with the y = x line (predicted against measured);
    /// otherwise linear axes from zero with the Pareto frontier.
    pub log_with_diagonal: bool,
}

/// Panels of points sharing a legend, in a grid of `columns`.
#[derive(Clone, Debug)]
pub struct ScatterPanels {
    pub name: String,
    pub heading: Heading,
    pub legend: Vec<LegendEntry>,
    pub panels: Vec<ScatterPanel>,
    pub columns: usize,
}

/// The points no other point beats on both axes (higher is better), by x.
pub fn pareto_frontier(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1)));
    let mut front = Vec::new();
    let mut best_y = f64::NEG_INFINITY;
    for p in sorted {
        if p.1 > best_y {
            front.push(p);
            best_y = p.1;
        }
    }
    front.reverse();
    front
}

impl Chart for ScatterPanels {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let area = legend(&frame(root, &self.heading)?, &self.legend)?;
        let columns = self.columns.max(1);
        let rows = self.panels.len().div_ceil(columns).max(1);
        for (panel, cell) in self.panels.iter().zip(area.split_evenly((rows, columns))) {
            let finite: Vec<&ScatterPoint> = panel.points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()).collect();
            if panel.log_with_diagonal {
                let values: Vec<f64> = finite.iter().flat_map(|p| [p.x, p.y]).filter(|v| *v > 0.0).collect();
                let lo = values.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = values.iter().cloned().fold(0.0, f64::max);
                let (lo, hi) = if lo.is_finite() && hi > 0.0 { (lo / 2.0, hi * 2.0) } else { (0.1, 10.0) };
                self.panel(&cell, panel, (lo..hi).log_scale(), (lo..hi).log_scale(), Some((lo, hi)))?;
            } else {
                let x_max = finite.iter().map(|p| p.x).fold(0.0, f64::max) * 1.15;
                let y_max = finite.iter().map(|p| p.y).fold(0.0, f64::max) * 1.15;
                self.panel(&cell, panel, 0.0..x_max.max(1e-9), 0.0..y_max.max(1e-9), None)?;
            }
        }
        Ok(())
    }
}

impl ScatterPanels {
    fn panel<DB: DrawingBackend, X, Y>(&self, cell: &DrawingArea<DB, Shift>, panel: &ScatterPanel, x: X, y: Y, diagonal: Option<(f64, f64)>) -> Result<(), String>
    where
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(cell).margin(14).caption(&panel.title, text(16)).x_label_area_size(50).y_label_area_size(80).build_cartesian_2d(x, y).map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(panel.x_desc.clone())
            .y_desc(panel.y_desc.clone())
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| tick(*v))
            .label_style(text(13))
            .axis_desc_style(text(14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e)?;
        let grey = RGBColor(110, 110, 110);
        if let Some((lo, hi)) = diagonal {
            chart.draw_series(DashedLineSeries::new([(lo, lo), (hi, hi)], 8, 6, grey.stroke_width(2))).map_err(e)?;
        } else {
            let front = pareto_frontier(&panel.points.iter().map(|p| (p.x, p.y)).collect::<Vec<_>>());
            if front.len() >= 2 {
                chart.draw_series(DashedLineSeries::new(front, 8, 6, grey.stroke_width(2))).map_err(e)?;
            }
        }
        for p in panel.points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()) {
            let c = self.legend[p.entry].color;
            if p.hollow {
                chart.draw_series([Circle::new((p.x, p.y), 7, WHITE.filled()), Circle::new((p.x, p.y), 7, c.stroke_width(2))]).map_err(e)?;
            } else {
                chart.draw_series(std::iter::once(Circle::new((p.x, p.y), 7, c.filled()))).map_err(e)?;
            }
            if !p.note.is_empty() {
                chart.draw_series(std::iter::once(Text::new(p.note.clone(), (p.x, p.y), text(12).pos(Pos::new(HPos::Left, VPos::Bottom))))).map_err(e)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontier_keeps_only_points_no_other_beats_on_both_axes() {
        let front = pareto_frontier(&[(1.0, 5.0), (2.0, 4.0), (1.5, 3.0), (3.0, 1.0), (0.5, 4.5)]);
        assert_eq!(front, vec![(1.0, 5.0), (2.0, 4.0), (3.0, 1.0)]);
    }
}
