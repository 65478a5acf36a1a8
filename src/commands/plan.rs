//! `fapool plan`: every strategy of a job planned over sequence lengths on
//! a cluster — predicted TTFT, TPOT, TPS, memory, communication share, GPU
//! use and the critical path, a comparison table with the crossover, and
//! optionally the DAGs (DOT/SVG) and predicted timelines (trace JSON).
//! `--check PLAN` checks a plan written by people; `--search` searches
//! configurations for a GPU budget. No MPI, no device.

use super::{load, Failure};
use crate::exit::Exit;
use crate::planner::compare::{self, Objective, Planned};
use crate::planner::report::ms;
use crate::planner::{self, report, PlanError, Planner, Point};
use crate::spec::{JobSpec, LaunchFacts};
use crate::strategy::BatchShape;
use std::path::PathBuf;

/// Options of `fapool plan`.
#[derive(Clone, Debug, Default)]
pub struct PlanArgs {
    pub job: Option<PathBuf>,
    pub cluster: Option<PathBuf>,
    pub calibration: Option<PathBuf>,
    pub seq: Vec<usize>,
    /// World size (search: every budget to search).
    pub gpus: Vec<usize>,
    pub batch: Option<usize>,
    pub decode_steps: usize,
    pub dot: Option<PathBuf>,
    pub trace: Option<PathBuf>,
    pub check: Option<PathBuf>,
    pub search: bool,
    pub objective: Option<Objective>,
    pub vary: Vec<String>,
    pub sets: Vec<String>,
    /// Print every GPU's time and memory, and both critical paths, per point.
    pub per_gpu: bool,
}

/// A plan's failure: bad input exits 2, anything else 1.
pub fn failure(e: PlanError) -> Failure {
    Failure::new(if e.is_bad_input() { Exit::Usage } else { Exit::Failure }, e.to_string())
}

pub(crate) fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The world a job's launch needs: every strategy's largest.
pub fn job_world(job: &JobSpec) -> usize {
    job.strategies.iter().map(|s| s.deployment().rank_range().max).max().unwrap_or(1)
}

/// The sequence lengths to plan: given, else every length of the workload.
pub fn lengths(job: &JobSpec, given: &[usize]) -> Vec<usize> {
    if !given.is_empty() {
        return given.to_vec();
    }
    let mut v: Vec<usize> = job.workload.categories.iter().flat_map(|c| c.resolved_lengths()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn print_point(pt: &Point) {
    let p = &pt.prediction;
    let active: Vec<usize> = (0..p.active.len()).filter(|&r| p.active[r]).collect();
    let busy = |u: &[report::GpuUse]| {
        let (c, w): (f64, f64) = active.iter().map(|&r| (u[r].compute_s, u[r].compute_s + u[r].comm_s + u[r].wait_s + u[r].idle_s)).fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        if w > 0.0 {
            100.0 * c / w
        } else {
            0.0
        }
    };
    let peak = pt.dag.peak_bytes.iter().copied().max().unwrap_or(0);
    println!(
        "{:<28} {:>7} {:>5} {:>3} {:>4} {:>10} {:>9} {:>11.0} {:>7.2} {:>7.2} {:>6.1} {:>6.1} {:>6.1}  {}",
        pt.strategy,
        p.shape.seq_len,
        p.shape.nseq,
        p.setup.micro_batches,
        p.setup.pool_effective,
        ms(p.ttft_s),
        ms(p.tpot_s),
        p.tps,
        gib(pt.memory_model_bytes),
        gib(peak),
        100.0 * p.comm_share,
        busy(&p.prefill_use),
        busy(&p.decode_use),
        report::path_summary(&p.prefill_path, 3)
    );
}

/// Every GPU's memory and time of one point, and its critical paths.
fn print_gpus(pt: &Point, roles: &[String]) {
    let p = &pt.prediction;
    let f = |u: &report::GpuUse| format!("{:>9} {:>9} {:>9} {:>9}", ms(u.compute_s), ms(u.comm_s), ms(u.wait_s), ms(u.idle_s));
    println!("    {:<5} {:<12} {:>8}  {:^39}  {:^39}", "GPU", "role", "peak GiB", "prefill ms: busy / comm / wait / idle", "decode step ms: busy / comm / wait / idle");
    for r in (0..p.active.len()).filter(|&r| p.active[r]) {
        println!("    {r:<5} {:<12} {:>8.2}  {}  {}", roles.get(r).map_or("", String::as_str), gib(pt.dag.peak_bytes[r]), f(&p.prefill_use[r]), f(&p.decode_use[r]));
    }
    println!("    prefill critical path ({} GPUs): {}", p.prefill_path_ranks, report::path_summary(&p.prefill_path, 8));
    println!("    decode step critical path: {}", report::path_summary(&p.decode_path, 8));
}

fn header() {
    println!(
        "{:<28} {:>7} {:>5} {:>3} {:>4} {:>10} {:>9} {:>11} {:>7} {:>7} {:>6} {:>6} {:>6}  prefill critical path",
        "strategy", "seq", "nseq", "mb", "pool", "TTFT ms", "TPOT ms", "TPS", "mem GiB", "peak", "comm%", "busyP%", "busyD%"
    );
}

/// Prints the comparison of every FA Pool strategy with the first baseline.
pub fn print_comparison(points: &[Planned], budget: usize) {
    let Some((reference, challengers)) = compare::pairs(points) else { return };
    if challengers.is_empty() {
        return;
    }
    println!();
    println!("comparison with {reference} ({budget} GPUs): TPOT and TTFT improvement = baseline / FA Pool, TPS = FA Pool / baseline");
    println!("{:<28} {:>7} {:>10} {:>10} {:>8} {:>8} {:>8}", "strategy", "seq", "TPOT ms", "base ms", "TPOT x", "TTFT x", "TPS x");
    let at = |name: &str, s: usize| points.iter().find(|p| p.strategy == name && p.prediction.shape.seq_len == s).map(|p| &p.prediction);
    for c in &challengers {
        let mut seqs: Vec<usize> = points.iter().filter(|p| &p.strategy == c).map(|p| p.prediction.shape.seq_len).collect();
        seqs.sort_unstable();
        for s in seqs {
            if let (Some(f), Some(b)) = (at(c, s), at(&reference, s)) {
                println!("{:<28} {:>7} {:>10} {:>10} {:>8.2} {:>8.2} {:>8.2}", c, s, ms(f.tpot_s), ms(b.tpot_s), Objective::Tpot.gain(f, b), Objective::Ttft.gain(f, b), Objective::Tps.gain(f, b));
            }
        }
        for o in [Objective::Tpot, Objective::Ttft, Objective::Tps] {
            match compare::crossover(points, &reference, c, o) {
                Some(s) => println!("crossover ({budget} GPUs, {}): {c} beats {reference} from {s} tokens on", o.name()),
                None => println!("crossover ({budget} GPUs, {}): {c} does not stay ahead of {reference} at the lengths planned", o.name()),
            }
        }
    }
}

/// Checks the job's own rules for a launch of `world` ranks of the cluster's GPUs.
pub fn check_job(job: &JobSpec, planner: &Planner<'_>) -> Result<(), Failure> {
    let c = &planner.cost.cluster;
    let facts = LaunchFacts {
        world_size: planner.world,
        max_local_ranks: planner.world.min(c.gpus_per_node),
        visible_gpus: (c.gpu.key != "cpu").then_some(c.gpus_per_node),
        memory_budget_bytes: planner.budget_bytes(),
        elem_bytes: planner.dtype().size_bytes(),
    };
    crate::spec::validate(job, &facts)?;
    Ok(())
}

fn write_outputs(args: &PlanArgs, pt: &Point, job: &JobSpec, world: usize) -> Result<(), Failure> {
    let spec = job.strategies.iter().find(|s| s.name() == pt.strategy).expect("planned from the job");
    let roles = spec.deployment().layout(world).roles;
    let stem = format!("{}-s{}", pt.strategy, pt.prediction.shape.seq_len);
    let io = |e: std::io::Error| Failure::new(Exit::Failure, format!("writing {stem}: {e}"));
    if let Some(dir) = &args.dot {
        use crate::planner::dag::Phase;
        for (phase, tag) in [(Phase::Prefill, "prefill"), (Phase::Decode(1), "decode")] {
            let (wrote, why) = planner::export::write_dot(&pt.dag, &roles, &[phase], dir, &format!("{stem}-{tag}")).map_err(io)?;
            let names: Vec<String> = wrote.iter().map(|p| p.display().to_string()).collect();
            println!("  wrote {}{}", names.join(", "), why.map(|w| format!(" ({w})")).unwrap_or_default());
        }
    }
    if let Some(dir) = &args.trace {
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(format!("{stem}.json"));
        let about = serde_json::json!({"predicted": true, "job": job.run.name, "strategy": pt.strategy, "sequences": pt.prediction.shape.nseq, "seq_len": pt.prediction.shape.seq_len, "world": world});
        planner::export::write_trace(&planner::export::trace(&pt.dag, &pt.timeline, &roles, about), &path).map_err(io)?;
        println!("  wrote {}", path.display());
    }
    Ok(())
}

/// `fapool plan`.
pub fn plan(args: PlanArgs) -> Result<(), Failure> {
    if let Some(p) = &args.check {
        return crate::planner::check::run(p).map_err(failure);
    }
    let Some(job_path) = &args.job else { return Err(Failure::new(Exit::Usage, "plan needs a job spec (or --check PLAN)")) };
    let (job, _) = load(job_path, &args.sets)?;
    let cfg = job.model.resolve()?;
    if args.search {
        let s = crate::planner::search::SearchArgs {
            cluster: args.cluster.as_deref(),
            calibration: args.calibration.as_deref(),
            gpus: &args.gpus,
            seq: &args.seq,
            batch: args.batch,
            decode_steps: args.decode_steps,
            objective: args.objective.unwrap_or(Objective::Tpot),
            vary: &args.vary,
        };
        return crate::planner::search::run(&job, &cfg, &s).map_err(failure);
    }
    let world = args.gpus.first().copied().unwrap_or_else(|| job_world(&job));
    let cost = planner::cost_model(&job, args.cluster.as_deref(), args.calibration.as_deref(), world).map_err(failure)?;
    let p = Planner { job: &job, cfg: &cfg, cost: &cost, world, decode_steps: args.decode_steps };
    cost.cluster.check_deployment(world).map_err(|v| failure(v.into()))?;
    check_job(&job, &p)?;
    let c = &cost.cluster;
    println!(
        "plan: {} on {world} GPUs of cluster `{}` ({} x {}, {}, {:.0} GiB), compute from the {}; {} decode steps simulated",
        cfg.name,
        c.name,
        c.nodes,
        c.gpus_per_node,
        c.gpu.key,
        gib(c.memory_bytes),
        cost.source,
        if args.decode_steps == 0 { "all".to_string() } else { args.decode_steps.to_string() }
    );
    if let Some(e) = cfg.experts {
        println!("expert routing ({} experts, top {}): {}", e.count, e.top_k, p.routing().describe());
    }
    let messages =
        if cost.cluster.gpu.key == "cpu" { "messages hold the compute timeline (blocking MPI)" } else { "messages run on their groups' streams, the compute stream waiting where each is completed" };
    println!("{messages}");
    header();
    let mut planned = Vec::new();
    for s in lengths(&job, &args.seq) {
        let nseq = args.batch.unwrap_or_else(|| planner::batch_at(&job, cfg.vocab, s));
        let shape = BatchShape { nseq, seq_len: s, out_tokens: job.workload.output_tokens };
        for spec in &job.strategies {
            let pt = match p.point(spec, shape) {
                Ok(pt) => pt,
                // A deployment that does not fit at this length is a row of
                // the table, not the end of the plan.
                Err(PlanError::Dag(v)) if v.rule == "memory-within-capacity" => {
                    println!("{:<28} {:>7} {:>5}  does not fit: {}: {}", spec.name(), s, nseq, v.at, v.detail);
                    continue;
                }
                Err(e) => return Err(failure(e)),
            };
            print_point(&pt);
            if args.per_gpu {
                print_gpus(&pt, &spec.deployment().layout(world).roles);
            }
            write_outputs(&args, &pt, &job, world)?;
            planned.push(Planned { strategy: pt.strategy.clone(), kind: pt.kind.to_string(), prediction: pt.prediction });
        }
    }
    print_comparison(&planned, world);
    Ok(())
}
