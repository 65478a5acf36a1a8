//! Pieces several strategies share: tensor-parallel layer math and layer
//! shards ([`tp`]), the KV cache ([`kv`]), the binary tree of the pool's
//! aggregation ([`tree`]), and the construction of a layout's groups
//! ([`groups`]). Nothing here decides who does what: layouts do.

pub mod groups;
pub mod kv;
pub mod tp;
pub mod tree;

/// Which tokens a layer processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The prompt: this many tokens per sequence from position 0.
    Prefill(usize),
    /// One token per sequence at the step's position (the backend's step
    /// scalars), attending to the step's cached length.
    Decode,
}

impl Phase {
    /// Tokens per sequence.
    pub fn tokens(self) -> usize {
        match self {
            Phase::Prefill(s) => s,
            Phase::Decode => 1,
        }
    }
}

/// Splits `n` items into `m` nearly equal consecutive parts (no empty part
/// when `m <= n`).
pub fn split_even(n: usize, m: usize) -> Vec<std::ops::Range<usize>> {
    let m = m.clamp(1, n.max(1));
    (0..m).map(|j| j * n / m..(j + 1) * n / m).collect()
}

/// Micro-batches for a batch of `nseq` sequences: the strategy's wish, or
/// more when the memory cap needs it, never more than the sequences.
pub fn micro_batches(wanted: usize, nseq: usize, micro_batch_cap: usize) -> usize {
    let by_memory = nseq.div_ceil(micro_batch_cap.max(1));
    wanted.max(by_memory).min(nseq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_never_leaves_a_part_empty() {
        assert_eq!(split_even(5, 2), vec![0..2, 2..5]);
        assert_eq!(split_even(2, 4), vec![0..1, 1..2]);
    }

    #[test]
    fn micro_batches_grow_with_the_memory_cap_and_stop_at_the_sequences() {
        assert_eq!(micro_batches(1, 8, 8), 1);
        assert_eq!(micro_batches(1, 8, 3), 3);
        assert_eq!(micro_batches(4, 2, 8), 2);
    }
}
