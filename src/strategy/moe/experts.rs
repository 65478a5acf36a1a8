//! The mixture-of-experts FFN on one rank, as the plan's dataflow runs it:
//! route this rank's rows (router GEMM, softmax top-k), group their
//! assignments by expert, send each expert group rank the rows of the
//! experts it holds (the token counts first, then the rows: the
//! `expert_dispatch` all-to-all), run one GEMM per held expert over its
//! rows from every rank (up, GELU, down), send the outputs back
//! (`expert_combine`) and sum each token's expert outputs by its routing
//! weights. Every rank of an expert group calls this for every layer and
//! pass, with no rows of its own where it has none, so the all-to-alls
//! always meet. It also counts, per layer and expert, what was routed,
//! dropped and processed ([`ExpertTally`]).

use super::shards::MoeLayer;
use crate::backend::{Backend, RowCopy};
use crate::comm::{Category, Comm, Group};
use crate::metrics::ExpertLoad;
use crate::model::ModelConfig;
use crate::strategy::Result;
use std::ops::Range;

/// Routed, dropped and processed counts per (layer of the stage, phase,
/// expert of the model) on one rank, over one batch.
pub struct ExpertTally {
    /// The model's index of each of the stage's layers.
    layers: Vec<usize>,
    experts: usize,
    /// `[layer][phase][expert]` → (routed, dropped, received).
    counts: Vec<(u64, u64, u64)>,
    /// Whether any decode step ran.
    decoded: bool,
}

impl ExpertTally {
    pub fn new(layers: Range<usize>, experts: usize) -> Self {
        let n = layers.len() * 2 * experts;
        Self { layers: layers.collect(), experts, counts: vec![(0, 0, 0); n], decoded: false }
    }

    fn at(&mut self, layer: usize, decode: bool, expert: usize) -> &mut (u64, u64, u64) {
        self.decoded |= decode;
        &mut self.counts[(layer * 2 + usize::from(decode)) * self.experts + expert]
    }

    /// The counts as rows of the results file for `world_rank`: the
    /// prefill, and the decode steps if any ran.
    pub fn loads(&self, world_rank: usize) -> Vec<ExpertLoad> {
        let mut out = Vec::new();
        for (i, &layer) in self.layers.iter().enumerate() {
            for decode in [false, true].into_iter().filter(|&d| !d || self.decoded) {
                for expert in 0..self.experts {
                    let (routed, dropped, received) = self.counts[(i * 2 + usize::from(decode)) * self.experts + expert];
                    out.push(ExpertLoad { batch_index: 0, world_rank: world_rank as u32, layer: layer as u32, expert: expert as u32, decode, routed, dropped, received });
                }
            }
        }
        out
    }
}

/// Where a call's counts go: the stage's layer index and the phase.
#[derive(Clone, Copy, Debug)]
pub struct Tallied {
    pub layer: usize,
    pub decode: bool,
}

/// One rank's expert group and the experts it holds.
pub struct ExpertGroup<'g> {
    /// `None` when each rank holds every expert (EP = 1).
    pub group: Option<&'g Group>,
    /// Experts this rank holds.
    pub held: Range<usize>,
}

/// The MoE FFN of one rank.
pub struct MoeFfn<'a, 'c, B: Backend> {
    pub be: &'a B,
    pub comm: &'a Comm<'c, B>,
    pub cfg: &'a ModelConfig,
    /// Each expert's capacity for a call of so many rows, if any.
    pub capacity: &'a dyn Fn(usize) -> Option<usize>,
}

/// Row copies that turn blocks ordered `[outer][inner]` (block sizes
/// `sizes[outer][inner]`) into blocks ordered `[inner][outer]`; `inverse`
/// copies back.
fn transpose_blocks(sizes: &[Vec<usize>], inverse: bool) -> Vec<RowCopy> {
    let (outer, inner) = (sizes.len(), sizes.first().map_or(0, Vec::len));
    let mut from = vec![vec![0usize; inner]; outer];
    let mut at = 0;
    for (o, row) in sizes.iter().enumerate() {
        for (i, &n) in row.iter().enumerate() {
            from[o][i] = at;
            at += n;
        }
    }
    let mut copies = Vec::new();
    let mut to = 0;
    for i in 0..inner {
        for o in 0..outer {
            let len = sizes[o][i];
            if len > 0 {
                copies.push(if inverse { RowCopy { src: to, dst: from[o][i], len } } else { RowCopy { src: from[o][i], dst: to, len } });
            }
            to += len;
        }
    }
    copies
}

impl<B: Backend> MoeFfn<'_, '_, B> {
    /// The MoE FFN of `rows` normalised rows `h` (`[rows, d]`, this rank's
    /// tokens): `[rows, d]`, each row its experts' outputs weighed by its
    /// routing weights.
    pub fn forward(&self, layer: &MoeLayer<B>, h: &B::Buf, rows: usize, experts: &ExpertGroup<'_>, tally: &mut ExpertTally, at: Tallied) -> Result<B::Buf> {
        let (be, d, f) = (self.be, self.cfg.d_model, self.cfg.ffn);
        let e = self.cfg.experts.expect("the moe strategy runs models with experts");
        let (count, k) = (e.count, e.top_k);
        let capacity = (self.capacity)(rows);
        // Route: every assignment's slot in expert order, and the counts.
        let routed = if rows > 0 {
            let logits = be.matmul(h, &layer.router, rows, d, count)?;
            let (ids, weights) = be.router_top_k(&logits, rows, count, k)?;
            let (slots, routed) = be.expert_slots(&ids, rows * k, count, capacity)?;
            Some((weights, slots, routed))
        } else {
            None
        };
        let routed_counts = routed.as_ref().map_or_else(|| vec![0; count], |r| r.2.clone());
        let kept: Vec<usize> = routed_counts.iter().map(|&n| capacity.map_or(n, |c| n.min(c))).collect();
        for (x, (&n, &kp)) in routed_counts.iter().zip(&kept).enumerate() {
            let c = tally.at(at.layer, at.decode, x);
            c.0 += n as u64;
            c.1 += (n - kp) as u64;
        }
        let total: usize = kept.iter().sum();
        let permuted = match &routed {
            Some((_, slots, _)) => be.permute_to_experts(h, d, slots, rows, k, total)?,
            None => be.empty(0)?,
        };
        // Dispatch: each group rank the rows of the experts it holds.
        let held = experts.held.len();
        let (sent, from_peers, mine) = match experts.group {
            None => (vec![total], vec![kept.clone()], permuted),
            Some(g) => {
                let sent: Vec<usize> = (0..g.size()).map(|p| kept[p * held..(p + 1) * held].iter().sum()).collect();
                let counts: Vec<u32> = kept.iter().map(|&n| n as u32).collect();
                let got = self.comm.all_to_all_counts(Category::ExpertDispatch, g, &counts)?;
                let from_peers: Vec<Vec<usize>> = got.chunks(held).map(|c| c.iter().map(|&n| n as usize).collect()).collect();
                let recv: Vec<usize> = from_peers.iter().map(|c| c.iter().sum()).collect();
                let arrived = self.comm.all_to_all_rows(Category::ExpertDispatch, g, &permuted, d, &sent, &recv)?;
                (sent, from_peers, arrived)
            }
        };
        // Rows from every peer, regrouped by held expert for one GEMM each.
        let per_expert: Vec<usize> = (0..held).map(|x| from_peers.iter().map(|p| p[x]).sum()).collect();
        for (x, &n) in per_expert.iter().enumerate() {
            tally.at(at.layer, at.decode, experts.held.start + x).2 += n as u64;
        }
        let processed: usize = per_expert.iter().sum();
        let regroup = from_peers.len() > 1 && held > 1;
        let grouped = if regroup {
            let mut g = be.empty(processed * d)?;
            be.copy_rows(&mut g, d, &mine, &transpose_blocks(&from_peers, false))?;
            g
        } else {
            mine
        };
        let outputs = if processed > 0 {
            let mut up = be.grouped_matmul(&grouped, &layer.up, &per_expert, d, f)?;
            be.gelu(&mut up)?;
            be.grouped_matmul(&up, &layer.down, &per_expert, f, d)?
        } else {
            be.empty(0)?
        };
        // Combine: the outputs back to the ranks whose tokens they are.
        let back = match experts.group {
            None => outputs,
            Some(g) => {
                let by_peer = if regroup {
                    let mut b = be.empty(processed * d)?;
                    be.copy_rows(&mut b, d, &outputs, &transpose_blocks(&from_peers, true))?;
                    b
                } else {
                    outputs
                };
                let recv: Vec<usize> = from_peers.iter().map(|c| c.iter().sum()).collect();
                self.comm.all_to_all_rows(Category::ExpertCombine, g, &by_peer, d, &recv, &sent)?
            }
        };
        match &routed {
            Some((weights, slots, _)) => Ok(be.combine_from_experts(&back, d, slots, weights, rows, k)?),
            None => Ok(be.empty(0)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_by_peer_become_blocks_by_expert_and_back() {
        // Two peers × two experts: peer 0 sent 1 and 2 rows, peer 1 sent 3 and 0.
        let sizes = vec![vec![1, 2], vec![3, 0]];
        let to = transpose_blocks(&sizes, false);
        assert_eq!(to, vec![RowCopy { src: 0, dst: 0, len: 1 }, RowCopy { src: 3, dst: 1, len: 3 }, RowCopy { src: 1, dst: 4, len: 2 }]);
        let back = transpose_blocks(&sizes, true);
        assert!(back.iter().zip(&to).all(|(b, t)| b.src == t.dst && b.dst == t.src && b.len == t.len));
    }

    #[test]
    fn a_tally_gives_every_expert_of_every_layer_a_row_per_phase_that_ran() {
        let mut t = ExpertTally::new(2..4, 3);
        t.at(1, false, 2).0 += 5;
        let prefill_only = t.loads(7);
        assert_eq!(prefill_only.len(), 2 * 3);
        assert!(prefill_only.iter().any(|l| l.layer == 3 && l.expert == 2 && l.routed == 5 && !l.decode && l.world_rank == 7));
        t.at(0, true, 0).2 += 1;
        assert_eq!(t.loads(7).len(), 2 * 2 * 3);
    }
}
