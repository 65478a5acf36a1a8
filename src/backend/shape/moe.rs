//! The shape-only backend's mixture-of-experts operations: the router, the
//! expert slots, the permutation, one GEMM per expert and the combine, each
//! recorded with its dimensions, FLOPs and bytes.
//!
//! Routing is the one place a dataflow reads values: `expert_slots` returns
//! the tokens routed to each expert, which size the expert GEMMs and the
//! dispatch and combine messages. A shape-only run has no logits, so the
//! counts come from a stated [`Routing`] assumption. This module must not
//! cost anything.

use super::{check, Elem, OpDims, OpKind, ShapeBackend, ShapeBuf};
use crate::backend::{BackendError, Result};

/// How a shape-only run spreads token-expert assignments over experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// Every expert gets `assignments / experts`, the lowest-numbered
    /// `assignments % experts` one more: perfectly balanced routing, the
    /// best case for expert parallelism (no expert or rank waits for a
    /// busier one).
    #[default]
    Balanced,
}

impl Routing {
    /// What plans print about the assumption.
    pub fn describe(self) -> &'static str {
        match self {
            Routing::Balanced => "balanced routing assumed (every expert gets an equal share of the assignments)",
        }
    }

    /// Assignments routed to each of `experts` experts.
    pub fn counts(self, assignments: usize, experts: usize) -> Vec<usize> {
        match self {
            Routing::Balanced => {
                let (each, extra) = (assignments / experts.max(1), assignments % experts.max(1));
                (0..experts).map(|e| each + usize::from(e < extra)).collect()
            }
        }
    }
}

impl ShapeBackend {
    pub(super) fn router(&self, logits: &ShapeBuf, rows: usize, experts: usize, k: usize) -> Result<(ShapeBuf, ShapeBuf)> {
        check("router logits", logits.len, rows * experts)?;
        if k == 0 || k > experts {
            return Err(BackendError::Shape(format!("router_top_k: top {k} of {experts} experts")));
        }
        let (ids, weights) = (self.buf(rows * k, Elem::F32, Some(k)), self.buf(rows * k, Elem::F32, Some(k)));
        // A softmax (exponential, sum, division) and a top-k scan over each row.
        let flops = (rows * experts * (4 + k)) as f64;
        self.record(OpKind::RouterTopK, OpDims::Rows { rows, cols: experts }, flops, self.bytes(logits, rows * experts), 8 * (rows * k) as u64, &[logits], &[&ids, &weights]);
        Ok((ids, weights))
    }

    /// The counts are before any capacity, as `Backend::expert_slots`
    /// returns them: the dataflow applies the capacity.
    pub(super) fn slots(&self, ids: &ShapeBuf, assignments: usize, experts: usize, _capacity: Option<usize>) -> Result<(ShapeBuf, Vec<usize>)> {
        check("expert_slots ids", ids.len, assignments)?;
        let slots = self.buf(assignments, Elem::F32, Some(1));
        // A counting sort: ids read, slots written, the counts read back.
        self.record(OpKind::ExpertSlots, OpDims::Rows { rows: assignments, cols: experts }, 0.0, 4 * assignments as u64, 4 * (assignments + experts) as u64, &[ids], &[&slots]);
        Ok((slots, self.routing.counts(assignments, experts)))
    }

    pub(super) fn permute(&self, x: &ShapeBuf, cols: usize, slots: &ShapeBuf, rows: usize, k: usize, kept: usize) -> Result<ShapeBuf> {
        check("permute_to_experts x", x.len, rows * cols)?;
        check("permute_to_experts slots", slots.len, rows * k)?;
        let out = self.buf(kept * cols, x.elem, Some(cols));
        let moved = self.bytes(x, kept * cols);
        self.record(OpKind::PermuteToExperts, OpDims::Rows { rows: kept, cols }, 0.0, moved + 4 * (rows * k) as u64, moved, &[x, slots], &[&out]);
        Ok(out)
    }

    pub(super) fn combine(&self, y: &ShapeBuf, cols: usize, slots: &ShapeBuf, weights: &ShapeBuf, rows: usize, k: usize) -> Result<ShapeBuf> {
        check("combine_from_experts slots", slots.len, rows * k)?;
        check("combine_from_experts weights", weights.len, rows * k)?;
        let out = self.model(rows * cols, cols);
        // Each kept assignment's row is read once, weighted and summed.
        let kept = y.len / cols.max(1);
        let read = self.bytes(y, kept * cols) + 8 * (rows * k) as u64;
        self.record(OpKind::CombineFromExperts, OpDims::Rows { rows, cols }, (2 * kept * cols) as f64, read, self.bytes(&out, rows * cols), &[y, slots, weights], &[&out]);
        Ok(out)
    }

    pub(super) fn grouped(&self, x: &ShapeBuf, w: &ShapeBuf, groups: &[usize], k: usize, n: usize) -> Result<ShapeBuf> {
        let m: usize = groups.iter().sum();
        check("grouped_matmul x", x.len, m * k)?;
        check("grouped_matmul w", w.len, groups.len() * k * n)?;
        let out = self.model(m * n, n);
        // Experts without rows run no GEMM and read no weights.
        let busy = groups.iter().filter(|&&g| g > 0).count();
        let read = self.bytes(x, m * k) + self.bytes(w, busy * k * n);
        self.record(OpKind::GroupedMatmul, OpDims::Grouped { groups: busy, m, k, n }, 2.0 * (m * k * n) as f64, read, self.bytes(&out, m * n), &[x, w], &[&out]);
        Ok(out)
    }
}
