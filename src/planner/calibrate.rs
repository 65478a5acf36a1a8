//! Measuring a calibration file on the backend in use (CPU or CUDA),
//! through the same `Backend` operations and `Comm` calls the strategies
//! make: a grid of GEMM shapes, causal prefill attention over query lengths
//! and offsets, decode attention over sequences and lengths, the bandwidth
//! of RMSNorm, element-wise addition, GELU, the embedding, copy and fill
//! kernels, and with `--comm`
//! all-reduce, all-gather, broadcast, point-to-point and token messages
//! over sizes on every rank of the launch.
//!
//! Each point runs once to warm up, then in groups of calls timed between
//! two device marks, the group doubling until it lasts the target time; the
//! fastest of five groups per call counts (other work on the machine only
//! ever adds time). GEMM weights rotate over copies
//! as large as the model's weights, and decode K/V caches over one copy per
//! layer, so each is as warm or cold in the caches as when a decode step
//! reads it once; activations stay warm, as a run's are (just written). Work and bytes per point are what
//! the shape-only backend records for the same call, so the cost model
//! divides like by like. The GPU grid is sized to finish in about a minute
//! on one GPU; points whose buffers would exceed the memory cap are skipped.

use super::calibration::Calibration;
use crate::backend::shape::{Entry, OpRecord, ShapeBackend};
use crate::backend::{Backend, DecodeShape, Dtype, PrefillShape, Result, RowCopy, RowRun};
use crate::comm::{Category, Comm, Group};
use std::collections::BTreeMap;

/// What to measure.
#[derive(Clone, Debug)]
pub struct Grid {
    pub gemm_m: Vec<usize>,
    pub gemm_k: Vec<usize>,
    pub gemm_n: Vec<usize>,
    pub prefill_sq: Vec<usize>,
    pub prefill_offset: Vec<usize>,
    pub decode_nseq: Vec<usize>,
    pub decode_len: Vec<usize>,
    /// Bytes of the bandwidth kernels' input.
    pub bytes: Vec<usize>,
    pub comm_bytes: Vec<usize>,
    /// Largest buffer of one point (bytes).
    pub max_buffer: usize,
    /// Time a group of calls lasts at least (s).
    pub target_s: f64,
    /// GEMM weights rotate over copies of at least this many bytes in all:
    /// the model's weights, which a decode step reads once each, so a weight
    /// is as warm or cold in the caches as in a run (see [`Grid::for_model`]).
    pub cold_bytes: usize,
    /// Decode K/V caches rotate over this many copies (one per layer, as a
    /// step reads each layer's cache once).
    pub cache_copies: usize,
}

impl Grid {
    /// On a GPU: dense-4l's GEMMs under every TP degree to 8, and long contexts.
    pub fn gpu() -> Self {
        Self {
            gemm_m: vec![1, 4, 16, 64, 256, 1024, 4096, 16384, 32768],
            gemm_k: vec![512, 2048, 4096, 16384],
            gemm_n: vec![512, 1536, 4096, 12288, 32768],
            prefill_sq: vec![128, 512, 2048, 8192, 32768],
            prefill_offset: vec![0, 2048, 8192, 32768],
            decode_nseq: vec![1, 4, 16, 64],
            decode_len: vec![512, 2048, 8192, 32768, 131072],
            bytes: vec![1 << 16, 1 << 20, 1 << 24, 1 << 28, 1 << 30],
            comm_bytes: vec![1 << 12, 1 << 16, 1 << 20, 1 << 24, 1 << 28],
            max_buffer: 8 << 30,
            target_s: 0.005,
            cold_bytes: 256 << 20,
            cache_copies: 4,
        }
    }

    /// On the CPU backend: the tiny models' shapes.
    pub fn cpu() -> Self {
        Self {
            gemm_m: vec![1, 4, 16, 64, 256, 1024, 4096],
            gemm_k: vec![16, 64, 256, 1024],
            gemm_n: vec![16, 64, 256, 1024],
            prefill_sq: vec![4, 16, 64, 256, 1024],
            prefill_offset: vec![0, 64, 256, 1024],
            decode_nseq: vec![1, 2, 4, 16],
            decode_len: vec![16, 64, 256, 1024, 4096],
            bytes: vec![1 << 10, 1 << 14, 1 << 18, 1 << 22, 1 << 26],
            comm_bytes: vec![1 << 8, 1 << 12, 1 << 16, 1 << 20, 1 << 22],
            max_buffer: 1 << 30,
            target_s: 0.01,
            cold_bytes: 8 << 20,
            cache_copies: 2,
        }
    }

    /// The grid with `model`'s own GEMM widths (its QKV, output, FFN and
    /// vocabulary projections, so the cost model reads them off measured
    /// points rather than between neighbours) and the cache footprint of
    /// its weights and layers (in `elem`-byte values).
    pub fn for_model(mut self, model: &crate::model::ModelConfig, elem: usize) -> Self {
        let qkv = (model.heads + 2 * model.kv_heads) * model.head_dim;
        merge(&mut self.gemm_n, &[qkv, model.d_model, model.ffn, model.vocab]);
        merge(&mut self.gemm_k, &[model.d_model, model.attn_width(), model.ffn]);
        Self { cold_bytes: (model.params() as usize * elem).min(1 << 30), cache_copies: model.layers.clamp(1, 16), ..self }
    }

    /// The grid with prefill at the job's own prompt lengths (a whole
    /// prompt is one query block of its length at offset 0).
    pub fn with_lengths(mut self, lengths: &[usize]) -> Self {
        merge(&mut self.prefill_sq, lengths);
        self
    }
}

/// Adds `more` to a sorted axis, keeping it sorted and free of repeats.
fn merge(axis: &mut Vec<usize>, more: &[usize]) {
    axis.extend(more.iter().copied().filter(|&v| v > 0));
    axis.sort_unstable();
    axis.dedup();
}

/// Seconds per call of `op`: warm-up, then the fastest of five timed
/// groups (other work on the machine only ever adds time).
fn time<B: Backend>(be: &B, target_s: f64, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    op()?;
    be.synchronize()?;
    let mut n = 1usize;
    let mut best = f64::INFINITY;
    let mut groups = 0;
    while groups < 5 {
        let a = be.mark()?;
        for _ in 0..n {
            op()?;
        }
        let b = be.mark()?;
        let t = be.elapsed_s(&a, &b)?;
        if t < target_s && n < 1 << 16 {
            n *= 2;
            continue;
        }
        best = best.min(t / n as f64);
        groups += 1;
    }
    Ok(best)
}

/// A buffer of `len` random values of unit variance (uniform on ±√3), as
/// the model's normalized activations and projections are: some kernels'
/// speed depends on their inputs (exponentials that underflow, tanh's
/// ranges on a CPU). Each buffer gets its own values. A buffer over
/// [`TILE`] values repeats a random tile of its own, copied on the device:
/// drawing and uploading gigabytes of decode caches from the host would
/// take minutes, and no kernel's speed depends on values that far apart.
fn pattern<B: Backend>(be: &B, len: usize) -> Result<B::Buf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut rng = crate::workload::Rng::new(NEXT.fetch_add(1, Ordering::Relaxed));
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * 3f64.sqrt()) as f32).collect() };
    let Some(cols) = tile_cols(len) else { return be.upload(&draw(len)) };
    let rows = len / cols;
    let tile_rows = TILE / cols;
    let tile = be.upload(&draw(tile_rows * cols))?;
    let mut out = be.empty(len)?;
    let copies: Vec<RowCopy> = (0..rows).step_by(tile_rows).map(|dst| RowCopy { src: 0, dst, len: tile_rows.min(rows - dst) }).collect();
    be.copy_rows(&mut out, cols, &tile, &copies)?;
    Ok(out)
}

/// Values of the random tile a large [`pattern`] repeats.
const TILE: usize = 1 << 24;

/// The row width a buffer of `len` values is tiled in: a divisor of `len`
/// of 4096 to 65536 values, so that whole rows tile it, or `None` (drawn on
/// the host) when `len` is at most [`TILE`] or has no such divisor.
fn tile_cols(len: usize) -> Option<usize> {
    if len <= TILE {
        return None;
    }
    (12..=16).rev().map(|b| 1usize << b).find(|c| len % c == 0).or_else(|| (4096..=65536).rev().find(|c| len % c == 0))
}

/// Copies of a `len`-element buffer enough to exceed `cold` bytes (at most 64).
fn copies<B: Backend>(be: &B, len: usize, elem: usize, cold: usize) -> Result<Vec<B::Buf>> {
    let n = cold.div_ceil((len * elem).max(1)).clamp(1, 64);
    (0..n).map(|_| pattern(be, len)).collect()
}

/// The last operation `op` issues, as the shape backend records it.
fn recorded(dtype: Dtype, op: impl FnOnce(&ShapeBackend) -> Result<()>) -> Result<Option<OpRecord>> {
    let s = ShapeBackend::new(dtype);
    op(&s)?;
    Ok(s.recorder().take().into_iter().rev().find_map(|e| if let Entry::Op(o) = e { Some(o) } else { None }))
}

/// The FLOPs and the bytes read and written the shape backend records for
/// the last operation `op` issues.
fn work(dtype: Dtype, op: impl FnOnce(&ShapeBackend) -> Result<()>) -> Result<(f64, f64, f64)> {
    Ok(recorded(dtype, op)?.map_or((0.0, 0.0, 0.0), |o| (o.flops, o.bytes_read as f64, o.bytes_written as f64)))
}

/// Compute tables of `be` (whose values are `dtype`) for attention of
/// `heads × head_dim` queries over `kv_heads` K/V heads.
pub fn measure_compute<B: Backend>(be: &B, dtype: Dtype, grid: &Grid, heads: usize, kv_heads: usize, head_dim: usize, say: &mut dyn FnMut(&str)) -> Result<Calibration> {
    let e = dtype.size_bytes();
    let mut c = Calibration { dtype, heads, kv_heads, head_dim, ..Default::default() };
    let fits = |elems: usize| elems * e <= grid.max_buffer;
    for &k in &grid.gemm_k {
        let ws: Vec<Vec<B::Buf>> = grid.gemm_n.iter().map(|&n| copies(be, k * n, e, grid.cold_bytes)).collect::<Result<_>>()?;
        for &m in &grid.gemm_m {
            if !fits(m * k) {
                continue;
            }
            let x = pattern(be, m * k)?;
            for (&n, w) in grid.gemm_n.iter().zip(&ws) {
                if !fits(m * n) {
                    continue;
                }
                let mut i = 0;
                let s = time(be, grid.target_s, || {
                    i = (i + 1) % w.len();
                    be.matmul(&x, &w[i], m, k, n).map(|_| ())
                })?;
                c.gemm.push([m as f64, k as f64, n as f64, s]);
            }
        }
        say(&format!("gemm k={k} done"));
    }
    let (width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    for &sq in &grid.prefill_sq {
        for &off in &grid.prefill_offset {
            let skv = off + sq;
            if !fits(skv * width) {
                continue;
            }
            let shape = PrefillShape { nseq: 1, sq, skv, kv_seq_stride: skv, heads, kv_heads, head_dim, q_offset: off };
            let (q, k, v) = (pattern(be, sq * width)?, pattern(be, skv * kv_width)?, pattern(be, skv * kv_width)?);
            let s = time(be, grid.target_s, || be.attention_prefill(&q, &k, &v, shape).map(|_| ()))?;
            let (flops, _, _) = work(dtype, |sb| sb.attention_prefill(&sb.zeros(sq * width)?, &sb.zeros(skv * kv_width)?, &sb.zeros(skv * kv_width)?, shape).map(|_| ()))?;
            c.prefill.push([sq as f64, off as f64, flops, s]);
        }
    }
    say("prefill attention done");
    for &nseq in &grid.decode_nseq {
        for &len in &grid.decode_len {
            if !fits(nseq * len * kv_width) {
                continue;
            }
            let shape = DecodeShape { nseq, cap: len, len, heads, kv_heads, head_dim };
            let q = pattern(be, nseq * width)?;
            let caches: Vec<B::Buf> = (0..2 * grid.cache_copies).map(|_| pattern(be, nseq * len * kv_width)).collect::<Result<_>>()?;
            let n = caches.len();
            let mut i = 0;
            let s = time(be, grid.target_s, || {
                i = (i + 1) % n;
                be.attention_decode(&q, &caches[i], &caches[(i + 1) % n], shape).map(|_| ())
            })?;
            let (_, read, _) = work(dtype, |sb| sb.attention_decode(&sb.zeros(nseq * width)?, &sb.zeros(nseq * len * kv_width)?, &sb.zeros(nseq * len * kv_width)?, shape).map(|_| ()))?;
            c.decode.push([nseq as f64, len as f64, read, s]);
        }
    }
    say("decode attention done");
    let cols = 4096.min(grid.bytes[0] / e).max(16);
    for &bytes in &grid.bytes {
        let len = (bytes / e).max(cols);
        let rows = len / cols;
        let len = rows * cols;
        let (x, y, g) = (pattern(be, len)?, pattern(be, len)?, pattern(be, cols)?);
        let runs = [RowRun::new(0, rows)];
        let mut acc = pattern(be, len)?;
        let mut points: Vec<(&str, f64, f64)> = Vec::new();
        let s = time(be, grid.target_s, || be.rmsnorm(&x, &g, rows, cols, 1e-6).map(|_| ()))?;
        let (_, r, w) = work(dtype, |sb| sb.rmsnorm(&sb.zeros(len)?, &sb.zeros(cols)?, rows, cols, 1e-6).map(|_| ()))?;
        points.push(("rmsnorm", r + w, s));
        let s = time(be, grid.target_s, || be.add_assign(&mut acc, &y))?;
        let (_, r, w) = work(dtype, |sb| sb.add_assign(&mut sb.zeros(len)?, &sb.zeros(len)?))?;
        points.push(("elementwise", r + w, s));
        // GELU and the embedding's positions are compute on a CPU (tanh,
        // sin/cos per element). GELU runs in place, so each call first
        // restores fresh inputs with a copy, whose own time is taken off.
        let restore = time(be, grid.target_s, || be.scatter_rows(&mut acc, cols, &runs, &x))?;
        let both = time(be, grid.target_s, || {
            be.scatter_rows(&mut acc, cols, &runs, &x)?;
            be.gelu(&mut acc)
        })?;
        let (_, r, w) = work(dtype, |sb| sb.gelu(&mut sb.zeros(len)?))?;
        points.push(("gelu", r + w, (both - restore).max(both * 0.05)));
        // Tokens spread over a table of 1024 rows, as prompts spread over the vocabulary.
        let table = pattern(be, 1024 * cols)?;
        let tokens: Vec<u32> = (0..rows as u32).map(|i| i.wrapping_mul(2_654_435_761) % 1024).collect();
        let s = time(be, grid.target_s, || be.embed(&table, cols, &tokens, 1, rows, 0).map(|_| ()))?;
        let (_, r, w) = work(dtype, |sb| sb.embed(&sb.zeros(1024 * cols)?, cols, &tokens, 1, rows, 0).map(|_| ()))?;
        points.push(("embed", r + w, s));
        let s = time(be, grid.target_s, || be.gather_rows(&x, cols, &runs).map(|_| ()))?;
        let (_, r, w) = work(dtype, |sb| sb.gather_rows(&sb.zeros(len)?, cols, &runs).map(|_| ()))?;
        points.push(("copy", r + w, s));
        let s = time(be, grid.target_s, || be.zeros(len).map(|_| ()))?;
        points.push(("zeros", (len * e) as f64, s));
        for (kind, moved, s) in points {
            c.bandwidth.entry(kind.to_string()).or_default().push([moved, s]);
        }
    }
    say("bandwidth done");
    Ok(c)
}

/// The contention probes: a few operations of each class the cost model
/// scales, timed on this rank (`(class, seconds)`). Timed once with the
/// other ranks asleep and once with every rank running them at the same
/// time, they give how much ranks that share a node slow each other.
pub fn contention_probes<B: Backend>(be: &B, grid: &Grid, heads: usize, kv_heads: usize, head_dim: usize) -> Result<Vec<(&'static str, f64)>> {
    let (kn, mid) = (*grid.gemm_k.last().unwrap_or(&256), grid.gemm_m[grid.gemm_m.len() / 2]);
    let mut out = Vec::new();
    for (m, k, n) in [(grid.gemm_m[1], kn, kn), (mid, kn, kn)] {
        let (x, w) = (pattern(be, m * k)?, pattern(be, k * n)?);
        out.push(("gemm", time(be, grid.target_s, || be.matmul(&x, &w, m, k, n).map(|_| ()))?));
    }
    let (width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let sq = grid.prefill_sq[grid.prefill_sq.len() / 2];
    let shape = PrefillShape { nseq: 1, sq, skv: sq, kv_seq_stride: sq, heads, kv_heads, head_dim, q_offset: 0 };
    let (q, k, v) = (pattern(be, sq * width)?, pattern(be, sq * kv_width)?, pattern(be, sq * kv_width)?);
    out.push(("attention_prefill", time(be, grid.target_s, || be.attention_prefill(&q, &k, &v, shape).map(|_| ()))?));
    let len = grid.decode_len[grid.decode_len.len() / 2];
    let ds = DecodeShape { nseq: grid.decode_nseq[1], cap: len, len, heads, kv_heads, head_dim };
    let (qd, kc, vc) = (pattern(be, ds.nseq * width)?, pattern(be, ds.nseq * len * kv_width)?, pattern(be, ds.nseq * len * kv_width)?);
    out.push(("attention_decode", time(be, grid.target_s, || be.attention_decode(&qd, &kc, &vc, ds).map(|_| ()))?));
    let bytes = grid.bytes[grid.bytes.len() / 2] / 4;
    let (mut acc, y) = (pattern(be, bytes)?, pattern(be, bytes)?);
    out.push(("bandwidth", time(be, grid.target_s, || be.add_assign(&mut acc, &y))?));
    out.push(("bandwidth", time(be, grid.target_s, || be.gelu(&mut acc))?));
    Ok(out)
}

/// One decode layer of a model without its attention, for `m` rows: norm,
/// QKV projection and split, output projection, residual, norm, FFN,
/// residual. Both overhead measurements issue it, on the backend measured
/// and on the shape-only backend (for the bytes and operations it counts).
struct LayerChain<Bk: Backend> {
    dims: (usize, usize, usize, usize),
    x: Bk::Buf,
    g: Bk::Buf,
    wq: Bk::Buf,
    wo: Bk::Buf,
    wu: Bk::Buf,
    wd: Bk::Buf,
    o: Bk::Buf,
}

impl<Bk: Backend> LayerChain<Bk> {
    fn new(model: &crate::model::ModelConfig, m: usize, fill: impl Fn(usize) -> Result<Bk::Buf>) -> Result<Self> {
        let (d, a, f) = (model.d_model, model.attn_width(), model.ffn);
        Ok(Self { dims: (m, d, a, f), x: fill(m * d)?, g: fill(d)?, wq: fill(d * 3 * a)?, wo: fill(a * d)?, wu: fill(d * f)?, wd: fill(f * d)?, o: fill(m * a)? })
    }

    fn issue(&self, be: &Bk) -> Result<()> {
        let (m, d, a, f) = self.dims;
        let h = be.rmsnorm(&self.x, &self.g, m, d, 1e-6)?;
        let qkv = be.matmul(&h, &self.wq, m, d, 3 * a)?;
        be.split_qkv(&qkv, m, a)?;
        let p = be.matmul(&self.o, &self.wo, m, a, d)?;
        let mut r = be.gather_rows(&self.x, d, &[RowRun::new(0, m)])?;
        be.add_assign(&mut r, &p)?;
        let h2 = be.rmsnorm(&r, &self.g, m, d, 1e-6)?;
        let mut up = be.matmul(&h2, &self.wu, m, d, f)?;
        be.gelu(&mut up)?;
        let dn = be.matmul(&up, &self.wd, m, f, d)?;
        be.add_assign(&mut r, &dn)
    }
}

/// The operations and bytes (read + written) the shape-only backend records for one chain.
fn chain_work(dtype: Dtype, model: &crate::model::ModelConfig, m: usize) -> Result<(usize, u64)> {
    let sb = ShapeBackend::new(dtype);
    let chain = LayerChain::new(model, m, |n| sb.zeros(n))?;
    sb.recorder().take();
    chain.issue(&sb)?;
    let ops: Vec<u64> = sb.recorder().take().iter().filter_map(|e| if let Entry::Op(o) = e { Some(o.bytes_read + o.bytes_written) } else { None }).collect();
    Ok((ops.len(), ops.iter().sum()))
}

/// What a sequence of different operations costs beyond its operations
/// each timed on their own, per byte they move (s/byte): one decode layer of
/// `model` for four sequences ([`LayerChain`]), run as a chain and op by op.
/// A run issues operations in such sequences, each finding its inputs less
/// warm than a loop of its own leaves them; the cost grows with the data
/// each moves.
pub fn sequence_overhead<B: Backend>(be: &B, dtype: Dtype, grid: &Grid, model: &crate::model::ModelConfig) -> Result<f64> {
    let m = 4;
    let c = LayerChain::new(model, m, |n| pattern(be, n))?;
    let (d, a, f) = (model.d_model, model.attn_width(), model.ffn);
    let together = time(be, grid.target_s, || c.issue(be))?;
    let mut acc = pattern(be, m * d)?;
    let mut alone = 0.0;
    alone += time(be, grid.target_s, || be.rmsnorm(&c.x, &c.g, m, d, 1e-6).map(|_| ()))? * 2.0;
    alone += time(be, grid.target_s, || be.matmul(&c.x, &c.wq, m, d, 3 * a).map(|_| ()))?;
    let qkv0 = pattern(be, m * 3 * a)?;
    alone += time(be, grid.target_s, || be.split_qkv(&qkv0, m, a).map(|_| ()))?;
    alone += time(be, grid.target_s, || be.matmul(&c.o, &c.wo, m, a, d).map(|_| ()))?;
    alone += time(be, grid.target_s, || be.gather_rows(&c.x, d, &[RowRun::new(0, m)]).map(|_| ()))?;
    alone += time(be, grid.target_s, || be.add_assign(&mut acc, &c.x))? * 2.0;
    alone += time(be, grid.target_s, || be.matmul(&c.x, &c.wu, m, d, f).map(|_| ()))?;
    let mut up = pattern(be, m * f)?;
    alone += time(be, grid.target_s, || be.gelu(&mut up))?;
    alone += time(be, grid.target_s, || be.matmul(&up, &c.wd, m, f, d).map(|_| ()))?;
    let (_, bytes) = chain_work(dtype, model, m)?;
    Ok(((together - alone) / bytes.max(1) as f64).max(0.0))
}

/// What the decode loop costs beyond its operations, measured the way the
/// runner steps (`runner::run_batch`): the step scalars set, the step
/// replayed (or run, where the backend cannot record), the leader's tokens
/// sampled from `[1, vocab]` logits and downloaded.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoopOverhead {
    /// Seconds per step beyond the device time the cost model charges its
    /// operations (from `c`'s tables): the host's turn between steps.
    pub step_s: f64,
    /// Recording a step: `record_s + record_per_op_s · operations` beyond
    /// replaying it (0 where the backend does not record).
    pub record_s: f64,
    pub record_per_op_s: f64,
}

/// Steps of each timed loop of [`loop_overhead`], and its repeats (the fastest counts).
const LOOP_STEPS: usize = 50;
const LOOP_REPEATS: usize = 5;

/// Measures [`LoopOverhead`] on `be` against the tables of `c` (the
/// step's operations priced by its tables, as the planner prices them).
pub fn loop_overhead<B: Backend>(be: &B, dtype: Dtype, c: &Calibration, model: &crate::model::ModelConfig) -> Result<LoopOverhead> {
    const WIDTH: usize = 4096;
    let vocab = model.vocab;
    let (mut x, y, logits) = (pattern(be, WIDTH)?, pattern(be, WIDTH)?, pattern(be, vocab)?);
    let vars = crate::backend::StepVars { pos: 0, store_at: None, len: 1, tokens: vec![0] };
    // What `issue` issues, recorded as one step (None where the backend cannot record).
    let record = |issue: &mut dyn FnMut() -> Result<()>| -> Result<Option<B::Graph>> {
        if !be.capture_begin()? {
            return Ok(None);
        }
        let issued = issue();
        let graph = be.capture_end();
        issued?;
        graph.map(Some)
    };
    // One step as the runner takes it: the scalars, the step (replayed, else issued), the sampled tokens.
    let step = |graph: Option<&B::Graph>, issue: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        be.set_step(&vars)?;
        match graph {
            Some(g) => be.replay(g)?,
            None => issue()?,
        }
        be.argmax(&logits, 1, vocab).map(|_| ())
    };
    // A batch's first step as the runner takes it: the scalars, then the
    // step recorded, replayed and sampled. The recording is returned, so
    // that dropping it stays out of the caller's timing, as in a run.
    let first_step = |issue: &mut dyn FnMut() -> Result<()>| -> Result<Option<B::Graph>> {
        be.set_step(&vars)?;
        let Some(g) = record(issue)? else { return Ok(None) };
        be.replay(&g)?;
        be.argmax(&logits, 1, vocab)?;
        Ok(Some(g))
    };
    // Host seconds of `each` per step, over one timed loop.
    let per_loop = |each: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let t = std::time::Instant::now();
        for _ in 0..LOOP_STEPS {
            each()?;
        }
        Ok(t.elapsed().as_secs_f64() / LOOP_STEPS as f64)
    };
    // The fastest of the repeated loops.
    let per_step = |each: &mut dyn FnMut() -> Result<()>| -> Result<f64> { (0..LOOP_REPEATS).try_fold(f64::INFINITY, |best, _| Ok(best.min(per_loop(each)?))) };
    // The host's turn: a step of one small addition, beyond what the tables charge it and the sampling.
    let mut small = || be.add_assign(&mut x, &y);
    let graph = record(&mut small)?;
    step(graph.as_ref(), &mut small)?;
    let one = per_step(&mut || step(graph.as_ref(), &mut small))?;
    let tables = super::cost::Tables::from(c);
    let charged = |op: &dyn Fn(&ShapeBackend) -> Result<()>| -> Result<f64> { Ok(recorded(dtype, op)?.and_then(|o| tables.seconds(&o)).unwrap_or(0.0)) };
    let add = charged(&|sb| sb.add_assign(&mut sb.zeros(WIDTH)?, &sb.zeros(WIDTH)?))?;
    let argmax = charged(&|sb| sb.argmax(&sb.zeros(vocab)?, 1, vocab).map(|_| ()))?;
    let mut out = LoopOverhead { step_s: (one - add - argmax).max(0.0), ..Default::default() };
    // Recording: a first step (record, replay, sample) against a steady
    // one, of one and of four decode layers of the model (without
    // attention): recording issues each operation as a run does (the
    // strategy's host work, the library calls, the arena), with the device
    // idle meanwhile, then instantiates the graph.
    let chain = LayerChain::new(model, 1, |n| pattern(be, n))?;
    let (chain_ops, _) = chain_work(dtype, model, 1)?;
    let replayed = |layers: usize| -> Result<Option<(f64, f64)>> {
        let mut issue = || (0..layers).try_for_each(|_| chain.issue(be));
        let Some(graph) = record(&mut issue)? else { return Ok(None) };
        let (mut first, mut steady) = (f64::INFINITY, f64::INFINITY);
        // Each repeat is a batch's decode: a first step, then steady ones.
        // First steps back to back, with no steady loop between them,
        // measured far less on an H200 than the runs' first steps showed
        // (docs/perf-notes.md, session 13).
        for _ in 0..LOOP_REPEATS {
            let t = std::time::Instant::now();
            let Some(_recorded) = first_step(&mut issue)? else { return Ok(None) };
            first = first.min(t.elapsed().as_secs_f64());
            steady = steady.min(per_loop(&mut || step(Some(&graph), &mut issue))?);
        }
        Ok(Some((first, steady)))
    };
    let (few, many) = (1usize, 4usize);
    if let (Some(f), Some(m)) = (replayed(few)?, replayed(many)?) {
        (out.record_s, out.record_per_op_s) = recording_fit((few * chain_ops, f), (many * chain_ops, m));
    }
    Ok(out)
}

/// Recording's cost as a fixed part and a part per operation, `(record_s,
/// record_per_op_s)`, from two steps of `ops` operations each timed as
/// `(first, steady)` seconds: the line through their excesses, neither part
/// below zero.
pub fn recording_fit((ops_a, (first_a, steady_a)): (usize, (f64, f64)), (ops_b, (first_b, steady_b)): (usize, (f64, f64))) -> (f64, f64) {
    let (ra, rb) = ((first_a - steady_a).max(0.0), (first_b - steady_b).max(0.0));
    let per_op = ((rb - ra) / (ops_b as f64 - ops_a as f64)).max(0.0);
    ((ra - ops_a as f64 * per_op).max(0.0), per_op)
}

/// Slowdown per class: the median of `together / alone` over its probes.
pub fn contention(alone: &[(&'static str, f64)], together: &[(&'static str, f64)]) -> BTreeMap<String, f64> {
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for ((class, a), (_, t)) in alone.iter().zip(together) {
        by.entry(class.to_string()).or_default().push(t / a);
    }
    by.into_iter()
        .map(|(c, mut v)| {
            v.sort_by(f64::total_cmp);
            (c, v[v.len() / 2].max(1.0))
        })
        .collect()
}

/// Communication tables over `world` (collective: every rank calls it).
pub fn measure_comm<B: Backend>(be: &B, comm: &Comm<'_, B>, world: &Group, grid: &Grid, c: &mut Calibration) -> crate::comm::Result<()> {
    let n = world.size();
    let me = world.rank();
    let elem = be.size_bytes(&be.zeros(1)?);
    let per_call = |comm: &Comm<'_, B>, cat: Category| -> crate::comm::Result<(f64, u64)> {
        let (st, _) = comm.take_stats()?;
        Ok(st.by_category.get(&cat).map_or((0.0, 0), |s| (s.seconds / s.calls.max(1) as f64, s.bytes / s.calls.max(1))))
    };
    let mut measure = |kind: &str, cat: Category, op: &mut dyn FnMut() -> crate::comm::Result<()>| -> crate::comm::Result<()> {
        op()?;
        be.synchronize()?;
        comm.take_stats()?;
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..7 {
            op()?;
            let (t, b) = per_call(comm, cat)?;
            times.push(t);
            bytes = b;
        }
        times.sort_by(f64::total_cmp);
        let ranks = if kind == "send_recv" { 2 } else { n };
        c.comm.entry(kind.to_string()).or_default().push([ranks as f64, bytes as f64, times[times.len() / 2]]);
        Ok(())
    };
    for &bytes in &grid.comm_bytes {
        let len = (bytes / elem).max(1);
        let mut buf = pattern(be, len)?;
        measure("all_reduce", Category::TpAllreduce, &mut || comm.all_reduce(Category::TpAllreduce, world, &mut buf))?;
        let src = pattern(be, (len / n).max(1))?;
        measure("all_gather", Category::KvReplication, &mut || comm.all_gather(Category::KvReplication, world, &src).map(|_| ()))?;
        measure("broadcast", Category::AttentionSync, &mut || comm.broadcast(Category::AttentionSync, world, 0, &mut buf))?;
        measure("send_recv", Category::PpP2p, &mut || match me {
            0 => comm.send(Category::PpP2p, world, 1, &buf),
            1 => comm.recv_into(Category::PpP2p, world, 0, &mut buf),
            _ => Ok(()),
        })?;
    }
    for tokens in [1usize, 64, 1024] {
        let mut t = vec![0u32; tokens];
        measure("host", Category::Control, &mut || comm.broadcast_tokens(Category::Control, world, 0, &mut t))?;
    }
    // Only rank 0's rows are written; rank 1 measured the receiving side.
    if me != 0 {
        c.comm.clear();
    }
    Ok(())
}

#[cfg(test)]
#[path = "calibrate_tests.rs"]
mod tests;
