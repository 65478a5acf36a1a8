//! Gathers one batch's records to world rank 0 (outside any timed region):
//! the leader's latencies, tokens and logits, and every rank's row.

use super::{BatchRun, LeaderRun};
use crate::backend::Backend;
use crate::comm::{Category, CommStat};
use crate::metrics::{BatchRecord, ExpertLoad, RankRecord};
use crate::strategy::BatchShape;
use crate::workload::Batch;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::BTreeMap;

/// What rank 0 records about a batch beside what the ranks measured.
pub struct BatchFacts<'a> {
    pub batch: &'a Batch,
    pub shape: BatchShape,
    /// The job's batch size (the effective one comes from the micro-batches).
    pub requested_batch: usize,
    /// Model FLOPs of the batch.
    pub flops: f64,
    /// The memory model's estimate for the busiest rank.
    pub memory_estimate: u64,
    /// World rank of the strategy's leader.
    pub leader: usize,
    /// Role of every world rank.
    pub roles: &'a [String],
}

/// Everything rank 0 needs about one batch, gathered from all ranks.
pub struct GatheredBatch {
    pub batch: BatchRecord,
    pub ranks: Vec<RankRecord>,
    pub logits: Vec<Vec<f32>>,
    /// Every rank's expert counts (strategies with experts).
    pub experts: Vec<ExpertLoad>,
}

/// Numbers of one [`ExpertLoad`] (without its batch) for gathering.
const EXPERT_FIELDS: usize = 7;

fn encode_expert(l: &ExpertLoad) -> [u64; EXPERT_FIELDS] {
    [l.world_rank as u64, l.layer as u64, l.expert as u64, l.decode as u64, l.routed, l.dropped, l.received]
}

fn decode_expert(v: &[u64], batch_index: u32) -> ExpertLoad {
    ExpertLoad { batch_index, world_rank: v[0] as u32, layer: v[1] as u32, expert: v[2] as u32, decode: v[3] != 0, routed: v[4], dropped: v[5], received: v[6] }
}

/// Every rank's expert counts on rank 0 (empty elsewhere). Collective.
fn experts_to_root(world: &SimpleCommunicator, loads: &[ExpertLoad], batch_index: u32) -> Vec<ExpertLoad> {
    let root = world.process_at_rank(0);
    let mine: Vec<u64> = loads.iter().flat_map(encode_expert).collect();
    let count = mine.len() as i32;
    if world.rank() != 0 {
        root.gather_into(&count);
        root.gather_varcount_into(&mine[..]);
        return Vec::new();
    }
    let mut counts = vec![0i32; world.size() as usize];
    root.gather_into_root(&count, &mut counts[..]);
    let displs: Vec<i32> = counts
        .iter()
        .scan(0, |at, &c| {
            let d = *at;
            *at += c;
            Some(d)
        })
        .collect();
    let mut all = vec![0u64; counts.iter().sum::<i32>() as usize];
    root.gather_varcount_into_root(&mine[..], &mut mpi::datatype::PartitionMut::new(&mut all[..], &counts[..], &displs[..]));
    all.chunks(EXPERT_FIELDS).map(|v| decode_expert(v, batch_index)).collect()
}

/// Numbers of a [`RankRecord`] as one f64 row, for gathering with MPI.
fn encode_rank(r: &RankRecord) -> Vec<f64> {
    let mut v = vec![
        r.world_rank as f64,
        r.active as u8 as f64,
        r.wall_s,
        r.prefill_s,
        r.decode_s,
        r.peak_memory_bytes.map(|b| b as f64).unwrap_or(-1.0),
        r.memory_estimate_bytes as f64,
        r.energy_prefill_j.unwrap_or(f64::NAN),
        r.energy_decode_j.unwrap_or(f64::NAN),
        r.flops,
        r.compute_s,
        r.wait_s,
    ];
    for c in Category::ALL {
        let s = r.comm.get(&c).copied().unwrap_or_default();
        v.extend([s.calls as f64, s.bytes as f64, s.seconds]);
    }
    v
}

const RANK_FIELDS: usize = 12 + 3 * Category::ALL.len();

fn decode_rank(v: &[f64], batch_index: u32, role: String) -> RankRecord {
    let opt = |x: f64| (!x.is_nan()).then_some(x);
    let mut comm = BTreeMap::new();
    for (i, c) in Category::ALL.into_iter().enumerate() {
        let s = CommStat { calls: v[12 + 3 * i] as u64, bytes: v[13 + 3 * i] as u64, seconds: v[14 + 3 * i] };
        if s.calls > 0 {
            comm.insert(c, s);
        }
    }
    RankRecord {
        batch_index,
        world_rank: v[0] as u32,
        role,
        active: v[1] != 0.0,
        wall_s: v[2],
        prefill_s: v[3],
        decode_s: v[4],
        comm,
        peak_memory_bytes: (v[5] >= 0.0).then_some(v[5] as u64),
        memory_estimate_bytes: v[6] as u64,
        energy_prefill_j: opt(v[7]),
        energy_decode_j: opt(v[8]),
        flops: v[9],
        compute_s: v[10],
        wait_s: v[11],
    }
}

/// The leader's measurements, moved to rank 0 when the leader is another rank.
fn leader_to_root(world: &SimpleCommunicator, leader: usize, run: Option<&LeaderRun>) -> LeaderRun {
    let me = world.rank() as usize;
    let mut lead = run.cloned().unwrap_or_default();
    if leader == 0 {
        return lead;
    }
    if me == leader {
        let root = world.process_at_rank(0);
        root.send(&[lead.ttft_s, lead.e2e_s][..]);
        root.send(&lead.itl_s[..]);
        root.send(&lead.tokens[..]);
        root.send(&[lead.logits.len() as u64][..]);
        for l in &lead.logits {
            root.send(&l[..]);
        }
    } else if me == 0 {
        let src = world.process_at_rank(leader as i32);
        let mut times = [0f64; 2];
        src.receive_into(&mut times[..]);
        let (itl, _) = src.receive_vec::<f64>();
        let (tokens, _) = src.receive_vec::<u32>();
        let mut n = [0u64; 1];
        src.receive_into(&mut n[..]);
        let logits = (0..n[0]).map(|_| src.receive_vec::<f32>().0).collect();
        lead = LeaderRun { ttft_s: times[0], e2e_s: times[1], itl_s: itl, tokens, logits };
    }
    lead
}

/// Gathers a batch's records to world rank 0, which gets them back (every
/// other rank gets `None`). Collective over the MPI `world` (bookkeeping
/// outside the timed region, not strategy traffic).
pub fn gather_batch<B: Backend>(be: &B, world: &SimpleCommunicator, run: &BatchRun, facts: &BatchFacts<'_>) -> Option<GatheredBatch> {
    let me = world.rank() as usize;
    let root = world.process_at_rank(0);
    let active_ranks = {
        let mut n = 0u64;
        world.all_reduce_into(&(run.setup.active as u64), &mut n, mpi::collective::SystemOperation::sum());
        n.max(1)
    };
    let b = facts.batch;
    let rank = RankRecord {
        batch_index: b.index as u32,
        world_rank: me as u32,
        role: String::new(),
        active: run.setup.active,
        wall_s: run.wall_s,
        prefill_s: run.prefill_s,
        decode_s: run.decode_s,
        comm: run.comm.clone(),
        peak_memory_bytes: be.peak_memory_bytes(),
        memory_estimate_bytes: if run.setup.active { facts.memory_estimate } else { 0 },
        energy_prefill_j: run.energy_prefill_j,
        energy_decode_j: run.energy_decode_j,
        flops: if run.setup.active { facts.flops / active_ranks as f64 } else { 0.0 },
        compute_s: if run.setup.active { (run.wall_s - run.wait_s).max(0.0) } else { 0.0 },
        wait_s: run.wait_s,
    };
    let row = encode_rank(&rank);
    let lead = leader_to_root(world, facts.leader, run.leader.as_ref());
    let experts = experts_to_root(world, &run.experts, b.index as u32);
    if me != 0 {
        root.gather_into(&row[..]);
        return None;
    }
    let mut all = vec![0f64; RANK_FIELDS * world.size() as usize];
    root.gather_into_root(&row[..], &mut all[..]);
    let ranks = all.chunks(RANK_FIELDS).enumerate().map(|(r, v)| decode_rank(v, b.index as u32, facts.roles[r].clone())).collect();
    let shape = facts.shape;
    let batch = BatchRecord {
        batch_index: b.index as u32,
        first_sequence: b.first_row as u32,
        seq_len: shape.seq_len as u32,
        num_sequences: shape.nseq as u32,
        output_tokens: shape.out_tokens as u32,
        requested_batch: facts.requested_batch as u32,
        effective_batch: shape.nseq.div_ceil(run.setup.micro_batches.max(1)) as u32,
        micro_batches: run.setup.micro_batches as u32,
        pool_requested: run.setup.pool_requested as u32,
        pool_effective: run.setup.pool_effective as u32,
        pool_fallback: run.setup.pool_fallback,
        ttft_s: lead.ttft_s,
        e2e_s: lead.e2e_s,
        itl_s: lead.itl_s,
        tokens: lead.tokens,
        flops: facts.flops,
    };
    Some(GatheredBatch { batch, ranks, logits: lead.logits, experts })
}
