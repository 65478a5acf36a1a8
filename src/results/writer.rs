//! Creating, resuming and appending to a results file.
//!
//! One rank (world rank 0) owns the file; nothing here is collective.

use super::aggregate::RankAggregates;
use super::attrs::{self, vlen};
use super::routing::{ExpertRow, RoutingRow};
use super::rows::{BatchRow, CommRow, DeviceRow, PayloadOffsets, RankRow, RoleRowH5, SummaryRow};
use super::schema::{FORMAT_NAME, PROVENANCE, SCHEMA_VERSION, STRATEGIES};
use super::{Provenance, Result, ResultsError, RunStatus, StoredSummary, StrategyInfo};
use crate::metrics::{BatchRecord, CategorySummary, ExpertLoad, LayerRouting, RankRecord};
use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, Extent, File, Group, H5Type};
use std::path::{Path, PathBuf};

/// Rows per chunk of the extendable tables. Batches are few and rank rows a
/// few dozen per batch, so small chunks waste no space on short runs.
const BATCH_CHUNK: usize = 64;
const RANK_CHUNK: usize = 256;
const ITL_CHUNK: usize = 4096;
const TOKEN_ROWS_CHUNK: usize = 64;
const EXPERT_CHUNK: usize = 1024;

/// An open results file that a run appends to.
pub struct ResultsFile {
    file: File,
    path: PathBuf,
}

impl std::fmt::Debug for ResultsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultsFile").field("path", &self.path).finish()
    }
}

fn check_name(what: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(ResultsError::InvalidName { what, name: name.to_string() });
    }
    Ok(())
}

/// Writes a fixed-size 1-D dataset (strings, compound rows, numbers).
fn write_list<T: H5Type>(group: &Group, name: &str, values: &[T]) -> Result<()> {
    let ds = group.new_dataset::<T>().shape((values.len(),)).create(name)?;
    if !values.is_empty() {
        ds.write_raw(values)?;
    }
    Ok(())
}

fn write_text(group: &Group, name: &str, text: &str) -> Result<()> {
    group.new_dataset::<VarLenUnicode>().shape(()).create(name)?.write_scalar(&vlen(text)?)?;
    Ok(())
}

/// Appends rows to an extendable 1-D dataset and returns the first new row's index.
fn append_rows<T: H5Type>(ds: &Dataset, rows: &[T]) -> Result<u64> {
    let start = ds.shape()[0];
    if !rows.is_empty() {
        let end = start + rows.len();
        ds.resize((end,))?;
        ds.write_slice(rows, start..end)?;
    }
    Ok(start as u64)
}

fn extendable<T: H5Type>(group: &Group, name: &str, chunk: usize) -> Result<Dataset> {
    Ok(group.new_dataset::<T>().chunk((chunk,)).shape((Extent::resizable(0),)).create(name)?)
}

impl ResultsFile {
    /// Creates the results file of a new run and writes its provenance.
    ///
    /// An existing file is never replaced unless `force` is set (then it is
    /// truncated): results are the expensive part of a run. Missing parent
    /// directories are created.
    pub fn create(path: impl AsRef<Path>, force: bool, provenance: &Provenance) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !force && path.exists() {
            return Err(ResultsError::Exists { path });
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ResultsError::Directory { path: path.clone(), source })?;
        }
        let created = if force { File::create(&path) } else { File::create_excl(&path) };
        let file = match created {
            Ok(f) => f,
            // Another process created it between the check and the create.
            Err(_) if !force && path.exists() => return Err(ResultsError::Exists { path }),
            Err(source) => return Err(ResultsError::Create { path, source }),
        };
        super::cloexec::keep_from_children(&path);
        let results = Self { file, path };
        results.write_provenance(provenance)?;
        results.file.create_group(STRATEGIES)?;
        results.flush()?;
        Ok(results)
    }

    /// Opens the results file of an earlier, unfinished run so a resumed run
    /// can append to it. Payload rows that no recorded batch references (left
    /// by a crash in the middle of an append) are trimmed. The status is left
    /// as found; a resumed run sets it back with
    /// `set_status(RunStatus::Running, None)`.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open_rw(&path).map_err(|source| ResultsError::Open { path: path.clone(), source })?;
        super::cloexec::keep_from_children(&path);
        let found = super::schema::check_format(&file, &path)?;
        if found != SCHEMA_VERSION {
            return Err(ResultsError::OldSchema { path, found });
        }
        let results = Self { file, path };
        results.trim_unreferenced_rows()?;
        results.flush()?;
        Ok(results)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes every completed append durable on disk (H5Fflush).
    pub fn flush(&self) -> Result<()> {
        Ok(self.file.flush()?)
    }

    fn write_provenance(&self, p: &Provenance) -> Result<()> {
        let root = &self.file;
        attrs::set_str(root, "format", FORMAT_NAME)?;
        attrs::set_scalar(root, "schema_version", SCHEMA_VERSION)?;
        attrs::set_str(root, "tool_version", &p.tool_version)?;
        attrs::set_str(root, "git_commit", &p.git_commit)?;
        attrs::set_str(root, "status", RunStatus::Running.as_str())?;
        attrs::set_str(root, "started_utc", &p.started_utc)?;

        let g = self.file.create_group(PROVENANCE)?;
        attrs::set_str(&g, "tool_version", &p.tool_version)?;
        attrs::set_str(&g, "git_commit", &p.git_commit)?;
        attrs::set_scalar(&g, "world_size", p.world_size)?;
        attrs::set_str(&g, "backend", &p.backend)?;
        attrs::set_str(&g, "transport", &p.transport)?;
        attrs::set_str(&g, "mpi_library", &p.mpi_library)?;
        // Absent attribute = not applicable or unknown; an empty string
        // would read as a real (empty) version.
        for (name, value) in [("cuda_version", &p.cuda_version), ("nccl_version", &p.nccl_version), ("driver_version", &p.driver_version)] {
            if let Some(v) = value {
                attrs::set_str(&g, name, v)?;
            }
        }
        attrs::set_scalar(&g, "seed_workload", p.seeds.workload)?;
        attrs::set_scalar(&g, "seed_weights", p.seeds.weights)?;
        attrs::set_str(&g, "started_utc", &p.started_utc)?;

        write_text(&g, "job_toml", &p.job_toml)?;
        let strings = |v: &[String]| v.iter().map(|s| vlen(s)).collect::<Result<Vec<_>>>();
        write_list(&g, "argv", &strings(&p.argv)?)?;
        write_list(&g, "hosts", &strings(&p.hosts)?)?;
        write_list(&g, "categories", &strings(&p.categories)?)?;
        let devices = p.devices.iter().map(|d| Ok(DeviceRow { world_rank: d.world_rank, name: vlen(&d.name)?, uuid: vlen(&d.uuid)?, pci_bus_id: vlen(&d.pci_bus_id)? })).collect::<Result<Vec<_>>>()?;
        write_list(&g, "devices", &devices)?;
        let roles = p
            .roles
            .iter()
            .map(|r| Ok(RoleRowH5 { world_rank: r.world_rank, host: vlen(&r.host)?, local_rank: r.local_rank, strategy: vlen(&r.strategy)?, role: vlen(&r.role)? }))
            .collect::<Result<Vec<_>>>()?;
        write_list(&g, "roles", &roles)?;
        let slurm = g.create_group("slurm")?;
        for (k, v) in &p.slurm {
            attrs::set_str(&slurm, k, v)?;
        }
        Ok(())
    }

    fn strategy_group(&self, strategy: &str) -> Result<Group> {
        let all = self.file.group(STRATEGIES)?;
        if !all.link_exists(strategy) {
            return Err(ResultsError::UnknownStrategy(strategy.to_string()));
        }
        Ok(all.group(strategy)?)
    }

    /// The category's group, created (with its place in the order) if asked.
    fn category_group(&self, strategy: &str, category: &str, create: bool) -> Result<Option<Group>> {
        check_name("category", category)?;
        let s = self.strategy_group(strategy)?;
        if s.link_exists(category) {
            return Ok(Some(s.group(category)?));
        }
        if !create {
            return Ok(None);
        }
        let order = s.member_names()?.len() as u32;
        let g = s.create_group(category)?;
        attrs::set_scalar(&g, "order", order)?;
        Ok(Some(g))
    }

    /// Records a strategy before its first batch. Beginning a strategy the
    /// file already holds (a resumed run) is accepted if its kind matches;
    /// its stored settings are kept.
    pub fn begin_strategy(&mut self, info: &StrategyInfo) -> Result<()> {
        check_name("strategy", &info.name)?;
        let all = self.file.group(STRATEGIES)?;
        if all.link_exists(&info.name) {
            let existing = all.group(&info.name)?;
            let stored = attrs::get_str(&existing, "kind")?.unwrap_or_default();
            if stored != info.kind {
                return Err(ResultsError::StrategyMismatch { name: info.name.clone(), stored, given: info.kind.clone() });
            }
            return Ok(());
        }
        let order = all.member_names()?.len() as u32;
        let g = all.create_group(&info.name)?;
        attrs::set_str(&g, "kind", &info.kind)?;
        attrs::set_str(&g, "params", &info.params)?;
        attrs::set_array(&g, "world_ranks_used", &info.world_ranks_used)?;
        attrs::set_scalar(&g, "order", order)?;
        self.flush()
    }

    /// Appends one completed batch and its rank records, then flushes so the
    /// batch is on disk before the next one starts.
    ///
    /// The payload (ITL, tokens, rank rows) is written before the batch row:
    /// a batch row exists only once everything it points to does.
    pub fn append_batch(&mut self, strategy: &str, category: &str, batch: &BatchRecord, ranks: &[RankRecord]) -> Result<()> {
        let shape_error = |detail: String| ResultsError::Shape { strategy: strategy.to_string(), category: category.to_string(), batch_index: batch.batch_index, detail };
        // A zero-sequence row is how an unwritten (fill-value) row looks, so
        // such a batch could not be told apart from a torn append.
        if batch.num_sequences == 0 {
            return Err(shape_error("a batch must hold at least one sequence".into()));
        }
        let expected = batch.num_sequences as usize * batch.output_tokens as usize;
        if batch.tokens.len() != expected {
            return Err(shape_error(format!("{} token ids for {} sequences × {} output tokens", batch.tokens.len(), batch.num_sequences, batch.output_tokens)));
        }
        if let Some(r) = ranks.iter().find(|r| r.batch_index != batch.batch_index) {
            return Err(shape_error(format!("rank record of world rank {} has batch index {}", r.world_rank, r.batch_index)));
        }

        let g = self.category_group(strategy, category, true)?.expect("created on demand");
        if !g.link_exists("batches") {
            extendable::<BatchRow>(&g, "batches", BATCH_CHUNK)?;
            extendable::<f64>(&g, "itl_s", ITL_CHUNK)?;
            extendable::<RankRow>(&g, "ranks", RANK_CHUNK)?;
        }
        let batches = g.dataset("batches")?;
        if batches.read_raw::<BatchRow>()?.iter().any(|b| b.batch_index == batch.batch_index) {
            return Err(ResultsError::DuplicateBatch { strategy: strategy.to_string(), category: category.to_string(), batch_index: batch.batch_index });
        }

        let itl = append_rows(&g.dataset("itl_s")?, &batch.itl_s)?;
        let tokens = self.append_tokens(&g, batch).map_err(|e| match e {
            ResultsError::Shape { detail, .. } => shape_error(detail),
            other => other,
        })?;
        let rank_rows = ranks.iter().map(RankRow::new).collect::<Result<Vec<_>>>()?;
        let ranks_at = append_rows(&g.dataset("ranks")?, &rank_rows)?;
        let at = PayloadOffsets { itl, tokens, ranks: ranks_at, ranks_count: ranks.len() as u64 };
        append_rows(&batches, &[BatchRow::new(batch, &at)])?;
        self.flush()
    }

    /// Appends what the ranks counted per layer and expert in one batch (a
    /// mixture-of-experts strategy), before [`ResultsFile::append_batch`]
    /// of the same batch: rows of a batch whose row never followed are
    /// trimmed when the file is reopened. Nothing is written for no rows.
    pub fn append_experts(&mut self, strategy: &str, category: &str, loads: &[ExpertLoad]) -> Result<()> {
        if loads.is_empty() {
            return Ok(());
        }
        let g = self.category_group(strategy, category, true)?.expect("created on demand");
        if !g.link_exists("experts") {
            extendable::<ExpertRow>(&g, "experts", EXPERT_CHUNK)?;
        }
        append_rows(&g.dataset("experts")?, &loads.iter().map(ExpertRow::new).collect::<Vec<_>>())?;
        Ok(())
    }

    /// Appends the batch's generated tokens as rows of the 2-D `tokens`
    /// dataset (`[sequence, output token]`), created at the first batch with
    /// the category's output length as its fixed width.
    fn append_tokens(&self, g: &Group, batch: &BatchRecord) -> Result<u64> {
        let width = batch.output_tokens as usize;
        let rows = batch.num_sequences as usize;
        if !g.link_exists("tokens") {
            if width == 0 {
                return Ok(0);
            }
            g.new_dataset::<u32>().chunk((TOKEN_ROWS_CHUNK, width)).shape((Extent::resizable(0), Extent::fixed(width))).create("tokens")?;
        }
        let ds = g.dataset("tokens")?;
        let (start, stored_width) = (ds.shape()[0], ds.shape()[1]);
        if width == 0 {
            return Ok(start as u64);
        }
        if width != stored_width {
            return Err(ResultsError::Shape {
                strategy: String::new(),
                category: String::new(),
                batch_index: batch.batch_index,
                detail: format!("{width} output tokens, but the category's tokens dataset is {stored_width} wide"),
            });
        }
        let view = ndarray::ArrayView2::from_shape((rows, width), &batch.tokens).expect("length checked by append_batch");
        ds.resize((start + rows, width))?;
        ds.write_slice(view, (start..start + rows, ..))?;
        Ok(start as u64)
    }

    /// Indices of the batches recorded for (strategy, category), in append
    /// order; empty if none. A resumed run skips these.
    pub fn completed_batches(&self, strategy: &str, category: &str) -> Result<Vec<u32>> {
        let Some(g) = self.category_group(strategy, category, false)? else {
            return Ok(Vec::new());
        };
        if !g.link_exists("batches") {
            return Ok(Vec::new());
        }
        Ok(g.dataset("batches")?.read_raw::<BatchRow>()?.iter().map(|b| b.batch_index).collect())
    }

    /// The recorded batches of (strategy, category) with their ITL and
    /// tokens, so a resumed run can summarise all of them.
    pub fn batches(&self, strategy: &str, category: &str) -> Result<Vec<BatchRecord>> {
        match self.category_group(strategy, category, false)? {
            Some(g) => super::reader::read_batches(&g),
            None => Ok(Vec::new()),
        }
    }

    /// Writes (or rewrites) the summary of (strategy, category): the given
    /// latency/throughput summary plus memory, energy and communication
    /// aggregates computed from every rank row in the file, including rows
    /// recorded before a resume. Returns what was stored.
    pub fn write_summary(&mut self, strategy: &str, category: &str, summary: &CategorySummary) -> Result<StoredSummary> {
        let g = self.category_group(strategy, category, true)?.expect("created on demand");
        let (flops, ranks) = if g.link_exists("batches") {
            let flops = g.dataset("batches")?.read_raw::<BatchRow>()?.iter().map(|b| b.flops).sum();
            (flops, super::reader::read_ranks(&g, SCHEMA_VERSION)?)
        } else {
            (0.0, Vec::new())
        };
        let stored = StoredSummary { summary: summary.clone(), aggregates: RankAggregates::from_ranks(&ranks), flops };
        for name in ["summary", "comm", "routing"] {
            if g.link_exists(name) {
                g.unlink(name)?;
            }
        }
        write_list(&g, "summary", &[SummaryRow::new(&stored)])?;
        let comm = stored.aggregates.comm.iter().map(|c| CommRow::new(c, stored.aggregates.active_wall_s)).collect::<Result<Vec<_>>>()?;
        write_list(&g, "comm", &comm)?;
        let experts = super::reader::read_experts(&g)?;
        if !experts.is_empty() {
            write_list(&g, "routing", &LayerRouting::of(&experts).iter().map(RoutingRow::new).collect::<Vec<_>>())?;
        }
        self.flush()?;
        Ok(stored)
    }

    /// Stores a planner prediction (e.g. "tpot_s") beside the measurements
    /// of (strategy, category); a later call with the same name replaces it.
    pub fn store_prediction(&mut self, strategy: &str, category: &str, name: &str, value: f64) -> Result<()> {
        if name.is_empty() {
            return Err(ResultsError::InvalidName { what: "prediction", name: name.to_string() });
        }
        let g = self.category_group(strategy, category, true)?.expect("created on demand");
        let p = if g.link_exists("prediction") { g.group("prediction")? } else { g.create_group("prediction")? };
        attrs::set_scalar(&p, name, value)?;
        self.flush()
    }

    /// Stores what a (strategy, category)'s predictions assume, as text
    /// (`source`, `expert_routing`; schema 4).
    pub fn store_prediction_note(&mut self, strategy: &str, category: &str, name: &str, text: &str) -> Result<()> {
        if name.is_empty() {
            return Err(ResultsError::InvalidName { what: "prediction note", name: name.to_string() });
        }
        let g = self.category_group(strategy, category, true)?.expect("created on demand");
        let p = if g.link_exists("prediction") { g.group("prediction")? } else { g.create_group("prediction")? };
        attrs::set_str(&p, name, text)?;
        self.flush()
    }

    /// Records where the run stands; `ended_utc` is set when it stopped.
    /// Going back to running (a resume) removes the earlier end time.
    pub fn set_status(&mut self, status: RunStatus, ended_utc: Option<&str>) -> Result<()> {
        attrs::set_str(&self.file, "status", status.as_str())?;
        if status == RunStatus::Running {
            attrs::remove(&self.file, "ended_utc")?;
        }
        if let Some(t) = ended_utc {
            attrs::set_str(&self.file, "ended_utc", t)?;
        }
        self.flush()
    }

    /// Records the batch a failed run was in (root attributes `failed_batch`,
    /// "strategy/category/index", and `failure`, the reason) and marks the
    /// run failed. A resumed run reruns that batch; the marks stay as history.
    pub fn mark_failed_batch(&mut self, strategy: &str, category: &str, batch_index: u32, reason: &str, ended_utc: &str) -> Result<()> {
        attrs::set_str(&self.file, "failed_batch", &format!("{strategy}/{category}/{batch_index}"))?;
        attrs::set_str(&self.file, "failure", reason)?;
        self.set_status(RunStatus::Failed, Some(ended_utc))
    }

    /// Shrinks each category's payload datasets to what its batch rows
    /// reference, and drops batch rows that were never written (fill value).
    fn trim_unreferenced_rows(&self) -> Result<()> {
        let all = self.file.group(STRATEGIES)?;
        for s in all.groups()? {
            for g in s.groups()? {
                if !g.link_exists("batches") {
                    continue;
                }
                let batches = g.dataset("batches")?;
                let rows = batches.read_raw::<BatchRow>()?;
                let kept = rows.iter().take_while(|b| b.num_sequences > 0).count();
                let kept_rows = &rows[..kept];
                if kept < rows.len() {
                    batches.resize((kept,))?;
                }
                let end = |f: &dyn Fn(&BatchRow) -> u64| kept_rows.iter().map(f).max().unwrap_or(0) as usize;
                let shrink = |name: &str, len: usize| -> Result<()> {
                    if g.link_exists(name) {
                        let ds = g.dataset(name)?;
                        let mut shape = ds.shape();
                        if shape[0] > len {
                            shape[0] = len;
                            ds.resize(shape)?;
                        }
                    }
                    Ok(())
                };
                shrink("itl_s", end(&|b| b.itl_offset + b.itl_count))?;
                shrink("ranks", end(&|b| b.ranks_offset + b.ranks_count))?;
                shrink("tokens", end(&|b| b.tokens_offset + if b.output_tokens > 0 { b.num_sequences as u64 } else { 0 }))?;
                // Expert rows carry their batch: keep them up to the last one of a recorded batch.
                if g.link_exists("experts") {
                    let recorded: std::collections::BTreeSet<u32> = kept_rows.iter().map(|b| b.batch_index).collect();
                    let rows = g.dataset("experts")?.read_raw::<ExpertRow>()?;
                    shrink("experts", rows.iter().rposition(|r| recorded.contains(&r.batch_index)).map_or(0, |i| i + 1))?;
                }
            }
        }
        Ok(())
    }
}
