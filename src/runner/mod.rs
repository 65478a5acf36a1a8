//! The runner: runs one batch through a strategy and times it on the leader
//! ([`run_batch`], the one place phases are timed), gathers every rank's
//! records to rank 0 ([`records`]), and drives a whole sweep of a job —
//! plan, resume, warm-up, watchdog, fault injection, memory capping,
//! progress ([`sweep`]).
//!
//! It must not know what a strategy does inside a phase, nor how the results
//! file lays out what it is given.

pub mod progress;
pub mod records;
pub mod sweep;
pub mod timeline;

use crate::backend::Backend;
use crate::comm::{Category, Comm, CommStat, CommTrace, RecordedMessages};
use crate::metrics::ExpertLoad;
use crate::model::ModelConfig;
use crate::strategy::{BatchSetup, BatchShape, Strategy, StrategyError};
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
    /// Seconds the compute timeline waited for messages.
    pub wait_s: f64,
    /// The batch's messages and waits, when it was traced.
    pub trace: Option<CommTrace>,
    /// What the rank counted per layer and expert (strategies with experts).
    pub experts: Vec<ExpertLoad>,
}

/// What to run for one batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchInput<'p> {
    pub shape: BatchShape,
    /// `[nseq, seq_len]` prompt tokens (every rank has them).
    pub prompts: &'p [u32],
    /// Most sequences per micro-batch (the memory model's answer).
    pub micro_batch_cap: usize,
    /// False when a pool rank reported its device unusable.
    pub pool_usable: bool,
    /// Keep every step's logits on the leader (for `verify`).
    pub keep_logits: bool,
    /// Leader only, `[nseq, out]`: feed these tokens instead of the generated
    /// ones (teacher forcing), so logits can be compared step by step.
    pub forced: Option<&'p [u32]>,
    /// Record the first decode step (a CUDA graph) and replay it for the
    /// others, where the backend can record.
    pub cuda_graphs: bool,
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
        // Every message of the step is completed inside the recording, so
        // the message streams rejoin the compute stream before it ends.
        let logits = strategy.decode_device().and_then(|l| comm.settle().map(|_| l).map_err(StrategyError::from));
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
    comm.settle()?;
    Ok(eager.as_ref())
}

/// Runs one batch: prefill, then greedy decode, timed on every rank (the
/// leader's clock gives TTFT, the inter-token latencies and E2E).
pub fn run_batch<B: Backend>(be: &B, comm: &Comm<'_, B>, strategy: &mut dyn Strategy<B>, input: &BatchInput<'_>, energy: Option<&dyn EnergyMeter>) -> Result<BatchRun, StrategyError> {
    let shape = input.shape;
    be.synchronize()?;
    be.reset_peak_memory();
    let setup = strategy.begin_batch(shape, input.micro_batch_cap, input.pool_usable)?;
    let out = shape.out_tokens;
    be.synchronize()?;
    let e0 = energy.and_then(|e| e.joules());
    let t0 = Instant::now();
    let first = strategy.prefill(input.prompts, input.keep_logits)?;
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
        let prev: Vec<u32> = match (&leader, input.forced) {
            (Some(_), Some(f)) => (0..shape.nseq).map(|n| f[n * out + step - 1]).collect(),
            (Some(l), None) => (0..shape.nseq).map(|n| l.tokens[n * out + step - 1]).collect(),
            (None, _) => Vec::new(),
        };
        let Some(vars) = strategy.decode_begin(step, &prev)? else { continue };
        be.set_step(&vars)?;
        let record = input.cuda_graphs && strategy.decode_recordable();
        let logits = decode_step_device(be, comm, strategy, record, &mut recorded, &mut eager)?;
        let o = strategy.decode_end(logits, input.keep_logits)?;
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
    let experts = strategy.take_expert_loads();
    strategy.end_batch()?;
    let (totals, trace) = comm.take_stats()?;
    Ok(BatchRun {
        setup,
        leader,
        wall_s,
        prefill_s,
        decode_s: wall_s - prefill_s,
        energy_prefill_j: e0.zip(e1).map(|(a, b)| b - a),
        energy_decode_j: e1.zip(e2).map(|(a, b)| b - a),
        comm: totals.by_category,
        wait_s: totals.wait_s,
        trace,
        experts,
    })
}

/// Model FLOPs of a whole batch (prefill plus every decode step).
pub fn batch_flops(cfg: &ModelConfig, shape: BatchShape) -> f64 {
    let (n, s) = (shape.nseq as u64, shape.seq_len as u64);
    cfg.prefill_flops(n, s) + (1..shape.out_tokens as u64).map(|k| cfg.decode_flops(n, s + k)).sum::<f64>()
}
