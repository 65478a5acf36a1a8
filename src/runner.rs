//! The runner: drives strategies over the workload, times each batch on the
//! leader rank, gathers every rank's records to rank 0 and hands them to the
//! results file. This is the one place phases are timed.

use crate::backend::Backend;
use crate::cluster::Cluster;
use crate::comm::{Category, Comm, CommStat, Group, RecordedMessages, Transport};
use crate::metrics::{BatchRecord, RankRecord};
use crate::model::ModelConfig;
use crate::spec::{JobSpec, StrategySpec};
use crate::strategy::baseline::Baseline;
use crate::strategy::fapool::Fapool;
use crate::strategy::{BatchSetup, BatchShape, Strategy, StrategyError};
use crate::workload::Batch;
use mpi::traits::*;
use std::collections::BTreeMap;
use std::time::Instant;

/// Reads a per-rank energy counter (NVML on GPUs).
pub trait EnergyMeter {
    /// Joules since an arbitrary origin, or None when not measurable.
    fn joules(&self) -> Option<f64>;
}

/// What the leader measured for one batch.
#[derive(Clone, Debug, Default)]
pub struct LeaderRun {
    pub ttft_s: f64,
    pub e2e_s: f64,
    pub itl_s: Vec<f64>,
    /// `[nseq, out_tokens]` row-major.
    pub tokens: Vec<u32>,
    /// Logits of every step, `[nseq, vocab]` each, when kept.
    pub logits: Vec<Vec<f32>>,
}

/// One batch as one rank ran it.
pub struct BatchRun {
    pub setup: BatchSetup,
    pub leader: Option<LeaderRun>,
    pub wall_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub energy_prefill_j: Option<f64>,
    pub energy_decode_j: Option<f64>,
    pub comm: BTreeMap<Category, CommStat>,
}

/// A decode step recorded once and replayed at every later step of a batch.
struct RecordedStep<B: Backend> {
    graph: B::Graph,
    /// The leader's logits buffer, rewritten by every replay.
    logits: Option<B::Buf>,
    messages: RecordedMessages<B::Mark>,
}

/// Runs the device half of one decode step: replays the batch's recording,
/// or records it now (`record`, where the backend can) and replays it, or
/// runs it eagerly. Returns the leader's logits.
fn decode_step_device<'r, B: Backend>(
    be: &B,
    comm: &Comm<'_, B>,
    strategy: &mut dyn Strategy<B>,
    record: bool,
    recorded: &'r mut Option<RecordedStep<B>>,
    eager: &'r mut Option<B::Buf>,
) -> Result<Option<&'r B::Buf>, StrategyError> {
    if recorded.is_none() && record && be.capture_begin()? {
        let from = comm.begin_recording();
        let logits = strategy.decode_device();
        // End the recording whatever happened, so the stream leaves capture mode.
        let graph = be.capture_end();
        let messages = comm.end_recording(from);
        let hint = |e: String| StrategyError::Protocol(format!("recording the decode step as a CUDA graph failed: {e} (run.cuda_graphs = false runs the steps op by op)"));
        let logits = logits.map_err(|e| hint(e.to_string()))?;
        let graph = graph.map_err(|e| hint(e.to_string()))?;
        *recorded = Some(RecordedStep { graph, logits, messages });
    }
    if let Some(r) = recorded.as_ref() {
        be.replay(&r.graph)?;
        return Ok(r.logits.as_ref());
    }
    *eager = strategy.decode_device()?;
    Ok(eager.as_ref())
}

/// Runs one batch: prefill, then greedy decode. `forced` (leader only,
/// `[nseq, out]`) feeds the given tokens instead of the generated ones
/// (teacher forcing), so logits can be compared step by step. With
/// `graphs`, the first decode step is recorded (a CUDA graph) and replayed
/// for the others, where the backend can record.
#[allow(clippy::too_many_arguments)]
pub fn run_batch<B: Backend>(
    be: &B,
    comm: &Comm<'_, B>,
    strategy: &mut dyn Strategy<B>,
    shape: BatchShape,
    prompts: &[u32],
    micro_batch_cap: usize,
    pool_usable: bool,
    keep_logits: bool,
    forced: Option<&[u32]>,
    energy: Option<&dyn EnergyMeter>,
    graphs: bool,
) -> Result<BatchRun, StrategyError> {
    be.synchronize()?;
    be.reset_peak_memory();
    let setup = strategy.begin_batch(shape, micro_batch_cap, pool_usable)?;
    let out = shape.out_tokens;
    be.synchronize()?;
    let e0 = energy.and_then(|e| e.joules());
    let t0 = Instant::now();
    let first = strategy.prefill(prompts, keep_logits)?;
    be.synchronize()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    // Reading the energy counter between the phases is instrumentation (an
    // NVML read takes milliseconds): it stays out of E2E and every ITL.
    let probe = Instant::now();
    let e1 = energy.and_then(|e| e.joules());
    let probe_s = probe.elapsed().as_secs_f64();
    let clock = || t0.elapsed().as_secs_f64() - probe_s;
    let mut leader = first.map(|o| {
        let mut tokens = vec![0u32; shape.nseq * out];
        for (n, t) in o.tokens.iter().enumerate() {
            tokens[n * out] = *t;
        }
        LeaderRun { ttft_s: prefill_s, tokens, logits: o.logits.into_iter().collect(), ..Default::default() }
    });
    let mut last = clock();
    let (mut recorded, mut eager) = (None, None);
    for step in 1..out {
        let prev: Vec<u32> = match (&leader, forced) {
            (Some(_), Some(f)) => (0..shape.nseq).map(|n| f[n * out + step - 1]).collect(),
            (Some(l), None) => (0..shape.nseq).map(|n| l.tokens[n * out + step - 1]).collect(),
            (None, _) => Vec::new(),
        };
        let Some(vars) = strategy.decode_begin(step, &prev)? else { continue };
        be.set_step(&vars)?;
        let logits = decode_step_device(be, comm, strategy, graphs, &mut recorded, &mut eager)?;
        let o = strategy.decode_end(logits, keep_logits)?;
        if let Some(r) = recorded.as_ref() {
            comm.account_replay(&r.messages)?;
        }
        if let (Some(l), Some(o)) = (leader.as_mut(), o) {
            let now = clock();
            l.itl_s.push(now - last);
            last = now;
            for (n, t) in o.tokens.iter().enumerate() {
                l.tokens[n * out + step] = *t;
            }
            if let Some(lg) = o.logits {
                l.logits.push(lg);
            }
        }
    }
    be.synchronize()?;
    let wall_s = clock();
    let e2 = energy.and_then(|e| e.joules());
    if let Some(l) = leader.as_mut() {
        l.e2e_s = wall_s;
    }
    strategy.end_batch()?;
    let comm_stats = comm.take_stats()?;
    Ok(BatchRun { setup, leader, wall_s, prefill_s, decode_s: wall_s - prefill_s, energy_prefill_j: e0.zip(e1).map(|(a, b)| b - a), energy_decode_j: e1.zip(e2).map(|(a, b)| b - a), comm: comm_stats })
}

/// Builds the strategy a spec describes (collective over `world`).
pub fn build_strategy<'a, 'c, B: Backend>(be: &'a B, comm: &'a Comm<'c, B>, cfg: &'a ModelConfig, spec: &StrategySpec, world: &Group) -> Result<Box<dyn Strategy<B> + 'a>, StrategyError> {
    Ok(match spec {
        StrategySpec::Baseline(b) => Box::new(Baseline::new(be, comm, cfg, b, spec.name(), world)?),
        StrategySpec::Fapool(f) => Box::new(Fapool::new(be, comm, cfg, f, spec.name(), world)?),
    })
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
    ];
    for c in Category::ALL {
        let s = r.comm.get(&c).copied().unwrap_or_default();
        v.extend([s.calls as f64, s.bytes as f64, s.seconds]);
    }
    v
}

const RANK_FIELDS: usize = 10 + 3 * Category::ALL.len();

fn decode_rank(v: &[f64], batch_index: u32, role: String) -> RankRecord {
    let opt = |x: f64| (!x.is_nan()).then_some(x);
    let mut comm = BTreeMap::new();
    for (i, c) in Category::ALL.into_iter().enumerate() {
        let s = CommStat { calls: v[10 + 3 * i] as u64, bytes: v[11 + 3 * i] as u64, seconds: v[12 + 3 * i] };
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
    }
}

/// Everything rank 0 needs about one batch, gathered from all ranks.
pub struct GatheredBatch {
    pub batch: BatchRecord,
    pub ranks: Vec<RankRecord>,
    pub logits: Vec<Vec<f32>>,
}

/// Gathers a batch's records to world rank 0 (outside any timed region).
#[allow(clippy::too_many_arguments)]
pub fn gather_batch<B: Backend>(
    be: &B,
    world: &Group,
    strategy: &dyn Strategy<B>,
    run: &BatchRun,
    b: &Batch,
    shape: BatchShape,
    requested_batch: usize,
    flops: f64,
    memory_estimate: u64,
    roles: &[String],
) -> Option<GatheredBatch> {
    let me = world.rank();
    let root = world.comm.process_at_rank(0);
    // Who leads this strategy: the one rank with leader records.
    let mut leader_rank = 0u64;
    world.comm.all_reduce_into(&(if strategy.is_leader() { me as u64 } else { 0 }), &mut leader_rank, mpi::collective::SystemOperation::sum());
    let leader_rank = leader_rank as usize;
    let active_ranks = {
        let mut n = 0u64;
        world.comm.all_reduce_into(&(run.setup.active as u64), &mut n, mpi::collective::SystemOperation::sum());
        n.max(1)
    };
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
        memory_estimate_bytes: if run.setup.active { memory_estimate } else { 0 },
        energy_prefill_j: run.energy_prefill_j,
        energy_decode_j: run.energy_decode_j,
        flops: if run.setup.active { flops / active_ranks as f64 } else { 0.0 },
    };
    let row = encode_rank(&rank);
    // Leader's measurements to rank 0.
    let mut lead = run.leader.clone().unwrap_or_default();
    if leader_rank != 0 {
        if me == leader_rank {
            let times = [lead.ttft_s, lead.e2e_s];
            world.comm.process_at_rank(0).send(&times[..]);
            world.comm.process_at_rank(0).send(&lead.itl_s[..]);
            world.comm.process_at_rank(0).send(&lead.tokens[..]);
            let n = [lead.logits.len() as u64];
            world.comm.process_at_rank(0).send(&n[..]);
            for l in &lead.logits {
                world.comm.process_at_rank(0).send(&l[..]);
            }
        } else if me == 0 {
            let src = world.comm.process_at_rank(leader_rank as i32);
            let mut times = [0f64; 2];
            src.receive_into(&mut times[..]);
            let (itl, _) = src.receive_vec::<f64>();
            let (tokens, _) = src.receive_vec::<u32>();
            let mut n = [0u64; 1];
            src.receive_into(&mut n[..]);
            let logits = (0..n[0]).map(|_| src.receive_vec::<f32>().0).collect();
            lead = LeaderRun { ttft_s: times[0], e2e_s: times[1], itl_s: itl, tokens, logits };
        }
    }
    if me == 0 {
        let mut all = vec![0f64; RANK_FIELDS * world.size()];
        root.gather_into_root(&row[..], &mut all[..]);
        let ranks = all.chunks(RANK_FIELDS).enumerate().map(|(r, v)| decode_rank(v, b.index as u32, roles[r].clone())).collect();
        let batch = BatchRecord {
            batch_index: b.index as u32,
            first_sequence: b.first_row as u32,
            seq_len: shape.seq_len as u32,
            num_sequences: shape.nseq as u32,
            output_tokens: shape.out_tokens as u32,
            requested_batch: requested_batch as u32,
            effective_batch: shape.nseq.div_ceil(run.setup.micro_batches.max(1)) as u32,
            micro_batches: run.setup.micro_batches as u32,
            pool_requested: run.setup.pool_requested as u32,
            pool_effective: run.setup.pool_effective as u32,
            pool_fallback: run.setup.pool_fallback,
            ttft_s: lead.ttft_s,
            e2e_s: lead.e2e_s,
            itl_s: lead.itl_s,
            tokens: lead.tokens,
            flops,
        };
        Some(GatheredBatch { batch, ranks, logits: lead.logits })
    } else {
        root.gather_into(&row[..]);
        None
    }
}

/// The shape of a batch of the workload.
pub fn shape_of(b: &Batch, job: &JobSpec) -> BatchShape {
    BatchShape { nseq: b.sequences.len(), seq_len: b.seq_len, out_tokens: job.workload.output_tokens }
}

/// Model FLOPs of a whole batch (prefill plus every decode step).
pub fn batch_flops(cfg: &ModelConfig, shape: BatchShape) -> f64 {
    let (n, s) = (shape.nseq as u64, shape.seq_len as u64);
    cfg.prefill_flops(n, s) + (1..shape.out_tokens as u64).map(|k| cfg.decode_flops(n, s + k)).sum::<f64>()
}

/// Everything `run` and `verify` share: the comm layer over the world.
pub fn world_comm<'a, B: Backend>(be: &'a B, transport: Box<dyn Transport<B> + 'a>, cluster: &Cluster) -> Result<(Comm<'a, B>, Group), StrategyError> {
    let comm = Comm::new(be, transport);
    let world = comm.world_group(cluster.world())?;
    Ok((comm, world))
}
