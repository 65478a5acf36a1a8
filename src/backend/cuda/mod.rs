//! The CUDA backend: cuBLAS GEMMs and NVRTC-compiled kernels on one GPU.
//!
//! Everything runs in order on one stream per backend (kernels, copies,
//! cuBLAS and the NCCL transport's collectives), so no event bookkeeping
//! between streams is needed and the bindings' per-buffer event tracking is
//! switched off. Buffers are untyped device allocations that carry their
//! [`Dtype`] and element count; activations and weights use the backend's
//! dtype, log-sum-exp buffers are always f32. Arithmetic is f32 everywhere
//! (f32 accumulation in every GEMM and reduction).
//!
//! The modules, one concern each, from the bottom up:
//! - `ffi`: the raw driver, cuBLAS and NVRTC calls, one thin function each
//!   with its `# Safety` note;
//! - [`probe`]: finding the libraries before anything touches them;
//! - [`kernels`]: the `.cu` sources and their NVRTC compilation and cache;
//! - `contract`: every kernel's parameters, block size, shared memory and
//!   the layouts shared with the kernels, declared once and checked against
//!   the sources by its tests;
//! - `launch`: the one launch path, checking arguments against the contract;
//! - `flash_sm90`: the Hopper prefill kernel's TMA tensor maps and launch;
//! - `memory`: [`CudaBuf`], the memory tracker, the pool and the recording arena;
//! - `recording`: recorded steps ([`CudaRecording`]) and timing marks;
//! - `ops`: the [`Backend`](super::Backend) implementation, by kind of
//!   operation (dense, rows, step, prefill and decode attention).
//!
//! Attention prefill has several implementations: a general one for any
//! head_dim up to 256 and any dtype, tensor-core ones for head_dim 32, 64
//! and 128 in bf16/fp16, and on sm_90 a warp-specialised wgmma/TMA one for
//! head_dim 128
//! ([`PrefillKernel`] picks; `Auto` uses the fastest where it applies). A new variant is a kernel file, its declaration in `contract`
//! and one arm in `ops::prefill`.
//!
//! The libraries are loaded at run time: call [`probe::cuda_libraries_present`]
//! before [`CudaBackend::new`], because the bindings abort the process when a
//! library is missing. This module must not communicate (see
//! `comm::nccl_transport`) or time anything beyond the marks it hands out.

mod args;
mod contract;
mod ffi;
mod flash_sm90;
pub mod kernels;
mod launch;
mod memory;
mod ops;
pub mod probe;
mod recording;

pub use memory::CudaBuf;
pub use ops::prefill::PrefillKernel;
pub use recording::CudaRecording;

use super::{BackendError, DeviceLibrary, Dtype, Result};
use cudarc::cublas::{result as cublas, CudaBlas};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaSlice, CudaStream};
use kernels::KernelCache;
use memory::{Arena, MemoryTracker};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Errors of the CUDA layer. A failed library call reaches strategies as
/// [`BackendError::Device`] (naming its library), a limit of the kernels
/// as [`BackendError::Unsupported`].
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA driver: {0:?}")]
    Driver(#[from] drv::DriverError),
    #[error("cuBLAS: {0:?}")]
    Cublas(#[from] cublas::CublasError),
    #[error("NVRTC could not compile {file} for {arch}: {log}")]
    Nvrtc { file: &'static str, arch: String, log: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        let library = match &e {
            CudaError::Driver(_) => DeviceLibrary::Driver,
            CudaError::Cublas(_) => DeviceLibrary::Cublas,
            CudaError::Nvrtc { .. } => DeviceLibrary::Nvrtc,
            CudaError::Unsupported(what) => return BackendError::Unsupported(what.clone()),
        };
        BackendError::Device { library, message: e.to_string() }
    }
}

impl From<drv::DriverError> for BackendError {
    fn from(e: drv::DriverError) -> Self {
        CudaError::from(e).into()
    }
}

/// The CUDA backend for one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    dtype: Dtype,
    ordinal: usize,
    compute_capability: (i32, i32),
    sm_count: u32,
    max_smem_optin: u32,
    kernels: KernelCache,
    memory: Arc<MemoryTracker>,
    poison_outputs: AtomicBool,
    prefill_kernel: AtomicU8,
    /// Whether bulk copies may feed decode attention (`decode_bulk`, on
    /// sm_90 for long chunks): `FAPOOL_DECODE_KERNEL`, read when the backend
    /// starts (see [`bulk_decode_setting`]).
    bulk_decode: bool,
    /// Sinusoid frequency tables by model width (f64, as the reference computes them).
    freq_tables: Mutex<HashMap<usize, CudaSlice<f64>>>,
    /// RoPE's inverse frequencies by (head_dim, θ's bits), uploaded on first use.
    rope_tables: Mutex<HashMap<(usize, u64), CudaSlice<f64>>>,
    /// The decode step's scalars (`contract::STEP_*`), allocated on first use.
    step: Mutex<Option<CudaSlice<i32>>>,
    /// A recording is in progress: buffers come from `arena`, marks are
    /// recorded as graph nodes.
    capturing: AtomicBool,
    arena: Mutex<Arena>,
}

impl CudaBackend {
    /// Opens device `device_ordinal` (among the visible ones) with activations
    /// and weights in `dtype`. Kernels are compiled lazily on first use (or
    /// all at once by [`CudaBackend::load_all_kernels`]).
    pub fn new(device_ordinal: usize, dtype: Dtype) -> Result<Self> {
        if let Err(why) = probe::cuda_backend_libraries_present() {
            return Err(BackendError::Unavailable { backend: "cuda", reason: why });
        }
        let bulk_decode = bulk_decode_setting(std::env::var("FAPOOL_DECODE_KERNEL").ok().as_deref())?;
        let ctx = CudaContext::new(device_ordinal)?;
        // One stream carries all work, so cross-stream event tracking is
        // pure overhead.
        // SAFETY: no buffer exists yet, and every later buffer is used only
        // on `stream`, so no cross-stream synchronisation is ever needed.
        unsafe { ffi::disable_event_tracking(&ctx) };
        let stream = ctx.new_stream()?;
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(BackendError::Unavailable { backend: "cuda", reason: format!("compute capability {major}.{minor}: the kernels need 8.0 (Ampere) or newer") });
        }
        let sm_count = ctx.attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem_optin = ctx.attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        // Freed allocations stay in the pool, as a caching allocator would:
        // the same shapes are allocated again every layer and step.
        ffi::keep_freed_memory_in_pool(&ctx)?;
        let blas = CudaBlas::new(stream.clone()).map_err(CudaError::from)?;
        // Default math: no TF32 for f32 GEMMs (they must match the reference to 1e-4).
        ffi::set_default_math(&blas).map_err(CudaError::from)?;
        let kernels = KernelCache::new(ctx.clone(), format!("sm_{major}{minor}"));
        Ok(Self {
            ctx,
            stream,
            blas,
            dtype,
            ordinal: device_ordinal,
            compute_capability: (major, minor),
            sm_count,
            max_smem_optin,
            kernels,
            memory: Arc::new(MemoryTracker::default()),
            poison_outputs: AtomicBool::new(false),
            prefill_kernel: AtomicU8::new(PrefillKernel::Auto.to_u8()),
            bulk_decode,
            freq_tables: Mutex::new(HashMap::new()),
            rope_tables: Mutex::new(HashMap::new()),
            step: Mutex::new(None),
            capturing: AtomicBool::new(false),
            arena: Mutex::new(Arena::default()),
        })
    }

    /// Element type of activations and weights.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Device ordinal among the visible devices.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// `(major, minor)` compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// The device's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }
    /// Total device memory in bytes.
    pub fn total_memory_bytes(&self) -> Result<u64> {
        Ok(self.ctx.total_mem()? as u64)
    }
    /// PCI bus id as the driver writes it (`0000:19:00.0`), which
    /// `energy::GpuMonitor::new` matches to the NVML device.
    pub fn pci_bus_id(&self) -> Result<String> {
        Ok(ffi::pci_bus_id(&self.ctx)?)
    }
    /// The stream all of this backend's work is queued on (the NCCL
    /// transport queues its collectives there too).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Makes this backend's context current on the calling thread (NCCL
    /// reads the current device when a communicator is created).
    pub fn bind_to_thread(&self) -> Result<()> {
        Ok(self.ctx.bind_to_thread()?)
    }

    /// Chooses the prefill attention kernel (for comparing implementations).
    pub fn set_prefill_kernel(&self, kernel: PrefillKernel) {
        self.prefill_kernel.store(kernel.to_u8(), Ordering::Relaxed);
    }
    pub fn prefill_kernel(&self) -> PrefillKernel {
        PrefillKernel::from_u8(self.prefill_kernel.load(Ordering::Relaxed))
    }

    /// Compiles and loads every kernel now, so no timed call pays for NVRTC.
    pub fn load_all_kernels(&self) -> Result<()> {
        self.kernels.load_all()?;
        Ok(())
    }

    /// The NVRTC target the kernels are compiled for (e.g. `sm_90`).
    pub fn kernel_arch(&self) -> &str {
        self.kernels.arch()
    }
}

/// Whether bulk copies may feed decode attention, from the value of
/// `FAPOOL_DECODE_KERNEL`: unset or `auto`, yes (`decode_bulk` on sm_90 for
/// chunks of 256 rows or more); `rows`, no (every chunk on the
/// register-only `decode_rows`, to compare the two). Read once, when a
/// backend starts: the time before a decode's first launch is part of every
/// step. Any other value is refused before any GPU work, naming the ones
/// accepted.
fn bulk_decode_setting(value: Option<&str>) -> Result<bool> {
    match value {
        None | Some("auto") => Ok(true),
        Some("rows") => Ok(false),
        Some(other) => Err(BackendError::Unsupported(format!("FAPOOL_DECODE_KERNEL=`{other}`: expected `auto` (bulk copies on sm_90 for chunks of 256 rows or more) or `rows` (never)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::bulk_decode_setting;

    #[test]
    fn the_decode_kernel_setting_accepts_auto_and_rows_and_names_them_otherwise() {
        assert!(bulk_decode_setting(None).unwrap());
        assert!(bulk_decode_setting(Some("auto")).unwrap());
        assert!(!bulk_decode_setting(Some("rows")).unwrap());
        let err = bulk_decode_setting(Some("bulk")).unwrap_err().to_string();
        assert!(err.contains("FAPOOL_DECODE_KERNEL=`bulk`") && err.contains("`auto`") && err.contains("`rows`"), "{err}");
    }
}
