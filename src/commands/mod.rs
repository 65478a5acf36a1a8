//! The commands behind the CLI, one file each. This module holds what they
//! share: loading the job, starting MPI, choosing and starting the backend
//! (the one place CPU and CUDA are dispatched), and mapping every failure to
//! its exit code ([`Failure`]), which `main` prints once.

pub mod analyze;
pub mod bench;
pub mod calibrate;
pub mod check_gpu;
pub mod env;
pub mod export;
pub mod plan;
pub mod run;
pub mod validate;
pub mod verify;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::probe::{self, LibraryReport};
use crate::backend::cuda::CudaBackend;
use crate::backend::traced::{Trace, Traced};
use crate::backend::{Backend, BackendError, BackendKind, Dtype};
use crate::cluster::Cluster;
use crate::comm::mpi_transport::MpiTransport;
use crate::comm::nccl_transport::NcclTransport;
use crate::comm::traced::TracedTransport;
use crate::comm::{Comm, CommError, Group, Transport};
use crate::exit::Exit;
use crate::results::DeviceInfo;
use crate::runner::sweep::StackVersions;
use crate::runner::EnergyMeter;
use crate::spec::{self, JobSpec, LaunchFacts, SpecError};
use crate::strategy::StrategyError;
use std::path::Path;

pub(crate) const GIB: f64 = (1u64 << 30) as f64;

/// How a command ends when it does not succeed: its exit code and what this
/// rank says about it (`None` when another rank says it).
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: Option<String>,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self { exit, message: Some(message.into()) }
    }
    /// A failure another rank reports.
    pub fn silent(exit: Exit) -> Self {
        Self { exit, message: None }
    }
    /// `message` said now, on world rank 0 only: before any rank can end
    /// the job (ranks that fail together exit together, and the launcher
    /// may stop rank 0 before a message it keeps for later).
    pub fn on_root(exit: Exit, rank: usize, message: impl Into<String>) -> Self {
        if rank == 0 {
            eprintln!("fapool: {}", message.into());
        }
        Self::silent(exit)
    }
}

impl From<SpecError> for Failure {
    fn from(e: SpecError) -> Self {
        Failure::new(Exit::Usage, e.to_string())
    }
}

/// The exit code of a strategy's failure: device errors 4, NCCL errors 5,
/// a checkpoint that breaks a rule 2, anything else (a bug) 1.
pub fn exit_for(e: &StrategyError) -> Exit {
    match e {
        StrategyError::Backend(b) | StrategyError::Comm(CommError::Backend(b)) => exit_for_backend(b),
        StrategyError::Comm(CommError::Nccl(_)) => Exit::Nccl,
        StrategyError::Checkpoint(_) => Exit::Usage,
        StrategyError::Comm(_) | StrategyError::Protocol(_) => Exit::Failure,
    }
}

/// Device errors (CUDA driver, cuBLAS, NVRTC, an unusable backend, a
/// kernel limit the arguments exceed) exit 4.
pub fn exit_for_backend(e: &BackendError) -> Exit {
    match e {
        BackendError::Device { .. } | BackendError::Unavailable { .. } | BackendError::Unsupported(_) => Exit::Cuda,
        BackendError::Shape(_) => Exit::Failure,
    }
}

/// Prints a command's outcome and returns the process exit code.
pub fn finish(outcome: Result<(), Failure>) -> i32 {
    match outcome {
        Ok(()) => Exit::Ok.code(),
        Err(f) => {
            if let Some(m) = f.message {
                eprintln!("fapool: {m}");
            }
            f.exit.code()
        }
    }
}

/// Reads the job and applies `--set` overrides.
pub fn load(job: &Path, sets: &[String]) -> Result<(JobSpec, String), Failure> {
    Ok(spec::load_job(job, sets)?)
}

/// Starts MPI and checks the launch itself.
pub fn start_mpi() -> Result<Cluster, Failure> {
    let cluster = Cluster::init().map_err(|e| Failure::new(Exit::Mpi, format!("MPI: {e}")))?;
    if let Some(n) = Cluster::slurm_ntasks() {
        if n != cluster.world_size && std::env::var("SLURM_STEP_ID").is_ok() {
            let why = format!("rule `ranks-match-slurm` broken: MPI world has {} ranks but SLURM_NTASKS is {n} (singletons from a misconfigured launcher?)", cluster.world_size);
            return Err(Failure::on_root(Exit::Mpi, cluster.rank, why));
        }
    }
    Ok(cluster)
}

/// Node memory, shared by the CPU backend's ranks.
pub fn memory_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}

/// Checks the job against the launch on every rank (deterministic), reporting once.
pub fn validate_launch(job: &JobSpec, facts: &LaunchFacts, cluster: &Cluster) -> Result<crate::model::ModelConfig, Failure> {
    spec::validate(job, facts).map_err(|e| Failure::on_root(Exit::Usage, cluster.rank, e.to_string()))
}

/// A backend started on this rank, ready for a command: its comm layer over
/// the world, what the launch provides, and the device's meters and names.
pub struct Launch<'a, B: Backend> {
    pub be: &'a B,
    pub comm: Comm<'a, B>,
    pub world: Group,
    pub facts: LaunchFacts,
    pub energy: Option<&'a dyn EnergyMeter>,
    /// Every rank's device (empty on the CPU backend).
    pub devices: Vec<DeviceInfo>,
    pub versions: StackVersions,
    /// Turns the backend's operation trace on and off (`run --trace`).
    pub tracer: &'a dyn Trace,
}

/// A command body that runs on whichever backend was chosen.
pub trait OnBackend {
    fn run<B: Backend>(self, cluster: &Cluster, launch: Launch<'_, B>) -> Result<(), Failure>;
}

/// What to start.
pub struct BackendRequest<'j> {
    pub kind: BackendKind,
    /// The CUDA backend's dtype (the CPU backend computes in f32).
    pub dtype: Dtype,
    /// The job, checked against the launch before any GPU work (none for `bench comm`).
    pub job: Option<&'j JobSpec>,
}

/// A meter that measures nothing and takes `FAPOOL_TEST_METER_DELAY_MS`
/// per read (CPU backend only): the tests use it to check that reading
/// energy counters stays out of the batch's clocks.
struct SlowMeter(std::time::Duration);

impl SlowMeter {
    fn from_env() -> Option<Self> {
        let ms: u64 = std::env::var("FAPOOL_TEST_METER_DELAY_MS").ok()?.parse().ok()?;
        Some(Self(std::time::Duration::from_millis(ms)))
    }
}

impl EnergyMeter for SlowMeter {
    fn joules(&self) -> Option<f64> {
        std::thread::sleep(self.0);
        None
    }
}

/// Energy from NVML, matched to the rank's GPU by PCI bus id.
struct Nvml(crate::energy::GpuMonitor);

impl EnergyMeter for Nvml {
    fn joules(&self) -> Option<f64> {
        self.0.energy_j().ok()
    }
}

/// Chooses the backend before touching any GPU library: under `auto` a
/// missing CUDA stack or GPU falls back to the CPU backend with a message;
/// under `cuda` it is an error (exit 4).
fn choose_backend(kind: BackendKind, cluster: &Cluster) -> Result<Option<LibraryReport>, Failure> {
    match kind {
        BackendKind::Cpu => Ok(None),
        BackendKind::Auto => match probe::cuda_libraries_present() {
            Ok(r) => Ok(Some(r)),
            Err(why) => {
                if cluster.rank == 0 {
                    eprintln!("fapool: CUDA backend unavailable ({why}); using the CPU backend");
                }
                Ok(None)
            }
        },
        BackendKind::Cuda => probe::cuda_libraries_present().map(Some).map_err(|why| Failure::on_root(Exit::Cuda, cluster.rank, format!("the CUDA backend cannot run here: {why}"))),
    }
}

fn budget(job: Option<&JobSpec>, default: u64) -> u64 {
    job.and_then(|j| j.run.memory_budget_gib).map(|g| (g * GIB) as u64).unwrap_or(default)
}

fn world_of<'a, B: Backend>(be: &'a B, transport: Box<dyn Transport<B> + 'a>, cluster: &Cluster) -> Result<(Comm<'a, B>, Group), Failure> {
    let comm = Comm::new(be, transport);
    let world = comm.world_group().map_err(|e| Failure::new(Exit::Mpi, format!("rank {}: {e}", cluster.rank)))?;
    Ok((comm, world))
}

/// Starts the requested backend on this rank's device and runs `body` on it.
pub fn with_backend(request: BackendRequest<'_>, cluster: &Cluster, body: impl OnBackend) -> Result<(), Failure> {
    let job = request.job;
    match choose_backend(request.kind, cluster)? {
        None => {
            let per_rank = memory_total_bytes() / cluster.max_local_ranks.max(1) as u64;
            let facts = LaunchFacts { world_size: cluster.world_size, max_local_ranks: cluster.max_local_ranks, visible_gpus: None, memory_budget_bytes: budget(job, per_rank), elem_bytes: 4 };
            let be = Traced::new(CpuBackend::new());
            let slow = SlowMeter::from_env();
            let (comm, world) = world_of(&be, Box::new(TracedTransport(MpiTransport::new(cluster.world()))), cluster)?;
            let launch = Launch { be: &be, comm, world, facts, energy: slow.as_ref().map(|m| m as &dyn EnergyMeter), devices: Vec::new(), versions: StackVersions::default(), tracer: &be };
            body.run(cluster, launch)
        }
        Some(report) => {
            let facts_with = |device: Option<u64>| LaunchFacts {
                world_size: cluster.world_size,
                max_local_ranks: cluster.max_local_ranks,
                visible_gpus: report.gpu_count,
                memory_budget_bytes: budget(job, device.unwrap_or(80 << 30)),
                elem_bytes: request.dtype.size_bytes(),
            };
            // Every rule first: no GPU work for a job that cannot run.
            if let Some(j) = job {
                validate_launch(j, &facts_with(None), cluster)?;
            }
            let fail = |what: &str, e: &dyn std::fmt::Display| Failure::new(Exit::Cuda, format!("rank {}: {what}: {e}", cluster.rank));
            let be = CudaBackend::new(cluster.local_rank, request.dtype).map_err(|e| fail("starting the CUDA backend", &e))?;
            be.load_all_kernels().map_err(|e| fail("compiling the kernels", &e))?;
            let nvml = be.pci_bus_id().ok().and_then(|bus| crate::energy::GpuMonitor::new(&bus).ok()).map(Nvml);
            if nvml.is_none() && cluster.rank == 0 {
                eprintln!("fapool: NVML unavailable: energy is recorded as not measured");
            }
            let facts = facts_with(be.total_memory_bytes().ok());
            let mine = [be.device_name().unwrap_or_default(), nvml.as_ref().map(|n| n.0.uuid().to_string()).unwrap_or_default(), be.pci_bus_id().unwrap_or_default()];
            let devices =
                cluster.all_gather_strings(&mine).into_iter().enumerate().map(|(r, f)| DeviceInfo { world_rank: r as u32, name: f[0].clone(), uuid: f[1].clone(), pci_bus_id: f[2].clone() }).collect();
            let versions = StackVersions { cuda: report.nvrtc_version.clone(), nccl: report.nccl_version.clone(), driver: nvml.as_ref().map(|n| n.0.driver_version().to_string()) };
            let be = Traced::new(be);
            let (comm, world) = world_of(&be, Box::new(TracedTransport(NcclTransport::new(cluster.world()))), cluster)?;
            let launch = Launch { be: &be, comm, world, facts, energy: nvml.as_ref().map(|n| n as &dyn EnergyMeter), devices, versions, tracer: &be };
            body.run(cluster, launch)
        }
    }
}

/// A failure in the middle of a multi-rank job: the other ranks may be
/// waiting for this one in a collective, so it is reported here and the
/// whole job ends with its exit code. A single rank just returns it.
pub fn end_job_on_failure(cluster: &Cluster, failure: Failure) -> Failure {
    if cluster.world_size == 1 {
        return failure;
    }
    if let Some(m) = &failure.message {
        eprintln!("fapool: {m}");
    }
    crate::control::abort_job(failure.exit)
}
