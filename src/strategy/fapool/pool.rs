//! The pool's side of an active pool. In prefill, an active pool rank takes
//! its block of each unit from the base ranks that own its rows, projects
//! q/k/v (per `pool_ops`), keeps its rows of K/V for decode, replicates the
//! unit's K/V across the active pool (KV replication) into each layer's
//! prefix, attends its query segments causally against the prefix up to
//! each segment's end, projects the output (per `pool_ops`) and returns each
//! base rank its rows — directly, or through the paper's binary tree to the
//! pool root. In decode every active pool rank projects q/k/v of every
//! sequence, the step's owner appends the new K/V to its slice, each attends
//! its own slice (split-KV), and the partial outputs merge by their
//! log-sum-exp through the tree to the root, which returns the result.

use super::dataflow::{BatchState, Ctx, PoolRank};
use super::layout::Aggregation;
use super::units::{schedule, Step, UnitBlocks};
use crate::backend::{Backend, DecodeShape, PrefillShape, RopePositions, RowCopy, RowRun};
use crate::comm::{Category, Group, RecvPart, SendTo, Ticket};
use crate::strategy::common::tp;
use crate::strategy::common::tree::{self, TreeStep};
use crate::strategy::{protocol, Result};
use std::collections::BTreeMap;

/// The replicated K and V of one layer and micro-batch: `[nseq, s, width]`,
/// filled chunk by chunk.
struct Prefix<B: Backend> {
    k: B::Buf,
    v: B::Buf,
}

/// The group of the first `p` pool ranks (created in `begin_batch`).
fn active_group<B: Backend>(rank: &PoolRank<B>, p: usize) -> Result<&Group> {
    rank.active.get(&p).and_then(|g| g.as_ref()).ok_or_else(|| protocol(format!("pool rank {} has no group of the first {p} pool ranks", rank.index)))
}

impl<'a, 'c, B: Backend> Ctx<'a, 'c, B> {
    /// Width of the rows the pool receives: hidden states, or q/k/v.
    fn input_width(&self) -> usize {
        if self.spec.pool_ops.pool_qkv() {
            self.cfg.d_model
        } else {
            self.cfg.qkv_width()
        }
    }

    /// Posts the receive of this rank's block of `ub` from the base ranks
    /// that own its rows (in decode, every base rank's rows).
    fn pool_receive(&self, rank: &PoolRank<B>, ub: &UnitBlocks, block: usize) -> Result<Option<Ticket<B>>> {
        let (w, rows) = (self.input_width(), ub.block_len(block));
        if rows == 0 {
            return Ok(None);
        }
        let parts: Vec<RecvPart> = (0..self.spec.base).map(|b| (b, ub.part(block, b))).filter(|(_, r)| !r.is_empty()).map(|(b, r)| RecvPart { peer: b, range: r.start * w..r.end * w }).collect();
        Ok(Some(self.comm.issue(Category::PoolScatter, &rank.down, None, Some((self.be.empty(rows * w)?, parts)))?))
    }

    /// q, k, v of `rows` received rows at `positions`, projected here or by
    /// the base, q and k rotated here when the model has rotary positions.
    fn pool_qkv(&self, rank: &PoolRank<B>, l: usize, input: &B::Buf, rows: usize, positions: RopePositions) -> Result<(B::Buf, B::Buf, B::Buf)> {
        let c = self.cfg;
        let split = |qkv: &B::Buf| tp::split_qkv(self.be, c, qkv, rows, c.heads, c.kv_heads, positions);
        match &rank.layers[l].qkv {
            Some(w) => split(&self.be.matmul(input, w, rows, c.d_model, c.qkv_width())?),
            None => split(input),
        }
    }

    /// The pool's output of `rows` attended rows: projected here, or left to the base.
    fn pool_output(&self, rank: &PoolRank<B>, l: usize, o: B::Buf, rows: usize) -> Result<B::Buf> {
        match &rank.layers[l].out {
            Some(w) => Ok(self.be.matmul(&o, w, rows, self.cfg.attn_width(), self.cfg.d_model)?),
            None => Ok(o),
        }
    }

    /// Sends a unit's result rows to the base ranks that own them: directly
    /// from this rank, or from the root after a binary-tree gather.
    fn pool_return(&self, rank: &PoolRank<B>, ub: &UnitBlocks, out: B::Buf) -> Result<Option<Ticket<B>>> {
        let (i, w) = (rank.index, self.result_width());
        let sends = |bundle_at: &dyn Fn(usize) -> usize, blocks: std::ops::Range<usize>| -> Vec<SendTo> {
            let mut v = Vec::new();
            for b in 0..self.spec.base {
                for blk in blocks.clone() {
                    let part = ub.part(blk, b);
                    if !part.is_empty() {
                        let at = bundle_at(blk) + part.start;
                        v.push(SendTo { peer: b, range: at * w..(at + part.len()) * w });
                    }
                }
            }
            v
        };
        match self.spec.aggregation {
            Aggregation::Direct => {
                let parts = sends(&|_| 0, i..i + 1);
                if parts.is_empty() {
                    return Ok(None);
                }
                Ok(Some(self.comm.issue(Category::PoolToBase, &rank.up, Some((out, parts)), None)?))
            }
            Aggregation::Tree => {
                let Some(bundle) = self.tree_gather(rank, ub, out)? else { return Ok(None) };
                let starts: Vec<usize> = (0..ub.p).scan(0, |at, r| Some(std::mem::replace(at, *at + ub.block_len(r)))).collect();
                let parts = sends(&|blk| starts[blk], 0..ub.p);
                Ok(Some(self.comm.issue(Category::PoolToBase, &rank.up, Some((bundle, parts)), None)?))
            }
        }
    }

    /// Binary-tree gather of the unit's blocks to the pool root (log2 P
    /// levels); the bundle (blocks in rank order) on the root.
    fn tree_gather(&self, rank: &PoolRank<B>, ub: &UnitBlocks, mine: B::Buf) -> Result<Option<B::Buf>> {
        let (p, w, i) = (ub.p, self.result_width(), rank.index);
        let rows = |ranks: std::ops::Range<usize>| ranks.map(|r| ub.block_len(r)).sum::<usize>();
        let group = active_group(rank, p)?;
        let mut bundle = mine;
        for step in tree::steps(i, p) {
            match step {
                TreeStep::Send { to, covering } => {
                    if rows(covering) > 0 {
                        self.comm.send(Category::ResultAggregation, group, to, &bundle)?;
                    }
                    return Ok(None);
                }
                TreeStep::Receive { from, covering } => {
                    let (held, incoming) = (rows(i..covering.start), rows(covering));
                    if incoming > 0 {
                        let other = self.comm.recv(Category::ResultAggregation, group, from, incoming * w)?;
                        let mut joined = self.be.empty((held + incoming) * w)?;
                        self.be.copy_rows(&mut joined, w, &bundle, &[RowCopy { src: 0, dst: 0, len: held }])?;
                        self.be.copy_rows(&mut joined, w, &other, &[RowCopy { src: 0, dst: held, len: incoming }])?;
                        bundle = joined;
                    }
                }
            }
        }
        Ok(Some(bundle))
    }

    /// Layer `l` of prefill unit `ub` on this pool rank: K/V kept for decode
    /// and replicated into `prefix`, the block's queries attended, the output
    /// (projected per `pool_ops`) returned.
    fn pool_attend(&self, rank: &PoolRank<B>, batch: &mut BatchState<B>, ub: &UnitBlocks, l: usize, input: Option<B::Buf>, prefix: &mut Option<Prefix<B>>) -> Result<B::Buf> {
        let (i, p, s) = (rank.index, ub.p, batch.shape.seq_len);
        let (a, kv, dh, heads, kv_heads) = (self.cfg.attn_width(), self.cfg.kv_width(), self.cfg.head_dim, self.cfg.heads, self.cfg.kv_heads);
        let (seqs, pos) = (ub.unit.seqs.clone(), ub.unit.positions.clone());
        let (nb, chunk, bi, segments) = (seqs.len(), pos.len(), ub.block_len(i), ub.segments(i));
        let (q, k, v) = match &input {
            Some(x) => self.pool_qkv(rank, l, x, bi, RopePositions::Segments(&segments))?,
            None => (self.be.empty(0)?, self.be.empty(0)?, self.be.empty(0)?),
        };
        // This rank's rows of K/V, for decode: per sequence after its rows of earlier chunks.
        let per_seq = segments.total();
        if per_seq > 0 {
            let before: usize = batch.prefill_blocks(&self.spec).iter().filter(|u| u.unit.seqs == seqs && u.unit.positions.start < pos.start).map(|u| u.segments(i).total()).sum();
            for n in seqs.clone() {
                let (g, at) = batch.group_of(n);
                let cache = &mut batch.pool_caches[g];
                let copy = [RowCopy { src: (n - seqs.start) * per_seq, dst: at * cache.cap + before, len: per_seq }];
                self.be.copy_rows(&mut cache.k[l], kv, &k, &copy)?;
                self.be.copy_rows(&mut cache.v[l], kv, &v, &copy)?;
            }
        }
        // One pool rank and one chunk: its block is the sequences in order, already the prefix.
        let identity = p == 1 && chunk == s;
        if !identity {
            let bmax = ub.max_block();
            let pad = |t: &B::Buf| -> Result<B::Buf> {
                let mut z = self.be.zeros(bmax * kv)?;
                self.be.copy_rows(&mut z, kv, t, &[RowCopy { src: 0, dst: 0, len: bi }])?;
                Ok(z)
            };
            let gathered = if p == 1 {
                None
            } else {
                let group = active_group(rank, p)?;
                // Blocks differ by at most a few rows: pad to the largest (not when all are equal).
                let (kp, vp) = if bi == bmax { (None, None) } else { (Some(pad(&k)?), Some(pad(&v)?)) };
                let k_all = self.comm.all_gather(Category::KvReplication, group, kp.as_ref().unwrap_or(&k))?;
                let v_all = self.comm.all_gather(Category::KvReplication, group, vp.as_ref().unwrap_or(&v))?;
                Some((k_all, v_all))
            };
            let (k_src, v_src) = gathered.as_ref().map_or((&k, &v), |(k_all, v_all)| (k_all, v_all));
            let stride = if p == 1 { 0 } else { bmax };
            // Every block's rows to their positions in the prefix (at most
            // two segments per sequence and block).
            let mut copies = Vec::with_capacity(2 * p * nb);
            for r in 0..p {
                let mut at = 0;
                for run in ub.block_runs(r) {
                    let (n, off) = (run.start / chunk, run.start % chunk);
                    copies.push(RowCopy { src: r * stride + at, dst: n * s + pos.start + off, len: run.len });
                    at += run.len;
                }
            }
            if prefix.is_none() {
                *prefix = Some(Prefix { k: self.be.empty(nb * s * kv)?, v: self.be.empty(nb * s * kv)? });
            }
            let pf = prefix.as_mut().expect("just made");
            self.be.copy_rows(&mut pf.k, kv, k_src, &copies)?;
            self.be.copy_rows(&mut pf.v, kv, v_src, &copies)?;
        }
        let (k_pre, v_pre) = match (identity, prefix.as_ref()) {
            (true, _) => (&k, &v),
            (false, Some(pf)) => (&pf.k, &pf.v),
            (false, None) => return Err(protocol("attention before its K/V prefix")),
        };
        let mut o_blk = self.be.empty(bi * a)?;
        let mut off = 0;
        for &(st, len) in segments.iter() {
            let runs: Vec<RowRun> = (0..nb).map(|n| RowRun::new(n * per_seq + off, len)).collect();
            let q_seg = self.be.gather_rows(&q, a, &runs)?;
            let shape = PrefillShape { nseq: nb, sq: len, skv: st + len, kv_seq_stride: s, heads, kv_heads, head_dim: dh, q_offset: st };
            let (o, _lse) = self.be.attention_prefill(&q_seg, k_pre, v_pre, shape)?;
            self.be.scatter_rows(&mut o_blk, a, &runs, &o)?;
            off += len;
        }
        self.pool_output(rank, l, o_blk, bi)
    }

    /// Walks the prefill schedule on this pool rank.
    pub(super) fn pool_prefill(&self, rank: &PoolRank<B>, batch: &mut BatchState<B>) -> Result<()> {
        if rank.index >= batch.p {
            return Ok(());
        }
        let units = batch.prefill_blocks(&self.spec);
        let mut inputs: BTreeMap<(usize, usize), Ticket<B>> = BTreeMap::new();
        let mut results: BTreeMap<(usize, usize), Ticket<B>> = BTreeMap::new();
        let mut prefixes: BTreeMap<(usize, usize), Prefix<B>> = BTreeMap::new();
        for step in schedule(self.cfg.layers, units.len(), self.spec.overlap) {
            match step {
                Step::Handoff { layer, unit } => {
                    if let Some(t) = self.pool_receive(rank, &units[unit], rank.index)? {
                        inputs.insert((layer, unit), t);
                    }
                }
                Step::Return { layer, unit } => {
                    let ub = &units[unit];
                    let input = match inputs.remove(&(layer, unit)) {
                        Some(t) => self.comm.complete(t)?,
                        None => None,
                    };
                    // The base sent this input after using the previous layer's result: it arrived.
                    if let Some(t) = layer.checked_sub(1).and_then(|prev| results.remove(&(prev, unit))) {
                        self.comm.complete(t)?;
                    }
                    let mb = batch.micro_batches.iter().position(|m| *m == ub.unit.seqs).ok_or_else(|| protocol("a unit outside the micro-batches"))?;
                    let mut prefix = prefixes.remove(&(layer, mb));
                    let out = self.pool_attend(rank, batch, ub, layer, input, &mut prefix)?;
                    // A micro-batch's prefix lives until its last chunk of the layer.
                    if let Some(pf) = prefix.filter(|_| ub.unit.positions.end < batch.shape.seq_len) {
                        prefixes.insert((layer, mb), pf);
                    }
                    if let Some(t) = self.pool_return(rank, ub, out)? {
                        results.insert((layer, unit), t);
                    }
                }
            }
        }
        for t in results.into_values() {
            self.comm.complete(t)?;
        }
        Ok(())
    }

    /// This pool rank's half of a decode step: q/k/v of every sequence, the
    /// owner's new K/V appended (the step's `store_at`), attention over its
    /// own slice (the step's `len`), the partials merged to the root by
    /// their log-sum-exp, and the root's result returned to the base.
    pub(super) fn pool_decode(&self, rank: &PoolRank<B>, batch: &mut BatchState<B>) -> Result<()> {
        let (p, i) = (batch.p, rank.index);
        if i >= p {
            return Ok(());
        }
        let (a, dh, heads, kv_heads) = (self.cfg.attn_width(), self.cfg.head_dim, self.cfg.heads, self.cfg.kv_heads);
        let units = batch.decode_blocks(&self.spec, batch.shape.seq_len);
        let group = active_group(rank, p)?;
        let mut inputs: BTreeMap<(usize, usize), Ticket<B>> = BTreeMap::new();
        let mut results: BTreeMap<(usize, usize), Ticket<B>> = BTreeMap::new();
        for step in schedule(self.cfg.layers, units.len(), self.spec.overlap) {
            match step {
                Step::Handoff { layer, unit } => {
                    if let Some(t) = self.pool_receive(rank, &units[unit], 0)? {
                        inputs.insert((layer, unit), t);
                    }
                }
                Step::Return { layer, unit } => {
                    let ub = &units[unit];
                    let rows = ub.unit.rows();
                    let input = inputs.remove(&(layer, unit)).map(|t| self.comm.complete(t)).transpose()?.flatten().ok_or_else(|| protocol("a decode step without its input"))?;
                    if let Some(t) = layer.checked_sub(1).and_then(|prev| results.remove(&(prev, unit))) {
                        self.comm.complete(t)?;
                    }
                    let (q, k, v) = self.pool_qkv(rank, layer, &input, rows, RopePositions::Step)?;
                    let cache = &mut batch.pool_caches[unit];
                    cache.store_step(self.be, layer, &k, &v)?;
                    let shape = DecodeShape { nseq: rows, cap: cache.cap, len: 0, heads, kv_heads, head_dim: dh };
                    let (mut o, mut lse) = self.be.attention_decode_step(&q, &cache.k[layer], &cache.v[layer], shape)?;
                    // Binary-tree combine of the partial outputs by their log-sum-exp.
                    let mut root = true;
                    for step in tree::steps(i, p) {
                        match step {
                            TreeStep::Send { to, .. } => {
                                self.comm.send(Category::ResultAggregation, group, to, &o)?;
                                self.comm.send(Category::ResultAggregation, group, to, &lse)?;
                                root = false;
                            }
                            TreeStep::Receive { from, .. } => {
                                let o2 = self.comm.recv(Category::ResultAggregation, group, from, rows * a)?;
                                let mut lse2 = self.be.zeros_f32(rows * heads)?;
                                self.comm.recv_into(Category::ResultAggregation, group, from, &mut lse2)?;
                                self.be.merge_partials(&mut o, &mut lse, &o2, &lse2, rows * heads, dh)?;
                            }
                        }
                    }
                    if root {
                        let out = self.pool_output(rank, layer, o, rows)?;
                        let w = self.result_width();
                        let parts: Vec<SendTo> =
                            (0..self.spec.base).map(|b| ub.part(0, b)).enumerate().filter(|(_, r)| !r.is_empty()).map(|(b, r)| SendTo { peer: b, range: r.start * w..r.end * w }).collect();
                        results.insert((layer, unit), self.comm.issue(Category::PoolToBase, &rank.up, Some((out, parts)), None)?);
                    }
                }
            }
        }
        for t in results.into_values() {
            self.comm.complete(t)?;
        }
        Ok(())
    }
}
