//! `fapool run`: every strategy of a job over its workload, into a results
//! file, with the planner's prediction of each (strategy, category) stored
//! beside its measurement.

use super::{end_job_on_failure, exit_for, load, start_mpi, validate_launch, with_backend, BackendRequest, Failure, Launch, OnBackend};
use crate::backend::{Backend, BackendKind};
use crate::cluster::Cluster;
use crate::exit::Exit;
use crate::model::ModelConfig;
use crate::planner::calibration::Calibration;
use crate::planner::cost::CostModel;
use crate::planner::predict::{self, run_cluster, Predictions};
use crate::runner::sweep::{run_sweep, SweepEnd, SweepError, SweepSetup, Target};
use crate::runner::timeline::TraceSpec;
use crate::spec::JobSpec;
use std::path::{Path, PathBuf};

/// Options of `fapool run`.
pub struct RunArgs {
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub force: bool,
    pub backend: Option<BackendKind>,
    pub timeout_s: f64,
    /// Predict from this calibration file rather than the roofline.
    pub calibration: Option<PathBuf>,
    /// `--trace DIR` with the batches it records.
    pub trace: Option<TraceSpec>,
}

struct RunBody<'a> {
    job: &'a JobSpec,
    text: &'a str,
    target: Target,
    timeout_s: f64,
    calibration: Option<Calibration>,
    trace: Option<TraceSpec>,
}

/// Rank 0's predictions of every (strategy, category) on this run's
/// hardware; a run without a usable cost model says so and runs without.
fn predictions<B: Backend>(body: &RunBody<'_>, cfg: &ModelConfig, cluster: &Cluster, launch: &Launch<'_, B>) -> Option<Predictions> {
    if cluster.rank != 0 {
        return None;
    }
    let device = (launch.be.name() != "cpu").then(|| launch.devices.first().map(|d| d.name.clone()).unwrap_or_default());
    let world = launch.world.size();
    let made = run_cluster(device.as_deref(), world, cluster.max_local_ranks, launch.facts.memory_budget_bytes).and_then(|c| {
        let graphs = body.job.run.cuda_graphs && device.is_some();
        let cost = match &body.calibration {
            Some(cal) => CostModel::calibrated(c, cal, graphs),
            None => CostModel::roofline(c, if device.is_some() { body.job.dtype() } else { crate::backend::Dtype::Fp32 }, graphs),
        };
        predict::for_job(body.job, cfg, &cost, world).map_err(|e| e.to_string())
    });
    match made {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("fapool: no planner predictions for this run: {e}");
            None
        }
    }
}

impl OnBackend for RunBody<'_> {
    fn run<B: Backend>(self, cluster: &Cluster, launch: Launch<'_, B>) -> Result<(), Failure> {
        let cfg = validate_launch(self.job, &launch.facts, cluster)?;
        let predicted = predictions(&self, &cfg, cluster, &launch);
        let setup = SweepSetup {
            job: self.job,
            text: self.text,
            cfg: &cfg,
            facts: &launch.facts,
            target: self.target,
            timeout_s: self.timeout_s,
            devices: launch.devices,
            versions: launch.versions,
            predictions: predicted.as_ref(),
            trace: self.trace,
        };
        let rank = cluster.rank;
        match run_sweep(launch.be, &launch.comm, &launch.world, cluster, &setup, launch.energy, Some(launch.tracer)) {
            Ok(SweepEnd::Complete) => Ok(()),
            Ok(SweepEnd::Interrupted) => Err(Failure::silent(Exit::Interrupted)),
            Err(SweepError::Target) => Err(Failure::silent(Exit::Usage)),
            Err(SweepError::Results(why)) => Err(end_job_on_failure(cluster, Failure { exit: Exit::Failure, message: why })),
            Err(SweepError::Strategy { context, error }) => Err(end_job_on_failure(cluster, Failure::new(exit_for(&error), format!("rank {rank}: {context}: {error}")))),
        }
    }
}

/// `fapool run JOB`.
pub fn run(job_path: &Path, args: RunArgs, sets: &[String]) -> Result<(), Failure> {
    let (job, text) = load(job_path, sets)?;
    if args.resume.is_some() && (args.out.is_some() || args.force) {
        return Err(Failure::new(Exit::Usage, "--resume continues an existing file; it takes neither --out nor --force"));
    }
    crate::control::install_stop_signals();
    let cluster = start_mpi()?;
    let path = args.resume.clone().or(args.out.clone()).unwrap_or_else(|| PathBuf::from(format!("results/{}-{}.h5", job.run.name, crate::results::utc_now().replace([':', '-'], ""))));
    let target = Target { path, resume: args.resume.is_some(), force: args.force };
    let kind = args.backend.unwrap_or(job.run.backend);
    // A calibration file that does not fit the run is refused before any device work.
    let calibration = match &args.calibration {
        None => None,
        Some(p) => {
            let cpu = kind == BackendKind::Cpu || (kind == BackendKind::Auto && crate::backend::cuda::probe::cuda_libraries_present().is_err());
            let dtype = if cpu { crate::backend::Dtype::Fp32 } else { job.dtype() };
            Some(Calibration::load(p, dtype).map_err(|v| Failure::on_root(Exit::Usage, cluster.rank, v.to_string()))?)
        }
    };
    let request = BackendRequest { kind, dtype: job.dtype(), job: Some(&job) };
    with_backend(request, &cluster, RunBody { job: &job, text: &text, target, timeout_s: args.timeout_s, trace: args.trace, calibration })
}
