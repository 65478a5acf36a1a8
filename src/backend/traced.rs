//! The timeline of a traced batch: a backend wrapper that, while tracing is
//! on, times every operation with the inner backend's own marks (events on
//! a GPU, host clocks on the CPU) and notes what it was — its name, its
//! shape, and its FLOPs or bytes. Strategies run on it unchanged (it has the
//! inner backend's buffers and marks); with tracing off every operation
//! passes straight through.
//!
//! Operations recorded into a decode step's recording are noted once, and
//! every replay reads their marks again, so a traced batch waits for each
//! replayed step before the next one starts.
//!
//! This module must not communicate or decide anything; the runner turns
//! what it notes into trace files.

use super::{Backend, DecodeShape, Dtype, PrefillShape, QkvSplit, Result, RowCopy, RowRun, StepVars};
use std::cell::{Cell, RefCell};

/// One operation as noted: what it was and the marks around it.
struct Noted<M> {
    name: &'static str,
    shape: String,
    flops: f64,
    bytes: f64,
    from: M,
    to: M,
}

/// One operation of a traced batch, in seconds from the batch's start.
#[derive(Clone, Debug, PartialEq)]
pub struct TracedOp {
    pub name: &'static str,
    pub shape: String,
    pub flops: f64,
    pub bytes: f64,
    pub start_s: f64,
    pub end_s: f64,
}

/// A recording and the operations noted while it was made.
pub struct TracedRecording<B: Backend> {
    inner: B::Graph,
    ops: Vec<Noted<B::Mark>>,
}

/// Turning a backend's operation trace on and off, whatever the backend.
pub trait Trace {
    /// Starts noting every operation, timed from now.
    fn start_trace(&self) -> Result<()>;
    /// Stops noting and returns the operations since the start.
    fn finish_trace(&self) -> Result<Vec<TracedOp>>;
}

/// A backend whose operations can be traced.
pub struct Traced<B: Backend> {
    inner: B,
    on: Cell<bool>,
    /// The batch's start and the operations resolved so far.
    origin: RefCell<Option<B::Mark>>,
    pending: RefCell<Vec<Noted<B::Mark>>>,
    resolved: RefCell<Vec<TracedOp>>,
}

impl<B: Backend> Traced<B> {
    pub fn new(inner: B) -> Self {
        Self { inner, on: Cell::new(false), origin: RefCell::new(None), pending: RefCell::new(Vec::new()), resolved: RefCell::new(Vec::new()) }
    }

    /// The backend underneath.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn resolve_into(&self, ops: &[Noted<B::Mark>]) -> Result<()> {
        let origin = self.origin.borrow();
        let Some(origin) = origin.as_ref() else { return Ok(()) };
        let mut out = self.resolved.borrow_mut();
        for op in ops {
            let start_s = self.inner.elapsed_s(origin, &op.from)?;
            let end_s = start_s + self.inner.elapsed_s(&op.from, &op.to)?;
            out.push(TracedOp { name: op.name, shape: op.shape.clone(), flops: op.flops, bytes: op.bytes, start_s, end_s });
        }
        Ok(())
    }

    fn resolve(&self) -> Result<()> {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        self.resolve_into(&pending)
    }

    /// Runs `op`, noting it when tracing (the shape, FLOPs and bytes are
    /// only worked out then).
    fn noted<T>(&self, name: &'static str, what: impl FnOnce() -> (String, f64, f64), op: impl FnOnce(&B) -> Result<T>) -> Result<T> {
        if !self.on.get() {
            return op(&self.inner);
        }
        let from = self.inner.mark()?;
        let out = op(&self.inner)?;
        let to = self.inner.mark()?;
        let (shape, flops, bytes) = what();
        self.pending.borrow_mut().push(Noted { name, shape, flops, bytes, from, to });
        Ok(out)
    }

    fn elem(&self) -> f64 {
        self.inner.dtype().size_bytes() as f64
    }
}

impl<B: Backend> Trace for Traced<B> {
    fn start_trace(&self) -> Result<()> {
        *self.origin.borrow_mut() = Some(self.inner.mark()?);
        self.pending.borrow_mut().clear();
        self.resolved.borrow_mut().clear();
        self.on.set(true);
        Ok(())
    }

    /// Waits for the operations' marks.
    fn finish_trace(&self) -> Result<Vec<TracedOp>> {
        self.on.set(false);
        self.resolve()?;
        *self.origin.borrow_mut() = None;
        Ok(std::mem::take(&mut *self.resolved.borrow_mut()))
    }
}

impl<B: Backend> Backend for Traced<B> {
    type Buf = B::Buf;
    type Mark = B::Mark;
    type Graph = TracedRecording<B>;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn dtype(&self) -> Dtype {
        self.inner.dtype()
    }
    fn len(&self, buf: &B::Buf) -> usize {
        self.inner.len(buf)
    }
    fn size_bytes(&self, buf: &B::Buf) -> usize {
        self.inner.size_bytes(buf)
    }
    fn upload(&self, host: &[f32]) -> Result<B::Buf> {
        self.inner.upload(host)
    }
    fn download(&self, buf: &B::Buf) -> Result<Vec<f32>> {
        self.inner.download(buf)
    }
    fn zeros(&self, len: usize) -> Result<B::Buf> {
        self.inner.zeros(len)
    }
    fn zeros_f32(&self, len: usize) -> Result<B::Buf> {
        self.inner.zeros_f32(len)
    }
    fn empty(&self, len: usize) -> Result<B::Buf> {
        self.inner.empty(len)
    }
    fn upload_f32(&self, host: &[f32]) -> Result<B::Buf> {
        self.inner.upload_f32(host)
    }
    fn set_poison_outputs(&self, on: bool) {
        self.inner.set_poison_outputs(on)
    }
    fn poison_outputs(&self) -> bool {
        self.inner.poison_outputs()
    }

    fn embed(&self, table: &B::Buf, d: usize, tokens: &[u32], nseq: usize, n: usize, pos0: usize) -> Result<B::Buf> {
        let e = self.elem();
        self.noted("embed", || (format!("{nseq}x{n} tokens, d {d}"), 0.0, 2.0 * (nseq * n * d) as f64 * e), |b| b.embed(table, d, tokens, nseq, n, pos0))
    }
    fn matmul(&self, x: &B::Buf, w: &B::Buf, m: usize, k: usize, n: usize) -> Result<B::Buf> {
        let e = self.elem();
        self.noted("matmul", || (format!("[{m}x{k}]x[{k}x{n}]"), 2.0 * (m * k * n) as f64, (m * k + k * n + m * n) as f64 * e), |b| b.matmul(x, w, m, k, n))
    }
    fn rmsnorm(&self, x: &B::Buf, weight: &B::Buf, rows: usize, cols: usize, eps: f32) -> Result<B::Buf> {
        let e = self.elem();
        self.noted("rmsnorm", || (format!("{rows}x{cols}"), 0.0, 2.0 * (rows * cols) as f64 * e), |b| b.rmsnorm(x, weight, rows, cols, eps))
    }
    fn gelu(&self, x: &mut B::Buf) -> Result<()> {
        let n = self.inner.len(x);
        let e = self.elem();
        self.noted("gelu", || (format!("n {n}"), 0.0, 2.0 * n as f64 * e), |b| b.gelu(x))
    }
    fn gelu_mul(&self, gate: &mut B::Buf, up: &B::Buf) -> Result<()> {
        let n = self.inner.len(gate);
        let e = self.elem();
        self.noted("gelu_mul", || (format!("n {n}"), 0.0, 3.0 * n as f64 * e), |b| b.gelu_mul(gate, up))
    }
    fn add_assign(&self, x: &mut B::Buf, y: &B::Buf) -> Result<()> {
        let n = self.inner.len(x);
        let e = self.elem();
        self.noted("add", || (format!("n {n}"), 0.0, 3.0 * n as f64 * e), |b| b.add_assign(x, y))
    }
    fn split_qkv_rope(&self, qkv: &B::Buf, rows: usize, split: &QkvSplit) -> Result<(B::Buf, B::Buf, B::Buf)> {
        let e = self.elem();
        let (qw, kw) = (split.q_width, split.kv_width);
        let name = if split.rope.is_some() { "split_qkv_rope" } else { "split_qkv" };
        self.noted(name, || (format!("{rows}x({qw}+2x{kw})"), 0.0, 2.0 * (rows * (qw + 2 * kw)) as f64 * e), |b| b.split_qkv_rope(qkv, rows, split))
    }
    fn silu_mul(&self, gate: &mut B::Buf, up: &B::Buf) -> Result<()> {
        let n = self.inner.len(gate);
        let e = self.elem();
        self.noted("silu_mul", || (format!("n {n}"), 0.0, 3.0 * n as f64 * e), |b| b.silu_mul(gate, up))
    }
    fn embed_tokens(&self, table: &B::Buf, d: usize, tokens: &[u32]) -> Result<B::Buf> {
        let e = self.elem();
        self.noted("embed_tokens", || (format!("{} tokens, d {d}", tokens.len()), 0.0, 2.0 * (tokens.len() * d) as f64 * e), |b| b.embed_tokens(table, d, tokens))
    }
    fn gather_rows(&self, src: &B::Buf, cols: usize, runs: &[RowRun]) -> Result<B::Buf> {
        let rows: usize = runs.iter().map(|r| r.len).sum();
        let e = self.elem();
        self.noted("gather_rows", || (format!("{rows} rows of {cols} in {} runs", runs.len()), 0.0, 2.0 * (rows * cols) as f64 * e), |b| b.gather_rows(src, cols, runs))
    }
    fn scatter_rows(&self, dst: &mut B::Buf, cols: usize, runs: &[RowRun], src: &B::Buf) -> Result<()> {
        let rows: usize = runs.iter().map(|r| r.len).sum();
        let e = self.elem();
        self.noted("scatter_rows", || (format!("{rows} rows of {cols} in {} runs", runs.len()), 0.0, 2.0 * (rows * cols) as f64 * e), |b| b.scatter_rows(dst, cols, runs, src))
    }
    fn copy_rows(&self, dst: &mut B::Buf, cols: usize, src: &B::Buf, copies: &[RowCopy]) -> Result<()> {
        let rows: usize = copies.iter().map(|c| c.len).sum();
        let e = self.elem();
        self.noted("copy_rows", || (format!("{rows} rows of {cols} in {} runs", copies.len()), 0.0, 2.0 * (rows * cols) as f64 * e), |b| b.copy_rows(dst, cols, src, copies))
    }
    fn attention_prefill(&self, q: &B::Buf, k: &B::Buf, v: &B::Buf, s: PrefillShape) -> Result<(B::Buf, B::Buf)> {
        // Query i attends to min(q_offset + i + 1, skv) keys: 4·dh FLOPs per (query, key, head).
        let keys: f64 = (0..s.sq).map(|i| (s.q_offset + i + 1).min(s.skv) as f64).sum();
        let flops = 4.0 * (s.nseq * s.heads * s.head_dim) as f64 * keys;
        self.noted(
            "attention_prefill",
            || (format!("{} seq x {} queries at {} x {} keys, {}x{} (K/V {})", s.nseq, s.sq, s.q_offset, s.skv, s.heads, s.head_dim, s.kv_heads), flops, 0.0),
            |b| b.attention_prefill(q, k, v, s),
        )
    }
    fn attention_decode(&self, q: &B::Buf, k_cache: &B::Buf, v_cache: &B::Buf, s: DecodeShape) -> Result<(B::Buf, B::Buf)> {
        let e = self.elem();
        self.noted(
            "attention_decode",
            || (format!("{} seq x {} keys, {}x{} (K/V {})", s.nseq, s.len, s.heads, s.head_dim, s.kv_heads), 0.0, 2.0 * (s.nseq * s.len * s.kv_heads * s.head_dim) as f64 * e),
            |b| b.attention_decode(q, k_cache, v_cache, s),
        )
    }
    fn merge_partials(&self, o: &mut B::Buf, lse: &mut B::Buf, o2: &B::Buf, lse2: &B::Buf, rows: usize, head_dim: usize) -> Result<()> {
        let e = self.elem();
        self.noted("merge_partials", || (format!("{rows} rows of {head_dim}"), 0.0, 3.0 * (rows * head_dim) as f64 * e), |b| b.merge_partials(o, lse, o2, lse2, rows, head_dim))
    }
    fn argmax(&self, logits: &B::Buf, rows: usize, cols: usize) -> Result<Vec<u32>> {
        let e = self.elem();
        self.noted("argmax", || (format!("{rows}x{cols}"), 0.0, (rows * cols) as f64 * e), |b| b.argmax(logits, rows, cols))
    }

    fn router_top_k(&self, logits: &B::Buf, rows: usize, experts: usize, k: usize) -> Result<(B::Buf, B::Buf)> {
        let e = self.elem();
        self.noted("router_top_k", || (format!("{rows} rows, top {k} of {experts}"), 0.0, (rows * experts) as f64 * e + 8.0 * (rows * k) as f64), |b| b.router_top_k(logits, rows, experts, k))
    }
    fn expert_slots(&self, ids: &B::Buf, assignments: usize, experts: usize, capacity: Option<usize>) -> Result<(B::Buf, Vec<usize>)> {
        let cap = capacity.map_or("none".to_string(), |c| c.to_string());
        self.noted(
            "expert_slots",
            || (format!("{assignments} assignments to {experts} experts, capacity {cap}"), 0.0, 8.0 * assignments as f64),
            |b| b.expert_slots(ids, assignments, experts, capacity),
        )
    }
    fn permute_to_experts(&self, x: &B::Buf, cols: usize, slots: &B::Buf, rows: usize, k: usize, kept: usize) -> Result<B::Buf> {
        let e = self.elem();
        self.noted("permute_to_experts", || (format!("{rows} rows x {k} to {kept} rows of {cols}"), 0.0, 2.0 * (kept * cols) as f64 * e), |b| b.permute_to_experts(x, cols, slots, rows, k, kept))
    }
    fn combine_from_experts(&self, y: &B::Buf, cols: usize, slots: &B::Buf, weights: &B::Buf, rows: usize, k: usize) -> Result<B::Buf> {
        let e = self.elem();
        self.noted(
            "combine_from_experts",
            || (format!("{rows} rows x {k} of {cols}"), 2.0 * (rows * k * cols) as f64, (rows * k + rows) as f64 * cols as f64 * e),
            |b| b.combine_from_experts(y, cols, slots, weights, rows, k),
        )
    }
    fn grouped_matmul(&self, x: &B::Buf, w: &B::Buf, groups: &[usize], k: usize, n: usize) -> Result<B::Buf> {
        let e = self.elem();
        let m: usize = groups.iter().sum();
        self.noted(
            "grouped_matmul",
            || (format!("{} groups, [{m}x{k}]x[{k}x{n}]", groups.len()), 2.0 * (m * k * n) as f64, (m * k + groups.len() * k * n + m * n) as f64 * e),
            |b| b.grouped_matmul(x, w, groups, k, n),
        )
    }

    fn set_step(&self, vars: &StepVars) -> Result<()> {
        self.inner.set_step(vars)
    }
    fn embed_step(&self, table: &B::Buf, d: usize, nseq: usize) -> Result<B::Buf> {
        let e = self.elem();
        self.noted("embed_step", || (format!("{nseq} tokens, d {d}"), 0.0, 2.0 * (nseq * d) as f64 * e), |b| b.embed_step(table, d, nseq))
    }
    fn embed_step_tokens(&self, table: &B::Buf, d: usize, nseq: usize) -> Result<B::Buf> {
        let e = self.elem();
        self.noted("embed_step_tokens", || (format!("{nseq} tokens, d {d}"), 0.0, 2.0 * (nseq * d) as f64 * e), |b| b.embed_step_tokens(table, d, nseq))
    }
    fn store_step(&self, cache: &mut B::Buf, src: &B::Buf, nseq: usize, cap: usize, width: usize) -> Result<()> {
        let e = self.elem();
        self.noted("store_step", || (format!("{nseq} rows of {width}"), 0.0, 2.0 * (nseq * width) as f64 * e), |b| b.store_step(cache, src, nseq, cap, width))
    }
    fn attention_decode_step(&self, q: &B::Buf, k_cache: &B::Buf, v_cache: &B::Buf, s: DecodeShape) -> Result<(B::Buf, B::Buf)> {
        let e = self.elem();
        // The attended length is read on the device: the bytes count the cache's capacity.
        self.noted(
            "attention_decode",
            || (format!("{} seq x up to {} keys, {}x{} (K/V {})", s.nseq, s.cap, s.heads, s.head_dim, s.kv_heads), 0.0, 2.0 * (s.nseq * s.cap * s.kv_heads * s.head_dim) as f64 * e),
            |b| b.attention_decode_step(q, k_cache, v_cache, s),
        )
    }

    fn capture_begin(&self) -> Result<bool> {
        let started = self.inner.capture_begin()?;
        if started {
            // What is noted from here belongs to the recording.
            self.resolve()?;
        }
        Ok(started)
    }
    fn capture_end(&self) -> Result<TracedRecording<B>> {
        let inner = self.inner.capture_end();
        let ops = std::mem::take(&mut *self.pending.borrow_mut());
        Ok(TracedRecording { inner: inner?, ops })
    }
    fn replay(&self, graph: &TracedRecording<B>) -> Result<()> {
        self.inner.replay(&graph.inner)?;
        if self.on.get() {
            // The replay records the same marks again: read them before the next one.
            self.resolve_into(&graph.ops)?;
        }
        Ok(())
    }

    fn mark(&self) -> Result<B::Mark> {
        self.inner.mark()
    }
    fn wait_for(&self, mark: &B::Mark) -> Result<()> {
        self.inner.wait_for(mark)
    }
    fn messages_block_compute(&self) -> bool {
        self.inner.messages_block_compute()
    }
    fn elapsed_s(&self, from: &B::Mark, to: &B::Mark) -> Result<f64> {
        self.inner.elapsed_s(from, to)
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn peak_memory_bytes(&self) -> Option<u64> {
        self.inner.peak_memory_bytes()
    }
    fn reset_peak_memory(&self) {
        self.inner.reset_peak_memory()
    }
}
