//! The numbers the host and the kernel sources share: the decode step's
//! scalar layout, tile and block sizes, shared-memory sizes and limits,
//! each the value of a `#define` in `kernels/` (checked by the contract's
//! tests through [`SOURCE_CONSTANTS`]).

/// The decode step's scalars are int32 values in device memory at these
/// indices (`FAPOOL_STEP_*` in `kernels/common.cuh`): the position, the
/// cache row to store the new K/V at (-1: none), the length to attend over,
/// and from [`STEP_TOKENS`] on the token of each sequence.
pub const STEP_POS: usize = 0;
pub const STEP_STORE_AT: usize = 1;
pub const STEP_LEN: usize = 2;
pub const STEP_TOKENS: usize = 4;

/// Row runs `copy_row_runs_inline` takes by value (`INLINE_RUNS`, copy.cu).
pub const INLINE_RUNS: usize = 8;
/// Bytes of row a copy block takes at a time (`COPY_TILE_BYTES`, copy.cu).
pub const COPY_TILE_BYTES: usize = 16_384;

/// Threads per block the fixed-size kernels are written for.
pub const RMSNORM_THREADS: u32 = 256;
pub const ARGMAX_THREADS: u32 = 256;
pub const DECODE_THREADS: u32 = 128;
pub const DECODE_ROWS_THREADS: u32 = 512;
/// Warps (query rows) per block of the general prefill kernel, and the
/// key/value rows it stages per tile.
pub const PREFILL_WARPS: u32 = 8;
pub const PREFILL_TILE: u32 = 32;
/// The largest head_dim the general prefill kernel handles.
pub const PREFILL_MAX_D: u32 = 256;
/// The head_dims the tensor-core prefill kernels are built for (one
/// instantiation of flash.cu's template per head_dim and block shape), and
/// the key/value rows of their tiles.
pub const FA_HEAD_DIMS: [u32; 3] = [32, 64, 128];
pub const FA_BN: u32 = 64;
/// The Hopper prefill kernel (flash_sm90.cu): threads per block (a
/// producer and two consumer warpgroups), query rows per block, keys per
/// K/V tile, head_dim, and the bytes of one 64-column half of a 128-row
/// tile (what one TMA box moves).
pub const F3_THREADS: u32 = 384;
pub const F3_BM: u32 = 128;
pub const F3_BN: u32 = 128;
pub const F3_D: u32 = 128;
pub const F3_HALF_BYTES: u32 = 128 * 128;
/// Its dynamic shared memory (the source's `F3_SMEM_BYTES`): the Q block,
/// two K and two V stages of two halves each, nine mbarriers, and 1 KiB of
/// slack to align the tiles to the 1 KiB of the swizzle atoms.
pub const F3_SMEM_BYTES: u32 = 5 * 2 * F3_HALF_BYTES + 8 * 9 + 1024;
/// Rows of K and of V per stage and stages of the bulk-copy decode kernel's
/// ring (decode.cu's `DECODE_BULK_*`).
pub const DECODE_BULK_ROWS: u32 = 4;
pub const DECODE_BULK_STAGES: u32 = 3;
/// Half the largest head_dim `split_qkv_rope` rotates (its shared tables
/// of cosines and sines).
pub const ROPE_MAX_HALF: u32 = 128;
/// The most warps `decode_combine` takes (its shared arrays hold one entry
/// per warp).
pub const DECODE_COMBINE_MAX_WARPS: u32 = 8;

/// The mixture-of-experts kernels (moe.cu): threads of the router (a warp
/// per row), the most experts and the largest top-k it handles, the
/// assignments per block of the count and place kernels and their
/// threads, and the threads of the row kernels (a warp per row).
pub const MOE_ROUTER_THREADS: u32 = 256;
pub const MOE_MAX_EXPERTS: usize = 256;
pub const MOE_MAX_TOP_K: usize = 8;
pub const MOE_CHUNK: usize = 1024;
pub const MOE_CHUNK_THREADS: u32 = 256;
pub const MOE_ROWS_THREADS: u32 = 256;

/// The `#define`s of the kernel sources the host relies on, with the
/// values it uses (checked by the tests).
#[cfg(test)]
pub const SOURCE_CONSTANTS: &[(&str, u64)] = &[
    ("FAPOOL_STEP_POS", STEP_POS as u64),
    ("FAPOOL_STEP_STORE_AT", STEP_STORE_AT as u64),
    ("FAPOOL_STEP_LEN", STEP_LEN as u64),
    ("FAPOOL_STEP_TOKENS", STEP_TOKENS as u64),
    ("INLINE_RUNS", INLINE_RUNS as u64),
    ("COPY_TILE_BYTES", COPY_TILE_BYTES as u64),
    ("RMSNORM_THREADS", RMSNORM_THREADS as u64),
    ("ARGMAX_THREADS", ARGMAX_THREADS as u64),
    ("DECODE_THREADS", DECODE_THREADS as u64),
    ("DECODE_ROWS_THREADS", DECODE_ROWS_THREADS as u64),
    ("PREFILL_WARPS", PREFILL_WARPS as u64),
    ("PREFILL_TILE", PREFILL_TILE as u64),
    ("PREFILL_MAX_D", PREFILL_MAX_D as u64),
    ("FA_BN", FA_BN as u64),
    ("F3_THREADS", F3_THREADS as u64),
    ("F3_BM", F3_BM as u64),
    ("F3_BN", F3_BN as u64),
    ("F3_D", F3_D as u64),
    ("F3_HALF_BYTES", F3_HALF_BYTES as u64),
    ("F3_SMEM_BYTES", F3_SMEM_BYTES as u64),
    ("DECODE_BULK_ROWS", DECODE_BULK_ROWS as u64),
    ("DECODE_BULK_STAGES", DECODE_BULK_STAGES as u64),
    ("DECODE_COMBINE_MAX_WARPS", DECODE_COMBINE_MAX_WARPS as u64),
    ("MOE_ROUTER_THREADS", MOE_ROUTER_THREADS as u64),
    ("MOE_MAX_EXPERTS", MOE_MAX_EXPERTS as u64),
    ("MOE_MAX_TOP_K", MOE_MAX_TOP_K as u64),
    ("MOE_CHUNK", MOE_CHUNK as u64),
    ("MOE_CHUNK_THREADS", MOE_CHUNK_THREADS as u64),
    ("MOE_ROWS_THREADS", MOE_ROWS_THREADS as u64),
    ("ROPE_MAX_HALF", ROPE_MAX_HALF as u64),
];
