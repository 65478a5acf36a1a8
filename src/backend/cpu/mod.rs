//! The f32 CPU backend: every operation in plain f32 loops, used for tests,
//! the tiny demo model, CI, and as the single-rank model that strategies are
//! verified against. GEMMs go through `matrixmultiply`; everything else is
//! kept simple enough to read as the definition of the operation. Its
//! kernels are checked like the CUDA ones, against the f64 definitions in
//! `checks::reference` (`tests/kernels.rs`).

mod attention;
mod experts;
#[cfg(test)]
mod tests;

use super::{Backend, BackendError, DecodeShape, PrefillShape, QkvSplit, Result, RowRun, StepVars};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The CPU backend (single-threaded per rank: one MPI rank per core).
///
/// It cannot record device work, so decode steps always run eagerly; the
/// step scalars live on the host.
#[derive(Debug, Default)]
pub struct CpuBackend {
    step: Mutex<StepVars>,
    /// Outputs start as NaN instead of zero (see [`Backend::set_poison_outputs`]).
    poison: AtomicBool,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }
    fn step(&self) -> StepVars {
        self.step.lock().expect("step lock").clone()
    }
    /// A new output buffer of `len` elements: zeros, or NaN while poisoning
    /// is on, so an element an operation does not write cannot pass a check.
    fn output(&self, len: usize) -> Vec<f32> {
        vec![if self.poison.load(Ordering::Relaxed) { f32::NAN } else { 0.0 }; len]
    }
}

fn check(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(BackendError::Shape(format!("{what}: buffer holds {have} elements, needs {need}")));
    }
    Ok(())
}

/// What `capture_end` and `replay` answer: `capture_begin` never starts a recording.
fn cannot_record() -> BackendError {
    BackendError::Unavailable { backend: "cpu", reason: "the CPU backend cannot record device work".into() }
}

/// Sinusoidal absolute position encoding value for `(pos, dim)` of a `d`-wide model.
pub fn sinusoid(pos: usize, dim: usize, d: usize) -> f32 {
    let i = (dim / 2) as f64;
    let freq = 1.0 / 10000f64.powf(2.0 * i / d as f64);
    let angle = pos as f64 * freq;
    if dim % 2 == 0 {
        angle.sin() as f32
    } else {
        angle.cos() as f32
    }
}

/// GELU, tanh approximation (as GPT-2 and Megatron use).
pub fn gelu_scalar(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// SiLU, `x · sigmoid(x)`.
pub fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Mark = Instant;
    type Graph = ();

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn size_bytes(&self, buf: &Vec<f32>) -> usize {
        buf.len() * 4
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn zeros_f32(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn set_poison_outputs(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }
    fn poison_outputs(&self) -> bool {
        self.poison.load(Ordering::Relaxed)
    }

    fn embed(&self, table: &Vec<f32>, d: usize, tokens: &[u32], nseq: usize, n: usize, pos0: usize) -> Result<Vec<f32>> {
        check("embed tokens", tokens.len(), nseq * n)?;
        let mut out = self.output(nseq * n * d);
        for (row, &tok) in tokens[..nseq * n].iter().enumerate() {
            let base = tok as usize * d;
            check("embedding table", table.len(), base + d)?;
            let pos = pos0 + row % n;
            for c in 0..d {
                out[row * d + c] = table[base + c] + sinusoid(pos, c, d);
            }
        }
        Ok(out)
    }

    fn matmul(&self, x: &Vec<f32>, w: &Vec<f32>, m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
        check("matmul x", x.len(), m * k)?;
        check("matmul w", w.len(), k * n)?;
        // beta = 0: sgemm overwrites every element of `out` (k = 0 included).
        let mut out = self.output(m * n);
        if m == 0 || n == 0 {
            return Ok(out);
        }
        // SAFETY: the slices hold at least m*k, k*n and m*n elements (checked
        // above) and the strides describe dense row-major matrices.
        unsafe {
            matrixmultiply::sgemm(m, k, n, 1.0, x.as_ptr(), k as isize, 1, w.as_ptr(), n as isize, 1, 0.0, out.as_mut_ptr(), n as isize, 1);
        }
        Ok(out)
    }

    fn rmsnorm(&self, x: &Vec<f32>, weight: &Vec<f32>, rows: usize, cols: usize, eps: f32) -> Result<Vec<f32>> {
        check("rmsnorm x", x.len(), rows * cols)?;
        check("rmsnorm weight", weight.len(), cols)?;
        let mut out = self.output(rows * cols);
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / cols as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for c in 0..cols {
                out[r * cols + c] = xr[c] * inv * weight[c];
            }
        }
        Ok(out)
    }

    fn gelu(&self, x: &mut Vec<f32>) -> Result<()> {
        x.iter_mut().for_each(|v| *v = gelu_scalar(*v));
        Ok(())
    }

    fn gelu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<()> {
        check("gelu_mul up", up.len(), gate.len())?;
        gate.iter_mut().zip(up).for_each(|(g, u)| *g = gelu_scalar(*g) * u);
        Ok(())
    }

    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        check("add_assign y", y.len(), x.len())?;
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<()> {
        check("silu_mul up", up.len(), gate.len())?;
        gate.iter_mut().zip(up).for_each(|(g, u)| *g = silu_scalar(*g) * u);
        Ok(())
    }

    fn split_qkv_rope(&self, qkv: &Vec<f32>, rows: usize, split: &QkvSplit) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (qw, kw) = (split.q_width, split.kv_width);
        let width = qw + 2 * kw;
        check("split_qkv", qkv.len(), rows * width)?;
        let mut parts = [self.output(rows * qw), self.output(rows * kw), self.output(rows * kw)];
        let offsets = [(0, qw), (qw, kw), (qw + kw, kw)];
        for r in 0..rows {
            for (part, &(at, w)) in parts.iter_mut().zip(&offsets) {
                part[r * w..(r + 1) * w].copy_from_slice(&qkv[r * width + at..r * width + at + w]);
            }
        }
        let [mut q, mut k, v] = parts;
        if let Some(rope) = &split.rope {
            let pos = self.step().pos;
            attention::rotate(&mut q, rows, qw, rope, pos)?;
            attention::rotate(&mut k, rows, kw, rope, pos)?;
        }
        Ok((q, k, v))
    }

    fn gather_rows(&self, src: &Vec<f32>, cols: usize, runs: &[RowRun]) -> Result<Vec<f32>> {
        let total: usize = runs.iter().map(|r| r.len).sum();
        let mut out = Vec::with_capacity(total * cols);
        for run in runs {
            check("gather_rows", src.len(), (run.start + run.len) * cols)?;
            out.extend_from_slice(&src[run.start * cols..(run.start + run.len) * cols]);
        }
        Ok(out)
    }

    fn scatter_rows(&self, dst: &mut Vec<f32>, cols: usize, runs: &[RowRun], src: &Vec<f32>) -> Result<()> {
        let mut at = 0;
        for run in runs {
            check("scatter_rows dst", dst.len(), (run.start + run.len) * cols)?;
            check("scatter_rows src", src.len(), (at + run.len) * cols)?;
            dst[run.start * cols..(run.start + run.len) * cols].copy_from_slice(&src[at * cols..(at + run.len) * cols]);
            at += run.len;
        }
        Ok(())
    }

    fn attention_prefill(&self, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, s: PrefillShape) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut out = self.output(s.nseq * s.sq * s.heads * s.head_dim);
        let mut lse = self.output(s.nseq * s.heads * s.sq);
        attention::prefill(q, k, v, s, &mut out, &mut lse)?;
        Ok((out, lse))
    }

    fn attention_decode(&self, q: &Vec<f32>, k_cache: &Vec<f32>, v_cache: &Vec<f32>, s: DecodeShape) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut out = self.output(s.nseq * s.heads * s.head_dim);
        let mut lse = self.output(s.nseq * s.heads);
        attention::decode(q, k_cache, v_cache, s, &mut out, &mut lse)?;
        Ok((out, lse))
    }

    fn merge_partials(&self, o: &mut Vec<f32>, lse: &mut Vec<f32>, o2: &Vec<f32>, lse2: &Vec<f32>, rows: usize, head_dim: usize) -> Result<()> {
        check("merge o", o.len(), rows * head_dim)?;
        check("merge o2", o2.len(), rows * head_dim)?;
        check("merge lse", lse.len(), rows)?;
        check("merge lse2", lse2.len(), rows)?;
        for r in 0..rows {
            let (a, b) = (lse[r], lse2[r]);
            let m = a.max(b);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let (wa, wb) = ((a - m).exp(), (b - m).exp());
            let sum = wa + wb;
            for c in 0..head_dim {
                let i = r * head_dim + c;
                o[i] = (wa * o[i] + wb * o2[i]) / sum;
            }
            lse[r] = m + sum.ln();
        }
        Ok(())
    }

    fn argmax(&self, logits: &Vec<f32>, rows: usize, cols: usize) -> Result<Vec<u32>> {
        check("argmax", logits.len(), rows * cols)?;
        Ok((0..rows)
            .map(|r| {
                let row = &logits[r * cols..(r + 1) * cols];
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect())
    }

    fn router_top_k(&self, logits: &Vec<f32>, rows: usize, experts: usize, k: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        experts::router_top_k(self, logits, rows, experts, k)
    }
    fn expert_slots(&self, ids: &Vec<f32>, assignments: usize, experts: usize, capacity: Option<usize>) -> Result<(Vec<f32>, Vec<usize>)> {
        experts::expert_slots(self, ids, assignments, experts, capacity)
    }
    fn permute_to_experts(&self, x: &Vec<f32>, cols: usize, slots: &Vec<f32>, rows: usize, k: usize, kept: usize) -> Result<Vec<f32>> {
        experts::permute_to_experts(self, x, cols, slots, rows, k, kept)
    }
    fn combine_from_experts(&self, y: &Vec<f32>, cols: usize, slots: &Vec<f32>, weights: &Vec<f32>, rows: usize, k: usize) -> Result<Vec<f32>> {
        experts::combine_from_experts(self, y, cols, slots, weights, rows, k)
    }
    fn grouped_matmul(&self, x: &Vec<f32>, w: &Vec<f32>, groups: &[usize], k: usize, n: usize) -> Result<Vec<f32>> {
        experts::grouped_matmul(self, x, w, groups, k, n)
    }

    fn set_step(&self, vars: &StepVars) -> Result<()> {
        *self.step.lock().expect("step lock") = vars.clone();
        Ok(())
    }

    fn embed_step(&self, table: &Vec<f32>, d: usize, nseq: usize) -> Result<Vec<f32>> {
        let s = self.step();
        self.embed(table, d, &s.tokens, nseq, 1, s.pos)
    }

    fn embed_step_tokens(&self, table: &Vec<f32>, d: usize, nseq: usize) -> Result<Vec<f32>> {
        let s = self.step();
        check("embed_step_tokens tokens", s.tokens.len(), nseq)?;
        self.embed_tokens(table, d, &s.tokens[..nseq])
    }

    fn store_step(&self, cache: &mut Vec<f32>, src: &Vec<f32>, nseq: usize, cap: usize, width: usize) -> Result<()> {
        let Some(at) = self.step().store_at else { return Ok(()) };
        if at >= cap {
            return Err(BackendError::Shape(format!("store_step row {at} is outside a cache of {cap} rows")));
        }
        let runs: Vec<RowRun> = (0..nseq).map(|n| RowRun::new(n * cap + at, 1)).collect();
        self.scatter_rows(cache, width, &runs, src)
    }

    fn attention_decode_step(&self, q: &Vec<f32>, k_cache: &Vec<f32>, v_cache: &Vec<f32>, shape: DecodeShape) -> Result<(Vec<f32>, Vec<f32>)> {
        self.attention_decode(q, k_cache, v_cache, DecodeShape { len: self.step().len, ..shape })
    }

    fn capture_end(&self) -> Result<()> {
        Err(cannot_record())
    }
    fn replay(&self, _graph: &()) -> Result<()> {
        Err(cannot_record())
    }

    fn mark(&self) -> Result<Instant> {
        Ok(Instant::now())
    }
    fn elapsed_s(&self, from: &Instant, to: &Instant) -> Result<f64> {
        Ok(to.saturating_duration_since(*from).as_secs_f64())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn peak_memory_bytes(&self) -> Option<u64> {
        process_peak_rss_bytes()
    }
    fn reset_peak_memory(&self) {
        // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
}

/// Peak resident set size of this process (`VmHWM`), the CPU backend's
/// "device memory".
pub fn process_peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
