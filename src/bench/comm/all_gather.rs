//! All-gather of equal contributions: every rank ends with every rank's
//! buffer, in rank order. Like nccl-tests, bandwidth counts the gathered
//! size (ranks × the per-rank size) and the bus factor is (n-1)/n.
//! It says only what is specific to this collective; the harness times and checks.

use super::{value, Buffers, Collective};
use crate::backend::Backend;
use crate::comm::{Category, Comm, Group, Result};

pub struct AllGather;

impl<B: Backend> Collective<B> for AllGather {
    fn name(&self) -> &'static str {
        "all_gather (per-rank size)"
    }
    fn category(&self) -> Category {
        Category::KvReplication
    }
    fn counted_bytes(&self, bytes: f64, ranks: usize) -> f64 {
        bytes * ranks as f64
    }
    fn bus_factor(&self, ranks: usize) -> f64 {
        (ranks as f64 - 1.0) / ranks as f64
    }
    /// The receive buffer is the call's own result.
    fn fill(&self, rank: usize, _ranks: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        ((0..len).map(|i| value(rank, i)).collect(), Vec::new())
    }
    fn call(&self, comm: &Comm<'_, B>, group: &Group, bufs: &mut Buffers<B>) -> Result<()> {
        bufs.recv = comm.all_gather(Category::KvReplication, group, &bufs.send)?;
        Ok(())
    }
    fn received(&self, _rank: usize, ranks: usize, len: usize) -> Option<usize> {
        Some(ranks * len)
    }
    fn expected(&self, _rank: usize, _ranks: usize, len: usize, i: usize) -> f32 {
        value(i / len, i % len)
    }
}
