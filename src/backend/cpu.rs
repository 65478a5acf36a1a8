//! The f32 CPU backend: every operation in plain f32 loops, used for tests,
//! the tiny demo model, CI, and as the single-rank model that strategies are
//! verified against. GEMMs go through `matrixmultiply`; everything else is
//! kept simple enough to read as the definition of the operation. Its
//! kernels are checked like the CUDA ones, against the f64 definitions in
//! `checks::reference` (`tests/kernels.rs`).

mod experts;

use super::{Backend, BackendError, DecodeShape, PrefillShape, Result, RowRun, StepVars};
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

/// Softmax-weighted sum over `keys` for one query; returns the log-sum-exp.
#[allow(clippy::too_many_arguments)]
fn attend_one(q: &[f32], k: &[f32], v: &[f32], key_rows: usize, row_stride: usize, scale: f32, out: &mut [f32], scores: &mut Vec<f32>) -> f32 {
    let dh = q.len();
    if key_rows == 0 {
        out.iter_mut().for_each(|o| *o = 0.0);
        return f32::NEG_INFINITY;
    }
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for j in 0..key_rows {
        let kr = &k[j * row_stride..j * row_stride + dh];
        let s = q.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (j, p) in scores.iter().enumerate() {
        let vr = &v[j * row_stride..j * row_stride + dh];
        let w = p / sum;
        for (o, x) in out.iter_mut().zip(vr) {
            *o += w * x;
        }
    }
    max + sum.ln()
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

    fn split_qkv(&self, qkv: &Vec<f32>, rows: usize, width: usize) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        check("split_qkv", qkv.len(), rows * 3 * width)?;
        let mut parts = [self.output(rows * width), self.output(rows * width), self.output(rows * width)];
        for r in 0..rows {
            for (p, part) in parts.iter_mut().enumerate() {
                let src = r * 3 * width + p * width;
                part[r * width..(r + 1) * width].copy_from_slice(&qkv[src..src + width]);
            }
        }
        let [q, k, v] = parts;
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
        let width = s.heads * s.head_dim;
        check("prefill q", q.len(), s.nseq * s.sq * width)?;
        check("prefill k", k.len(), s.nseq * s.kv_seq_stride * width)?;
        check("prefill v", v.len(), s.nseq * s.kv_seq_stride * width)?;
        if s.skv > s.kv_seq_stride {
            return Err(BackendError::Shape(format!("prefill skv {} exceeds kv_seq_stride {}", s.skv, s.kv_seq_stride)));
        }
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let mut out = self.output(s.nseq * s.sq * width);
        let mut lse = self.output(s.nseq * s.heads * s.sq);
        let mut scores = Vec::new();
        for n in 0..s.nseq {
            for h in 0..s.heads {
                let kbase = n * s.kv_seq_stride * width + h * s.head_dim;
                for i in 0..s.sq {
                    let row = n * s.sq + i;
                    let qr = &q[row * width + h * s.head_dim..row * width + (h + 1) * s.head_dim];
                    let keys = (s.q_offset + i + 1).min(s.skv);
                    let o = &mut out[row * width + h * s.head_dim..row * width + (h + 1) * s.head_dim];
                    lse[(n * s.heads + h) * s.sq + i] = attend_one(qr, &k[kbase..], &v[kbase..], keys, width, scale, o, &mut scores);
                }
            }
        }
        Ok((out, lse))
    }

    fn attention_decode(&self, q: &Vec<f32>, k_cache: &Vec<f32>, v_cache: &Vec<f32>, s: DecodeShape) -> Result<(Vec<f32>, Vec<f32>)> {
        let width = s.heads * s.head_dim;
        check("decode q", q.len(), s.nseq * width)?;
        check("decode k cache", k_cache.len(), s.nseq * s.cap * width)?;
        check("decode v cache", v_cache.len(), s.nseq * s.cap * width)?;
        if s.len > s.cap {
            return Err(BackendError::Shape(format!("decode len {} exceeds cache capacity {}", s.len, s.cap)));
        }
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let mut out = self.output(s.nseq * width);
        let mut lse = self.output(s.nseq * s.heads);
        let mut scores = Vec::new();
        for n in 0..s.nseq {
            for h in 0..s.heads {
                let kbase = n * s.cap * width + h * s.head_dim;
                let qr = &q[n * width + h * s.head_dim..n * width + (h + 1) * s.head_dim];
                let o = &mut out[n * width + h * s.head_dim..n * width + (h + 1) * s.head_dim];
                lse[n * s.heads + h] = attend_one(qr, &k_cache[kbase..], &v_cache[kbase..], s.len, width, scale, o, &mut scores);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn matmul_matches_the_definition() {
        let be = CpuBackend::new();
        let (m, k, n) = (5, 7, 3);
        let (x, w) = (random(m * k, 1), random(k * n, 2));
        let out = be.matmul(&x, &w, m, k, n).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| x[i * k + t] * w[t * n + j]).sum();
                assert!((out[i * n + j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn rmsnorm_gives_unit_root_mean_square() {
        let be = CpuBackend::new();
        let x = random(4 * 16, 3);
        let ones = vec![1.0; 16];
        let y = be.rmsnorm(&x, &ones, 4, 16, 0.0).unwrap();
        for r in 0..4 {
            let ms: f32 = y[r * 16..(r + 1) * 16].iter().map(|v| v * v).sum::<f32>() / 16.0;
            assert!((ms - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn prefill_attention_is_causal_softmax_with_its_log_sum_exp() {
        let be = CpuBackend::new();
        let (s, h, dh) = (6, 2, 4);
        let w = h * dh;
        let (q, k, v) = (random(s * w, 4), random(s * w, 5), random(s * w, 6));
        let shape = PrefillShape { nseq: 1, sq: s, skv: s, kv_seq_stride: s, heads: h, head_dim: dh, q_offset: 0 };
        let (o, lse) = be.attention_prefill(&q, &k, &v, shape).unwrap();
        let scale = 1.0 / (dh as f32).sqrt();
        for hh in 0..h {
            for i in 0..s {
                let scores: Vec<f32> = (0..=i).map(|j| (0..dh).map(|c| q[i * w + hh * dh + c] * k[j * w + hh * dh + c]).sum::<f32>() * scale).collect();
                let z: f32 = scores.iter().map(|x| x.exp()).sum();
                assert!((lse[hh * s + i] - z.ln()).abs() < 1e-5);
                for c in 0..dh {
                    let want: f32 = scores.iter().enumerate().map(|(j, x)| x.exp() / z * v[j * w + hh * dh + c]).sum();
                    assert!((o[i * w + hh * dh + c] - want).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn a_query_block_at_an_offset_equals_those_rows_of_the_full_prefill() {
        let be = CpuBackend::new();
        let (n, s, h, dh) = (2, 10, 2, 4);
        let w = h * dh;
        let (q, k, v) = (random(n * s * w, 7), random(n * s * w, 8), random(n * s * w, 9));
        let full = be.attention_prefill(&q, &k, &v, PrefillShape { nseq: n, sq: s, skv: s, kv_seq_stride: s, heads: h, head_dim: dh, q_offset: 0 }).unwrap().0;
        let (off, len) = (4, 3);
        let runs: Vec<RowRun> = (0..n).map(|i| RowRun::new(i * s + off, len)).collect();
        let qb = be.gather_rows(&q, w, &runs).unwrap();
        let shape = PrefillShape { nseq: n, sq: len, skv: off + len, kv_seq_stride: s, heads: h, head_dim: dh, q_offset: off };
        let block = be.attention_prefill(&qb, &k, &v, shape).unwrap().0;
        close(&block, &be.gather_rows(&full, w, &runs).unwrap(), 1e-5);
    }

    #[test]
    fn merging_split_kv_partials_equals_attention_over_the_whole_cache() {
        let be = CpuBackend::new();
        let (n, cap, h, dh) = (3, 12, 2, 8);
        let w = h * dh;
        let (q, k, v) = (random(n * w, 10), random(n * cap * w, 11), random(n * cap * w, 12));
        let whole = be.attention_decode(&q, &k, &v, DecodeShape { nseq: n, cap, len: cap, heads: h, head_dim: dh }).unwrap();
        // First 5 rows of each sequence in one slice, the other 7 in another.
        let split = |start: usize, len: usize| {
            let runs: Vec<RowRun> = (0..n).map(|i| RowRun::new(i * cap + start, len)).collect();
            (be.gather_rows(&k, w, &runs).unwrap(), be.gather_rows(&v, w, &runs).unwrap())
        };
        let ((k1, v1), (k2, v2)) = (split(0, 5), split(5, 7));
        let (mut o, mut lse) = be.attention_decode(&q, &k1, &v1, DecodeShape { nseq: n, cap: 5, len: 5, heads: h, head_dim: dh }).unwrap();
        let (o2, lse2) = be.attention_decode(&q, &k2, &v2, DecodeShape { nseq: n, cap: 7, len: 7, heads: h, head_dim: dh }).unwrap();
        be.merge_partials(&mut o, &mut lse, &o2, &lse2, n * h, dh).unwrap();
        close(&o, &whole.0, 1e-5);
        close(&lse, &whole.1, 1e-5);
    }

    #[test]
    fn an_empty_slice_is_neutral_in_the_merge() {
        let be = CpuBackend::new();
        let (n, h, dh) = (2, 2, 4);
        let q = random(n * h * dh, 13);
        let kv = random(n * 4 * h * dh, 14);
        let (mut o, mut lse) = be.attention_decode(&q, &kv, &kv, DecodeShape { nseq: n, cap: 4, len: 4, heads: h, head_dim: dh }).unwrap();
        let (o0, lse0) = (o.clone(), lse.clone());
        let (oe, lsee) = be.attention_decode(&q, &kv, &kv, DecodeShape { nseq: n, cap: 4, len: 0, heads: h, head_dim: dh }).unwrap();
        assert!(lsee.iter().all(|x| *x == f32::NEG_INFINITY) && oe.iter().all(|x| *x == 0.0));
        be.merge_partials(&mut o, &mut lse, &oe, &lsee, n * h, dh).unwrap();
        assert_eq!((o, lse), (o0, lse0));
    }

    #[test]
    fn embedding_adds_sinusoidal_positions_from_pos0() {
        let be = CpuBackend::new();
        let d = 8;
        let table = random(10 * d, 15);
        let x = be.embed(&table, d, &[3, 4], 1, 2, 5).unwrap();
        for c in 0..d {
            assert!((x[c] - (table[3 * d + c] + sinusoid(5, c, d))).abs() < 1e-6);
            assert!((x[d + c] - (table[4 * d + c] + sinusoid(6, c, d))).abs() < 1e-6);
        }
        assert_eq!(sinusoid(0, 0, d), 0.0);
        assert_eq!(sinusoid(0, 1, d), 1.0);
    }

    #[test]
    fn step_operations_read_the_step_scalars() {
        let be = CpuBackend::new();
        let (nseq, cap, h, dh, d) = (2, 6, 2, 4, 8);
        let width = h * dh;
        let table = random(10 * d, 16);
        be.set_step(&StepVars { pos: 7, store_at: Some(3), len: 4, tokens: vec![9, 2] }).unwrap();
        // Embedding: the step's tokens at the step's position.
        assert_eq!(be.embed_step(&table, d, nseq).unwrap(), be.embed(&table, d, &[9, 2], nseq, 1, 7).unwrap());
        // Store: row 3 of each sequence, nothing else.
        let before = random(nseq * cap * width, 17);
        let row = random(nseq * width, 18);
        let mut cache = before.clone();
        be.store_step(&mut cache, &row, nseq, cap, width).unwrap();
        for n in 0..nseq {
            for r in 0..cap {
                let at = (n * cap + r) * width;
                let want = if r == 3 { &row[n * width..(n + 1) * width] } else { &before[at..at + width] };
                assert_eq!(&cache[at..at + width], want, "sequence {n} row {r}");
            }
        }
        // Attention: over the step's length whatever the shape says.
        let q = random(nseq * width, 19);
        let shape = DecodeShape { nseq, cap, len: 0, heads: h, head_dim: dh };
        assert_eq!(be.attention_decode_step(&q, &cache, &cache, shape).unwrap(), be.attention_decode(&q, &cache, &cache, DecodeShape { len: 4, ..shape }).unwrap());
        // A rank that owns no new row stores nothing; a row past the cache is refused.
        be.set_step(&StepVars { pos: 8, store_at: None, len: 4, tokens: vec![] }).unwrap();
        let mut untouched = cache.clone();
        be.store_step(&mut untouched, &random(nseq * width, 20), nseq, cap, width).unwrap();
        assert_eq!(untouched, cache);
        be.set_step(&StepVars { pos: 8, store_at: Some(cap), len: 4, tokens: vec![] }).unwrap();
        assert!(matches!(be.store_step(&mut untouched, &row, nseq, cap, width), Err(BackendError::Shape(_))));
        // The CPU cannot record: steps run op by op.
        assert!(!be.capture_begin().unwrap());
        assert!(be.capture_end().is_err());
    }

    #[test]
    fn poisoning_starts_new_outputs_as_nan_and_leaves_zeros_zero() {
        let be = CpuBackend::new();
        be.set_poison_outputs(true);
        assert!(be.poison_outputs() && be.output(4).iter().all(|x| x.is_nan()));
        assert_eq!(be.zeros(3).unwrap(), vec![0.0; 3]);
        // Every element of an operation's output is still written.
        let y = be.rmsnorm(&random(12, 21), &vec![1.0; 4], 3, 4, 1e-6).unwrap();
        assert!(y.iter().all(|x| x.is_finite()));
        be.set_poison_outputs(false);
        assert_eq!(be.output(2), vec![0.0; 2]);
    }

    #[test]
    fn argmax_takes_the_first_of_ties_and_shapes_are_checked() {
        let be = CpuBackend::new();
        assert_eq!(be.argmax(&vec![1.0, 3.0, 3.0, 0.0, -1.0, -2.0], 2, 3).unwrap(), vec![1, 0]);
        assert!(matches!(be.matmul(&vec![0.0; 3], &vec![0.0; 4], 2, 2, 2), Err(BackendError::Shape(_))));
    }
}
