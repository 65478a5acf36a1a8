//! The results file: one self-describing HDF5 file per run, holding the
//! run's provenance, every batch and per-rank measurement, the per-category
//! summaries and the planner's predictions beside them. The layout is
//! versioned ([`SCHEMA_VERSION`]) and documented in `docs/results-schema.md`;
//! any change to what is written here must change that document too.
//!
//! Only plain numeric, compound and variable-length UTF-8 string types are
//! written, so h5py and pandas read every dataset without custom code.
//!
//! Writing is append-only and flushed per batch: [`ResultsFile::append_batch`]
//! writes a batch's payload (latencies, tokens, rank rows) first and its row
//! in `batches` last, then flushes the file. A batch row therefore exists only
//! once everything it points to does; payload rows an append cut short left
//! unreferenced are trimmed by [`ResultsFile::open_existing`] before a resumed
//! run appends. HDF5 is not crash-consistent by itself (a process killed in
//! the middle of a write can corrupt the file); a caller that must survive
//! that writes through a copy renamed into place.
//!
//! This module stores and loads what it is given. It must not measure,
//! communicate (one rank writes the file), or decide what a run does next.

mod aggregate;
mod attrs;
pub(crate) mod cloexec;
pub mod durable;
mod layout;
mod reader;
mod routing;
mod rows;
mod schema;
mod writer;

#[cfg(test)]
pub(crate) mod tests;

pub use aggregate::{CommAggregate, RankAggregates};
pub use layout::{inspect_layout, schema_columns, verify_format, FileLayout, ObjectLayout, RankTimeSplit};
pub use reader::read_run;
pub use writer::ResultsFile;

use crate::comm::Category;
use crate::metrics::{BatchRecord, CategorySummary, ExpertLoad, LayerRouting, RankRecord};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

pub use schema::{FORMAT_NAME, OLDEST_READABLE, SCHEMA_VERSION};

/// Errors of the results file.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("{path} already exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: hdf5::Error },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: hdf5::Error },
    #[error("cannot create the directory of {path}: {source}")]
    Directory { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a fapool results file (no root attribute `format` = \"{FORMAT_NAME}\")")]
    NotResultsFile { path: PathBuf },
    #[error("{path} has results schema version {found}; this build reads versions {OLDEST_READABLE} to {SCHEMA_VERSION}")]
    UnsupportedSchema { path: PathBuf, found: u32 },
    #[error("strategy `{0}` was not begun in this results file (call begin_strategy first)")]
    UnknownStrategy(String),
    #[error("strategy `{name}` is stored with kind `{stored}`, not `{given}`")]
    StrategyMismatch { name: String, stored: String, given: String },
    #[error("batch {batch_index} of {strategy}/{category} is already recorded")]
    DuplicateBatch { strategy: String, category: String, batch_index: u32 },
    #[error("invalid {what} name `{name}`: a name must be non-empty, contain no '/', and not be '.' or '..'")]
    InvalidName { what: &'static str, name: String },
    #[error("string contains a NUL character and cannot be stored: {0:?}")]
    InvalidString(String),
    #[error("batch {batch_index} of {strategy}/{category}: {detail}")]
    Shape { strategy: String, category: String, batch_index: u32, detail: String },
    #[error("unknown run status `{0}` (expected running, complete, interrupted or failed)")]
    UnknownStatus(String),
    #[error("{path}: unknown communication category `{name}` in the file")]
    UnknownCommCategory { path: PathBuf, name: String },
    #[error("{path} was written with results schema version {found}; continuing it needs version {SCHEMA_VERSION} (start a new file)")]
    OldSchema { path: PathBuf, found: u32 },
    #[error("corrupt results file: {0}")]
    Corrupt(String),
    #[error("HDF5: {0}")]
    Hdf5(#[from] hdf5::Error),
}

/// Result of results-file operations.
pub type Result<T> = std::result::Result<T, ResultsError>;

/// Where a run stands; the root attribute `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// The run is (or was, if it died without saying so) in progress.
    Running,
    /// Every strategy and category ran to the end.
    Complete,
    /// Stopped by a signal (SIGTERM, SIGUSR1) with what it measured saved.
    Interrupted,
    /// Stopped by an error.
    Failed,
}

impl RunStatus {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Complete => "complete",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Failed => "failed",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = ResultsError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "running" => Ok(RunStatus::Running),
            "complete" => Ok(RunStatus::Complete),
            "interrupted" => Ok(RunStatus::Interrupted),
            "failed" => Ok(RunStatus::Failed),
            other => Err(ResultsError::UnknownStatus(other.to_string())),
        }
    }
}

/// The seeds that make a run reproducible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seeds {
    /// Seed of the workload generator (sequence lengths, prompt tokens).
    pub workload: u64,
    /// Seed of the deterministic weight initialisation.
    pub weights: u64,
}

/// One accelerator (or CPU stand-in) as seen by one world rank.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub world_rank: u32,
    /// Device name as the driver reports it, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    pub uuid: String,
    pub pci_bus_id: String,
}

/// What one world rank does in one strategy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleRow {
    pub world_rank: u32,
    pub host: String,
    /// Rank within its node (selects the GPU).
    pub local_rank: u32,
    pub strategy: String,
    /// "tp", "base", "pool", "idle", ... as in [`RankRecord::role`].
    pub role: String,
}

/// Everything needed to say where, how and from what a run's numbers came.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Provenance {
    /// The schema the file was written with. [`ResultsFile::create`] always
    /// writes [`SCHEMA_VERSION`]; [`read_run`] fills in what it found.
    pub schema_version: u32,
    /// Version of the fapool build (the crate version).
    pub tool_version: String,
    /// Commit of the source the binary was built from, with "-dirty" if the
    /// tree had changes.
    pub git_commit: String,
    /// The job spec (TOML) exactly as read.
    pub job_toml: String,
    /// Command line of world rank 0.
    pub argv: Vec<String>,
    /// Host name of each world rank, indexed by world rank.
    pub hosts: Vec<String>,
    pub world_size: u32,
    /// Compute backend, e.g. "cpu" or "cuda".
    pub backend: String,
    /// Transport of device buffers, e.g. "mpi" or "nccl".
    pub transport: String,
    /// MPI library version string (MPI_Get_library_version).
    pub mpi_library: String,
    /// `None` where not applicable (CPU backend) or unknown.
    pub cuda_version: Option<String>,
    pub nccl_version: Option<String>,
    pub driver_version: Option<String>,
    /// One entry per world rank that has a device; may be empty on CPU.
    pub devices: Vec<DeviceInfo>,
    /// The `SLURM_*` identifiers of the allocation (job id, step, node list, ...).
    pub slurm: BTreeMap<String, String>,
    pub seeds: Seeds,
    /// Start of the run, ISO 8601 UTC (see [`utc_timestamp`]).
    pub started_utc: String,
    /// The workload's categories in run order (short, medium, ...). Readers
    /// use it to order tables and plots.
    pub categories: Vec<String>,
    /// Every (world rank, strategy) pair and the rank's role in it.
    pub roles: Vec<RoleRow>,
}

/// A strategy as configured for the run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StrategyInfo {
    /// Unique within the run; the group name under `/strategies`.
    pub name: String,
    /// "baseline", "fapool", "moe", ...; analyze compares fapool-kind
    /// strategies against the first baseline-kind one.
    pub kind: String,
    /// The strategy's settings (TP, PP, pool sizes, threshold, ...), as the
    /// TOML or JSON text they were given in.
    pub params: String,
    /// World ranks the strategy runs on.
    pub world_ranks_used: Vec<u32>,
}

/// A category's stored summary: the latency and throughput figures and the
/// memory, energy and communication aggregates over its rank rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredSummary {
    pub summary: CategorySummary,
    pub aggregates: RankAggregates,
    /// Model FLOPs of all batches of the category (sum of batch `flops`).
    pub flops: f64,
}

impl StoredSummary {
    /// The measured figure a planner prediction named `name` predicts
    /// (`ttft_s`, `tpot_s`, `e2e_s`, `paper_tpot_s`, `tps`,
    /// `peak_memory_bytes`, `comm_share`), where the file holds it.
    pub fn measured(&self, name: &str) -> Option<f64> {
        let m = &self.summary;
        match name {
            "ttft_s" => Some(m.ttft.mean),
            "tpot_s" => Some(m.tpot.mean),
            "e2e_s" => Some(m.e2e.mean),
            "paper_tpot_s" => Some(m.paper_tpot_mean),
            "tps" => Some(m.tps),
            "peak_memory_bytes" => self.aggregates.peak_memory_max_bytes.map(|b| b as f64),
            "comm_share" => (self.aggregates.active_wall_s > 0.0).then(|| self.aggregates.comm_s / self.aggregates.active_wall_s),
            _ => None,
        }
    }

    /// Achieved TFLOP/s over the category's wall time.
    pub fn achieved_tflops(&self) -> f64 {
        if self.summary.wall_s > 0.0 {
            self.flops / self.summary.wall_s / 1e12
        } else {
            0.0
        }
    }
}

/// One (strategy, category) as read back from a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CategoryData {
    pub name: String,
    /// Batch records in the order they were appended, with their ITL and tokens.
    pub batches: Vec<BatchRecord>,
    /// Rank records of all batches, in the order they were appended.
    pub ranks: Vec<RankRecord>,
    /// What every rank counted per layer and expert (mixture-of-experts
    /// strategies; empty for the others and for files before schema 3).
    pub experts: Vec<ExpertLoad>,
    /// The per-layer routing summary written with the category's summary
    /// (empty without experts or summary).
    pub routing: Vec<LayerRouting>,
    /// `None` until [`ResultsFile::write_summary`] ran for the category (an
    /// interrupted run may lack it).
    pub summary: Option<StoredSummary>,
    /// Planner predictions by name (see [`ResultsFile::store_prediction`]).
    pub predictions: BTreeMap<String, f64>,
    /// What the predictions assume, by name (`source`, `expert_routing`;
    /// schema 4, empty before).
    pub prediction_notes: BTreeMap<String, String>,
}

/// One strategy as read back from a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StrategyData {
    pub info: StrategyInfo,
    /// Categories in the order they were first appended to.
    pub categories: Vec<CategoryData>,
}

impl StrategyData {
    pub fn category(&self, name: &str) -> Option<&CategoryData> {
        self.categories.iter().find(|c| c.name == name)
    }
}

/// A whole results file in memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunData {
    pub path: PathBuf,
    pub status: Option<RunStatus>,
    /// Set when the run ended (any status but running).
    pub ended_utc: Option<String>,
    /// "strategy/category/index" of the batch a failed run was in, and why.
    pub failed_batch: Option<String>,
    pub failure: Option<String>,
    pub provenance: Provenance,
    /// Strategies in the order they were begun.
    pub strategies: Vec<StrategyData>,
}

impl RunData {
    pub fn strategy(&self, name: &str) -> Option<&StrategyData> {
        self.strategies.iter().find(|s| s.info.name == name)
    }

    /// Category names in workload order: those listed in the provenance
    /// first, then any others in the order strategies recorded them.
    pub fn category_order(&self) -> Vec<String> {
        let mut order: Vec<String> = Vec::new();
        let present = |name: &str| self.strategies.iter().any(|s| s.category(name).is_some());
        for c in &self.provenance.categories {
            if present(c) && !order.contains(c) {
                order.push(c.clone());
            }
        }
        for s in &self.strategies {
            for c in &s.categories {
                if !order.contains(&c.name) {
                    order.push(c.name.clone());
                }
            }
        }
        order
    }
}

/// The stored name of a communication category and back.
pub(crate) fn category_from_name(name: &str) -> Option<Category> {
    Category::ALL.into_iter().find(|c| c.name() == name)
}

/// ISO 8601 UTC with second resolution, e.g. "2025-03-01T12:34:56Z".
pub fn utc_timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm), so
    // no calendar crate is needed for one timestamp format.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// [`utc_timestamp`] of now.
pub fn utc_now() -> String {
    utc_timestamp(SystemTime::now())
}
