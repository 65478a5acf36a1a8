//! Backends: the kernels a strategy calls, behind one trait.
//!
//! A backend owns device buffers (`Backend::Buf`) and the operations of the
//! model on them. Strategies are generic over the backend, so the CPU path and
//! the CUDA path run the same dataflow code. All activations are row-major:
//! a buffer of `rows × cols` elements, with `rows = sequences × tokens`.
//! Heads are contiguous inside a row (`[heads, head_dim]`).
//!
//! A mixture-of-experts FFN runs as five operations: [`Backend::router_top_k`]
//! picks each token's experts, [`Backend::expert_slots`] gives every
//! (token, expert) assignment its row in an order grouped by expert,
//! [`Backend::permute_to_experts`] copies the tokens' rows there,
//! [`Backend::grouped_matmul`] runs one GEMM per expert over its rows, and
//! [`Backend::combine_from_experts`] sums each token's expert outputs by its
//! routing weights. Their index buffers (expert ids, slots) are f32 buffers
//! holding integral values, exact below 2^24, so they travel wherever
//! buffers do (downloads, messages, traces) without an integer buffer type.
//!
//! The shape-only backend ([`shape`]) carries no data: it records every
//! operation for the planner.
//!
//! This module must not communicate (see `comm`) or time anything beyond the
//! marks it hands out (see `metrics`).

pub mod cpu;
pub mod cuda;
pub mod record;
pub mod shape;
pub mod traced;

use std::ops::Range;

/// Errors raised by a backend.
///
/// The variants tell the command layer what failed: a backend that cannot
/// start here, a call into the device's libraries that failed while running
/// (its own exit code), buffers that do not fit the operation, or an
/// operation this backend does not implement for the shape or dtype asked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend `{backend}` is not available: {reason}")]
    Unavailable { backend: &'static str, reason: String },
    /// A CUDA driver, cuBLAS or NVRTC call failed at run time; `message` is
    /// the library's own report.
    #[error("device error: {message}")]
    Device { library: DeviceLibrary, message: String },
    #[error("shape error: {0}")]
    Shape(String),
    /// A limit of this backend's kernels (a head_dim, a dtype, a shared-memory
    /// size) that the operation's arguments exceed; nothing ran.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl BackendError {
    /// The library whose call failed, for a run-time device error.
    pub fn device_library(&self) -> Option<DeviceLibrary> {
        match self {
            BackendError::Device { library, .. } => Some(*library),
            _ => None,
        }
    }
}

/// The device library a [`BackendError::Device`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceLibrary {
    /// The CUDA driver (memory, copies, kernel launches, graphs, events).
    Driver,
    /// cuBLAS (the GEMMs).
    Cublas,
    /// NVRTC (run-time compilation of `kernels/*.cu`).
    Nvrtc,
}

impl DeviceLibrary {
    pub fn name(self) -> &'static str {
        match self {
            DeviceLibrary::Driver => "CUDA driver",
            DeviceLibrary::Cublas => "cuBLAS",
            DeviceLibrary::Nvrtc => "NVRTC",
        }
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Which backend a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// CUDA when GPUs and the CUDA libraries are found, else CPU.
    Auto,
    /// The f32 CPU backend (tiny models, tests, anywhere).
    Cpu,
    /// The CUDA backend (cuBLAS, NVRTC kernels, NCCL).
    Cuda,
}

/// Element type of a backend's activations, weights and KV caches.
///
/// Log-sum-exp buffers are f32 whatever the model dtype. The CPU backend
/// always computes in f32; the CUDA backend stores this type and accumulates
/// in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// bfloat16 (the GPU default).
    #[default]
    Bf16,
    /// IEEE half precision.
    Fp16,
    /// IEEE single precision.
    Fp32,
}

impl Dtype {
    /// Bytes of one element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::Bf16 | Dtype::Fp16 => 2,
            Dtype::Fp32 => 4,
        }
    }

    /// The name job specs and results files use.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
            Dtype::Fp32 => "fp32",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Shape of a causal prefill attention call.
///
/// Queries are `nseq × sq` rows of `heads × head_dim`; the query at row `i`
/// of a sequence sits at absolute position `q_offset + i` and attends to
/// keys `0..=q_offset + i` (clipped to `skv`). Keys/values are `nseq ×
/// kv_seq_stride` rows of `kv_heads × head_dim`, of which the first `skv`
/// of each sequence are used; query head `h` reads K/V head
/// `h / (heads / kv_heads)` (grouped-query attention; `kv_heads == heads`
/// is multi-head). This is what a pool rank computes for its query block
/// against the replicated K/V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillShape {
    pub nseq: usize,
    pub sq: usize,
    pub skv: usize,
    pub kv_seq_stride: usize,
    pub heads: usize,
    /// K/V heads, dividing `heads`.
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q_offset: usize,
}

impl PrefillShape {
    /// Query heads per K/V head.
    pub fn group(&self) -> usize {
        group(self.heads, self.kv_heads)
    }
}

/// Shape of a decode (one query per sequence) attention call over a KV cache
/// laid out `[nseq, cap, kv_heads * head_dim]`, of which the first `len`
/// rows of each sequence are valid; query head `h` reads K/V head
/// `h / (heads / kv_heads)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    pub nseq: usize,
    pub cap: usize,
    pub len: usize,
    pub heads: usize,
    /// K/V heads, dividing `heads`.
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl DecodeShape {
    /// Query heads per K/V head.
    pub fn group(&self) -> usize {
        group(self.heads, self.kv_heads)
    }
}

/// Query heads per K/V head (1 for a degenerate shape, which
/// [`check_kv_heads`] refuses).
fn group(heads: usize, kv_heads: usize) -> usize {
    heads.checked_div(kv_heads).unwrap_or(1).max(1)
}

/// `Err` unless `kv_heads` is at least 1 and divides `heads`.
pub fn check_kv_heads(what: &str, heads: usize, kv_heads: usize) -> Result<()> {
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(BackendError::Shape(format!("{what}: {kv_heads} K/V heads do not divide {heads} query heads")));
    }
    Ok(())
}

/// Where the rows of a rotary-embedding call sit: each sequence's rows
/// cover `Segments` of positions `(start, len)` one after the other (rows =
/// sequences × the segments' total), or every row sits at the decode step's
/// position (`Step`, read from the step scalars).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePositions<'a> {
    Segments(&'a [(usize, usize)]),
    Step,
}

impl RopePositions<'_> {
    /// The position of row `row` (a `Segments` layout; `step_pos` for `Step`).
    pub fn of_row(&self, row: usize, step_pos: usize) -> usize {
        match self {
            RopePositions::Step => step_pos,
            RopePositions::Segments(segs) => {
                let per_seq: usize = segs.iter().map(|s| s.1).sum();
                let mut j = row % per_seq.max(1);
                for &(start, len) in segs.iter() {
                    if j < len {
                        return start + j;
                    }
                    j -= len;
                }
                0
            }
        }
    }
}

/// Rotary position embedding of q and k: element `j < head_dim/2` of a
/// head pairs with `j + head_dim/2` and both turn by `pos · θ^(-2j/head_dim)`
/// (Hugging Face's half-split rotation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope<'a> {
    pub head_dim: usize,
    pub theta: f64,
    pub positions: RopePositions<'a>,
}

/// How a fused QKV row splits: `q_width` of q, then `kv_width` of k and of
/// v, and the rotation q and k take (none: a plain split).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QkvSplit<'a> {
    pub q_width: usize,
    pub kv_width: usize,
    pub rope: Option<Rope<'a>>,
}

/// The scalars of one decode step. A strategy writes them with
/// [`Backend::set_step`] before the step's device work, and the `*_step`
/// operations read them from device memory, so a step captured once (a CUDA
/// graph) replays correctly at every later position.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepVars {
    /// Absolute position of the new token (its positional encoding).
    pub pos: usize,
    /// Cache row (per sequence) the new K/V goes to; `None`: this rank stores none.
    pub store_at: Option<usize>,
    /// Cached rows each sequence attends to, the new one included.
    pub len: usize,
    /// The step's input token of each sequence (ranks that embed; else empty).
    pub tokens: Vec<u32>,
}

/// A copy of `len` consecutive rows from row `src` of one buffer to row `dst`
/// of another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCopy {
    pub src: usize,
    pub dst: usize,
    pub len: usize,
}

/// A run of consecutive rows: `len` rows starting at `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowRun {
    pub start: usize,
    pub len: usize,
}

impl RowRun {
    pub fn new(start: usize, len: usize) -> Self {
        Self { start, len }
    }
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// The operations of the model on one device.
///
/// Every method takes dimensions explicitly; implementations check that the
/// buffers are large enough and return `BackendError::Shape` otherwise.
pub trait Backend {
    /// A device buffer. Activations and weights are in the model dtype;
    /// log-sum-exp buffers are f32 on every backend.
    type Buf;
    /// A point in the device's timeline (an instant on CPU, an event on GPU).
    type Mark;
    /// A recorded sequence of device work that can be replayed (a CUDA graph).
    type Graph;

    fn name(&self) -> &'static str;
    /// Element type of activations and weights (the CPU backend computes
    /// and stores f32).
    fn dtype(&self) -> Dtype {
        Dtype::Fp32
    }
    /// Number of elements in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Bytes `buf` occupies on the device (what a message of it moves).
    fn size_bytes(&self, buf: &Self::Buf) -> usize;

    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// A zeroed buffer of `len` model-dtype elements.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A zeroed buffer of `len` f32 elements (log-sum-exp buffers).
    fn zeros_f32(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer of `len` model-dtype elements that its user overwrites
    /// completely (a receive, a copy target): not zero-filled where the
    /// backend can skip it.
    fn empty(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// Uploads `host` as f32 whatever the model dtype (log-sum-exp buffers).
    /// The default is [`Backend::upload`], right for a backend that stores f32.
    fn upload_f32(&self, host: &[f32]) -> Result<Self::Buf> {
        self.upload(host)
    }
    /// When on, every buffer an operation creates is filled with NaN before
    /// the operation writes it, so an output element it forgets to write
    /// shows up in a check (see `checks`). Off by default; a backend that
    /// cannot poison ignores it.
    fn set_poison_outputs(&self, _on: bool) {}
    /// Whether outputs are poisoned (see [`Backend::set_poison_outputs`]).
    fn poison_outputs(&self) -> bool {
        false
    }

    /// `table[token] + sinusoidal(position)` for `nseq × n` tokens whose
    /// positions are `pos0..pos0 + n` in every sequence; returns `[nseq*n, d]`.
    fn embed(&self, table: &Self::Buf, d: usize, tokens: &[u32], nseq: usize, n: usize, pos0: usize) -> Result<Self::Buf>;
    /// `table[token]` for each token, no position encoding (models with
    /// rotary positions); returns `[tokens, d]`. The default gathers the
    /// table's rows.
    fn embed_tokens(&self, table: &Self::Buf, d: usize, tokens: &[u32]) -> Result<Self::Buf> {
        let runs: Vec<RowRun> = tokens.iter().map(|&t| RowRun::new(t as usize, 1)).collect();
        self.gather_rows(table, d, &runs)
    }
    /// `x[m,k] · w[k,n]`, fp32 accumulation.
    fn matmul(&self, x: &Self::Buf, w: &Self::Buf, m: usize, k: usize, n: usize) -> Result<Self::Buf>;
    /// RMSNorm of each row, scaled by `weight[cols]`.
    fn rmsnorm(&self, x: &Self::Buf, weight: &Self::Buf, rows: usize, cols: usize, eps: f32) -> Result<Self::Buf>;
    /// `x = gelu(x)` (tanh approximation).
    fn gelu(&self, x: &mut Self::Buf) -> Result<()>;
    /// `gate = gelu(gate) * up`.
    fn gelu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf) -> Result<()>;
    /// `gate = silu(gate) * up` (SwiGLU), `silu(x) = x / (1 + e^-x)`.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf) -> Result<()>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf) -> Result<()>;
    /// Splits `[rows, 3*width]` into q, k, v of `[rows, width]` each.
    fn split_qkv(&self, qkv: &Self::Buf, rows: usize, width: usize) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        self.split_qkv_rope(qkv, rows, &QkvSplit { q_width: width, kv_width: width, rope: None })
    }
    /// Splits `[rows, q_width + 2*kv_width]` into q `[rows, q_width]`, k and
    /// v `[rows, kv_width]`, rotating q and k by their rows' positions when
    /// `split.rope` says so (in the same pass).
    fn split_qkv_rope(&self, qkv: &Self::Buf, rows: usize, split: &QkvSplit) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// Concatenates the given row runs of `src` (rows of `cols`) into a new buffer.
    fn gather_rows(&self, src: &Self::Buf, cols: usize, runs: &[RowRun]) -> Result<Self::Buf>;
    /// Writes consecutive rows of `src` into the given row runs of `dst`, in order.
    fn scatter_rows(&self, dst: &mut Self::Buf, cols: usize, runs: &[RowRun], src: &Self::Buf) -> Result<()>;
    /// Copies row runs of `src` to rows of `dst` (rows of `cols`), in one pass.
    fn copy_rows(&self, dst: &mut Self::Buf, cols: usize, src: &Self::Buf, copies: &[RowCopy]) -> Result<()> {
        let from: Vec<RowRun> = copies.iter().map(|c| RowRun::new(c.src, c.len)).collect();
        let to: Vec<RowRun> = copies.iter().map(|c| RowRun::new(c.dst, c.len)).collect();
        let staged = self.gather_rows(src, cols, &from)?;
        self.scatter_rows(dst, cols, &to, &staged)
    }
    /// Causal attention; returns the output `[nseq*sq, heads*head_dim]` and
    /// the natural-log log-sum-exp of the scaled scores `[nseq, heads, sq]`.
    fn attention_prefill(&self, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, shape: PrefillShape) -> Result<(Self::Buf, Self::Buf)>;
    /// One query per sequence against the first `len` cached rows; returns the
    /// output `[nseq, heads*head_dim]` and log-sum-exp `[nseq, heads]`. With
    /// `len == 0` the output is zero and the log-sum-exp is `-inf`.
    fn attention_decode(&self, q: &Self::Buf, k_cache: &Self::Buf, v_cache: &Self::Buf, shape: DecodeShape) -> Result<(Self::Buf, Self::Buf)>;
    /// Merges a partial attention result `(o2, lse2)` into `(o, lse)` for
    /// `rows` (sequence, head) pairs of `head_dim` values each.
    fn merge_partials(&self, o: &mut Self::Buf, lse: &mut Self::Buf, o2: &Self::Buf, lse2: &Self::Buf, rows: usize, head_dim: usize) -> Result<()>;
    /// Index of the largest value of each row (first one on ties).
    fn argmax(&self, logits: &Self::Buf, rows: usize, cols: usize) -> Result<Vec<u32>>;

    /// The router: per row of `experts` logits, the `k` experts of highest
    /// softmax probability (on ties the lowest index first), in descending
    /// order, and their probabilities renormalised over the chosen `k`.
    /// Returns `(ids, weights)`, f32 buffers of `[rows, k]` (ids integral).
    fn router_top_k(&self, logits: &Self::Buf, rows: usize, experts: usize, k: usize) -> Result<(Self::Buf, Self::Buf)>;
    /// The permutation that groups the `assignments` expert ids of `ids` by
    /// expert: expert e's rows start after the kept rows of experts below
    /// it, and within an expert assignments keep their order. With a
    /// `capacity`, an expert keeps its first `capacity` assignments and the
    /// others are dropped. Returns the slot of every assignment (f32,
    /// integral; -1 when dropped) and, read back to the host, the
    /// assignments routed to each expert before the capacity (the one host
    /// read of an MoE layer: it sizes the expert GEMMs and the messages).
    fn expert_slots(&self, ids: &Self::Buf, assignments: usize, experts: usize, capacity: Option<usize>) -> Result<(Self::Buf, Vec<usize>)>;
    /// `kept` rows of `cols`: row `slots[a]` is row `a / k` of `x` for every
    /// assignment `a < rows·k` that is not dropped.
    fn permute_to_experts(&self, x: &Self::Buf, cols: usize, slots: &Self::Buf, rows: usize, k: usize, kept: usize) -> Result<Self::Buf>;
    /// `[rows, cols]`: row t is `Σ_j weights[t·k+j] · y[slots[t·k+j]]` over
    /// the token's kept assignments (zero if all were dropped), summed in f32.
    fn combine_from_experts(&self, y: &Self::Buf, cols: usize, slots: &Self::Buf, weights: &Self::Buf, rows: usize, k: usize) -> Result<Self::Buf>;
    /// One GEMM per group: rows `o_g..o_g + groups[g]` of `x` (`[Σ groups,
    /// k]`, `o_g` the rows of the groups before) times matrix `g` of `w`
    /// (`[groups.len(), k, n]`), into the same rows of the `[Σ groups, n]`
    /// result; fp32 accumulation.
    fn grouped_matmul(&self, x: &Self::Buf, w: &Self::Buf, groups: &[usize], k: usize, n: usize) -> Result<Self::Buf>;

    /// Sets the scalars the `*_step` operations read (outside any capture).
    fn set_step(&self, vars: &StepVars) -> Result<()>;
    /// [`Backend::embed`] of one token per sequence: the step's tokens at the
    /// step's position.
    fn embed_step(&self, table: &Self::Buf, d: usize, nseq: usize) -> Result<Self::Buf>;
    /// [`Backend::embed_tokens`] of the step's tokens (no position encoding).
    fn embed_step_tokens(&self, table: &Self::Buf, d: usize, nseq: usize) -> Result<Self::Buf>;
    /// Writes row `n` of `src` (`[nseq, width]`) to row `store_at` of
    /// sequence `n` of `cache` (`[nseq, cap, width]`); nothing without a `store_at`.
    fn store_step(&self, cache: &mut Self::Buf, src: &Self::Buf, nseq: usize, cap: usize, width: usize) -> Result<()>;
    /// [`Backend::attention_decode`] over the step's `len` rows (`shape.len`
    /// is ignored: the work is laid out for any length up to `shape.cap`).
    fn attention_decode_step(&self, q: &Self::Buf, k_cache: &Self::Buf, v_cache: &Self::Buf, shape: DecodeShape) -> Result<(Self::Buf, Self::Buf)>;

    /// Starts recording instead of running device work; `false` when this
    /// backend cannot record (the caller then runs the work eagerly).
    /// Between this and [`Backend::capture_end`] nothing may wait for the
    /// device or read device memory on the host.
    fn capture_begin(&self) -> Result<bool> {
        Ok(false)
    }
    /// Ends a recording begun by [`Backend::capture_begin`].
    fn capture_end(&self) -> Result<Self::Graph>;
    /// Queues one replay of a recording.
    fn replay(&self, graph: &Self::Graph) -> Result<()>;

    /// A point in the device timeline, for timing.
    fn mark(&self) -> Result<Self::Mark>;
    /// Makes the compute timeline wait until `mark` (recorded on another
    /// timeline, e.g. a communication stream) is reached.
    fn wait_for(&self, _mark: &Self::Mark) -> Result<()> {
        Ok(())
    }
    /// Whether a message holds the compute timeline while it runs (blocking
    /// MPI on the CPU): then all of its time is waiting. GPUs run messages
    /// on their own streams and wait only where the data is needed.
    fn messages_block_compute(&self) -> bool {
        true
    }
    /// Seconds between two marks (waits for the later one).
    fn elapsed_s(&self, from: &Self::Mark, to: &Self::Mark) -> Result<f64>;
    /// Waits for all queued device work.
    fn synchronize(&self) -> Result<()>;
    /// Peak device memory since the last [`Backend::reset_peak_memory`]
    /// (or start-up), bytes, where the backend can tell.
    fn peak_memory_bytes(&self) -> Option<u64>;
    /// Starts a new peak-memory window at the current use (each batch gets
    /// its own peak, comparable with its estimate).
    fn reset_peak_memory(&self) {}
}
