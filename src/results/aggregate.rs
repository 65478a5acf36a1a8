//! Memory, energy and communication aggregates of one (strategy, category),
//! computed from its per-rank records. The results file stores them with the
//! summary and `analyze` recomputes them for categories an interrupted run
//! left without one; both use this code so the two cannot disagree.
//!
//! Arithmetic only: no file access.

use crate::comm::Category;
use crate::metrics::RankRecord;
use std::collections::BTreeMap;

/// One communication category summed over all ranks and batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CommAggregate {
    pub category: Category,
    /// Time spent in the category, summed over ranks and batches (rank-seconds).
    pub seconds_sum: f64,
    /// The largest per-rank total time of the category (s): the time the
    /// busiest rank spent in it.
    pub seconds_max_rank: f64,
    /// Bytes as each rank counted them (see the schema document for what one
    /// call counts), summed over ranks.
    pub bytes: u64,
    pub calls: u64,
}

impl CommAggregate {
    /// Achieved bandwidth per rank in GB/s (1 GB = 1e9 bytes): bytes over
    /// rank-seconds; `None` when no time was recorded.
    pub fn gb_per_s(&self) -> Option<f64> {
        (self.seconds_sum > 0.0).then(|| self.bytes as f64 / self.seconds_sum / 1e9)
    }
}

/// Aggregates over the rank records of one (strategy, category).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankAggregates {
    /// Rank records aggregated (one per batch and rank).
    pub rank_rows: u64,
    /// Largest peak memory of any rank in any batch; `None` if no rank measured it.
    pub peak_memory_max_bytes: Option<u64>,
    /// Largest analytical memory estimate of any rank.
    pub memory_estimate_max_bytes: u64,
    /// Energy of all ranks (active and idle, prefill and decode) in J; `None`
    /// unless every rank record measured both phases, since a partial sum
    /// would read as a real, too small, figure.
    pub energy_j: Option<f64>,
    /// Communication time of active ranks (rank-seconds).
    pub comm_s: f64,
    /// Wall time of active ranks (rank-seconds).
    pub active_wall_s: f64,
    /// One entry per communication category, in [`Category::ALL`] order.
    pub comm: Vec<CommAggregate>,
}

impl RankAggregates {
    /// Aggregates the given rank records.
    pub fn from_ranks(ranks: &[RankRecord]) -> Self {
        let mut per_category: BTreeMap<Category, CommAggregate> =
            Category::ALL.into_iter().map(|c| (c, CommAggregate { category: c, seconds_sum: 0.0, seconds_max_rank: 0.0, bytes: 0, calls: 0 })).collect();
        let mut per_rank_seconds: BTreeMap<(u32, Category), f64> = BTreeMap::new();
        let mut peak: Option<u64> = None;
        let mut estimate = 0u64;
        let mut energy = Some(0.0);
        let (mut comm_s, mut active_wall_s) = (0.0, 0.0);

        for r in ranks {
            if let Some(p) = r.peak_memory_bytes {
                peak = Some(peak.map_or(p, |q| q.max(p)));
            }
            estimate = estimate.max(r.memory_estimate_bytes);
            energy = match (energy, r.energy_prefill_j, r.energy_decode_j) {
                (Some(sum), Some(p), Some(d)) => Some(sum + p + d),
                _ => None,
            };
            if r.active {
                comm_s += r.comm_seconds();
                active_wall_s += r.wall_s;
            }
            for (&c, stat) in &r.comm {
                let agg = per_category.get_mut(&c).expect("every category is in Category::ALL");
                agg.seconds_sum += stat.seconds;
                agg.bytes += stat.bytes;
                agg.calls += stat.calls;
                *per_rank_seconds.entry((r.world_rank, c)).or_default() += stat.seconds;
            }
        }
        for ((_, c), s) in per_rank_seconds {
            let agg = per_category.get_mut(&c).expect("every category is in Category::ALL");
            agg.seconds_max_rank = agg.seconds_max_rank.max(s);
        }
        Self {
            rank_rows: ranks.len() as u64,
            peak_memory_max_bytes: peak,
            memory_estimate_max_bytes: estimate,
            energy_j: if ranks.is_empty() { None } else { energy },
            comm_s,
            active_wall_s,
            comm: per_category.into_values().collect(),
        }
    }

    /// Share of the active ranks' wall time spent communicating (0..1).
    pub fn comm_share(&self) -> f64 {
        if self.active_wall_s > 0.0 {
            self.comm_s / self.active_wall_s
        } else {
            0.0
        }
    }

    /// Largest measured peak memory in GB (1e9 bytes).
    pub fn peak_memory_max_gb(&self) -> Option<f64> {
        self.peak_memory_max_bytes.map(|b| b as f64 / 1e9)
    }

    /// kWh per 1000 inferences, one inference being one sequence.
    pub fn energy_kwh_per_1000_inferences(&self, sequences: u64) -> Option<f64> {
        let e = self.energy_j?;
        (sequences > 0).then(|| e / 3.6e6 / sequences as f64 * 1000.0)
    }

    /// Joules per token, counting input and output tokens as TPS does.
    pub fn energy_j_per_token(&self, total_tokens: u64) -> Option<f64> {
        let e = self.energy_j?;
        (total_tokens > 0).then(|| e / total_tokens as f64)
    }

    /// The aggregate of one communication category.
    pub fn comm_of(&self, category: Category) -> Option<&CommAggregate> {
        self.comm.iter().find(|c| c.category == category)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CommStat;

    fn rank(world_rank: u32, active: bool, energy: Option<f64>) -> RankRecord {
        RankRecord {
            world_rank,
            active,
            wall_s: 2.0,
            comm: [(Category::TpAllreduce, CommStat { calls: 4, bytes: 4_000_000_000, seconds: 0.5 })].into(),
            peak_memory_bytes: Some(1_000_000_000 * (world_rank as u64 + 1)),
            memory_estimate_bytes: 7,
            energy_prefill_j: energy,
            energy_decode_j: energy,
            ..Default::default()
        }
    }

    #[test]
    fn energy_is_not_measured_unless_every_rank_measured_it() {
        let a = RankAggregates::from_ranks(&[rank(0, true, Some(1.0)), rank(1, true, None)]);
        assert_eq!(a.energy_j, None);
        assert_eq!(a.energy_j_per_token(100), None);
        let b = RankAggregates::from_ranks(&[rank(0, true, Some(1.0)), rank(1, false, Some(2.0))]);
        assert_eq!(b.energy_j, Some(6.0));
        assert_eq!(b.energy_j_per_token(3), Some(2.0));
    }

    #[test]
    fn comm_share_counts_active_ranks_only() {
        let a = RankAggregates::from_ranks(&[rank(0, true, None), rank(1, false, None)]);
        assert_eq!(a.comm_share(), 0.25);
        let tp = a.comm_of(Category::TpAllreduce).unwrap();
        assert_eq!((tp.calls, tp.bytes, tp.seconds_sum, tp.seconds_max_rank), (8, 8_000_000_000, 1.0, 0.5));
        assert_eq!(tp.gb_per_s(), Some(8.0));
        assert_eq!(a.peak_memory_max_gb(), Some(2.0));
    }
}
