//! `fapool bench`: kernels on one GPU, collectives on every rank of the launch.

use super::{start_mpi, with_backend, BackendRequest, Failure, Launch, OnBackend};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BackendKind, Dtype};
use crate::cluster::Cluster;
use crate::exit::Exit;
use std::path::{Path, PathBuf};

/// `fapool bench kernels`.
pub fn kernels(dtype: Dtype, seq: &[usize], iters: usize, out: Option<&Path>) -> Result<(), Failure> {
    if let Err(why) = crate::backend::cuda::probe::cuda_backend_libraries_present() {
        return Err(Failure::new(Exit::Cuda, format!("bench kernels needs a GPU: {why}")));
    }
    let be = CudaBackend::new(0, dtype).map_err(|e| Failure::new(Exit::Cuda, e.to_string()))?;
    let fail = |e: crate::backend::BackendError| Failure::new(super::exit_for_backend(&e), e.to_string());
    let mut rows = crate::bench::kernels::run(&be, seq, iters).map_err(fail)?;
    rows.extend(crate::bench::copies::run(&be, iters).map_err(fail)?);
    let device = be.device_name().unwrap_or_default();
    println!("{device}, {dtype}");
    crate::bench::print_table(&rows);
    if let Some(p) = out {
        crate::bench::write_h5(p, "kernels", &device, &rows).map_err(|e| Failure::new(Exit::Failure, format!("writing {}: {e}", p.display())))?;
    }
    Ok(())
}

/// `fapool bench sides`: FA Pool's base and pool layer work timed apart on
/// one device (CUDA, or the CPU backend with `--backend cpu`).
pub fn sides(backend: BackendKind, dtype: Dtype, preset: &str, args: &crate::bench::sides::SidesArgs, out: Option<&Path>) -> Result<(), Failure> {
    let m = crate::spec::ModelSpec { preset: preset.to_string(), ..Default::default() }.resolve().map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
    if let Some(&c) = args.chunks.iter().find(|&&c| c == 0) {
        return Err(Failure::new(Exit::Usage, format!("rule `chunks-positive` broken: --chunks {c}")));
    }
    if let Some(&s) = args.seq.iter().find(|&&s| s == 0 || args.chunks.iter().any(|&c| c > s)) {
        return Err(Failure::new(Exit::Usage, format!("rule `chunks-within-prompt` broken: --seq {s} is shorter than a chunk count of --chunks (or zero)")));
    }
    let fail = |e: crate::backend::BackendError| Failure::new(super::exit_for_backend(&e), e.to_string());
    let print = |device: &str, dtype: Dtype, rows: &[crate::bench::Row]| -> Result<(), Failure> {
        println!("{device}, {dtype}, {}", m.name);
        crate::bench::print_table(rows);
        if let Some(p) = out {
            crate::bench::write_h5(p, "sides", device, rows).map_err(|e| Failure::new(Exit::Failure, format!("writing {}: {e}", p.display())))?;
        }
        Ok(())
    };
    if backend == BackendKind::Cpu {
        let be = crate::backend::cpu::CpuBackend::new();
        return print("cpu", be.dtype(), &crate::bench::sides::run(&be, &m, args).map_err(fail)?);
    }
    if let Err(why) = crate::backend::cuda::probe::cuda_backend_libraries_present() {
        return Err(Failure::new(Exit::Cuda, format!("bench sides needs a GPU (or --backend cpu): {why}")));
    }
    let be = CudaBackend::new(0, dtype).map_err(|e| Failure::new(Exit::Cuda, e.to_string()))?;
    let rows = crate::bench::sides::run(&be, &m, args).map_err(fail)?;
    print(&be.device_name().unwrap_or_default(), dtype, &rows)
}

/// `fapool bench moe`: one MoE FFN layer on one device (CUDA, or the CPU
/// backend with `--backend cpu`), beside PyTorch's times of the same layer
/// when `reference` (its JSON) is given.
pub fn moe(backend: BackendKind, dtype: Dtype, preset: &str, tokens: &[usize], iters: usize, reference: Option<&Path>, out: Option<&Path>) -> Result<(), Failure> {
    let m = crate::spec::ModelSpec { preset: preset.to_string(), ..Default::default() }.resolve().map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
    if m.experts.is_none() {
        return Err(Failure::new(Exit::Usage, format!("rule `strategy-serves-model` broken: bench moe needs a model with experts; {} has a dense FFN", m.name)));
    }
    let reference = match reference {
        None => Default::default(),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Failure::new(Exit::Usage, format!("cannot read {}: {e}", p.display())))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Failure::new(Exit::Usage, format!("{} is not JSON: {e}", p.display())))?;
            crate::bench::moe::reference_times(&json)
        }
    };
    let args = crate::bench::moe::MoeBenchArgs { tokens: tokens.to_vec(), iters, reference };
    let fail = |e: crate::backend::BackendError| Failure::new(super::exit_for_backend(&e), e.to_string());
    let print = |device: &str, dtype: Dtype, rows: &[crate::bench::Row]| -> Result<(), Failure> {
        println!("{device}, {dtype}, {}", m.name);
        crate::bench::print_table(rows);
        if let Some(p) = out {
            crate::bench::write_h5(p, "moe", device, rows).map_err(|e| Failure::new(Exit::Failure, format!("writing {}: {e}", p.display())))?;
        }
        Ok(())
    };
    if backend == BackendKind::Cpu {
        let be = crate::backend::cpu::CpuBackend::new();
        return print("cpu", be.dtype(), &crate::bench::moe::run(&be, &m, &args).map_err(fail)?);
    }
    if let Err(why) = crate::backend::cuda::probe::cuda_backend_libraries_present() {
        return Err(Failure::new(Exit::Cuda, format!("bench moe needs a GPU (or --backend cpu): {why}")));
    }
    let be = CudaBackend::new(0, dtype).map_err(|e| Failure::new(Exit::Cuda, e.to_string()))?;
    be.load_all_kernels().map_err(fail)?;
    let rows = crate::bench::moe::run(&be, &m, &args).map_err(fail)?;
    print(&be.device_name().unwrap_or_default(), dtype, &rows)
}

struct CommBody {
    sizes: Vec<usize>,
    iters: usize,
    out: Option<PathBuf>,
}

impl OnBackend for CommBody {
    fn run<B: Backend>(self, cluster: &Cluster, launch: Launch<'_, B>) -> Result<(), Failure> {
        let device = launch.devices.first().map(|d| d.name.clone()).unwrap_or_else(|| "cpu".into());
        let rows = crate::bench::comm::run(launch.be, &launch.comm, &launch.world, &self.sizes, 3, self.iters).map_err(|e| {
            let message = format!("rank {}: {e}", cluster.rank);
            super::end_job_on_failure(cluster, Failure::new(super::exit_for(&e.into()), message))
        })?;
        if cluster.rank != 0 {
            return Ok(());
        }
        println!("{} ranks, {} transport, {device}", cluster.world_size, launch.comm.transport_name());
        crate::bench::print_table(&rows);
        if let Some(p) = &self.out {
            crate::bench::write_h5(p, "comm", &device, &rows).map_err(|e| Failure::new(Exit::Failure, format!("writing {}: {e}", p.display())))?;
        }
        Ok(())
    }
}

/// `fapool bench comm` (under mpirun).
pub fn comm(backend: Option<BackendKind>, dtype: Dtype, sizes_mib: &[usize], iters: usize, out: Option<&Path>) -> Result<(), Failure> {
    let cluster = start_mpi()?;
    let sizes = sizes_mib.iter().map(|m| m << 20).collect();
    let request = BackendRequest { kind: backend.unwrap_or(BackendKind::Auto), dtype, job: None };
    with_backend(request, &cluster, CommBody { sizes, iters, out: out.map(Path::to_path_buf) })
}

/// `fapool bench plan`: how long planning an FA Pool deployment of each
/// size in `gpus` takes for one sequence of `seq` tokens (dense-4l, base 8,
/// every other GPU in the pool), against the size of its DAG.
pub fn plan_scale(gpus: &[usize], seq: usize, cluster: Option<&Path>) -> Result<(), Failure> {
    use crate::planner::{self, Planner};
    let largest = gpus.iter().copied().max().unwrap_or(8);
    println!(
        "{:>6} {:>9} {:>6} {:>10} {:>10} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>10}",
        "GPUs", "tokens", "pool", "nodes", "edges", "plan s", "us/node", "record", "dag", "validate", "timeline", "TTFT ms"
    );
    for &n in gpus {
        if n <= 8 {
            return Err(Failure::new(Exit::Usage, format!("bench plan: {n} GPUs leave no pool beside a base of 8")));
        }
        let text = format!(
            "[run]\nbackend = \"cuda\"\n[model]\npreset = \"dense-4l\"\nmax_seq_len = {}\n[workload]\noutput_tokens = 128\n[[strategy]]\nkind = \"fapool\"\nbase = 8\npool_max = {}\ntokens_per_pool_gpu = {}\n",
            seq + 128,
            n - 8,
            seq.div_ceil(n - 8)
        );
        let job = crate::spec::parse_job(&text, &[])?;
        let cfg = job.model.resolve()?;
        let cost = planner::cost_model(&job, cluster, None, largest).map_err(super::plan::failure)?;
        let p = Planner { job: &job, cfg: &cfg, cost: &cost, world: n, decode_steps: 2 };
        let pt = p.point(&job.strategies[0], crate::strategy::BatchShape { nseq: 1, seq_len: seq, out_tokens: 128 }).map_err(super::plan::failure)?;
        let nodes = pt.dag.nodes.len();
        let st = pt.stage_seconds;
        println!(
            "{n:>6} {seq:>9} {:>6} {nodes:>10} {:>10} {:>8.3} {:>8.2} {:>7.3} {:>8.3} {:>8.3} {:>8.3} {:>10.1}",
            pt.prediction.setup.pool_effective,
            pt.dag.edges.len(),
            pt.plan_seconds,
            pt.plan_seconds / nodes as f64 * 1e6,
            st[0],
            st[1],
            st[2],
            st[3],
            pt.prediction.ttft_s * 1e3
        );
    }
    Ok(())
}
