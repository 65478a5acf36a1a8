//! Checks of the mixture-of-experts operations: the router's top-k with
//! ties in its logits, the permutation grouping assignments by expert (with
//! and without a capacity, one assignment and none, enough to span several
//! of a kernel's chunks), the rows' permutation and the weighted combine
//! (with dropped assignments), and the grouped GEMM (with empty groups), on
//! tiny-moe's and moe-16l's shapes. The expected values come from
//! `reference` only, never from another backend.

use super::reference::{self as r, wide};
use super::{CheckedBackend, Checker};
use crate::backend::Result;

/// The share of positions where two index lists differ (a length mismatch
/// counts every missing position), as a check error.
fn mismatch(got: &[f64], want: &[f64]) -> (Vec<f32>, Vec<f64>) {
    let wrong = got.iter().zip(want).filter(|(a, b)| a != b).count() + got.len().abs_diff(want.len());
    (vec![wrong as f32 / want.len().max(1) as f32], vec![0.0])
}

/// Slots as the backend holds them: the row, or -1 when dropped.
fn slot_values(slots: &[Option<usize>]) -> Vec<f32> {
    slots.iter().map(|s| s.map_or(-1.0, |s| s as f32)).collect()
}

impl<B: CheckedBackend> Checker<'_, B> {
    /// `n` expert ids below `experts`; with `skew`, half of them expert 0
    /// (so capacities bite).
    fn expert_ids(&mut self, n: usize, experts: usize, skew: bool) -> Vec<u32> {
        (0..n).map(|i| if skew && i % 2 == 0 { 0 } else { (self.rng.next_u64() % experts as u64) as u32 }).collect()
    }

    /// Random ids, their reference slots, and the slots uploaded.
    fn planned(&mut self, rows: usize, k: usize, experts: usize, capacity: Option<usize>) -> Result<(Vec<Option<usize>>, usize, B::Buf)> {
        let ids = self.expert_ids(rows * k, experts, capacity.is_some());
        let (slots, _) = r::expert_slots(&ids, experts, capacity);
        let kept = slots.iter().flatten().count();
        let buf = self.be.upload_f32(&slot_values(&slots))?;
        Ok((slots, kept, buf))
    }
}

/// The router: softmax, top k and the renormalised weights; every third row
/// repeats its largest logit (and another one) so the lowest index must win
/// the ties.
pub fn router_top_k<B: CheckedBackend>(c: &mut Checker<B>) {
    for (rows, experts, k) in [(37, 8, 2), (1000, 16, 2), (5, 16, 1), (70, 64, 4)] {
        let outcome = (|| {
            let mut host = c.rng.normals(rows * experts, 2.0);
            for row in (0..rows).step_by(3) {
                // A tie anywhere, then the row's largest logit twice (the
                // winner is a tie).
                let r = &mut host[row * experts..(row + 1) * experts];
                r[1] = r[experts - 1];
                let top = (0..experts).fold(0, |b, e| if r[e] > r[b] { e } else { b });
                r[(top + experts / 2) % experts] = r[top];
            }
            let lb = c.be.upload(&host)?;
            let logits = wide(&c.be.download(&lb)?);
            let (ids, weights) = c.be.router_top_k(&lb, rows, experts, k)?;
            let (want_ids, want_w) = r::router_top_k(&logits, rows, experts, k);
            let want_ids: Vec<f64> = want_ids.iter().map(|&e| e as f64).collect();
            Ok(vec![mismatch(&wide(&c.be.download(&ids)?), &want_ids), (c.be.download(&weights)?, want_w)])
        })();
        c.push("router_top_k", format!("{rows} rows, top {k} of {experts}"), outcome);
    }
}

/// The slots of every assignment and the counts per expert, with and
/// without a capacity; the error is the share of wrong slots and counts.
pub fn expert_slots<B: CheckedBackend>(c: &mut Checker<B>) {
    for (n, experts, capacity) in [(74, 8, None), (0, 16, None), (1, 16, Some(1)), (4000, 16, None), (70_000, 16, Some(2_500)), (5000, 64, Some(40))] {
        let outcome = (|| {
            let ids = c.expert_ids(n, experts, capacity.is_some());
            let ib = c.be.upload_f32(&ids.iter().map(|&e| e as f32).collect::<Vec<_>>())?;
            let (slots, counts) = c.be.expert_slots(&ib, n, experts, capacity)?;
            let (want_slots, want_counts) = r::expert_slots(&ids, experts, capacity);
            let want_slots: Vec<f64> = slot_values(&want_slots).iter().map(|&s| s as f64).collect();
            let counts: Vec<f64> = counts.iter().map(|&x| x as f64).collect();
            Ok(vec![mismatch(&wide(&c.be.download(&slots)?), &want_slots), mismatch(&counts, &want_counts.iter().map(|&x| x as f64).collect::<Vec<_>>())])
        })();
        let cap = capacity.map_or("none".to_string(), |c| c.to_string());
        c.push("expert_slots", format!("{n} assignments, {experts} experts, capacity {cap}"), outcome);
    }
}

/// Rows copied to their assignments' slots, some dropped; a row width that
/// is not a multiple of 16 bytes in 16-bit types.
pub fn permute_to_experts<B: CheckedBackend>(c: &mut Checker<B>) {
    for (rows, cols, k, experts, capacity) in [(29, 64, 2, 8, None), (300, 512, 2, 16, Some(20)), (17, 100, 3, 4, None)] {
        let outcome = (|| {
            let (x, xb) = c.input(rows * cols, 1.0)?;
            let (slots, kept, sb) = c.planned(rows, k, experts, capacity)?;
            let got = c.be.download(&c.be.permute_to_experts(&xb, cols, &sb, rows, k, kept)?)?;
            Ok(vec![(got, r::permute_to_experts(&x, cols, &slots, k, kept))])
        })();
        c.push("permute_to_experts", format!("{rows} rows x {k} of {cols}"), outcome);
    }
}

/// Each token's expert rows summed by its weights, dropped assignments left out.
pub fn combine_from_experts<B: CheckedBackend>(c: &mut Checker<B>) {
    for (rows, cols, k, experts, capacity) in [(29, 64, 2, 8, None), (300, 512, 2, 16, Some(20)), (17, 100, 3, 4, Some(3))] {
        let outcome = (|| {
            let (slots, kept, sb) = c.planned(rows, k, experts, capacity)?;
            let (y, yb) = c.input(kept * cols, 1.0)?;
            let w: Vec<f32> = c.rng.normals(rows * k, 1.0).iter().map(|v| v.abs()).collect();
            let wb = c.be.upload_f32(&w)?;
            let got = c.be.download(&c.be.combine_from_experts(&yb, cols, &sb, &wb, rows, k)?)?;
            Ok(vec![(got, r::combine_from_experts(&y, cols, &slots, &wide(&w), rows, k))])
        })();
        c.push("combine_from_experts", format!("{rows} rows x {k} of {cols}"), outcome);
    }
}

/// One GEMM per group, empty groups included: tiny-moe's and moe-16l's
/// expert up and down projections.
pub fn grouped_matmul<B: CheckedBackend>(c: &mut Checker<B>) {
    for (groups, k, n) in [(vec![5, 0, 17, 1], 64, 128), (vec![300, 120, 0, 77], 512, 1024), (vec![64, 33], 1024, 512)] {
        let outcome = (|| {
            let m: usize = groups.iter().sum();
            let (x, xb) = c.input(m * k, 1.0)?;
            let (w, wb) = c.input(groups.len() * k * n, 1.0 / (k as f32).sqrt())?;
            let got = c.be.download(&c.be.grouped_matmul(&xb, &wb, &groups, k, n)?)?;
            Ok(vec![(got, r::grouped_matmul(&x, &w, &groups, k, n))])
        })();
        c.push("grouped_matmul", format!("groups {groups:?}, [{k}x{n}]"), outcome);
    }
}
