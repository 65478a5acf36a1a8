//! The shape-only backend: buffers carry a length, an element type and an
//! id, never values. Every operation checks its shapes as the CPU backend
//! does and appends an [`OpRecord`] (what ran, its dimensions, FLOPs, bytes
//! read and written, the buffers it read and wrote, the stream) to this
//! rank's [`Recorder`]. The planner runs the strategies' unchanged dataflow
//! on it, so the operations it records are the ones the suite executes.
//!
//! Downloads and argmax return zeros: no dataflow branches on values. The
//! one value a dataflow does branch on, the tokens routed to each expert
//! (`expert_slots`' counts, which size the expert GEMMs and messages), comes
//! from the backend's [`Routing`] assumption. Messages either hold the
//! compute stream (blocking MPI on a CPU) or run on their group's stream,
//! the compute stream waiting where `Comm` completes them (`wait_for`, as on
//! a GPU). This module must not cost anything (the planner's cost model
//! does) nor move messages (the in-process transport records those into
//! the same log).

mod moe;

pub use super::record::{BufRef, Entry, Marker, OpDims, OpKind, OpRecord, Recorder};
use super::{check_kv_heads, Backend, BackendError, DecodeShape, Dtype, PrefillShape, QkvSplit, Result, RowCopy, RowRun, StepVars};
pub use moe::Routing;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// The element type of a shape buffer: the model dtype or f32 (log-sum-exp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    Model,
    F32,
}

/// Live and peak bytes of a rank's buffers (every allocation counts, none is cached).
#[derive(Debug, Default)]
struct Meter {
    live: Cell<u64>,
    peak: Cell<u64>,
}

impl Meter {
    fn alloc(&self, bytes: u64) {
        self.live.set(self.live.get() + bytes);
        self.peak.set(self.peak.get().max(self.live.get()));
    }
}

/// A device buffer without data.
#[derive(Debug)]
pub struct ShapeBuf {
    /// Unique on this rank.
    pub id: u64,
    pub len: usize,
    pub elem: Elem,
    /// Row width, where the operation that last wrote the buffer knew it.
    pub cols: Option<usize>,
    bytes: u64,
    meter: Rc<Meter>,
}

impl Drop for ShapeBuf {
    fn drop(&mut self) {
        self.meter.live.set(self.meter.live.get().saturating_sub(self.bytes));
    }
}

impl From<&ShapeBuf> for BufRef {
    fn from(b: &ShapeBuf) -> Self {
        BufRef { id: b.id, len: b.len, cols: b.cols }
    }
}

/// The shape-only backend of one simulated rank.
#[derive(Debug)]
pub struct ShapeBackend {
    dtype: Dtype,
    next_id: Cell<u64>,
    step: RefCell<StepVars>,
    stream: Cell<u32>,
    log: Rc<Recorder>,
    meter: Rc<Meter>,
    /// Messages hold the compute stream (a CPU) rather than running on their group's stream.
    blocking_messages: bool,
    routing: Routing,
}

fn check(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(BackendError::Shape(format!("{what}: buffer holds {have} elements, needs {need}")));
    }
    Ok(())
}

impl ShapeBackend {
    /// A backend whose model buffers hold `dtype` values.
    pub fn new(dtype: Dtype) -> Self {
        Self {
            dtype,
            next_id: Cell::new(1),
            step: RefCell::new(StepVars::default()),
            stream: Cell::new(0),
            log: Rc::new(Recorder::default()),
            meter: Rc::default(),
            blocking_messages: false,
            routing: Routing::Balanced,
        }
    }

    /// Messages hold the compute stream (`true`: blocking MPI on a CPU) or
    /// run on their group's own stream (`false`, the default: a GPU).
    pub fn with_blocking_messages(mut self, blocking: bool) -> Self {
        self.blocking_messages = blocking;
        self
    }

    /// How tokens spread over experts (see [`Routing`]).
    pub fn with_routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Whether messages hold the compute stream.
    pub fn blocking_messages(&self) -> bool {
        self.blocking_messages
    }

    /// The rank's program log (shared with its transport).
    pub fn recorder(&self) -> Rc<Recorder> {
        self.log.clone()
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Bytes of one element of `elem`.
    pub fn elem_bytes(&self, elem: Elem) -> usize {
        match elem {
            Elem::Model => self.dtype.size_bytes(),
            Elem::F32 => 4,
        }
    }

    fn buf(&self, len: usize, elem: Elem, cols: Option<usize>) -> ShapeBuf {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let bytes = (len * self.elem_bytes(elem)) as u64;
        self.meter.alloc(bytes);
        ShapeBuf { id, len, elem, cols, bytes, meter: self.meter.clone() }
    }

    fn model(&self, len: usize, cols: usize) -> ShapeBuf {
        self.buf(len, Elem::Model, Some(cols))
    }

    fn bytes(&self, b: &ShapeBuf, elems: usize) -> u64 {
        (elems * self.elem_bytes(b.elem)) as u64
    }

    #[allow(clippy::too_many_arguments)]
    fn record(&self, kind: OpKind, dims: OpDims, flops: f64, bytes_read: u64, bytes_written: u64, inputs: &[&ShapeBuf], outputs: &[&ShapeBuf]) {
        let op = OpRecord {
            kind,
            dims,
            flops,
            bytes_read,
            bytes_written,
            inputs: inputs.iter().map(|b| BufRef::from(*b)).collect(),
            outputs: outputs.iter().map(|b| BufRef::from(*b)).collect(),
            stream: self.stream.get(),
        };
        self.log.push(Entry::Op(op));
    }

    /// A row-wise op reading `rows × cols` of `x` and writing as much.
    fn elementwise(&self, kind: OpKind, x: &mut ShapeBuf, y: Option<&ShapeBuf>, flops_per: f64) {
        let len = x.len;
        let read = self.bytes(x, len) + y.map_or(0, |y| self.bytes(y, len));
        let dims = OpDims::Elems { len };
        let op = OpRecord {
            kind,
            dims,
            flops: flops_per * len as f64,
            bytes_read: read,
            bytes_written: self.bytes(x, len),
            inputs: std::iter::once(BufRef::from(&*x)).chain(y.map(BufRef::from)).collect(),
            outputs: vec![BufRef::from(&*x)],
            stream: self.stream.get(),
        };
        self.log.push(Entry::Op(op));
    }
}

/// Causal attention FLOPs of a prefill call: QKᵀ and PV over the keys each query sees.
pub fn prefill_flops(s: &PrefillShape) -> f64 {
    // Query i (absolute position q_offset + i) sees min(q_offset + i + 1, skv) keys.
    let (a, b) = (s.q_offset + 1, s.q_offset + s.sq);
    let full = s.skv;
    let keys = if b <= full {
        (a + b) as f64 * s.sq as f64 / 2.0
    } else if a > full {
        (full * s.sq) as f64
    } else {
        let below = full - a + 1;
        (a + full) as f64 * below as f64 / 2.0 + (full * (s.sq - below)) as f64
    };
    4.0 * s.nseq as f64 * s.heads as f64 * s.head_dim as f64 * keys
}

impl Backend for ShapeBackend {
    type Buf = ShapeBuf;
    /// `Some(n)`: the completion of the rank's `n`-th recorded message.
    type Mark = Option<usize>;
    type Graph = ();

    fn name(&self) -> &'static str {
        "shape"
    }
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn len(&self, buf: &ShapeBuf) -> usize {
        buf.len
    }
    fn size_bytes(&self, buf: &ShapeBuf) -> usize {
        buf.len * self.elem_bytes(buf.elem)
    }

    fn upload(&self, host: &[f32]) -> Result<ShapeBuf> {
        let b = self.buf(host.len(), Elem::Model, None);
        self.record(OpKind::Upload, OpDims::Elems { len: b.len }, 0.0, (host.len() * 4) as u64, self.bytes(&b, b.len), &[], &[&b]);
        Ok(b)
    }
    fn download(&self, buf: &ShapeBuf) -> Result<Vec<f32>> {
        self.record(OpKind::Download, OpDims::Elems { len: buf.len }, 0.0, self.bytes(buf, buf.len), (buf.len * 4) as u64, &[buf], &[]);
        Ok(vec![0.0; buf.len])
    }
    fn zeros(&self, len: usize) -> Result<ShapeBuf> {
        let b = self.buf(len, Elem::Model, None);
        self.record(OpKind::Zeros, OpDims::Elems { len }, 0.0, 0, self.bytes(&b, len), &[], &[&b]);
        Ok(b)
    }
    fn zeros_f32(&self, len: usize) -> Result<ShapeBuf> {
        let b = self.buf(len, Elem::F32, None);
        self.record(OpKind::Zeros, OpDims::Elems { len }, 0.0, 0, self.bytes(&b, len), &[], &[&b]);
        Ok(b)
    }
    fn empty(&self, len: usize) -> Result<ShapeBuf> {
        let b = self.buf(len, Elem::Model, None);
        self.record(OpKind::Alloc, OpDims::Elems { len }, 0.0, 0, 0, &[], &[&b]);
        Ok(b)
    }
    fn upload_f32(&self, host: &[f32]) -> Result<ShapeBuf> {
        let b = self.buf(host.len(), Elem::F32, None);
        self.record(OpKind::Upload, OpDims::Elems { len: b.len }, 0.0, (host.len() * 4) as u64, self.bytes(&b, b.len), &[], &[&b]);
        Ok(b)
    }

    fn embed(&self, table: &ShapeBuf, d: usize, tokens: &[u32], nseq: usize, n: usize, _pos0: usize) -> Result<ShapeBuf> {
        check("embed tokens", tokens.len(), nseq * n)?;
        check("embedding table", table.len, d)?;
        let rows = nseq * n;
        let out = self.model(rows * d, d);
        self.record(OpKind::Embed, OpDims::Rows { rows, cols: d }, (2 * rows * d) as f64, self.bytes(table, rows * d) + 4 * rows as u64, self.bytes(&out, rows * d), &[table], &[&out]);
        Ok(out)
    }

    fn embed_tokens(&self, table: &ShapeBuf, d: usize, tokens: &[u32]) -> Result<ShapeBuf> {
        check("embedding table", table.len, d)?;
        let rows = tokens.len();
        let out = self.model(rows * d, d);
        self.record(OpKind::Embed, OpDims::Rows { rows, cols: d }, 0.0, self.bytes(table, rows * d) + 4 * rows as u64, self.bytes(&out, rows * d), &[table], &[&out]);
        Ok(out)
    }

    fn matmul(&self, x: &ShapeBuf, w: &ShapeBuf, m: usize, k: usize, n: usize) -> Result<ShapeBuf> {
        check("matmul x", x.len, m * k)?;
        check("matmul w", w.len, k * n)?;
        let out = self.model(m * n, n);
        let read = self.bytes(x, m * k) + self.bytes(w, k * n);
        self.record(OpKind::Matmul, OpDims::Gemm { m, k, n }, 2.0 * (m * k * n) as f64, read, self.bytes(&out, m * n), &[x, w], &[&out]);
        Ok(out)
    }

    fn rmsnorm(&self, x: &ShapeBuf, weight: &ShapeBuf, rows: usize, cols: usize, _eps: f32) -> Result<ShapeBuf> {
        check("rmsnorm x", x.len, rows * cols)?;
        check("rmsnorm weight", weight.len, cols)?;
        let out = self.model(rows * cols, cols);
        self.record(
            OpKind::RmsNorm,
            OpDims::Rows { rows, cols },
            (4 * rows * cols) as f64,
            self.bytes(x, rows * cols) + self.bytes(weight, cols),
            self.bytes(&out, rows * cols),
            &[x, weight],
            &[&out],
        );
        Ok(out)
    }

    fn gelu(&self, x: &mut ShapeBuf) -> Result<()> {
        self.elementwise(OpKind::Gelu, x, None, 8.0);
        Ok(())
    }

    fn gelu_mul(&self, gate: &mut ShapeBuf, up: &ShapeBuf) -> Result<()> {
        check("gelu_mul up", up.len, gate.len)?;
        self.elementwise(OpKind::GeluMul, gate, Some(up), 9.0);
        Ok(())
    }

    fn silu_mul(&self, gate: &mut ShapeBuf, up: &ShapeBuf) -> Result<()> {
        check("silu_mul up", up.len, gate.len)?;
        // silu(x)·u: a negation, an exponential, an addition, a division and the product.
        self.elementwise(OpKind::SiluMul, gate, Some(up), 5.0);
        Ok(())
    }

    fn add_assign(&self, x: &mut ShapeBuf, y: &ShapeBuf) -> Result<()> {
        check("add_assign y", y.len, x.len)?;
        self.elementwise(OpKind::Add, x, Some(y), 1.0);
        Ok(())
    }

    fn split_qkv_rope(&self, qkv: &ShapeBuf, rows: usize, split: &QkvSplit) -> Result<(ShapeBuf, ShapeBuf, ShapeBuf)> {
        let (qw, kw) = (split.q_width, split.kv_width);
        let width = qw + 2 * kw;
        check("split_qkv", qkv.len, rows * width)?;
        if let Some(r) = &split.rope {
            if r.head_dim == 0 || r.head_dim % 2 != 0 || qw % r.head_dim != 0 || kw % r.head_dim != 0 {
                return Err(BackendError::Shape(format!("split_qkv_rope: head_dim {} does not split q of {qw} and k of {kw} into rotatable heads", r.head_dim)));
            }
        }
        let (q, k, v) = (self.model(rows * qw, qw), self.model(rows * kw, kw), self.model(rows * kw, kw));
        let bytes = self.bytes(qkv, rows * width);
        // A rotation turns each pair of q's and k's elements: 4 multiplications and 2 additions per pair.
        let flops = if split.rope.is_some() { 3.0 * (rows * (qw + kw)) as f64 } else { 0.0 };
        self.record(OpKind::SplitQkv, OpDims::Rows { rows, cols: width }, flops, bytes, bytes, &[qkv], &[&q, &k, &v]);
        Ok((q, k, v))
    }

    fn gather_rows(&self, src: &ShapeBuf, cols: usize, runs: &[RowRun]) -> Result<ShapeBuf> {
        for run in runs {
            check("gather_rows", src.len, (run.start + run.len) * cols)?;
        }
        let rows: usize = runs.iter().map(|r| r.len).sum();
        let out = self.buf(rows * cols, src.elem, Some(cols));
        let bytes = self.bytes(src, rows * cols);
        self.record(OpKind::GatherRows, OpDims::Rows { rows, cols }, 0.0, bytes, bytes, &[src], &[&out]);
        Ok(out)
    }

    fn scatter_rows(&self, dst: &mut ShapeBuf, cols: usize, runs: &[RowRun], src: &ShapeBuf) -> Result<()> {
        let mut at = 0;
        for run in runs {
            check("scatter_rows dst", dst.len, (run.start + run.len) * cols)?;
            check("scatter_rows src", src.len, (at + run.len) * cols)?;
            at += run.len;
        }
        dst.cols = Some(cols);
        let bytes = self.bytes(src, at * cols);
        self.record(OpKind::ScatterRows, OpDims::Rows { rows: at, cols }, 0.0, bytes, bytes, &[dst, src], &[dst]);
        Ok(())
    }

    fn copy_rows(&self, dst: &mut ShapeBuf, cols: usize, src: &ShapeBuf, copies: &[RowCopy]) -> Result<()> {
        for c in copies {
            check("copy_rows src", src.len, (c.src + c.len) * cols)?;
            check("copy_rows dst", dst.len, (c.dst + c.len) * cols)?;
        }
        let rows: usize = copies.iter().map(|c| c.len).sum();
        dst.cols = Some(cols);
        let bytes = self.bytes(src, rows * cols);
        self.record(OpKind::CopyRows, OpDims::Rows { rows, cols }, 0.0, bytes, bytes, &[dst, src], &[dst]);
        Ok(())
    }

    fn attention_prefill(&self, q: &ShapeBuf, k: &ShapeBuf, v: &ShapeBuf, s: PrefillShape) -> Result<(ShapeBuf, ShapeBuf)> {
        check_kv_heads("prefill", s.heads, s.kv_heads)?;
        let width = s.heads * s.head_dim;
        let kv_width = s.kv_heads * s.head_dim;
        check("prefill q", q.len, s.nseq * s.sq * width)?;
        check("prefill k", k.len, s.nseq * s.kv_seq_stride * kv_width)?;
        check("prefill v", v.len, s.nseq * s.kv_seq_stride * kv_width)?;
        if s.skv > s.kv_seq_stride {
            return Err(BackendError::Shape(format!("prefill skv {} exceeds kv_seq_stride {}", s.skv, s.kv_seq_stride)));
        }
        let out = self.model(s.nseq * s.sq * width, width);
        let lse = self.buf(s.nseq * s.heads * s.sq, Elem::F32, Some(s.sq));
        // K/V rows any query of the block sees are read once (a flash kernel's traffic).
        let keys = (s.q_offset + s.sq).min(s.skv);
        let read = self.bytes(q, s.nseq * s.sq * width) + 2 * self.bytes(k, s.nseq * keys * kv_width);
        let written = self.bytes(&out, out.len) + self.bytes(&lse, lse.len);
        self.record(OpKind::AttentionPrefill, OpDims::Prefill(s), prefill_flops(&s), read, written, &[q, k, v], &[&out, &lse]);
        Ok((out, lse))
    }

    fn attention_decode(&self, q: &ShapeBuf, k_cache: &ShapeBuf, v_cache: &ShapeBuf, s: DecodeShape) -> Result<(ShapeBuf, ShapeBuf)> {
        check_kv_heads("decode", s.heads, s.kv_heads)?;
        let width = s.heads * s.head_dim;
        let kv_width = s.kv_heads * s.head_dim;
        check("decode q", q.len, s.nseq * width)?;
        check("decode k cache", k_cache.len, s.nseq * s.cap * kv_width)?;
        check("decode v cache", v_cache.len, s.nseq * s.cap * kv_width)?;
        if s.len > s.cap {
            return Err(BackendError::Shape(format!("decode len {} exceeds cache capacity {}", s.len, s.cap)));
        }
        let out = self.model(s.nseq * width, width);
        let lse = self.buf(s.nseq * s.heads, Elem::F32, Some(s.heads));
        // Each K/V head's rows are read once for the query heads of its group.
        let read = self.bytes(q, s.nseq * width) + 2 * self.bytes(k_cache, s.nseq * s.len * kv_width);
        let flops = 4.0 * (s.nseq * s.len * width) as f64;
        let written = self.bytes(&out, out.len) + self.bytes(&lse, lse.len);
        self.record(OpKind::AttentionDecode, OpDims::Decode(s), flops, read, written, &[q, k_cache, v_cache], &[&out, &lse]);
        Ok((out, lse))
    }

    fn merge_partials(&self, o: &mut ShapeBuf, lse: &mut ShapeBuf, o2: &ShapeBuf, lse2: &ShapeBuf, rows: usize, head_dim: usize) -> Result<()> {
        check("merge o", o.len, rows * head_dim)?;
        check("merge o2", o2.len, rows * head_dim)?;
        check("merge lse", lse.len, rows)?;
        check("merge lse2", lse2.len, rows)?;
        let read = 2 * self.bytes(o, rows * head_dim) + 2 * self.bytes(lse, rows);
        let written = self.bytes(o, rows * head_dim) + self.bytes(lse, rows);
        self.record(OpKind::MergePartials, OpDims::Rows { rows, cols: head_dim }, (6 * rows * head_dim) as f64, read, written, &[o, lse, o2, lse2], &[o, lse]);
        Ok(())
    }

    fn argmax(&self, logits: &ShapeBuf, rows: usize, cols: usize) -> Result<Vec<u32>> {
        check("argmax", logits.len, rows * cols)?;
        self.record(OpKind::Argmax, OpDims::Rows { rows, cols }, (rows * cols) as f64, self.bytes(logits, rows * cols), 4 * rows as u64, &[logits], &[]);
        Ok(vec![0; rows])
    }

    fn router_top_k(&self, logits: &ShapeBuf, rows: usize, experts: usize, k: usize) -> Result<(ShapeBuf, ShapeBuf)> {
        self.router(logits, rows, experts, k)
    }
    fn expert_slots(&self, ids: &ShapeBuf, assignments: usize, experts: usize, capacity: Option<usize>) -> Result<(ShapeBuf, Vec<usize>)> {
        self.slots(ids, assignments, experts, capacity)
    }
    fn permute_to_experts(&self, x: &ShapeBuf, cols: usize, slots: &ShapeBuf, rows: usize, k: usize, kept: usize) -> Result<ShapeBuf> {
        self.permute(x, cols, slots, rows, k, kept)
    }
    fn combine_from_experts(&self, y: &ShapeBuf, cols: usize, slots: &ShapeBuf, weights: &ShapeBuf, rows: usize, k: usize) -> Result<ShapeBuf> {
        self.combine(y, cols, slots, weights, rows, k)
    }
    fn grouped_matmul(&self, x: &ShapeBuf, w: &ShapeBuf, groups: &[usize], k: usize, n: usize) -> Result<ShapeBuf> {
        self.grouped(x, w, groups, k, n)
    }

    fn set_step(&self, vars: &StepVars) -> Result<()> {
        *self.step.borrow_mut() = vars.clone();
        self.log.push(Entry::Marker(Marker::SetStep { pos: vars.pos, store_at: vars.store_at, len: vars.len }));
        Ok(())
    }

    fn embed_step(&self, table: &ShapeBuf, d: usize, nseq: usize) -> Result<ShapeBuf> {
        let tokens = self.step.borrow().tokens.clone();
        self.embed(table, d, &tokens, nseq, 1, 0)
    }

    fn embed_step_tokens(&self, table: &ShapeBuf, d: usize, nseq: usize) -> Result<ShapeBuf> {
        let tokens = self.step.borrow().tokens.clone();
        check("embed_step_tokens tokens", tokens.len(), nseq)?;
        self.embed_tokens(table, d, &tokens[..nseq])
    }

    fn store_step(&self, cache: &mut ShapeBuf, src: &ShapeBuf, nseq: usize, cap: usize, width: usize) -> Result<()> {
        let Some(at) = self.step.borrow().store_at else { return Ok(()) };
        if at >= cap {
            return Err(BackendError::Shape(format!("store_step row {at} is outside a cache of {cap} rows")));
        }
        check("store_step cache", cache.len, nseq * cap * width)?;
        check("store_step src", src.len, nseq * width)?;
        cache.cols = Some(width);
        let bytes = self.bytes(src, nseq * width);
        self.record(OpKind::StoreStep, OpDims::Rows { rows: nseq, cols: width }, 0.0, bytes, bytes, &[cache, src], &[cache]);
        Ok(())
    }

    fn attention_decode_step(&self, q: &ShapeBuf, k_cache: &ShapeBuf, v_cache: &ShapeBuf, shape: DecodeShape) -> Result<(ShapeBuf, ShapeBuf)> {
        let len = self.step.borrow().len;
        self.attention_decode(q, k_cache, v_cache, DecodeShape { len, ..shape })
    }

    fn capture_end(&self) -> Result<()> {
        Err(BackendError::Unavailable { backend: "shape", reason: "the shape backend records operations, not graphs".into() })
    }
    fn replay(&self, _graph: &()) -> Result<()> {
        self.capture_end()
    }

    fn mark(&self) -> Result<Option<usize>> {
        Ok(None)
    }
    /// A mark naming a recorded message (the in-process transport's `done`)
    /// becomes a wait of the compute stream for that message.
    fn wait_for(&self, mark: &Option<usize>) -> Result<()> {
        if let Some(n) = mark {
            self.log.push(Entry::Marker(Marker::WaitFor(*n)));
        }
        Ok(())
    }
    fn messages_block_compute(&self) -> bool {
        self.blocking_messages
    }
    fn elapsed_s(&self, _from: &Option<usize>, _to: &Option<usize>) -> Result<f64> {
        Ok(0.0)
    }
    fn synchronize(&self) -> Result<()> {
        self.log.push(Entry::Marker(Marker::Sync));
        Ok(())
    }
    /// The most bytes this rank's buffers held at once since the last reset.
    fn peak_memory_bytes(&self) -> Option<u64> {
        Some(self.meter.peak.get())
    }
    fn reset_peak_memory(&self) {
        self.meter.peak.set(self.meter.live.get());
    }
}

#[cfg(test)]
mod tests;
