//! The planner: a deployment's DAG from the strategy's own code, validated,
//! costed and simulated, for deployments too large to run today.
//!
//! The path of a plan: [`execute`] runs the unchanged strategy
//! (`StrategySpec::build`, then `runner::run_batch`) on simulated ranks — a
//! shape-only backend over the in-process transport — recording every
//! operation and message; [`dag`] joins the records into a DAG; [`validate`]
//! checks its rules; [`cost`] prices each node (a calibration file or the
//! roofline of [`gpus`], links from [`cluster`]); [`timeline`] simulates every
//! GPU's streams; [`report`] reads the suite's metrics off the result.
//! Around it: [`export`] (DOT, SVG, trace), [`search`], [`check`] (plans
//! written by people), [`predict`] (predictions beside measurements) and
//! [`calibrate`] (measuring a calibration file). `docs/planner.md` describes
//! the design and the cost model.
//!
//! The planner depends on strategies only through `StrategySpec` and the
//! `Backend`/`Transport` traits; it never looks inside a dataflow.

pub mod calibrate;
pub mod calibration;
pub mod check;
pub mod cluster;
pub mod compare;
pub mod cost;
pub mod dag;
pub mod execute;
pub mod export;
pub mod gpus;
pub mod predict;
pub mod report;
pub mod search;
pub mod timeline;
pub mod validate;

use crate::backend::shape::Routing;
use crate::backend::Dtype;
use crate::model::ModelConfig;
use crate::rules::Violation;
use crate::spec::{JobSpec, StrategySpec};
use crate::strategy::BatchShape;
use cost::CostModel;
use dag::Dag;
use report::Prediction;
use timeline::Timeline;
use validate::{DagViolation, MemoryLimit};

/// Why a plan failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Bad input (a cluster file, a calibration file, a plan, the job).
    #[error(transparent)]
    Rule(#[from] Violation),
    /// The DAG breaks one of its rules.
    #[error(transparent)]
    Dag(#[from] DagViolation),
    /// The strategy failed on the simulated ranks, or the DAG cannot finish.
    #[error("{0}")]
    Simulation(String),
}

impl PlanError {
    /// Bad input rather than a fault of the planner or a strategy: a
    /// broken rule of the input, or a deployment that does not fit its GPUs.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, PlanError::Rule(_)) || matches!(self, PlanError::Dag(v) if v.rule == "memory-within-capacity")
    }
}

/// What every point of a plan shares.
#[derive(Clone, Debug)]
pub struct Planner<'a> {
    pub job: &'a JobSpec,
    pub cfg: &'a ModelConfig,
    pub cost: &'a CostModel,
    /// World ranks of the launch.
    pub world: usize,
    /// Decode steps to simulate (TPOT is extrapolated beyond them; 0: every step).
    pub decode_steps: usize,
}

/// One strategy at one batch shape, planned.
#[derive(Clone, Debug)]
pub struct Point {
    pub strategy: String,
    pub kind: &'static str,
    pub dag: Dag,
    pub timeline: Timeline,
    pub prediction: Prediction,
    /// `Deployment::memory_bytes` of the micro-batch as run (the busiest rank).
    pub memory_model_bytes: u64,
    pub micro_batch_cap: usize,
    /// Wall time of planning the point.
    pub plan_seconds: f64,
    /// Recording on simulated ranks, building the DAG, validating it and
    /// simulating the timeline (the last two side by side: their sum may
    /// exceed their share of `plan_seconds`).
    pub stage_seconds: [f64; 4],
}

impl Planner<'_> {
    /// The dtype the backend stores (the CPU backend always computes in f32).
    pub fn dtype(&self) -> Dtype {
        if self.cost.cluster.gpu.key == "cpu" {
            Dtype::Fp32
        } else {
            self.cost.dtype
        }
    }

    /// How a shape-only run spreads tokens over experts: balanced (the
    /// simulated ranks have no logits to route by). Plans of MoE models say so.
    pub fn routing(&self) -> Routing {
        Routing::Balanced
    }

    /// Bytes each GPU may use: the job's budget, else the GPU's memory.
    pub fn budget_bytes(&self) -> u64 {
        self.job.run.memory_budget_gib.map(|g| (g * (1u64 << 30) as f64) as u64).unwrap_or(self.cost.cluster.memory_bytes)
    }

    /// Plans `spec` for a batch of `shape`.
    pub fn point(&self, spec: &StrategySpec, shape: BatchShape) -> Result<Point, PlanError> {
        let started = std::time::Instant::now();
        let dep = spec.deployment();
        let range = dep.rank_range();
        if self.world < range.min {
            return Err(crate::rules::violation("ranks-match-job", format!("{} needs at least {} ranks, the plan has {}", spec.name(), range.min, self.world)).into());
        }
        self.cost.cluster.check_deployment(self.world)?;
        let elem = self.dtype().size_bytes();
        let budget = self.budget_bytes();
        let cap = dep.max_sequences(self.cfg, shape, self.world, elem, budget);
        let memory_model_bytes = dep.memory_bytes(self.cfg, BatchShape { nseq: cap.min(shape.nseq), ..shape }, self.world, elem);
        let steps = if self.decode_steps == 0 { shape.out_tokens.saturating_sub(1) } else { self.decode_steps.min(shape.out_tokens.saturating_sub(1)) };
        let simulated = BatchShape { out_tokens: steps + 1, ..shape };
        let x = execute::Execution {
            spec,
            cfg: self.cfg,
            world: self.world,
            shape: simulated,
            micro_batch_cap: cap,
            dtype: self.dtype(),
            cuda_graphs: self.job.run.cuda_graphs,
            messages_block_compute: self.cost.cluster.gpu.key == "cpu",
            routing: self.routing(),
        };
        let mut stages = [0.0; 4];
        let lap = std::time::Instant::now();
        let rec = execute::record(&x)?;
        stages[0] = lap.elapsed().as_secs_f64();
        let lap = std::time::Instant::now();
        let dag = Dag::build(rec);
        stages[1] = lap.elapsed().as_secs_f64();
        let limit = MemoryLimit { capacity: budget, model_estimate: memory_model_bytes };
        let simulate = |cost: &CostModel| timeline::simulate(&dag, cost).map_err(|e| PlanError::Simulation(format!("{}: {e}", spec.name())));
        // Validation and the timeline only read the DAG, so they run side by
        // side (at 1024 GPUs they are a third of a plan); a broken rule is
        // still what a plan of a broken DAG reports.
        let (checked, simulated) = std::thread::scope(|s| {
            let check = s.spawn(|| {
                let lap = std::time::Instant::now();
                validate::validate(&dag, self.cfg.layers, Some(&limit)).map(|_| lap.elapsed().as_secs_f64())
            });
            let lap = std::time::Instant::now();
            let simulated = simulate(self.cost).and_then(|first| {
                if !self.cost.has_contention() {
                    return Ok(first);
                }
                // Ranks sharing a node slow each other as much as they overlap:
                // a second pass with each rank's compute slowed by the others' busy share.
                simulate(&self.cost.contended(&report::busy_shares(&dag, &first)))
            });
            let simulated = simulated.map(|t| (t, lap.elapsed().as_secs_f64()));
            (check.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)), simulated)
        });
        stages[2] = checked?;
        let (timeline, simulate_seconds) = simulated?;
        stages[3] = simulate_seconds;
        let prediction = report::predict(&dag, &timeline, shape);
        Ok(Point {
            strategy: spec.name(),
            kind: spec.kind(),
            dag,
            timeline,
            prediction,
            memory_model_bytes,
            micro_batch_cap: cap,
            plan_seconds: started.elapsed().as_secs_f64(),
            stage_seconds: stages,
        })
    }
}

/// The cost model of a plan: the cluster file's GPU and links (without one:
/// the CPU model for CPU jobs, else H200s, 8 per node, as many nodes as
/// `world` needs), compute from `calibration` where given.
pub fn cost_model(job: &JobSpec, cluster: Option<&std::path::Path>, calibration: Option<&std::path::Path>, world: usize) -> Result<CostModel, PlanError> {
    let cluster = match cluster {
        Some(p) => cluster::ClusterSpec::load(p)?,
        None if job.run.backend == crate::backend::BackendKind::Cpu => cluster::ClusterSpec::default_for(gpus::cpu(), world),
        None => cluster::ClusterSpec::default_for(gpus::by_key("h200").expect("in the table"), world),
    };
    let cpu = cluster.gpu.key == "cpu";
    let dtype = if cpu { Dtype::Fp32 } else { job.dtype() };
    let graphs = job.run.cuda_graphs && !cpu;
    Ok(match calibration {
        Some(p) => CostModel::calibrated(cluster, &calibration::Calibration::load(p, dtype)?, graphs),
        None => CostModel::roofline(cluster, dtype, graphs),
    })
}

/// Sequences per batch at length `s` in the job's workload: the largest
/// batch of that length it draws, else `batch_size` capped by the
/// sequences of a category.
pub fn batch_at(job: &JobSpec, vocab: usize, s: usize) -> usize {
    let wl = crate::workload::Workload::new(&job.workload, vocab);
    let drawn = (0..job.workload.categories.len()).flat_map(|c| wl.batches(c)).filter(|b| b.seq_len == s).map(|b| b.sequences.len()).max();
    drawn.unwrap_or_else(|| job.workload.batch_size.min(job.workload.sequences_per_category)).max(1)
}

#[cfg(test)]
mod tests;
