//! The analytical per-rank memory model: weights, KV cache, activations and
//! communication buffers of each strategy. It decides how many sequences a
//! micro-batch may hold and rejects jobs that cannot fit even one sequence.
//! Estimates are stored beside the measured peaks so their error is visible.
//!
//! Pure arithmetic; it must not allocate what it estimates.

use crate::model::ModelConfig;
use crate::spec::{StrategySpec, WorkloadSpec};
use crate::strategy::PoolPolicy;

/// The busiest rank's bytes for one batch shape.
pub fn busiest_rank_bytes(m: &ModelConfig, s: &StrategySpec, seq_len: usize, nseq: usize, out_tokens: usize, world: usize, elem: usize) -> u64 {
    let (d, a, f, l, v) = (m.d_model as u64, m.attn_width() as u64, m.ffn as u64, m.layers as u64, m.vocab as u64);
    let e = elem as u64;
    let (n, sl, ctx) = (nseq as u64, seq_len as u64, (seq_len + out_tokens) as u64);
    let ffn_params = m.layer_params() - 4 * d * a - 2 * d;
    let tokens = n * sl;
    match s {
        StrategySpec::Baseline(b) => {
            let (t, p) = (b.tp as u64, b.pp as u64);
            let weights = (l / p) * (4 * d * a + ffn_params) / t + 2 * v * d;
            let kv = n * ctx * 2 * (l / p) * a / t;
            let act = tokens * (4 * d + 3 * a / t + 2 * f / t) + n * v;
            (weights + kv + act) * e
        }
        StrategySpec::Fapool(fp) => {
            let bsz = fp.base as u64;
            let policy = PoolPolicy::from_spec(fp, world);
            let pool = policy.pool_size(seq_len).1 as u64;
            let base_weights = l * (4 * d * a + ffn_params) / bsz + 2 * v * d;
            let base_act = tokens * (4 * d + 2 * f / bsz) + n * v;
            if pool == 0 {
                let kv = n * ctx * 2 * l * a / bsz;
                (base_weights + kv + base_act + tokens * 3 * a / bsz) * e
            } else {
                let block = sl.div_ceil(pool);
                let pool_weights = l * 4 * d * a;
                let kv = n * (block + out_tokens as u64) * 2 * l * a;
                // The replicated K/V of one layer twice (as gathered, then in
                // sequence order), and the block's input, fused QKV, q/k/v,
                // attention output and projected output.
                let pool_act = n * sl * 4 * a + n * block * (d + 3 * a + 3 * a + a + d);
                ((base_weights + base_act).max(pool_weights + kv + pool_act)) * e
            }
        }
    }
}

/// The worst case over a workload with one sequence per micro-batch.
pub struct PeakEstimate {
    pub min_bytes: u64,
}

pub fn estimate_peak(m: &ModelConfig, s: &StrategySpec, w: &WorkloadSpec, world: usize, elem: usize) -> PeakEstimate {
    let longest = w.categories.iter().flat_map(|c| c.resolved_lengths()).max().unwrap_or(0);
    PeakEstimate { min_bytes: busiest_rank_bytes(m, s, longest, 1, w.output_tokens, world, elem) }
}

/// Most sequences of length `seq_len` one micro-batch may hold within `budget`
/// (at least 1; `validate` has already rejected jobs where one does not fit).
pub fn max_sequences(m: &ModelConfig, s: &StrategySpec, seq_len: usize, out_tokens: usize, world: usize, elem: usize, budget: u64, cap: usize) -> usize {
    let fits = |n: usize| busiest_rank_bytes(m, s, seq_len, n, out_tokens, world, elem) <= budget;
    if fits(cap) {
        return cap;
    }
    let (mut lo, mut hi) = (1usize, cap);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}
