//! Runs a strategy's unchanged code on simulated ranks: one thread per world
//! rank, each with a shape-only backend and the in-process transport. Every
//! rank builds the strategy (`StrategySpec::build`, collective over the
//! simulated world) and runs one batch through `runner::run_batch`, the very
//! calls `fapool run` makes, so what is recorded is what the suite executes.
//!
//! The build's own work (weight uploads, group splits) is left out of the
//! recording; the batch's is kept, markers (synchronisations, decode steps)
//! included. This module records; it neither builds the DAG nor costs it.

use super::PlanError;
use crate::backend::shape::{Entry, Routing, ShapeBackend};
use crate::backend::{Backend, Dtype};
use crate::comm::sim_transport::{MessageRecord, SimTransport, SimWorld};
use crate::comm::{Category, Comm, CommStat};
use crate::model::{ModelConfig, WeightValues};
use crate::runner::{run_batch, BatchInput};
use crate::spec::StrategySpec;
use crate::strategy::{BatchSetup, BatchShape, BuildContext};
use std::collections::BTreeMap;

/// What to run on the simulated ranks.
#[derive(Clone, Copy, Debug)]
pub struct Execution<'a> {
    pub spec: &'a StrategySpec,
    pub cfg: &'a ModelConfig,
    /// World ranks of the launch.
    pub world: usize,
    pub shape: BatchShape,
    /// Most sequences per micro-batch (the memory model's answer, as the runner computes it).
    pub micro_batch_cap: usize,
    pub dtype: Dtype,
    /// The job's `run.cuda_graphs` (the shape backend records no graph: steps run op by op).
    pub cuda_graphs: bool,
    /// Messages hold the compute stream (blocking MPI on a CPU) rather than
    /// running on their groups' streams (a GPU).
    pub messages_block_compute: bool,
    /// How tokens spread over experts (MoE models; see [`Routing`]).
    pub routing: Routing,
}

/// One rank's recorded batch.
#[derive(Clone, Debug)]
pub struct RankProgram {
    pub rank: usize,
    /// Operations, markers and message placeholders in issue order.
    pub entries: Vec<Entry>,
    /// Everything its transport recorded (entries index into it).
    pub messages: Vec<MessageRecord>,
    pub setup: BatchSetup,
    /// What `Comm` accounted on this rank (calls and bytes by category).
    pub comm: BTreeMap<Category, CommStat>,
    /// Peak bytes of the rank's buffers during the batch (weights included).
    pub peak_bytes: u64,
}

/// Every rank's recorded batch.
#[derive(Clone, Debug)]
pub struct Recording {
    pub programs: Vec<RankProgram>,
    /// The rank that ends every step holding the tokens.
    pub leader: usize,
    pub shape: BatchShape,
}

impl Recording {
    /// The leader's batch setup (micro-batches, pool sizes).
    pub fn setup(&self) -> &BatchSetup {
        &self.programs[self.leader].setup
    }
}

/// Stack of each simulated rank: the dataflow's frames are shallow.
const STACK_BYTES: usize = 256 << 10;

fn run_rank(x: &Execution<'_>, cfg: &ModelConfig, world: &SimWorld, rank: usize, prompts: &[u32]) -> Result<RankProgram, String> {
    let be = ShapeBackend::new(x.dtype).with_blocking_messages(x.messages_block_compute).with_routing(x.routing);
    let (transport, messages) = SimTransport::new(world, rank, be.recorder());
    let comm = Comm::new(&be, Box::new(transport));
    let outcome = (|| -> Result<_, String> {
        let g = comm.world_group().map_err(|e| e.to_string())?;
        let mut strategy = x.spec.build(BuildContext { be: &be, comm: &comm, cfg, world: &g }).map_err(|e| format!("building {}: {e}", x.spec.name()))?;
        be.recorder().take();
        let input = BatchInput { shape: x.shape, prompts, micro_batch_cap: x.micro_batch_cap, pool_usable: true, keep_logits: false, forced: None, cuda_graphs: x.cuda_graphs };
        let run = run_batch(&be, &comm, strategy.as_mut(), &input, None).map_err(|e| e.to_string())?;
        let peak_bytes = be.peak_memory_bytes().unwrap_or(0);
        Ok((run.setup, run.comm, peak_bytes))
    })();
    if let Err(e) = &outcome {
        world.abort(&format!("rank {rank} failed: {e}"));
    }
    let entries = be.recorder().take();
    drop(comm);
    let (setup, comm, peak_bytes) = outcome?;
    let messages = std::mem::take(&mut *messages.borrow_mut());
    Ok(RankProgram { rank, entries, messages, setup, comm, peak_bytes })
}

/// Runs one batch of `x` on `x.world` simulated ranks.
pub fn record(x: &Execution<'_>) -> Result<Recording, PlanError> {
    let mut cfg = x.cfg.clone();
    cfg.weight_values = WeightValues::ShapesOnly;
    let layout = x.spec.deployment().layout(x.world);
    let prompts = vec![0u32; x.shape.nseq * x.shape.seq_len];
    let world = SimWorld::new(x.world);
    let results: Vec<Result<RankProgram, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..x.world)
            .map(|rank| {
                let (cfg, world, prompts) = (&cfg, &world, &prompts);
                std::thread::Builder::new().name(format!("rank{rank}")).stack_size(STACK_BYTES).spawn_scoped(s, move || run_rank(x, cfg, world, rank, prompts))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| match h {
                Err(e) => Err(format!("cannot start simulated rank {rank}: {e}")),
                Ok(h) => h.join().unwrap_or_else(|_| Err(format!("simulated rank {rank} panicked"))),
            })
            .collect()
    });
    let mut programs = Vec::with_capacity(x.world);
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(p) => programs.push(p),
            Err(e) => failures.push(e),
        }
    }
    if !failures.is_empty() {
        // The first failure is the cause; the others are ranks it stopped.
        let cause = failures.iter().find(|f| !f.contains("simulated rank")).unwrap_or(&failures[0]).clone();
        return Err(PlanError::Simulation(format!("{} on {} simulated ranks, {} at {} tokens: {cause}", x.spec.name(), x.world, x.shape.nseq, x.shape.seq_len)));
    }
    Ok(Recording { programs, leader: layout.leader, shape: x.shape })
}
