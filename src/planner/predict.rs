//! Predictions beside measurements. Before `fapool run` measures a job, the
//! planner predicts every (strategy, category) of it on the run's own
//! hardware — the calibration file given with `--calibration`, else the
//! roofline of the run's GPU (the CPU model on the CPU backend) — and the
//! sweep stores each figure in the category's `prediction` group under the
//! name of the measured figure it predicts ([`NAMES`]). [`errors`] reads a
//! results file back as predicted, measured and error per quantity.
//!
//! A category's predictions aggregate its batches as its summary does: the
//! mean of per-batch TTFT, TPOT, E2E and paper TPOT, TPS as all tokens over
//! the summed E2E, the communication share over every batch and, on GPUs,
//! the largest simulated peak of any rank's buffers (`peak_memory_bytes`).
//! `calibrated` says where compute times came from (1: a calibration file,
//! 0: the roofline).

use super::cluster::ClusterSpec;
use super::cost::CostModel;
use super::{PlanError, Planner};
use crate::model::ModelConfig;
use crate::results::RunData;
use crate::spec::JobSpec;
use crate::strategy::BatchShape;
use crate::workload::Workload;
use std::collections::BTreeMap;

/// The predicted quantities, named as the measured figures they predict.
pub const NAMES: [&str; 8] = ["ttft_s", "tpot_s", "e2e_s", "paper_tpot_s", "tps", "comm_share", "peak_memory_bytes", "calibrated"];

/// Decode steps simulated per batch (TPOT beyond them is extrapolated).
pub const DECODE_STEPS: usize = 4;

/// Predictions by (strategy, category): figures (`calibrated` among them:
/// 1 from a calibration file, 0 from the roofline) and notes (`source`,
/// and for MoE models `expert_routing`).
pub type Predictions = crate::runner::sweep::Predicted;

/// Predicts every (strategy, category) of `job` on `world` ranks under `cost`.
pub fn for_job(job: &JobSpec, cfg: &ModelConfig, cost: &CostModel, world: usize) -> Result<Predictions, PlanError> {
    let planner = Planner { job, cfg, cost, world, decode_steps: DECODE_STEPS };
    let wl = Workload::new(&job.workload, cfg.vocab);
    let mut out = Predictions::new();
    for spec in &job.strategies {
        let mut cache: BTreeMap<(usize, usize), super::Point> = BTreeMap::new();
        for (c, cat) in job.workload.categories.iter().enumerate() {
            let batches = wl.batches(c);
            let (mut ttft, mut tpot, mut e2e, mut paper, mut tokens, mut peak, mut comm) = (0.0, 0.0, 0.0, 0.0, 0.0, 0u64, 0.0);
            let mut unfit = None;
            for b in &batches {
                let shape = BatchShape { nseq: b.sequences.len(), seq_len: b.seq_len, out_tokens: job.workload.output_tokens };
                let key = (shape.nseq, shape.seq_len);
                let pt = match cache.entry(key) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => match planner.point(spec, shape) {
                        Ok(pt) => e.insert(pt),
                        // Said once: the category gets no predictions, the others do.
                        Err(PlanError::Dag(v)) if v.rule == "memory-within-capacity" => {
                            unfit = Some(format!("{} {}: a batch of {} x {} tokens does not fit ({}: {})", spec.name(), cat.name, shape.nseq, shape.seq_len, v.at, v.detail));
                            break;
                        }
                        Err(e) => return Err(e),
                    },
                };
                let p = &pt.prediction;
                ttft += p.ttft_s;
                tpot += p.tpot_s;
                e2e += p.e2e_s;
                paper += p.paper_tpot_s;
                tokens += (shape.nseq * (shape.seq_len + shape.out_tokens)) as f64;
                peak = peak.max(pt.dag.peak_bytes.iter().copied().max().unwrap_or(0));
                comm += p.comm_share * p.e2e_s;
            }
            if let Some(why) = unfit {
                eprintln!("fapool: planner: {why}; no predictions for it");
                continue;
            }
            let n = batches.len().max(1) as f64;
            let mut values = vec![
                ("ttft_s".to_string(), ttft / n),
                ("tpot_s".to_string(), tpot / n),
                ("e2e_s".to_string(), e2e / n),
                ("paper_tpot_s".to_string(), paper / n),
                ("tps".to_string(), if e2e > 0.0 { tokens / e2e } else { 0.0 }),
                ("comm_share".to_string(), if e2e > 0.0 { comm / e2e } else { 0.0 }),
                ("calibrated".to_string(), if cost.is_calibrated() { 1.0 } else { 0.0 }),
            ];
            // The CPU backend measures the process's resident set, which the
            // buffers' peak does not predict; a GPU measures device memory.
            if cost.cluster.gpu.key != "cpu" {
                values.push(("peak_memory_bytes".to_string(), peak as f64));
            }
            let mut notes = vec![("source".to_string(), cost.source.clone())];
            if cfg.experts.is_some() {
                notes.push(("expert_routing".to_string(), planner.routing().describe().to_string()));
            }
            out.insert((spec.name(), cat.name.clone()), crate::runner::sweep::PredictedCategory { figures: values, notes });
        }
    }
    Ok(out)
}

/// The cluster of a run: its GPU (by the driver's device name; the CPU
/// model on the CPU backend), its ranks per node, its memory budget.
pub fn run_cluster(device: Option<&str>, world: usize, ranks_per_node: usize, budget_bytes: u64) -> Result<ClusterSpec, String> {
    let gpu = match device {
        None => super::gpus::cpu(),
        Some(name) => super::gpus::by_device_name(name).ok_or_else(|| format!("no built-in roofline for `{name}` (known: {}); pass --calibration", super::gpus::keys().join(", ")))?,
    };
    let mut c = ClusterSpec::default_for(gpu, world);
    c.gpus_per_node = ranks_per_node.max(1);
    c.nodes = world.div_ceil(c.gpus_per_node).max(1);
    c.memory_bytes = budget_bytes;
    Ok(c)
}

/// One predicted quantity beside its measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictionError {
    pub strategy: String,
    pub category: String,
    pub quantity: String,
    pub predicted: f64,
    pub measured: Option<f64>,
    /// (predicted − measured) / measured.
    pub error: Option<f64>,
}

/// Every stored prediction of a results file with its measurement and error.
pub fn errors(run: &RunData) -> Vec<PredictionError> {
    let mut out = Vec::new();
    for s in &run.strategies {
        for c in &s.categories {
            for (name, &predicted) in &c.predictions {
                let measured = c.summary.as_ref().and_then(|m| m.measured(name));
                let error = measured.filter(|m| *m != 0.0).map(|m| (predicted - m) / m);
                out.push(PredictionError { strategy: s.info.name.clone(), category: c.name.clone(), quantity: name.clone(), predicted, measured, error });
            }
        }
    }
    out
}
