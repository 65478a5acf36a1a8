//! What a shape-only run records: one entry per operation (its kind,
//! dimensions, FLOPs, bytes read and written, the buffers it read and
//! wrote, its stream), per marker of the runner's protocol and per message,
//! in issue order. The shape backend writes these; the in-process transport
//! adds its messages in their places; the planner builds its DAG from them.
//! Plain data: nothing here runs or costs anything.

use super::{DecodeShape, PrefillShape};
use std::cell::{Cell, RefCell};

/// A buffer as an operation saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufRef {
    pub id: u64,
    pub len: usize,
    pub cols: Option<usize>,
}

/// What an operation was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    Embed,
    Matmul,
    RmsNorm,
    Gelu,
    GeluMul,
    SiluMul,
    Add,
    SplitQkv,
    GatherRows,
    ScatterRows,
    CopyRows,
    AttentionPrefill,
    AttentionDecode,
    MergePartials,
    Argmax,
    RouterTopK,
    ExpertSlots,
    PermuteToExperts,
    GroupedMatmul,
    CombineFromExperts,
    Zeros,
    /// A buffer its user overwrites (`Backend::empty`): no device work.
    Alloc,
    Upload,
    Download,
    StoreStep,
}

impl OpKind {
    /// The name traces, DOT files and calibration tables use.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Embed => "embed",
            OpKind::Matmul => "matmul",
            OpKind::RmsNorm => "rmsnorm",
            OpKind::Gelu => "gelu",
            OpKind::GeluMul => "gelu_mul",
            OpKind::SiluMul => "silu_mul",
            OpKind::Add => "add",
            OpKind::SplitQkv => "split_qkv",
            OpKind::GatherRows => "gather_rows",
            OpKind::ScatterRows => "scatter_rows",
            OpKind::CopyRows => "copy_rows",
            OpKind::AttentionPrefill => "attention_prefill",
            OpKind::AttentionDecode => "attention_decode",
            OpKind::MergePartials => "merge_partials",
            OpKind::Argmax => "argmax",
            OpKind::RouterTopK => "router_top_k",
            OpKind::ExpertSlots => "expert_slots",
            OpKind::PermuteToExperts => "permute_to_experts",
            OpKind::GroupedMatmul => "grouped_matmul",
            OpKind::CombineFromExperts => "combine_from_experts",
            OpKind::Zeros => "zeros",
            OpKind::Alloc => "alloc",
            OpKind::Upload => "upload",
            OpKind::Download => "download",
            OpKind::StoreStep => "store_step",
        }
    }
}

/// The dimensions of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpDims {
    /// `x[m,k] · w[k,n]`.
    Gemm {
        m: usize,
        k: usize,
        n: usize,
    },
    /// A row-wise operation over `rows × cols`.
    Rows {
        rows: usize,
        cols: usize,
    },
    /// One GEMM per expert group: `groups` non-empty groups of `m` rows in
    /// all, each `[rows_g, k] · [k, n]`.
    Grouped {
        groups: usize,
        m: usize,
        k: usize,
        n: usize,
    },
    Prefill(PrefillShape),
    /// Decode attention; `len` is the attended length the step's scalars gave.
    Decode(DecodeShape),
    /// An element-wise operation over `len` elements.
    Elems {
        len: usize,
    },
}

impl std::fmt::Display for OpDims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpDims::Gemm { m, k, n } => write!(f, "m={m} k={k} n={n}"),
            OpDims::Rows { rows, cols } => write!(f, "{rows}x{cols}"),
            OpDims::Grouped { groups, m, k, n } => write!(f, "groups={groups} m={m} k={k} n={n}"),
            OpDims::Prefill(s) => write!(f, "nseq={} sq={} skv={} off={} {}x{} kv_heads={}", s.nseq, s.sq, s.skv, s.q_offset, s.heads, s.head_dim, s.kv_heads),
            OpDims::Decode(s) => write!(f, "nseq={} len={} cap={} {}x{} kv_heads={}", s.nseq, s.len, s.cap, s.heads, s.head_dim, s.kv_heads),
            OpDims::Elems { len } => write!(f, "{len}"),
        }
    }
}

/// One operation as a rank issued it.
#[derive(Clone, Debug, PartialEq)]
pub struct OpRecord {
    pub kind: OpKind,
    pub dims: OpDims,
    pub flops: f64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Buffers read (an in-place operation's target first).
    pub inputs: Vec<BufRef>,
    /// Buffers written (new or in place).
    pub outputs: Vec<BufRef>,
    pub stream: u32,
}

/// Points of a rank's program that are not operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marker {
    /// `Backend::synchronize`.
    Sync,
    /// `Backend::set_step`: a decode step's scalars.
    SetStep { pos: usize, store_at: Option<usize>, len: usize },
    /// `Backend::wait_for`: the compute stream waits for the completion of
    /// the rank's `n`-th recorded message (issued on its group's stream).
    WaitFor(usize),
}

/// An entry of a rank's program, in issue order.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    Op(OpRecord),
    Marker(Marker),
    /// The `n`-th message the rank's transport recorded.
    Message(usize),
}

/// A rank's program as recorded: the backend's operations and markers and,
/// in their places, the messages its transport recorded.
#[derive(Debug, Default)]
pub struct Recorder {
    entries: RefCell<Vec<Entry>>,
    messages: Cell<usize>,
}

impl Recorder {
    /// Appends a placeholder for the transport's next message; returns its index.
    pub fn push_message(&self) -> usize {
        let n = self.messages.get();
        self.messages.set(n + 1);
        self.entries.borrow_mut().push(Entry::Message(n));
        n
    }
    /// Appends an operation or marker.
    pub fn push(&self, e: Entry) {
        self.entries.borrow_mut().push(e);
    }
    /// Takes everything recorded so far (message indices keep counting).
    pub fn take(&self) -> Vec<Entry> {
        std::mem::take(&mut self.entries.borrow_mut())
    }
}
