//! FA Pool: a base group (TP=B) runs embedding, FFNs and the LM head; when a
//! batch's sequence length crosses the threshold, an attention pool of extra
//! ranks takes over attention, split along the sequence (SPEC section 2).
//!
//! Ranks `0..B` are the base, `B..B+launched` the pool. The bridge group is
//! the base root plus every pool rank (bridge rank `1 + i` is pool rank `i`).

use super::{pool_segments, split_even, BatchSetup, BatchShape, EdgeWeights, KvCache, LayerShard, Phase, PoolPolicy, Result, StepOut, Strategy, TpMath};
use crate::backend::{Backend, DecodeShape, PrefillShape, RowRun, StepVars};
use crate::comm::{Category, Comm, Group};
use crate::model::{ModelConfig, Tensor, Weights};
use crate::spec::FapoolSpec;
use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Base(usize),
    Pool(usize),
    Idle,
}

/// A pool rank's attention weights of one layer (all heads).
struct PoolLayer<B: Backend> {
    qkv: B::Buf,
    out: B::Buf,
}

/// The per-batch layout of an active pool.
#[derive(Clone, Debug, Default)]
struct PoolLayout {
    /// Active pool size.
    p: usize,
    /// Segments `(start, len)` of the sequence owned by each pool rank.
    segments: Vec<Vec<(usize, usize)>>,
    /// Rows per sequence of each pool rank's block.
    block: Vec<usize>,
    /// Cached tokens per sequence on each pool rank (grows in decode).
    cached: Vec<usize>,
}

impl PoolLayout {
    fn new(spec: &FapoolSpec, s: usize, p: usize) -> Self {
        let segments: Vec<_> = (0..p).map(|r| pool_segments(spec.partition, s, p, r)).collect();
        let block: Vec<usize> = segments.iter().map(|v| v.iter().map(|x| x.1).sum()).collect();
        Self { p, cached: block.clone(), segments, block }
    }
    fn max_block(&self) -> usize {
        self.block.iter().copied().max().unwrap_or(0)
    }
    /// Rows of `h` (`nseq × s`) that pool rank `r`'s block holds, sequence-major.
    fn block_runs(&self, r: usize, nseq: usize, s: usize) -> Vec<RowRun> {
        (0..nseq).flat_map(|n| self.segments[r].iter().map(move |&(st, len)| RowRun::new(n * s + st, len))).collect()
    }
    /// Where the rows of the gathered bundle (rank-major, then sequence, then
    /// segment) belong in the `nseq × s` sequence order.
    fn bundle_runs(&self, nseq: usize, s: usize) -> Vec<RowRun> {
        (0..self.p).flat_map(|r| self.block_runs(r, nseq, s)).collect()
    }
    /// Rows of the all-gathered, padded K/V (`[p, nseq, max_block]`) in sequence order.
    fn replicated_runs(&self, nseq: usize) -> Vec<RowRun> {
        let bmax = self.max_block();
        let mut segs: Vec<(usize, usize, usize, usize)> = Vec::new(); // (start, len, rank, offset in block)
        for (r, v) in self.segments.iter().enumerate() {
            let mut off = 0;
            for &(st, len) in v {
                segs.push((st, len, r, off));
                off += len;
            }
        }
        segs.sort();
        (0..nseq).flat_map(|n| segs.iter().map(move |&(_, len, r, off)| RowRun::new(r * nseq * bmax + n * bmax + off, len)).collect::<Vec<_>>()).collect()
    }
    /// Pool ranks `from..to` hold this many rows for `nseq` sequences.
    fn rows(&self, ranks: Range<usize>, nseq: usize) -> usize {
        ranks.map(|r| self.block[r] * nseq).sum()
    }
    /// The pool rank that caches the next decode token: fewest cached, lowest rank.
    fn decode_owner(&self) -> usize {
        (0..self.p).min_by_key(|&r| (self.cached[r], r)).unwrap_or(0)
    }
}

/// One rank's part of an FA Pool deployment.
pub struct Fapool<'a, 'c, B: Backend> {
    be: &'a B,
    comm: &'a Comm<'c, B>,
    cfg: &'a ModelConfig,
    spec: FapoolSpec,
    name: String,
    policy: PoolPolicy,
    place: Place,
    base: Option<Group>,
    pool: Option<Group>,
    bridge: Option<Group>,
    /// Sub-groups of the first `p` pool ranks, by `p` (pool ranks only).
    active: BTreeMap<usize, Option<Group>>,
    base_layers: Vec<LayerShard<B>>,
    edge: Option<EdgeWeights<B>>,
    pool_layers: Vec<PoolLayer<B>>,
    shape: Option<BatchShape>,
    micro_batches: usize,
    layout: PoolLayout,
    cache: Option<KvCache<B>>,
}

impl<'a, 'c, B: Backend> Fapool<'a, 'c, B> {
    /// Collective over `world`: builds the groups and loads this rank's weights.
    pub fn new(be: &'a B, comm: &'a Comm<'c, B>, cfg: &'a ModelConfig, spec: &FapoolSpec, name: String, world: &Group) -> Result<Self> {
        let policy = PoolPolicy::from_spec(spec, world.size());
        let me = world.rank();
        let place = if me < spec.base {
            Place::Base(me)
        } else if me < spec.base + policy.launched {
            Place::Pool(me - spec.base)
        } else {
            Place::Idle
        };
        let base = comm.split(world, matches!(place, Place::Base(_)).then_some(0), &format!("{name}/base"))?;
        let pool = comm.split(world, matches!(place, Place::Pool(_)).then_some(0), &format!("{name}/pool"))?;
        let in_bridge = matches!(place, Place::Pool(_) | Place::Base(0));
        let bridge = comm.split(world, in_bridge.then_some(0), &format!("{name}/bridge"))?;
        let w = Weights::new(cfg);
        let (mut base_layers, mut pool_layers, mut edge) = (Vec::new(), Vec::new(), None);
        match place {
            Place::Base(r) => {
                for l in 0..cfg.layers {
                    base_layers.push(LayerShard::load(be, &w, l, r, spec.base)?);
                }
                edge = Some(EdgeWeights::load(be, &w, true, r == 0)?);
            }
            Place::Pool(_) => {
                for l in 0..cfg.layers {
                    pool_layers.push(PoolLayer { qkv: be.upload(&w.full(Tensor::Qkv(l)))?, out: be.upload(&w.full(Tensor::Out(l)))? });
                }
            }
            Place::Idle => {}
        }
        Ok(Self {
            be,
            comm,
            cfg,
            spec: spec.clone(),
            name,
            policy,
            place,
            base,
            pool,
            bridge,
            active: BTreeMap::new(),
            base_layers,
            edge,
            pool_layers,
            shape: None,
            micro_batches: 1,
            layout: PoolLayout::default(),
            cache: None,
        })
    }

    fn math(&self) -> TpMath<'_, 'c, B> {
        TpMath { be: self.be, comm: self.comm, cfg: self.cfg }
    }

    fn base_group(&self) -> &Group {
        self.base.as_ref().expect("base ranks have the base group")
    }
    fn bridge(&self) -> &Group {
        self.bridge.as_ref().expect("base root and pool ranks have the bridge")
    }
    fn active_group(&self) -> &Group {
        self.active.get(&self.layout.p).and_then(|g| g.as_ref()).expect("active pool ranks have the active group")
    }

    // ----- base group, pool inactive: plain Megatron TP over the base -----

    /// Sequences `seqs` in `phase` on the base alone; the logits of each
    /// sequence's last token on the base root.
    fn base_only_pass(&mut self, tokens: &[u32], seqs: Range<usize>, phase: Phase) -> Result<Option<B::Buf>> {
        let Place::Base(r) = self.place else { return Ok(None) };
        let math = TpMath { be: self.be, comm: self.comm, cfg: self.cfg };
        let edge = self.edge.as_ref().expect("base edge weights");
        let (nseq, d) = (seqs.len(), self.cfg.d_model);
        let mut x = match phase {
            Phase::Prefill(s) => self.be.embed(&edge.embedding, d, tokens, nseq, s, 0)?,
            Phase::Decode => self.be.embed_step(&edge.embedding, d, nseq)?,
        };
        let cache = self.cache.as_mut().expect("base cache");
        let group = self.base.as_ref().expect("base group");
        for (l, layer) in self.base_layers.iter().enumerate() {
            math.layer(layer, l, &mut x, seqs.clone(), phase, cache, group)?;
        }
        if r != 0 {
            return Ok(None);
        }
        Ok(Some(math.head(edge, &x, nseq, phase.tokens())?))
    }

    // ----- base group, pool active -----

    /// Base root: normalizes micro-batch `seqs` of `x` and sends each pool rank its block.
    fn scatter_to_pool(&self, l: usize, x: &B::Buf, seqs: &Range<usize>, s: usize) -> Result<()> {
        let d = self.cfg.d_model;
        let xj = self.be.gather_rows(x, d, &[RowRun::new(seqs.start * s, seqs.len() * s)])?;
        let h = self.be.rmsnorm(&xj, &self.base_layers[l].attn_norm, seqs.len() * s, d, self.cfg.norm_eps)?;
        for r in 0..self.layout.p {
            if self.layout.block[r] > 0 {
                let blk = self.be.gather_rows(&h, d, &self.layout.block_runs(r, seqs.len(), s))?;
                self.comm.send(Category::PoolScatter, self.bridge(), 1 + r, &blk)?;
            }
        }
        Ok(())
    }

    /// Base: receives micro-batch `seqs`' attention output from the pool root
    /// (root) and shares it with the base, then runs the FFN half of the layer.
    fn finish_layer_on_base(&self, l: usize, x: &mut B::Buf, seqs: &Range<usize>, s: usize) -> Result<()> {
        let d = self.cfg.d_model;
        let rows = seqs.len() * s;
        let mut attn = self.be.zeros(rows * d)?;
        if self.place == Place::Base(0) {
            let bundle = self.comm.recv(Category::PoolToBase, self.bridge(), 1, rows * d)?;
            self.be.scatter_rows(&mut attn, d, &self.layout.bundle_runs(seqs.len(), s), &bundle)?;
        }
        self.comm.broadcast(Category::PoolToBase, self.base_group(), 0, &mut attn)?;
        let run = [RowRun::new(seqs.start * s, rows)];
        let mut xj = self.be.gather_rows(x, d, &run)?;
        self.be.add_assign(&mut xj, &attn)?;
        self.math().ffn_block(&self.base_layers[l], &mut xj, rows, self.base_group())?;
        self.be.scatter_rows(x, d, &run, &xj)?;
        Ok(())
    }

    fn base_prefill_with_pool(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        let Place::Base(r) = self.place else { return Ok(None) };
        let shape = self.shape.expect("batch");
        let (s, nseq, d) = (shape.seq_len, shape.nseq, self.cfg.d_model);
        let edge = self.edge.as_ref().expect("base edge weights");
        let mut x = self.be.embed(&edge.embedding, d, prompts, nseq, s, 0)?;
        let mbs = split_even(nseq, self.micro_batches);
        for l in 0..self.cfg.layers {
            if self.spec.overlap {
                // All blocks go out first: while the base runs the FFN of
                // micro-batch j, the pool computes attention for j+1.
                if r == 0 {
                    for seqs in &mbs {
                        self.scatter_to_pool(l, &x, seqs, s)?;
                    }
                }
                for seqs in &mbs {
                    self.finish_layer_on_base(l, &mut x, seqs, s)?;
                }
            } else {
                for seqs in &mbs {
                    if r == 0 {
                        self.scatter_to_pool(l, &x, seqs, s)?;
                    }
                    self.finish_layer_on_base(l, &mut x, seqs, s)?;
                }
            }
        }
        if r != 0 {
            return Ok(None);
        }
        let math = self.math();
        let logits = math.head(edge, &x, nseq, s)?;
        Ok(Some(math.sample(&logits, nseq, keep_logits)?))
    }

    /// The base's half of a decode step with the pool active; the logits on the base root.
    fn base_decode_with_pool(&mut self) -> Result<Option<B::Buf>> {
        let Place::Base(r) = self.place else { return Ok(None) };
        let nseq = self.shape.expect("batch").nseq;
        let d = self.cfg.d_model;
        let edge = self.edge.as_ref().expect("base edge weights");
        let mut x = self.be.embed_step(&edge.embedding, d, nseq)?;
        for l in 0..self.cfg.layers {
            let mut attn = self.be.zeros(nseq * d)?;
            if r == 0 {
                let h = self.be.rmsnorm(&x, &self.base_layers[l].attn_norm, nseq, d, self.cfg.norm_eps)?;
                self.comm.send(Category::PoolScatter, self.bridge(), 1, &h)?;
                self.comm.recv_into(Category::PoolToBase, self.bridge(), 1, &mut attn)?;
            }
            self.comm.broadcast(Category::PoolToBase, self.base_group(), 0, &mut attn)?;
            self.be.add_assign(&mut x, &attn)?;
            self.math().ffn_block(&self.base_layers[l], &mut x, nseq, self.base_group())?;
        }
        if r != 0 {
            return Ok(None);
        }
        Ok(Some(self.math().head(edge, &x, nseq, 1)?))
    }

    // ----- pool ranks -----

    /// Attention of one micro-batch's block on pool rank `i`: QKV projection,
    /// K/V replication across the active pool, causal attention of the
    /// block's queries, output projection. Returns `[nseq * block, d]`.
    fn pool_block_attention(&mut self, l: usize, i: usize, seqs: &Range<usize>, hb: &B::Buf) -> Result<B::Buf> {
        let shape = self.shape.expect("batch");
        let (s, nb) = (shape.seq_len, seqs.len());
        let (d, a, dh, heads) = (self.cfg.d_model, self.cfg.attn_width(), self.cfg.head_dim, self.cfg.heads);
        let (bi, bmax) = (self.layout.block[i], self.layout.max_block());
        let layer = &self.pool_layers[l];
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
        let group = self.active_group();
        let k_all = self.comm.all_gather(Category::KvReplication, group, &pad(&k)?)?;
        let v_all = self.comm.all_gather(Category::KvReplication, group, &pad(&v)?)?;
        let order = self.layout.replicated_runs(nb);
        let k_full = self.be.gather_rows(&k_all, a, &order)?;
        let v_full = self.be.gather_rows(&v_all, a, &order)?;
        if bi > 0 {
            self.cache.as_mut().expect("pool cache").store(self.be, l, seqs.clone(), 0, bi, &k, &v)?;
        }
        let mut o_blk = self.be.zeros(nb * bi * a)?;
        let mut off = 0;
        for &(st, len) in &self.layout.segments[i] {
            let runs: Vec<RowRun> = (0..nb).map(|n| RowRun::new(n * bi + off, len)).collect();
            let q_seg = self.be.gather_rows(&q, a, &runs)?;
            let shape = PrefillShape { nseq: nb, sq: len, skv: st + len, kv_seq_stride: s, heads, head_dim: dh, q_offset: st };
            let (o, _lse) = self.be.attention_prefill(&q_seg, &k_full, &v_full, shape)?;
            self.be.scatter_rows(&mut o_blk, a, &runs, &o)?;
            off += len;
        }
        Ok(self.be.matmul(&o_blk, &self.pool_layers[l].out, nb * bi, a, d)?)
    }

    /// Binary-tree gather of the blocks to the pool root (log2 P levels);
    /// returns the bundle (rank-major) on the root.
    fn tree_gather(&self, i: usize, nseq: usize, mine: B::Buf) -> Result<Option<B::Buf>> {
        let (p, d) = (self.layout.p, self.cfg.d_model);
        let group = self.active_group();
        let mut bundle = mine;
        let mut k = 1;
        while k < p {
            if i % (2 * k) == k {
                if self.layout.rows(i..(i + k).min(p), nseq) > 0 {
                    self.comm.send(Category::ResultAggregation, group, i - k, &bundle)?;
                }
                return Ok(None);
            }
            if i + k < p {
                let held = self.layout.rows(i..i + k, nseq);
                let incoming = self.layout.rows(i + k..(i + 2 * k).min(p), nseq);
                if incoming > 0 {
                    let other = self.comm.recv(Category::ResultAggregation, group, i + k, incoming * d)?;
                    let mut joined = self.be.zeros((held + incoming) * d)?;
                    self.be.scatter_rows(&mut joined, d, &[RowRun::new(0, held)], &bundle)?;
                    self.be.scatter_rows(&mut joined, d, &[RowRun::new(held, incoming)], &other)?;
                    bundle = joined;
                }
            }
            k *= 2;
        }
        Ok(Some(bundle))
    }

    fn pool_prefill(&mut self) -> Result<()> {
        let Place::Pool(i) = self.place else { return Ok(()) };
        if i >= self.layout.p {
            return Ok(());
        }
        let shape = self.shape.expect("batch");
        let d = self.cfg.d_model;
        let bi = self.layout.block[i];
        let mbs = split_even(shape.nseq, self.micro_batches);
        for l in 0..self.cfg.layers {
            let recv_block = |this: &Self, seqs: &Range<usize>| -> Result<B::Buf> {
                if bi == 0 {
                    return Ok(this.be.zeros(0)?);
                }
                Ok(this.comm.recv(Category::PoolScatter, this.bridge(), 0, seqs.len() * bi * d)?)
            };
            let mut early = Vec::new();
            if self.spec.overlap {
                for seqs in &mbs {
                    early.push(recv_block(self, seqs)?);
                }
            }
            for (j, seqs) in mbs.iter().enumerate() {
                let hb = if self.spec.overlap { std::mem::replace(&mut early[j], self.be.zeros(0)?) } else { recv_block(self, seqs)? };
                let out = self.pool_block_attention(l, i, seqs, &hb)?;
                if let Some(bundle) = self.tree_gather(i, seqs.len(), out)? {
                    self.comm.send(Category::PoolToBase, self.bridge(), 0, &bundle)?;
                }
            }
        }
        Ok(())
    }

    /// Pool rank `i`'s half of a decode step: the owner of this step's token
    /// (the step's `store_at`) caches its K/V, every active rank attends to
    /// its share (the step's `len`), and the partials are combined to the root.
    fn pool_decode(&mut self) -> Result<()> {
        let Place::Pool(i) = self.place else { return Ok(()) };
        let p = self.layout.p;
        if i >= p {
            return Ok(());
        }
        let nseq = self.shape.expect("batch").nseq;
        let (d, a, dh, heads) = (self.cfg.d_model, self.cfg.attn_width(), self.cfg.head_dim, self.cfg.heads);
        for l in 0..self.cfg.layers {
            let mut h = self.be.zeros(nseq * d)?;
            if i == 0 {
                self.comm.recv_into(Category::PoolScatter, self.bridge(), 0, &mut h)?;
            }
            self.comm.broadcast(Category::AttentionSync, self.active_group(), 0, &mut h)?;
            let qkv = self.be.matmul(&h, &self.pool_layers[l].qkv, nseq, d, 3 * a)?;
            let (q, k, v) = self.be.split_qkv(&qkv, nseq, a)?;
            let cache = self.cache.as_mut().expect("pool cache");
            cache.store_step(self.be, l, &k, &v)?;
            let shape = DecodeShape { nseq, cap: cache.cap, len: 0, heads, head_dim: dh };
            let (mut o, mut lse) = self.be.attention_decode_step(&q, &cache.k[l], &cache.v[l], shape)?;
            // Binary-tree combine of the partial outputs by their log-sum-exp.
            let group = self.active_group();
            let mut k = 1;
            let mut sent = false;
            while k < p {
                if i % (2 * k) == k {
                    self.comm.send(Category::ResultAggregation, group, i - k, &o)?;
                    self.comm.send(Category::ResultAggregation, group, i - k, &lse)?;
                    sent = true;
                    break;
                }
                if i + k < p {
                    let o2 = self.comm.recv(Category::ResultAggregation, group, i + k, nseq * a)?;
                    let mut lse2 = self.be.zeros_f32(nseq * heads)?;
                    self.comm.recv_into(Category::ResultAggregation, group, i + k, &mut lse2)?;
                    self.be.merge_partials(&mut o, &mut lse, &o2, &lse2, nseq * heads, dh)?;
                }
                k *= 2;
            }
            if !sent && i == 0 {
                let out = self.be.matmul(&o, &self.pool_layers[l].out, nseq, a, d)?;
                self.comm.send(Category::PoolToBase, self.bridge(), 0, &out)?;
            }
        }
        Ok(())
    }

    /// Creates (once, collectively over the pool) the group of the first `p` pool ranks.
    fn ensure_active_group(&mut self, p: usize) -> Result<()> {
        if let (Place::Pool(i), false) = (self.place, self.active.contains_key(&p)) {
            let pool = self.pool.as_ref().expect("pool group");
            let g = self.comm.split(pool, (i < p).then_some(0), &format!("{}/pool{p}", self.name))?;
            self.active.insert(p, g);
        }
        Ok(())
    }
}

impl<'a, 'c, B: Backend> Strategy<B> for Fapool<'a, 'c, B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn role(&self) -> String {
        match self.place {
            Place::Base(r) => format!("base{r}"),
            Place::Pool(i) => format!("pool{i}"),
            Place::Idle => "idle".into(),
        }
    }

    fn is_leader(&self) -> bool {
        self.place == Place::Base(0)
    }

    fn begin_batch(&mut self, shape: BatchShape, micro_batch_cap: usize, pool_usable: bool) -> Result<BatchSetup> {
        let (requested, mut effective) = self.policy.pool_size(shape.seq_len);
        // Graceful fallback: without a usable pool the base runs attention itself.
        let pool_fallback = effective > 0 && !pool_usable;
        if pool_fallback {
            effective = 0;
        }
        let by_memory = shape.nseq.div_ceil(micro_batch_cap.max(1));
        self.micro_batches = self.spec.micro_batches.max(by_memory).min(shape.nseq);
        self.shape = Some(shape);
        self.layout = PoolLayout::new(&self.spec, shape.seq_len, effective);
        if effective > 0 {
            self.ensure_active_group(effective)?;
        }
        let active = match self.place {
            Place::Base(_) => true,
            Place::Pool(i) => i < effective,
            Place::Idle => false,
        };
        let a = self.cfg.attn_width();
        self.cache = match (self.place, effective) {
            (Place::Base(_), 0) => Some(KvCache::new(self.be, self.cfg.layers, shape.nseq, shape.seq_len + shape.out_tokens, a / self.spec.base)?),
            (Place::Pool(i), p) if i < p => Some(KvCache::new(self.be, self.cfg.layers, shape.nseq, self.layout.max_block() + shape.out_tokens, a)?),
            _ => None,
        };
        Ok(BatchSetup { micro_batches: self.micro_batches, pool_requested: requested, pool_effective: effective, active, pool_fallback })
    }

    fn prefill(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        let shape = self.shape.expect("begin_batch first");
        if self.layout.p > 0 {
            return match self.place {
                Place::Base(_) => self.base_prefill_with_pool(prompts, keep_logits),
                Place::Pool(_) => self.pool_prefill().map(|_| None),
                Place::Idle => Ok(None),
            };
        }
        let s = shape.seq_len;
        let mut outs = Vec::new();
        for seqs in split_even(shape.nseq, self.micro_batches) {
            let tokens = prompts[seqs.start * s..seqs.end * s].to_vec();
            let nseq = seqs.len();
            if let Some(logits) = self.base_only_pass(&tokens, seqs, Phase::Prefill(s))? {
                outs.push(self.math().sample(&logits, nseq, keep_logits)?);
            }
        }
        if !self.is_leader() {
            return Ok(None);
        }
        let tokens = outs.iter().flat_map(|o: &StepOut| o.tokens.iter().copied()).collect();
        let logits = keep_logits.then(|| outs.iter().flat_map(|o| o.logits.clone().unwrap_or_default()).collect());
        Ok(Some(StepOut { tokens, logits }))
    }

    fn decode_begin(&mut self, step: usize, leader_tokens: &[u32]) -> Result<Option<StepVars>> {
        let shape = self.shape.expect("begin_batch first");
        let pos = shape.seq_len + step - 1;
        match self.place {
            Place::Pool(i) if i < self.layout.p => {
                let owner = self.layout.decode_owner();
                let cached = self.layout.cached[i];
                Ok(Some(StepVars { pos, store_at: (i == owner).then_some(cached), len: cached + usize::from(i == owner), tokens: Vec::new() }))
            }
            Place::Base(_) => {
                let mut tokens = vec![0u32; shape.nseq];
                if self.is_leader() {
                    tokens.copy_from_slice(&leader_tokens[..shape.nseq]);
                }
                self.comm.broadcast_tokens(Category::Control, self.base_group(), 0, &mut tokens);
                // With the pool active the base neither caches nor attends.
                let (store_at, len) = if self.layout.p > 0 { (None, 0) } else { (Some(pos), pos + 1) };
                Ok(Some(StepVars { pos, store_at, len, tokens }))
            }
            Place::Pool(_) | Place::Idle => Ok(None),
        }
    }

    fn decode_device(&mut self) -> Result<Option<B::Buf>> {
        let nseq = self.shape.expect("begin_batch first").nseq;
        match self.place {
            Place::Pool(_) => self.pool_decode().map(|_| None),
            Place::Base(_) if self.layout.p > 0 => self.base_decode_with_pool(),
            Place::Base(_) => self.base_only_pass(&[], 0..nseq, Phase::Decode),
            Place::Idle => Ok(None),
        }
    }

    fn decode_end(&mut self, logits: Option<&B::Buf>, keep_logits: bool) -> Result<Option<StepOut>> {
        let nseq = self.shape.expect("begin_batch first").nseq;
        if let Place::Pool(_) = self.place {
            if self.layout.p > 0 {
                let owner = self.layout.decode_owner();
                self.layout.cached[owner] += 1;
            }
        }
        match logits {
            Some(l) if self.is_leader() => Ok(Some(self.math().sample(l, nseq, keep_logits)?)),
            _ => Ok(None),
        }
    }

    fn end_batch(&mut self) -> Result<()> {
        self.cache = None;
        self.shape = None;
        Ok(())
    }
}
