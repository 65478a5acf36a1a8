//! `--csv DIR` and `--json FILE`: one row per (strategy, category, batch)
//! and one per (strategy, category) summary, with the same columns in both
//! formats (documented in docs/results-schema.md, "Analysis exports").
//!
//! Numbers are written in Rust's shortest round-trip form, so a reader gets
//! back exactly the values of the HDF5 file. Not measured is empty in CSV
//! and `null` in JSON, never zero.

use super::figures::{batch_energy_j, batch_tps, ranks_of, CategoryFigures, RunFigures, StrategyFigures};
use super::slo::Slo;
use super::stats::Stat;
use crate::metrics::BatchRecord;
use serde_json::{Map, Number, Value};
use std::path::{Path, PathBuf};

/// One cell.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Not measured or not applicable.
    Null,
}

impl Cell {
    fn float(v: f64) -> Self {
        if v.is_finite() {
            Cell::Float(v)
        } else {
            Cell::Null
        }
    }

    fn opt(v: Option<f64>) -> Self {
        v.map_or(Cell::Null, Cell::float)
    }

    fn csv(&self) -> String {
        match self {
            Cell::Text(s) if s.contains([',', '"', '\n']) => format!("\"{}\"", s.replace('"', "\"\"")),
            Cell::Text(s) => s.clone(),
            Cell::Int(i) => i.to_string(),
            Cell::Float(f) => format!("{f:?}"),
            Cell::Bool(b) => b.to_string(),
            Cell::Null => String::new(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Cell::Text(s) => Value::String(s.clone()),
            Cell::Int(i) => Value::Number((*i).into()),
            Cell::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Cell::Bool(b) => Value::Bool(*b),
            Cell::Null => Value::Null,
        }
    }
}

/// A row: (column, cell) in column order.
pub type Row = Vec<(String, Cell)>;

fn push(row: &mut Row, name: &str, cell: Cell) {
    row.push((name.to_string(), cell));
}

fn common(row: &mut Row, run: &RunFigures, s: &StrategyFigures, category: &str) {
    push(row, "file", Cell::Text(run.run.path.display().to_string()));
    push(row, "strategy", Cell::Text(s.info.name.clone()));
    push(row, "kind", Cell::Text(s.info.kind.clone()));
    push(row, "category", Cell::Text(category.to_string()));
}

fn batch_row(run: &RunFigures, s: &StrategyFigures, c: &CategoryFigures, b: &BatchRecord, slo: Option<&Slo>) -> Row {
    let mut row = Row::new();
    common(&mut row, run, s, &c.data.name);
    let ranks = ranks_of(c.data, b.batch_index);
    let active: Vec<_> = ranks.iter().filter(|r| r.active).collect();
    let int = |v: u64| Cell::Int(v as i64);
    for (name, v) in [
        ("batch_index", b.batch_index),
        ("first_sequence", b.first_sequence),
        ("seq_len", b.seq_len),
        ("num_sequences", b.num_sequences),
        ("output_tokens", b.output_tokens),
        ("requested_batch", b.requested_batch),
        ("effective_batch", b.effective_batch),
        ("micro_batches", b.micro_batches),
        ("pool_requested", b.pool_requested),
        ("pool_effective", b.pool_effective),
    ] {
        push(&mut row, name, int(v as u64));
    }
    push(&mut row, "pool_fallback", Cell::Bool(b.pool_fallback));
    for (name, v) in [("ttft_s", b.ttft_s), ("e2e_s", b.e2e_s), ("tpot_s", b.tpot_s()), ("paper_tpot_s", b.paper_tpot_s())] {
        push(&mut row, name, Cell::float(v));
    }
    push(&mut row, "itl_count", int(b.itl_s.len() as u64));
    push(&mut row, "itl_sum_s", Cell::float(b.itl_s.iter().sum()));
    push(&mut row, "total_tokens", int(b.total_tokens()));
    push(&mut row, "tps", Cell::float(batch_tps(b)));
    push(&mut row, "flops", Cell::float(b.flops));
    push(&mut row, "active_ranks", int(active.len() as u64));
    push(&mut row, "comm_s", Cell::float(active.iter().map(|r| r.comm_seconds()).sum()));
    push(&mut row, "peak_memory_max_bytes", ranks.iter().filter_map(|r| r.peak_memory_bytes).max().map_or(Cell::Null, int));
    push(&mut row, "energy_j", Cell::opt(batch_energy_j(&ranks)));
    push(&mut row, "meets_slo", slo.map_or(Cell::Null, |slo| Cell::Bool(slo.met_by(b.ttft_s, b.tpot_s()))));
    row
}

fn stat_columns(row: &mut Row, name: &str, stat: &Stat, stored: &crate::metrics::Distribution) {
    push(row, &format!("{name}_mean_s"), Cell::float(stored.mean));
    for (q, v, ci) in [("p50", stored.p50, &stat.p50_ci), ("p90", stored.p90, &stat.p90_ci), ("p99", stored.p99, &stat.p99_ci)] {
        push(row, &format!("{name}_{q}_s"), Cell::float(v));
        push(row, &format!("{name}_{q}_ci_lo_s"), Cell::float(ci.lo));
        push(row, &format!("{name}_{q}_ci_hi_s"), Cell::float(ci.hi));
    }
    push(row, &format!("{name}_cv"), Cell::float(stat.cv));
}

fn summary_row(run: &RunFigures, s: &StrategyFigures, c: &CategoryFigures, slo: Option<&Slo>) -> Row {
    let mut row = Row::new();
    common(&mut row, run, s, &c.data.name);
    let (m, a) = (&c.stored.summary, &c.stored.aggregates);
    push(&mut row, "job", Cell::Text(run.meta.job.clone()));
    push(&mut row, "device", Cell::Text(run.meta.device.clone()));
    push(&mut row, "commit", Cell::Text(run.run.provenance.git_commit.clone()));
    push(&mut row, "gpus", Cell::Int(s.gpus as i64));
    push(&mut row, "partial", Cell::Bool(c.partial));
    push(&mut row, "batches", Cell::Int(m.batches as i64));
    push(&mut row, "sequences", Cell::Int(m.sequences as i64));
    push(&mut row, "total_tokens", Cell::Int(m.total_tokens as i64));
    push(&mut row, "wall_s", Cell::float(m.wall_s));
    push(&mut row, "tps", Cell::float(m.tps));
    push(&mut row, "tps_per_gpu", Cell::float(c.tps_per_gpu));
    push(&mut row, "tokens_per_s_per_sequence", Cell::float(c.tokens_per_s_per_sequence));
    stat_columns(&mut row, "ttft", &c.ttft, &m.ttft);
    stat_columns(&mut row, "tpot", &c.tpot, &m.tpot);
    stat_columns(&mut row, "e2e", &c.e2e, &m.e2e);
    for (name, v) in [("itl_mean_s", m.itl.mean), ("itl_p50_s", m.itl.p50), ("itl_p90_s", m.itl.p90), ("itl_p99_s", m.itl.p99), ("paper_tpot_mean_s", m.paper_tpot_mean)] {
        push(&mut row, name, Cell::float(v));
    }
    push(&mut row, "unstable", Cell::Bool(c.unstable.is_some()));
    push(&mut row, "unstable_reason", c.unstable.clone().map_or(Cell::Null, Cell::Text));
    push(&mut row, "tpot_improvement", Cell::opt(c.tpot_x));
    push(&mut row, "tps_improvement", Cell::opt(c.tps_x));
    push(&mut row, "slo_ttft_s", Cell::opt(slo.map(|s| s.ttft_s)));
    push(&mut row, "slo_tpot_s", Cell::opt(slo.map(|s| s.tpot_s)));
    push(&mut row, "goodput", Cell::opt(c.goodput));
    push(&mut row, "peak_memory_max_bytes", a.peak_memory_max_bytes.map_or(Cell::Null, |v| Cell::Int(v as i64)));
    push(&mut row, "memory_estimate_max_bytes", Cell::Int(a.memory_estimate_max_bytes as i64));
    push(&mut row, "energy_j", Cell::opt(a.energy_j));
    push(&mut row, "energy_j_per_token", Cell::opt(a.energy_j_per_token(m.total_tokens)));
    push(&mut row, "comm_share", Cell::float(a.comm_share()));
    push(&mut row, "achieved_tflops", Cell::float(c.stored.achieved_tflops()));
    row
}

/// The batch rows and summary rows of every run.
pub fn rows(runs: &[RunFigures], slo: Option<&Slo>) -> (Vec<Row>, Vec<Row>) {
    let (mut batches, mut summaries) = (Vec::new(), Vec::new());
    for run in runs {
        for s in &run.strategies {
            for c in &s.categories {
                batches.extend(c.data.batches.iter().map(|b| batch_row(run, s, c, b, slo)));
                summaries.push(summary_row(run, s, c, slo));
            }
        }
    }
    (batches, summaries)
}

fn write_csv(path: &Path, rows: &[Row]) -> std::io::Result<()> {
    let mut text = String::new();
    if let Some(first) = rows.first() {
        text.push_str(&first.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(","));
        text.push('\n');
    }
    for row in rows {
        text.push_str(&row.iter().map(|(_, c)| c.csv()).collect::<Vec<_>>().join(","));
        text.push('\n');
    }
    std::fs::write(path, text)
}

/// Writes `batches.csv` and `summary.csv` into `dir` (created if missing).
pub fn write_csv_dir(dir: &Path, runs: &[RunFigures], slo: Option<&Slo>) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let (batches, summaries) = rows(runs, slo);
    let paths = vec![dir.join("batches.csv"), dir.join("summary.csv")];
    write_csv(&paths[0], &batches)?;
    write_csv(&paths[1], &summaries)?;
    Ok(paths)
}

fn objects(rows: &[Row]) -> Value {
    Value::Array(rows.iter().map(|r| Value::Object(r.iter().map(|(n, c)| (n.clone(), c.json())).collect::<Map<_, _>>())).collect())
}

/// Writes `{"format": "fapool-analysis", "batches": [...], "summary": [...]}`.
pub fn write_json(path: &Path, runs: &[RunFigures], slo: Option<&Slo>) -> std::io::Result<()> {
    let (batches, summaries) = rows(runs, slo);
    let mut root = Map::new();
    root.insert("format".into(), Value::String("fapool-analysis".into()));
    root.insert("batches".into(), objects(&batches));
    root.insert("summary".into(), objects(&summaries));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&Value::Object(root))? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_round_trip_floats_and_quote_commas() {
        assert_eq!(Cell::Float(0.1 + 0.2).csv().parse::<f64>().unwrap(), 0.1 + 0.2);
        assert_eq!(Cell::Text("a,b".into()).csv(), "\"a,b\"");
        assert_eq!(Cell::float(f64::NAN), Cell::Null);
        assert_eq!(Cell::Null.csv(), "");
        assert_eq!(Cell::Null.json(), Value::Null);
    }
}
