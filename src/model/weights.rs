//! The model's tensors in fapool's layout (every matrix `[in, out]`
//! row-major, as `x · w` multiplies them; the fused QKV's columns are q of
//! every head, then k, then v of every K/V head) and where their values come
//! from: a seed, or a checkpoint (see [`super::checkpoint`]). A shard is any
//! block of rows × column runs of one tensor, so each rank asks for exactly
//! what it holds.

use super::checkpoint::{Checkpoint, CheckpointError};
use super::{dims, ModelConfig, Tensor};
use crate::backend::{Backend, Result as BackendResult};
use std::ops::Range;

/// SplitMix64: a fast, well-mixed 64-bit hash/generator.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [-1, 1) from a hash.
fn unit(h: u64) -> f32 {
    ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Where the values come from.
#[derive(Debug)]
enum Source {
    Seeded,
    Checkpoint(Checkpoint),
}

/// Shards of a model's weights, seeded or from its checkpoint.
#[derive(Debug)]
pub struct Weights<'a> {
    pub cfg: &'a ModelConfig,
    source: Source,
}

/// Values of the shard of rows `rows` and column runs `cols`.
fn shard_len(rows: &Range<usize>, cols: &[Range<usize>]) -> usize {
    rows.len() * cols.iter().map(|c| c.len()).sum::<usize>()
}

impl<'a> Weights<'a> {
    /// The model's weights: its checkpoint (`cfg.weights`), memory-mapped
    /// and checked against the model (every tensor there, of its shape, in
    /// a dtype that converts), or else its seeded ones.
    pub fn open(cfg: &'a ModelConfig) -> Result<Self, CheckpointError> {
        let source = match &cfg.weights {
            None => Source::Seeded,
            Some(path) => Source::Checkpoint(Checkpoint::open(path, cfg)?),
        };
        Ok(Self { cfg, source })
    }

    /// The seeded weights of `cfg`, whatever its `weights` says (what
    /// `export-weights` writes).
    pub fn seeded(cfg: &'a ModelConfig) -> Self {
        Self { cfg, source: Source::Seeded }
    }

    /// Full (rows, cols) of a tensor.
    pub fn dims(&self, t: Tensor) -> (usize, usize) {
        dims(self.cfg, t)
    }

    fn value(&self, t: Tensor, row: usize, col: usize) -> f32 {
        if let (Tensor::Head, true) = (t, self.cfg.tie_embeddings) {
            return self.value(Tensor::Embedding, col, row);
        }
        let (rows, cols) = self.dims(t);
        let key = self.cfg.weights_seed.wrapping_mul(0x1000_0000_01B3) ^ t.code().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (row * cols + col) as u64;
        let u = unit(splitmix64(key));
        match t {
            Tensor::AttnNorm(_) | Tensor::FfnNorm(_) | Tensor::FinalNorm => 1.0 + 0.1 * u,
            Tensor::Embedding => u,
            // Uniform(-1,1) has variance 1/3: scale by sqrt(3/fan_in) for unit-variance outputs.
            _ => u * (3.0 / rows as f32).sqrt(),
        }
    }

    /// Rows `rows` and the column runs `cols` of tensor `t`, row-major.
    pub fn shard(&self, t: Tensor, rows: Range<usize>, cols: &[Range<usize>]) -> Vec<f32> {
        if self.shapes_only() {
            // A zeroed allocation: its pages are never written or read.
            return vec![0.0; shard_len(&rows, cols)];
        }
        if let Source::Checkpoint(c) = &self.source {
            return c.shard(self.cfg, t, rows, cols);
        }
        let width: usize = cols.iter().map(|c| c.len()).sum();
        let mut out = Vec::with_capacity(rows.len() * width);
        for r in rows {
            for c in cols {
                for col in c.clone() {
                    out.push(self.value(t, r, col));
                }
            }
        }
        out
    }

    /// The whole tensor.
    pub fn full(&self, t: Tensor) -> Vec<f32> {
        let (rows, cols) = self.dims(t);
        self.shard(t, 0..rows, &[0..cols])
    }

    /// Whether the values are zeros that are never read ([`super::WeightValues::ShapesOnly`]).
    pub fn shapes_only(&self) -> bool {
        self.cfg.weight_values == super::WeightValues::ShapesOnly
    }

    /// [`Self::shard`] on `be`. Shape-only weights are zeros the backend
    /// makes itself: the same buffer, without a host vector the size of the
    /// shard (the planner's thousand simulated ranks would map and unmap
    /// their weights' size each, terabytes at paper scale).
    pub fn upload_shard<B: Backend>(&self, be: &B, t: Tensor, rows: Range<usize>, cols: &[Range<usize>]) -> BackendResult<B::Buf> {
        if self.shapes_only() {
            return be.zeros(shard_len(&rows, cols));
        }
        be.upload(&self.shard(t, rows, cols))
    }

    /// [`Self::full`] on `be` (see [`Self::upload_shard`]).
    pub fn upload_full<B: Backend>(&self, be: &B, t: Tensor) -> BackendResult<B::Buf> {
        let (rows, cols) = self.dims(t);
        self.upload_shard(be, t, 0..rows, &[0..cols])
    }

    /// Columns of the fused QKV weight for query heads `heads`: their q
    /// columns, and the k and v columns of the K/V heads they read.
    pub fn qkv_columns(&self, heads: Range<usize>) -> Vec<Range<usize>> {
        let c = self.cfg;
        let (a, kv, dh) = (c.attn_width(), c.kv_width(), c.head_dim);
        let kvh = c.kv_heads_of(heads.clone());
        vec![heads.start * dh..heads.end * dh, a + kvh.start * dh..a + kvh.end * dh, a + kv + kvh.start * dh..a + kv + kvh.end * dh]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_agree_with_the_full_tensor() {
        let m = ModelConfig::tiny();
        let w = Weights::seeded(&m);
        let full = w.full(Tensor::Qkv(1));
        let (_, cols) = w.dims(Tensor::Qkv(1));
        let shard = w.shard(Tensor::Qkv(1), 3..5, &[10..12]);
        assert_eq!(shard, vec![full[3 * cols + 10], full[3 * cols + 11], full[4 * cols + 10], full[4 * cols + 11]]);
    }

    #[test]
    fn different_tensors_and_seeds_differ() {
        let m = ModelConfig::tiny();
        let w = Weights::seeded(&m);
        assert_ne!(w.full(Tensor::Up(0)), w.full(Tensor::Up(1)));
        let mut m2 = m.clone();
        m2.weights_seed = 2;
        assert_ne!(Weights::seeded(&m2).full(Tensor::Up(0)), w.full(Tensor::Up(0)));
    }

    #[test]
    fn a_tied_head_is_the_embedding_transposed() {
        let m = ModelConfig { tie_embeddings: true, ..ModelConfig::tiny() };
        let w = Weights::seeded(&m);
        let (e, h) = (w.full(Tensor::Embedding), w.full(Tensor::Head));
        let (v, d) = (m.vocab, m.d_model);
        assert!((0..v).all(|t| (0..d).all(|c| e[t * d + c] == h[c * v + t])));
    }

    #[test]
    fn grouped_qkv_columns_take_the_kv_heads_of_their_query_heads() {
        let m = ModelConfig { heads: 4, kv_heads: 2, ..ModelConfig::tiny() };
        let w = Weights::seeded(&m);
        assert_eq!(w.dims(Tensor::Qkv(0)), (64, 64 + 2 * 32));
        // Query heads 2..4 read K/V head 1: columns 32..64, then 64+16..64+32 and 96+16..96+32.
        assert_eq!(w.qkv_columns(2..4), vec![32..64, 80..96, 112..128]);
        // Query head 1 alone reads K/V head 0.
        assert_eq!(w.qkv_columns(1..2), vec![16..32, 64..80, 96..112]);
    }

    #[test]
    fn every_tensor_of_a_gated_model_is_listed_once() {
        let m = ModelConfig { ffn_kind: super::super::FfnKind::Swiglu, ..ModelConfig::tiny() };
        let all = Tensor::all(&m);
        assert_eq!(all.len(), 3 + 7 * m.layers);
        assert_eq!(all.iter().collect::<std::collections::BTreeSet<_>>().len(), all.len());
    }
}
