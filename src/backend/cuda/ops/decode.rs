//! Decode attention (one query per sequence) by split-KV, and the merge of
//! two partial attention results by their log-sum-exp.
//!
//! The cache rows of each (sequence, head group) are cut into chunks that
//! fill the SMs in whole waves ([`decode_splits`]); `decode_rows` (head_dim
//! a multiple of 8, 16-bit types: a block streams whole cache rows of
//! several heads), on sm_90 `decode_bulk` for chunks of [`BULK_MIN_CHUNK`]
//! rows or more (the same computation fed by bulk copies into a ring of
//! shared-memory stages), or `decode_partial` (any head_dim) computes each
//! chunk's normalised output and log-sum-exp, and `decode_combine` merges
//! them. With the step scalars the chunks are laid out for the cache's
//! capacity and the length is read on the device, so a recorded step
//! replays at any length: this module must not bake a step's length into
//! such a launch.

use super::super::contract::{self, DecodeBulkArgs, DecodeCombineArgs, DecodePartialArgs, DecodeRowsArgs, MergePartialsArgs, DECODE_COMBINE_MAX_WARPS, DECODE_ROWS_THREADS, DECODE_THREADS};
use super::super::launch::{DevPtr, Holds};
use super::super::memory::CudaBuf;
use super::super::CudaBackend;
use super::{check, expect_f32, same_dtype, shape_err, to_i32};
use crate::backend::{check_kv_heads, BackendError, DecodeShape, Dtype, Result};

/// The largest head_dim the decode kernels handle (32 threads of 8 elements per row).
const DECODE_MAX_D: usize = 256;

/// Threads of `merge_partials` (8 rows of one warp each).
const MERGE_THREADS: u32 = 256;

/// `decode_combine` gets a warp per this many chunks of a row, up to
/// [`DECODE_COMBINE_MAX_WARPS`]: a serial loop over 132 chunks waits for every
/// load in turn, and a 2-chunk combine on 256 threads cost ~9 µs at B = 64.
const CHUNKS_PER_COMBINE_WARP: usize = 4;

/// On sm_90, chunks of this many rows or more are fed by bulk copies
/// (`decode_bulk`, unless the backend's `bulk_decode` setting is off): on an H200 the bulk kernel was faster from ~500-row
/// chunks up and slower on 64-125-row ones, where a block's start-up is most
/// of its time (docs/perf-notes.md, session 8).
const BULK_MIN_CHUNK: usize = 256;

/// Split-KV decode attention over `s.len` rows, or with `from_step` over
/// the step's length read on the device, the chunks laid out for `s.cap`.
pub(super) fn attention(be: &CudaBackend, q: &CudaBuf, k_cache: &CudaBuf, v_cache: &CudaBuf, s: DecodeShape, from_step: bool) -> Result<(CudaBuf, CudaBuf)> {
    check_kv_heads("decode", s.heads, s.kv_heads)?;
    let (width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    check("decode q", q.len(), s.nseq * width)?;
    check("decode k cache", k_cache.len(), s.nseq * s.cap * kv_width)?;
    check("decode v cache", v_cache.len(), s.nseq * s.cap * kv_width)?;
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
    if s.nseq == 0 || s.heads == 0 || s.head_dim == 0 {
        return Ok((be.alloc(dtype, s.nseq * width)?, be.alloc(Dtype::Fp32, s.nseq * s.heads)?));
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
    let bulk = rows_kernel && takes_bulk_copies(be.bulk_decode, be.compute_capability, chunk);
    // One workspace: the partial outputs, then their log-sum-exps.
    let work = be.alloc(Dtype::Fp32, (pairs * nsplit * (s.head_dim + 1)).max(1))?;
    let (po, pl) = (DevPtr::of(&work), DevPtr::of_at(&work, 4 * pairs * nsplit * s.head_dim));
    let (q_p, k_p, v_p) = (DevPtr::of(q), DevPtr::of(k_cache), DevPtr::of(v_cache));
    let (cap, len, heads, d) = (to_i32("cap", s.cap)?, to_i32("len", s.len)?, to_i32("heads", s.heads)?, to_i32("head_dim", s.head_dim)?);
    let kv_heads = to_i32("kv_heads", s.kv_heads)?;
    let (chunk, nsplit_i) = (to_i32("chunk", chunk)?, to_i32("splits", nsplit)?);
    let len_ptr = DevPtr::raw(len_ptr, Holds::I32);
    let scale_log2 = std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt();
    // SAFETY (every launch below): q holds nseq rows of `width` and the
    // caches nseq × cap rows of `kv_width`, kv_heads dividing heads (checked above); the chunks cover at most `span`
    // <= cap rows (a length read from the step is clipped to cap on the
    // device); the workspace holds pairs × nsplit partial outputs and as
    // many log-sum-exps after them.
    if nsplit > 0 && bulk {
        // A producer warp more than decode_rows; the stages' shared memory comes from the contract.
        let args = DecodeBulkArgs { q: q_p, kc: k_p, vc: v_p, part_o: po, part_lse: pl, cap, len, len_ptr, heads, kv_heads, d, hg: hg as i32, chunk, scale_log2 };
        unsafe { be.launch(&contract::DECODE_BULK, dtype, (nsplit as u32, head_groups as u32, s.nseq as u32), (32 + hg * tpr_rows) as u32, &args) }?;
    } else if nsplit > 0 && rows_kernel {
        let args = DecodeRowsArgs { q: q_p, kc: k_p, vc: v_p, part_o: po, part_lse: pl, cap, len, len_ptr, heads, kv_heads, d, hg: hg as i32, chunk, scale_log2 };
        unsafe { be.launch(&contract::DECODE_ROWS, dtype, (nsplit as u32, head_groups as u32, s.nseq as u32), (hg * tpr_rows) as u32, &args) }?;
    } else if nsplit > 0 {
        // Threads per head row: eight elements each, a power of two up to 32.
        let tpr = s.head_dim.div_ceil(8).next_power_of_two() as i32;
        let args = DecodePartialArgs { q: q_p, kc: k_p, vc: v_p, part_o: po, part_lse: pl, cap, len, len_ptr, heads, kv_heads, d, tpr, chunk, scale_log2 };
        unsafe { be.launch(&contract::DECODE_PARTIAL, dtype, (nsplit as u32, s.heads as u32, s.nseq as u32), DECODE_THREADS, &args) }?;
    }
    // The outputs are allocated once the partial kernel is queued (its run
    // hides the host time).
    let (out, lse) = (be.alloc(dtype, s.nseq * width)?, be.alloc(Dtype::Fp32, s.nseq * s.heads)?);
    let combine_threads = 32 * nsplit.div_ceil(CHUNKS_PER_COMBINE_WARP).clamp(1, DECODE_COMBINE_MAX_WARPS as usize) as u32;
    let args = DecodeCombineArgs { part_o: po, part_lse: pl, out: DevPtr::of(&out), lse: DevPtr::of(&lse), nsplit: nsplit_i, heads, d };
    unsafe { be.launch(&contract::DECODE_COMBINE, dtype, (s.heads as u32, s.nseq as u32, 1), combine_threads, &args) }?;
    Ok((out, lse))
}

/// Whether chunks of `chunk` rows that the row-major kernel can take are fed
/// by bulk copies instead (`decode_bulk`): where `allowed`, on sm_90 and
/// newer, from [`BULK_MIN_CHUNK`] rows up.
fn takes_bulk_copies(allowed: bool, compute_capability: (i32, i32), chunk: usize) -> bool {
    allowed && compute_capability.0 >= 9 && chunk >= BULK_MIN_CHUNK
}

/// Chunks per (sequence, head group) for split-KV decode over `span` rows,
/// with `groups` (sequence, head group) pairs and `slots` blocks running at
/// once: the count that minimises waves × (rows per chunk + a 64-row
/// per-block overhead), none under 32 rows (one sequence at 4K then spreads
/// over 128 SMs instead of 64: 36 against 39 µs on an H200). Filling the slots exactly
/// matters: 16 sequences at 9 chunks each make 144 blocks on 132 SMs, and
/// the 12 left over double the kernel's time.
fn decode_splits(span: usize, groups: usize, slots: usize) -> usize {
    if span == 0 || groups == 0 {
        return 0;
    }
    let slots = slots.max(1);
    let most = span.div_ceil(32).clamp(1, 4 * slots);
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
    use super::{decode_splits, takes_bulk_copies};

    #[test]
    fn bulk_copies_feed_chunks_of_256_rows_or_more_on_sm_90_unless_switched_off() {
        assert!(takes_bulk_copies(true, (9, 0), 256));
        assert!(!takes_bulk_copies(true, (9, 0), 255));
        assert!(!takes_bulk_copies(true, (8, 0), 4096));
        assert!(!takes_bulk_copies(false, (9, 0), 4096));
    }

    #[test]
    fn the_checks_long_decode_shapes_reach_the_bulk_kernel_on_an_h200() {
        // One sequence of two heads (one head group) on 132 SMs: 132 chunks of
        // 257 rows (33,900 rows, eager) and 258 (a 34,000-row cache, recorded steps).
        for (span, chunk) in [(33_900, 257), (34_000, 258)] {
            let n = decode_splits(span, 1, 132);
            assert_eq!((n, span.div_ceil(n)), (132, chunk));
            assert!(takes_bulk_copies(true, (9, 0), chunk));
        }
        // dense-4l's decode at 4K does not: chunks of 32 rows.
        assert!(!takes_bulk_copies(true, (9, 0), 4096usize.div_ceil(decode_splits(4096, 1, 132))));
    }

    #[test]
    fn decode_splits_fill_the_slots_in_whole_waves() {
        // 4 sequences at 64K: 33 chunks each, 132 blocks on 132 SMs.
        assert_eq!(decode_splits(65_664, 4, 132), 33);
        // 16 sequences at 16K: 8 chunks (128 blocks), not 9 (144: two waves).
        assert_eq!(decode_splits(16_512, 16, 132), 8);
        // 64 sequences at 4K: 2 chunks (128 blocks).
        assert_eq!(decode_splits(4_224, 64, 132), 2);
        // One sequence at 4K: 128 chunks of 32 rows. Short caches are not
        // cut under 32 rows; nothing to do gives no chunks.
        assert_eq!(decode_splits(4096, 1, 132), 128);
        assert_eq!(decode_splits(100, 1, 132), 4);
        assert_eq!(decode_splits(0, 4, 132), 0);
        assert_eq!(decode_splits(5000, 0, 132), 0);
    }
}
