// Causal prefill attention for Hopper (sm_90a only): head_dim 128, bf16 or
// fp16, warp-specialised in the manner of FlashAttention-3.
//
// A block of three warpgroups owns BM = 128 query rows of one (sequence,
// head). Warpgroup 0 is the producer: one thread issues TMA bulk tensor
// copies (cp.async.bulk.tensor) of the Q block and of K and V tiles of
// BN = 128 keys into a ring of F3_STAGES shared-memory stages; every copy
// completes on an mbarrier ("full"), and the consumers hand each stage back
// on another one ("empty"). Warpgroups 1 and 2 are consumers of 64 query rows
// each: S = Q K^T runs on wgmma with both operands in shared memory, the
// online softmax works on the S accumulators in registers, and O += P V runs
// on wgmma with P re-packed into registers as the A operand (no shared-memory
// round trip) and V read transposed from shared memory.
//
// Overlap, as in FlashAttention-3:
// - within a warpgroup, tile j's Q K^T is issued together with tile j-1's
//   P V, so the softmax of tile j runs while P V of tile j-1 is still on the
//   tensor cores;
// - between the two consumer warpgroups, a pair of named barriers makes them
//   take turns issuing their GEMMs (ping-pong), so one's softmax overlaps the
//   other's GEMMs;
// - setmaxnreg moves registers from the producer (24 per thread) to the
//   consumers (240 per thread).
//
// Key tiles are visited from the first to the last (F3_ASCENDING), so the
// blocks of one head that run at the same time read the same K/V tiles at
// about the same time and share them in L2; only the tiles that cross the
// causal diagonal or the end of K are masked. Tiles wholly above the
// diagonal are never loaded.
//
// Tensor maps (built on the host with cuTensorMapEncodeTiled, passed by value
// as __grid_constant__ parameters) see Q as [nseq][sq][heads][128] and K, V as
// [nseq][skv][kv_heads][128] with a sequence stride of kv_seq_stride rows
// (query head h loads K/V head h / (heads / kv_heads): grouped-query
// attention is a coordinate of the K/V loads, nothing more), so
// rows past sq or skv of a sequence read as zeros. The box is 64 columns (128
// bytes, the 128-byte swizzle's span) by 128 rows: each tile arrives as two
// 16 KiB halves (columns 0-63, 64-127), each a stack of 8-row, 1 KiB swizzle
// atoms, which is the canonical K-major layout wgmma reads for Q and K and the
// canonical MN-major layout it reads for V.
//
// Same outputs as flash.cu and prefill.cu: O [nseq][sq][heads][128] and the
// natural-log log-sum-exp [nseq][heads][sq] (-inf for a row without keys).
//
// Each kernel is built twice: flash_sm90_* and flash_sm90_ftz_*, which differ
// only in the softmax's exp2 (f3_exp2: denormal results kept, or flushed to
// zero).

#define F3_D 128
#define F3_BM 128
#define F3_BN 128
#ifndef F3_STAGES  // K/V ring depth (3 fits in shared memory too; measured in docs/perf-notes.md)
#define F3_STAGES 2
#endif
#ifndef F3_ASCENDING  // 0 visits key tiles from the diagonal down (masked tiles first), as FlashAttention-3
#define F3_ASCENDING 1
#endif
#ifndef F3_PINGPONG  // 0 lets both consumer warpgroups issue whenever they are ready
#define F3_PINGPONG 1
#endif
#define F3_THREADS 384
#define F3_HALF_BYTES (128 * 128)                          // one 64-column half of a 128-row tile
#define F3_TILE_BYTES (2 * F3_HALF_BYTES)                  // a Q block or one K or V tile: 32 KiB
#define F3_BAR_OFFSET ((1 + 2 * F3_STAGES) * F3_TILE_BYTES)  // barriers after Q, K stages, V stages

// The driver's CUtensorMap: 128 opaque bytes, 64-byte aligned (NVRTC has no cuda.h).
struct __align__(64) TensorMap {
    unsigned long long opaque[16];
};

// cta_addr and the mbarriers (mbar_*): common.cuh.

// ---- TMA -------------------------------------------------------------------

// One box of the 4-d tensor map into shared memory at `dst` (1024-byte
// aligned), completing `bytes` of transactions on `bar`. Coordinates are
// innermost first: (column, head, row, sequence).
__device__ __forceinline__ void tma_load(unsigned dst, const TensorMap* map, unsigned bar, int col, int head, int row,
                                         int seq) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(col), "r"(head), "r"(row), "r"(seq), "r"(bar)
        : "memory");
}
// Both 64-column halves of a 128-row tile.
__device__ __forceinline__ void tma_load_tile(unsigned dst, const TensorMap* map, unsigned bar, int head, int row,
                                              int seq) {
    mbar_arrive_expect_tx(bar, F3_TILE_BYTES);
    tma_load(dst, map, bar, 0, head, row, seq);
    tma_load(dst + F3_HALF_BYTES, map, bar, 64, head, row, seq);
}

// ---- wgmma -----------------------------------------------------------------

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading
// and stride byte offsets (all in 16-byte units).
__device__ __forceinline__ u64 gmma_desc(unsigned addr, unsigned lead_bytes, unsigned stride_bytes) {
    return (u64)((addr & 0x3ffffu) >> 4) | ((u64)(lead_bytes >> 4) << 16) | ((u64)(stride_bytes >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across a
// wgmma wait (the asm statements of the MMAs do not say when they finish).
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void reg_fence(unsigned& r) { asm volatile("" : "+r"(r)::"memory"); }
template <int N> __device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) reg_fence(r[i]);
}
template <int N> __device__ __forceinline__ void reg_fence(unsigned (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) reg_fence(r[i]);
}

#define F3_ACC_REGS                                                                                              \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
    "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define F3_ACC8(i)                                                                                             \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
        "+f"(d[i + 7])
#define F3_ACC64 F3_ACC8(0), F3_ACC8(8), F3_ACC8(16), F3_ACC8(24), F3_ACC8(32), F3_ACC8(40), F3_ACC8(48), F3_ACC8(56)

// D (64 x 128, f32) += A (64 x 16, shared, K-major) * B (16 x 128, shared,
// K-major); D is zeroed first when `accumulate` is 0.
#define F3_WGMMA_SS(TY)                                                                                        \
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n wgmma.mma_async.sync.aligned.m64n128k16.f32." TY \
                 "." TY " " F3_ACC_REGS ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                      \
                 : F3_ACC64                                                                                    \
                 : "l"(da), "l"(db), "r"(accumulate))
__device__ __forceinline__ void wgmma_ss(bf16, float (&d)[64], u64 da, u64 db, int accumulate) { F3_WGMMA_SS("bf16"); }
__device__ __forceinline__ void wgmma_ss(f16, float (&d)[64], u64 da, u64 db, int accumulate) { F3_WGMMA_SS("f16"); }

// D (64 x 128, f32) += A (64 x 16, registers) * B (16 x 128, shared,
// MN-major, i.e. read transposed).
#define F3_WGMMA_RS(TY)                                                                                        \
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %69, 0;\n wgmma.mma_async.sync.aligned.m64n128k16.f32." TY \
                 "." TY " " F3_ACC_REGS ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                         \
                 : F3_ACC64                                                                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))
__device__ __forceinline__ void wgmma_rs(bf16, float (&d)[64], const unsigned* a, u64 db) { F3_WGMMA_RS("bf16"); }
__device__ __forceinline__ void wgmma_rs(f16, float (&d)[64], const unsigned* a, u64 db) { F3_WGMMA_RS("f16"); }

__device__ __forceinline__ unsigned pack_pair(bf16, float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ unsigned pack_pair(f16, float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// S (this warpgroup's 64 rows x 128 keys) = Q K^T: eight k-steps of 16 over
// d, four in each 64-column half. Both tiles are K-major, 8-row atoms 1 KiB apart.
template <typename T> __device__ __forceinline__ void gemm_qk(float (&s)[64], unsigned q_rows, unsigned k_tile) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        const unsigned off = (kk >> 2) * F3_HALF_BYTES + (kk & 3) * 32;
        wgmma_ss(T(), s, gmma_desc(q_rows + off, 16, 1024), gmma_desc(k_tile + off, 16, 1024), kk > 0);
    }
}

// O += P V: eight k-steps of 16 keys; V is MN-major (d contiguous): the two
// 64-column halves are F3_HALF_BYTES apart (leading offset), 8-key atoms
// 1 KiB apart (stride offset), 16 keys = 2 KiB per k-step.
template <typename T> __device__ __forceinline__ void gemm_pv(float (&o)[64], const unsigned (&p)[32], unsigned v_tile) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_rs(T(), o, &p[4 * kk], gmma_desc(v_tile + kk * 2048, F3_HALF_BYTES, 1024));
}

// Waits for every MMA of the warpgroup once the softmax of `s` is done. Left
// to itself, ptxas hoists the wait above the softmax (nothing ties them), so
// tile j's softmax would no longer overlap tile j-1's P V: the register
// fences pin the softmax before this point, and the two-way branch (on a
// value that is never 0; both ways wait) puts the wait in a basic block of
// its own, which ptxas does not schedule across.
__device__ __forceinline__ void wait_all_after_softmax(float (&s)[64], float& alpha_a, float& alpha_b,
                                                       float scale_log2) {
    reg_fence(s);
    reg_fence(alpha_a);
    reg_fence(alpha_b);
    if (scale_log2 != 0.0f)
        wg_wait<0>();
    else
        wg_wait<0>();
}

// ---- ping-pong between the consumer warpgroups -----------------------------

// Named barriers 1 and 2 (0 is __syncthreads): consumer `cw` waits on 1 + cw
// before issuing its GEMMs, then lets the other one go.
__device__ __forceinline__ void turn_wait(int cw) {
    if (F3_PINGPONG) asm volatile("bar.sync %0, 256;\n" ::"r"(1 + cw) : "memory");
}
__device__ __forceinline__ void turn_pass(int to) {
    if (F3_PINGPONG) asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + to) : "memory");
}

// ---- the consumer's softmax ------------------------------------------------

// Masks keys past the causal diagonal or the end of K, for a tile whose first
// key is `n0`. Accumulator element 4j+e is row a (e < 2) or b, key
// n0 + 8j + 2*(lane%4) + (e&1).
__device__ __forceinline__ void mask_tile(float (&s)[64], int n0, int lane, int qpos_a, int qpos_b, int skv) {
    const int lim_a = min(qpos_a + 1, skv), lim_b = min(qpos_b + 1, skv);  // first masked key of each row
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int col = n0 + 8 * j + 2 * (lane & 3);
        if (col >= lim_a) s[4 * j] = FAPOOL_NEG_INF;
        if (col + 1 >= lim_a) s[4 * j + 1] = FAPOOL_NEG_INF;
        if (col >= lim_b) s[4 * j + 2] = FAPOOL_NEG_INF;
        if (col + 1 >= lim_b) s[4 * j + 3] = FAPOOL_NEG_INF;
    }
}

// The softmax's exp2. FTZ = false: common.cuh's fast_exp2 (ex2.approx.f32),
// which ptxas compiles to a range test, a pre-scale, MUFU.EX2 and a
// post-scale so that results below 2^-126 come out as denormals. FTZ = true:
// ex2.approx.ftz.f32, MUFU.EX2 alone, which flushes those results (and
// denormal arguments) to zero. Scores are taken relative to the row's running
// maximum, whose own term is 1, so only probabilities and rescale factors
// below 2^-126 of it change. The two kernels are built side by side
// (flash_sm90 and flash_sm90_ftz) so that both can be checked and timed.
template <bool FTZ> __device__ __forceinline__ float f3_exp2(float x) {
    if (!FTZ) return fast_exp2(x);
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Online softmax of one tile, rows a and b of this thread: updates the
// running maxima (of raw scores) and this thread's share of the row sums,
// replaces the scores by exp2(s * scale_log2 - max * scale_log2), sets the
// factors the previous O must be scaled by, and returns whether a maximum
// moved (if none did, both factors are 1).
template <bool FTZ>
__device__ __forceinline__ bool softmax_tile(float (&s)[64], float& m_a, float& m_b, float& l_a, float& l_b,
                                             float& alpha_a, float& alpha_b, float scale_log2) {
    float mx_a = m_a, mx_b = m_b;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        mx_a = fmaxf(mx_a, fmaxf(s[4 * j], s[4 * j + 1]));
        mx_b = fmaxf(mx_b, fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    // A row that has seen no key keeps max -inf; use 0 so no inf - inf appears.
    const float ms_a = (mx_a == FAPOOL_NEG_INF ? 0.0f : mx_a) * scale_log2;
    const float ms_b = (mx_b == FAPOOL_NEG_INF ? 0.0f : mx_b) * scale_log2;
    alpha_a = f3_exp2<FTZ>(m_a * scale_log2 - ms_a);
    alpha_b = f3_exp2<FTZ>(m_b * scale_log2 - ms_b);
    const bool moved = mx_a != m_a || mx_b != m_b;
    m_a = mx_a;
    m_b = mx_b;
    float sa0 = 0.0f, sa1 = 0.0f, sb0 = 0.0f, sb1 = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        s[4 * j] = f3_exp2<FTZ>(fmaf(s[4 * j], scale_log2, -ms_a));
        s[4 * j + 1] = f3_exp2<FTZ>(fmaf(s[4 * j + 1], scale_log2, -ms_a));
        s[4 * j + 2] = f3_exp2<FTZ>(fmaf(s[4 * j + 2], scale_log2, -ms_b));
        s[4 * j + 3] = f3_exp2<FTZ>(fmaf(s[4 * j + 3], scale_log2, -ms_b));
        sa0 += s[4 * j];
        sa1 += s[4 * j + 1];
        sb0 += s[4 * j + 2];
        sb1 += s[4 * j + 3];
    }
    l_a = l_a * alpha_a + (sa0 + sa1);
    l_b = l_b * alpha_b + (sb0 + sb1);
    return moved;
}

// P as the A fragments of P V: the accumulators of keys 16kk..16kk+15 are
// elements 8kk..8kk+7, and the register A layout of m64nNk16 pairs them in order.
template <typename T> __device__ __forceinline__ void pack_p(unsigned (&p)[32], const float (&s)[64]) {
#pragma unroll
    for (int i = 0; i < 32; ++i) p[i] = pack_pair(T(), s[2 * i], s[2 * i + 1]);
}

__device__ __forceinline__ void rescale_o(float (&o)[64], float alpha_a, float alpha_b) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        o[4 * j] *= alpha_a;
        o[4 * j + 1] *= alpha_a;
        o[4 * j + 2] *= alpha_b;
        o[4 * j + 3] *= alpha_b;
    }
}

// Shared-memory addresses of one block, 1024-byte aligned (the swizzle atoms').
struct F3Smem {
    unsigned q, k, v, bars;
    __device__ unsigned k_tile(int stage) const { return k + stage * F3_TILE_BYTES; }
    __device__ unsigned v_tile(int stage) const { return v + stage * F3_TILE_BYTES; }
    __device__ unsigned q_full() const { return bars; }
    __device__ unsigned k_full(int stage) const { return bars + 8 * (1 + stage); }
    __device__ unsigned k_empty(int stage) const { return bars + 8 * (1 + F3_STAGES + stage); }
    __device__ unsigned v_full(int stage) const { return bars + 8 * (1 + 2 * F3_STAGES + stage); }
    __device__ unsigned v_empty(int stage) const { return bars + 8 * (1 + 3 * F3_STAGES + stage); }
};

// Consumers release a stage per warp: 4 warps in each of the 2 warpgroups.
#define F3_CONSUMER_WARPS 8

// The key tile visited i-th.
__device__ __forceinline__ int tile_of(int i, int n_tiles) { return F3_ASCENDING ? i : n_tiles - 1 - i; }

// The producer thread: Q, then K of every tile, each tile's V one step later
// (the consumers need tile i's K before tile i-1's V).
__device__ __forceinline__ void f3_produce(const F3Smem& sm, const TensorMap* tq, const TensorMap* tk,
                                           const TensorMap* tv, int m0, int h, int hk, int n, int n_tiles) {
    bool ok = true;
    tma_load_tile(sm.q, tq, sm.q_full(), h, m0, n);
    for (int i = 0; i <= n_tiles; ++i) {
        if (i < n_tiles) {
            const int stage = i % F3_STAGES, round = i / F3_STAGES;
            mbar_wait(sm.k_empty(stage), (round & 1) ^ 1, ok);
            tma_load_tile(sm.k_tile(stage), tk, sm.k_full(stage), hk, tile_of(i, n_tiles) * F3_BN, n);
        }
        if (i > 0) {
            const int j = i - 1, stage = j % F3_STAGES, round = j / F3_STAGES;
            mbar_wait(sm.v_empty(stage), (round & 1) ^ 1, ok);
            tma_load_tile(sm.v_tile(stage), tv, sm.v_full(stage), hk, tile_of(j, n_tiles) * F3_BN, n);
        }
    }
}

template <typename T, bool FTZ>
__device__ __forceinline__ void f3_consume(const F3Smem& sm, int cw, T* __restrict__ out, float* __restrict__ lse,
                                           int sq, int skv, int heads, int q_offset, float scale_log2, int m0, int h,
                                           int n, int n_tiles) {
    const int tid = threadIdx.x - 128 * (1 + cw);
    const int warp = tid >> 5, lane = tid & 31;
    const int row_a = m0 + 64 * cw + 16 * warp + (lane >> 2), row_b = row_a + 8;
    const int qpos_a = q_offset + row_a, qpos_b = q_offset + row_b;
    const int wg_first_pos = q_offset + m0 + 64 * cw;  // this warpgroup's smallest query position
    const unsigned q_rows = sm.q + cw * (64 * 128);

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;
    float m_a = FAPOOL_NEG_INF, m_b = FAPOOL_NEG_INF, l_a = 0.0f, l_b = 0.0f;
    bool ok = true;

    if (n_tiles > 0) {
        float s[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) s[i] = 0.0f;
        unsigned p[32];
        float alpha_a, alpha_b;
        // The first warpgroup takes the first turn (see turn_wait).
        if (cw == 0 && n_tiles > 1) turn_pass(0);
        mbar_wait(sm.q_full(), 0, ok);

        // The first tile visited: Q K^T alone.
        {
            const int n0 = tile_of(0, n_tiles) * F3_BN;
            mbar_wait(sm.k_full(0), 0, ok);
            wg_fence();
            gemm_qk<T>(s, q_rows, sm.k_tile(0));
            wg_commit();
            wg_wait<0>();
            reg_fence(s);
            if (lane == 0) mbar_arrive(sm.k_empty(0));
            if (n0 + F3_BN - 1 > wg_first_pos || n0 + F3_BN > skv) mask_tile(s, n0, lane, qpos_a, qpos_b, skv);
            softmax_tile<FTZ>(s, m_a, m_b, l_a, l_b, alpha_a, alpha_b, scale_log2);
            pack_p<T>(p, s);
        }
        // Tile i's Q K^T together with tile i-1's P V.
        for (int i = 1; i < n_tiles; ++i) {
            const int stage = i % F3_STAGES, round = i / F3_STAGES;
            const int pstage = (i - 1) % F3_STAGES, pround = (i - 1) / F3_STAGES;
            const int n0 = tile_of(i, n_tiles) * F3_BN;
            mbar_wait(sm.k_full(stage), round & 1, ok);
            turn_wait(cw);
            wg_fence();
            gemm_qk<T>(s, q_rows, sm.k_tile(stage));
            wg_commit();
            mbar_wait(sm.v_full(pstage), pround & 1, ok);
            wg_fence();
            gemm_pv<T>(o, p, sm.v_tile(pstage));
            wg_commit();
            turn_pass(1 - cw);
            wg_wait<1>();
            reg_fence(s);
            if (lane == 0) mbar_arrive(sm.k_empty(stage));
            if (n0 + F3_BN - 1 > wg_first_pos || n0 + F3_BN > skv) mask_tile(s, n0, lane, qpos_a, qpos_b, skv);
            const bool moved = softmax_tile<FTZ>(s, m_a, m_b, l_a, l_b, alpha_a, alpha_b, scale_log2);
            wait_all_after_softmax(s, alpha_a, alpha_b, scale_log2);
            reg_fence(o);
            reg_fence(p);
            if (lane == 0) mbar_arrive(sm.v_empty(pstage));
            pack_p<T>(p, s);
            // Most tiles of a long row leave every maximum where it was: then
            // the warp skips the 64 multiplications (the factors are 1).
            if (__any_sync(0xffffffffu, moved)) rescale_o(o, alpha_a, alpha_b);
        }
        // The last tile's P V.
        {
            const int j = n_tiles - 1, stage = j % F3_STAGES, round = j / F3_STAGES;
            mbar_wait(sm.v_full(stage), round & 1, ok);
            wg_fence();
            gemm_pv<T>(o, p, sm.v_tile(stage));
            wg_commit();
            wg_wait<0>();
            reg_fence(o);
            if (lane == 0) mbar_arrive(sm.v_empty(stage));
        }
        // Consume the second warpgroup's last pass, so both barriers end balanced.
        if (cw == 0 && n_tiles > 1) turn_wait(0);
    }

    // Epilogue: finish the row sums across the quad, normalise, store.
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    // A pipeline that timed out (see mbar_wait) poisons its rows.
    const float inv_a = !ok ? __int_as_float(0x7fc00000) : l_a > 0.0f ? 1.0f / l_a : 0.0f;
    const float inv_b = !ok ? __int_as_float(0x7fc00000) : l_b > 0.0f ? 1.0f / l_b : 0.0f;
    const u64 ld = (u64)heads * F3_D;
    T* oa = out + ((u64)n * sq + row_a) * ld + (u64)h * F3_D + 2 * (lane & 3);
    T* ob = oa + 8 * ld;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        if (row_a < sq) *reinterpret_cast<unsigned*>(oa + 8 * j) = pack_pair(T(), o[4 * j] * inv_a, o[4 * j + 1] * inv_a);
        if (row_b < sq)
            *reinterpret_cast<unsigned*>(ob + 8 * j) = pack_pair(T(), o[4 * j + 2] * inv_b, o[4 * j + 3] * inv_b);
    }
    if ((lane & 3) == 0) {
        float* lrow = lse + ((u64)n * heads + h) * sq;
        if (row_a < sq) lrow[row_a] = l_a > 0.0f ? (m_a * scale_log2 + log2f(l_a)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
        if (row_b < sq) lrow[row_b] = l_b > 0.0f ? (m_b * scale_log2 + log2f(l_b)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
    }
}

// Grid: (query blocks, heads, sequences), the longest query blocks (most
// keys) first. Dynamic shared memory: F3_SMEM_BYTES.
#define F3_SMEM_BYTES (F3_BAR_OFFSET + 8 * (1 + 4 * F3_STAGES) + 1024)

template <typename T, bool FTZ>
__device__ __forceinline__ void flash_sm90_fwd(const TensorMap* tq, const TensorMap* tk, const TensorMap* tv,
                                               T* __restrict__ out, float* __restrict__ lse, int sq, int skv,
                                               int heads, int kv_heads, int q_offset, float scale_log2) {
    extern __shared__ unsigned char f3_smem[];
    F3Smem sm;
    sm.q = (cta_addr(f3_smem) + 1023u) & ~1023u;
    sm.k = sm.q + F3_TILE_BYTES;
    sm.v = sm.k + F3_STAGES * F3_TILE_BYTES;
    sm.bars = sm.q + F3_BAR_OFFSET;

    const int mblock = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, n = blockIdx.z;
    const int m0 = mblock * F3_BM;
    // Keys any row of this block may see.
    const int last_row = min(m0 + F3_BM, sq) - 1;
    const int block_keys = min(q_offset + last_row + 1, skv);
    const int n_tiles = block_keys > 0 ? (block_keys + F3_BN - 1) / F3_BN : 0;

    if (threadIdx.x == 0) {
        mbar_init(sm.q_full(), 1);
        for (int s = 0; s < F3_STAGES; ++s) {
            mbar_init(sm.k_full(s), 1);
            mbar_init(sm.v_full(s), 1);
            mbar_init(sm.k_empty(s), F3_CONSUMER_WARPS);
            mbar_init(sm.v_empty(s), F3_CONSUMER_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    const int wg = threadIdx.x / 128;
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x == 0 && n_tiles > 0) f3_produce(sm, tq, tk, tv, m0, h, h / (heads / kv_heads), n, n_tiles);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
        f3_consume<T, FTZ>(sm, wg - 1, out, lse, sq, skv, heads, q_offset, scale_log2, m0, h, n, n_tiles);
    }
}

// NAME_fwd_d128_SUFFIX: flash_sm90 (the softmax's exp2 keeps denormal
// results) and flash_sm90_ftz (it flushes them to zero; see f3_exp2).
#define FLASH_SM90(T, SUFFIX, NAME, FTZ)                                                                    \
    extern "C" __global__ void __launch_bounds__(F3_THREADS, 1)                                             \
        NAME##_fwd_d128_##SUFFIX(const __grid_constant__ TensorMap tq, const __grid_constant__ TensorMap tk, \
                                 const __grid_constant__ TensorMap tv, T* out, float* lse, int sq, int skv,  \
                                 int heads, int kv_heads, int q_offset, float scale_log2) {                 \
        flash_sm90_fwd<T, FTZ>(&tq, &tk, &tv, out, lse, sq, skv, heads, kv_heads, q_offset, scale_log2);    \
    }

FLASH_SM90(bf16, bf16, flash_sm90, false)
FLASH_SM90(f16, f16, flash_sm90, false)
FLASH_SM90(bf16, bf16, flash_sm90_ftz, true)
FLASH_SM90(f16, f16, flash_sm90_ftz, true)
