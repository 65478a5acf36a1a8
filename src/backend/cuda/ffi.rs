//! The raw CUDA driver, cuBLAS and NVRTC calls of the backend, one thin
//! function each, every one with a `# Safety` note and a link to the NVIDIA
//! function it stands for.
//!
//! This is the backend's lowest layer (as cudarc's `result` modules are for
//! its safe types): every `unsafe` call into a CUDA library made by
//! `backend::cuda` goes through here. A wrapper is an `unsafe fn` when its
//! caller must uphold something it cannot check (a pointer's extent, an
//! allocation's lifetime); it is a safe `fn` when the arguments it takes
//! (borrowed live handles) already establish everything the call needs, and
//! then its note says why. The exceptions outside this module are the
//! library probe (`probe`, which must run before any library is loaded) and
//! the NCCL transport (`comm::nccl_transport`); both justify each call.
//!
//! This module must not decide anything: no shapes, no kernels, no policy.

use cudarc::cublas::result::{self as cublas, CublasError};
use cudarc::cublas::{sys as cublas_sys, CudaBlas};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::result::{self as nvrtc, NvrtcError};
use cudarc::nvrtc::sys as nvrtc_sys;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;

/// Stops the bindings' per-buffer event tracking (their own bookkeeping
/// for buffers shared between streams; no driver call).
///
/// # Safety
/// Every buffer of `ctx` must be used on one stream only, for as long as the
/// context lives: nothing orders work between streams any more.
pub unsafe fn disable_event_tracking(ctx: &CudaContext) {
    ctx.disable_event_tracking()
}

/// `bytes` of uninitialised stream-ordered memory:
/// [`cuMemAllocAsync`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__MALLOC__ASYNC.html#group__CUDA__MALLOC__ASYNC_1g13413273e84a641bce1929eae9e6501f)
/// (or `cuMemAlloc` where the device has no memory pools). Freed on the
/// stream when the slice is dropped.
///
/// # Safety
/// The memory is uninitialised: nothing may read an element before work on
/// `stream` has written it.
pub unsafe fn stream_alloc(stream: &Arc<CudaStream>, bytes: usize) -> Result<CudaSlice<u8>, DriverError> {
    stream.alloc::<u8>(bytes)
}

/// `bytes` of device memory outside any stream order:
/// [`cuMemAlloc`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__MEM.html#group__CUDA__MEM_1gb82d2a09844a58dd9e744dc31e8aa467).
///
/// # Safety
/// The context that owns the memory must be current; the memory is
/// uninitialised, and must be given back once, with [`free`], after every
/// piece of work using it has finished.
pub unsafe fn malloc(bytes: usize) -> Result<u64, DriverError> {
    drv::malloc_sync(bytes)
}

/// Gives back memory from [`malloc`]:
/// [`cuMemFree`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__MEM.html#group__CUDA__MEM_1g89b3f154e17cc89b6eea277dbdf5c93a).
///
/// # Safety
/// `ptr` came from [`malloc`], is freed only once, and no queued or later
/// work uses it.
pub unsafe fn free(ptr: u64) -> Result<(), DriverError> {
    drv::free_sync(ptr)
}

/// Sets `bytes` bytes at `ptr` to `byte`, ordered on `stream`:
/// [`cuMemsetD8Async`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__MEM.html#group__CUDA__MEM_1gaef08a7ccd61112f94e82f2b30d43627).
///
/// # Safety
/// `ptr..ptr + bytes` lies inside one live allocation that stays alive until
/// the memset has run in `stream`'s order.
pub unsafe fn memset(ptr: u64, byte: u8, bytes: usize, stream: &CudaStream) -> Result<(), DriverError> {
    drv::memset_d8_async(ptr, byte, bytes, stream.cu_stream())
}

/// Copies `src` from pageable host memory to `dst`, ordered on `stream`:
/// [`cuMemcpyHtoDAsync`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__MEM.html#group__CUDA__MEM_1g4d32266788c440b0220b1a9ba5795169).
/// From pageable memory the call returns once `src` has been staged, so
/// `src` may be dropped afterwards.
///
/// # Safety
/// `dst` addresses at least `size_of_val(src)` bytes of one live allocation
/// that stays alive until the copy has run in `stream`'s order.
pub unsafe fn copy_to_device<T>(dst: u64, src: &[T], stream: &CudaStream) -> Result<(), DriverError> {
    drv::memcpy_htod_async(dst, src, stream.cu_stream())
}

/// Copies device memory at `src` into pageable `dst`:
/// [`cuMemcpyDtoHAsync`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__MEM.html#group__CUDA__MEM_1g56f30236c7c5247f8e061b59d3268362).
/// Into pageable memory the call returns only once the copy has completed.
///
/// # Safety
/// `src` addresses at least `size_of_val(dst)` bytes of one live allocation,
/// written by work on `stream` (or before it), holding valid values of `T`.
pub unsafe fn copy_to_host<T>(dst: &mut [T], src: u64, stream: &CudaStream) -> Result<(), DriverError> {
    drv::memcpy_dtoh_async(dst, src, stream.cu_stream())
}

/// Queues kernel `f` on `stream`:
/// [`cuLaunchKernel`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__EXEC.html#group__CUDA__EXEC_1gb8f3dc3031b40da29d5f9a7139e52e15).
/// `params` holds one pointer per kernel parameter, to a value of that
/// parameter's size; the driver copies the values before returning.
///
/// # Safety
/// `f`'s context is current; `params` matches `f`'s parameter list in
/// count, order and size; every device address among the values points to
/// memory that stays alive until the kernel has run and covers everything
/// the kernel touches for this grid, block and these scalars; `smem` is
/// within the kernel's dynamic shared-memory limit.
pub unsafe fn launch_kernel(f: &CudaFunction, stream: &CudaStream, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, params: &mut [*mut c_void]) -> Result<(), DriverError> {
    drv::launch_kernel(f.cu_function(), grid, block, smem, stream.cu_stream(), params)
}

/// Records `event` on `stream` as an external event node when `stream` is
/// capturing, so every replay of the recording records it again:
/// [`cuEventRecordWithFlags`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__EVENT.html)
/// with `CU_EVENT_RECORD_EXTERNAL`.
///
/// # Safety
/// Safe to call: both handles are borrowed live objects of one context.
pub fn record_external_event(event: &CudaEvent, stream: &CudaStream) -> Result<(), DriverError> {
    // SAFETY: a live event and a live stream (see above).
    unsafe { drv_sys::cuEventRecordWithFlags(event.cu_event(), stream.cu_stream(), drv_sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32) }.result()
}

/// Copies `bytes` bytes from device address `src` to `dst` on `stream`:
/// [`cuMemcpyDtoDAsync`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__MEM.html).
///
/// # Safety
/// `src` and `dst` are device allocations of this context holding at least
/// `bytes` bytes each, alive until the copy has run on `stream`.
pub unsafe fn memcpy_dtod(dst: u64, src: u64, bytes: usize, stream: &CudaStream) -> Result<(), DriverError> {
    // SAFETY: the caller's promise.
    unsafe { drv_sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream.cu_stream()) }.result()
}

/// The PCI bus id of `ctx`'s device as the driver writes it (`0000:19:00.0`):
/// [`cuDeviceGetPCIBusId`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__MEM.html).
///
/// # Safety
/// Safe to call: the buffer is owned here and its full length is passed.
pub fn pci_bus_id(ctx: &CudaContext) -> Result<String, DriverError> {
    let mut buf = [0 as c_char; 32];
    ctx.bind_to_thread()?;
    // SAFETY: `buf` is writable for its full length, which is passed; the
    // device handle belongs to `ctx`, which is current.
    unsafe { drv_sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, ctx.cu_device()) }.result()?;
    Ok(c_chars_to_string(&buf))
}

/// The arguments of a tiled TMA tensor map: the tensor's element type and
/// base address, its extents innermost first, the byte strides of every
/// dimension but the innermost, the box one copy moves, the element strides
/// inside the box, and the map's interleave, swizzle, L2 promotion and
/// out-of-bounds fill.
pub struct TiledTensorMap<'a> {
    pub data_type: drv_sys::CUtensorMapDataType,
    pub base: u64,
    pub dims: &'a [u64],
    pub strides: &'a [u64],
    pub box_dims: &'a [u32],
    pub element_strides: &'a [u32],
    pub interleave: drv_sys::CUtensorMapInterleave,
    pub swizzle: drv_sys::CUtensorMapSwizzle,
    pub l2_promotion: drv_sys::CUtensorMapL2promotion,
    pub oob_fill: drv_sys::CUtensorMapFloatOOBfill,
}

/// Encodes `m` as a `CUtensorMap` (a kernel parameter of 128 bytes):
/// [`cuTensorMapEncodeTiled`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__TENSOR__MEMORY.html).
/// The driver checks the extents, strides, box and alignment against the
/// rules of TMA and answers `CUDA_ERROR_INVALID_VALUE` where one is broken;
/// so does this function when the arrays' lengths do not fit one rank.
///
/// # Safety
/// Safe to call: `ctx` (made current) shows the driver is loaded; every array
/// is a slice whose length is checked against the rank before the call; the
/// map is written into a value owned here before it is read; and the call
/// reads no device memory (a kernel reads the tensor through the map later,
/// so the tensor's extent is the promise of that launch).
pub fn encode_tensor_map_tiled(ctx: &CudaContext, m: &TiledTensorMap) -> Result<drv_sys::CUtensorMap, DriverError> {
    let rank = m.dims.len();
    if !(1..=5).contains(&rank) || m.strides.len() + 1 != rank || m.box_dims.len() != rank || m.element_strides.len() != rank {
        return Err(DriverError(drv_sys::CUresult::CUDA_ERROR_INVALID_VALUE));
    }
    ctx.bind_to_thread()?;
    let mut map = std::mem::MaybeUninit::<drv_sys::CUtensorMap>::uninit();
    // SAFETY: the arrays hold `rank` (the strides `rank - 1`) values, checked
    // above; `map` is valid for writes; the base address is only recorded.
    unsafe {
        drv_sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            m.data_type,
            rank as u32,
            m.base as *mut c_void,
            m.dims.as_ptr(),
            m.strides.as_ptr(),
            m.box_dims.as_ptr(),
            m.element_strides.as_ptr(),
            m.interleave,
            m.swizzle,
            m.l2_promotion,
            m.oob_fill,
        )
        .result()?;
        // SAFETY: a successful call has written the whole map.
        Ok(map.assume_init())
    }
}

/// Keeps freed memory in the device's default pool instead of returning it
/// to the driver at each synchronisation (release threshold: unlimited):
/// [`cuDeviceGetDefaultMemPool`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__DEVICE.html#group__CUDA__DEVICE_1g2170a6e24f7e596854f0c48e1e98120e)
/// and [`cuMemPoolSetAttribute`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__MALLOC__ASYNC.html#group__CUDA__MALLOC__ASYNC_1g1ef006cd08dbf0ec5e4cb93bf7b044dc)
/// with `CU_MEMPOOL_ATTR_RELEASE_THRESHOLD`. Nothing on a device without pools.
///
/// # Safety
/// Safe to call: the context is made current first, and both out-values are
/// owned here with the types the attribute takes.
pub fn keep_freed_memory_in_pool(ctx: &CudaContext) -> Result<(), DriverError> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    ctx.bind_to_thread()?;
    let mut pool: drv_sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: `pool` and `threshold` are valid for the calls; the device
    // handle belongs to `ctx`, which is current.
    unsafe {
        drv_sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        drv_sys::cuMemPoolSetAttribute(pool, drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut c_void).result()
    }
}

/// Default math for `blas` (no TF32 for f32 GEMMs):
/// [`cublasSetMathMode`](https://docs.nvidia.com/cuda/cublas/index.html#cublassetmathmode).
///
/// # Safety
/// Safe to call: the handle is borrowed from a live `CudaBlas`.
pub fn set_default_math(blas: &CudaBlas) -> Result<(), CublasError> {
    // SAFETY: a live handle owned by `blas`.
    unsafe { cublas_sys::cublasSetMathMode(*blas.handle(), cublas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH) }.result()
}

/// One column-major GEMM `C[m,n] = A[m,k] B[k,n]` (no transposes), f32
/// compute, all three matrices of element type `data_type`.
pub struct Gemm {
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub a: u64,
    pub lda: i32,
    pub b: u64,
    pub ldb: i32,
    pub c: u64,
    pub ldc: i32,
    pub data_type: cublas_sys::cudaDataType,
}

/// Queues `g` on `blas`'s stream with alpha 1 and beta 0 (C is overwritten):
/// [`cublasGemmEx`](https://docs.nvidia.com/cuda/cublas/index.html#cublasgemmex)
/// with `CUBLAS_COMPUTE_32F` and the default algorithm.
///
/// # Safety
/// `a`, `b` and `c` address live device memory of at least `lda·k`, `ldb·n`
/// and `ldc·n` elements of `data_type`, alive until the GEMM has run.
pub unsafe fn gemm(blas: &CudaBlas, g: &Gemm) -> Result<(), CublasError> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    let op = cublas_sys::cublasOperation_t::CUBLAS_OP_N;
    cublas::gemm_ex(
        *blas.handle(),
        op,
        op,
        g.m,
        g.n,
        g.k,
        &alpha as *const f32 as *const c_void,
        g.a as *const c_void,
        g.data_type,
        g.lda,
        g.b as *const c_void,
        g.data_type,
        g.ldb,
        &beta as *const f32 as *const c_void,
        g.c as *mut c_void,
        g.data_type,
        g.ldc,
        cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
    )
}

/// One NVRTC program, destroyed when dropped:
/// [`nvrtcCreateProgram`](https://docs.nvidia.com/cuda/nvrtc/index.html#group__compilation_1g9ae65f68911d1cf0adda2af4ad8cb458)
/// and [`nvrtcDestroyProgram`](https://docs.nvidia.com/cuda/nvrtc/index.html#group__compilation_1gaa237c59615b7d4f48d5b308b5c9b140).
///
/// The NVRTC library must be loadable (see `probe`): the bindings abort
/// the process when it is missing.
pub struct NvrtcProgram(nvrtc_sys::nvrtcProgram);

impl NvrtcProgram {
    /// # Safety
    /// Safe to call: both strings are NUL-terminated and outlive the call.
    pub fn new(src: &CStr, name: &CStr) -> Result<Self, NvrtcError> {
        nvrtc::create_program(src, Some(name)).map(Self)
    }

    /// [`nvrtcCompileProgram`](https://docs.nvidia.com/cuda/nvrtc/index.html#group__compilation_1g1f3136029db1413e362154b567297e8b).
    ///
    /// # Safety
    /// Safe to call: the program is live (owned by `self`) and the options
    /// are copied into C strings that outlive the call.
    pub fn compile(&self, options: &[String]) -> Result<(), NvrtcError> {
        // SAFETY: see above.
        unsafe { nvrtc::compile_program(self.0, options) }
    }

    /// The compiler's log (errors, and ptxas statistics when asked):
    /// [`nvrtcGetProgramLog`](https://docs.nvidia.com/cuda/nvrtc/index.html#group__compilation_1g74c550e5cab81efbd59e4f72579edbd1).
    ///
    /// # Safety
    /// Safe to call: a live program has a log after any compile attempt
    /// (empty before one).
    pub fn log(&self) -> Result<String, NvrtcError> {
        // SAFETY: see above.
        unsafe { nvrtc::get_program_log(self.0) }.map(|raw| c_chars_to_string(&raw))
    }

    /// The compiled PTX, as text bytes:
    /// [`nvrtcGetPTX`](https://docs.nvidia.com/cuda/nvrtc/index.html#group__compilation_1gc9a66bbbd47c256f4a8955517b3965da).
    ///
    /// # Safety
    /// Safe to call after [`NvrtcProgram::compile`] succeeded (NVRTC answers
    /// an error code otherwise).
    pub fn ptx(&self) -> Result<Vec<u8>, NvrtcError> {
        // SAFETY: see above.
        unsafe { nvrtc::get_ptx(self.0) }.map(|p| p.iter().map(|&c| c as u8).collect())
    }

    /// The compiled CUBIN (compilation for a real architecture `sm_XY`):
    /// [`nvrtcGetCUBIN`](https://docs.nvidia.com/cuda/nvrtc/index.html#group__compilation).
    ///
    /// # Safety
    /// Safe to call after [`NvrtcProgram::compile`] succeeded: the buffer is
    /// sized by `nvrtcGetCUBINSize` first.
    pub fn cubin(&self) -> Result<Vec<u8>, NvrtcError> {
        let mut size = 0usize;
        // SAFETY: a live program and a valid out-pointer.
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(self.0, &mut size) }.result()?;
        let mut out = vec![0u8; size];
        // SAFETY: `out` holds the `size` bytes NVRTC reported.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(self.0, out.as_mut_ptr() as *mut c_char) }.result()?;
        Ok(out)
    }
}

impl Drop for NvrtcProgram {
    fn drop(&mut self) {
        // SAFETY: destroyed once, here; nothing refers to it afterwards.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
