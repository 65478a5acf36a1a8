//! Row copies: splitting fused QKV, gathering and scattering row runs.
//! The kernels move bytes, so one kernel serves every dtype. This module
//! must not upload a row table while a step is being recorded (it refuses).

use super::super::contract::{self, CopyRowRunsArgs, CopyRowRunsInlineArgs, CopyRowsStridedArgs, RunTable, COPY_TILE_BYTES, INLINE_RUNS};
use super::super::launch::{DevPtr, Holds, THREADS};
use super::super::memory::CudaBuf;
use super::super::CudaBackend;
use super::{check, same_dtype, shape_err};
use crate::backend::{Result, RowCopy, RowRun};
use cudarc::driver::DevicePtr;

/// Blocks of a copy of `tiles` tiles of `COPY_TILE_BYTES`: one per tile,
/// at most 16 per multiprocessor (the blocks stride over the rest).
fn grid_for(be: &CudaBackend, tiles: usize) -> u32 {
    tiles.clamp(1, 16 * be.sm_count as usize) as u32
}

/// Blocks of a strided row copy: each row is cut into tiles on its own.
fn copy_grid(be: &CudaBackend, rows: usize, row_bytes: usize) -> u32 {
    grid_for(be, rows * row_bytes.div_ceil(COPY_TILE_BYTES))
}

pub(super) fn split_qkv(be: &CudaBackend, qkv: &CudaBuf, rows: usize, width: usize) -> Result<(CudaBuf, CudaBuf, CudaBuf)> {
    check("split_qkv", qkv.len(), rows * 3 * width)?;
    let es = qkv.dtype().size_bytes();
    let parts = [be.alloc(qkv.dtype(), rows * width)?, be.alloc(qkv.dtype(), rows * width)?, be.alloc(qkv.dtype(), rows * width)?];
    if rows > 0 && width > 0 {
        let grid = copy_grid(be, rows, width * es);
        for (i, part) in parts.iter().enumerate() {
            let args = CopyRowsStridedArgs {
                dst: DevPtr::of(part),
                dst_pitch: (width * es) as u64,
                src: DevPtr::of_at(qkv, i * width * es),
                src_pitch: (3 * width * es) as u64,
                row_bytes: (width * es) as u64,
                rows: rows as u64,
            };
            // SAFETY: `rows` rows of `width` elements: the part holds them
            // densely, `qkv` holds them at pitch 3 × width from column
            // block `i` (checked above).
            unsafe { be.launch(&contract::COPY_ROWS_STRIDED, qkv.dtype(), grid, THREADS, &args) }?;
        }
    }
    let [q, k, v] = parts;
    Ok((q, k, v))
}

pub(super) fn gather_rows(be: &CudaBackend, src: &CudaBuf, cols: usize, runs: &[RowRun]) -> Result<CudaBuf> {
    let total: usize = runs.iter().map(|r| r.len).sum();
    let mut table = Vec::with_capacity(runs.len() * 4);
    let mut at = 0usize;
    for run in runs {
        check("gather_rows", src.len(), (run.start + run.len) * cols)?;
        if run.len > 0 {
            table.extend_from_slice(&[run.start as u64, at as u64, run.len as u64, at as u64]);
        }
        at += run.len;
    }
    let out = be.alloc(src.dtype(), total * cols)?;
    // SAFETY: every run lies inside `src` (checked above) and `out` holds
    // the `total` rows the runs fill.
    unsafe { copy_row_runs(be, &out, src, cols * src.dtype().size_bytes(), &table, total) }?;
    Ok(out)
}

pub(super) fn scatter_rows(be: &CudaBackend, dst: &mut CudaBuf, cols: usize, runs: &[RowRun], src: &CudaBuf) -> Result<()> {
    same_dtype("scatter_rows", &[dst, src])?;
    let mut table = Vec::with_capacity(runs.len() * 4);
    let mut at = 0usize;
    for run in runs {
        check("scatter_rows dst", dst.len(), (run.start + run.len) * cols)?;
        check("scatter_rows src", src.len(), (at + run.len) * cols)?;
        if run.len > 0 {
            table.extend_from_slice(&[at as u64, run.start as u64, run.len as u64, at as u64]);
        }
        at += run.len;
    }
    // SAFETY: every run lies inside `dst` and its rows inside `src` (checked above).
    unsafe { copy_row_runs(be, dst, src, cols * src.dtype().size_bytes(), &table, at) }
}

pub(super) fn copy_rows(be: &CudaBackend, dst: &mut CudaBuf, cols: usize, src: &CudaBuf, copies: &[RowCopy]) -> Result<()> {
    same_dtype("copy_rows", &[dst, src])?;
    let mut table = Vec::with_capacity(copies.len() * 4);
    let mut at = 0usize;
    for c in copies {
        check("copy_rows src", src.len(), (c.src + c.len) * cols)?;
        check("copy_rows dst", dst.len(), (c.dst + c.len) * cols)?;
        if c.len > 0 {
            table.extend_from_slice(&[c.src as u64, c.dst as u64, c.len as u64, at as u64]);
        }
        at += c.len;
    }
    // SAFETY: every copy lies inside `src` and `dst` (checked above).
    unsafe { copy_row_runs(be, dst, src, cols * src.dtype().size_bytes(), &table, at) }
}

/// Copies row runs between two buffers of rows of `row_bytes`. `table`
/// holds (src_row, dst_row, len, first_flat_row) per non-empty run.
///
/// # Safety
/// Every run of `table` lies inside `src` (source rows) and `dst`
/// (destination rows), and the runs cover `total_rows` flat rows.
unsafe fn copy_row_runs(be: &CudaBackend, dst: &CudaBuf, src: &CudaBuf, row_bytes: usize, table: &[u64], total_rows: usize) -> Result<()> {
    if total_rows == 0 || row_bytes == 0 {
        return Ok(());
    }
    let nruns = (table.len() / 4) as i32;
    // The runs are one stream of bytes, cut into tiles across run ends.
    let grid = grid_for(be, (total_rows * row_bytes).div_ceil(COPY_TILE_BYTES));
    if table.len() <= 4 * INLINE_RUNS {
        // Small tables travel as a kernel argument: no upload, so the copy
        // can be recorded.
        let mut inline = RunTable([0; 4 * INLINE_RUNS]);
        inline.0[..table.len()].copy_from_slice(table);
        let args = CopyRowRunsInlineArgs { dst: DevPtr::of(dst), src: DevPtr::of(src), row_bytes: row_bytes as u64, runs: inline, nruns, total_rows: total_rows as u64 };
        // SAFETY: the caller's promise on the runs; the table is passed by value.
        return unsafe { be.launch(&contract::COPY_ROW_RUNS_INLINE, src.dtype(), grid, THREADS, &args) };
    }
    if be.is_recording() {
        return Err(shape_err(format!("{nruns} row runs cannot be recorded (at most {INLINE_RUNS})")));
    }
    let runs = be.stream.clone_htod(table)?;
    let (runs_ptr, _s) = runs.device_ptr(&be.stream);
    let args = CopyRowRunsArgs { dst: DevPtr::of(dst), src: DevPtr::of(src), row_bytes: row_bytes as u64, runs: DevPtr::raw(runs_ptr, Holds::U64), nruns, total_rows: total_rows as u64 };
    // SAFETY: the caller's promise on the runs; `runs` holds the whole
    // table and is freed on the stream after the kernel.
    unsafe { be.launch(&contract::COPY_ROW_RUNS, src.dtype(), grid, THREADS, &args) }?;
    Ok(())
}
