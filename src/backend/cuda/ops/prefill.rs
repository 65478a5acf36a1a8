//! Causal prefill attention and the choice among its kernels: the general
//! one (prefill.cu: any head_dim up to 256, any dtype, scalar f32 math), the
//! tensor-core ones (flash.cu: head_dim 32, 64 or 128, bf16/fp16, mma.sync)
//! and on sm_90 the Hopper ones (flash_sm90.cu: head_dim 128, bf16/fp16, TMA
//! and wgmma; launched by `flash_sm90`). A new variant is one
//! [`PrefillKernel`] value, its kernel declared in `contract`, and one arm
//! in [`PrefillKernel::choose`]. This module must not pick a tensor-core
//! kernel where it does not apply: `Auto` falls back to the general one,
//! and an explicit request is refused with the rule it breaks, before any
//! allocation or launch.

use super::super::contract::{self, FlashArgs, FlashSm90Args, FlashVariant, Kernel, PrefillGeneralArgs, F3_D, FA_HEAD_DIMS, PREFILL_MAX_D, PREFILL_WARPS};
use super::super::launch::DevPtr;
use super::super::memory::CudaBuf;
use super::super::{flash_sm90, CudaBackend, CudaError};
use super::{check, same_dtype, shape_err, to_i32};
use crate::backend::{check_kv_heads, BackendError, Dtype, PrefillShape, Result};

/// Which prefill attention kernel runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefillKernel {
    /// The fastest tensor-core kernel wherever one applies (bf16/fp16):
    /// at head_dim 128 `FlashSm90` on sm_90 (Hopper) devices and
    /// `Flash128W4` elsewhere (both measured on an H200); at head_dim 32
    /// and 64 `Flash128W4` on every device; else the general one.
    #[default]
    Auto,
    /// Always the general kernel (scalar f32 math, any head_dim <= 256).
    General,
    /// Tensor-core kernel (head_dim 32, 64 or 128), 8 warps and 128 query
    /// rows per block.
    Flash128,
    /// Tensor-core kernel (head_dim 32, 64 or 128), 4 warps and 64 query
    /// rows per block.
    Flash64,
    /// Tensor-core kernel (head_dim 32, 64 or 128), 4 warps of 32 query
    /// rows each (128 per block): every K/V fragment read from shared
    /// memory feeds two MMAs.
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

    /// Whether an explicit request for this kernel runs on heads of
    /// `head_dim` in `dtype` on a device of compute capability `cc` (rather
    /// than being refused).
    pub fn applies(self, head_dim: usize, dtype: Dtype, cc: (i32, i32)) -> bool {
        self.choose(head_dim, dtype, cc).is_ok()
    }

    /// The block shape of the tensor-core kernel this choice names, if it
    /// is one: (warps, 16-row fragments per warp).
    fn flash_block(self) -> Option<(u32, u32)> {
        match self {
            PrefillKernel::Flash128 => Some((8, 1)),
            PrefillKernel::Flash64 => Some((4, 1)),
            PrefillKernel::Flash128W4 => Some((4, 2)),
            PrefillKernel::Auto | PrefillKernel::General | PrefillKernel::FlashSm90 | PrefillKernel::FlashSm90Ftz => None,
        }
    }

    /// The kernel this choice runs on heads of `head_dim` in `dtype` on a
    /// device of compute capability `cc`, or the rule the request breaks:
    /// `Auto` takes the fastest that applies, the others run exactly the
    /// kernel they name or are refused.
    pub(in super::super) fn choose(self, head_dim: usize, dtype: Dtype, cc: (i32, i32)) -> Result<PrefillChoice> {
        let half = dtype != Dtype::Fp32;
        let hopper_applies = half && head_dim == F3_D as usize;
        let flash_applies = half && FA_HEAD_DIMS.iter().any(|&d| d as usize == head_dim);
        let choice = match self {
            PrefillKernel::Auto if hopper_applies && PrefillKernel::FlashSm90.runs_on(cc) => PrefillChoice::Hopper(&contract::FLASH_SM90),
            PrefillKernel::Auto if flash_applies => PrefillKernel::Flash128W4.choose(head_dim, dtype, cc)?,
            PrefillKernel::Auto | PrefillKernel::General => {
                if head_dim > PREFILL_MAX_D as usize {
                    return Err(BackendError::Unsupported(format!("prefill attention supports head_dim up to {PREFILL_MAX_D}, got {head_dim}")));
                }
                PrefillChoice::General
            }
            PrefillKernel::FlashSm90 | PrefillKernel::FlashSm90Ftz => {
                if !self.runs_on(cc) {
                    return Err(CudaError::Unsupported(format!("prefill kernel `{}` needs an sm_90 (Hopper) device; this one is {}.{}", self.name(), cc.0, cc.1)).into());
                }
                if !hopper_applies {
                    return Err(CudaError::Unsupported(format!("prefill kernel `{}` is for head_dim {F3_D} in bf16/fp16, got head_dim {head_dim} in {dtype}", self.name())).into());
                }
                PrefillChoice::Hopper(if self == PrefillKernel::FlashSm90 { &contract::FLASH_SM90 } else { &contract::FLASH_SM90_FTZ })
            }
            PrefillKernel::Flash128 | PrefillKernel::Flash64 | PrefillKernel::Flash128W4 => {
                let block = self.flash_block().expect("a flash.cu kernel");
                let variant = contract::FLASH_VARIANTS.into_iter().find(|v| (v.warps, v.fragments) == block && v.head_dim as usize == head_dim);
                match variant.filter(|v| v.kernel.names.name(dtype).is_some()) {
                    Some(v) => PrefillChoice::Flash(v),
                    None => return Err(CudaError::Unsupported(format!("tensor-core prefill `{}` is for head_dim 32, 64 or 128 in bf16/fp16, got head_dim {head_dim} in {dtype}", self.name())).into()),
                }
            }
        };
        Ok(choice)
    }
}

/// The kernel one prefill call runs (see [`PrefillKernel::choose`]).
#[derive(Clone, Copy)]
pub(in super::super) enum PrefillChoice {
    /// prefill.cu.
    General,
    /// A flash.cu kernel of the call's head_dim.
    Flash(&'static FlashVariant),
    /// A flash_sm90.cu build.
    Hopper(&'static Kernel<FlashSm90Args>),
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
    // Refused requests are refused before anything is allocated or launched.
    let choice = be.prefill_kernel().choose(s.head_dim, dtype, be.compute_capability)?;
    let out = be.alloc(dtype, s.nseq * s.sq * width)?;
    let lse = be.alloc(Dtype::Fp32, s.nseq * s.heads * s.sq)?;
    if s.nseq == 0 || s.sq == 0 || s.heads == 0 || s.head_dim == 0 {
        return Ok((out, lse));
    }
    let call = PrefillCall { q, k, v, out: &out, lse: &lse, shape: s };
    match choice {
        PrefillChoice::Hopper(kernel) => flash_sm90::prefill(be, kernel, q, k, v, &out, &lse, s)?,
        PrefillChoice::Flash(variant) => flash(be, variant, &call)?,
        PrefillChoice::General => general(be, &call)?,
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

fn flash(be: &CudaBackend, variant: &FlashVariant, c: &PrefillCall) -> Result<()> {
    let s = c.shape;
    let dtype = c.q.dtype();
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
    // SAFETY: as for the general kernel, with the variant's head_dim and a
    // dtype it is built for (`PrefillKernel::choose`); the grid covers the
    // (head, query block, sequence) triples.
    unsafe { be.launch(&variant.kernel, dtype, grid, 32 * variant.warps, &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200: (i32, i32) = (9, 0);
    const A100: (i32, i32) = (8, 0);

    /// The kernel name a choice launches, or the refusal's message.
    fn chosen(kernel: PrefillKernel, head_dim: usize, dtype: Dtype, cc: (i32, i32)) -> String {
        match kernel.choose(head_dim, dtype, cc) {
            Ok(PrefillChoice::General) => contract::PREFILL_GENERAL.names.base().to_string(),
            Ok(PrefillChoice::Flash(v)) => v.kernel.names.base().to_string(),
            Ok(PrefillChoice::Hopper(k)) => k.names.base().to_string(),
            Err(e) => format!("refused: {e}"),
        }
    }

    #[test]
    fn auto_runs_the_two_fragment_tensor_core_kernel_of_the_head_dim_at_32_and_64_on_every_device() {
        for cc in [H200, A100] {
            for dtype in [Dtype::Bf16, Dtype::Fp16] {
                assert_eq!(chosen(PrefillKernel::Auto, 32, dtype, cc), "flash_fwd_d32_w4m2");
                assert_eq!(chosen(PrefillKernel::Auto, 64, dtype, cc), "flash_fwd_d64_w4m2");
            }
        }
    }

    #[test]
    fn auto_keeps_the_hopper_kernel_at_head_dim_128_on_sm_90_and_flash128w4_elsewhere() {
        assert_eq!(chosen(PrefillKernel::Auto, 128, Dtype::Bf16, H200), "flash_sm90_fwd_d128");
        assert_eq!(chosen(PrefillKernel::Auto, 128, Dtype::Fp16, A100), "flash_fwd_d128_w4m2");
    }

    #[test]
    fn auto_runs_the_general_kernel_where_no_tensor_core_kernel_applies() {
        for (head_dim, dtype) in [(16, Dtype::Bf16), (96, Dtype::Fp16), (256, Dtype::Bf16), (32, Dtype::Fp32), (128, Dtype::Fp32)] {
            assert_eq!(chosen(PrefillKernel::Auto, head_dim, dtype, H200), "prefill_general", "head_dim {head_dim} in {dtype}");
        }
    }

    #[test]
    fn each_explicit_tensor_core_kernel_runs_its_block_shape_at_the_calls_head_dim() {
        for head_dim in FA_HEAD_DIMS {
            let hd = head_dim as usize;
            assert_eq!(chosen(PrefillKernel::Flash128, hd, Dtype::Bf16, A100), format!("flash_fwd_d{head_dim}_w8"));
            assert_eq!(chosen(PrefillKernel::Flash64, hd, Dtype::Fp16, A100), format!("flash_fwd_d{head_dim}_w4"));
            assert_eq!(chosen(PrefillKernel::Flash128W4, hd, Dtype::Bf16, H200), format!("flash_fwd_d{head_dim}_w4m2"));
        }
    }

    #[test]
    fn an_explicit_tensor_core_kernel_is_refused_with_its_rule_where_it_does_not_apply() {
        for (head_dim, dtype) in [(96, Dtype::Bf16), (16, Dtype::Fp16), (64, Dtype::Fp32)] {
            let got = chosen(PrefillKernel::Flash128W4, head_dim, dtype, H200);
            assert!(got.starts_with("refused") && got.contains("head_dim 32, 64 or 128 in bf16/fp16") && got.contains(&format!("got head_dim {head_dim} in {dtype}")), "{got}");
        }
    }

    #[test]
    fn the_hopper_kernels_are_refused_below_head_dim_128_and_off_sm_90() {
        for kernel in [PrefillKernel::FlashSm90, PrefillKernel::FlashSm90Ftz] {
            let got = chosen(kernel, 64, Dtype::Bf16, H200);
            assert!(got.starts_with("refused") && got.contains("is for head_dim 128 in bf16/fp16, got head_dim 64"), "{got}");
            let got = chosen(kernel, 128, Dtype::Bf16, A100);
            assert!(got.starts_with("refused") && got.contains("needs an sm_90 (Hopper) device; this one is 8.0"), "{got}");
        }
        assert_eq!(chosen(PrefillKernel::FlashSm90Ftz, 128, Dtype::Fp16, H200), "flash_sm90_ftz_fwd_d128");
    }

    #[test]
    fn the_general_kernel_is_refused_above_its_largest_head_dim() {
        let got = chosen(PrefillKernel::General, 320, Dtype::Fp32, A100);
        assert!(got.starts_with("refused") && got.contains("head_dim up to 256, got 320"), "{got}");
    }
}
