//! The launch contract of every kernel in `kernels/*.cu`, declared once on
//! the host side: each kernel's parameters (names and C types, in order) as
//! a typed argument struct, the names it is built under, the block size it
//! is written for, the dynamic shared memory it needs, and the layouts the
//! host and the kernels share (the decode step's scalars, the inline
//! row-run table). The tests of this module parse the `.cu` sources (macros
//! expanded) and check every declaration here against them, and that no
//! kernel of a source is left undeclared; so a kernel and its launches
//! cannot drift apart, and a new kernel variant is added by declaring it
//! here (and in `ALL`) and choosing it in `ops`.
//!
//! A parameter's type is written as the Rust stand-in of its C type:
//! `*const Storage` / `*mut Storage` for the kernel's storage type (`T`:
//! bf16, f16 or float), `*const f32`, `*mut u8` (`unsigned char*`),
//! `*const u32` (`unsigned*`), `*const i32` (`int*`), `*const f64`
//! (`double*`), `*const u64`, and the scalars `u64`, `i32` (`int`), `f32`
//! (`float`), [`RunTable`] (`const RunTable`, passed by value) and
//! [`TensorMap`] (`const TensorMap`, a TMA tensor map passed by value).
//!
//! This module must not launch (see `launch`) or pick kernels (see `ops`).

use super::args::{ArgValue, DevPtr, TensorMap};
use super::kernels::KernelFile;
use crate::backend::Dtype;
use std::ffi::c_void;

mod constants;
pub use constants::*;

/// Dynamic shared memory of `prefill_general` for `head_dim` (the
/// source's `PREFILL_SMEM_BYTES`): K and V tiles of [`PREFILL_TILE`] rows
/// of pitch `head_dim + 1` and one query row per warp, as f32.
pub const fn prefill_shared_bytes(head_dim: u32) -> u32 {
    (2 * PREFILL_TILE * (head_dim + 1) + PREFILL_WARPS * head_dim) * 4
}

/// Dynamic shared memory of a tensor-core prefill kernel at `head_dim`
/// (the source's `FLASH_SMEM_BYTES`): its query block plus two K and two V
/// tiles of [`FA_BN`] rows, rows of `2 * head_dim` bytes.
pub const fn flash_shared_bytes(head_dim: u32, warps: u32, fragments: u32) -> u32 {
    (16 * fragments * warps + 4 * FA_BN) * 2 * head_dim
}

/// Dynamic shared memory of `decode_bulk` for a group of `hg` heads of
/// `head_dim` elements of `elem_bytes` each (the source's
/// `DECODE_BULK_SMEM_BYTES`): room for [`DECODE_BULK_STAGES`] stages of
/// [`DECODE_BULK_ROWS`] K rows and as many V rows of the group's heads (a
/// block reading fewer K/V heads fits more stages in it), then a full and an
/// empty mbarrier for each of up to `DECODE_BULK_STAGES × hg` stages.
pub const fn decode_bulk_shared_bytes(hg: u32, head_dim: u32, elem_bytes: u32) -> u32 {
    DECODE_BULK_STAGES * 2 * DECODE_BULK_ROWS * hg * head_dim * elem_bytes + 16 * DECODE_BULK_STAGES * hg
}

/// The row runs of a copy passed by value: (src_row, dst_row, len,
/// first_flat_row) for up to [`INLINE_RUNS`] runs (`RunTable`, copy.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RunTable(pub [u64; 4 * INLINE_RUNS]);

impl ArgValue for RunTable {
    fn param_ptr(&self) -> *mut std::ffi::c_void {
        self as *const RunTable as *mut std::ffi::c_void
    }
}

/// The storage type of a kernel built per dtype: the `T` of the `.cu`
/// templates (bf16, f16 or float). Only a marker in parameter types.
pub enum Storage {}

/// What a pointer parameter points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pointee {
    Storage,
    F32,
    F64,
    I32,
    U32,
    U64,
    Byte,
}

impl Pointee {
    fn spelling(self, storage: Option<Dtype>) -> &'static str {
        match self {
            Pointee::Storage => match storage {
                Some(Dtype::Bf16) => "bf16",
                Some(Dtype::Fp16) => "f16",
                Some(Dtype::Fp32) => "float",
                None => "T",
            },
            Pointee::F32 => "float",
            Pointee::F64 => "double",
            Pointee::I32 => "int",
            Pointee::U32 => "unsigned",
            Pointee::U64 => "u64",
            Pointee::Byte => "unsigned char",
        }
    }
}

/// A kernel parameter's C type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CType {
    /// A device address; `writes`: not `const`.
    Ptr {
        to: Pointee,
        writes: bool,
    },
    U64,
    I32,
    F32,
    /// [`RunTable`] by value.
    RunTable,
    /// [`TensorMap`] by value (`const __grid_constant__ TensorMap`): the
    /// launch checks the tensor it maps as it does a `const T*`.
    TensorMap,
}

impl CType {
    /// The C spelling in a kernel built for `storage`, as the sources write it
    /// (`const bf16*`, `unsigned char*`, `u64`, `int`, `const RunTable`).
    pub fn spelling(self, storage: Option<Dtype>) -> String {
        match self {
            CType::Ptr { to, writes } => format!("{}{}*", if writes { "" } else { "const " }, to.spelling(storage)),
            CType::U64 => "u64".into(),
            CType::I32 => "int".into(),
            CType::F32 => "float".into(),
            CType::RunTable => "const RunTable".into(),
            CType::TensorMap => "const TensorMap".into(),
        }
    }
}

/// One parameter: its name in the source and its C type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: &'static str,
    pub ty: CType,
}

/// A Rust type that stands for a pointee C type.
pub trait PointeeType {
    const POINTEE: Pointee;
}

macro_rules! pointee {
    ($($t:ty => $p:ident),*) => {$(
        impl PointeeType for $t {
            const POINTEE: Pointee = Pointee::$p;
        }
    )*};
}
pointee!(Storage => Storage, f32 => F32, f64 => F64, i32 => I32, u32 => U32, u64 => U64, u8 => Byte);

/// A Rust type that stands for a parameter's C type: the type declared and
/// the value a launch passes for it.
pub trait CParam {
    const C: CType;
    type Value: ArgValue;
}

impl<P: PointeeType> CParam for *const P {
    const C: CType = CType::Ptr { to: P::POINTEE, writes: false };
    type Value = DevPtr;
}
impl<P: PointeeType> CParam for *mut P {
    const C: CType = CType::Ptr { to: P::POINTEE, writes: true };
    type Value = DevPtr;
}

macro_rules! scalar_param {
    ($($t:ty => $c:ident),*) => {$(
        impl CParam for $t {
            const C: CType = CType::$c;
            type Value = $t;
        }
    )*};
}
scalar_param!(u64 => U64, i32 => I32, f32 => F32, RunTable => RunTable, TensorMap => TensorMap);

/// The arguments of one kernel, in the order of its parameters.
pub trait KernelArgs {
    /// The parameters, as the source declares them.
    const PARAMS: &'static [Param];
    /// A pointer to each argument's value, in order.
    fn values(&self) -> Vec<*mut c_void>;
    /// The device address of each pointer argument (`None` for scalars).
    fn pointers(&self) -> Vec<Option<DevPtr>>;
}

/// Declares argument structs: one field per kernel parameter, in order,
/// typed by the parameter's C type (see the module docs).
macro_rules! kernel_args {
    ($( $(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty),* $(,)? } )*) => {$(
        $(#[$doc])*
        pub struct $name {
            $(pub $field: <$ty as CParam>::Value,)*
        }
        impl KernelArgs for $name {
            const PARAMS: &'static [Param] = &[$(Param { name: stringify!($field), ty: <$ty as CParam>::C },)*];
            fn values(&self) -> Vec<*mut c_void> {
                vec![$(ArgValue::param_ptr(&self.$field),)*]
            }
            fn pointers(&self) -> Vec<Option<DevPtr>> {
                vec![$(ArgValue::device_ptr(&self.$field),)*]
            }
        }
    )*};
}

kernel_args! {
    /// `gelu_*` (elementwise.cu): `x = gelu(x)` over `n` elements.
    GeluArgs { x: *mut Storage, n: u64 }
    /// `gelu_mul_*` (elementwise.cu): `gate = gelu(gate) * up`.
    GeluMulArgs { gate: *mut Storage, up: *const Storage, n: u64 }
    /// `silu_mul_*` (elementwise.cu): `gate = silu(gate) * up`.
    SiluMulArgs { gate: *mut Storage, up: *const Storage, n: u64 }
    /// `split_qkv_rope_*` (elementwise.cu): fused QKV rows into q, k, v with
    /// q and k rotated; positions from the step scalars (`step` non-null) or
    /// from up to two segments per sequence.
    SplitQkvRopeArgs {
        q: *mut Storage, k: *mut Storage, v: *mut Storage, qkv: *const Storage, inv_freq: *const f64, step: *const i32,
        rows: u64, q_width: i32, kv_width: i32, head_dim: i32, per_seq: i32, seg0_start: i32, seg0_len: i32, seg1_start: i32,
    }
    /// `add_*` (elementwise.cu): `x += y`.
    AddArgs { x: *mut Storage, y: *const Storage, n: u64 }
    /// `fill_uniform_*` (elementwise.cu): uniform values in `[-scale, scale)` from `seed`.
    FillUniformArgs { x: *mut Storage, n: u64, seed: u64, scale: f32 }
    /// `rmsnorm_*` (norm.cu): one block per row.
    RmsnormArgs { out: *mut Storage, x: *const Storage, w: *const Storage, rows: u64, cols: u64, eps: f32 }
    /// `embed_*` (embed.cu): token rows plus sinusoids, `n` positions per sequence from `pos0` (no sinusoid where `freq` is null).
    EmbedArgs { out: *mut Storage, table: *const Storage, tokens: *const u32, freq: *const f64, rows: u64, d: u64, n: u64, pos0: u64 }
    /// `embed_step_*` (embed.cu): tokens and position from the step scalars.
    EmbedStepArgs { out: *mut Storage, table: *const Storage, step: *const i32, freq: *const f64, rows: u64, d: u64 }
    /// `copy_rows_strided` (copy.cu): `rows` rows of `row_bytes` between pitched layouts.
    CopyRowsStridedArgs { dst: *mut u8, dst_pitch: u64, src: *const u8, src_pitch: u64, row_bytes: u64, rows: u64 }
    /// `copy_row_runs` (copy.cu): row runs from a table in device memory.
    CopyRowRunsArgs { dst: *mut u8, src: *const u8, row_bytes: u64, runs: *const u64, nruns: i32, total_rows: u64 }
    /// `copy_row_runs_inline` (copy.cu): up to [`INLINE_RUNS`] runs by value.
    CopyRowRunsInlineArgs { dst: *mut u8, src: *const u8, row_bytes: u64, runs: RunTable, nruns: i32, total_rows: u64 }
    /// `store_rows_at` (copy.cu): row n of `src` to the step's row of sequence n.
    StoreRowsAtArgs { dst: *mut u8, src: *const u8, row_bytes: u64, nseq: u64, cap: u64, step: *const i32 }
    /// `argmax_*` (argmax.cu): one block per row.
    ArgmaxArgs { x: *const Storage, out: *mut u32, rows: u64, cols: u64 }
    /// `merge_partials_*` (merge.cu): one warp per (sequence, head) row.
    MergePartialsArgs { o: *mut Storage, lse: *mut f32, o2: *const Storage, lse2: *const f32, rows: u64, d: u64 }
    /// `decode_partial_*` (decode.cu): one split-KV chunk per block, any head_dim.
    DecodePartialArgs {
        q: *const Storage, kc: *const Storage, vc: *const Storage, part_o: *mut f32, part_lse: *mut f32,
        cap: i32, len: i32, len_ptr: *const i32, heads: i32, kv_heads: i32, d: i32, tpr: i32, chunk: i32, scale_log2: f32,
    }
    /// `decode_rows_*` (decode.cu): whole cache rows of `hg` heads per block.
    DecodeRowsArgs {
        q: *const Storage, kc: *const Storage, vc: *const Storage, part_o: *mut f32, part_lse: *mut f32,
        cap: i32, len: i32, len_ptr: *const i32, heads: i32, kv_heads: i32, d: i32, hg: i32, chunk: i32, scale_log2: f32,
    }
    /// `decode_bulk_*` (decode.cu, sm_90 and newer): `decode_rows` fed by
    /// bulk copies into a ring of shared-memory stages, a producer warp more.
    DecodeBulkArgs {
        q: *const Storage, kc: *const Storage, vc: *const Storage, part_o: *mut f32, part_lse: *mut f32,
        cap: i32, len: i32, len_ptr: *const i32, heads: i32, kv_heads: i32, d: i32, hg: i32, chunk: i32, scale_log2: f32,
    }
    /// `decode_combine_*` (decode.cu): merges the chunks by their log-sum-exp.
    DecodeCombineArgs { part_o: *const f32, part_lse: *const f32, out: *mut Storage, lse: *mut f32, nsplit: i32, heads: i32, d: i32 }
    /// `prefill_general_*` (prefill.cu).
    PrefillGeneralArgs {
        q: *const Storage, k: *const Storage, v: *const Storage, out: *mut Storage, lse: *mut f32,
        sq: i32, skv: i32, kv_stride: i32, heads: i32, kv_heads: i32, d: i32, q_offset: i32, scale_log2: f32,
    }
    /// `router_top_k_*` (moe.cu): a warp per row, top `k` of `experts`.
    RouterTopKArgs { logits: *const Storage, ids: *mut f32, weights: *mut f32, rows: u64, experts: i32, k: i32 }
    /// `expert_count` (moe.cu): assignments per expert in each chunk.
    ExpertCountArgs { ids: *const f32, counts: *mut i32, n: u64, experts: i32 }
    /// `expert_offsets` (moe.cu): chunk ranks, expert totals and first rows.
    ExpertOffsetsArgs { counts: *mut i32, totals: *mut i32, starts: *mut i32, chunks: i32, experts: i32, capacity: i32 }
    /// `expert_place` (moe.cu): every assignment's slot, or -1 when dropped.
    ExpertPlaceArgs { ids: *const f32, slots: *mut f32, counts: *const i32, starts: *const i32, n: u64, experts: i32, capacity: i32 }
    /// `permute_rows` (moe.cu): token rows to their assignments' slots.
    PermuteRowsArgs { out: *mut u8, x: *const u8, slots: *const f32, n: u64, k: i32, row_bytes: u64, kept: u64 }
    /// `combine_rows_*` (moe.cu): expert rows summed into token rows by weight.
    CombineRowsArgs { out: *mut Storage, y: *const Storage, slots: *const f32, weights: *const f32, rows: u64, k: i32, cols: u64, y_rows: u64 }
    /// `flash_fwd_d{32,64,128}_*` (flash.cu): one of [`FA_HEAD_DIMS`], bf16/f16.
    FlashArgs {
        q: *const Storage, k: *const Storage, v: *const Storage, out: *mut Storage, lse: *mut f32,
        sq: i32, skv: i32, kv_stride: i32, heads: i32, kv_heads: i32, q_offset: i32, scale_log2: f32,
    }
    /// `flash_sm90_fwd_d128_*` and `flash_sm90_ftz_fwd_d128_*` (flash_sm90.cu,
    /// sm_90a): head_dim [`F3_D`], bf16/f16, Q, K and V read through tensor
    /// maps (K and V with the cache's sequence stride).
    FlashSm90Args {
        tq: TensorMap, tk: TensorMap, tv: TensorMap, out: *mut Storage, lse: *mut f32,
        sq: i32, skv: i32, heads: i32, kv_heads: i32, q_offset: i32, scale_log2: f32,
    }
}

/// The names a kernel is built under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelNames {
    /// One name per storage type (bf16, f16, f32); `None`: not built for it.
    Typed { base: &'static str, names: [Option<&'static str>; 3] },
    /// One name for every dtype (the byte copies).
    Untyped(&'static str),
}

impl KernelNames {
    /// The name to load for `dtype`.
    pub const fn name(&self, dtype: Dtype) -> Option<&'static str> {
        match self {
            KernelNames::Typed { names, .. } => match dtype {
                Dtype::Bf16 => names[0],
                Dtype::Fp16 => names[1],
                Dtype::Fp32 => names[2],
            },
            KernelNames::Untyped(n) => Some(n),
        }
    }
    /// The name without a dtype suffix.
    pub const fn base(&self) -> &'static str {
        match self {
            KernelNames::Typed { base, .. } => base,
            KernelNames::Untyped(n) => n,
        }
    }
    /// Every name with the storage type it is built for (`None`: untyped).
    #[cfg(test)]
    pub fn all(&self) -> Vec<(Option<Dtype>, &'static str)> {
        match self {
            KernelNames::Typed { names, .. } => [Dtype::Bf16, Dtype::Fp16, Dtype::Fp32].into_iter().zip(names).filter_map(|(d, n)| n.map(|n| (Some(d), n))).collect(),
            KernelNames::Untyped(n) => vec![(None, n)],
        }
    }
}

/// `base_bf16`, `base_f16` and `base_f32` (the `FAPOOL_FOR_EACH_TYPE` suffixes).
macro_rules! typed {
    ($base:literal) => {
        KernelNames::Typed { base: $base, names: [Some(concat!($base, "_bf16")), Some(concat!($base, "_f16")), Some(concat!($base, "_f32"))] }
    };
}

/// `base_bf16` and `base_f16`: a kernel built for the 16-bit types only.
macro_rules! typed_16bit {
    ($base:literal) => {
        KernelNames::Typed { base: $base, names: [Some(concat!($base, "_bf16")), Some(concat!($base, "_f16")), None] }
    };
}

/// The block sizes a kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// Exactly this many threads (the kernel sizes its work or shared
    /// arrays by it); the source's `__launch_bounds__`.
    Exactly(u32),
    /// Up to this many (the source's `__launch_bounds__`).
    AtMost(u32),
    /// Whole warps, up to this many of them: a limit set by the kernel's
    /// shared arrays (a `#define` of the source, in `SOURCE_CONSTANTS`),
    /// not by `__launch_bounds__`, which the source does not declare.
    WholeWarps(u32),
    /// Any block size (no `__launch_bounds__`).
    Any,
}

/// One kernel: where it lives, its names, its block size, its dynamic
/// shared memory for a launch with given arguments, and the shared-memory
/// carveout (percent of L1) to ask for.
pub struct Kernel<A> {
    pub file: KernelFile,
    pub names: KernelNames,
    pub block: Block,
    pub shared_bytes: fn(&A) -> u32,
    pub carveout: Option<i32>,
}

/// A kernel without its argument type, for the source checks.
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
pub struct KernelDecl {
    pub file: KernelFile,
    pub names: KernelNames,
    pub block: Block,
    pub params: &'static [Param],
}

#[cfg(test)]
impl<A: KernelArgs> Kernel<A> {
    pub const fn decl(&self) -> KernelDecl {
        KernelDecl { file: self.file, names: self.names, block: self.block, params: A::PARAMS }
    }
}

fn no_shared<A>(_: &A) -> u32 {
    0
}

/// Declares kernels and the list of all of them.
macro_rules! kernels {
    ($( $(#[$doc:meta])* $name:ident: $args:ty = $file:ident, $names:expr, $block:expr $(, shared $shared:expr)?; )* ; flash: $($flash:ident),*) => {
        $(
            $(#[$doc])*
            pub const $name: Kernel<$args> = Kernel {
                file: KernelFile::$file,
                names: $names,
                block: $block,
                shared_bytes: kernels!(@shared $($shared)?),
                carveout: None,
            };
        )*
        /// Every kernel of every source, for the checks against them.
        #[cfg(test)]
        pub const ALL: &[KernelDecl] = &[$($name.decl(),)* $($flash.kernel.decl(),)*];
    };
    (@shared) => { no_shared };
    (@shared $s:expr) => { $s };
}

kernels! {
    GELU: GeluArgs = Elementwise, typed!("gelu"), Block::Any;
    GELU_MUL: GeluMulArgs = Elementwise, typed!("gelu_mul"), Block::Any;
    SILU_MUL: SiluMulArgs = Elementwise, typed!("silu_mul"), Block::Any;
    SPLIT_QKV_ROPE: SplitQkvRopeArgs = Elementwise, typed!("split_qkv_rope"), Block::Any;
    ADD: AddArgs = Elementwise, typed!("add"), Block::Any;
    FILL_UNIFORM: FillUniformArgs = Elementwise, typed!("fill_uniform"), Block::Any;
    RMSNORM: RmsnormArgs = Norm, typed!("rmsnorm"), Block::AtMost(RMSNORM_THREADS);
    EMBED: EmbedArgs = Embed, typed!("embed"), Block::Any;
    EMBED_STEP: EmbedStepArgs = Embed, typed!("embed_step"), Block::Any;
    COPY_ROWS_STRIDED: CopyRowsStridedArgs = Copy, KernelNames::Untyped("copy_rows_strided"), Block::Any;
    COPY_ROW_RUNS: CopyRowRunsArgs = Copy, KernelNames::Untyped("copy_row_runs"), Block::Any;
    COPY_ROW_RUNS_INLINE: CopyRowRunsInlineArgs = Copy, KernelNames::Untyped("copy_row_runs_inline"), Block::Any;
    STORE_ROWS_AT: StoreRowsAtArgs = Copy, KernelNames::Untyped("store_rows_at"), Block::Any;
    ARGMAX: ArgmaxArgs = Argmax, typed!("argmax"), Block::AtMost(ARGMAX_THREADS);
    MERGE_PARTIALS: MergePartialsArgs = Merge, typed!("merge_partials"), Block::Any;
    DECODE_PARTIAL: DecodePartialArgs = Decode, typed!("decode_partial"), Block::Exactly(DECODE_THREADS);
    DECODE_ROWS: DecodeRowsArgs = Decode, typed!("decode_rows"), Block::AtMost(DECODE_ROWS_THREADS);
    DECODE_BULK: DecodeBulkArgs = Decode, typed_16bit!("decode_bulk"), Block::AtMost(32 + DECODE_ROWS_THREADS),
        shared |a| decode_bulk_shared_bytes(a.hg as u32, a.d as u32, a.q.element_bytes());
    DECODE_COMBINE: DecodeCombineArgs = Decode, typed!("decode_combine"), Block::WholeWarps(DECODE_COMBINE_MAX_WARPS);
    PREFILL_GENERAL: PrefillGeneralArgs = Prefill, typed!("prefill_general"), Block::Exactly(PREFILL_WARPS * 32),
        shared |a| prefill_shared_bytes(a.d as u32);
    /// The Hopper prefill kernel, its softmax's exp2 keeping denormal results.
    FLASH_SM90: FlashSm90Args = FlashSm90, typed_16bit!("flash_sm90_fwd_d128"), Block::Exactly(F3_THREADS), shared |_| F3_SMEM_BYTES;
    /// The same kernel with the exp2 flushing denormal results to zero.
    FLASH_SM90_FTZ: FlashSm90Args = FlashSm90, typed_16bit!("flash_sm90_ftz_fwd_d128"), Block::Exactly(F3_THREADS), shared |_| F3_SMEM_BYTES;
    ROUTER_TOP_K: RouterTopKArgs = Moe, typed!("router_top_k"), Block::Exactly(MOE_ROUTER_THREADS);
    EXPERT_COUNT: ExpertCountArgs = Moe, KernelNames::Untyped("expert_count"), Block::Exactly(MOE_CHUNK_THREADS);
    EXPERT_OFFSETS: ExpertOffsetsArgs = Moe, KernelNames::Untyped("expert_offsets"), Block::Exactly(MOE_MAX_EXPERTS as u32);
    EXPERT_PLACE: ExpertPlaceArgs = Moe, KernelNames::Untyped("expert_place"), Block::Exactly(MOE_CHUNK_THREADS);
    PERMUTE_ROWS: PermuteRowsArgs = Moe, KernelNames::Untyped("permute_rows"), Block::Exactly(MOE_ROWS_THREADS);
    COMBINE_ROWS: CombineRowsArgs = Moe, typed!("combine_rows"), Block::Exactly(MOE_ROWS_THREADS);
    ;
    flash: FLASH_D128_W8, FLASH_D128_W4, FLASH_D128_W4M2, FLASH_D64_W8, FLASH_D64_W4, FLASH_D64_W4M2, FLASH_D32_W8, FLASH_D32_W4, FLASH_D32_W4M2
}

/// A tensor-core prefill kernel (flash.cu): heads of `head_dim`, `warps`
/// warps per block, each owning `fragments` 16-row query fragments.
pub struct FlashVariant {
    pub kernel: Kernel<FlashArgs>,
    pub head_dim: u32,
    pub warps: u32,
    pub fragments: u32,
}

impl FlashVariant {
    /// Query rows per block.
    pub const fn rows_per_block(&self) -> u32 {
        16 * self.fragments * self.warps
    }
}

/// A flash variant of `FLASH(T, SUFFIX, D, WARPS, MF, NAME, MINB)`
/// (flash.cu), built for bf16 and f16 only.
macro_rules! flash_variant {
    ($base:literal, $d:literal, $warps:literal, $fragments:literal) => {
        FlashVariant {
            kernel: Kernel {
                file: KernelFile::Flash,
                names: KernelNames::Typed { base: $base, names: [Some(concat!($base, "_bf16")), Some(concat!($base, "_f16")), None] },
                block: Block::Exactly(32 * $warps),
                shared_bytes: |_| flash_shared_bytes($d, $warps, $fragments),
                // All of L1 as shared memory: the tiles bypass L1
                // (cp.async.cg), and two blocks of the 4-warp kernels fit
                // only with the largest carveout at head_dim 128.
                carveout: Some(100),
            },
            head_dim: $d,
            warps: $warps,
            fragments: $fragments,
        }
    };
}

/// Heads of 128: 8 warps of 16 query rows (`Flash128`).
pub const FLASH_D128_W8: FlashVariant = flash_variant!("flash_fwd_d128_w8", 128, 8, 1);
/// Heads of 128: 4 warps of 16 query rows (`Flash64`).
pub const FLASH_D128_W4: FlashVariant = flash_variant!("flash_fwd_d128_w4", 128, 4, 1);
/// Heads of 128: 4 warps of 32 query rows (`Flash128W4`).
pub const FLASH_D128_W4M2: FlashVariant = flash_variant!("flash_fwd_d128_w4m2", 128, 4, 2);
/// Heads of 64, the same three block shapes.
pub const FLASH_D64_W8: FlashVariant = flash_variant!("flash_fwd_d64_w8", 64, 8, 1);
pub const FLASH_D64_W4: FlashVariant = flash_variant!("flash_fwd_d64_w4", 64, 4, 1);
pub const FLASH_D64_W4M2: FlashVariant = flash_variant!("flash_fwd_d64_w4m2", 64, 4, 2);
/// Heads of 32, the same three block shapes.
pub const FLASH_D32_W8: FlashVariant = flash_variant!("flash_fwd_d32_w8", 32, 8, 1);
pub const FLASH_D32_W4: FlashVariant = flash_variant!("flash_fwd_d32_w4", 32, 4, 1);
pub const FLASH_D32_W4M2: FlashVariant = flash_variant!("flash_fwd_d32_w4m2", 32, 4, 2);

/// Every tensor-core variant: each block shape at each of [`FA_HEAD_DIMS`].
pub const FLASH_VARIANTS: [&FlashVariant; 9] = [&FLASH_D128_W8, &FLASH_D128_W4, &FLASH_D128_W4M2, &FLASH_D64_W8, &FLASH_D64_W4, &FLASH_D64_W4M2, &FLASH_D32_W8, &FLASH_D32_W4, &FLASH_D32_W4M2];

#[cfg(test)]
mod tests;
