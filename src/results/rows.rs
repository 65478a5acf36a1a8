//! The compound row types of the results file and their conversions from and
//! to the metrics records. Field names here are the column names h5py and
//! pandas show, so they are part of the schema: renaming one is a schema
//! change (see `docs/results-schema.md`).
//!
//! Conventions that keep "not measured" from reading as zero: memory not
//! measured is −1, energy not measured is NaN with `energy_measured` false.
//! Rows of older schema versions, read and never written, are in `legacy`.

mod legacy;

pub(crate) use legacy::{RankRowV1, RankRowV2};

use super::aggregate::{CommAggregate, RankAggregates};
use super::attrs::vlen;
use super::{category_from_name, Result, StoredSummary};
use crate::comm::{Category, CommStat};
use crate::metrics::{BatchRecord, CategorySummary, Distribution, RankRecord};
use hdf5::types::VarLenUnicode;
use hdf5::H5Type;
use std::collections::BTreeMap;

/// One row of `batches`: every scalar of a [`BatchRecord`], its derived
/// figures, and where its variable-length payload lies in `itl_s`, `tokens`
/// and `ranks`.
#[derive(H5Type, Clone, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct BatchRow {
    pub batch_index: u32,
    pub first_sequence: u32,
    pub seq_len: u32,
    pub num_sequences: u32,
    pub output_tokens: u32,
    pub requested_batch: u32,
    pub effective_batch: u32,
    pub micro_batches: u32,
    pub pool_requested: u32,
    pub pool_effective: u32,
    pub pool_fallback: bool,
    pub ttft_s: f64,
    pub e2e_s: f64,
    pub tpot_s: f64,
    pub paper_tpot_s: f64,
    pub flops: f64,
    pub total_tokens: u64,
    pub itl_offset: u64,
    pub itl_count: u64,
    /// First row of the batch's sequences in `tokens`; it spans `num_sequences` rows.
    pub tokens_offset: u64,
    pub ranks_offset: u64,
    pub ranks_count: u64,
}

/// Where a batch's payload was appended.
pub(crate) struct PayloadOffsets {
    pub itl: u64,
    pub tokens: u64,
    pub ranks: u64,
    pub ranks_count: u64,
}

impl BatchRow {
    pub fn new(b: &BatchRecord, at: &PayloadOffsets) -> Self {
        Self {
            batch_index: b.batch_index,
            first_sequence: b.first_sequence,
            seq_len: b.seq_len,
            num_sequences: b.num_sequences,
            output_tokens: b.output_tokens,
            requested_batch: b.requested_batch,
            effective_batch: b.effective_batch,
            micro_batches: b.micro_batches,
            pool_requested: b.pool_requested,
            pool_effective: b.pool_effective,
            pool_fallback: b.pool_fallback,
            ttft_s: b.ttft_s,
            e2e_s: b.e2e_s,
            tpot_s: b.tpot_s(),
            paper_tpot_s: b.paper_tpot_s(),
            flops: b.flops,
            total_tokens: b.total_tokens(),
            itl_offset: at.itl,
            itl_count: b.itl_s.len() as u64,
            tokens_offset: at.tokens,
            ranks_offset: at.ranks,
            ranks_count: at.ranks_count,
        }
    }

    /// The record without its payload (`itl_s` and `tokens` empty).
    pub fn to_record(&self) -> BatchRecord {
        BatchRecord {
            batch_index: self.batch_index,
            first_sequence: self.first_sequence,
            seq_len: self.seq_len,
            num_sequences: self.num_sequences,
            output_tokens: self.output_tokens,
            requested_batch: self.requested_batch,
            effective_batch: self.effective_batch,
            micro_batches: self.micro_batches,
            pool_requested: self.pool_requested,
            pool_effective: self.pool_effective,
            pool_fallback: self.pool_fallback,
            ttft_s: self.ttft_s,
            e2e_s: self.e2e_s,
            itl_s: Vec::new(),
            tokens: Vec::new(),
            flops: self.flops,
        }
    }
}

/// One row of `ranks`: what one rank measured in one batch — its wall,
/// compute and waiting time, memory, energy — with the communication
/// categories spread into columns `<category>_s`, `_bytes`,
/// `_calls` so pandas sees a flat table.
#[derive(H5Type, Clone, Debug)]
#[repr(C)]
pub(crate) struct RankRow {
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
    pub expert_dispatch_s: f64,
    pub expert_dispatch_bytes: u64,
    pub expert_dispatch_calls: u64,
    pub expert_combine_s: f64,
    pub expert_combine_bytes: u64,
    pub expert_combine_calls: u64,
    pub control_s: f64,
    pub control_bytes: u64,
    pub control_calls: u64,
}

impl RankRow {
    /// The three columns of one communication category. Exhaustive on
    /// purpose: a new category does not compile until the schema has it.
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
            Category::ExpertDispatch => (&mut self.expert_dispatch_s, &mut self.expert_dispatch_bytes, &mut self.expert_dispatch_calls),
            Category::ExpertCombine => (&mut self.expert_combine_s, &mut self.expert_combine_bytes, &mut self.expert_combine_calls),
            Category::Control => (&mut self.control_s, &mut self.control_bytes, &mut self.control_calls),
        }
    }

    pub fn new(r: &RankRecord) -> Result<Self> {
        let mut row = Self {
            batch_index: r.batch_index,
            world_rank: r.world_rank,
            role: vlen(&r.role)?,
            active: r.active,
            wall_s: r.wall_s,
            prefill_s: r.prefill_s,
            decode_s: r.decode_s,
            peak_memory_bytes: r.peak_memory_bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            memory_estimate_bytes: r.memory_estimate_bytes,
            energy_measured: r.energy_prefill_j.is_some() || r.energy_decode_j.is_some(),
            energy_prefill_j: r.energy_prefill_j.unwrap_or(f64::NAN),
            energy_decode_j: r.energy_decode_j.unwrap_or(f64::NAN),
            flops: r.flops,
            compute_s: r.compute_s,
            wait_s: r.wait_s,
            tp_allreduce_s: 0.0,
            tp_allreduce_bytes: 0,
            tp_allreduce_calls: 0,
            tp_allgather_s: 0.0,
            tp_allgather_bytes: 0,
            tp_allgather_calls: 0,
            tp_reducescatter_s: 0.0,
            tp_reducescatter_bytes: 0,
            tp_reducescatter_calls: 0,
            pp_p2p_s: 0.0,
            pp_p2p_bytes: 0,
            pp_p2p_calls: 0,
            pool_scatter_s: 0.0,
            pool_scatter_bytes: 0,
            pool_scatter_calls: 0,
            kv_replication_s: 0.0,
            kv_replication_bytes: 0,
            kv_replication_calls: 0,
            attention_sync_s: 0.0,
            attention_sync_bytes: 0,
            attention_sync_calls: 0,
            result_aggregation_s: 0.0,
            result_aggregation_bytes: 0,
            result_aggregation_calls: 0,
            pool_to_base_s: 0.0,
            pool_to_base_bytes: 0,
            pool_to_base_calls: 0,
            expert_dispatch_s: 0.0,
            expert_dispatch_bytes: 0,
            expert_dispatch_calls: 0,
            expert_combine_s: 0.0,
            expert_combine_bytes: 0,
            expert_combine_calls: 0,
            control_s: 0.0,
            control_bytes: 0,
            control_calls: 0,
        };
        for (&c, stat) in &r.comm {
            let (s, bytes, calls) = row.comm_columns(c);
            *s = stat.seconds;
            *bytes = stat.bytes;
            *calls = stat.calls;
        }
        Ok(row)
    }

    pub fn to_record(&self) -> RankRecord {
        let mut copy = self.clone();
        let mut comm = BTreeMap::new();
        for c in Category::ALL {
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

/// The single row of `summary`.
#[derive(H5Type, Clone, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct SummaryRow {
    pub batches: u64,
    pub sequences: u64,
    pub total_tokens: u64,
    pub wall_s: f64,
    pub tps: f64,
    pub ttft_count: u64,
    pub ttft_mean_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p90_s: f64,
    pub ttft_p99_s: f64,
    pub tpot_count: u64,
    pub tpot_mean_s: f64,
    pub tpot_p50_s: f64,
    pub tpot_p90_s: f64,
    pub tpot_p99_s: f64,
    pub itl_count: u64,
    pub itl_mean_s: f64,
    pub itl_p50_s: f64,
    pub itl_p90_s: f64,
    pub itl_p99_s: f64,
    pub e2e_count: u64,
    pub e2e_mean_s: f64,
    pub e2e_p50_s: f64,
    pub e2e_p90_s: f64,
    pub e2e_p99_s: f64,
    pub paper_tpot_mean_s: f64,
    pub flops: f64,
    pub achieved_tflops: f64,
    pub rank_rows: u64,
    /// −1 = not measured on any rank.
    pub peak_memory_max_bytes: i64,
    /// NaN = not measured.
    pub peak_memory_max_gb: f64,
    pub memory_estimate_max_bytes: u64,
    pub energy_measured: bool,
    /// NaN unless `energy_measured`.
    pub energy_j: f64,
    pub energy_kwh_per_1000_inferences: f64,
    pub energy_j_per_token: f64,
    pub comm_s: f64,
    pub active_wall_s: f64,
    pub comm_share: f64,
}

impl SummaryRow {
    pub fn new(s: &StoredSummary) -> Self {
        let (sum, agg) = (&s.summary, &s.aggregates);
        let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
        Self {
            batches: sum.batches as u64,
            sequences: sum.sequences,
            total_tokens: sum.total_tokens,
            wall_s: sum.wall_s,
            tps: sum.tps,
            ttft_count: sum.ttft.count as u64,
            ttft_mean_s: sum.ttft.mean,
            ttft_p50_s: sum.ttft.p50,
            ttft_p90_s: sum.ttft.p90,
            ttft_p99_s: sum.ttft.p99,
            tpot_count: sum.tpot.count as u64,
            tpot_mean_s: sum.tpot.mean,
            tpot_p50_s: sum.tpot.p50,
            tpot_p90_s: sum.tpot.p90,
            tpot_p99_s: sum.tpot.p99,
            itl_count: sum.itl.count as u64,
            itl_mean_s: sum.itl.mean,
            itl_p50_s: sum.itl.p50,
            itl_p90_s: sum.itl.p90,
            itl_p99_s: sum.itl.p99,
            e2e_count: sum.e2e.count as u64,
            e2e_mean_s: sum.e2e.mean,
            e2e_p50_s: sum.e2e.p50,
            e2e_p90_s: sum.e2e.p90,
            e2e_p99_s: sum.e2e.p99,
            paper_tpot_mean_s: sum.paper_tpot_mean,
            flops: s.flops,
            achieved_tflops: s.achieved_tflops(),
            rank_rows: agg.rank_rows,
            peak_memory_max_bytes: agg.peak_memory_max_bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            peak_memory_max_gb: nan(agg.peak_memory_max_gb()),
            memory_estimate_max_bytes: agg.memory_estimate_max_bytes,
            energy_measured: agg.energy_j.is_some(),
            energy_j: nan(agg.energy_j),
            energy_kwh_per_1000_inferences: nan(agg.energy_kwh_per_1000_inferences(sum.sequences)),
            energy_j_per_token: nan(agg.energy_j_per_token(sum.total_tokens)),
            comm_s: agg.comm_s,
            active_wall_s: agg.active_wall_s,
            comm_share: agg.comm_share(),
        }
    }

    pub fn to_summary(&self, comm: Vec<CommAggregate>) -> StoredSummary {
        let dist = |count: u64, mean, p50, p90, p99| Distribution { count: count as usize, mean, p50, p90, p99 };
        StoredSummary {
            summary: CategorySummary {
                batches: self.batches as usize,
                sequences: self.sequences,
                total_tokens: self.total_tokens,
                wall_s: self.wall_s,
                tps: self.tps,
                ttft: dist(self.ttft_count, self.ttft_mean_s, self.ttft_p50_s, self.ttft_p90_s, self.ttft_p99_s),
                tpot: dist(self.tpot_count, self.tpot_mean_s, self.tpot_p50_s, self.tpot_p90_s, self.tpot_p99_s),
                itl: dist(self.itl_count, self.itl_mean_s, self.itl_p50_s, self.itl_p90_s, self.itl_p99_s),
                e2e: dist(self.e2e_count, self.e2e_mean_s, self.e2e_p50_s, self.e2e_p90_s, self.e2e_p99_s),
                paper_tpot_mean: self.paper_tpot_mean_s,
            },
            aggregates: RankAggregates {
                rank_rows: self.rank_rows,
                peak_memory_max_bytes: u64::try_from(self.peak_memory_max_bytes).ok(),
                memory_estimate_max_bytes: self.memory_estimate_max_bytes,
                energy_j: self.energy_measured.then_some(self.energy_j),
                comm_s: self.comm_s,
                active_wall_s: self.active_wall_s,
                comm,
            },
            flops: self.flops,
        }
    }
}

/// One row of `comm`: one communication category of the summary.
#[derive(H5Type, Clone, Debug)]
#[repr(C)]
pub(crate) struct CommRow {
    pub category: VarLenUnicode,
    pub seconds_sum: f64,
    pub seconds_max_rank: f64,
    pub bytes: u64,
    pub calls: u64,
    /// NaN when no time was recorded.
    pub gb_per_s: f64,
    /// `seconds_sum` over the active ranks' wall time.
    pub share_of_wall: f64,
}

impl CommRow {
    pub fn new(c: &CommAggregate, active_wall_s: f64) -> Result<Self> {
        Ok(Self {
            category: vlen(c.category.name())?,
            seconds_sum: c.seconds_sum,
            seconds_max_rank: c.seconds_max_rank,
            bytes: c.bytes,
            calls: c.calls,
            gb_per_s: c.gb_per_s().unwrap_or(f64::NAN),
            share_of_wall: if active_wall_s > 0.0 { c.seconds_sum / active_wall_s } else { 0.0 },
        })
    }

    /// `None` for a category this build does not know.
    pub fn to_aggregate(&self) -> Option<CommAggregate> {
        Some(CommAggregate { category: category_from_name(self.category.as_str())?, seconds_sum: self.seconds_sum, seconds_max_rank: self.seconds_max_rank, bytes: self.bytes, calls: self.calls })
    }
}

/// One row of `/provenance/devices`.
#[derive(H5Type, Clone, Debug)]
#[repr(C)]
pub(crate) struct DeviceRow {
    pub world_rank: u32,
    pub name: VarLenUnicode,
    pub uuid: VarLenUnicode,
    pub pci_bus_id: VarLenUnicode,
}

/// One row of `/provenance/roles`.
#[derive(H5Type, Clone, Debug)]
#[repr(C)]
pub(crate) struct RoleRowH5 {
    pub world_rank: u32,
    pub host: VarLenUnicode,
    pub local_rank: u32,
    pub strategy: VarLenUnicode,
    pub role: VarLenUnicode,
}
