//! The model's operations defined once more, in f64 on the host and as
//! plainly as they can be written: what every backend's kernels are checked
//! against (see `checks`). Inputs are the values a backend holds (rounded to
//! its dtype, widened to f64); outputs are f64.
//!
//! This module must not call a backend or share code with one (the CPU
//! backend included), so that a mistake in a backend cannot hide here.

use crate::backend::{DecodeShape, PrefillShape, RowRun};

/// The values of `xs` as f64.
pub fn wide(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| x as f64).collect()
}

/// Sinusoidal position encoding of dimension `c` of a `d`-wide model at
/// position `pos`: sin for even `c`, cos for odd, frequency 10000^(-2i/d)
/// for the pair `i = c / 2`.
pub fn sinusoid(pos: usize, c: usize, d: usize) -> f64 {
    let i = (c / 2) as f64;
    let angle = pos as f64 / 10000f64.powf(2.0 * i / d as f64);
    if c % 2 == 0 {
        angle.sin()
    } else {
        angle.cos()
    }
}

/// `table[token] + sinusoid(position)` for `nseq × n` tokens at positions
/// `pos0..pos0 + n` in every sequence: `[nseq·n, d]`.
pub fn embed(table: &[f64], d: usize, tokens: &[u32], nseq: usize, n: usize, pos0: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(nseq * n * d);
    for (row, &tok) in tokens[..nseq * n].iter().enumerate() {
        let pos = pos0 + row % n;
        out.extend((0..d).map(|c| table[tok as usize * d + c] + sinusoid(pos, c, d)));
    }
    out
}

/// `table[token]` for each token (no position encoding): `[tokens, d]`.
pub fn embed_tokens(table: &[f64], d: usize, tokens: &[u32]) -> Vec<f64> {
    tokens.iter().flat_map(|&t| table[t as usize * d..(t as usize + 1) * d].iter().copied()).collect()
}

/// `x[m,k] · w[k,n]`.
pub fn matmul(x: &[f64], w: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for t in 0..k {
            let a = x[i * k + t];
            for (o, b) in out[i * n..(i + 1) * n].iter_mut().zip(&w[t * n..(t + 1) * n]) {
                *o += a * b;
            }
        }
    }
    out
}

/// Each row divided by its root mean square (plus `eps` under the root),
/// times `weight`.
pub fn rmsnorm(x: &[f64], weight: &[f64], rows: usize, cols: usize, eps: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / cols as f64 + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, g)| v * inv * g));
    }
    out
}

/// GELU, tanh approximation: `x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
pub fn gelu(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// SiLU: `x / (1 + e^-x)`.
pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// `silu(gate) · up`, element by element (SwiGLU).
pub fn silu_mul(gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.iter().zip(up).map(|(&g, &u)| silu(g) * u).collect()
}

/// `gelu(gate) · up`, element by element.
pub fn gelu_mul(gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.iter().zip(up).map(|(&g, &u)| gelu(g) * u).collect()
}

/// `x + y`, element by element.
pub fn add(x: &[f64], y: &[f64]) -> Vec<f64> {
    x.iter().zip(y).map(|(a, b)| a + b).collect()
}

/// Rows of `[q | k | v]` (each `width` wide) as three `[rows, width]` matrices.
pub fn split_qkv(x: &[f64], rows: usize, width: usize) -> [Vec<f64>; 3] {
    split_qkv_widths(x, rows, width, width)
}

/// Rows of `[q | k | v]` (q `q_width` wide, k and v `kv_width`) as three matrices.
pub fn split_qkv_widths(x: &[f64], rows: usize, q_width: usize, kv_width: usize) -> [Vec<f64>; 3] {
    let w = q_width + 2 * kv_width;
    let part = |at: usize, n: usize| (0..rows).flat_map(|r| x[r * w + at..r * w + at + n].iter().copied()).collect();
    [part(0, q_width), part(q_width, kv_width), part(q_width + kv_width, kv_width)]
}

/// Rotary embedding of rows of heads of `head_dim`, row `r` at position
/// `positions[r]`: element `j < head_dim/2` of a head and element
/// `j + head_dim/2` turn by the angle `pos · theta^(-2j/head_dim)`:
/// `(a, b) -> (a cos - b sin, b cos + a sin)`.
pub fn rope(x: &[f64], width: usize, head_dim: usize, theta: f64, positions: &[usize]) -> Vec<f64> {
    let half = head_dim / 2;
    let mut out = x.to_vec();
    for (r, &pos) in positions.iter().enumerate() {
        for h in 0..width / head_dim {
            let at = r * width + h * head_dim;
            for j in 0..half {
                let angle = pos as f64 * theta.powf(-2.0 * j as f64 / head_dim as f64);
                let (a, b) = (x[at + j], x[at + j + half]);
                out[at + j] = a * angle.cos() - b * angle.sin();
                out[at + j + half] = b * angle.cos() + a * angle.sin();
            }
        }
    }
    out
}

/// The rows of each run of `src`, one run after the other.
pub fn gather_rows(src: &[f64], cols: usize, runs: &[RowRun]) -> Vec<f64> {
    runs.iter().flat_map(|r| src[r.start * cols..(r.start + r.len) * cols].iter().copied()).collect()
}

/// `dst` with consecutive rows of `src` written into its runs, in order.
pub fn scatter_rows(dst: &[f64], cols: usize, runs: &[RowRun], src: &[f64]) -> Vec<f64> {
    let mut out = dst.to_vec();
    let mut at = 0;
    for r in runs {
        out[r.start * cols..(r.start + r.len) * cols].copy_from_slice(&src[at * cols..(at + r.len) * cols]);
        at += r.len;
    }
    out
}

/// `dst` with each copy's `len` rows of `src` from row `src` written at row `dst`.
pub fn copy_rows(dst: &[f64], cols: usize, src: &[f64], copies: &[crate::backend::RowCopy]) -> Vec<f64> {
    let mut out = dst.to_vec();
    for c in copies {
        out[c.dst * cols..(c.dst + c.len) * cols].copy_from_slice(&src[c.src * cols..(c.src + c.len) * cols]);
    }
    out
}

/// An attention output and the natural-log log-sum-exp of its scaled scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Softmax-weighted sum of `values` for one query over `keys` (rows of
/// `head_dim` taken by `row`), scores scaled by 1/√head_dim; no keys gives
/// zeros and a log-sum-exp of -inf.
fn attend<'a>(q: &[f64], keys: usize, row: impl Fn(usize) -> (&'a [f64], &'a [f64])) -> (Vec<f64>, f64) {
    let scale = 1.0 / (q.len() as f64).sqrt();
    if keys == 0 {
        return (vec![0.0; q.len()], f64::NEG_INFINITY);
    }
    let scores: Vec<f64> = (0..keys).map(|j| q.iter().zip(row(j).0).map(|(a, b)| a * b).sum::<f64>() * scale).collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = weights.iter().sum();
    let mut out = vec![0.0; q.len()];
    for (j, w) in weights.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(row(j).1) {
            *o += w / sum * v;
        }
    }
    (out, max + sum.ln())
}

/// Causal attention: query `i` of sequence `n` (absolute position
/// `q_offset + i`) attends to keys `0..=q_offset + i` of that sequence,
/// clipped to `skv`; keys of sequence `n` start at row `n · kv_seq_stride`,
/// and query head `h` reads K/V head `h / (heads / kv_heads)` of rows
/// `kv_heads·head_dim` wide. Output `[nseq·sq, heads·head_dim]`,
/// log-sum-exp `[nseq, heads, sq]`.
pub fn attention_prefill(q: &[f64], k: &[f64], v: &[f64], s: PrefillShape) -> Attention {
    let (dh, width, kv_width, group) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.heads / s.kv_heads);
    let mut out = vec![0.0; s.nseq * s.sq * width];
    let mut lse = vec![0.0; s.nseq * s.heads * s.sq];
    for n in 0..s.nseq {
        for h in 0..s.heads {
            for i in 0..s.sq {
                let at = (n * s.sq + i) * width + h * dh;
                let keys = (s.q_offset + i + 1).min(s.skv);
                let kv = |j: usize| {
                    let r = (n * s.kv_seq_stride + j) * kv_width + (h / group) * dh;
                    (&k[r..r + dh], &v[r..r + dh])
                };
                let (o, l) = attend(&q[at..at + dh], keys, kv);
                out[at..at + dh].copy_from_slice(&o);
                lse[(n * s.heads + h) * s.sq + i] = l;
            }
        }
    }
    Attention { out, lse }
}

/// One query per sequence against the first `len` rows of a cache
/// `[nseq, cap, kv_heads·head_dim]` (query head `h` reads K/V head
/// `h / (heads / kv_heads)`): output `[nseq, heads·head_dim]`,
/// log-sum-exp `[nseq, heads]`.
pub fn attention_decode(q: &[f64], k_cache: &[f64], v_cache: &[f64], s: DecodeShape) -> Attention {
    let (dh, width, kv_width, group) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.heads / s.kv_heads);
    let mut out = vec![0.0; s.nseq * width];
    let mut lse = vec![0.0; s.nseq * s.heads];
    for n in 0..s.nseq {
        for h in 0..s.heads {
            let at = n * width + h * dh;
            let kv = |j: usize| {
                let r = (n * s.cap + j) * kv_width + (h / group) * dh;
                (&k_cache[r..r + dh], &v_cache[r..r + dh])
            };
            let (o, l) = attend(&q[at..at + dh], s.len, kv);
            out[at..at + dh].copy_from_slice(&o);
            lse[n * s.heads + h] = l;
        }
    }
    Attention { out, lse }
}

/// The attention over the union of the keys of two partial results, from
/// their outputs and log-sum-exps (rows of `head_dim`); a row with no keys
/// on either side stays as it is.
pub fn merge_partials(o: &[f64], lse: &[f64], o2: &[f64], lse2: &[f64], rows: usize, head_dim: usize) -> Attention {
    let (mut out, mut l) = (o.to_vec(), lse.to_vec());
    for r in 0..rows {
        let m = lse[r].max(lse2[r]);
        if m == f64::NEG_INFINITY {
            continue;
        }
        let (wa, wb) = ((lse[r] - m).exp(), (lse2[r] - m).exp());
        for c in r * head_dim..(r + 1) * head_dim {
            out[c] = (wa * o[c] + wb * o2[c]) / (wa + wb);
        }
        l[r] = m + (wa + wb).ln();
    }
    Attention { out, lse: l }
}

/// Index of the largest value of each row, the first one on ties.
pub fn argmax(x: &[f64], rows: usize, cols: usize) -> Vec<u32> {
    (0..rows).map(|r| (0..cols).fold(0, |best, c| if x[r * cols + c] > x[r * cols + best] { c } else { best }) as u32).collect()
}

/// A cache `[nseq, cap, width]` with row `n` of `src` written to row `at`
/// of sequence `n`; unchanged without an `at`.
pub fn store_rows_at(cache: &[f64], src: &[f64], nseq: usize, cap: usize, width: usize, at: Option<usize>) -> Vec<f64> {
    let mut out = cache.to_vec();
    if let Some(at) = at {
        for n in 0..nseq {
            out[(n * cap + at) * width..(n * cap + at + 1) * width].copy_from_slice(&src[n * width..(n + 1) * width]);
        }
    }
    out
}

/// The router: per row of `experts` logits, the softmax probabilities, the
/// `k` largest in descending order (an equal probability goes to the lower
/// index first), and those `k` divided by their sum. Returns the expert ids
/// and weights, `[rows, k]` each.
pub fn router_top_k(logits: &[f64], rows: usize, experts: usize, k: usize) -> (Vec<u32>, Vec<f64>) {
    let (mut ids, mut weights) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    for r in 0..rows {
        let row = &logits[r * experts..(r + 1) * experts];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|l| (l - max).exp()).sum();
        let p: Vec<f64> = row.iter().map(|l| (l - max).exp() / z).collect();
        let mut order: Vec<usize> = (0..experts).collect();
        // A stable sort keeps equal probabilities in index order.
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let chosen = &order[..k];
        let sum: f64 = chosen.iter().map(|&e| p[e]).sum();
        ids.extend(chosen.iter().map(|&e| e as u32));
        weights.extend(chosen.iter().map(|&e| p[e] / sum));
    }
    (ids, weights)
}

/// Every assignment's row when the assignments are grouped by expert
/// (experts in index order, assignments in their order within an expert),
/// an expert keeping at most `capacity` (the rest `None`, dropped); and the
/// assignments of each expert before the capacity.
pub fn expert_slots(ids: &[u32], experts: usize, capacity: Option<usize>) -> (Vec<Option<usize>>, Vec<usize>) {
    let mut counts = vec![0; experts];
    for &e in ids {
        counts[e as usize] += 1;
    }
    let kept: Vec<usize> = counts.iter().map(|&c| capacity.map_or(c, |cap| c.min(cap))).collect();
    let start: Vec<usize> = (0..experts).map(|e| kept[..e].iter().sum()).collect();
    let mut seen = vec![0; experts];
    let slots = ids
        .iter()
        .map(|&e| {
            let e = e as usize;
            let s = (seen[e] < kept[e]).then(|| start[e] + seen[e]);
            seen[e] += 1;
            s
        })
        .collect();
    (slots, counts)
}

/// `kept` rows: row `slots[a]` is row `a / k` of `x` (rows of `cols`).
pub fn permute_to_experts(x: &[f64], cols: usize, slots: &[Option<usize>], k: usize, kept: usize) -> Vec<f64> {
    let mut out = vec![0.0; kept * cols];
    for (a, s) in slots.iter().enumerate() {
        if let Some(s) = s {
            out[s * cols..(s + 1) * cols].copy_from_slice(&x[a / k * cols..(a / k + 1) * cols]);
        }
    }
    out
}

/// `[rows, cols]`: row t is the sum over its kept assignments j of
/// `weights[t·k + j]` times row `slots[t·k + j]` of `y`.
pub fn combine_from_experts(y: &[f64], cols: usize, slots: &[Option<usize>], weights: &[f64], rows: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for t in 0..rows {
        for j in 0..k {
            if let Some(s) = slots[t * k + j] {
                for c in 0..cols {
                    out[t * cols + c] += weights[t * k + j] * y[s * cols + c];
                }
            }
        }
    }
    out
}

/// Consecutive row groups of `x` (`[Σ groups, k]`), each times its own
/// matrix of `w` (`[groups, k, n]`).
pub fn grouped_matmul(x: &[f64], w: &[f64], groups: &[usize], k: usize, n: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut at = 0;
    for (g, &m) in groups.iter().enumerate() {
        out.extend(matmul(&x[at * k..(at + m) * k], &w[g * k * n..(g + 1) * k * n], m, k, n));
        at += m;
    }
    out
}
