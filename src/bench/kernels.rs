//! `fapool bench kernels`: the kernels that matter for speed, on one GPU,
//! on device-generated random data in the backend's dtype: causal prefill
//! attention (32 heads of 128, one sequence, every kernel variant the device
//! has; and a pool rank's block, the last quarter of the queries against all
//! keys, for the fastest ones), decode attention (B = 1, 4, 16, 64 sequences
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

/// Whether `kernel` is timed on prefill of `s` tokens, the query block
/// starting at `q_offset`, on a device of compute capability `cc` in `dt`:
/// every kernel the device has for the dtype on the whole sequence (the
/// scalar general one at 4K only: beyond, its calls take seconds each), and
/// the Hopper builds and `Flash128W4` on a pool rank's block.
fn times_prefill(kernel: PrefillKernel, s: usize, q_offset: usize, cc: (i32, i32), dt: Dtype) -> bool {
    if !kernel.runs_on(cc) || (dt == Dtype::Fp32 && kernel != PrefillKernel::General) {
        return false;
    }
    if kernel == PrefillKernel::General {
        return s <= 4096 && q_offset == 0;
    }
    q_offset == 0 || matches!(kernel, PrefillKernel::FlashSm90 | PrefillKernel::FlashSm90Ftz | PrefillKernel::Flash128W4)
}

/// Times every kernel row for each context length of `seq_lens`, `iters`
/// timed calls each. FLOPs of attention are 4·D·H per visible (query, key)
/// pair: 2·2·S²·D·H / 2 for the causal prefill, 4·D·H·(sq·q_offset + sq²/2)
/// for a block of sq queries from `q_offset`; bytes of decode attention are
/// the K and V of every sequence read once.
pub fn run(b: &CudaBackend, seq_lens: &[usize], iters: usize) -> Result<Vec<Row>> {
    b.load_all_kernels()?;
    let dt = b.dtype();
    let cc = b.compute_capability();
    let (heads, hd) = (32usize, 128usize);
    let width = heads * hd;
    let mut rows = Vec::new();
    let before = b.prefill_kernel();
    for &s in seq_lens {
        let q = b.random_uniform(dt, s * width, 1, 1.0)?;
        let k = b.random_uniform(dt, s * width, 2, 1.0)?;
        let v = b.random_uniform(dt, s * width, 3, 1.0)?;
        // The whole causal prefill, and a pool rank's block: the last quarter
        // of the queries against all of the keys.
        let rank_rows = s / 4;
        for (sq, q_offset, what) in [(s, 0, "causal"), (rank_rows, s - rank_rows, "last quarter of queries")] {
            let shape = PrefillShape { nseq: 1, sq, skv: s, kv_seq_stride: s, heads, kv_heads: heads, head_dim: hd, q_offset };
            let flops = 4.0 * (hd * heads) as f64 * (sq as f64 * q_offset as f64 + (sq as f64).powi(2) / 2.0);
            for kernel in PREFILL_KERNELS.into_iter().filter(|&kernel| times_prefill(kernel, s, q_offset, cc, dt)) {
                b.set_prefill_kernel(kernel);
                let timed = time_with_marks(b, WARMUP, iters, || b.attention_prefill(&q, &k, &v, shape).map(|_| ()));
                b.set_prefill_kernel(before);
                let secs = timed?;
                rows.push(row(format!("prefill attention [{}]", kernel.name()), format!("S {s}, {heads}x{hd}, {what}"), secs, flops / secs / 1e12, "TFLOP/s"));
            }
        }
    }
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

    #[test]
    fn the_hopper_builds_are_timed_on_sm_90_only() {
        for kernel in [PrefillKernel::FlashSm90, PrefillKernel::FlashSm90Ftz] {
            assert!(times_prefill(kernel, 16_384, 0, H200, Dtype::Bf16));
            assert!(times_prefill(kernel, 16_384, 12_288, H200, Dtype::Bf16));
            assert!(!times_prefill(kernel, 16_384, 0, A100, Dtype::Bf16));
        }
        assert!(times_prefill(PrefillKernel::Flash128W4, 16_384, 0, A100, Dtype::Bf16));
    }

    #[test]
    fn the_general_kernel_is_timed_on_the_whole_4k_prefill_only_and_alone_in_fp32() {
        assert!(times_prefill(PrefillKernel::General, 4096, 0, H200, Dtype::Bf16));
        assert!(!times_prefill(PrefillKernel::General, 16_384, 0, H200, Dtype::Bf16));
        assert!(!times_prefill(PrefillKernel::General, 4096, 3072, H200, Dtype::Bf16));
        assert!(times_prefill(PrefillKernel::General, 4096, 0, H200, Dtype::Fp32));
        assert!(!times_prefill(PrefillKernel::FlashSm90, 4096, 0, H200, Dtype::Fp32));
    }

    #[test]
    fn a_pool_ranks_block_is_timed_on_the_fastest_kernels_only() {
        assert!(!times_prefill(PrefillKernel::Flash128, 4096, 3072, H200, Dtype::Bf16));
        assert!(!times_prefill(PrefillKernel::Flash64, 4096, 3072, H200, Dtype::Bf16));
        assert!(times_prefill(PrefillKernel::Flash128W4, 4096, 3072, H200, Dtype::Bf16));
    }
}
