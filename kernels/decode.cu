// Decode attention (one query per sequence) by split-KV, as in
// flash-decoding: the first `len` cache rows of each (sequence, head) are cut
// into `nsplit` chunks; `decode_partial` computes, for one chunk per block,
// the normalised partial output and its log-sum-exp, and `decode_combine`
// merges the chunks by their log-sum-exp. Memory-bound: every cache element
// is read once, with 16-byte loads.
//
// Layout: q is [nseq, heads * d]; the caches are [nseq, cap, kv_heads * d],
// and query head h reads K/V head h / (heads / kv_heads) (grouped-query
// attention: the query heads of a group read the same cache rows, which
// the caches serve once). A row of one head is handled by `tpr` threads (a
// power of two <= 32) of eight elements each, so d <= 256 and
// eight-element runs past d read as zero.
//
// With a non-null `len_ptr` the length is read from device memory (the
// decode step's scalars) and the grid is laid out for `cap` rows: chunks
// past the length write an empty partial (output 0, log-sum-exp -inf), which
// the combine ignores. A recorded step then replays at any length.

#define DECODE_THREADS 128
#define DECODE_UNROLL 4

template <typename T>
__device__ void decode_partial_impl(const T* q, const T* kc, const T* vc, float* part_o, float* part_lse,
                                    int cap, int len, const int* len_ptr, int heads, int kv_heads, int d, int tpr,
                                    int chunk, float scale_log2) {
    if (len_ptr) len = min(*len_ptr, cap);
    // Per-group (m, l) and accumulators, for the block-level merge at the end.
    __shared__ float s_m[DECODE_THREADS];
    __shared__ float s_l[DECODE_THREADS];
    __shared__ float s_acc[DECODE_THREADS * 8];
    int split = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
    int nsplit = gridDim.x;
    int groups = DECODE_THREADS / tpr;
    int g = threadIdx.x / tpr;
    int sub = threadIdx.x % tpr;
    int c0 = sub * 8;
    int valid = d - c0;  // elements of this thread's run that exist (may be <= 0)
    u64 width = (u64)heads * d;
    u64 kv_width = (u64)kv_heads * d;
    int hk = h / (heads / kv_heads);

    float qv[8];
    if (valid > 0) {
        load8_guarded(q + (u64)n * width + (u64)h * d + c0, valid, qv);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) qv[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) qv[i] *= scale_log2;

    int start = split * chunk;
    int end = min(len, start + chunk);
    const T* kbase = kc + (u64)n * cap * kv_width + (u64)hk * d + c0;
    const T* vbase = vc + (u64)n * cap * kv_width + (u64)hk * d + c0;

    float m = FAPOOL_NEG_INF, l = 0.0f;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;

    // Each group takes rows base+g, base+g+groups, ...; DECODE_UNROLL rows are
    // loaded before any is used, to keep enough bytes in flight. The trip
    // count is the same for every thread, since the shuffles below need the
    // whole warp.
    for (int base = start; base < end; base += groups * DECODE_UNROLL) {
        float kv[DECODE_UNROLL][8], vv[DECODE_UNROLL][8];
#pragma unroll
        for (int u = 0; u < DECODE_UNROLL; ++u) {
            int j = base + g + u * groups;
            if (j < end && valid > 0) {
                load8_guarded(kbase + (u64)j * kv_width, valid, kv[u]);
                load8_guarded(vbase + (u64)j * kv_width, valid, vv[u]);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) kv[u][i] = vv[u][i] = 0.0f;
            }
        }
        float s[DECODE_UNROLL];
#pragma unroll
        for (int u = 0; u < DECODE_UNROLL; ++u) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) dot += qv[i] * kv[u][i];
            for (int o = tpr / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o, tpr);
            s[u] = (base + g + u * groups < end) ? dot : FAPOOL_NEG_INF;
        }
        float mx = m;
#pragma unroll
        for (int u = 0; u < DECODE_UNROLL; ++u) mx = fmaxf(mx, s[u]);
        if (mx != FAPOOL_NEG_INF) {
            float alpha = fast_exp2(m - mx);  // 0 while m is still -inf
            l *= alpha;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
            for (int u = 0; u < DECODE_UNROLL; ++u) {
                float p = fast_exp2(s[u] - mx);
                l += p;
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[i] += p * vv[u][i];
            }
            m = mx;
        }
    }

    // Merge the groups of the block.
    if (sub == 0) {
        s_m[g] = m;
        s_l[g] = l;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) s_acc[threadIdx.x * 8 + i] = acc[i];
    __syncthreads();
    float M = FAPOOL_NEG_INF;
    for (int i = 0; i < groups; ++i) M = fmaxf(M, s_m[i]);
    float L = 0.0f;
    if (M != FAPOOL_NEG_INF)
        for (int i = 0; i < groups; ++i) L += s_l[i] * fast_exp2(s_m[i] - M);
    u64 part = ((u64)n * heads + h) * nsplit + split;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float o = 0.0f;
        if (L > 0.0f) {
            int owner = c / 8;  // thread index within a group that holds column c
            for (int i = 0; i < groups; ++i) {
                float w = fast_exp2(s_m[i] - M);
                o += w * s_acc[(i * tpr + owner) * 8 + c % 8];
            }
            o /= L;
        }
        part_o[part * d + c] = o;
    }
    if (threadIdx.x == 0) part_lse[part] = L > 0.0f ? (M + log2f(L)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
}


#define DECODE_ROWS_THREADS 512
#define DECODE_ROWS_UNROLL 8

// Row-major variant for heads whose rows are whole 16-byte runs (head_dim a
// multiple of 8, `tpr = head_dim / 8` threads per head, and a block of
// `hg * tpr` threads, a multiple of 32, covering `hg` heads). A block reads
// each cache row of its heads as one contiguous run (8 KB for 32 x 128 in
// bf16) instead of one head's 256 bytes at a time, and every `tpr` lanes own
// one head for the whole chunk, so no merge inside the block is needed.
template <typename T>
__device__ void decode_rows_impl(const T* q, const T* kc, const T* vc, float* part_o, float* part_lse,
                                 int cap, int len, const int* len_ptr, int heads, int kv_heads, int d, int hg,
                                 int chunk, float scale_log2) {
    if (len_ptr) len = min(*len_ptr, cap);
    int split = blockIdx.x, n = blockIdx.z;
    int nsplit = gridDim.x;
    int tpr = d / 8;
    int h = blockIdx.y * hg + threadIdx.x / tpr;
    bool live = h < heads;
    int hh = live ? h : heads - 1;  // out-of-range heads shadow the last one; their results are dropped
    int c0 = (threadIdx.x % tpr) * 8;
    u64 width = (u64)heads * d;
    u64 kv_width = (u64)kv_heads * d;
    int hk = hh / (heads / kv_heads);

    float qv[8];
    load8(q + (u64)n * width + (u64)hh * d + c0, qv);
#pragma unroll
    for (int i = 0; i < 8; ++i) qv[i] *= scale_log2;

    int start = split * chunk;
    int end = min(len, start + chunk);
    const T* kp = kc + (u64)n * cap * kv_width + (u64)hk * d + c0;
    const T* vp = vc + (u64)n * cap * kv_width + (u64)hk * d + c0;

    float m = FAPOOL_NEG_INF, l = 0.0f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;

    for (int j = start; j < end; j += DECODE_ROWS_UNROLL) {
        Raw8<T> rk[DECODE_ROWS_UNROLL], rv[DECODE_ROWS_UNROLL];
#pragma unroll
        for (int u = 0; u < DECODE_ROWS_UNROLL; ++u) {
            if (j + u < end) {
                rk[u] = ld_stream8(kp + (u64)(j + u) * kv_width);
                rv[u] = ld_stream8(vp + (u64)(j + u) * kv_width);
            } else {
                zero8(rk[u]);
                zero8(rv[u]);
            }
        }
        float s[DECODE_ROWS_UNROLL];
        float mx = m;
#pragma unroll
        for (int u = 0; u < DECODE_ROWS_UNROLL; ++u) {
            float kv[8];
            unpack8(rk[u], kv);
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) dot += qv[i] * kv[i];
            for (int o = tpr / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o, tpr);
            s[u] = (j + u < end) ? dot : FAPOOL_NEG_INF;
            mx = fmaxf(mx, s[u]);
        }
        float alpha = fast_exp2(m - mx);
        l *= alpha;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
        for (int u = 0; u < DECODE_ROWS_UNROLL; ++u) {
            float p = fast_exp2(s[u] - mx);
            float vv[8];
            unpack8(rv[u], vv);
            l += p;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] += p * vv[i];
        }
        m = mx;
    }
    if (!live) return;
    u64 part = ((u64)n * heads + h) * nsplit + split;
#pragma unroll
    for (int i = 0; i < 8; ++i) part_o[part * d + c0 + i] = l > 0.0f ? acc[i] / l : 0.0f;
    if (c0 == 0) part_lse[part] = l > 0.0f ? (m + log2f(l)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // (undefined in a host compiler pass)
// Hopper: the row-major decode of decode_rows, fed by bulk copies. Warp 0
// streams the chunk's cache rows (DECODE_BULK_ROWS rows of K and as many of
// V per stage, one cp.async.bulk per row and tensor) into a ring of
// DECODE_BULK_STAGES shared-memory stages, each completing on an mbarrier;
// the other hg * tpr threads compute exactly as decode_rows does, reading the
// rows from shared memory (a row's slot holds the K/V heads the block's
// query heads read, each once), and free a stage per warp on a second mbarrier as
// soon as they hold its rows in registers. The copy engine keeps up to
// STAGES x ROWS x 2 rows (192 KiB for 32 x 128 in bf16) in flight per SM
// whatever the threads are doing; decode_rows holds 8 rows in registers and
// waits for each batch before it asks for the next. A stage's row slot holds
// only the K/V heads the block reads, and the ring has as many stages as the
// shared memory sized for hg heads holds: with grouped K/V heads (nkv < hg)
// that is STAGES * hg / nkv stages, so the bytes in flight stay those of
// multi-head attention (8 K/V heads of 32: 12 stages, not 3 a quarter full).
#define DECODE_BULK_ROWS 4
#define DECODE_BULK_STAGES 3

__device__ __forceinline__ void dq_bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
__device__ __forceinline__ uint4 dq_ld_shared16(unsigned addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
    return v;
}

// Block: 32 + hg * tpr threads (tpr = d / 8); dynamic shared memory
// DECODE_BULK_SMEM_BYTES(hg, d, sizeof(T)): the stages of K and V rows (room
// for DECODE_BULK_STAGES stages of hg heads), then a full and an empty
// mbarrier (8 bytes each) for each of up to DECODE_BULK_STAGES * hg stages
// (one K/V head for the block), the layout below (the host asks for this
// much, src/backend/cuda/contract.rs). Same grid and outputs as decode_rows.
#define DECODE_BULK_SMEM_BYTES(hg, d, elem) \
    (DECODE_BULK_STAGES * 2 * DECODE_BULK_ROWS * (hg) * (d) * (elem) + 16 * DECODE_BULK_STAGES * (hg))
template <typename T>
__device__ void decode_bulk_impl(const T* q, const T* kc, const T* vc, float* part_o, float* part_lse, int cap,
                                 int len, const int* len_ptr, int heads, int kv_heads, int d, int hg, int chunk,
                                 float scale_log2) {
    extern __shared__ __align__(128) unsigned char dq_ring[];
    if (len_ptr) len = min(*len_ptr, cap);
    const int split = blockIdx.x, n = blockIdx.z, nsplit = gridDim.x;
    const int tpr = d / 8;
    const int h0 = blockIdx.y * hg;
    const int group_heads = min(hg, heads - h0);
    const int gsize = heads / kv_heads;  // query heads per K/V head
    // The K/V heads of the block's query heads: kv0 .. kv0 + nkv - 1 (nkv <= hg).
    const int kv0 = h0 / gsize, nkv = (h0 + group_heads - 1) / gsize + 1 - kv0;
    const unsigned seg = (unsigned)(nkv * d * sizeof(T));  // bytes copied per row: one row's slot in a stage
    const unsigned row_bytes = seg;
    const unsigned stage_bytes = 2 * DECODE_BULK_ROWS * row_bytes;
    // The stages the room for DECODE_BULK_STAGES stages of hg heads holds.
    const int stages = (DECODE_BULK_STAGES * hg) / nkv;
    const unsigned ring = cta_addr(dq_ring);
    const unsigned bars = ring + (unsigned)(DECODE_BULK_STAGES * 2 * DECODE_BULK_ROWS * hg * d * sizeof(T));  // full[s], then empty[s]
    const u64 width = (u64)heads * d;
    const u64 kv_width = (u64)kv_heads * d;
    const int start = split * chunk, end = min(len, start + chunk);
    const int nbatch = end > start ? (end - start + DECODE_BULK_ROWS - 1) / DECODE_BULK_ROWS : 0;
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(bars + 8 * s, 1);
            mbar_init(bars + 8 * (stages + s), (blockDim.x - 32) / 32);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        if (threadIdx.x == 0) {
            bool ok = true;
            const T* kb = kc + (u64)n * cap * kv_width + (u64)kv0 * d;
            const T* vb = vc + (u64)n * cap * kv_width + (u64)kv0 * d;
            for (int b = 0; b < nbatch; ++b) {
                const int s = b % stages, round = b / stages;
                mbar_wait(bars + 8 * (stages + s), (round & 1) ^ 1, ok);
                const int j0 = start + b * DECODE_BULK_ROWS, rows = min(DECODE_BULK_ROWS, end - j0);
                const unsigned full = bars + 8 * s, dst = ring + s * stage_bytes;
                mbar_arrive_expect_tx(full, 2 * rows * seg);
                for (int r = 0; r < rows; ++r) {
                    dq_bulk_copy(dst + r * row_bytes, kb + (u64)(j0 + r) * kv_width, seg, full);
                    dq_bulk_copy(dst + (DECODE_BULK_ROWS + r) * row_bytes, vb + (u64)(j0 + r) * kv_width, seg, full);
                }
            }
        }
        return;
    }
    const int t = threadIdx.x - 32;
    const int hl = t / tpr;  // head within the group
    const bool live = hl < group_heads;
    const int hq = live ? hl : group_heads - 1;  // out-of-range heads shadow the last one; their results are dropped
    const int h = h0 + hq;
    const int c0 = (t % tpr) * 8;
    float qv[8];
    load8(q + (u64)n * width + (u64)h * d + c0, qv);
#pragma unroll
    for (int i = 0; i < 8; ++i) qv[i] *= scale_log2;
    bool ok = true;
    float m = FAPOOL_NEG_INF, l = 0.0f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    const unsigned my = (unsigned)(((h / gsize - kv0) * d + c0) * sizeof(T));  // this head's K/V in a row's slot
    for (int b = 0; b < nbatch; ++b) {
        const int s = b % stages, round = b / stages;
        mbar_wait(bars + 8 * s, round & 1, ok);
        const int rows = min(DECODE_BULK_ROWS, end - (start + b * DECODE_BULK_ROWS));
        const unsigned src = ring + s * stage_bytes + my;
        Raw8<T> rk[DECODE_BULK_ROWS], rv[DECODE_BULK_ROWS];
#pragma unroll
        for (int u = 0; u < DECODE_BULK_ROWS; ++u) {
            rk[u].a = dq_ld_shared16(src + u * row_bytes);
            rv[u].a = dq_ld_shared16(src + (DECODE_BULK_ROWS + u) * row_bytes);
        }
        __syncwarp();
        if ((t & 31) == 0) mbar_arrive(bars + 8 * (stages + s));
        float sc[DECODE_BULK_ROWS];
        float mx = m;
#pragma unroll
        for (int u = 0; u < DECODE_BULK_ROWS; ++u) {
            float kv[8];
            unpack8(rk[u], kv);
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) dot += qv[i] * kv[i];
            for (int o = tpr / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o, tpr);
            sc[u] = u < rows ? dot : FAPOOL_NEG_INF;
            mx = fmaxf(mx, sc[u]);
        }
        const float alpha = fast_exp2(m - mx);
        l *= alpha;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
        for (int u = 0; u < DECODE_BULK_ROWS; ++u) {
            const float p = fast_exp2(sc[u] - mx);
            float vv[8];
            unpack8(rv[u], vv);
            l += p;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] += u < rows ? p * vv[i] : 0.0f;
        }
        m = mx;
    }
    if (!live) return;
    const u64 part = ((u64)n * heads + h0 + hl) * nsplit + split;
    const float inv = !ok ? __int_as_float(0x7fc00000) : l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) part_o[part * d + c0 + i] = acc[i] * inv;
    if (c0 == 0) part_lse[part] = !ok ? __int_as_float(0x7fc00000) : l > 0.0f ? (m + log2f(l)) * FAPOOL_LN2 : FAPOOL_NEG_INF;
}
#endif

// One block per (sequence, head), any multiple of 32 threads up to 256:
// the chunks' log-sum-exps give the maximum M and the sum L in one
// block-wide pass; then each warp takes every nwarps-th chunk, each lane four columns
// (one 16-byte load per chunk when d is a multiple of 4), DECODE_COMBINE_DEPTH
// chunks in flight, and the warps' sums meet in shared memory. A serial loop
// over the chunks (132 on an H200 at B = 1) would wait for every load in turn.
#define DECODE_COMBINE_DEPTH 4
#define DECODE_COMBINE_MAX_WARPS 8

// Merges running (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void lse_merge(float& m, float& l, float m2, float l2) {
    const float mx = fmaxf(m, m2);
    if (mx == FAPOOL_NEG_INF) return;
    l = (m == FAPOOL_NEG_INF ? 0.0f : l * expf(m - mx)) + (m2 == FAPOOL_NEG_INF ? 0.0f : l2 * expf(m2 - mx));
    m = mx;
}

template <typename T>
__device__ void decode_combine_impl(const float* part_o, const float* part_lse, T* out, float* lse,
                                    int nsplit, int heads, int d) {
    __shared__ float s_part[2 * DECODE_COMBINE_MAX_WARPS];
    __shared__ float4 s_acc[DECODE_COMBINE_MAX_WARPS][64];  // a warp's sums for d <= 256
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    int h = blockIdx.x, n = blockIdx.y;
    u64 row = (u64)n * heads + h;
    const float* pl = part_lse + row * nsplit;
    // M and L in one pass: each thread's chunks, then the warp's, then the block's.
    float M = FAPOOL_NEG_INF, L = 0.0f;
    for (int s = threadIdx.x; s < nsplit; s += blockDim.x) lse_merge(M, L, pl[s], 1.0f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lse_merge(M, L, __shfl_xor_sync(0xffffffffu, M, o), __shfl_xor_sync(0xffffffffu, L, o));
    if (lane == 0) {
        s_part[warp] = M;
        s_part[DECODE_COMBINE_MAX_WARPS + warp] = L;
    }
    __syncthreads();
    M = FAPOOL_NEG_INF;
    L = 0.0f;
    for (int w = 0; w < nwarps; ++w) lse_merge(M, L, s_part[w], s_part[DECODE_COMBINE_MAX_WARPS + w]);
    const float inv_l = L > 0.0f ? 1.0f / L : 0.0f;
    const float* po = part_o + row * nsplit * d;
    if (d % 4 == 0 && d <= 256) {
        // Lane `lane` owns float4 columns lane and lane + 32 (d <= 256).
        float4 acc[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
        const int d4 = d / 4;
        if (L > 0.0f) {
            for (int s0 = warp; s0 < nsplit; s0 += nwarps * DECODE_COMBINE_DEPTH) {
                float4 v[DECODE_COMBINE_DEPTH][2];
                float w[DECODE_COMBINE_DEPTH];
#pragma unroll
                for (int u = 0; u < DECODE_COMBINE_DEPTH; ++u) {
                    const int s = s0 + u * nwarps;
                    w[u] = s < nsplit ? expf(pl[s] - M) * inv_l : 0.0f;
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const int c4 = lane + 32 * i;
                        v[u][i] = (s < nsplit && c4 < d4) ? reinterpret_cast<const float4*>(po + (u64)s * d)[c4]
                                                          : make_float4(0.f, 0.f, 0.f, 0.f);
                    }
                }
#pragma unroll
                for (int u = 0; u < DECODE_COMBINE_DEPTH; ++u)
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        acc[i].x += w[u] * v[u][i].x;
                        acc[i].y += w[u] * v[u][i].y;
                        acc[i].z += w[u] * v[u][i].z;
                        acc[i].w += w[u] * v[u][i].w;
                    }
            }
        }
        s_acc[warp][lane] = acc[0];
        s_acc[warp][lane + 32] = acc[1];
        __syncthreads();
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float o = 0.0f;
            for (int w2 = 0; w2 < nwarps; ++w2) {
                const float4 a = s_acc[w2][c / 4];
                o += (c % 4 == 0) ? a.x : (c % 4 == 1) ? a.y : (c % 4 == 2) ? a.z : a.w;
            }
            out[row * d + c] = from_f32<T>(o);
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float o = 0.0f;
            if (L > 0.0f)
                for (int s = 0; s < nsplit; ++s) o += expf(pl[s] - M) * po[(u64)s * d + c];
            out[row * d + c] = from_f32<T>(o * inv_l);
        }
    }
    if (threadIdx.x == 0) lse[row] = L > 0.0f ? M + logf(L) : FAPOOL_NEG_INF;
}

#define DECODE(T, SUFFIX)                                                                          \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS)                                   \
        decode_partial_##SUFFIX(const T* q, const T* kc, const T* vc, float* part_o,               \
                                float* part_lse, int cap, int len, const int* len_ptr, int heads,  \
                                int kv_heads, int d, int tpr, int chunk, float scale_log2) {       \
        decode_partial_impl<T>(q, kc, vc, part_o, part_lse, cap, len, len_ptr, heads, kv_heads, d, \
                               tpr, chunk, scale_log2);                                            \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(DECODE_ROWS_THREADS)                              \
        decode_rows_##SUFFIX(const T* q, const T* kc, const T* vc, float* part_o, float* part_lse,  \
                             int cap, int len, const int* len_ptr, int heads, int kv_heads, int d,  \
                             int hg, int chunk, float scale_log2) {                                 \
        decode_rows_impl<T>(q, kc, vc, part_o, part_lse, cap, len, len_ptr, heads, kv_heads, d, hg, \
                            chunk, scale_log2);                                                    \
    }                                                                                              \
    extern "C" __global__ void decode_combine_##SUFFIX(const float* part_o, const float* part_lse, \
                                                       T* out, float* lse, int nsplit, int heads,  \
                                                       int d) {                                    \
        decode_combine_impl<T>(part_o, part_lse, out, lse, nsplit, heads, d);                      \
    }

FAPOOL_FOR_EACH_TYPE(DECODE)

// The bulk-copy kernel exists for the 16-bit types on sm_90 and newer only
// (decode_rows' domain: the f32 rows are 32 bytes per thread).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // (undefined in a host compiler pass)
#define DECODE_BULK(T, SUFFIX)                                                                         \
    extern "C" __global__ void __launch_bounds__(32 + DECODE_ROWS_THREADS, 1)                          \
        decode_bulk_##SUFFIX(const T* q, const T* kc, const T* vc, float* part_o, float* part_lse,     \
                             int cap, int len, const int* len_ptr, int heads, int kv_heads, int d,      \
                             int hg, int chunk, float scale_log2) {                                     \
        decode_bulk_impl<T>(q, kc, vc, part_o, part_lse, cap, len, len_ptr, heads, kv_heads, d, hg,   \
                            chunk, scale_log2);                                                         \
    }
DECODE_BULK(bf16, bf16)
DECODE_BULK(f16, f16)
#endif
