//! Broadcast from rank 0 in place: every rank ends with rank 0's buffer.
//! Bus factor 1 (nccl-tests).
//! It says only what is specific to this collective; the harness times and checks.

use super::{value, Buffers, Collective};
use crate::backend::Backend;
use crate::comm::{Category, Comm, Group, Result};

pub struct Broadcast;

impl<B: Backend> Collective<B> for Broadcast {
    fn name(&self) -> &'static str {
        "broadcast"
    }
    fn category(&self) -> Category {
        Category::AttentionSync
    }
    fn bus_factor(&self, _ranks: usize) -> f64 {
        1.0
    }
    /// The root holds its values; every other rank a NaN poison.
    fn fill(&self, rank: usize, _ranks: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        (Vec::new(), (0..len).map(|i| if rank == 0 { value(0, i) } else { f32::NAN }).collect())
    }
    fn call(&self, comm: &Comm<'_, B>, group: &Group, bufs: &mut Buffers<B>) -> Result<()> {
        comm.broadcast(Category::AttentionSync, group, 0, &mut bufs.recv)
    }
    fn received(&self, _rank: usize, _ranks: usize, len: usize) -> Option<usize> {
        Some(len)
    }
    fn expected(&self, _rank: usize, _ranks: usize, _len: usize, i: usize) -> f32 {
        value(0, i)
    }
}
