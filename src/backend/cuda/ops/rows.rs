//! Row copies: splitting fused QKV (with the rotary embedding of q and k
//! fused into the split where the model has one), gathering and scattering
//! row runs. The copies move bytes, so one kernel serves every dtype; the
//! rotating split computes, in the buffers' dtype. This module
//! must not upload a row table while a step is being recorded (it refuses).

use super::super::contract::{self, CopyRowRunsArgs, CopyRowRunsInlineArgs, CopyRowsStridedArgs, RunTable, SplitQkvRopeArgs, COPY_TILE_BYTES, INLINE_RUNS, ROPE_MAX_HALF};
use super::super::launch::{DevPtr, Holds, THREADS};
use super::super::memory::CudaBuf;
use super::super::CudaBackend;
use super::{check, same_dtype, shape_err};
use crate::backend::{BackendError, QkvSplit, Result, RopePositions, RowCopy, RowRun};
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

/// The split of fused QKV rows: three pitched byte copies, or with a
/// rotation one pass of `split_qkv_rope` that rotates q and k as it writes them.
pub(super) fn split_qkv(be: &CudaBackend, qkv: &CudaBuf, rows: usize, split: &QkvSplit) -> Result<(CudaBuf, CudaBuf, CudaBuf)> {
    let (qw, kw) = (split.q_width, split.kv_width);
    let width = qw + 2 * kw;
    check("split_qkv", qkv.len(), rows * width)?;
    let dtype = qkv.dtype();
    let es = dtype.size_bytes();
    let parts = [be.alloc(dtype, rows * qw)?, be.alloc(dtype, rows * kw)?, be.alloc(dtype, rows * kw)?];
    if rows == 0 || width == 0 {
        let [q, k, v] = parts;
        return Ok((q, k, v));
    }
    if let Some(rope) = &split.rope {
        rope_split(be, qkv, rows, split, rope, &parts)?;
    } else {
        for (part, (at, w)) in parts.iter().zip([(0, qw), (qw, kw), (qw + kw, kw)]) {
            if w == 0 {
                continue;
            }
            let args = CopyRowsStridedArgs {
                dst: DevPtr::of(part),
                dst_pitch: (w * es) as u64,
                src: DevPtr::of_at(qkv, at * es),
                src_pitch: (width * es) as u64,
                row_bytes: (w * es) as u64,
                rows: rows as u64,
            };
            // SAFETY: `rows` rows of `w` elements: the part holds them
            // densely, `qkv` holds them at pitch `width` from column `at`
            // (checked above).
            unsafe { be.launch(&contract::COPY_ROWS_STRIDED, dtype, copy_grid(be, rows, w * es), THREADS, &args) }?;
        }
    }
    let [q, k, v] = parts;
    Ok((q, k, v))
}

/// One launch of `split_qkv_rope` into `parts` (q, k, v, allocated for `rows`).
fn rope_split(be: &CudaBackend, qkv: &CudaBuf, rows: usize, split: &QkvSplit, rope: &crate::backend::Rope, parts: &[CudaBuf; 3]) -> Result<()> {
    let dh = rope.head_dim;
    if dh == 0 || dh % 2 != 0 || dh > 2 * ROPE_MAX_HALF as usize || split.q_width % dh != 0 || split.kv_width % dh != 0 {
        return Err(BackendError::Unsupported(format!("rope: head_dim {dh} must be even, at most {} and divide the widths {} and {}", 2 * ROPE_MAX_HALF, split.q_width, split.kv_width)));
    }
    // The kernel takes up to two segments per sequence (a pool block's zigzag pair).
    let (step, per_seq, segs) = match rope.positions {
        RopePositions::Step => (super::step::step_ptr(be)?, 1, [(0, 1), (0, 0)]),
        RopePositions::Segments(segs) if (1..=2).contains(&segs.len()) => {
            let per_seq: usize = segs.iter().map(|s| s.1).sum();
            (0, per_seq, [segs[0], segs.get(1).copied().unwrap_or((0, 0))])
        }
        RopePositions::Segments(segs) => return Err(BackendError::Unsupported(format!("rope: {} position segments per sequence (the kernel takes 1 or 2)", segs.len()))),
    };
    if per_seq == 0 || rows % per_seq != 0 {
        return Err(shape_err(format!("rope: {rows} rows are not whole sequences of {per_seq} positions")));
    }
    let int = |what: &str, v: usize| super::to_i32(what, v);
    let table = super::dense::rope_table(be, dh, rope.theta)?;
    let args = SplitQkvRopeArgs {
        q: DevPtr::of(&parts[0]),
        k: DevPtr::of(&parts[1]),
        v: DevPtr::of(&parts[2]),
        qkv: DevPtr::of(qkv),
        inv_freq: DevPtr::raw(table, Holds::F64),
        step: DevPtr::raw(step, Holds::I32),
        rows: rows as u64,
        q_width: int("q width", split.q_width)?,
        kv_width: int("kv width", split.kv_width)?,
        head_dim: int("head_dim", dh)?,
        per_seq: int("positions per sequence", per_seq)?,
        seg0_start: int("segment start", segs[0].0)?,
        seg0_len: int("segment length", segs[0].1)?,
        seg1_start: int("segment start", segs[1].0)?,
    };
    // SAFETY: q, k and v hold `rows` rows of their widths and `qkv` rows of
    // the three (checked by the caller); the table holds head_dim/2
    // frequencies; the step scalars were set when `step` is non-null.
    unsafe { be.launch(&contract::SPLIT_QKV_ROPE, qkv.dtype(), rows.min(65_535 * 16) as u32, THREADS, &args) }
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
