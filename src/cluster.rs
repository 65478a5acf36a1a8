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
    /// Most ranks any node holds.
    pub max_local_ranks: usize,
    /// Host of every world rank.
    pub hosts: Vec<String>,
    /// Node-local rank of every world rank.
    pub local_ranks: Vec<usize>,
    pub mpi_library: String,
}

/// Longest string [`Cluster::all_gather_strings`] carries (longer ones are cut).
const STRING_BYTES: usize = 96;

/// Every rank's `fields` (the same count on every rank), by world rank.
fn gather_strings(world: &SimpleCommunicator, fields: &[String]) -> Vec<Vec<String>> {
    let mut mine = vec![0u8; STRING_BYTES * fields.len()];
    for (i, s) in fields.iter().enumerate() {
        let b = s.as_bytes();
        let n = b.len().min(STRING_BYTES);
        mine[i * STRING_BYTES..i * STRING_BYTES + n].copy_from_slice(&b[..n]);
    }
    let mut all = vec![0u8; mine.len() * world.size() as usize];
    world.all_gather_into(&mine[..], &mut all[..]);
    let field = |c: &[u8]| String::from_utf8_lossy(c).trim_end_matches('\0').to_string();
    all.chunks(mine.len().max(1)).map(|rank| rank.chunks(STRING_BYTES).map(field).collect()).collect()
}

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
        let hosts = gather_strings(&world, &[host]).into_iter().map(|mut h| h.remove(0)).collect();
        let mut locals = vec![0u64; world_size];
        world.all_gather_into(&(local_rank as u64), &mut locals[..]);
        let mpi_library = mpi::environment::library_version().unwrap_or_else(|_| "unknown".into()).split('\0').next().unwrap_or("").lines().next().unwrap_or("").trim().to_string();
        Ok(Self { universe, rank, world_size, local_rank, max_local_ranks: max_local as usize, hosts, local_ranks: locals.into_iter().map(|x| x as usize).collect(), mpi_library })
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

    /// Every rank's `fields` (the same count on every rank), by world rank;
    /// collective over the world. Strings longer than 96 bytes are cut.
    pub fn all_gather_strings(&self, fields: &[String]) -> Vec<Vec<String>> {
        gather_strings(&self.world(), fields)
    }

    /// `SLURM_NTASKS` when running under Slurm.
    pub fn slurm_ntasks() -> Option<usize> {
        std::env::var("SLURM_NTASKS").ok()?.parse().ok()
    }
}
