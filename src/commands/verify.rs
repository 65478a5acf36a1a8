//! `fapool verify`: every strategy of a job beside the single-rank model,
//! comparing logits (relative L2) and greedy tokens batch by batch; on the
//! CPU the single-rank model is itself checked against a cache-free
//! recomputation. With `--reference FILE` the comparison is against an
//! implementation outside the suite instead (Hugging Face transformers, a
//! NumPy model): its prompts, greedy tokens and every step's logits, which
//! the single-rank model and every strategy must reproduce.

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
use crate::strategy::{BatchShape, BuildContext, Layout, Strategy, StrategyError};
use crate::workload::{Batch, Workload};
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
    /// An external implementation's outputs to compare with (see [`ExternalReference`]).
    pub reference: Option<std::path::PathBuf>,
}

/// What another implementation generated for some prompts, as JSON:
/// `prompts` (`[sequence][position]` token ids), the greedy `tokens` it
/// generated (`[sequence][step]`, as many steps for every sequence) and the
/// `logits` of every step (`[sequence][step][vocab]`). Consecutive prompts of
/// one length form one batch.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ExternalReference {
    /// Which implementation made it (printed).
    #[serde(default)]
    pub source: String,
    pub prompts: Vec<Vec<u32>>,
    pub tokens: Vec<Vec<u32>>,
    pub logits: Vec<Vec<Vec<f32>>>,
}

impl ExternalReference {
    /// Reads and checks a reference file against the model's vocabulary
    /// and longest sequence.
    pub fn load(path: &Path, vocab: usize, max_seq_len: usize) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let r: Self = serde_json::from_str(&text).map_err(|e| format!("{}: not a reference file ({e})", path.display()))?;
        let out = r.tokens.first().map_or(0, Vec::len);
        let ok = !r.prompts.is_empty()
            && r.tokens.len() == r.prompts.len()
            && r.logits.len() == r.prompts.len()
            && out > 0
            && r.tokens.iter().all(|t| t.len() == out)
            && r.logits.iter().all(|l| l.len() == out && l.iter().all(|row| row.len() == vocab))
            && r.prompts.iter().all(|p| !p.is_empty() && p.len() + out <= max_seq_len && p.iter().all(|&t| (t as usize) < vocab));
        if !ok {
            return Err(format!(
                "{}: every prompt needs tokens below the vocabulary ({vocab}), as many generated tokens as the others, and logits of {vocab} per step, within the model's {max_seq_len} positions",
                path.display()
            ));
        }
        Ok(r)
    }

    /// The batches: runs of consecutive prompts of one length, as
    /// (first sequence, sequences, prompt length).
    fn groups(&self) -> Vec<(usize, usize, usize)> {
        let mut out: Vec<(usize, usize, usize)> = Vec::new();
        for (i, p) in self.prompts.iter().enumerate() {
            match out.last_mut() {
                Some(g) if g.2 == p.len() => g.1 += 1,
                _ => out.push((i, 1, p.len())),
            }
        }
        out
    }
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
    shape: BatchShape,
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
        let external = match &args.reference {
            Some(path) => Some(ExternalReference::load(path, cfg.vocab, cfg.max_seq_len).map_err(|e| Failure::on_root(Exit::Usage, rank, e))?),
            None => None,
        };
        if root {
            if let Some(x) = &external {
                println!("reference: {} ({} prompts)", if x.source.is_empty() { "external" } else { &x.source }, x.prompts.len());
            }
            println!("{:<30} {:<10} {:>5} {:>6} {:>5} {:>4} {:>12} {:>7} {:>6}", "strategy", "category", "batch", "seqlen", "nseq", "pool", "max rel err", "tokens", "result");
        }
        let run_on = |cand: &mut Candidate<'_, B>, b: &Batch, prompts: &[u32], shape: BatchShape, forced: Option<&[u32]>| -> Result<Option<GatheredBatch>, StrategyError> {
            mpi_world.barrier();
            let input = BatchInput { shape, prompts, micro_batch_cap: shape.nseq, pool_usable: true, keep_logits: true, forced, cuda_graphs: job.run.cuda_graphs };
            let r = run_batch(be, comm, cand.strategy.as_mut(), &input, None)?;
            let facts = BatchFacts { batch: b, shape, requested_batch: shape.nseq, flops: 0.0, memory_estimate: 0, leader: cand.layout.leader, roles: &cand.layout.roles };
            Ok(gather_batch(be, &mpi_world, &r, &facts))
        };
        for (index, &(first, nseq, s)) in external.as_ref().map(|x| x.groups()).unwrap_or_default().iter().enumerate() {
            let x = external.as_ref().expect("groups come from it");
            let out = x.tokens[0].len();
            let b = Batch { category: 0, index, seq_len: s, sequences: (first..first + nseq).collect(), first_row: first };
            let shape = BatchShape { nseq, seq_len: s, out_tokens: out };
            let prompts: Vec<u32> = x.prompts[first..first + nseq].iter().flatten().copied().collect();
            let want_tokens: Vec<u32> = x.tokens[first..first + nseq].iter().flatten().copied().collect();
            let want_logits: Vec<Vec<f32>> = (0..out).map(|step| x.logits[first..first + nseq].iter().flat_map(|l| l[step].iter().copied()).collect()).collect();
            for cand in std::iter::once(&mut reference).chain(strategies.iter_mut()) {
                let name = cand.spec.name();
                let forced = args.teacher_forcing.then_some(&want_tokens[..]);
                let g = run_on(cand, &b, &prompts, shape, forced).map_err(|e| fail(&name, e))?;
                if let Some(g) = g {
                    let err = worst_error(g.logits.iter().zip(&want_logits).map(|(a, b)| relative_l2(a, b)));
                    let tokens_ok = g.batch.tokens == want_tokens;
                    let pass = g.logits.len() == out && err <= args.tolerance && (args.teacher_forcing || tokens_ok);
                    failures += usize::from(!pass);
                    let tokens = if tokens_ok { "same" } else { "DIFFER" };
                    println!("{}", Row { name: &name, category: "reference", batch: index, shape, pool: g.batch.pool_effective, err, tokens, pass });
                }
            }
        }
        let categories = if external.is_some() { &[][..] } else { &job.workload.categories[..] };
        for (c, cat) in categories.iter().enumerate() {
            for b in wl.batches(c).into_iter().take(args.max_batches) {
                let shape = shape_of(&b, job);
                let prompts = wl.batch_prompts(&b);
                let run = |cand: &mut Candidate<'_, B>, forced: Option<&[u32]>| run_on(cand, &b, &prompts, shape, forced);
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
            match &external {
                Some(_) => println!("the single-rank model and all strategies reproduce the reference"),
                None => println!("all strategies reproduce the single-rank model"),
            }
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
