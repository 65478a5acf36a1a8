//! A whole run of a job: every strategy over every category's batches, in
//! a fixed plan, with the results file made durable after each batch. It
//! resumes an interrupted file (skipping the batches it holds), warms each
//! category up, stops every rank at the next batch boundary on a signal,
//! arms the watchdog, applies injected faults, and caps micro-batches by the
//! memory model.

use super::progress::Progress;
use super::records::{gather_batch, BatchFacts};
use super::timeline::{gather_and_write, rank_events, TraceSpec};
use super::{batch_flops, run_batch, BatchInput, EnergyMeter};
use crate::backend::traced::Trace;
use crate::backend::{Backend, BackendError, DeviceLibrary};
use crate::cluster::Cluster;
use crate::comm::{Comm, CommError, Group};
use crate::control::{Fault, FaultEffect, Watchdog};
use crate::metrics::CategorySummary;
use crate::model::ModelConfig;
use crate::results::durable::Durable;
use crate::results::{DeviceInfo, Provenance, RoleRow, RunStatus, StrategyInfo};
use crate::spec::{JobSpec, LaunchFacts};
use crate::strategy::{BatchShape, BuildContext, StrategyError};
use crate::workload::{Batch, Workload};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where results go.
#[derive(Clone, Debug)]
pub struct Target {
    pub path: PathBuf,
    /// Continue the file at `path` instead of creating it.
    pub resume: bool,
    /// Overwrite an existing file.
    pub force: bool,
}

/// Versions of the GPU stack, for the provenance.
#[derive(Clone, Debug, Default)]
pub struct StackVersions {
    pub cuda: Option<String>,
    pub nccl: Option<String>,
    pub driver: Option<String>,
}

/// The planner's predictions of one (strategy, category).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PredictedCategory {
    /// `(name, value)`: each named as the measured figure it predicts.
    pub figures: Vec<(String, f64)>,
    /// `(name, text)`: what the figures assume (the cost model's source, the expert routing).
    pub notes: Vec<(String, String)>,
}

/// Predictions by (strategy, category).
pub type Predicted = BTreeMap<(String, String), PredictedCategory>;

/// Everything a sweep needs besides the backend and the communicators.
pub struct SweepSetup<'a> {
    pub job: &'a JobSpec,
    /// The job spec as read (stored in the provenance).
    pub text: &'a str,
    pub cfg: &'a ModelConfig,
    pub facts: &'a LaunchFacts,
    pub target: Target,
    /// `--timeout` in seconds (0: no watchdog).
    pub timeout_s: f64,
    /// Every rank's device.
    pub devices: Vec<DeviceInfo>,
    pub versions: StackVersions,
    /// The planner's predictions by (strategy, category): `(name, value)`
    /// pairs stored beside the category's summary (rank 0).
    pub predictions: Option<&'a Predicted>,
    /// `--trace`: where timelines go and of which batches.
    pub trace: Option<TraceSpec>,
}

/// How a sweep ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepEnd {
    Complete,
    /// Stopped by a signal at a batch boundary, the file marked interrupted.
    Interrupted,
}

/// Why a sweep failed. Every rank returns one; only the ranks that know
/// what happened carry a message.
#[derive(Debug)]
pub enum SweepError {
    /// The results file cannot be used as asked (exists without `--force`,
    /// missing for `--resume`); rank 0 has said why.
    Target,
    /// The results file could not be written (the message, where not yet said).
    Results(Option<String>),
    /// A strategy failed on this rank (building it, warming up or a batch).
    Strategy { context: String, error: StrategyError },
}

type Result<T> = std::result::Result<T, SweepError>;

/// The run's batches in order: (strategy, category, batch).
fn plan(job: &JobSpec, wl: &Workload) -> Vec<(usize, usize, Batch)> {
    let mut plan = Vec::new();
    for si in 0..job.strategies.len() {
        for c in 0..job.workload.categories.len() {
            plan.extend(wl.batches(c).into_iter().map(|b| (si, c, b)));
        }
    }
    plan
}

/// The shape of a batch of the workload.
pub fn shape_of(b: &Batch, job: &JobSpec) -> BatchShape {
    BatchShape { nseq: b.sequences.len(), seq_len: b.seq_len, out_tokens: job.workload.output_tokens }
}

/// All ranks agree on a rank-0 decision.
fn agree(world: &SimpleCommunicator, ok_on_root: bool) -> bool {
    let mut flag = [ok_on_root as u8];
    world.process_at_rank(0).broadcast_into(&mut flag[..]);
    flag[0] == 1
}

fn git_commit() -> String {
    option_env!("FAPOOL_GIT_COMMIT").unwrap_or("unknown").to_string()
}

/// The run's provenance (roles from every strategy's layout).
fn provenance(setup: &SweepSetup<'_>, cluster: &Cluster, backend: &str, transport: &str) -> Provenance {
    let job = setup.job;
    let world = cluster.world_size;
    Provenance {
        schema_version: crate::results::SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: git_commit(),
        job_toml: setup.text.into(),
        argv: std::env::args().collect(),
        hosts: cluster.hosts.clone(),
        world_size: world as u32,
        backend: backend.into(),
        transport: transport.into(),
        mpi_library: cluster.mpi_library.clone(),
        cuda_version: setup.versions.cuda.clone(),
        nccl_version: setup.versions.nccl.clone(),
        driver_version: setup.versions.driver.clone(),
        devices: setup.devices.clone(),
        slurm: std::env::vars().filter(|(k, _)| k.starts_with("SLURM_") && (k.ends_with("_ID") || k.contains("NODELIST") || k.contains("NTASKS"))).collect(),
        seeds: crate::results::Seeds { workload: job.workload.seed, weights: setup.cfg.weights_seed },
        started_utc: crate::results::utc_now(),
        categories: job.workload.categories.iter().map(|c| c.name.clone()).collect(),
        roles: job
            .strategies
            .iter()
            .flat_map(|s| {
                let layout = s.deployment().layout(world);
                (0..world).map(move |r| RoleRow { world_rank: r as u32, host: cluster.hosts[r].clone(), local_rank: cluster.local_ranks[r] as u32, strategy: s.name(), role: layout.roles[r].clone() })
            })
            .collect(),
    }
}

/// Rank 0 opens (or creates) the results file and learns which batches a
/// resumed file already holds; every rank learns them too.
fn open_target<B: Backend>(be: &B, comm: &Comm<'_, B>, cluster: &Cluster, setup: &SweepSetup<'_>, plan: &[(usize, usize, Batch)]) -> Result<(Option<Durable>, Vec<u8>)> {
    let (job, target) = (setup.job, &setup.target);
    let world = &cluster.world();
    let root = cluster.rank == 0;
    let path = &target.path;
    let problem = if !root {
        None
    } else if target.resume && !path.exists() {
        Some(format!("--resume {}: no such results file", path.display()))
    } else if !target.resume && path.exists() && !target.force {
        Some(format!("results file {} exists; pass --force to overwrite it, or --resume to continue it", path.display()))
    } else {
        None
    };
    // Said before the other ranks learn of it and may end the job.
    if let Some(p) = &problem {
        eprintln!("fapool: {p}");
    }
    if !agree(world, problem.is_none()) {
        return Err(SweepError::Target);
    }
    let mut done = vec![0u8; plan.len()];
    let mut file = None;
    let mut failure = None;
    if root {
        let opened = if target.resume {
            let d = Durable::open(path);
            d.update(|f| {
                for (i, (si, c, b)) in plan.iter().enumerate() {
                    let completed = f.completed_batches(&job.strategies[*si].name(), &job.workload.categories[*c].name).unwrap_or_default();
                    done[i] = completed.contains(&(b.index as u32)) as u8;
                }
                f.set_status(RunStatus::Running, None)
            })
            .map(|_| d)
        } else {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::create_dir_all(dir);
            }
            Durable::create(path, &provenance(setup, cluster, be.name(), comm.transport_name()))
        };
        match opened {
            Ok(d) => file = Some(d),
            Err(e) => {
                eprintln!("fapool: {e}");
                failure = Some(e);
            }
        }
    }
    if !agree(world, failure.is_none()) {
        return Err(SweepError::Results(None));
    }
    world.process_at_rank(0).broadcast_into(&mut done[..]);
    Ok((file, done))
}

/// The error a rank's injected fault makes its batch fail with.
fn injected(effect: FaultEffect) -> Option<StrategyError> {
    match effect {
        FaultEffect::DeviceError => Some(StrategyError::Backend(BackendError::Device { library: DeviceLibrary::Driver, message: "injected device error (FAPOOL_FAULT)".into() })),
        FaultEffect::CommError => Some(StrategyError::Comm(CommError::Nccl("injected communication error (FAPOOL_FAULT)".into()))),
        FaultEffect::None | FaultEffect::DeviceUnusable => None,
    }
}

/// Runs the whole sweep on every rank of `world`.
/// `tracer` turns the backend's operation trace on for the batches `--trace` chooses.
pub fn run_sweep<B: Backend>(be: &B, comm: &Comm<'_, B>, world: &Group, cluster: &Cluster, setup: &SweepSetup<'_>, energy: Option<&dyn EnergyMeter>, tracer: Option<&dyn Trace>) -> Result<SweepEnd> {
    let (job, cfg, facts) = (setup.job, setup.cfg, setup.facts);
    let root = world.rank() == 0;
    let me = world.rank();
    let wl = Workload::new(&job.workload, cfg.vocab);
    let plan = plan(job, &wl);
    let (file, done) = open_target(be, comm, cluster, setup, &plan)?;
    let mpi_world = cluster.world();
    let path = setup.target.path.clone();
    let fault = Fault::from_env();
    // The batch in flight, for the watchdog to mark in the file if it fires.
    let current: Arc<Mutex<Option<(String, String, u32)>>> = Default::default();
    let watchdog = (setup.timeout_s > 0.0).then(|| {
        let (file, current, timeout_s) = (file.clone(), current.clone(), setup.timeout_s);
        Watchdog::start(Duration::from_secs_f64(timeout_s), me, move || {
            let at = current.lock().map(|c| c.clone()).unwrap_or(None);
            if let (Some(d), Some((s, c, b))) = (&file, at) {
                let reason = format!("no progress for {timeout_s} s (watchdog)");
                if let Err(e) = d.update(|f| f.mark_failed_batch(&s, &c, b, &reason, &crate::results::utc_now())) {
                    eprintln!("fapool: {e}");
                }
            }
        })
    });
    if let Some(w) = &watchdog {
        comm.set_heartbeat(w.handle());
    }
    let mut progress = root.then(|| Progress::new(plan.len() as u64));
    let finish = |status: RunStatus| {
        if let Some(d) = &file {
            if let Err(e) = d.update(|f| f.set_status(status, Some(&crate::results::utc_now()))) {
                eprintln!("fapool: {e}");
            }
        }
    };
    let failed = |context: String, error: StrategyError, at: Option<(&str, &str, u32)>| {
        if let (Some(d), Some((s, c, b))) = (&file, at) {
            let _ = d.update(|f| f.mark_failed_batch(s, c, b, &error.to_string(), &crate::results::utc_now()));
        }
        SweepError::Strategy { context, error }
    };
    let results_error = |e: String| SweepError::Results(Some(e));
    let mut i = 0;
    for (si, sspec) in job.strategies.iter().enumerate() {
        let name = sspec.name();
        let deployment = sspec.deployment();
        let layout = deployment.layout(world.size());
        let mut strategy = sspec.build(BuildContext { be, comm, cfg, world }).map_err(|e| failed(format!("building {name}"), e, None))?;
        if let Some(d) = &file {
            let info = StrategyInfo {
                name: name.clone(),
                kind: sspec.kind().into(),
                params: toml::to_string(sspec).unwrap_or_default(),
                world_ranks_used: layout.ranks_used().into_iter().map(|r| r as u32).collect(),
            };
            d.update(|f| f.begin_strategy(&info)).map_err(results_error)?;
        }
        let cap_for = |shape: BatchShape| deployment.max_sequences(cfg, shape, world.size(), facts.elem_bytes, facts.memory_budget_bytes);
        for (c, cat) in job.workload.categories.iter().enumerate() {
            // Warm-up: the category's first and last pending batches (its
            // shortest and longest sequences, so a pool the category
            // activates is warmed too), unrecorded, with two output tokens.
            let pending: Vec<usize> = (i..plan.len()).take_while(|&k| plan[k].0 == si && plan[k].1 == c).filter(|&k| done[k] == 0).collect();
            let mut warm: Vec<usize> = pending.first().into_iter().chain(pending.last()).copied().collect();
            warm.dedup();
            for k in warm.into_iter().filter(|_| job.run.warmup) {
                let mut shape = shape_of(&plan[k].2, job);
                shape.out_tokens = shape.out_tokens.min(2);
                let prompts = wl.batch_prompts(&plan[k].2);
                let input = BatchInput { shape, prompts: &prompts, micro_batch_cap: cap_for(shape), pool_usable: true, keep_logits: false, forced: None, cuda_graphs: job.run.cuda_graphs };
                run_batch(be, comm, strategy.as_mut(), &input, None).map_err(|e| failed(format!("warm-up of {name} {}", cat.name), e, None))?;
                mpi_world.barrier();
            }
            while i < plan.len() && plan[i].0 == si && plan[i].1 == c {
                let b = &plan[i].2;
                let global = i as u64;
                i += 1;
                if let Some(w) = &watchdog {
                    w.beat();
                }
                // A safe point: every rank stops here if any rank was signalled.
                let mut stop = 0u8;
                mpi_world.all_reduce_into(&(crate::control::stop_requested() as u8), &mut stop, mpi::collective::SystemOperation::max());
                if stop > 0 {
                    if root {
                        eprintln!("fapool: stop requested; {} marked interrupted, resume with --resume", path.display());
                        finish(RunStatus::Interrupted);
                    }
                    return Ok(SweepEnd::Interrupted);
                }
                if done[global as usize] == 1 {
                    continue;
                }
                if let Ok(mut cur) = current.lock() {
                    *cur = Some((name.clone(), cat.name.clone(), b.index as u32));
                }
                let at = (name.as_str(), cat.name.as_str(), b.index as u32);
                let context = format!("{name} {} batch {}", cat.name, b.index);
                let effect = fault.map(|f| f.apply(me, global)).unwrap_or(FaultEffect::None);
                if let Some(e) = injected(effect) {
                    return Err(failed(context, e, Some(at)));
                }
                let mut all_usable = 0u8;
                mpi_world.all_reduce_into(&((effect != FaultEffect::DeviceUnusable) as u8), &mut all_usable, mpi::collective::SystemOperation::min());
                let shape = shape_of(b, job);
                let prompts = wl.batch_prompts(b);
                let cap = cap_for(shape);
                let memory_estimate = deployment.memory_bytes(cfg, BatchShape { nseq: cap.min(shape.nseq), ..shape }, world.size(), facts.elem_bytes);
                mpi_world.barrier();
                let input = BatchInput { shape, prompts: &prompts, micro_batch_cap: cap, pool_usable: all_usable == 1, keep_logits: false, forced: None, cuda_graphs: job.run.cuda_graphs };
                let in_category = plan.iter().filter(|(s2, c2, _)| *s2 == si && *c2 == c).count();
                let traced = setup.trace.as_ref().filter(|t| t.wants(&cat.name, b.index, in_category)).zip(tracer);
                if let Some((_, tr)) = traced {
                    tr.start_trace().map_err(|e| failed(context.clone(), e.into(), Some(at)))?;
                    comm.start_trace(be.mark().map_err(|e| failed(context.clone(), e.into(), Some(at)))?);
                }
                let run = run_batch(be, comm, strategy.as_mut(), &input, energy).map_err(|e| failed(context.clone(), e, Some(at)))?;
                if let Some((spec, tr)) = traced {
                    let ops = tr.finish_trace().map_err(|e| failed(context.clone(), e.into(), Some(at)))?;
                    let events = rank_events(me, &layout.roles[me], &ops, &run.trace.clone().unwrap_or_default());
                    let path = spec.dir.join(format!("{name}-{}-b{}.json", cat.name, b.index));
                    let about = serde_json::json!({"strategy": name, "category": cat.name, "batch": b.index, "seq_len": shape.seq_len, "sequences": shape.nseq, "backend": be.name()});
                    gather_and_write(&mpi_world, events, &path, about).map_err(|e| results_error(format!("writing {}: {e}", path.display())))?;
                }
                let facts_b = BatchFacts { batch: b, shape, requested_batch: job.workload.batch_size, flops: batch_flops(cfg, shape), memory_estimate, leader: layout.leader, roles: &layout.roles };
                if let Some(g) = gather_batch(be, &mpi_world, &run, &facts_b) {
                    if let Some(d) = &file {
                        d.update(|f| f.append_experts(&name, &cat.name, &g.experts).and_then(|_| f.append_batch(&name, &cat.name, &g.batch, &g.ranks))).map_err(results_error)?;
                    }
                    if let Some(p) = progress.as_mut() {
                        p.batch_done(&name, &cat.name, i as u64, plan.len() as u64, g.batch.total_tokens());
                    }
                }
            }
            if let Some(d) = &file {
                let predicted = setup.predictions.and_then(|p| p.get(&(name.clone(), cat.name.clone())));
                let summary = d.update(|f| {
                    let records = f.batches(&name, &cat.name)?;
                    let wall: f64 = records.iter().map(|r| r.e2e_s).sum();
                    let summary = CategorySummary::from_batches(&records, wall);
                    f.write_summary(&name, &cat.name, &summary)?;
                    if let Some(p) = predicted {
                        p.figures.iter().try_for_each(|(k, v)| f.store_prediction(&name, &cat.name, k, *v))?;
                        p.notes.iter().try_for_each(|(k, v)| f.store_prediction_note(&name, &cat.name, k, v))?;
                    }
                    Ok(summary)
                });
                match summary {
                    Ok(s) => println!("{:<28} {:<10} batches {:>3}  TTFT {:>9.3} ms  TPOT {:>9.3} ms  TPS {:>10.1}", name, cat.name, s.batches, s.ttft.mean * 1e3, s.tpot.mean * 1e3, s.tps),
                    Err(e) => eprintln!("fapool: {e}"),
                }
            }
        }
    }
    if let Some(p) = &progress {
        p.finish();
    }
    finish(RunStatus::Complete);
    if root {
        println!("results: {}", path.display());
    }
    Ok(SweepEnd::Complete)
}
