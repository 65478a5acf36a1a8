//! The workload: sequence-length categories, seeded lengths and Zipf-like
//! prompt tokens, and batches of one length (defaults in `docs/design.md`).
//!
//! Every value is a pure function of the seed, the category and the sequence
//! index, so any rank count generates the same workload with no messages.

use crate::model::splitmix64;
use crate::spec::WorkloadSpec;

/// A deterministic generator seeded from a key.
pub struct Rng(u64);

impl Rng {
    pub fn new(key: u64) -> Self {
        Self(splitmix64(key))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }
}

/// Categories are keyed by name, not position, so a job that runs one
/// category alone (a Slurm array task) draws the same sequences as a job that
/// runs them all.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

fn key(seed: u64, category: &str, sequence: usize, stream: u64) -> u64 {
    seed ^ name_key(category).wrapping_mul(0xA24B_AED4_963E_E407) ^ (sequence as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25) ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// One batch: sequences of one length from one category.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub category: usize,
    pub index: usize,
    pub seq_len: usize,
    /// Indices of its sequences within the category (ascending).
    pub sequences: Vec<usize>,
    /// Sequences of all earlier batches of the category.
    pub first_row: usize,
}

/// The workload of one job.
pub struct Workload<'a> {
    pub spec: &'a WorkloadSpec,
    pub vocab: usize,
    zipf_cdf: Vec<f64>,
}

impl<'a> Workload<'a> {
    pub fn new(spec: &'a WorkloadSpec, vocab: usize) -> Self {
        let weights: Vec<f64> = (0..vocab).map(|r| 1.0 / ((r + 1) as f64).powf(spec.zipf_exponent)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let zipf_cdf = weights.iter().map(|w| {
            acc += w / total;
            acc
        });
        Self { spec, vocab, zipf_cdf: zipf_cdf.collect() }
    }

    /// Length of sequence `i` of category `c`: uniform over the category's lengths.
    pub fn length(&self, c: usize, i: usize) -> usize {
        let lengths = self.spec.categories[c].resolved_lengths();
        lengths[Rng::new(key(self.spec.seed, &self.spec.categories[c].name, i, 1)).below(lengths.len())]
    }

    /// Prompt tokens of sequence `i` of category `c`: Zipf-like over the vocabulary.
    pub fn prompt(&self, c: usize, i: usize) -> Vec<u32> {
        let mut rng = Rng::new(key(self.spec.seed, &self.spec.categories[c].name, i, 2));
        (0..self.length(c, i))
            .map(|_| {
                let u = rng.next_f64();
                self.zipf_cdf.partition_point(|&p| p < u).min(self.vocab - 1) as u32
            })
            .collect()
    }

    /// Batches of category `c`: sequences grouped by length (ascending), in
    /// index order, at most `batch_size` each.
    pub fn batches(&self, c: usize) -> Vec<Batch> {
        let n = self.spec.sequences_per_category;
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for i in 0..n {
            by_len.entry(self.length(c, i)).or_default().push(i);
        }
        let mut out = Vec::new();
        let mut first_row = 0;
        for (len, seqs) in by_len {
            for chunk in seqs.chunks(self.spec.batch_size) {
                out.push(Batch { category: c, index: out.len(), seq_len: len, sequences: chunk.to_vec(), first_row });
                first_row += chunk.len();
            }
        }
        out
    }

    /// Prompt tokens of a batch, `[sequences, seq_len]` row-major.
    pub fn batch_prompts(&self, b: &Batch) -> Vec<u32> {
        b.sequences.iter().flat_map(|&i| self.prompt(b.category, i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec { sequences_per_category: 600, ..Default::default() }
    }

    #[test]
    fn same_seed_same_workload() {
        let s = spec();
        let (a, b) = (Workload::new(&s, 1000), Workload::new(&s, 1000));
        assert_eq!(a.batches(1), b.batches(1));
        assert_eq!(a.prompt(0, 17), b.prompt(0, 17));
        let mut other = spec();
        other.seed = 9;
        assert_ne!(Workload::new(&other, 1000).prompt(0, 17), a.prompt(0, 17));
    }

    #[test]
    fn a_category_run_alone_draws_the_same_sequences() {
        let s = spec();
        let alone = WorkloadSpec { categories: vec![s.categories[2].clone()], ..spec() };
        let (all, one) = (Workload::new(&s, 1000), Workload::new(&alone, 1000));
        assert_eq!(all.batches(2).iter().map(|b| (b.seq_len, b.sequences.clone())).collect::<Vec<_>>(), one.batches(0).iter().map(|b| (b.seq_len, b.sequences.clone())).collect::<Vec<_>>());
        assert_eq!(all.prompt(2, 5), one.prompt(0, 5));
    }

    #[test]
    fn lengths_are_uniform_over_the_category() {
        let s = spec();
        let w = Workload::new(&s, 1000);
        let mut counts = std::collections::BTreeMap::new();
        for i in 0..600 {
            *counts.entry(w.length(0, i)).or_insert(0) += 1;
        }
        assert_eq!(counts.keys().copied().collect::<Vec<_>>(), vec![512, 1024, 2048]);
        // Each of 3 lengths expects 200 of 600; 5 sigma is about 58.
        assert!(counts.values().all(|&c| (140..=260).contains(&c)), "{counts:?}");
        let very_long: std::collections::BTreeSet<usize> = (0..600).map(|i| w.length(3, i)).collect();
        assert!(very_long.iter().all(|l| l % 1024 == 0 && (32768..=65536).contains(l)));
        assert!(very_long.len() > 25, "draws cover most of the 33 lengths");
    }

    #[test]
    fn prompt_tokens_are_zipf_like() {
        let s = spec();
        let w = Workload::new(&s, 1000);
        let toks: Vec<u32> = (0..20).flat_map(|i| w.prompt(0, i)).collect();
        let count = |t: u32| toks.iter().filter(|&&x| x == t).count() as f64;
        // p(0)/p(1) = 2^1.1 ≈ 2.14 for Zipf(1.1).
        let ratio = count(0) / count(1);
        assert!((1.8..2.5).contains(&ratio), "ratio {ratio}");
        assert!(toks.iter().all(|&t| (t as usize) < 1000));
    }

    #[test]
    fn batches_hold_one_length_and_respect_batch_size() {
        let mut s = spec();
        s.batch_size = 64;
        let w = Workload::new(&s, 1000);
        let batches = w.batches(0);
        assert_eq!(batches.iter().map(|b| b.sequences.len()).sum::<usize>(), 600);
        for b in &batches {
            assert!(b.sequences.len() <= 64);
            assert!(b.sequences.iter().all(|&i| w.length(0, i) == b.seq_len));
        }
        assert!(batches.windows(2).all(|p| p[0].seq_len <= p[1].seq_len && p[1].first_row == p[0].first_row + p[0].sequences.len()));
    }
}
