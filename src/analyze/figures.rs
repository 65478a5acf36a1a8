//! The figures every view of a run is drawn from: per (strategy, category)
//! the stored summary with confidence intervals, stability, tokens/s per
//! GPU, goodput and the improvement over the baseline; per (strategy,
//! sequence length) the spread of each latency; and what the run was
//! (job, GPU, date, commit, model, dtype).
//!
//! Tables, plots, exports and comparisons all read these, so they cannot
//! disagree. Computed from [`RunData`] only: no file access.

use super::slo::Slo;
use super::stats::Stat;
use crate::comm::Category;
use crate::metrics::{BatchRecord, CategorySummary, LayerRouting, RankRecord};
use crate::model::ModelConfig;
use crate::results::{CategoryData, RankAggregates, RunData, StoredSummary, StrategyInfo};
use std::collections::BTreeMap;

/// Where and how a run was made, for titles and for refusing comparisons
/// of unlike runs.
#[derive(Clone, Debug, Default)]
pub struct RunMeta {
    /// The job's `[run] name`, else the file's stem.
    pub job: String,
    /// "2 × NVIDIA H200", or "4 ranks, cpu backend" without devices.
    pub device: String,
    /// Start date (YYYY-MM-DD, UTC).
    pub date: String,
    /// The commit, shortened to 7 hex digits (with any "-dirty" kept).
    pub commit: String,
    /// The model the job ran, when its spec parses.
    pub model: Option<ModelConfig>,
    /// The element type computed in: the job's dtype on GPU, fp32 on CPU.
    pub dtype: String,
}

/// The `--set` overrides a run was started with, from its recorded argv.
fn overrides(argv: &[String]) -> Vec<String> {
    let mut sets = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "--set" {
            sets.extend(it.next().cloned());
        } else if let Some(v) = a.strip_prefix("--set=") {
            sets.push(v.to_string());
        }
    }
    sets
}

impl RunMeta {
    /// What `run`'s provenance says about it.
    pub fn of(run: &RunData) -> Self {
        let p = &run.provenance;
        let job = crate::spec::parse_job(&p.job_toml, &overrides(&p.argv)).ok();
        let stem = run.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let device = match p.devices.first() {
            Some(d) => format!("{} × {}", p.devices.len(), d.name),
            None => format!("{} ranks, {} backend", p.world_size, p.backend),
        };
        let commit = match p.git_commit.split_once('-') {
            Some((hash, rest)) => format!("{}-{rest}", &hash[..hash.len().min(7)]),
            None => p.git_commit.chars().take(7).collect(),
        };
        let dtype = if p.backend == "cpu" { "fp32".to_string() } else { job.as_ref().map_or_else(|| "unknown".into(), |j| j.dtype().name().to_string()) };
        Self {
            job: job.as_ref().map_or(stem, |j| j.run.name.clone()),
            device,
            date: p.started_utc.split('T').next().unwrap_or_default().to_string(),
            commit,
            model: job.and_then(|j| j.model.resolve().ok()),
            dtype,
        }
    }

    /// "job quickstart · 4 ranks, cpu backend · 2026-12-01 · commit b6ea26b".
    pub fn caption(&self) -> String {
        format!("job {} · {} · {} · commit {}", self.job, self.device, self.date, self.commit)
    }
}

/// Per-batch energy of all ranks (J), `None` unless every rank row of the
/// batch measured both phases.
pub fn batch_energy_j(ranks: &[&RankRecord]) -> Option<f64> {
    if ranks.is_empty() {
        return None;
    }
    ranks.iter().map(|r| Some(r.energy_prefill_j? + r.energy_decode_j?)).sum()
}

/// Throughput of one batch: its input and output tokens over its E2E.
pub fn batch_tps(b: &BatchRecord) -> f64 {
    if b.e2e_s > 0.0 {
        b.total_tokens() as f64 / b.e2e_s
    } else {
        f64::NAN
    }
}

/// The rank rows of one batch.
pub fn ranks_of(c: &CategoryData, batch_index: u32) -> Vec<&RankRecord> {
    c.ranks.iter().filter(|r| r.batch_index == batch_index).collect()
}

/// One (strategy, category).
#[derive(Clone, Debug)]
pub struct CategoryFigures<'a> {
    pub data: &'a CategoryData,
    pub stored: StoredSummary,
    /// Summarised here from recorded batches: the run stopped before it
    /// wrote the category's summary.
    pub partial: bool,
    pub ttft: Stat,
    pub tpot: Stat,
    pub e2e: Stat,
    /// TPS over the GPUs (ranks) the strategy uses.
    pub tps_per_gpu: f64,
    /// Output tokens per second one sequence sees while decoding: 1 / median TPOT.
    pub tokens_per_s_per_sequence: f64,
    /// Share of sequences whose batch met the `--slo` limits.
    pub goodput: Option<f64>,
    /// TPOT and TTFT stability together: the first reason either is unstable.
    pub unstable: Option<String>,
    /// Baseline mean TPOT over this mean TPOT, and this TPS over the
    /// baseline's (fapool-kind strategies with a baseline in the run).
    pub tpot_x: Option<f64>,
    pub tps_x: Option<f64>,
    /// Per layer and phase, how evenly the experts and their ranks were
    /// loaded (strategies with experts; from the expert rows, so a
    /// category without a stored summary has it too).
    pub routing: Vec<LayerRouting>,
}

/// The targets a deployment plan sets a strategy (the `moe` kind's
/// `ttft_limit_s` and `tokens_per_ms_per_gpu_target`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PlanTargets {
    pub ttft_limit_s: Option<f64>,
    pub tokens_per_ms_per_gpu: Option<f64>,
}

impl PlanTargets {
    /// The targets in a strategy's stored settings (none for kinds without them).
    pub fn of(info: &StrategyInfo) -> Self {
        match toml::from_str::<crate::strategy::registry::StrategySpec>(&info.params) {
            Ok(crate::strategy::registry::StrategySpec::Moe(m)) => Self { ttft_limit_s: m.ttft_limit_s, tokens_per_ms_per_gpu: m.tokens_per_ms_per_gpu_target },
            _ => Self::default(),
        }
    }

    pub fn any(&self) -> bool {
        self.ttft_limit_s.is_some() || self.tokens_per_ms_per_gpu.is_some()
    }
}

/// One (strategy, sequence length): the batches of that length, over all
/// categories.
#[derive(Clone, Debug)]
pub struct LengthFigures {
    pub seq_len: u32,
    pub ttft: Stat,
    pub tpot: Stat,
    pub tps: Stat,
    /// J per token of each batch; `None` unless every batch measured energy.
    pub energy_j_per_token: Option<Stat>,
    pub pool_requested: Stat,
    pub pool_effective: Stat,
    /// Each communication category's time over the active ranks' wall time.
    pub comm_share: Vec<(Category, f64)>,
}

/// One strategy of a run.
#[derive(Clone, Debug)]
pub struct StrategyFigures<'a> {
    pub info: &'a StrategyInfo,
    /// GPUs (ranks) the strategy runs on.
    pub gpus: usize,
    pub categories: Vec<CategoryFigures<'a>>,
    pub lengths: Vec<LengthFigures>,
    pub targets: PlanTargets,
}

impl StrategyFigures<'_> {
    /// The category of this name.
    pub fn category(&self, name: &str) -> Option<&CategoryFigures<'_>> {
        self.categories.iter().find(|c| c.data.name == name)
    }
}

/// One results file's figures.
#[derive(Clone, Debug)]
pub struct RunFigures<'a> {
    pub run: &'a RunData,
    pub meta: RunMeta,
    /// The file's stem, to tell runs apart where several are shown together.
    pub label: String,
    pub strategies: Vec<StrategyFigures<'a>>,
}

fn stored_or_partial(c: &CategoryData) -> Option<(StoredSummary, bool)> {
    if let Some(s) = &c.summary {
        return Some((s.clone(), false));
    }
    if c.batches.is_empty() {
        return None;
    }
    // Without the runner's category wall time, batches back to back is the
    // closest stand-in (it is also how the runner defines it).
    let wall_s = c.batches.iter().map(|b| b.e2e_s).sum();
    let stored = StoredSummary { summary: CategorySummary::from_batches(&c.batches, wall_s), aggregates: RankAggregates::from_ranks(&c.ranks), flops: c.batches.iter().map(|b| b.flops).sum() };
    Some((stored, true))
}

fn category_figures<'a>(c: &'a CategoryData, gpus: usize, slo: Option<&Slo>) -> Option<CategoryFigures<'a>> {
    let (stored, partial) = stored_or_partial(c)?;
    let col = |f: &dyn Fn(&BatchRecord) -> f64| c.batches.iter().map(f).collect::<Vec<f64>>();
    let (ttft, tpot, e2e) = (Stat::of(&col(&|b| b.ttft_s)), Stat::of(&col(&|b| b.tpot_s())), Stat::of(&col(&|b| b.e2e_s)));
    let sequences: u64 = c.batches.iter().map(|b| b.num_sequences as u64).sum();
    let goodput = slo.filter(|_| sequences > 0).map(|slo| c.batches.iter().filter(|b| slo.met_by(b.ttft_s, b.tpot_s())).map(|b| b.num_sequences as u64).sum::<u64>() as f64 / sequences as f64);
    let unstable = tpot.unstable.clone().map(|r| format!("TPOT {r}")).or_else(|| ttft.unstable.clone().map(|r| format!("TTFT {r}")));
    Some(CategoryFigures {
        data: c,
        tps_per_gpu: stored.summary.tps / gpus.max(1) as f64,
        tokens_per_s_per_sequence: if tpot.p50 > 0.0 { 1.0 / tpot.p50 } else { f64::NAN },
        stored,
        partial,
        ttft,
        tpot,
        e2e,
        goodput,
        unstable,
        tpot_x: None,
        tps_x: None,
        routing: LayerRouting::of(&c.experts),
    })
}

fn length_figures(s: &crate::results::StrategyData) -> Vec<LengthFigures> {
    let mut by_len: BTreeMap<u32, Vec<(&CategoryData, &BatchRecord)>> = BTreeMap::new();
    for c in &s.categories {
        for b in &c.batches {
            by_len.entry(b.seq_len).or_default().push((c, b));
        }
    }
    by_len
        .into_iter()
        .map(|(seq_len, batches)| {
            let col = |f: &dyn Fn(&BatchRecord) -> f64| batches.iter().map(|(_, b)| f(b)).collect::<Vec<f64>>();
            let energy: Option<Vec<f64>> = batches.iter().map(|(c, b)| batch_energy_j(&ranks_of(c, b.batch_index)).map(|e| e / b.total_tokens().max(1) as f64)).collect();
            let mut comm: BTreeMap<Category, f64> = BTreeMap::new();
            let mut active_wall = 0.0;
            for (c, b) in &batches {
                for r in ranks_of(c, b.batch_index).into_iter().filter(|r| r.active) {
                    active_wall += r.wall_s;
                    for (&cat, stat) in &r.comm {
                        *comm.entry(cat).or_default() += stat.seconds;
                    }
                }
            }
            LengthFigures {
                seq_len,
                ttft: Stat::of(&col(&|b| b.ttft_s)),
                tpot: Stat::of(&col(&|b| b.tpot_s())),
                tps: Stat::of(&col(&batch_tps)),
                energy_j_per_token: energy.map(|e| Stat::of(&e)),
                pool_requested: Stat::of(&col(&|b| b.pool_requested as f64)),
                pool_effective: Stat::of(&col(&|b| b.pool_effective as f64)),
                comm_share: Category::ALL.into_iter().map(|cat| (cat, if active_wall > 0.0 { comm.get(&cat).copied().unwrap_or(0.0) / active_wall } else { 0.0 })).collect(),
            }
        })
        .collect()
}

impl<'a> RunFigures<'a> {
    /// The figures of `run`, with goodput under `slo` when given.
    pub fn of(run: &'a RunData, slo: Option<&Slo>) -> Self {
        let mut strategies: Vec<StrategyFigures<'a>> = run
            .strategies
            .iter()
            .map(|s| {
                let gpus = if s.info.world_ranks_used.is_empty() { run.provenance.world_size as usize } else { s.info.world_ranks_used.len() };
                let categories = run.category_order().iter().filter_map(|name| category_figures(s.category(name)?, gpus, slo)).collect();
                StrategyFigures { info: &s.info, gpus, categories, lengths: length_figures(s), targets: PlanTargets::of(&s.info) }
            })
            .collect();
        if let Some(b) = strategies.iter().position(|s| s.info.kind == "baseline") {
            let base: Vec<(String, f64, f64)> = strategies[b].categories.iter().map(|c| (c.data.name.clone(), c.stored.summary.tpot.mean, c.stored.summary.tps)).collect();
            for s in strategies.iter_mut().filter(|s| s.info.kind == "fapool") {
                for c in &mut s.categories {
                    if let Some((_, tpot, tps)) = base.iter().find(|x| x.0 == c.data.name) {
                        c.tpot_x = Some(tpot / c.stored.summary.tpot.mean);
                        c.tps_x = Some(c.stored.summary.tps / tps);
                    }
                }
            }
        }
        let label = run.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self { run, meta: RunMeta::of(run), label, strategies }
    }

    /// The first baseline-kind strategy, which fapool-kind ones are compared with.
    pub fn baseline(&self) -> Option<&StrategyFigures<'a>> {
        self.strategies.iter().find(|s| s.info.kind == "baseline")
    }
}
