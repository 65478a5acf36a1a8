//! Causal prefill attention and the choice among its kernels: the general
//! one (prefill.cu: any head_dim up to 256, any dtype, scalar f32 math), the
//! tensor-core ones (flash.cu: head_dim 128, bf16/fp16, mma.sync) and on
//! sm_90 the Hopper ones (flash_sm90.cu: head_dim 128, bf16/fp16, TMA and
//! wgmma; launched by `flash_sm90`). A new variant is one [`PrefillKernel`]
//! value, its kernel declared in `contract`, and one arm in
//! [`attention_prefill`]. This module must not pick a
//! tensor-core kernel where it does not apply (it falls back to the general
//! one under `Auto`, and refuses an explicit request).

use super::super::contract::{self, FlashArgs, FlashVariant, PrefillGeneralArgs, FA_D, PREFILL_MAX_D, PREFILL_WARPS};
use super::super::launch::DevPtr;
use super::super::memory::CudaBuf;
use super::super::{flash_sm90, CudaBackend, CudaError};
use super::{check, same_dtype, shape_err, to_i32};
use crate::backend::{check_kv_heads, BackendError, Dtype, PrefillShape, Result};

/// Which prefill attention kernel runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefillKernel {
    /// The fastest tensor-core kernel wherever one applies (head_dim 128,
    /// bf16/fp16): `FlashSm90` on sm_90 (Hopper) devices, `Flash128W4`
    /// elsewhere (both measured on an H200); else the general one.
    #[default]
    Auto,
    /// Always the general kernel (scalar f32 math, any head_dim <= 256).
    General,
    /// Tensor-core kernel, 8 warps and 128 query rows per block.
    Flash128,
    /// Tensor-core kernel, 4 warps and 64 query rows per block.
    Flash64,
    /// Tensor-core kernel, 4 warps of 32 query rows each (128 per block):
    /// every K/V fragment read from shared memory feeds two MMAs.
    Flash128W4,
    /// Hopper only (sm_90a): TMA loads, wgmma, a producer and two consumer
    /// warpgroups of 64 query rows (`flash_sm90`).
    FlashSm90,
    /// `FlashSm90` with the softmax's exp2 flushing denormal results to zero
    /// (`ex2.approx.ftz`): fewer instructions per tile, probabilities below
    /// 2^-126 of the row's maximum become 0. Never chosen by `Auto`.
    FlashSm90Ftz,
}

impl PrefillKernel {
    pub const ALL: [PrefillKernel; 7] =
        [PrefillKernel::Auto, PrefillKernel::General, PrefillKernel::Flash128, PrefillKernel::Flash64, PrefillKernel::Flash128W4, PrefillKernel::FlashSm90, PrefillKernel::FlashSm90Ftz];

    pub fn name(self) -> &'static str {
        match self {
            PrefillKernel::Auto => "auto",
            PrefillKernel::General => "general",
            PrefillKernel::Flash128 => "flash128",
            PrefillKernel::Flash64 => "flash64",
            PrefillKernel::Flash128W4 => "flash128w4",
            PrefillKernel::FlashSm90 => "flash_sm90",
            PrefillKernel::FlashSm90Ftz => "flash_sm90_ftz",
        }
    }

    /// Whether the kernel exists on a device of compute capability
    /// `(major, minor)`: the Hopper ones on sm_90 only, the others on every
    /// device the backend runs on.
    pub fn runs_on(self, compute_capability: (i32, i32)) -> bool {
        !matches!(self, PrefillKernel::FlashSm90 | PrefillKernel::FlashSm90Ftz) || compute_capability == (9, 0)
    }

    pub(in super::super) fn from_u8(v: u8) -> Self {
        Self::ALL[v as usize]
    }

    pub(in super::super) fn to_u8(self) -> u8 {
        Self::ALL.iter().position(|&k| k == self).expect("listed") as u8
    }

    /// The tensor-core kernel this choice names, if it is one.
    fn flash_variant(self) -> Option<&'static FlashVariant> {
        match self {
            PrefillKernel::Flash128 => Some(&contract::FLASH_W8),
            PrefillKernel::Flash64 => Some(&contract::FLASH_W4),
            PrefillKernel::Flash128W4 => Some(&contract::FLASH_W4M2),
            PrefillKernel::Auto | PrefillKernel::General | PrefillKernel::FlashSm90 | PrefillKernel::FlashSm90Ftz => None,
        }
    }
}

impl std::str::FromStr for PrefillKernel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| format!("unknown prefill kernel `{s}` (expected auto, general, flash128, flash64, flash128w4, flash_sm90 or flash_sm90_ftz)"))
    }
}

/// The buffers of one prefill call, checked against its shape.
struct PrefillCall<'a> {
    q: &'a CudaBuf,
    k: &'a CudaBuf,
    v: &'a CudaBuf,
    out: &'a CudaBuf,
    lse: &'a CudaBuf,
    shape: PrefillShape,
}

pub(super) fn attention_prefill(be: &CudaBackend, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, s: PrefillShape) -> Result<(CudaBuf, CudaBuf)> {
    check_kv_heads("prefill", s.heads, s.kv_heads)?;
    let (width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    check("prefill q", q.len(), s.nseq * s.sq * width)?;
    check("prefill k", k.len(), s.nseq * s.kv_seq_stride * kv_width)?;
    check("prefill v", v.len(), s.nseq * s.kv_seq_stride * kv_width)?;
    if s.skv > s.kv_seq_stride {
        return Err(shape_err(format!("prefill skv {} exceeds kv_seq_stride {}", s.skv, s.kv_seq_stride)));
    }
    let dtype = same_dtype("prefill", &[q, k, v])?;
    let out = be.alloc(dtype, s.nseq * s.sq * width)?;
    let lse = be.alloc(Dtype::Fp32, s.nseq * s.heads * s.sq)?;
    if s.nseq == 0 || s.sq == 0 || s.heads == 0 || s.head_dim == 0 {
        return Ok((out, lse));
    }
    let call = PrefillCall { q, k, v, out: &out, lse: &lse, shape: s };
    let tensor_cores = s.head_dim == FA_D as usize && dtype != Dtype::Fp32;
    match be.prefill_kernel() {
        PrefillKernel::Auto if tensor_cores && PrefillKernel::FlashSm90.runs_on(be.compute_capability) => flash_sm90::prefill(be, &contract::FLASH_SM90, q, k, v, &out, &lse, s)?,
        // On a device other than sm_90 an explicit request is refused there, with the reason.
        PrefillKernel::FlashSm90 if tensor_cores => flash_sm90::prefill(be, &contract::FLASH_SM90, q, k, v, &out, &lse, s)?,
        PrefillKernel::FlashSm90Ftz if tensor_cores => flash_sm90::prefill(be, &contract::FLASH_SM90_FTZ, q, k, v, &out, &lse, s)?,
        PrefillKernel::Auto if tensor_cores => flash(be, PrefillKernel::Flash128W4, &call)?,
        kernel @ (PrefillKernel::Flash128 | PrefillKernel::Flash64 | PrefillKernel::Flash128W4) if tensor_cores => flash(be, kernel, &call)?,
        _ => general(be, &call)?,
    }
    Ok((out, lse))
}

fn scale_log2(head_dim: usize) -> f32 {
    std::f32::consts::LOG2_E / (head_dim as f32).sqrt()
}

fn general(be: &CudaBackend, c: &PrefillCall) -> Result<()> {
    let s = c.shape;
    if s.head_dim > PREFILL_MAX_D as usize {
        return Err(BackendError::Unsupported(format!("prefill attention supports head_dim up to {PREFILL_MAX_D}, got {}", s.head_dim)));
    }
    if s.heads > 65_535 || s.nseq > 65_535 {
        return Err(shape_err(format!("prefill: {} heads x {} sequences exceed the grid limit", s.heads, s.nseq)));
    }
    let grid = (s.sq.div_ceil(PREFILL_WARPS as usize) as u32, s.heads as u32, s.nseq as u32);
    let args = PrefillGeneralArgs {
        q: DevPtr::of(c.q),
        k: DevPtr::of(c.k),
        v: DevPtr::of(c.v),
        out: DevPtr::of(c.out),
        lse: DevPtr::of(c.lse),
        sq: to_i32("sq", s.sq)?,
        skv: to_i32("skv", s.skv)?,
        kv_stride: to_i32("kv_seq_stride", s.kv_seq_stride)?,
        heads: to_i32("heads", s.heads)?,
        kv_heads: to_i32("kv_heads", s.kv_heads)?,
        d: to_i32("head_dim", s.head_dim)?,
        q_offset: to_i32("q_offset", s.q_offset)?,
        scale_log2: scale_log2(s.head_dim),
    };
    // SAFETY: q, out and lse hold nseq × sq rows, k and v nseq ×
    // kv_seq_stride rows of kv_heads heads, kv_heads dividing heads, with
    // skv <= kv_seq_stride (checked by the caller);
    // the grid covers exactly the (query block, head, sequence) triples.
    unsafe { be.launch(&contract::PREFILL_GENERAL, c.q.dtype(), grid, PREFILL_WARPS * 32, &args) }
}

fn flash(be: &CudaBackend, kernel: PrefillKernel, c: &PrefillCall) -> Result<()> {
    let s = c.shape;
    let dtype = c.q.dtype();
    let variant = kernel.flash_variant().filter(|v| v.kernel.names.name(dtype).is_some());
    let Some(variant) = variant else {
        return Err(CudaError::Unsupported(format!("tensor-core prefill `{}` in {dtype}", kernel.name())).into());
    };
    let mblocks = s.sq.div_ceil(variant.rows_per_block() as usize);
    if mblocks > 65_535 || s.nseq > 65_535 {
        return Err(shape_err(format!("prefill: {mblocks} query blocks or {} sequences exceed the grid limit", s.nseq)));
    }
    let grid = (s.heads as u32, mblocks as u32, s.nseq as u32);
    let args = FlashArgs {
        q: DevPtr::of(c.q),
        k: DevPtr::of(c.k),
        v: DevPtr::of(c.v),
        out: DevPtr::of(c.out),
        lse: DevPtr::of(c.lse),
        sq: to_i32("sq", s.sq)?,
        skv: to_i32("skv", s.skv)?,
        kv_stride: to_i32("kv_seq_stride", s.kv_seq_stride)?,
        heads: to_i32("heads", s.heads)?,
        kv_heads: to_i32("kv_heads", s.kv_heads)?,
        q_offset: to_i32("q_offset", s.q_offset)?,
        scale_log2: scale_log2(s.head_dim),
    };
    // SAFETY: as for the general kernel, with head_dim 128 (checked by the
    // caller); the grid covers the (head, query block, sequence) triples.
    unsafe { be.launch(&variant.kernel, dtype, grid, 32 * variant.warps, &args) }
}
