//! The mixture-of-experts operations: the router's top-k (one warp per
//! row), the permutation grouping assignments by expert (per-chunk counts,
//! a scan over the chunks, then every assignment's slot in its order, so
//! the permutation is the CPU backend's exactly), the rows' copy to their
//! slots and the weighted combine back (one warp per row), and one cuBLAS
//! GEMM per expert over its contiguous rows. Index buffers are f32 buffers
//! of integral values (see `backend`); the kernels' integer tables are
//! 4-byte buffers passed as `int*`.

use super::super::contract::{self, CombineRowsArgs, ExpertCountArgs, ExpertOffsetsArgs, ExpertPlaceArgs, PermuteRowsArgs, RouterTopKArgs};
use super::super::ffi::{self, Gemm};
use super::super::launch::{DevPtr, Holds};
use super::super::memory::CudaBuf;
use super::super::{CudaBackend, CudaError};
use super::dense::cuda_data_type;
use super::{check, same_dtype, shape_err, to_i32};
use crate::backend::{BackendError, Dtype, Result};

/// Rows an f32 index holds exactly.
const EXACT_INDEX: usize = 1 << 24;

fn expect_index(what: &str, b: &CudaBuf) -> Result<()> {
    if b.dtype() != Dtype::Fp32 {
        return Err(shape_err(format!("{what}: index and weight buffers are f32, got {}", b.dtype())));
    }
    Ok(())
}

fn within(what: &str, v: usize, limit: usize, of: &str) -> Result<()> {
    if v > limit {
        return Err(BackendError::Unsupported(format!("{what}: {v} {of} exceed the kernels' {limit}")));
    }
    Ok(())
}

/// Blocks of warp-per-row kernels for `rows` rows, at most 32 per SM (the
/// kernels stride over the rest).
fn warp_grid(be: &CudaBackend, rows: usize, threads: u32) -> u32 {
    let per_block = (threads / 32) as usize;
    rows.div_ceil(per_block).clamp(1, be.sm_count() as usize * 32) as u32
}

pub(super) fn router_top_k(be: &CudaBackend, logits: &CudaBuf, rows: usize, experts: usize, k: usize) -> Result<(CudaBuf, CudaBuf)> {
    check("router_top_k logits", logits.len(), rows * experts)?;
    if k == 0 || k > experts {
        return Err(shape_err(format!("router_top_k: top {k} of {experts} experts")));
    }
    within("router_top_k", experts, contract::MOE_MAX_EXPERTS, "experts")?;
    within("router_top_k", k, contract::MOE_MAX_TOP_K, "chosen experts")?;
    let (ids, weights) = (be.alloc(Dtype::Fp32, rows * k)?, be.alloc(Dtype::Fp32, rows * k)?);
    if rows == 0 {
        return Ok((ids, weights));
    }
    let per_block = (contract::MOE_ROUTER_THREADS / 32) as usize;
    let blocks = u32::try_from(rows.div_ceil(per_block)).map_err(|_| shape_err(format!("router_top_k: {rows} rows exceed the grid")))?;
    let args = RouterTopKArgs { logits: DevPtr::of(logits), ids: DevPtr::of(&ids), weights: DevPtr::of(&weights), rows: rows as u64, experts: experts as i32, k: k as i32 };
    // SAFETY: one warp per row, each reading its `experts` logits (the
    // buffer holds rows × experts, checked) and writing its `k` ids and
    // weights (both rows × k); rows past `rows` return at once.
    unsafe { be.launch(&contract::ROUTER_TOP_K, logits.dtype(), blocks, contract::MOE_ROUTER_THREADS, &args) }?;
    Ok((ids, weights))
}

pub(super) fn expert_slots(be: &CudaBackend, ids: &CudaBuf, n: usize, experts: usize, capacity: Option<usize>) -> Result<(CudaBuf, Vec<usize>)> {
    check("expert_slots ids", ids.len(), n)?;
    expect_index("expert_slots", ids)?;
    within("expert_slots", experts, contract::MOE_MAX_EXPERTS, "experts")?;
    within("expert_slots", n, EXACT_INDEX, "assignments")?;
    let slots = be.alloc(Dtype::Fp32, n)?;
    if n == 0 || experts == 0 {
        return Ok((slots, vec![0; experts]));
    }
    let capacity = match capacity {
        Some(c) => to_i32("expert_slots capacity", c.min(EXACT_INDEX))?,
        None => -1,
    };
    let chunks = n.div_ceil(contract::MOE_CHUNK);
    // 4-byte integer tables: per chunk and expert, then per expert.
    let counts = be.alloc(Dtype::Fp32, chunks * experts)?;
    let (totals, starts) = (be.alloc(Dtype::Fp32, experts)?, be.alloc(Dtype::Fp32, experts)?);
    let int = |b: &CudaBuf| DevPtr::raw(b.device_ptr(), Holds::I32);
    let (experts_i, chunks_i) = (experts as i32, to_i32("expert_slots chunks", chunks)?);
    let count = ExpertCountArgs { ids: DevPtr::of(ids), counts: int(&counts), n: n as u64, experts: experts_i };
    // SAFETY: block c reads ids c·CHUNK.. (bounded by n, which `ids` holds)
    // and writes row c of `counts` (chunks × experts ints).
    unsafe { be.launch(&contract::EXPERT_COUNT, Dtype::Fp32, chunks_i as u32, contract::MOE_CHUNK_THREADS, &count) }?;
    let offsets = ExpertOffsetsArgs { counts: int(&counts), totals: int(&totals), starts: int(&starts), chunks: chunks_i, experts: experts_i, capacity };
    // SAFETY: one block, thread e touching column e of `counts` and entry e
    // of `totals` and `starts` (experts ints each, experts <= the block).
    unsafe { be.launch(&contract::EXPERT_OFFSETS, Dtype::Fp32, 1u32, contract::MOE_MAX_EXPERTS as u32, &offsets) }?;
    let place = ExpertPlaceArgs { ids: DevPtr::of(ids), slots: DevPtr::of(&slots), counts: int(&counts), starts: int(&starts), n: n as u64, experts: experts_i, capacity };
    // SAFETY: block c reads the ids and writes the slots of its chunk
    // (bounded by n; both hold n), and reads row c of `counts` and `starts`.
    unsafe { be.launch(&contract::EXPERT_PLACE, Dtype::Fp32, chunks_i as u32, contract::MOE_CHUNK_THREADS, &place) }?;
    let totals = be.download_u32(&totals, experts)?;
    Ok((slots, totals.into_iter().map(|t| t as usize).collect()))
}

pub(super) fn permute_to_experts(be: &CudaBackend, x: &CudaBuf, cols: usize, slots: &CudaBuf, rows: usize, k: usize, kept: usize) -> Result<CudaBuf> {
    check("permute_to_experts x", x.len(), rows * cols)?;
    check("permute_to_experts slots", slots.len(), rows * k)?;
    expect_index("permute_to_experts", slots)?;
    let out = be.alloc(x.dtype(), kept * cols)?;
    if rows * k == 0 || cols == 0 || kept == 0 {
        return Ok(out);
    }
    let args = PermuteRowsArgs {
        out: DevPtr::of(&out),
        x: DevPtr::of(x),
        slots: DevPtr::of(slots),
        n: (rows * k) as u64,
        k: to_i32("permute_to_experts k", k)?,
        row_bytes: (cols * x.dtype().size_bytes()) as u64,
        kept: kept as u64,
    };
    // SAFETY: a warp per assignment a < rows·k reads slot a (the buffer
    // holds rows·k) and row a / k < rows of `x`, and writes row s of `out`
    // only for 0 <= s < kept (the kernel skips any other slot); `out` holds
    // kept rows.
    unsafe { be.launch(&contract::PERMUTE_ROWS, x.dtype(), warp_grid(be, rows * k, contract::MOE_ROWS_THREADS), contract::MOE_ROWS_THREADS, &args) }?;
    Ok(out)
}

pub(super) fn combine_from_experts(be: &CudaBackend, y: &CudaBuf, cols: usize, slots: &CudaBuf, weights: &CudaBuf, rows: usize, k: usize) -> Result<CudaBuf> {
    check("combine_from_experts slots", slots.len(), rows * k)?;
    check("combine_from_experts weights", weights.len(), rows * k)?;
    expect_index("combine_from_experts slots", slots)?;
    expect_index("combine_from_experts weights", weights)?;
    let out = be.alloc(y.dtype(), rows * cols)?;
    if rows == 0 || cols == 0 {
        return Ok(out);
    }
    let y_rows = y.len().checked_div(cols).unwrap_or(0);
    let args = CombineRowsArgs {
        out: DevPtr::of(&out),
        y: DevPtr::of(y),
        slots: DevPtr::of(slots),
        weights: DevPtr::of(weights),
        rows: rows as u64,
        k: to_i32("combine_from_experts k", k)?,
        cols: cols as u64,
        y_rows: y_rows as u64,
    };
    // SAFETY: a warp per token row t < rows reads slots and weights t·k..
    // (rows·k each), rows s < y_rows of `y` only (the kernel skips other
    // slots; y holds y_rows × cols) and writes row t of `out` (rows × cols).
    unsafe { be.launch(&contract::COMBINE_ROWS, y.dtype(), warp_grid(be, rows, contract::MOE_ROWS_THREADS), contract::MOE_ROWS_THREADS, &args) }?;
    Ok(out)
}

pub(super) fn grouped_matmul(be: &CudaBackend, x: &CudaBuf, w: &CudaBuf, groups: &[usize], k: usize, n: usize) -> Result<CudaBuf> {
    let m: usize = groups.iter().sum();
    check("grouped_matmul x", x.len(), m * k)?;
    check("grouped_matmul w", w.len(), groups.len() * k * n)?;
    let dtype = same_dtype("grouped_matmul", &[x, w])?;
    if m == 0 || n == 0 || k == 0 {
        return be.zeros_of(dtype, m * n);
    }
    let out = be.alloc(dtype, m * n)?;
    let (ki, ni) = (to_i32("grouped_matmul k", k)?, to_i32("grouped_matmul n", n)?);
    let es = dtype.size_bytes() as u64;
    let mut at = 0usize;
    for (g, &rows) in groups.iter().enumerate() {
        if rows > 0 {
            let mi = to_i32("grouped_matmul group rows", rows)?;
            // Row-major C_g = X_g W_g as column-major C_g^T = W_g^T X_g^T (see `dense::matmul`).
            let gemm = Gemm {
                m: ni,
                n: mi,
                k: ki,
                a: w.device_ptr() + (g * k * n) as u64 * es,
                lda: ni,
                b: x.device_ptr() + (at * k) as u64 * es,
                ldb: ki,
                c: out.device_ptr() + (at * n) as u64 * es,
                ldc: ni,
                data_type: cuda_data_type(dtype),
            };
            // SAFETY: group g's rows at..at + rows of `x` (m·k elements
            // held), matrix g of `w` (groups·k·n held) and the same rows of
            // `out` (m·n), all of `dtype`; queued on the backend's stream.
            unsafe { ffi::gemm(&be.blas, &gemm) }.map_err(CudaError::from)?;
        }
        at += rows;
    }
    Ok(out)
}
