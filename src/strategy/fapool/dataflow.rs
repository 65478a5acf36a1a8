//! What an FA Pool rank does per phase.
//!
//! - Pool inactive (`s <= threshold`): the base runs plain Megatron TP.
//! - Prefill, pool active, per layer and micro-batch: the base root
//!   normalizes and sends each pool rank its block; each pool rank projects
//!   QKV, the K/V blocks are all-gathered across the active pool (KV
//!   replication), each pool rank attends its query segments causally and
//!   projects the output; a binary tree gathers the blocks to the pool root,
//!   which sends them to the base root; the base broadcasts, adds the
//!   residual and runs the FFN with TP. With `overlap` all blocks go out
//!   first, so the base's FFN of micro-batch j runs while the pool attends j+1.
//! - Decode, pool active: the base root sends the new tokens' normalized
//!   hidden states to the pool root, which broadcasts them; every pool rank
//!   projects q/k/v, the rank with the fewest cached tokens appends k/v, each
//!   attends its own cache slice, and the tree merges the partials by their
//!   log-sum-exp; the pool root projects and returns the result.

use super::layout::{FapoolSpec, Place, PoolBlocks, PoolPolicy};
use crate::backend::{Backend, DecodeShape, PrefillShape, RowRun, StepVars};
use crate::comm::{Category, Comm, Group};
use crate::model::{ModelConfig, Tensor, Weights};
use crate::strategy::common::groups::Groups;
use crate::strategy::common::kv::KvCache;
use crate::strategy::common::tp::{EdgeWeights, LayerShard, Span, TpMath};
use crate::strategy::common::tree::{self, TreeStep};
use crate::strategy::common::{micro_batches, split_even, Phase};
use crate::strategy::{protocol, BatchSetup, BatchShape, BuildContext, Layout, Result, StepOut, Strategy};
use std::collections::BTreeMap;
use std::ops::Range;

/// A base rank: its TP shard of every layer, the embedding (and on the
/// root the LM head), the base group and, on the root, the bridge.
struct BaseRank<B: Backend> {
    index: usize,
    base: Group,
    /// Base root only: the base root and every pool rank.
    bridge: Option<Group>,
    layers: Vec<LayerShard<B>>,
    edge: EdgeWeights<B>,
}

/// A pool rank's attention weights of one layer (all heads).
struct PoolLayer<B: Backend> {
    qkv: B::Buf,
    out: B::Buf,
}

/// A pool rank: the attention weights, the pool and bridge groups, and the
/// groups of the first `p` pool ranks for each active size seen so far.
struct PoolRank<B: Backend> {
    index: usize,
    pool: Group,
    bridge: Group,
    active: BTreeMap<usize, Option<Group>>,
    layers: Vec<PoolLayer<B>>,
}

enum Rank<B: Backend> {
    Base(BaseRank<B>),
    Pool(PoolRank<B>),
    Idle,
}

/// The batch in flight.
struct BatchState<B: Backend> {
    shape: BatchShape,
    micro_batches: usize,
    blocks: PoolBlocks,
    /// The base's cache with the pool inactive, an active pool rank's slice, or none.
    cache: Option<KvCache<B>>,
}

/// What every phase function reads: the backend, the comm layer, the model
/// and the strategy's settings.
struct Ctx<'a, 'c, B: Backend> {
    be: &'a B,
    comm: &'a Comm<'c, B>,
    cfg: &'a ModelConfig,
    spec: FapoolSpec,
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
    /// Collective over the world: builds the groups and loads this rank's weights.
    pub fn new(cx: BuildContext<'a, 'c, B>, spec: &FapoolSpec, name: &str, layout: &Layout) -> Result<Self> {
        let BuildContext { be, comm, cfg, world } = cx;
        let mut groups = Groups::create(comm, world, layout, name)?;
        let w = Weights::new(cfg);
        let rank = match spec.place(world.rank(), world.size()) {
            Place::Base(r) => {
                let layers = (0..cfg.layers).map(|l| LayerShard::load(be, &w, l, r, spec.base)).collect::<Result<Vec<_>>>()?;
                let edge = EdgeWeights::load(be, &w, true, r == 0)?;
                let bridge = if r == 0 { Some(groups.take("bridge")?) } else { None };
                Rank::Base(BaseRank { index: r, base: groups.take("base")?, bridge, layers, edge })
            }
            Place::Pool(i) => {
                let layers = (0..cfg.layers).map(|l| Ok(PoolLayer { qkv: be.upload(&w.full(Tensor::Qkv(l)))?, out: be.upload(&w.full(Tensor::Out(l)))? })).collect::<Result<Vec<_>>>()?;
                Rank::Pool(PoolRank { index: i, pool: groups.take("pool")?, bridge: groups.take("bridge")?, active: BTreeMap::new(), layers })
            }
            Place::Idle => Rank::Idle,
        };
        let cx = Ctx { be, comm, cfg, spec: spec.clone() };
        Ok(Self { cx, name: name.to_string(), policy: spec.policy(world.size()), rank, batch: None })
    }

    fn is_leader(&self) -> bool {
        matches!(&self.rank, Rank::Base(b) if b.index == 0)
    }

    /// The rank's role and the batch in flight, borrowed apart from the context.
    fn parts(&mut self) -> Result<(&Ctx<'a, 'c, B>, &Rank<B>, &mut BatchState<B>)> {
        let batch = self.batch.as_mut().ok_or_else(|| protocol("FA Pool step outside a batch"))?;
        Ok((&self.cx, &self.rank, batch))
    }
}

impl<'a, 'c, B: Backend> Ctx<'a, 'c, B> {
    fn math(&self) -> TpMath<'_, 'c, B> {
        TpMath { be: self.be, comm: self.comm, cfg: self.cfg }
    }

    // ----- base group, pool inactive: plain Megatron TP over the base -----

    /// Sequences of `span` on the base alone; the logits of each sequence's
    /// last token on the base root.
    fn base_only_pass(&self, rank: &BaseRank<B>, batch: &mut BatchState<B>, tokens: &[u32], span: Span) -> Result<Option<B::Buf>> {
        let math = self.math();
        let (nseq, d) = (span.seqs.len(), self.cfg.d_model);
        let mut x = match span.phase {
            Phase::Prefill(s) => self.be.embed(&rank.edge.embedding, d, tokens, nseq, s, 0)?,
            Phase::Decode => self.be.embed_step(&rank.edge.embedding, d, nseq)?,
        };
        let cache = batch.cache.as_mut().ok_or_else(|| protocol("the base has no cache with the pool active"))?;
        for (l, layer) in rank.layers.iter().enumerate() {
            math.layer(layer, l, &mut x, &span, cache, &rank.base)?;
        }
        if rank.index != 0 {
            return Ok(None);
        }
        Ok(Some(math.head(&rank.edge, &x, nseq, span.phase.tokens())?))
    }

    // ----- base group, pool active -----

    /// Base root: normalizes micro-batch `seqs` of `x` and sends each pool rank its block.
    fn scatter_to_pool(&self, rank: &BaseRank<B>, blocks: &PoolBlocks, l: usize, x: &B::Buf, seqs: &Range<usize>, s: usize) -> Result<()> {
        let d = self.cfg.d_model;
        let bridge = rank.bridge.as_ref().ok_or_else(|| protocol("only the base root talks to the pool"))?;
        let xj = self.be.gather_rows(x, d, &[RowRun::new(seqs.start * s, seqs.len() * s)])?;
        let h = self.be.rmsnorm(&xj, &rank.layers[l].attn_norm, seqs.len() * s, d, self.cfg.norm_eps)?;
        for r in 0..blocks.p {
            if blocks.block[r] > 0 {
                let blk = self.be.gather_rows(&h, d, &blocks.block_runs(r, seqs.len(), s))?;
                self.comm.send(Category::PoolScatter, bridge, 1 + r, &blk)?;
            }
        }
        Ok(())
    }

    /// Base: receives micro-batch `seqs`' attention output from the pool root
    /// (root) and shares it with the base, then runs the FFN half of the layer.
    fn finish_layer_on_base(&self, rank: &BaseRank<B>, blocks: &PoolBlocks, l: usize, x: &mut B::Buf, seqs: &Range<usize>, s: usize) -> Result<()> {
        let d = self.cfg.d_model;
        let rows = seqs.len() * s;
        let mut attn = self.be.zeros(rows * d)?;
        if let Some(bridge) = &rank.bridge {
            let bundle = self.comm.recv(Category::PoolToBase, bridge, 1, rows * d)?;
            self.be.scatter_rows(&mut attn, d, &blocks.bundle_runs(seqs.len(), s), &bundle)?;
        }
        self.comm.broadcast(Category::PoolToBase, &rank.base, 0, &mut attn)?;
        let run = [RowRun::new(seqs.start * s, rows)];
        let mut xj = self.be.gather_rows(x, d, &run)?;
        self.be.add_assign(&mut xj, &attn)?;
        self.math().ffn_block(&rank.layers[l], &mut xj, rows, &rank.base)?;
        self.be.scatter_rows(x, d, &run, &xj)?;
        Ok(())
    }

    fn base_prefill_with_pool(&self, rank: &BaseRank<B>, batch: &BatchState<B>, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        let (s, nseq, d) = (batch.shape.seq_len, batch.shape.nseq, self.cfg.d_model);
        let root = rank.index == 0;
        let mut x = self.be.embed(&rank.edge.embedding, d, prompts, nseq, s, 0)?;
        let mbs = split_even(nseq, batch.micro_batches);
        for l in 0..self.cfg.layers {
            if self.spec.overlap {
                // All blocks go out first: while the base runs the FFN of
                // micro-batch j, the pool computes attention for j+1.
                if root {
                    for seqs in &mbs {
                        self.scatter_to_pool(rank, &batch.blocks, l, &x, seqs, s)?;
                    }
                }
                for seqs in &mbs {
                    self.finish_layer_on_base(rank, &batch.blocks, l, &mut x, seqs, s)?;
                }
            } else {
                for seqs in &mbs {
                    if root {
                        self.scatter_to_pool(rank, &batch.blocks, l, &x, seqs, s)?;
                    }
                    self.finish_layer_on_base(rank, &batch.blocks, l, &mut x, seqs, s)?;
                }
            }
        }
        if !root {
            return Ok(None);
        }
        let math = self.math();
        let logits = math.head(&rank.edge, &x, nseq, s)?;
        Ok(Some(math.sample(&logits, nseq, keep_logits)?))
    }

    /// The base's half of a decode step with the pool active; the logits on the base root.
    fn base_decode_with_pool(&self, rank: &BaseRank<B>, batch: &BatchState<B>) -> Result<Option<B::Buf>> {
        let nseq = batch.shape.nseq;
        let d = self.cfg.d_model;
        let mut x = self.be.embed_step(&rank.edge.embedding, d, nseq)?;
        for l in 0..self.cfg.layers {
            let mut attn = self.be.zeros(nseq * d)?;
            if let Some(bridge) = &rank.bridge {
                let h = self.be.rmsnorm(&x, &rank.layers[l].attn_norm, nseq, d, self.cfg.norm_eps)?;
                self.comm.send(Category::PoolScatter, bridge, 1, &h)?;
                self.comm.recv_into(Category::PoolToBase, bridge, 1, &mut attn)?;
            }
            self.comm.broadcast(Category::PoolToBase, &rank.base, 0, &mut attn)?;
            self.be.add_assign(&mut x, &attn)?;
            self.math().ffn_block(&rank.layers[l], &mut x, nseq, &rank.base)?;
        }
        if rank.index != 0 {
            return Ok(None);
        }
        Ok(Some(self.math().head(&rank.edge, &x, nseq, 1)?))
    }

    // ----- pool ranks -----

    /// Attention of one micro-batch's block on pool rank `i`: QKV projection,
    /// K/V replication across the active pool, causal attention of the
    /// block's queries, output projection. Returns `[nseq * block, d]`.
    fn pool_block_attention(&self, rank: &PoolRank<B>, batch: &mut BatchState<B>, l: usize, seqs: &Range<usize>, hb: &B::Buf) -> Result<B::Buf> {
        let (s, nb, i) = (batch.shape.seq_len, seqs.len(), rank.index);
        let (d, a, dh, heads) = (self.cfg.d_model, self.cfg.attn_width(), self.cfg.head_dim, self.cfg.heads);
        let (bi, bmax) = (batch.blocks.block[i], batch.blocks.max_block());
        let layer = &rank.layers[l];
        let qkv = self.be.matmul(hb, &layer.qkv, nb * bi, d, 3 * a)?;
        let (q, k, v) = self.be.split_qkv(&qkv, nb * bi, a)?;
        let pad = |t: &B::Buf| -> Result<B::Buf> {
            if bi == bmax {
                return Ok(self.be.gather_rows(t, a, &[RowRun::new(0, nb * bi)])?);
            }
            let mut z = self.be.zeros(nb * bmax * a)?;
            let runs: Vec<RowRun> = (0..nb).map(|n| RowRun::new(n * bmax, bi)).collect();
            self.be.scatter_rows(&mut z, a, &runs, t)?;
            Ok(z)
        };
        let group = active_group(rank, batch.blocks.p)?;
        let k_all = self.comm.all_gather(Category::KvReplication, group, &pad(&k)?)?;
        let v_all = self.comm.all_gather(Category::KvReplication, group, &pad(&v)?)?;
        let order = batch.blocks.replicated_runs(nb);
        let k_full = self.be.gather_rows(&k_all, a, &order)?;
        let v_full = self.be.gather_rows(&v_all, a, &order)?;
        if bi > 0 {
            let cache = batch.cache.as_mut().ok_or_else(|| protocol("an active pool rank has a cache"))?;
            cache.store_prompt(self.be, l, seqs.clone(), bi, &k, &v)?;
        }
        let mut o_blk = self.be.zeros(nb * bi * a)?;
        let mut off = 0;
        for &(st, len) in &batch.blocks.segments[i] {
            let runs: Vec<RowRun> = (0..nb).map(|n| RowRun::new(n * bi + off, len)).collect();
            let q_seg = self.be.gather_rows(&q, a, &runs)?;
            let shape = PrefillShape { nseq: nb, sq: len, skv: st + len, kv_seq_stride: s, heads, head_dim: dh, q_offset: st };
            let (o, _lse) = self.be.attention_prefill(&q_seg, &k_full, &v_full, shape)?;
            self.be.scatter_rows(&mut o_blk, a, &runs, &o)?;
            off += len;
        }
        Ok(self.be.matmul(&o_blk, &layer.out, nb * bi, a, d)?)
    }

    /// Binary-tree gather of the blocks to the pool root (log2 P levels);
    /// returns the bundle (rank-major) on the root.
    fn tree_gather(&self, rank: &PoolRank<B>, blocks: &PoolBlocks, nseq: usize, mine: B::Buf) -> Result<Option<B::Buf>> {
        let (p, d, i) = (blocks.p, self.cfg.d_model, rank.index);
        let group = active_group(rank, p)?;
        let mut bundle = mine;
        for step in tree::steps(i, p) {
            match step {
                TreeStep::Send { to, covering } => {
                    if blocks.rows(covering, nseq) > 0 {
                        self.comm.send(Category::ResultAggregation, group, to, &bundle)?;
                    }
                    return Ok(None);
                }
                TreeStep::Receive { from, covering } => {
                    let held = blocks.rows(i..covering.start, nseq);
                    let incoming = blocks.rows(covering, nseq);
                    if incoming > 0 {
                        let other = self.comm.recv(Category::ResultAggregation, group, from, incoming * d)?;
                        let mut joined = self.be.zeros((held + incoming) * d)?;
                        self.be.scatter_rows(&mut joined, d, &[RowRun::new(0, held)], &bundle)?;
                        self.be.scatter_rows(&mut joined, d, &[RowRun::new(held, incoming)], &other)?;
                        bundle = joined;
                    }
                }
            }
        }
        Ok(Some(bundle))
    }

    fn pool_prefill(&self, rank: &PoolRank<B>, batch: &mut BatchState<B>) -> Result<()> {
        let i = rank.index;
        if i >= batch.blocks.p {
            return Ok(());
        }
        let d = self.cfg.d_model;
        let bi = batch.blocks.block[i];
        let mbs = split_even(batch.shape.nseq, batch.micro_batches);
        let recv_block = |seqs: &Range<usize>| -> Result<B::Buf> {
            if bi == 0 {
                return Ok(self.be.zeros(0)?);
            }
            Ok(self.comm.recv(Category::PoolScatter, &rank.bridge, 0, seqs.len() * bi * d)?)
        };
        for l in 0..self.cfg.layers {
            let mut early = Vec::new();
            if self.spec.overlap {
                for seqs in &mbs {
                    early.push(Some(recv_block(seqs)?));
                }
            }
            for (j, seqs) in mbs.iter().enumerate() {
                let hb = match early.get_mut(j).and_then(Option::take) {
                    Some(hb) => hb,
                    None => recv_block(seqs)?,
                };
                let out = self.pool_block_attention(rank, batch, l, seqs, &hb)?;
                if let Some(bundle) = self.tree_gather(rank, &batch.blocks, seqs.len(), out)? {
                    self.comm.send(Category::PoolToBase, &rank.bridge, 0, &bundle)?;
                }
            }
        }
        Ok(())
    }

    /// Pool rank `i`'s half of a decode step: the owner of this step's token
    /// (the step's `store_at`) caches its K/V, every active rank attends to
    /// its share (the step's `len`), and the partials are combined to the root.
    fn pool_decode(&self, rank: &PoolRank<B>, batch: &mut BatchState<B>) -> Result<()> {
        let (p, i) = (batch.blocks.p, rank.index);
        if i >= p {
            return Ok(());
        }
        let nseq = batch.shape.nseq;
        let (d, a, dh, heads) = (self.cfg.d_model, self.cfg.attn_width(), self.cfg.head_dim, self.cfg.heads);
        let group = active_group(rank, p)?;
        for l in 0..self.cfg.layers {
            let mut h = self.be.zeros(nseq * d)?;
            if i == 0 {
                self.comm.recv_into(Category::PoolScatter, &rank.bridge, 0, &mut h)?;
            }
            self.comm.broadcast(Category::AttentionSync, group, 0, &mut h)?;
            let qkv = self.be.matmul(&h, &rank.layers[l].qkv, nseq, d, 3 * a)?;
            let (q, k, v) = self.be.split_qkv(&qkv, nseq, a)?;
            let cache = batch.cache.as_mut().ok_or_else(|| protocol("an active pool rank has a cache"))?;
            cache.store_step(self.be, l, &k, &v)?;
            let shape = DecodeShape { nseq, cap: cache.cap, len: 0, heads, head_dim: dh };
            let (mut o, mut lse) = self.be.attention_decode_step(&q, &cache.k[l], &cache.v[l], shape)?;
            // Binary-tree combine of the partial outputs by their log-sum-exp.
            let mut sent = false;
            for step in tree::steps(i, p) {
                match step {
                    TreeStep::Send { to, .. } => {
                        self.comm.send(Category::ResultAggregation, group, to, &o)?;
                        self.comm.send(Category::ResultAggregation, group, to, &lse)?;
                        sent = true;
                    }
                    TreeStep::Receive { from, .. } => {
                        let o2 = self.comm.recv(Category::ResultAggregation, group, from, nseq * a)?;
                        let mut lse2 = self.be.zeros_f32(nseq * heads)?;
                        self.comm.recv_into(Category::ResultAggregation, group, from, &mut lse2)?;
                        self.be.merge_partials(&mut o, &mut lse, &o2, &lse2, nseq * heads, dh)?;
                    }
                }
            }
            if !sent && i == 0 {
                let out = self.be.matmul(&o, &rank.layers[l].out, nseq, a, d)?;
                self.comm.send(Category::PoolToBase, &rank.bridge, 0, &out)?;
            }
        }
        Ok(())
    }
}

/// The group of the first `p` pool ranks (created in `begin_batch`).
fn active_group<B: Backend>(rank: &PoolRank<B>, p: usize) -> Result<&Group> {
    rank.active.get(&p).and_then(|g| g.as_ref()).ok_or_else(|| protocol(format!("pool rank {} has no group of the first {p} pool ranks", rank.index)))
}

impl<'a, 'c, B: Backend> Strategy<B> for Fapool<'a, 'c, B> {
    fn begin_batch(&mut self, shape: BatchShape, micro_batch_cap: usize, pool_usable: bool) -> Result<BatchSetup> {
        let (requested, mut effective) = self.policy.pool_size(shape.seq_len);
        // Graceful fallback: without a usable pool the base runs attention itself.
        let pool_fallback = effective > 0 && !pool_usable;
        if pool_fallback {
            effective = 0;
        }
        let micro_batches = micro_batches(self.cx.spec.micro_batches, shape.nseq, micro_batch_cap);
        let blocks = PoolBlocks::new(self.cx.spec.partition, shape.seq_len, effective);
        // The group of the first `p` pool ranks, created once per size (collective over the pool).
        if let (Rank::Pool(rank), true) = (&mut self.rank, effective > 0) {
            if !rank.active.contains_key(&effective) {
                let g = self.cx.comm.split(&rank.pool, (rank.index < effective).then_some(0), &format!("{}/pool{effective}", self.name))?;
                rank.active.insert(effective, g);
            }
        }
        let a = self.cx.cfg.attn_width();
        let (active, cache) = match &self.rank {
            Rank::Base(_) if effective == 0 => (true, Some(KvCache::new(self.cx.be, self.cx.cfg.layers, shape.nseq, shape.context(), a / self.cx.spec.base)?)),
            Rank::Base(_) => (true, None),
            Rank::Pool(r) if r.index < effective => (true, Some(KvCache::new(self.cx.be, self.cx.cfg.layers, shape.nseq, blocks.max_block() + shape.out_tokens, a)?)),
            Rank::Pool(_) | Rank::Idle => (false, None),
        };
        self.batch = Some(BatchState { shape, micro_batches, blocks, cache });
        Ok(BatchSetup { micro_batches, pool_requested: requested, pool_effective: effective, active, pool_fallback })
    }

    fn prefill(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        let leader = self.is_leader();
        let (cx, rank, batch) = self.parts()?;
        let (shape, mbs) = (batch.shape, batch.micro_batches);
        match rank {
            Rank::Base(rank) if batch.blocks.p > 0 => cx.base_prefill_with_pool(rank, batch, prompts, keep_logits),
            Rank::Pool(rank) => cx.pool_prefill(rank, batch).map(|_| None),
            Rank::Idle => Ok(None),
            Rank::Base(rank) => {
                let s = shape.seq_len;
                let mut outs = Vec::new();
                for seqs in split_even(shape.nseq, mbs) {
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
            Rank::Pool(r) if r.index < batch.blocks.p => {
                let owner = batch.blocks.decode_owner();
                let cached = batch.blocks.cached[r.index];
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
                let (store_at, len) = if batch.blocks.p > 0 { (None, 0) } else { (Some(pos), pos + 1) };
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
            Rank::Base(rank) if batch.blocks.p > 0 => cx.base_decode_with_pool(rank, batch),
            Rank::Base(rank) => cx.base_only_pass(rank, batch, &[], Span { seqs: 0..nseq, phase: Phase::Decode }),
            Rank::Idle => Ok(None),
        }
    }

    fn decode_end(&mut self, logits: Option<&B::Buf>, keep_logits: bool) -> Result<Option<StepOut>> {
        let leader = self.is_leader();
        let (cx, rank, batch) = self.parts()?;
        if matches!(rank, Rank::Pool(_)) && batch.blocks.p > 0 {
            let owner = batch.blocks.decode_owner();
            batch.blocks.cached[owner] += 1;
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
