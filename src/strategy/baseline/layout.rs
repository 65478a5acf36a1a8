//! The baseline's layout: static Megatron-style tensor parallel TP=t inside
//! each pipeline stage, pipeline parallel PP=p across layers. World rank
//! `stage × t + tp_rank`; ranks beyond `t × p` are idle. Pure arithmetic.

use crate::model::ModelConfig;
use crate::rules::{ensure, Violation};
use crate::strategy::{BatchShape, GroupFamily, Layout};
use serde::{Deserialize, Serialize};

/// `kind = "baseline"`: static TP × PP.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineSpec {
    pub name: Option<String>,
    pub tp: usize,
    pub pp: usize,
    /// Prefill micro-batches (fill/drain schedule); 0 = one per stage.
    #[serde(default)]
    pub micro_batches: usize,
}

/// Where a deployed rank sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub stage: usize,
    pub tp_rank: usize,
}

impl BaselineSpec {
    /// Ranks the deployment uses.
    pub fn ranks(&self) -> usize {
        self.tp * self.pp
    }

    /// The place of world rank `rank`, or `None` for an idle rank.
    pub fn place(&self, rank: usize) -> Option<Place> {
        (rank < self.ranks()).then(|| Place { stage: rank / self.tp, tp_rank: rank % self.tp })
    }

    /// Layers of each stage.
    pub fn layers_per_stage(&self, model: &ModelConfig) -> usize {
        model.layers / self.pp
    }

    pub(super) fn default_name(&self) -> String {
        format!("baseline-tp{}-pp{}", self.tp, self.pp)
    }

    pub(super) fn check_rules(&self, m: &ModelConfig) -> Result<(), Violation> {
        let name = self.name.clone().unwrap_or_else(|| self.default_name());
        ensure(self.tp > 0 && self.pp > 0, "parallel-degrees-positive", || format!("{name}: tp and pp must be >= 1"))?;
        check_tp(m, self.tp, &name)?;
        ensure(m.layers % self.pp == 0, "layers-divisible-by-pp", || format!("{name}: {} layers are not divisible by pp={}", m.layers, self.pp))
    }

    pub(super) fn layout_of(&self, world: usize) -> Layout {
        let roles = (0..world)
            .map(|r| match self.place(r) {
                None => Layout::IDLE.to_string(),
                Some(p) if self.pp == 1 => format!("tp{}", p.tp_rank),
                Some(p) => format!("stage{}-tp{}", p.stage, p.tp_rank),
            })
            .collect();
        let tp = GroupFamily { name: "tp", groups: (0..self.pp).map(|s| (s * self.tp..(s + 1) * self.tp).collect()).collect() };
        let pp = GroupFamily { name: "pp", groups: (0..self.tp).map(|t| (0..self.pp).map(|s| s * self.tp + t).collect()).collect() };
        Layout { roles, groups: vec![tp, pp], leader: (self.pp - 1) * self.tp }
    }

    /// The busiest rank's bytes: a stage's weight shards (and the embedding
    /// and head), its KV cache, and the activations of a stage's layer.
    /// K/V heads are split like the query heads, or replicated when the
    /// stage has more ranks than K/V heads.
    pub(super) fn memory_of(&self, m: &ModelConfig, shape: BatchShape, elem: usize) -> u64 {
        let (d, a, f, l, v) = (m.d_model as u64, m.attn_width() as u64, m.ffn as u64, m.layers as u64, m.vocab as u64);
        let (n, tokens, ctx) = (shape.nseq as u64, (shape.nseq * shape.seq_len) as u64, shape.context() as u64);
        let (t, p) = (self.tp as u64, self.pp as u64);
        // This rank's K/V width: its K/V heads (at least one) × head_dim.
        let kvr = (m.kv_heads_per_rank(self.tp) * m.head_dim) as u64;
        let ffn_params = m.layer_params() - d * m.qkv_width() as u64 - a * d - 2 * d;
        let weights = (l / p) * (d * (a / t + 2 * kvr) + a * d / t + ffn_params / t) + 2 * v * d;
        let kv = n * ctx * 2 * (l / p) * kvr;
        let act = tokens * (4 * d + a / t + 2 * kvr + 2 * f / t) + n * v;
        (weights + kv + act) * elem as u64
    }
}

/// Heads and FFN columns must split evenly `t` ways, and K/V heads either
/// split evenly (`kv_heads % t == 0`) or each be replicated on a whole
/// number of ranks (`t % kv_heads == 0`).
pub fn check_tp(m: &ModelConfig, t: usize, name: &str) -> Result<(), Violation> {
    ensure(m.heads % t == 0, "heads-divisible-by-tp", || format!("{name}: {} heads are not divisible by tp={t}", m.heads))?;
    ensure(m.kv_heads % t == 0 || t % m.kv_heads == 0, "kv-heads-split-by-tp", || format!("{name}: {} K/V heads neither divide into tp={t} parts nor divide tp={t}", m.kv_heads))?;
    ensure(m.ffn % t == 0, "ffn-divisible-by-tp", || format!("{name}: ffn {} is not divisible by tp={t}", m.ffn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tp: usize, pp: usize) -> BaselineSpec {
        BaselineSpec { name: None, tp, pp, micro_batches: 0 }
    }

    #[test]
    fn ranks_are_stage_major_and_the_last_stage_leads() {
        let l = spec(2, 2).layout_of(5);
        assert_eq!(l.roles, vec!["stage0-tp0", "stage0-tp1", "stage1-tp0", "stage1-tp1", "idle"]);
        assert_eq!(l.leader, 2);
        assert_eq!(l.family("tp").unwrap().groups, vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(l.family("pp").unwrap().groups, vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(l.ranks_used(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn kv_heads_split_across_tp_or_replicate_when_ranks_outnumber_them() {
        let m = ModelConfig { heads: 8, kv_heads: 2, head_dim: 8, ..ModelConfig::tiny() };
        for t in [1, 2, 4, 8] {
            assert!(check_tp(&m, t, "x").is_ok(), "tp={t}");
        }
        let odd = ModelConfig { heads: 12, kv_heads: 4, head_dim: 8, ffn: 240, ..ModelConfig::tiny() };
        assert_eq!(check_tp(&odd, 6, "x").unwrap_err().rule, "kv-heads-split-by-tp");
        assert!(check_tp(&odd, 2, "x").is_ok() && check_tp(&odd, 12, "x").is_ok());
    }

    #[test]
    fn grouped_kv_heads_shrink_the_kv_cache_in_the_memory_model() {
        let (mha, gqa) = (ModelConfig::llama_3_8b(), ModelConfig::llama_3_8b());
        let mha = ModelConfig { kv_heads: 32, ..mha };
        let shape = BatchShape { nseq: 1, seq_len: 8000, out_tokens: 1 };
        // TP=2: 16 K/V heads against 4 per rank, over 32 layers, K and V, 8001 tokens.
        let kv_saved = 8001 * 2 * 32 * (16 - 4) * 128;
        let weights_saved = 32 * 4096 * 2 * (16 - 4) * 128;
        let acts_saved = 8000 * 2 * (16 - 4) * 128;
        assert_eq!(spec(2, 1).memory_of(&mha, shape, 1) - spec(2, 1).memory_of(&gqa, shape, 1), kv_saved + weights_saved + acts_saved);
    }

    #[test]
    fn one_stage_names_ranks_by_tp_rank() {
        assert_eq!(spec(2, 1).layout_of(2).roles, vec!["tp0", "tp1"]);
    }
}
