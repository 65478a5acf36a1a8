//! The baseline: static Megatron-style tensor parallel TP=t inside each
//! pipeline stage, pipeline parallel PP=p across layers. World rank
//! `stage * t + tp_rank`. Prefill is micro-batched with a fill/drain
//! schedule; decode steps flow through the stages one after another.

use super::{split_even, BatchSetup, BatchShape, EdgeWeights, KvCache, LayerShard, Phase, Result, StepOut, Strategy, TpMath};
use crate::backend::{Backend, StepVars};
use crate::comm::{Category, Comm, Group};
use crate::model::{ModelConfig, Weights};
use crate::spec::BaselineSpec;

/// One rank's part of a TP × PP deployment.
pub struct Baseline<'a, 'c, B: Backend> {
    be: &'a B,
    comm: &'a Comm<'c, B>,
    cfg: &'a ModelConfig,
    name: String,
    tp: usize,
    pp: usize,
    micro_batches: usize,
    /// `(stage, tp_rank)`, or None for a rank outside the deployment.
    place: Option<(usize, usize)>,
    /// Ranks of this stage.
    tp_group: Option<Group>,
    /// Ranks with this tp_rank across stages, in stage order.
    pp_group: Option<Group>,
    layers: Vec<LayerShard<B>>,
    edge: Option<EdgeWeights<B>>,
    cache: Option<KvCache<B>>,
    shape: Option<BatchShape>,
    /// Micro-batches of the current batch's prefill.
    batch_micro_batches: usize,
}

impl<'a, 'c, B: Backend> Baseline<'a, 'c, B> {
    /// Collective over `world`: builds the groups and loads this rank's weights.
    pub fn new(be: &'a B, comm: &'a Comm<'c, B>, cfg: &'a ModelConfig, spec: &BaselineSpec, name: String, world: &Group) -> Result<Self> {
        let (tp, pp) = (spec.tp, spec.pp);
        let me = world.rank();
        let place = (me < tp * pp).then(|| (me / tp, me % tp));
        let tp_group = comm.split(world, place.map(|(s, _)| s as u32), &format!("{name}/tp"))?;
        let pp_group = comm.split(world, place.map(|(_, t)| t as u32), &format!("{name}/pp"))?;
        let w = Weights::new(cfg);
        let mut layers = Vec::new();
        let mut edge = None;
        if let Some((stage, rank)) = place {
            let per = cfg.layers / pp;
            for l in stage * per..(stage + 1) * per {
                layers.push(LayerShard::load(be, &w, l, rank, tp)?);
            }
            edge = Some(EdgeWeights::load(be, &w, stage == 0, stage == pp - 1)?);
        }
        Ok(Self { be, comm, cfg, name, tp, pp, micro_batches: spec.micro_batches, place, tp_group, pp_group, layers, edge, cache: None, shape: None, batch_micro_batches: 1 })
    }

    fn math(&self) -> TpMath<'_, 'c, B> {
        TpMath { be: self.be, comm: self.comm, cfg: self.cfg }
    }

    /// Runs this stage's layers on `x` (rows of sequences `seqs` in `phase`).
    fn run_stage(&mut self, x: &mut B::Buf, seqs: std::ops::Range<usize>, phase: Phase) -> Result<()> {
        let math = TpMath { be: self.be, comm: self.comm, cfg: self.cfg };
        let cache = self.cache.as_mut().expect("begin_batch allocates the cache");
        let group = self.tp_group.as_ref().expect("deployed ranks have a tp group");
        for (i, layer) in self.layers.iter().enumerate() {
            math.layer(layer, i, x, seqs.clone(), phase, cache, group)?;
        }
        Ok(())
    }

    /// One pass through the pipeline for sequences `seqs` in `phase`. Stage 0
    /// embeds (`tokens` in prefill, the step's tokens in decode); the last
    /// stage's tp0 returns the logits of each sequence's last token.
    fn pipeline_pass(&mut self, tokens: &[u32], seqs: std::ops::Range<usize>, phase: Phase) -> Result<Option<B::Buf>> {
        let (stage, _) = self.place.expect("deployed rank");
        let (d, s) = (self.cfg.d_model, phase.tokens());
        let nseq = seqs.len();
        let pp = self.pp_group.as_ref().expect("pp group");
        let mut x = if stage == 0 {
            let edge = self.edge.as_ref().expect("edge weights");
            match phase {
                Phase::Prefill(_) => self.be.embed(&edge.embedding, d, tokens, nseq, s, 0)?,
                Phase::Decode => self.be.embed_step(&edge.embedding, d, nseq)?,
            }
        } else {
            self.comm.recv(Category::PpP2p, pp, stage - 1, nseq * s * d)?
        };
        self.run_stage(&mut x, seqs, phase)?;
        if stage + 1 < self.pp {
            let pp = self.pp_group.as_ref().expect("pp group");
            self.comm.send(Category::PpP2p, pp, stage + 1, &x)?;
            return Ok(None);
        }
        if !self.is_last_tp0() {
            // The leader alone computes the head and samples.
            return Ok(None);
        }
        Ok(Some(self.math().head(self.edge.as_ref().expect("edge weights"), &x, nseq, s)?))
    }

    fn is_last_tp0(&self) -> bool {
        matches!(self.place, Some((s, 0)) if s + 1 == self.pp)
    }
}

impl<'a, 'c, B: Backend> Strategy<B> for Baseline<'a, 'c, B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn role(&self) -> String {
        match self.place {
            None => "idle".into(),
            Some((_, t)) if self.pp == 1 => format!("tp{t}"),
            Some((s, t)) => format!("stage{s}-tp{t}"),
        }
    }

    fn is_leader(&self) -> bool {
        self.is_last_tp0()
    }

    fn begin_batch(&mut self, shape: BatchShape, micro_batch_cap: usize, _pool_usable: bool) -> Result<BatchSetup> {
        let wanted = if self.micro_batches == 0 { self.pp } else { self.micro_batches };
        let by_memory = shape.nseq.div_ceil(micro_batch_cap.max(1));
        let micro_batches = wanted.max(by_memory).min(shape.nseq);
        self.shape = Some(shape);
        self.batch_micro_batches = micro_batches;
        if self.place.is_none() {
            return Ok(BatchSetup { micro_batches, active: false, ..Default::default() });
        }
        let width = self.cfg.attn_width() / self.tp;
        self.cache = Some(KvCache::new(self.be, self.layers.len(), shape.nseq, shape.seq_len + shape.out_tokens, width)?);
        Ok(BatchSetup { micro_batches, active: true, ..Default::default() })
    }

    fn prefill(&mut self, prompts: &[u32], keep_logits: bool) -> Result<Option<StepOut>> {
        let Some((stage, _)) = self.place else { return Ok(None) };
        let shape = self.shape.expect("begin_batch first");
        let s = shape.seq_len;
        let mut outs: Vec<StepOut> = Vec::new();
        // Fill/drain: each stage takes micro-batch j as soon as the previous
        // stage hands it over; the blocking hand-off orders the schedule.
        for seqs in split_even(shape.nseq, self.batch_micro_batches) {
            let tokens = if stage == 0 { &prompts[seqs.start * s..seqs.end * s] } else { &[][..] };
            let nseq = seqs.len();
            if let Some(logits) = self.pipeline_pass(tokens, seqs, Phase::Prefill(s))? {
                outs.push(self.math().sample(&logits, nseq, keep_logits)?);
            }
        }
        if stage + 1 < self.pp {
            return Ok(None);
        }
        let tokens = outs.iter().flat_map(|o| o.tokens.iter().copied()).collect();
        let logits = keep_logits.then(|| outs.iter().flat_map(|o| o.logits.clone().unwrap_or_default()).collect());
        Ok(self.is_last_tp0().then_some(StepOut { tokens, logits }))
    }

    fn decode_begin(&mut self, step: usize, leader_tokens: &[u32]) -> Result<Option<StepVars>> {
        let Some((stage, tp_rank)) = self.place else { return Ok(None) };
        let shape = self.shape.expect("begin_batch first");
        let mut tokens = vec![0u32; shape.nseq];
        // The last stage's tp0 hands the tokens to stage 0's tp0, which
        // shares them with its stage.
        if self.is_last_tp0() {
            tokens.copy_from_slice(&leader_tokens[..shape.nseq]);
            if self.pp > 1 {
                self.comm.send_tokens(Category::PpP2p, self.pp_group.as_ref().expect("pp"), 0, &tokens);
            }
        }
        if stage == 0 {
            if self.pp > 1 && tp_rank == 0 {
                self.comm.recv_tokens(Category::PpP2p, self.pp_group.as_ref().expect("pp"), self.pp - 1, &mut tokens);
            }
            self.comm.broadcast_tokens(Category::Control, self.tp_group.as_ref().expect("tp"), 0, &mut tokens);
        } else {
            tokens.clear();
        }
        let pos = shape.seq_len + step - 1;
        Ok(Some(StepVars { pos, store_at: Some(pos), len: pos + 1, tokens }))
    }

    fn decode_device(&mut self) -> Result<Option<B::Buf>> {
        let nseq = self.shape.expect("begin_batch first").nseq;
        self.pipeline_pass(&[], 0..nseq, Phase::Decode)
    }

    fn decode_end(&mut self, logits: Option<&B::Buf>, keep_logits: bool) -> Result<Option<StepOut>> {
        let nseq = self.shape.expect("begin_batch first").nseq;
        match logits {
            Some(l) if self.is_last_tp0() => Ok(Some(self.math().sample(l, nseq, keep_logits)?)),
            _ => Ok(None),
        }
    }

    fn end_batch(&mut self) -> Result<()> {
        self.cache = None;
        self.shape = None;
        Ok(())
    }
}
