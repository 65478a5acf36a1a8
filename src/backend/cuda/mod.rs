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
//! Attention prefill has two implementations: a general one for any
//! head_dim up to 256 and any dtype, and a tensor-core one for head_dim 128
//! in bf16/fp16 ([`PrefillKernel`] picks; `Auto` uses the tensor-core path
//! wherever it applies).
//!
//! The libraries are loaded at run time: call [`probe::cuda_libraries_present`]
//! before [`CudaBackend::new`], because the bindings abort the process when a
//! library is missing. This module must not communicate (see
//! `comm::nccl_transport`) or time anything beyond the marks it hands out.

pub mod kernels;
pub mod probe;

use super::{Backend, BackendError, DecodeShape, Dtype, PrefillShape, Result, RowRun, StepVars};
use cudarc::cublas::{result as cublas, sys as cublas_sys, CudaBlas};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use kernels::{KernelCache, KernelFile};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Errors of the CUDA layer; they reach strategies as [`BackendError::Device`].
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
        BackendError::Device(e.to_string())
    }
}

impl From<drv::DriverError> for BackendError {
    fn from(e: drv::DriverError) -> Self {
        CudaError::from(e).into()
    }
}

/// Which prefill attention kernel runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefillKernel {
    /// The fastest tensor-core kernel (`Flash128W4`, measured on an H200)
    /// wherever one applies (head_dim 128, bf16/fp16), else the general one.
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
}

impl PrefillKernel {
    pub const ALL: [PrefillKernel; 5] = [PrefillKernel::Auto, PrefillKernel::General, PrefillKernel::Flash128, PrefillKernel::Flash64, PrefillKernel::Flash128W4];

    pub fn name(self) -> &'static str {
        match self {
            PrefillKernel::Auto => "auto",
            PrefillKernel::General => "general",
            PrefillKernel::Flash128 => "flash128",
            PrefillKernel::Flash64 => "flash64",
            PrefillKernel::Flash128W4 => "flash128w4",
        }
    }

    fn from_u8(v: u8) -> Self {
        Self::ALL[v as usize]
    }

    fn to_u8(self) -> u8 {
        Self::ALL.iter().position(|&k| k == self).expect("listed") as u8
    }
}

impl std::str::FromStr for PrefillKernel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| format!("unknown prefill kernel `{s}` (expected auto, general, flash128, flash64 or flash128w4)"))
    }
}

/// Live and peak bytes of a backend's own allocations.
#[derive(Debug, Default)]
struct MemoryTracker {
    live: AtomicU64,
    peak: AtomicU64,
}

impl MemoryTracker {
    fn add(&self, bytes: u64) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    fn sub(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Returns its bytes to the tracker when the buffer is dropped.
#[derive(Debug)]
struct Tracked {
    tracker: Arc<MemoryTracker>,
    bytes: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker.sub(self.bytes);
    }
}

/// One block of device memory that buffers created while recording are
/// carved from (a recording must not allocate from the stream-ordered pool:
/// its addresses have to stay fixed for every replay). Freed when the last
/// buffer carved from it and the recording that uses it are gone.
#[derive(Debug)]
struct ArenaChunk {
    ctx: Arc<CudaContext>,
    ptr: u64,
    bytes: usize,
    _tracked: Tracked,
}

impl Drop for ArenaChunk {
    fn drop(&mut self) {
        // Work that used the chunk may still be queued: wait for it first.
        let _ = self.ctx.synchronize();
        // SAFETY: `ptr` came from `malloc_sync` and nothing uses it any more.
        let _ = unsafe { drv::free_sync(self.ptr) };
    }
}

/// The chunks of the recording in progress and the bump offset in the last one.
#[derive(Debug, Default)]
struct Arena {
    chunks: Vec<Arc<ArenaChunk>>,
    used: usize,
}

const ARENA_CHUNK_BYTES: usize = 16 << 20;

/// Where a buffer's bytes live.
#[derive(Debug)]
enum Mem {
    /// The stream-ordered pool, freed on the stream when dropped.
    Pool(CudaSlice<u8>),
    /// Part of a recording's arena chunk.
    Arena { ptr: u64, bytes: usize, _chunk: Arc<ArenaChunk> },
}

/// A device buffer: `len` elements of `dtype`.
///
/// Freed (stream-ordered) when dropped. Allocations are at least 16 bytes
/// and 16-byte aligned, which the vectorised kernels rely on.
#[derive(Debug)]
pub struct CudaBuf {
    mem: Mem,
    dtype: Dtype,
    len: usize,
    _tracked: Option<Tracked>,
}

impl CudaBuf {
    /// Element type of the buffer.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes the elements occupy.
    pub fn size_bytes(&self) -> usize {
        self.len * self.dtype.size_bytes()
    }
    /// The raw device address, for kernel arguments and NCCL. Valid while
    /// `self` lives; work queued on the backend's stream may use it until the
    /// buffer is dropped, since frees are ordered on the same stream.
    pub fn device_ptr(&self) -> u64 {
        match &self.mem {
            Mem::Pool(m) => m.device_ptr(m.stream()).0,
            Mem::Arena { ptr, .. } => *ptr,
        }
    }
    fn allocated_bytes(&self) -> usize {
        match &self.mem {
            Mem::Pool(m) => m.len(),
            Mem::Arena { bytes, .. } => *bytes,
        }
    }
}

/// A recorded decode step (a CUDA graph) and the arena its buffers live in.
pub struct CudaRecording {
    graph: CudaGraph,
    _arena: Vec<Arc<ArenaChunk>>,
}

/// The decode step's scalars in device memory, as int32:
/// `[pos, store_at (or -1), len, 0, token of each sequence...]` (the
/// kernels read them at these offsets).
const STEP_HEADER: usize = 4;
/// Byte offset of `len` in the step scalars.
const STEP_LEN_BYTES: u64 = 8;

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
    /// Sinusoid frequency tables by model width (f64, as the CPU computes them).
    freq_tables: Mutex<HashMap<usize, CudaSlice<f64>>>,
    /// The decode step's scalars (see [`STEP_HEADER`]), allocated on first use.
    step: Mutex<Option<CudaSlice<i32>>>,
    /// A recording is in progress: buffers come from `arena`, marks are
    /// recorded as graph nodes.
    capturing: AtomicBool,
    arena: Mutex<Arena>,
}

const THREADS: u32 = 256;

fn shape_err(msg: String) -> BackendError {
    BackendError::Shape(msg)
}

fn check(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(shape_err(format!("{what}: buffer holds {have} elements, needs {need}")));
    }
    Ok(())
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_err(format!("{what} = {v} exceeds the 32-bit range the kernels index with")))
}

/// Kernel names are `base_suffix`; the names are static so the function
/// cache can key on them.
macro_rules! kernel_name {
    ($base:literal, $dtype:expr) => {
        match $dtype {
            Dtype::Bf16 => concat!($base, "_bf16"),
            Dtype::Fp16 => concat!($base, "_f16"),
            Dtype::Fp32 => concat!($base, "_f32"),
        }
    };
}

impl CudaBackend {
    /// Opens device `device_ordinal` (among the visible ones) with activations
    /// and weights in `dtype`. Kernels are compiled lazily on first use (or
    /// all at once by [`CudaBackend::load_all_kernels`]).
    pub fn new(device_ordinal: usize, dtype: Dtype) -> Result<Self> {
        if let Err(why) = probe::cuda_backend_libraries_present() {
            return Err(BackendError::Unavailable { backend: "cuda", reason: why });
        }
        let ctx = CudaContext::new(device_ordinal)?;
        // One stream carries all work, so cross-stream event tracking is
        // pure overhead.
        // SAFETY: no buffer exists yet, and every later buffer is used only
        // on `stream`, so no cross-stream synchronisation is ever needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(BackendError::Unavailable { backend: "cuda", reason: format!("compute capability {major}.{minor}: the kernels need 8.0 (Ampere) or newer") });
        }
        let sm_count = ctx.attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem_optin = ctx.attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        keep_freed_memory_in_pool(&ctx)?;
        let blas = CudaBlas::new(stream.clone()).map_err(CudaError::from)?;
        // Default math: no TF32 for f32 GEMMs (they must match the CPU to 1e-4).
        // SAFETY: `blas.handle()` is a live handle owned by `blas`.
        unsafe { cublas_sys::cublasSetMathMode(*blas.handle(), cublas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH) }.result().map_err(CudaError::from)?;
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
            freq_tables: Mutex::new(HashMap::new()),
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
        let mut buf = [0 as std::ffi::c_char; 32];
        self.ctx.bind_to_thread()?;
        // SAFETY: `buf` is writable for its full length, which is passed; the
        // device handle belongs to this backend's context.
        unsafe { drv_sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, self.ctx.cu_device()) }.result()?;
        let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
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

    /// Bytes currently held by this backend's buffers.
    pub fn memory_in_use_bytes(&self) -> u64 {
        self.memory.live.load(Ordering::Relaxed)
    }
    /// Restarts the high-water mark at the bytes now in use.
    pub fn reset_peak_memory(&self) {
        self.memory.peak.store(self.memory.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// When on, every buffer an operation creates is filled with NaN before
    /// the kernel runs, so an output element the kernel forgets to write
    /// shows up in checks (see `gpu_checks`). Off by default (it costs a
    /// memset per output).
    pub fn set_poison_outputs(&self, on: bool) {
        self.poison_outputs.store(on, Ordering::Relaxed);
    }
    pub fn poison_outputs(&self) -> bool {
        self.poison_outputs.load(Ordering::Relaxed)
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

    /// Allocates `len` elements of `dtype` (uninitialised unless poisoning is on).
    pub fn alloc(&self, dtype: Dtype, len: usize) -> Result<CudaBuf> {
        let bytes = (len * dtype.size_bytes()).max(16).next_multiple_of(16);
        let buf = if self.capturing.load(Ordering::Relaxed) {
            let (ptr, chunk) = self.arena_alloc(bytes)?;
            CudaBuf { mem: Mem::Arena { ptr, bytes, _chunk: chunk }, dtype, len, _tracked: None }
        } else {
            // SAFETY: the memory is uninitialised; every caller writes what it
            // reads (or poisons it just below).
            let mem = unsafe { self.stream.alloc::<u8>(bytes) }?;
            self.memory.add(bytes as u64);
            CudaBuf { mem: Mem::Pool(mem), dtype, len, _tracked: Some(Tracked { tracker: self.memory.clone(), bytes: bytes as u64 }) }
        };
        if self.poison_outputs() {
            self.memset(&buf, 0xff)?;
        }
        Ok(buf)
    }

    fn memset(&self, buf: &CudaBuf, byte: u8) -> Result<()> {
        // SAFETY: the range lies inside `buf`'s allocation; the memset is
        // ordered on the stream that owns and frees it.
        unsafe { drv::memset_d8_async(buf.device_ptr(), byte, buf.allocated_bytes(), self.stream.cu_stream()) }?;
        Ok(())
    }

    /// `bytes` (a multiple of 16) from the recording's arena, 256-byte aligned.
    fn arena_alloc(&self, bytes: usize) -> Result<(u64, Arc<ArenaChunk>)> {
        let mut arena = self.arena.lock().expect("arena lock");
        let fits = arena.chunks.last().is_some_and(|c| arena.used + bytes <= c.bytes);
        if !fits {
            let size = bytes.next_multiple_of(256).max(ARENA_CHUNK_BYTES);
            // SAFETY: a plain device allocation (allowed while recording in
            // relaxed mode); freed by `ArenaChunk::drop`.
            let ptr = unsafe { drv::malloc_sync(size) }?;
            self.memory.add(size as u64);
            let tracked = Tracked { tracker: self.memory.clone(), bytes: size as u64 };
            arena.chunks.push(Arc::new(ArenaChunk { ctx: self.ctx.clone(), ptr, bytes: size, _tracked: tracked }));
            arena.used = 0;
        }
        let chunk = arena.chunks.last().expect("a chunk was just ensured").clone();
        let ptr = chunk.ptr + arena.used as u64;
        arena.used += bytes.next_multiple_of(256);
        Ok((ptr, chunk))
    }

    /// The address of the step scalars, which must have been set.
    fn step_ptr(&self) -> Result<u64> {
        let step = self.step.lock().expect("step lock");
        let ptr = step.as_ref().map(|s| s.device_ptr(&self.stream).0);
        ptr.ok_or_else(|| shape_err("a *_step operation ran before set_step".into()))
    }
    /// `len` zeros of `dtype`.
    pub fn zeros_of(&self, dtype: Dtype, len: usize) -> Result<CudaBuf> {
        let buf = self.alloc(dtype, len)?;
        self.memset(&buf, 0)?;
        Ok(buf)
    }

    /// Uploads `host` as `dtype` (rounded to nearest even).
    pub fn upload_as(&self, host: &[f32], dtype: Dtype) -> Result<CudaBuf> {
        let buf = self.alloc(dtype, host.len())?;
        if host.is_empty() {
            return Ok(buf);
        }
        let dst = buf.device_ptr();
        // SAFETY (all arms): `dst` has room for `host.len()` elements of
        // `dtype`; copies from pageable memory return once the host data has
        // been staged, so the temporaries may be dropped afterwards.
        match dtype {
            Dtype::Fp32 => unsafe { drv::memcpy_htod_async(dst, host, self.stream.cu_stream()) }?,
            Dtype::Bf16 => {
                let v: Vec<u16> = host.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                unsafe { drv::memcpy_htod_async(dst, &v[..], self.stream.cu_stream()) }?
            }
            Dtype::Fp16 => {
                let v: Vec<u16> = host.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
                unsafe { drv::memcpy_htod_async(dst, &v[..], self.stream.cu_stream()) }?
            }
        }
        Ok(buf)
    }

    /// Uploads `host` as f32 whatever the model dtype (log-sum-exp buffers).
    pub fn upload_f32(&self, host: &[f32]) -> Result<CudaBuf> {
        self.upload_as(host, Dtype::Fp32)
    }

    /// A buffer of `len` pseudo-random values uniform in `[-scale, scale)`,
    /// generated on the device from `seed` (for benchmarks on non-zero data
    /// without a host round trip).
    pub fn random_uniform(&self, dtype: Dtype, len: usize, seed: u64, scale: f32) -> Result<CudaBuf> {
        let out = self.alloc(dtype, len)?;
        if len == 0 {
            return Ok(out);
        }
        let f = self.kernels.function(KernelFile::Elementwise, kernel_name!("fill_uniform", dtype))?;
        let (p, n) = (out.device_ptr(), len as u64);
        let grid = self.grid_for(len.div_ceil(8));
        self.launch(&f, grid, THREADS, 0, |a| {
            a.arg(&p).arg(&n).arg(&seed).arg(&scale);
        })?;
        Ok(out)
    }

    fn grid_for(&self, work_items: usize) -> u32 {
        let blocks = work_items.div_ceil(THREADS as usize).max(1);
        blocks.min(self.sm_count as usize * 32) as u32
    }

    /// Launches `f` on the backend's stream with the arguments `args` pushes.
    fn launch<'a>(&'a self, f: &'a CudaFunction, grid: impl Into<GridDim>, block: u32, smem: u32, args: impl FnOnce(&mut cudarc::driver::LaunchArgs<'a>)) -> Result<()> {
        let grid = grid.into().0;
        let mut builder = self.stream.launch_builder(f);
        args(&mut builder);
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem };
        // SAFETY: every caller passes the argument list its kernel declares
        // (device addresses as u64, then scalars of the declared widths), with
        // buffers whose sizes were checked against the kernel's accesses.
        unsafe { builder.launch(cfg) }?;
        Ok(())
    }

    fn same_dtype(&self, what: &str, bufs: &[&CudaBuf]) -> Result<Dtype> {
        let d = bufs[0].dtype;
        if let Some(b) = bufs.iter().find(|b| b.dtype != d) {
            return Err(shape_err(format!("{what}: mixed dtypes {} and {}", d, b.dtype)));
        }
        Ok(d)
    }

    fn expect_f32(&self, what: &str, b: &CudaBuf) -> Result<()> {
        if b.dtype != Dtype::Fp32 {
            return Err(shape_err(format!("{what}: log-sum-exp buffers are f32, got {}", b.dtype)));
        }
        Ok(())
    }

    fn freq_table(&self, d: usize) -> Result<u64> {
        let mut tables = self.freq_tables.lock().expect("freq table lock");
        if let Some(t) = tables.get(&d) {
            return Ok(t.device_ptr(&self.stream).0);
        }
        if self.capturing.load(Ordering::Relaxed) {
            return Err(shape_err(format!("the width-{d} frequency table cannot be uploaded while recording: embed once before recording")));
        }
        // Same formula and precision as `cpu::sinusoid`.
        let host: Vec<f64> = (0..d.div_ceil(2).max(1)).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64)).collect();
        let t = self.stream.clone_htod(&host)?;
        let p = t.device_ptr(&self.stream).0;
        tables.insert(d, t);
        Ok(p)
    }

    /// Copies row runs between two buffers of rows of `row_bytes`. `table`
    /// holds (src_row, dst_row, len, first_flat_row) per non-empty run.
    fn copy_row_runs(&self, dst: u64, src: u64, row_bytes: usize, table: &[u64], total_rows: usize) -> Result<()> {
        if total_rows == 0 || row_bytes == 0 {
            return Ok(());
        }
        let nruns = (table.len() / 4) as i32;
        let (rb, total) = (row_bytes as u64, total_rows as u64);
        let grid = total_rows.min(65_535 * 16) as u32;
        if table.len() <= 4 * INLINE_RUNS {
            // Small tables travel as a kernel argument: no upload, so the copy
            // can be recorded.
            let mut inline = RunTable([0; 4 * INLINE_RUNS]);
            inline.0[..table.len()].copy_from_slice(table);
            let f = self.kernels.function(KernelFile::Copy, "copy_row_runs_inline")?;
            return self.launch(&f, grid, THREADS, 0, |a| {
                a.arg(&dst).arg(&src).arg(&rb).arg(&inline).arg(&nruns).arg(&total);
            });
        }
        if self.capturing.load(Ordering::Relaxed) {
            return Err(shape_err(format!("{nruns} row runs cannot be recorded (at most {INLINE_RUNS})")));
        }
        let runs = self.stream.clone_htod(table)?;
        let (runs_ptr, _s) = runs.device_ptr(&self.stream);
        let f = self.kernels.function(KernelFile::Copy, "copy_row_runs")?;
        self.launch(&f, grid, THREADS, 0, |a| {
            a.arg(&dst).arg(&src).arg(&rb).arg(&runs_ptr).arg(&nruns).arg(&total);
        })?;
        // `runs` is freed on the stream after the kernel: stream order keeps it alive.
        Ok(())
    }

    fn prefill_general(&self, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, out: &CudaBuf, lse: &CudaBuf, s: PrefillShape) -> Result<()> {
        if s.head_dim > 256 {
            return Err(BackendError::Device(format!("prefill attention supports head_dim up to 256, got {}", s.head_dim)));
        }
        if s.heads > 65_535 || s.nseq > 65_535 {
            return Err(shape_err(format!("prefill: {} heads x {} sequences exceed the grid limit", s.heads, s.nseq)));
        }
        let f = self.kernels.function(KernelFile::Prefill, kernel_name!("prefill_general", q.dtype))?;
        // K and V tiles of 32 rows (pitch d + 1) and one query row per warp, as f32.
        let smem = ((2 * 32 * (s.head_dim + 1) + 8 * s.head_dim) * 4) as u32;
        self.allow_smem(&f, smem)?;
        let grid = (s.sq.div_ceil(8) as u32, s.heads as u32, s.nseq as u32);
        let (qp, kp, vp, op, lp) = (q.device_ptr(), k.device_ptr(), v.device_ptr(), out.device_ptr(), lse.device_ptr());
        let (sq, skv, stride, heads, d, off) =
            (to_i32("sq", s.sq)?, to_i32("skv", s.skv)?, to_i32("kv_seq_stride", s.kv_seq_stride)?, to_i32("heads", s.heads)?, to_i32("head_dim", s.head_dim)?, to_i32("q_offset", s.q_offset)?);
        let scale_log2 = std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt();
        self.launch(&f, grid, 256, smem, |a| {
            a.arg(&qp).arg(&kp).arg(&vp).arg(&op).arg(&lp).arg(&sq).arg(&skv).arg(&stride).arg(&heads).arg(&d).arg(&off).arg(&scale_log2);
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn prefill_flash(&self, kernel: PrefillKernel, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, out: &CudaBuf, lse: &CudaBuf, s: PrefillShape) -> Result<()> {
        // (warps, 16-row fragments per warp, name)
        let (warps, mf, name) = match (kernel, q.dtype) {
            (PrefillKernel::Flash128, Dtype::Bf16) => (8, 1, "flash_fwd_d128_w8_bf16"),
            (PrefillKernel::Flash128, Dtype::Fp16) => (8, 1, "flash_fwd_d128_w8_f16"),
            (PrefillKernel::Flash64, Dtype::Bf16) => (4, 1, "flash_fwd_d128_w4_bf16"),
            (PrefillKernel::Flash64, Dtype::Fp16) => (4, 1, "flash_fwd_d128_w4_f16"),
            (PrefillKernel::Flash128W4, Dtype::Bf16) => (4, 2, "flash_fwd_d128_w4m2_bf16"),
            (PrefillKernel::Flash128W4, Dtype::Fp16) => (4, 2, "flash_fwd_d128_w4m2_f16"),
            _ => return Err(CudaError::Unsupported(format!("tensor-core prefill `{}` in {}", kernel.name(), q.dtype)).into()),
        };
        let f = self.kernels.function(KernelFile::Flash, name)?;
        let bm = 16 * mf * warps as usize;
        // Q block plus two K and two V tiles of 64 rows, 256 bytes per row.
        let smem = ((bm + 4 * 64) * 256) as u32;
        self.allow_smem(&f, smem)?;
        // All of L1 as shared memory: the tiles bypass L1 (cp.async.cg), and
        // two blocks of the 4-warp kernels fit only with the largest carveout.
        f.set_attribute(drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)?;
        let mblocks = s.sq.div_ceil(bm);
        if mblocks > 65_535 || s.nseq > 65_535 {
            return Err(shape_err(format!("prefill: {mblocks} query blocks or {} sequences exceed the grid limit", s.nseq)));
        }
        let grid = (s.heads as u32, mblocks as u32, s.nseq as u32);
        let (qp, kp, vp, op, lp) = (q.device_ptr(), k.device_ptr(), v.device_ptr(), out.device_ptr(), lse.device_ptr());
        let (sq, skv, stride, heads, off) = (to_i32("sq", s.sq)?, to_i32("skv", s.skv)?, to_i32("kv_seq_stride", s.kv_seq_stride)?, to_i32("heads", s.heads)?, to_i32("q_offset", s.q_offset)?);
        let scale_log2 = std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt();
        self.launch(&f, grid, 32 * warps, smem, |a| {
            a.arg(&qp).arg(&kp).arg(&vp).arg(&op).arg(&lp).arg(&sq).arg(&skv).arg(&stride).arg(&heads).arg(&off).arg(&scale_log2);
        })
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

    /// Split-KV decode attention over `s.len` rows, or with `from_step` over
    /// the step's length read on the device, the chunks laid out for `s.cap`.
    fn decode_attention(&self, q: &CudaBuf, k_cache: &CudaBuf, v_cache: &CudaBuf, s: DecodeShape, from_step: bool) -> Result<(CudaBuf, CudaBuf)> {
        let width = s.heads * s.head_dim;
        check("decode q", q.len, s.nseq * width)?;
        check("decode k cache", k_cache.len, s.nseq * s.cap * width)?;
        check("decode v cache", v_cache.len, s.nseq * s.cap * width)?;
        let len_ptr = if from_step { self.step_ptr()? + STEP_LEN_BYTES } else { 0 };
        // The length the chunks are laid out for.
        let span = if from_step { s.cap } else { s.len };
        if s.len > s.cap && !from_step {
            return Err(shape_err(format!("decode len {} exceeds cache capacity {}", s.len, s.cap)));
        }
        let dtype = self.same_dtype("decode", &[q, k_cache, v_cache])?;
        if s.head_dim > 256 {
            return Err(BackendError::Device(format!("decode attention supports head_dim up to 256, got {}", s.head_dim)));
        }
        let out = self.alloc(dtype, s.nseq * width)?;
        let lse = self.alloc(Dtype::Fp32, s.nseq * s.heads)?;
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
        let hg = if rows_kernel { (512 / tpr_rows).min(s.heads) } else { 0 };
        let rows_kernel = rows_kernel && (hg * tpr_rows) % 32 == 0;
        let head_groups = if rows_kernel { s.heads.div_ceil(hg) } else { s.heads };
        // `blocks_per_sm` blocks per SM at a time (1 for the row-major
        // kernel's 512-thread blocks, which measured fastest on an H200; 4 for
        // the 128-thread one).
        let per_sm = std::env::var("FAPOOL_DECODE_BLOCKS_PER_SM").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(if rows_kernel { 1 } else { 4 });
        let pairs = s.nseq * s.heads;
        let nsplit = decode_splits(span, s.nseq * head_groups, per_sm * self.sm_count as usize);
        let chunk = if nsplit == 0 { 0 } else { span.div_ceil(nsplit) };
        let nsplit = if chunk == 0 { 0 } else { span.div_ceil(chunk) };
        let part_o = self.alloc(Dtype::Fp32, (pairs * nsplit * s.head_dim).max(1))?;
        let part_lse = self.alloc(Dtype::Fp32, (pairs * nsplit).max(1))?;
        let (qp, kp, vp, pop, plp) = (q.device_ptr(), k_cache.device_ptr(), v_cache.device_ptr(), part_o.device_ptr(), part_lse.device_ptr());
        let (cap, len, heads, d) = (to_i32("cap", s.cap)?, to_i32("len", s.len)?, to_i32("heads", s.heads)?, to_i32("head_dim", s.head_dim)?);
        let (chunk_i, nsplit_i) = (to_i32("chunk", chunk)?, to_i32("splits", nsplit)?);
        let scale_log2 = std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt();
        if nsplit > 0 && rows_kernel {
            let f = self.kernels.function(KernelFile::Decode, kernel_name!("decode_rows", dtype))?;
            let hg_i = hg as i32;
            self.launch(&f, (nsplit as u32, head_groups as u32, s.nseq as u32), (hg * tpr_rows) as u32, 0, |a| {
                a.arg(&qp).arg(&kp).arg(&vp).arg(&pop).arg(&plp).arg(&cap).arg(&len).arg(&len_ptr).arg(&heads).arg(&d).arg(&hg_i).arg(&chunk_i).arg(&scale_log2);
            })?;
        } else if nsplit > 0 {
            let f = self.kernels.function(KernelFile::Decode, kernel_name!("decode_partial", dtype))?;
            // Threads per head row: eight elements each, a power of two up to 32.
            let tpr = s.head_dim.div_ceil(8).next_power_of_two() as i32;
            self.launch(&f, (nsplit as u32, s.heads as u32, s.nseq as u32), 128, 0, |a| {
                a.arg(&qp).arg(&kp).arg(&vp).arg(&pop).arg(&plp).arg(&cap).arg(&len).arg(&len_ptr).arg(&heads).arg(&d).arg(&tpr).arg(&chunk_i).arg(&scale_log2);
            })?;
        }
        let f = self.kernels.function(KernelFile::Decode, kernel_name!("decode_combine", dtype))?;
        let (op, lp) = (out.device_ptr(), lse.device_ptr());
        self.launch(&f, (s.heads as u32, s.nseq as u32, 1), 128, 0, |a| {
            a.arg(&pop).arg(&plp).arg(&op).arg(&lp).arg(&nsplit_i).arg(&heads).arg(&d);
        })?;
        Ok((out, lse))
    }
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

/// Row runs passed by value to `copy_row_runs_inline` (kernels/copy.cu).
const INLINE_RUNS: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct RunTable([u64; 4 * INLINE_RUNS]);

// SAFETY: plain old data with the layout of the kernel's `RunTable`.
unsafe impl DeviceRepr for RunTable {}

/// Launch grid dimensions from a block count or a triple.
struct GridDim((u32, u32, u32));

impl From<u32> for GridDim {
    fn from(x: u32) -> Self {
        GridDim((x, 1, 1))
    }
}

impl From<(u32, u32, u32)> for GridDim {
    fn from(g: (u32, u32, u32)) -> Self {
        GridDim(g)
    }
}

/// Freed allocations stay in the device's memory pool instead of going back
/// to the driver at each synchronisation, as a caching allocator would: the
/// same shapes are allocated again every layer and step.
fn keep_freed_memory_in_pool(ctx: &Arc<CudaContext>) -> Result<()> {
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
        drv_sys::cuMemPoolSetAttribute(pool, drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut std::ffi::c_void).result()?;
    }
    Ok(())
}

/// The cuBLAS element type of a dtype.
fn cuda_data_type(d: Dtype) -> cublas_sys::cudaDataType {
    match d {
        Dtype::Bf16 => cublas_sys::cudaDataType::CUDA_R_16BF,
        Dtype::Fp16 => cublas_sys::cudaDataType::CUDA_R_16F,
        Dtype::Fp32 => cublas_sys::cudaDataType::CUDA_R_32F,
    }
}

fn download_raw(stream: &CudaStream, buf: &CudaBuf) -> Result<Vec<f32>> {
    if buf.len == 0 {
        return Ok(Vec::new());
    }
    let src = buf.device_ptr();
    // SAFETY (all arms): the host vectors have exactly `len` elements of the
    // buffer's element size; a copy to pageable memory returns only once it
    // has completed.
    Ok(match buf.dtype {
        Dtype::Fp32 => {
            let mut v = vec![0f32; buf.len];
            unsafe { drv::memcpy_dtoh_async(&mut v[..], src, stream.cu_stream()) }?;
            stream.synchronize()?;
            v
        }
        Dtype::Bf16 | Dtype::Fp16 => {
            let mut v = vec![0u16; buf.len];
            unsafe { drv::memcpy_dtoh_async(&mut v[..], src, stream.cu_stream()) }?;
            stream.synchronize()?;
            if buf.dtype == Dtype::Bf16 {
                v.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect()
            } else {
                v.into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect()
            }
        }
    })
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    /// A recorded CUDA event (created with timing enabled).
    type Mark = CudaEvent;
    type Graph = CudaRecording;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }
    fn size_bytes(&self, buf: &CudaBuf) -> usize {
        buf.size_bytes()
    }

    fn upload(&self, host: &[f32]) -> Result<CudaBuf> {
        self.upload_as(host, self.dtype)
    }
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        download_raw(&self.stream, buf)
    }
    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.zeros_of(self.dtype, len)
    }
    fn zeros_f32(&self, len: usize) -> Result<CudaBuf> {
        self.zeros_of(Dtype::Fp32, len)
    }

    fn embed(&self, table: &CudaBuf, d: usize, tokens: &[u32], nseq: usize, n: usize, pos0: usize) -> Result<CudaBuf> {
        let rows = nseq * n;
        check("embed tokens", tokens.len(), rows)?;
        let tokens = &tokens[..rows];
        if let Some(&max) = tokens.iter().max() {
            check("embedding table", table.len, (max as usize + 1) * d)?;
        }
        let out = self.alloc(table.dtype, rows * d)?;
        if rows == 0 || d == 0 {
            return Ok(out);
        }
        let tok = self.stream.clone_htod(tokens)?;
        let (tok_ptr, _s) = tok.device_ptr(&self.stream);
        let freq = self.freq_table(d)?;
        let f = self.kernels.function(KernelFile::Embed, kernel_name!("embed", table.dtype))?;
        let (op, tp) = (out.device_ptr(), table.device_ptr());
        let (rows64, d64, n64, pos64) = (rows as u64, d as u64, n as u64, pos0 as u64);
        let grid = rows.min(65_535 * 16) as u32;
        self.launch(&f, grid, THREADS, 0, |a| {
            a.arg(&op).arg(&tp).arg(&tok_ptr).arg(&freq).arg(&rows64).arg(&d64).arg(&n64).arg(&pos64);
        })?;
        Ok(out)
    }

    fn matmul(&self, x: &CudaBuf, w: &CudaBuf, m: usize, k: usize, n: usize) -> Result<CudaBuf> {
        check("matmul x", x.len, m * k)?;
        check("matmul w", w.len, k * n)?;
        let dtype = self.same_dtype("matmul", &[x, w])?;
        if m == 0 || n == 0 || k == 0 {
            return self.zeros_of(dtype, m * n);
        }
        let out = self.alloc(dtype, m * n)?;
        let (mi, ki, ni) = (to_i32("matmul m", m)?, to_i32("matmul k", k)?, to_i32("matmul n", n)?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let t = cuda_data_type(dtype);
        // Row-major C[m,n] = X[m,k] W[k,n] is column-major C^T = W^T X^T:
        // W is a column-major [n,k] matrix with ld n, X a [k,m] one with ld k.
        // SAFETY: the buffers hold at least k*n, m*k and m*n elements of
        // `dtype` (checked above); alpha/beta are f32 as COMPUTE_32F expects;
        // the handle's stream is the backend's stream.
        unsafe {
            cublas::gemm_ex(
                *self.blas.handle(),
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                &alpha as *const f32 as *const _,
                w.device_ptr() as *const _,
                t,
                ni,
                x.device_ptr() as *const _,
                t,
                ki,
                &beta as *const f32 as *const _,
                out.device_ptr() as *mut _,
                t,
                ni,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(CudaError::from)?;
        Ok(out)
    }

    fn rmsnorm(&self, x: &CudaBuf, weight: &CudaBuf, rows: usize, cols: usize, eps: f32) -> Result<CudaBuf> {
        check("rmsnorm x", x.len, rows * cols)?;
        check("rmsnorm weight", weight.len, cols)?;
        let dtype = self.same_dtype("rmsnorm", &[x, weight])?;
        let out = self.alloc(dtype, rows * cols)?;
        if rows == 0 || cols == 0 {
            return Ok(out);
        }
        if rows > i32::MAX as usize {
            return Err(shape_err(format!("rmsnorm: {rows} rows exceed the grid limit")));
        }
        let f = self.kernels.function(KernelFile::Norm, kernel_name!("rmsnorm", dtype))?;
        let (op, xp, wp, r, c) = (out.device_ptr(), x.device_ptr(), weight.device_ptr(), rows as u64, cols as u64);
        self.launch(&f, rows as u32, 256, 0, |a| {
            a.arg(&op).arg(&xp).arg(&wp).arg(&r).arg(&c).arg(&eps);
        })?;
        Ok(out)
    }

    fn gelu(&self, x: &mut CudaBuf) -> Result<()> {
        if x.len == 0 {
            return Ok(());
        }
        let f = self.kernels.function(KernelFile::Elementwise, kernel_name!("gelu", x.dtype))?;
        let (p, n) = (x.device_ptr(), x.len as u64);
        self.launch(&f, self.grid_for(x.len.div_ceil(8)), THREADS, 0, |a| {
            a.arg(&p).arg(&n);
        })
    }

    fn gelu_mul(&self, gate: &mut CudaBuf, up: &CudaBuf) -> Result<()> {
        check("gelu_mul up", up.len, gate.len)?;
        let dtype = self.same_dtype("gelu_mul", &[gate, up])?;
        if gate.len == 0 {
            return Ok(());
        }
        let f = self.kernels.function(KernelFile::Elementwise, kernel_name!("gelu_mul", dtype))?;
        let (g, u, n) = (gate.device_ptr(), up.device_ptr(), gate.len as u64);
        self.launch(&f, self.grid_for(gate.len.div_ceil(8)), THREADS, 0, |a| {
            a.arg(&g).arg(&u).arg(&n);
        })
    }

    fn add_assign(&self, x: &mut CudaBuf, y: &CudaBuf) -> Result<()> {
        check("add_assign y", y.len, x.len)?;
        let dtype = self.same_dtype("add_assign", &[x, y])?;
        if x.len == 0 {
            return Ok(());
        }
        let f = self.kernels.function(KernelFile::Elementwise, kernel_name!("add", dtype))?;
        let (xp, yp, n) = (x.device_ptr(), y.device_ptr(), x.len as u64);
        self.launch(&f, self.grid_for(x.len.div_ceil(8)), THREADS, 0, |a| {
            a.arg(&xp).arg(&yp).arg(&n);
        })
    }

    fn split_qkv(&self, qkv: &CudaBuf, rows: usize, width: usize) -> Result<(CudaBuf, CudaBuf, CudaBuf)> {
        check("split_qkv", qkv.len, rows * 3 * width)?;
        let es = qkv.dtype.size_bytes();
        let parts = [self.alloc(qkv.dtype, rows * width)?, self.alloc(qkv.dtype, rows * width)?, self.alloc(qkv.dtype, rows * width)?];
        if rows > 0 && width > 0 {
            let f = self.kernels.function(KernelFile::Copy, "copy_rows_strided")?;
            let (dst_pitch, src_pitch, row_bytes, nrows) = ((width * es) as u64, (3 * width * es) as u64, (width * es) as u64, rows as u64);
            let grid = rows.min(65_535 * 16) as u32;
            for (i, part) in parts.iter().enumerate() {
                let dst = part.device_ptr();
                let src = qkv.device_ptr() + (i * width * es) as u64;
                self.launch(&f, grid, THREADS, 0, |a| {
                    a.arg(&dst).arg(&dst_pitch).arg(&src).arg(&src_pitch).arg(&row_bytes).arg(&nrows);
                })?;
            }
        }
        let [q, k, v] = parts;
        Ok((q, k, v))
    }

    fn gather_rows(&self, src: &CudaBuf, cols: usize, runs: &[RowRun]) -> Result<CudaBuf> {
        let total: usize = runs.iter().map(|r| r.len).sum();
        let mut table = Vec::with_capacity(runs.len() * 4);
        let mut at = 0usize;
        for run in runs {
            check("gather_rows", src.len, (run.start + run.len) * cols)?;
            if run.len > 0 {
                table.extend_from_slice(&[run.start as u64, at as u64, run.len as u64, at as u64]);
            }
            at += run.len;
        }
        let out = self.alloc(src.dtype, total * cols)?;
        self.copy_row_runs(out.device_ptr(), src.device_ptr(), cols * src.dtype.size_bytes(), &table, total)?;
        Ok(out)
    }

    fn scatter_rows(&self, dst: &mut CudaBuf, cols: usize, runs: &[RowRun], src: &CudaBuf) -> Result<()> {
        self.same_dtype("scatter_rows", &[dst, src])?;
        let mut table = Vec::with_capacity(runs.len() * 4);
        let mut at = 0usize;
        for run in runs {
            check("scatter_rows dst", dst.len, (run.start + run.len) * cols)?;
            check("scatter_rows src", src.len, (at + run.len) * cols)?;
            if run.len > 0 {
                table.extend_from_slice(&[at as u64, run.start as u64, run.len as u64, at as u64]);
            }
            at += run.len;
        }
        self.copy_row_runs(dst.device_ptr(), src.device_ptr(), cols * src.dtype.size_bytes(), &table, at)
    }

    fn attention_prefill(&self, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, s: PrefillShape) -> Result<(CudaBuf, CudaBuf)> {
        let width = s.heads * s.head_dim;
        check("prefill q", q.len, s.nseq * s.sq * width)?;
        check("prefill k", k.len, s.nseq * s.kv_seq_stride * width)?;
        check("prefill v", v.len, s.nseq * s.kv_seq_stride * width)?;
        if s.skv > s.kv_seq_stride {
            return Err(shape_err(format!("prefill skv {} exceeds kv_seq_stride {}", s.skv, s.kv_seq_stride)));
        }
        let dtype = self.same_dtype("prefill", &[q, k, v])?;
        let out = self.alloc(dtype, s.nseq * s.sq * width)?;
        let lse = self.alloc(Dtype::Fp32, s.nseq * s.heads * s.sq)?;
        if s.nseq == 0 || s.sq == 0 || s.heads == 0 || s.head_dim == 0 {
            return Ok((out, lse));
        }
        let tensor_cores = s.head_dim == 128 && dtype != Dtype::Fp32;
        match self.prefill_kernel() {
            PrefillKernel::Auto if tensor_cores => self.prefill_flash(PrefillKernel::Flash128W4, q, k, v, &out, &lse, s)?,
            kernel @ (PrefillKernel::Flash128 | PrefillKernel::Flash64 | PrefillKernel::Flash128W4) if tensor_cores => self.prefill_flash(kernel, q, k, v, &out, &lse, s)?,
            _ => self.prefill_general(q, k, v, &out, &lse, s)?,
        }
        Ok((out, lse))
    }

    fn attention_decode(&self, q: &CudaBuf, k_cache: &CudaBuf, v_cache: &CudaBuf, s: DecodeShape) -> Result<(CudaBuf, CudaBuf)> {
        self.decode_attention(q, k_cache, v_cache, s, false)
    }

    fn merge_partials(&self, o: &mut CudaBuf, lse: &mut CudaBuf, o2: &CudaBuf, lse2: &CudaBuf, rows: usize, head_dim: usize) -> Result<()> {
        check("merge o", o.len, rows * head_dim)?;
        check("merge o2", o2.len, rows * head_dim)?;
        check("merge lse", lse.len, rows)?;
        check("merge lse2", lse2.len, rows)?;
        let dtype = self.same_dtype("merge", &[o, o2])?;
        self.expect_f32("merge lse", lse)?;
        self.expect_f32("merge lse2", lse2)?;
        if rows == 0 {
            return Ok(());
        }
        let f = self.kernels.function(KernelFile::Merge, kernel_name!("merge_partials", dtype))?;
        let (op, lp, o2p, l2p, r, d) = (o.device_ptr(), lse.device_ptr(), o2.device_ptr(), lse2.device_ptr(), rows as u64, head_dim as u64);
        let grid = rows.div_ceil(8).min(i32::MAX as usize) as u32;
        self.launch(&f, grid, 256, 0, |a| {
            a.arg(&op).arg(&lp).arg(&o2p).arg(&l2p).arg(&r).arg(&d);
        })
    }

    fn argmax(&self, logits: &CudaBuf, rows: usize, cols: usize) -> Result<Vec<u32>> {
        check("argmax", logits.len, rows * cols)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        if cols == 0 {
            return Ok(vec![0; rows]);
        }
        let out = self.alloc(Dtype::Fp32, rows)?; // u32 results, same size as f32
        let f = self.kernels.function(KernelFile::Argmax, kernel_name!("argmax", logits.dtype))?;
        let (xp, op, r, c) = (logits.device_ptr(), out.device_ptr(), rows as u64, cols as u64);
        self.launch(&f, rows.min(i32::MAX as usize) as u32, 256, 0, |a| {
            a.arg(&xp).arg(&op).arg(&r).arg(&c);
        })?;
        let mut host = vec![0u32; rows];
        // SAFETY: `out` holds `rows` 4-byte values; the copy to pageable
        // memory completes before returning.
        unsafe { drv::memcpy_dtoh_async(&mut host[..], op, self.stream.cu_stream()) }?;
        self.stream.synchronize()?;
        Ok(host)
    }

    fn set_step(&self, vars: &StepVars) -> Result<()> {
        if self.capturing.load(Ordering::Relaxed) {
            return Err(shape_err("set_step while recording: the scalars are inputs of the recording".into()));
        }
        let int = |what: &str, v: usize| i32::try_from(v).map_err(|_| shape_err(format!("step {what} = {v} exceeds the int32 the kernels read")));
        let mut host = vec![int("position", vars.pos)?, vars.store_at.map(|a| int("store row", a)).transpose()?.unwrap_or(-1), int("length", vars.len)?, 0];
        host.extend(vars.tokens.iter().map(|&t| t as i32));
        let mut step = self.step.lock().expect("step lock");
        if step.as_ref().is_none_or(|b| b.len() < host.len()) {
            // Room for 256 sequences at least, so the address rarely changes
            // (it never does inside a batch: the token count is fixed there).
            step.replace(self.stream.alloc_zeros::<i32>(host.len().max(STEP_HEADER + 256))?);
        }
        let buf = step.as_mut().expect("just allocated");
        let (dst, _s) = buf.device_ptr(&self.stream);
        // SAFETY: `buf` holds at least `host.len()` int32s; the copy from
        // pageable memory is staged before this returns.
        unsafe { drv::memcpy_htod_async(dst, &host[..], self.stream.cu_stream()) }?;
        Ok(())
    }

    fn embed_step(&self, table: &CudaBuf, d: usize, nseq: usize) -> Result<CudaBuf> {
        let out = self.alloc(table.dtype, nseq * d)?;
        if nseq == 0 || d == 0 {
            return Ok(out);
        }
        let freq = self.freq_table(d)?;
        let step = self.step_ptr()?;
        let f = self.kernels.function(KernelFile::Embed, kernel_name!("embed_step", table.dtype))?;
        let (op, tp, rows64, d64) = (out.device_ptr(), table.device_ptr(), nseq as u64, d as u64);
        self.launch(&f, nseq.min(65_535 * 16) as u32, THREADS, 0, |a| {
            a.arg(&op).arg(&tp).arg(&step).arg(&freq).arg(&rows64).arg(&d64);
        })?;
        Ok(out)
    }

    fn store_step(&self, cache: &mut CudaBuf, src: &CudaBuf, nseq: usize, cap: usize, width: usize) -> Result<()> {
        check("store_step cache", cache.len, nseq * cap * width)?;
        check("store_step src", src.len, nseq * width)?;
        self.same_dtype("store_step", &[cache, src])?;
        if nseq == 0 || width == 0 {
            return Ok(());
        }
        let step = self.step_ptr()?;
        let f = self.kernels.function(KernelFile::Copy, "store_rows_at")?;
        let (dp, sp, rb, n64, cap64) = (cache.device_ptr(), src.device_ptr(), (width * cache.dtype.size_bytes()) as u64, nseq as u64, cap as u64);
        self.launch(&f, nseq.min(65_535 * 16) as u32, THREADS, 0, |a| {
            a.arg(&dp).arg(&sp).arg(&rb).arg(&n64).arg(&cap64).arg(&step);
        })
    }

    fn attention_decode_step(&self, q: &CudaBuf, k_cache: &CudaBuf, v_cache: &CudaBuf, shape: DecodeShape) -> Result<(CudaBuf, CudaBuf)> {
        self.decode_attention(q, k_cache, v_cache, shape, true)
    }

    /// Records in relaxed mode (the arena allocates plain device memory
    /// while recording); buffers created until [`Backend::capture_end`] come
    /// from a fresh arena that the recording keeps alive.
    fn capture_begin(&self) -> Result<bool> {
        if self.capturing.load(Ordering::Relaxed) {
            return Err(shape_err("a recording is already in progress".into()));
        }
        self.stream.begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        *self.arena.lock().expect("arena lock") = Arena::default();
        self.capturing.store(true, Ordering::Relaxed);
        Ok(true)
    }

    fn capture_end(&self) -> Result<CudaRecording> {
        self.capturing.store(false, Ordering::Relaxed);
        let arena = std::mem::take(&mut *self.arena.lock().expect("arena lock"));
        let graph = self.stream.end_capture(drv_sys::CUgraphInstantiate_flags(0))?.ok_or_else(|| BackendError::Device("the recording captured no work".into()))?;
        // Instantiation done; upload now so the first replay pays no set-up.
        graph.upload()?;
        Ok(CudaRecording { graph, _arena: arena.chunks })
    }

    fn replay(&self, rec: &CudaRecording) -> Result<()> {
        Ok(rec.graph.launch()?)
    }

    /// While recording, the event is recorded as a node of the graph
    /// (an external record), so every replay records it again and the comm
    /// layer can time the replayed messages.
    fn mark(&self) -> Result<CudaEvent> {
        let ev = self.ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        if self.capturing.load(Ordering::Relaxed) {
            // SAFETY: a live event and the backend's (capturing) stream.
            unsafe { drv_sys::cuEventRecordWithFlags(ev.cu_event(), self.stream.cu_stream(), drv_sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32) }.result()?;
        } else {
            ev.record(&self.stream)?;
        }
        Ok(ev)
    }
    fn elapsed_s(&self, from: &CudaEvent, to: &CudaEvent) -> Result<f64> {
        Ok(from.elapsed_ms(to)? as f64 / 1e3)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
    /// High-water mark of this backend's own buffers (activations, weights,
    /// KV caches, kernel workspaces), in bytes. It excludes the CUDA context,
    /// cuBLAS and NCCL internal workspaces; `energy::GpuMonitor` reads the
    /// whole device's usage from NVML for those.
    fn peak_memory_bytes(&self) -> Option<u64> {
        Some(self.memory.peak.load(Ordering::Relaxed))
    }
    fn reset_peak_memory(&self) {
        CudaBackend::reset_peak_memory(self);
    }
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
