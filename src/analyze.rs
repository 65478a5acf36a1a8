//! `fapool analyze`: the comparison tables of one or more results files —
//! per sequence-length category, every strategy's latency, throughput,
//! memory, communication share and energy, with the improvement of each
//! fapool-kind strategy over the first baseline-kind one — then the
//! communication breakdown, the planner's predictions beside the
//! measurements, and TPOT/TPS plots as SVG.
//!
//! It reads results files only through [`crate::results::read_run`] and
//! computes nothing the results module does not define: a category an
//! interrupted run left without a summary is summarised here with the same
//! code, from its recorded batches, and marked as such.

mod plot;

use crate::comm::Category;
use crate::metrics::CategorySummary;
use crate::results::{read_run, CategoryData, RankAggregates, ResultsError, RunData, StoredSummary};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of `analyze`.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("no results files given")]
    NoInput,
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("cannot write {path}: {source}")]
    Plot { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result of `analyze`.
pub type Result<T> = std::result::Result<T, AnalyzeError>;

/// Prints the tables of every file to `out` and writes the TPOT and TPS
/// plots next to the first file (`<stem>.tpot.svg`, `<stem>.tps.svg`).
pub fn analyze(paths: &[PathBuf], out: &mut dyn Write) -> Result<()> {
    let first = paths.first().ok_or(AnalyzeError::NoInput)?;
    let runs = paths.iter().map(read_run).collect::<std::result::Result<Vec<_>, _>>()?;
    for run in &runs {
        write_run_tables(run, out)?;
    }
    for path in write_plots(first, &runs)? {
        writeln!(out, "plot: {}", path.display())?;
    }
    Ok(())
}

/// A strategy's figures in one category.
struct Measured {
    stored: StoredSummary,
    /// Summarised here from recorded batches: the run stopped before it
    /// wrote the category's summary.
    partial: bool,
}

fn measured(c: &CategoryData) -> Option<Measured> {
    if let Some(s) = &c.summary {
        return Some(Measured { stored: s.clone(), partial: false });
    }
    if c.batches.is_empty() {
        return None;
    }
    // Without the runner's category wall time, batches back to back is the
    // closest stand-in.
    let wall_s = c.batches.iter().map(|b| b.e2e_s).sum();
    let stored = StoredSummary { summary: CategorySummary::from_batches(&c.batches, wall_s), aggregates: RankAggregates::from_ranks(&c.ranks), flops: c.batches.iter().map(|b| b.flops).sum() };
    Some(Measured { stored, partial: true })
}

/// Plain-number formatting with about four significant digits.
pub(crate) fn num(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        "n/a".into()
    } else if a == 0.0 {
        "0".into()
    // Thresholds sit just below the powers of ten so that a value which
    // rounds up to one (0.99996 → "1.00") takes the wider branch.
    } else if a >= 999.95 {
        format!("{x:.0}")
    } else if a >= 99.995 {
        format!("{x:.1}")
    } else if a >= 0.99995 {
        format!("{x:.2}")
    } else if a < 9.9995e-4 {
        format!("{x:.2e}")
    } else {
        let decimals = (2.0 - a.log10().floor()).clamp(0.0, 12.0) as usize;
        format!("{x:.decimals$}")
    }
}

fn ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}×")
    } else {
        "n/a".into()
    }
}

/// A plain-text table: the first `left` columns left-aligned (names), the
/// rest right-aligned (numbers).
struct Table {
    header: Vec<&'static str>,
    left: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: Vec<&'static str>, left: usize) -> Self {
        Self { header, left, rows: Vec::new() }
    }

    fn write(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| -> String {
            let padded: Vec<String> = cells.iter().zip(&widths).enumerate().map(|(i, (c, &w))| if i < self.left { format!("{c:<w$}") } else { format!("{c:>w$}") }).collect();
            padded.join("  ").trim_end().to_string()
        };
        writeln!(out, "{}", line(self.header.clone()))?;
        let total = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        writeln!(out, "{}", "-".repeat(total))?;
        for row in &self.rows {
            writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
        }
        Ok(())
    }
}

fn write_run_tables(run: &RunData, out: &mut dyn Write) -> Result<()> {
    let p = &run.provenance;
    writeln!(out, "== {} ==", run.path.display())?;
    let status = run.status.map_or("unknown".to_string(), |s| s.to_string());
    writeln!(out, "status {status}; started {}{}; fapool {} ({})", p.started_utc, run.ended_utc.as_ref().map_or(String::new(), |e| format!(", ended {e}")), p.tool_version, p.git_commit)?;
    let mut hosts = p.hosts.clone();
    hosts.sort();
    hosts.dedup();
    let device = p.devices.first().map_or(String::new(), |d| format!("; {}", d.name));
    writeln!(out, "{} ranks on {} host(s); backend {}, transport {}{device}", p.world_size, hosts.len(), p.backend, p.transport)?;

    let mut any_partial = false;
    for category in run.category_order() {
        let entries: Vec<(&str, &str, Measured)> = run
            .strategies
            .iter()
            .filter_map(|s| {
                let c = s.category(&category)?;
                Some((s.info.name.as_str(), s.info.kind.as_str(), measured(c)?))
            })
            .collect();
        if entries.is_empty() {
            continue;
        }
        let lengths: Vec<u32> = run.strategies.iter().filter_map(|s| s.category(&category)).flat_map(|c| c.batches.iter().map(|b| b.seq_len)).collect();
        let range = match (lengths.iter().min(), lengths.iter().max()) {
            (Some(lo), Some(hi)) if lo == hi => format!("sequence length {lo}"),
            (Some(lo), Some(hi)) => format!("sequence lengths {lo}–{hi}"),
            _ => String::new(),
        };
        writeln!(out)?;
        writeln!(out, "-- {category}: {range} --")?;
        any_partial |= entries.iter().any(|e| e.2.partial);
        write_comparison(&entries, out)?;
        writeln!(out)?;
        writeln!(out, "communication ({category})")?;
        write_communication(&entries, out)?;
        write_predictions(run, &category, &entries, out)?;
    }
    if any_partial {
        writeln!(out)?;
        writeln!(out, "* no stored summary (the run stopped before the category ended): figures from the recorded")?;
        writeln!(out, "  batches, with the category's wall time taken as the sum of their end-to-end times")?;
    }
    writeln!(out)?;
    Ok(())
}

fn label(name: &str, m: &Measured) -> String {
    if m.partial {
        format!("{name}*")
    } else {
        name.to_string()
    }
}

fn write_comparison(entries: &[(&str, &str, Measured)], out: &mut dyn Write) -> Result<()> {
    let baseline = entries.iter().find(|e| e.1 == "baseline").map(|e| &e.2.stored.summary);
    let mut t = Table::new(vec!["strategy", "kind", "batches", "TTFT ms", "TPOT ms", "p50 ms", "p99 ms", "TPS", "peak GB", "est GB", "comm %", "J/token", "TPOT ×", "TPS ×"], 2);
    for (name, kind, m) in entries {
        let (s, a) = (&m.stored.summary, &m.stored.aggregates);
        let (tpot_x, tps_x) = match baseline {
            Some(b) if *kind == "fapool" => (ratio(b.tpot.mean / s.tpot.mean), ratio(s.tps / b.tps)),
            _ => ("-".into(), "-".into()),
        };
        t.rows.push(vec![
            label(name, m),
            kind.to_string(),
            s.batches.to_string(),
            num(s.ttft.mean * 1e3),
            num(s.tpot.mean * 1e3),
            num(s.tpot.p50 * 1e3),
            num(s.tpot.p99 * 1e3),
            num(s.tps),
            a.peak_memory_max_gb().map_or("n/m".into(), num),
            num(a.memory_estimate_max_bytes as f64 / 1e9),
            format!("{:.1}", a.comm_share() * 100.0),
            a.energy_j_per_token(s.total_tokens).map_or("n/m".into(), num),
            tpot_x,
            tps_x,
        ]);
    }
    t.write(out)?;
    Ok(())
}

fn write_communication(entries: &[(&str, &str, Measured)], out: &mut dyn Write) -> Result<()> {
    let mut t = Table::new(vec!["strategy", "category", "rank-s", "busiest s", "GB", "calls", "GB/s", "% wall"], 2);
    for (name, _, m) in entries {
        let a = &m.stored.aggregates;
        let mut any = false;
        for c in Category::ALL {
            let Some(agg) = a.comm_of(c).filter(|g| g.calls > 0) else {
                continue;
            };
            any = true;
            let share = if a.active_wall_s > 0.0 { agg.seconds_sum / a.active_wall_s * 100.0 } else { 0.0 };
            t.rows.push(vec![
                label(name, m),
                c.name().to_string(),
                num(agg.seconds_sum),
                num(agg.seconds_max_rank),
                num(agg.bytes as f64 / 1e9),
                agg.calls.to_string(),
                agg.gb_per_s().map_or("n/a".into(), num),
                format!("{share:.1}"),
            ]);
        }
        if !any {
            t.rows.push(vec![label(name, m), "(none)".into()]);
        }
    }
    t.write(out)?;
    Ok(())
}

/// The measured value a prediction of this name is compared with.
fn measured_value(name: &str, s: &StoredSummary) -> Option<f64> {
    let m = &s.summary;
    match name {
        "ttft_s" => Some(m.ttft.mean),
        "tpot_s" => Some(m.tpot.mean),
        "e2e_s" => Some(m.e2e.mean),
        "paper_tpot_s" => Some(m.paper_tpot_mean),
        "tps" => Some(m.tps),
        "peak_memory_bytes" => s.aggregates.peak_memory_max_bytes.map(|b| b as f64),
        _ => None,
    }
}

fn write_predictions(run: &RunData, category: &str, entries: &[(&str, &str, Measured)], out: &mut dyn Write) -> Result<()> {
    let mut t = Table::new(vec!["strategy", "quantity", "predicted", "measured", "error %"], 2);
    for s in &run.strategies {
        let Some(c) = s.category(category) else {
            continue;
        };
        let m = entries.iter().find(|e| e.0 == s.info.name).map(|e| &e.2.stored);
        for (name, &predicted) in &c.predictions {
            let actual = m.and_then(|m| measured_value(name, m));
            let error = actual.filter(|a| *a != 0.0).map(|a| format!("{:+.1}", (predicted - a) / a * 100.0));
            t.rows.push(vec![s.info.name.clone(), name.clone(), num(predicted), actual.map_or("-".into(), num), error.unwrap_or_else(|| "-".into())]);
        }
    }
    if !t.rows.is_empty() {
        writeln!(out)?;
        writeln!(out, "planner prediction vs measurement ({category})")?;
        t.write(out)?;
    }
    Ok(())
}

/// Writes the TPOT and TPS charts of all runs next to `first` and returns
/// their paths.
fn write_plots(first: &Path, runs: &[RunData]) -> Result<Vec<PathBuf>> {
    let mut categories: Vec<String> = Vec::new();
    for run in runs {
        for c in run.category_order() {
            if !categories.contains(&c) {
                categories.push(c);
            }
        }
    }
    let mut tpot = Vec::new();
    let mut tps = Vec::new();
    for run in runs {
        let stem = run.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        for s in &run.strategies {
            let label = if runs.len() > 1 { format!("{stem}: {}", s.info.name) } else { s.info.name.clone() };
            let per_category: Vec<Option<Measured>> = categories.iter().map(|c| s.category(c).and_then(measured)).collect();
            let values = |f: &dyn Fn(&CategorySummary) -> f64| -> Vec<Option<f64>> { per_category.iter().map(|m| m.as_ref().map(|m| f(&m.stored.summary))).collect() };
            tpot.push(plot::Series { label: label.clone(), values: values(&|s| s.tpot.mean * 1e3) });
            tps.push(plot::Series { label, values: values(&|s| s.tps) });
        }
    }
    let charts = [
        ("tpot.svg", plot::line_chart("TPOT (mean) by sequence length", "TPOT (ms)", &categories, &tpot)),
        ("tps.svg", plot::line_chart("Throughput by sequence length", "TPS (tokens/s)", &categories, &tps)),
    ];
    let mut written = Vec::new();
    for (ext, svg) in charts {
        let path = first.with_extension(ext);
        std::fs::write(&path, svg).map_err(|source| AnalyzeError::Plot { path: path.clone(), source })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::tests::{batch, provenance, ranks, strategy, write_run, TempPath};
    use crate::results::ResultsFile;

    fn analyze_to_string(paths: &[PathBuf]) -> String {
        let mut out = Vec::new();
        analyze(paths, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The table row of `strategy` in the comparison table of `category`.
    fn row<'a>(text: &'a str, category: &str, strategy: &str) -> Vec<&'a str> {
        let section = text.split(&format!("-- {category}:")).nth(1).expect("category section");
        let line = section.lines().find(|l| l.split_whitespace().next() == Some(strategy)).expect("strategy row");
        line.split_whitespace().collect()
    }

    #[test]
    fn improvement_is_baseline_tpot_over_fapool_tpot_and_fapool_tps_over_baseline_tps() {
        let path = TempPath::new("analyze-improvement");
        // TPOT 2 ms vs 1 ms; E2E = 10 ms + 2 × TPOT, so TPS improves by 14/12.
        write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004]), ("fapool", "fapool", [0.001, 0.002])]);
        let text = analyze_to_string(std::slice::from_ref(&path.0));
        let fapool = row(&text, "short", "fapool");
        assert_eq!(fapool[fapool.len() - 2..], ["2.00×", "1.17×"], "{text}");
        let baseline = row(&text, "short", "baseline");
        assert_eq!(baseline[baseline.len() - 2..], ["-", "-"], "{text}");
        assert_eq!(row(&text, "short", "fapool")[4], "1.00", "TPOT mean in ms\n{text}");
    }

    #[test]
    fn energy_not_measured_prints_as_not_measured() {
        let path = TempPath::new("analyze-energy");
        {
            let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
            f.begin_strategy(&strategy("baseline", "baseline")).unwrap();
            let b = batch(0, 512, 0.002);
            f.append_batch("baseline", "short", &b, &ranks(0, None)).unwrap();
            f.write_summary("baseline", "short", &CategorySummary::from_batches(&[b], 0.014)).unwrap();
        }
        let text = analyze_to_string(std::slice::from_ref(&path.0));
        let r = row(&text, "short", "baseline");
        assert_eq!(r[11], "n/m", "{text}");
    }

    #[test]
    fn a_category_without_summary_is_summarised_from_its_batches_and_marked() {
        let path = TempPath::new("analyze-partial");
        {
            let mut f = ResultsFile::create(&path.0, false, &provenance()).unwrap();
            f.begin_strategy(&strategy("baseline", "baseline")).unwrap();
            f.append_batch("baseline", "medium", &batch(0, 4096, 0.004), &ranks(0, Some(1.0))).unwrap();
        }
        let text = analyze_to_string(std::slice::from_ref(&path.0));
        let r = row(&text, "medium", "baseline*");
        assert_eq!(r[4], "4.00", "{text}");
        assert!(text.contains("no stored summary"), "{text}");
    }

    #[test]
    fn communication_breakdown_lists_each_category_used() {
        let path = TempPath::new("analyze-comm");
        write_run(&path.0, &[("fapool", "fapool", [0.001, 0.002])]);
        let text = analyze_to_string(std::slice::from_ref(&path.0));
        let section = text.split("communication (short)").nth(1).unwrap();
        let kv = section.lines().find(|l| l.contains("kv_replication")).expect("kv_replication row");
        // 2 batches × 4 ranks × 2 calls of 3 MiB in 20 ms each.
        let cells: Vec<&str> = kv.split_whitespace().collect();
        assert_eq!(cells[5], "16", "{text}");
        assert_eq!(cells[6], "0.157", "{text}");
        assert!(!section.split("-- ").next().unwrap().contains("pool_scatter"), "{text}");
    }

    #[test]
    fn predictions_are_shown_beside_measurements() {
        let path = TempPath::new("analyze-prediction");
        write_run(&path.0, &[("fapool", "fapool", [0.001, 0.002])]);
        ResultsFile::open_existing(&path.0).unwrap().store_prediction("fapool", "short", "tpot_s", 0.0011).unwrap();
        let text = analyze_to_string(std::slice::from_ref(&path.0));
        let line = text.lines().find(|l| l.contains("tpot_s")).expect("prediction row");
        assert!(line.ends_with("+10.0"), "{line}");
    }

    #[test]
    fn plots_are_written_next_to_the_first_file() {
        let path = TempPath::new("analyze-plots");
        write_run(&path.0, &[("baseline", "baseline", [0.002, 0.004]), ("fapool", "fapool", [0.001, 0.002])]);
        let text = analyze_to_string(std::slice::from_ref(&path.0));
        for ext in ["tpot.svg", "tps.svg"] {
            let plot = path.0.with_extension(ext);
            assert!(text.contains(&format!("plot: {}", plot.display())), "{text}");
            let svg = std::fs::read_to_string(&plot).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("fapool") && svg.contains("medium"));
        }
    }

    #[test]
    fn no_input_is_an_error() {
        assert!(matches!(analyze(&[], &mut Vec::new()), Err(AnalyzeError::NoInput)));
    }

    #[test]
    fn numbers_keep_about_four_significant_digits() {
        assert_eq!(num(12.3456), "12.35");
        assert_eq!(num(0.012345), "0.0123");
        assert_eq!(num(4567.8), "4568");
        assert_eq!(num(0.9999999999999998), "1.00");
        assert_eq!(num(8e-6), "8.00e-6");
        assert_eq!(num(f64::NAN), "n/a");
    }
}
