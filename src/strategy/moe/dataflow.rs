//! What an MoE rank does per phase. A replica's sequences are cut into the
//! same number of prefill micro-batches on every replica (some empty when a
//! replica has fewer sequences), and every pass walks the stage's layers:
//! the attention of the replica's rows with TP (an all-gather of the
//! normalised rows and a reduce-scatter of the output projection under SP,
//! an all-reduce without), then the MoE FFN of this rank's own rows with
//! its expert group ([`super::experts`]). Stages hand their rows on point
//! to point (each TP rank its own share under SP), so the blocking hand-offs
//! give the fill/drain schedule. The last stage's TP rank 0 of each replica
//! gathers the last row of every sequence, computes the head and samples;
//! the replicas' heads send their tokens to the leader (replica 0's).
//!
//! A replica with no sequences in a pass does no attention, sends nothing
//! between its stages, and still runs every MoE layer with no rows of its
//! own: its ranks serve their experts to the other replicas of their groups.

use super::experts::{ExpertGroup, ExpertTally, MoeFfn, Tallied};
use super::layout::{MoeSpec, Place};
use super::shards::MoeLayer;
use crate::backend::{Backend, DecodeShape, PrefillShape, RopePositions, RowCopy, RowRun, StepVars};
use crate::comm::{Category, Comm, Group, RecvPart, SendTo};
use crate::model::{ModelConfig, Weights};
use crate::strategy::common::groups::Groups;
use crate::strategy::common::kv::KvCache;
use crate::strategy::common::tp::{self, EdgeWeights};
use crate::strategy::common::{micro_batches, Phase};
use crate::strategy::{protocol, BatchSetup, BatchShape, BuildContext, Layout, Result, StepOut, Strategy};
use std::ops::Range;

/// Splits `n` items into exactly `m` consecutive parts, the later ones
/// empty when `n < m` (every replica runs the same number of micro-batches,
/// and the first replicas get the sequences of a small batch).
fn split_exact(n: usize, m: usize) -> Vec<Range<usize>> {
    (0..m).map(|j| (j * n).div_ceil(m)..((j + 1) * n).div_ceil(m)).collect()
}

/// A deployed rank with its groups and weights.
struct MoeRank<B: Backend> {
    place: Place,
    world_rank: usize,
    tp: Group,
    pp: Group,
    ep: Group,
    /// The heads of every replica (on the heads only).
    heads: Option<Group>,
    layers: Vec<MoeLayer<B>>,
    edge: EdgeWeights<B>,
}

/// The batch in flight.
struct BatchState<B: Backend> {
    shape: BatchShape,
    micro_batches: usize,
    /// This replica's sequences of the batch.
    seqs: Range<usize>,
    cache: KvCache<B>,
    tally: ExpertTally,
}

/// The rows one pass covers on this rank's replica: sequences `seqs` of
/// the phase's tokens each (a rank keeps its SP share of them, or all of
/// them without SP).
#[derive(Clone, Debug)]
struct Pass {
    /// The replica's sequences, as indices of its KV cache.
    seqs: Range<usize>,
    phase: Phase,
}

impl Pass {
    fn rows(&self) -> usize {
        self.seqs.len() * self.phase.tokens()
    }
}

/// One rank's part of an EP × TP × PP × DP deployment.
pub struct Moe<'a, 'c, B: Backend> {
    be: &'a B,
    comm: &'a Comm<'c, B>,
    cfg: &'a ModelConfig,
    spec: MoeSpec,
    /// `None` for a rank outside the deployment.
    rank: Option<MoeRank<B>>,
    batch: Option<BatchState<B>>,
}

/// A deployed rank working on a batch: what every phase's steps need.
struct Flow<'f, 'a, 'c, B: Backend> {
    be: &'a B,
    comm: &'a Comm<'c, B>,
    cfg: &'a ModelConfig,
    spec: &'f MoeSpec,
    rank: &'f MoeRank<B>,
    batch: &'f mut BatchState<B>,
}

impl<'a, 'c, B: Backend> Moe<'a, 'c, B> {
    /// Collective over the world: builds the groups and loads this rank's weights.
    pub fn new(cx: BuildContext<'a, 'c, B>, spec: &MoeSpec, name: &str, layout: &Layout) -> Result<Self> {
        let BuildContext { be, comm, cfg, world } = cx;
        let mut groups = Groups::create(comm, world, &layout.groups, name)?;
        let world_rank = world.world_ranks[world.rank()];
        let rank = match spec.place(world_rank) {
            None => None,
            Some(place) => {
                let w = Weights::open(cfg)?;
                let per = spec.layers_per_stage(cfg);
                let held = spec.experts_of(cfg, place.ep_rank);
                let layers = (place.stage * per..(place.stage + 1) * per).map(|l| MoeLayer::load(be, &w, l, place.tp_rank, spec.tp, held.clone())).collect::<Result<Vec<_>>>()?;
                let edge = EdgeWeights::load(be, &w, place.stage == 0, place.stage + 1 == spec.pp)?;
                Some(MoeRank { place, world_rank, tp: groups.take("tp")?, pp: groups.take("pp")?, ep: groups.take("ep")?, heads: groups.take("heads").ok(), layers, edge })
            }
        };
        Ok(Self { be, comm, cfg, spec: spec.clone(), rank, batch: None })
    }

    /// The deployed rank and its batch, when both are there.
    fn flow(&mut self) -> Option<Flow<'_, 'a, 'c, B>> {
        match (&self.rank, &mut self.batch) {
            (Some(rank), Some(batch)) => Some(Flow { be: self.be, comm: self.comm, cfg: self.cfg, spec: &self.spec, rank, batch }),
            _ => None,
        }
    }
}

impl<B: Backend> Flow<'_, '_, '_, B> {
    /// The last stage's TP rank 0 of a replica: it computes the head.
    fn is_head(&self) -> bool {
        self.rank.place.stage + 1 == self.spec.pp && self.rank.place.tp_rank == 0
    }

    fn is_leader(&self) -> bool {
        self.is_head() && self.rank.place.replica == 0
    }

    /// Rows per TP rank when a pass has `rows` (SP), or all of them.
    fn share(&self, rows: usize) -> usize {
        if self.spec.sp {
            rows.div_ceil(self.spec.tp)
        } else {
            rows
        }
    }

    /// Of `rows` split in TP shares of `per`, the ones TP rank `i` owns.
    fn owned(rows: usize, per: usize, i: usize) -> Range<usize> {
        (i * per).min(rows)..((i + 1) * per).min(rows)
    }

    /// `src`'s rows `run` at the start of a zeroed buffer of `rows` rows
    /// (a TP rank's share, its padding zero).
    fn padded(&self, src: &B::Buf, run: Range<usize>, rows: usize) -> Result<B::Buf> {
        let d = self.cfg.d_model;
        let mut out = self.be.zeros(rows * d)?;
        self.be.copy_rows(&mut out, d, src, &[RowCopy { src: run.start, dst: 0, len: run.len() }])?;
        Ok(out)
    }

    /// Attention of layer `l` over the pass's rows, added to this rank's rows `x`.
    fn attention(&mut self, l: usize, x: &mut B::Buf, pass: &Pass) -> Result<()> {
        let (be, comm) = (self.be, self.comm);
        let (batch, rank) = (&mut *self.batch, self.rank);
        let layer = &rank.layers[l];
        let (d, dh, t) = (self.cfg.d_model, self.cfg.head_dim, self.spec.tp);
        let rows = pass.rows();
        let local = if self.spec.sp { rows.div_ceil(t) } else { rows };
        let h = be.rmsnorm(x, &layer.attn_norm, local, d, self.cfg.norm_eps)?;
        let full = if self.spec.sp && t > 1 { comm.all_gather(Category::TpAllgather, &rank.tp, &h)? } else { h };
        let (width, kv_heads) = (layer.heads * dh, layer.kv_heads);
        let qkv = be.matmul(&full, &layer.qkv, rows, d, width + 2 * kv_heads * dh)?;
        let prompt = [(0, pass.phase.tokens())];
        let positions = if pass.phase == Phase::Decode { RopePositions::Step } else { RopePositions::Segments(&prompt) };
        let (q, k, v) = tp::split_qkv(be, self.cfg, &qkv, rows, layer.heads, kv_heads, positions)?;
        let nseq = pass.seqs.len();
        let o = match pass.phase {
            Phase::Prefill(s) => {
                batch.cache.store_prompt(be, l, pass.seqs.clone(), s, &k, &v)?;
                be.attention_prefill(&q, &k, &v, PrefillShape { nseq, sq: s, skv: s, kv_seq_stride: s, heads: layer.heads, kv_heads, head_dim: dh, q_offset: 0 })?.0
            }
            Phase::Decode => {
                batch.cache.store_step(be, l, &k, &v)?;
                be.attention_decode_step(&q, &batch.cache.k[l], &batch.cache.v[l], DecodeShape { nseq, cap: batch.cache.cap, len: 0, heads: layer.heads, kv_heads, head_dim: dh })?.0
            }
        };
        let mut y = be.matmul(&o, &layer.out, rows, width, d)?;
        if t > 1 && self.spec.sp {
            let all = if local * t == rows { y } else { self.padded(&y, 0..rows, local * t)? };
            let mut mine = be.empty(local * d)?;
            comm.reduce_scatter(Category::TpReducescatter, &rank.tp, &all, &mut mine)?;
            y = mine;
        } else if t > 1 {
            comm.all_reduce(Category::TpAllreduce, &rank.tp, &mut y)?;
        }
        be.add_assign(x, &y)?;
        Ok(())
    }

    /// The MoE FFN of layer `l` on this rank's rows `x` (`local` rows held,
    /// of a pass of `rows`), added to them.
    fn moe_ffn(&mut self, l: usize, x: &mut B::Buf, rows: usize, decode: bool) -> Result<()> {
        let (be, d, t) = (self.be, self.cfg.d_model, self.spec.tp);
        let (spec, cfg) = (self.spec, self.cfg);
        let (batch, rank) = (&mut *self.batch, self.rank);
        let layer = &rank.layers[l];
        let per = rows.div_ceil(t);
        let local = if spec.sp { per } else { rows };
        // The rows this rank routes: its SP share, or without SP its part of the replicated rows.
        let mine = Self::owned(rows, per, rank.place.tp_rank);
        let capacity = |n: usize| spec.capacity(cfg, n);
        let ffn = MoeFfn { be, comm: self.comm, cfg, capacity: &capacity };
        let experts = ExpertGroup { group: (spec.ep > 1).then_some(&rank.ep), held: spec.experts_of(cfg, rank.place.ep_rank) };
        let at = Tallied { layer: l, decode };
        if rows == 0 {
            ffn.forward(layer, &be.empty(0)?, 0, &experts, &mut batch.tally, at)?;
            return Ok(());
        }
        let h = be.rmsnorm(x, &layer.ffn_norm, local, d, cfg.norm_eps)?;
        let routed = if spec.sp || t == 1 { h } else { be.gather_rows(&h, d, &[RowRun::new(mine.start, mine.len())])? };
        let out = ffn.forward(layer, &routed, mine.len(), &experts, &mut batch.tally, at)?;
        let y = if spec.sp || t == 1 {
            if mine.len() == local {
                out
            } else {
                self.padded(&out, 0..mine.len(), local)?
            }
        } else {
            // Every TP rank's part, gathered back into the replicated rows.
            let part = if mine.len() == per { out } else { self.padded(&out, 0..mine.len(), per)? };
            self.comm.all_gather(Category::TpAllgather, &self.rank.tp, &part)?
        };
        be.add_assign(x, &y)?;
        Ok(())
    }

    /// This rank's rows of a pass entering the stage: embedded on stage 0
    /// (`tokens` in prefill, the step's in decode), received from the
    /// previous stage otherwise.
    fn stage_input(&self, tokens: &[u32], pass: &Pass) -> Result<B::Buf> {
        let (be, d) = (self.be, self.cfg.d_model);
        let rows = pass.rows();
        let local = self.share(rows);
        let p = &self.rank.place;
        if p.stage > 0 {
            return Ok(self.comm.recv(Category::PpP2p, &self.rank.pp, p.stage - 1, local * d)?);
        }
        let nseq = pass.seqs.len();
        let all = match pass.phase {
            Phase::Prefill(s) => tp::embed(be, self.cfg, &self.rank.edge.embedding, tokens, nseq, s, 0)?,
            Phase::Decode => tp::embed_step(be, self.cfg, &self.rank.edge.embedding, nseq)?,
        };
        if !self.spec.sp || self.spec.tp == 1 {
            return Ok(all);
        }
        self.padded(&all, Self::owned(rows, local, p.tp_rank), local)
    }

    /// The logits of the last token of every sequence of the pass, on the
    /// head (the rows come to TP rank 0 from the ranks holding them).
    fn head(&self, x: &B::Buf, pass: &Pass) -> Result<Option<B::Buf>> {
        let (be, d) = (self.be, self.cfg.d_model);
        let (nseq, s) = (pass.seqs.len(), pass.phase.tokens());
        let rows = pass.rows();
        let (t, me) = (self.spec.tp, self.rank.place.tp_rank);
        let last = |n: usize| n * s + s - 1;
        let sharded = self.spec.sp && t > 1;
        let per = self.share(rows);
        // The sequences whose last row TP rank i holds (contiguous: ownership follows the row).
        let owners = |i: usize| -> Range<usize> {
            if !sharded {
                return if i == 0 { 0..nseq } else { 0..0 };
            }
            let rows_of = Self::owned(rows, per, i);
            let first = (0..nseq).find(|&n| last(n) >= rows_of.start).unwrap_or(nseq);
            let end = (0..nseq).find(|&n| last(n) >= rows_of.end).unwrap_or(nseq);
            first..end
        };
        let mine = owners(me);
        let offset = if sharded { me * per } else { 0 };
        let runs: Vec<RowRun> = mine.clone().map(|n| RowRun::new(last(n) - offset, 1)).collect();
        if me != 0 {
            if !mine.is_empty() {
                let rows_buf = be.gather_rows(x, d, &runs)?;
                let t = self.comm.issue(Category::TpAllgather, &self.rank.tp, Some((rows_buf, vec![SendTo { peer: 0, range: 0..mine.len() * d }])), None)?;
                self.comm.complete(t)?;
            }
            return Ok(None);
        }
        let mut gathered = be.empty(nseq * d)?;
        if !mine.is_empty() {
            let own = be.gather_rows(x, d, &runs)?;
            be.copy_rows(&mut gathered, d, &own, &[RowCopy { src: 0, dst: 0, len: mine.len() }])?;
        }
        let parts: Vec<RecvPart> = (1..t).map(|i| (i, owners(i))).filter(|(_, r)| !r.is_empty()).map(|(i, r)| RecvPart { peer: i, range: r.start * d..r.end * d }).collect();
        if !parts.is_empty() {
            let t = self.comm.issue(Category::TpAllgather, &self.rank.tp, None, Some((gathered, parts)))?;
            gathered = self.comm.complete(t)?.ok_or_else(|| protocol("the head's gather returned no buffer"))?;
        }
        let hn = be.rmsnorm(&gathered, &self.rank.edge.final_norm, nseq, d, self.cfg.norm_eps)?;
        Ok(Some(be.matmul(&hn, &self.rank.edge.head, nseq, d, self.cfg.vocab)?))
    }

    /// One pass of the replica's sequences through this rank's stage;
    /// the logits on the head.
    fn pass(&mut self, tokens: &[u32], pass: &Pass) -> Result<Option<B::Buf>> {
        let rows = pass.rows();
        let decode = pass.phase == Phase::Decode;
        let layers = self.rank.layers.len();
        if rows == 0 {
            // Nothing of this replica's: serve the expert group, layer by layer.
            let mut none = self.be.empty(0)?;
            for l in 0..layers {
                self.moe_ffn(l, &mut none, 0, decode)?;
            }
            return Ok(None);
        }
        let mut x = self.stage_input(tokens, pass)?;
        for l in 0..layers {
            self.attention(l, &mut x, pass)?;
            self.moe_ffn(l, &mut x, rows, decode)?;
        }
        let p = &self.rank.place;
        if p.stage + 1 < self.spec.pp {
            self.comm.send(Category::PpP2p, &self.rank.pp, p.stage + 1, &x)?;
            return Ok(None);
        }
        self.head(&x, pass)
    }

    /// On the head: the pass's greedy tokens (and logits); the leader gets
    /// every replica's, in sequence order, from the other heads.
    fn collect(&self, mine: StepOut, keep_logits: bool) -> Result<Option<StepOut>> {
        let d = self.spec.dp;
        let batch = &*self.batch;
        let heads = self.rank.heads.as_ref().ok_or_else(|| protocol("only the replicas' heads collect tokens"))?;
        if !self.is_leader() {
            if !mine.tokens.is_empty() {
                self.comm.send_tokens(Category::Control, heads, 0, &mine.tokens)?;
                if let Some(l) = &mine.logits {
                    self.comm.send(Category::Control, heads, 0, &self.be.upload_f32(l)?)?;
                }
            }
            return Ok(None);
        }
        let mut parts = vec![mine];
        for (r, seqs) in split_exact(batch.shape.nseq, d).into_iter().enumerate().skip(1) {
            if seqs.is_empty() {
                continue;
            }
            let mut tokens = vec![0u32; seqs.len()];
            self.comm.recv_tokens(Category::Control, heads, r, &mut tokens)?;
            let logits = if keep_logits {
                let mut buf = self.be.zeros_f32(seqs.len() * self.cfg.vocab)?;
                self.comm.recv_into(Category::Control, heads, r, &mut buf)?;
                Some(self.be.download(&buf)?)
            } else {
                None
            };
            parts.push(StepOut { tokens, logits });
        }
        Ok(Some(StepOut::concat(&parts, keep_logits)))
    }

    /// Greedy tokens of the head's logits.
    fn sample(&self, logits: &B::Buf, nseq: usize, keep_logits: bool) -> Result<StepOut> {
        let tokens = self.be.argmax(logits, nseq, self.cfg.vocab)?;
        let logits = if keep_logits { Some(self.be.download(logits)?) } else { None };
        Ok(StepOut { tokens, logits })
    }
}

impl<B: Backend> Flow<'_, '_, '_, B> {
    fn prefill(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        let (s, seqs, mbs) = (self.batch.shape.seq_len, self.batch.seqs.clone(), self.batch.micro_batches);
        let mut outs = Vec::new();
        for part in split_exact(seqs.len(), mbs) {
            let tokens = &prompts[(seqs.start + part.start) * s..(seqs.start + part.end) * s];
            let nseq = part.len();
            if let Some(logits) = self.pass(tokens, &Pass { seqs: part, phase: Phase::Prefill(s) })? {
                outs.push(self.sample(&logits, nseq, keep_logits)?);
            }
        }
        if !self.is_head() {
            return Ok(None);
        }
        self.collect(StepOut::concat(&outs, keep_logits), keep_logits)
    }

    /// The leader's tokens to every replica's head, on to its first stage,
    /// then its TP group; the step's scalars.
    fn decode_begin(&mut self, step: usize, leader_tokens: &[u32]) -> Result<StepVars> {
        let (shape, seqs) = (self.batch.shape, self.batch.seqs.clone());
        let (p, comm) = (self.rank.place, self.comm);
        let mut tokens = Vec::new();
        if self.is_head() {
            let mut all = vec![0u32; shape.nseq];
            if self.is_leader() {
                all.copy_from_slice(&leader_tokens[..shape.nseq]);
            }
            let heads = self.rank.heads.as_ref().ok_or_else(|| protocol("a head without the heads group"))?;
            comm.broadcast_tokens(Category::Control, heads, 0, &mut all)?;
            tokens = all[seqs.clone()].to_vec();
            if self.spec.pp > 1 && !seqs.is_empty() {
                comm.send_tokens(Category::PpP2p, &self.rank.pp, 0, &tokens)?;
            }
        }
        if p.stage == 0 && !seqs.is_empty() {
            tokens.resize(seqs.len(), 0);
            if self.spec.pp > 1 && p.tp_rank == 0 {
                comm.recv_tokens(Category::PpP2p, &self.rank.pp, self.spec.pp - 1, &mut tokens)?;
            }
            comm.broadcast_tokens(Category::Control, &self.rank.tp, 0, &mut tokens)?;
        } else {
            tokens.clear();
        }
        let pos = shape.seq_len + step - 1;
        Ok(StepVars { pos, store_at: Some(pos), len: pos + 1, tokens })
    }

    fn decode_end(&mut self, logits: Option<&B::Buf>, keep_logits: bool) -> Result<Option<StepOut>> {
        if !self.is_head() {
            return Ok(None);
        }
        let mine = match logits {
            Some(l) => self.sample(l, self.batch.seqs.len(), keep_logits)?,
            None => StepOut { tokens: Vec::new(), logits: keep_logits.then(Vec::new) },
        };
        self.collect(mine, keep_logits)
    }
}

impl<'a, 'c, B: Backend> Strategy<B> for Moe<'a, 'c, B> {
    fn begin_batch(&mut self, shape: BatchShape, micro_batch_cap: usize, _pool_usable: bool) -> Result<BatchSetup> {
        let wanted = if self.spec.micro_batches == 0 { self.spec.pp } else { self.spec.micro_batches };
        // The busiest replica decides, so every replica runs as many.
        let most = shape.nseq.div_ceil(self.spec.dp);
        let micro_batches = micro_batches(wanted, most, micro_batch_cap).max(1);
        let Some(rank) = &self.rank else {
            return Ok(BatchSetup { micro_batches, active: false, ..Default::default() });
        };
        let seqs = split_exact(shape.nseq, self.spec.dp)[rank.place.replica].clone();
        let width = self.cfg.kv_heads_per_rank(self.spec.tp) * self.cfg.head_dim;
        let cache = KvCache::new(self.be, rank.layers.len(), seqs.len(), shape.context(), width)?;
        let (per, stage) = (self.spec.layers_per_stage(self.cfg), rank.place.stage);
        let tally = ExpertTally::new(stage * per..(stage + 1) * per, self.cfg.experts.map_or(0, |e| e.count));
        self.batch = Some(BatchState { shape, micro_batches, seqs, cache, tally });
        Ok(BatchSetup { micro_batches, active: true, ..Default::default() })
    }

    fn prefill(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        match self.flow() {
            Some(mut f) => f.prefill(prompts, keep_logits),
            None => Ok(None),
        }
    }

    fn decode_begin(&mut self, step: usize, leader_tokens: &[u32]) -> Result<Option<StepVars>> {
        match self.flow() {
            Some(mut f) => f.decode_begin(step, leader_tokens).map(Some),
            None => Ok(None),
        }
    }

    fn decode_device(&mut self) -> Result<Option<B::Buf>> {
        let Some(mut f) = self.flow() else { return Ok(None) };
        let nseq = f.batch.seqs.len();
        f.pass(&[], &Pass { seqs: 0..nseq, phase: Phase::Decode })
    }

    fn decode_end(&mut self, logits: Option<&B::Buf>, keep_logits: bool) -> Result<Option<StepOut>> {
        match self.flow() {
            Some(mut f) => f.decode_end(logits, keep_logits),
            None => Ok(None),
        }
    }

    fn end_batch(&mut self) -> Result<()> {
        self.batch = None;
        Ok(())
    }

    /// Each MoE layer reads its expert counts back to the host.
    fn decode_recordable(&self) -> bool {
        false
    }

    fn take_expert_loads(&mut self) -> Vec<crate::metrics::ExpertLoad> {
        match (&self.rank, &self.batch) {
            (Some(r), Some(b)) => b.tally.loads(r.world_rank),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exact_split_keeps_every_part_even_when_empty() {
        assert_eq!(split_exact(3, 4), vec![0..1, 1..2, 2..3, 3..3]);
        assert_eq!(split_exact(5, 2), vec![0..3, 3..5]);
    }
}
