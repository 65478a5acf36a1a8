//! Device buffers and where their bytes come from.
//!
//! A [`CudaBuf`] is an untyped allocation that carries its [`Dtype`] and
//! element count. Outside a recording its bytes come from the device's
//! stream-ordered pool (freed on the backend's stream when dropped, so
//! queued work may still use them); while a step is being recorded they are
//! carved from an [`Arena`] of plain device allocations that the recording
//! keeps alive, because a recording's addresses must stay fixed for every
//! replay and no stream-ordered allocation may enter it. The
//! [`MemoryTracker`] counts the live and peak bytes of both.
//!
//! Host transfers convert between f32 on the host and the buffer's dtype
//! (round to nearest even, as `half` does).
//!
//! This module must not launch kernels (`launch`) or start and end
//! recordings (`recording`: it only asks whether one is in progress).

use super::{ffi, CudaBackend};
use crate::backend::{Dtype, Result};
use cudarc::driver::{CudaContext, CudaSlice, DevicePtr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Live and peak bytes of a backend's own allocations.
#[derive(Debug, Default)]
pub struct MemoryTracker {
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
    /// The high-water mark since start-up or the last [`MemoryTracker::reset_peak`].
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
    /// Restarts the high-water mark at the bytes now in use.
    pub fn reset_peak(&self) {
        self.peak.store(self.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Returns its bytes to the tracker when the buffer is dropped.
#[derive(Debug)]
struct Tracked {
    tracker: Arc<MemoryTracker>,
    bytes: u64,
}

impl Tracked {
    fn new(tracker: &Arc<MemoryTracker>, bytes: u64) -> Self {
        tracker.add(bytes);
        Self { tracker: tracker.clone(), bytes }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker.sub(self.bytes);
    }
}

/// One block of device memory that buffers created while recording are
/// carved from. Freed when the last buffer carved from it and the recording
/// that uses it are gone.
#[derive(Debug)]
pub struct ArenaChunk {
    ctx: Arc<CudaContext>,
    ptr: u64,
    bytes: usize,
    _tracked: Tracked,
}

impl Drop for ArenaChunk {
    fn drop(&mut self) {
        // Work that used the chunk may still be queued: wait for it first.
        let _ = self.ctx.synchronize();
        // SAFETY: `ptr` came from `ffi::malloc`, is freed only here, and the
        // synchronisation above finished every piece of work that used it.
        let _ = unsafe { ffi::free(self.ptr) };
    }
}

/// The chunks of the recording in progress and the bump offset in the last one.
#[derive(Debug, Default)]
pub struct Arena {
    chunks: Vec<Arc<ArenaChunk>>,
    used: usize,
}

impl Arena {
    /// The chunks, for the recording that keeps them alive.
    pub fn into_chunks(self) -> Vec<Arc<ArenaChunk>> {
        self.chunks
    }
}

/// Smallest arena chunk: a decode step's buffers fit in a few.
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
    /// Bytes allocated (the element bytes rounded up to 16).
    fn allocated_bytes(&self) -> usize {
        match &self.mem {
            Mem::Pool(m) => m.len(),
            Mem::Arena { bytes, .. } => *bytes,
        }
    }
}

impl CudaBackend {
    /// Allocates `len` elements of `dtype` (uninitialised unless poisoning is on).
    pub fn alloc(&self, dtype: Dtype, len: usize) -> Result<CudaBuf> {
        let bytes = (len * dtype.size_bytes()).max(16).next_multiple_of(16);
        let buf = if self.is_recording() {
            let (ptr, chunk) = self.arena_alloc(bytes)?;
            CudaBuf { mem: Mem::Arena { ptr, bytes, _chunk: chunk }, dtype, len, _tracked: None }
        } else {
            // SAFETY: every caller writes what it reads of the buffer (or it
            // is poisoned just below).
            let mem = unsafe { ffi::stream_alloc(&self.stream, bytes) }?;
            CudaBuf { mem: Mem::Pool(mem), dtype, len, _tracked: Some(Tracked::new(&self.memory, bytes as u64)) }
        };
        if self.poison_outputs.load(Ordering::Relaxed) {
            self.memset(&buf, 0xff)?;
        }
        Ok(buf)
    }

    fn memset(&self, buf: &CudaBuf, byte: u8) -> Result<()> {
        // SAFETY: the range is exactly `buf`'s allocation, which is freed on
        // the same stream after the memset.
        unsafe { ffi::memset(buf.device_ptr(), byte, buf.allocated_bytes(), &self.stream) }?;
        Ok(())
    }

    /// `bytes` (a multiple of 16) from the recording's arena, 256-byte aligned.
    fn arena_alloc(&self, bytes: usize) -> Result<(u64, Arc<ArenaChunk>)> {
        let mut arena = self.arena.lock().expect("arena lock");
        let fits = arena.chunks.last().is_some_and(|c| arena.used + bytes <= c.bytes);
        if !fits {
            let size = bytes.next_multiple_of(256).max(ARENA_CHUNK_BYTES);
            // A plain device allocation is allowed while recording in relaxed
            // mode (a stream-ordered one would enter the graph).
            self.ctx.bind_to_thread()?;
            // SAFETY: the backend's context is current (just above); the
            // chunk frees the memory once, when dropped.
            let ptr = unsafe { ffi::malloc(size) }?;
            let tracked = Tracked::new(&self.memory, size as u64);
            arena.chunks.push(Arc::new(ArenaChunk { ctx: self.ctx.clone(), ptr, bytes: size, _tracked: tracked }));
            arena.used = 0;
        }
        let chunk = arena.chunks.last().expect("a chunk was just ensured").clone();
        let ptr = chunk.ptr + arena.used as u64;
        arena.used += bytes.next_multiple_of(256);
        Ok((ptr, chunk))
    }

    /// `len` zeros of `dtype`.
    /// A plain device-to-device copy of all of `src` into `dst` (the
    /// driver's memcpy: what every copy kernel is measured against).
    pub fn memcpy(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        if dst.dtype() != src.dtype() || dst.len() < src.len() {
            return Err(crate::backend::BackendError::Shape(format!("memcpy of {} {} into {} {}", src.len(), src.dtype(), dst.len(), dst.dtype())));
        }
        // SAFETY: both buffers are live allocations of this context and
        // `dst` holds at least `src`'s bytes (checked); the copy is queued
        // on the stream that owns and frees them.
        unsafe { super::ffi::memcpy_dtod(dst.device_ptr(), src.device_ptr(), src.size_bytes(), &self.stream) }?;
        Ok(())
    }

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
        // `dtype`, and lives on the stream the copy is ordered on.
        match dtype {
            Dtype::Fp32 => unsafe { ffi::copy_to_device(dst, host, &self.stream) }?,
            Dtype::Bf16 => {
                let v: Vec<u16> = host.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                unsafe { ffi::copy_to_device(dst, &v[..], &self.stream) }?
            }
            Dtype::Fp16 => {
                let v: Vec<u16> = host.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
                unsafe { ffi::copy_to_device(dst, &v[..], &self.stream) }?
            }
        }
        Ok(buf)
    }

    /// The buffer's elements as f32, once the work queued before has run.
    pub(super) fn download_buf(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        if buf.len == 0 {
            return Ok(Vec::new());
        }
        let src = buf.device_ptr();
        // SAFETY (all arms): the host vectors hold exactly `len` elements of
        // the buffer's element size, and every bit pattern is a valid value.
        Ok(match buf.dtype {
            Dtype::Fp32 => {
                let mut v = vec![0f32; buf.len];
                unsafe { ffi::copy_to_host(&mut v[..], src, &self.stream) }?;
                self.stream.synchronize()?;
                v
            }
            Dtype::Bf16 | Dtype::Fp16 => {
                let mut v = vec![0u16; buf.len];
                unsafe { ffi::copy_to_host(&mut v[..], src, &self.stream) }?;
                self.stream.synchronize()?;
                if buf.dtype == Dtype::Bf16 {
                    v.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect()
                } else {
                    v.into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect()
                }
            }
        })
    }

    /// `buf`'s elements read as u32 (index results stored in a 4-byte buffer).
    pub(super) fn download_u32(&self, buf: &CudaBuf, len: usize) -> Result<Vec<u32>> {
        if len * 4 > buf.allocated_bytes() {
            return Err(crate::backend::BackendError::Shape(format!("reading {len} u32 from a buffer of {} bytes", buf.allocated_bytes())));
        }
        let mut host = vec![0u32; len];
        // SAFETY: the buffer holds at least `len` 4-byte values (checked
        // above); every bit pattern is a valid u32.
        unsafe { ffi::copy_to_host(&mut host[..], buf.device_ptr(), &self.stream) }?;
        self.stream.synchronize()?;
        Ok(host)
    }
}
