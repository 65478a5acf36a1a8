//! The transformer being served: its family (positions, FFN form, K/V
//! heads, tied embeddings), its dimensions, true parameter count, FLOPs and
//! bytes, and its weights ([`weights`]): seeded, or read from a safetensors
//! checkpoint ([`checkpoint`]) described by a Hugging Face `config.json`
//! ([`hf_config`]), and written back as one ([`export`]).
//!
//! Seeded weights are a pure function of `(weights_seed, tensor, row,
//! column)`, so every rank generates exactly its own shard and all
//! shardings agree with the single-rank model bit for bit; checkpoint
//! weights are memory-mapped, so a rank reads only the rows of its shard.
//! This module must not allocate device memory.

pub mod checkpoint;
pub mod export;
pub mod hf_config;
pub mod weights;

pub use weights::{splitmix64, Weights};

use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::PathBuf;

/// The FFN's form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FfnKind {
    /// `down(gelu(up(x)))`: two matrices.
    Gelu,
    /// `down(gelu(gate(x)) * up(x))`: three matrices.
    GatedGelu,
    /// `down(silu(gate(x)) * up(x))`: three matrices (Llama's MLP).
    Swiglu,
}

impl FfnKind {
    /// The name job specs use.
    pub fn name(self) -> &'static str {
        match self {
            FfnKind::Gelu => "gelu",
            FfnKind::GatedGelu => "gated-gelu",
            FfnKind::Swiglu => "swiglu",
        }
    }
    /// Whether the FFN has a gate matrix.
    pub fn gated(self) -> bool {
        self != FfnKind::Gelu
    }
}

/// How positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PositionKind {
    /// Sinusoidal absolute encoding added after the embedding.
    Sinusoidal,
    /// Rotary embedding of q and k (Hugging Face's half-split rotation:
    /// element j of a head pairs with j + head_dim/2), base `rope_theta`.
    Rope,
}

impl PositionKind {
    pub fn name(self) -> &'static str {
        match self {
            PositionKind::Sinusoidal => "sinusoidal",
            PositionKind::Rope => "rope",
        }
    }
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

/// What weight shards hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightValues {
    /// The model's own values: seeded, or its checkpoint's.
    #[default]
    Real,
    /// Zeros of the right length, never touched: the planner runs strategies
    /// on the shape-only backend, which reads only lengths, so generating
    /// values (seconds per rank at full size) would be wasted.
    ShapesOnly,
}

/// Dimensions of a decoder-only model, dense or with a mixture-of-experts
/// FFN (the presets are described in `docs/design.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    pub layers: usize,
    pub d_model: usize,
    pub heads: usize,
    /// Key/value heads: `heads` (multi-head), fewer (grouped-query: query
    /// head h reads K/V head `h / (heads / kv_heads)`), or 1 (multi-query).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// FFN columns (of each expert, in a mixture-of-experts model).
    pub ffn: usize,
    pub ffn_kind: FfnKind,
    /// `Some`: every layer's FFN is a mixture of experts (GELU experts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<Experts>,
    pub vocab: usize,
    pub norm_eps: f32,
    pub positions: PositionKind,
    /// RoPE's base θ (frequencies θ^(-2i/head_dim)); unused with sinusoidal positions.
    pub rope_theta: f64,
    /// The LM head is the embedding table, transposed.
    pub tie_embeddings: bool,
    /// Longest sequence (prompt + generated tokens) a job may use.
    pub max_seq_len: usize,
    pub weights_seed: u64,
    /// A safetensors checkpoint (a file, or a folder with `model.safetensors`
    /// or a sharded index) the weights are read from; `None`: seeded weights.
    pub weights: Option<PathBuf>,
    /// Not part of a job spec: set by the planner on its own copy.
    #[serde(skip)]
    pub weight_values: WeightValues,
}

impl ModelConfig {
    /// The reference model: 4 layers, d_model 4096, 32 × 128 heads, FFN 16384.
    pub fn dense_4l() -> Self {
        Self {
            name: "dense-4l".into(),
            layers: 4,
            d_model: 4096,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            ffn: 16384,
            ffn_kind: FfnKind::Gelu,
            experts: None,
            vocab: 32000,
            norm_eps: 1e-6,
            positions: PositionKind::Sinusoidal,
            rope_theta: 10_000.0,
            tie_embeddings: false,
            max_seq_len: 65536 + 1024,
            weights_seed: 1,
            weights: None,
            weight_values: WeightValues::Real,
        }
    }

    /// A tiny model on the same code path, for tests and the CPU demo.
    pub fn tiny() -> Self {
        Self { name: "tiny".into(), layers: 2, d_model: 64, heads: 4, kv_heads: 4, head_dim: 16, ffn: 256, vocab: 512, max_seq_len: 4096, ..Self::dense_4l() }
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
            kv_heads: 16,
            head_dim: 32,
            ffn: 1024,
            experts: Some(Experts { count: 16, top_k: 2 }),
            max_seq_len: 10240 + 1024,
            ..Self::dense_4l()
        }
    }

    /// A tiny MoE model on the same code path (8 experts, top 2), for tests
    /// and the CPU demo.
    pub fn tiny_moe() -> Self {
        Self { name: "tiny-moe".into(), ffn: 128, experts: Some(Experts { count: 8, top_k: 2 }), ..Self::tiny() }
    }

    /// Llama 3 8B's published shape: 32 layers, d_model 4096, 32 query and
    /// 8 K/V heads of 128, SwiGLU FFN 14336, vocab 128256, RoPE θ 500000,
    /// RMSNorm eps 1e-5, untied embeddings, 8192 positions.
    pub fn llama_3_8b() -> Self {
        Self {
            name: "llama-3-8b".into(),
            layers: 32,
            d_model: 4096,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            ffn: 14336,
            ffn_kind: FfnKind::Swiglu,
            experts: None,
            vocab: 128_256,
            norm_eps: 1e-5,
            positions: PositionKind::Rope,
            rope_theta: 500_000.0,
            tie_embeddings: false,
            max_seq_len: 8192,
            weights_seed: 1,
            weights: None,
            weight_values: WeightValues::Real,
        }
    }

    /// Llama 3 70B's published shape: 80 layers, d_model 8192, 64 query and
    /// 8 K/V heads of 128, SwiGLU FFN 28672, otherwise as [`Self::llama_3_8b`].
    pub fn llama_3_70b() -> Self {
        Self { name: "llama-3-70b".into(), layers: 80, d_model: 8192, heads: 64, ffn: 28672, ..Self::llama_3_8b() }
    }

    /// The presets by name, as job specs give them.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "dense-4l" => Some(Self::dense_4l()),
            "tiny" => Some(Self::tiny()),
            "llama-3-8b" => Some(Self::llama_3_8b()),
            "llama-3-70b" => Some(Self::llama_3_70b()),
            "moe-16l" => Some(Self::moe_16l()),
            "tiny-moe" => Some(Self::tiny_moe()),
            _ => None,
        }
    }

    /// Names of the presets.
    pub const PRESETS: &'static [&'static str] = &["dense-4l", "tiny", "llama-3-8b", "llama-3-70b", "moe-16l", "tiny-moe"];

    /// Attention width `heads × head_dim` (of q and of the attention output).
    pub fn attn_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// K (and V) width `kv_heads × head_dim`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Width of the fused QKV projection's output: q, then k, then v.
    pub fn qkv_width(&self) -> usize {
        self.attn_width() + 2 * self.kv_width()
    }

    /// Query heads per K/V head.
    pub fn group(&self) -> usize {
        (self.heads / self.kv_heads.max(1)).max(1)
    }

    /// The K/V heads query heads `heads` read (query head h reads K/V head
    /// `h / group`): for a range of whole groups, their K/V heads; for part
    /// of one group, its one K/V head.
    pub fn kv_heads_of(&self, heads: Range<usize>) -> Range<usize> {
        if heads.is_empty() {
            return 0..0;
        }
        let g = self.group();
        heads.start / g..(heads.end - 1) / g + 1
    }

    /// K/V heads each of `tp` tensor-parallel ranks holds (those its query
    /// heads read: `kv_heads / tp`, or 1 when ranks outnumber K/V heads).
    pub fn kv_heads_per_rank(&self, tp: usize) -> usize {
        self.kv_heads_of(0..self.heads / tp.max(1)).len()
    }

    fn ffn_matrices(&self) -> usize {
        if self.ffn_kind.gated() {
            3
        } else {
            2
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

    /// Parameters of the attention projections of one layer (QKV and output).
    fn attention_params(&self) -> u64 {
        let (d, a, kv) = (self.d_model as u64, self.attn_width() as u64, self.kv_width() as u64);
        d * (a + 2 * kv) + a * d
    }

    /// Parameters of one decoder layer (weights and norm scales).
    pub fn layer_params(&self) -> u64 {
        self.attention_params() + self.ffn_params() + 2 * self.d_model as u64
    }

    /// All parameters: layers, embedding, final norm and the LM head (the
    /// embedding once when tied).
    pub fn params(&self) -> u64 {
        let (d, v) = (self.d_model as u64, self.vocab as u64);
        let tables = if self.tie_embeddings { 1 } else { 2 };
        self.layers as u64 * self.layer_params() + tables * v * d + d
    }

    /// FLOPs of the GEMMs of all layers for `tokens` tokens (2 per
    /// multiply-add; a token of an MoE layer multiplies its `top_k` experts
    /// and the router, not every expert).
    pub fn layer_gemm_flops(&self, tokens: u64) -> f64 {
        2.0 * tokens as f64 * (self.attention_params() + self.ffn_active_params()) as f64 * self.layers as f64
    }

    /// Causal attention FLOPs of all layers for a prefill of `nseq × s`
    /// tokens: `4·s²·d_attn / 2` per sequence and layer (QKᵀ and PV, halved;
    /// grouped K/V heads do not change it: every query head attends).
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// The tensor's number in the seeded weights' hash.
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

    /// Every tensor of `cfg`'s model, in order.
    pub fn all(cfg: &ModelConfig) -> Vec<Tensor> {
        let mut v = vec![Tensor::Embedding];
        for l in 0..cfg.layers {
            v.extend([Tensor::AttnNorm(l), Tensor::Qkv(l), Tensor::Out(l), Tensor::FfnNorm(l)]);
            if let Some(e) = cfg.experts {
                v.push(Tensor::Router(l));
                v.extend((0..e.count).flat_map(|x| [Tensor::ExpertUp(l, x), Tensor::ExpertDown(l, x)]));
                continue;
            }
            v.push(Tensor::Up(l));
            if cfg.ffn_kind.gated() {
                v.push(Tensor::Gate(l));
            }
            v.push(Tensor::Down(l));
        }
        v.extend([Tensor::FinalNorm, Tensor::Head]);
        v
    }
}

/// Full (rows, cols) of tensor `t` of `cfg`'s model.
pub fn dims(c: &ModelConfig, t: Tensor) -> (usize, usize) {
    let (d, a, f) = (c.d_model, c.attn_width(), c.ffn);
    match t {
        Tensor::Embedding => (c.vocab, d),
        Tensor::Head => (d, c.vocab),
        Tensor::AttnNorm(_) | Tensor::FfnNorm(_) | Tensor::FinalNorm => (1, d),
        Tensor::Qkv(_) => (d, c.qkv_width()),
        Tensor::Out(_) => (a, d),
        Tensor::Up(_) | Tensor::Gate(_) | Tensor::ExpertUp(..) => (d, f),
        Tensor::Down(_) | Tensor::ExpertDown(..) => (f, d),
        Tensor::Router(_) => (d, c.experts.map_or(0, |e| e.count)),
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
        let w = Weights::seeded(&m);
        assert_eq!(w.dims(Tensor::Router(0)), (64, 8));
        assert_ne!(w.full(Tensor::ExpertUp(0, 0)), w.full(Tensor::ExpertUp(0, 1)));
        assert_ne!(w.full(Tensor::ExpertUp(1, 0)), w.full(Tensor::ExpertUp(0, 0)));
        assert_ne!(w.full(Tensor::ExpertUp(0, 0)), w.full(Tensor::Up(0)));
    }

    #[test]
    fn llama_3_8b_has_its_published_8_0b_parameters() {
        // 32 × (4096·(4096 + 2·1024) + 4096² + 3·4096·14336 + 2·4096) + 2·128256·4096 + 4096
        assert_eq!(ModelConfig::llama_3_8b().params(), 8_030_261_248);
    }

    #[test]
    fn llama_3_70b_has_its_published_70_6b_parameters() {
        assert_eq!(ModelConfig::llama_3_70b().params(), 70_553_706_496);
    }

    #[test]
    fn tied_embeddings_count_the_table_once() {
        let m = ModelConfig { tie_embeddings: true, ..ModelConfig::tiny() };
        assert_eq!(ModelConfig::tiny().params() - m.params(), 512 * 64);
    }

    #[test]
    fn query_heads_map_to_their_kv_heads() {
        let m = ModelConfig { heads: 8, kv_heads: 2, ..ModelConfig::tiny() };
        assert_eq!(m.group(), 4);
        // Whole groups: their K/V heads; part of one group: its one K/V head.
        assert_eq!(m.kv_heads_of(0..8), 0..2);
        assert_eq!(m.kv_heads_of(4..8), 1..2);
        assert_eq!(m.kv_heads_of(2..4), 0..1);
        assert_eq!(m.kv_heads_of(6..7), 1..2);
        let mha = ModelConfig::tiny();
        assert_eq!(mha.kv_heads_of(1..3), 1..3);
    }
}
