//! Starting a kernel: the one launch path of the backend.
//!
//! [`CudaBackend::launch`] takes a kernel of the `contract` and its typed
//! argument struct, picks the kernel's name for the dtype, checks what can
//! be checked without knowing the kernel's memory accesses (the block size
//! the kernel is written for, the element type behind every device address,
//! the dynamic shared memory against the device's limit), loads the
//! function and queues it on the backend's stream. What cannot be checked
//! here, that every address covers what the kernel touches, is the caller's
//! promise: the launch is an `unsafe fn`.
//!
//! This module must not know any particular kernel (see `contract`) or
//! choose one (see `ops`).

pub use super::args::{DevPtr, Holds};
use super::contract::{Block, Kernel, KernelArgs, Param, Pointee};
use super::{ffi, CudaBackend, CudaError};
use crate::backend::{BackendError, Dtype, Result};
use cudarc::driver::{sys as drv_sys, CudaFunction};

/// Threads per block of the grid-stride kernels (element-wise, copies, embeddings).
pub const THREADS: u32 = 256;

/// Launch grid dimensions from a block count or a triple.
pub struct Grid(pub (u32, u32, u32));

impl From<u32> for Grid {
    fn from(x: u32) -> Self {
        Grid((x, 1, 1))
    }
}

impl From<(u32, u32, u32)> for Grid {
    fn from(g: (u32, u32, u32)) -> Self {
        Grid(g)
    }
}

/// Whether memory holding `holds` may be passed where `declared` is expected
/// by a kernel built for `dtype`.
fn admits(declared: Pointee, holds: Holds, dtype: Dtype) -> bool {
    match declared {
        Pointee::Storage => holds == Holds::Elements(dtype),
        Pointee::F32 => holds == Holds::Elements(Dtype::Fp32),
        Pointee::F64 => holds == Holds::F64,
        Pointee::I32 => holds == Holds::I32,
        Pointee::U32 => holds == Holds::U32,
        Pointee::U64 => holds == Holds::U64,
        // Byte copies move any buffer.
        Pointee::Byte => matches!(holds, Holds::Elements(_)),
    }
}

/// Checks each device address against its parameter's declared pointee.
fn check_pointers(kernel: &str, params: &[Param], pointers: &[Option<DevPtr>], dtype: Dtype) -> Result<()> {
    for (p, ptr) in params.iter().zip(pointers) {
        let declared = match p.ty {
            super::contract::CType::Ptr { to, .. } => Some(to),
            // A tensor map reads its tensor as the kernel's storage type.
            super::contract::CType::TensorMap => Some(Pointee::Storage),
            _ => None,
        };
        if let (Some(to), Some(ptr)) = (declared, ptr) {
            if !admits(to, ptr.holds, dtype) {
                return Err(BackendError::Shape(format!("{kernel}: parameter `{}` is `{}` but the address passed holds {:?}", p.name, p.ty.spelling(Some(dtype)), ptr.holds)));
            }
        }
    }
    Ok(())
}

/// Checks a block size against the one the kernel is written for.
fn check_block(kernel: &str, rule: Block, threads: u32) -> Result<()> {
    let ok = match rule {
        Block::Exactly(n) => threads == n,
        Block::AtMost(n) => threads >= 1 && threads <= n,
        Block::WholeWarps(n) => threads >= 32 && threads % 32 == 0 && threads <= 32 * n,
        Block::Any => (1..=1024).contains(&threads),
    };
    if !ok {
        return Err(BackendError::Shape(format!("{kernel}: a block of {threads} threads, the kernel is written for {rule:?}")));
    }
    Ok(())
}

impl CudaBackend {
    /// Blocks for `work_items` grid-stride items of [`THREADS`] threads, at
    /// most 32 per SM.
    pub(super) fn grid_for(&self, work_items: usize) -> u32 {
        let blocks = work_items.div_ceil(THREADS as usize).max(1);
        blocks.min(self.sm_count as usize * 32) as u32
    }

    /// Queues `kernel` (its `dtype` variant; untyped kernels ignore it) on
    /// the backend's stream with `grid` blocks of `block` threads.
    ///
    /// # Safety
    /// Every device address in `args` must point to memory that stays alive
    /// until the kernel has run in the stream's order and that covers every
    /// element the kernel reads or writes for this grid, block and these
    /// scalar arguments (the operations check their buffers' sizes before
    /// they launch). Parameter order, count and C types need no promise:
    /// they are declared once in `contract` and checked against the kernel
    /// sources by its tests.
    pub(super) unsafe fn launch<A: KernelArgs>(&self, kernel: &Kernel<A>, dtype: Dtype, grid: impl Into<Grid>, block: u32, args: &A) -> Result<()> {
        let name = kernel.names.name(dtype).ok_or_else(|| BackendError::Unsupported(format!("kernel `{}` is not built for {dtype}", kernel.names.base())))?;
        check_block(name, kernel.block, block)?;
        check_pointers(name, A::PARAMS, &args.pointers(), dtype)?;
        let smem = (kernel.shared_bytes)(args);
        let f = self.kernels.function(kernel.file, name)?;
        self.allow_smem(&f, smem)?;
        if let Some(percent) = kernel.carveout {
            f.set_attribute(drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, percent)?;
        }
        self.ctx.bind_to_thread()?;
        let mut params = args.values();
        // SAFETY: the function is loaded in the backend's context, now
        // current; `params` follows the kernel's declared parameter list
        // (checked against the source by `contract`'s tests) and points into
        // `args`, alive for the call; `smem` was admitted just above; the
        // caller vouches for the addresses' extents.
        unsafe { ffi::launch_kernel(&f, &self.stream, grid.into().0, (block, 1, 1), smem, &mut params) }?;
        Ok(())
    }

    /// Raises a kernel's dynamic shared-memory limit when it needs more than
    /// the default 48 KiB.
    fn allow_smem(&self, f: &CudaFunction, bytes: u32) -> Result<()> {
        if bytes > self.max_smem_optin {
            return Err(CudaError::Unsupported(format!("kernel needs {bytes} B of shared memory, the device allows {}", self.max_smem_optin)).into());
        }
        if bytes > 48 * 1024 {
            f.set_attribute(drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::args::ArgValue;
    use super::super::contract::{self, CType};
    use super::*;

    #[test]
    fn a_float_buffer_is_refused_where_the_kernel_reads_its_storage_type() {
        let params = contract::MergePartialsArgs::PARAMS;
        let f32_buf = Some(DevPtr::raw(0x1000, Holds::Elements(Dtype::Fp32)));
        let bf16_buf = Some(DevPtr::raw(0x2000, Holds::Elements(Dtype::Bf16)));
        // o, lse, o2, lse2 in order: the storage pointers must be bf16, the lse ones f32.
        assert!(check_pointers("merge_partials_bf16", params, &[bf16_buf, f32_buf, bf16_buf, f32_buf, None, None], Dtype::Bf16).is_ok());
        let err = check_pointers("merge_partials_bf16", params, &[f32_buf, f32_buf, bf16_buf, f32_buf, None, None], Dtype::Bf16).unwrap_err();
        assert!(err.to_string().contains("parameter `o`"), "{err}");
    }

    #[test]
    fn byte_copies_take_any_buffer_but_tables_must_hold_their_type() {
        assert!(admits(Pointee::Byte, Holds::Elements(Dtype::Fp16), Dtype::Bf16));
        assert!(!admits(Pointee::I32, Holds::U64, Dtype::Bf16));
        assert!(admits(Pointee::F64, Holds::F64, Dtype::Fp32));
    }

    #[test]
    fn a_block_other_than_the_kernels_own_is_refused() {
        assert!(check_block("decode_partial_bf16", Block::Exactly(128), 128).is_ok());
        assert!(check_block("decode_partial_bf16", Block::Exactly(128), 256).is_err());
        assert!(check_block("decode_rows_bf16", Block::AtMost(512), 384).is_ok());
        assert!(check_block("decode_rows_bf16", Block::AtMost(512), 1024).is_err());
        assert!(check_block("gelu_bf16", Block::Any, 0).is_err());
    }

    #[test]
    fn a_kernel_written_for_whole_warps_refuses_a_partial_warp_or_one_too_many() {
        assert!(check_block("decode_combine_bf16", Block::WholeWarps(8), 32).is_ok());
        assert!(check_block("decode_combine_bf16", Block::WholeWarps(8), 256).is_ok());
        assert!(check_block("decode_combine_bf16", Block::WholeWarps(8), 100).is_err());
        assert!(check_block("decode_combine_bf16", Block::WholeWarps(8), 288).is_err());
        assert!(check_block("decode_combine_bf16", Block::WholeWarps(8), 0).is_err());
    }

    #[test]
    fn a_tensor_map_of_another_element_type_is_refused() {
        let params = contract::FlashSm90Args::PARAMS;
        let (bf16_buf, f16_buf) = (DevPtr::raw(0x1000, Holds::Elements(Dtype::Bf16)), DevPtr::raw(0x2000, Holds::Elements(Dtype::Fp16)));
        let lse = DevPtr::raw(0x3000, Holds::Elements(Dtype::Fp32));
        let mut pointers = vec![Some(bf16_buf), Some(bf16_buf), Some(bf16_buf), Some(bf16_buf), Some(lse), None, None, None, None, None];
        assert!(check_pointers("flash_sm90_fwd_d128_bf16", params, &pointers, Dtype::Bf16).is_ok());
        pointers[1] = Some(f16_buf);
        let err = check_pointers("flash_sm90_fwd_d128_bf16", params, &pointers, Dtype::Bf16).unwrap_err();
        assert!(err.to_string().contains("parameter `tk`"), "{err}");
    }

    #[test]
    fn an_address_is_passed_as_its_eight_bytes() {
        let p = DevPtr::raw(0xdead_beef, Holds::U64);
        // SAFETY: `param_ptr` points at the u64 address inside `p`.
        assert_eq!(unsafe { *(p.param_ptr() as *const u64) }, 0xdead_beef);
        assert_eq!(CType::Ptr { to: Pointee::U64, writes: false }.spelling(None), "const u64*");
    }
}
