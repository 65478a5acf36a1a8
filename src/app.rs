//! The commands behind the CLI: load and check the job, start MPI, pick the
//! backend, drive the runner, write and read results. Errors are reported
//! here, once, on world rank 0, and mapped to typed exit codes.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BackendKind};
use crate::cluster::Cluster;
use crate::comm::mpi_transport::MpiTransport;
use crate::comm::{Group, Transport};
use crate::exit::Exit;
use crate::metrics::{relative_l2, worst_error, CategorySummary};
use crate::model::ModelConfig;
use crate::runner::{build_strategy, gather_batch, run_batch, shape_of, world_comm, EnergyMeter};
use crate::spec::{self, BaselineSpec, JobSpec, LaunchFacts, StrategySpec};
use crate::strategy::Strategy;
use crate::workload::Workload;
use mpi::traits::*;
use std::path::{Path, PathBuf};

const GIB: f64 = (1u64 << 30) as f64;

fn load(job: &Path, sets: &[String]) -> Result<(JobSpec, String), Exit> {
    spec::load_job(job, sets).map_err(|e| {
        eprintln!("fapool: {e}");
        Exit::Usage
    })
}

/// `fapool validate`: every rule, no MPI, no device.
pub fn validate(job: &Path, ranks: usize, local_ranks: Option<usize>, gpus: Option<usize>, memory_gib: Option<f64>, sets: &[String]) -> Exit {
    let (job, _) = match load(job, sets) {
        Ok(j) => j,
        Err(e) => return e,
    };
    let elem = if gpus.is_some() { job.run.dtype.size_bytes() } else { 4 };
    let facts = LaunchFacts {
        world_size: ranks,
        max_local_ranks: local_ranks.unwrap_or(ranks),
        visible_gpus: gpus,
        memory_budget_bytes: (memory_gib.or(job.run.memory_budget_gib).unwrap_or(80.0) * GIB) as u64,
        elem_bytes: elem,
    };
    match spec::validate(&job, &facts) {
        Ok(m) => {
            print_job_summary(&job, &m, ranks);
            println!("valid: {} ranks", ranks);
            Exit::Ok
        }
        Err(e) => {
            eprintln!("fapool: {e}");
            Exit::Usage
        }
    }
}

fn print_job_summary(job: &JobSpec, m: &ModelConfig, world: usize) {
    println!(
        "model {}: {} layers, d_model {}, {} x {} heads, ffn {} ({:?}), vocab {}: {:.3} B parameters ({:.3} B in layers)",
        m.name,
        m.layers,
        m.d_model,
        m.heads,
        m.head_dim,
        m.ffn,
        m.ffn_kind,
        m.vocab,
        m.params() as f64 / 1e9,
        (m.layers as u64 * m.layer_params()) as f64 / 1e9
    );
    let w = Workload::new(&job.workload, m.vocab);
    for (c, cat) in job.workload.categories.iter().enumerate() {
        println!("category {}: lengths {:?}, {} sequences in {} batches", cat.name, cat.resolved_lengths(), job.workload.sequences_per_category, w.batches(c).len());
    }
    for s in &job.strategies {
        let (lo, hi) = s.rank_range();
        println!("strategy {} ({}): uses {} of {world} ranks", s.name(), s.kind(), hi.min(world).max(lo));
    }
}

fn memory_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}

/// Starts MPI and checks the launch itself.
fn start_mpi() -> Result<Cluster, Exit> {
    let cluster = Cluster::init().map_err(|e| {
        eprintln!("fapool: MPI: {e}");
        Exit::Mpi
    })?;
    if let Some(n) = Cluster::slurm_ntasks() {
        if n != cluster.world_size && std::env::var("SLURM_STEP_ID").is_ok() {
            if cluster.rank == 0 {
                eprintln!("fapool: rule `ranks-match-slurm` broken: MPI world has {} ranks but SLURM_NTASKS is {n} (singletons from a misconfigured launcher?)", cluster.world_size);
            }
            return Err(Exit::Mpi);
        }
    }
    Ok(cluster)
}

/// The backend a run will use.
enum Chosen {
    Cpu,
    Cuda(Box<crate::backend::cuda::probe::LibraryReport>),
}

/// Chooses the backend before touching any GPU library: under `auto` a
/// missing CUDA stack or GPU falls back to the CPU backend with a message;
/// under `cuda` it is an error.
fn choose_backend(kind: BackendKind, cluster: &Cluster) -> Result<Chosen, Exit> {
    use crate::backend::cuda::probe;
    match kind {
        BackendKind::Cpu => Ok(Chosen::Cpu),
        BackendKind::Auto => match probe::cuda_libraries_present() {
            Ok(r) => Ok(Chosen::Cuda(Box::new(r))),
            Err(why) => {
                if cluster.rank == 0 {
                    eprintln!("fapool: CUDA backend unavailable ({why}); using the CPU backend");
                }
                Ok(Chosen::Cpu)
            }
        },
        BackendKind::Cuda => probe::cuda_libraries_present().map(|r| Chosen::Cuda(Box::new(r))).map_err(|why| {
            if cluster.rank == 0 {
                eprintln!("fapool: the CUDA backend cannot run here: {why}");
            }
            Exit::Cuda
        }),
    }
}

/// What a CUDA launch provides (no device is touched: the probe counted GPUs).
fn cuda_facts(job: &JobSpec, cluster: &Cluster, report: &crate::backend::cuda::probe::LibraryReport, device_bytes: Option<u64>) -> LaunchFacts {
    let budget = job.run.memory_budget_gib.map(|g| (g * GIB) as u64).or(device_bytes).unwrap_or(80 << 30);
    LaunchFacts { world_size: cluster.world_size, max_local_ranks: cluster.max_local_ranks, visible_gpus: report.gpu_count, memory_budget_bytes: budget, elem_bytes: job.run.dtype.size_bytes() }
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

/// Checks every rule (before any GPU work), then starts the CUDA backend on
/// this rank's GPU; returns it, its NVML monitor and the launch facts with the
/// device's memory as the default budget.
fn start_cuda(job: &JobSpec, cluster: &Cluster, report: &crate::backend::cuda::probe::LibraryReport) -> Result<(crate::backend::cuda::CudaBackend, Option<Nvml>, LaunchFacts), Exit> {
    validate_launch(job, &cuda_facts(job, cluster, report, None), cluster)?;
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("fapool: rank {}: {what}: {e}", cluster.rank);
        Exit::Cuda
    };
    let be = crate::backend::cuda::CudaBackend::new(cluster.local_rank, job.run.dtype).map_err(|e| fail("starting the CUDA backend", &e))?;
    be.load_all_kernels().map_err(|e| fail("compiling the kernels", &e))?;
    let nvml = be.pci_bus_id().ok().and_then(|bus| crate::energy::GpuMonitor::new(&bus).ok()).map(Nvml);
    if nvml.is_none() && cluster.rank == 0 {
        eprintln!("fapool: NVML unavailable: energy is recorded as not measured");
    }
    let facts = cuda_facts(job, cluster, report, be.total_memory_bytes().ok());
    Ok((be, nvml, facts))
}

/// Name, UUID and PCI bus id of every rank's device, gathered on all ranks.
fn gather_devices(cluster: &Cluster, mine: [String; 3]) -> Vec<crate::results::DeviceInfo> {
    const W: usize = 96;
    let mut buf = vec![0u8; 3 * W];
    for (i, s) in mine.iter().enumerate() {
        let b = s.as_bytes();
        buf[i * W..i * W + b.len().min(W)].copy_from_slice(&b[..b.len().min(W)]);
    }
    let mut all = vec![0u8; 3 * W * cluster.world_size];
    cluster.world().all_gather_into(&buf[..], &mut all[..]);
    let field = |c: &[u8]| String::from_utf8_lossy(c).trim_end_matches('\0').to_string();
    all.chunks(3 * W).enumerate().map(|(r, c)| crate::results::DeviceInfo { world_rank: r as u32, name: field(&c[..W]), uuid: field(&c[W..2 * W]), pci_bus_id: field(&c[2 * W..]) }).collect()
}

fn cpu_facts(job: &JobSpec, cluster: &Cluster) -> LaunchFacts {
    let budget = job.run.memory_budget_gib.map(|g| (g * GIB) as u64).unwrap_or(memory_total_bytes() / cluster.max_local_ranks.max(1) as u64);
    LaunchFacts { world_size: cluster.world_size, max_local_ranks: cluster.max_local_ranks, visible_gpus: None, memory_budget_bytes: budget, elem_bytes: 4 }
}

/// Validates on every rank (deterministic), reporting once.
fn validate_launch(job: &JobSpec, facts: &LaunchFacts, cluster: &Cluster) -> Result<ModelConfig, Exit> {
    spec::validate(job, facts).map_err(|e| {
        if cluster.rank == 0 {
            eprintln!("fapool: {e}");
        }
        Exit::Usage
    })
}

/// All ranks agree on a rank-0 decision.
fn agree(world: &mpi::topology::SimpleCommunicator, ok_on_root: bool) -> bool {
    let mut flag = [ok_on_root as u8];
    world.process_at_rank(0).broadcast_into(&mut flag[..]);
    flag[0] == 1
}

fn gather_roles<B: Backend>(world: &Group, s: &dyn Strategy<B>) -> Vec<String> {
    const W: usize = 32;
    let mut mine = [0u8; W];
    let r = s.role();
    mine[..r.len().min(W)].copy_from_slice(&r.as_bytes()[..r.len().min(W)]);
    let mut all = vec![0u8; W * world.size()];
    world.comm.all_gather_into(&mine[..], &mut all[..]);
    all.chunks(W).map(|c| String::from_utf8_lossy(c).trim_end_matches('\0').to_string()).collect()
}

/// Options of `fapool run`.
pub struct RunArgs {
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub force: bool,
    pub backend: Option<BackendKind>,
    pub timeout_s: f64,
}

/// `fapool run`.
pub fn run(job_path: &Path, args: RunArgs, sets: &[String]) -> Exit {
    let (job, text) = match load(job_path, sets) {
        Ok(j) => j,
        Err(e) => return e,
    };
    if args.resume.is_some() && (args.out.is_some() || args.force) {
        eprintln!("fapool: --resume continues an existing file; it takes neither --out nor --force");
        return Exit::Usage;
    }
    crate::control::install_stop_signals();
    let cluster = match start_mpi() {
        Ok(c) => c,
        Err(e) => return e,
    };
    let kind = match choose_backend(args.backend.unwrap_or(job.run.backend), &cluster) {
        Ok(k) => k,
        Err(e) => return e,
    };
    let path = args.resume.clone().or(args.out.clone()).unwrap_or_else(|| PathBuf::from(format!("results/{}-{}.h5", job.run.name, crate::results::utc_now().replace([':', '-'], ""))));
    let target = Target { path, resume: args.resume.is_some(), force: args.force };
    match kind {
        Chosen::Cpu => {
            let facts = cpu_facts(&job, &cluster);
            let slow = SlowMeter::from_env();
            let meter = slow.as_ref().map(|m| m as &dyn EnergyMeter);
            run_on(&CpuBackend::new(), Box::new(MpiTransport), &cluster, &job, &text, &target, &facts, meter, args.timeout_s, Vec::new(), None)
        }
        Chosen::Cuda(report) => {
            let (be, nvml, facts) = match start_cuda(&job, &cluster, &report) {
                Ok(x) => x,
                Err(e) => return e,
            };
            let mine = [be.device_name().unwrap_or_default(), nvml.as_ref().map(|n| n.0.uuid().to_string()).unwrap_or_default(), be.pci_bus_id().unwrap_or_default()];
            let devices = gather_devices(&cluster, mine);
            let versions = (report.nvrtc_version.clone(), report.nccl_version.clone(), nvml.as_ref().map(|n| n.0.driver_version().to_string()));
            let meter = nvml.as_ref().map(|n| n as &dyn EnergyMeter);
            run_on(&be, Box::new(crate::comm::nccl_transport::NcclTransport::new()), &cluster, &job, &text, &target, &facts, meter, args.timeout_s, devices, Some(versions))
        }
    }
}

/// Where results go.
struct Target {
    path: PathBuf,
    resume: bool,
    force: bool,
}

/// Rank 0's side of the results file: every completed batch is made durable
/// before the next starts, by appending to a copy and renaming it over the
/// file (a rename is atomic, so a kill at any moment leaves either the old
/// or the new complete file, never a torn one).
#[derive(Clone)]
struct Durable {
    path: PathBuf,
    /// Held while the file is being rewritten (the watchdog writes from its own thread).
    io: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Durable {
    fn tmp(&self) -> PathBuf {
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".partial");
        self.path.with_file_name(name)
    }

    fn create(path: &Path, prov: &crate::results::Provenance) -> Result<Self, String> {
        let d = Self { path: path.to_path_buf(), io: Default::default() };
        let tmp = d.tmp();
        let _ = std::fs::remove_file(&tmp);
        drop(crate::results::ResultsFile::create(&tmp, true, prov).map_err(|e| e.to_string())?);
        d.commit()?;
        Ok(d)
    }

    fn open(path: &Path) -> Self {
        Self { path: path.to_path_buf(), io: Default::default() }
    }

    fn update<T>(&self, f: impl FnOnce(&mut crate::results::ResultsFile) -> crate::results::Result<T>) -> Result<T, String> {
        let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = self.tmp();
        std::fs::copy(&self.path, &tmp).map_err(|e| format!("copying {}: {e}", self.path.display()))?;
        let out = {
            let mut file = crate::results::ResultsFile::open_existing(&tmp).map_err(|e| e.to_string())?;
            let out = f(&mut file).map_err(|e| e.to_string())?;
            file.flush().map_err(|e| e.to_string())?;
            out
        };
        self.commit()?;
        Ok(out)
    }

    fn commit(&self) -> Result<(), String> {
        let tmp = self.tmp();
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
        }
        Ok(())
    }
}

/// Progress on rank 0: a bar on a terminal, plain lines in a log file.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    tokens: u64,
}

impl Progress {
    fn new(total_batches: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total_batches);
            b.set_style(indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} batches {msg} ETA {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            b
        });
        Self { bar, started: std::time::Instant::now(), tokens: 0 }
    }

    fn batch_done(&mut self, strategy: &str, category: &str, done: u64, total: u64, tokens: u64) {
        self.tokens += tokens;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.tokens as f64 / secs;
        let eta = secs / done.max(1) as f64 * (total.saturating_sub(done)) as f64;
        match &self.bar {
            Some(b) => {
                b.set_prefix(format!("{strategy} {category}"));
                b.set_message(format!("{rate:.0} tok/s"));
                b.set_position(done);
            }
            None => println!("progress: {strategy} {category} batch {done}/{total} {rate:.0} tok/s ETA {eta:.0} s"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_on<'a, B: Backend>(
    be: &'a B,
    transport: Box<dyn Transport<B> + 'a>,
    cluster: &Cluster,
    job: &JobSpec,
    text: &str,
    target: &Target,
    facts: &LaunchFacts,
    energy: Option<&dyn EnergyMeter>,
    timeout_s: f64,
    devices: Vec<crate::results::DeviceInfo>,
    versions: Option<(Option<String>, Option<String>, Option<String>)>,
) -> Exit {
    let cfg = match validate_launch(job, facts, cluster) {
        Ok(m) => m,
        Err(e) => return e,
    };
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
    if let Some(p) = &problem {
        eprintln!("fapool: {p}");
    }
    if !agree(&cluster.world(), problem.is_none()) {
        return Exit::Usage;
    }
    let (comm, world) = match world_comm(be, transport, cluster) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("fapool: rank {}: {e}", cluster.rank);
            return Exit::Mpi;
        }
    };
    let fault = crate::control::Fault::from_env();
    let wl = Workload::new(&job.workload, cfg.vocab);
    // The run's batches in order: (strategy, category, batch).
    let mut plan: Vec<(usize, usize, crate::workload::Batch)> = Vec::new();
    for si in 0..job.strategies.len() {
        for c in 0..job.workload.categories.len() {
            plan.extend(wl.batches(c).into_iter().map(|b| (si, c, b)));
        }
    }
    // Rank 0 opens the file (and learns what a resumed run already holds).
    let mut file = None;
    let mut done = vec![0u8; plan.len()];
    if root {
        let opened = if target.resume {
            let d = Durable::open(path);
            d.update(|f| {
                for (i, (si, c, b)) in plan.iter().enumerate() {
                    let completed = f.completed_batches(&job.strategies[*si].name(), &job.workload.categories[*c].name).unwrap_or_default();
                    done[i] = completed.contains(&(b.index as u32)) as u8;
                }
                f.set_status(crate::results::RunStatus::Running, None)
            })
            .map(|_| d)
        } else {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::create_dir_all(dir);
            }
            let mut prov = provenance(job, text, cluster, be.name(), comm.transport_name());
            prov.devices = devices.clone();
            if let Some((cuda, nccl, driver)) = versions.clone() {
                (prov.cuda_version, prov.nccl_version, prov.driver_version) = (cuda, nccl, driver);
            }
            Durable::create(path, &prov)
        };
        match opened {
            Ok(d) => file = Some(d),
            Err(e) => eprintln!("fapool: {e}"),
        }
    }
    if !agree(&cluster.world(), !root || file.is_some()) {
        return Exit::Failure;
    }
    world.comm.process_at_rank(0).broadcast_into(&mut done[..]);
    // The batch in flight, for the watchdog to mark in the file if it fires.
    let current: std::sync::Arc<std::sync::Mutex<Option<(String, String, u32)>>> = Default::default();
    let watchdog = (timeout_s > 0.0).then(|| {
        let (file, current) = (file.clone(), current.clone());
        crate::control::Watchdog::start(std::time::Duration::from_secs_f64(timeout_s), cluster.rank, move || {
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
    let finish = |file: &Option<Durable>, status: crate::results::RunStatus| {
        if let Some(d) = file {
            if let Err(e) = d.update(|f| f.set_status(status, Some(&crate::results::utc_now()))) {
                eprintln!("fapool: {e}");
            }
        }
    };
    let mut i = 0;
    for (si, sspec) in job.strategies.iter().enumerate() {
        let mut strategy = match build_strategy(be, &comm, &cfg, sspec, &world) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("fapool: rank {}: building {}: {e}", cluster.rank, sspec.name());
                return Exit::Failure;
            }
        };
        let roles = gather_roles(&world, strategy.as_ref());
        if let Some(d) = &file {
            let info = crate::results::StrategyInfo {
                name: sspec.name(),
                kind: sspec.kind().into(),
                params: toml::to_string(sspec).unwrap_or_default(),
                world_ranks_used: roles.iter().enumerate().filter(|(_, r)| r.as_str() != "idle").map(|(i, _)| i as u32).collect(),
            };
            if let Err(e) = d.update(|f| f.begin_strategy(&info)) {
                eprintln!("fapool: {e}");
            }
        }
        for (c, cat) in job.workload.categories.iter().enumerate() {
            // Warm-up: the category's first and last pending batches (its
            // shortest and longest sequences, so a pool the category activates
            // is warmed too), unrecorded, with two output tokens.
            let pending: Vec<usize> = (i..plan.len()).take_while(|&k| plan[k].0 == si && plan[k].1 == c).filter(|&k| done[k] == 0).collect();
            let mut warm: Vec<usize> = pending.first().into_iter().chain(pending.last()).copied().collect();
            warm.dedup();
            for k in warm.into_iter().filter(|_| job.run.warmup) {
                let mut shape = shape_of(&plan[k].2, job);
                shape.out_tokens = shape.out_tokens.min(2);
                let prompts = wl.batch_prompts(&plan[k].2);
                let cap = crate::memory::max_sequences(&cfg, sspec, shape.seq_len, shape.out_tokens, cluster.world_size, facts.elem_bytes, facts.memory_budget_bytes, shape.nseq);
                if let Err(e) = run_batch(be, &comm, strategy.as_mut(), shape, &prompts, cap, true, false, None, None, job.run.cuda_graphs) {
                    eprintln!("fapool: rank {}: warm-up of {} {}: {e}", cluster.rank, sspec.name(), cat.name);
                    return Exit::Failure;
                }
                world.comm.barrier();
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
                world.comm.all_reduce_into(&(crate::control::stop_requested() as u8), &mut stop, mpi::collective::SystemOperation::max());
                if stop > 0 {
                    if root {
                        eprintln!("fapool: stop requested; {} marked interrupted, resume with --resume", path.display());
                        finish(&file, crate::results::RunStatus::Interrupted);
                    }
                    return Exit::Interrupted;
                }
                if done[global as usize] == 1 {
                    continue;
                }
                if let Ok(mut cur) = current.lock() {
                    *cur = Some((sspec.name(), cat.name.clone(), b.index as u32));
                }
                let usable = fault.map(|f| f.apply(cluster.rank, global)).unwrap_or(true);
                let mut all_usable = 0u8;
                world.comm.all_reduce_into(&(usable as u8), &mut all_usable, mpi::collective::SystemOperation::min());
                let shape = shape_of(b, job);
                let prompts = wl.batch_prompts(b);
                let cap = crate::memory::max_sequences(&cfg, sspec, shape.seq_len, shape.out_tokens, cluster.world_size, facts.elem_bytes, facts.memory_budget_bytes, shape.nseq);
                let est = crate::memory::busiest_rank_bytes(&cfg, sspec, shape.seq_len, cap.min(shape.nseq), shape.out_tokens, cluster.world_size, facts.elem_bytes);
                world.comm.barrier();
                let r = match run_batch(be, &comm, strategy.as_mut(), shape, &prompts, cap, all_usable == 1, false, None, energy, job.run.cuda_graphs) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("fapool: rank {}: {} {} batch {}: {e}", cluster.rank, sspec.name(), cat.name, b.index);
                        if let Some(d) = &file {
                            let _ = d.update(|f| f.mark_failed_batch(&sspec.name(), &cat.name, b.index as u32, &e.to_string(), &crate::results::utc_now()));
                        }
                        return Exit::Failure;
                    }
                };
                let flops = crate::runner::batch_flops(&cfg, shape);
                if let Some(g) = gather_batch(be, &world, strategy.as_ref(), &r, b, shape, job.workload.batch_size, flops, est, &roles) {
                    if let Some(d) = &file {
                        if let Err(e) = d.update(|f| f.append_batch(&sspec.name(), &cat.name, &g.batch, &g.ranks)) {
                            eprintln!("fapool: {e}");
                            return Exit::Failure;
                        }
                    }
                    if let Some(p) = progress.as_mut() {
                        p.batch_done(&sspec.name(), &cat.name, i as u64, plan.len() as u64, g.batch.total_tokens());
                    }
                }
            }
            if let Some(d) = &file {
                let name = sspec.name();
                let summary = d.update(|f| {
                    let records = f.batches(&name, &cat.name)?;
                    let wall: f64 = records.iter().map(|r| r.e2e_s).sum();
                    let summary = CategorySummary::from_batches(&records, wall);
                    f.write_summary(&name, &cat.name, &summary)?;
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
    finish(&file, crate::results::RunStatus::Complete);
    if root {
        println!("results: {}", path.display());
    }
    Exit::Ok
}

fn git_commit() -> String {
    option_env!("FAPOOL_GIT_COMMIT").unwrap_or("unknown").to_string()
}

fn provenance(job: &JobSpec, text: &str, cluster: &Cluster, backend: &str, transport: &str) -> crate::results::Provenance {
    crate::results::Provenance {
        schema_version: crate::results::SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: git_commit(),
        job_toml: text.into(),
        argv: std::env::args().collect(),
        hosts: cluster.hosts.clone(),
        world_size: cluster.world_size as u32,
        backend: backend.into(),
        transport: transport.into(),
        mpi_library: cluster.mpi_library.clone(),
        slurm: std::env::vars().filter(|(k, _)| k.starts_with("SLURM_") && (k.ends_with("_ID") || k.contains("NODELIST") || k.contains("NTASKS"))).collect(),
        seeds: crate::results::Seeds { workload: job.workload.seed, weights: job.model.resolve().map(|m| m.weights_seed).unwrap_or(0) },
        started_utc: crate::results::utc_now(),
        categories: job.workload.categories.iter().map(|c| c.name.clone()).collect(),
        roles: job
            .strategies
            .iter()
            .flat_map(|s| {
                (0..cluster.world_size).map(move |r| crate::results::RoleRow {
                    world_rank: r as u32,
                    host: cluster.hosts[r].clone(),
                    local_rank: cluster.local_ranks[r] as u32,
                    strategy: s.name(),
                    role: crate::strategy::role_of(s, r, cluster.world_size),
                })
            })
            .collect(),
        ..Default::default()
    }
}

/// `fapool verify`: every strategy against the single-rank model.
pub fn verify(job_path: &Path, backend: Option<BackendKind>, sets: &[String], tolerance: f64, teacher_forcing: bool, max_batches: usize) -> Exit {
    let (job, _) = match load(job_path, sets) {
        Ok(j) => j,
        Err(e) => return e,
    };
    let cluster = match start_mpi() {
        Ok(c) => c,
        Err(e) => return e,
    };
    match choose_backend(backend.unwrap_or(job.run.backend), &cluster) {
        Err(e) => e,
        Ok(Chosen::Cpu) => {
            let facts = cpu_facts(&job, &cluster);
            verify_on(&CpuBackend::new(), Box::new(MpiTransport), &cluster, &job, &facts, tolerance, teacher_forcing, max_batches)
        }
        Ok(Chosen::Cuda(report)) => {
            let (be, _, facts) = match start_cuda(&job, &cluster, &report) {
                Ok(x) => x,
                Err(e) => return e,
            };
            verify_on(&be, Box::new(crate::comm::nccl_transport::NcclTransport::new()), &cluster, &job, &facts, tolerance, teacher_forcing, max_batches)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn verify_on<'a, B: Backend>(be: &'a B, transport: Box<dyn Transport<B> + 'a>, cluster: &Cluster, job: &JobSpec, facts: &LaunchFacts, tolerance: f64, teacher: bool, max_batches: usize) -> Exit {
    let cfg = match validate_launch(job, facts, cluster) {
        Ok(m) => m,
        Err(e) => return e,
    };
    let (comm, world) = match world_comm(be, transport, cluster) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("fapool: {e}");
            return Exit::Mpi;
        }
    };
    let reference_spec = StrategySpec::Baseline(BaselineSpec { name: Some("single-rank".into()), tp: 1, pp: 1, micro_batches: 1 });
    let build = |s: &StrategySpec| build_strategy(be, &comm, &cfg, s, &world);
    let mut reference = match build(&reference_spec) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fapool: {e}");
            return Exit::Failure;
        }
    };
    let mut strategies = Vec::new();
    for s in &job.strategies {
        match build(s) {
            Ok(b) => {
                let roles = gather_roles(&world, b.as_ref());
                strategies.push((s.clone(), b, roles));
            }
            Err(e) => {
                eprintln!("fapool: {e}");
                return Exit::Failure;
            }
        }
    }
    let roles_ref = gather_roles(&world, reference.as_ref());
    let wl = Workload::new(&job.workload, cfg.vocab);
    let root = cluster.rank == 0;
    let mut failures = 0;
    if root {
        println!("{:<30} {:<10} {:>5} {:>6} {:>5} {:>4} {:>12} {:>7} {:>6}", "strategy", "category", "batch", "seqlen", "nseq", "pool", "max rel err", "tokens", "result");
    }
    for (c, cat) in job.workload.categories.iter().enumerate() {
        for b in wl.batches(c).into_iter().take(max_batches) {
            let shape = shape_of(&b, job);
            let prompts = wl.batch_prompts(&b);
            let run = |s: &mut dyn Strategy<B>, forced: Option<&[u32]>, roles: &[String]| {
                world.comm.barrier();
                let r = run_batch(be, &comm, s, shape, &prompts, shape.nseq, true, true, forced, None, job.run.cuda_graphs)?;
                Ok::<_, crate::strategy::StrategyError>(gather_batch(be, &world, s, &r, &b, shape, shape.nseq, 0.0, 0, roles))
            };
            let reference_out = match run(reference.as_mut(), None, &roles_ref) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("fapool: rank {}: reference: {e}", cluster.rank);
                    return Exit::Failure;
                }
            };
            // The single-rank model against a cache-free recomputation (CPU, first batch of each category).
            if let (Some(r), true, 0) = (reference_out.as_ref(), be.name() == "cpu", b.index) {
                let naive = crate::strategy::naive::generate_logits(&cfg, &prompts, shape.nseq, shape.seq_len, &r.batch.tokens, shape.out_tokens);
                let err = naive.map(|n| worst_error(n.iter().zip(&r.logits).map(|(a, b)| relative_l2(b, a)))).unwrap_or(f64::INFINITY);
                let pass = err <= tolerance;
                failures += usize::from(!pass);
                println!(
                    "{:<30} {:<10} {:>5} {:>6} {:>5} {:>4} {:>12.3e} {:>7} {:>6}",
                    "single-rank-vs-no-cache",
                    cat.name,
                    b.index,
                    shape.seq_len,
                    shape.nseq,
                    0,
                    err,
                    "-",
                    if pass { "ok" } else { "FAIL" }
                );
            }
            // Reference tokens to every rank (the strategies' leaders need them to force).
            let mut ref_tokens = reference_out.as_ref().map(|g| g.batch.tokens.clone()).unwrap_or_else(|| vec![0; shape.nseq * shape.out_tokens]);
            world.comm.process_at_rank(0).broadcast_into(&mut ref_tokens[..]);
            for (spec, s, roles) in strategies.iter_mut() {
                let forced = teacher.then_some(&ref_tokens[..]);
                let g = match run(s.as_mut(), forced, roles) {
                    Ok(g) => g,
                    Err(e) => {
                        eprintln!("fapool: rank {}: {}: {e}", cluster.rank, spec.name());
                        return Exit::Failure;
                    }
                };
                if let (Some(g), Some(r)) = (g, reference_out.as_ref()) {
                    let err = worst_error(g.logits.iter().zip(&r.logits).map(|(a, b)| relative_l2(a, b)));
                    let steps_ok = g.logits.len() == r.logits.len();
                    let tokens_ok = g.batch.tokens == r.batch.tokens;
                    let pass = steps_ok && err <= tolerance && (teacher || tokens_ok);
                    if !pass {
                        failures += 1;
                    }
                    println!(
                        "{:<30} {:<10} {:>5} {:>6} {:>5} {:>4} {:>12.3e} {:>7} {:>6}",
                        spec.name(),
                        cat.name,
                        b.index,
                        shape.seq_len,
                        shape.nseq,
                        g.batch.pool_effective,
                        err,
                        if tokens_ok { "same" } else { "DIFFER" },
                        if pass { "ok" } else { "FAIL" }
                    );
                }
            }
        }
    }
    let mut total = [failures as u64];
    world.comm.process_at_rank(0).broadcast_into(&mut total[..]);
    if total[0] > 0 {
        if root {
            eprintln!("fapool: {} comparisons failed", total[0]);
        }
        return Exit::WrongResult;
    }
    if root {
        println!("all strategies reproduce the single-rank model");
    }
    Exit::Ok
}

/// `fapool analyze`.
pub fn analyze(files: &[PathBuf]) -> Exit {
    match crate::analyze::analyze(files, &mut std::io::stdout().lock()) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            eprintln!("fapool: {e}");
            Exit::Failure
        }
    }
}

/// `fapool env`.
pub fn env() -> Exit {
    let cluster = match start_mpi() {
        Ok(c) => c,
        Err(e) => return e,
    };
    if cluster.rank == 0 {
        println!("MPI library:      {}", cluster.mpi_library);
        println!("world size:       {}", cluster.world_size);
        println!("hosts:            {:?}", cluster.hosts);
        println!("node-local ranks: {:?} (max {} per node)", cluster.local_ranks, cluster.max_local_ranks);
        println!("memory per node:  {:.1} GiB", memory_total_bytes() as f64 / GIB);
        for line in crate::backend::cuda::probe::probe_cuda_libraries().lines() {
            println!("{line}");
        }
        match crate::energy::GpuMonitor::new("") {
            Err(e) => println!("NVML: {e}"),
            Ok(_) => println!("NVML: available"),
        }
    }
    Exit::Ok
}

/// `fapool check-gpu`: every CUDA kernel against its reference definition.
pub fn check_gpu(dtype: &str, seed: u64) -> Exit {
    use crate::backend::Dtype;
    let dtypes = match dtype {
        "all" => vec![Dtype::Bf16, Dtype::Fp16, Dtype::Fp32],
        "bf16" => vec![Dtype::Bf16],
        "fp16" => vec![Dtype::Fp16],
        "fp32" => vec![Dtype::Fp32],
        other => {
            eprintln!("fapool: --dtype {other}: expected bf16, fp16, fp32 or all");
            return Exit::Usage;
        }
    };
    if let Err(why) = crate::backend::cuda::probe::cuda_backend_libraries_present() {
        eprintln!("fapool: the CUDA backend cannot run here: {why}");
        return Exit::Cuda;
    }
    let mut pass = true;
    for d in dtypes {
        let be = match crate::backend::cuda::CudaBackend::new(0, d) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("fapool: {e}");
                return Exit::Cuda;
            }
        };
        println!("{} ({d})", be.device_name().unwrap_or_default());
        pass &= crate::checks::print_table(&crate::checks::run_all(&be, seed));
    }
    if pass {
        Exit::Ok
    } else {
        Exit::WrongResult
    }
}

/// `fapool bench kernels`.
pub fn bench_kernels(dtype: crate::backend::Dtype, seq: &[usize], iters: usize, out: Option<&Path>) -> Exit {
    if let Err(why) = crate::backend::cuda::probe::cuda_backend_libraries_present() {
        eprintln!("fapool: bench kernels needs a GPU: {why}");
        return Exit::Cuda;
    }
    let be = match crate::backend::cuda::CudaBackend::new(0, dtype) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("fapool: {e}");
            return Exit::Cuda;
        }
    };
    let rows = match crate::bench::kernels::run(&be, seq, iters) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fapool: {e}");
            return Exit::Cuda;
        }
    };
    let device = be.device_name().unwrap_or_default();
    println!("{device}, {dtype}");
    crate::bench::print_table(&rows);
    if let Some(p) = out {
        if let Err(e) = crate::bench::write_h5(p, "kernels", &device, &rows) {
            eprintln!("fapool: writing {}: {e}", p.display());
            return Exit::Failure;
        }
    }
    Exit::Ok
}

/// `fapool bench comm` (under mpirun).
pub fn bench_comm(backend: Option<BackendKind>, dtype: crate::backend::Dtype, sizes_mib: &[usize], iters: usize, out: Option<&Path>) -> Exit {
    let cluster = match start_mpi() {
        Ok(c) => c,
        Err(e) => return e,
    };
    let sizes: Vec<usize> = sizes_mib.iter().map(|m| m << 20).collect();
    fn go<'a, B: Backend>(be: &'a B, t: Box<dyn Transport<B> + 'a>, cluster: &Cluster, sizes: &[usize], iters: usize, out: Option<&Path>, device: &str) -> Exit {
        let (comm, world) = match world_comm(be, t, cluster) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("fapool: {e}");
                return Exit::Mpi;
            }
        };
        match crate::bench::comm::run(be, &comm, &world, sizes, 3, iters) {
            Ok(rows) if cluster.rank == 0 => {
                println!("{} ranks, {} transport, {device}", cluster.world_size, comm.transport_name());
                crate::bench::print_table(&rows);
                if let Some(p) = out {
                    if let Err(e) = crate::bench::write_h5(p, "comm", device, &rows) {
                        eprintln!("fapool: writing {}: {e}", p.display());
                        return Exit::Failure;
                    }
                }
                Exit::Ok
            }
            Ok(_) => Exit::Ok,
            Err(e) => {
                eprintln!("fapool: rank {}: {e}", cluster.rank);
                Exit::Nccl
            }
        }
    }
    match choose_backend(backend.unwrap_or(BackendKind::Auto), &cluster) {
        Err(e) => e,
        Ok(Chosen::Cpu) => go(&CpuBackend::new(), Box::new(MpiTransport), &cluster, &sizes, iters, out, "cpu"),
        Ok(Chosen::Cuda(_)) => {
            let be = match crate::backend::cuda::CudaBackend::new(cluster.local_rank, dtype) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("fapool: {e}");
                    return Exit::Cuda;
                }
            };
            let device = be.device_name().unwrap_or_default();
            go(&be, Box::new(crate::comm::nccl_transport::NcclTransport::new()), &cluster, &sizes, iters, out, &device)
        }
    }
}
