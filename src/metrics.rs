//! Metrics: what one batch and one rank measured, and the summaries defined
//! in `docs/results-schema.md` (TTFT, TPOT, ITL, TPS, paper TPOT, percentiles).
//!
//! Plain data and arithmetic only: no MPI, no device calls, no file I/O.

use crate::comm::{Category, CommStat};
use std::collections::BTreeMap;

/// One batch, as seen by the strategy's leader rank (the rank that holds the
/// generated tokens).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchRecord {
    /// Index of the batch within its category (0-based).
    pub batch_index: u32,
    /// Index of the batch's first sequence within the category's workload.
    pub first_sequence: u32,
    pub seq_len: u32,
    pub num_sequences: u32,
    pub output_tokens: u32,
    /// Batch size asked for by the job and the one used after memory fitting.
    pub requested_batch: u32,
    pub effective_batch: u32,
    /// Micro-batches the batch ran as.
    pub micro_batches: u32,
    /// fapool: pool size from the activation policy, and after capping by the
    /// launched pool ranks (0 = pool inactive). Baseline: 0 and 0.
    pub pool_requested: u32,
    pub pool_effective: u32,
    /// The pool was requested but the batch ran base-only (device failure).
    pub pool_fallback: bool,
    /// Batch start → first generated token available (s).
    pub ttft_s: f64,
    /// Batch start → last generated token available (s).
    pub e2e_s: f64,
    /// Inter-token latencies of the decode steps (s), `output_tokens - 1` values.
    pub itl_s: Vec<f64>,
    /// Generated token ids, `num_sequences × output_tokens`, row-major.
    pub tokens: Vec<u32>,
    /// Model FLOPs executed for the batch (all ranks together).
    pub flops: f64,
}

impl BatchRecord {
    /// TPOT = (E2E − TTFT) / (output_tokens − 1); zero when one token is generated.
    pub fn tpot_s(&self) -> f64 {
        if self.output_tokens <= 1 {
            0.0
        } else {
            (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) as f64
        }
    }
    /// The source paper's TPOT: total time / output tokens.
    pub fn paper_tpot_s(&self) -> f64 {
        if self.output_tokens == 0 {
            0.0
        } else {
            self.e2e_s / self.output_tokens as f64
        }
    }
    /// Input plus output tokens of all sequences of the batch.
    pub fn total_tokens(&self) -> u64 {
        self.num_sequences as u64 * (self.seq_len as u64 + self.output_tokens as u64)
    }
}

/// What one rank measured during one batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankRecord {
    pub batch_index: u32,
    pub world_rank: u32,
    /// The rank's role in the strategy: "tp", "base", "pool", "idle", ...
    pub role: String,
    /// Whether the rank did any work for this batch (pool ranks outside the
    /// active pool and ranks outside the strategy are idle).
    pub active: bool,
    /// Wall time of the batch on this rank (s).
    pub wall_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub comm: BTreeMap<Category, CommStat>,
    /// Peak device memory during the batch (process RSS on CPU), bytes.
    pub peak_memory_bytes: Option<u64>,
    /// The analytical estimate for this rank, bytes.
    pub memory_estimate_bytes: u64,
    /// Energy-counter deltas (J); `None` where not measured (CPU backend).
    pub energy_prefill_j: Option<f64>,
    pub energy_decode_j: Option<f64>,
    /// FLOPs this rank executed.
    pub flops: f64,
    /// Time the rank's compute timeline worked: wall minus `wait_s`.
    pub compute_s: f64,
    /// Time the rank's compute timeline waited for messages (on the CPU
    /// backend every message's time, since messages block).
    pub wait_s: f64,
}

impl RankRecord {
    pub fn comm_seconds(&self) -> f64 {
        self.comm.values().map(|s| s.seconds).sum()
    }

    /// Share of the rank's wall time it was not computing (waiting for
    /// messages, or not part of the batch at all).
    pub fn idle_share(&self) -> f64 {
        if !self.active || self.wall_s <= 0.0 {
            return 1.0;
        }
        (self.wait_s / self.wall_s).clamp(0.0, 1.0)
    }
}

/// What one rank counted for one expert of one layer in one phase of a
/// batch (strategies with a mixture-of-experts FFN).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpertLoad {
    pub batch_index: u32,
    pub world_rank: u32,
    /// The model's layer index.
    pub layer: u32,
    pub expert: u32,
    /// Counted over the decode steps (true) or the prefill (false).
    pub decode: bool,
    /// Assignments of this rank's tokens to the expert, before any capacity.
    pub routed: u64,
    /// Of those, the ones the expert's capacity dropped.
    pub dropped: u64,
    /// Rows this rank's copy of the expert processed (from every rank of
    /// its expert-parallel group); zero where the rank does not hold it.
    pub received: u64,
}

/// The routing of one layer in one phase, summed over batches and ranks:
/// how evenly the experts and the ranks holding them were loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerRouting {
    pub layer: u32,
    pub decode: bool,
    /// Token-expert assignments (every token counts `top_k`), before capacity.
    pub assignments: u64,
    pub dropped: u64,
    /// Rows processed per expert (all its copies): the largest and the mean
    /// over the layer's experts.
    pub expert_max: f64,
    pub expert_mean: f64,
    /// Rows processed per rank holding experts of the layer.
    pub rank_max: f64,
    pub rank_mean: f64,
}

impl LayerRouting {
    /// Largest over mean expert load (1 is perfectly even; NaN without rows).
    pub fn expert_imbalance(&self) -> f64 {
        if self.expert_mean > 0.0 {
            self.expert_max / self.expert_mean
        } else {
            f64::NAN
        }
    }
    /// Largest over mean rank load.
    pub fn rank_imbalance(&self) -> f64 {
        if self.rank_mean > 0.0 {
            self.rank_max / self.rank_mean
        } else {
            f64::NAN
        }
    }

    /// One summary per (layer, phase) present in `loads`, in that order.
    /// The experts of a layer are those any rank counted, the ranks those
    /// that counted the layer (every rank of its stage).
    pub fn of(loads: &[ExpertLoad]) -> Vec<LayerRouting> {
        /// Rows per expert and per rank, assignments and drops of one (layer, phase).
        #[derive(Default)]
        struct Sums {
            experts: BTreeMap<u32, u64>,
            ranks: BTreeMap<u32, u64>,
            assignments: u64,
            dropped: u64,
        }
        let mut by: BTreeMap<(u32, bool), Sums> = BTreeMap::new();
        for l in loads {
            let s = by.entry((l.layer, l.decode)).or_default();
            *s.experts.entry(l.expert).or_default() += l.received;
            *s.ranks.entry(l.world_rank).or_default() += l.received;
            s.assignments += l.routed;
            s.dropped += l.dropped;
        }
        let stats = |m: &BTreeMap<u32, u64>| {
            let max = m.values().copied().max().unwrap_or(0) as f64;
            (max, m.values().sum::<u64>() as f64 / m.len().max(1) as f64)
        };
        by.into_iter()
            .map(|((layer, decode), s)| {
                let ((expert_max, expert_mean), (rank_max, rank_mean)) = (stats(&s.experts), stats(&s.ranks));
                LayerRouting { layer, decode, assignments: s.assignments, dropped: s.dropped, expert_max, expert_mean, rank_max, rank_mean }
            })
            .collect()
    }
}

/// Mean and percentiles of a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Distribution {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Distribution {
    /// Percentiles by linear interpolation between closest ranks (numpy's default).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            let x = p / 100.0 * (v.len() - 1) as f64;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
        };
        Self { count: v.len(), mean: v.iter().sum::<f64>() / v.len() as f64, p50: pct(50.0), p90: pct(90.0), p99: pct(99.0) }
    }
}

/// One (strategy, category) summary, computed from its batch records.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CategorySummary {
    pub batches: usize,
    pub sequences: u64,
    pub total_tokens: u64,
    /// Wall time of the category (s): the sum of its batches' end-to-end
    /// times (batches run one after another; bookkeeping between batches is
    /// excluded, and a category resumed after a requeue adds up across runs).
    pub wall_s: f64,
    /// (input + output tokens) / wall time.
    pub tps: f64,
    pub ttft: Distribution,
    pub tpot: Distribution,
    pub itl: Distribution,
    pub e2e: Distribution,
    pub paper_tpot_mean: f64,
}

impl CategorySummary {
    pub fn from_batches(batches: &[BatchRecord], wall_s: f64) -> Self {
        let total_tokens: u64 = batches.iter().map(|b| b.total_tokens()).sum();
        let itl: Vec<f64> = batches.iter().flat_map(|b| b.itl_s.iter().copied()).collect();
        let col = |f: &dyn Fn(&BatchRecord) -> f64| batches.iter().map(f).collect::<Vec<_>>();
        Self {
            batches: batches.len(),
            sequences: batches.iter().map(|b| b.num_sequences as u64).sum(),
            total_tokens,
            wall_s,
            tps: if wall_s > 0.0 { total_tokens as f64 / wall_s } else { 0.0 },
            ttft: Distribution::of(&col(&|b| b.ttft_s)),
            tpot: Distribution::of(&col(&|b| b.tpot_s())),
            itl: Distribution::of(&itl),
            e2e: Distribution::of(&col(&|b| b.e2e_s)),
            paper_tpot_mean: Distribution::of(&col(&|b| b.paper_tpot_s())).mean,
        }
    }
}

/// `||a - b|| / ||b||` over all elements. Positions where both hold the same
/// infinity (a log-sum-exp of `-inf` for a row without keys) agree and are
/// left out; an infinity on one side only gives `inf`, a NaN anywhere `NaN`.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            return f64::NAN;
        }
        if x.is_infinite() || y.is_infinite() {
            if x == y {
                continue;
            }
            return f64::INFINITY;
        }
        let d = x as f64 - y as f64;
        num += d * d;
        den += y as f64 * y as f64;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { num.sqrt() };
    }
    (num / den).sqrt()
}

/// The largest of several errors; a NaN anywhere makes the result NaN, so
/// it can never pass a tolerance.
pub fn worst_error(errors: impl IntoIterator<Item = f64>) -> f64 {
    errors.into_iter().fold(0.0, |m, e| if e.is_nan() || m.is_nan() { f64::NAN } else { m.max(e) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let d = Distribution::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(d.p50, 2.5);
        assert!((d.p90 - 3.7).abs() < 1e-12);
        assert_eq!(d.mean, 2.5);
    }

    #[test]
    fn routing_imbalance_is_the_busiest_over_the_mean_per_layer_and_phase() {
        let load = |world_rank, layer, expert, routed, received| ExpertLoad { world_rank, layer, expert, routed, received, ..Default::default() };
        // Layer 0: rank 0 holds experts 0-1, rank 1 experts 2-3; 12 assignments, expert 0 takes 6.
        let loads = [load(0, 0, 0, 4, 6), load(0, 0, 1, 2, 2), load(1, 0, 2, 3, 3), load(1, 0, 3, 3, 1), load(0, 1, 0, 2, 2)];
        let r = LayerRouting::of(&loads);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].layer, r[0].assignments, r[0].expert_max, r[0].expert_mean), (0, 12, 6.0, 3.0));
        assert_eq!((r[0].expert_imbalance(), r[0].rank_max, r[0].rank_mean, r[0].rank_imbalance()), (2.0, 8.0, 6.0, 8.0 / 6.0));
        assert!(LayerRouting::default().expert_imbalance().is_nan());
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        let b = BatchRecord { output_tokens: 5, ttft_s: 1.0, e2e_s: 3.0, ..Default::default() };
        assert_eq!(b.tpot_s(), 0.5);
        assert_eq!(b.paper_tpot_s(), 0.6);
    }

    #[test]
    fn tps_counts_input_and_output_tokens_over_wall_time() {
        let b = BatchRecord { num_sequences: 4, seq_len: 10, output_tokens: 2, ..Default::default() };
        let s = CategorySummary::from_batches(&[b.clone(), b], 2.0);
        assert_eq!(s.total_tokens, 96);
        assert_eq!(s.tps, 48.0);
    }
}
