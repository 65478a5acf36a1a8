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
            if cfg.experts.is_some() {
                be.add_assign(&mut x, &experts_ffn(&be, &w, l, &h, rows)?)?;
                continue;
            }
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

/// The mixture-of-experts FFN of layer `l` for `rows` normalised rows:
/// each token's `top_k` most probable experts (ties to the lower index),
/// their outputs summed by the probabilities renormalised over them.
fn experts_ffn(be: &CpuBackend, w: &Weights, l: usize, h: &[f32], rows: usize) -> Result<Vec<f32>> {
    let cfg = w.cfg;
    let e = cfg.experts.expect("called for a model with experts");
    let (d, f) = (cfg.d_model, cfg.ffn);
    let logits = be.matmul(&h.to_vec(), &w.full(Tensor::Router(l)), rows, d, e.count)?;
    // (token, weight) pairs routed to each expert.
    let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e.count];
    for t in 0..rows {
        let row = &logits[t * e.count..(t + 1) * e.count];
        let mut order: Vec<usize> = (0..e.count).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let top = &order[..e.top_k];
        let p: Vec<f32> = top.iter().map(|&x| (row[x] - row[top[0]]).exp()).collect();
        let sum: f32 = p.iter().sum();
        for (&x, px) in top.iter().zip(&p) {
            routed[x].push((t, px / sum));
        }
    }
    let mut out = vec![0.0f32; rows * d];
    for (x, tokens) in routed.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
        let runs: Vec<RowRun> = tokens.iter().map(|&(t, _)| RowRun::new(t, 1)).collect();
        let mut up = be.matmul(&be.gather_rows(&h.to_vec(), d, &runs)?, &w.full(Tensor::ExpertUp(l, x)), tokens.len(), d, f)?;
        be.gelu(&mut up)?;
        let y = be.matmul(&up, &w.full(Tensor::ExpertDown(l, x)), tokens.len(), f, d)?;
        for (i, &(t, weight)) in tokens.iter().enumerate() {
            for c in 0..d {
                out[t * d + c] += weight * y[i * d + c];
            }
        }
    }
    Ok(out)
}
