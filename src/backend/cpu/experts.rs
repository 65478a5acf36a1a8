//! The mixture-of-experts operations of the CPU backend, as plain loops:
//! routing, the permutation grouping assignments by expert, the weighted
//! combine back to the tokens, and one GEMM per expert. Index buffers hold
//! integral f32 values (see `backend`).

use super::{check, CpuBackend};
use crate::backend::{Backend, BackendError, Result};

/// The largest index an f32 holds exactly.
const EXACT_INDEX: usize = 1 << 24;

fn index_limit(what: &str, n: usize) -> Result<()> {
    if n > EXACT_INDEX {
        return Err(BackendError::Unsupported(format!("{what}: {n} rows exceed the 2^24 an f32 index buffer holds exactly")));
    }
    Ok(())
}

/// The slot an index buffer holds for assignment `a` (`None`: dropped).
fn slot_of(slots: &[f32], a: usize) -> Option<usize> {
    let s = slots[a];
    (s >= 0.0).then_some(s as usize)
}

pub(super) fn router_top_k(be: &CpuBackend, logits: &[f32], rows: usize, experts: usize, k: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    check("router_top_k logits", logits.len(), rows * experts)?;
    if k > experts {
        return Err(BackendError::Shape(format!("router_top_k: top {k} of {experts} experts")));
    }
    index_limit("router_top_k", experts)?;
    let (mut ids, mut weights) = (be.output(rows * k), be.output(rows * k));
    let mut taken = vec![false; experts];
    for r in 0..rows {
        let row = &logits[r * experts..(r + 1) * experts];
        taken.iter_mut().for_each(|t| *t = false);
        let mut chosen = Vec::with_capacity(k);
        for _ in 0..k {
            // Strictly greater: the first (lowest) index wins a tie; NaN
            // ranks below every number.
            let mut best: Option<usize> = None;
            for (e, &v) in row.iter().enumerate() {
                if !taken[e] && best.is_none_or(|b| v > row[b] || (row[b].is_nan() && !v.is_nan())) {
                    best = Some(e);
                }
            }
            let e = best.expect("k <= experts leaves an expert untaken");
            taken[e] = true;
            chosen.push(e);
        }
        // Softmax renormalised over the chosen: exp(l - l_max) / sum over them.
        let top = row[chosen[0]];
        let p: Vec<f32> = chosen.iter().map(|&e| (row[e] - top).exp()).collect();
        let sum: f32 = p.iter().sum();
        for (j, (&e, pj)) in chosen.iter().zip(&p).enumerate() {
            ids[r * k + j] = e as f32;
            weights[r * k + j] = pj / sum;
        }
    }
    Ok((ids, weights))
}

pub(super) fn expert_slots(be: &CpuBackend, ids: &[f32], assignments: usize, experts: usize, capacity: Option<usize>) -> Result<(Vec<f32>, Vec<usize>)> {
    check("expert_slots ids", ids.len(), assignments)?;
    index_limit("expert_slots", assignments)?;
    let expert_of = |a: usize| -> Result<usize> {
        let e = ids[a];
        if !(e >= 0.0 && (e as usize) < experts) {
            return Err(BackendError::Shape(format!("expert_slots: assignment {a} names expert {e} of {experts}")));
        }
        Ok(e as usize)
    };
    let mut counts = vec![0usize; experts];
    for a in 0..assignments {
        counts[expert_of(a)?] += 1;
    }
    let kept = |e: usize| capacity.map_or(counts[e], |c| counts[e].min(c));
    let mut start = vec![0usize; experts];
    for e in 1..experts {
        start[e] = start[e - 1] + kept(e - 1);
    }
    let mut seen = vec![0usize; experts];
    let mut slots = be.output(assignments);
    for (a, slot) in slots.iter_mut().enumerate() {
        let e = expert_of(a)?;
        *slot = if capacity.is_none_or(|c| seen[e] < c) { (start[e] + seen[e]) as f32 } else { -1.0 };
        seen[e] += 1;
    }
    Ok((slots, counts))
}

pub(super) fn permute_to_experts(be: &CpuBackend, x: &[f32], cols: usize, slots: &[f32], rows: usize, k: usize, kept: usize) -> Result<Vec<f32>> {
    check("permute_to_experts x", x.len(), rows * cols)?;
    check("permute_to_experts slots", slots.len(), rows * k)?;
    let mut out = be.output(kept * cols);
    for a in 0..rows * k {
        if let Some(s) = slot_of(slots, a) {
            if s >= kept {
                return Err(BackendError::Shape(format!("permute_to_experts: slot {s} of {kept} rows")));
            }
            let t = a / k;
            out[s * cols..(s + 1) * cols].copy_from_slice(&x[t * cols..(t + 1) * cols]);
        }
    }
    Ok(out)
}

pub(super) fn combine_from_experts(be: &CpuBackend, y: &[f32], cols: usize, slots: &[f32], weights: &[f32], rows: usize, k: usize) -> Result<Vec<f32>> {
    check("combine_from_experts slots", slots.len(), rows * k)?;
    check("combine_from_experts weights", weights.len(), rows * k)?;
    let mut out = be.output(rows * cols);
    for t in 0..rows {
        let o = &mut out[t * cols..(t + 1) * cols];
        o.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..k {
            let a = t * k + j;
            if let Some(s) = slot_of(slots, a) {
                check("combine_from_experts y", y.len(), (s + 1) * cols)?;
                let w = weights[a];
                o.iter_mut().zip(&y[s * cols..(s + 1) * cols]).for_each(|(v, yv)| *v += w * yv);
            }
        }
    }
    Ok(out)
}

pub(super) fn grouped_matmul(be: &CpuBackend, x: &[f32], w: &[f32], groups: &[usize], k: usize, n: usize) -> Result<Vec<f32>> {
    let rows: usize = groups.iter().sum();
    check("grouped_matmul x", x.len(), rows * k)?;
    check("grouped_matmul w", w.len(), groups.len() * k * n)?;
    let mut out = be.output(rows * n);
    let mut at = 0;
    for (g, &m) in groups.iter().enumerate() {
        let part = be.matmul(&x[at * k..(at + m) * k].to_vec(), &w[g * k * n..(g + 1) * k * n].to_vec(), m, k, n)?;
        out[at * n..(at + m) * n].copy_from_slice(&part);
        at += m;
    }
    Ok(out)
}
