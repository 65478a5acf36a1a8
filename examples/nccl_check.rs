//! Checks the NCCL transport through the communication layer: run under MPI
//! with one rank per GPU (`mpirun -np 2 nccl_check`). Every collective and a
//! ring of point-to-point messages is run in bf16 and f32 on known values and
//! compared on the host; then a 1 GiB all-reduce is timed. Exits 1 on a
//! wrong value, 2 when the CUDA libraries are missing.

use fapool::backend::cuda::{probe, CudaBackend};
use fapool::backend::{Backend, Dtype};
use fapool::comm::nccl_transport::NcclTransport;
use fapool::comm::{Category, Comm};
use mpi::traits::*;

fn expect(what: &str, got: &[f32], want: &[f32]) -> bool {
    let ok = got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() <= 1e-2 * b.abs().max(1.0));
    if !ok {
        eprintln!("{what}: got {:?}... want {:?}...", &got[..got.len().min(6)], &want[..want.len().min(6)]);
    }
    ok
}

fn main() {
    if let Err(why) = probe::cuda_libraries_present() {
        eprintln!("NCCL check cannot run here: {why}");
        std::process::exit(2);
    }
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let local = world.split_shared(world.rank()).rank() as usize;
    let mut ok = true;
    for dtype in [Dtype::Bf16, Dtype::Fp32] {
        let backend = CudaBackend::new(local, dtype).expect("CUDA backend");
        let comm = Comm::new(&backend, Box::new(NcclTransport::new()));
        let world_group = comm.world_group(world.duplicate()).expect("NCCL communicator for the world");
        let n = 1000;
        // all-reduce: rank r contributes r + 1 everywhere.
        let mut x = backend.upload(&vec![(rank + 1) as f32; n]).unwrap();
        comm.all_reduce(Category::TpAllreduce, &world_group, &mut x).unwrap();
        let total = (size * (size + 1) / 2) as f32;
        ok &= expect(&format!("all_reduce {dtype}"), &backend.download(&x).unwrap(), &vec![total; n]);
        // all-gather: rank r contributes r.
        let mine = backend.upload(&vec![rank as f32; n]).unwrap();
        let all = comm.all_gather(Category::KvReplication, &world_group, &mine).unwrap();
        let want: Vec<f32> = (0..size).flat_map(|r| vec![r as f32; n]).collect();
        ok &= expect(&format!("all_gather {dtype}"), &backend.download(&all).unwrap(), &want);
        // broadcast from the last rank.
        let root = size - 1;
        let mut b = backend.upload(&vec![if rank == root { 7.0 } else { -1.0 }; n]).unwrap();
        comm.broadcast(Category::AttentionSync, &world_group, root, &mut b).unwrap();
        ok &= expect(&format!("broadcast {dtype}"), &backend.download(&b).unwrap(), &vec![7.0; n]);
        // f32 log-sum-exp buffers travel as f32 whatever the model dtype.
        let mut lse = backend.zeros_f32(n).unwrap();
        if rank == 0 {
            lse = backend.upload_f32(&vec![1.25; n]).unwrap();
        }
        comm.broadcast(Category::ResultAggregation, &world_group, 0, &mut lse).unwrap();
        ok &= expect("broadcast f32 lse", &backend.download(&lse).unwrap(), &vec![1.25; n]);
        // A chain 0 -> 1 -> ... -> size-1 of point-to-point messages.
        if size > 1 {
            if rank > 0 {
                let got = comm.recv(Category::PpP2p, &world_group, rank - 1, n).unwrap();
                ok &= expect(&format!("recv {dtype}"), &backend.download(&got).unwrap(), &vec![(rank - 1) as f32; n]);
            }
            if rank + 1 < size {
                comm.send(Category::PpP2p, &world_group, rank + 1, &backend.upload(&vec![rank as f32; n]).unwrap()).unwrap();
            }
        }
        backend.synchronize().unwrap();
        // Bus bandwidth of a 1 GiB all-reduce (nccl-tests' definition).
        if dtype == Dtype::Bf16 && size > 1 {
            let elems = (1usize << 30) / 2;
            let mut big = backend.random_uniform(dtype, elems, rank as u64, 1.0).unwrap();
            for _ in 0..3 {
                comm.all_reduce(Category::TpAllreduce, &world_group, &mut big).unwrap();
            }
            comm.take_stats().unwrap();
            let iters = 10;
            for _ in 0..iters {
                comm.all_reduce(Category::TpAllreduce, &world_group, &mut big).unwrap();
            }
            let stats = comm.take_stats().unwrap();
            let s = stats[&Category::TpAllreduce];
            let algbw = s.bytes as f64 / s.seconds / 1e9;
            let busbw = algbw * 2.0 * (size - 1) as f64 / size as f64;
            if rank == 0 {
                println!("all_reduce 1 GiB bf16 x {iters}: {:.3} ms each, algbw {algbw:.0} GB/s, busbw {busbw:.0} GB/s", s.seconds / iters as f64 * 1e3);
            }
        }
    }
    let mut all_ok = 0i32;
    world.all_reduce_into(&(ok as i32), &mut all_ok, mpi::collective::SystemOperation::min());
    if rank == 0 {
        println!("NCCL transport check on {size} ranks: {}", if all_ok == 1 { "ok" } else { "FAILED" });
    }
    std::process::exit(if all_ok == 1 { 0 } else { 1 });
}
