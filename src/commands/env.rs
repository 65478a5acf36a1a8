//! `fapool env`: what fapool finds — MPI, ranks, hosts, node-local ranks,
//! the CUDA driver, NVRTC, cuBLAS, NCCL and NVML, and the visible GPUs.

use super::{memory_total_bytes, start_mpi, Failure, GIB};

/// `fapool env`.
pub fn env() -> Result<(), Failure> {
    let cluster = start_mpi()?;
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
    Ok(())
}
