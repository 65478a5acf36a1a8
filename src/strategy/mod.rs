//! Strategies: who computes what, as the paper's dataflow (SPEC section 2).
//!
//! A strategy is a few functions per phase (prefill, decode) calling backend
//! and comm operations. It holds no timers and writes no files: the runner
//! times phases on the leader rank and the comm layer accounts for messages.
//!
//! The shared pieces live here: tensor-parallel layer math used by the
//! baseline and by FA Pool's base group, the KV cache, the pool activation
//! policy and the block partitions.

pub mod baseline;
pub mod fapool;
pub mod naive;

use crate::backend::{Backend, DecodeShape, PrefillShape, RowRun, StepVars};
use crate::comm::{Category, Comm, CommError, Group};
use crate::model::{FfnKind, ModelConfig, Tensor, Weights};
use crate::spec::{FapoolSpec, Partition};

/// Errors while executing a strategy.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, StrategyError>;

/// The shape of one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub nseq: usize,
    pub seq_len: usize,
    pub out_tokens: usize,
}

/// How a strategy will run a batch, decided in `begin_batch`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchSetup {
    pub micro_batches: usize,
    pub pool_requested: usize,
    pub pool_effective: usize,
    /// This rank works on the batch (idle pool ranks and unused ranks do not).
    pub active: bool,
    /// The pool was requested but the batch runs base-only.
    pub pool_fallback: bool,
}

/// What the leader rank gets from a step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOut {
    pub tokens: Vec<u32>,
    /// `[nseq, vocab]` logits of the step, when asked for.
    pub logits: Option<Vec<f32>>,
}

/// A deployment strategy as seen by one rank.
pub trait Strategy<B: Backend> {
    fn name(&self) -> &str;
    /// This rank's role ("tp", "stage1-tp0", "base", "pool", "idle", ...).
    fn role(&self) -> String;
    /// The rank that ends each step holding the generated tokens.
    fn is_leader(&self) -> bool;
    /// Prepares a batch of `shape`, at most `micro_batch_cap` sequences per
    /// micro-batch; `pool_usable` is false when a pool rank reported its
    /// device unusable (FA Pool then runs the batch on the base alone).
    fn begin_batch(&mut self, shape: BatchShape, micro_batch_cap: usize, pool_usable: bool) -> Result<BatchSetup>;
    /// Runs the prompt (`[nseq, seq_len]` tokens, known on every rank).
    fn prefill(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>>;
    /// Host half of the decode step that generates output index `step`
    /// (1-based after prefill's 0): shares the previous tokens (only the
    /// leader passes them) and returns this rank's step scalars for
    /// [`Backend::set_step`], or `None` when the rank has no part in the step.
    fn decode_begin(&mut self, step: usize, leader_tokens: &[u32]) -> Result<Option<StepVars>>;
    /// Device half: the step's kernels and messages, reading the scalars set
    /// with [`Backend::set_step`]. It neither waits for the device nor
    /// changes host state, so it can be recorded once and replayed at every
    /// later step of the batch. Returns the logits `[nseq, vocab]` on the leader.
    fn decode_device(&mut self) -> Result<Option<B::Buf>>;
    /// Samples the leader's logits (from this step's [`Strategy::decode_device`]
    /// or a replay of it) and advances host state.
    fn decode_end(&mut self, logits: Option<&B::Buf>, keep_logits: bool) -> Result<Option<StepOut>>;
    fn end_batch(&mut self) -> Result<()>;
}

/// The role world rank `rank` of `world` plays in a strategy (as the
/// strategy itself reports it once built).
pub fn role_of(spec: &crate::spec::StrategySpec, rank: usize, world: usize) -> String {
    match spec {
        crate::spec::StrategySpec::Baseline(b) if rank >= b.tp * b.pp => "idle".into(),
        crate::spec::StrategySpec::Baseline(b) if b.pp == 1 => format!("tp{}", rank % b.tp),
        crate::spec::StrategySpec::Baseline(b) => format!("stage{}-tp{}", rank / b.tp, rank % b.tp),
        crate::spec::StrategySpec::Fapool(f) => {
            let launched = PoolPolicy::from_spec(f, world).launched;
            if rank < f.base {
                format!("base{rank}")
            } else if rank < f.base + launched {
                format!("pool{}", rank - f.base)
            } else {
                "idle".into()
            }
        }
    }
}

/// Which tokens a layer processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The prompt: this many tokens per sequence from position 0.
    Prefill(usize),
    /// One token per sequence at the step's position (the backend's step
    /// scalars), attending to the step's cached length.
    Decode,
}

impl Phase {
    /// Tokens per sequence.
    pub fn tokens(self) -> usize {
        match self {
            Phase::Prefill(s) => s,
            Phase::Decode => 1,
        }
    }
}

/// Splits `n` items into `m` nearly equal consecutive parts (no empty part
/// when `m <= n`).
pub fn split_even(n: usize, m: usize) -> Vec<std::ops::Range<usize>> {
    let m = m.clamp(1, n.max(1));
    (0..m).map(|j| j * n / m..(j + 1) * n / m).collect()
}

/// One rank's shard of a decoder layer (tensor parallel over `heads` and FFN columns).
pub struct LayerShard<B: Backend> {
    pub attn_norm: B::Buf,
    pub ffn_norm: B::Buf,
    pub qkv: B::Buf,
    pub out: B::Buf,
    pub up: B::Buf,
    pub gate: Option<B::Buf>,
    pub down: B::Buf,
    /// Heads on this rank.
    pub heads: usize,
    /// FFN columns on this rank.
    pub ffn: usize,
}

impl<B: Backend> LayerShard<B> {
    /// Shard `rank` of `tp` of layer `l`.
    pub fn load(be: &B, w: &Weights, l: usize, rank: usize, tp: usize) -> Result<Self> {
        let c = w.cfg;
        let (d, hl, fl) = (c.d_model, c.heads / tp, c.ffn / tp);
        let heads = rank * hl..(rank + 1) * hl;
        let (dh, cols) = (c.head_dim, rank * fl..(rank + 1) * fl);
        Ok(Self {
            attn_norm: be.upload(&w.full(Tensor::AttnNorm(l)))?,
            ffn_norm: be.upload(&w.full(Tensor::FfnNorm(l)))?,
            qkv: be.upload(&w.shard(Tensor::Qkv(l), 0..d, &w.qkv_columns(heads.clone())))?,
            out: be.upload(&w.shard(Tensor::Out(l), heads.start * dh..heads.end * dh, &[0..d]))?,
            up: be.upload(&w.shard(Tensor::Up(l), 0..d, std::slice::from_ref(&cols)))?,
            gate: match c.ffn_kind {
                FfnKind::Gelu => None,
                FfnKind::GatedGelu => Some(be.upload(&w.shard(Tensor::Gate(l), 0..d, std::slice::from_ref(&cols)))?),
            },
            down: be.upload(&w.shard(Tensor::Down(l), cols, &[0..d]))?,
            heads: hl,
            ffn: fl,
        })
    }
}

/// Embedding table, final norm and LM head.
pub struct EdgeWeights<B: Backend> {
    pub embedding: B::Buf,
    pub final_norm: B::Buf,
    pub head: B::Buf,
}

impl<B: Backend> EdgeWeights<B> {
    pub fn load(be: &B, w: &Weights, embedding: bool, head: bool) -> Result<Self> {
        let none = || be.zeros(0);
        Ok(Self {
            embedding: if embedding { be.upload(&w.full(Tensor::Embedding))? } else { none()? },
            final_norm: if head { be.upload(&w.full(Tensor::FinalNorm))? } else { none()? },
            head: if head { be.upload(&w.full(Tensor::Head))? } else { none()? },
        })
    }
}

/// K and V caches of the layers a rank serves: `[nseq, cap, width]` each.
pub struct KvCache<B: Backend> {
    pub k: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    pub nseq: usize,
    pub cap: usize,
    pub width: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(be: &B, layers: usize, nseq: usize, cap: usize, width: usize) -> Result<Self> {
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(be.zeros(nseq * cap * width)?);
            v.push(be.zeros(nseq * cap * width)?);
        }
        Ok(Self { k, v, nseq, cap, width })
    }

    /// Row runs of `n` positions from `pos` for sequences `seqs` of the cache.
    pub fn runs(&self, seqs: std::ops::Range<usize>, pos: usize, n: usize) -> Vec<RowRun> {
        seqs.map(|s| RowRun::new(s * self.cap + pos, n)).collect()
    }

    /// Stores the step's `k`, `v` (`[nseq, width]`) at the step's `store_at` row.
    pub fn store_step(&mut self, be: &B, layer: usize, k: &B::Buf, v: &B::Buf) -> Result<()> {
        be.store_step(&mut self.k[layer], k, self.nseq, self.cap, self.width)?;
        be.store_step(&mut self.v[layer], v, self.nseq, self.cap, self.width)?;
        Ok(())
    }

    /// Stores `k`, `v` (`[len(seqs) * n, width]`) at positions `pos..pos+n`.
    pub fn store(&mut self, be: &B, layer: usize, seqs: std::ops::Range<usize>, pos: usize, n: usize, k: &B::Buf, v: &B::Buf) -> Result<()> {
        let runs = self.runs(seqs, pos, n);
        be.scatter_rows(&mut self.k[layer], self.width, &runs, k)?;
        be.scatter_rows(&mut self.v[layer], self.width, &runs, v)?;
        Ok(())
    }
}

/// The tensor-parallel layer math on one rank (Megatron: column-parallel
/// QKV and FFN-up, row-parallel output and FFN-down, one all-reduce each).
pub struct TpMath<'a, 'c, B: Backend> {
    pub be: &'a B,
    pub comm: &'a Comm<'c, B>,
    pub cfg: &'a ModelConfig,
}

impl<'a, 'c, B: Backend> TpMath<'a, 'c, B> {
    /// Attention of `seqs` in `phase` (the prompt, or one decode step).
    /// `l` indexes this rank's layers (and so its cache), not the model's.
    /// Returns this rank's partial output (before the all-reduce).
    pub fn attention(&self, layer: &LayerShard<B>, l: usize, h: &B::Buf, seqs: std::ops::Range<usize>, phase: Phase, cache: &mut KvCache<B>) -> Result<B::Buf> {
        let (d, dh) = (self.cfg.d_model, self.cfg.head_dim);
        let (nseq, width, s) = (seqs.len(), layer.heads * dh, phase.tokens());
        let rows = nseq * s;
        let qkv = self.be.matmul(h, &layer.qkv, rows, d, 3 * width)?;
        let (q, k, v) = self.be.split_qkv(&qkv, rows, width)?;
        let o = match phase {
            Phase::Prefill(s) => {
                cache.store(self.be, l, seqs.clone(), 0, s, &k, &v)?;
                let shape = PrefillShape { nseq, sq: s, skv: s, kv_seq_stride: s, heads: layer.heads, head_dim: dh, q_offset: 0 };
                self.be.attention_prefill(&q, &k, &v, shape)?.0
            }
            Phase::Decode => {
                if seqs.len() != cache.nseq {
                    return Err(StrategyError::Protocol("decode attends one new token of every sequence".into()));
                }
                cache.store_step(self.be, l, &k, &v)?;
                let shape = DecodeShape { nseq, cap: cache.cap, len: 0, heads: layer.heads, head_dim: dh };
                self.be.attention_decode_step(&q, &cache.k[l], &cache.v[l], shape)?.0
            }
        };
        Ok(self.be.matmul(&o, &layer.out, rows, width, d)?)
    }

    /// This rank's partial FFN output for `rows` normalized rows.
    pub fn ffn(&self, layer: &LayerShard<B>, h: &B::Buf, rows: usize) -> Result<B::Buf> {
        let d = self.cfg.d_model;
        let mut up = self.be.matmul(h, &layer.up, rows, d, layer.ffn)?;
        let act = match &layer.gate {
            None => {
                self.be.gelu(&mut up)?;
                up
            }
            Some(gate) => {
                let mut g = self.be.matmul(h, gate, rows, d, layer.ffn)?;
                self.be.gelu_mul(&mut g, &up)?;
                g
            }
        };
        Ok(self.be.matmul(&act, &layer.down, rows, layer.ffn, d)?)
    }

    /// `x += all_reduce(ffn(rmsnorm(x)))` over `group`.
    pub fn ffn_block(&self, layer: &LayerShard<B>, x: &mut B::Buf, rows: usize, group: &Group) -> Result<()> {
        let h = self.be.rmsnorm(x, &layer.ffn_norm, rows, self.cfg.d_model, self.cfg.norm_eps)?;
        let mut f = self.ffn(layer, &h, rows)?;
        self.comm.all_reduce(Category::TpAllreduce, group, &mut f)?;
        self.be.add_assign(x, &f)?;
        Ok(())
    }

    /// A whole decoder layer with tensor parallelism over `group`.
    #[allow(clippy::too_many_arguments)]
    pub fn layer(&self, layer: &LayerShard<B>, l: usize, x: &mut B::Buf, seqs: std::ops::Range<usize>, phase: Phase, cache: &mut KvCache<B>, group: &Group) -> Result<()> {
        let rows = seqs.len() * phase.tokens();
        let h = self.be.rmsnorm(x, &layer.attn_norm, rows, self.cfg.d_model, self.cfg.norm_eps)?;
        let mut a = self.attention(layer, l, &h, seqs, phase, cache)?;
        self.comm.all_reduce(Category::TpAllreduce, group, &mut a)?;
        self.be.add_assign(x, &a)?;
        self.ffn_block(layer, x, rows, group)
    }

    /// Logits of the last token of each of `nseq` sequences of `s` rows.
    pub fn head(&self, edge: &EdgeWeights<B>, x: &B::Buf, nseq: usize, s: usize) -> Result<B::Buf> {
        let d = self.cfg.d_model;
        let last: Vec<RowRun> = (0..nseq).map(|n| RowRun::new(n * s + s - 1, 1)).collect();
        let xl = if s == 1 { self.be.gather_rows(x, d, &[RowRun::new(0, nseq)])? } else { self.be.gather_rows(x, d, &last)? };
        let h = self.be.rmsnorm(&xl, &edge.final_norm, nseq, d, self.cfg.norm_eps)?;
        Ok(self.be.matmul(&h, &edge.head, nseq, d, self.cfg.vocab)?)
    }

    /// Greedy tokens (and optionally the logits on the host).
    pub fn sample(&self, logits: &B::Buf, nseq: usize, keep_logits: bool) -> Result<StepOut> {
        let tokens = self.be.argmax(logits, nseq, self.cfg.vocab)?;
        let logits = if keep_logits { Some(self.be.download(logits)?) } else { None };
        Ok(StepOut { tokens, logits })
    }
}

/// FA Pool's activation policy (SPEC section 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPolicy {
    pub threshold: usize,
    pub tokens_per_pool_gpu: usize,
    pub pool_max: usize,
    /// Pool ranks actually launched.
    pub launched: usize,
}

impl PoolPolicy {
    pub fn from_spec(f: &FapoolSpec, world: usize) -> Self {
        Self { threshold: f.threshold, tokens_per_pool_gpu: f.tokens_per_pool_gpu, pool_max: f.pool_max, launched: world.saturating_sub(f.base).min(f.pool_max) }
    }

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

/// Positions `[start, start+len)` of a sequence of `s` tokens that pool rank
/// `rank` of `p` owns, in sequence order. Blocks may be empty when `s` is small.
pub fn pool_segments(partition: Partition, s: usize, p: usize, rank: usize) -> Vec<(usize, usize)> {
    let clip = |a: usize, b: usize| (a.min(s), b.min(s).saturating_sub(a.min(s)));
    let segs = match partition {
        Partition::Contiguous => {
            let b = s.div_ceil(p);
            vec![clip(rank * b, (rank + 1) * b)]
        }
        Partition::Zigzag => {
            let c = s.div_ceil(2 * p);
            let (lo, hi) = (rank, 2 * p - 1 - rank);
            vec![clip(lo * c, (lo + 1) * c), clip(hi * c, (hi + 1) * c)]
        }
    };
    segs.into_iter().filter(|&(_, len)| len > 0).collect()
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
                    for (st, len) in pool_segments(part, s, p, r) {
                        (st..st + len).for_each(|i| seen[i] += 1);
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{part:?} s={s} p={p}: {seen:?}");
            }
        }
    }

    #[test]
    fn zigzag_pairs_an_early_and_a_late_chunk() {
        assert_eq!(pool_segments(Partition::Zigzag, 16, 2, 0), vec![(0, 4), (12, 4)]);
        assert_eq!(pool_segments(Partition::Zigzag, 16, 2, 1), vec![(4, 4), (8, 4)]);
        assert_eq!(pool_segments(Partition::Contiguous, 16, 2, 1), vec![(8, 8)]);
    }

    #[test]
    fn split_even_never_leaves_a_part_empty() {
        assert_eq!(split_even(5, 2), vec![0..2, 2..5]);
        assert_eq!(split_even(2, 4), vec![0..1, 1..2]);
    }
}
