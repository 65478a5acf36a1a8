//! The `ranks` rows of older schema versions, read and never written:
//! version 1 (eight communication categories, no compute and waiting
//! times) and version 2 (ten categories, no expert traffic).

use crate::comm::{Category, CommStat};
use crate::metrics::RankRecord;
use hdf5::types::VarLenUnicode;
use hdf5::H5Type;
use std::collections::BTreeMap;

/// A row of `ranks` as schema version 1 wrote it (eight communication
/// categories, no compute and wait times); read, never written.
#[derive(H5Type, Clone, Debug)]
#[repr(C)]
pub(crate) struct RankRowV1 {
    pub batch_index: u32,
    pub world_rank: u32,
    pub role: VarLenUnicode,
    pub active: bool,
    pub wall_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// −1 = not measured.
    pub peak_memory_bytes: i64,
    pub memory_estimate_bytes: u64,
    pub energy_measured: bool,
    /// NaN = not measured.
    pub energy_prefill_j: f64,
    pub energy_decode_j: f64,
    pub flops: f64,
    pub tp_allreduce_s: f64,
    pub tp_allreduce_bytes: u64,
    pub tp_allreduce_calls: u64,
    pub pp_p2p_s: f64,
    pub pp_p2p_bytes: u64,
    pub pp_p2p_calls: u64,
    pub pool_scatter_s: f64,
    pub pool_scatter_bytes: u64,
    pub pool_scatter_calls: u64,
    pub kv_replication_s: f64,
    pub kv_replication_bytes: u64,
    pub kv_replication_calls: u64,
    pub attention_sync_s: f64,
    pub attention_sync_bytes: u64,
    pub attention_sync_calls: u64,
    pub result_aggregation_s: f64,
    pub result_aggregation_bytes: u64,
    pub result_aggregation_calls: u64,
    pub pool_to_base_s: f64,
    pub pool_to_base_bytes: u64,
    pub pool_to_base_calls: u64,
    pub control_s: f64,
    pub control_bytes: u64,
    pub control_calls: u64,
}

impl RankRowV1 {
    /// The three columns of one category that version 1 had.
    fn comm_columns(&mut self, c: Category) -> (&mut f64, &mut u64, &mut u64) {
        match c {
            Category::TpAllreduce => (&mut self.tp_allreduce_s, &mut self.tp_allreduce_bytes, &mut self.tp_allreduce_calls),
            Category::PpP2p => (&mut self.pp_p2p_s, &mut self.pp_p2p_bytes, &mut self.pp_p2p_calls),
            Category::PoolScatter => (&mut self.pool_scatter_s, &mut self.pool_scatter_bytes, &mut self.pool_scatter_calls),
            Category::KvReplication => (&mut self.kv_replication_s, &mut self.kv_replication_bytes, &mut self.kv_replication_calls),
            Category::AttentionSync => (&mut self.attention_sync_s, &mut self.attention_sync_bytes, &mut self.attention_sync_calls),
            Category::ResultAggregation => (&mut self.result_aggregation_s, &mut self.result_aggregation_bytes, &mut self.result_aggregation_calls),
            Category::PoolToBase => (&mut self.pool_to_base_s, &mut self.pool_to_base_bytes, &mut self.pool_to_base_calls),
            Category::Control => (&mut self.control_s, &mut self.control_bytes, &mut self.control_calls),
            Category::TpAllgather | Category::TpReducescatter | Category::ExpertDispatch | Category::ExpertCombine => unreachable!("schema version 1 has no column for {}", c.name()),
        }
    }

    pub fn to_record(&self) -> RankRecord {
        let mut copy = self.clone();
        let mut comm = BTreeMap::new();
        for c in Category::ALL.into_iter().filter(|c| !matches!(c, Category::TpAllgather | Category::TpReducescatter | Category::ExpertDispatch | Category::ExpertCombine)) {
            let (s, bytes, calls) = copy.comm_columns(c);
            // The comm layer creates an entry only when it records a call,
            // so an all-zero triple is an absent entry.
            if *calls > 0 || *bytes > 0 || *s != 0.0 {
                comm.insert(c, CommStat { calls: *calls, bytes: *bytes, seconds: *s });
            }
        }
        let measured = |j: f64| (!j.is_nan()).then_some(j);
        RankRecord {
            batch_index: self.batch_index,
            world_rank: self.world_rank,
            role: self.role.as_str().to_string(),
            active: self.active,
            wall_s: self.wall_s,
            prefill_s: self.prefill_s,
            decode_s: self.decode_s,
            comm,
            peak_memory_bytes: u64::try_from(self.peak_memory_bytes).ok(),
            memory_estimate_bytes: self.memory_estimate_bytes,
            energy_prefill_j: measured(self.energy_prefill_j),
            energy_decode_j: measured(self.energy_decode_j),
            flops: self.flops,
            compute_s: self.wall_s,
            wait_s: 0.0,
        }
    }
}

/// A row of `ranks` as schema version 2 wrote it (ten communication
/// categories, no expert traffic); read, never written.
#[derive(H5Type, Clone, Debug)]
#[repr(C)]
pub(crate) struct RankRowV2 {
    pub batch_index: u32,
    pub world_rank: u32,
    pub role: VarLenUnicode,
    pub active: bool,
    pub wall_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// −1 = not measured.
    pub peak_memory_bytes: i64,
    pub memory_estimate_bytes: u64,
    pub energy_measured: bool,
    /// NaN = not measured.
    pub energy_prefill_j: f64,
    pub energy_decode_j: f64,
    pub flops: f64,
    /// Time the compute timeline worked (wall minus waiting for messages).
    pub compute_s: f64,
    /// Time the compute timeline waited for messages.
    pub wait_s: f64,
    pub tp_allreduce_s: f64,
    pub tp_allreduce_bytes: u64,
    pub tp_allreduce_calls: u64,
    pub tp_allgather_s: f64,
    pub tp_allgather_bytes: u64,
    pub tp_allgather_calls: u64,
    pub tp_reducescatter_s: f64,
    pub tp_reducescatter_bytes: u64,
    pub tp_reducescatter_calls: u64,
    pub pp_p2p_s: f64,
    pub pp_p2p_bytes: u64,
    pub pp_p2p_calls: u64,
    pub pool_scatter_s: f64,
    pub pool_scatter_bytes: u64,
    pub pool_scatter_calls: u64,
    pub kv_replication_s: f64,
    pub kv_replication_bytes: u64,
    pub kv_replication_calls: u64,
    pub attention_sync_s: f64,
    pub attention_sync_bytes: u64,
    pub attention_sync_calls: u64,
    pub result_aggregation_s: f64,
    pub result_aggregation_bytes: u64,
    pub result_aggregation_calls: u64,
    pub pool_to_base_s: f64,
    pub pool_to_base_bytes: u64,
    pub pool_to_base_calls: u64,
    pub control_s: f64,
    pub control_bytes: u64,
    pub control_calls: u64,
}

impl RankRowV2 {
    /// The three columns of one category that version 2 had.
    fn comm_columns(&mut self, c: Category) -> (&mut f64, &mut u64, &mut u64) {
        match c {
            Category::TpAllreduce => (&mut self.tp_allreduce_s, &mut self.tp_allreduce_bytes, &mut self.tp_allreduce_calls),
            Category::TpAllgather => (&mut self.tp_allgather_s, &mut self.tp_allgather_bytes, &mut self.tp_allgather_calls),
            Category::TpReducescatter => (&mut self.tp_reducescatter_s, &mut self.tp_reducescatter_bytes, &mut self.tp_reducescatter_calls),
            Category::PpP2p => (&mut self.pp_p2p_s, &mut self.pp_p2p_bytes, &mut self.pp_p2p_calls),
            Category::PoolScatter => (&mut self.pool_scatter_s, &mut self.pool_scatter_bytes, &mut self.pool_scatter_calls),
            Category::KvReplication => (&mut self.kv_replication_s, &mut self.kv_replication_bytes, &mut self.kv_replication_calls),
            Category::AttentionSync => (&mut self.attention_sync_s, &mut self.attention_sync_bytes, &mut self.attention_sync_calls),
            Category::ResultAggregation => (&mut self.result_aggregation_s, &mut self.result_aggregation_bytes, &mut self.result_aggregation_calls),
            Category::PoolToBase => (&mut self.pool_to_base_s, &mut self.pool_to_base_bytes, &mut self.pool_to_base_calls),
            Category::Control => (&mut self.control_s, &mut self.control_bytes, &mut self.control_calls),
            Category::ExpertDispatch | Category::ExpertCombine => unreachable!("schema version 2 has no column for {}", c.name()),
        }
    }

    pub fn to_record(&self) -> RankRecord {
        let mut copy = self.clone();
        let mut comm = BTreeMap::new();
        for c in Category::ALL.into_iter().filter(|c| !matches!(c, Category::ExpertDispatch | Category::ExpertCombine)) {
            let (s, bytes, calls) = copy.comm_columns(c);
            // The comm layer creates an entry only when it records a call,
            // so an all-zero triple is an absent entry.
            if *calls > 0 || *bytes > 0 || *s != 0.0 {
                comm.insert(c, CommStat { calls: *calls, bytes: *bytes, seconds: *s });
            }
        }
        let measured = |j: f64| (!j.is_nan()).then_some(j);
        RankRecord {
            batch_index: self.batch_index,
            world_rank: self.world_rank,
            role: self.role.as_str().to_string(),
            active: self.active,
            wall_s: self.wall_s,
            prefill_s: self.prefill_s,
            decode_s: self.decode_s,
            comm,
            peak_memory_bytes: u64::try_from(self.peak_memory_bytes).ok(),
            memory_estimate_bytes: self.memory_estimate_bytes,
            energy_prefill_j: measured(self.energy_prefill_j),
            energy_decode_j: measured(self.energy_decode_j),
            flops: self.flops,
            compute_s: self.compute_s,
            wait_s: self.wait_s,
        }
    }
}
