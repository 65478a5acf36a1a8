//! The MoE deployment's layout: expert parallel EP = e, tensor parallel
//! TP = t for attention (with sequence parallelism in the TP group), PP = p
//! stages of consecutive layers, DP = d replicas each serving its share of
//! a batch's sequences. Pure arithmetic.
//!
//! World = t × p × d ranks, stage-major: world rank
//! `stage · (t·d) + replica · t + tp_rank`. The t·d ranks of a stage (its
//! "stage ranks", `replica · t + tp_rank`) are cut into (t·d)/e expert
//! groups of e consecutive stage ranks; rank j of an expert group holds
//! experts `j·E/e .. (j+1)·E/e` of every layer of the stage. With e <= t an
//! expert group lies inside one replica's TP group; with e > t it spans
//! several replicas, whose tokens then meet at the experts. Ranks beyond
//! t·p·d are never launched: the job rules ask for exactly that many.

use crate::model::ModelConfig;
use crate::rules::{ensure, Violation};
use crate::strategy::{BatchShape, GroupFamily, Layout};
use serde::{Deserialize, Serialize};

/// The most experts per layer and the largest top-k the routing kernels
/// handle (`MOE_MAX_EXPERTS`, `MOE_MAX_TOP_K` in kernels/moe.cu).
pub const MAX_EXPERTS: usize = 256;
pub const MAX_TOP_K: usize = 8;

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

/// `kind = "moe"`: EP × TP (with SP) × PP × DP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSpec {
    pub name: Option<String>,
    /// Expert parallel degree: ranks each expert group spans.
    #[serde(default = "one")]
    pub ep: usize,
    /// Tensor parallel degree of attention (heads split t ways).
    #[serde(default = "one")]
    pub tp: usize,
    /// Pipeline stages.
    #[serde(default = "one")]
    pub pp: usize,
    /// Data-parallel replicas, each serving its share of a batch's sequences.
    #[serde(default = "one")]
    pub dp: usize,
    /// Sequence parallelism inside the TP group (SP = TP): every TP rank
    /// keeps only its share of the rows for the norms, residuals and the
    /// experts, with an all-gather before attention and a reduce-scatter
    /// after it. Off: the rows are replicated across the TP group (an
    /// all-reduce after attention) and each TP rank routes its share, the
    /// expert outputs all-gathered.
    #[serde(default = "yes")]
    pub sp: bool,
    /// Expert capacity as a multiple of a rank's balanced load: an expert
    /// keeps at most `ceil(capacity_factor · rows · top_k / experts)` of a
    /// rank's assignments per layer, and drops (and counts) the rest.
    /// None (the default): no capacity.
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// Prefill micro-batches per replica (fill/drain schedule); 0 = one per stage.
    #[serde(default)]
    pub micro_batches: usize,
    /// The plan's TTFT limit (s), which `analyze` checks the batches against.
    #[serde(default)]
    pub ttft_limit_s: Option<f64>,
    /// The plan's throughput target, input plus output tokens per ms per
    /// GPU, which `analyze` checks the categories against.
    #[serde(default)]
    pub tokens_per_ms_per_gpu_target: Option<f64>,
}

/// Where a deployed rank sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub stage: usize,
    pub replica: usize,
    pub tp_rank: usize,
    /// Its expert group within the stage, and its rank there.
    pub ep_group: usize,
    pub ep_rank: usize,
}

impl MoeSpec {
    /// The whole model on one rank: the reference the layouts are verified against.
    pub fn single_rank() -> Self {
        Self { name: Some("single-rank".into()), ep: 1, tp: 1, pp: 1, dp: 1, sp: true, capacity_factor: None, micro_batches: 1, ttft_limit_s: None, tokens_per_ms_per_gpu_target: None }
    }

    /// Ranks the deployment uses: t × p × d.
    pub fn ranks(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// Ranks of one stage: t × d.
    pub fn stage_ranks(&self) -> usize {
        self.tp * self.dp
    }

    /// The place of world rank `rank`, or `None` beyond the deployment.
    pub fn place(&self, rank: usize) -> Option<Place> {
        (rank < self.ranks()).then(|| {
            let within = rank % self.stage_ranks();
            Place { stage: rank / self.stage_ranks(), replica: within / self.tp, tp_rank: within % self.tp, ep_group: within / self.ep, ep_rank: within % self.ep }
        })
    }

    /// World rank of a place's (stage, replica, tp_rank).
    pub fn world_rank(&self, stage: usize, replica: usize, tp_rank: usize) -> usize {
        stage * self.stage_ranks() + replica * self.tp + tp_rank
    }

    /// Layers of each stage.
    pub fn layers_per_stage(&self, model: &ModelConfig) -> usize {
        model.layers / self.pp
    }

    /// The experts every rank of an expert group holds (its `ep_rank`'s share).
    pub fn experts_of(&self, model: &ModelConfig, ep_rank: usize) -> std::ops::Range<usize> {
        let per = model.experts.map_or(0, |e| e.count) / self.ep;
        ep_rank * per..(ep_rank + 1) * per
    }

    pub(super) fn default_name(&self) -> String {
        format!("moe-ep{}-tp{}-pp{}-dp{}{}", self.ep, self.tp, self.pp, self.dp, if self.sp || self.tp == 1 { "" } else { "-nosp" })
    }

    pub(super) fn check_rules(&self, m: &ModelConfig) -> Result<(), Violation> {
        let name = self.name.clone().unwrap_or_else(|| self.default_name());
        ensure(self.ep > 0 && self.tp > 0 && self.pp > 0 && self.dp > 0, "parallel-degrees-positive", || format!("{name}: ep, tp, pp and dp must be >= 1"))?;
        ensure(m.heads % self.tp == 0, "heads-divisible-by-tp", || format!("{name}: {} heads are not divisible by tp={}", m.heads, self.tp))?;
        ensure(m.kv_heads % self.tp == 0 || self.tp % m.kv_heads == 0, "kv-heads-split-by-tp", || {
            format!("{name}: {} K/V heads neither divide into tp={t} parts nor divide tp={t}", m.kv_heads, t = self.tp)
        })?;
        ensure(m.layers % self.pp == 0, "layers-divisible-by-pp", || format!("{name}: {} layers are not divisible by pp={}", m.layers, self.pp))?;
        let Some(experts) = m.experts else { return Ok(()) };
        ensure(experts.count % self.ep == 0, "experts-divisible-by-ep", || format!("{name}: {} experts per layer are not divisible by ep={}", experts.count, self.ep))?;
        ensure(self.stage_ranks() % self.ep == 0, "ep-divides-stage-ranks", || {
            format!("{name}: ep={} must divide the tp × dp = {} ranks of a stage, which the expert groups are drawn from", self.ep, self.stage_ranks())
        })?;
        ensure(experts.count <= MAX_EXPERTS && experts.top_k <= MAX_TOP_K, "experts-within-kernels", || {
            format!("{name}: the routing kernels take up to {MAX_EXPERTS} experts and top {MAX_TOP_K}, the model has {} and top {}", experts.count, experts.top_k)
        })?;
        if let Some(f) = self.capacity_factor {
            ensure(f.is_finite() && f > 0.0, "capacity-factor-positive", || format!("{name}: capacity_factor {f} must be a positive number"))?;
        }
        for (what, v) in [("ttft_limit_s", self.ttft_limit_s), ("tokens_per_ms_per_gpu_target", self.tokens_per_ms_per_gpu_target)] {
            if let Some(v) = v {
                ensure(v.is_finite() && v > 0.0, "targets-positive", || format!("{name}: {what} {v} must be a positive number"))?;
            }
        }
        Ok(())
    }

    /// The capacity of each expert for `rows` of a rank's tokens, if any.
    pub fn capacity(&self, model: &ModelConfig, rows: usize) -> Option<usize> {
        let e = model.experts?;
        self.capacity_factor.map(|f| (f * (rows * e.top_k) as f64 / e.count as f64).ceil() as usize)
    }

    pub(super) fn layout_of(&self, world: usize) -> Layout {
        let roles = (0..world)
            .map(|r| match self.place(r) {
                None => Layout::IDLE.to_string(),
                Some(p) => {
                    let stage = if self.pp > 1 { format!("stage{}-", p.stage) } else { String::new() };
                    format!("{stage}dp{}-tp{}-ep{}", p.replica, p.tp_rank, p.ep_rank)
                }
            })
            .collect();
        let (t, d, sr) = (self.tp, self.dp, self.stage_ranks());
        let stages = 0..self.pp;
        let tp = GroupFamily { name: "tp", groups: stages.clone().flat_map(|s| (0..d).map(move |r| (0..t).map(|i| s * sr + r * t + i).collect())).collect() };
        let pp = GroupFamily { name: "pp", groups: (0..d).flat_map(|r| (0..t).map(move |i| (0..self.pp).map(|s| s * sr + r * t + i).collect())).collect() };
        let ep = GroupFamily { name: "ep", groups: stages.flat_map(|s| (0..sr / self.ep).map(move |g| (0..self.ep).map(|j| s * sr + g * self.ep + j).collect())).collect() };
        let last = (self.pp - 1) * sr;
        let heads = GroupFamily { name: "heads", groups: vec![(0..d).map(|r| last + r * t).collect()] };
        Layout { roles, groups: vec![tp, pp, ep, heads], leader: last }
    }

    /// The busiest rank's bytes: its stage's attention shards, norms,
    /// router and own experts (and the embedding and head), the KV cache of
    /// its replica's sequences and heads, and the activations of one layer
    /// of its rows. The rows its experts receive are bounded by the
    /// capacity when there is one; without, twice a balanced share is
    /// assumed (a routing skewed beyond that can exceed the estimate).
    pub(super) fn memory_of(&self, m: &ModelConfig, shape: BatchShape, elem: usize) -> u64 {
        let (d, a, f, l, v) = (m.d_model as u64, m.attn_width() as u64, m.ffn as u64, m.layers as u64, m.vocab as u64);
        let (experts, k) = m.experts.map_or((1, 1), |e| (e.count as u64, e.top_k as u64));
        let (t, p, e) = (self.tp as u64, self.pp as u64, self.ep as u64);
        // K/V width of a TP rank: its share of the K/V heads, at least one.
        let kvr = (m.kv_heads_per_rank(self.tp) * m.head_dim) as u64;
        let per_layer = d * (a / t + 2 * kvr) + a * d / t + 2 * d + d * experts + (experts / e) * 2 * d * f;
        let weights = (l / p) * per_layer + 2 * v * d + d;
        let nseq = shape.nseq.div_ceil(self.dp) as u64;
        let kv = nseq * shape.context() as u64 * 2 * (l / p) * kvr;
        let rows = nseq * shape.seq_len as u64;
        let local = rows.div_ceil(t);
        let routed = local * k;
        let received = match self.capacity(m, local as usize) {
            Some(cap) => (experts * cap as u64).min(e * routed),
            None => (2 * routed).min(e * routed),
        };
        let attention = rows * (d + 2 * (a / t + 2 * kvr) + a / t + d);
        let moe = 3 * local * d + routed * (2 * d + 2) + received * (2 * d + f) + local * experts;
        let act = attention + moe + nseq * v;
        (weights + kv + act) * elem as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ep: usize, tp: usize, pp: usize, dp: usize) -> MoeSpec {
        MoeSpec { ep, tp, pp, dp, ..MoeSpec::single_rank() }
    }

    #[test]
    fn ranks_are_stage_major_then_replica_then_tp_and_the_last_stage_leads() {
        let l = spec(2, 2, 2, 2).layout_of(8);
        assert_eq!(l.roles[..4], ["stage0-dp0-tp0-ep0", "stage0-dp0-tp1-ep1", "stage0-dp1-tp0-ep0", "stage0-dp1-tp1-ep1"]);
        assert_eq!(l.leader, 4);
        assert_eq!(l.family("tp").unwrap().groups, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(l.family("pp").unwrap().groups, vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        assert_eq!(l.family("ep").unwrap().groups, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(l.family("heads").unwrap().groups, vec![vec![4, 6]]);
    }

    #[test]
    fn expert_groups_wider_than_tp_span_replicas() {
        let s = spec(4, 1, 1, 4);
        assert_eq!(s.layout_of(4).family("ep").unwrap().groups, vec![vec![0, 1, 2, 3]]);
        assert_eq!(spec(2, 1, 1, 4).layout_of(4).family("ep").unwrap().groups, vec![vec![0, 1], vec![2, 3]]);
        let m = ModelConfig::tiny_moe();
        assert_eq!((s.experts_of(&m, 0), s.experts_of(&m, 3)), (0..2, 6..8));
    }

    #[test]
    fn the_degrees_must_fit_the_model_and_each_other() {
        let m = ModelConfig::tiny_moe();
        let rule = |s: MoeSpec| s.check_rules(&m).err().map(|v| v.rule);
        assert_eq!(rule(spec(1, 1, 1, 1)), None);
        assert_eq!(rule(spec(3, 1, 1, 3)), Some("experts-divisible-by-ep"));
        assert_eq!(rule(spec(2, 1, 1, 1)), Some("ep-divides-stage-ranks"));
        assert_eq!(rule(spec(1, 3, 1, 1)), Some("heads-divisible-by-tp"));
        assert_eq!(rule(spec(1, 1, 4, 1)), Some("layers-divisible-by-pp"));
        assert_eq!(rule(MoeSpec { capacity_factor: Some(0.0), ..spec(1, 1, 1, 1) }), Some("capacity-factor-positive"));
    }

    #[test]
    fn capacity_is_the_factor_times_a_balanced_share_rounded_up() {
        let m = ModelConfig::tiny_moe();
        let s = MoeSpec { capacity_factor: Some(1.25), ..spec(1, 1, 1, 1) };
        // 10 rows × top 2 over 8 experts = 2.5 each; × 1.25 = 3.125 → 4.
        assert_eq!(s.capacity(&m, 10), Some(4));
        assert_eq!(spec(1, 1, 1, 1).capacity(&m, 10), None);
    }

    #[test]
    fn replicas_split_the_sequences_and_expert_groups_the_experts() {
        let m = ModelConfig::moe_16l();
        let big = BatchShape { nseq: 128, seq_len: 2048, out_tokens: 128 };
        assert!(spec(1, 1, 1, 2).memory_of(&m, big, 2) < spec(1, 1, 1, 1).memory_of(&m, big, 2));
        // One short sequence: the weights dominate, and EP = 2 holds half the experts.
        let small = BatchShape { nseq: 1, seq_len: 128, out_tokens: 1 };
        let (one, two) = (spec(1, 1, 1, 2).memory_of(&m, small, 2), spec(2, 1, 1, 2).memory_of(&m, small, 2));
        let half_the_experts = 16 * 8 * 2 * 512 * 1024 * 2;
        assert!(one - two > half_the_experts * 9 / 10 && one - two <= half_the_experts, "{one} {two}");
    }
}
