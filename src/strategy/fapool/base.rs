//! The base's side of an active pool. A base rank holds its own rows of
//! every unit (sequence-parallel), hands them to the pool ranks that attend
//! them, takes back the results, adds the residual and runs its share of
//! the FFN: alone, or with an all-gather of the rows before the
//! column-parallel up projection and a reduce-scatter after the
//! row-parallel down projection. The base root gathers the last rows for the
//! LM head.

use super::dataflow::{BaseRank, BatchState, Ctx};
use super::layout::Aggregation;
use super::units::{schedule, Step, UnitBlocks};
use crate::backend::{Backend, RowCopy, RowRun};
use crate::comm::{Category, RecvPart, SendTo, Ticket};
use crate::strategy::common::tp;
use crate::strategy::{protocol, Result, StepOut};
use std::collections::BTreeMap;

impl<'a, 'c, B: Backend> Ctx<'a, 'c, B> {
    /// Width of the rows the base hands the pool: hidden states, or q/k/v
    /// when the base projects them.
    fn handoff_width(&self) -> usize {
        if self.spec.pool_ops.pool_qkv() {
            self.cfg.d_model
        } else {
            self.cfg.qkv_width()
        }
    }

    /// Width of the rows the pool returns: projected output, or the
    /// attention output when the base projects it.
    pub(super) fn result_width(&self) -> usize {
        if self.spec.pool_ops.pool_out() {
            self.cfg.d_model
        } else {
            self.cfg.attn_width()
        }
    }

    /// Hands layer `l`'s input of this rank's rows of `ub` to the pool ranks
    /// (each its part of their block; in decode every pool rank all of them).
    fn base_handoff(&self, rank: &BaseRank<B>, ub: &UnitBlocks, l: usize, x: &B::Buf) -> Result<Option<Ticket<B>>> {
        let (b, d) = (rank.index, self.cfg.d_model);
        let rows = ub.base_rows(b);
        if rows == 0 {
            return Ok(None);
        }
        let h = self.be.rmsnorm(x, &rank.layers[l].attn_norm, rows, d, self.cfg.norm_eps)?;
        let (send, w) = match &rank.attention[l].qkv {
            Some(qkv) => (self.be.matmul(&h, qkv, rows, d, self.cfg.qkv_width())?, self.handoff_width()),
            None => (h, self.handoff_width()),
        };
        let parts: Vec<SendTo> = if ub.is_decode() {
            // Decode: every pool rank attends every sequence.
            (0..ub.p).map(|i| SendTo { peer: self.bridge_rank_of_pool(i), range: 0..rows * w }).collect()
        } else {
            ub.base_slices(b, w).map(|(i, range)| SendTo { peer: self.bridge_rank_of_pool(i), range }).collect()
        };
        Ok(Some(self.comm.issue(Category::PoolScatter, &rank.down, Some((send, parts)), None)?))
    }

    /// Takes back layer `l`'s attention result of this rank's rows, adds the
    /// residual and runs the FFN half of the layer.
    fn base_return(&self, rank: &BaseRank<B>, ub: &UnitBlocks, l: usize, x: &mut B::Buf) -> Result<()> {
        let (b, d, w) = (rank.index, self.cfg.d_model, self.result_width());
        let rows = ub.base_rows(b);
        if rows > 0 {
            let decode = ub.is_decode();
            // From each pool rank its block's part; with a tree (or in decode)
            // everything comes from the pool root, part by part.
            let from = |i: usize| if decode || self.spec.aggregation == Aggregation::Tree { self.bridge_rank_of_pool(0) } else { self.bridge_rank_of_pool(i) };
            let parts: Vec<RecvPart> = ub.base_slices(b, w).map(|(i, range)| RecvPart { peer: from(i), range }).collect();
            let ticket = self.comm.issue(Category::PoolToBase, &rank.up, None, Some((self.be.empty(rows * w)?, parts)))?;
            let mut y = self.comm.complete(ticket)?.ok_or_else(|| protocol("a result arrived without its buffer"))?;
            if let Some(out) = &rank.attention[l].out {
                y = self.be.matmul(&y, out, rows, w, d)?;
            }
            self.be.add_assign(x, &y)?;
        }
        self.base_ffn(rank, l, x, rows, ub.max_base_rows())
    }

    /// `x += ffn(rmsnorm(x))` on this rank's `rows` rows; with several base
    /// ranks the rows are all-gathered (padded to `max_rows` per rank) for the
    /// column-parallel FFN and its row-parallel output reduce-scattered back.
    fn base_ffn(&self, rank: &BaseRank<B>, l: usize, x: &mut B::Buf, rows: usize, max_rows: usize) -> Result<()> {
        let (d, layer) = (self.cfg.d_model, &rank.layers[l]);
        let h = self.be.rmsnorm(x, &layer.ffn_norm, rows, d, self.cfg.norm_eps)?;
        let nb = rank.base.size();
        if nb == 1 {
            let f = self.math().ffn(layer, &h, rows)?;
            return Ok(self.be.add_assign(x, &f)?);
        }
        let padded = if rows == max_rows {
            h
        } else {
            let mut z = self.be.zeros(max_rows * d)?;
            self.be.scatter_rows(&mut z, d, &[RowRun::new(0, rows)], &h)?;
            z
        };
        let all = self.comm.all_gather(Category::TpAllgather, &rank.base, &padded)?;
        let partial = self.math().ffn(layer, &all, nb * max_rows)?;
        let mut mine = self.be.empty(max_rows * d)?;
        self.comm.reduce_scatter(Category::TpReducescatter, &rank.base, &partial, &mut mine)?;
        if rows < max_rows {
            mine = self.be.gather_rows(&mine, d, &[RowRun::new(0, rows)])?;
        }
        Ok(self.be.add_assign(x, &mine)?)
    }

    /// Walks the schedule over `units` on this base rank, `x` holding its
    /// rows of each unit.
    fn base_pipeline(&self, rank: &BaseRank<B>, units: &[UnitBlocks], x: &mut [B::Buf]) -> Result<()> {
        let mut handoffs: BTreeMap<(usize, usize), Ticket<B>> = BTreeMap::new();
        for step in schedule(self.cfg.layers, units.len(), self.spec.overlap) {
            match step {
                Step::Handoff { layer, unit } => {
                    if let Some(t) = self.base_handoff(rank, &units[unit], layer, &x[unit])? {
                        handoffs.insert((layer, unit), t);
                    }
                }
                Step::Return { layer, unit } => {
                    self.base_return(rank, &units[unit], layer, &mut x[unit])?;
                    // The pool used this hand-off for the result: it has arrived.
                    if let Some(t) = handoffs.remove(&(layer, unit)) {
                        self.comm.complete(t)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The base root gathers the rows `(unit, index among the owner's rows)`
    /// of every sequence, in sequence order, from the base ranks that own them.
    fn gather_to_root(&self, rank: &BaseRank<B>, x: &[B::Buf], rows: &[(usize, usize, usize)]) -> Result<Option<B::Buf>> {
        let d = self.cfg.d_model;
        let b = rank.index;
        // (sequence order index, unit, row) of the rows each base rank owns.
        let mine: Vec<(usize, usize, usize)> = rows.iter().enumerate().filter(|(_, r)| r.0 == b).map(|(n, r)| (n, r.1, r.2)).collect();
        let mut local = self.be.empty(mine.len() * d)?;
        for (k, &(_, u, at)) in mine.iter().enumerate() {
            self.be.copy_rows(&mut local, d, &x[u], &[RowCopy { src: at, dst: k, len: 1 }])?;
        }
        if b != 0 {
            if !mine.is_empty() {
                let n = mine.len() * d;
                let t = self.comm.issue(Category::TpAllgather, &rank.base, Some((local, vec![SendTo { peer: 0, range: 0..n }])), None)?;
                self.comm.complete(t)?;
            }
            return Ok(None);
        }
        let total = rows.len();
        let mut out = self.be.empty(total * d)?;
        let place = |owned: &[(usize, usize, usize)], buf: &B::Buf, out: &mut B::Buf| -> Result<()> {
            let copies: Vec<RowCopy> = owned.iter().enumerate().map(|(k, r)| RowCopy { src: k, dst: r.0, len: 1 }).collect();
            Ok(self.be.copy_rows(out, d, buf, &copies)?)
        };
        place(&mine, &local, &mut out)?;
        for other in 1..rank.base.size() {
            let theirs: Vec<(usize, usize, usize)> = rows.iter().enumerate().filter(|(_, r)| r.0 == other).map(|(n, r)| (n, r.1, r.2)).collect();
            if theirs.is_empty() {
                continue;
            }
            let n = theirs.len() * d;
            let t = self.comm.issue(Category::TpAllgather, &rank.base, None, Some((self.be.empty(n)?, vec![RecvPart { peer: other, range: 0..n }])))?;
            let got = self.comm.complete(t)?.ok_or_else(|| protocol("gathered rows arrived without their buffer"))?;
            place(&theirs, &got, &mut out)?;
        }
        Ok(Some(out))
    }

    /// The base's prefill with the pool active; the first tokens on the root.
    pub(super) fn base_prefill(&self, rank: &BaseRank<B>, batch: &BatchState<B>, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        let (s, d) = (batch.shape.seq_len, self.cfg.d_model);
        let units = batch.prefill_blocks(&self.spec);
        let mut x = Vec::with_capacity(units.len());
        for ub in &units {
            let (seqs, pos) = (&ub.unit.seqs, &ub.unit.positions);
            let tokens: Vec<u32> = seqs.clone().flat_map(|n| prompts[n * s + pos.start..n * s + pos.end].iter().copied()).collect();
            let all = tp::embed(self.be, self.cfg, &rank.edge.embedding, &tokens, seqs.len(), pos.len(), pos.start)?;
            x.push(self.be.gather_rows(&all, d, &ub.base_runs(rank.index))?);
        }
        self.base_pipeline(rank, &units, &mut x)?;
        // The last prompt row of each sequence, from the unit of its last chunk.
        let last: Vec<(usize, usize, usize)> = (0..batch.shape.nseq)
            .map(|n| {
                let u = units.iter().rposition(|ub| ub.unit.seqs.contains(&n)).ok_or_else(|| protocol("a sequence in no unit"))?;
                let ub = &units[u];
                let (owner, at) = ub.owner_of(ub.unit.row(n - ub.unit.seqs.start, s - 1)).ok_or_else(|| protocol("a last row with no owner"))?;
                Ok((owner, u, at))
            })
            .collect::<Result<_>>()?;
        let Some(h) = self.gather_to_root(rank, &x, &last)? else { return Ok(None) };
        let math = self.math();
        let logits = math.head(&rank.edge, &h, batch.shape.nseq, 1)?;
        Ok(Some(math.sample(&logits, batch.shape.nseq, keep_logits)?))
    }

    /// The base's half of a decode step with the pool active; the logits on the root.
    pub(super) fn base_decode(&self, rank: &BaseRank<B>, batch: &BatchState<B>) -> Result<Option<B::Buf>> {
        let (nseq, d) = (batch.shape.nseq, self.cfg.d_model);
        let units = batch.decode_blocks(&self.spec, batch.shape.seq_len);
        let all = tp::embed_step(self.be, self.cfg, &rank.edge.embedding, nseq)?;
        let mut x = Vec::with_capacity(units.len());
        for ub in &units {
            let runs: Vec<RowRun> = ub.base_runs(rank.index).into_iter().map(|r| RowRun::new(ub.unit.seqs.start + r.start, r.len)).collect();
            x.push(self.be.gather_rows(&all, d, &runs)?);
        }
        self.base_pipeline(rank, &units, &mut x)?;
        let rows: Vec<(usize, usize, usize)> = (0..nseq)
            .map(|n| {
                let (g, at) = batch.group_of(n);
                units[g].owner_of(at).map(|(owner, k)| (owner, g, k)).ok_or_else(|| protocol("a decode row with no owner"))
            })
            .collect::<Result<_>>()?;
        let Some(h) = self.gather_to_root(rank, &x, &rows)? else { return Ok(None) };
        Ok(Some(self.math().head(&rank.edge, &h, nseq, 1)?))
    }
}
