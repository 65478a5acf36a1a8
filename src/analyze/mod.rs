//! Analysis of results files: `fapool analyze` (tables with confidence
//! intervals and stability, plots, CSV and JSON exports, goodput under
//! latency limits, run-to-run comparison) and `fapool check` (whether a
//! file can be trusted).
//!
//! Everything is computed from the HDF5 file alone, read through
//! [`crate::results`]. The figures are derived once ([`figures`]) and
//! every view — [`table`], the plots ([`charts`] with `plot*.rs`),
//! [`export`], [`compare`] — formats those, so views cannot disagree.
//! Nothing here measures or writes a results file.

pub mod charts;
pub mod check;
pub mod compare;
pub mod export;
pub mod figures;
mod plot;
mod plot_bars;
mod plot_points;
pub mod slo;
pub mod stats;
pub mod table;

#[cfg(test)]
mod tests;

use crate::exit::Exit;
use crate::results::{read_run, RankTimeSplit, ResultsError, RunData};
pub use check::CheckReport;
use figures::RunFigures;
use slo::Slo;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of `analyze` and `check`.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("no results files given")]
    NoInput,
    /// An input file that cannot be read as a results file of this schema.
    #[error("{path}: {source}")]
    BadInput { path: PathBuf, source: ResultsError },
    /// A bad option value.
    #[error("{0}")]
    Usage(String),
    /// Two runs that must not be compared (different models or dtypes).
    #[error("refusing to compare {a} with {b}: {why}; pass --force to compare them anyway")]
    Unlike { a: PathBuf, b: PathBuf, why: String },
    #[error("plots: {0}")]
    Plot(String),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl AnalyzeError {
    /// The process exit code: 2 for bad input or options, 1 otherwise.
    pub fn exit(&self) -> Exit {
        match self {
            AnalyzeError::NoInput | AnalyzeError::BadInput { .. } | AnalyzeError::Usage(_) | AnalyzeError::Unlike { .. } => Exit::Usage,
            _ => Exit::Failure,
        }
    }
}

/// Result of `analyze` and `check`.
pub type Result<T> = std::result::Result<T, AnalyzeError>;

/// What `fapool analyze` was asked for.
#[derive(Clone, Debug, Default)]
pub struct AnalyzeArgs {
    pub files: Vec<PathBuf>,
    /// Write every plot (PNG and SVG) into this directory.
    pub plots: Option<PathBuf>,
    /// Write `batches.csv` and `summary.csv` into this directory.
    pub csv: Option<PathBuf>,
    /// Write the same rows as one JSON file.
    pub json: Option<PathBuf>,
    /// Latency limits for goodput: `ttft=2000ms,tpot=200ms` or a preset.
    pub slo: Option<String>,
    /// Compare the two files instead of tabulating them.
    pub compare: bool,
    /// Compare even runs of different models or dtypes.
    pub force: bool,
}

fn read(path: &Path) -> Result<RunData> {
    read_run(path).map_err(|source| AnalyzeError::BadInput { path: path.to_path_buf(), source })
}

/// The busy/idle split of every strategy of `run`, where recorded (schema
/// version 2 and later; version 1 rank rows have no waiting time).
fn splits(run: &RunData) -> Result<charts::RunSplits> {
    let mut out = Vec::new();
    if run.provenance.schema_version < 2 {
        return Ok(out);
    }
    for s in &run.strategies {
        // A rank's share is of the batch's time: a rank outside the batch's
        // work (an inactive pool rank) returns at once, and is idle for all of it.
        let rows: Vec<RankTimeSplit> = s
            .categories
            .iter()
            .flat_map(|c| {
                let e2e: std::collections::BTreeMap<u32, f64> = c.batches.iter().map(|b| (b.batch_index, b.e2e_s)).collect();
                c.ranks.iter().map(move |r| {
                    let wall_s = r.wall_s.max(e2e.get(&r.batch_index).copied().unwrap_or(0.0));
                    RankTimeSplit { batch_index: r.batch_index, world_rank: r.world_rank, wall_s, compute_s: r.compute_s, comm_s: r.comm_seconds(), wait_s: r.wait_s }
                })
            })
            .collect();
        if !rows.is_empty() {
            out.push((s.info.name.clone(), rows));
        }
    }
    Ok(out)
}

/// `fapool analyze`: tables to `out`, and the plots and exports asked for.
pub fn analyze(args: &AnalyzeArgs, out: &mut dyn Write) -> Result<()> {
    if args.files.is_empty() {
        return Err(AnalyzeError::NoInput);
    }
    let slo = args.slo.as_deref().map(Slo::parse).transpose().map_err(|e| AnalyzeError::Usage(e.to_string()))?;
    if args.compare && args.files.len() != 2 {
        return Err(AnalyzeError::Usage(format!("--compare takes exactly two results files, not {}", args.files.len())));
    }
    let runs = args.files.iter().map(|p| read(p)).collect::<Result<Vec<_>>>()?;
    let figures: Vec<RunFigures> = runs.iter().map(|r| RunFigures::of(r, slo.as_ref())).collect();
    if args.compare {
        let (a, b) = (&figures[0], &figures[1]);
        if let Some(why) = compare::unlike(&a.meta, &b.meta) {
            if !args.force {
                return Err(AnalyzeError::Unlike { a: a.run.path.clone(), b: b.run.path.clone(), why });
            }
            writeln!(out, "warning: {why} (compared because of --force)")?;
        }
        compare::write_comparison(a, b, out)?;
    } else {
        for f in &figures {
            table::write_run(f, slo.as_ref(), out)?;
        }
    }
    if let Some(dir) = &args.plots {
        let splits = runs.iter().map(splits).collect::<Result<Vec<_>>>()?;
        let report = charts::write_plots(dir, &figures, &splits).map_err(AnalyzeError::Plot)?;
        for path in &report.written {
            writeln!(out, "plot: {}", path.display())?;
        }
        for (name, why) in &report.skipped {
            writeln!(out, "plot {name} skipped: {why}")?;
        }
    }
    if let Some(dir) = &args.csv {
        for path in export::write_csv_dir(dir, &figures, slo.as_ref()).map_err(|source| AnalyzeError::Write { path: dir.clone(), source })? {
            writeln!(out, "csv: {}", path.display())?;
        }
    }
    if let Some(path) = &args.json {
        export::write_json(path, &figures, slo.as_ref()).map_err(|source| AnalyzeError::Write { path: path.clone(), source })?;
        writeln!(out, "json: {}", path.display())?;
    }
    Ok(())
}

/// `fapool check`: prints every problem found in the file to `out`.
pub fn check(path: &Path, out: &mut dyn Write) -> Result<CheckReport> {
    let report = check::check(path)?;
    for p in &report.problems {
        writeln!(out, "FAIL {p}")?;
    }
    if report.passed() {
        writeln!(out, "{}: ok ({} checks passed)", path.display(), report.checks)?;
    } else {
        writeln!(out, "{}: {} of {} checks failed", path.display(), report.problems.len(), report.checks)?;
    }
    Ok(report)
}
