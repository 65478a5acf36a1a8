//! Decode attention (one query per sequence) by split-KV, and the merge of
//! two partial attention results by their log-sum-exp.
//!
//! The cache rows of each (sequence, head group) are cut into chunks that
//! fill the SMs in whole waves ([`decode_splits`]); `decode_rows` (head_dim
//! a multiple of 8, 16-bit types: a block streams whole cache rows of
//! several heads) or `decode_partial` (any head_dim) computes each chunk's
//! normalised output and log-sum-exp, and `decode_combine` merges them.
//! With the step scalars the chunks are laid out for the cache's capacity
//! and the length is read on the device, so a recorded step replays at any
//! length: this module must not bake a step's length into such a launch.

use super::super::contract::{self, DecodeCombineArgs, DecodePartialArgs, DecodeRowsArgs, MergePartialsArgs, DECODE_ROWS_THREADS, DECODE_THREADS};
use super::super::launch::{DevPtr, Holds};
use super::super::memory::CudaBuf;
use super::super::CudaBackend;
use super::{check, expect_f32, same_dtype, shape_err, to_i32};
use crate::backend::{BackendError, DecodeShape, Dtype, Result};

/// The largest head_dim the decode kernels handle (32 threads of 8 elements per row).
const DECODE_MAX_D: usize = 256;

/// Threads of `decode_combine` and of `merge_partials` (8 rows of one warp each).
const COMBINE_THREADS: u32 = 128;
const MERGE_THREADS: u32 = 256;

/// Split-KV decode attention over `s.len` rows, or with `from_step` over
/// the step's length read on the device, the chunks laid out for `s.cap`.
pub(super) fn attention(be: &CudaBackend, q: &CudaBuf, k_cache: &CudaBuf, v_cache: &CudaBuf, s: DecodeShape, from_step: bool) -> Result<(CudaBuf, CudaBuf)> {
    let width = s.heads * s.head_dim;
    check("decode q", q.len(), s.nseq * width)?;
    check("decode k cache", k_cache.len(), s.nseq * s.cap * width)?;
    check("decode v cache", v_cache.len(), s.nseq * s.cap * width)?;
    let len_ptr = if from_step { super::step::step_len_ptr(be)? } else { 0 };
    // The length the chunks are laid out for.
    let span = if from_step { s.cap } else { s.len };
    if s.len > s.cap && !from_step {
        return Err(shape_err(format!("decode len {} exceeds cache capacity {}", s.len, s.cap)));
    }
    let dtype = same_dtype("decode", &[q, k_cache, v_cache])?;
    if s.head_dim > DECODE_MAX_D {
        return Err(BackendError::Unsupported(format!("decode attention supports head_dim up to {DECODE_MAX_D}, got {}", s.head_dim)));
    }
    let out = be.alloc(dtype, s.nseq * width)?;
    let lse = be.alloc(Dtype::Fp32, s.nseq * s.heads)?;
    if s.nseq == 0 || s.heads == 0 || s.head_dim == 0 {
        return Ok((out, lse));
    }
    if s.nseq > 65_535 || s.heads > 65_535 {
        return Err(shape_err(format!("decode: {} sequences x {} heads exceed the grid limit", s.nseq, s.heads)));
    }
    // Row-major kernel when a block can cover whole 16-byte head rows:
    // a block streams contiguous cache rows of `hg` heads.
    let tpr_rows = s.head_dim / 8;
    let rows_kernel = s.head_dim % 8 == 0 && tpr_rows.is_power_of_two() && tpr_rows <= 32 && dtype != Dtype::Fp32;
    let hg = if rows_kernel { (DECODE_ROWS_THREADS as usize / tpr_rows).min(s.heads) } else { 0 };
    let rows_kernel = rows_kernel && (hg * tpr_rows) % 32 == 0;
    let head_groups = if rows_kernel { s.heads.div_ceil(hg) } else { s.heads };
    // Blocks per SM at a time: 1 for the row-major kernel's 512-thread
    // blocks, which measured fastest on an H200; 4 for the 128-thread one.
    let per_sm = if rows_kernel { 1 } else { 4 };
    let pairs = s.nseq * s.heads;
    let nsplit = decode_splits(span, s.nseq * head_groups, per_sm * be.sm_count as usize);
    let chunk = if nsplit == 0 { 0 } else { span.div_ceil(nsplit) };
    let nsplit = if chunk == 0 { 0 } else { span.div_ceil(chunk) };
    let part_o = be.alloc(Dtype::Fp32, (pairs * nsplit * s.head_dim).max(1))?;
    let part_lse = be.alloc(Dtype::Fp32, (pairs * nsplit).max(1))?;
    let (q_p, k_p, v_p, po, pl) = (DevPtr::of(q), DevPtr::of(k_cache), DevPtr::of(v_cache), DevPtr::of(&part_o), DevPtr::of(&part_lse));
    let (cap, len, heads, d) = (to_i32("cap", s.cap)?, to_i32("len", s.len)?, to_i32("heads", s.heads)?, to_i32("head_dim", s.head_dim)?);
    let (chunk, nsplit_i) = (to_i32("chunk", chunk)?, to_i32("splits", nsplit)?);
    let len_ptr = DevPtr::raw(len_ptr, Holds::I32);
    let scale_log2 = std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt();
    // SAFETY (all three launches): q holds nseq rows and the caches nseq ×
    // cap rows of `width` (checked above); the chunks cover at most `span`
    // <= cap rows (a length read from the step is clipped to cap on the
    // device); the partial buffers hold pairs × nsplit chunks.
    if nsplit > 0 && rows_kernel {
        let args = DecodeRowsArgs { q: q_p, kc: k_p, vc: v_p, part_o: po, part_lse: pl, cap, len, len_ptr, heads, d, hg: hg as i32, chunk, scale_log2 };
        unsafe { be.launch(&contract::DECODE_ROWS, dtype, (nsplit as u32, head_groups as u32, s.nseq as u32), (hg * tpr_rows) as u32, &args) }?;
    } else if nsplit > 0 {
        // Threads per head row: eight elements each, a power of two up to 32.
        let tpr = s.head_dim.div_ceil(8).next_power_of_two() as i32;
        let args = DecodePartialArgs { q: q_p, kc: k_p, vc: v_p, part_o: po, part_lse: pl, cap, len, len_ptr, heads, d, tpr, chunk, scale_log2 };
        unsafe { be.launch(&contract::DECODE_PARTIAL, dtype, (nsplit as u32, s.heads as u32, s.nseq as u32), DECODE_THREADS, &args) }?;
    }
    let args = DecodeCombineArgs { part_o: po, part_lse: pl, out: DevPtr::of(&out), lse: DevPtr::of(&lse), nsplit: nsplit_i, heads, d };
    unsafe { be.launch(&contract::DECODE_COMBINE, dtype, (s.heads as u32, s.nseq as u32, 1), COMBINE_THREADS, &args) }?;
    Ok((out, lse))
}

/// Chunks per (sequence, head group) for split-KV decode over `span` rows,
/// with `groups` (sequence, head group) pairs and `slots` blocks running at
/// once: the count that minimises waves × (rows per chunk + a 64-row
/// per-block overhead), none under 64 rows. Filling the slots exactly
/// matters: 16 sequences at 9 chunks each make 144 blocks on 132 SMs, and
/// the 12 left over double the kernel's time.
fn decode_splits(span: usize, groups: usize, slots: usize) -> usize {
    if span == 0 || groups == 0 {
        return 0;
    }
    let slots = slots.max(1);
    let most = span.div_ceil(64).clamp(1, 4 * slots);
    (1..=most).min_by_key(|&n| (groups * n).div_ceil(slots) * (span.div_ceil(n) + 64)).unwrap_or(1)
}

pub(super) fn merge_partials(be: &CudaBackend, o: &mut CudaBuf, lse: &mut CudaBuf, o2: &CudaBuf, lse2: &CudaBuf, rows: usize, head_dim: usize) -> Result<()> {
    check("merge o", o.len(), rows * head_dim)?;
    check("merge o2", o2.len(), rows * head_dim)?;
    check("merge lse", lse.len(), rows)?;
    check("merge lse2", lse2.len(), rows)?;
    let dtype = same_dtype("merge", &[o, o2])?;
    expect_f32("merge lse", lse)?;
    expect_f32("merge lse2", lse2)?;
    if rows == 0 {
        return Ok(());
    }
    let grid = rows.div_ceil(8).min(i32::MAX as usize) as u32;
    let args = MergePartialsArgs { o: DevPtr::of(o), lse: DevPtr::of(lse), o2: DevPtr::of(o2), lse2: DevPtr::of(lse2), rows: rows as u64, d: head_dim as u64 };
    // SAFETY: one warp per row: the outputs hold rows × head_dim values
    // and the log-sum-exps `rows` (checked above).
    unsafe { be.launch(&contract::MERGE_PARTIALS, dtype, grid, MERGE_THREADS, &args) }
}

#[cfg(test)]
mod tests {
    use super::decode_splits;

    #[test]
    fn decode_splits_fill_the_slots_in_whole_waves() {
        // 4 sequences at 64K: 33 chunks each, 132 blocks on 132 SMs.
        assert_eq!(decode_splits(65_664, 4, 132), 33);
        // 16 sequences at 16K: 8 chunks (128 blocks), not 9 (144: two waves).
        assert_eq!(decode_splits(16_512, 16, 132), 8);
        // 64 sequences at 4K: 2 chunks (128 blocks).
        assert_eq!(decode_splits(4_224, 64, 132), 2);
        // Short caches are not cut under 64 rows; nothing to do gives no chunks.
        assert_eq!(decode_splits(100, 1, 132), 2);
        assert_eq!(decode_splits(0, 4, 132), 0);
        assert_eq!(decode_splits(5000, 0, 132), 0);
    }
}
