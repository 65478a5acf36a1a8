//! Bar charts: horizontal bars per labelled row (peak memory against its
//! estimate per rank role; busy/idle share per rank), grouped or stacked,
//! with the row labels given the room they need; and panels of stacked
//! columns (the communication breakdown per strategy and length).
//!
//! Drawing only, as in `plot.rs`.

use super::plot::tick;
use super::plot::{e, frame, legend, text, Chart, Heading, LegendEntry};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The label of the slot at `v` (slots sit at whole numbers), or nothing
/// for a tick between slots.
fn slot_label(labels: &[String], v: f64) -> String {
    let i = v.round();
    if (v - i).abs() < 1e-6 && i >= 0.0 {
        labels.get(i as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

/// One labelled row: `(legend entry, value)` segments.
#[derive(Clone, Debug)]
pub struct BarRow {
    pub label: String,
    pub segments: Vec<(usize, f64)>,
}

/// Horizontal bars, one row per label, segments side by side (`stacked`
/// false) or end to end.
#[derive(Clone, Debug)]
pub struct HBarChart {
    pub name: String,
    pub heading: Heading,
    pub x_desc: String,
    pub legend: Vec<LegendEntry>,
    pub rows: Vec<BarRow>,
    pub stacked: bool,
    /// Fixed end of the value axis (100 for shares); else from the data.
    pub x_max: Option<f64>,
}

impl Chart for HBarChart {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let area = legend(&frame(root, &self.heading)?, &self.legend)?;
        let n = self.rows.len();
        let total = |r: &BarRow| if self.stacked { r.segments.iter().map(|s| s.1).sum::<f64>() } else { r.segments.iter().map(|s| s.1).fold(0.0, f64::max) };
        let x_max = self.x_max.unwrap_or_else(|| self.rows.iter().map(total).fold(0.0, f64::max) * 1.1).max(1e-12);
        let label_font = text(14);
        let mut widest = 0;
        for r in &self.rows {
            widest = widest.max(area.estimate_text_size(&r.label, &label_font).map_err(e)?.0);
        }
        let mut chart = ChartBuilder::on(&area).margin(16).x_label_area_size(56).y_label_area_size(widest + 24).build_cartesian_2d(0.0..x_max, -0.5..n as f64 - 0.5).map_err(e)?;
        // Row 0 at the top: the value axis counts from the bottom.
        let labels: Vec<String> = self.rows.iter().rev().map(|r| r.label.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc(self.x_desc.clone())
            .x_label_formatter(&|v| tick(*v))
            .y_labels(n.max(1))
            .y_label_formatter(&|v| slot_label(&labels, *v))
            .label_style(text(14))
            .axis_desc_style(text(16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e)?;
        for (k, row) in self.rows.iter().enumerate() {
            let centre = (n - 1 - k) as f64;
            let parts = row.segments.len().max(1) as f64;
            let mut start = 0.0;
            for (j, &(entry, value)) in row.segments.iter().enumerate() {
                let (x0, x1) = if self.stacked { (start, start + value) } else { (0.0, value) };
                start = x1;
                // Side by side: segment j takes the j-th slice of the row, top first.
                let (y0, y1) = if self.stacked { (centre - 0.38, centre + 0.38) } else { (centre + 0.38 - 0.76 * (j as f64 + 1.0) / parts, centre + 0.38 - 0.76 * j as f64 / parts) };
                chart.draw_series(std::iter::once(Rectangle::new([(x0, y0), (x1, y1)], self.legend[entry].color.filled()))).map_err(e)?;
            }
        }
        Ok(())
    }
}

/// One panel of stacked columns: a title and `(column label, segments)`.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub columns: Vec<(String, Vec<(usize, f64)>)>,
}

/// Panels of stacked columns sharing one legend and one value axis.
#[derive(Clone, Debug)]
pub struct StackedPanels {
    pub name: String,
    pub heading: Heading,
    pub x_desc: String,
    pub y_desc: String,
    pub legend: Vec<LegendEntry>,
    pub panels: Vec<Panel>,
}

impl Chart for StackedPanels {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let area = legend(&frame(root, &self.heading)?, &self.legend)?;
        let y_max = self.panels.iter().flat_map(|p| p.columns.iter().map(|c| c.1.iter().map(|s| s.1).sum::<f64>())).fold(0.0, f64::max) * 1.15;
        let y_max = if y_max > 0.0 { y_max } else { 1.0 };
        for (panel, cell) in self.panels.iter().zip(area.split_evenly((self.panels.len().max(1), 1))) {
            let n = panel.columns.len();
            let labels: Vec<String> = panel.columns.iter().map(|c| c.0.clone()).collect();
            let mut chart =
                ChartBuilder::on(&cell).margin(10).caption(&panel.title, text(16)).x_label_area_size(44).y_label_area_size(90).build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..y_max).map_err(e)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_desc(self.x_desc.clone())
                .y_desc(self.y_desc.clone())
                .x_labels(n.max(1))
                .x_label_formatter(&|v| slot_label(&labels, *v))
                .y_label_formatter(&|v| tick(*v))
                .y_labels(5)
                .label_style(text(13))
                .axis_desc_style(text(14))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(e)?;
            for (i, (_, segments)) in panel.columns.iter().enumerate() {
                let x = i as f64;
                let mut start = 0.0;
                for &(entry, value) in segments {
                    chart.draw_series(std::iter::once(Rectangle::new([(x - 0.34, start), (x + 0.34, start + value)], self.legend[entry].color.filled()))).map_err(e)?;
                    start += value;
                }
                if start > 0.0 {
                    let total = Text::new(format!("{:.1}", start), (x, start), text(12).pos(Pos::new(HPos::Center, VPos::Bottom)));
                    chart.draw_series(std::iter::once(total)).map_err(e)?;
                }
            }
        }
        Ok(())
    }
}
