//! Correctness checks of every CUDA kernel against the CPU reference, and
//! timings of the kernels that matter for speed.
//!
//! Each check draws fresh random inputs (never zeros), rounds them to the GPU
//! dtype by an upload/download round trip so both backends see the same
//! values, runs the op on both, and compares the outputs by relative L2 error
//! (`||gpu - cpu|| / ||cpu||`) against 1e-2 for bf16/fp16 and 1e-4 for f32.
//! Every buffer an op creates on the GPU is poisoned with NaN first, so an
//! element the kernel does not write fails the check; NaN never passes.
//! Shapes cover the tiny test model (head_dim 16) and dense-4l (32 heads of
//! 128), with rows that are not multiples of any tile, prefill blocks at a
//! query offset against a longer K/V stride, and decode at long and zero
//! lengths.
//!
//! This module must not be used by the timed paths of a run: it is for
//! kernel-validation commands (`examples/gpu_check.rs`) and tests on a GPU.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, CudaBuf, CudaRecording, PrefillKernel};
use crate::backend::{Backend, DecodeShape, Dtype, PrefillShape, RowRun, StepVars};

/// One comparison of a GPU op with the CPU reference.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckRow {
    /// Operation (and kernel variant) checked.
    pub op: String,
    /// Shape in the op's own terms.
    pub shape: String,
    pub dtype: Dtype,
    /// Relative L2 error (NaN when an output is NaN or the op failed).
    pub error: f64,
    pub tolerance: f64,
    pub pass: bool,
    /// Why a row failed without an error figure (the op returned an error).
    pub note: String,
}

/// The relative-error tolerance for a dtype.
pub fn tolerance(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::Bf16 | Dtype::Fp16 => 1e-2,
        Dtype::Fp32 => 1e-4,
    }
}

pub use crate::metrics::relative_l2;

/// Deterministic normal samples (splitmix64 + Box-Muller), so a failing
/// check can be rerun with the same inputs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

struct Checker<'a> {
    gpu: &'a CudaBackend,
    cpu: CpuBackend,
    rng: Rng,
    rows: Vec<CheckRow>,
}

type GpuResult<T> = crate::backend::Result<T>;

impl<'a> Checker<'a> {
    /// Random values uploaded in `dtype`, and the same values as the GPU holds them.
    fn input_as(&mut self, n: usize, scale: f32, dtype: Dtype) -> GpuResult<(Vec<f32>, CudaBuf)> {
        let host = self.rng.normals(n, scale);
        let buf = self.gpu.upload_as(&host, dtype)?;
        let rounded = self.gpu.download(&buf)?;
        Ok((rounded, buf))
    }

    fn input(&mut self, n: usize, scale: f32) -> GpuResult<(Vec<f32>, CudaBuf)> {
        self.input_as(n, scale, self.gpu.dtype())
    }

    fn push(&mut self, op: &str, shape: String, dtype: Dtype, outcome: GpuResult<Vec<(Vec<f32>, Vec<f32>)>>) {
        let tol = tolerance(dtype);
        let row = match outcome {
            Ok(pairs) => {
                // The worst output of the op decides.
                let error = crate::metrics::worst_error(pairs.iter().map(|(g, c)| relative_l2(g, c)));
                CheckRow { op: op.into(), shape, dtype, error, tolerance: tol, pass: error.is_finite() && error <= tol, note: String::new() }
            }
            Err(e) => CheckRow { op: op.into(), shape, dtype, error: f64::NAN, tolerance: tol, pass: false, note: e.to_string() },
        };
        self.rows.push(row);
    }

    fn embed(&mut self, vocab: usize, d: usize, nseq: usize, n: usize, pos0: usize) {
        let dt = self.gpu.dtype();
        let outcome = (|| {
            let (table, table_g) = self.input(vocab * d, 1.0)?;
            let tokens: Vec<u32> = (0..nseq * n).map(|_| (self.rng.next_u64() % vocab as u64) as u32).collect();
            let g = self.gpu.download(&self.gpu.embed(&table_g, d, &tokens, nseq, n, pos0)?)?;
            let c = self.cpu.embed(&table, d, &tokens, nseq, n, pos0)?;
            Ok(vec![(g, c)])
        })();
        self.push("embed", format!("vocab {vocab} d {d} nseq {nseq} n {n} pos0 {pos0}"), dt, outcome);
    }

    fn matmul(&mut self, m: usize, k: usize, n: usize) {
        let dt = self.gpu.dtype();
        let outcome = (|| {
            let (x, xg) = self.input(m * k, 1.0)?;
            let (w, wg) = self.input(k * n, 1.0 / (k as f32).sqrt())?;
            let g = self.gpu.download(&self.gpu.matmul(&xg, &wg, m, k, n)?)?;
            let c = self.cpu.matmul(&x, &w, m, k, n)?;
            Ok(vec![(g, c)])
        })();
        self.push("matmul", format!("[{m}x{k}]x[{k}x{n}]"), dt, outcome);
    }

    fn rmsnorm(&mut self, rows: usize, cols: usize) {
        let dt = self.gpu.dtype();
        let outcome = (|| {
            let (x, xg) = self.input(rows * cols, 1.0)?;
            let (w, wg) = self.input(cols, 1.0)?;
            let g = self.gpu.download(&self.gpu.rmsnorm(&xg, &wg, rows, cols, 1e-6)?)?;
            let c = self.cpu.rmsnorm(&x, &w, rows, cols, 1e-6)?;
            Ok(vec![(g, c)])
        })();
        self.push("rmsnorm", format!("{rows}x{cols}"), dt, outcome);
    }

    fn elementwise(&mut self, n: usize) {
        let dt = self.gpu.dtype();
        let outcome = (|| {
            let (mut x, mut xg) = self.input(n, 2.0)?;
            self.gpu.gelu(&mut xg)?;
            self.cpu.gelu(&mut x)?;
            Ok(vec![(self.gpu.download(&xg)?, x)])
        })();
        self.push("gelu", format!("n {n}"), dt, outcome);
        let outcome = (|| {
            let (mut g, mut gg) = self.input(n, 2.0)?;
            let (u, ug) = self.input(n, 1.0)?;
            self.gpu.gelu_mul(&mut gg, &ug)?;
            self.cpu.gelu_mul(&mut g, &u)?;
            Ok(vec![(self.gpu.download(&gg)?, g)])
        })();
        self.push("gelu_mul", format!("n {n}"), dt, outcome);
        let outcome = (|| {
            let (mut x, mut xg) = self.input(n, 1.0)?;
            let (y, yg) = self.input(n, 1.0)?;
            self.gpu.add_assign(&mut xg, &yg)?;
            self.cpu.add_assign(&mut x, &y)?;
            Ok(vec![(self.gpu.download(&xg)?, x)])
        })();
        self.push("add_assign", format!("n {n}"), dt, outcome);
    }

    fn split_qkv(&mut self, rows: usize, width: usize) {
        let dt = self.gpu.dtype();
        let outcome = (|| {
            let (x, xg) = self.input(rows * 3 * width, 1.0)?;
            let (qg, kg, vg) = self.gpu.split_qkv(&xg, rows, width)?;
            let (q, k, v) = self.cpu.split_qkv(&x, rows, width)?;
            Ok(vec![(self.gpu.download(&qg)?, q), (self.gpu.download(&kg)?, k), (self.gpu.download(&vg)?, v)])
        })();
        self.push("split_qkv", format!("rows {rows} width {width}"), dt, outcome);
    }

    fn gather_scatter(&mut self, src_rows: usize, cols: usize, runs: &[RowRun]) {
        let dt = self.gpu.dtype();
        let desc = runs.iter().map(|r| format!("{}+{}", r.start, r.len)).collect::<Vec<_>>().join(",");
        let outcome = (|| {
            let (x, xg) = self.input(src_rows * cols, 1.0)?;
            let g = self.gpu.download(&self.gpu.gather_rows(&xg, cols, runs)?)?;
            let c = self.cpu.gather_rows(&x, cols, runs)?;
            Ok(vec![(g, c)])
        })();
        self.push("gather_rows", format!("{src_rows}x{cols} runs {desc}"), dt, outcome);
        let outcome = (|| {
            let total: usize = runs.iter().map(|r| r.len).sum();
            let (mut d, mut dg) = self.input(src_rows * cols, 1.0)?;
            let (s, sg) = self.input(total * cols, 1.0)?;
            self.gpu.scatter_rows(&mut dg, cols, runs, &sg)?;
            self.cpu.scatter_rows(&mut d, cols, runs, &s)?;
            Ok(vec![(self.gpu.download(&dg)?, d)])
        })();
        self.push("scatter_rows", format!("{src_rows}x{cols} runs {desc}"), dt, outcome);
    }

    fn prefill(&mut self, s: PrefillShape, kernel: PrefillKernel) {
        let dt = self.gpu.dtype();
        let before = self.gpu.prefill_kernel();
        self.gpu.set_prefill_kernel(kernel);
        let outcome = (|| {
            let width = s.heads * s.head_dim;
            let (q, qg) = self.input(s.nseq * s.sq * width, 1.0)?;
            let (k, kg) = self.input(s.nseq * s.kv_seq_stride * width, 1.0)?;
            let (v, vg) = self.input(s.nseq * s.kv_seq_stride * width, 1.0)?;
            let (og, lg) = self.gpu.attention_prefill(&qg, &kg, &vg, s)?;
            let (o, l) = self.cpu.attention_prefill(&q, &k, &v, s)?;
            Ok(vec![(self.gpu.download(&og)?, o), (self.gpu.download(&lg)?, l)])
        })();
        self.gpu.set_prefill_kernel(before);
        let shape = format!("nseq {} sq {} skv {} stride {} heads {}x{} q_offset {}", s.nseq, s.sq, s.skv, s.kv_seq_stride, s.heads, s.head_dim, s.q_offset);
        self.push(&format!("attention_prefill[{}]", kernel.name()), shape, dt, outcome);
    }

    fn decode(&mut self, s: DecodeShape) {
        let dt = self.gpu.dtype();
        let outcome = (|| {
            let width = s.heads * s.head_dim;
            let (q, qg) = self.input(s.nseq * width, 1.0)?;
            let (k, kg) = self.input(s.nseq * s.cap * width, 1.0)?;
            let (v, vg) = self.input(s.nseq * s.cap * width, 1.0)?;
            let (og, lg) = self.gpu.attention_decode(&qg, &kg, &vg, s)?;
            let (o, l) = self.cpu.attention_decode(&q, &k, &v, s)?;
            Ok(vec![(self.gpu.download(&og)?, o), (self.gpu.download(&lg)?, l)])
        })();
        let shape = format!("nseq {} cap {} len {} heads {}x{}", s.nseq, s.cap, s.len, s.heads, s.head_dim);
        self.push("attention_decode", shape, dt, outcome);
    }

    /// A miniature decode step from the step scalars (embed the step's
    /// tokens, store them as the new K and V row, attend with them as the
    /// query), run eagerly, or recorded once as a graph and replayed, at
    /// several positions (one of them storing nothing, as a pool rank that
    /// does not own the step's token). Compares the outputs and the caches
    /// of every step with the CPU doing the same.
    fn decode_steps(&mut self, s: DecodeShape, vocab: usize, record: bool) {
        let dt = self.gpu.dtype();
        let width = s.heads * s.head_dim;
        let outcome = (|| {
            let (table, table_g) = self.input(vocab * width, 1.0)?;
            let (mut kc, mut kg) = self.input(s.nseq * s.cap * width, 1.0)?;
            let (mut vc, mut vg) = self.input(s.nseq * s.cap * width, 1.0)?;
            // The frequency table is made outside the recording (as prefill does).
            self.gpu.embed(&table_g, width, &[0], 1, 1, 0)?;
            let vars = |pos: usize, store: bool, len: usize, rng: &mut Rng| StepVars {
                pos,
                store_at: store.then_some(len - 1),
                len,
                tokens: (0..s.nseq).map(|_| (rng.next_u64() % vocab as u64) as u32).collect(),
            };
            let plan = [(s.len + 1000, true, s.len + 1), (s.len + 1001, true, s.len + 2), (s.len + 1002, false, s.len + 2), (s.len + 1003, true, s.len + 3)];
            let step_gpu = |g: &CudaBackend, kg: &mut CudaBuf, vg: &mut CudaBuf| -> GpuResult<(CudaBuf, CudaBuf)> {
                let x = g.embed_step(&table_g, width, s.nseq)?;
                g.store_step(kg, &x, s.nseq, s.cap, width)?;
                g.store_step(vg, &x, s.nseq, s.cap, width)?;
                g.attention_decode_step(&x, kg, vg, s)
            };
            let mut pairs = Vec::new();
            let mut recorded: Option<(CudaRecording, CudaBuf, CudaBuf)> = None;
            for (i, &(pos, store, len)) in plan.iter().enumerate() {
                let v = vars(pos, store, len, &mut self.rng);
                self.gpu.set_step(&v)?;
                let (og, lg) = if record {
                    if recorded.is_none() {
                        self.gpu.capture_begin()?;
                        let out = step_gpu(self.gpu, &mut kg, &mut vg);
                        let rec = self.gpu.capture_end();
                        let (o, l) = out?;
                        recorded = Some((rec?, o, l));
                    }
                    let (rec, o, l) = recorded.as_ref().expect("recorded above");
                    self.gpu.replay(rec)?;
                    (self.gpu.download(o)?, self.gpu.download(l)?)
                } else {
                    let (o, l) = step_gpu(self.gpu, &mut kg, &mut vg)?;
                    (self.gpu.download(&o)?, self.gpu.download(&l)?)
                };
                self.cpu.set_step(&v)?;
                let x = self.cpu.embed_step(&table, width, s.nseq)?;
                self.cpu.store_step(&mut kc, &x, s.nseq, s.cap, width)?;
                self.cpu.store_step(&mut vc, &x, s.nseq, s.cap, width)?;
                let (o, l) = self.cpu.attention_decode_step(&x, &kc, &vc, s)?;
                pairs.push((og, o));
                pairs.push((lg, l));
                if i + 1 == plan.len() {
                    pairs.push((self.gpu.download(&kg)?, kc.clone()));
                    pairs.push((self.gpu.download(&vg)?, vc.clone()));
                }
            }
            Ok(pairs)
        })();
        let shape = format!("nseq {} cap {} len {}..{} heads {}x{}, 4 steps", s.nseq, s.cap, s.len + 1, s.len + 3, s.heads, s.head_dim);
        self.push(if record { "decode_step[recorded]" } else { "decode_step[eager]" }, shape, dt, outcome);
    }

    fn merge(&mut self, rows: usize, head_dim: usize) {
        let dt = self.gpu.dtype();
        let outcome = (|| {
            let (mut o, mut og) = self.input(rows * head_dim, 1.0)?;
            let (o2, o2g) = self.input(rows * head_dim, 1.0)?;
            // Some rows without keys on one side or on both.
            let mut lse = self.rng.normals(rows, 3.0);
            let mut lse2 = self.rng.normals(rows, 3.0);
            for r in (0..rows).step_by(5) {
                lse[r] = f32::NEG_INFINITY;
            }
            for r in (0..rows).step_by(7) {
                lse2[r] = f32::NEG_INFINITY;
            }
            let mut lg = self.gpu.upload_f32(&lse)?;
            let l2g = self.gpu.upload_f32(&lse2)?;
            self.gpu.merge_partials(&mut og, &mut lg, &o2g, &l2g, rows, head_dim)?;
            self.cpu.merge_partials(&mut o, &mut lse, &o2, &lse2, rows, head_dim)?;
            Ok(vec![(self.gpu.download(&og)?, o), (self.gpu.download(&lg)?, lse)])
        })();
        self.push("merge_partials", format!("rows {rows} head_dim {head_dim}"), dt, outcome);
    }

    fn argmax(&mut self, rows: usize, cols: usize) {
        let dt = self.gpu.dtype();
        let outcome = (|| {
            let (x, xg) = self.input(rows * cols, 3.0)?;
            let g = self.gpu.argmax(&xg, rows, cols)?;
            let c = self.cpu.argmax(&x, rows, cols)?;
            // Error: the fraction of rows whose index differs.
            let wrong = g.iter().zip(&c).filter(|(a, b)| a != b).count() + g.len().abs_diff(c.len());
            Ok(vec![(vec![wrong as f32 / rows.max(1) as f32], vec![0.0])])
        })();
        self.push("argmax", format!("{rows}x{cols}"), dt, outcome);
    }
}

/// Runs every check on `backend` with inputs drawn from `seed`. Output
/// poisoning is switched on for the duration and restored afterwards.
pub fn check_kernels(backend: &CudaBackend, seed: u64) -> Vec<CheckRow> {
    let poisoned = backend.poison_outputs();
    backend.set_poison_outputs(true);
    let mut c = Checker { gpu: backend, cpu: CpuBackend::new(), rng: Rng(seed), rows: Vec::new() };

    // Tiny model: d 64, 4 heads of 16, FFN 256, vocab 512.
    c.embed(512, 64, 2, 7, 3);
    c.matmul(14, 64, 192);
    c.matmul(0, 64, 64);
    c.rmsnorm(14, 64);
    c.rmsnorm(5, 100);
    c.elementwise(1003);
    c.split_qkv(14, 64);
    c.split_qkv(5, 3);
    c.gather_scatter(16, 64, &[RowRun::new(3, 4), RowRun::new(10, 2), RowRun::new(0, 1), RowRun::new(5, 0)]);
    c.argmax(5, 512);
    c.merge(64, 16);
    let tiny = |nseq, sq, skv, stride, q_offset| PrefillShape { nseq, sq, skv, kv_seq_stride: stride, heads: 4, head_dim: 16, q_offset };
    c.prefill(tiny(2, 7, 12, 16, 5), PrefillKernel::Auto);
    c.prefill(tiny(1, 33, 33, 33, 0), PrefillKernel::Auto);
    c.prefill(tiny(2, 5, 0, 4, 0), PrefillKernel::Auto);
    c.decode(DecodeShape { nseq: 2, cap: 20, len: 13, heads: 4, head_dim: 16 });
    c.decode(DecodeShape { nseq: 2, cap: 8, len: 0, heads: 4, head_dim: 16 });
    c.decode(DecodeShape { nseq: 3, cap: 1, len: 1, heads: 4, head_dim: 16 });
    for record in [false, true] {
        c.decode_steps(DecodeShape { nseq: 2, cap: 40, len: 30, heads: 4, head_dim: 16 }, 64, record);
    }

    // dense-4l-like: d 4096, 32 heads of 128.
    c.embed(1000, 4096, 1, 17, 40_000);
    c.matmul(77, 4096, 384);
    c.rmsnorm(33, 4096);
    c.elementwise(77 * 4096 + 5);
    c.split_qkv(9, 4096);
    c.gather_scatter(20, 4096, &[RowRun::new(15, 5), RowRun::new(0, 3)]);
    c.argmax(3, 32_000);
    c.merge(32 * 3, 128);
    let kernels: &[PrefillKernel] =
        if backend.dtype() == Dtype::Fp32 { &[PrefillKernel::General] } else { &[PrefillKernel::General, PrefillKernel::Flash128, PrefillKernel::Flash64, PrefillKernel::Flash128W4] };
    let dense = |nseq, sq, skv, stride, heads, q_offset| PrefillShape { nseq, sq, skv, kv_seq_stride: stride, heads, head_dim: 128, q_offset };
    for &k in kernels {
        // A pool rank's block: queries 280..480 against K/V rows 0..480 of 512.
        c.prefill(dense(1, 200, 480, 512, 32, 280), k);
        // Plain causal prefill, two sequences, length not a multiple of any tile.
        c.prefill(dense(2, 333, 333, 333, 8, 0), k);
        // Queries past the end of K/V see all of it.
        c.prefill(dense(1, 100, 480, 512, 4, 450), k);
        // No keys at all.
        c.prefill(dense(1, 70, 0, 64, 2, 0), k);
    }
    c.decode(DecodeShape { nseq: 2, cap: 5000, len: 4099, heads: 32, head_dim: 128 });
    c.decode(DecodeShape { nseq: 1, cap: 64, len: 0, heads: 32, head_dim: 128 });
    for record in [false, true] {
        c.decode_steps(DecodeShape { nseq: 3, cap: 4200, len: 4096, heads: 32, head_dim: 128 }, 100, record);
    }

    backend.set_poison_outputs(poisoned);
    c.rows
}

/// Prints the check table; returns whether every row passed.
pub fn print_table(rows: &[CheckRow]) -> bool {
    println!("{:<28} {:<60} {:<5} {:>10} {:>8} {:<4}", "op", "shape", "dtype", "rel_err", "tol", "pass");
    for r in rows {
        let err = if r.error.is_nan() { "NaN".to_string() } else { format!("{:.2e}", r.error) };
        println!("{:<28} {:<60} {:<5} {:>10} {:>8.0e} {:<4} {}", r.op, r.shape, r.dtype.name(), err, r.tolerance, if r.pass { "ok" } else { "FAIL" }, r.note);
    }
    let failed = rows.iter().filter(|r| !r.pass).count();
    println!("{} passed, {} failed", rows.len() - failed, failed);
    failed == 0
}

/// One timing: the median of repeated CUDA-event timings after warm-up.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    pub what: String,
    pub shape: String,
    pub median_ms: f64,
    /// The figure of merit in `unit` (TFLOP/s or TB/s).
    pub figure: f64,
    pub unit: &'static str,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Median seconds of `op` over `iters` runs after two warm-up runs.
fn time_op(b: &CudaBackend, iters: usize, mut op: impl FnMut() -> GpuResult<()>) -> GpuResult<f64> {
    op()?;
    op()?;
    b.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = b.mark()?;
        op()?;
        let t1 = b.mark()?;
        times.push(b.elapsed_s(&t0, &t1)?);
    }
    Ok(median(times))
}

/// Times causal prefill attention (32 heads of 128, one sequence, every
/// kernel variant), decode attention (one query against `len` cached rows),
/// and cuBLAS GEMMs, on device-generated random data in the backend's dtype.
/// FLOPs of causal attention are counted as 2·2·S²·D·H / 2.
pub fn bench_kernels(b: &CudaBackend, seq_lens: &[usize], iters: usize) -> GpuResult<Vec<BenchRow>> {
    b.load_all_kernels()?;
    let dt = b.dtype();
    let (heads, hd) = (32usize, 128usize);
    let width = heads * hd;
    let mut rows = Vec::new();
    let before = b.prefill_kernel();
    for &s in seq_lens {
        let q = b.random_uniform(dt, s * width, 1, 1.0)?;
        let k = b.random_uniform(dt, s * width, 2, 1.0)?;
        let v = b.random_uniform(dt, s * width, 3, 1.0)?;
        let shape = PrefillShape { nseq: 1, sq: s, skv: s, kv_seq_stride: s, heads, head_dim: hd, q_offset: 0 };
        let flops = 2.0 * 2.0 * (s as f64).powi(2) * hd as f64 * heads as f64 / 2.0;
        for kernel in [PrefillKernel::Flash128, PrefillKernel::Flash64, PrefillKernel::Flash128W4, PrefillKernel::General] {
            if dt == Dtype::Fp32 && kernel != PrefillKernel::General {
                continue;
            }
            // The scalar kernel takes seconds per call beyond 16K tokens.
            if kernel == PrefillKernel::General && s > 16_384 {
                continue;
            }
            b.set_prefill_kernel(kernel);
            let secs = time_op(b, iters, || b.attention_prefill(&q, &k, &v, shape).map(|_| ()))?;
            rows.push(BenchRow {
                what: format!("prefill attention [{}]", kernel.name()),
                shape: format!("S {s}, {heads}x{hd}, causal"),
                median_ms: secs * 1e3,
                figure: flops / secs / 1e12,
                unit: "TFLOP/s",
            });
        }
        b.set_prefill_kernel(before);
        // One decode step at the end of this context.
        let qd = b.random_uniform(dt, width, 4, 1.0)?;
        let ds = DecodeShape { nseq: 1, cap: s, len: s, heads, head_dim: hd };
        let secs = time_op(b, iters, || b.attention_decode(&qd, &k, &v, ds).map(|_| ()))?;
        let bytes = 2.0 * s as f64 * width as f64 * dt.size_bytes() as f64;
        rows.push(BenchRow { what: "decode attention (split-KV)".into(), shape: format!("len {s}, {heads}x{hd}"), median_ms: secs * 1e3, figure: bytes / secs / 1e12, unit: "TB/s" });
    }
    // 8192³ and dense-4l's GEMMs at 16K tokens: QKV, output projection, FFN up, FFN down.
    for (m, k, n) in [(8192usize, 8192usize, 8192usize), (16_384, 4096, 12_288), (16_384, 4096, 4096), (16_384, 4096, 16_384), (16_384, 16_384, 4096)] {
        let x = b.random_uniform(dt, m * k, 5, 1.0)?;
        let w = b.random_uniform(dt, k * n, 6, 0.02)?;
        let secs = time_op(b, iters, || b.matmul(&x, &w, m, k, n).map(|_| ()))?;
        rows.push(BenchRow { what: "matmul (cuBLAS)".into(), shape: format!("[{m}x{k}]x[{k}x{n}]"), median_ms: secs * 1e3, figure: 2.0 * (m * k * n) as f64 / secs / 1e12, unit: "TFLOP/s" });
    }
    // RMSNorm of 16K rows of 4096: one read and one write of the activations.
    let (rows_n, d) = (16_384usize, 4096usize);
    let x = b.random_uniform(dt, rows_n * d, 7, 1.0)?;
    let g = b.random_uniform(dt, d, 8, 1.0)?;
    let secs = time_op(b, iters, || b.rmsnorm(&x, &g, rows_n, d, 1e-6).map(|_| ()))?;
    rows.push(BenchRow { what: "rmsnorm".into(), shape: format!("[{rows_n}x{d}]"), median_ms: secs * 1e3, figure: 2.0 * (rows_n * d * dt.size_bytes()) as f64 / secs / 1e12, unit: "TB/s" });
    Ok(rows)
}

/// Prints benchmark rows as a table.
pub fn print_bench_table(rows: &[BenchRow]) {
    println!("{:<34} {:<28} {:>10} {:>10} {:<8}", "kernel", "shape", "median ms", "figure", "unit");
    for r in rows {
        println!("{:<34} {:<28} {:>10.3} {:>10.1} {:<8}", r.what, r.shape, r.median_ms, r.figure, r.unit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_zero_for_equal_outputs_and_matching_infinities() {
        assert_eq!(relative_l2(&[1.0, f32::NEG_INFINITY], &[1.0, f32::NEG_INFINITY]), 0.0);
        assert_eq!(relative_l2(&[], &[]), 0.0);
    }

    #[test]
    fn nan_or_a_one_sided_infinity_never_passes() {
        assert!(relative_l2(&[f32::NAN], &[1.0]).is_nan());
        assert!(relative_l2(&[f32::NEG_INFINITY], &[1.0]).is_infinite());
        assert!(relative_l2(&[1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn relative_error_scales_with_the_reference() {
        let e = relative_l2(&[1.01, 2.02], &[1.0, 2.0]);
        assert!((e - 0.01).abs() < 1e-6, "{e}");
    }

    #[test]
    fn random_inputs_are_reproducible_and_not_zero() {
        let a = Rng(7).normals(100, 1.0);
        assert_eq!(a, Rng(7).normals(100, 1.0));
        assert!(a.iter().all(|x| x.is_finite()) && a.iter().any(|&x| x != 0.0));
        let var = a.iter().map(|x| x * x).sum::<f32>() / 100.0;
        assert!((0.5..2.0).contains(&var), "{var}");
    }
}
