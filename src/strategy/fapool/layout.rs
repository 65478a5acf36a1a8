//! FA Pool's layout: ranks `0..B` are the base group (TP=B over embedding,
//! FFNs and the LM head), ranks `B..B+launched` the attention pool. Two
//! bridge groups hold every base and pool rank (bridge rank `b` is base rank
//! b, `B + i` is pool rank i): `down` carries hand-offs from the base to the
//! pool and `up` the results back, each on its own communicator (and, on a
//! GPU, its own stream), so neither direction queues behind the other. The
//! activation policy chooses each batch's pool size from its sequence
//! length; the block partition says which positions each active pool rank
//! owns. Pure arithmetic.

use crate::model::ModelConfig;
use crate::rules::{ensure, Violation};
use crate::strategy::baseline::layout::check_tp;
use crate::strategy::{BatchShape, GroupFamily, Layout};
use serde::{Deserialize, Serialize};

/// How a pool block partitions the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Partition {
    /// Pool rank i gets the i-th contiguous block (as in the paper).
    #[default]
    Contiguous,
    /// Pool rank i gets chunks i and 2P-1-i of 2P chunks, balancing causal work.
    Zigzag,
}

impl Partition {
    pub fn name(self) -> &'static str {
        match self {
            Partition::Contiguous => "contiguous",
            Partition::Zigzag => "zigzag",
        }
    }
}

/// Which parts of attention run on the pool; the rest runs on the base,
/// sequence-parallel (each base rank on its own rows, with the full weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum PoolOps {
    /// Only attention: the base projects q, k, v and the output.
    Attention,
    /// QKV projection and attention: the base projects the output.
    QkvAttention,
    /// QKV, attention and the output projection (the paper's placement).
    #[default]
    QkvAttentionOut,
}

impl PoolOps {
    pub const ALL: [PoolOps; 3] = [PoolOps::Attention, PoolOps::QkvAttention, PoolOps::QkvAttentionOut];

    pub fn name(self) -> &'static str {
        match self {
            PoolOps::Attention => "attention",
            PoolOps::QkvAttention => "qkv+attention",
            PoolOps::QkvAttentionOut => "qkv+attention+out",
        }
    }
    /// The pool projects q, k, v.
    pub fn pool_qkv(self) -> bool {
        self != PoolOps::Attention
    }
    /// The pool projects the attention output.
    pub fn pool_out(self) -> bool {
        self == PoolOps::QkvAttentionOut
    }
}

impl TryFrom<String> for PoolOps {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::ALL.into_iter().find(|o| o.name() == s).ok_or_else(|| format!("rule `pool-ops-known` broken: unknown pool_ops `{s}` (expected attention, qkv+attention or qkv+attention+out)"))
    }
}

impl From<PoolOps> for String {
    fn from(o: PoolOps) -> String {
        o.name().to_string()
    }
}

/// How prefill results get from the pool to the base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// Each pool rank sends each base rank its rows.
    #[default]
    Direct,
    /// A binary tree gathers the blocks to the pool root, which sends them
    /// on (as in the paper).
    Tree,
}

/// `kind = "fapool"`: base group + elastic attention pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FapoolSpec {
    pub name: Option<String>,
    /// Base group size (TP degree of the base).
    pub base: usize,
    /// Largest pool the job may activate (more than launched is capped).
    pub pool_max: usize,
    #[serde(default = "default_threshold")]
    pub threshold: usize,
    #[serde(default = "default_tokens_per_pool_gpu")]
    pub tokens_per_pool_gpu: usize,
    #[serde(default)]
    pub partition: Partition,
    /// Micro-batches per batch (sequences split M ways).
    #[serde(default = "one")]
    pub micro_batches: usize,
    /// Causal chunks of each prompt, pipelined between base and pool (chunk
    /// j attends to the K/V of chunks <= j).
    #[serde(default = "one")]
    pub chunks: usize,
    /// Pipeline units through the layers: the base's FFN of one unit runs
    /// while the pool attends the next, and a unit's next-layer hand-off
    /// leaves as soon as its FFN ends (in decode, two groups of sequences
    /// alternate); `false` runs each unit's hand-off, attention and FFN one
    /// after another.
    #[serde(default = "yes")]
    pub overlap: bool,
    /// Which parts of attention the pool runs.
    #[serde(default)]
    pub pool_ops: PoolOps,
    /// How prefill results return to the base.
    #[serde(default)]
    pub aggregation: Aggregation,
}

fn default_threshold() -> usize {
    4096
}
fn default_tokens_per_pool_gpu() -> usize {
    1024
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

/// Where a rank sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Base rank `r` (TP rank `r` of the base group).
    Base(usize),
    /// Pool rank `i`.
    Pool(usize),
    Idle,
}

impl FapoolSpec {
    /// The activation policy of a launch of `world` ranks.
    pub fn policy(&self, world: usize) -> PoolPolicy {
        PoolPolicy { threshold: self.threshold, tokens_per_pool_gpu: self.tokens_per_pool_gpu, pool_max: self.pool_max, launched: world.saturating_sub(self.base).min(self.pool_max) }
    }

    /// The place of world rank `rank` in a launch of `world` ranks.
    pub fn place(&self, rank: usize, world: usize) -> Place {
        if rank < self.base {
            Place::Base(rank)
        } else if rank < self.base + self.policy(world).launched {
            Place::Pool(rank - self.base)
        } else {
            Place::Idle
        }
    }

    pub(super) fn default_name(&self) -> String {
        format!("fapool-b{}-p{}-{}", self.base, self.pool_max, self.partition.name())
    }

    pub(super) fn check_rules(&self, m: &ModelConfig) -> Result<(), Violation> {
        let name = self.name.clone().unwrap_or_else(|| self.default_name());
        ensure(self.base > 0 && self.pool_max > 0, "parallel-degrees-positive", || format!("{name}: base and pool_max must be >= 1"))?;
        check_tp(m, self.base, &name)?;
        ensure(self.tokens_per_pool_gpu > 0 && self.micro_batches > 0, "pool-policy-positive", || format!("{name}: tokens_per_pool_gpu and micro_batches must be >= 1"))?;
        ensure(self.chunks > 0, "chunks-positive", || format!("{name}: chunks must be >= 1"))
    }

    pub(super) fn check_prompt_rules(&self, shortest_active: Option<usize>) -> Result<(), Violation> {
        let name = self.name.clone().unwrap_or_else(|| self.default_name());
        match shortest_active {
            Some(s) => ensure(self.chunks <= s, "chunks-within-prompt", || format!("{name}: chunks = {} is more than the {s} tokens of the shortest prompt that activates the pool", self.chunks)),
            None => Ok(()),
        }
    }

    pub(super) fn layout_of(&self, world: usize) -> Layout {
        let roles = (0..world)
            .map(|r| match self.place(r, world) {
                Place::Base(b) => format!("base{b}"),
                Place::Pool(i) => format!("pool{i}"),
                Place::Idle => Layout::IDLE.to_string(),
            })
            .collect();
        Layout { roles, groups: self.group_families(world), leader: 0 }
    }

    /// The communicators of a launch of `world` ranks (the layout's groups).
    pub(super) fn group_families(&self, world: usize) -> Vec<GroupFamily> {
        let launched = self.policy(world).launched;
        let pool: Vec<usize> = (self.base..self.base + launched).collect();
        let bridge: Vec<usize> = (0..self.base + launched).collect();
        vec![
            GroupFamily { name: "base", groups: vec![(0..self.base).collect()] },
            GroupFamily { name: "pool", groups: vec![pool] },
            GroupFamily { name: "down", groups: vec![bridge.clone()] },
            GroupFamily { name: "up", groups: vec![bridge] },
        ]
    }

    /// The busiest rank's bytes: the base's weight shards and activations,
    /// or a pool rank's attention weights, its KV cache slice, the
    /// replicated K/V of one layer and its block's activations.
    /// The busier side's bytes (in elements of `elem` bytes) for one batch:
    /// a base rank or a pool rank, whichever needs more. A base rank always
    /// holds its TP shard of every layer (batches below the threshold run
    /// on the base alone), the embedding and the head, plus the full
    /// projections `pool_ops` leaves on the base; with the pool active it
    /// holds its own rows (sequence-parallel) and the all-gathered rows of
    /// its FFN. A pool rank holds the projections `pool_ops` gives it, its
    /// block's K/V of every layer (and of the decode tokens), and the
    /// replicated K/V of at most two layers.
    pub(super) fn memory_of(&self, m: &ModelConfig, shape: BatchShape, world: usize, elem: usize) -> u64 {
        let (d, a, kv, f, l, v) = (m.d_model as u64, m.attn_width() as u64, m.kv_width() as u64, m.ffn as u64, m.layers as u64, m.vocab as u64);
        let (n, sl, ctx) = (shape.nseq as u64, shape.seq_len as u64, shape.context() as u64);
        let (qkv_params, out_params) = (d * (a + 2 * kv), a * d);
        let ffn_params = m.layer_params() - qkv_params - out_params - 2 * d;
        let tokens = n * sl;
        let bsz = self.base as u64;
        // A base rank's K/V width as a TP rank (its K/V heads, at least one).
        let kvb = (m.kv_heads_per_rank(self.base) * m.head_dim) as u64;
        let pool = self.policy(world).pool_size(shape.seq_len).1 as u64;
        let (pool_qkv, pool_out) = (self.pool_ops.pool_qkv(), self.pool_ops.pool_out());
        let base_weights = l * (d * (a / bsz + 2 * kvb) + out_params / bsz + ffn_params / bsz) + 2 * v * d;
        let bytes = if pool == 0 {
            let kv_cache = n * ctx * 2 * l * kvb;
            let act = tokens * (4 * d + 2 * f / bsz) + n * v;
            base_weights + kv_cache + act + tokens * (a / bsz + 2 * kvb)
        } else {
            let on_base = |here: bool, params: u64| if here { 0 } else { l * params };
            let weights = base_weights + on_base(pool_qkv, qkv_params) + on_base(pool_out, out_params);
            let (rows, handoff, result) = (tokens.div_ceil(bsz), if pool_qkv { d } else { a + 2 * kv }, if pool_out { d } else { a });
            // Own rows: residual, hand-off and result; gathered FFN input,
            // hidden columns and the reduce-scatter's input.
            let act = rows * (d + handoff + result) + tokens * (2 * d + 2 * f / bsz) + n * v;
            let base = weights + act;
            let block = sl.div_ceil(pool);
            let pool_weights = if pool_qkv { l * qkv_params } else { 0 } + if pool_out { l * out_params } else { 0 };
            let kv_cache = n * (block + shape.out_tokens as u64) * 2 * l * kv;
            // The replicated K/V prefixes in flight (a layer's, and with
            // chunks the next layer's while the pipeline spans two), and the
            // block's input, q/k/v, attention output and result.
            let pool_act = n * sl * 4 * kv + n * block * (handoff + a + 2 * kv + a + result);
            base.max(pool_weights + kv_cache + pool_act)
        };
        bytes * elem as u64
    }
}

/// FA Pool's activation policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPolicy {
    pub threshold: usize,
    pub tokens_per_pool_gpu: usize,
    pub pool_max: usize,
    /// Pool ranks actually launched.
    pub launched: usize,
}

impl PoolPolicy {
    /// `(requested, effective)` pool size for a batch of sequence length `s`:
    /// `0 if s <= threshold else min(pool_max, ceil(s / tokens_per_pool_gpu))`,
    /// then capped by the launched pool ranks.
    pub fn pool_size(&self, s: usize) -> (usize, usize) {
        if s <= self.threshold {
            return (0, 0);
        }
        let requested = self.pool_max.min(s.div_ceil(self.tokens_per_pool_gpu));
        (requested, requested.min(self.launched))
    }
}

/// A pool rank's segments of a sequence, `(start, len)` in sequence order:
/// at most two (contiguous: one, zigzag: two), held inline because every
/// rank walks every other rank's segments each layer (the K/V prefix).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segments {
    runs: [(usize, usize); 2],
    len: usize,
}

impl Segments {
    /// The segments of `runs` that hold positions.
    fn non_empty(runs: &[(usize, usize)]) -> Self {
        let mut out = Self::default();
        for &r in runs.iter().filter(|r| r.1 > 0) {
            out.runs[out.len] = r;
            out.len += 1;
        }
        out
    }

    /// The segments moved by `offset` positions.
    pub fn shifted(mut self, offset: usize) -> Self {
        for r in &mut self.runs[..self.len] {
            r.0 += offset;
        }
        self
    }

    /// Positions of all segments together.
    pub fn total(&self) -> usize {
        self.iter().map(|r| r.1).sum()
    }
}

impl std::ops::Deref for Segments {
    type Target = [(usize, usize)];
    fn deref(&self) -> &[(usize, usize)] {
        &self.runs[..self.len]
    }
}

/// Positions `[start, start+len)` of a sequence of `s` tokens that pool rank
/// `rank` of `p` owns, in sequence order. Blocks may be empty when `s` is small.
pub fn pool_segments(partition: Partition, s: usize, p: usize, rank: usize) -> Segments {
    let clip = |a: usize, b: usize| (a.min(s), b.min(s).saturating_sub(a.min(s)));
    match partition {
        Partition::Contiguous => {
            let b = s.div_ceil(p);
            Segments::non_empty(&[clip(rank * b, (rank + 1) * b)])
        }
        Partition::Zigzag => {
            let c = s.div_ceil(2 * p);
            let (lo, hi) = (rank, 2 * p - 1 - rank);
            Segments::non_empty(&[clip(lo * c, (lo + 1) * c), clip(hi * c, (hi + 1) * c)])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_follows_the_formula_not_the_papers_table() {
        let p = PoolPolicy { threshold: 4096, tokens_per_pool_gpu: 1024, pool_max: 32, launched: 32 };
        assert_eq!(p.pool_size(4096), (0, 0));
        // The paper's table lists 4 GPUs for 4097..=5120 tokens; the formula gives 5.
        assert_eq!(p.pool_size(4097), (5, 5));
        assert_eq!(p.pool_size(5120), (5, 5));
        assert_eq!(p.pool_size(65536), (32, 32));
        let capped = PoolPolicy { launched: 2, ..p };
        assert_eq!(capped.pool_size(8192), (8, 2));
    }

    #[test]
    fn partitions_cover_every_position_once() {
        for part in [Partition::Contiguous, Partition::Zigzag] {
            for (s, p) in [(16, 2), (17, 4), (5, 4), (64, 3), (1, 2)] {
                let mut seen = vec![0; s];
                for r in 0..p {
                    for &(st, len) in pool_segments(part, s, p, r).iter() {
                        (st..st + len).for_each(|i| seen[i] += 1);
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{part:?} s={s} p={p}: {seen:?}");
            }
        }
    }

    #[test]
    fn zigzag_pairs_an_early_and_a_late_chunk() {
        assert_eq!(*pool_segments(Partition::Zigzag, 16, 2, 0), [(0, 4), (12, 4)]);
        assert_eq!(*pool_segments(Partition::Zigzag, 16, 2, 1), [(4, 4), (8, 4)]);
        assert_eq!(*pool_segments(Partition::Contiguous, 16, 2, 1), [(8, 8)]);
        // A rank past the end of a short sequence owns nothing.
        assert!(pool_segments(Partition::Contiguous, 3, 4, 3).is_empty());
    }

    #[test]
    fn the_bridges_join_every_base_and_every_launched_pool_rank() {
        let spec = FapoolSpec {
            name: None,
            base: 2,
            pool_max: 4,
            threshold: 8,
            tokens_per_pool_gpu: 4,
            partition: Partition::Zigzag,
            micro_batches: 1,
            chunks: 1,
            overlap: true,
            pool_ops: PoolOps::default(),
            aggregation: Aggregation::default(),
        };
        let l = spec.layout_of(5);
        assert_eq!(l.roles, vec!["base0", "base1", "pool0", "pool1", "pool2"]);
        assert_eq!(l.family("down").unwrap().groups, vec![vec![0, 1, 2, 3, 4]]);
        assert_eq!(l.family("up").unwrap().groups, vec![vec![0, 1, 2, 3, 4]]);
        assert_eq!(l.family("pool").unwrap().groups, vec![vec![2, 3, 4]]);
        assert_eq!(spec.policy(5).launched, 3);
    }

    #[test]
    fn memory_follows_where_pool_ops_places_the_projections() {
        let spec = |pool_ops| FapoolSpec {
            name: None,
            base: 1,
            pool_max: 1,
            threshold: 4096,
            tokens_per_pool_gpu: 32768,
            partition: Partition::Zigzag,
            micro_batches: 1,
            chunks: 1,
            overlap: true,
            pool_ops,
            aggregation: Aggregation::default(),
        };
        let m = ModelConfig::dense_4l();
        let (d, a, l) = (m.d_model as u64, m.attn_width() as u64, m.layers as u64);
        let long = BatchShape { nseq: 1, seq_len: 32768, out_tokens: 1 };
        let short = BatchShape { seq_len: 2048, ..long };
        // Below the threshold the pool is idle and pool_ops changes nothing.
        let paper = spec(PoolOps::QkvAttentionOut);
        assert_eq!(spec(PoolOps::Attention).memory_of(&m, short, 2, 2), paper.memory_of(&m, short, 2, 2));
        // With the pool active at one base rank and 32K tokens, the base is
        // the larger side and holds the projections the pool does not run.
        let attention_only = spec(PoolOps::Attention).memory_of(&m, long, 2, 1);
        let qkv = spec(PoolOps::QkvAttention).memory_of(&m, long, 2, 1);
        assert_eq!(qkv - paper.memory_of(&m, long, 2, 1), l * d * a - 32768 * (d - a));
        assert!(attention_only > qkv + l * 3 * d * a - 32768 * 3 * a, "{attention_only} {qkv}");
    }
}
