//! What an FA Pool rank does per phase: the per-rank roles, the batch in
//! flight, and the entry points of the [`Strategy`] trait. The two sides of
//! an active pool are in [`super::base`] and [`super::pool`].
//!
//! - Pool inactive (`s <= threshold`): the base runs plain Megatron TP.
//! - Pool active: the batch is cut into units ([`super::units`]): prefill
//!   units are a micro-batch of sequences × one causal chunk of the prompt,
//!   decode units one or two groups of sequences. The base holds each unit's
//!   rows sequence-parallel (each base rank its own rows); every rank walks
//!   the same schedule of hand-offs and returns. Each base rank sends each
//!   pool rank its own rows of that rank's block directly (no funnel), the
//!   pool projects q/k/v (per `pool_ops`), replicates K/V across the active
//!   pool, attends causally, and returns each base rank its rows (or, with
//!   `aggregation = "tree"`, gathers the blocks to the pool root first, as
//!   in the paper). The base adds the residual and runs the FFN: with
//!   several base ranks, an all-gather of the rows before the
//!   column-parallel FFN and a reduce-scatter after it. In decode the partial
//!   outputs of the pool's cache slices merge by their log-sum-exp through a
//!   binary tree to the pool root, which returns them.

use super::layout::{FapoolSpec, Place, PoolPolicy};
use super::units::{prefill_units, Unit, UnitBlocks};
use crate::backend::{Backend, StepVars};
use crate::comm::{Category, Comm, Group};
use crate::model::{ModelConfig, Tensor, Weights};
use crate::strategy::common::groups::Groups;
use crate::strategy::common::kv::KvCache;
use crate::strategy::common::tp::{self, EdgeWeights, LayerShard, Span, TpMath};
use crate::strategy::common::{micro_batches, split_even, Phase};
use crate::strategy::{protocol, BatchSetup, BatchShape, BuildContext, GroupFamily, Result, StepOut, Strategy};
use std::collections::BTreeMap;
use std::ops::Range;

/// Full attention weights a base rank holds for the parts of attention the
/// pool does not run (`pool_ops`); `None` where the pool runs them.
pub(super) struct BaseAttention<B: Backend> {
    pub qkv: Option<B::Buf>,
    pub out: Option<B::Buf>,
}

/// A base rank: its TP shard of every layer, the attention weights the
/// base runs sequence-parallel, the embedding (and on the root the LM
/// head), and its groups.
pub(super) struct BaseRank<B: Backend> {
    pub index: usize,
    pub base: Group,
    pub down: Group,
    pub up: Group,
    pub layers: Vec<LayerShard<B>>,
    pub attention: Vec<BaseAttention<B>>,
    pub edge: EdgeWeights<B>,
}

/// A pool rank's attention weights of one layer (all heads), as `pool_ops` needs.
pub(super) struct PoolLayer<B: Backend> {
    pub qkv: Option<B::Buf>,
    pub out: Option<B::Buf>,
}

/// A pool rank: its attention weights, its groups, and the groups of the
/// first `p` pool ranks for each active size seen so far.
pub(super) struct PoolRank<B: Backend> {
    pub index: usize,
    pub pool: Group,
    pub down: Group,
    pub up: Group,
    pub active: BTreeMap<usize, Option<Group>>,
    pub layers: Vec<PoolLayer<B>>,
}

pub(super) enum Rank<B: Backend> {
    Base(BaseRank<B>),
    Pool(PoolRank<B>),
    Idle,
}

/// The batch in flight.
pub(super) struct BatchState<B: Backend> {
    pub shape: BatchShape,
    /// Micro-batches of sequences.
    pub micro_batches: Vec<Range<usize>>,
    /// Active pool size (0: the base runs alone).
    pub p: usize,
    /// With the pool inactive: the base's TP cache.
    pub base_cache: Option<KvCache<B>>,
    /// With the pool active: the decode groups of sequences.
    pub groups: Vec<Range<usize>>,
    /// An active pool rank's cache slice, one per decode group.
    pub pool_caches: Vec<KvCache<B>>,
    /// Rows of each sequence each pool rank caches (grows in decode).
    pub cached: Vec<usize>,
}

impl<B: Backend> BatchState<B> {
    /// The prefill units with their blocks.
    pub fn prefill_blocks(&self, spec: &FapoolSpec) -> Vec<UnitBlocks> {
        prefill_units(&self.micro_batches, self.shape.seq_len, spec.chunks).into_iter().map(|u| UnitBlocks::prefill(u, spec.partition, self.p, spec.base)).collect()
    }

    /// The decode units (groups of sequences) with their base parts.
    pub fn decode_blocks(&self, spec: &FapoolSpec, pos: usize) -> Vec<UnitBlocks> {
        self.groups.iter().map(|g| UnitBlocks::decode(Unit { seqs: g.clone(), positions: pos..pos + 1 }, self.p, spec.base)).collect()
    }

    /// The decode group holding sequence `n`, and its index there.
    pub fn group_of(&self, n: usize) -> (usize, usize) {
        let g = self.groups.iter().position(|g| g.contains(&n)).expect("every sequence is in a decode group");
        (g, n - self.groups[g].start)
    }

    /// The pool rank that caches the next decode token: fewest cached, lowest rank.
    pub fn decode_owner(&self) -> usize {
        (0..self.p).min_by_key(|&r| (self.cached[r], r)).unwrap_or(0)
    }
}

/// What every phase function reads: the backend, the comm layer, the model
/// and the strategy's settings.
pub(super) struct Ctx<'a, 'c, B: Backend> {
    pub be: &'a B,
    pub comm: &'a Comm<'c, B>,
    pub cfg: &'a ModelConfig,
    pub spec: FapoolSpec,
}

impl<'a, 'c, B: Backend> Ctx<'a, 'c, B> {
    pub fn math(&self) -> TpMath<'_, 'c, B> {
        TpMath { be: self.be, comm: self.comm, cfg: self.cfg }
    }

    /// The bridge rank of pool rank `i`.
    pub fn bridge_rank_of_pool(&self, i: usize) -> usize {
        self.spec.base + i
    }

    /// Sequences of `span` on the base alone (TP); the logits of each
    /// sequence's last token on the base root.
    fn base_only_pass(&self, rank: &BaseRank<B>, batch: &mut BatchState<B>, tokens: &[u32], span: Span) -> Result<Option<B::Buf>> {
        let math = self.math();
        let nseq = span.seqs.len();
        let mut x = match span.phase {
            Phase::Prefill(s) => tp::embed(self.be, self.cfg, &rank.edge.embedding, tokens, nseq, s, 0)?,
            Phase::Decode => tp::embed_step(self.be, self.cfg, &rank.edge.embedding, nseq)?,
        };
        let cache = batch.base_cache.as_mut().ok_or_else(|| protocol("the base has no cache with the pool active"))?;
        for (l, layer) in rank.layers.iter().enumerate() {
            math.layer(layer, l, &mut x, &span, cache, &rank.base)?;
        }
        if rank.index != 0 {
            return Ok(None);
        }
        Ok(Some(math.head(&rank.edge, &x, nseq, span.phase.tokens())?))
    }
}

/// One rank's part of an FA Pool deployment.
pub struct Fapool<'a, 'c, B: Backend> {
    cx: Ctx<'a, 'c, B>,
    name: String,
    policy: PoolPolicy,
    rank: Rank<B>,
    batch: Option<BatchState<B>>,
}

impl<'a, 'c, B: Backend> Fapool<'a, 'c, B> {
    /// Collective over the world: builds the groups (`families`, the
    /// layout's) and loads this rank's weights.
    pub fn new(cx: BuildContext<'a, 'c, B>, spec: &FapoolSpec, name: &str, families: &[GroupFamily]) -> Result<Self> {
        let BuildContext { be, comm, cfg, world } = cx;
        let mut groups = Groups::create(comm, world, families, name)?;
        let w = Weights::open(cfg)?;
        let policy = spec.policy(world.size());
        let ops = spec.pool_ops;
        let full = |t: Tensor| w.upload_full(be, t);
        let rank = match spec.place(world.rank(), world.size()) {
            Place::Base(r) => {
                let layers = (0..cfg.layers).map(|l| LayerShard::load(be, &w, l, r, spec.base)).collect::<Result<Vec<_>>>()?;
                // The attention weights the base runs itself when the pool is active.
                let with_pool = policy.launched > 0;
                let attention = (0..cfg.layers)
                    .map(|l| {
                        Ok(BaseAttention {
                            qkv: if with_pool && !ops.pool_qkv() { Some(full(Tensor::Qkv(l))?) } else { None },
                            out: if with_pool && !ops.pool_out() { Some(full(Tensor::Out(l))?) } else { None },
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let edge = EdgeWeights::load(be, &w, true, r == 0)?;
                Rank::Base(BaseRank { index: r, base: groups.take("base")?, down: groups.take("down")?, up: groups.take("up")?, layers, attention, edge })
            }
            Place::Pool(i) => {
                let layers = (0..cfg.layers)
                    .map(|l| Ok(PoolLayer { qkv: if ops.pool_qkv() { Some(full(Tensor::Qkv(l))?) } else { None }, out: if ops.pool_out() { Some(full(Tensor::Out(l))?) } else { None } }))
                    .collect::<Result<Vec<_>>>()?;
                Rank::Pool(PoolRank { index: i, pool: groups.take("pool")?, down: groups.take("down")?, up: groups.take("up")?, active: BTreeMap::new(), layers })
            }
            Place::Idle => Rank::Idle,
        };
        let cx = Ctx { be, comm, cfg, spec: spec.clone() };
        Ok(Self { cx, name: name.to_string(), policy, rank, batch: None })
    }

    fn is_leader(&self) -> bool {
        matches!(&self.rank, Rank::Base(b) if b.index == 0)
    }

    /// The context, the rank's role and the batch in flight, borrowed apart.
    fn parts(&mut self) -> Result<(&Ctx<'a, 'c, B>, &Rank<B>, &mut BatchState<B>)> {
        let batch = self.batch.as_mut().ok_or_else(|| protocol("FA Pool step outside a batch"))?;
        Ok((&self.cx, &self.rank, batch))
    }
}

impl<'a, 'c, B: Backend> Strategy<B> for Fapool<'a, 'c, B> {
    fn begin_batch(&mut self, shape: BatchShape, micro_batch_cap: usize, pool_usable: bool) -> Result<BatchSetup> {
        let (requested, mut effective) = self.policy.pool_size(shape.seq_len);
        // Graceful fallback: without a usable pool the base runs attention itself.
        let pool_fallback = effective > 0 && !pool_usable;
        if pool_fallback {
            effective = 0;
        }
        let spec = &self.cx.spec;
        let mbs = micro_batches(spec.micro_batches, shape.nseq, micro_batch_cap);
        // The group of the first `p` pool ranks, created once per size (collective over the pool).
        if let (Rank::Pool(rank), true) = (&mut self.rank, effective > 0) {
            if !rank.active.contains_key(&effective) {
                let g = self.cx.comm.split(&rank.pool, (rank.index < effective).then_some(0), &format!("{}/pool{effective}", self.name))?;
                rank.active.insert(effective, g);
            }
        }
        // Two groups of sequences alternate between base and pool in decode.
        let groups = if effective > 0 && spec.overlap && shape.nseq >= 2 { split_even(shape.nseq, 2) } else { vec![0..shape.nseq] };
        let mut batch = BatchState { shape, micro_batches: split_even(shape.nseq, mbs), p: effective, base_cache: None, groups, pool_caches: Vec::new(), cached: Vec::new() };
        let (be, cfg) = (self.cx.be, self.cx.cfg);
        let kv = cfg.kv_width();
        let active = match &self.rank {
            Rank::Base(_) => {
                if effective == 0 {
                    batch.base_cache = Some(KvCache::new(be, cfg.layers, shape.nseq, shape.context(), cfg.kv_heads_per_rank(spec.base) * cfg.head_dim)?);
                }
                true
            }
            Rank::Pool(r) if r.index < effective => {
                // Rows of each sequence each pool rank holds after prefill.
                let first = batch.prefill_blocks(spec).into_iter().filter(|u| u.unit.seqs.start == 0).collect::<Vec<_>>();
                batch.cached = (0..effective).map(|i| first.iter().map(|u| u.segments(i).total()).sum()).collect();
                let cap = batch.cached.iter().copied().max().unwrap_or(0) + shape.out_tokens;
                batch.pool_caches = batch.groups.iter().map(|g| KvCache::new(be, cfg.layers, g.len(), cap, kv)).collect::<Result<Vec<_>>>()?;
                true
            }
            Rank::Pool(_) | Rank::Idle => false,
        };
        self.batch = Some(batch);
        Ok(BatchSetup { micro_batches: mbs, pool_requested: requested, pool_effective: effective, active, pool_fallback })
    }

    fn prefill(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        let leader = self.is_leader();
        let (cx, rank, batch) = self.parts()?;
        let (shape, p) = (batch.shape, batch.p);
        match rank {
            Rank::Base(rank) if p > 0 => cx.base_prefill(rank, batch, prompts, keep_logits),
            Rank::Pool(rank) if p > 0 => cx.pool_prefill(rank, batch).map(|_| None),
            Rank::Pool(_) | Rank::Idle => Ok(None),
            Rank::Base(rank) => {
                let s = shape.seq_len;
                let mut outs = Vec::new();
                for seqs in batch.micro_batches.clone() {
                    let nseq = seqs.len();
                    let tokens = &prompts[seqs.start * s..seqs.end * s];
                    if let Some(logits) = cx.base_only_pass(rank, batch, tokens, Span { seqs, phase: Phase::Prefill(s) })? {
                        outs.push(cx.math().sample(&logits, nseq, keep_logits)?);
                    }
                }
                Ok(leader.then(|| StepOut::concat(&outs, keep_logits)))
            }
        }
    }

    fn decode_begin(&mut self, step: usize, leader_tokens: &[u32]) -> Result<Option<StepVars>> {
        let leader = self.is_leader();
        let (cx, rank, batch) = self.parts()?;
        let shape = batch.shape;
        let pos = shape.seq_len + step - 1;
        match rank {
            Rank::Pool(r) if r.index < batch.p => {
                let owner = batch.decode_owner();
                let cached = batch.cached[r.index];
                let mine = r.index == owner;
                Ok(Some(StepVars { pos, store_at: mine.then_some(cached), len: cached + usize::from(mine), tokens: Vec::new() }))
            }
            Rank::Base(rank) => {
                let mut tokens = vec![0u32; shape.nseq];
                if leader {
                    tokens.copy_from_slice(&leader_tokens[..shape.nseq]);
                }
                cx.comm.broadcast_tokens(Category::Control, &rank.base, 0, &mut tokens)?;
                // With the pool active the base neither caches nor attends.
                let (store_at, len) = if batch.p > 0 { (None, 0) } else { (Some(pos), pos + 1) };
                Ok(Some(StepVars { pos, store_at, len, tokens }))
            }
            Rank::Pool(_) | Rank::Idle => Ok(None),
        }
    }

    fn decode_device(&mut self) -> Result<Option<B::Buf>> {
        let (cx, rank, batch) = self.parts()?;
        let nseq = batch.shape.nseq;
        match rank {
            Rank::Pool(rank) => cx.pool_decode(rank, batch).map(|_| None),
            Rank::Base(rank) if batch.p > 0 => cx.base_decode(rank, batch),
            Rank::Base(rank) => cx.base_only_pass(rank, batch, &[], Span { seqs: 0..nseq, phase: Phase::Decode }),
            Rank::Idle => Ok(None),
        }
    }

    fn decode_end(&mut self, logits: Option<&B::Buf>, keep_logits: bool) -> Result<Option<StepOut>> {
        let leader = self.is_leader();
        let (cx, rank, batch) = self.parts()?;
        if matches!(rank, Rank::Pool(_)) && batch.p > 0 {
            let owner = batch.decode_owner();
            batch.cached[owner] += 1;
        }
        match logits {
            Some(l) if leader => Ok(Some(cx.math().sample(l, batch.shape.nseq, keep_logits)?)),
            _ => Ok(None),
        }
    }

    fn end_batch(&mut self) -> Result<()> {
        self.batch = None;
        Ok(())
    }
}
