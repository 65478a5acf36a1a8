//! The CPU backend's attention and rotary embedding, in plain f32 loops:
//! causal prefill and decode with grouped K/V heads (query head `h` reads
//! K/V head `h / (heads / kv_heads)`), and the half-split rotation of q and
//! k. Kept simple enough to read as the definition of the operations.

use super::check;
use crate::backend::{check_kv_heads, BackendError, DecodeShape, PrefillShape, Result, Rope};

/// Softmax-weighted sum over `keys` for one query; returns the log-sum-exp.
#[allow(clippy::too_many_arguments)]
fn attend_one(q: &[f32], k: &[f32], v: &[f32], key_rows: usize, row_stride: usize, scale: f32, out: &mut [f32], scores: &mut Vec<f32>) -> f32 {
    let dh = q.len();
    if key_rows == 0 {
        out.iter_mut().for_each(|o| *o = 0.0);
        return f32::NEG_INFINITY;
    }
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for j in 0..key_rows {
        let kr = &k[j * row_stride..j * row_stride + dh];
        let s = q.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (j, p) in scores.iter().enumerate() {
        let vr = &v[j * row_stride..j * row_stride + dh];
        let w = p / sum;
        for (o, x) in out.iter_mut().zip(vr) {
            *o += w * x;
        }
    }
    max + sum.ln()
}

/// Causal prefill attention into `out` and `lse` (allocated by the caller).
pub(super) fn prefill(q: &[f32], k: &[f32], v: &[f32], s: PrefillShape, out: &mut [f32], lse: &mut [f32]) -> Result<()> {
    check_kv_heads("prefill", s.heads, s.kv_heads)?;
    let (width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    check("prefill q", q.len(), s.nseq * s.sq * width)?;
    check("prefill k", k.len(), s.nseq * s.kv_seq_stride * kv_width)?;
    check("prefill v", v.len(), s.nseq * s.kv_seq_stride * kv_width)?;
    if s.skv > s.kv_seq_stride {
        return Err(BackendError::Shape(format!("prefill skv {} exceeds kv_seq_stride {}", s.skv, s.kv_seq_stride)));
    }
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let mut scores = Vec::new();
    for n in 0..s.nseq {
        for h in 0..s.heads {
            let kbase = n * s.kv_seq_stride * kv_width + (h / s.group()) * s.head_dim;
            for i in 0..s.sq {
                let row = n * s.sq + i;
                let qr = &q[row * width + h * s.head_dim..row * width + (h + 1) * s.head_dim];
                let keys = (s.q_offset + i + 1).min(s.skv);
                let o = &mut out[row * width + h * s.head_dim..row * width + (h + 1) * s.head_dim];
                lse[(n * s.heads + h) * s.sq + i] = attend_one(qr, &k[kbase..], &v[kbase..], keys, kv_width, scale, o, &mut scores);
            }
        }
    }
    Ok(())
}

/// Decode attention of one query per sequence into `out` and `lse`.
pub(super) fn decode(q: &[f32], k_cache: &[f32], v_cache: &[f32], s: DecodeShape, out: &mut [f32], lse: &mut [f32]) -> Result<()> {
    check_kv_heads("decode", s.heads, s.kv_heads)?;
    let (width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    check("decode q", q.len(), s.nseq * width)?;
    check("decode k cache", k_cache.len(), s.nseq * s.cap * kv_width)?;
    check("decode v cache", v_cache.len(), s.nseq * s.cap * kv_width)?;
    if s.len > s.cap {
        return Err(BackendError::Shape(format!("decode len {} exceeds cache capacity {}", s.len, s.cap)));
    }
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let mut scores = Vec::new();
    for n in 0..s.nseq {
        for h in 0..s.heads {
            let kbase = n * s.cap * kv_width + (h / s.group()) * s.head_dim;
            let qr = &q[n * width + h * s.head_dim..n * width + (h + 1) * s.head_dim];
            let o = &mut out[n * width + h * s.head_dim..n * width + (h + 1) * s.head_dim];
            lse[n * s.heads + h] = attend_one(qr, &k_cache[kbase..], &v_cache[kbase..], s.len, kv_width, scale, o, &mut scores);
        }
    }
    Ok(())
}

/// Rotates every head of `rows` rows of `width` in `x` by its row's
/// position (`step_pos` for a decode step): the angle and its cosine and
/// sine in f64, as the reference takes them.
pub(super) fn rotate(x: &mut [f32], rows: usize, width: usize, rope: &Rope, step_pos: usize) -> Result<()> {
    let dh = rope.head_dim;
    if dh == 0 || dh % 2 != 0 || width % dh != 0 {
        return Err(BackendError::Shape(format!("rope: head_dim {dh} must be even and divide the width {width}")));
    }
    let half = dh / 2;
    let freqs: Vec<f64> = (0..half).map(|i| rope.theta.powf(-2.0 * i as f64 / dh as f64)).collect();
    for r in 0..rows {
        let pos = rope.positions.of_row(r, step_pos) as f64;
        let turns: Vec<(f32, f32)> = freqs.iter().map(|f| ((pos * f).cos() as f32, (pos * f).sin() as f32)).collect();
        for head in x[r * width..(r + 1) * width].chunks_exact_mut(dh) {
            for (i, &(c, s)) in turns.iter().enumerate() {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    }
    Ok(())
}
