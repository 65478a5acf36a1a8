//! `fapool bench kernels`: the kernels that matter for speed, on one GPU,
//! on device-generated random data in the backend's dtype: causal prefill
//! attention (one sequence of 32 heads of 128, 16 of 32 and 8 of 64, and
//! moe-16l's batch of 11 sequences of 10,240 tokens, every kernel variant
//! the device has for the heads; and a pool rank's block, the last quarter
//! of the queries against all keys, for the fastest ones), decode attention (B = 1, 4, 16, 64 sequences
//! of one query at each context length), cuBLAS GEMMs on dense-4l's shapes,
//! and RMSNorm. Each row is the median of event-timed calls after two
//! warm-up calls. Correctness is `fapool check-gpu`'s job: these rows are
//! not checked (`#wrong` is `-`). This module must not time anything but
//! through the harness (`time_with_marks`).

use super::{time_with_marks, Row};
use crate::backend::cuda::{CudaBackend, PrefillKernel};
use crate::backend::{Backend, DecodeShape, Dtype, PrefillShape, Result};

/// Untimed calls before each timing.
const WARMUP: usize = 2;

fn row(what: impl Into<String>, shape: String, secs: f64, figure: f64, unit: &str) -> Row {
    Row { what: what.into(), shape, median_ms: secs * 1e3, figure, unit: unit.into(), busbw_gbs: f64::NAN, wrong: None }
}

/// The prefill kernels timed, in the order of their rows: the Hopper
/// builds, the tensor-core ones, the general one.
const PREFILL_KERNELS: [PrefillKernel; 6] = [PrefillKernel::FlashSm90, PrefillKernel::FlashSm90Ftz, PrefillKernel::Flash128, PrefillKernel::Flash64, PrefillKernel::Flash128W4, PrefillKernel::General];

/// The heads prefill is timed on, (heads, head_dim): dense-4l's 32 of 128,
/// moe-16l's 16 of 32, and 8 of 64 (moe-16l's width of 512 in heads of 64).
const PREFILL_HEADS: [(usize, usize); 3] = [(32, 128), (16, 32), (8, 64)];

/// moe-16l's prefill batch, 11 sequences of 10,240 tokens, and its heads.
const MOE_BATCH: (usize, usize) = (11, 10_240);
const MOE_HEADS: (usize, usize) = (16, 32);

/// The most FLOPs a timed call of the scalar general kernel may take (at
/// its few TFLOP/s, a quarter to a half second): beyond, its rows would
/// take most of the benchmark's time.
const GENERAL_MAX_FLOPS: f64 = 1.5e12;

/// FLOPs of causal prefill attention: 4·D·H per visible (query, key) pair,
/// 2·2·S²·D·H / 2 for a whole sequence and 4·D·H·(sq·q_offset + sq²/2)
/// for a block of sq queries from `q_offset`, per sequence.
fn prefill_flops(s: &PrefillShape) -> f64 {
    let sq = s.sq as f64;
    4.0 * (s.head_dim * s.heads * s.nseq) as f64 * (sq * s.q_offset as f64 + sq * sq / 2.0)
}

/// Whether `kernel` is timed on prefill of shape `s` on a device of
/// compute capability `cc` in `dt`: every kernel that applies to the
/// head_dim, the dtype and the device on whole sequences (the scalar
/// general one up to [`GENERAL_MAX_FLOPS`] per call), and the Hopper
/// builds and `Flash128W4` on a pool rank's block.
fn times_prefill(kernel: PrefillKernel, s: &PrefillShape, cc: (i32, i32), dt: Dtype) -> bool {
    if !kernel.applies(s.head_dim, dt, cc) {
        return false;
    }
    if kernel == PrefillKernel::General {
        return s.q_offset == 0 && prefill_flops(s) <= GENERAL_MAX_FLOPS;
    }
    s.q_offset == 0 || matches!(kernel, PrefillKernel::FlashSm90 | PrefillKernel::FlashSm90Ftz | PrefillKernel::Flash128W4)
}

/// Times every prefill kernel row on `nseq` sequences of `s` tokens of
/// `heads` heads of `hd`: the whole causal prefill, and a pool rank's
/// block (the last quarter of the queries against all of the keys).
fn time_prefill(b: &CudaBackend, rows: &mut Vec<Row>, (nseq, s): (usize, usize), (heads, hd): (usize, usize), iters: usize) -> Result<()> {
    let (dt, cc) = (b.dtype(), b.compute_capability());
    let width = heads * hd;
    let q = b.random_uniform(dt, nseq * s * width, 1, 1.0)?;
    let k = b.random_uniform(dt, nseq * s * width, 2, 1.0)?;
    let v = b.random_uniform(dt, nseq * s * width, 3, 1.0)?;
    let before = b.prefill_kernel();
    let rank_rows = s / 4;
    let batch = if nseq == 1 { String::new() } else { format!("{nseq} x ") };
    for (sq, q_offset, what) in [(s, 0, "causal"), (rank_rows, s - rank_rows, "last quarter of queries")] {
        let shape = PrefillShape { nseq, sq, skv: s, kv_seq_stride: s, heads, kv_heads: heads, head_dim: hd, q_offset };
        let flops = prefill_flops(&shape);
        for kernel in PREFILL_KERNELS.into_iter().filter(|&kernel| times_prefill(kernel, &shape, cc, dt)) {
            b.set_prefill_kernel(kernel);
            let timed = time_with_marks(b, WARMUP, iters, || b.attention_prefill(&q, &k, &v, shape).map(|_| ()));
            b.set_prefill_kernel(before);
            let secs = timed?;
            rows.push(row(format!("prefill attention [{}]", kernel.name()), format!("{batch}S {s}, {heads}x{hd}, {what}"), secs, flops / secs / 1e12, "TFLOP/s"));
        }
    }
    Ok(())
}

/// Times every kernel row for each context length of `seq_lens`, `iters`
/// timed calls each: prefill attention on each of [`PREFILL_HEADS`] and on
/// moe-16l's batch; bytes of decode attention are the K and V of every
/// sequence read once.
pub fn run(b: &CudaBackend, seq_lens: &[usize], iters: usize) -> Result<Vec<Row>> {
    b.load_all_kernels()?;
    let mut rows = Vec::new();
    for heads_of in PREFILL_HEADS {
        for &s in seq_lens {
            time_prefill(b, &mut rows, (1, s), heads_of, iters)?;
        }
    }
    time_prefill(b, &mut rows, MOE_BATCH, MOE_HEADS, iters)?;
    // Decode attention on dense-4l's heads.
    let dt = b.dtype();
    let (heads, hd) = PREFILL_HEADS[0];
    let width = heads * hd;
    // One decode step of B sequences at each context length.
    for nseq in [1usize, 4, 16, 64] {
        for &s in seq_lens {
            let qd = b.random_uniform(dt, nseq * width, 4, 1.0)?;
            let (k, v) = (b.random_uniform(dt, nseq * s * width, 2, 1.0)?, b.random_uniform(dt, nseq * s * width, 3, 1.0)?);
            let ds = DecodeShape { nseq, cap: s, len: s, heads, kv_heads: heads, head_dim: hd };
            let secs = time_with_marks(b, WARMUP, iters, || b.attention_decode(&qd, &k, &v, ds).map(|_| ()))?;
            let bytes = 2.0 * (nseq * s * width * dt.size_bytes()) as f64;
            rows.push(row("decode attention (split-KV)", format!("B {nseq}, len {s}, {heads}x{hd}"), secs, bytes / secs / 1e12, "TB/s"));
        }
    }
    // The same with Llama 3's grouped K/V heads (8 for the 32 query heads):
    // a quarter of the cache, read once for the four query heads of a group.
    let kv_heads = heads / 4;
    let kv_width = kv_heads * hd;
    for nseq in [4usize, 16] {
        for &s in seq_lens {
            let qd = b.random_uniform(dt, nseq * width, 4, 1.0)?;
            let (k, v) = (b.random_uniform(dt, nseq * s * kv_width, 2, 1.0)?, b.random_uniform(dt, nseq * s * kv_width, 3, 1.0)?);
            let ds = DecodeShape { nseq, cap: s, len: s, heads, kv_heads, head_dim: hd };
            let secs = time_with_marks(b, WARMUP, iters, || b.attention_decode(&qd, &k, &v, ds).map(|_| ()))?;
            let bytes = 2.0 * (nseq * s * kv_width * dt.size_bytes()) as f64;
            rows.push(row("decode attention (grouped K/V)", format!("B {nseq}, len {s}, {heads}x{hd} kv {kv_heads}"), secs, bytes / secs / 1e12, "TB/s"));
        }
    }
    // 8192³ and dense-4l's GEMMs at 16K tokens: QKV, output projection, FFN up, FFN down.
    for (m, k, n) in [(8192usize, 8192usize, 8192usize), (16_384, 4096, 12_288), (16_384, 4096, 4096), (16_384, 4096, 16_384), (16_384, 16_384, 4096)] {
        let x = b.random_uniform(dt, m * k, 5, 1.0)?;
        let w = b.random_uniform(dt, k * n, 6, 0.02)?;
        let secs = time_with_marks(b, WARMUP, iters, || b.matmul(&x, &w, m, k, n).map(|_| ()))?;
        rows.push(row("matmul (cuBLAS)", format!("[{m}x{k}]x[{k}x{n}]"), secs, 2.0 * (m * k * n) as f64 / secs / 1e12, "TFLOP/s"));
    }
    // RMSNorm of 16K rows of 4096: one read and one write of the activations.
    let (rows_n, d) = (16_384usize, 4096usize);
    let x = b.random_uniform(dt, rows_n * d, 7, 1.0)?;
    let g = b.random_uniform(dt, d, 8, 1.0)?;
    let secs = time_with_marks(b, WARMUP, iters, || b.rmsnorm(&x, &g, rows_n, d, 1e-6).map(|_| ()))?;
    rows.push(row("rmsnorm", format!("[{rows_n}x{d}]"), secs, 2.0 * (rows_n * d * dt.size_bytes()) as f64 / secs / 1e12, "TB/s"));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200: (i32, i32) = (9, 0);
    const A100: (i32, i32) = (8, 0);

    /// One sequence of `s` tokens of `heads` heads of `hd`, the queries from `q_offset`.
    fn one(s: usize, q_offset: usize, (heads, hd): (usize, usize)) -> PrefillShape {
        PrefillShape { nseq: 1, sq: s - q_offset, skv: s, kv_seq_stride: s, heads, kv_heads: heads, head_dim: hd, q_offset }
    }

    const DENSE: (usize, usize) = (32, 128);
    const MOE: (usize, usize) = MOE_HEADS;

    #[test]
    fn the_hopper_builds_are_timed_on_sm_90_at_head_dim_128_only() {
        for kernel in [PrefillKernel::FlashSm90, PrefillKernel::FlashSm90Ftz] {
            assert!(times_prefill(kernel, &one(16_384, 0, DENSE), H200, Dtype::Bf16));
            assert!(times_prefill(kernel, &one(16_384, 12_288, DENSE), H200, Dtype::Bf16));
            assert!(!times_prefill(kernel, &one(16_384, 0, DENSE), A100, Dtype::Bf16));
            assert!(!times_prefill(kernel, &one(16_384, 0, MOE), H200, Dtype::Bf16));
            assert!(!times_prefill(kernel, &one(16_384, 0, (8, 64)), H200, Dtype::Bf16));
        }
        assert!(times_prefill(PrefillKernel::Flash128W4, &one(16_384, 0, DENSE), A100, Dtype::Bf16));
    }

    #[test]
    fn the_tensor_core_kernels_are_timed_at_head_dim_32_and_64() {
        for heads in [MOE, (8, 64)] {
            for kernel in [PrefillKernel::Flash128, PrefillKernel::Flash64, PrefillKernel::Flash128W4] {
                assert!(times_prefill(kernel, &one(16_384, 0, heads), H200, Dtype::Bf16), "{kernel:?} at {heads:?}");
                assert!(!times_prefill(kernel, &one(16_384, 0, heads), H200, Dtype::Fp32), "{kernel:?} at {heads:?}");
            }
        }
    }

    #[test]
    fn the_general_kernel_is_timed_on_whole_prefills_within_its_flop_budget_and_alone_in_fp32() {
        assert!(times_prefill(PrefillKernel::General, &one(4096, 0, DENSE), H200, Dtype::Bf16));
        assert!(!times_prefill(PrefillKernel::General, &one(16_384, 0, DENSE), H200, Dtype::Bf16));
        assert!(!times_prefill(PrefillKernel::General, &one(4096, 3072, DENSE), H200, Dtype::Bf16));
        assert!(times_prefill(PrefillKernel::General, &one(4096, 0, DENSE), H200, Dtype::Fp32));
        assert!(!times_prefill(PrefillKernel::FlashSm90, &one(4096, 0, DENSE), H200, Dtype::Fp32));
        // Heads of 32 and 64 (width 512): at 16K, and moe-16l's whole batch, but not at 64K.
        assert!(times_prefill(PrefillKernel::General, &one(16_384, 0, MOE), H200, Dtype::Bf16));
        assert!(times_prefill(PrefillKernel::General, &one(16_384, 0, (8, 64)), H200, Dtype::Bf16));
        assert!(!times_prefill(PrefillKernel::General, &one(65_536, 0, MOE), H200, Dtype::Bf16));
        let batch = PrefillShape { nseq: MOE_BATCH.0, ..one(MOE_BATCH.1, 0, MOE) };
        assert!(times_prefill(PrefillKernel::General, &batch, H200, Dtype::Bf16));
    }

    #[test]
    fn a_pool_ranks_block_is_timed_on_the_fastest_kernels_only() {
        for heads in [DENSE, MOE] {
            assert!(!times_prefill(PrefillKernel::Flash128, &one(4096, 3072, heads), H200, Dtype::Bf16));
            assert!(!times_prefill(PrefillKernel::Flash64, &one(4096, 3072, heads), H200, Dtype::Bf16));
            assert!(times_prefill(PrefillKernel::Flash128W4, &one(4096, 3072, heads), H200, Dtype::Bf16));
        }
    }

    #[test]
    fn prefill_flops_count_each_visible_pair_of_each_sequence() {
        // One sequence of 4096 on 32 heads of 128: 2·2·S²·D·H / 2.
        assert_eq!(prefill_flops(&one(4096, 0, DENSE)), 2.0 * 4096f64.powi(2) * 128.0 * 32.0);
        // A block of 1024 queries after 3072 of 4096: sq·q_offset + sq²/2 pairs per head.
        assert_eq!(prefill_flops(&one(4096, 3072, DENSE)), 4.0 * 4096.0 * (1024.0 * 3072.0 + 1024f64.powi(2) / 2.0));
        let batch = PrefillShape { nseq: 11, ..one(10_240, 0, MOE) };
        assert_eq!(prefill_flops(&batch), 11.0 * prefill_flops(&one(10_240, 0, MOE)));
    }
}
