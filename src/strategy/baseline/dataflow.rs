//! What a baseline rank does per phase. Prefill is micro-batched with a
//! fill/drain schedule: each stage takes micro-batch j as soon as the
//! previous stage hands it over, and the blocking hand-offs order the
//! schedule. Decode steps flow through the stages one after another; the
//! last stage's tp0 holds the tokens and sends each step's tokens to stage 0.

use super::layout::{BaselineSpec, Place};
use crate::backend::{Backend, StepVars};
use crate::comm::{Category, Comm, Group};
use crate::model::{ModelConfig, Weights};
use crate::strategy::common::groups::Groups;
use crate::strategy::common::kv::KvCache;
use crate::strategy::common::tp::{self, EdgeWeights, LayerShard, Span, TpMath};
use crate::strategy::common::{micro_batches, split_even, Phase};
use crate::strategy::{protocol, BatchSetup, BatchShape, BuildContext, Layout, Result, StepOut, Strategy};

/// A rank of one pipeline stage, with its groups and weights.
struct StageRank<B: Backend> {
    place: Place,
    /// Ranks of this stage.
    tp: Group,
    /// Ranks with this tp_rank across stages, in stage order.
    pp: Group,
    layers: Vec<LayerShard<B>>,
    edge: EdgeWeights<B>,
}

/// The batch in flight.
struct BatchState<B: Backend> {
    shape: BatchShape,
    micro_batches: usize,
    cache: KvCache<B>,
}

/// One rank's part of a TP × PP deployment.
pub struct Baseline<'a, 'c, B: Backend> {
    be: &'a B,
    comm: &'a Comm<'c, B>,
    cfg: &'a ModelConfig,
    tp: usize,
    pp: usize,
    micro_batches: usize,
    /// `None` for a rank outside the deployment.
    rank: Option<StageRank<B>>,
    batch: Option<BatchState<B>>,
}

impl<'a, 'c, B: Backend> Baseline<'a, 'c, B> {
    /// Collective over the world: builds the groups and loads this rank's weights.
    pub fn new(cx: BuildContext<'a, 'c, B>, spec: &BaselineSpec, name: &str, layout: &Layout) -> Result<Self> {
        let BuildContext { be, comm, cfg, world } = cx;
        let mut groups = Groups::create(comm, world, &layout.groups, name)?;
        let rank = match spec.place(world.rank()) {
            None => None,
            Some(place) => {
                let w = Weights::open(cfg)?;
                let per = spec.layers_per_stage(cfg);
                let layers = (place.stage * per..(place.stage + 1) * per).map(|l| LayerShard::load(be, &w, l, place.tp_rank, spec.tp)).collect::<Result<Vec<_>>>()?;
                let edge = EdgeWeights::load(be, &w, place.stage == 0, place.stage + 1 == spec.pp)?;
                Some(StageRank { place, tp: groups.take("tp")?, pp: groups.take("pp")?, layers, edge })
            }
        };
        Ok(Self { be, comm, cfg, tp: spec.tp, pp: spec.pp, micro_batches: spec.micro_batches, rank, batch: None })
    }

    fn math(&self) -> TpMath<'_, 'c, B> {
        TpMath { be: self.be, comm: self.comm, cfg: self.cfg }
    }

    fn is_last_tp0(&self) -> bool {
        matches!(&self.rank, Some(r) if r.place.stage + 1 == self.pp && r.place.tp_rank == 0)
    }

    /// One pass through the pipeline for the sequences of `span`. Stage 0
    /// embeds (`tokens` in prefill, the step's tokens in decode); the last
    /// stage's tp0 returns the logits of each sequence's last token.
    fn pipeline_pass(&mut self, tokens: &[u32], span: Span) -> Result<Option<B::Buf>> {
        let (Some(rank), Some(batch)) = (&self.rank, &mut self.batch) else { return Err(protocol("a pipeline pass outside a batch or the deployment")) };
        let math = TpMath { be: self.be, comm: self.comm, cfg: self.cfg };
        let (d, s, nseq) = (self.cfg.d_model, span.phase.tokens(), span.seqs.len());
        let stage = rank.place.stage;
        let mut x = if stage == 0 {
            match span.phase {
                Phase::Prefill(_) => tp::embed(self.be, self.cfg, &rank.edge.embedding, tokens, nseq, s, 0)?,
                Phase::Decode => tp::embed_step(self.be, self.cfg, &rank.edge.embedding, nseq)?,
            }
        } else {
            self.comm.recv(Category::PpP2p, &rank.pp, stage - 1, nseq * s * d)?
        };
        for (i, layer) in rank.layers.iter().enumerate() {
            math.layer(layer, i, &mut x, &span, &mut batch.cache, &rank.tp)?;
        }
        if stage + 1 < self.pp {
            self.comm.send(Category::PpP2p, &rank.pp, stage + 1, &x)?;
            return Ok(None);
        }
        if rank.place.tp_rank != 0 {
            // The leader alone computes the head and samples.
            return Ok(None);
        }
        Ok(Some(math.head(&rank.edge, &x, nseq, s)?))
    }
}

impl<'a, 'c, B: Backend> Strategy<B> for Baseline<'a, 'c, B> {
    fn begin_batch(&mut self, shape: BatchShape, micro_batch_cap: usize, _pool_usable: bool) -> Result<BatchSetup> {
        let wanted = if self.micro_batches == 0 { self.pp } else { self.micro_batches };
        let micro_batches = micro_batches(wanted, shape.nseq, micro_batch_cap);
        let Some(rank) = &self.rank else {
            return Ok(BatchSetup { micro_batches, active: false, ..Default::default() });
        };
        let width = self.cfg.kv_heads_per_rank(self.tp) * self.cfg.head_dim;
        let cache = KvCache::new(self.be, rank.layers.len(), shape.nseq, shape.context(), width)?;
        self.batch = Some(BatchState { shape, micro_batches, cache });
        Ok(BatchSetup { micro_batches, active: true, ..Default::default() })
    }

    fn prefill(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        let (Some(rank), Some(batch)) = (&self.rank, &self.batch) else { return Ok(None) };
        let (stage, shape, mbs) = (rank.place.stage, batch.shape, batch.micro_batches);
        let s = shape.seq_len;
        let mut outs: Vec<StepOut> = Vec::new();
        // Fill/drain: the blocking hand-offs between stages order the schedule.
        for seqs in split_even(shape.nseq, mbs) {
            let tokens = if stage == 0 { &prompts[seqs.start * s..seqs.end * s] } else { &[][..] };
            let nseq = seqs.len();
            if let Some(logits) = self.pipeline_pass(tokens, Span { seqs, phase: Phase::Prefill(s) })? {
                outs.push(self.math().sample(&logits, nseq, keep_logits)?);
            }
        }
        Ok(self.is_last_tp0().then(|| StepOut::concat(&outs, keep_logits)))
    }

    fn decode_begin(&mut self, step: usize, leader_tokens: &[u32]) -> Result<Option<StepVars>> {
        let (Some(rank), Some(batch)) = (&self.rank, &self.batch) else { return Ok(None) };
        let shape = batch.shape;
        let mut tokens = vec![0u32; shape.nseq];
        // The last stage's tp0 hands the tokens to stage 0's tp0, which
        // shares them with its stage.
        if self.is_last_tp0() {
            tokens.copy_from_slice(&leader_tokens[..shape.nseq]);
            if self.pp > 1 {
                self.comm.send_tokens(Category::PpP2p, &rank.pp, 0, &tokens)?;
            }
        }
        if rank.place.stage == 0 {
            if self.pp > 1 && rank.place.tp_rank == 0 {
                self.comm.recv_tokens(Category::PpP2p, &rank.pp, self.pp - 1, &mut tokens)?;
            }
            self.comm.broadcast_tokens(Category::Control, &rank.tp, 0, &mut tokens)?;
        } else {
            tokens.clear();
        }
        let pos = shape.seq_len + step - 1;
        Ok(Some(StepVars { pos, store_at: Some(pos), len: pos + 1, tokens }))
    }

    fn decode_device(&mut self) -> Result<Option<B::Buf>> {
        let Some(batch) = &self.batch else { return Ok(None) };
        let nseq = batch.shape.nseq;
        self.pipeline_pass(&[], Span { seqs: 0..nseq, phase: Phase::Decode })
    }

    fn decode_end(&mut self, logits: Option<&B::Buf>, keep_logits: bool) -> Result<Option<StepOut>> {
        match (logits, &self.batch) {
            (Some(l), Some(batch)) if self.is_last_tp0() => Ok(Some(self.math().sample(l, batch.shape.nseq, keep_logits)?)),
            _ => Ok(None),
        }
    }

    fn end_batch(&mut self) -> Result<()> {
        self.batch = None;
        Ok(())
    }
}
