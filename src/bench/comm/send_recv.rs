//! One point-to-point message from rank 0 to rank 1 (the pipeline's
//! activations); the other ranks take no part. Bus factor 1.
//! It says only what is specific to this collective; the harness times and checks.

use super::{value, Buffers, Collective};
use crate::backend::Backend;
use crate::comm::{Category, Comm, Group, Result};

pub struct SendRecv;

impl<B: Backend> Collective<B> for SendRecv {
    fn name(&self) -> &'static str {
        "send/recv (rank 0 -> 1)"
    }
    fn category(&self) -> Category {
        Category::PpP2p
    }
    fn runs_on(&self, ranks: usize) -> bool {
        ranks > 1
    }
    fn bus_factor(&self, _ranks: usize) -> f64 {
        1.0
    }
    /// Rank 0 sends its values; rank 1 receives into a NaN poison.
    fn fill(&self, rank: usize, _ranks: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        match rank {
            0 => ((0..len).map(|i| value(0, i)).collect(), Vec::new()),
            1 => (Vec::new(), vec![f32::NAN; len]),
            _ => (Vec::new(), Vec::new()),
        }
    }
    fn call(&self, comm: &Comm<'_, B>, group: &Group, bufs: &mut Buffers<B>) -> Result<()> {
        match group.rank() {
            0 => comm.send(Category::PpP2p, group, 1, &bufs.send),
            1 => comm.recv_into(Category::PpP2p, group, 0, &mut bufs.recv),
            _ => Ok(()),
        }
    }
    fn received(&self, rank: usize, _ranks: usize, len: usize) -> Option<usize> {
        (rank == 1).then_some(len)
    }
    fn expected(&self, _rank: usize, _ranks: usize, _len: usize, i: usize) -> f32 {
        value(0, i)
    }
}
