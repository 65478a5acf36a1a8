//! The transformer being served: its dimensions, true parameter count, FLOPs
//! and bytes, and its deterministic weights.
//!
//! Weights are a pure function of `(weights_seed, tensor, row, column)`, so
//! every rank generates exactly its own shard and all shardings agree with the
//! single-rank model bit for bit. This module must not allocate device memory.

use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The FFN's form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FfnKind {
    /// `down(gelu(up(x)))`: two matrices.
    Gelu,
    /// `down(gelu(gate(x)) * up(x))`: three matrices.
    GatedGelu,
}

/// A mixture-of-experts FFN: `count` experts per layer, each a GELU FFN of
/// [`ModelConfig::ffn`] columns (up, down), of which a softmax router picks
/// the `top_k` with the highest probability for every token (ties to the
/// lowest expert index) and weighs their outputs by those probabilities,
/// renormalised over the chosen ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experts {
    pub count: usize,
    pub top_k: usize,
}

/// Dimensions of a decoder-only model, dense or with a mixture-of-experts
/// FFN (the presets are described in `docs/design.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    pub layers: usize,
    pub d_model: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// FFN columns (of each expert, in a mixture-of-experts model).
    pub ffn: usize,
    pub ffn_kind: FfnKind,
    /// `Some`: every layer's FFN is a mixture of experts (GELU experts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<Experts>,
    pub vocab: usize,
    pub norm_eps: f32,
    /// Longest sequence (prompt + generated tokens) a job may use.
    pub max_seq_len: usize,
    pub weights_seed: u64,
}

impl ModelConfig {
    /// The reference model: 4 layers, d_model 4096, 32 × 128 heads, FFN 16384.
    pub fn dense_4l() -> Self {
        Self {
            name: "dense-4l".into(),
            layers: 4,
            d_model: 4096,
            heads: 32,
            head_dim: 128,
            ffn: 16384,
            ffn_kind: FfnKind::Gelu,
            experts: None,
            vocab: 32000,
            norm_eps: 1e-6,
            max_seq_len: 65536 + 1024,
            weights_seed: 1,
        }
    }

    /// A tiny model on the same code path, for tests and the CPU demo.
    pub fn tiny() -> Self {
        Self { name: "tiny".into(), layers: 2, d_model: 64, heads: 4, head_dim: 16, ffn: 256, ffn_kind: FfnKind::Gelu, experts: None, vocab: 512, norm_eps: 1e-6, max_seq_len: 4096, weights_seed: 1 }
    }

    /// The MoE plan's model: 16 layers, d_model 512, 16 × 32 heads, 16
    /// experts of hidden 1024 per layer, top-2 routing. Prompts of the
    /// plan's workload go up to 10240 tokens.
    pub fn moe_16l() -> Self {
        Self {
            name: "moe-16l".into(),
            layers: 16,
            d_model: 512,
            heads: 16,
            head_dim: 32,
            ffn: 1024,
            ffn_kind: FfnKind::Gelu,
            experts: Some(Experts { count: 16, top_k: 2 }),
            vocab: 32000,
            norm_eps: 1e-6,
            max_seq_len: 10240 + 1024,
            weights_seed: 1,
        }
    }

    /// A tiny MoE model on the same code path (8 experts, top 2), for tests
    /// and the CPU demo.
    pub fn tiny_moe() -> Self {
        Self { name: "tiny-moe".into(), ffn: 128, experts: Some(Experts { count: 8, top_k: 2 }), ..Self::tiny() }
    }

    /// Attention width `heads × head_dim`.
    pub fn attn_width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn ffn_matrices(&self) -> usize {
        match self.ffn_kind {
            FfnKind::Gelu => 2,
            FfnKind::GatedGelu => 3,
        }
    }

    /// Parameters of one layer's FFN: every expert and the router, or the
    /// dense matrices.
    pub fn ffn_params(&self) -> u64 {
        let (d, f) = (self.d_model as u64, self.ffn as u64);
        match self.experts {
            None => self.ffn_matrices() as u64 * d * f,
            Some(e) => e.count as u64 * 2 * d * f + d * e.count as u64,
        }
    }

    /// FFN parameters one token multiplies: its `top_k` experts and the
    /// router, or the dense matrices.
    pub fn ffn_active_params(&self) -> u64 {
        let (d, f) = (self.d_model as u64, self.ffn as u64);
        match self.experts {
            None => self.ffn_params(),
            Some(e) => e.top_k as u64 * 2 * d * f + d * e.count as u64,
        }
    }

    /// Parameters of one decoder layer (weights and norm scales).
    pub fn layer_params(&self) -> u64 {
        let (d, a) = (self.d_model as u64, self.attn_width() as u64);
        3 * d * a + a * d + self.ffn_params() + 2 * d
    }

    /// All parameters: layers, embedding, final norm and the untied LM head.
    pub fn params(&self) -> u64 {
        let (d, v) = (self.d_model as u64, self.vocab as u64);
        self.layers as u64 * self.layer_params() + 2 * v * d + d
    }

    /// FLOPs of the GEMMs of all layers for `tokens` tokens (2 per
    /// multiply-add; a token of an MoE layer multiplies its `top_k` experts
    /// and the router, not every expert).
    pub fn layer_gemm_flops(&self, tokens: u64) -> f64 {
        let attention = 4 * self.d_model as u64 * self.attn_width() as u64;
        2.0 * tokens as f64 * (attention + self.ffn_active_params()) as f64 * self.layers as f64
    }

    /// Causal attention FLOPs of all layers for a prefill of `nseq × s`
    /// tokens: `4·s²·d_attn / 2` per sequence and layer (QKᵀ and PV, halved).
    pub fn prefill_attention_flops(&self, nseq: u64, s: u64) -> f64 {
        2.0 * (nseq * s * s) as f64 * self.attn_width() as f64 * self.layers as f64
    }

    /// FLOPs of a prefill of `nseq` sequences of `s` tokens, LM head on the last token.
    pub fn prefill_flops(&self, nseq: u64, s: u64) -> f64 {
        self.layer_gemm_flops(nseq * s) + self.prefill_attention_flops(nseq, s) + 2.0 * (nseq * (self.d_model * self.vocab) as u64) as f64
    }

    /// FLOPs of one decode step of `nseq` sequences with `ctx` cached tokens.
    pub fn decode_flops(&self, nseq: u64, ctx: u64) -> f64 {
        self.layer_gemm_flops(nseq) + 4.0 * (nseq * ctx) as f64 * self.attn_width() as f64 * self.layers as f64 + 2.0 * (nseq * (self.d_model * self.vocab) as u64) as f64
    }
}

/// Which tensor of the model a weight belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tensor {
    Embedding,
    AttnNorm(usize),
    Qkv(usize),
    Out(usize),
    FfnNorm(usize),
    Up(usize),
    Gate(usize),
    Down(usize),
    /// The router of layer `l`: `[d_model, experts]`.
    Router(usize),
    /// Expert `e`'s up (`[d_model, ffn]`) and down (`[ffn, d_model]`) matrices of layer `l`.
    ExpertUp(usize, usize),
    ExpertDown(usize, usize),
    FinalNorm,
    Head,
}

impl Tensor {
    fn code(self) -> u64 {
        match self {
            Tensor::Embedding => 1,
            Tensor::FinalNorm => 2,
            Tensor::Head => 3,
            Tensor::AttnNorm(l) => 16 + 8 * l as u64,
            Tensor::Qkv(l) => 17 + 8 * l as u64,
            Tensor::Out(l) => 18 + 8 * l as u64,
            Tensor::FfnNorm(l) => 19 + 8 * l as u64,
            Tensor::Up(l) => 20 + 8 * l as u64,
            Tensor::Gate(l) => 21 + 8 * l as u64,
            Tensor::Down(l) => 22 + 8 * l as u64,
            Tensor::Router(l) => 23 + 8 * l as u64,
            // Far above the dense codes, which stay below 2^40 for any layer count.
            Tensor::ExpertUp(l, e) => (1 << 40) | (l as u64) << 20 | (e as u64) << 1,
            Tensor::ExpertDown(l, e) => (1 << 40) | (l as u64) << 20 | (e as u64) << 1 | 1,
        }
    }
}

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

/// Generates shards of the deterministic weights of a model.
#[derive(Clone, Debug)]
pub struct Weights<'a> {
    pub cfg: &'a ModelConfig,
}

impl<'a> Weights<'a> {
    pub fn new(cfg: &'a ModelConfig) -> Self {
        Self { cfg }
    }

    /// Full (rows, cols) of a tensor.
    pub fn dims(&self, t: Tensor) -> (usize, usize) {
        let c = self.cfg;
        let (d, a, f) = (c.d_model, c.attn_width(), c.ffn);
        match t {
            Tensor::Embedding => (c.vocab, d),
            Tensor::Head => (d, c.vocab),
            Tensor::AttnNorm(_) | Tensor::FfnNorm(_) | Tensor::FinalNorm => (1, d),
            Tensor::Qkv(_) => (d, 3 * a),
            Tensor::Out(_) => (a, d),
            Tensor::Up(_) | Tensor::Gate(_) | Tensor::ExpertUp(..) => (d, f),
            Tensor::Down(_) | Tensor::ExpertDown(..) => (f, d),
            Tensor::Router(_) => (d, c.experts.map_or(0, |e| e.count)),
        }
    }

    fn value(&self, t: Tensor, row: usize, col: usize) -> f32 {
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

    /// Columns of the fused QKV weight for heads `heads` (q, k and v parts).
    pub fn qkv_columns(&self, heads: Range<usize>) -> Vec<Range<usize>> {
        let (a, dh) = (self.cfg.attn_width(), self.cfg.head_dim);
        (0..3).map(|p| p * a + heads.start * dh..p * a + heads.end * dh).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_4l_has_about_0_8b_layer_parameters_not_13b() {
        let m = ModelConfig::dense_4l();
        // 4 × (4·4096² + 2·4096·16384 + 2·4096) = 805,339,136
        assert_eq!(m.layers as u64 * m.layer_params(), 805_339_136);
        assert_eq!(m.params(), 805_339_136 + 2 * 32000 * 4096 + 4096);
    }

    #[test]
    fn moe_16l_has_about_0_32b_parameters_not_10b() {
        let m = ModelConfig::moe_16l();
        // Per layer: 4·512² attention + 16 experts × 2·512·1024 + a 512×16 router + 2·512 norms.
        assert_eq!(m.layer_params(), 1_048_576 + 16_777_216 + 8_192 + 1_024);
        assert_eq!(m.params(), 16 * 17_835_008 + 2 * 32_000 * 512 + 512);
        assert!(m.params() < 400_000_000);
    }

    #[test]
    fn an_moe_token_multiplies_its_top_k_experts_only() {
        let m = ModelConfig::moe_16l();
        let per_token_layer = 4 * 512 * 512 + 2 * 2 * 512 * 1024 + 512 * 16;
        assert_eq!(m.layer_gemm_flops(3), 2.0 * 3.0 * per_token_layer as f64 * 16.0);
    }

    #[test]
    fn expert_tensors_differ_from_each_other_and_from_the_dense_ones() {
        let m = ModelConfig::tiny_moe();
        let w = Weights::new(&m);
        assert_eq!(w.dims(Tensor::Router(0)), (64, 8));
        assert_ne!(w.full(Tensor::ExpertUp(0, 0)), w.full(Tensor::ExpertUp(0, 1)));
        assert_ne!(w.full(Tensor::ExpertUp(1, 0)), w.full(Tensor::ExpertUp(0, 0)));
        assert_ne!(w.full(Tensor::ExpertUp(0, 0)), w.full(Tensor::Up(0)));
    }

    #[test]
    fn shards_agree_with_the_full_tensor() {
        let m = ModelConfig::tiny();
        let w = Weights::new(&m);
        let full = w.full(Tensor::Qkv(1));
        let (_, cols) = w.dims(Tensor::Qkv(1));
        let shard = w.shard(Tensor::Qkv(1), 3..5, &[10..12]);
        assert_eq!(shard, vec![full[3 * cols + 10], full[3 * cols + 11], full[4 * cols + 10], full[4 * cols + 11]]);
    }

    #[test]
    fn different_tensors_and_seeds_differ() {
        let m = ModelConfig::tiny();
        let w = Weights::new(&m);
        assert_ne!(w.full(Tensor::Up(0)), w.full(Tensor::Up(1)));
        let mut m2 = m.clone();
        m2.weights_seed = 2;
        assert_ne!(Weights::new(&m2).full(Tensor::Up(0)), w.full(Tensor::Up(0)));
    }
}
