// Causal prefill attention, tensor-core path: head_dim 128, bf16 or fp16,
// FlashAttention-2 style.
//
// A block of WARPS warps owns BM = 16 * WARPS query rows of one (sequence,
// head); each warp owns 16 of them and keeps their Q fragments in registers.
// Key/value tiles of BN = 64 rows are staged in shared memory by cp.async,
// double-buffered so the next tile loads while this one is used. Scores
// S = Q K^T and the update O += P V run on mma.sync.m16n8k16 with f32
// accumulators; the online softmax works on the S fragments in registers and
// P is re-packed as the A operand of the second product without touching
// shared memory. Tiles entirely above the diagonal are never loaded; the
// mask is applied only on tiles that cross the diagonal or the end of K.
//
// Shared-memory rows are 256 bytes (16 chunks of 16 bytes); chunk c of row r
// lives at chunk c ^ (r & 7), so the eight rows an ldmatrix phase reads fall
// in eight different bank groups.
//
// Same semantics and outputs as prefill.cu (PrefillShape), for head_dim 128.

#define FA_D 128
#define FA_BN 64
#define FA_ROW_BYTES 256

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Byte offset of 16-byte chunk `c` of row `r` in a swizzled tile.
__device__ __forceinline__ unsigned swz(int r, int c) { return (unsigned)(r * FA_ROW_BYTES + ((c ^ (r & 7)) << 4)); }

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

// Stages `rows` rows of 128 elements (row stride `ld` elements) starting at
// `src` into a swizzled tile; rows at or past `valid` become zeros.
template <typename T, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(unsigned tile, const T* src, u64 ld, int valid) {
#pragma unroll
    for (int it = 0; it < ROWS * 16 / THREADS; ++it) {
        int idx = it * THREADS + threadIdx.x;
        int r = idx >> 4, c = idx & 15;
        bool in = r < valid;
        const T* g = in ? src + (u64)r * ld + c * 8 : src;
        cp_async16(tile + swz(r, c), g, in ? 16 : 0);
    }
}

template <typename T, int WARPS>
__device__ void flash_fwd_d128(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               T* __restrict__ out, float* __restrict__ lse, int sq, int skv, int kv_stride,
                               int heads, int q_offset, float scale_log2) {
    constexpr int BM = 16 * WARPS;
    constexpr int THREADS = 32 * WARPS;
    constexpr int Q_BYTES = BM * FA_ROW_BYTES;
    constexpr int KV_BYTES = FA_BN * FA_ROW_BYTES;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    const unsigned s_q = smem_addr(fa_smem);
    const unsigned s_k = s_q + Q_BYTES;           // two K buffers
    const unsigned s_v = s_k + 2 * KV_BYTES;      // two V buffers

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.x, n = blockIdx.z;
    // The longest query blocks (most keys) are launched first.
    const int mblock = gridDim.y - 1 - blockIdx.y;
    const int m0 = mblock * BM;
    const u64 ld = (u64)heads * FA_D;

    const T* qb = q + ((u64)n * sq + m0) * ld + (u64)h * FA_D;
    const T* kb = k + (u64)n * kv_stride * ld + (u64)h * FA_D;
    const T* vb = v + (u64)n * kv_stride * ld + (u64)h * FA_D;

    // Keys any row of this block may see.
    const int last_row = min(m0 + BM, sq) - 1;
    const int block_keys = min(q_offset + last_row + 1, skv);
    const int n_tiles = block_keys > 0 ? (block_keys + FA_BN - 1) / FA_BN : 0;

    // Prologue: group 0 = Q + tile 0, group 1 = tile 1 (possibly empty).
    load_tile<T, BM, THREADS>(s_q, qb, ld, sq - m0);
    if (n_tiles > 0) {
        load_tile<T, FA_BN, THREADS>(s_k, kb, ld, skv);
        load_tile<T, FA_BN, THREADS>(s_v, vb, ld, skv);
    }
    cp_async_commit();
    if (n_tiles > 1) {
        load_tile<T, FA_BN, THREADS>(s_k + KV_BYTES, kb + (u64)FA_BN * ld, ld, skv - FA_BN);
        load_tile<T, FA_BN, THREADS>(s_v + KV_BYTES, vb + (u64)FA_BN * ld, ld, skv - FA_BN);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // Q fragments of this warp's 16 rows: A operands for the 8 k-steps of d.
    unsigned qf[8][4];
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
        ldmatrix_x4(s_q + swz(warp * 16 + (lane & 15), 2 * kk + (lane >> 4)), qf[kk][0], qf[kk][1], qf[kk][2],
                    qf[kk][3]);

    float o[16][4];
#pragma unroll
    for (int i = 0; i < 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    // Two rows per thread: row_a = lane/4, row_b = lane/4 + 8 of the warp's 16.
    float m_a = FAPOOL_NEG_INF, m_b = FAPOOL_NEG_INF;  // running max of raw scores
    float l_a = 0.0f, l_b = 0.0f;                      // this thread's share of the sums
    const int row_a = m0 + warp * 16 + (lane >> 2);
    const int qpos_a = q_offset + row_a, qpos_b = qpos_a + 8;
    const int warp_last_pos = q_offset + m0 + warp * 16 + 15;

    for (int t = 0; t < n_tiles; ++t) {
        const int buf = t & 1;
        const int n0 = t * FA_BN;
        cp_async_wait<1>();
        __syncthreads();
        // Warps whose rows all sit above this tile skip it (uniform per warp).
        if (n0 <= warp_last_pos) {
            const unsigned kt = s_k + buf * KV_BYTES, vt = s_v + buf * KV_BYTES;
            float s[8][4];
#pragma unroll
            for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4(kt + swz(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)), b0, b1,
                                b2, b3);
                    mma_16816(T(), s[2 * np], qf[kk], b0, b1);
                    mma_16816(T(), s[2 * np + 1], qf[kk], b2, b3);
                }
            }
            // Mask only where the tile crosses this warp's diagonal or the end of K.
            if (n0 + FA_BN - 1 > q_offset + m0 + warp * 16 || n0 + FA_BN > skv) {
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    int col = n0 + nt * 8 + 2 * (lane & 3);
                    if (col > qpos_a || col >= skv) s[nt][0] = FAPOOL_NEG_INF;
                    if (col + 1 > qpos_a || col + 1 >= skv) s[nt][1] = FAPOOL_NEG_INF;
                    if (col > qpos_b || col >= skv) s[nt][2] = FAPOOL_NEG_INF;
                    if (col + 1 > qpos_b || col + 1 >= skv) s[nt][3] = FAPOOL_NEG_INF;
                }
            }
            // Online softmax on raw scores; exponents in base 2.
            float mx_a = m_a, mx_b = m_b;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
                mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
            }
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
            // A row with no key yet keeps max -inf; use 0 so no inf - inf appears.
            const float ms_a = (mx_a == FAPOOL_NEG_INF ? 0.0f : mx_a) * scale_log2;
            const float ms_b = (mx_b == FAPOOL_NEG_INF ? 0.0f : mx_b) * scale_log2;
            const float alpha_a = fast_exp2(m_a * scale_log2 - ms_a);
            const float alpha_b = fast_exp2(m_b * scale_log2 - ms_b);
            m_a = mx_a;
            m_b = mx_b;
            float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                s[nt][0] = fast_exp2(fmaf(s[nt][0], scale_log2, -ms_a));
                s[nt][1] = fast_exp2(fmaf(s[nt][1], scale_log2, -ms_a));
                s[nt][2] = fast_exp2(fmaf(s[nt][2], scale_log2, -ms_b));
                s[nt][3] = fast_exp2(fmaf(s[nt][3], scale_log2, -ms_b));
                sum_a += s[nt][0] + s[nt][1];
                sum_b += s[nt][2] + s[nt][3];
            }
            l_a = l_a * alpha_a + sum_a;
            l_b = l_b * alpha_b + sum_b;
#pragma unroll
            for (int dt = 0; dt < 16; ++dt) {
                o[dt][0] *= alpha_a;
                o[dt][1] *= alpha_a;
                o[dt][2] *= alpha_b;
                o[dt][3] *= alpha_b;
            }
            // O += P V: the S accumulators of key tiles 2kk, 2kk+1 are exactly the
            // A fragment of k-step kk.
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                unsigned a[4];
                a[0] = pack2(T(), s[2 * kk][0], s[2 * kk][1]);
                a[1] = pack2(T(), s[2 * kk][2], s[2 * kk][3]);
                a[2] = pack2(T(), s[2 * kk + 1][0], s[2 * kk + 1][1]);
                a[3] = pack2(T(), s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < 8; ++dp) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4_trans(vt + swz(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)),
                                      b0, b1, b2, b3);
                    mma_16816(T(), o[2 * dp], a, b0, b1);
                    mma_16816(T(), o[2 * dp + 1], a, b2, b3);
                }
            }
        }
        // Every warp is done with this buffer: refill it with tile t + 2.
        __syncthreads();
        if (t + 2 < n_tiles) {
            const int n2 = n0 + 2 * FA_BN;
            load_tile<T, FA_BN, THREADS>(s_k + buf * KV_BYTES, kb + (u64)n2 * ld, ld, skv - n2);
            load_tile<T, FA_BN, THREADS>(s_v + buf * KV_BYTES, vb + (u64)n2 * ld, ld, skv - n2);
        }
        cp_async_commit();
    }
    cp_async_wait<0>();

    // Epilogue: finish the row sums across the quad, normalise, store.
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f;
    const float inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
    const int row_b = row_a + 8;
    T* oa = out + ((u64)n * sq + row_a) * ld + (u64)h * FA_D + 2 * (lane & 3);
    T* ob = oa + 8 * ld;
#pragma unroll
    for (int dt = 0; dt < 16; ++dt) {
        if (row_a < sq) *reinterpret_cast<unsigned*>(oa + dt * 8) = pack2(T(), o[dt][0] * inv_a, o[dt][1] * inv_a);
        if (row_b < sq) *reinterpret_cast<unsigned*>(ob + dt * 8) = pack2(T(), o[dt][2] * inv_b, o[dt][3] * inv_b);
    }
    if ((lane & 3) == 0) {
        float* lrow = lse + ((u64)n * heads + h) * sq;
        if (row_a < sq) lrow[row_a] = l_a > 0.0f ? (m_a * scale_log2 + log2f(l_a)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
        if (row_b < sq) lrow[row_b] = l_b > 0.0f ? (m_b * scale_log2 + log2f(l_b)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
    }
}

// Dynamic shared memory: (16 * WARPS + 4 * 64) rows of 256 bytes.
#define FLASH(T, SUFFIX, WARPS)                                                                    \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)                                    \
        flash_fwd_d128_w##WARPS##_##SUFFIX(const T* q, const T* k, const T* v, T* out, float* lse, \
                                           int sq, int skv, int kv_stride, int heads,              \
                                           int q_offset, float scale_log2) {                       \
        flash_fwd_d128<T, WARPS>(q, k, v, out, lse, sq, skv, kv_stride, heads, q_offset,           \
                                 scale_log2);                                                      \
    }

FLASH(bf16, bf16, 8)
FLASH(f16, f16, 8)
FLASH(bf16, bf16, 4)
FLASH(f16, f16, 4)
