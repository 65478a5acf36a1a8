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
    let rows = crate::gpu_checks::bench_kernels(&be, seq, iters).map_err(|e| Failure::new(Exit::Cuda, e.to_string()))?;
    let rows: Vec<crate::bench::Row> =
        rows.into_iter().map(|r| crate::bench::Row { what: r.what, shape: r.shape, median_ms: r.median_ms, figure: r.figure, unit: r.unit.into(), busbw_gbs: f64::NAN }).collect();
    let device = be.device_name().unwrap_or_default();
    println!("{device}, {dtype}");
    crate::bench::print_table(&rows);
    if let Some(p) = out {
        crate::bench::write_h5(p, "kernels", &device, &rows).map_err(|e| Failure::new(Exit::Failure, format!("writing {}: {e}", p.display())))?;
    }
    Ok(())
}

struct CommBody {
    sizes: Vec<usize>,
    iters: usize,
    out: Option<PathBuf>,
}

impl OnBackend for CommBody {
    fn run<B: Backend>(self, cluster: &Cluster, launch: Launch<'_, B>) -> Result<(), Failure> {
        let device = launch.devices.first().map(|d| d.name.clone()).unwrap_or_else(|| "cpu".into());
        let rows = crate::bench::bench_comm(launch.be, &launch.comm, &launch.world, &self.sizes, 3, self.iters).map_err(|e| Failure::new(Exit::Nccl, format!("rank {}: {e}", cluster.rank)))?;
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
    planner::execute::prefer_fresh_pages_for_large_allocations();
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
