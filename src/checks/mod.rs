//! Kernel checks, written once and run on every backend.
//!
//! Each check draws fresh random inputs (never zeros), rounds them to the
//! backend's dtype by an upload/download round trip, runs one operation with
//! every output the backend creates poisoned with NaN first
//! ([`Backend::set_poison_outputs`]), and compares what comes back with the
//! f64 definition of the operation in [`reference`] by relative L2 error
//! (`||got - want|| / ||want||`) against 1e-2 for bf16/fp16 and 1e-4 for
//! f32. An element the backend does not write stays NaN, and NaN never
//! passes. Shapes cover the tiny test model (head_dim 16) and dense-4l (32
//! heads of 128) and heads of 32 (moe-16l) and 64 on the tensor-core
//! prefill kernels, with rows that are not multiples of any tile, prefill
//! blocks at a query offset against a longer K/V stride, prefill at the
//! edges of the kernels' tiles and pipelines, decode at long and zero
//! lengths and in chunks long enough for sm_90's bulk copies, and decode
//! steps from the step scalars, eager and recorded; the mixture-of-experts
//! operations on tiny-moe's and moe-16l's shapes, with ties in the router's
//! logits and experts over their capacity; and the model family's own
//! operations (SwiGLU, rotary embeddings fused into the QKV split, grouped
//! K/V heads in prefill and decode) on the tiny model's and Llama 3 8B's
//! heads.
//!
//! [`run_all`] runs every check (`fapool check-gpu`); `tests/kernels.rs`
//! instantiates each one as a test for the CPU backend and for CUDA, both
//! through [`for_each_kernel_check!`], so the list exists once.
//!
//! This module must not be used by the timed paths of a run.

mod attention;
mod dense;
mod experts;
mod family;
pub mod reference;
#[cfg(test)]
mod tests;

pub use attention::{
    attention_decode, attention_prefill_dense_heads, attention_prefill_heads_32_64, attention_prefill_small_heads, attention_prefill_tile_edges, attention_prefill_tile_edges_32_64, decode_steps,
    merge_partials,
};
pub use dense::{add_assign, argmax, copy_rows, embed, gather_rows, gelu, gelu_mul, matmul, rmsnorm, scatter_rows, split_qkv};
pub use experts::{combine_from_experts, expert_slots, grouped_matmul, permute_to_experts, router_top_k};
pub use family::{attention_decode_grouped_heads, attention_prefill_grouped_heads, embed_tokens, silu_mul, split_qkv_rope};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, PrefillKernel};
use crate::backend::{Backend, Dtype};
use crate::metrics::{relative_l2, worst_error};

/// Calls `$m! { check, ... }` with the name of every check, in table order.
/// The prefill checks come last (and within each the newest kernels, the
/// end of `PrefillKernel::ALL`), so that a broken launch of a prefill
/// kernel, which can leave the device unusable for the rest of the process,
/// cannot hide the checks of the other operations.
#[macro_export]
macro_rules! for_each_kernel_check {
    ($m:ident) => {
        $m! {
            embed, embed_tokens, matmul, rmsnorm, gelu, gelu_mul, silu_mul, add_assign, split_qkv, split_qkv_rope, gather_rows,
            scatter_rows, copy_rows, argmax, merge_partials, attention_decode, attention_decode_grouped_heads, decode_steps,
            router_top_k, expert_slots, permute_to_experts, combine_from_experts, grouped_matmul,
            attention_prefill_small_heads, attention_prefill_dense_heads, attention_prefill_tile_edges,
            attention_prefill_grouped_heads, attention_prefill_heads_32_64, attention_prefill_tile_edges_32_64,
        }
    };
}

/// One comparison of a backend's operation with its reference.
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

/// What the checks need of a backend beyond [`Backend`]: the
/// implementations it offers for prefill attention, each checked on its own.
pub trait CheckedBackend: Backend {
    /// The prefill attention implementations to check on heads of
    /// `head_dim`, by the names the check rows show.
    fn prefill_variants(&self, head_dim: usize) -> Vec<&'static str>;
    /// Selects prefill implementation `name` (one of `prefill_variants`);
    /// returns the one selected before.
    fn select_prefill_variant(&self, name: &str) -> &'static str;
}

impl CheckedBackend for CpuBackend {
    fn prefill_variants(&self, _head_dim: usize) -> Vec<&'static str> {
        vec!["cpu"]
    }
    fn select_prefill_variant(&self, _name: &str) -> &'static str {
        "cpu"
    }
}

/// Heads the tensor-core kernels are built for (32, 64, 128) run every
/// kernel that applies to the head_dim, the dtype and the device, each by
/// name (the tensor-core ones only in 16-bit types, the Hopper ones only at
/// 128 on sm_90); other heads run the backend's own choice.
impl CheckedBackend for CudaBackend {
    fn prefill_variants(&self, head_dim: usize) -> Vec<&'static str> {
        let cc = self.compute_capability();
        if !PrefillKernel::Flash128W4.applies(head_dim, Dtype::Bf16, cc) {
            return vec![PrefillKernel::Auto.name()];
        }
        let dtype = self.dtype();
        PrefillKernel::ALL.into_iter().filter(|&k| k != PrefillKernel::Auto && k.applies(head_dim, dtype, cc)).map(|k| k.name()).collect()
    }
    fn select_prefill_variant(&self, name: &str) -> &'static str {
        let before = self.prefill_kernel().name();
        self.set_prefill_kernel(name.parse().expect("a name from prefill_variants"));
        before
    }
}

/// Deterministic normal samples (splitmix64 + Box-Muller), so a failing
/// check can be rerun with the same inputs.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
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
    pub(crate) fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
    /// `n` token ids below `vocab`.
    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next_u64() % vocab as u64) as u32).collect()
    }
}

/// Runs checks on one backend and collects their rows.
pub struct Checker<'a, B: CheckedBackend> {
    be: &'a B,
    rng: Rng,
    rows: Vec<CheckRow>,
}

/// What an operation returned and what its reference says, per output.
type Pairs = Vec<(Vec<f32>, Vec<f64>)>;
type Outcome = crate::backend::Result<Pairs>;

impl<'a, B: CheckedBackend> Checker<'a, B> {
    fn new(be: &'a B, seed: u64) -> Self {
        Self { be, rng: Rng(seed), rows: Vec::new() }
    }

    /// Random values uploaded in the backend's dtype, and the same values as
    /// the backend holds them.
    fn input(&mut self, n: usize, scale: f32) -> crate::backend::Result<(Vec<f64>, B::Buf)> {
        let host = self.rng.normals(n, scale);
        let buf = self.be.upload(&host)?;
        let rounded = self.be.download(&buf)?;
        Ok((reference::wide(&rounded), buf))
    }

    /// A row from the (got, want) pairs of one operation: the worst output decides.
    fn push(&mut self, op: &str, shape: String, outcome: Outcome) {
        let dtype = self.be.dtype();
        let tol = tolerance(dtype);
        let row = match outcome {
            Ok(pairs) => {
                let error = worst_error(pairs.iter().map(|(got, want)| relative_l2(got, &want.iter().map(|&w| w as f32).collect::<Vec<_>>())));
                CheckRow { op: op.into(), shape, dtype, error, tolerance: tol, pass: error.is_finite() && error <= tol, note: String::new() }
            }
            Err(e) => CheckRow { op: op.into(), shape, dtype, error: f64::NAN, tolerance: tol, pass: false, note: e.to_string() },
        };
        self.rows.push(row);
    }
}

/// Runs `check` on `be` with inputs drawn from `seed`, outputs poisoned for
/// the duration (the setting is restored afterwards).
pub fn run<B: CheckedBackend>(be: &B, seed: u64, check: fn(&mut Checker<B>)) -> Vec<CheckRow> {
    let poisoned = be.poison_outputs();
    be.set_poison_outputs(true);
    let mut c = Checker::new(be, seed);
    check(&mut c);
    be.set_poison_outputs(poisoned);
    c.rows
}

/// Runs every check on `be`, in table order, with inputs drawn from `seed`.
pub fn run_all<B: CheckedBackend>(be: &B, seed: u64) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    macro_rules! each {
        ($($check:ident),* $(,)?) => {{
            let mut seeds = seed;
            $(
                seeds = seeds.wrapping_add(1);
                rows.extend(run(be, seeds, $check));
            )*
        }};
    }
    for_each_kernel_check!(each);
    rows
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
