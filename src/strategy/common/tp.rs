//! Megatron-style tensor parallelism on one rank: the shard of a decoder
//! layer a rank holds (heads for QKV and the output projection, columns for
//! the FFN), the embedding and LM head, and the layer math with one
//! all-reduce after each row-parallel GEMM. The baseline runs it inside each
//! pipeline stage and FA Pool's base group runs it when the pool is inactive.

use super::kv::KvCache;
use super::Phase;
use crate::backend::{Backend, DecodeShape, PrefillShape, QkvSplit, Rope, RopePositions, RowRun};
use crate::comm::{Category, Comm, Group};
use crate::model::{FfnKind, ModelConfig, PositionKind, Tensor, Weights};
use crate::strategy::{protocol, Result, StepOut};

/// One rank's shard of a decoder layer (tensor parallel over `heads` and FFN columns).
pub struct LayerShard<B: Backend> {
    pub attn_norm: B::Buf,
    pub ffn_norm: B::Buf,
    pub qkv: B::Buf,
    pub out: B::Buf,
    pub up: B::Buf,
    pub gate: Option<B::Buf>,
    pub down: B::Buf,
    /// Query heads on this rank.
    pub heads: usize,
    /// K/V heads on this rank: `kv_heads / tp`, or with more ranks than K/V
    /// heads the one K/V head its query heads read (replicated on
    /// `tp / kv_heads` ranks).
    pub kv_heads: usize,
    /// FFN columns on this rank.
    pub ffn: usize,
}

impl<B: Backend> LayerShard<B> {
    /// Shard `rank` of `tp` of layer `l`.
    pub fn load(be: &B, w: &Weights, l: usize, rank: usize, tp: usize) -> Result<Self> {
        let c = w.cfg;
        let (d, hl, fl) = (c.d_model, c.heads / tp, c.ffn / tp);
        let heads = rank * hl..(rank + 1) * hl;
        let kv_heads = c.kv_heads_of(heads.clone()).len();
        let (dh, cols) = (c.head_dim, rank * fl..(rank + 1) * fl);
        Ok(Self {
            attn_norm: w.upload_full(be, Tensor::AttnNorm(l))?,
            ffn_norm: w.upload_full(be, Tensor::FfnNorm(l))?,
            qkv: w.upload_shard(be, Tensor::Qkv(l), 0..d, &w.qkv_columns(heads.clone()))?,
            out: w.upload_shard(be, Tensor::Out(l), heads.start * dh..heads.end * dh, &[0..d])?,
            up: w.upload_shard(be, Tensor::Up(l), 0..d, std::slice::from_ref(&cols))?,
            gate: if c.ffn_kind.gated() { Some(w.upload_shard(be, Tensor::Gate(l), 0..d, std::slice::from_ref(&cols))?) } else { None },
            down: w.upload_shard(be, Tensor::Down(l), cols, &[0..d])?,
            heads: hl,
            kv_heads,
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
            embedding: if embedding { w.upload_full(be, Tensor::Embedding)? } else { none()? },
            final_norm: if head { w.upload_full(be, Tensor::FinalNorm)? } else { none()? },
            head: if head { w.upload_full(be, Tensor::Head)? } else { none()? },
        })
    }
}

/// `table[token]` plus the sinusoidal encoding of `pos0..pos0 + n` in each of
/// `nseq` sequences, or the token rows alone for a model with rotary positions.
pub fn embed<B: Backend>(be: &B, cfg: &ModelConfig, table: &B::Buf, tokens: &[u32], nseq: usize, n: usize, pos0: usize) -> Result<B::Buf> {
    Ok(match cfg.positions {
        PositionKind::Sinusoidal => be.embed(table, cfg.d_model, tokens, nseq, n, pos0)?,
        PositionKind::Rope => be.embed_tokens(table, cfg.d_model, &tokens[..nseq * n])?,
    })
}

/// [`embed`] of the decode step's tokens at the step's position.
pub fn embed_step<B: Backend>(be: &B, cfg: &ModelConfig, table: &B::Buf, nseq: usize) -> Result<B::Buf> {
    Ok(match cfg.positions {
        PositionKind::Sinusoidal => be.embed_step(table, cfg.d_model, nseq)?,
        PositionKind::Rope => be.embed_step_tokens(table, cfg.d_model, nseq)?,
    })
}

/// q, k and v of `rows` fused QKV rows (`q_heads` query and `kv_heads` K/V
/// heads), q and k rotated by their positions when the model has rotary ones.
pub fn split_qkv<B: Backend>(be: &B, cfg: &ModelConfig, qkv: &B::Buf, rows: usize, q_heads: usize, kv_heads: usize, positions: RopePositions) -> Result<(B::Buf, B::Buf, B::Buf)> {
    let dh = cfg.head_dim;
    let rope = (cfg.positions == PositionKind::Rope).then_some(Rope { head_dim: dh, theta: cfg.rope_theta, positions });
    Ok(be.split_qkv_rope(qkv, rows, &QkvSplit { q_width: q_heads * dh, kv_width: kv_heads * dh, rope })?)
}

/// The rows one pass through a layer covers: sequences `seqs` of the batch
/// in `phase`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub seqs: std::ops::Range<usize>,
    pub phase: Phase,
}

impl Span {
    /// Rows of the span's activations (`sequences × tokens`).
    pub fn rows(&self) -> usize {
        self.seqs.len() * self.phase.tokens()
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
    /// Attention of the rows of `span` (the prompt, or one decode step).
    /// `l` indexes this rank's layers (and so its cache), not the model's.
    /// Returns this rank's partial output (before the all-reduce).
    pub fn attention(&self, layer: &LayerShard<B>, l: usize, h: &B::Buf, span: &Span, cache: &mut KvCache<B>) -> Result<B::Buf> {
        let (d, dh) = (self.cfg.d_model, self.cfg.head_dim);
        let (seqs, phase) = (span.seqs.clone(), span.phase);
        let (nseq, width, kv_width, s) = (seqs.len(), layer.heads * dh, layer.kv_heads * dh, phase.tokens());
        let rows = nseq * s;
        let qkv = self.be.matmul(h, &layer.qkv, rows, d, width + 2 * kv_width)?;
        let prompt = [(0, s)];
        let positions = if phase == Phase::Decode { RopePositions::Step } else { RopePositions::Segments(&prompt) };
        let (q, k, v) = split_qkv(self.be, self.cfg, &qkv, rows, layer.heads, layer.kv_heads, positions)?;
        let o = match phase {
            Phase::Prefill(s) => {
                cache.store_prompt(self.be, l, seqs.clone(), s, &k, &v)?;
                let shape = PrefillShape { nseq, sq: s, skv: s, kv_seq_stride: s, heads: layer.heads, kv_heads: layer.kv_heads, head_dim: dh, q_offset: 0 };
                self.be.attention_prefill(&q, &k, &v, shape)?.0
            }
            Phase::Decode => {
                if seqs.len() != cache.nseq {
                    return Err(protocol("decode attends one new token of every sequence"));
                }
                cache.store_step(self.be, l, &k, &v)?;
                let shape = DecodeShape { nseq, cap: cache.cap, len: 0, heads: layer.heads, kv_heads: layer.kv_heads, head_dim: dh };
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
                if self.cfg.ffn_kind == FfnKind::Swiglu {
                    self.be.silu_mul(&mut g, &up)?;
                } else {
                    self.be.gelu_mul(&mut g, &up)?;
                }
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
    pub fn layer(&self, layer: &LayerShard<B>, l: usize, x: &mut B::Buf, span: &Span, cache: &mut KvCache<B>, group: &Group) -> Result<()> {
        let rows = span.rows();
        let h = self.be.rmsnorm(x, &layer.attn_norm, rows, self.cfg.d_model, self.cfg.norm_eps)?;
        let mut a = self.attention(layer, l, &h, span, cache)?;
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
