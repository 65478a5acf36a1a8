//! Dense operations: token embeddings, GEMMs (cuBLAS), RMSNorm, the
//! element-wise kernels, argmax and device-side random fills. This module
//! must not read the step scalars (see `step`).

use super::super::contract::{self, AddArgs, ArgmaxArgs, EmbedArgs, FillUniformArgs, GeluArgs, GeluMulArgs, RmsnormArgs, SiluMulArgs, ARGMAX_THREADS, RMSNORM_THREADS};
use super::super::ffi::{self, Gemm};
use super::super::launch::{DevPtr, Holds, THREADS};
use super::super::memory::CudaBuf;
use super::super::{CudaBackend, CudaError};
use super::{check, same_dtype, shape_err, to_i32};
use crate::backend::{Dtype, Result};
use cudarc::cublas::sys::cudaDataType;
use cudarc::driver::DevicePtr;

/// Most blocks of a grid-stride row kernel (rows beyond are looped over).
const MAX_ROW_BLOCKS: usize = 65_535 * 16;

/// Token rows of `table` plus, with `sinusoid`, the sinusoidal encoding of
/// positions `pos0..pos0 + n` in each of `nseq` sequences.
#[allow(clippy::too_many_arguments)]
pub(super) fn embed(be: &CudaBackend, table: &CudaBuf, d: usize, tokens: &[u32], nseq: usize, n: usize, pos0: usize, sinusoid: bool) -> Result<CudaBuf> {
    let rows = nseq * n;
    check("embed tokens", tokens.len(), rows)?;
    let tokens = &tokens[..rows];
    if let Some(&max) = tokens.iter().max() {
        check("embedding table", table.len(), (max as usize + 1) * d)?;
    }
    let out = be.alloc(table.dtype(), rows * d)?;
    if rows == 0 || d == 0 {
        return Ok(out);
    }
    let tok = be.stream.clone_htod(tokens)?;
    let (tok_ptr, _s) = tok.device_ptr(&be.stream);
    // A null frequency table: the token rows alone.
    let freq = if sinusoid { freq_table(be, d)? } else { 0 };
    let args = EmbedArgs {
        out: DevPtr::of(&out),
        table: DevPtr::of(table),
        tokens: DevPtr::raw(tok_ptr, Holds::U32),
        freq: DevPtr::raw(freq, Holds::F64),
        rows: rows as u64,
        d: d as u64,
        n: n as u64,
        pos0: pos0 as u64,
    };
    // SAFETY: `out` holds rows × d elements, the table every token's row
    // (checked above), `tok` the rows tokens and `freq` d/2 frequencies or null;
    // `tok` is freed on the stream after the kernel.
    unsafe { be.launch(&contract::EMBED, table.dtype(), rows.min(MAX_ROW_BLOCKS) as u32, THREADS, &args) }?;
    Ok(out)
}

/// The device address of the sinusoid frequencies for width `d`, uploaded
/// on first use (refused while recording: an upload cannot be recorded).
pub(super) fn freq_table(be: &CudaBackend, d: usize) -> Result<u64> {
    let mut tables = be.freq_tables.lock().expect("freq table lock");
    if let Some(t) = tables.get(&d) {
        return Ok(t.device_ptr(&be.stream).0);
    }
    if be.is_recording() {
        return Err(shape_err(format!("the width-{d} frequency table cannot be uploaded while recording: embed once before recording")));
    }
    // Same formula and precision as the CPU backend and `checks::reference`.
    let host: Vec<f64> = (0..d.div_ceil(2).max(1)).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64)).collect();
    let t = be.stream.clone_htod(&host)?;
    let p = t.device_ptr(&be.stream).0;
    tables.insert(d, t);
    Ok(p)
}

/// The cuBLAS element type of a dtype.
pub(super) fn cuda_data_type(d: Dtype) -> cudaDataType {
    match d {
        Dtype::Bf16 => cudaDataType::CUDA_R_16BF,
        Dtype::Fp16 => cudaDataType::CUDA_R_16F,
        Dtype::Fp32 => cudaDataType::CUDA_R_32F,
    }
}

pub(super) fn matmul(be: &CudaBackend, x: &CudaBuf, w: &CudaBuf, m: usize, k: usize, n: usize) -> Result<CudaBuf> {
    check("matmul x", x.len(), m * k)?;
    check("matmul w", w.len(), k * n)?;
    let dtype = same_dtype("matmul", &[x, w])?;
    if m == 0 || n == 0 || k == 0 {
        return be.zeros_of(dtype, m * n);
    }
    let out = be.alloc(dtype, m * n)?;
    let (mi, ki, ni) = (to_i32("matmul m", m)?, to_i32("matmul k", k)?, to_i32("matmul n", n)?);
    // Row-major C[m,n] = X[m,k] W[k,n] is column-major C^T = W^T X^T:
    // W is a column-major [n,k] matrix with ld n, X a [k,m] one with ld k.
    let gemm = Gemm { m: ni, n: mi, k: ki, a: w.device_ptr(), lda: ni, b: x.device_ptr(), ldb: ki, c: out.device_ptr(), ldc: ni, data_type: cuda_data_type(dtype) };
    // SAFETY: the buffers hold at least k·n, m·k and m·n elements of
    // `dtype` (checked above); the handle's stream is the backend's.
    unsafe { ffi::gemm(&be.blas, &gemm) }.map_err(CudaError::from)?;
    Ok(out)
}

pub(super) fn rmsnorm(be: &CudaBackend, x: &CudaBuf, weight: &CudaBuf, rows: usize, cols: usize, eps: f32) -> Result<CudaBuf> {
    check("rmsnorm x", x.len(), rows * cols)?;
    check("rmsnorm weight", weight.len(), cols)?;
    let dtype = same_dtype("rmsnorm", &[x, weight])?;
    let out = be.alloc(dtype, rows * cols)?;
    if rows == 0 || cols == 0 {
        return Ok(out);
    }
    if rows > i32::MAX as usize {
        return Err(shape_err(format!("rmsnorm: {rows} rows exceed the grid limit")));
    }
    let args = RmsnormArgs { out: DevPtr::of(&out), x: DevPtr::of(x), w: DevPtr::of(weight), rows: rows as u64, cols: cols as u64, eps };
    // SAFETY: one block per row of `cols` elements: `x` and `out` hold
    // rows × cols, `weight` cols (checked above).
    unsafe { be.launch(&contract::RMSNORM, dtype, rows as u32, RMSNORM_THREADS, &args) }?;
    Ok(out)
}

pub(super) fn gelu(be: &CudaBackend, x: &mut CudaBuf) -> Result<()> {
    if x.is_empty() {
        return Ok(());
    }
    let args = GeluArgs { x: DevPtr::of(x), n: x.len() as u64 };
    // SAFETY: the kernel touches the `n` elements of `x`.
    unsafe { be.launch(&contract::GELU, x.dtype(), be.grid_for(x.len().div_ceil(8)), THREADS, &args) }
}

pub(super) fn gelu_mul(be: &CudaBackend, gate: &mut CudaBuf, up: &CudaBuf) -> Result<()> {
    check("gelu_mul up", up.len(), gate.len())?;
    let dtype = same_dtype("gelu_mul", &[gate, up])?;
    if gate.is_empty() {
        return Ok(());
    }
    let args = GeluMulArgs { gate: DevPtr::of(gate), up: DevPtr::of(up), n: gate.len() as u64 };
    // SAFETY: `n` elements of `gate`, and `up` holds at least as many (checked above).
    unsafe { be.launch(&contract::GELU_MUL, dtype, be.grid_for(gate.len().div_ceil(8)), THREADS, &args) }
}

pub(super) fn silu_mul(be: &CudaBackend, gate: &mut CudaBuf, up: &CudaBuf) -> Result<()> {
    check("silu_mul up", up.len(), gate.len())?;
    let dtype = same_dtype("silu_mul", &[gate, up])?;
    if gate.is_empty() {
        return Ok(());
    }
    let args = SiluMulArgs { gate: DevPtr::of(gate), up: DevPtr::of(up), n: gate.len() as u64 };
    // SAFETY: `n` elements of `gate`, and `up` holds at least as many (checked above).
    unsafe { be.launch(&contract::SILU_MUL, dtype, be.grid_for(gate.len().div_ceil(8)), THREADS, &args) }
}

/// The device address of RoPE's inverse frequencies `theta^(-2i/head_dim)`
/// for `i < head_dim/2`, uploaded on first use (refused while recording).
pub(super) fn rope_table(be: &CudaBackend, head_dim: usize, theta: f64) -> Result<u64> {
    let mut tables = be.rope_tables.lock().expect("rope table lock");
    let key = (head_dim, theta.to_bits());
    if let Some(t) = tables.get(&key) {
        return Ok(t.device_ptr(&be.stream).0);
    }
    if be.is_recording() {
        return Err(shape_err(format!("the RoPE table of head_dim {head_dim}, theta {theta} cannot be uploaded while recording: rotate once before recording")));
    }
    // Same formula and precision as the CPU backend and `checks::reference`.
    let host: Vec<f64> = (0..(head_dim / 2).max(1)).map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64)).collect();
    let t = be.stream.clone_htod(&host)?;
    let p = t.device_ptr(&be.stream).0;
    tables.insert(key, t);
    Ok(p)
}

pub(super) fn add_assign(be: &CudaBackend, x: &mut CudaBuf, y: &CudaBuf) -> Result<()> {
    check("add_assign y", y.len(), x.len())?;
    let dtype = same_dtype("add_assign", &[x, y])?;
    if x.is_empty() {
        return Ok(());
    }
    let args = AddArgs { x: DevPtr::of(x), y: DevPtr::of(y), n: x.len() as u64 };
    // SAFETY: `n` elements of `x`, and `y` holds at least as many (checked above).
    unsafe { be.launch(&contract::ADD, dtype, be.grid_for(x.len().div_ceil(8)), THREADS, &args) }
}

pub(super) fn argmax(be: &CudaBackend, logits: &CudaBuf, rows: usize, cols: usize) -> Result<Vec<u32>> {
    check("argmax", logits.len(), rows * cols)?;
    if rows == 0 {
        return Ok(Vec::new());
    }
    if cols == 0 {
        return Ok(vec![0; rows]);
    }
    let out = be.alloc(Dtype::Fp32, rows)?; // u32 results, same size as f32
    let args = ArgmaxArgs { x: DevPtr::of(logits), out: DevPtr::raw(out.device_ptr(), Holds::U32), rows: rows as u64, cols: cols as u64 };
    // SAFETY: one block per row of `cols` logits (checked above); `out`
    // holds one 4-byte index per row.
    unsafe { be.launch(&contract::ARGMAX, logits.dtype(), rows.min(i32::MAX as usize) as u32, ARGMAX_THREADS, &args) }?;
    be.download_u32(&out, rows)
}

impl CudaBackend {
    /// A buffer of `len` pseudo-random values uniform in `[-scale, scale)`,
    /// generated on the device from `seed` (for benchmarks on non-zero data
    /// without a host round trip).
    pub fn random_uniform(&self, dtype: Dtype, len: usize, seed: u64, scale: f32) -> Result<CudaBuf> {
        let out = self.alloc(dtype, len)?;
        if len == 0 {
            return Ok(out);
        }
        let args = FillUniformArgs { x: DevPtr::of(&out), n: len as u64, seed, scale };
        // SAFETY: the kernel writes the `len` elements of `out`.
        unsafe { self.launch(&contract::FILL_UNIFORM, dtype, self.grid_for(len.div_ceil(8)), THREADS, &args) }?;
        Ok(out)
    }
}
