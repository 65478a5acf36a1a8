// Causal prefill attention, tensor-core path: head_dim D = 32, 64 or 128,
// bf16 or fp16, FlashAttention-2 style.
//
// A block of WARPS warps owns BM = 16 * MF * WARPS query rows of one
// (sequence, head); each warp owns 16 * MF of them, and each K/V fragment it
// loads feeds MF MMAs. A warp keeps its Q fragments in registers where they
// take at most 32 of them (MF * D <= 128: MF = 1 at D 128, MF <= 2 below);
// otherwise it re-reads them from shared memory every tile.
// Key/value tiles of BN = 64 rows are staged in shared memory by cp.async,
// double-buffered so the next tile loads while this one is used. Scores
// S = Q K^T and the update O += P V run on mma.sync.m16n8k16 with f32
// accumulators; the online softmax works on the S fragments in registers and
// P is re-packed as the A operand of the second product without touching
// shared memory. Tiles entirely above the diagonal are never loaded; the
// mask is applied only on tiles that cross the diagonal or the end of K.
//
// Shared-memory rows are 2 * D bytes: D / 8 chunks of 16 bytes. An
// ldmatrix phase reads one chunk column of eight consecutive rows (the first
// a multiple of 8), and is conflict-free when those eight chunks fall in the
// eight different 16-byte bank groups of a 128-byte line:
// - D 128 (256-byte rows, 16 chunks) and D 64 (128-byte rows, 8 chunks):
//   chunk c of row r lives at chunk c ^ (r & 7);
// - D 32 (64-byte rows, 4 chunks, two rows to a line): chunk c of row r
//   lives at chunk c ^ ((r >> 1) & 3). Rows 2i and 2i + 1 take the two
//   halves of a line and the XOR moves the four pairs of a phase to four
//   different chunks of their half.
//
// Same semantics and outputs as prefill.cu (PrefillShape), for head_dim D:
// K/V rows hold kv_heads heads and query head h reads K/V head
// h / (heads / kv_heads).

#define FA_BN 64
// Dynamic shared memory of a block at head_dim D: the query block
// (16 * MF * WARPS rows) and two K and two V tiles, rows of 2 * D bytes.
// The host asks for this much (src/backend/cuda/contract.rs); the kernel
// asserts its layout fits.
#define FLASH_SMEM_BYTES(D, WARPS, MF) ((16 * (MF) * (WARPS) + 4 * FA_BN) * 2 * (D))


// Byte offset of 16-byte chunk `c` of row `r` in a swizzled tile of rows of
// D elements (the swizzles above).
template <int D> __device__ __forceinline__ unsigned swz(int r, int c) {
    static_assert(D == 32 || D == 64 || D == 128, "head_dim 32, 64 or 128");
    if constexpr (D == 32) return (unsigned)(r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
    else return (unsigned)(r * (2 * D) + ((c ^ (r & 7)) << 4));
}

// 16-byte global -> shared copy; `bytes` = 0 writes zeros without reading.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// D += A * B for one m16n8k16 tile, f32 accumulators.
__device__ __forceinline__ void mma_16816(bf16, float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(f16, float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 as a packed pair, `lo` in the low half (the lower address).
__device__ __forceinline__ unsigned pack2(bf16, float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ unsigned pack2(f16, float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Stages `ROWS` rows of D elements (row stride `ld` elements) starting at
// `src` into a swizzled tile; rows at or past `valid` become zeros.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(unsigned tile, const T* src, u64 ld, int valid) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    constexpr int SHIFT = D == 128 ? 4 : D == 64 ? 3 : 2;
    static_assert((1 << SHIFT) == CHUNKS && ROWS * CHUNKS % THREADS == 0, "whole chunks per thread");
#pragma unroll
    for (int it = 0; it < ROWS * CHUNKS / THREADS; ++it) {
        int idx = it * THREADS + threadIdx.x;
        int r = idx >> SHIFT, c = idx & (CHUNKS - 1);
        bool in = r < valid;
        const T* g = in ? src + (u64)r * ld + c * 8 : src;
        cp_async16(tile + swz<D>(r, c), g, in ? 16 : 0);
    }
}

template <typename T, int D, int WARPS, int MF>
__device__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          T* __restrict__ out, float* __restrict__ lse, int sq, int skv, int kv_stride, int heads,
                          int kv_heads, int q_offset, float scale_log2) {
    // MF m16 fragments (16 * MF query rows) per warp: each K/V fragment it
    // loads feeds MF MMAs (1 / MF of the shared-memory traffic per FLOP).
    // Q stays in registers where its fragments take at most 32 of them;
    // otherwise (MF = 2 at D 128, where the accumulators fill the register
    // file) it is re-read from shared memory every tile.
    constexpr int WROWS = 16 * MF;
    constexpr int BM = WROWS * WARPS;
    constexpr int THREADS = 32 * WARPS;
    constexpr int ROW_BYTES = 2 * D;
    constexpr int Q_BYTES = BM * ROW_BYTES;
    constexpr int KV_BYTES = FA_BN * ROW_BYTES;
    constexpr int KSTEPS = D / 16;  // k-steps of S = Q K^T; n-tile pairs of O += P V
    constexpr int DTILES = D / 8;   // n-tiles of O
    constexpr bool Q_IN_REGS = MF * D <= 128;
    static_assert(Q_BYTES + 4 * KV_BYTES == FLASH_SMEM_BYTES(D, WARPS, MF), "the launch's shared memory is the layout's");
    extern __shared__ __align__(128) unsigned char fa_smem[];
    const unsigned s_q = cta_addr(fa_smem);
    const unsigned s_k = s_q + Q_BYTES;           // two K buffers
    const unsigned s_v = s_k + 2 * KV_BYTES;      // two V buffers

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.x, n = blockIdx.z;
    // The longest query blocks (most keys) are launched first.
    const int mblock = gridDim.y - 1 - blockIdx.y;
    const int m0 = mblock * BM;
    const u64 ld = (u64)heads * D;
    const u64 kv_ld = (u64)kv_heads * D;
    const int hk = h / (heads / kv_heads);  // the K/V head this query head reads

    const T* qb = q + ((u64)n * sq + m0) * ld + (u64)h * D;
    const T* kb = k + (u64)n * kv_stride * kv_ld + (u64)hk * D;
    const T* vb = v + (u64)n * kv_stride * kv_ld + (u64)hk * D;

    // Keys any row of this block may see.
    const int last_row = min(m0 + BM, sq) - 1;
    const int block_keys = min(q_offset + last_row + 1, skv);
    const int n_tiles = block_keys > 0 ? (block_keys + FA_BN - 1) / FA_BN : 0;

    // Prologue: group 0 = Q + tile 0, group 1 = tile 1 (possibly empty).
    load_tile<T, D, BM, THREADS>(s_q, qb, ld, sq - m0);
    if (n_tiles > 0) {
        load_tile<T, D, FA_BN, THREADS>(s_k, kb, kv_ld, skv);
        load_tile<T, D, FA_BN, THREADS>(s_v, vb, kv_ld, skv);
    }
    cp_async_commit();
    if (n_tiles > 1) {
        load_tile<T, D, FA_BN, THREADS>(s_k + KV_BYTES, kb + (u64)FA_BN * kv_ld, kv_ld, skv - FA_BN);
        load_tile<T, D, FA_BN, THREADS>(s_v + KV_BYTES, vb + (u64)FA_BN * kv_ld, kv_ld, skv - FA_BN);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // Q fragments of this warp's rows: A operands for the KSTEPS k-steps of d.
    unsigned qf[Q_IN_REGS ? MF : 1][Q_IN_REGS ? KSTEPS : 1][4];
    if constexpr (Q_IN_REGS) {
#pragma unroll
        for (int mi = 0; mi < MF; ++mi)
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk)
                ldmatrix_x4(s_q + swz<D>(warp * WROWS + mi * 16 + (lane & 15), 2 * kk + (lane >> 4)), qf[mi][kk][0],
                            qf[mi][kk][1], qf[mi][kk][2], qf[mi][kk][3]);
    }

    float o[MF][DTILES][4];
#pragma unroll
    for (int mi = 0; mi < MF; ++mi)
#pragma unroll
        for (int i = 0; i < DTILES; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.0f;
    // Two rows per thread and fragment: lane/4 and lane/4 + 8 of its 16.
    float m_a[MF], m_b[MF], l_a[MF], l_b[MF];  // running max of raw scores; this thread's share of the sums
#pragma unroll
    for (int mi = 0; mi < MF; ++mi) {
        m_a[mi] = m_b[mi] = FAPOOL_NEG_INF;
        l_a[mi] = l_b[mi] = 0.0f;
    }
    const int wrow0 = m0 + warp * WROWS;  // first query row of this warp
    const int warp_last_pos = q_offset + wrow0 + WROWS - 1;

    for (int t = 0; t < n_tiles; ++t) {
        const int buf = t & 1;
        const int n0 = t * FA_BN;
        cp_async_wait<1>();
        __syncthreads();
        // Warps whose rows all sit above this tile skip it (uniform per warp).
        if (n0 <= warp_last_pos) {
            const unsigned kt = s_k + buf * KV_BYTES, vt = s_v + buf * KV_BYTES;
            float s[MF][8][4];
#pragma unroll
            for (int mi = 0; mi < MF; ++mi)
#pragma unroll
                for (int i = 0; i < 8; ++i) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                unsigned qa[MF][4];
                if constexpr (Q_IN_REGS) {
#pragma unroll
                    for (int mi = 0; mi < MF; ++mi)
#pragma unroll
                        for (int i = 0; i < 4; ++i) qa[mi][i] = qf[mi][kk][i];
                } else {
#pragma unroll
                    for (int mi = 0; mi < MF; ++mi)
                        ldmatrix_x4(s_q + swz<D>(warp * WROWS + mi * 16 + (lane & 15), 2 * kk + (lane >> 4)), qa[mi][0],
                                    qa[mi][1], qa[mi][2], qa[mi][3]);
                }
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4(kt + swz<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)), b0, b1,
                                b2, b3);
#pragma unroll
                    for (int mi = 0; mi < MF; ++mi) {
                        mma_16816(T(), s[mi][2 * np], qa[mi], b0, b1);
                        mma_16816(T(), s[mi][2 * np + 1], qa[mi], b2, b3);
                    }
                }
            }
            unsigned p[4][MF][4];  // P, packed: the A fragments of the 4 k-steps of P V
#pragma unroll
            for (int mi = 0; mi < MF; ++mi) {
                const int frow0 = wrow0 + mi * 16;
                const int qpos_a = q_offset + frow0 + (lane >> 2), qpos_b = qpos_a + 8;
                // Mask only where the tile crosses this fragment's diagonal or the end of K.
                if (n0 + FA_BN - 1 > q_offset + frow0 || n0 + FA_BN > skv) {
#pragma unroll
                    for (int nt = 0; nt < 8; ++nt) {
                        int col = n0 + nt * 8 + 2 * (lane & 3);
                        if (col > qpos_a || col >= skv) s[mi][nt][0] = FAPOOL_NEG_INF;
                        if (col + 1 > qpos_a || col + 1 >= skv) s[mi][nt][1] = FAPOOL_NEG_INF;
                        if (col > qpos_b || col >= skv) s[mi][nt][2] = FAPOOL_NEG_INF;
                        if (col + 1 > qpos_b || col + 1 >= skv) s[mi][nt][3] = FAPOOL_NEG_INF;
                    }
                }
                // Online softmax on raw scores; exponents in base 2.
                float mx_a = m_a[mi], mx_b = m_b[mi];
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    mx_a = fmaxf(mx_a, fmaxf(s[mi][nt][0], s[mi][nt][1]));
                    mx_b = fmaxf(mx_b, fmaxf(s[mi][nt][2], s[mi][nt][3]));
                }
                mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
                mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
                mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
                mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
                // A row with no key yet keeps max -inf; use 0 so no inf - inf appears.
                const float ms_a = (mx_a == FAPOOL_NEG_INF ? 0.0f : mx_a) * scale_log2;
                const float ms_b = (mx_b == FAPOOL_NEG_INF ? 0.0f : mx_b) * scale_log2;
                const float alpha_a = fast_exp2(m_a[mi] * scale_log2 - ms_a);
                const float alpha_b = fast_exp2(m_b[mi] * scale_log2 - ms_b);
                m_a[mi] = mx_a;
                m_b[mi] = mx_b;
                float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    s[mi][nt][0] = fast_exp2(fmaf(s[mi][nt][0], scale_log2, -ms_a));
                    s[mi][nt][1] = fast_exp2(fmaf(s[mi][nt][1], scale_log2, -ms_a));
                    s[mi][nt][2] = fast_exp2(fmaf(s[mi][nt][2], scale_log2, -ms_b));
                    s[mi][nt][3] = fast_exp2(fmaf(s[mi][nt][3], scale_log2, -ms_b));
                    sum_a += s[mi][nt][0] + s[mi][nt][1];
                    sum_b += s[mi][nt][2] + s[mi][nt][3];
                }
                l_a[mi] = l_a[mi] * alpha_a + sum_a;
                l_b[mi] = l_b[mi] * alpha_b + sum_b;
                // P as bf16/fp16 A fragments now, so the f32 scores die here.
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    p[kk][mi][0] = pack2(T(), s[mi][2 * kk][0], s[mi][2 * kk][1]);
                    p[kk][mi][1] = pack2(T(), s[mi][2 * kk][2], s[mi][2 * kk][3]);
                    p[kk][mi][2] = pack2(T(), s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
                    p[kk][mi][3] = pack2(T(), s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dt = 0; dt < DTILES; ++dt) {
                    o[mi][dt][0] *= alpha_a;
                    o[mi][dt][1] *= alpha_a;
                    o[mi][dt][2] *= alpha_b;
                    o[mi][dt][3] *= alpha_b;
                }
            }
            // O += P V: the S accumulators of key tiles 2kk, 2kk+1 are exactly the
            // A fragment of k-step kk.
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                unsigned (*a)[4] = p[kk];
#pragma unroll
                for (int dp = 0; dp < KSTEPS; ++dp) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4_trans(vt + swz<D>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)),
                                      b0, b1, b2, b3);
#pragma unroll
                    for (int mi = 0; mi < MF; ++mi) {
                        mma_16816(T(), o[mi][2 * dp], a[mi], b0, b1);
                        mma_16816(T(), o[mi][2 * dp + 1], a[mi], b2, b3);
                    }
                }
            }
        }
        // Every warp is done with this buffer: refill it with tile t + 2.
        __syncthreads();
        if (t + 2 < n_tiles) {
            const int n2 = n0 + 2 * FA_BN;
            const u64 off = ((u64)n * kv_stride + n2) * kv_ld + (u64)hk * D;
            load_tile<T, D, FA_BN, THREADS>(s_k + buf * KV_BYTES, k + off, kv_ld, skv - n2);
            load_tile<T, D, FA_BN, THREADS>(s_v + buf * KV_BYTES, v + off, kv_ld, skv - n2);
        }
        cp_async_commit();
    }
    cp_async_wait<0>();

    // Epilogue: finish the row sums across the quad, normalise, store.
#pragma unroll
    for (int mi = 0; mi < MF; ++mi) {
        float la = l_a[mi], lb = l_b[mi];
        la += __shfl_xor_sync(0xffffffffu, la, 1);
        la += __shfl_xor_sync(0xffffffffu, la, 2);
        lb += __shfl_xor_sync(0xffffffffu, lb, 1);
        lb += __shfl_xor_sync(0xffffffffu, lb, 2);
        const float inv_a = la > 0.0f ? 1.0f / la : 0.0f;
        const float inv_b = lb > 0.0f ? 1.0f / lb : 0.0f;
        const int row_a = wrow0 + mi * 16 + (lane >> 2), row_b = row_a + 8;
        T* oa = out + ((u64)n * sq + row_a) * ld + (u64)h * D + 2 * (lane & 3);
        T* ob = oa + 8 * ld;
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt) {
            if (row_a < sq) *reinterpret_cast<unsigned*>(oa + dt * 8) = pack2(T(), o[mi][dt][0] * inv_a, o[mi][dt][1] * inv_a);
            if (row_b < sq) *reinterpret_cast<unsigned*>(ob + dt * 8) = pack2(T(), o[mi][dt][2] * inv_b, o[mi][dt][3] * inv_b);
        }
        if ((lane & 3) == 0) {
            float* lrow = lse + ((u64)n * heads + h) * sq;
            if (row_a < sq) lrow[row_a] = la > 0.0f ? (m_a[mi] * scale_log2 + log2f(la)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
            if (row_b < sq) lrow[row_b] = lb > 0.0f ? (m_b[mi] * scale_log2 + log2f(lb)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
        }
    }
}

// Dynamic shared memory: FLASH_SMEM_BYTES(D, WARPS, MF). MINB: the blocks
// per SM the registers are held to (see below).
#define FLASH(T, SUFFIX, D, WARPS, MF, NAME, MINB)                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                 \
        flash_fwd_d##D##_##NAME##_##SUFFIX(const T* q, const T* k, const T* v, T* out, float* lse, \
                                           int sq, int skv, int kv_stride, int heads, int kv_heads, \
                                           int q_offset, float scale_log2) {                       \
        flash_fwd<T, D, WARPS, MF>(q, k, v, out, lse, sq, skv, kv_stride, heads, kv_heads,         \
                                   q_offset, scale_log2);                                          \
    }

// Block shapes: the same three at every head_dim (the host's Flash128,
// Flash64 and Flash128W4), key tiles of FA_BN rows. What D changes, and
// what it does not:
// - K/V bytes staged per FLOP are 1 / BM (4 * BM * FA_BN * D FLOPs per
//   4 * FA_BN * D bytes) and K/V fragment reads per MMA 1 / MF whatever D:
//   bigger query blocks or more rows per warp pay off at D 32 as at D 128,
//   no more.
// - The softmax's work per score (exp2, scale, max, sum, packing) is fixed
//   while the MMAs per score fall with D: a 16 x 64 score fragment costs
//   128 MMAs at D 128, 64 at D 64 and 32 at D 32 for the same 1024 exp2s.
//   At D 32 the SFU (16 exp2 per clock per SM) rather than mma.sync sets
//   the pace; at MF = 1 the K/V fragment reads take as many shared-memory
//   cycles as the exp2s take SFU cycles, so MF = 2 (which with Q in
//   registers re-reads nothing else) stays the shape to prefer. MF = 4
//   would relieve shared memory only, not the SFU, and halve the blocks of
//   a short sequence.
// - Key tiles stay at 64 rows at every D (one masking and skipping
//   granularity). Their fixed costs (two barriers, the row-max shuffles,
//   two exp2 and D / 2 rescales of O per fragment and thread) are about
//   6 % of a D-32 tile's exp2s and a fifth of its other softmax
//   instructions; 128-key tiles would halve that at twice the S registers.
// - Registers fall with D (O takes D / 2 per fragment and thread, Q D / 8),
//   so more blocks fit an SM. MINB holds each kernel to what ptxas fits
//   without spilling (sm_90, NVRTC 13.0; blocks per SM by registers):
//     D 128: w8 212 (1), w4 222 (2), w4m2 255 (2)
//     D 64:  w8 146 (1; 2 would need 128 and spill), w4 128 (4),
//            w4m2 255 (2)
//     D 32:  w8 109 (2), w4 109 (4), w4m2 194 (2; 3 would need 168 and
//            spill)
//   Shared memory allows more at D 64 and 32 (48 and 24 KiB for 128 rows).
FLASH(bf16, bf16, 128, 8, 1, w8, 1)
FLASH(f16, f16, 128, 8, 1, w8, 1)
FLASH(bf16, bf16, 128, 4, 1, w4, 1)
FLASH(f16, f16, 128, 4, 1, w4, 1)
FLASH(bf16, bf16, 128, 4, 2, w4m2, 2)
FLASH(f16, f16, 128, 4, 2, w4m2, 2)
FLASH(bf16, bf16, 64, 8, 1, w8, 1)
FLASH(f16, f16, 64, 8, 1, w8, 1)
FLASH(bf16, bf16, 64, 4, 1, w4, 4)
FLASH(f16, f16, 64, 4, 1, w4, 4)
FLASH(bf16, bf16, 64, 4, 2, w4m2, 2)
FLASH(f16, f16, 64, 4, 2, w4m2, 2)
FLASH(bf16, bf16, 32, 8, 1, w8, 2)
FLASH(f16, f16, 32, 8, 1, w8, 2)
FLASH(bf16, bf16, 32, 4, 1, w4, 4)
FLASH(f16, f16, 32, 4, 1, w4, 4)
FLASH(bf16, bf16, 32, 4, 2, w4m2, 2)
FLASH(f16, f16, 32, 4, 2, w4m2, 2)
