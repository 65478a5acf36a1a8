//! Cluster roles: MPI start-up, the world, node-local ranks and hosts.
//!
//! Strategies split their own groups from the world through the comm layer;
//! this module only knows where each rank runs.

use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

/// Where this rank runs, and where the others do.
pub struct Cluster {
    pub universe: Universe,
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the ranks of this node (binds the GPU).
    pub local_rank: usize,
    pub local_size: usize,
    /// Most ranks any node holds.
    pub max_local_ranks: usize,
    /// Host of every world rank.
    pub hosts: Vec<String>,
    /// Node-local rank of every world rank.
    pub local_ranks: Vec<usize>,
    pub mpi_library: String,
}

const HOST_BYTES: usize = 64;

impl Cluster {
    /// Starts MPI (once per process) and learns the layout.
    pub fn init() -> Result<Self, String> {
        let universe = mpi::initialize().ok_or_else(|| "MPI was already initialized".to_string())?;
        Self::abort_on_panic();
        let world = universe.world();
        let (rank, world_size) = (world.rank() as usize, world.size() as usize);
        let local = world.split_shared(world.rank());
        let (local_rank, local_size) = (local.rank() as usize, local.size() as usize);
        let mut max_local = 0u64;
        world.all_reduce_into(&(local_size as u64), &mut max_local, mpi::collective::SystemOperation::max());
        let host = mpi::environment::processor_name().unwrap_or_else(|_| "unknown".into());
        let mut mine = [0u8; HOST_BYTES];
        let hb = host.as_bytes();
        mine[..hb.len().min(HOST_BYTES)].copy_from_slice(&hb[..hb.len().min(HOST_BYTES)]);
        let mut all = vec![0u8; HOST_BYTES * world_size];
        world.all_gather_into(&mine[..], &mut all[..]);
        let hosts = all.chunks(HOST_BYTES).map(|c| String::from_utf8_lossy(c).trim_end_matches('\0').to_string()).collect();
        let mut locals = vec![0u64; world_size];
        world.all_gather_into(&(local_rank as u64), &mut locals[..]);
        let mpi_library = mpi::environment::library_version().unwrap_or_else(|_| "unknown".into()).split('\0').next().unwrap_or("").lines().next().unwrap_or("").trim().to_string();
        Ok(Self { universe, rank, world_size, local_rank, local_size, max_local_ranks: max_local as usize, hosts, local_ranks: locals.into_iter().map(|x| x as usize).collect(), mpi_library })
    }

    /// A panic on one rank aborts the whole job instead of leaving the
    /// other ranks waiting in a collective forever.
    pub fn abort_on_panic() {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            // SAFETY: MPI_Abort may be called at any time after MPI_Init;
            // it does not return.
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 1);
            }
        }));
    }

    pub fn world(&self) -> SimpleCommunicator {
        self.universe.world()
    }

    /// `SLURM_NTASKS` when running under Slurm.
    pub fn slurm_ntasks() -> Option<usize> {
        std::env::var("SLURM_NTASKS").ok()?.parse().ok()
    }
}
