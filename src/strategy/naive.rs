//! An independent check of the single-rank model: greedy generation that
//! recomputes the whole sequence at every step (no KV cache, no sharding, no
//! messages), straight from the full weights. `fapool verify` compares the
//! single-rank strategy against it on the CPU backend, so the reference the
//! strategies are held to is itself anchored.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, PrefillShape, QkvSplit, Rope, RopePositions, RowRun};
use crate::model::{FfnKind, ModelConfig, PositionKind, Tensor, Weights};
use crate::strategy::Result;

/// Logits of every generated step, `[nseq, vocab]` each, feeding `tokens`
/// (`[nseq, out]`, the tokens to append after each step) back in.
pub fn generate_logits(cfg: &ModelConfig, prompts: &[u32], nseq: usize, s: usize, tokens: &[u32], out: usize) -> Result<Vec<Vec<f32>>> {
    let be = CpuBackend::new();
    let w = Weights::open(cfg)?;
    let (d, a, kv, f, v) = (cfg.d_model, cfg.attn_width(), cfg.kv_width(), cfg.ffn, cfg.vocab);
    let mut steps = Vec::with_capacity(out);
    for step in 0..out {
        let len = s + step;
        let seq_tokens: Vec<u32> = (0..nseq).flat_map(|n| prompts[n * s..(n + 1) * s].iter().copied().chain((0..step).map(move |k| tokens[n * out + k]))).collect();
        let table = w.full(Tensor::Embedding);
        let mut x = match cfg.positions {
            PositionKind::Sinusoidal => be.embed(&table, d, &seq_tokens, nseq, len, 0)?,
            PositionKind::Rope => be.embed_tokens(&table, d, &seq_tokens)?,
        };
        let rows = nseq * len;
        let prompt = [(0, len)];
        let rope = (cfg.positions == PositionKind::Rope).then_some(Rope { head_dim: cfg.head_dim, theta: cfg.rope_theta, positions: RopePositions::Segments(&prompt) });
        for l in 0..cfg.layers {
            let h = be.rmsnorm(&x, &w.full(Tensor::AttnNorm(l)), rows, d, cfg.norm_eps)?;
            let qkv = be.matmul(&h, &w.full(Tensor::Qkv(l)), rows, d, a + 2 * kv)?;
            let (q, k, vv) = be.split_qkv_rope(&qkv, rows, &QkvSplit { q_width: a, kv_width: kv, rope })?;
            let shape = PrefillShape { nseq, sq: len, skv: len, kv_seq_stride: len, heads: cfg.heads, kv_heads: cfg.kv_heads, head_dim: cfg.head_dim, q_offset: 0 };
            let o = be.attention_prefill(&q, &k, &vv, shape)?.0;
            be.add_assign(&mut x, &be.matmul(&o, &w.full(Tensor::Out(l)), rows, a, d)?)?;
            let h = be.rmsnorm(&x, &w.full(Tensor::FfnNorm(l)), rows, d, cfg.norm_eps)?;
            let mut up = be.matmul(&h, &w.full(Tensor::Up(l)), rows, d, f)?;
            let act = match cfg.ffn_kind {
                FfnKind::Gelu => {
                    be.gelu(&mut up)?;
                    up
                }
                FfnKind::GatedGelu => {
                    let mut g = be.matmul(&h, &w.full(Tensor::Gate(l)), rows, d, f)?;
                    be.gelu_mul(&mut g, &up)?;
                    g
                }
                FfnKind::Swiglu => {
                    let mut g = be.matmul(&h, &w.full(Tensor::Gate(l)), rows, d, f)?;
                    be.silu_mul(&mut g, &up)?;
                    g
                }
            };
            be.add_assign(&mut x, &be.matmul(&act, &w.full(Tensor::Down(l)), rows, f, d)?)?;
        }
        let last: Vec<RowRun> = (0..nseq).map(|n| RowRun::new(n * len + len - 1, 1)).collect();
        let xl = be.gather_rows(&x, d, &last)?;
        let h = be.rmsnorm(&xl, &w.full(Tensor::FinalNorm), nseq, d, cfg.norm_eps)?;
        steps.push(be.matmul(&h, &w.full(Tensor::Head), nseq, d, v)?);
    }
    Ok(steps)
}
