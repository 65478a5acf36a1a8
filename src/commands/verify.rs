//! `fapool verify`: every strategy of a job beside the single-rank model,
//! comparing logits (relative L2) and greedy tokens batch by batch; on the
//! CPU the single-rank model is itself checked against a cache-free
//! recomputation.

use super::{end_job_on_failure, exit_for, load, start_mpi, validate_launch, with_backend, BackendRequest, Failure, Launch, OnBackend};
use crate::backend::{Backend, BackendKind};
use crate::cluster::Cluster;
use crate::exit::Exit;
use crate::metrics::{relative_l2, worst_error};
use crate::runner::records::{gather_batch, BatchFacts, GatheredBatch};
use crate::runner::sweep::shape_of;
use crate::runner::{run_batch, BatchInput};
use crate::spec::{JobSpec, StrategySpec};
use crate::strategy::baseline::BaselineSpec;
use crate::strategy::moe::MoeSpec;
use crate::strategy::{BuildContext, Layout, Strategy, StrategyError};
use crate::workload::Workload;
use mpi::traits::*;
use std::path::Path;

/// Options of `fapool verify`.
pub struct VerifyArgs {
    pub backend: Option<BackendKind>,
    /// Largest relative L2 error of the logits that passes.
    pub tolerance: f64,
    /// Feed the reference's tokens to every strategy.
    pub teacher_forcing: bool,
    /// At most this many batches per category.
    pub max_batches: usize,
}

struct VerifyBody<'a> {
    job: &'a JobSpec,
    args: VerifyArgs,
}

/// One comparison, as a row of the printed table.
struct Row<'r> {
    name: &'r str,
    category: &'r str,
    batch: usize,
    shape: crate::strategy::BatchShape,
    pool: u32,
    err: f64,
    tokens: &'r str,
    pass: bool,
}

impl std::fmt::Display for Row<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let result = if self.pass { "ok" } else { "FAIL" };
        write!(f, "{:<30} {:<10} {:>5} {:>6} {:>5} {:>4} {:>12.3e} {:>7} {:>6}", self.name, self.category, self.batch, self.shape.seq_len, self.shape.nseq, self.pool, self.err, self.tokens, result)
    }
}

/// A built strategy with its layout.
struct Candidate<'a, B: Backend> {
    spec: StrategySpec,
    layout: Layout,
    strategy: Box<dyn Strategy<B> + 'a>,
}

impl OnBackend for VerifyBody<'_> {
    fn run<B: Backend>(self, cluster: &Cluster, launch: Launch<'_, B>) -> Result<(), Failure> {
        let (job, args) = (self.job, &self.args);
        let cfg = validate_launch(job, &launch.facts, cluster)?;
        let (be, comm, world) = (launch.be, &launch.comm, &launch.world);
        let mpi_world = cluster.world();
        let rank = cluster.rank;
        let fail = |what: &str, e: StrategyError| end_job_on_failure(cluster, Failure::new(exit_for(&e), format!("rank {rank}: {what}: {e}")));
        let build = |spec: StrategySpec| -> Result<Candidate<'_, B>, Failure> {
            let layout = spec.deployment().layout(world.size());
            let strategy = spec.build(BuildContext { be, comm, cfg: &cfg, world }).map_err(|e| fail(&format!("building {}", spec.name()), e))?;
            Ok(Candidate { spec, layout, strategy })
        };
        let single = match cfg.experts {
            None => StrategySpec::Baseline(BaselineSpec { name: Some("single-rank".into()), tp: 1, pp: 1, micro_batches: 1 }),
            Some(_) => StrategySpec::Moe(MoeSpec::single_rank()),
        };
        let mut reference = build(single)?;
        let mut strategies = job.strategies.iter().cloned().map(build).collect::<Result<Vec<_>, _>>()?;
        let wl = Workload::new(&job.workload, cfg.vocab);
        let root = rank == 0;
        let mut failures = 0;
        if root {
            println!("{:<30} {:<10} {:>5} {:>6} {:>5} {:>4} {:>12} {:>7} {:>6}", "strategy", "category", "batch", "seqlen", "nseq", "pool", "max rel err", "tokens", "result");
        }
        for (c, cat) in job.workload.categories.iter().enumerate() {
            for b in wl.batches(c).into_iter().take(args.max_batches) {
                let shape = shape_of(&b, job);
                let prompts = wl.batch_prompts(&b);
                let run = |cand: &mut Candidate<'_, B>, forced: Option<&[u32]>| -> Result<Option<GatheredBatch>, StrategyError> {
                    mpi_world.barrier();
                    let input = BatchInput { shape, prompts: &prompts, micro_batch_cap: shape.nseq, pool_usable: true, keep_logits: true, forced, cuda_graphs: job.run.cuda_graphs };
                    let r = run_batch(be, comm, cand.strategy.as_mut(), &input, None)?;
                    let facts = BatchFacts { batch: &b, shape, requested_batch: shape.nseq, flops: 0.0, memory_estimate: 0, leader: cand.layout.leader, roles: &cand.layout.roles };
                    Ok(gather_batch(be, &mpi_world, &r, &facts))
                };
                let reference_out = run(&mut reference, None).map_err(|e| fail("reference", e))?;
                // The single-rank model against a cache-free recomputation (CPU, first batch of each category).
                if let (Some(r), true, 0) = (reference_out.as_ref(), be.name() == "cpu", b.index) {
                    let naive = crate::strategy::naive::generate_logits(&cfg, &prompts, shape.nseq, shape.seq_len, &r.batch.tokens, shape.out_tokens);
                    let err = naive.map(|n| worst_error(n.iter().zip(&r.logits).map(|(a, b)| relative_l2(b, a)))).unwrap_or(f64::INFINITY);
                    let pass = err <= args.tolerance;
                    failures += usize::from(!pass);
                    println!("{}", Row { name: "single-rank-vs-no-cache", category: &cat.name, batch: b.index, shape, pool: 0, err, tokens: "-", pass });
                }
                // Reference tokens to every rank (the strategies' leaders need them to force).
                let mut ref_tokens = reference_out.as_ref().map(|g| g.batch.tokens.clone()).unwrap_or_else(|| vec![0; shape.nseq * shape.out_tokens]);
                mpi_world.process_at_rank(0).broadcast_into(&mut ref_tokens[..]);
                for cand in strategies.iter_mut() {
                    let forced = args.teacher_forcing.then_some(&ref_tokens[..]);
                    let name = cand.spec.name();
                    let g = run(cand, forced).map_err(|e| fail(&name, e))?;
                    if let (Some(g), Some(r)) = (g, reference_out.as_ref()) {
                        let err = worst_error(g.logits.iter().zip(&r.logits).map(|(a, b)| relative_l2(a, b)));
                        let steps_ok = g.logits.len() == r.logits.len();
                        let tokens_ok = g.batch.tokens == r.batch.tokens;
                        let pass = steps_ok && err <= args.tolerance && (args.teacher_forcing || tokens_ok);
                        failures += usize::from(!pass);
                        let tokens = if tokens_ok { "same" } else { "DIFFER" };
                        println!("{}", Row { name: &name, category: &cat.name, batch: b.index, shape, pool: g.batch.pool_effective, err, tokens, pass });
                    }
                }
            }
        }
        let mut total = [failures as u64];
        mpi_world.process_at_rank(0).broadcast_into(&mut total[..]);
        if total[0] > 0 {
            return Err(Failure::on_root(Exit::WrongResult, rank, format!("{} comparisons failed", total[0])));
        }
        if root {
            println!("all strategies reproduce the single-rank model");
        }
        Ok(())
    }
}

/// `fapool verify JOB`.
pub fn verify(job_path: &Path, args: VerifyArgs, sets: &[String]) -> Result<(), Failure> {
    let (job, _) = load(job_path, sets)?;
    let cluster = start_mpi()?;
    let request = BackendRequest { kind: args.backend.unwrap_or(job.run.backend), dtype: job.dtype(), job: Some(&job) };
    with_backend(request, &cluster, VerifyBody { job: &job, args })
}
