//! The Hopper prefill kernel's launch (`kernels/flash_sm90.cu`): the TMA
//! tensor maps it reads Q, K and V through (encoded by the driver through
//! `ffi`, cached per thread), its grid, and the launch through the contract.
//!
//! The kernel is the warp-specialised wgmma/TMA path for head_dim 128 in
//! bf16/fp16 on sm_90 devices, in two builds that differ only in the
//! softmax's exp2 (`contract::FLASH_SM90`, `contract::FLASH_SM90_FTZ`);
//! `ops::prefill` decides when one runs. This module must not choose between
//! kernels, call the driver but through `ffi`, or be reached on other
//! devices: it refuses them with the reason.

use super::args::{DevPtr, TensorMap, TensorMapBytes};
use super::contract::{FlashSm90Args, Kernel, F3_BM, F3_BN, F3_D, F3_HALF_BYTES, F3_THREADS};
use super::ffi::{self, TiledTensorMap};
use super::memory::CudaBuf;
use super::{CudaBackend, CudaError};
use crate::backend::{BackendError, Dtype, PrefillShape, Result};
use cudarc::driver::sys as drv_sys;
use std::cell::RefCell;
use std::collections::HashMap;

/// Elements of a TMA box, innermost first: 64 columns (128 bytes, the span
/// of the 128-byte swizzle) of one head, by 128 rows, of one sequence. One
/// box serves the Q block and the K/V tiles, which have as many rows.
const BOX: [u32; 4] = [64, 1, F3_BM, 1];
const _: () = assert!(F3_BM == F3_BN && 64 * 2 * F3_BM == F3_HALF_BYTES);
// The kernel's `TensorMap` is the driver's map.
const _: () = assert!(std::mem::size_of::<TensorMapBytes>() == std::mem::size_of::<drv_sys::CUtensorMap>());

/// One operand as the kernel's tensor maps see it: `[nseq][rows][heads][128]`
/// elements starting at `base`, sequences `seq_stride` rows apart, of which
/// the first `rows` exist (reads past them return zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Operand {
    base: u64,
    rows: usize,
    seq_stride: usize,
    heads: usize,
    nseq: usize,
}

/// Encoded maps by operand and dtype, per thread.
type MapCache = RefCell<HashMap<(Operand, Dtype), TensorMapBytes>>;

impl Operand {
    /// Dimensions innermost first (column, head, row, sequence) and the byte
    /// strides of the outer three. A zero extent (no keys) becomes 1: the
    /// kernel then loads nothing, but the map must still be valid.
    fn dims_and_strides(&self) -> ([u64; 4], [u64; 3]) {
        let row_bytes = 2 * F3_D as u64 * self.heads as u64;
        let dims = [F3_D as u64, self.heads as u64, self.rows.max(1) as u64, self.nseq as u64];
        (dims, [2 * F3_D as u64, row_bytes, row_bytes * self.seq_stride.max(1) as u64])
    }

    /// The map of `buf` seen as this operand, from a per-thread cache: a map
    /// is a function of the operand and the dtype alone, so a cached one is
    /// never stale (a freed buffer's address reused with the same shape maps
    /// the same bytes), and three driver calls per launch are saved.
    fn map(&self, be: &CudaBackend, buf: &CudaBuf) -> Result<TensorMap> {
        thread_local! {
            static MAPS: MapCache = Default::default();
        }
        let dtype = buf.dtype();
        let tensor = DevPtr::of(buf);
        if let Some(bytes) = MAPS.with(|c| c.borrow().get(&(*self, dtype)).copied()) {
            return Ok(TensorMap { bytes, tensor });
        }
        let bytes = self.encode(be, dtype)?;
        MAPS.with(|c| {
            let mut c = c.borrow_mut();
            // Bounded: a run sees a few shapes and the pool reuses addresses.
            if c.len() >= 256 {
                c.clear();
            }
            c.insert((*self, dtype), bytes);
        });
        Ok(TensorMap { bytes, tensor })
    }

    fn encode(&self, be: &CudaBackend, dtype: Dtype) -> Result<TensorMapBytes> {
        let data_type = match dtype {
            Dtype::Bf16 => drv_sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            Dtype::Fp16 => drv_sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            Dtype::Fp32 => return Err(CudaError::Unsupported("flash_sm90 prefill in fp32".into()).into()),
        };
        let (dims, strides) = self.dims_and_strides();
        if self.base % 16 != 0 {
            return Err(BackendError::Shape(format!("flash_sm90: operand at {:#x} is not 16-byte aligned, as TMA requires", self.base)));
        }
        if let Some(d) = dims.iter().find(|&&d| d > u32::MAX as u64) {
            return Err(BackendError::Shape(format!("flash_sm90: tensor extent {d} exceeds the 2^32 a TMA map allows")));
        }
        if strides[2] >= 1 << 40 {
            return Err(BackendError::Shape(format!("flash_sm90: sequence stride of {} bytes exceeds the 2^40 a TMA map allows", strides[2])));
        }
        let map = ffi::encode_tensor_map_tiled(
            &be.ctx,
            &TiledTensorMap {
                data_type,
                base: self.base,
                dims: &dims,
                strides: &strides,
                box_dims: &BOX,
                element_strides: &[1; 4],
                interleave: drv_sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle: drv_sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                l2_promotion: drv_sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                oob_fill: drv_sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            },
        )?;
        Ok(TensorMapBytes(map.opaque))
    }
}

/// A size as the kernel's int32 parameters take it.
fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| BackendError::Shape(format!("{what} = {v} exceeds the 32-bit range the kernels index with")))
}

/// Causal prefill attention with `kernel` (one of the Hopper builds) into
/// `out` and `lse`, which the caller allocated for the shape and checked q,
/// k and v against: same meaning as every prefill kernel (`PrefillShape`),
/// head_dim 128, bf16 or fp16, sm_90 only.
#[allow(clippy::too_many_arguments)]
pub(super) fn prefill(be: &CudaBackend, kernel: &Kernel<FlashSm90Args>, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, out: &CudaBuf, lse: &CudaBuf, s: PrefillShape) -> Result<()> {
    if be.compute_capability != (9, 0) {
        let (major, minor) = be.compute_capability;
        return Err(CudaError::Unsupported(format!("{} prefill needs an sm_90 (Hopper) device; this one is {major}.{minor}", kernel.names.base())).into());
    }
    let dtype = q.dtype();
    if s.head_dim != F3_D as usize || dtype == Dtype::Fp32 {
        return Err(CudaError::Unsupported(format!("{} prefill is for head_dim {F3_D} in bf16/fp16, got {} in {dtype}", kernel.names.base(), s.head_dim)).into());
    }
    let mblocks = s.sq.div_ceil(F3_BM as usize);
    if mblocks > i32::MAX as usize || s.heads > 65_535 || s.nseq > 65_535 {
        return Err(BackendError::Shape(format!("prefill: {mblocks} query blocks, {} heads or {} sequences exceed the grid limit", s.heads, s.nseq)));
    }
    // The kernel indexes keys as q_offset + row; both must stay in range.
    int("q_offset + sq", s.q_offset + s.sq)?;
    let tq = Operand { base: q.device_ptr(), rows: s.sq, seq_stride: s.sq, heads: s.heads, nseq: s.nseq }.map(be, q)?;
    // K and V have kv_heads heads: the kernel loads K/V head h / (heads / kv_heads) for query head h.
    let kv = |buf: &CudaBuf| Operand { base: buf.device_ptr(), rows: s.skv, seq_stride: s.kv_seq_stride, heads: s.kv_heads, nseq: s.nseq }.map(be, buf);
    let args = FlashSm90Args {
        tq,
        tk: kv(k)?,
        tv: kv(v)?,
        out: DevPtr::of(out),
        lse: DevPtr::of(lse),
        sq: int("sq", s.sq)?,
        skv: int("skv", s.skv)?,
        heads: int("heads", s.heads)?,
        kv_heads: int("kv_heads", s.kv_heads)?,
        q_offset: int("q_offset", s.q_offset)?,
        scale_log2: std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt(),
    };
    let grid = (mblocks as u32, s.heads as u32, s.nseq as u32);
    // SAFETY: the maps cover q's nseq × sq rows and k's and v's nseq ×
    // kv_seq_stride rows of kv_heads heads with skv <= kv_seq_stride and
    // kv_heads dividing heads (checked by the caller),
    // and the kernel reads only through them (reads past a map's extent
    // return zeros); out and lse hold nseq × sq rows (allocated by the
    // caller); the grid covers exactly the (query block, head, sequence)
    // triples.
    unsafe { be.launch(kernel, dtype, grid, F3_THREADS, &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_maps_see_kv_rows_up_to_skv_with_the_cache_stride() {
        // 2 sequences of a 512-row cache, 480 of them filled, 32 heads.
        let op = Operand { base: 0, rows: 480, seq_stride: 512, heads: 32, nseq: 2 };
        let (dims, strides) = op.dims_and_strides();
        assert_eq!(dims, [128, 32, 480, 2]);
        assert_eq!(strides, [256, 32 * 256, 512 * 32 * 256]);
    }

    #[test]
    fn grouped_kv_maps_have_the_kv_heads_only() {
        // Llama 3 8B's K/V: 8 heads of 128 in rows of 2 KiB.
        let (dims, strides) = Operand { base: 0, rows: 4096, seq_stride: 4096, heads: 8, nseq: 1 }.dims_and_strides();
        assert_eq!(dims, [128, 8, 4096, 1]);
        assert_eq!(strides, [256, 8 * 256, 4096 * 8 * 256]);
    }

    #[test]
    fn an_empty_kv_still_gives_a_valid_map() {
        let (dims, strides) = Operand { base: 0, rows: 0, seq_stride: 0, heads: 2, nseq: 1 }.dims_and_strides();
        assert_eq!(dims, [128, 2, 1, 1]);
        assert!(strides.iter().all(|&b| b > 0 && b % 16 == 0));
    }
}
