//! Line charts as hand-written SVG: one line per strategy over the workload's
//! sequence-length categories. Enough for a first look in a browser; the
//! results file is the place for real plotting.
//!
//! Pure string building: no file access.

use std::fmt::Write as _;

/// One line of a chart: a value per category, `None` where the strategy has
/// no measurement (the line breaks there).
pub(crate) struct Series {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

const PALETTE: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
const WIDTH: f64 = 780.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A round tick step (1, 2 or 5 × 10^k) giving about five ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().find(|m| m * magnitude >= raw).unwrap_or(10.0);
    step * magnitude
}

/// A tick value without trailing zeros ("2", "0.5", "1.5e-5").
fn tick_label(v: f64) -> String {
    let s = super::num(v);
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The chart as a standalone SVG document.
pub(crate) fn line_chart(title: &str, y_label: &str, categories: &[String], series: &[Series]) -> String {
    let max = series.iter().flat_map(|s| s.values.iter().flatten()).fold(0.0f64, |m, &v| if v.is_finite() { m.max(v) } else { m });
    let step = if max > 0.0 { tick_step(max) } else { 0.2 };
    let y_max = if max > 0.0 { (max / step).ceil() * step } else { 1.0 };
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let band = plot_w / categories.len().max(1) as f64;
    let x = |i: usize| LEFT + (i as f64 + 0.5) * band;
    let y = |v: f64| TOP + plot_h * (1.0 - v / y_max);

    let mut svg = String::new();
    let _ = writeln!(svg, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#, LEFT + plot_w / 2.0, escape(title));

    // Horizontal grid and y ticks.
    let ticks = (y_max / step).round() as usize;
    for t in 0..=ticks {
        let v = t as f64 * step;
        let yy = y(v);
        let _ = writeln!(svg, r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/>"##, LEFT + plot_w);
        let _ = writeln!(svg, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, yy + 4.0, tick_label(v));
    }
    let _ = writeln!(svg, r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#, TOP + plot_h / 2.0, escape(y_label));
    // Axes and category labels.
    let _ = writeln!(svg, r##"<path d="M{LEFT},{TOP} V{:.1} H{:.1}" fill="none" stroke="#333"/>"##, TOP + plot_h, LEFT + plot_w);
    for (i, c) in categories.iter().enumerate() {
        let _ = writeln!(svg, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, x(i), TOP + plot_h + 20.0, escape(c));
    }
    let _ = writeln!(svg, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">sequence-length category</text>"#, LEFT + plot_w / 2.0, HEIGHT - 12.0);

    for (k, s) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        // Consecutive measured points form one polyline; a gap starts another.
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for (i, v) in s.values.iter().enumerate() {
            match v {
                Some(v) if v.is_finite() => runs.last_mut().expect("never empty").push((x(i), y(*v))),
                _ => runs.push(Vec::new()),
            }
        }
        for run in runs.iter().filter(|r| r.len() > 1) {
            let points: Vec<String> = run.iter().map(|(px, py)| format!("{px:.1},{py:.1}")).collect();
            let _ = writeln!(svg, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, points.join(" "));
        }
        for (px, py) in runs.iter().flatten() {
            let _ = writeln!(svg, r#"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{color}"/>"#);
        }
        let ly = TOP + 10.0 + 20.0 * k as f64;
        let lx = WIDTH - RIGHT + 20.0;
        let _ = writeln!(svg, r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/>"#, lx + 24.0);
        let _ = writeln!(svg, r#"<text x="{}" y="{}">{}</text>"#, lx + 30.0, ly + 4.0, escape(&s.label));
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(tick_step(10.0), 2.0);
        assert_eq!(tick_step(0.9), 0.2);
        assert_eq!(tick_step(4200.0), 1000.0);
        assert_eq!(tick_label(2.0), "2");
        assert_eq!(tick_label(0.4), "0.4");
        assert_eq!(tick_label(1000.0), "1000");
    }

    #[test]
    fn a_missing_value_breaks_the_line() {
        let s = Series { label: "a<b".into(), values: vec![Some(1.0), Some(2.0), None, Some(3.0)] };
        let svg = line_chart("t", "y", &["a".into(), "b".into(), "c".into(), "d".into()], &[s]);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("a&lt;b"));
    }
}
