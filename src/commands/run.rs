//! `fapool run`: every strategy of a job over its workload, into a results file.

use super::{end_job_on_failure, exit_for, load, start_mpi, validate_launch, with_backend, BackendRequest, Failure, Launch, OnBackend};
use crate::backend::{Backend, BackendKind};
use crate::cluster::Cluster;
use crate::exit::Exit;
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
    /// `--trace DIR` with the batches it records.
    pub trace: Option<TraceSpec>,
}

struct RunBody<'a> {
    job: &'a JobSpec,
    text: &'a str,
    target: Target,
    timeout_s: f64,
    trace: Option<TraceSpec>,
}

impl OnBackend for RunBody<'_> {
    fn run<B: Backend>(self, cluster: &Cluster, launch: Launch<'_, B>) -> Result<(), Failure> {
        let cfg = validate_launch(self.job, &launch.facts, cluster)?;
        let setup = SweepSetup {
            job: self.job,
            text: self.text,
            cfg: &cfg,
            facts: &launch.facts,
            target: self.target,
            timeout_s: self.timeout_s,
            devices: launch.devices,
            versions: launch.versions,
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
    let request = BackendRequest { kind: args.backend.unwrap_or(job.run.backend), dtype: job.dtype(), job: Some(&job) };
    with_backend(request, &cluster, RunBody { job: &job, text: &text, target, timeout_s: args.timeout_s, trace: args.trace })
}
