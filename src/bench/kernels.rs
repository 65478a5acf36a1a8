//! `fapool bench kernels`: the kernels that matter for speed, on one GPU,
//! on device-generated random data in the backend's dtype: causal prefill
//! attention (32 heads of 128, one sequence, every kernel variant), one
//! decode step against the same context, cuBLAS GEMMs on dense-4l's shapes,
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

/// Times every kernel row for each context length of `seq_lens`, `iters`
/// timed calls each. FLOPs of causal attention are counted as
/// 2·2·S²·D·H / 2; bytes of decode attention as the K and V read once.
pub fn run(b: &CudaBackend, seq_lens: &[usize], iters: usize) -> Result<Vec<Row>> {
    b.load_all_kernels()?;
    let dt = b.dtype();
    let (heads, hd) = (32usize, 128usize);
    let width = heads * hd;
    let mut rows = Vec::new();
    let before = b.prefill_kernel();
    for &s in seq_lens {
        let q = b.random_uniform(dt, s * width, 1, 1.0)?;
        let k = b.random_uniform(dt, s * width, 2, 1.0)?;
        let v = b.random_uniform(dt, s * width, 3, 1.0)?;
        let shape = PrefillShape { nseq: 1, sq: s, skv: s, kv_seq_stride: s, heads, head_dim: hd, q_offset: 0 };
        let flops = 2.0 * 2.0 * (s as f64).powi(2) * hd as f64 * heads as f64 / 2.0;
        for kernel in [PrefillKernel::Flash128, PrefillKernel::Flash64, PrefillKernel::Flash128W4, PrefillKernel::General] {
            if dt == Dtype::Fp32 && kernel != PrefillKernel::General {
                continue;
            }
            // The scalar kernel takes seconds per call beyond 16K tokens.
            if kernel == PrefillKernel::General && s > 16_384 {
                continue;
            }
            b.set_prefill_kernel(kernel);
            let secs = time_with_marks(b, WARMUP, iters, || b.attention_prefill(&q, &k, &v, shape).map(|_| ()))?;
            rows.push(row(format!("prefill attention [{}]", kernel.name()), format!("S {s}, {heads}x{hd}, causal"), secs, flops / secs / 1e12, "TFLOP/s"));
        }
        b.set_prefill_kernel(before);
        // One decode step at the end of this context.
        let qd = b.random_uniform(dt, width, 4, 1.0)?;
        let ds = DecodeShape { nseq: 1, cap: s, len: s, heads, head_dim: hd };
        let secs = time_with_marks(b, WARMUP, iters, || b.attention_decode(&qd, &k, &v, ds).map(|_| ()))?;
        let bytes = 2.0 * s as f64 * width as f64 * dt.size_bytes() as f64;
        rows.push(row("decode attention (split-KV)", format!("len {s}, {heads}x{hd}"), secs, bytes / secs / 1e12, "TB/s"));
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
