//! The routing datasets of a mixture-of-experts strategy's category group
//! (schema version 3): `experts`, one row per (batch, rank, layer, expert,
//! phase) with what the rank counted, and `routing`, the per-layer load
//! summary the category's summary writes beside it.

use crate::metrics::{ExpertLoad, LayerRouting};
use hdf5::H5Type;

/// One row of `experts`.
#[derive(H5Type, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct ExpertRow {
    pub batch_index: u32,
    pub world_rank: u32,
    pub layer: u32,
    pub expert: u32,
    /// The decode steps (true) or the prefill (false).
    pub decode: bool,
    pub routed: u64,
    pub dropped: u64,
    pub received: u64,
}

impl ExpertRow {
    pub fn new(l: &ExpertLoad) -> Self {
        Self { batch_index: l.batch_index, world_rank: l.world_rank, layer: l.layer, expert: l.expert, decode: l.decode, routed: l.routed, dropped: l.dropped, received: l.received }
    }

    pub fn to_load(self) -> ExpertLoad {
        ExpertLoad {
            batch_index: self.batch_index,
            world_rank: self.world_rank,
            layer: self.layer,
            expert: self.expert,
            decode: self.decode,
            routed: self.routed,
            dropped: self.dropped,
            received: self.received,
        }
    }
}

/// One row of `routing`: a layer's load in one phase over the category.
#[derive(H5Type, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct RoutingRow {
    pub layer: u32,
    pub decode: bool,
    pub assignments: u64,
    pub dropped: u64,
    pub expert_max: f64,
    pub expert_mean: f64,
    /// `expert_max / expert_mean`; NaN without rows.
    pub expert_imbalance: f64,
    pub rank_max: f64,
    pub rank_mean: f64,
    pub rank_imbalance: f64,
}

impl RoutingRow {
    pub fn new(r: &LayerRouting) -> Self {
        Self {
            layer: r.layer,
            decode: r.decode,
            assignments: r.assignments,
            dropped: r.dropped,
            expert_max: r.expert_max,
            expert_mean: r.expert_mean,
            expert_imbalance: r.expert_imbalance(),
            rank_max: r.rank_max,
            rank_mean: r.rank_mean,
            rank_imbalance: r.rank_imbalance(),
        }
    }

    pub fn to_routing(self) -> LayerRouting {
        LayerRouting {
            layer: self.layer,
            decode: self.decode,
            assignments: self.assignments,
            dropped: self.dropped,
            expert_max: self.expert_max,
            expert_mean: self.expert_mean,
            rank_max: self.rank_max,
            rank_mean: self.rank_mean,
        }
    }
}
