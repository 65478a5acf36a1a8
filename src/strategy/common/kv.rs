//! The KV cache of the layers a rank serves, and how rows are stored in it.

use crate::backend::{Backend, RowRun};
use crate::strategy::Result;

/// K and V caches of the layers a rank serves: `[nseq, cap, width]` each.
pub struct KvCache<B: Backend> {
    pub k: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    pub nseq: usize,
    pub cap: usize,
    pub width: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(be: &B, layers: usize, nseq: usize, cap: usize, width: usize) -> Result<Self> {
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(be.zeros(nseq * cap * width)?);
            v.push(be.zeros(nseq * cap * width)?);
        }
        Ok(Self { k, v, nseq, cap, width })
    }

    /// Row runs of `n` positions from `pos` for sequences `seqs` of the cache.
    pub fn runs(&self, seqs: std::ops::Range<usize>, pos: usize, n: usize) -> Vec<RowRun> {
        seqs.map(|s| RowRun::new(s * self.cap + pos, n)).collect()
    }

    /// Stores the step's `k`, `v` (`[nseq, width]`) at the step's `store_at` row.
    pub fn store_step(&mut self, be: &B, layer: usize, k: &B::Buf, v: &B::Buf) -> Result<()> {
        be.store_step(&mut self.k[layer], k, self.nseq, self.cap, self.width)?;
        be.store_step(&mut self.v[layer], v, self.nseq, self.cap, self.width)?;
        Ok(())
    }

    /// Stores a prompt's `k`, `v` (`[len(seqs) * n, width]`) at positions `0..n`.
    pub fn store_prompt(&mut self, be: &B, layer: usize, seqs: std::ops::Range<usize>, n: usize, k: &B::Buf, v: &B::Buf) -> Result<()> {
        let runs = self.runs(seqs, 0, n);
        be.scatter_rows(&mut self.k[layer], self.width, &runs, k)?;
        be.scatter_rows(&mut self.v[layer], self.width, &runs, v)?;
        Ok(())
    }
}
