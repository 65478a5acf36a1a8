//! The weights one MoE rank holds of a layer: its TP shard of the attention
//! (heads split as the baseline splits them), both norms, the router (every
//! rank routes its own tokens) and its own experts' up and down matrices,
//! stacked `[experts, rows, cols]` for the grouped GEMMs.

use crate::backend::Backend;
use crate::model::{Tensor, Weights};
use crate::strategy::Result;
use std::ops::Range;

/// One rank's part of one MoE decoder layer.
pub struct MoeLayer<B: Backend> {
    pub attn_norm: B::Buf,
    pub ffn_norm: B::Buf,
    /// `[d, 3 · heads · head_dim]` of this rank's heads.
    pub qkv: B::Buf,
    /// `[heads · head_dim, d]` of this rank's heads.
    pub out: B::Buf,
    /// Query heads on this rank.
    pub heads: usize,
    /// K/V heads on this rank (those its query heads read).
    pub kv_heads: usize,
    /// `[d, experts]`.
    pub router: B::Buf,
    /// `[local experts, d, ffn]` and `[local experts, ffn, d]`.
    pub up: B::Buf,
    pub down: B::Buf,
}

impl<B: Backend> MoeLayer<B> {
    /// Layer `l` for TP rank `tp_rank` of `tp`, holding experts `experts`.
    pub fn load(be: &B, w: &Weights, l: usize, tp_rank: usize, tp: usize, experts: Range<usize>) -> Result<Self> {
        let c = w.cfg;
        let (d, hl, dh) = (c.d_model, c.heads / tp, c.head_dim);
        let heads = tp_rank * hl..(tp_rank + 1) * hl;
        // The local experts' matrices one after another (zeros the backend makes for shape-only weights).
        let stack = |t: fn(usize, usize) -> Tensor| {
            if w.shapes_only() {
                let (rows, cols) = w.dims(t(l, 0));
                return be.zeros(experts.len() * rows * cols);
            }
            be.upload(&experts.clone().flat_map(|e| w.full(t(l, e))).collect::<Vec<f32>>())
        };
        Ok(Self {
            attn_norm: w.upload_full(be, Tensor::AttnNorm(l))?,
            ffn_norm: w.upload_full(be, Tensor::FfnNorm(l))?,
            qkv: w.upload_shard(be, Tensor::Qkv(l), 0..d, &w.qkv_columns(heads.clone()))?,
            out: w.upload_shard(be, Tensor::Out(l), heads.start * dh..heads.end * dh, &[0..d])?,
            heads: hl,
            kv_heads: c.kv_heads_of(heads.clone()).len(),
            router: w.upload_full(be, Tensor::Router(l))?,
            up: stack(Tensor::ExpertUp)?,
            down: stack(Tensor::ExpertDown)?,
        })
    }
}
