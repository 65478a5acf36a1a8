//! The model's operations on the GPU: the [`Backend`] implementation of
//! [`CudaBackend`], each method a call into the file for its kind of
//! operation:
//! - `dense`: embeddings, GEMMs, RMSNorm, element-wise ops, argmax, random fills,
//!   the RoPE frequency tables;
//! - `rows`: splitting (and rotating) fused QKV, gathering and scattering rows;
//! - `step`: the decode step's scalars and the operations that read them;
//! - [`prefill`]: causal prefill attention and its kernel variants;
//! - `decode`: split-KV decode attention and the merge of partial results;
//! - `experts`: the mixture-of-experts routing, permutation, combine and
//!   grouped GEMM.
//!
//! Each operation checks its buffers against its shape, allocates its
//! outputs, picks the kernel and its grid, and launches it; the checks here
//! are what makes each launch's promise (see `launch`) hold. This module
//! must not call a CUDA library directly (see `ffi`) or declare kernel
//! parameters (see `contract`).

mod decode;
mod dense;
mod experts;
pub mod prefill;
mod rows;
mod step;

use super::memory::CudaBuf;
use super::recording::CudaRecording;
use super::CudaBackend;
use crate::backend::{Backend, BackendError, DecodeShape, Dtype, PrefillShape, QkvSplit, Result, RowCopy, RowRun, StepVars};
use cudarc::driver::CudaEvent;
use std::sync::atomic::Ordering;

fn shape_err(msg: String) -> BackendError {
    BackendError::Shape(msg)
}

/// `have` elements are at least the `need` an operation reads or writes.
fn check(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(shape_err(format!("{what}: buffer holds {have} elements, needs {need}")));
    }
    Ok(())
}

/// A size as the kernels' int32 parameters take it.
fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_err(format!("{what} = {v} exceeds the 32-bit range the kernels index with")))
}

/// The common dtype of buffers an operation combines.
fn same_dtype(what: &str, bufs: &[&CudaBuf]) -> Result<Dtype> {
    let d = bufs[0].dtype();
    if let Some(b) = bufs.iter().find(|b| b.dtype() != d) {
        return Err(shape_err(format!("{what}: mixed dtypes {} and {}", d, b.dtype())));
    }
    Ok(d)
}

fn expect_f32(what: &str, b: &CudaBuf) -> Result<()> {
    if b.dtype() != Dtype::Fp32 {
        return Err(shape_err(format!("{what}: log-sum-exp buffers are f32, got {}", b.dtype())));
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    /// A recorded CUDA event (created with timing enabled).
    type Mark = CudaEvent;
    type Graph = CudaRecording;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }
    fn size_bytes(&self, buf: &CudaBuf) -> usize {
        buf.size_bytes()
    }

    fn upload(&self, host: &[f32]) -> Result<CudaBuf> {
        self.upload_as(host, self.dtype)
    }
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        self.download_buf(buf)
    }
    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.zeros_of(self.dtype, len)
    }
    fn zeros_f32(&self, len: usize) -> Result<CudaBuf> {
        self.zeros_of(Dtype::Fp32, len)
    }
    /// Not zero-filled (poisoned when poisoning is on).
    fn empty(&self, len: usize) -> Result<CudaBuf> {
        self.alloc(self.dtype, len)
    }
    fn upload_f32(&self, host: &[f32]) -> Result<CudaBuf> {
        self.upload_as(host, Dtype::Fp32)
    }
    /// Poisoning costs a memset per output buffer (NaN in every dtype).
    fn set_poison_outputs(&self, on: bool) {
        self.poison_outputs.store(on, Ordering::Relaxed);
    }
    fn poison_outputs(&self) -> bool {
        self.poison_outputs.load(Ordering::Relaxed)
    }

    fn embed(&self, table: &CudaBuf, d: usize, tokens: &[u32], nseq: usize, n: usize, pos0: usize) -> Result<CudaBuf> {
        dense::embed(self, table, d, tokens, nseq, n, pos0, true)
    }
    /// The embedding kernel without its sinusoid (no per-token run table to upload).
    fn embed_tokens(&self, table: &CudaBuf, d: usize, tokens: &[u32]) -> Result<CudaBuf> {
        dense::embed(self, table, d, tokens, 1, tokens.len(), 0, false)
    }
    fn matmul(&self, x: &CudaBuf, w: &CudaBuf, m: usize, k: usize, n: usize) -> Result<CudaBuf> {
        dense::matmul(self, x, w, m, k, n)
    }
    fn rmsnorm(&self, x: &CudaBuf, weight: &CudaBuf, rows: usize, cols: usize, eps: f32) -> Result<CudaBuf> {
        dense::rmsnorm(self, x, weight, rows, cols, eps)
    }
    fn gelu(&self, x: &mut CudaBuf) -> Result<()> {
        dense::gelu(self, x)
    }
    fn gelu_mul(&self, gate: &mut CudaBuf, up: &CudaBuf) -> Result<()> {
        dense::gelu_mul(self, gate, up)
    }
    fn silu_mul(&self, gate: &mut CudaBuf, up: &CudaBuf) -> Result<()> {
        dense::silu_mul(self, gate, up)
    }
    fn add_assign(&self, x: &mut CudaBuf, y: &CudaBuf) -> Result<()> {
        dense::add_assign(self, x, y)
    }
    fn split_qkv_rope(&self, qkv: &CudaBuf, rows: usize, split: &QkvSplit) -> Result<(CudaBuf, CudaBuf, CudaBuf)> {
        rows::split_qkv(self, qkv, rows, split)
    }
    fn gather_rows(&self, src: &CudaBuf, cols: usize, runs: &[RowRun]) -> Result<CudaBuf> {
        rows::gather_rows(self, src, cols, runs)
    }
    fn scatter_rows(&self, dst: &mut CudaBuf, cols: usize, runs: &[RowRun], src: &CudaBuf) -> Result<()> {
        rows::scatter_rows(self, dst, cols, runs, src)
    }
    /// One launch of the run-table copy.
    fn copy_rows(&self, dst: &mut CudaBuf, cols: usize, src: &CudaBuf, copies: &[RowCopy]) -> Result<()> {
        rows::copy_rows(self, dst, cols, src, copies)
    }
    fn attention_prefill(&self, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, s: PrefillShape) -> Result<(CudaBuf, CudaBuf)> {
        prefill::attention_prefill(self, q, k, v, s)
    }
    fn attention_decode(&self, q: &CudaBuf, k_cache: &CudaBuf, v_cache: &CudaBuf, s: DecodeShape) -> Result<(CudaBuf, CudaBuf)> {
        decode::attention(self, q, k_cache, v_cache, s, false)
    }
    fn merge_partials(&self, o: &mut CudaBuf, lse: &mut CudaBuf, o2: &CudaBuf, lse2: &CudaBuf, rows: usize, head_dim: usize) -> Result<()> {
        decode::merge_partials(self, o, lse, o2, lse2, rows, head_dim)
    }
    fn argmax(&self, logits: &CudaBuf, rows: usize, cols: usize) -> Result<Vec<u32>> {
        dense::argmax(self, logits, rows, cols)
    }

    fn router_top_k(&self, logits: &CudaBuf, rows: usize, experts: usize, k: usize) -> Result<(CudaBuf, CudaBuf)> {
        experts::router_top_k(self, logits, rows, experts, k)
    }
    /// Four launches and one read of the expert totals (a synchronisation).
    fn expert_slots(&self, ids: &CudaBuf, assignments: usize, experts: usize, capacity: Option<usize>) -> Result<(CudaBuf, Vec<usize>)> {
        experts::expert_slots(self, ids, assignments, experts, capacity)
    }
    fn permute_to_experts(&self, x: &CudaBuf, cols: usize, slots: &CudaBuf, rows: usize, k: usize, kept: usize) -> Result<CudaBuf> {
        experts::permute_to_experts(self, x, cols, slots, rows, k, kept)
    }
    fn combine_from_experts(&self, y: &CudaBuf, cols: usize, slots: &CudaBuf, weights: &CudaBuf, rows: usize, k: usize) -> Result<CudaBuf> {
        experts::combine_from_experts(self, y, cols, slots, weights, rows, k)
    }
    /// One cuBLAS GEMM per non-empty group.
    fn grouped_matmul(&self, x: &CudaBuf, w: &CudaBuf, groups: &[usize], k: usize, n: usize) -> Result<CudaBuf> {
        experts::grouped_matmul(self, x, w, groups, k, n)
    }

    fn set_step(&self, vars: &StepVars) -> Result<()> {
        step::set_step(self, vars)
    }
    fn embed_step(&self, table: &CudaBuf, d: usize, nseq: usize) -> Result<CudaBuf> {
        step::embed_step(self, table, d, nseq, true)
    }
    fn embed_step_tokens(&self, table: &CudaBuf, d: usize, nseq: usize) -> Result<CudaBuf> {
        step::embed_step(self, table, d, nseq, false)
    }
    fn store_step(&self, cache: &mut CudaBuf, src: &CudaBuf, nseq: usize, cap: usize, width: usize) -> Result<()> {
        step::store_step(self, cache, src, nseq, cap, width)
    }
    fn attention_decode_step(&self, q: &CudaBuf, k_cache: &CudaBuf, v_cache: &CudaBuf, shape: DecodeShape) -> Result<(CudaBuf, CudaBuf)> {
        decode::attention(self, q, k_cache, v_cache, shape, true)
    }

    /// Records in relaxed mode (the arena allocates plain device memory
    /// while recording); buffers created until [`Backend::capture_end`] come
    /// from a fresh arena that the recording keeps alive.
    fn capture_begin(&self) -> Result<bool> {
        self.begin_recording()
    }
    fn capture_end(&self) -> Result<CudaRecording> {
        self.end_recording()
    }
    fn replay(&self, rec: &CudaRecording) -> Result<()> {
        self.replay_recording(rec)
    }

    /// While recording, the event is recorded as a node of the graph
    /// (an external record), so every replay records it again and the comm
    /// layer can time the replayed messages.
    fn mark(&self) -> Result<CudaEvent> {
        self.new_mark()
    }
    fn wait_for(&self, mark: &CudaEvent) -> Result<()> {
        self.wait_on(mark)
    }
    /// Messages run on their own streams (the NCCL transport's): the compute
    /// stream waits only where it uses their data.
    fn messages_block_compute(&self) -> bool {
        false
    }
    fn elapsed_s(&self, from: &CudaEvent, to: &CudaEvent) -> Result<f64> {
        Ok(from.elapsed_ms(to)? as f64 / 1e3)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
    /// High-water mark of this backend's own buffers (activations, weights,
    /// KV caches, kernel workspaces), in bytes. It excludes the CUDA context,
    /// cuBLAS and NCCL internal workspaces.
    fn peak_memory_bytes(&self) -> Option<u64> {
        Some(self.memory.peak())
    }
    fn reset_peak_memory(&self) {
        self.memory.reset_peak();
    }
}
