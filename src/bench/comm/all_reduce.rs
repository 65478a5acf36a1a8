//! Sum all-reduce in place: every rank ends with the sum of every rank's
//! buffer. Bus factor 2(n-1)/n (nccl-tests).
//! It says only what is specific to this collective; the harness times and checks.

use super::{value, Buffers, Collective};
use crate::backend::Backend;
use crate::comm::{Category, Comm, Group, Result};

pub struct AllReduce;

impl<B: Backend> Collective<B> for AllReduce {
    fn name(&self) -> &'static str {
        "all_reduce"
    }
    fn category(&self) -> Category {
        Category::TpAllreduce
    }
    fn bus_factor(&self, ranks: usize) -> f64 {
        2.0 * (ranks as f64 - 1.0) / ranks as f64
    }
    fn fill(&self, rank: usize, _ranks: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        (Vec::new(), (0..len).map(|i| value(rank, i)).collect())
    }
    fn call(&self, comm: &Comm<'_, B>, group: &Group, bufs: &mut Buffers<B>) -> Result<()> {
        comm.all_reduce(Category::TpAllreduce, group, &mut bufs.recv)
    }
    fn received(&self, _rank: usize, _ranks: usize, len: usize) -> Option<usize> {
        Some(len)
    }
    fn expected(&self, _rank: usize, ranks: usize, _len: usize, i: usize) -> f32 {
        (0..ranks).map(|r| value(r, i)).sum()
    }
}
