//! `fapool calibrate --out cal.h5`: one calibration file for the planner,
//! measured on this rank's backend: rank 0 measures compute alone; with
//! `--comm` every rank then runs contention probes at once (how much ranks
//! sharing a node slow each other) and joins the message measurements.
//! Rank 0 writes the file.

use super::{load, start_mpi, with_backend, BackendRequest, Failure, Launch, OnBackend};
use crate::backend::{Backend, BackendKind, Dtype};
use crate::cluster::Cluster;
use crate::exit::Exit;
use crate::model::ModelConfig;
use crate::planner::calibrate::{contention, contention_probes, loop_overhead, measure_comm, measure_compute, sequence_overhead, Grid};
use mpi::traits::*;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `fapool calibrate`.
#[derive(Clone, Debug)]
pub struct CalibrateArgs {
    pub out: PathBuf,
    pub backend: Option<BackendKind>,
    pub dtype: Dtype,
    pub comm: bool,
    /// Attention's heads and head_dim, and the cache footprint of the weights, from this job's model.
    pub job: Option<PathBuf>,
}

struct Body {
    args: CalibrateArgs,
    model: Option<ModelConfig>,
    /// The job's prompt lengths (none without `--job`).
    lengths: Vec<usize>,
}

impl OnBackend for Body {
    fn run<B: Backend>(self, cluster: &Cluster, launch: Launch<'_, B>) -> Result<(), Failure> {
        let cpu = launch.be.name() == "cpu";
        let dtype = if cpu { Dtype::Fp32 } else { self.args.dtype };
        let model = self.model.unwrap_or_else(|| if cpu { ModelConfig::tiny() } else { ModelConfig::dense_4l() });
        let grid = if cpu { Grid::cpu() } else { Grid::gpu() }.for_model(&model, dtype.size_bytes()).with_lengths(&self.lengths);
        let root = cluster.rank == 0;
        let started = Instant::now();
        let device = launch.devices.first().map(|d| d.name.clone()).unwrap_or_else(|| "cpu".into());
        let dev_err = |e: &dyn std::fmt::Display| Failure::new(Exit::Cuda, format!("rank {}: calibration: {e}", cluster.rank));
        // Rank 0 measures the tables alone (the others wait without spinning).
        let mut cal = if root {
            let mut say = |what: &str| eprintln!("calibrate: {what} ({:.1} s)", started.elapsed().as_secs_f64());
            let mut c = measure_compute(launch.be, dtype, &grid, model.heads, model.kv_heads, model.head_dim, &mut say).map_err(|e| dev_err(&e))?;
            c.sequence_overhead_s_per_byte = sequence_overhead(launch.be, dtype, &grid, &model).map_err(|e| dev_err(&e))?;
            let lo = loop_overhead(launch.be, dtype, &c, &model).map_err(|e| dev_err(&e))?;
            (c.step_overhead_s, c.record_s, c.record_per_op_s) = (lo.step_s, lo.record_s, lo.record_per_op_s);
            say("decode loop done");
            c
        } else {
            Default::default()
        };
        wait_quietly(cluster);
        if self.args.comm {
            // How much ranks computing at once slow each other (shared
            // cores, caches and memory bandwidth on a CPU; power on a GPU node).
            let probe = || contention_probes(launch.be, &grid, model.heads, model.kv_heads, model.head_dim).map_err(|e| dev_err(&e));
            let alone = if root { probe()? } else { Vec::new() };
            wait_quietly(cluster);
            let together = probe()?;
            wait_quietly(cluster);
            cal.contention = contention(&alone, &together);
            measure_comm(launch.be, &launch.comm, &launch.world, &grid, &mut cal).map_err(|e| Failure::new(Exit::Nccl, format!("rank {}: calibration: {e}", cluster.rank)))?;
            cal.ranks = cluster.world_size;
        }
        if !root {
            return Ok(());
        }
        cal.dtype = dtype;
        cal.backend = launch.be.name().to_string();
        cal.device = device;
        cal.created_utc = crate::results::utc_now();
        cal.write(&self.args.out).map_err(|e| Failure::new(Exit::Failure, format!("writing {}: {e}", self.args.out.display())))?;
        let best = |rows: &[[f64; 4]], work: &dyn Fn(&[f64; 4]) -> f64| rows.iter().map(|r| work(r) / r[3]).fold(0.0, f64::max);
        println!(
            "calibration of {} ({}, {dtype}) in {:.1} s: {} GEMMs (best {:.1} TFLOP/s), {} prefill attention points (best {:.1} TFLOP/s), {} decode points (best {:.2} TB/s), {} bandwidth points, {} message points over {} ranks, sequence overhead {:.3} ns per byte, decode step overhead {:.1} us, recording {:.1} us + {:.2} us per op, contention {:?} -> {}",
            cal.device,
            cal.backend,
            started.elapsed().as_secs_f64(),
            cal.gemm.len(),
            best(&cal.gemm, &|r| 2.0 * r[0] * r[1] * r[2]) / 1e12,
            cal.prefill.len(),
            best(&cal.prefill, &|r| r[2]) / 1e12,
            cal.decode.len(),
            best(&cal.decode, &|r| r[2]) / 1e12,
            cal.bandwidth.values().map(Vec::len).sum::<usize>(),
            cal.comm.values().map(Vec::len).sum::<usize>(),
            cal.ranks,
            cal.sequence_overhead_s_per_byte * 1e9,
            cal.step_overhead_s * 1e6,
            cal.record_s * 1e6,
            cal.record_per_op_s * 1e6,
            cal.contention,
            self.args.out.display()
        );
        Ok(())
    }
}

/// A barrier that sleeps while it waits: a waiting rank that spun (as MPI's
/// barrier does) would take a core from rank 0's compute measurements.
fn wait_quietly(cluster: &Cluster) {
    let mut req = cluster.world().immediate_barrier();
    loop {
        match req.test() {
            Ok(_) => return,
            Err(r) => {
                req = r;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

/// `fapool calibrate` (under mpirun with `--comm`).
pub fn calibrate(args: CalibrateArgs) -> Result<(), Failure> {
    let (model, lengths) = match &args.job {
        Some(p) => {
            let job = load(p, &[])?.0;
            // Each category's shortest and longest prompt (a category may draw from many lengths).
            let lengths = job.workload.categories.iter().map(|c| c.resolved_lengths()).flat_map(|l| [l.iter().min().copied(), l.iter().max().copied()]).flatten().collect();
            (Some(job.model.resolve()?), lengths)
        }
        None => (None, Vec::new()),
    };
    let cluster = start_mpi()?;
    if args.comm && cluster.world_size < 2 {
        return Err(Failure::new(Exit::Usage, "calibrate --comm measures messages between ranks: launch it with mpirun -np 2 or more"));
    }
    let request = BackendRequest { kind: args.backend.unwrap_or(BackendKind::Auto), dtype: args.dtype, job: None };
    with_backend(request, &cluster, Body { args, model, lengths })
}
